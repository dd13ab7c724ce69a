//! Deadlines do not jump with the wall clock: a step of the show PC's clock (NTP, an operator)
//! while jobs run neither requeues, fails nor expires anything early, nor keeps a dead worker's
//! job late.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tdcomfy_broker::clock::WallSource;

use crate::helpers::spawn_with_wall;

const HOUR_MS: i64 = 3_600_000;

/// The system clock plus an offset the test moves.
fn steppable_wall() -> (WallSource, Arc<AtomicI64>) {
    let offset = Arc::new(AtomicI64::new(0));
    let o = offset.clone();
    let wall: WallSource = Arc::new(move || {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        now.as_millis() as i64 + o.load(Ordering::SeqCst)
    });
    (wall, offset)
}

#[tokio::test]
async fn a_wall_clock_step_forward_requeues_fails_and_expires_nothing() {
    let (wall, offset) = steppable_wall();
    let app = spawn_with_wall(wall, |a| {
        a.lease_ttl = 2.0;
        a.job_timeout = 600.0;
        a.result_ttl = 600;
    })
    .await;
    let finished = app.submit_png("finished before the step").await;
    let l = app.lease("gpu", 1.0).await.unwrap();
    assert_eq!(app.put_result(&finished, l["lease_token"].as_str().unwrap(), b"clip".to_vec()).await.status(), 200);
    let running = app.submit_png("running across the step").await;
    let l = app.lease("gpu", 1.0).await.unwrap();
    let token = l["lease_token"].as_str().unwrap().to_owned();

    offset.store(HOUR_MS, Ordering::SeqCst);
    // Several sweeps pass (every 0.5 s here) while the worker heartbeats as usual.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let hb = app.heartbeat(&running, &token, None).await;
        assert_eq!(hb.status(), 200, "heartbeat after a +1 h step: {}", hb.text().await.unwrap());
    }
    let job = app.job(&running).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("running"), Some(1)), "{job}");
    let done = app.job(&finished).await;
    assert_eq!(done["has_result"], true, "RESULT_TTL of 10 min must not expire after 4 s: {done}");
    assert_eq!(app.files("results"), vec![finished.clone()]);
    let resp = app.put_result(&running, &token, b"clip 2".to_vec()).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let job: Value = app.job(&running).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("done"), Some(1)), "{job}");
}

#[tokio::test]
async fn a_wall_clock_step_back_keeps_a_dead_worker_s_job_and_old_files_no_longer() {
    let (wall, offset) = steppable_wall();
    let app = spawn_with_wall(wall, |a| {
        a.lease_ttl = 1.0;
        a.result_ttl = 2;
    })
    .await;
    let finished = app.submit_png("its files expire after 2 s").await;
    let l = app.lease("gpu", 1.0).await.unwrap();
    assert_eq!(app.put_result(&finished, l["lease_token"].as_str().unwrap(), b"clip".to_vec()).await.status(), 200);
    let orphaned = app.submit_png("its worker dies").await;
    app.lease("dies", 1.0).await.unwrap();

    offset.store(-HOUR_MS, Ordering::SeqCst);
    // Without heartbeats the lease lapses one LEASE_TTL later, not an hour later.
    let job = app.wait_until(&orphaned, 15.0, |j| j["status"] == "queued").await;
    assert_eq!(job["status"], "queued", "{job}");
    let job = app.wait_until(&finished, 15.0, |j| j["has_result"] == false).await;
    assert_eq!(job["has_result"], false, "RESULT_TTL of 2 s must not wait an hour: {job}");
    assert!(app.files("results").is_empty());
}
