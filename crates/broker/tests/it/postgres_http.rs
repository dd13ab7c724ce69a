//! The broker on PostgreSQL (`DATABASE_URL`) over real HTTP: the whole job lifecycle, two brokers
//! sharing one database, and the startup errors of a bad or unreachable `DATABASE_URL`.

use serde_json::Value;

use crate::helpers::{TestDb, spawn_postgres, test_args, test_workflows};

#[tokio::test]
async fn submit_lease_heartbeat_result_and_download_on_postgres() {
    let Some(db) = TestDb::create("submit_lease_heartbeat_result_and_download_on_postgres").await else { return };
    let app = spawn_postgres(&db.url, |_| {}).await;
    let id = app.submit_png("on postgres").await;
    assert_eq!(app.job(&id).await["status"], "queued");
    let lease = app.lease("gpu-1", 1.0).await.unwrap();
    assert_eq!(lease["job_id"], id.as_str());
    let token = lease["lease_token"].as_str().unwrap();
    let hb = app.heartbeat(&id, token, Some(serde_json::json!({"value": 0.5}))).await;
    assert_eq!(hb.status(), 200);
    assert_eq!(app.job(&id).await["progress"]["value"], 0.5);
    let resp = app.put_result(&id, token, b"an mp4".to_vec()).await;
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("done"), Some(1)));
    let bytes = app.get(&format!("/jobs/{id}/result")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&bytes[..], b"an mp4");
    let h = app.health().await;
    assert_eq!((h["queued"].as_u64(), h["running"].as_u64(), h["done"].as_u64()), (Some(0), Some(0), Some(1)), "{h}");
}

#[tokio::test]
async fn two_brokers_on_one_database_share_the_queue() {
    let Some(db) = TestDb::create("two_brokers_on_one_database_share_the_queue").await else { return };
    // One file area for both (as STORAGE_URL would be), each broker its own data directory.
    let shared = tempfile::tempdir().unwrap();
    let storage = format!("file://{}", shared.path().display());
    let a = spawn_postgres(&db.url, |args| args.storage.storage_url = Some(storage.clone())).await;
    let b = spawn_postgres(&db.url, |args| args.storage.storage_url = Some(storage.clone())).await;
    let first = a.submit_png("submitted on a").await;
    let second = b.submit_png("submitted on b").await;
    let l1 = b.lease("gpu-1", 1.0).await.expect("b hands out a's job");
    let l2 = a.lease("gpu-2", 1.0).await.expect("a hands out b's job");
    assert_eq!((l1["job_id"].as_str(), l2["job_id"].as_str()), (Some(first.as_str()), Some(second.as_str())));
    assert!(a.lease("gpu-3", 0.2).await.is_none() && b.lease("gpu-3", 0.2).await.is_none(), "each leased once");
    let resp = b.put_result(&first, l1["lease_token"].as_str().unwrap(), b"clip".to_vec()).await;
    assert!(resp.status().is_success());
    let job: Value = a.job(&first).await;
    assert_eq!(job["status"], "done", "a reads what b committed");
    let bytes = a.get(&format!("/jobs/{first}/result")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(&bytes[..], b"clip");
    // A lease token from one broker is checked on the other.
    let hb = b.heartbeat(&second, l2["lease_token"].as_str().unwrap(), None).await;
    assert_eq!(hb.status(), 200);
}

#[tokio::test]
async fn a_malformed_database_url_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = test_args(dir.path().join("data"));
    args.storage.database_url = Some("postgres://u:s3cret@host:notaport/db".into());
    let err = args.into_config(test_workflows()).expect_err("refused").to_string();
    assert!(err.contains("DATABASE_URL"), "{err}");
    assert!(!err.contains("s3cret"), "no password in the message: {err}");
    let mut args = test_args(dir.path().join("data"));
    args.storage.database_url = Some("postgres://u:s3cret@localhost/db?sslmode=require".into());
    let err = args.into_config(test_workflows()).expect_err("refused").to_string();
    assert!(err.contains("DATABASE_URL") && err.contains("sslmode=require"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[tokio::test]
async fn an_unreachable_database_fails_the_start_without_the_password() {
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut args = test_args(dir.path().join("data"));
    args.storage.database_url = Some(format!("postgres://tdcomfy:s3cret@127.0.0.1:{port}/jobs"));
    assert!(!format!("{args:?}").contains("s3cret"), "the arguments' Debug hides it too");
    let config = args.into_config(test_workflows()).unwrap();
    assert!(!format!("{config:?}").contains("s3cret"), "Debug hides the password");
    let err = tdcomfy_broker::Broker::open(config).await.err().expect("no database, no broker").to_string();
    assert!(err.contains("DATABASE_URL") && err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}
