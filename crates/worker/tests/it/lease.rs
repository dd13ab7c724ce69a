//! The lease covers the whole attempt: slow deliveries, a broker away for several lease lifetimes,
//! a ComfyUI retried for longer than the lease, a shutdown mid-delivery.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Pipeline, Served, Setup};
use crate::proxy::SlowUplink;

const LEASE_TTL: f64 = 2.0;

/// Waits until the simulator's queue is empty: the prompt has finished in ComfyUI.
async fn until_comfyui_is_idle(p: &Pipeline) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while p.sim_queue().await != (0, 0) {
        assert!(tokio::time::Instant::now() < deadline, "the prompt never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pipeline whose only worker, `worker`, reaches the broker through an uplink that crawls at
/// 500 B/s (longer than any grace), with one job whose prompt has finished and whose result upload
/// has started: the moment "mid-delivery". LEASE_TTL is 30 s.
async fn mid_delivery(worker: &str, prompt: &str) -> (Pipeline, SlowUplink, Served, String) {
    let mut p = Pipeline::start(Setup::default()).await;
    for w in &mut p.workers {
        w.stop().await;
    }
    let uplink = SlowUplink::start(p.broker.addr, 0).await;
    let w = p.start_worker_with(worker, None, format!("http://{}", uplink.addr)).await;
    let id = p.submit(prompt, None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["status"] == "running").await;
    uplink.set_rate(500);
    until_comfyui_is_idle(&p).await;
    let before = uplink.forwarded.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while uplink.forwarded.load(Ordering::Relaxed) < before + 2_000 {
        assert!(tokio::time::Instant::now() < deadline, "the delivery never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (p, uplink, w, id)
}

#[tokio::test]
async fn a_result_upload_taking_three_leases_is_delivered_on_the_first_attempt() {
    let mut p = Pipeline::start(Setup { lease_ttl: LEASE_TTL, ..Setup::default() }).await;
    // One job through the direct worker gives the size of a result.
    let first = p.submit("size probe", None, Some(json!({"frames": 9}))).await;
    assert_eq!(p.wait_terminal(&first).await["status"], "done");
    let size = p.result(&first).await.1.len() as u64;
    for w in &mut p.workers {
        w.stop().await;
    }
    // Now a worker whose uplink to the broker moves that many bytes in 3× LEASE_TTL.
    let rate = (size as f64 / (3.0 * LEASE_TTL)) as u64;
    let uplink = SlowUplink::start(p.broker.addr, 0).await;
    let w = p.start_worker_with("slow-uplink", None, format!("http://{}", uplink.addr)).await;
    p.workers.push(w);
    let id = p.submit("slow link", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["status"] == "running").await;
    uplink.set_rate(rate);
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 1, "the slow delivery kept its lease: {job}");
    assert_eq!(p.result(&id).await.1.len() as u64, size);
    assert!(uplink.forwarded.load(Ordering::Relaxed) >= size, "the result really went through the slow link");
}

#[tokio::test]
async fn a_broker_down_for_three_leases_after_the_prompt_finished_takes_the_spooled_result() {
    let mut p = Pipeline::start(Setup { sim_job_time: 1.5, lease_ttl: LEASE_TTL, ..Setup::default() }).await;
    let id = p.submit("outlives the broker", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["progress"]["node_type"] == "SamplerCustom").await;
    let addr = p.broker.addr;
    // A graceful stop closes every connection; an aborted task would leave its keep-alive
    // connections served by the old instance (a process crash is tested with real processes).
    p.broker.stop().await;
    until_comfyui_is_idle(&p).await;
    // The result waits in the spool while the broker stays away for three lease lifetimes.
    tokio::time::sleep(Duration::from_secs_f64(3.0 * LEASE_TTL)).await;
    p.broker = p.start_broker(Some(addr)).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 1, "delivered by the same worker, not re-run: {job}");
}

#[tokio::test]
async fn a_comfyui_retried_longer_than_the_lease_sends_the_job_back_instead_of_losing_the_lease() {
    // COMFYUI_RETRY_BUDGET is 3× LEASE_TTL; ComfyUI is down for longer than that, then returns.
    let mut p = Pipeline::start(Setup {
        lease_ttl: LEASE_TTL,
        max_attempts: 2,
        comfyui_retry_budget: 3.0 * LEASE_TTL,
        ..Setup::default()
    })
    .await;
    let sim_addr = p.sim.addr;
    p.sim.stop().await;
    let id = p.submit("comfyui away", None, Some(json!({"frames": 9}))).await;
    // The first attempt runs out of retry budget while holding its lease: it is reported as a
    // retryable failure (job back in the queue), the server cools down, and attempt 2 finishes
    // once ComfyUI is back. Had the lease lapsed, both attempts would end "worker lost".
    tokio::time::sleep(Duration::from_secs_f64(6.0 * LEASE_TTL)).await;
    p.sim = p.start_sim(Some(sim_addr)).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
}

#[tokio::test]
async fn a_worker_shut_down_mid_delivery_hands_the_job_back_at_once() {
    // LEASE_TTL 30 s: a job handed back must not wait for the lease to lapse.
    let (mut p, _uplink, mut w, id) = mid_delivery("stopping", "interrupted delivery").await;
    let stopped = tokio::time::Instant::now();
    w.stop().await;
    assert!(stopped.elapsed() < Duration::from_secs(20), "the worker stopped within a service stop timeout");
    let queued = p.wait_for(&id, 20.0, |j| j["status"] == "queued").await;
    assert_eq!(queued["attempts"], 0, "a hand-back at shutdown costs no attempt: {queued}");
    // Another worker takes it and finishes it.
    let other = p.start_worker("next").await;
    p.workers.push(other);
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
}

#[tokio::test]
async fn a_worker_killed_mid_delivery_delivers_the_spooled_result_after_its_restart() {
    // LEASE_TTL 30 s: the killed attempt's lease still stands when the worker is back.
    let (mut p, uplink, mut w, id) = mid_delivery("restarting", "killed while delivering").await;
    w.kill().await;
    drop(uplink); // the killed process's connections die with it
    assert_eq!(p.job(&id).await["status"], "running", "the kill landed before the broker had the result");
    // The same worker starts again (same WORKER_ID and spool, as a service restart gives).
    let w = p.start_worker_with("restarting", None, format!("http://{}", p.broker.addr)).await;
    p.workers.push(w);
    let job = p.wait_for(&id, 20.0, |j| j["status"] == "done").await;
    assert_eq!(job["attempts"], 1, "delivered from the spool, the prompt not run again: {job}");
    let (_, bytes) = p.result(&id).await;
    assert!(!bytes.is_empty());
}
