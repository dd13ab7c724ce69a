//! `tdcomfy up` serving HTTPS itself (TLS_CERT, TLS_KEY), and settings that stop a start.

use std::time::Duration;

use serde_json::Value;

use crate::process::{Proc, free_port, png};

#[tokio::test]
async fn up_with_tls_cert_and_key_runs_a_job_over_https_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    // Named for a host that is not 127.0.0.1: up's own worker must still reach its broker.
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["broker.example".to_owned(), "localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let env = [
        ("COMFYUI_PORT", free_port().to_string()),
        ("SIM_JOB_TIME", "0.2".to_owned()),
        ("TLS_CERT", cert_path.display().to_string()),
        ("TLS_KEY", key_path.display().to_string()),
    ];
    let up = Proc::start(&["up", "--simulate"], &dir.path().join("data"), port, &env);
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap()])
        .resolve("broker.example", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let base = format!("https://broker.example:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(tokio::time::Instant::now() < deadline, "the HTTPS broker did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(png(64, 40, 3)).file_name("frame.png"))
        .text("prompt", "over https")
        .text("params", r#"{"frames": 9}"#);
    let resp = http.post(format!("{base}/jobs")).multipart(form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
    let job = loop {
        let job: Value = http.get(format!("{base}/jobs/{id}?wait=5")).send().await.unwrap().json().await.unwrap();
        if ["done", "error"].contains(&job["status"].as_str().unwrap()) || tokio::time::Instant::now() > deadline {
            break job;
        }
    };
    assert_eq!(job["status"], "done", "up's worker reached its HTTPS broker: {job}");
    let video = http.get(format!("{base}/jobs/{id}/result")).send().await.unwrap();
    assert_eq!(video.headers()["x-content-type-options"], "nosniff");
    assert_eq!(&video.bytes().await.unwrap()[4..8], b"ftyp");
    // `tdcomfy submit` trusts the self-signed certificate given with --ca, and only then.
    let frame = dir.path().join("frame.png");
    std::fs::write(&frame, png(64, 40, 3)).unwrap();
    let submit = |ca: Option<&std::path::Path>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tdcomfy"));
        cmd.args(["submit", "--quiet", "--params", r#"{"frames": 9}"#, "--url", &format!("https://localhost:{port}")])
            .arg("--out")
            .arg(dir.path().join("submitted.mp4"))
            .arg(&frame)
            .env_remove("BROKER_CA")
            .env_remove("API_TOKEN");
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        tokio::time::timeout(Duration::from_secs(60), cmd.output())
    };
    let refused = submit(None).await.expect("submit ends").unwrap();
    assert!(!refused.status.success(), "an unknown self-signed certificate is refused");
    assert!(!dir.path().join("submitted.mp4").exists());
    let trusted = submit(Some(&cert_path)).await.expect("submit ends").unwrap();
    assert!(trusted.status.success(), "{}", String::from_utf8_lossy(&trusted.stderr));
    assert_eq!(&std::fs::read(dir.path().join("submitted.mp4")).unwrap()[4..8], b"ftyp");
    // Plain HTTP finds no broker on that port.
    assert!(reqwest::get(up.base() + "/health").await.is_err());
}

#[tokio::test]
async fn serve_refuses_to_start_with_the_template_s_placeholder_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
            .arg("serve")
            .env_clear()
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", free_port().to_string())
            .env("DATA_DIR", dir.path().join("data"))
            .env("WORKFLOWS_DIR", crate::process::repo_workflows())
            .env("API_TOKEN", "change-me-client-token")
            .output(),
    )
    .await
    .expect("serve stops instead of serving")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("API_TOKEN: still the template's placeholder"), "{stderr}");
}
