//! Events a client can trust: `Last-Event-ID` resumes a stream with nothing missed and nothing
//! twice; whatever the broker cannot resume from (an id of another broker start, one older than
//! its replay buffer), and a subscriber that fell behind, get a `resync` event instead of a gap.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{SseReader, TestApp, spawn_app};

/// `(event name, id, job id)` of the next `n` events.
async fn take(reader: &mut SseReader, n: usize) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (name, data) = reader.next(15.0).await.expect("an event before the deadline");
        out.push((name, reader.last_id.clone().expect("every event has an id"), data["job_id"].clone()));
    }
    out
}

async fn resume(app: &TestApp, path: &str, last_event_id: &str) -> SseReader {
    SseReader::new(app.get(path).header("last-event-id", last_event_id).send().await.unwrap())
}

#[tokio::test]
async fn last_event_id_resumes_the_stream_with_nothing_missed_and_nothing_twice() {
    let app = spawn_app().await;
    let mut first = SseReader::new(app.get("/events").send().await.unwrap());
    let id = app.submit_png("resumed").await;
    let seen = take(&mut first, 1).await;
    assert_eq!((seen[0].0.as_str(), &seen[0].2), ("queued", &json!(id)));
    drop(first); // the client's connection breaks here

    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    app.heartbeat(&id, token, Some(json!({"value": 0.5, "step": 1, "max_steps": 2}))).await;
    assert_eq!(app.put_result(&id, token, b"mp4".to_vec()).await.status(), 200);

    let mut again = resume(&app, "/events", &seen[0].1).await;
    let replayed = take(&mut again, 3).await;
    let names: Vec<&str> = replayed.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["started", "progress", "done"], "what happened while away, in order");
    assert!(replayed.iter().all(|e| e.2 == json!(id)));
    // Then the stream is live: the next job's event follows, and no replayed event comes again.
    let next = app.submit_png("after the resume").await;
    let live = take(&mut again, 1).await;
    assert_eq!((live[0].0.as_str(), &live[0].2), ("queued", &json!(next)));
    let mut ids: Vec<&String> = seen.iter().chain(&replayed).chain(&live).map(|e| &e.1).collect();
    ids.dedup();
    assert_eq!(ids.len(), 5, "every event has its own id");
}

#[tokio::test]
async fn a_job_stream_resumes_from_its_last_event_id_and_ends_with_the_job() {
    let app = spawn_app().await;
    let id = app.submit_png("one job, resumed").await;
    let path = format!("/jobs/{id}/events");
    let mut first = SseReader::new(app.get(&path).send().await.unwrap());
    let (name, _) = first.next(10.0).await.unwrap();
    assert_eq!(name, "snapshot");
    let snapshot_id = first.last_id.clone().expect("the snapshot has an id to resume from");
    drop(first);

    let other = app.submit_png("someone else's").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    assert_eq!(lease["job_id"], id);
    let token = lease["lease_token"].as_str().unwrap();
    app.delete(&format!("/jobs/{other}")).send().await.unwrap();
    app.heartbeat(&id, token, Some(json!({"value": 0.5, "step": 1, "max_steps": 2}))).await;
    assert_eq!(app.put_result(&id, token, b"mp4".to_vec()).await.status(), 200);

    let mut again = resume(&app, &path, &snapshot_id).await;
    let replayed = take(&mut again, 3).await;
    let names: Vec<&str> = replayed.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, ["started", "progress", "done"], "only this job's events, no second snapshot");
    assert!(again.next(10.0).await.is_none(), "the stream ends after the terminal state");

    // An EventSource reconnects by itself when a stream ends: it gets the final state and the end.
    let mut after_end = resume(&app, &path, &replayed[2].1).await;
    let (name, data) = after_end.next(10.0).await.expect("the final state");
    assert_eq!((name.as_str(), data["job"]["status"].as_str()), ("snapshot", Some("done")));
    assert!(after_end.next(10.0).await.is_none());
}

#[tokio::test]
async fn an_id_the_broker_cannot_resume_from_gets_resync_then_the_live_stream() {
    let app = spawn_app().await;
    let mut stream = resume(&app, "/events", "not-an-id-of-this-broker").await;
    let (name, data) = stream.next(10.0).await.expect("a resync event");
    assert_eq!((name.as_str(), data["type"].as_str()), ("resync", Some("resync")));
    let resync_id = stream.last_id.clone().expect("the resync carries the id to continue from");
    assert_eq!(data["id"].as_str(), Some(resync_id.as_str()));
    let id = app.submit_png("after the resync").await;
    let (name, data) = stream.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), data["job_id"].as_str()), ("queued", Some(id.as_str())));

    // A job stream says resync too, then gives the job's state, which is what the client re-reads.
    let mut one = resume(&app, &format!("/jobs/{id}/events"), "bogus").await;
    assert_eq!(one.next(10.0).await.unwrap().0, "resync");
    let (name, data) = one.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), data["job"]["status"].as_str()), ("snapshot", Some("queued")));
}

#[tokio::test]
async fn an_id_from_before_a_broker_restart_gets_resync_not_a_silent_skip() {
    let app = spawn_app().await;
    let mut stream = SseReader::new(app.get("/events").send().await.unwrap());
    let mut last = String::new();
    for i in 0..3 {
        let id = app.submit_png(&format!("before the restart {i}")).await;
        assert_eq!(take(&mut stream, 1).await[0].2, json!(id));
        last = stream.last_id.clone().unwrap();
    }
    drop(stream);
    let app = app.restart().await;
    // The new broker's first event, which the client has not seen: numbering restarted with it.
    let after = app.submit_png("after the restart").await;

    let mut again = resume(&app, "/events", &last).await;
    let (name, _) = again.next(10.0).await.expect("an event");
    assert_eq!(name, "resync", "an id of the previous broker start cannot be resumed from");
    let marker = app.submit_png("marker").await;
    let (name, data) = again.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), data["job_id"].as_str()), ("queued", Some(marker.as_str())), "then the live stream");
    assert_ne!(after, marker);
}

/// Changes published while the slow clients do not read: the channel holds 1024, and about 150
/// events (3 MB) were measured to fit in the socket buffers here, so this leaves a wide margin
/// for hosts whose buffers grow larger.
const FLOOD: u64 = 2200;

/// Publishes `n` progress events of one leased job whose prompts make each event about 20 KB.
async fn flood(app: &TestApp, id: &str, token: &str, n: u64) {
    for step in 1..=n {
        let progress = json!({"value": step as f64 / n as f64, "step": step, "max_steps": n});
        assert_eq!(app.heartbeat(id, token, Some(progress)).await.status(), 200);
    }
}

fn big_prompt_form() -> reqwest::multipart::Form {
    crate::helpers::png_form(&"p".repeat(10_000)).text("negative_prompt", "n".repeat(10_000))
}

/// A raw HTTP/1.0 client with a 4 KiB receive buffer, so it can stop reading and let the broker
/// fall behind; its body is the event stream as sent (no chunked framing under HTTP/1.0).
async fn slow_client(app: &TestApp, path: &str) -> tokio::net::TcpStream {
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    stream
}

/// Reads `stream` into `text` until `needle` has been seen and the block holding it (ended by
/// `end`) is complete.
async fn read_until(stream: &mut tokio::net::TcpStream, text: &mut String, needle: &str, end: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(at) = text.find(needle)
            && text[at..].contains(end)
        {
            return;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in the stream"))
            .unwrap();
        assert!(n > 0, "the stream ended before {needle:?}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// The `data:` JSON of the first event block after `name` in `text`.
fn data_of(text: &str, name: &str) -> Value {
    let at = text.find(&format!("event: {name}\n")).unwrap_or_else(|| panic!("no {name} event"));
    let block = &text[at..at + text[at..].find("\n\n").unwrap()];
    let data = block.lines().find_map(|l| l.strip_prefix("data: ")).expect("a data line");
    serde_json::from_str(data).unwrap()
}

#[tokio::test]
async fn subscribers_that_fall_behind_get_resync_instead_of_a_silent_gap() {
    let app = spawn_app().await;
    let resp = app.submit(big_prompt_form()).await;
    assert_eq!(resp.status(), 200);
    let id = resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();

    let mut all = slow_client(&app, "/events").await;
    let mut one = slow_client(&app, &format!("/jobs/{id}/events")).await;
    let ws_base = app.base.replace("http://", "ws://");
    let ws_socket = tokio::net::TcpSocket::new_v4().unwrap();
    ws_socket.set_recv_buffer_size(4096).unwrap();
    let ws_tcp = ws_socket.connect(app.base.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("{ws_base}/ws"), ws_tcp).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("hello"));
    // The answers' heads (and the job stream's snapshot) are written once the streams subscribed.
    let (mut all_text, mut one_text) = (String::new(), String::new());
    read_until(&mut all, &mut all_text, "text/event-stream", "\r\n\r\n").await;
    read_until(&mut one, &mut one_text, "event: snapshot", "\n\n").await;
    // Nothing more is sent until the flood, so later searches start after the first snapshot.
    one_text.clear();

    // Nobody reads while FLOOD changes are published.
    flood(&app, &id, &token, FLOOD).await;
    let step = |n: u64| json!({"value": 1.0, "step": n, "max_steps": FLOOD});

    read_until(&mut all, &mut all_text, "event: resync", "\n\n").await;
    let resync = data_of(&all_text, "resync");
    assert_eq!((resync["type"].as_str(), resync["reason"].as_str()), (Some("resync"), Some("lagged")));
    // After the resync the stream is live again: the next change arrives.
    app.heartbeat(&id, &token, Some(step(FLOOD + 1))).await;
    read_until(&mut all, &mut all_text, &format!("\"step\":{}", FLOOD + 1), "\n\n").await;

    // The job stream follows its resync with the job's current state, then goes on live.
    read_until(&mut one, &mut one_text, "event: resync", "\n\n").await;
    read_until(&mut one, &mut one_text, "event: snapshot", "\n\n").await;
    assert!(one_text.find("event: resync") < one_text.find("event: snapshot"));
    let snapshot = data_of(&one_text, "snapshot");
    assert_eq!(snapshot["job"]["status"], "running");
    assert_eq!(snapshot["job"]["progress"]["step"], FLOOD + 1, "the state after the missed events");
    app.heartbeat(&id, &token, Some(step(FLOOD + 2))).await;
    read_until(&mut one, &mut one_text, &format!("\"step\":{}", FLOOD + 2), "\n\n").await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut next_ws = async || -> Value {
        loop {
            let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("a WebSocket message");
            // The broker pings every 15 s; only text messages are events.
            if let tokio_tungstenite::tungstenite::Message::Text(text) = msg.unwrap().unwrap() {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };
    loop {
        let msg = next_ws().await;
        if msg["type"] == "resync" {
            assert_eq!(msg["reason"], "lagged");
            break;
        }
        assert!(msg["job"]["progress"]["step"].as_u64() <= Some(FLOOD), "a resync before the live events: {msg}");
    }
    app.heartbeat(&id, &token, Some(step(FLOOD + 3))).await;
    loop {
        let msg = next_ws().await;
        if msg["job"]["progress"]["step"] == FLOOD + 3 {
            break;
        }
    }
}

#[tokio::test]
async fn an_id_older_than_the_replay_buffer_gets_resync() {
    let app = spawn_app().await;
    let mut stream = SseReader::new(app.get("/events").send().await.unwrap());
    let id = app.submit_png("many changes").await;
    take(&mut stream, 1).await;
    let oldest = stream.last_id.clone().unwrap();
    drop(stream);
    let lease = app.lease("w", 1.0).await.unwrap();
    flood(&app, &id, lease["lease_token"].as_str().unwrap(), 1100).await;

    let mut again = resume(&app, "/events", &oldest).await;
    let (name, data) = again.next(10.0).await.expect("an event");
    assert_eq!((name.as_str(), data["reason"].as_str()), ("resync", Some("expired")));
}
