//! Previews: a worker puts the latest image of its running job, clients fetch it and hear of it on
//! the push routes; only while the job runs, only under the lease, only images, only so large.

use serde_json::Value;

use crate::helpers::{SseReader, TestApp, error_of, png_bytes, png_form, spawn_app, spawn_with};

/// A real JPEG of `w`×`h` pixels.
fn jpeg_bytes(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, shade]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

async fn put_preview(app: &TestApp, id: &str, token: &str, bytes: Vec<u8>) -> reqwest::Response {
    app.put(&format!("/worker/jobs/{id}/preview"))
        .header("lease-token", token)
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// A submitted and leased job: (id, lease token).
async fn running_job(app: &TestApp) -> (String, String) {
    let resp = app.submit(png_form("previewed").text("previews", "true")).await;
    assert_eq!(resp.status(), 200);
    let id = resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
    let lease = app.lease("w", 2.0).await.expect("a lease");
    assert_eq!(lease["job_id"], id);
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    // Acknowledge the lease, as a worker's first call does.
    assert_eq!(app.heartbeat(&id, &token, None).await.status(), 200);
    (id, token)
}

async fn next_preview_event(reader: &mut SseReader) -> Value {
    loop {
        let (name, data) = reader.next(10.0).await.expect("a preview event before the deadline");
        if name == "preview" {
            return data;
        }
    }
}

#[tokio::test]
async fn a_put_preview_is_served_with_its_type_etag_and_304_until_a_newer_one() {
    let app = spawn_app().await;
    let (id, token) = running_job(&app).await;
    let (status, err) = error_of(app.get(&format!("/jobs/{id}/preview")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("no_preview")), "{err}");

    let first = jpeg_bytes(64, 48, 10);
    assert_eq!(put_preview(&app, &id, &token, first.clone()).await.status(), 204);
    let resp = app.get(&format!("/jobs/{id}/preview")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/jpeg");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let seq: u64 = resp.headers()["preview-seq"].to_str().unwrap().parse().unwrap();
    assert!(etag.ends_with(&format!("-{seq}\"")), "the ETag names the sequence: {etag}");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), first);

    let again = app.get(&format!("/jobs/{id}/preview")).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert!(again.bytes().await.unwrap().is_empty());

    // A PNG replaces the JPEG; the old ETag no longer matches.
    let second = png_bytes(32, 32);
    assert_eq!(put_preview(&app, &id, &token, second.clone()).await.status(), 204);
    let resp = app.get(&format!("/jobs/{id}/preview")).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    let newer: u64 = resp.headers()["preview-seq"].to_str().unwrap().parse().unwrap();
    assert!(newer > seq);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), second);

    let unknown = uuid_like();
    let (status, err) = error_of(app.get(&format!("/jobs/{unknown}/preview")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("job_not_found")));
}

fn uuid_like() -> String {
    "0b6f8a52-4a8e-4bd4-9d53-6f0c2b7d9e11".to_owned()
}

#[tokio::test]
async fn a_stale_lease_gets_409_lease_lost_and_stores_nothing() {
    let app = spawn_app().await;
    let (id, token) = running_job(&app).await;
    let resp = put_preview(&app, &id, "not-the-token", jpeg_bytes(16, 16, 1)).await;
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("lease_lost")), "{err}");
    let (status, _) = error_of(app.get(&format!("/jobs/{id}/preview")).send().await.unwrap()).await;
    assert_eq!(status, 404);

    // The job is handed back (requeued): the old token is stale now.
    assert_eq!(app.fail(&id, &token, "backend down", true).await.status(), 200);
    let (status, err) = error_of(put_preview(&app, &id, &token, jpeg_bytes(16, 16, 1)).await).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("lease_lost")), "{err}");

    let (status, err) =
        error_of(app.put(&format!("/worker/jobs/{id}/preview")).body(jpeg_bytes(16, 16, 1)).send().await.unwrap())
            .await;
    assert_eq!((status, err["field"].as_str()), (400, Some("Lease-Token")));
}

#[tokio::test]
async fn an_oversized_preview_is_413_naming_the_limit_and_a_non_image_is_refused() {
    let app = spawn_app().await;
    let (id, token) = running_job(&app).await;
    let big = vec![0xFFu8; 2 * 1024 * 1024 + 1];
    let (status, err) = error_of(put_preview(&app, &id, &token, big).await).await;
    assert_eq!((status, err["code"].as_str(), err["limit"].as_u64()), (413, Some("payload_too_large"), Some(2 << 20)));
    assert!(err["message"].as_str().unwrap().contains("preview"), "{err}");

    // Chunked (no Content-Length): cut off at the limit while it streams.
    let chunks = futures_util::stream::iter(
        (0..3).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0xFFu8; 1024 * 1024]))),
    );
    let resp = app
        .put(&format!("/worker/jobs/{id}/preview"))
        .header("lease-token", &token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["limit"].as_u64()), (413, Some(2 << 20)));

    for (body, what) in [(b"GIF89a not a preview".to_vec(), "gif"), (b"<html>".to_vec(), "html")] {
        let (status, err) = error_of(put_preview(&app, &id, &token, body).await).await;
        assert_eq!(
            (status, err["code"].as_str(), err["field"].as_str()),
            (400, Some("unsupported_image"), Some("body")),
            "{what}"
        );
    }
    let (status, err) = error_of(put_preview(&app, &id, &token, Vec::new()).await).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("empty_preview")));
    let (status, _) = error_of(app.get(&format!("/jobs/{id}/preview")).send().await.unwrap()).await;
    assert_eq!(status, 404, "nothing refused was stored");
}

#[tokio::test]
async fn max_preview_mb_zero_turns_previews_off() {
    let app = spawn_with(|a| a.max_preview_mb = 0).await;
    let (id, token) = running_job(&app).await;
    let (status, err) = error_of(put_preview(&app, &id, &token, jpeg_bytes(16, 16, 1)).await).await;
    assert_eq!((status, err["limit"].as_u64()), (413, Some(0)));
    assert!(err["message"].as_str().unwrap().contains("MAX_PREVIEW_MB"), "{err}");
}

#[tokio::test]
async fn the_preview_is_dropped_when_the_job_finishes_and_a_finished_job_takes_none() {
    let app = spawn_app().await;
    let (id, token) = running_job(&app).await;
    assert_eq!(put_preview(&app, &id, &token, jpeg_bytes(32, 32, 5)).await.status(), 204);
    assert_eq!(app.get(&format!("/jobs/{id}/preview")).send().await.unwrap().status(), 200);
    assert_eq!(app.put_result(&id, &token, b"mp4".to_vec()).await.status(), 200);
    let (status, err) = error_of(app.get(&format!("/jobs/{id}/preview")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("no_preview")));
    let (status, err) = error_of(put_preview(&app, &id, &token, jpeg_bytes(32, 32, 6)).await).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("lease_lost")), "{err}");

    // Cancelled: the same.
    let (id, token) = running_job(&app).await;
    assert_eq!(put_preview(&app, &id, &token, jpeg_bytes(32, 32, 5)).await.status(), 204);
    app.delete(&format!("/jobs/{id}")).send().await.unwrap();
    let (status, _) = error_of(app.get(&format!("/jobs/{id}/preview")).send().await.unwrap()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_preview_is_an_sse_event_with_its_url_not_a_state_change() {
    let app = spawn_app().await;
    let (id, token) = running_job(&app).await;
    let version = app.job(&id).await["version"].as_u64().unwrap();
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let mut one = SseReader::new(app.get(&format!("/jobs/{id}/events")).send().await.unwrap());
    assert_eq!(one.next(10.0).await.unwrap().0, "snapshot");
    let snapshot_id = one.last_id.clone();

    assert_eq!(put_preview(&app, &id, &token, jpeg_bytes(48, 32, 9)).await.status(), 204);
    for reader in [&mut all, &mut one] {
        let ev = next_preview_event(reader).await;
        assert_eq!((ev["type"].as_str(), ev["event"].as_str()), (Some("preview"), Some("preview")));
        assert_eq!(ev["job_id"], id);
        assert_eq!(ev["url"], format!("/jobs/{id}/preview"));
        assert_eq!(ev["content_type"], "image/jpeg");
        assert!(ev["seq"].as_u64().unwrap() > 0);
        assert!(ev.get("job").is_none(), "a preview event carries no job state");
        // The URL serves the image it announced.
        let resp = app.get(ev["url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(resp.headers()["preview-seq"].to_str().unwrap(), ev["seq"].to_string());
    }
    assert_eq!(one.last_id, snapshot_id, "a preview has no event id: Last-Event-ID stays on the last change");
    assert_eq!(app.job(&id).await["version"].as_u64().unwrap(), version, "a preview is not a change of the job");

    // A stream that opens mid-run gets the newest preview right after its snapshot.
    let mut late = SseReader::new(app.get(&format!("/jobs/{id}/events")).send().await.unwrap());
    assert_eq!(late.next(10.0).await.unwrap().0, "snapshot");
    let (name, ev) = late.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), ev["job_id"].as_str()), ("preview", Some(id.as_str())));

    // Nor is it replayed: a stream resumed from before it goes on with the next state change.
    let resumed = app.get("/events").header("last-event-id", snapshot_id.unwrap()).send().await.unwrap();
    let mut resumed = SseReader::new(resumed);
    app.put_result(&id, &token, b"mp4".to_vec()).await;
    let (name, _) = resumed.next(10.0).await.unwrap();
    assert_eq!(name, "done");
}

#[tokio::test]
async fn a_preview_is_a_websocket_message_too() {
    use futures_util::StreamExt;
    let app = spawn_app().await;
    let (id, token) = running_job(&app).await;
    let url = format!("{}/ws?job_id={id}", app.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("hello"));
    assert_eq!(put_preview(&app, &id, &token, jpeg_bytes(16, 16, 3)).await.status(), 204);
    let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    let ev: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!((ev["type"].as_str(), ev["job_id"].as_str()), (Some("preview"), Some(id.as_str())));
}

#[tokio::test]
async fn the_openapi_document_declares_the_preview_routes_and_event() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").send().await.unwrap().json().await.unwrap();
    let put = &doc["paths"]["/worker/jobs/{id}/preview"]["put"];
    for status in ["204", "400", "409", "413"] {
        assert!(put["responses"].get(status).is_some(), "PUT preview declares {status}");
    }
    let get = &doc["paths"]["/jobs/{id}/preview"]["get"];
    for status in ["200", "304", "404"] {
        assert!(get["responses"].get(status).is_some(), "GET preview declares {status}");
    }
    let event = &doc["components"]["schemas"]["PreviewEvent"]["properties"];
    for field in ["type", "event", "job_id", "seq", "url", "content_type", "size"] {
        assert!(event.get(field).is_some(), "PreviewEvent has {field}");
    }
}

#[tokio::test]
async fn a_job_submitted_without_previews_takes_none() {
    let app = spawn_app().await;
    let id = app.submit_png("no previews asked").await;
    let lease = app.lease("w", 2.0).await.expect("a lease");
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    let (status, body) = error_of(put_preview(&app, &id, &token, png_bytes(8, 8)).await).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("previews_off")));
    let got = app.get(&format!("/jobs/{id}/preview")).send().await.unwrap();
    assert_eq!(got.status(), 404, "nothing was kept");
}
