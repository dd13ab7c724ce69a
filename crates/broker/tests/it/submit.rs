//! `POST /jobs`: the happy path, every bad input, idempotency, and that refusals lose nothing.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::{error_of, png_bytes, png_form, spawn_app};

fn image_part(bytes: Vec<u8>, mime: &str) -> Part {
    Part::bytes(bytes).file_name("frame.png").mime_str(mime).unwrap()
}

#[tokio::test]
async fn submit_returns_the_design_fields_and_get_shows_the_job() {
    let app = spawn_app().await;
    let form = png_form("a neon city at night").text("negative_prompt", "blurry").text("seed", "42");
    let resp = app.submit(form).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "queued");
    assert_eq!(body["queue_position"], 1);
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    let id = body["job_id"].as_str().unwrap();

    let job = app.job(id).await;
    for key in ["id", "status", "created_at", "prompt", "has_result", "error_message", "processing_time"] {
        assert!(job.get(key).is_some(), "GET /jobs/{{id}} lacks {key}: {job}");
    }
    assert_eq!(job["id"], id);
    assert_eq!(job["prompt"], "a neon city at night");
    assert_eq!(job["negative_prompt"], "blurry");
    assert_eq!(job["seed"], 42);
    assert_eq!(job["has_result"], false);
    assert_eq!(job["error_message"], Value::Null);
    assert_eq!(job["processing_time"], Value::Null);
    assert_eq!(job["workflow"], "ltxv_image_to_video");
    assert_eq!(job["attempts"], 0);
    // The original design's type: seconds since the epoch, so `time.time() - created_at` works.
    let created = job["created_at"].as_f64().expect("created_at is a number");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - created).abs() < 60.0, "created_at {created} is now ({now})");
    assert_eq!(app.files("inputs"), vec![id.to_owned()]);
}

#[tokio::test]
async fn queue_positions_follow_submission_order() {
    let app = spawn_app().await;
    let a = app.submit_png("a").await;
    let b = app.submit_png("b").await;
    assert_eq!(app.job(&a).await["queue_position"], 1);
    assert_eq!(app.job(&b).await["queue_position"], 2);
    app.lease("w", 1.0).await.unwrap();
    assert_eq!(app.job(&b).await["queue_position"], 1);
    assert_eq!(app.job(&a).await["queue_position"], Value::Null);
}

#[tokio::test]
async fn jpeg_and_webp_are_accepted_by_their_bytes() {
    let app = spawn_app().await;
    let img = image::RgbImage::from_pixel(32, 16, image::Rgb([10, 200, 30]));
    for (format, mime) in [(image::ImageFormat::Jpeg, "image/jpeg"), (image::ImageFormat::WebP, "image/webp")] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, format).unwrap();
        // The declared type is wrong on purpose: only the bytes count.
        let form = Form::new().part("image", image_part(bytes.into_inner(), "application/octet-stream"));
        let resp = app.submit(form).await;
        assert_eq!(resp.status(), 200, "{mime}");
        let id = resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
        let lease = app.lease("w", 1.0).await.unwrap();
        assert_eq!(lease["job_id"], id);
        assert_eq!(lease["input"]["content_type"], mime);
        assert_eq!((lease["input"]["width"].as_u64(), lease["input"]["height"].as_u64()), (Some(32), Some(16)));
    }
}

#[tokio::test]
async fn every_bad_input_gets_a_4xx_naming_the_field_and_loses_nothing() {
    let app = spawn_app().await;
    let good = app.submit_png("kept").await;

    let mut absurd = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    absurd.extend_from_slice(&100_000u32.to_be_bytes());
    absurd.extend_from_slice(&100_000u32.to_be_bytes());
    absurd.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);

    let png = || image_part(png_bytes(8, 8), "image/png");
    let cases: Vec<(&str, Form, u16, &str, Option<&str>)> = vec![
        ("no image", Form::new().text("prompt", "x"), 400, "missing_field", Some("image")),
        ("empty image", Form::new().part("image", image_part(vec![], "image/png")), 400, "empty_file", Some("image")),
        (
            "text posing as png",
            Form::new().part("image", image_part(b"this is not an image at all".to_vec(), "image/png")),
            400,
            "unsupported_image",
            Some("image"),
        ),
        (
            "absurd header",
            Form::new().part("image", image_part(absurd, "image/png")),
            400,
            "image_too_large_dimensions",
            Some("image"),
        ),
        ("seed not integer", Form::new().part("image", png()).text("seed", "4.5"), 400, "invalid_seed", Some("seed")),
        ("seed negative", Form::new().part("image", png()).text("seed", "-2"), 400, "invalid_seed", Some("seed")),
        (
            "seed too big",
            Form::new().part("image", png()).text("seed", "18446744073709551616"),
            400,
            "invalid_seed",
            Some("seed"),
        ),
        (
            "prompt too long",
            Form::new().part("image", png()).text("prompt", "x".repeat(10_001)),
            400,
            "field_too_long",
            Some("prompt"),
        ),
        (
            "params not json",
            Form::new().part("image", png()).text("params", "{nope"),
            400,
            "invalid_params",
            Some("params"),
        ),
        (
            "params not object",
            Form::new().part("image", png()).text("params", "[1,2]"),
            400,
            "invalid_params",
            Some("params"),
        ),
        (
            "unknown param",
            Form::new().part("image", png()).text("params", r#"{"no_such_param": 1}"#),
            400,
            "invalid_params",
            Some("params"),
        ),
        (
            "unknown workflow",
            Form::new().part("image", png()).text("workflow", "nope"),
            400,
            "unknown_workflow",
            Some("workflow"),
        ),
    ];
    for (what, form, status, code, field) in cases {
        let (got_status, err) = error_of(app.submit(form).await).await;
        assert_eq!(got_status, status, "{what}: {err}");
        assert_eq!(err["code"], code, "{what}: {err}");
        assert_eq!(err["field"].as_str(), field, "{what}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| m.len() > 10), "{what}: {err}");
    }
    let (_, err) =
        error_of(app.submit(Form::new().part("image", png()).text("prompt", "x".repeat(10_001))).await).await;
    assert_eq!(err["limit"], 10_000);

    let resp = app.post("/jobs").body("not multipart").send().await.unwrap();
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_multipart")));

    // Nothing was stored by the refusals, and nothing was lost.
    let health = app.health().await;
    assert_eq!(health["jobs_count"], 1);
    assert_eq!(app.files("inputs"), vec![good.clone()]);
    assert!(app.files("tmp").is_empty(), "staged files left behind: {:?}", app.files("tmp"));
    assert_eq!(app.job(&good).await["status"], "queued");
}

#[tokio::test]
async fn uploads_over_max_upload_mb_get_a_413_that_names_the_limit() {
    let app = spawn_app().await; // MAX_UPLOAD_MB = 5 in tests
    let mut big = png_bytes(8, 8);
    big.resize(6 * 1024 * 1024, 0);
    // With a Content-Length, refused before reading; without one (streamed), refused while reading.
    let sized = Form::new().part("image", image_part(big.clone(), "image/png"));
    let stream = futures_util::stream::iter(
        big.chunks(64 * 1024).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
    );
    let streamed = Form::new().part("image", Part::stream(reqwest::Body::wrap_stream(stream)).file_name("f.png"));
    for form in [sized, streamed] {
        let (status, err) = error_of(app.submit(form).await).await;
        assert_eq!(status, 413);
        assert_eq!(err["code"], "payload_too_large");
        assert_eq!(err["limit"], 5 * 1024 * 1024);
        assert!(err["message"].as_str().unwrap().contains("MAX_UPLOAD_MB"), "{err}");
        assert!(err["message"].as_str().unwrap().contains("5 MB"), "{err}");
    }
    assert_eq!(app.health().await["jobs_count"], 0);
    assert!(app.files("tmp").is_empty());
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_and_refuses_a_different_body() {
    let app = spawn_app().await;
    let send = |prompt: &'static str, key: &'static str| {
        let app = &app;
        async move { app.post("/jobs").header("Idempotency-Key", key).multipart(png_form(prompt)).send().await.unwrap() }
    };
    let first = send("same", "key-1").await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let again = send("same", "key-1").await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["job_id"], first["job_id"]);

    let (status, err) = error_of(send("different", "key-1").await).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("idempotency_key_reused")));

    let other: Value = send("same", "key-2").await.json().await.unwrap();
    assert_ne!(other["job_id"], first["job_id"]);
    assert_eq!(app.health().await["jobs_count"], 2);
    assert_eq!(app.files("inputs").len(), 2, "a replay must not leave a second input file");
}

#[tokio::test]
async fn seed_minus_one_picks_a_random_seed_and_reports_it() {
    let app = spawn_app().await;
    let mut seeds = std::collections::HashSet::new();
    for _ in 0..3 {
        let resp = app.submit(png_form("random please").text("seed", "-1")).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        let id = resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
        let job = app.job(&id).await;
        let seed = job["seed"].as_u64().expect("the seed used is reported");
        assert!(seed < 1 << 53, "exact in every JSON reader: {seed}");
        let lease = app.lease("w", 2.0).await.expect("leased");
        assert_eq!(lease["seed"].as_u64(), Some(seed), "the worker runs the reported seed");
        seeds.insert(seed);
    }
    assert_eq!(seeds.len(), 3, "each -1 picks its own seed");
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([(x * 3) as u8, (y * 4) as u8, ((x ^ y) * 5) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn truncated_or_corrupt_frames_are_refused_at_submit_and_whole_ones_accepted() {
    let app = spawn_app().await;
    let png = encoded(image::ImageFormat::Png);
    let jpeg = encoded(image::ImageFormat::Jpeg);
    let webp = encoded(image::ImageFormat::WebP);
    let mut flipped = png.clone();
    let mid = flipped.len() / 2; // inside IDAT: the header is intact, a CRC is not
    flipped[mid] ^= 0x55;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("PNG cut off mid-write", png[..png.len() * 2 / 3].to_vec(), "image/png"),
        ("PNG without IEND", png[..png.len() - 12].to_vec(), "image/png"),
        ("PNG with a damaged chunk", flipped, "image/png"),
        ("JPEG cut off mid-scan", jpeg[..jpeg.len() * 2 / 3].to_vec(), "image/jpeg"),
        ("JPEG without EOI", jpeg[..jpeg.len() - 2].to_vec(), "image/jpeg"),
        ("WebP cut off", webp[..webp.len() - 7].to_vec(), "image/webp"),
    ];
    for (name, bytes, mime) in cases {
        let resp = app.submit(Form::new().part("image", image_part(bytes, mime)).text("prompt", name)).await;
        let (status, err) = error_of(resp).await;
        assert_eq!(
            (status, err["code"].as_str(), err["field"].as_str()),
            (400, Some("corrupt_image"), Some("image")),
            "{name}: {err}"
        );
        assert!(err["message"].as_str().unwrap().contains("send the frame again"), "{name}: {err}");
    }
    assert!(app.files("inputs").is_empty(), "no refused frame was kept");
    assert!(app.files("tmp").is_empty(), "no staged file was left behind");
    for (bytes, mime) in [(png, "image/png"), (jpeg, "image/jpeg"), (webp, "image/webp")] {
        let resp = app.submit(Form::new().part("image", image_part(bytes, mime)).text("prompt", "whole")).await;
        assert_eq!(resp.status(), 200, "a whole {mime} is accepted: {}", resp.text().await.unwrap());
    }
}

#[tokio::test]
async fn past_max_queue_a_submission_gets_429_with_retry_after_and_nothing_is_kept() {
    let app = crate::helpers::spawn_with(|a| a.max_queue = 3).await;
    for i in 0..3 {
        app.submit_png(&format!("fits {i}")).await;
    }
    let resp = app.submit(png_form("one too many")).await;
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["code"].as_str(), err["limit"].as_u64()), (429, Some("queue_full"), Some(3)), "{err}");
    assert!(err["message"].as_str().unwrap().contains("MAX_QUEUE"), "{err}");
    assert!(retry_after.and_then(|v| v.parse::<u64>().ok()).is_some_and(|s| s > 0), "Retry-After in seconds");
    assert_eq!(app.files("inputs").len(), 3, "the refused frame was not kept");
    // A retry of an accepted submission (same Idempotency-Key) gets its job, full queue or not.
    let first = app.submit(png_form("keyed")).await;
    assert_eq!(first.status(), 429, "no room for a new job");
    app.lease("w", 2.0).await.expect("leased");
    let keyed = app.post("/jobs").header("idempotency-key", "k-1").multipart(png_form("keyed")).send().await.unwrap();
    assert_eq!(keyed.status(), 200);
    let replay = app.post("/jobs").header("idempotency-key", "k-1").multipart(png_form("keyed")).send().await.unwrap();
    assert_eq!(replay.status(), 200, "the replay is answered while the queue is full again");
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    // Once a worker takes a job, there is room again.
    app.lease("w", 2.0).await.expect("leased");
    app.submit_png("fits again").await;
}
