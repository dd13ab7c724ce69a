//! `BROKER_URL` with several brokers: a worker whose broker goes away mid-job carries on through
//! the next one, with the same lease, so the job runs once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Pipeline, Proxy, Setup};
use crate::pg::TestDb;
use crate::proxy::SlowUplink;

/// A pipeline whose own worker is stopped (each test starts the one it needs) and which keeps
/// every prompt's output, so completions can be counted.
async fn pipeline(sim_job_time: f64) -> Pipeline {
    let mut p = Pipeline::start(Setup { sim_job_time, keep_outputs: true, ..Setup::default() }).await;
    for w in &mut p.workers {
        w.stop().await;
    }
    p.workers.clear();
    p
}

#[tokio::test]
async fn a_worker_whose_broker_address_dies_mid_prompt_finishes_the_job_through_the_next_url() {
    let mut p = pipeline(3.0).await;
    // Two ways to the same broker; the first is cut (every connection closed, new ones dropped)
    // while the prompt runs: to the worker, that broker died.
    let (first, second) = (Proxy::start(p.broker.addr).await, Proxy::start(p.broker.addr).await);
    let w = p.start_worker_with("two-urls", None, format!("http://{},http://{}", first.addr, second.addr)).await;
    p.workers.push(w);
    let id = p.submit("outlives its broker address", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["status"] == "running" && j["progress"]["node"].is_string()).await;
    first.cut();
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 1, "the same lease went on through the second URL: {job}");
    assert_eq!(p.prompts_completed(&id), 1, "the prompt ran once in ComfyUI");
    // And the worker stays on the second: the next job runs while the first is still cut.
    let next = p.submit("after the move", None, Some(json!({"frames": 9}))).await;
    let job = p.wait_terminal(&next).await;
    assert_eq!(job["status"], "done", "{job}");
}

#[tokio::test]
async fn a_result_upload_cut_off_by_a_dying_broker_is_retried_on_the_next_url() {
    let mut p = pipeline(0.3).await;
    // The first way crawls (500 B/s), so the delivery is surely in flight when it dies.
    let uplink = SlowUplink::start(p.broker.addr, 0).await;
    let w = p.start_worker_with("uploading", None, format!("http://{},{}", uplink.addr, p.url(""))).await;
    p.workers.push(w);
    let id = p.submit("delivery cut off", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["status"] == "running").await;
    uplink.set_rate(500);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while p.sim_queue().await != (0, 0) || p.prompts_completed(&id) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the prompt never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = uplink.forwarded.load(Ordering::Relaxed);
    while uplink.forwarded.load(Ordering::Relaxed) < before + 2_000 {
        assert!(tokio::time::Instant::now() < deadline, "the delivery never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.job(&id).await["status"], "running", "cut before the broker had the result");
    drop(uplink);
    let job = p.wait_for(&id, 30.0, |j| j["status"] == "done").await;
    assert_eq!(job["attempts"], 1, "delivered, not run again: {job}");
    assert_eq!(p.prompts_completed(&id), 1);
    let (_, bytes) = p.result(&id).await;
    let spooled = crate::harness::files_under(&p.sim.dir.clone().unwrap().join("output"));
    assert_eq!(spooled.len(), 1, "{spooled:?}");
    let original = std::fs::read(p.sim.dir.as_ref().unwrap().join("output").join(&spooled[0])).unwrap();
    assert_eq!(bytes, original, "the retried upload delivered ComfyUI's file whole");
}

#[tokio::test]
async fn two_brokers_on_one_database_a_worker_finishes_through_the_second_when_the_first_is_killed() {
    let Some(db) = TestDb::create("failover").await else { return };
    let mut p = pipeline(3.0).await;
    p.broker.stop().await;
    let shared = p.dir.path().join("shared-files");
    std::fs::create_dir_all(&shared).unwrap();
    let storage = tdcomfy_broker::StorageArgs {
        database_url: Some(db.url.clone()),
        storage_url: Some(format!("file://{}", shared.display())),
        ..Default::default()
    };
    let mut one = p.start_broker_on(None, "broker-1", storage.clone()).await;
    let two = p.start_broker_on(None, "broker-2", storage).await;
    // The worker reaches broker 1 through a pass-through cut when broker 1 dies, so its
    // connections die with it (an aborted task would leave them served).
    let front = Proxy::start(one.addr).await;
    let (one_addr, two_addr) = (one.addr, two.addr);
    let w = p.start_worker_with("failing-over", None, format!("http://{},http://{}", front.addr, two_addr)).await;
    p.workers.push(w);
    // Submitted on broker 1, which the worker leases from.
    p.broker.addr = one_addr;
    let id = p.submit("outlives its broker", None, Some(json!({"frames": 9}))).await;
    p.wait_for(&id, 30.0, |j| j["status"] == "running" && j["progress"]["node"].is_string()).await;
    one.kill().await;
    front.cut();
    // Broker 2 knows the job (one database) and hears the rest of it from the worker.
    p.broker = two;
    let job = p.wait_terminal(&id).await;
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["attempts"], 1, "one lease, valid on both brokers, carried the job: {job}");
    assert_eq!(p.prompts_completed(&id), 1, "the prompt ran once in ComfyUI");
    let (content_type, bytes) = p.result(&id).await;
    assert_eq!(content_type, "video/mp4");
    assert!(!bytes.is_empty());
}
