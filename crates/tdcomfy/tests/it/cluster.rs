//! Three `tdcomfy serve` processes on one PostgreSQL database and one S3 bucket (moto), a worker
//! given all three, clients spread over them: a client sees its job end on a broker other than
//! the one the worker talks to, and SIGKILLing the worker's broker under load loses nothing and
//! runs nothing twice. Skipped, saying so, without PostgreSQL or moto.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pg::TestDb;
use crate::process::{Moto, Proc, free_port, png};

const LEASE_TTL: f64 = 3.0;
/// The line the worker logs when it moves to the next broker of its BROKER_URL.
const SWITCHED: &str = "switching to the next one of BROKER_URL";

struct Brokers {
    procs: Vec<Proc>,
    ports: Vec<u16>,
    env: Vec<(&'static str, String)>,
    root: std::path::PathBuf,
}

impl Brokers {
    fn start(&mut self, n: usize) -> Proc {
        Proc::start_logged(
            &["serve"],
            &self.root.join(format!("broker-{n}")),
            self.ports[n],
            &self.env,
            Some(&self.root.join(format!("broker-{n}.log"))),
        )
    }

    fn base(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[n])
    }
}

/// Submits one frame to `base`, retrying (same Idempotency-Key) while it is unreachable.
async fn submit(http: &reqwest::Client, bases: &[String], first: usize, seed: u8) -> String {
    let key = format!("cluster-{seed}-{}", tdcomfy_api::JobId::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        assert!(Instant::now() < deadline, "no broker took the job within 60 s");
        // A client whose broker went away tries the next one, as a load balancer would.
        let base = &bases[(first + attempt) % bases.len()];
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(png(64, 40, seed)).file_name("frame.png"))
            .text("prompt", format!("cluster {seed}"))
            .text("params", r#"{"frames": 9}"#);
        let sent = http
            .post(format!("{base}/jobs"))
            .header("Idempotency-Key", &key)
            .multipart(form)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(r) = sent {
            assert!(!r.status().is_client_error(), "refused: {}", r.status());
            if let Ok(v) = r.json::<Value>().await
                && let Some(id) = v["job_id"].as_str()
            {
                return id.to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!()
}

/// Follows job `id` on `bases[first]` (long-polls, moving to the next broker while one is away)
/// until it ends; panics on a 404 (a lost job).
async fn until_ended(http: &reqwest::Client, bases: &[String], first: usize, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut broker = first;
    while Instant::now() < deadline {
        let base = &bases[broker % bases.len()];
        match http.get(format!("{base}/jobs/{id}?wait=5")).timeout(Duration::from_secs(10)).send().await {
            Ok(r) if r.status() == 404 => panic!("job {id} lost: {base} answers 404"),
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap();
                if matches!(v["status"].as_str(), Some("done" | "error" | "cancelled")) {
                    return v;
                }
            }
            _ => {
                broker += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    panic!("job {id} did not end within 90 s");
}

/// Output files the simulator wrote for job `id` (one per completed prompt).
fn prompts_completed(sim_dir: &Path, id: &str) -> usize {
    std::fs::read_dir(sim_dir.join("output/tdcomfy").join(id)).map(|d| d.count()).unwrap_or(0)
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn three_brokers_on_postgres_and_s3_a_broker_sigkill_under_load_loses_nothing_and_runs_nothing_twice() {
    let Some(db) = TestDb::create("cluster").await else { return };
    let Some(moto) = Moto::start("cluster").await else { return };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut env = moto.env();
    env.extend([
        ("DATABASE_URL", db.url.clone()),
        ("STORAGE_URL", "s3://cluster/c".to_owned()),
        ("LEASE_TTL", LEASE_TTL.to_string()),
        ("MAX_ATTEMPTS", "5".to_owned()),
    ]);
    let mut brokers = Brokers { procs: Vec::new(), ports: (0..3).map(|_| free_port()).collect(), env, root };
    for n in 0..3 {
        let mut p = brokers.start(n);
        p.ready().await;
        brokers.procs.push(p);
    }
    let bases: Arc<Vec<String>> = Arc::new((0..3).map(|n| brokers.base(n)).collect());

    let sim_port = free_port();
    let sim_dir = dir.path().join("sim");
    let _sim = Proc::start(
        &["sim"],
        &dir.path().join("sim-data"),
        free_port(),
        &[
            ("COMFYUI_PORT", sim_port.to_string()),
            ("SIM_DATA_DIR", sim_dir.display().to_string()),
            ("SIM_JOB_TIME", "0.6".to_owned()),
        ],
    );
    // The worker starts on broker 2 (index 1) and knows the others.
    let worker_log = dir.path().join("worker.log");
    let list = format!("{},{},{}", bases[1], bases[2], bases[0]);
    let _worker = Proc::start_logged(
        &["worker"],
        &dir.path().join("worker-data"),
        free_port(),
        &[
            ("BROKER_URL", list),
            ("COMFYUI_PORT", sim_port.to_string()),
            ("WORKER_SPOOL_DIR", dir.path().join("spool").display().to_string()),
            ("WORKER_POLL_INTERVAL", "0.2".to_owned()),
            ("COMFYUI_POLL_INTERVAL", "0.25".to_owned()),
            // Every prompt's output stays, so completions can be counted.
            ("COMFYUI_KEEP_OUTPUTS", "true".to_owned()),
        ],
        Some(&worker_log),
    );
    let http = reqwest::Client::new();

    // 1. Submitted on broker 1, followed over SSE on broker 3; the worker leases from broker 2.
    let id = submit(&http, &bases, 0, 1).await;
    let resp = http.get(format!("{}/jobs/{id}/events", bases[2])).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let heard = tokio::time::timeout(Duration::from_secs(60), async {
        use futures_util::StreamExt;
        while let Some(Ok(chunk)) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.lines().any(|l| l.starts_with("data:") && l.contains(r#""status":"done""#)) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(heard, Ok(true), "broker 3's SSE stream told the client the job is done; got:\n{text}");
    assert!(
        !log_of(&worker_log).contains(SWITCHED),
        "the worker stayed on broker 2 all along (so `done` crossed brokers):\n{}",
        log_of(&worker_log)
    );

    // 2. Load over all three; the worker's broker (2) is SIGKILLed mid-run, then back after
    // more than LEASE_TTL.
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..3usize {
        let (http, bases) = (http.clone(), bases.clone());
        clients.spawn(async move {
            let mut ended = Vec::new();
            for j in 0..5u8 {
                let id = submit(&http, &bases, c, 10 + c as u8 * 10 + j).await;
                // Followed on another broker than the one it was submitted to.
                ended.push((id.clone(), until_ended(&http, &bases, c + 1, &id).await));
            }
            ended
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: Value =
            http.get(format!("{}/jobs?status=running&limit=10", bases[0])).send().await.unwrap().json().await.unwrap();
        if running["jobs"].as_array().is_some_and(|j| !j.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no job ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    brokers.procs[1].kill();
    tokio::time::sleep(Duration::from_secs_f64(LEASE_TTL + 1.0)).await;
    let mut back = brokers.start(1);
    back.ready().await;
    brokers.procs[1] = back;

    let mut jobs = vec![(id.clone(), until_ended(&http, &bases, 0, &id).await)];
    while let Some(ended) = clients.join_next().await {
        jobs.extend(ended.expect("a client task"));
    }
    assert_eq!(jobs.len(), 16);
    for (id, job) in &jobs {
        assert_eq!(job["status"], "done", "every job finishes: {job}");
        assert_eq!(job["attempts"], 1, "no job ran twice: {job}");
        assert_eq!(prompts_completed(&sim_dir, id), 1, "job {id}'s prompt completed once in ComfyUI");
        // Each broker knows every job and serves its result (from the bucket).
        for base in bases.iter() {
            let r = http.get(format!("{base}/jobs/{id}/result")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{base} serves {id}'s result");
        }
    }
    let log = log_of(&worker_log);
    assert!(log.contains(SWITCHED), "the kill hit the worker's broker and it moved on:\n{log}");
    eprintln!("cluster test took {:.1} s", started.elapsed().as_secs_f64());
}
