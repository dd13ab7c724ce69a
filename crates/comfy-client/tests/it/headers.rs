//! What goes on the wire to ComfyUI, read from a raw TCP server that records the request bytes:
//! no `Origin` header on HTTP or the WebSocket handshake (ComfyUI answers a foreign one with 403,
//! C18), `Comfy-Usage-Source: tdcomfy` (C14), and the token as `Authorization: Bearer` and
//! `?token=` (C19).

use std::time::Duration;

use tdcomfy_comfy::{ClientId, ComfyClient, ComfyEndpoint, ComfyError, ComfySocket, ComfyTimeouts, SocketOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Accepts one connection, reads its request head and answers `response`; returns the head.
async fn record_one(listener: &TcpListener, response: &str) -> String {
    let (mut stream, _) =
        tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.expect("a request").expect("accept");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.expect("read");
        assert!(n == 1, "connection closed inside the head");
        head.push(byte[0]);
    }
    stream.write_all(response.as_bytes()).await.expect("answer");
    let _ = stream.shutdown().await;
    String::from_utf8(head).expect("ASCII head")
}

fn header_lines(head: &str) -> Vec<String> {
    head.lines().skip(1).map(str::to_ascii_lowercase).filter(|l| !l.is_empty()).collect()
}

#[tokio::test]
async fn requests_carry_no_origin_but_the_usage_source_and_the_token() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = ComfyEndpoint::parse(&format!("http://{}", listener.local_addr().expect("addr"))).expect("endpoint");
    let client = ComfyClient::with_token(
        endpoint.clone(),
        ClientId::new(),
        ComfyTimeouts::default(),
        Some("tok-123".to_owned()),
    )
    .expect("client");

    let body = r#"{"system": {"os": "linux"}, "devices": []}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (head, stats) = tokio::join!(record_one(&listener, &answer), client.system_stats());
    stats.expect("stats");
    let lines = header_lines(&head);
    assert!(!lines.iter().any(|l| l.starts_with("origin:")), "no Origin on HTTP: {head}");
    assert!(lines.iter().any(|l| l == "comfy-usage-source: tdcomfy"), "{head}");
    assert!(lines.iter().any(|l| l == "authorization: bearer tok-123"), "{head}");

    // The WebSocket handshake; a 401 answer is a clear error, not a broken socket.
    let refused = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let options = SocketOptions { connect_timeout: Duration::from_secs(5), preview_metadata: true };
    let id = ClientId::new();
    let (head, socket) = tokio::join!(
        record_one(&listener, refused),
        ComfySocket::connect_with_token(&endpoint, &id, Some("tok-123"), &options)
    );
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    assert!(
        request_line.contains(&format!("clientId={id}")) && request_line.contains("token=tok-123"),
        "{request_line}"
    );
    let lines = header_lines(&head);
    assert!(lines.iter().any(|l| l == "upgrade: websocket"), "{head}");
    assert!(!lines.iter().any(|l| l.starts_with("origin:")), "no Origin on the WebSocket: {head}");
    let error = socket.expect_err("refused");
    assert!(matches!(error, ComfyError::Unauthorized { token_sent: true, .. }), "{error:?}");
    assert!(error.to_string().contains("refused the token"), "{error}");
}
