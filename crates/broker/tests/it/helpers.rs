//! `spawn_app()`: the real broker on 127.0.0.1:0 with its own temporary data directory, plus typed
//! helpers for the calls tests make.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tdcomfy_broker::BrokerArgs;
use tdcomfy_broker::clock::{Clock, WallSource};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Settings a test may change before the broker starts.
pub fn test_args(data_dir: PathBuf) -> BrokerArgs {
    BrokerArgs {
        max_upload_mb: 5,
        max_result_mb: 64,
        result_ttl: 0,
        job_retention: 0,
        ..BrokerArgs::loopback(data_dir)
    }
}

/// The repository's workflows, loaded once per test.
pub fn test_workflows() -> std::sync::Arc<tdcomfy_workflows::WorkflowRegistry> {
    let args = tdcomfy_workflows::WorkflowArgs {
        workflows_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../workflows"),
        default_workflow: "ltxv_image_to_video".into(),
        workflow_nodes: None,
    };
    std::sync::Arc::new(args.load().expect("repository workflows load"))
}

/// A running broker.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub args: BrokerArgs,
    wall: Option<WallSource>,
    token: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(tweak: impl FnOnce(&mut BrokerArgs)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = test_args(dir.path().join("data"));
    tweak(&mut args);
    start(dir, args, None).await
}

/// A broker with settings no flag reaches (test hooks such as `net.loopback_is_remote`).
pub async fn spawn_configured(
    tweak: impl FnOnce(&mut BrokerArgs),
    configure: impl FnOnce(&mut tdcomfy_broker::BrokerConfig) + Send + 'static,
) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = test_args(dir.path().join("data"));
    tweak(&mut args);
    start_inner(dir, args, None, Box::new(configure)).await
}

/// A broker whose clock reads its wall time from `wall` (once per start, as the real one reads
/// the system clock), so a test can step the wall clock under it.
pub async fn spawn_with_wall(wall: WallSource, tweak: impl FnOnce(&mut BrokerArgs)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut args = test_args(dir.path().join("data"));
    tweak(&mut args);
    start(dir, args, Some(wall)).await
}

/// A broker on a data directory the test prepared (`args.data_dir` inside `dir`).
pub async fn spawn_in(dir: tempfile::TempDir, args: BrokerArgs) -> TestApp {
    start(dir, args, None).await
}

async fn start(dir: tempfile::TempDir, args: BrokerArgs, wall: Option<WallSource>) -> TestApp {
    start_inner(dir, args, wall, Box::new(|_| {})).await
}

type Configure = Box<dyn FnOnce(&mut tdcomfy_broker::BrokerConfig) + Send>;

async fn start_inner(
    dir: tempfile::TempDir,
    args: BrokerArgs,
    wall: Option<WallSource>,
    configure: Configure,
) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut config = args.clone().into_config(test_workflows()).expect("valid test config");
    if let Some(wall) = &wall {
        config.clock = Clock::from_wall(wall.clone());
    }
    configure(&mut config);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tdcomfy_broker::run(listener, config, async move {
            let _ = stopped.await;
        })
        .await
        .expect("broker runs");
    });
    let token = args.api_token.clone();
    TestApp { base, http: reqwest::Client::new(), dir, args, wall, token, stop: Some(stop), task: Some(task) }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.http.get(self.url(path)))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.http.post(self.url(path)))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.http.delete(self.url(path)))
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.authed(self.http.put(self.url(path)))
    }

    /// Stops the broker gracefully and starts a new one on the same data directory.
    pub async fn restart(mut self) -> TestApp {
        self.shutdown().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        start(dir, self.args.clone(), self.wall.clone()).await
    }

    /// Stops the broker without letting anything finish, as close to a crash as a task allows,
    /// and starts a new one on the same data directory.
    pub async fn crash_and_restart(self) -> TestApp {
        self.crash_and_restart_after(Duration::ZERO).await
    }

    /// Like [`TestApp::crash_and_restart`], with the broker down for `downtime` in between.
    pub async fn crash_and_restart_after(mut self, downtime: Duration) -> TestApp {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        tokio::time::sleep(downtime).await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        start(dir, self.args.clone(), self.wall.clone()).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub async fn submit(&self, form: Form) -> reqwest::Response {
        self.post("/jobs").multipart(form).send().await.expect("submit sent")
    }

    /// Submits a small real PNG with a prompt; returns the job id.
    pub async fn submit_png(&self, prompt: &str) -> String {
        let resp = self.submit(png_form(prompt)).await;
        assert_eq!(resp.status(), 200, "submit failed: {}", resp.text().await.unwrap());
        let body: Value = resp.json().await.unwrap();
        body["job_id"].as_str().unwrap().to_owned()
    }

    pub async fn job(&self, id: &str) -> Value {
        let resp = self.get(&format!("/jobs/{id}")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    pub async fn health(&self) -> Value {
        self.http.get(self.url("/health")).send().await.unwrap().json().await.unwrap()
    }

    /// Leases a job (waiting up to `wait` s); `None` on 204.
    pub async fn lease(&self, worker: &str, wait: f64) -> Option<Value> {
        let resp = self
            .post("/worker/lease")
            .json(&serde_json::json!({"worker_id": worker, "wait": wait}))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => Some(resp.json::<Value>().await.unwrap()["job"].clone()),
            204 => None,
            s => panic!("lease answered {s}: {}", resp.text().await.unwrap()),
        }
    }

    pub async fn heartbeat(&self, id: &str, token: &str, progress: Option<Value>) -> reqwest::Response {
        self.post(&format!("/worker/jobs/{id}/heartbeat"))
            .json(&serde_json::json!({"lease_token": token, "progress": progress}))
            .send()
            .await
            .unwrap()
    }

    pub async fn put_result(&self, id: &str, token: &str, bytes: Vec<u8>) -> reqwest::Response {
        self.put(&format!("/worker/jobs/{id}/result"))
            .header("lease-token", token)
            .header("content-type", "video/mp4")
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    pub async fn fail(&self, id: &str, token: &str, message: &str, retryable: bool) -> reqwest::Response {
        self.post(&format!("/worker/jobs/{id}/fail"))
            .json(&serde_json::json!({"lease_token": token, "message": message, "retryable": retryable}))
            .send()
            .await
            .unwrap()
    }

    /// Long-polls a job until `pred` holds or `secs` pass; returns the last state seen.
    pub async fn wait_until(&self, id: &str, secs: f64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        let mut job = self.job(id).await;
        while !pred(&job) && tokio::time::Instant::now() < deadline {
            let version = job["version"].as_u64().unwrap();
            job = self.get(&format!("/jobs/{id}?wait=5&since={version}")).send().await.unwrap().json().await.unwrap();
        }
        job
    }

    /// Files under the data directory's `files/<kind>`.
    pub fn files(&self, kind: &str) -> Vec<String> {
        std::fs::read_dir(self.args.data_dir.join("files").join(kind))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A real PNG of `w`×`h` pixels.
pub fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn png_form(prompt: &str) -> Form {
    Form::new()
        .part("image", Part::bytes(png_bytes(64, 40)).file_name("frame.png").mime_str("image/png").unwrap())
        .text("prompt", prompt.to_owned())
}

pub async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error bodies are JSON");
    (status, body["error"].clone())
}

/// Reads Server-Sent Events from a response: `(event name, parsed data)` pairs.
pub struct SseReader {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
    /// The `id:` of the last event read that had one (what a client sends back as `Last-Event-ID`).
    pub last_id: Option<String>,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> SseReader {
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        SseReader { stream: Box::pin(resp.bytes_stream()), buf: String::new(), last_id: None }
    }

    /// The next event, or `None` when the stream ends or `secs` pass.
    pub async fn next(&mut self, secs: f64) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        self.last_id = Some(v.trim().to_owned());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).expect("event data is JSON")));
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
}

/// A fresh PostgreSQL database for one test, created in the server `TDCOMFY_TEST_DATABASE_URL`
/// names and dropped (`WITH (FORCE)`, so open connections do not keep it) when this is dropped.
pub struct TestDb {
    /// The database's URL (the server's URL with this database's name).
    pub url: String,
    admin: String,
    name: String,
}

impl TestDb {
    /// A new database, or `None` (after printing `SKIPPED: …`) when `TDCOMFY_TEST_DATABASE_URL`
    /// is unset. With `TDCOMFY_REQUIRE_POSTGRES=1` (CI) an unset variable fails the test.
    pub async fn create(test: &str) -> Option<TestDb> {
        let Some(admin) = std::env::var("TDCOMFY_TEST_DATABASE_URL").ok().filter(|u| !u.trim().is_empty()) else {
            assert!(
                std::env::var("TDCOMFY_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "TDCOMFY_REQUIRE_POSTGRES=1 but TDCOMFY_TEST_DATABASE_URL is unset ({test})"
            );
            println!("SKIPPED: {test}: TDCOMFY_TEST_DATABASE_URL is unset");
            return None;
        };
        let name = format!("tdcomfy_test_{}", uuid::Uuid::new_v4().simple());
        let (client, connection) =
            tokio_postgres::connect(&admin, tokio_postgres::NoTls).await.expect("TDCOMFY_TEST_DATABASE_URL reachable");
        let driver = tokio::spawn(connection);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create test database");
        drop(client);
        let _ = driver.await;
        Some(TestDb { url: with_database(&admin, &name), admin, name })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be shutting down: a thread of its own.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                // A few tries: a broker still running in the test may be reconnecting meanwhile.
                for _ in 0..5 {
                    let Ok((client, connection)) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await else {
                        continue;
                    };
                    let driver = tokio::spawn(connection);
                    let dropped = client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                    drop(client);
                    let _ = driver.await;
                    match dropped {
                        Ok(()) => return,
                        Err(e) => eprintln!("dropping test database {name}: {e}"),
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            });
        })
        .join();
    }
}

/// `url` with its database name replaced by `name` (query parameters kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[authority_end..].find('/').map(|i| i + authority_end).unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A real broker (HTTP on 127.0.0.1:0) whose jobs are recorded in PostgreSQL at `database_url`;
/// several started on one database behave as a cluster.
pub async fn spawn_postgres(database_url: &str, tweak: impl FnOnce(&mut BrokerArgs)) -> TestApp {
    let url = database_url.to_owned();
    spawn_with(move |a| {
        a.storage.database_url = Some(url);
        tweak(a);
    })
    .await
}
