//! Pieces dying mid-job: ComfyUI restarting, the worker being killed, the broker going away while
//! the result is on its way. No job is lost and none is reported done without a result.

use std::time::Duration;

use serde_json::json;

use crate::harness::{ComfyVersion, Pipeline, Setup, on_both_profiles};

async fn a_comfyui_restart_mid_job_is_detected_and_the_job_runs_again(version: ComfyVersion) {
    let mut p = Pipeline::start(Setup { sim_job_time: 20.0, ..Setup::on(version) }).await;
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

async fn a_prompt_that_vanishes_every_time_ends_in_a_clear_error_not_a_hang(version: ComfyVersion) {
    let p = Pipeline::start(Setup { max_attempts: 2, ..Setup::on(version) }).await;
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
    // Killed mid-prompt (progress reported), not between the lease and its first call: a lease
    // that never reached its worker goes back to the queue without counting an attempt.
    p.wait_for(&id, 30.0, |j| j["status"] == "running" && j["progress"]["node"].is_string()).await;
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

#[tokio::test]
async fn one_worker_runs_a_job_on_each_comfyui_server_at_once() {
    let mut p = Pipeline::start(Setup { sim_job_time: 3.0, ..Setup::default() }).await;
    let mut single = p.workers.remove(0);
    single.stop().await;
    let second_sim = p.start_sim(None).await;
    let urls = format!("http://{},http://{}", p.sim.addr, second_sim.addr);
    let multi = p.start_worker_on("multi", Some(urls)).await;
    p.workers.push(multi);

    let a = p.submit("first", None, Some(json!({"frames": 9}))).await;
    let b = p.submit("second", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&a, 30.0, |j| j["progress"]["node_type"] == "SamplerCustom").await;
    p.wait_for(&b, 30.0, |j| j["progress"]["node_type"] == "SamplerCustom").await;
    // Both sample at the same time, one on each server.
    assert_eq!(p.job(&a).await["status"], "running");
    let health: serde_json::Value = p.http.get(p.url("/health")).send().await.unwrap().json().await.unwrap();
    let busy: Vec<&str> = health["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["job_id"].is_string())
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(busy.len(), 2, "{health}");
    assert!(busy.contains(&"multi/0") && busy.contains(&"multi/1"), "{health}");
    assert_eq!(p.wait_terminal(&a).await["status"], "done");
    assert_eq!(p.wait_terminal(&b).await["status"], "done");
    drop(second_sim);
}

#[tokio::test]
async fn a_dead_server_among_several_does_not_fail_the_jobs() {
    let mut p = Pipeline::start(Setup::default()).await;
    let mut single = p.workers.remove(0);
    single.stop().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed below
    let urls = format!("http://{dead},http://{}", p.sim.addr);
    let multi = p.start_worker_on("mixed", Some(urls)).await;
    p.workers.push(multi);
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(p.submit(&format!("job {i}"), Some("image_invert"), None).await);
    }
    for id in &ids {
        let job = p.wait_terminal(id).await;
        assert_eq!(job["status"], "done", "{job}");
    }
}

on_both_profiles!(
    a_comfyui_restart_mid_job_is_detected_and_the_job_runs_again,
    a_prompt_that_vanishes_every_time_ends_in_a_clear_error_not_a_hang,
);
