//! `tdcomfy status` against a real `tdcomfy up --simulate`: the queue with positions, running
//! jobs with progress bars, workers and servers; `--watch` following the event stream.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{Proc, free_port, png};

async fn submit(http: &reqwest::Client, base: &str, prompt: &str, token: Option<&str>) -> String {
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(png(64, 40, 3)).file_name("f.png").mime_str("image/png").unwrap(),
        )
        .text("prompt", prompt.to_owned());
    let mut rb = http.post(format!("{base}/jobs")).multipart(form);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let resp = rb.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json::<serde_json::Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned()
}

fn status(base: &str, args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tdcomfy"));
    cmd.arg("status").args(args).env("TDCOMFY_URL", base).env_remove("API_TOKEN");
    if let Some(t) = token {
        cmd.env("API_TOKEN", t);
    }
    cmd.output().unwrap()
}

async fn wait_for(http: &reqwest::Client, url: &str, token: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: serde_json::Value = http.get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        if pred(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting on {url}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn status_shows_the_queue_running_jobs_workers_and_servers_and_watch_follows_them() {
    let dir = tempfile::tempdir().unwrap();
    let (port, sim_port) = (free_port(), free_port());
    let token = "status-secret";
    let env = [
        ("COMFYUI_PORT", sim_port.to_string()),
        ("SIM_JOB_TIME", "3".to_owned()),
        ("SIM_DATA_DIR", dir.path().join("sim").display().to_string()),
        ("API_TOKEN", token.to_owned()),
    ];
    let mut up = Proc::start(&["up", "--simulate"], &dir.path().join("data"), port, &env);
    up.ready().await;
    let base = up.base();
    let http = reqwest::Client::new();
    wait_for(&http, &format!("{base}/workflows"), token, |v| v["workflows"][0]["ready"] == true).await;

    // Refused without the token, with the setting named.
    let refused = status(&base, &[], None);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("API_TOKEN"), "{refused:?}");

    // With the worker's default PREFETCH=1, the second job is leased ahead of the first (running,
    // waiting in ComfyUI's queue); the third and fourth wait in the broker's queue.
    let first = submit(&http, &base, "first", Some(token)).await;
    let second = submit(&http, &base, "second", Some(token)).await;
    let third = submit(&http, &base, "third", Some(token)).await;
    let fourth = submit(&http, &base, "fourth", Some(token)).await;
    wait_for(&http, &format!("{base}/jobs/{first}"), token, |v| v["progress"]["value"].as_f64() > Some(0.0)).await;
    wait_for(&http, &format!("{base}/jobs/{second}"), token, |v| v["status"] == "running").await;

    let out = status(&base, &[], Some(token));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let line_of = |id: &str| text.lines().find(|l| l.contains(&id[..8])).unwrap_or_else(|| panic!("{id} in\n{text}"));
    assert!(text.contains("RUNNING (2)") && text.contains("QUEUE (2)"), "{text}");
    assert!(line_of(&first).contains("[#") && line_of(&first).contains('%'), "a progress bar: {text}");
    assert!(line_of(&third).trim_start().starts_with("#1"), "{text}");
    assert!(line_of(&fourth).trim_start().starts_with("#2"), "{text}");
    assert!(text.contains("WORKERS (1)"), "{text}");
    // The worker's report (merged Health fields): its ComfyUI server and the prefetched job.
    let worker = text.lines().skip_while(|l| !l.starts_with("WORKERS")).nth(1).unwrap_or_default();
    assert!(worker.contains(&format!("http://127.0.0.1:{sim_port}")) && worker.contains("prefetched 1"), "{text}");
    assert!(text.contains(&format!("http://127.0.0.1:{sim_port}  up  can run: ")), "{text}");

    // --watch: each view after a form feed; it sees the first job finish and the queue move up.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_tdcomfy"))
        .args(["status", "--watch"])
        .env("TDCOMFY_URL", &base)
        .env("API_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut acc = String::new();
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            acc.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(i) = acc[1..].find('\x0c').map(|i| i + 1) {
                let _ = tx.send(acc[..i].to_owned());
                acc.drain(..i);
            }
        }
    });
    // It sees the first job finish, the second run (its bar moving) and the queue move up: the
    // third is prefetched when the second starts, so the fourth becomes #1.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut percents = Vec::new();
    let mut saw_done_and_moved = false;
    let moving = |p: &[u32]| p.windows(2).any(|w| w[1] > w[0]);
    while Instant::now() < deadline && !(saw_done_and_moved && moving(&percents)) {
        let Ok(view) = rx.recv_timeout(Duration::from_secs(1)) else { continue };
        let running = view.lines().find(|l| l.contains(&second[..8]) && l.contains("[#"));
        if let Some(p) = running.and_then(|l| l.split('%').next()?.rsplit(' ').next()?.parse::<u32>().ok()) {
            percents.push(p);
        }
        let done = view.lines().any(|l| l.trim_start().starts_with("done") && l.contains(&first[..8]));
        let moved = view.lines().any(|l| l.contains(&fourth[..8]) && l.trim_start().starts_with("#1"));
        saw_done_and_moved |= done && moved;
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(saw_done_and_moved, "the watch showed the first job done and the fourth moved to #1");
    // Views kept coming while the second job ran: its bar moved.
    assert!(moving(&percents), "the second job's bar moved in the watch: {percents:?}");
    drop(up);
}
