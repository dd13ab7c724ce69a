//! What the logs look like where they usually go: a file, a pipe, journald.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::process::{Proc, free_port, png, repo_workflows};

/// Starts `tdcomfy <args>` with its stderr going to `log` (not a terminal).
fn start_logging_to(args: &[&str], dir: &Path, port: u16, log: &Path, env: &[(&str, String)]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tdcomfy"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", port.to_string())
        .env("DATA_DIR", dir.join("data"))
        .env("WORKFLOWS_DIR", repo_workflows())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc { child: cmd.spawn().expect("tdcomfy starts"), port }
}

#[tokio::test]
async fn a_log_file_gets_no_terminal_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    // Without an API_TOKEN on a public address the broker warns: a line with a coloured level.
    let mut serve = start_logging_to(&["serve"], dir.path(), free_port(), &log, &[("API_HOST", "0.0.0.0".to_owned())]);
    serve.ready().await;
    serve.kill();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("WARN"), "the broker logged its warning: {text}");
    assert!(!text.contains("\x1b["), "escape codes in a log file: {text:?}");
}

/// Runs `tdcomfy up --simulate` (logging to a file) with `env`, and one job through it that the
/// simulator fails; returns the log and `tdcomfy submit`'s stderr.
async fn one_failing_job(env: &[(&str, String)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("up.log");
    let mut env = env.to_vec();
    env.extend([("COMFYUI_PORT", free_port().to_string()), ("SIM_JOB_TIME", "0.2".to_owned())]);
    let mut up = start_logging_to(&["up", "--simulate"], dir.path(), free_port(), &log, &env);
    up.ready().await;
    let frame = dir.path().join("frame.png");
    std::fs::write(&frame, png(64, 40, 3)).unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
        .args(["submit", frame.to_str().unwrap(), "--prompt", "[sim:error]", "--params", r#"{"frames": 9}"#])
        .arg("--out")
        .arg(dir.path().join("clip.mp4"))
        .env("TDCOMFY_URL", up.base())
        .env_remove("API_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr).into_owned();
    assert!(!failed.status.success() && stderr.contains("SamplerCustom"), "the job failed in ComfyUI: {stderr}");
    up.kill();
    (std::fs::read_to_string(&log).unwrap(), stderr)
}

#[tokio::test]
async fn log_format_json_gives_one_object_per_line_and_job_lines_name_job_attempt_and_worker() {
    let env = [("LOG_FORMAT", "json".to_owned()), ("WORKER_ID", "log-test-worker".to_owned())];
    let (text, _) = one_failing_job(&env).await;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string() && l.get("message").is_some()));
    let named = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"].as_str().is_some_and(|m| m.contains(message)))
            .unwrap_or_else(|| panic!("no {message:?} line in {text}"))
    };
    // ComfyUI's verdict (logged by the prompt's supervisor task), the worker's report of the
    // failure, and the broker's record of it.
    let comfy_line = named("prompt failed");
    let worker_line = named("job failed");
    let broker_line = named("job error");
    for line in [comfy_line, worker_line, broker_line] {
        assert!(line["job_id"].is_string(), "{line}");
        assert_eq!((line["attempt"].as_u64(), line["worker"].as_str()), (Some(1), Some("log-test-worker")), "{line}");
    }
    assert_eq!(worker_line["job_id"], broker_line["job_id"]);
    assert_eq!(comfy_line["job_id"], broker_line["job_id"]);
}

#[tokio::test]
async fn submit_shows_progress_as_plain_lines_when_stderr_is_not_a_terminal() {
    let (_, stderr) = one_failing_job(&[]).await;
    assert!(!stderr.contains('\x1b') && !stderr.contains('\r'), "terminal codes in piped output: {stderr:?}");
    assert!(stderr.lines().any(|l| l.contains("running")), "progress is still shown: {stderr}");
}
