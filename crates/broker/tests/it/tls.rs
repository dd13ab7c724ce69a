//! Built-in TLS: TLS_CERT and TLS_KEY serve HTTPS and WSS, with a certificate made at test time.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::helpers::{TestApp, png_form, spawn_with};

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files under `dir`.
fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf, String) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.pem())
}

async fn spawn_tls(header_timeout: f64) -> (TestApp, String, String, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, pem) = self_signed(certs.path());
    let app = spawn_with(|a| {
        a.net.tls_cert = Some(cert);
        a.net.tls_key = Some(key);
        a.net.header_timeout = header_timeout;
    })
    .await;
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    (app, format!("https://localhost:{port}"), pem, certs)
}

fn trusting(pem: &str) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(pem.as_bytes()).unwrap();
    reqwest::Client::builder().tls_certs_only([ca]).build().unwrap()
}

#[tokio::test]
async fn tls_cert_and_key_serve_https_and_wss() {
    let (app, https, pem, _certs) = spawn_tls(10.0).await;
    let client = trusting(&pem);
    let health: Value = client.get(format!("{https}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "healthy");
    // A browser page served by the broker itself is its own origin, https included.
    let resp = client
        .post(format!("{https}/jobs"))
        .header("origin", https.as_str())
        .multipart(png_form("over https"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());

    // WSS: the same events over TLS.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in pem_certs(&pem) {
        roots.add(cert).unwrap();
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let wss = format!("{}/ws", https.replace("https://", "wss://"));
    let (mut ws, _) = tokio_tungstenite::client_async(wss, tls).await.expect("wss handshake");
    let hello: Value = serde_json::from_str(ws.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(hello["type"], "hello");

    // Plain HTTP on the TLS port gets no HTTP answer, and a client that does not trust the
    // certificate cannot talk to it.
    assert!(reqwest::get(app.url("/health")).await.is_err(), "plain HTTP answered on the TLS port");
    let untrusting = reqwest::Client::builder().tls_certs_only([]).build().unwrap();
    assert!(untrusting.get(format!("{https}/health")).send().await.is_err());
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_within_header_timeout() {
    let (app, _, _, _certs) = spawn_tls(1.0).await;
    let mut tcp = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a connection that never says hello held its slot: {closed:?}");
}

#[tokio::test]
async fn an_unreadable_certificate_stops_the_broker_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed(dir.path());
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    for (cert, key, name) in [
        (dir.path().join("missing.pem"), key.clone(), "TLS_CERT"),
        (dir.path().join("empty.pem"), key.clone(), "TLS_CERT"),
        (cert.clone(), cert.clone(), "TLS_KEY"),
    ] {
        let mut args = crate::helpers::test_args(dir.path().join("data"));
        args.net.tls_cert = Some(cert);
        args.net.tls_key = Some(key);
        let err = args.into_config(crate::helpers::test_workflows()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{name}: ")), "{err}");
    }
    let mut args = crate::helpers::test_args(dir.path().join("data"));
    args.net.tls_cert = Some(cert);
    let err = args.into_config(crate::helpers::test_workflows()).unwrap_err().to_string();
    assert!(err.starts_with("TLS_KEY: "), "{err}");
}

fn pem_certs(pem: &str) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).map(Result::unwrap).collect()
}
