//! A broker killed with SIGKILL loses no accepted job (in the middle of a stream of submissions),
//! and one down longer than the lease hands no running job to a second attempt.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::process::{Proc, free_port, png};

/// Job ids the broker acknowledged, with the frames sent.
type Accepted = Vec<(String, Vec<u8>)>;

#[tokio::test]
async fn sigkill_during_submissions_loses_no_accepted_job() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Proc::start(&["serve"], dir.path(), port, &[]);
    broker.ready().await;
    let base = broker.base();

    // Eight clients submit as fast as they can; each remembers what the broker acknowledged.
    let accepted: Arc<Mutex<Accepted>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..8u8 {
        let (base, accepted) = (base.clone(), accepted.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..10_000u32 {
                let image = png(32, 32, c.wrapping_mul(31).wrapping_add(i as u8));
                let form = reqwest::multipart::Form::new()
                    .part("image", reqwest::multipart::Part::bytes(image.clone()).file_name("f.png"))
                    .text("prompt", format!("client {c} frame {i}"));
                match http.post(format!("{base}/jobs")).multipart(form).send().await {
                    Ok(r) if r.status() == 200 => {
                        let id = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned();
                        accepted.lock().unwrap().push((id, image));
                    }
                    _ => return,
                }
            }
        }));
    }
    // Kill once a good number of jobs went through, while submissions are still in flight.
    while accepted.lock().unwrap().len() < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.kill();
    for c in clients {
        c.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();

    let mut broker = Proc::start(&["serve"], dir.path(), port, &[]);
    broker.ready().await;
    let http = reqwest::Client::new();
    let health: Value = http.get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
    assert!(health["queued"].as_u64().unwrap() >= accepted.len() as u64, "{health} vs {} accepted", accepted.len());
    for (id, _) in &accepted {
        let job: Value = http.get(format!("{base}/jobs/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(job["status"], "queued", "accepted job {id} after SIGKILL: {job}");
    }
    // And their frames are intact: lease a sample and compare the bytes.
    for _ in 0..20 {
        let lease: Value = http
            .post(format!("{base}/worker/lease"))
            .json(&serde_json::json!({"worker_id": "check", "wait": 1}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let job = &lease["job"];
        let id = job["job_id"].as_str().unwrap();
        let bytes = http
            .get(format!("{base}/worker/jobs/{id}/input"))
            .header("lease-token", job["lease_token"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        if let Some((_, sent)) = accepted.iter().find(|(a, _)| a == id) {
            assert_eq!(bytes.to_vec(), *sent, "frame of job {id} changed across the crash");
        } else {
            // A job stored just before the kill whose response never reached the client: still a
            // complete, valid frame.
            assert!(bytes.starts_with(b"\x89PNG"), "job {id} has a damaged frame");
        }
    }
}

/// GETs a URL as JSON, `None` while the server is down.
async fn get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

#[tokio::test]
async fn a_broker_killed_and_down_for_three_lease_ttls_loses_no_running_job_to_a_second_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (port, sim_port) = (free_port(), free_port());
    let sim_env = [
        ("COMFYUI_PORT", sim_port.to_string()),
        ("SIM_JOB_TIME", "5".to_owned()),
        ("SIM_DATA_DIR", dir.path().join("sim").display().to_string()),
    ];
    let _sim = Proc::start(&["sim"], &dir.path().join("sim"), free_port(), &sim_env);
    let broker_env = [("LEASE_TTL", "2".to_owned())];
    let mut broker = Proc::start(&["serve"], &dir.path().join("data"), port, &broker_env);
    broker.ready().await;
    let worker_env = [
        ("COMFYUI_PORT", sim_port.to_string()),
        ("WORKER_ID", "gpu-1".to_owned()),
        ("WORKER_POLL_INTERVAL", "0.2".to_owned()),
        ("WORKER_SPOOL_DIR", dir.path().join("spool").display().to_string()),
    ];
    let _worker = Proc::start(&["worker"], &dir.path().join("worker"), port, &worker_env);
    let base = broker.base();
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..2u8 {
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(png(64, 40, i)).file_name("f.png"))
            .text("prompt", format!("clip {i}"))
            .text("params", r#"{"frames": 9}"#);
        let resp = http.post(format!("{base}/jobs")).multipart(form).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.push(resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while get_json(&http, &format!("{base}/jobs/{}", ids[0])).await.unwrap()["status"] != "running" {
        assert!(std::time::Instant::now() < deadline, "the worker never started the first job");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    broker.kill();
    tokio::time::sleep(Duration::from_secs(6)).await; // 3 x LEASE_TTL
    let mut broker = Proc::start(&["serve"], &dir.path().join("data"), port, &broker_env);
    broker.ready().await;

    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    for id in &ids {
        let job = loop {
            let job = get_json(&http, &format!("{base}/jobs/{id}")).await.unwrap();
            if job["status"] == "done" || job["status"] == "error" || std::time::Instant::now() > deadline {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            (job["status"].as_str(), job["attempts"].as_u64()),
            (Some("done"), Some(1)),
            "each job finishes on its first attempt: {job}"
        );
    }
}
