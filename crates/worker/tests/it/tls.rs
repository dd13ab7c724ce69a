//! The worker and an HTTPS broker (built-in TLS): a self-signed certificate trusted through
//! BROKER_CA, and the pinned trust `tdcomfy up` gives its own worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tdcomfy_worker::broker_client::{BrokerCallError, BrokerClient, BrokerTrust};
use tokio_util::sync::CancellationToken;

use crate::harness::frame_png;

struct TlsBroker {
    port: u16,
    cert: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn workflows() -> std::sync::Arc<tdcomfy_workflows::WorkflowRegistry> {
    let args = tdcomfy_workflows::WorkflowArgs {
        workflows_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../workflows"),
        default_workflow: "image_invert".into(),
        workflow_nodes: None,
    };
    std::sync::Arc::new(args.load().unwrap())
}

/// A broker on 127.0.0.1 serving HTTPS with a self-signed certificate for `names`.
async fn tls_broker(names: &[&str]) -> TlsBroker {
    let dir = tempfile::tempdir().unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let mut args = tdcomfy_broker::BrokerArgs {
        max_upload_mb: 20,
        max_result_mb: 512,
        result_ttl: 0,
        job_retention: 0,
        ..tdcomfy_broker::BrokerArgs::loopback(dir.path().join("broker"))
    };
    args.net.tls_cert = Some(cert_path.clone());
    args.net.tls_key = Some(key_path);
    let config = args.into_config(workflows()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { tdcomfy_broker::run(listener, config, async move { s.cancelled().await }).await });
    let ca = reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap();
    let http =
        reqwest::Client::builder().tls_certs_only([ca]).tls_danger_accept_invalid_hostnames(true).build().unwrap();
    TlsBroker { port, cert: cert_path, http, _dir: dir, stop }
}

impl TlsBroker {
    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    async fn submit(&self) -> String {
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(frame_png()).file_name("frame.png"))
            .text("prompt", "over https");
        let resp = self.http.post(self.url("127.0.0.1", "/jobs")).multipart(form).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned()
    }
}

fn trust(path: &Path) -> Vec<reqwest::Certificate> {
    BrokerTrust::read_pem(path).unwrap()
}

#[tokio::test]
async fn a_worker_runs_jobs_from_an_https_broker_it_trusts_through_broker_ca() {
    let broker = tls_broker(&["localhost"]).await;
    let https = broker.url("localhost", "");
    // The system's roots do not know a self-signed certificate: the call fails, naming why.
    let system = BrokerClient::new(&https, None).unwrap();
    match system.lease("w", Duration::ZERO).await {
        Err(BrokerCallError::Unreachable(m)) => assert!(m.to_lowercase().contains("certificate"), "{m}"),
        other => panic!("an untrusted certificate was accepted: {other:?}"),
    }

    // A whole job through a real worker and the simulator, every broker call over HTTPS.
    let sim_dir = tempfile::tempdir().unwrap();
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    let mut sim = tdcomfy_sim::SimConfig::new(sim_dir.path().to_owned());
    sim.job_time = Duration::from_millis(200);
    sim.progress_steps = 2;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { tdcomfy_sim::run(sim_listener, sim, async move { s.cancelled().await }).await });
    let args = tdcomfy_worker::WorkerArgs {
        comfyui_host: sim_addr.ip().to_string(),
        comfyui_port: sim_addr.port(),
        comfyui_urls: None,
        comfyui_retry_budget: 10.0,
        worker_poll_interval: 0.1,
        worker_id: Some("https-worker".into()),
        stall_timeout: 30.0,
        comfyui_poll_interval: 0.2,
        spool_dir: Some(sim_dir.path().join("spool")),
        comfyui_dir: None,
        comfyui_output_dir: None,
        comfyui_input_dir: None,
        comfyui_keep_outputs: false,
        preview_fps: 10.0,
        comfyui_token: None,
        preview_method: "none".into(),
        prefetch: 1,
    };
    let mut config = args.into_config(https.clone(), None, workflows(), PathBuf::new()).unwrap();
    config.broker_trust = BrokerTrust::WithCa(trust(&broker.cert));
    let worker_stop = stop.clone();
    tokio::spawn(async move { tdcomfy_worker::run(config, worker_stop).await });

    let id = broker.submit().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job: Value = broker
            .http
            .get(broker.url("127.0.0.1", &format!("/jobs/{id}?wait=5")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "done" || job["status"] == "error" || tokio::time::Instant::now() > deadline {
            break job;
        }
    };
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["has_result"], true, "{job}");
    stop.cancel();
}

#[tokio::test]
async fn up_s_pinned_trust_reaches_its_broker_over_loopback_under_another_name() {
    let broker = tls_broker(&["broker.example"]).await;
    let id = broker.submit().await;
    let loopback = broker.url("127.0.0.1", "");
    let by_ca = BrokerClient::with_trust(&loopback, None, &BrokerTrust::WithCa(trust(&broker.cert))).unwrap();
    assert!(by_ca.lease("w", Duration::ZERO).await.is_err(), "127.0.0.1 is not a name in the certificate");
    let pinned = BrokerClient::with_trust(&loopback, None, &BrokerTrust::Pinned(trust(&broker.cert))).unwrap();
    let lease = pinned.lease("up-worker", Duration::from_secs(2)).await.unwrap().expect("leased");
    assert_eq!(lease.job_id.to_string(), id);
}
