//! The sweep: finished jobs' records go after JOB_RETENTION, one bad item does not stop the rest
//! of the housekeeping, and a database of schema version 1 opens with its jobs and counts.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{spawn_with, test_args, test_workflows};

#[tokio::test]
async fn finished_jobs_and_their_files_are_deleted_after_job_retention() {
    let app = spawn_with(|a| a.job_retention = 2).await;
    let old = app.submit_png("old news").await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    assert_eq!(app.put_result(&old, lease["lease_token"].as_str().unwrap(), b"clip".to_vec()).await.status(), 200);
    let cancelled = app.submit_png("changed my mind").await;
    assert_eq!(app.delete(&format!("/jobs/{cancelled}")).send().await.unwrap().status(), 200);
    let waiting = app.submit_png("still queued").await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut status = 200;
    while tokio::time::Instant::now() < deadline {
        status = app.get(&format!("/jobs/{old}")).send().await.unwrap().status().as_u16();
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status, 404, "a job finished longer than JOB_RETENTION ago is gone");
    assert_eq!(app.get(&format!("/jobs/{cancelled}")).send().await.unwrap().status(), 404);
    assert!(app.files("results").is_empty() && app.files("inputs") == vec![waiting.clone()]);
    // Unfinished jobs are never retention's business, and the counts follow.
    assert_eq!(app.job(&waiting).await["status"], "queued");
    let h = app.health().await;
    assert_eq!(
        (h["jobs_count"].as_u64(), h["queued"].as_u64(), h["done"].as_u64()),
        (Some(1), Some(1), Some(0)),
        "{h}"
    );
}

#[tokio::test]
async fn one_file_that_cannot_be_deleted_does_not_stop_the_sweep() {
    let app = spawn_with(|a| {
        a.result_ttl = 1;
        a.lease_ttl = 1.0;
    })
    .await;
    let mut finished = Vec::new();
    for name in ["stuck", "fine"] {
        let id = app.submit_png(name).await;
        let lease = app.lease("gpu", 1.0).await.unwrap();
        assert_eq!(app.put_result(&id, lease["lease_token"].as_str().unwrap(), b"clip".to_vec()).await.status(), 200);
        finished.push(id);
    }
    // The first job's result cannot be removed: something put a directory in its place.
    let stuck = app.args.data_dir.join("files/results").join(&finished[0]);
    std::fs::remove_file(&stuck).unwrap();
    std::fs::create_dir(&stuck).unwrap();
    std::fs::write(stuck.join("keep"), b"x").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // past RESULT_TTL: every sweep meets it

    // A job whose worker dies goes back to the queue, and a waiting worker is woken for it.
    let orphan = app.submit_png("worker dies").await;
    app.lease("dies", 1.0).await.unwrap();
    let started = tokio::time::Instant::now();
    let again = app.lease("gpu", 20.0).await.expect("the requeued job is leased");
    assert_eq!(again["job_id"], orphan.as_str());
    assert!(started.elapsed() < Duration::from_secs(10), "woken, not left to the end of its long-poll");
    let fine = app.wait_until(&finished[1], 10.0, |j| j["has_result"] == false).await;
    assert_eq!(fine["has_result"], false, "the other job's files expire as usual: {fine}");
    // The stuck one still says it has its result: the record never claims a file is gone while it is there.
    assert_eq!(app.job(&finished[0]).await["has_result"], true);
}

/// The schema of version 1, as the first release created it.
const SCHEMA_V1: &str = "
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    prompt TEXT NOT NULL, negative_prompt TEXT NOT NULL, seed INTEGER, workflow TEXT NOT NULL,
    params TEXT NOT NULL, input_content_type TEXT NOT NULL, input_size INTEGER NOT NULL,
    input_width INTEGER NOT NULL, input_height INTEGER NOT NULL, input_present INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT, lease_owner TEXT, lease_expires_at INTEGER, progress TEXT, error_message TEXT,
    result_state TEXT NOT NULL DEFAULT 'none', result_content_type TEXT, result_size INTEGER,
    comfy_execution_ms INTEGER, idempotency_key TEXT UNIQUE, request_fingerprint TEXT,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE status = 'running';
PRAGMA user_version = 1;
";

#[tokio::test]
async fn a_database_of_schema_version_1_opens_with_its_jobs_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    {
        let db = rusqlite::Connection::open(data.join("jobs.sqlite3")).unwrap();
        db.execute_batch(SCHEMA_V1).unwrap();
        for (i, status) in ["queued", "done", "done", "error"].iter().enumerate() {
            db.execute(
                "INSERT INTO jobs (id, status, prompt, negative_prompt, workflow, params, input_content_type, \
                 input_size, input_width, input_height, input_present, created_at, finished_at, result_state) \
                 VALUES (?1, ?2, 'p', '', 'ltxv_image_to_video', '{}', 'image/png', 10, 64, 40, 0, ?3, ?4, 'none')",
                rusqlite::params![
                    format!("00000000-0000-4000-8000-00000000000{i}"),
                    status,
                    now,
                    (*status != "queued").then_some(now)
                ],
            )
            .unwrap();
        }
    }
    let args = test_args(data.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = args.into_config(test_workflows()).unwrap();
    let server = tokio::spawn(tdcomfy_broker::run(listener, config, std::future::pending()));
    let http = reqwest::Client::new();
    let mut health = Value::Null;
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/health")).send().await {
            health = r.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        (health["jobs_count"].as_u64(), health["queued"].as_u64(), health["done"].as_u64(), health["error"].as_u64()),
        (Some(4), Some(1), Some(2), Some(1)),
        "{health}"
    );
    let job: Value = http
        .get(format!("{base}/jobs/00000000-0000-4000-8000-000000000001"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["status"], "done");
    // And the counts stay exact as jobs change.
    let lease: Value = http
        .post(format!("{base}/worker/lease"))
        .json(&json!({"worker_id": "w", "wait": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(lease["job"]["job_id"], "00000000-0000-4000-8000-000000000000");
    let health: Value = http.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!((health["queued"].as_u64(), health["running"].as_u64()), (Some(0), Some(1)), "{health}");
    server.abort();
}
