//! Failure injection: `[sim:…]` markers in prompt text and the `FaultConfig` switches.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;
use crate::video::ltxv_template;

/// A small LTXV graph (64×64, 9 frames) with `marker` in the positive prompt.
fn ltxv_with(marker: &str) -> Value {
    let mut prompt = ltxv_template();
    prompt["6"]["inputs"]["text"] = json!(format!("a slow pan over hills {marker}"));
    prompt["77"]["inputs"]["width"] = json!(64);
    prompt["77"]["inputs"]["height"] = json!(64);
    prompt["77"]["inputs"]["length"] = json!(9);
    prompt
}

fn invert_graph() -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "td/invert"}}
    })
}

async fn prepare(sim: &Sim) {
    let (status, _) = sim.upload("frame_000001.png", png(96, 64, 4), &[("subfolder", "td")]).await;
    assert_eq!(status, 200);
    assert_eq!(sim.upload("frame.png", png(16, 16, 5), &[]).await.0, 200);
}

#[tokio::test]
async fn error_marker_fails_the_sampler_with_a_realistic_payload() {
    let sim = Sim::start(|c| c.progress_steps = 6).await;
    prepare(&sim).await;
    let mut ws = sim.ws("fault-error").await;
    let id = sim.queue_prompt(&ltxv_with("[sim:error]"), "fault-error").await;
    let frames = ws.until_done(&id).await;
    let types: Vec<&str> = frames.iter().filter_map(Frame::json).filter_map(|v| v["type"].as_str()).collect();
    assert_eq!(&types[types.len() - 3..], ["execution_error", "status", "executing"]);
    assert!(!types.contains(&"execution_success"));
    assert!(types.contains(&"progress"), "the sampler ran partway before failing");
    let error = frames.iter().filter_map(Frame::json).find(|v| v["type"] == "execution_error").expect("error");
    let data = &error["data"];
    assert_eq!(data["node_id"], "72");
    assert_eq!(data["node_type"], "SamplerCustom");
    assert_eq!(data["prompt_id"], id.as_str());
    assert_eq!(data["exception_type"], "RuntimeError");
    assert!(data["exception_message"].as_str().is_some_and(|m| m.contains("[sim:error]") && m.ends_with('\n')));
    assert!(data["traceback"].as_array().is_some_and(|t| t.len() >= 5));
    assert!(data["current_inputs"]["noise_seed"] == json!([42]));
    assert!(data["executed"].as_array().is_some_and(|e| e.iter().any(|n| n == "77")));
    let entry = sim.wait_history(&id).await;
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(entry["status"]["completed"], false);
    assert_eq!(entry["status"]["messages"][2][0], "execution_error");
    assert_eq!(entry["outputs"], json!({}));
    sim.stop().await;
}

#[tokio::test]
async fn config_execution_error_hits_graphs_without_a_sampler_at_their_output() {
    let sim = Sim::start(|c| c.faults.execution_error = true).await;
    prepare(&sim).await;
    let id = sim.queue_prompt(&invert_graph(), "cfg-error").await;
    let entry = sim.wait_history(&id).await;
    let last = &entry["status"]["messages"][2];
    assert_eq!(last[0], "execution_error");
    assert_eq!(last[1]["node_id"], "3");
    assert_eq!(last[1]["executed"], json!(["1", "2"]));
    sim.stop().await;
}

#[tokio::test]
async fn silent_marker_sends_nothing_after_execution_start_but_history_completes() {
    let sim = Sim::start(|_| {}).await;
    prepare(&sim).await;
    let mut ws = sim.ws("fault-silent").await;
    let silent = sim.queue_prompt(&ltxv_with("[sim:silent]"), "fault-silent").await;
    let entry = sim.wait_history(&silent).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["outputs"]["81"]["animated"], json!([true]));
    // A normal prompt afterwards: its events come after anything the silent one could have sent.
    let normal = sim.queue_prompt(&invert_graph(), "fault-silent").await;
    ws.until_done(&normal).await;
    let about_silent: Vec<&str> = ws
        .frames
        .iter()
        .filter_map(Frame::json)
        .filter(|v| v["data"]["prompt_id"] == silent.as_str())
        .filter_map(|v| v["type"].as_str())
        .collect();
    assert_eq!(about_silent, ["execution_start"]);
    assert!(ws.frames.iter().all(|f| f.json().is_some()), "no preview frames either");
    sim.stop().await;
}

#[tokio::test]
async fn silent_config_applies_to_every_prompt() {
    let sim = Sim::start(|c| c.faults.silent_ws = true).await;
    prepare(&sim).await;
    let mut ws = sim.ws("cfg-silent").await;
    let id = sim.queue_prompt(&invert_graph(), "cfg-silent").await;
    sim.wait_history(&id).await;
    // Status broadcasts still flow: the queue is empty again once the prompt is done.
    ws.until(|v| v["type"] == "status" && v["data"]["status"]["exec_info"]["queue_remaining"] == 0).await;
    let types: Vec<&str> = ws.frames.iter().filter_map(Frame::json).filter_map(|v| v["type"].as_str()).collect();
    assert!(types.iter().all(|t| *t == "status" || *t == "execution_start"), "{types:?}");
    sim.stop().await;
}

#[tokio::test]
async fn drop_marker_closes_sockets_mid_run_and_the_prompt_still_completes() {
    let sim = Sim::start(|c| {
        c.job_time = Duration::from_secs(2);
        c.progress_steps = 8;
    })
    .await;
    prepare(&sim).await;
    let mut ws = sim.ws("fault-drop").await;
    let mut bystander = sim.ws("bystander").await;
    let id = sim.queue_prompt(&ltxv_with("[sim:drop]"), "fault-drop").await;
    // Read until the server closes the connection.
    while ws.next().await.is_some() {}
    let seen: Vec<&str> = ws.frames.iter().filter_map(Frame::json).filter_map(|v| v["type"].as_str()).collect();
    assert!(seen.contains(&"progress"), "dropped mid-run, after sampling started: {seen:?}");
    assert!(!seen.contains(&"execution_success"));
    while bystander.next().await.is_some() {}

    // Reconnecting with the same clientId works; the result is available by polling.
    let mut again = sim.ws_raw("/ws?clientId=fault-drop").await;
    let greeting = again.next_json().await;
    assert_eq!(greeting["data"]["sid"], "fault-drop");
    let entry = sim.wait_history(&id).await;
    assert_eq!(entry["status"]["status_str"], "success");
    let file = entry["outputs"]["81"]["images"][0]["filename"].as_str().expect("file");
    let info = tdcomfy_sim::video_info(sim.data_dir().join("output/td").join(file)).expect("mp4");
    assert_eq!((info.width, info.height, info.frames), (64, 64, 9));
    sim.stop().await;
}

#[tokio::test]
async fn reconnect_during_a_run_announces_the_running_node() {
    let sim = Sim::start(|c| {
        c.job_time = Duration::from_secs(600);
        c.progress_steps = 2;
    })
    .await;
    prepare(&sim).await;
    let mut ws = sim.ws("reconnect").await;
    let id = sim.queue_prompt(&ltxv_with(""), "reconnect").await;
    ws.until(|v| v["type"] == "executing" && v["data"]["node"] == "72").await;
    let mut second = sim.ws_raw("/ws?clientId=reconnect").await;
    let greeting = second.next_json().await;
    assert_eq!(greeting["data"]["status"]["exec_info"]["queue_remaining"], 1);
    // As captured in http_99: `executing` with only the node, no prompt_id.
    assert_eq!(second.next_json().await, json!({"type": "executing", "data": {"node": "72"}}));
    let (status, _) = sim.post("/interrupt", &json!({"prompt_id": id})).await;
    assert_eq!(status, 200);
    let frames = second.until_done(&id).await;
    assert!(frames.iter().filter_map(Frame::json).any(|v| v["type"] == "execution_interrupted"));
    sim.stop().await;
}

#[tokio::test]
async fn restart_marker_forgets_queue_and_history() {
    let sim = Sim::start(|c| {
        c.job_time = Duration::from_secs(1);
        c.progress_steps = 4;
    })
    .await;
    prepare(&sim).await;
    let mut ws = sim.ws("fault-restart").await;
    let first = sim.queue_prompt(&invert_graph(), "fault-restart").await;
    sim.wait_history(&first).await;
    let lost = sim.queue_prompt(&ltxv_with("[sim:restart]"), "fault-restart").await;
    let pending = sim.queue_prompt(&invert_graph(), "fault-restart").await;
    while ws.next().await.is_some() {}

    let queue = sim.get_json("/queue").await;
    assert_eq!(queue, json!({"queue_running": [], "queue_pending": []}));
    assert_eq!(sim.get_json("/history").await, json!({}), "history is gone, including older prompts");
    // A prompt after the "restart" runs normally and numbering starts over.
    let (status, body) = sim.post("/prompt", &json!({"prompt": invert_graph(), "client_id": "fault-restart"})).await;
    assert_eq!(status, 200);
    assert_eq!(body["number"], 0);
    let after = body["prompt_id"].as_str().expect("id").to_string();
    sim.wait_history(&after).await;
    for gone in [&lost, &pending, &first] {
        assert_eq!(sim.get_json(&format!("/history/{gone}")).await, json!({}));
    }
    sim.stop().await;
}

#[tokio::test]
async fn upload_delay_slows_uploads() {
    let sim = Sim::start(|c| c.faults.upload_delay = Duration::from_millis(700)).await;
    let started = Instant::now();
    let (status, body) = sim.upload("slow.png", png(8, 8, 1), &[]).await;
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert_eq!((status, body["name"].clone()), (200, json!("slow.png")));
    sim.stop().await;
}
