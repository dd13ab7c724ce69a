//! Streams: `previews` carried to the worker, `stream`/`mode=latest` supersede, `preempt`,
//! round-robin between streams, positions in claim order, `dedupe`, and the schema upgrade that
//! brought the columns.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::{SseReader, TestApp, error_of, png_bytes, spawn_app, spawn_with, test_args};

/// A frame form with extra text fields.
fn form(prompt: &str, fields: &[(&str, &str)]) -> Form {
    form_with(png_bytes(64, 40), prompt, fields)
}

fn form_with(png: Vec<u8>, prompt: &str, fields: &[(&str, &str)]) -> Form {
    let mut f = Form::new()
        .part("image", Part::bytes(png).file_name("frame.png").mime_str("image/png").unwrap())
        .text("prompt", prompt.to_owned());
    for (k, v) in fields {
        f = f.text(k.to_string(), v.to_string());
    }
    f
}

async fn submit_ok(app: &TestApp, form: Form) -> Value {
    let resp = app.submit(form).await;
    assert_eq!(resp.status(), 200, "submit failed: {}", resp.text().await.unwrap());
    resp.json().await.unwrap()
}

async fn submit_id(app: &TestApp, prompt: &str, fields: &[(&str, &str)]) -> String {
    submit_ok(app, form(prompt, fields)).await["job_id"].as_str().unwrap().to_owned()
}

/// The database of schema version 2 (the broker before streams), as that broker created it.
const SCHEMA_V2: &str = "
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    prompt TEXT NOT NULL, negative_prompt TEXT NOT NULL, seed INTEGER, workflow TEXT NOT NULL,
    params TEXT NOT NULL, input_content_type TEXT NOT NULL, input_size INTEGER NOT NULL,
    input_width INTEGER NOT NULL, input_height INTEGER NOT NULL, input_present INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT, lease_owner TEXT, lease_expires_at INTEGER, progress TEXT, error_message TEXT,
    result_state TEXT NOT NULL DEFAULT 'none', result_content_type TEXT, result_size INTEGER,
    comfy_execution_ms INTEGER, idempotency_key TEXT UNIQUE, request_fingerprint TEXT,
    version INTEGER NOT NULL DEFAULT 1, timeout_grace_until INTEGER
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_with_files_by_finish ON jobs (finished_at) WHERE input_present = 1 OR result_state = 'present';
CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO job_counts VALUES ('queued', 0), ('running', 0), ('done', 0), ('error', 0), ('cancelled', 0);
CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
END;
CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
END;
CREATE TRIGGER jobs_counted_update AFTER UPDATE OF status ON jobs WHEN OLD.status <> NEW.status BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
END;
PRAGMA user_version = 2;
";

const Q1: &str = "00000000-0000-4000-8000-000000000001";
const Q2: &str = "00000000-0000-4000-8000-000000000002";
const DONE: &str = "00000000-0000-4000-8000-000000000003";
const CANCELLED: &str = "00000000-0000-4000-8000-000000000004";

#[tokio::test]
async fn a_database_of_the_previous_schema_keeps_its_jobs_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("files/inputs")).unwrap();
    std::fs::create_dir_all(data.join("files/results")).unwrap();
    let png = png_bytes(64, 40);
    let clip: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    {
        let db = rusqlite::Connection::open(data.join("jobs.sqlite3")).unwrap();
        db.execute_batch(SCHEMA_V2).unwrap();
        let t = 1_700_000_000_000i64;
        for (seq, id, status, prompt) in [
            (1, Q1, "queued", "first"),
            (2, DONE, "done", "made"),
            (3, CANCELLED, "cancelled", "gone"),
            (4, Q2, "queued", "second"),
        ] {
            let done = status == "done";
            db.execute(
                "INSERT INTO jobs (seq, id, status, prompt, negative_prompt, seed, workflow, params, \
                 input_content_type, input_size, input_width, input_height, input_present, created_at, \
                 finished_at, attempts, result_state, result_content_type, result_size, error_message) \
                 VALUES (?1, ?2, ?3, ?4, 'blurry', 42, 'ltxv_image_to_video', '{\"frames\":25}', 'image/png', ?5, \
                 64, 40, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                rusqlite::params![
                    seq,
                    id,
                    status,
                    prompt,
                    png.len() as i64,
                    status == "queued" || done,
                    t + seq,
                    (status != "queued").then_some(t + 100 + seq),
                    done as i64,
                    if done { "present" } else { "none" },
                    done.then_some("video/mp4"),
                    done.then_some(clip.len() as i64),
                    (status == "cancelled").then_some("cancelled by client"),
                ],
            )
            .unwrap();
        }
        for id in [Q1, Q2, DONE] {
            std::fs::write(data.join("files/inputs").join(id), &png).unwrap();
        }
        std::fs::write(data.join("files/results").join(DONE), &clip).unwrap();
    }
    let app = crate::helpers::spawn_in(dir, test_args(data)).await;

    let q1 = app.job(Q1).await;
    assert_eq!(
        (q1["status"].as_str(), q1["prompt"].as_str(), q1["negative_prompt"].as_str(), q1["seed"].as_u64()),
        (Some("queued"), Some("first"), Some("blurry"), Some(42))
    );
    assert_eq!(
        (q1["queue_position"].as_u64(), q1["stream"].clone(), q1["mode"].as_str()),
        (Some(1), Value::Null, Some("queue"))
    );
    assert_eq!(q1["previews"], false);
    assert_eq!(app.job(Q2).await["queue_position"], 2);
    let done = app.job(DONE).await;
    assert_eq!((done["status"].as_str(), done["has_result"].as_bool()), (Some("done"), Some(true)));
    let got = app.get(&format!("/jobs/{DONE}/result")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.to_vec(), clip);
    let cancelled = app.job(CANCELLED).await;
    assert_eq!(
        (cancelled["status"].as_str(), cancelled["cancel_reason"].as_str()),
        (Some("cancelled"), Some("cancelled"))
    );
    let health = app.health().await;
    assert_eq!(
        (health["queued"].as_u64(), health["done"].as_u64(), health["cancelled"].as_u64()),
        (Some(2), Some(1), Some(1))
    );
    // The old queue runs in its old order, with the old inputs, and new jobs join it.
    let new = app.submit_png("after the upgrade").await;
    assert_eq!(app.job(&new).await["queue_position"], 3);
    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!((lease["job_id"].as_str(), lease["params"]["frames"].as_u64()), (Some(Q1), Some(25)));
    assert_eq!(lease["previews"], false);
    let input = app
        .get(&format!("/worker/jobs/{Q1}/input"))
        .header("lease-token", lease["lease_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(input.bytes().await.unwrap().to_vec(), png);
    assert_eq!(app.lease("w", 1.0).await.unwrap()["job_id"], Q2);
    assert_eq!(app.lease("w", 1.0).await.unwrap()["job_id"], new);
}

#[tokio::test]
async fn previews_is_stored_shown_and_carried_on_the_lease() {
    let app = spawn_app().await;
    let with = submit_id(&app, "with", &[("previews", "true")]).await;
    let without = app.submit_png("without").await;
    assert_eq!(app.job(&with).await["previews"], true);
    assert_eq!(app.job(&without).await["previews"], false);
    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!((lease["job_id"].as_str(), lease["previews"].as_bool()), (Some(with.as_str()), Some(true)));
    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!((lease["job_id"].as_str(), lease["previews"].as_bool()), (Some(without.as_str()), Some(false)));
    let (status, err) = error_of(app.submit(form("bad", &[("previews", "maybe")])).await).await;
    assert_eq!((status, err["code"].as_str(), err["field"].as_str()), (400, Some("invalid_flag"), Some("previews")));
}

#[tokio::test]
async fn bad_stream_fields_are_refused_naming_the_field_and_the_limit() {
    let app = spawn_with(|_| {}).await;
    let long = "s".repeat(129);
    for (fields, field, limit) in [
        (vec![("stream", long.as_str())], "stream", Some(128)),
        (vec![("stream", "has space")], "stream", Some(128)),
        (vec![("stream", "tëst")], "stream", Some(128)),
        (vec![("stream", "a"), ("mode", "newest")], "mode", None),
        (vec![("mode", "latest")], "stream", None),
        (vec![("dedupe", "true")], "stream", None),
        (vec![("stream", "a"), ("preempt", "true")], "preempt", None),
        (vec![("stream", "a"), ("mode", "latest"), ("preempt", "perhaps")], "preempt", None),
    ] {
        let (status, err) = error_of(app.submit(form("x", &fields)).await).await;
        assert_eq!((status, err["field"].as_str()), (400, Some(field)), "{fields:?}: {err}");
        assert_eq!(err["limit"].as_u64(), limit, "{fields:?}: {err}");
    }
    assert!(app.files("inputs").is_empty() && app.files("tmp").is_empty());
    let id = submit_id(&app, "ok", &[("stream", &"s".repeat(128)), ("mode", "latest")]).await;
    let job = app.job(&id).await;
    assert_eq!((job["stream"].as_str().map(str::len), job["mode"].as_str()), (Some(128), Some("latest")));
}

/// Every event on `/events` up to the `queued` event of a sentinel job submitted now: the bus is
/// ordered, so what was published before the sentinel has arrived by then.
async fn events_so_far(app: &TestApp, reader: &mut SseReader) -> Vec<(String, String, Value)> {
    let sentinel = app.submit_png("sentinel").await;
    let mut seen = Vec::new();
    loop {
        let (name, ev) = reader.next(10.0).await.expect("events arrive");
        let id = ev["job_id"].as_str().unwrap_or_default().to_owned();
        if id == sentinel {
            return seen;
        }
        seen.push((name, id, ev));
    }
}

fn count(events: &[(String, String, Value)], name: &str, id: &str) -> usize {
    events.iter().filter(|(n, j, _)| n == name && j == id).count()
}

#[tokio::test]
async fn latest_supersedes_the_waiting_jobs_and_keeps_the_running_one() {
    latest_supersedes_the_waiting_jobs_and_keeps_the_running_one_on(spawn_app().await).await
}

#[tokio::test]
async fn latest_supersedes_the_waiting_jobs_and_keeps_the_running_one_postgres() {
    if let Some(db) =
        crate::helpers::TestDb::create("latest_supersedes_the_waiting_jobs_and_keeps_the_running_one").await
    {
        latest_supersedes_the_waiting_jobs_and_keeps_the_running_one_on(
            crate::helpers::spawn_postgres(&db.url, |_| {}).await,
        )
        .await
    }
}

async fn latest_supersedes_the_waiting_jobs_and_keeps_the_running_one_on(app: TestApp) {
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let latest = [("stream", "td-left"), ("mode", "latest")];
    let running = submit_id(&app, "scene 1", &latest).await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    assert_eq!(lease["job_id"], running.as_str());
    // An older job of the stream in queue mode waits too; latest replaces it as well.
    let waiting_a = submit_id(&app, "scene 2", &[("stream", "td-left")]).await;
    let waiting_b = submit_id(&app, "scene 3", &latest).await;
    assert_eq!(app.job(&waiting_a).await["cancel_reason"], "superseded");
    let other = submit_id(&app, "another stream", &[("stream", "td-right"), ("mode", "latest")]).await;
    let body = submit_ok(&app, form("scene 4", &latest)).await;
    let newest = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(body["superseded"], serde_json::json!([waiting_b]));
    assert_eq!((body["status"].as_str(), body["queue_position"].as_u64()), (Some("queued"), Some(2)));

    for (old, by) in [(&waiting_a, &waiting_b), (&waiting_b, &newest)] {
        let job = app.job(old).await;
        assert_eq!(
            (job["status"].as_str(), job["cancel_reason"].as_str(), job["superseded_by"].as_str()),
            (Some("cancelled"), Some("superseded"), Some(by.as_str()))
        );
        assert!(!app.files("inputs").contains(old), "a superseded job's frame is deleted");
    }
    assert_eq!(app.job(&running).await["status"], "running");
    assert_eq!(app.job(&other).await["status"], "queued");
    assert_eq!(app.job(&newest).await["status"], "queued");
    let hb = app.heartbeat(&running, lease["lease_token"].as_str().unwrap(), None).await;
    assert_eq!(hb.json::<Value>().await.unwrap()["cancelled"], false);

    let events = events_so_far(&app, &mut all).await;
    for old in [&waiting_a, &waiting_b] {
        assert_eq!(count(&events, "cancelled", old), 1, "one cancelled event for {old}");
        let ev = events.iter().find(|(n, j, _)| n == "cancelled" && j == old).unwrap();
        assert_eq!(ev.2["job"]["cancel_reason"], "superseded");
    }
    assert_eq!(count(&events, "cancelled", &running), 0);
    // A client's DELETE says so in its reason.
    app.delete(&format!("/jobs/{other}")).send().await.unwrap();
    assert_eq!(app.job(&other).await["cancel_reason"], "cancelled");
}

#[tokio::test]
async fn preempt_cancels_the_running_job_of_its_stream_only() {
    preempt_cancels_the_running_job_of_its_stream_only_on(spawn_app().await).await
}

#[tokio::test]
async fn preempt_cancels_the_running_job_of_its_stream_only_postgres() {
    if let Some(db) = crate::helpers::TestDb::create("preempt_cancels_the_running_job_of_its_stream_only").await {
        preempt_cancels_the_running_job_of_its_stream_only_on(crate::helpers::spawn_postgres(&db.url, |_| {}).await)
            .await
    }
}

async fn preempt_cancels_the_running_job_of_its_stream_only_on(app: TestApp) {
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let mine = submit_id(&app, "mine", &[("stream", "a"), ("mode", "latest")]).await;
    let theirs = submit_id(&app, "theirs", &[("stream", "b"), ("mode", "latest")]).await;
    let l1 = app.lease("gpu-1", 1.0).await.unwrap();
    let l2 = app.lease("gpu-2", 1.0).await.unwrap();
    assert_eq!((l1["job_id"].as_str(), l2["job_id"].as_str()), (Some(mine.as_str()), Some(theirs.as_str())));
    let body = submit_ok(&app, form("now", &[("stream", "a"), ("mode", "latest"), ("preempt", "true")])).await;
    let new = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(body["superseded"], serde_json::json!([mine]));
    let job = app.job(&mine).await;
    assert_eq!(
        (job["status"].as_str(), job["cancel_reason"].as_str(), job["superseded_by"].as_str()),
        (Some("cancelled"), Some("superseded"), Some(new.as_str()))
    );
    // The worker hears it at its next heartbeat, as for a DELETE; the other stream runs on.
    let hb = app.heartbeat(&mine, l1["lease_token"].as_str().unwrap(), None).await;
    assert_eq!(hb.json::<Value>().await.unwrap()["cancelled"], true);
    let hb = app.heartbeat(&theirs, l2["lease_token"].as_str().unwrap(), None).await;
    assert_eq!(hb.json::<Value>().await.unwrap()["cancelled"], false);
    let resp = app.put_result(&mine, l1["lease_token"].as_str().unwrap(), b"too late".to_vec()).await;
    assert_eq!(resp.status(), 409);
    assert_eq!(app.lease("gpu-1", 1.0).await.unwrap()["job_id"], new.as_str());
    let events = events_so_far(&app, &mut all).await;
    assert_eq!(count(&events, "cancelled", &mine), 1);
    assert_eq!(count(&events, "cancelled", &theirs), 0);
}

#[tokio::test]
async fn a_burst_of_latest_submits_never_leaves_two_jobs_waiting_in_the_stream() {
    let app = std::sync::Arc::new(spawn_app().await);
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Watches the waiting count for the whole burst (the stream is the only one with jobs).
    let watcher = {
        let (app, watching) = (app.clone(), watching.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(app.health().await["queued"].as_u64().unwrap());
            }
            most
        })
    };
    let submits: Vec<_> = (0..50)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                submit_ok(&app, form(&format!("frame {i}"), &[("stream", "burst"), ("mode", "latest")])).await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for s in submits {
        ids.push(s.await.unwrap()["job_id"].as_str().unwrap().to_owned());
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(watcher.await.unwrap(), 1, "never more than one job waiting");
    let mut queued = Vec::new();
    for id in &ids {
        let job = app.job(id).await;
        match job["status"].as_str() {
            Some("queued") => queued.push(id.clone()),
            Some("cancelled") => {
                assert_eq!(job["cancel_reason"], "superseded");
                assert!(ids.contains(&job["superseded_by"].as_str().unwrap().to_owned()));
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(queued.len(), 1);
    let health = app.health().await;
    assert_eq!((health["queued"].as_u64(), health["cancelled"].as_u64()), (Some(1), Some(49)));
    assert_eq!(app.files("inputs"), queued, "only the waiting job keeps its frame");
}

#[tokio::test]
async fn jobs_of_one_stream_start_in_submission_order() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit_id(&app, &format!("{i}"), &[("stream", "ordered")]).await);
    }
    for id in &ids {
        assert_eq!(app.lease("w", 1.0).await.unwrap()["job_id"], id.as_str());
    }
}

#[tokio::test]
async fn streams_take_turns_so_a_busy_stream_cannot_starve_another() {
    let app = spawn_app().await;
    let a: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..10 {
            v.push(submit_id(&app, &format!("a{i}"), &[("stream", "machine-a")]).await);
        }
        v
    };
    let b1 = submit_id(&app, "b0", &[("stream", "machine-b")]).await;
    let b2 = submit_id(&app, "b1", &[("stream", "machine-b")]).await;
    let mut order = Vec::new();
    while let Some(lease) = app.lease("gpu", 0.0).await {
        order.push(lease["job_id"].as_str().unwrap().to_owned());
    }
    let mut expected = vec![a[0].clone(), b1, a[1].clone(), b2];
    expected.extend(a[2..].iter().cloned());
    assert_eq!(order, expected, "B's jobs start second and fourth");
}

#[tokio::test]
async fn queue_positions_are_the_claim_order() {
    let app = spawn_app().await;
    let mut queued = Vec::new();
    for (i, stream) in ["a", "a", "", "b", "a", "", "b", "c", "a", "b"].iter().enumerate() {
        let fields: Vec<(&str, &str)> = if stream.is_empty() { vec![] } else { vec![("stream", stream)] };
        queued.push(submit_id(&app, &format!("{i}"), &fields).await);
        if i == 3 {
            // One claim in the middle gives stream a a turn, so the order is not the submission's.
            let first = app.lease("gpu", 0.0).await.unwrap();
            queued.retain(|id| id != first["job_id"].as_str().unwrap());
        }
    }
    let mut by_position = Vec::new();
    for id in &queued {
        let p = app.job(id).await["queue_position"].as_u64().unwrap();
        by_position.push((p, id.clone()));
    }
    by_position.sort();
    let positions: Vec<u64> = by_position.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, (1..=queued.len() as u64).collect::<Vec<_>>(), "positions are 1..n, each once");
    let mut claimed = Vec::new();
    while let Some(lease) = app.lease("gpu", 0.0).await {
        claimed.push(lease["job_id"].as_str().unwrap().to_owned());
    }
    let predicted: Vec<String> = by_position.into_iter().map(|(_, id)| id).collect();
    assert_eq!(claimed, predicted);
}

/// Runs the stream's next job to `done` with `clip` as its result.
async fn finish_next(app: &TestApp, id: &str, clip: &[u8]) {
    let lease = app.lease("gpu", 1.0).await.unwrap();
    assert_eq!(lease["job_id"], id);
    let resp = app.put_result(id, lease["lease_token"].as_str().unwrap(), clip.to_vec()).await;
    assert_eq!(resp.status(), 200);
}

const DEDUPE: [(&str, &str); 4] =
    [("stream", "cam"), ("dedupe", "true"), ("seed", "7"), ("params", "{\"frames\": 25}")];

#[tokio::test]
async fn an_unchanged_frame_with_dedupe_is_done_at_once_with_its_own_copy_of_the_result() {
    let app = spawn_app().await;
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let clip: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 256) as u8).collect();
    let first = submit_id(&app, "a scene", &DEDUPE).await;
    finish_next(&app, &first, &clip).await;

    let body = submit_ok(&app, form("a scene", &DEDUPE)).await;
    let again = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!((body["status"].as_str(), body["reused_from"].as_str()), (Some("done"), Some(first.as_str())));
    let job = app.job(&again).await;
    assert_eq!(
        (job["status"].as_str(), job["has_result"].as_bool(), job["reused_from"].as_str()),
        (Some("done"), Some(true), Some(first.as_str()))
    );
    assert_eq!(job["result"]["size"], clip.len());
    assert!(app.lease("gpu", 0.0).await.is_none(), "no GPU work for a reused result");
    let events = events_so_far(&app, &mut all).await;
    assert_eq!(count(&events, "done", &again), 1);
    assert_eq!(events.iter().filter(|(_, j, _)| j == &again).count(), 1, "one event, done");
    assert!(!app.files("inputs").contains(&again), "the reused job keeps no frame");

    // A third identical frame reuses the second (the stream's last finished job).
    let third = submit_ok(&app, form("a scene", &DEDUPE)).await;
    assert_eq!(third["reused_from"], again.as_str());
    // Deleting the original leaves the copies whole.
    app.delete(&format!("/jobs/{first}")).send().await.unwrap();
    for id in [&again, third["job_id"].as_str().unwrap()] {
        let got = app.get(&format!("/jobs/{id}/result")).send().await.unwrap();
        assert_eq!(got.status(), 200);
        assert_eq!(got.bytes().await.unwrap().to_vec(), clip);
    }
}

#[tokio::test]
async fn a_changed_byte_a_changed_parameter_or_a_random_seed_is_not_a_dedupe_hit() {
    let app = spawn_app().await;
    let clip = b"the clip".to_vec();
    let first = submit_id(&app, "a scene", &DEDUPE).await;
    finish_next(&app, &first, &clip).await;
    // One pixel changed (a PNG is checked to its end, so a byte flipped in place would break its
    // CRC and be refused; re-encoded, the frame is valid and a few bytes differ).
    let mut img = image::load_from_memory(&png_bytes(64, 40)).unwrap().to_rgb8();
    img.put_pixel(3, 3, image::Rgb([1, 2, 3]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    let one_pixel = out.into_inner();
    let mut other_seed = DEDUPE;
    other_seed[2] = ("seed", "8");
    let mut other_params = DEDUPE;
    other_params[3] = ("params", "{\"frames\": 33}");
    let mut random = DEDUPE;
    random[2] = ("seed", "-1");
    let cases: Vec<(&str, Form)> = vec![
        ("changed frame", form_with(one_pixel, "a scene", &DEDUPE)),
        ("changed prompt", form("another scene", &DEDUPE)),
        ("changed negative prompt", form("a scene", &[DEDUPE.as_slice(), &[("negative_prompt", "x")]].concat())),
        ("changed seed", form("a scene", &other_seed)),
        ("changed params", form("a scene", &other_params)),
    ];
    for (what, f) in cases {
        let body = submit_ok(&app, f).await;
        assert_eq!((body["status"].as_str(), body["reused_from"].clone()), (Some("queued"), Value::Null), "{what}");
        // Cancelled, so the stream's last finished job stays the first one.
        app.delete(&format!("/jobs/{}", body["job_id"].as_str().unwrap())).send().await.unwrap();
    }
    // A random seed is never a hit, not even after a random-seed job of the same frame finished.
    let r1 = submit_id(&app, "a scene", &random).await;
    finish_next(&app, &r1, &clip).await;
    let body = submit_ok(&app, form("a scene", &random)).await;
    assert_eq!((body["status"].as_str(), body["reused_from"].clone()), (Some("queued"), Value::Null));
    // Without dedupe=true an unchanged frame runs as usual.
    let body =
        submit_ok(&app, form("a scene", &DEDUPE[..1].iter().chain(&DEDUPE[2..]).copied().collect::<Vec<_>>())).await;
    assert_eq!(body["status"], "queued");
}

fn latest_request(boundary: &str, addr: &str, png: &[u8]) -> (String, Vec<u8>) {
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"stream\"\r\n\r\ns\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"mode\"\r\n\r\nlatest\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"image\"; filename=\"f.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(png);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST /jobs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    (head, body)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    // Generous: every accepted upload syncs its file and its commit, on a disk other work shares.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_latest_submit_whose_client_hangs_up_supersedes_all_or_nothing() {
    use tokio::io::AsyncWriteExt;
    let app = spawn_app().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let png = png_bytes(64, 40);
    let waiting = submit_id(&app, "keep me", &[("stream", "s"), ("mode", "latest")]).await;

    // Cut off mid-frame: the request never reaches the store, so nothing is superseded.
    let (head, body) = latest_request("cut", &addr, &png);
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body[..body.len() - png.len() / 2]).await.unwrap();
    wait_for("the frame to be staged", || !app.files("tmp").is_empty()).await;
    drop(tcp);
    wait_for("the staged frame to be removed", || app.files("tmp").is_empty()).await;
    let job = app.job(&waiting).await;
    assert_eq!((job["status"].as_str(), job["queue_position"].as_u64()), (Some("queued"), Some(1)));
    let list: Value = app.get("/jobs").send().await.unwrap().json().await.unwrap();
    assert_eq!(list["count"], 1, "no job from the broken upload");

    // Whole requests whose client leaves at once, at moments swept across the handler's work:
    // each either replaced the waiting job with its own or did nothing.
    for round in 0..20u64 {
        let (head, body) = latest_request("whole", &addr, &png);
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&body).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_micros(round * 250)).await;
        drop(tcp);
    }
    // Also shows that a request dropped while its frame's file was being created leaves no file.
    wait_for("uploads to settle", || app.files("tmp").is_empty()).await;
    // A normal submit afterwards is stored after every hung-up one that got as far as the store.
    let last = submit_ok(&app, form("last", &[("stream", "s"), ("mode", "latest")])).await;
    let list: Value = app.get("/jobs?limit=500").send().await.unwrap().json().await.unwrap();
    let jobs = list["jobs"].as_array().unwrap();
    let queued: Vec<&Value> = jobs.iter().filter(|j| j["status"] == "queued").collect();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0]["id"], last["job_id"]);
    for job in jobs.iter().filter(|j| j["status"] == "cancelled") {
        assert_eq!(job["cancel_reason"], "superseded");
        let by = job["superseded_by"].as_str().unwrap();
        assert!(jobs.iter().any(|j| j["id"] == by), "the job that superseded {} exists", job["id"]);
    }
    assert_eq!(app.files("inputs"), vec![last["job_id"].as_str().unwrap().to_owned()]);
}

#[tokio::test]
async fn the_document_declares_the_stream_fields_as_the_handlers_take_them() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").send().await.unwrap().json().await.unwrap();
    let schemas = &doc["components"]["schemas"];
    let form = &schemas["SubmitForm"]["properties"];
    assert_eq!(form["stream"]["maxLength"], 128, "{}", form["stream"]);
    for flag in ["preempt", "dedupe", "previews"] {
        assert!(form[flag].to_string().contains("boolean"), "{flag}: {}", form[flag]);
    }
    assert!(form["mode"].to_string().contains("StreamMode"), "{}", form["mode"]);
    assert_eq!(schemas["StreamMode"]["enum"], serde_json::json!(["queue", "latest"]));
    for field in ["stream", "mode", "previews", "cancel_reason", "superseded_by", "reused_from"] {
        assert!(schemas["JobView"]["properties"][field].is_object(), "JobView.{field}");
    }
    for field in ["reused_from", "superseded"] {
        assert!(schemas["SubmitResponse"]["properties"][field].is_object(), "SubmitResponse.{field}");
    }
    assert!(schemas["Lease"]["properties"]["previews"].is_object());
}

#[tokio::test]
async fn a_dedupe_hit_in_latest_mode_supersedes_the_waiting_job_and_survives_a_restart() {
    let app = spawn_app().await;
    let clip: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let latest: Vec<(&str, &str)> = [DEDUPE.as_slice(), &[("mode", "latest")]].concat();
    let first = submit_id(&app, "still", &latest).await;
    finish_next(&app, &first, &clip).await;
    let running = submit_id(&app, "moving", &latest).await;
    assert_eq!(app.lease("gpu", 1.0).await.unwrap()["job_id"], running.as_str());
    let waiting = submit_id(&app, "moving on", &latest).await;
    // The scene is back to the first one: answered at once, and the stale waiting job goes.
    let body = submit_ok(&app, form("still", &latest)).await;
    let hit = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!((body["status"].as_str(), body["reused_from"].as_str()), (Some("done"), Some(first.as_str())));
    assert_eq!(body["superseded"], serde_json::json!([waiting]));
    assert_eq!(app.job(&waiting).await["superseded_by"], hit.as_str());
    assert_eq!(app.job(&running).await["status"], "running");

    // The files the reused job owns are its own at the next start too (nothing reconciled away).
    let app = app.restart().await;
    app.delete(&format!("/jobs/{first}")).send().await.unwrap();
    let got = app.get(&format!("/jobs/{hit}/result")).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().to_vec(), clip);
    // With the original's result gone, an identical frame reuses the hit (the stream's last done).
    let again = submit_ok(&app, form("still", &latest)).await;
    assert_eq!(again["reused_from"], hit.as_str());
    // Once no finished job of the stream has its result, an identical frame runs.
    app.delete(&format!("/jobs/{hit}")).send().await.unwrap();
    app.delete(&format!("/jobs/{}", again["job_id"].as_str().unwrap())).send().await.unwrap();
    let miss = submit_ok(&app, form("still", &latest)).await;
    assert_eq!((miss["status"].as_str(), miss["reused_from"].clone()), (Some("queued"), Value::Null));
}

#[tokio::test]
async fn a_job_of_a_latest_stream_handed_back_or_failed_retryably_is_superseded_by_the_newer_job_not_run_again() {
    let app = spawn_app().await;
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let latest = [("stream", "td"), ("mode", "latest")];
    let mut olds = Vec::new();
    for retryable_failure in [true, false] {
        let old = submit_id(&app, "old scene", &latest).await;
        let lease = app.lease("gpu", 1.0).await.unwrap();
        assert_eq!(lease["job_id"], old.as_str());
        let token = lease["lease_token"].as_str().unwrap().to_owned();
        let newer = submit_id(&app, "new scene", &latest).await;
        if retryable_failure {
            assert_eq!(app.fail(&old, &token, "ComfyUI went away", true).await.status(), 200);
        } else {
            // A stopping worker hands its job back.
            let resp = app
                .post(&format!("/worker/jobs/{old}/fail"))
                .json(&serde_json::json!({"lease_token": token, "message": "stopping", "retryable": true, "handed_back": true}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        let job = app.job(&old).await;
        assert_eq!(
            (job["status"].as_str(), job["cancel_reason"].as_str(), job["superseded_by"].as_str()),
            (Some("cancelled"), Some("superseded"), Some(newer.as_str())),
            "the old scene is not queued again behind the newer one: {job}"
        );
        assert!(!app.files("inputs").contains(&old), "its frame is deleted");
        let next = app.lease("gpu", 0.0).await.unwrap();
        assert_eq!(next["job_id"], newer.as_str(), "the newest scene is next");
        assert!(app.lease("gpu", 0.0).await.is_none(), "and nothing else waits");
        olds.push(old);
        let resp = app.put_result(&newer, next["lease_token"].as_str().unwrap(), b"clip".to_vec()).await;
        assert_eq!(resp.status(), 200);
    }
    // Without a newer job the stream's job is retried as usual.
    let only = submit_id(&app, "alone", &latest).await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    app.fail(&only, lease["lease_token"].as_str().unwrap(), "ComfyUI went away", true).await;
    assert_eq!(app.job(&only).await["status"], "queued");
    let events = events_so_far(&app, &mut all).await;
    for old in &olds {
        assert_eq!(count(&events, "cancelled", old), 1);
        assert_eq!(count(&events, "queued", old), 1, "queued once, when submitted");
    }
}

#[tokio::test]
async fn a_job_of_a_latest_stream_whose_lease_lapsed_is_superseded_by_the_newer_job() {
    let app = spawn_with(|a| a.lease_ttl = 1.0).await;
    let latest = [("stream", "td"), ("mode", "latest")];
    let old = submit_id(&app, "old scene", &latest).await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    // Received (one heartbeat), then the worker goes silent.
    app.heartbeat(&old, lease["lease_token"].as_str().unwrap(), None).await;
    let newer = submit_id(&app, "new scene", &latest).await;
    let job = app.wait_until(&old, 10.0, |j| j["status"] != "running").await;
    assert_eq!((job["status"].as_str(), job["superseded_by"].as_str()), (Some("cancelled"), Some(newer.as_str())));
    assert_eq!(app.lease("gpu", 0.0).await.unwrap()["job_id"], newer.as_str());
}

/// Leases with a preflight filter: only jobs of `workflows`.
async fn lease_only(app: &TestApp, workflows: &[&str]) -> Option<Value> {
    let body = serde_json::json!({"worker_id": "gpu-b", "wait": 0.0, "workflows": workflows});
    let resp = app.post("/worker/lease").json(&body).send().await.unwrap();
    match resp.status().as_u16() {
        200 => Some(resp.json::<Value>().await.unwrap()["job"].clone()),
        _ => None,
    }
}

#[tokio::test]
async fn a_server_that_runs_only_some_workflows_never_starts_a_stream_out_of_order() {
    let app = spawn_app().await;
    let stream = [("stream", "ordered")];
    let first = submit_id(&app, "1", &[stream[0], ("workflow", "ltxv_image_to_video")]).await;
    let second = submit_id(&app, "2", &[stream[0], ("workflow", "image_invert")]).await;
    let anonymous = submit_id(&app, "3", &[("workflow", "image_invert")]).await;
    // This server can run image_invert only: the stream's head is not one, so it waits; a job of
    // no stream is free to go.
    let got = lease_only(&app, &["image_invert"]).await.unwrap();
    assert_eq!(got["job_id"], anonymous.as_str());
    assert!(lease_only(&app, &["image_invert"]).await.is_none(), "the stream's second job waits for its first");
    assert_eq!(app.lease("gpu-a", 0.0).await.unwrap()["job_id"], first.as_str());
    assert_eq!(lease_only(&app, &["image_invert"]).await.unwrap()["job_id"], second.as_str());
}

#[tokio::test]
async fn an_identical_frame_queued_while_its_twin_ran_reuses_the_result_instead_of_running() {
    let app = spawn_app().await;
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let clip: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 256) as u8).collect();
    // TD sends a still scene with two frames in flight: the second arrives while the first runs,
    // so nothing is finished to reuse yet.
    let first = submit_id(&app, "still", &DEDUPE).await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    let twin = submit_ok(&app, form("still", &DEDUPE)).await;
    assert_eq!(twin["status"], "queued");
    let twin = twin["job_id"].as_str().unwrap().to_owned();
    let changed = submit_id(&app, "moving", &DEDUPE).await;
    assert_eq!(app.put_result(&first, lease["lease_token"].as_str().unwrap(), clip.clone()).await.status(), 200);
    // The twin is answered from the first's result when its turn comes; the changed frame runs.
    let next = app.lease("gpu", 1.0).await.unwrap();
    assert_eq!(next["job_id"], changed.as_str(), "the GPU gets the changed frame, not the twin");
    let job = app.job(&twin).await;
    assert_eq!(
        (job["status"].as_str(), job["reused_from"].as_str(), job["result"]["size"].as_u64()),
        (Some("done"), Some(first.as_str()), Some(clip.len() as u64))
    );
    let got = app.get(&format!("/jobs/{twin}/result")).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().to_vec(), clip);
    let events = events_so_far(&app, &mut all).await;
    assert_eq!(count(&events, "done", &twin), 1);
    assert_eq!(count(&events, "started", &twin), 0, "no GPU attempt was started for it");
    assert_eq!(app.job(&twin).await["attempts"], 0);
}

#[tokio::test]
async fn the_newest_finished_job_of_a_stream_is_the_one_dedupe_compares_with() {
    let app = spawn_app().await;
    // Scene A finishes; scene B starts; A comes back (a hit); then B finishes, after the hit.
    let a = submit_id(&app, "A", &DEDUPE).await;
    finish_next(&app, &a, b"clip A").await;
    let b = submit_id(&app, "B", &DEDUPE).await;
    let lease_b = app.lease("gpu", 1.0).await.unwrap();
    let hit = submit_ok(&app, form("A", &DEDUPE)).await;
    assert_eq!(hit["reused_from"], a.as_str());
    assert_eq!(app.put_result(&b, lease_b["lease_token"].as_str().unwrap(), b"clip B".to_vec()).await.status(), 200);
    // B finished last, but the newest job is the hit (scene A): A again is still a hit.
    let again = submit_ok(&app, form("A", &DEDUPE)).await;
    assert_eq!((again["status"].as_str(), again["reused_from"].as_str()), (Some("done"), hit["job_id"].as_str()));
}
