//! Push: SSE for all jobs, SSE for one job, and the WebSocket with `?token=`.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{SseReader, spawn_app, spawn_with};

async fn next_for(reader: &mut SseReader, id: &str) -> (String, Value) {
    loop {
        let (name, data) = reader.next(15.0).await.expect("an event before the deadline");
        if data["job_id"] == id {
            return (name, data);
        }
    }
}

#[tokio::test]
async fn every_status_and_progress_change_is_an_sse_event() {
    let app = spawn_app().await;
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let id = app.submit_png("watched").await;
    let (name, ev) = next_for(&mut all, &id).await;
    assert_eq!((name.as_str(), ev["type"].as_str(), ev["event"].as_str()), ("queued", Some("job"), Some("queued")));
    assert_eq!(ev["job"]["status"], "queued");

    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    assert_eq!(next_for(&mut all, &id).await.0, "started");
    app.heartbeat(&id, token, Some(json!({"value": 0.25, "step": 5, "max_steps": 20}))).await;
    let (name, ev) = next_for(&mut all, &id).await;
    assert_eq!(name, "progress");
    assert_eq!(ev["job"]["progress"]["step"], 5);
    // A heartbeat without new progress is not an event.
    app.heartbeat(&id, token, Some(json!({"value": 0.25, "step": 5, "max_steps": 20}))).await;
    app.put_result(&id, token, b"mp4".to_vec()).await;
    let (name, ev) = next_for(&mut all, &id).await;
    assert_eq!(name, "done");
    assert_eq!(ev["job"]["has_result"], true);
}

#[tokio::test]
async fn a_job_stream_starts_with_a_snapshot_and_ends_after_the_last_state() {
    let app = spawn_app().await;
    let id = app.submit_png("one job").await;
    let other = app.submit_png("another").await;
    let mut one = SseReader::new(app.get(&format!("/jobs/{id}/events")).send().await.unwrap());
    let (name, ev) = one.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), ev["job"]["status"].as_str()), ("snapshot", Some("queued")));

    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!(lease["job_id"], id);
    app.delete(&format!("/jobs/{other}")).send().await.unwrap();
    app.delete(&format!("/jobs/{id}")).send().await.unwrap();
    let (name, _) = one.next(10.0).await.unwrap();
    assert_eq!(name, "started");
    let (name, ev) = one.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), ev["job_id"].as_str()), ("cancelled", Some(id.as_str())));
    assert!(one.next(10.0).await.is_none(), "stream ends after a terminal state");

    // A finished job's stream is just its snapshot.
    let mut ended = SseReader::new(app.get(&format!("/jobs/{id}/events")).send().await.unwrap());
    assert_eq!(ended.next(10.0).await.unwrap().1["job"]["status"], "cancelled");
    assert!(ended.next(10.0).await.is_none());
}

#[tokio::test]
async fn the_websocket_carries_the_same_events_and_takes_a_query_token() {
    let app = spawn_with(|a| a.api_token = Some("s3cret".into())).await;
    let ws_base = app.base.replace("http://", "ws://");
    assert!(tokio_tungstenite::connect_async(format!("{ws_base}/ws")).await.is_err(), "no token: refused");

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{ws_base}/ws?token=s3cret")).await.expect("connects with ?token=");
    let hello = ws.next().await.unwrap().unwrap();
    let hello: Value = serde_json::from_str(hello.to_text().unwrap()).unwrap();
    assert_eq!(hello["type"], "hello");

    let id = app.submit_png("over the socket").await;
    let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    let ev: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(
        (ev["type"].as_str(), ev["event"].as_str(), ev["job_id"].as_str()),
        (Some("job"), Some("queued"), Some(id.as_str()))
    );
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_long_polls_instead_of_hanging() {
    let mut app = spawn_app().await;
    let id = app.submit_png("watched at shutdown").await;
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let mut one = SseReader::new(app.get(&format!("/jobs/{id}/events")).send().await.unwrap());
    assert_eq!(one.next(5.0).await.unwrap().0, "snapshot");
    let poll = {
        let (http, url) = (app.http.clone(), app.url(&format!("/jobs/{id}?wait=60")));
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    let lease = {
        let (http, url) = (app.http.clone(), app.url("/worker/lease"));
        tokio::spawn(async move { http.post(url).json(&json!({"worker_id": "w", "wait": 60})).send().await })
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), app.shutdown())
        .await
        .expect("the broker stops promptly with streams and long-polls open");
    assert!(all.next(5.0).await.is_none(), "the SSE stream ended");
    assert!(one.next(5.0).await.is_none(), "the job stream ended");
    // Requests that were waiting end too (answered, or closed if they had not arrived yet).
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async { (poll.await, lease.await) }).await;
    assert!(ended.is_ok(), "a long-poll or lease wait kept hanging after shutdown");
}

/// The events of `id` on `reader` up to (not including) the `queued` event of `marker`, a job
/// submitted after the calls under test: the stream is ordered, so whatever those calls published
/// has arrived by then, and nothing more can come.
async fn events_until_marker(reader: &mut SseReader, id: &str, marker: &str) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        let (name, data) = reader.next(15.0).await.expect("an event before the deadline");
        if data["job_id"] == marker {
            return names;
        }
        if data["job_id"] == id {
            names.push(name);
        }
    }
}

#[tokio::test]
async fn a_repeated_worker_fail_publishes_one_error_event() {
    let app = spawn_app().await;
    let mut all = SseReader::new(app.get("/events").send().await.unwrap());
    let id = app.submit_png("fails twice").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    assert_eq!(app.fail(&id, token, "boom", false).await.status(), 200);
    // The worker never saw the first answer and reports again: harmless, and not news.
    assert_eq!(app.fail(&id, token, "boom", false).await.status(), 200);
    assert_eq!(app.job(&id).await["status"], "error");

    let marker = app.submit_png("marker").await;
    assert_eq!(events_until_marker(&mut all, &id, &marker).await, ["queued", "started", "error"]);
}

#[tokio::test]
async fn past_max_subscribers_a_new_stream_gets_429_and_a_closed_one_frees_its_place() {
    let app = crate::helpers::spawn_with(|a| a.max_subscribers = 2).await;
    let id = app.submit_png("watched").await;
    let first = app.get("/events").send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = app.get(&format!("/jobs/{id}/events")).send().await.unwrap();
    assert_eq!(second.status(), 200);
    for path in ["/events".to_owned(), format!("/jobs/{id}/events")] {
        let (status, err) = crate::helpers::error_of(app.get(&path).send().await.unwrap()).await;
        assert_eq!((status, err["code"].as_str(), err["limit"].as_u64()), (429, Some("too_many_subscribers"), Some(2)));
        assert!(err["message"].as_str().unwrap().contains("MAX_SUBSCRIBERS"), "{err}");
    }
    let ws = tokio_tungstenite::connect_async(app.url("/ws").replace("http://", "ws://")).await;
    assert!(ws.is_err(), "the WebSocket is refused too");
    drop(first);
    // The closed stream's place is free again (its end is noticed at the next write: a keep-alive).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = app.get("/events").send().await.unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the place was never freed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
