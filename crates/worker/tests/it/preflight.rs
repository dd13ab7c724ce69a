//! Preflight: a workflow a ComfyUI server cannot run (a model file it does not list) is known
//! before the first job — shown by `GET /workflows`, never leased to that server, and its jobs
//! wait with a reason instead of failing after a GPU attempt.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Pipeline, Setup, files_under};

const LTXV: &str = "ltxv_image_to_video";
const CKPT: &str = "ltx-video-2b-v0.9.5.safetensors";
const CLIP: &str = "t5xxl_fp16.safetensors";

/// Polls `GET /workflows` until `pred` holds for the entry of `name`.
async fn workflow_until(p: &Pipeline, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let w = p.workflow(name).await;
        if pred(&w) {
            return w;
        }
        assert!(tokio::time::Instant::now() < deadline, "GET /workflows never showed the expected state: {w}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET /jobs/{id}` until it has a `waiting_reason`.
async fn waiting(p: &Pipeline, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job = p.job(id).await;
        if job["waiting_reason"].is_string() {
            return job;
        }
        assert!(tokio::time::Instant::now() < deadline, "no waiting_reason: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_missing_model_file_is_reported_and_its_jobs_wait_while_others_run() {
    let p = Pipeline::start(Setup { models: Some(vec![CLIP.into()]), ..Setup::default() }).await;
    let server = format!("http://{}", p.sim.addr);
    let ltxv = workflow_until(&p, LTXV, |w| w["ready"] == false).await;
    let on_sim = &ltxv["readiness"][0];
    assert_eq!((on_sim["worker"].as_str(), on_sim["server"].as_str()), (Some("worker-1"), Some(server.as_str())));
    assert_eq!((on_sim["reachable"].as_bool(), on_sim["ready"].as_bool()), (Some(true), Some(false)));
    let problem = format!(
        "node 44 (CheckpointLoaderSimple): ckpt_name '{CKPT}' is not installed on {server}; installed: [{CLIP}]"
    );
    assert_eq!(on_sim["problems"], serde_json::json!([problem]), "{ltxv}");
    // The existing fields are untouched.
    assert!(ltxv["parameters"].is_array() && ltxv["is_default"] == true, "{ltxv}");
    assert_eq!(p.workflow("image_invert").await["ready"], true);

    let blocked = p.submit("needs the checkpoint", None, None).await;
    let job = waiting(&p, &blocked).await;
    assert_eq!(job["waiting_reason"], format!("no server can run {LTXV}: {problem}"));
    assert_eq!(job["status"], "queued");

    // A job of a runnable workflow submitted after it passes it.
    let runnable = p.submit("", Some("image_invert"), None).await;
    assert_eq!(p.wait_terminal(&runnable).await["status"], "done");
    let job = p.job(&blocked).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("queued"), Some(0)), "{job}");
    assert!(job["waiting_reason"].is_string());
    // Nothing of it reached ComfyUI.
    assert_eq!(p.sim_queue().await, (0, 0));
}

#[tokio::test]
async fn of_two_servers_the_job_runs_on_the_one_with_the_model() {
    let mut p = Pipeline::start(Setup { models: Some(vec![]), ..Setup::default() }).await;
    // Only the second server has the files; one worker serves both, one lease loop each.
    p.workers.pop().unwrap().stop().await;
    let with_models = p.start_sim_with_models(None, vec![CKPT.into(), CLIP.into()]).await;
    let urls = format!("http://{},http://{}", p.sim.addr, with_models.addr);
    p.workers.push(p.start_worker_on("multi", Some(urls)).await);
    let ltxv = workflow_until(&p, LTXV, |w| {
        w["ready"] == true && w["readiness"].as_array().is_some_and(|r| r.iter().any(|s| s["worker"] == "multi/0"))
    })
    .await;
    let by_worker =
        |name: &str| ltxv["readiness"].as_array().unwrap().iter().find(|s| s["worker"] == name).cloned().unwrap();
    assert_eq!(by_worker("multi/0")["ready"], false, "{ltxv}");
    assert_eq!(by_worker("multi/1")["ready"], true, "{ltxv}");

    for n in 0..3 {
        let id = p.submit(&format!("clip {n}"), None, Some(serde_json::json!({"frames": 9}))).await;
        let job = p.wait_terminal(&id).await;
        assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("done"), Some(1)), "{job}");
        assert_eq!(job["waiting_reason"], Value::Null);
    }
    // Every frame went to the server with the model; none to the other.
    let inputs = |dir: &std::path::Path| files_under(&dir.join("input"));
    assert!(!inputs(with_models.dir.as_ref().unwrap()).is_empty());
    assert_eq!(inputs(p.sim.dir.as_ref().unwrap()), Vec::<std::path::PathBuf>::new());
}

#[tokio::test]
async fn a_server_restarted_with_the_model_runs_the_waiting_job() {
    let mut p = Pipeline::start(Setup { models: Some(vec![]), ..Setup::default() }).await;
    workflow_until(&p, LTXV, |w| w["ready"] == false).await;
    let id = p.submit("waits for the model", None, Some(serde_json::json!({"frames": 9}))).await;
    assert!(waiting(&p, &id).await["waiting_reason"].as_str().unwrap().contains(CKPT));

    let addr = p.sim.addr;
    p.sim.stop().await;
    // The worker notices the server went away (and keeps its last findings meanwhile)…
    let down = workflow_until(&p, LTXV, |w| w["readiness"][0]["reachable"] == false).await;
    assert_eq!(down["ready"], false);
    assert_eq!(p.job(&id).await["status"], "queued");
    // …and checks again once it is back, now with the files.
    p.sim = p.start_sim_with_models(Some(addr), vec![CKPT.into(), CLIP.into()]).await;
    let job = p.wait_terminal(&id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("done"), Some(1)), "{job}");
    let ltxv = p.workflow(LTXV).await;
    assert_eq!(
        (ltxv["ready"].as_bool(), ltxv["readiness"][0]["problems"].as_array().map(Vec::len)),
        (Some(true), Some(0))
    );
}

#[tokio::test]
async fn a_jobs_own_value_the_server_lacks_fails_before_its_prompt_is_posted() {
    // `format` is bound to SaveVideo's V3 combo, which ComfyUI 0.3.64 does not check at submit.
    let p = Pipeline::start(Setup::default()).await;
    let workflow = "ltxv_format_param";
    workflow_until(&p, workflow, |w| w["ready"] == true).await;
    let ok = p.submit("mp4", Some(workflow), Some(serde_json::json!({"frames": 9, "format": "mp4"}))).await;
    assert_eq!(p.wait_terminal(&ok).await["status"], "done");

    let bad = p.submit("webm", Some(workflow), Some(serde_json::json!({"frames": 9, "format": "webm"}))).await;
    let job = p.wait_terminal(&bad).await;
    let server = format!("http://{}", p.sim.addr);
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("error"), Some(1)), "{job}");
    assert_eq!(
        job["error_message"],
        format!(
            "workflow {workflow} cannot run on {server}: node 81 (SaveVideo): format 'webm' is not among the options of {server}: [auto, mp4]"
        )
    );
    assert_eq!(p.sim_queue().await, (0, 0));
}

#[tokio::test]
async fn a_restarted_broker_hears_the_report_again() {
    let mut p = Pipeline::start(Setup { models: Some(vec![]), ..Setup::default() }).await;
    workflow_until(&p, LTXV, |w| w["ready"] == false).await;
    let addr = p.broker.addr;
    p.broker.stop().await;
    p.broker = p.start_broker(Some(addr)).await;
    // Reports live in the broker's memory: the worker sends its own again.
    let started = tokio::time::Instant::now();
    let ltxv = workflow_until(&p, LTXV, |w| w["ready"] == false).await;
    assert!(ltxv["readiness"][0]["problems"].to_string().contains(CKPT), "{ltxv}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let id = p.submit("after the restart", None, None).await;
    assert!(waiting(&p, &id).await["waiting_reason"].as_str().unwrap().contains(CKPT));
}
