//! `tdcomfy up --simulate` with `STORAGE_URL=s3://…` on moto's S3 server (loopback): a frame in,
//! a video out, and both in the bucket, not in `DATA_DIR`. Skipped, saying so, without
//! `moto_server` (`pip install "moto[server]"`; `.ci/run` installs it).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{Proc, free_port, png};

#[tokio::test]
async fn up_simulate_on_s3_makes_a_video_from_the_bucket() {
    let bin = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
    if !Command::new(&bin).arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: {bin} not found; `pip install \"moto[server]\"` (.ci/run does)");
        return;
    }
    let s3_port = free_port();
    // Killed when dropped, so a failing assertion does not leave the server running.
    let _moto = KillOnDrop(
        Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &s3_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    let http = reqwest::Client::new();
    let mut made = false;
    for _ in 0..200 {
        if http.put(format!("{endpoint}/e2e")).send().await.is_ok_and(|r| r.status().is_success()) {
            made = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(made, "moto answered on {endpoint}");

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = [
        ("COMFYUI_PORT", free_port().to_string()),
        ("SIM_JOB_TIME", "0.2".to_owned()),
        ("STORAGE_URL", "s3://e2e/td".to_owned()),
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
    ];
    let mut up = Proc::start(&["up", "--simulate"], &dir.path().join("data"), port, &env);
    up.ready().await;
    let frame = dir.path().join("frame.png");
    std::fs::write(&frame, png(64, 40, 5)).unwrap();
    let out = dir.path().join("clip.mp4");
    let done = Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
        .args(["submit", frame.to_str().unwrap(), "--prompt", "on s3", "--params", r#"{"frames": 9}"#, "--out"])
        .arg(&out)
        .env("TDCOMFY_URL", up.base())
        .env_remove("API_TOKEN")
        .output()
        .unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let info = tdcomfy_sim::video_info(&out).unwrap();
    assert_eq!((info.width, info.height, info.frames), (512, 320, 9));

    let listing =
        http.get(format!("{endpoint}/e2e?list-type=2&prefix=td/")).send().await.unwrap().text().await.unwrap();
    assert_eq!(listing.matches("<Key>td/inputs/").count(), 1, "{listing}");
    assert_eq!(listing.matches("<Key>td/results/").count(), 1, "{listing}");
    let local = std::fs::read_dir(dir.path().join("data/files/results")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(local, 0, "nothing stored under DATA_DIR");
    up.kill();
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
