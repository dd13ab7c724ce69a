//! The worker protocol: long-poll leases, input download, heartbeats, results, failures, lease
//! expiry and requeue, cancellation seen at a heartbeat, JOB_TIMEOUT.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{error_of, png_bytes, spawn_app, spawn_with};

#[tokio::test]
async fn a_waiting_worker_gets_a_job_the_moment_it_is_queued() {
    let app = spawn_app().await;
    assert!(app.lease("w", 0.2).await.is_none(), "empty queue answers 204 after the wait");

    let waiter = {
        let (http, url) = (app.http.clone(), app.url("/worker/lease"));
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"worker_id": "w", "wait": 30}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    app.wait_health(|h| h["workers_connected"] == 1).await;
    let id = app.submit_png("hurry").await;
    let got =
        tokio::time::timeout(Duration::from_secs(20), waiter).await.expect("leased well before the wait ends").unwrap();
    let lease = &got["job"];
    assert_eq!(lease["job_id"], id);
    assert_eq!(lease["attempt"], 1);
    assert_eq!(lease["prompt"], "hurry");
    assert_eq!(lease["workflow"], "ltxv_image_to_video");
    assert!(lease["lease_token"].as_str().is_some_and(|t| t.len() >= 16));
    assert_eq!(lease["job_timeout"], 600.0);
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("running"), Some(1)));
    assert!(job["started_at"].is_f64(), "started_at is epoch seconds");
}

#[tokio::test]
async fn a_job_is_leased_to_exactly_one_of_many_waiting_workers() {
    let app = spawn_app().await;
    let mut waiters = Vec::new();
    for i in 0..6 {
        let (http, url) = (app.http.clone(), app.url("/worker/lease"));
        waiters.push(tokio::spawn(async move {
            http.post(url)
                .json(&json!({"worker_id": format!("w{i}"), "wait": 1.5}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    app.wait_health(|h| h["workers_connected"] == 6).await;
    app.submit_png("one").await;
    app.submit_png("two").await;
    let mut statuses = Vec::new();
    for w in waiters {
        statuses.push(w.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 204, 204, 204, 204]);
}

#[tokio::test]
async fn full_lifecycle_input_progress_result() {
    let app = spawn_app().await;
    let id = app.submit_png("lifecycle").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();

    let input = app.get(&format!("/worker/jobs/{id}/input")).header("lease-token", token).send().await.unwrap();
    assert_eq!(input.status(), 200);
    assert_eq!(input.headers()["content-type"], "image/png");
    assert_eq!(input.bytes().await.unwrap().to_vec(), png_bytes(64, 40));
    let (status, err) =
        error_of(app.get(&format!("/worker/jobs/{id}/input")).header("lease-token", "wrong").send().await.unwrap())
            .await;
    assert_eq!((status, err["code"].as_str()), (409, Some("lease_lost")));

    let progress = json!({"value": 0.5, "step": 15, "max_steps": 30, "node": "72", "node_type": "SamplerCustom"});
    let hb = app.heartbeat(&id, token, Some(progress.clone())).await;
    assert_eq!(hb.status(), 200);
    assert_eq!(hb.json::<Value>().await.unwrap()["cancelled"], false);
    let job = app.job(&id).await;
    assert_eq!(job["progress"], progress);
    assert!(job["processing_time"].as_f64().is_some());

    let (status, err) = error_of(app.heartbeat(&id, token, Some(json!({"value": 7.0}))).await).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("progress.value")));

    let video = b"\0\0\0\x18ftypisom fake mp4 payload".repeat(1000);
    let resp = app.put_result(&id, token, video.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "done");
    // Repeating the upload under the same lease is harmless.
    assert_eq!(app.put_result(&id, token, video.clone()).await.status(), 200);

    let job = app.job(&id).await;
    assert_eq!(job["status"], "done");
    assert_eq!(job["has_result"], true);
    assert_eq!(job["progress"]["value"], 1.0);
    assert_eq!(job["result"], json!({"content_type": "video/mp4", "size": video.len()}));
    assert!(job["finished_at"].is_f64() && job["processing_time"].as_f64().unwrap() >= 0.0);
    let got = app.get(&format!("/jobs/{id}/result")).send().await.unwrap();
    assert_eq!(got.headers()["content-type"], "video/mp4");
    assert_eq!(got.bytes().await.unwrap().to_vec(), video);
    // A finished lease can no longer heartbeat.
    assert_eq!(app.heartbeat(&id, token, None).await.status(), 409);
}

#[tokio::test]
async fn an_expired_lease_requeues_the_job_and_the_old_worker_cannot_finish_it() {
    // The lease must outlive the checks below even on a busy machine, and still expire soon.
    let app = spawn_with(|a| {
        a.lease_ttl = 1.5;
        a.max_attempts = 2;
    })
    .await;
    let id = app.submit_png("orphan").await;
    let first = app.lease("dies", 1.0).await.unwrap();
    let old_token = first["lease_token"].as_str().unwrap().to_owned();
    // It starts work (its first call acknowledges the lease), then dies.
    assert_eq!(app.heartbeat(&id, &old_token, None).await.status(), 200);

    let requeued = app.wait_until(&id, 15.0, |j| j["status"] == "queued").await;
    assert_eq!(requeued["status"], "queued", "expired lease must requeue: {requeued}");
    assert_eq!(requeued["attempts"], 1);

    let second = app.lease("lives", 1.0).await.expect("requeued job is leased again");
    assert_eq!((second["job_id"].as_str(), second["attempt"].as_u64()), (Some(id.as_str()), Some(2)));
    assert_eq!(app.heartbeat(&id, second["lease_token"].as_str().unwrap(), None).await.status(), 200);
    // The first worker wakes up and tries to deliver: refused, so "done" never comes from a stale run.
    let (status, err) = error_of(app.put_result(&id, &old_token, b"stale".to_vec()).await).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("lease_lost")));
    assert_eq!(app.heartbeat(&id, &old_token, None).await.status(), 409);
    assert_eq!(app.job(&id).await["status"], "running");

    // The second attempt also dies: out of attempts, a clear error.
    let failed = app.wait_until(&id, 15.0, |j| j["status"] == "error").await;
    assert_eq!(failed["status"], "error");
    let msg = failed["error_message"].as_str().unwrap();
    assert!(msg.contains("lease expired") && msg.contains('2'), "{msg}");
}

#[tokio::test]
async fn heartbeats_keep_a_lease_alive() {
    let app = spawn_with(|a| a.lease_ttl = 2.0).await;
    let id = app.submit_png("long job").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    // 3.6 s of heartbeats every 0.3 s: well past the 2 s lease, never near its end.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let hb = app.heartbeat(&id, token, None).await;
        assert_eq!(hb.status(), 200, "lease lost despite heartbeats");
    }
    assert_eq!(app.job(&id).await["status"], "running");
}

#[tokio::test]
async fn cancel_of_a_running_job_reaches_the_worker_at_its_next_heartbeat() {
    let app = spawn_app().await;
    let id = app.submit_png("stop me").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    let resp: Value = app.delete(&format!("/jobs/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(resp["status"], "cancelled");

    let hb: Value = app.heartbeat(&id, token, None).await.json().await.unwrap();
    assert_eq!(hb["cancelled"], true);
    let (status, err) = error_of(app.put_result(&id, token, b"too late".to_vec()).await).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("job_cancelled")));
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["has_result"].as_bool()), (Some("cancelled"), Some(false)));
    assert!(app.files("results").is_empty() && app.files("tmp").is_empty());
}

#[tokio::test]
async fn failures_are_final_or_retried_as_the_worker_says() {
    let app = spawn_with(|a| a.max_attempts = 2).await;
    let id = app.submit_png("fails").await;
    let l1 = app.lease("w", 1.0).await.unwrap();
    let resp = app.fail(&id, l1["lease_token"].as_str().unwrap(), "ComfyUI unreachable at 127.0.0.1:8999", true).await;
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "queued");
    let l2 = app.lease("w", 1.0).await.unwrap();
    assert_eq!(l2["attempt"], 2);
    let resp = app.fail(&id, l2["lease_token"].as_str().unwrap(), "ComfyUI unreachable at 127.0.0.1:8999", true).await;
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "error");
    let job = app.job(&id).await;
    assert!(job["error_message"].as_str().unwrap().contains("unreachable"), "{job}");

    let id = app.submit_png("validation").await;
    let l = app.lease("w", 1.0).await.unwrap();
    let msg = "node 44 (CheckpointLoaderSimple): ckpt_name: 'x.safetensors' not in []";
    app.fail(&id, l["lease_token"].as_str().unwrap(), msg, false).await;
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["error_message"].as_str()), (Some("error"), Some(msg)));
    let (status, err) = error_of(app.get(&format!("/jobs/{id}/result")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("job_failed")));
    assert!(err["message"].as_str().unwrap().contains("CheckpointLoaderSimple"));
}

#[tokio::test]
async fn a_job_running_longer_than_job_timeout_fails() {
    let app = spawn_with(|a| a.job_timeout = 0.3).await;
    let id = app.submit_png("slow").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let job = app.wait_until(&id, 15.0, |j| j["status"] == "error").await;
    assert_eq!(job["status"], "error");
    assert!(job["error_message"].as_str().unwrap().contains("JOB_TIMEOUT"), "{job}");
    // The worker learns at its next heartbeat that the lease is gone.
    assert_eq!(app.heartbeat(&id, lease["lease_token"].as_str().unwrap(), None).await.status(), 409);
}

#[tokio::test]
async fn bad_worker_requests_get_json_errors() {
    let app = spawn_app().await;
    let (status, err) = error_of(app.post("/worker/lease").json(&json!({"worker_id": ""})).send().await.unwrap()).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("worker_id")));
    let (status, err) =
        error_of(app.post("/worker/lease").body("{").header("content-type", "application/json").send().await.unwrap())
            .await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_json")));
    let id = app.submit_png("x").await;
    let (status, err) = error_of(app.put(&format!("/worker/jobs/{id}/result")).body("x").send().await.unwrap()).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("Lease-Token")));
}

#[tokio::test]
async fn json_bodies_over_64_kib_are_refused_with_the_limit_named() {
    let app = spawn_app().await;
    let id = app.submit_png("padded").await;
    let job = app.lease("w", 2.0).await.expect("leased");
    let token = job["lease_token"].as_str().unwrap();
    // A valid heartbeat, padded with whitespace past 64 KiB: buffered up to MAX_UPLOAD_MB before.
    let body = format!("{{\"lease_token\": \"{token}\"{}}}", " ".repeat(100 * 1024));
    let resp = app
        .post(&format!("/worker/jobs/{id}/heartbeat"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["code"].as_str(), err["limit"].as_u64()), (413, Some("payload_too_large"), Some(65536)));
    assert!(err["message"].as_str().unwrap().contains("64 KiB"), "{err}");
    // A normal one still passes.
    assert_eq!(app.heartbeat(&id, token, None).await.status(), 200);
}

#[tokio::test]
async fn a_result_type_outside_the_media_table_is_stored_and_served_as_octet_stream() {
    let app = spawn_app().await;
    let id = app.submit_png("html?").await;
    let job = app.lease("w", 2.0).await.expect("leased");
    let token = job["lease_token"].as_str().unwrap();
    let resp = app
        .put(&format!("/worker/jobs/{id}/result"))
        .header("lease-token", token)
        .header("content-type", "text/html")
        .body("<script>alert(1)</script>")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(app.job(&id).await["result"]["content_type"], "application/octet-stream");
    let got = app.get(&format!("/jobs/{id}/result")).send().await.unwrap();
    assert_eq!(got.headers()["content-type"], "application/octet-stream");
}
