//! `tdcomfy worker --check`: the preflight report of every ComfyUI server, and its verdict as the
//! exit code, without a broker.

use tokio_util::sync::CancellationToken;

const CKPT: &str = "ltx-video-2b-v0.9.5.safetensors";
const CLIP: &str = "t5xxl_fp16.safetensors";

/// A simulator on 127.0.0.1:0 listing `models`, until `stop` is cancelled.
async fn sim(dir: &std::path::Path, models: &[&str], stop: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = tdcomfy_sim::SimConfig::new(dir.join(format!("sim-{}", addr.port())));
    config.models = models.iter().map(|m| m.to_string()).collect();
    let stop = stop.clone();
    tokio::spawn(async move { tdcomfy_sim::run(listener, config, async move { stop.cancelled().await }).await });
    format!("http://{addr}")
}

async fn check(urls: &str) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
        .args(["worker", "--check"])
        .env_clear()
        .env("COMFYUI_URLS", urls)
        .env("WORKFLOWS_DIR", crate::process::repo_workflows())
        // No broker runs: the check must not need one.
        .env("BROKER_URL", format!("http://127.0.0.1:{}", crate::process::free_port()))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code(), stdout)
}

#[tokio::test]
async fn check_prints_each_servers_problems_and_fails_only_when_a_workflow_runs_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let full = sim(dir.path(), &[CKPT, CLIP], &stop).await;
    let bare = sim(dir.path(), &[CLIP], &stop).await;
    let missing =
        format!("node 44 (CheckpointLoaderSimple): ckpt_name '{CKPT}' is not installed on {bare}; installed: [{CLIP}]");

    let (code, out) = check(&full).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("ComfyUI {full}:")) && out.contains("  ltxv_image_to_video: ready"), "{out}");
    assert!(out.contains("ltxv_image_to_video: runs on 1 of 1 server(s)"), "{out}");

    let (code, out) = check(&bare).await;
    assert_eq!(code, Some(1), "a workflow that runs nowhere fails the check: {out}");
    assert!(out.contains("  ltxv_image_to_video: cannot run") && out.contains(&format!("    - {missing}")), "{out}");
    assert!(out.contains("  image_invert: ready") && out.contains("ltxv_image_to_video: runs on no server"), "{out}");

    // Missing on one server but present on another: the farm can run it.
    let (code, out) = check(&format!("{bare},{full}")).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&missing) && out.contains("ltxv_image_to_video: runs on 1 of 2 server(s)"), "{out}");

    // A server that does not answer is reported, and cannot make a workflow runnable.
    let gone = format!("http://127.0.0.1:{}", crate::process::free_port());
    let (code, out) = check(&gone).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("ComfyUI {gone}: cannot check:")), "{out}");
}
