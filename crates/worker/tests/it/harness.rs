//! The whole pipeline in one test process: the real broker, the real ComfyUI simulator and real
//! workers, each through its own `run` function on 127.0.0.1, each restartable on its address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
pub use tdcomfy_sim::ComfyVersion;
use tdcomfy_workflows::WorkflowRegistry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A server task that can be stopped (gracefully or abruptly) and started again on its address.
pub struct Served {
    pub addr: SocketAddr,
    /// The simulator's base directory (its `input/` and `output/`), for a simulator.
    pub dir: Option<PathBuf>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Served {
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn bind(addr: Option<SocketAddr>) -> tokio::net::TcpListener {
    let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    // A restarted server reuses its port; the old socket may linger for a moment.
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr}")
}

/// Settings of one pipeline.
pub struct Setup {
    pub sim_job_time: f64,
    pub lease_ttl: f64,
    pub max_attempts: u32,
    pub stall_timeout: f64,
    pub models: Option<Vec<String>>,
    pub job_timeout: f64,
    /// `COMFYUI_RETRY_BUDGET` of the workers.
    pub comfyui_retry_budget: f64,
    /// `COMFYUI_DIR` of the workers.
    pub comfyui_dir: Option<PathBuf>,
    /// The ComfyUI version the simulator behaves as.
    pub comfy_version: ComfyVersion,
    /// The simulator's `--max-upload-size` in bytes (default: ComfyUI's 100 MiB).
    pub sim_max_upload: Option<u64>,
    /// The token the simulator demands (`--auth-token`), and the one the workers send
    /// (`COMFYUI_TOKEN`).
    pub sim_token: Option<String>,
    pub comfyui_token: Option<String>,
    /// How long the broker's preview route stalls before answering (a slow broker).
    pub preview_stall: Option<Duration>,
    /// `PREVIEW_FPS` of the workers.
    pub preview_fps: f64,
    /// `PREFETCH` of the workers.
    pub prefetch: usize,
    /// `COMFYUI_KEEP_OUTPUTS` of the workers: every prompt's files stay, so they can be counted.
    pub keep_outputs: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            sim_job_time: 0.3,
            lease_ttl: 30.0,
            max_attempts: 3,
            stall_timeout: 60.0,
            models: None,
            job_timeout: 120.0,
            comfyui_retry_budget: 2.0,
            comfyui_dir: None,
            comfy_version: ComfyVersion::default(),
            sim_max_upload: None,
            sim_token: None,
            comfyui_token: None,
            preview_stall: None,
            preview_fps: 10.0,
            prefetch: 1,
            keep_outputs: false,
        }
    }
}

impl Setup {
    /// The defaults, on a simulator of `version`.
    pub fn on(version: ComfyVersion) -> Setup {
        Setup { comfy_version: version, ..Setup::default() }
    }
}

/// For each named `async fn name(version: ComfyVersion)`, two tests: `name::comfy_0_3_64` and
/// `name::comfy_0_38`, the same pipeline on a simulator of each profile (the client picks its
/// mechanisms by what the server has, so both paths run).
macro_rules! on_both_profiles {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn comfy_0_3_64() {
                super::$name(tdcomfy_sim::ComfyVersion::V0_3_64).await
            }
            #[tokio::test]
            async fn comfy_0_38() {
                super::$name(tdcomfy_sim::ComfyVersion::V0_38).await
            }
        }
    )*};
}
pub(crate) use on_both_profiles;

pub struct Pipeline {
    pub dir: tempfile::TempDir,
    pub broker: Served,
    pub sim: Served,
    pub workers: Vec<Served>,
    pub http: reqwest::Client,
    pub setup: Setup,
    workflows: Arc<WorkflowRegistry>,
}

/// The repository's workflows plus this crate's test workflows (every output key shape).
fn workflows(dir: &Path) -> Arc<WorkflowRegistry> {
    let all = dir.join("workflows");
    std::fs::create_dir_all(&all).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for src in [root.join("../../workflows"), root.join("tests/workflows")] {
        for entry in std::fs::read_dir(src).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, all.join(path.file_name().unwrap())).unwrap();
        }
    }
    let args = tdcomfy_workflows::WorkflowArgs {
        workflows_dir: all,
        default_workflow: "ltxv_image_to_video".into(),
        workflow_nodes: None,
    };
    Arc::new(args.load().expect("test workflows load"))
}

impl Pipeline {
    pub async fn start(setup: Setup) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        let workflows = workflows(dir.path());
        let mut p = Pipeline {
            broker: Served {
                addr: "127.0.0.1:0".parse().unwrap(),
                dir: None,
                stop: CancellationToken::new(),
                task: None,
            },
            sim: Served { addr: "127.0.0.1:0".parse().unwrap(), dir: None, stop: CancellationToken::new(), task: None },
            workers: Vec::new(),
            http: reqwest::Client::new(),
            dir,
            setup,
            workflows,
        };
        p.broker = p.start_broker(None).await;
        p.sim = p.start_sim(None).await;
        let w = p.start_worker("worker-1").await;
        p.workers.push(w);
        p
    }

    pub async fn start_broker(&self, addr: Option<SocketAddr>) -> Served {
        self.start_broker_on(addr, "broker", Default::default()).await
    }

    /// A broker with its own DATA_DIR (`data_dir` under the pipeline's directory) on the store and
    /// storage `storage` names (a shared PostgreSQL database and file store: one of several).
    pub async fn start_broker_on(
        &self,
        addr: Option<SocketAddr>,
        data_dir: &str,
        storage: tdcomfy_broker::StorageArgs,
    ) -> Served {
        let listener = bind(addr).await;
        let addr = listener.local_addr().unwrap();
        let args = tdcomfy_broker::BrokerArgs {
            storage,
            max_upload_mb: 20,
            max_result_mb: 512,
            result_ttl: 0,
            job_retention: 0,
            job_timeout: self.setup.job_timeout,
            lease_ttl: self.setup.lease_ttl,
            max_attempts: self.setup.max_attempts,
            ..tdcomfy_broker::BrokerArgs::loopback(self.dir.path().join(data_dir))
        };
        let mut config = args.into_config(self.workflows.clone()).unwrap();
        config.preview_limits.stall_for_tests = self.setup.preview_stall;
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            tdcomfy_broker::run(listener, config, async move { s.cancelled().await }).await.unwrap();
        });
        Served { addr, dir: None, stop, task: Some(task) }
    }

    pub async fn start_sim(&self, addr: Option<SocketAddr>) -> Served {
        let listener = bind(addr).await;
        let addr = listener.local_addr().unwrap();
        let sim_dir = self.dir.path().join(format!("sim-{}", uuid::Uuid::new_v4()));
        let mut config = tdcomfy_sim::SimConfig::new(&sim_dir);
        config.job_time = Duration::from_secs_f64(self.setup.sim_job_time);
        config.progress_steps = 3;
        config.comfy_version = self.setup.comfy_version;
        if let Some(limit) = self.setup.sim_max_upload {
            config.max_upload_bytes = limit;
        }
        config.auth_token = self.setup.sim_token.clone();
        if let Some(models) = &self.setup.models {
            config.models = models.clone();
        }
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            tdcomfy_sim::run(listener, config, async move { s.cancelled().await }).await.unwrap();
        });
        Served { addr, dir: Some(sim_dir), stop, task: Some(task) }
    }

    pub async fn start_worker(&self, name: &str) -> Served {
        self.start_worker_on(name, None).await
    }

    /// A worker on the given ComfyUI servers (`COMFYUI_URLS`), or on this pipeline's simulator.
    pub async fn start_worker_on(&self, name: &str, comfyui_urls: Option<String>) -> Served {
        self.start_worker_with(name, comfyui_urls, format!("http://{}", self.broker.addr)).await
    }

    /// A worker that reaches the broker at `broker_url` (e.g. through a proxy).
    pub async fn start_worker_with(&self, name: &str, comfyui_urls: Option<String>, broker_url: String) -> Served {
        let args = tdcomfy_worker::WorkerArgs {
            comfyui_host: self.sim.addr.ip().to_string(),
            comfyui_port: self.sim.addr.port(),
            comfyui_urls,
            comfyui_retry_budget: self.setup.comfyui_retry_budget,
            worker_poll_interval: 0.1,
            worker_id: Some(name.to_owned()),
            stall_timeout: self.setup.stall_timeout,
            comfyui_poll_interval: 0.2,
            spool_dir: Some(self.dir.path().join(format!("spool-{name}"))),
            comfyui_dir: self.setup.comfyui_dir.clone(),
            comfyui_output_dir: None,
            comfyui_input_dir: None,
            comfyui_keep_outputs: self.setup.keep_outputs,
            comfyui_token: self.setup.comfyui_token.clone(),
            preview_fps: self.setup.preview_fps,
            preview_method: "none".into(),
            prefetch: self.setup.prefetch,
        };
        let config = args.into_config(broker_url, None, self.workflows.clone(), PathBuf::new()).unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            tdcomfy_worker::run(config, s).await.unwrap();
        });
        Served { addr: self.broker.addr, dir: None, stop, task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.broker.addr, path)
    }

    pub fn sim_url(&self, path: &str) -> String {
        format!("http://{}{}", self.sim.addr, path)
    }

    /// Submits a small frame; returns the job id.
    pub async fn submit(&self, prompt: &str, workflow: Option<&str>, params: Option<Value>) -> String {
        self.submit_frame(frame_png(), prompt, workflow, params).await
    }

    /// Submits `frame` (PNG bytes); returns the job id.
    pub async fn submit_frame(
        &self,
        frame: Vec<u8>,
        prompt: &str,
        workflow: Option<&str>,
        params: Option<Value>,
    ) -> String {
        self.submit_with(frame, prompt, workflow, params, &[]).await
    }

    /// [`Pipeline::submit_frame`] with more form fields (`previews`, …).
    pub async fn submit_with(
        &self,
        frame: Vec<u8>,
        prompt: &str,
        workflow: Option<&str>,
        params: Option<Value>,
        fields: &[(&str, &str)],
    ) -> String {
        let mut form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(frame).file_name("frame.png"))
            .text("prompt", prompt.to_owned());
        if let Some(w) = workflow {
            form = form.text("workflow", w.to_owned());
        }
        if let Some(p) = params {
            form = form.text("params", p.to_string());
        }
        for (name, value) in fields {
            form = form.text(name.to_string(), value.to_string());
        }
        let resp = self.http.post(self.url("/jobs")).multipart(form).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned()
    }

    pub async fn job(&self, id: &str) -> Value {
        self.http.get(self.url(&format!("/jobs/{id}"))).send().await.unwrap().json().await.unwrap()
    }

    /// Follows a job (long-poll, surviving a broker restart) until `pred` holds or `secs` pass.
    pub async fn wait_for(&self, id: &str, secs: f64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        let mut since = 0u64;
        let mut last = Value::Null;
        while tokio::time::Instant::now() < deadline {
            let resp = self.http.get(self.url(&format!("/jobs/{id}?wait=2&since={since}"))).send().await;
            match resp {
                Ok(r) if r.status() == 200 => {
                    last = r.json().await.unwrap();
                    if pred(&last) {
                        return last;
                    }
                    since = last["version"].as_u64().unwrap_or(0);
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("job {id} did not reach the expected state in {secs} s; last seen: {last}")
    }

    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_for(id, 90.0, |j| matches!(j["status"].as_str(), Some("done" | "error" | "cancelled"))).await
    }

    pub async fn result(&self, id: &str) -> (String, Vec<u8>) {
        let resp = self.http.get(self.url(&format!("/jobs/{id}/result"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        (ct, resp.bytes().await.unwrap().to_vec())
    }

    /// How many prompts of job `id` completed in the simulator (its output files; needs
    /// `keep_outputs`, else delivered files are deleted).
    pub fn prompts_completed(&self, id: &str) -> usize {
        let dir = self.sim.dir.as_ref().expect("a simulator").join("output");
        files_under(&dir.join(tdcomfy_workflows::job_output_subfolder(id))).len()
    }

    /// The simulator's queue: (running, pending) prompt ids.
    pub async fn sim_queue(&self) -> (usize, usize) {
        let q: Value = self.http.get(self.sim_url("/queue")).send().await.unwrap().json().await.unwrap();
        (q["queue_running"].as_array().unwrap().len(), q["queue_pending"].as_array().unwrap().len())
    }
}

/// A small real PNG (even dimensions, so H.264 can encode it).
pub fn frame_png() -> Vec<u8> {
    frame_png_seeded(120)
}

/// [`frame_png`] with its blue channel set to `seed`: a different frame per seed.
pub fn frame_png_seeded(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 40, |x, y| image::Rgb([(x * 4) as u8, (y * 6) as u8, seed]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Writes `bytes` to a temp file and reads the simulator's MP4 parser's view of it.
pub fn video_info(dir: &Path, bytes: &[u8]) -> tdcomfy_sim::VideoInfo {
    let path = dir.join(format!("{}.mp4", uuid::Uuid::new_v4()));
    std::fs::write(&path, bytes).unwrap();
    tdcomfy_sim::video_info(&path).expect("a parsable MP4")
}

/// A TCP pass-through to another address that can be cut (every connection closed, new ones
/// refused) and restored: one piece losing the network while the others keep it.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<std::sync::Mutex<(bool, CancellationToken)>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = bind(None).await;
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(std::sync::Mutex::new((true, CancellationToken::new())));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (open, cut) = { shared.lock().unwrap().clone() };
                if !open {
                    continue; // dropped: the connection is closed at once
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Proxy { addr, state, task }
    }

    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = false;
        s.1.cancel();
    }

    pub fn restore(&self) {
        *self.state.lock().unwrap() = (true, CancellationToken::new());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.lock().unwrap().1.cancel();
    }
}

/// Regular files under `dir` (recursively), as paths relative to it.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => out.push(path.strip_prefix(dir).unwrap().to_path_buf()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

impl Pipeline {
    /// A simulator that lists exactly `models` as installed model files (on `addr`, when given:
    /// a restart of a server with other files).
    pub async fn start_sim_with_models(&self, addr: Option<SocketAddr>, models: Vec<String>) -> Served {
        let listener = bind(addr).await;
        let addr = listener.local_addr().unwrap();
        let sim_dir = self.dir.path().join(format!("sim-{}", uuid::Uuid::new_v4()));
        let mut config = tdcomfy_sim::SimConfig::new(&sim_dir);
        config.job_time = Duration::from_secs_f64(self.setup.sim_job_time);
        config.progress_steps = 3;
        config.models = models;
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            tdcomfy_sim::run(listener, config, async move { s.cancelled().await }).await.unwrap();
        });
        Served { addr, dir: Some(sim_dir), stop, task: Some(task) }
    }

    /// `GET /workflows`' entry for `name`.
    pub async fn workflow(&self, name: &str) -> Value {
        let all: Value = self.http.get(self.url("/workflows")).send().await.unwrap().json().await.unwrap();
        all["workflows"].as_array().unwrap().iter().find(|w| w["name"] == name).cloned().unwrap_or(Value::Null)
    }
}
