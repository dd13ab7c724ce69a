//! `tdcomfy up --simulate` and `tdcomfy submit`, as a newcomer runs them.

use std::process::Command;

use crate::process::{Proc, free_port, png};

#[tokio::test]
async fn up_simulate_and_submit_produce_a_video_and_report_failures() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sim_port = free_port();
    let env = [("COMFYUI_PORT", sim_port.to_string()), ("SIM_JOB_TIME", "0.2".to_owned())];
    let mut up = Proc::start(&["up", "--simulate"], &dir.path().join("data"), port, &env);
    up.ready().await;
    let frame = dir.path().join("frame.png");
    std::fs::write(&frame, png(64, 40, 7)).unwrap();
    let out = dir.path().join("clip.mp4");

    let submit = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
            .arg("submit")
            .arg(&frame)
            .args(args)
            .env("TDCOMFY_URL", up.base())
            .env_remove("API_TOKEN")
            .output()
            .unwrap()
    };
    let ok = submit(&["--prompt", "a test", "--params", r#"{"frames": 9}"#, "--out", out.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[4..8], b"ftyp", "an MP4 file");
    let info = tdcomfy_sim::video_info(&out).unwrap();
    assert_eq!((info.width, info.height, info.frames), (512, 320, 9));

    let failed = submit(&["--prompt", "[sim:error]", "--params", r#"{"frames": 9}"#, "--out", out.to_str().unwrap()]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("failed") && stderr.contains("SamplerCustom"), "{stderr}");

    let refused = submit(&["--workflow", "no_such_workflow"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown_workflow"));
}

#[tokio::test]
async fn a_worker_id_the_broker_would_refuse_stops_the_worker_at_start_with_a_clear_message() {
    let mut worker = Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
        .arg("worker")
        .env_clear()
        .env("WORKER_ID", "render node 1")
        .env("BROKER_URL", format!("http://127.0.0.1:{}", free_port()))
        .env("WORKFLOWS_DIR", crate::process::repo_workflows())
        .env("WORKER_SPOOL_DIR", std::env::temp_dir().join("tdcomfy-test-unused-spool"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = worker.kill();
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = status.expect("the worker must stop, not retry an unreachable broker forever");
    assert!(!status.success());
    assert!(stderr.contains("WORKER_ID") && stderr.contains("128"), "{stderr}");
}

#[tokio::test]
async fn a_broker_url_list_with_a_malformed_entry_stops_the_worker_at_start_naming_it() {
    let good = format!("http://127.0.0.1:{}", free_port());
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
            .arg("worker")
            .env_clear()
            .env("BROKER_URL", format!("{good}, broker2:8080"))
            .env("WORKFLOWS_DIR", crate::process::repo_workflows())
            .env("WORKER_SPOOL_DIR", std::env::temp_dir().join("tdcomfy-test-unused-spool"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the worker must stop, not retry a URL it cannot use forever")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("BROKER_URL") && stderr.contains("broker2:8080"), "{stderr}");
}
