//! Streams: `previews` carried to the worker, `stream`/`mode=latest` supersede, `preempt`,
//! round-robin between streams, positions in claim order, `dedupe`, and the schema upgrade that
//! brought the columns.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::{TestApp, error_of, png_bytes, spawn_app, spawn_with, test_args};

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
