//! Test harness: a simulator on 127.0.0.1:0, an HTTP client, a WebSocket client, capture fixtures
//! and helpers that turn WebSocket transcripts into comparable token sequences.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tdcomfy_sim::SimConfig;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Guard for waiting on events that must arrive; generous so a busy machine never trips it.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

/// A running simulator.
pub struct Sim {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// `ws://127.0.0.1:PORT`
    pub ws_base: String,
    /// a shared HTTP client
    pub http: reqwest::Client,
    /// holds the data directory alive
    pub dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Sim {
    /// Starts a simulator with a fast sampler (job time 300 ms) and lets `tweak` adjust the config.
    pub async fn start(tweak: impl FnOnce(&mut SimConfig)) -> Sim {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = SimConfig::new(dir.path().join("data"));
        config.job_time = Duration::from_millis(300);
        config.progress_steps = 4;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tdcomfy_sim::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Sim {
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            http: reqwest::Client::new(),
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts the simulator down and checks `run` returned cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(EVENT_TIMEOUT, task).await.expect("shutdown in time");
            result.expect("join").expect("run returns Ok");
        }
    }

    /// Absolute URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The simulator's data directory (`input/`, `output/`, `temp/`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// GETs a JSON body (asserts HTTP 200).
    pub async fn get_json(&self, path: &str) -> Value {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.expect("json body")
    }

    /// POSTs JSON; returns status and body (JSON or null when empty).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self.http.post(self.url(path)).json(body).send().await.expect("POST");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("json body") };
        (status, value)
    }

    /// POSTs a JSON text as is (keeps the key order a Python client would send).
    pub async fn post_text(&self, path: &str, body: String) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("json body") };
        (status, value)
    }

    /// Queues a prompt and returns its id (asserts HTTP 200).
    pub async fn queue_prompt(&self, prompt: &Value, client_id: &str) -> String {
        let (status, body) = self.post("/prompt", &json!({"prompt": prompt, "client_id": client_id})).await;
        assert_eq!(status, 200, "prompt rejected: {body}");
        body["prompt_id"].as_str().expect("prompt_id").to_string()
    }

    /// Uploads a file; returns status and JSON body (null when empty).
    pub async fn upload(&self, name: &str, bytes: Vec<u8>, fields: &[(&str, &str)]) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new().part(
            "image",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()).mime_str("image/png").expect("mime"),
        );
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        let resp = self.http.post(self.url("/upload/image")).multipart(form).send().await.expect("upload");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("json") };
        (status, value)
    }

    /// Connects a WebSocket and consumes the greeting `status` frame.
    pub async fn ws(&self, client_id: &str) -> Ws {
        let mut ws = self.ws_raw(&format!("/ws?clientId={client_id}")).await;
        let first = ws.next_json().await;
        assert_eq!(first["type"], "status");
        assert_eq!(first["data"]["sid"], client_id);
        ws.frames.clear();
        ws
    }

    /// Connects a WebSocket without consuming anything.
    pub async fn ws_raw(&self, path_and_query: &str) -> Ws {
        let (stream, _) =
            tokio_tungstenite::connect_async(format!("{}{}", self.ws_base, path_and_query)).await.expect("ws connect");
        Ws { stream, frames: Vec::new() }
    }

    /// Polls `/history/{id}` until the prompt is there (the way a worker recovers without events).
    pub async fn wait_history(&self, prompt_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let body = self.get_json(&format!("/history/{prompt_id}")).await;
            if let Some(entry) = body.get(prompt_id) {
                return entry.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "history for {prompt_id} never appeared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A frame received on a test socket.
#[derive(Debug, Clone)]
pub enum Frame {
    Json(Value),
    Binary(Vec<u8>),
}

impl Frame {
    /// The JSON of a text frame.
    pub fn json(&self) -> Option<&Value> {
        match self {
            Frame::Json(v) => Some(v),
            Frame::Binary(_) => None,
        }
    }
}

/// A test WebSocket client that records what it receives.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// every frame received so far
    pub frames: Vec<Frame>,
}

impl Ws {
    /// The next frame, or `None` when the server closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            let msg = tokio::time::timeout(EVENT_TIMEOUT, self.stream.next()).await.expect("ws frame in time");
            let frame = match msg {
                Some(Ok(Message::Text(t))) => Frame::Json(serde_json::from_str(t.as_str()).expect("json frame")),
                Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            };
            self.frames.push(frame.clone());
            return Some(frame);
        }
    }

    /// The next text frame (binary frames are recorded and skipped).
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next().await.expect("socket open") {
                Frame::Json(v) => return v,
                Frame::Binary(_) => continue,
            }
        }
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::Text(text.into())).await.expect("send");
    }

    /// Reads until `executing {node: null, prompt_id}`; returns the frames of this wait.
    pub async fn until_done(&mut self, prompt_id: &str) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let frame = self.next().await.expect("socket open until the prompt is done");
            let done = frame.json().is_some_and(|v| {
                v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == prompt_id
            });
            out.push(frame);
            if done {
                return out;
            }
        }
    }

    /// Reads until a JSON frame satisfies `pred`; returns it.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            if let Frame::Json(v) = self.next().await.expect("socket open")
                && pred(&v)
            {
                return v;
            }
        }
    }
}

/// Loads a capture fixture.
pub fn capture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/comfyui-captures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("capture json")
}

/// Frames of a captured `ws_sequence`.
pub fn captured_frames(seq: &Value) -> Vec<Frame> {
    seq.as_array()
        .expect("sequence")
        .iter()
        .map(|m| {
            if m["frame"] == "text" {
                Frame::Json(m["msg"].clone())
            } else {
                let mut b = vec![0u8; 8];
                b[3] = m["event_type"].as_u64().unwrap_or(1) as u8;
                Frame::Binary(b)
            }
        })
        .collect()
}

/// A small PNG with a gradient (distinct per `seed`).
pub fn png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 255 / width.max(1)) as u8, (y * 255 / height.max(1)) as u8, seed.wrapping_mul(37)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

/// Options for [`tokens`].
#[derive(Default, Clone)]
pub struct TokenOpts {
    /// nodes whose events are left out (e.g. nodes the capture had cached)
    pub ignore_nodes: Vec<String>,
    /// include `queue_remaining` in status tokens
    pub status_values: bool,
    /// leave out progress and progress_state
    pub skip_progress: bool,
    /// collapse repeated identical tokens (progress loops of different length)
    pub collapse: bool,
}

/// Turns frames into a comparable sequence: event types with node ids, without ids/timestamps.
pub fn tokens(frames: &[Frame], opts: &TokenOpts) -> Vec<String> {
    let ignored = |n: &str| opts.ignore_nodes.iter().any(|i| i == n);
    let mut out: Vec<String> = Vec::new();
    let mut last_states: serde_json::Map<String, Value> = serde_json::Map::new();
    for frame in frames {
        let token = match frame {
            Frame::Binary(b) => {
                if opts.skip_progress {
                    continue;
                }
                format!("binary:{}", b.get(3).copied().unwrap_or(0))
            }
            Frame::Json(v) => {
                let kind = v["type"].as_str().unwrap_or("?").to_string();
                let data = &v["data"];
                match kind.as_str() {
                    "status" if opts.status_values => {
                        format!("status:{}", data["status"]["exec_info"]["queue_remaining"])
                    }
                    "executing" => match data["node"].as_str() {
                        Some(n) if ignored(n) => continue,
                        Some(n) => format!("executing:{n}"),
                        None => "executing:null".to_string(),
                    },
                    "executed" => {
                        let n = data["node"].as_str().unwrap_or("?");
                        if ignored(n) {
                            continue;
                        }
                        let keys: BTreeSet<&str> = data["output"]
                            .as_object()
                            .map(|o| o.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        format!("executed:{n}:{}", keys.into_iter().collect::<Vec<_>>().join(","))
                    }
                    "progress_state" => {
                        let nodes = data["nodes"].as_object().cloned().unwrap_or_default();
                        let changed: Vec<(String, String)> = nodes
                            .iter()
                            .filter(|(id, entry)| {
                                last_states.get(*id).map(|e| (&e["state"], &e["value"]))
                                    != Some((&entry["state"], &entry["value"]))
                            })
                            .map(|(id, entry)| (id.clone(), entry["state"].as_str().unwrap_or("?").to_string()))
                            .collect();
                        last_states = nodes;
                        if opts.skip_progress {
                            continue;
                        }
                        let Some((id, state)) = changed.into_iter().find(|(id, _)| !ignored(id)) else {
                            continue;
                        };
                        format!("progress_state:{id}:{state}")
                    }
                    "progress" => {
                        if opts.skip_progress {
                            continue;
                        }
                        format!("progress:{}", data["node"].as_str().unwrap_or("?"))
                    }
                    _ => kind,
                }
            }
        };
        if opts.collapse && out.last() == Some(&token) {
            continue;
        }
        out.push(token);
    }
    if opts.collapse {
        // Collapse repeated cycles such as [progress_state, progress] × N.
        let mut i = 0;
        while i + 3 < out.len() {
            if out[i] == out[i + 2] && out[i + 1] == out[i + 3] {
                out.drain(i + 2..i + 4);
            } else {
                i += 1;
            }
        }
    }
    out
}

/// The JSON key set of each message's `data`, per event type, in order (for shape comparisons).
pub fn data_keys(frames: &[Frame], kind: &str) -> Vec<BTreeSet<String>> {
    frames
        .iter()
        .filter_map(Frame::json)
        .filter(|v| v["type"] == kind)
        .map(|v| v["data"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default())
        .collect()
}

/// Keys of a JSON object.
pub fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// The type skeleton of a JSON value: object keys and value kinds, array element shapes.
pub fn shape(v: &Value) -> Value {
    match v {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("bool"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(a) => Value::Array(a.first().map(shape).into_iter().collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

/// Serializes JSON with numeric object keys in numeric order: the insertion order of the captured
/// prompts (`serde_json::Value` would sort "10" before "2", which changes ComfyUI's node order).
pub fn numeric_order_json(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let mut entries: Vec<(&String, &Value)> = o.iter().collect();
            entries.sort_by_key(|(k, _)| (k.parse::<u64>().unwrap_or(u64::MAX), (*k).clone()));
            let items: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap_or_default(), numeric_order_json(v)))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(numeric_order_json).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Starts a simulator with the 0.38 profile (plus `tweak`).
pub async fn sim_038(tweak: impl FnOnce(&mut SimConfig)) -> Sim {
    Sim::start(|c| {
        c.comfy_version = tdcomfy_sim::ComfyVersion::V0_38;
        tweak(c);
    })
    .await
}

/// A graph that loads `frame.png`, inverts it and saves it.
pub fn invert_graph(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

/// A graph whose middle node runs `steps` × 0.1 s (`SlowPassthrough`), so it can be seen running.
pub fn slow_graph(steps: u64, prefix: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "frame.png"}},
        "2": {"class_type": "SlowPassthrough", "inputs": {"images": ["1", 0], "steps": steps, "step_seconds": 0.1, "send_preview": false}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

impl Sim {
    /// GET; returns status and body (JSON or null when empty or not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

/// A small text-to-video graph with a model loader and a `KSampler`.
pub fn ksampler_graph(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "ltx-video-2b-v0.9.5.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "waves"}},
        "3": {"class_type": "EmptyLTXVLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": 20, "cfg": 3.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 0],
            "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}}
    })
}

/// The binary frames among `frames`, as their event type (`1` legacy preview, `4` with metadata).
pub fn binary_types(frames: &[Frame]) -> Vec<u32> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Binary(b) if b.len() >= 4 => Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            _ => None,
        })
        .collect()
}
