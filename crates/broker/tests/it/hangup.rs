//! Clients that hang up right after sending: the change they asked for is committed, so it must
//! also be published, wake workers and delete files — nothing may depend on the client staying.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::helpers::{SseReader, png_bytes, spawn_app, spawn_with};

/// Sends one complete HTTP/1.1 request on a fresh connection and closes it at once, without
/// reading a byte of the answer (a TouchDesigner script killed mid-call, a laptop lid closed).
async fn send_and_hang_up(base: &str, head: &str, body: &[u8]) {
    send_and_hang_up_after(base, head, body, Duration::ZERO).await
}

/// The same, closing `linger` after the last byte: with a body, hyper drops a request whose
/// connection ends before the body was read, so the interesting moment — the handler between its
/// commit and its answer — is a few milliseconds after sending; the tests sweep across it.
async fn send_and_hang_up_after(base: &str, head: &str, body: &[u8], linger: Duration) {
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request =
        format!("{head}Host: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
    request.extend_from_slice(body);
    tcp.write_all(&request).await.expect("send");
    tokio::time::sleep(linger).await;
    drop(tcp);
}

fn multipart_submit(prompt: &str) -> (String, Vec<u8>) {
    let boundary = "tdcomfy-hangup-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n{prompt}\r\n--{boundary}\r\n\
             Content-Disposition: form-data; name=\"image\"; filename=\"f.png\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&png_bytes(64, 40));
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("POST /jobs HTTP/1.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"), body)
}

/// Reads `/events` until an event named `kind` arrived for every job in `ids`, or 10 s pass;
/// panics naming the jobs whose event never came.
async fn assert_heard_for_all(reader: &mut SseReader, kind: &str, ids: &HashSet<String>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut heard = HashSet::new();
    while &heard != ids {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now()).as_secs_f64();
        match reader.next(left).await {
            Some((name, data)) if name == kind => {
                heard.insert(data["job_id"].as_str().unwrap_or_default().to_owned());
            }
            Some(_) => {}
            None => panic!("no {kind} event for {:?}", ids.difference(&heard)),
        }
    }
}

#[tokio::test]
async fn submits_whose_client_hung_up_are_published_and_wake_the_waiting_worker() {
    let app = spawn_app().await;
    let mut events = SseReader::new(app.get("/events").send().await.unwrap());
    let mut committed = 0;
    for round in 0..24u64 {
        // A worker already waiting must be woken by a committed submission, not by its timeout.
        let waiting = {
            let (http, url) = (app.http.clone(), app.url("/worker/lease"));
            tokio::spawn(async move {
                let resp = http.post(url).json(&serde_json::json!({"worker_id": "w", "wait": 3})).send().await;
                resp.unwrap().status().as_u16()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await; // the lease request is waiting
        let (head, body) = multipart_submit(&format!("hang-up {round}"));
        send_and_hang_up_after(&app.base, &head, &body, Duration::from_millis(round / 2)).await;
        let status = waiting.await.unwrap();
        // hyper may drop a request whose client closed before the handler ran: then nothing was
        // committed and nothing is owed. What was committed must have woken the worker.
        let stored: Value = app.get("/jobs?limit=100").send().await.unwrap().json().await.unwrap();
        let now = stored["jobs"].as_array().unwrap().len();
        if now > committed {
            assert_eq!(status, 200, "round {round}: a committed job did not wake the waiting worker");
            committed = now;
        }
    }
    assert!(committed > 0, "no hung-up submission was committed: the test exercised nothing");
    let stored: Value = app.get("/jobs?limit=100").send().await.unwrap().json().await.unwrap();
    let ids: HashSet<String> =
        stored["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    assert_heard_for_all(&mut events, "queued", &ids).await;
}

#[tokio::test]
async fn a_cancel_whose_client_hung_up_is_published_and_its_files_are_gone() {
    let app = spawn_app().await;
    let mut events = SseReader::new(app.get("/events").send().await.unwrap());
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(app.submit_png(&format!("to cancel {i}")).await);
    }
    for id in &ids {
        send_and_hang_up(&app.base, &format!("DELETE /jobs/{id} HTTP/1.1\r\n"), b"").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut want = HashSet::new();
    for id in &ids {
        // Only a cancel that was committed owes an event (see the submit test).
        if app.job(id).await["status"] == "cancelled" {
            assert!(!app.files("inputs").contains(id), "the input of cancelled job {id} is deleted");
            want.insert(id.clone());
        }
    }
    assert!(!want.is_empty(), "no hung-up cancel was committed: the test exercised nothing");
    assert_heard_for_all(&mut events, "cancelled", &want).await;
}

#[tokio::test]
async fn a_repeated_delete_publishes_the_cancellation_again() {
    // The recovery path for a client that missed the event: ask again, hear it again.
    let app = spawn_app().await;
    let id = app.submit_png("cancel twice").await;
    assert_eq!(app.delete(&format!("/jobs/{id}")).send().await.unwrap().status(), 200);
    let mut events = SseReader::new(app.get("/events").send().await.unwrap());
    let resp = app.delete(&format!("/jobs/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_heard_for_all(&mut events, "cancelled", &HashSet::from([id])).await;
}

#[tokio::test]
async fn a_result_upload_whose_worker_hung_up_still_finishes_the_job() {
    let app = spawn_app().await;
    let mut events = SseReader::new(app.get("/events").send().await.unwrap());
    let mut ids = Vec::new();
    for i in 0..16u64 {
        let id = app.submit_png(&format!("deliver {i}")).await;
        let job = app.lease("w", 5.0).await.expect("leased");
        let token = job["lease_token"].as_str().unwrap().to_owned();
        let head =
            format!("PUT /worker/jobs/{id}/result HTTP/1.1\r\nLease-Token: {token}\r\nContent-Type: video/mp4\r\n");
        send_and_hang_up_after(&app.base, &head, &vec![7u8; 300_000], Duration::from_millis(i / 2)).await;
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut want = HashSet::new();
    for id in &ids {
        let job = app.job(id).await;
        if job["status"] == "done" {
            assert_eq!(job["result"]["size"], 300_000);
            want.insert(id.clone());
        }
    }
    assert!(!want.is_empty(), "no hung-up upload was committed: the test exercised nothing");
    assert_heard_for_all(&mut events, "done", &want).await;
}

#[tokio::test]
async fn a_lease_whose_worker_hung_up_goes_to_the_next_worker_without_costing_an_attempt() {
    // LEASE_TTL 30 s: a lease nobody received must not sit that long, nor use up the one attempt.
    let app = spawn_with(|a| a.max_attempts = 1).await;
    for i in 0..3 {
        let id = app.submit_png(&format!("lease {i}")).await;
        let body = br#"{"worker_id":"ghost","wait":5}"#;
        send_and_hang_up(&app.base, "POST /worker/lease HTTP/1.1\r\nContent-Type: application/json\r\n", body).await;
        // Whether the ghost's claim landed, was dropped, or its answer went into a closed socket,
        // the job comes back to a worker that acknowledges its leases, on its first attempt.
        let job = app.lease("real", 20.0).await.unwrap_or_else(|| panic!("round {i}: job {id} stayed with a ghost"));
        assert_eq!(job["job_id"], id.as_str());
        assert_eq!(job["attempt"], 1, "round {i}: the ghost lease cost an attempt");
        let token = job["lease_token"].as_str().unwrap();
        assert_eq!(app.heartbeat(&id, token, None).await.status(), 200);
        assert_eq!(app.put_result(&id, token, vec![1u8; 100]).await.status(), 200);
    }
}

#[tokio::test]
async fn an_acknowledged_lease_is_not_taken_back() {
    let app = spawn_with(|a| a.lease_ttl = 3.0).await;
    let id = app.submit_png("kept").await;
    let job = app.lease("w", 5.0).await.expect("leased");
    let token = job["lease_token"].as_str().unwrap();
    // The input download acknowledges the lease; heartbeats keep it past the acknowledgement window.
    let input = app.get(&format!("/worker/jobs/{id}/input")).header("lease-token", token).send().await.unwrap();
    assert_eq!(input.status(), 200);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.heartbeat(&id, token, None).await.status(), 200);
    }
    assert_eq!(app.job(&id).await["attempts"], 1);
    assert_eq!(app.put_result(&id, token, vec![1u8; 100]).await.status(), 200);
}
