//! A broker killed with SIGKILL in the middle of a stream of submissions loses no accepted job.

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
