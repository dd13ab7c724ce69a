//! The lease covers the whole attempt, including a result upload that takes longer than it.

use std::time::Duration;

use bytes::Bytes;

use crate::helpers::{TestApp, spawn_with};

/// Submits a job and leases it to worker `w`, which acknowledges the lease with a heartbeat (as
/// real workers do at once); returns the job id and lease token.
async fn acknowledged_lease(app: &TestApp, prompt: &str) -> (String, String) {
    let id = app.submit_png(prompt).await;
    let job = app.lease("w", 5.0).await.expect("leased");
    let token = job["lease_token"].as_str().unwrap().to_owned();
    assert_eq!(app.heartbeat(&id, &token, None).await.status(), 200);
    (id, token)
}

#[tokio::test]
async fn a_result_upload_slower_than_the_lease_keeps_the_lease_and_finishes_the_job() {
    let app = spawn_with(|a| {
        a.lease_ttl = 1.5;
        a.max_attempts = 3;
    })
    .await;
    let (id, token) = acknowledged_lease(&app, "slow link").await;
    // 3× LEASE_TTL of trickling bytes and no heartbeat: only the upload itself speaks for the lease.
    let chunks = 18;
    let body = futures_util::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(vec![i as u8; 10_000])), i + 1))
    });
    let resp = app
        .put(&format!("/worker/jobs/{id}/result"))
        .header("lease-token", &token)
        .header("content-type", "video/mp4")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let job = app.job(&id).await;
    assert_eq!(job["status"], "done");
    assert_eq!(job["attempts"], 1, "the job was never handed to another attempt");
    assert_eq!(job["result"]["size"], 180_000);
}

#[tokio::test]
async fn a_stalled_result_upload_does_not_hold_the_lease() {
    let app = spawn_with(|a| {
        a.lease_ttl = 1.5;
        a.max_attempts = 3;
    })
    .await;
    let (id, token) = acknowledged_lease(&app, "dead link").await;
    // One chunk, then silence: a worker that vanished mid-upload must not keep the job forever.
    let body = futures_util::stream::unfold(0, |i| async move {
        match i {
            0 => Some((Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 1000])), 1)),
            _ => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                None
            }
        }
    });
    let upload = app
        .put(&format!("/worker/jobs/{id}/result"))
        .header("lease-token", &token)
        .header("content-length", "2000")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let upload = tokio::spawn(upload);
    let requeued = app.wait_until(&id, 15.0, |j| j["status"] == "queued").await;
    assert_eq!(requeued["status"], "queued", "the stalled upload's lease expired: {requeued}");
    upload.abort();
}

#[tokio::test]
async fn a_stale_attempt_uploading_after_another_finished_the_job_is_refused() {
    let app = spawn_with(|a| {
        a.lease_ttl = 1.5;
        a.max_attempts = 3;
    })
    .await;
    let id = app.submit_png("two attempts").await;
    let first = app.lease("slow", 5.0).await.expect("leased");
    let stale = first["lease_token"].as_str().unwrap().to_owned();
    assert_eq!(app.heartbeat(&id, &stale, None).await.status(), 200);
    let requeued = app.wait_until(&id, 15.0, |j| j["status"] == "queued").await;
    assert_eq!(requeued["status"], "queued");
    let second = app.lease("fast", 5.0).await.expect("re-leased");
    let token = second["lease_token"].as_str().unwrap();
    assert_eq!(app.put_result(&id, token, vec![2u8; 100]).await.status(), 200);
    // The first attempt wakes up and delivers: it must learn its lease is gone, not hear "done"
    // (it would then believe its own bytes were taken and clean up as if delivered).
    let (status, err) = crate::helpers::error_of(app.put_result(&id, &stale, vec![1u8; 100]).await).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("lease_lost")), "{err}");
    // The finishing attempt itself may repeat its upload harmlessly.
    assert_eq!(app.put_result(&id, token, vec![2u8; 100]).await.status(), 200);
    assert_eq!(app.job(&id).await["result"]["size"], 100);
}

#[tokio::test]
async fn job_timeout_does_not_fail_a_job_whose_result_is_arriving() {
    let app = spawn_with(|a| {
        a.lease_ttl = 1.5;
        a.job_timeout = 2.0;
    })
    .await;
    let (id, token) = acknowledged_lease(&app, "late but flowing").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The upload starts before JOB_TIMEOUT and trickles on for 4 s past it.
    let body = futures_util::stream::unfold(0, |i| async move {
        if i == 20 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(vec![3u8; 1000])), i + 1))
    });
    let resp = app
        .put(&format!("/worker/jobs/{id}/result"))
        .header("lease-token", &token)
        .header("content-type", "video/mp4")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(app.job(&id).await["status"], "done");
}

#[tokio::test]
async fn a_job_handed_back_by_stopping_workers_does_not_use_up_its_attempts() {
    // Rolling restarts of the workers during one long job must not end it in "gave up".
    let app = spawn_with(|a| a.max_attempts = 1).await;
    let id = app.submit_png("outlives three worker restarts").await;
    for round in 0..3 {
        let job = app.lease("w", 5.0).await.unwrap_or_else(|| panic!("round {round}: not leasable"));
        let token = job["lease_token"].as_str().unwrap();
        assert_eq!(job["attempt"], 1, "round {round}");
        let resp = app
            .post(&format!("/worker/jobs/{id}/fail"))
            .json(&serde_json::json!({"lease_token": token, "message": "worker stopping", "retryable": true, "handed_back": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let after = app.job(&id).await;
        assert_eq!((after["status"].as_str(), after["attempts"].as_u64()), (Some("queued"), Some(0)), "{after}");
    }
    let job = app.lease("w", 5.0).await.expect("still leasable");
    assert_eq!(app.put_result(&id, job["lease_token"].as_str().unwrap(), vec![1u8; 10]).await.status(), 200);
}
