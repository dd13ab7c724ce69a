//! The data directory: one broker at a time, no files left over from a crash, and no result bytes
//! written for an upload that announces it is over MAX_RESULT_MB.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{spawn_app, spawn_with, test_workflows};

#[tokio::test]
async fn a_second_broker_on_the_same_data_dir_refuses_to_start() {
    let app = spawn_app().await;
    assert_eq!(app.health().await["status"], "healthy", "the first broker is up");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = app.args.clone().into_config(test_workflows()).unwrap();
    let second =
        tokio::time::timeout(Duration::from_secs(10), tdcomfy_broker::run(listener, config, std::future::pending()))
            .await
            .expect("the second broker must refuse at once, not serve the same jobs");
    let message = second.expect_err("a second broker on one DATA_DIR").to_string();
    assert!(message.contains("DATA_DIR"), "{message}");
    assert!(message.contains(&app.args.data_dir.display().to_string()), "{message}");
    assert!(message.contains(&format!("pid {}", std::process::id())), "names the other broker: {message}");
    // The first one is unharmed.
    assert_eq!(app.health().await["status"], "healthy");
}

#[tokio::test]
async fn files_no_job_owns_are_removed_at_start() {
    let app = spawn_app().await;
    let kept = app.submit_png("kept").await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    assert_eq!(app.put_result(&kept, lease["lease_token"].as_str().unwrap(), b"clip".to_vec()).await.status(), 200);
    let cancelled = app.submit_png("cancelled").await;
    assert_eq!(app.delete(&format!("/jobs/{cancelled}")).send().await.unwrap().status(), 200);
    let mut app = app;
    app.shutdown().await;
    let files = app.args.data_dir.join("files");
    // A crash between a file's rename and its row's insert, and one between a cancel's commit and
    // its file's removal.
    let orphan = "0b0e6a4e-3f0e-4d7c-9a57-5a1c3e2d9f10";
    std::fs::write(files.join("inputs").join(orphan), b"frame").unwrap();
    std::fs::write(files.join("results").join(orphan), b"clip").unwrap();
    std::fs::write(files.join("inputs").join(&cancelled), b"frame").unwrap();
    let app = app.restart().await;
    assert_eq!(app.health().await["status"], "healthy", "up again");
    assert_eq!(app.files("inputs"), vec![kept.clone()]);
    assert_eq!(app.files("results"), vec![kept.clone()]);
    let got = app.get(&format!("/jobs/{kept}/result")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"clip");
}

#[tokio::test]
async fn a_result_announced_over_max_result_mb_is_refused_before_a_byte_is_written() {
    let app = spawn_with(|a| a.max_result_mb = 1).await;
    let id = app.submit_png("huge").await;
    let lease = app.lease("gpu", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    let mut conn = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "PUT /worker/jobs/{id}/result HTTP/1.1\r\nHost: t\r\nLease-Token: {token}\r\n\
         Content-Type: video/mp4\r\nContent-Length: {}\r\n\r\n",
        3 * 1024 * 1024
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&[0u8; 1024]).await.unwrap(); // the first bytes only; the answer must not wait for the rest
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("MAX_RESULT_MB") && text.contains("\"limit\":1048576"), "{text}");
    assert!(app.files("../tmp").is_empty(), "nothing staged");
    assert_eq!(app.job(&id).await["status"], "running", "the worker may still report a failure");
}
