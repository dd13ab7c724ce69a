//! Pieces dying mid-job: ComfyUI restarting, the worker being killed, the broker going away while
//! the result is on its way. No job is lost and none is reported done without a result.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Pipeline, Setup};

#[tokio::test]
async fn a_comfyui_restart_mid_job_is_detected_and_the_job_runs_again() {
    let mut p = Pipeline::start(Setup { sim_job_time: 20.0, ..Setup::default() }).await;
    let id = p.submit("interrupted by a restart", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["progress"]["node_type"] == "SamplerCustom").await;
    // ComfyUI dies; a fresh one (empty queue and history) comes up on the same port, faster now.
    let addr = p.sim.addr;
    p.sim.kill().await;
    p.setup.sim_job_time = 0.2;
    p.sim = p.start_sim(Some(addr)).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 2, "the lost prompt was detected and the job leased again");
}

#[tokio::test]
async fn a_prompt_that_vanishes_every_time_ends_in_a_clear_error_not_a_hang() {
    let p = Pipeline::start(Setup { max_attempts: 2, ..Setup::default() }).await;
    let id = p.submit("gone [sim:restart]", None, Some(json!({"frames": 9}))).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "error", "{job}");
    assert_eq!(job["attempts"], 2);
    let msg = job["error_message"].as_str().unwrap();
    assert!(msg.contains("lost"), "{msg}");
}

#[tokio::test]
async fn a_killed_worker_s_job_is_re_leased_and_finished_by_another() {
    let mut p = Pipeline::start(Setup { sim_job_time: 2.0, lease_ttl: 1.0, ..Setup::default() }).await;
    let id = p.submit("survives its worker", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["status"] == "running").await;
    let mut dead = p.workers.remove(0);
    dead.kill().await;
    let second = p.start_worker("worker-2").await;
    p.workers.push(second);
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 2);
    let health: serde_json::Value = p.http.get(p.url("/health")).send().await.unwrap().json().await.unwrap();
    assert!(health["workers"].as_array().unwrap().iter().any(|w| w["id"] == "worker-2"), "{health}");
}

#[tokio::test]
async fn a_result_finished_while_the_broker_is_down_is_delivered_when_it_returns() {
    let mut p = Pipeline::start(Setup { sim_job_time: 1.5, ..Setup::default() }).await;
    let id = p.submit("outlives the broker", None, Some(json!({"frames": 9}))).await;
    // Once the prompt runs in ComfyUI, the broker goes away; the prompt finishes while nobody
    // can take the result.
    p.wait_for(&id, 30.0, |j| j["progress"]["node_type"] == "SamplerCustom").await;
    let addr = p.broker.addr;
    p.broker.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while p.sim_queue().await != (0, 0) {
        assert!(tokio::time::Instant::now() < deadline, "the prompt never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.broker = p.start_broker(Some(addr)).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 1, "delivered by the same worker, not re-run");
    assert_eq!(p.result(&id).await.0, "video/mp4");
}
