//! One bad client cannot take the broker down: a slowloris header, a half-sent upload, more
//! connections than MAX_CONNECTIONS. Raw sockets, since a well-behaved client cannot misbehave.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{TestApp, png_bytes, spawn_with};

async fn connect(app: &TestApp) -> TcpStream {
    TcpStream::connect(app.base.trim_start_matches("http://")).await.expect("connect")
}

/// Reads until the broker closes the connection (or `within` passes: `None`); returns what came.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| String::from_utf8_lossy(&got).into_owned())
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_half_sent_header_is_closed_within_header_timeout() {
    let app = spawn_with(|a| a.net.header_timeout = 1.0).await;
    let mut slow = connect(&app).await;
    slow.write_all(b"POST /jobs HTTP/1.1\r\nHost: broker\r\nContent-Type: multipart/form-data; bou").await.unwrap();
    let started = tokio::time::Instant::now();
    let closed = read_until_closed(&mut slow, Duration::from_secs(2)).await;
    assert!(closed.is_some(), "the half-sent header still held its connection after 2x HEADER_TIMEOUT");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before HEADER_TIMEOUT: {:?}", started.elapsed());
    // Everyone else is served as usual.
    assert_eq!(app.health().await["status"], "healthy");
}

#[tokio::test]
async fn a_half_sent_upload_is_cut_off_after_body_timeout_and_its_temp_file_removed() {
    let app = spawn_with(|a| a.net.body_timeout = 1.0).await;
    app.health().await;
    let png = png_bytes(256, 256);
    let boundary = "XbOuNdArY";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nstalled\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"image\"; filename=\"f.png\"\r\nContent-Type: image/png\r\n\r\n"
    );
    let total = head.len() + png.len() + boundary.len() + 8;
    let mut upload = connect(&app).await;
    let request = format!(
        "POST /jobs HTTP/1.1\r\nHost: broker\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {total}\r\n\r\n{head}"
    );
    upload.write_all(request.as_bytes()).await.unwrap();
    upload.write_all(&png[..png.len() / 2]).await.unwrap();
    // The frame is being staged...
    wait_for("the upload's temp file appears", 10, || !app.files("tmp").is_empty()).await;
    // ... and then the client goes silent without closing.
    let answer = read_until_closed(&mut upload, Duration::from_secs(5))
        .await
        .expect("the stalled upload's connection was closed within a few BODY_TIMEOUTs");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("BODY_TIMEOUT"), "the answer names the setting: {answer:?}");
    assert!(app.files("tmp").is_empty(), "temp files left: {:?}", app.files("tmp"));
    assert!(app.files("inputs").is_empty());
    assert_eq!(app.health().await["jobs_count"], 0);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_upload_leaves_no_temp_file() {
    let app = spawn_with(|_| {}).await;
    app.health().await;
    let mut upload = connect(&app).await;
    let boundary = "b0und";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.png\"\r\n\
         Content-Type: image/png\r\n\r\n"
    );
    let png = png_bytes(256, 256);
    let request = format!(
        "POST /jobs HTTP/1.1\r\nHost: broker\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {}\r\n\r\n{head}",
        head.len() + png.len() + 64
    );
    upload.write_all(request.as_bytes()).await.unwrap();
    upload.write_all(&png[..png.len() / 2]).await.unwrap();
    wait_for("the upload's temp file appears", 10, || !app.files("tmp").is_empty()).await;
    drop(upload);
    wait_for("the temp file is removed after the hang-up", 10, || app.files("tmp").is_empty()).await;
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    let app = spawn_with(|a| a.net.max_connections = 2).await;
    // Two clients hold a connection each (kept alive after a request).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect(&app).await;
        c.write_all(b"GET /health HTTP/1.1\r\nHost: broker\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        held.push(c);
    }
    let third = {
        let http = reqwest::Client::new();
        let url = app.url("/health");
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!third.is_finished(), "a third connection was served while MAX_CONNECTIONS=2 were open");
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), third).await.expect("served once a slot freed");
    assert_eq!(status.unwrap().unwrap(), 200);
}

#[tokio::test]
async fn a_stalled_result_upload_is_cut_off_and_the_worker_can_deliver_again() {
    let app = spawn_with(|a| a.net.body_timeout = 1.0).await;
    let id = app.submit_png("result over a dying link").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    let mut upload = connect(&app).await;
    let head = format!(
        "PUT /worker/jobs/{id}/result HTTP/1.1\r\nHost: broker\r\nLease-Token: {token}\r\n\
         Content-Type: video/mp4\r\nContent-Length: 1000000\r\n\r\n"
    );
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(&[7u8; 300_000]).await.unwrap();
    wait_for("the result's temp file appears", 10, || !app.files("tmp").is_empty()).await;
    let answer =
        read_until_closed(&mut upload, Duration::from_secs(5)).await.expect("cut off within a few BODY_TIMEOUTs");
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("BODY_TIMEOUT"), "{answer:?}");
    assert!(app.files("tmp").is_empty(), "temp files left: {:?}", app.files("tmp"));
    assert_eq!(app.job(&id).await["status"], "running", "a cut-off upload does not finish the job");
    assert_eq!(app.put_result(&id, token, b"the whole mp4".to_vec()).await.status(), 200);
    assert_eq!(app.job(&id).await["status"], "done");
}
