//! Restarts lose nothing: queued jobs stay queued, running ones keep their lease (or are re-leased
//! once it lapses), done ones keep their results.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestApp, spawn_with};

async fn three_jobs(app: &TestApp) -> (String, String, String, String, Vec<u8>) {
    let done = app.submit_png("done").await;
    let running = app.submit_png("running").await;
    let queued = app.submit_png("queued").await;
    let l1 = app.lease("w", 1.0).await.unwrap();
    let video: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 256) as u8).collect();
    app.put_result(&done, l1["lease_token"].as_str().unwrap(), video.clone()).await;
    let l2 = app.lease("w", 1.0).await.unwrap();
    assert_eq!(l2["job_id"], running);
    (done, running, queued, l2["lease_token"].as_str().unwrap().to_owned(), video)
}

async fn assert_all_kept(app: &TestApp, done: &str, running: &str, queued: &str, token: &str, video: &[u8]) {
    assert_eq!(app.job(queued).await["status"], "queued");
    let job = app.job(done).await;
    assert_eq!((job["status"].as_str(), job["has_result"].as_bool()), (Some("done"), Some(true)));
    let got = app.get(&format!("/jobs/{done}/result")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(got.to_vec(), video);
    // The running job's worker carries on under its lease across the restart.
    let hb = app.heartbeat(running, token, None).await;
    assert_eq!(hb.status(), 200);
    assert_eq!(hb.json::<Value>().await.unwrap()["cancelled"], false);
    let resp = app.put_result(running, token, b"finished after restart".to_vec()).await;
    assert_eq!(resp.status(), 200);
    // And the queued job is still handed out, FIFO.
    let next = app.lease("w", 1.0).await.unwrap();
    assert_eq!(next["job_id"], queued);
}

#[tokio::test]
async fn a_graceful_restart_keeps_every_job_and_result() {
    let app = spawn_with(|_| {}).await;
    let (done, running, queued, token, video) = three_jobs(&app).await;
    let app = app.restart().await;
    assert_all_kept(&app, &done, &running, &queued, &token, &video).await;
}

#[tokio::test]
async fn an_abrupt_stop_keeps_every_job_and_result() {
    let app = spawn_with(|_| {}).await;
    let (done, running, queued, token, video) = three_jobs(&app).await;
    let app = app.crash_and_restart().await;
    assert_all_kept(&app, &done, &running, &queued, &token, &video).await;
}

#[tokio::test]
async fn a_job_whose_worker_vanished_during_the_downtime_is_re_leased() {
    let app = spawn_with(|a| a.lease_ttl = 0.5).await;
    let id = app.submit_png("worker gone").await;
    app.lease("gone", 1.0).await.unwrap();
    let app = app.crash_and_restart().await;
    let job = app.wait_until(&id, 15.0, |j| j["status"] == "queued").await;
    assert_eq!(job["status"], "queued");
    let again = app.lease("new", 1.0).await.unwrap();
    assert_eq!((again["job_id"].as_str(), again["attempt"].as_u64()), (Some(id.as_str()), Some(2)));
}

#[tokio::test]
async fn a_broker_down_longer_than_the_lease_keeps_running_jobs_with_their_workers() {
    let app = spawn_with(|a| a.lease_ttl = 1.0).await;
    let id = app.submit_png("long clip").await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    // Down for 3 x LEASE_TTL: the worker's heartbeats fail meanwhile, so the stored lease lapsed.
    let app = app.crash_and_restart_after(Duration::from_secs(3)).await;
    // The worker's next heartbeat (it retries every second or so) renews the lease it still holds.
    let hb = app.heartbeat(&id, &token, None).await;
    assert_eq!(hb.status(), 200, "heartbeat after the restart: {}", hb.text().await.unwrap());
    let resp = app.put_result(&id, &token, b"the clip".to_vec()).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("done"), Some(1)), "{job}");
}

#[tokio::test]
async fn after_a_restart_a_lease_without_heartbeats_still_lapses_one_lease_ttl_later() {
    let app = spawn_with(|a| a.lease_ttl = 1.0).await;
    let id = app.submit_png("worker died with the broker").await;
    app.lease("gone", 1.0).await.unwrap();
    let app = app.crash_and_restart_after(Duration::from_secs(3)).await;
    // The grace is one LEASE_TTL, not forever: with no heartbeat the job goes back to the queue.
    let job = app.wait_until(&id, 15.0, |j| j["status"] == "queued").await;
    assert_eq!(job["status"], "queued", "{job}");
    let again = app.lease("new", 1.0).await.unwrap();
    assert_eq!((again["job_id"].as_str(), again["attempt"].as_u64()), (Some(id.as_str()), Some(2)));
}

#[tokio::test]
async fn an_attempt_whose_job_timeout_ran_out_during_the_downtime_may_still_report_its_result() {
    let app = spawn_with(|a| {
        a.lease_ttl = 2.0;
        a.job_timeout = 2.0;
    })
    .await;
    let id = app.submit_png("finished while the broker was down").await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    let app = app.crash_and_restart_after(Duration::from_secs(3)).await;
    // The worker finished meanwhile and uploads its spooled result as soon as the broker is back.
    tokio::time::sleep(Duration::from_millis(600)).await; // a sweep or two
    let resp = app.put_result(&id, &token, b"the clip".to_vec()).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(app.job(&id).await["status"], "done");
}

#[tokio::test]
async fn an_attempt_past_job_timeout_still_times_out_one_lease_after_a_restart() {
    let app = spawn_with(|a| {
        a.lease_ttl = 2.0;
        a.job_timeout = 2.0;
    })
    .await;
    let id = app.submit_png("hung while the broker was down").await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    let app = app.crash_and_restart_after(Duration::from_secs(3)).await;
    // The worker keeps heartbeating, but the attempt is over its time: it fails after the grace.
    let mut last = 0;
    for _ in 0..30 {
        last = app.heartbeat(&id, &token, None).await.status().as_u16();
        if last != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(last, 409, "the attempt must time out");
    let job = app.job(&id).await;
    assert_eq!(job["status"], "error", "{job}");
    assert!(job["error_message"].as_str().unwrap().contains("JOB_TIMEOUT"), "{job}");
}
