//! A tiny scriptable fake ComfyUI (HTTP + `/ws`) for the cases the real simulator cannot be
//! steered into: silent sockets, vanished prompts, partial validation, dropped connections.
//!
//! Tests mutate its state directly and wait for conditions with [`Fake::wait_until`], which wakes
//! on every request or state change (no sleeps).
//!
//! Fault knobs: responses cut off mid-answer (`OnPrompt::QueueThenDrop`, `cut_history`,
//! `cut_active`), an HTTP side that accepts requests and never answers (`hang_http`), a socket
//! that closes right after connecting (`flap_sockets`), and newer ComfyUI: the jobs API
//! (`jobs_api`: list and `GET /api/jobs/{id}`), its atomic cancel (`jobs_cancel`), `GET /features`
//! and the socket's `feature_flags` reply (`features`), a request size limit (`max_upload`) and a
//! bearer token on every route (`require_token`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tdcomfy_comfy::{ClientId, ComfyClient, ComfyEndpoint, ComfyTimeouts};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

/// What `POST /prompt` does.
#[derive(Clone, Debug)]
pub enum OnPrompt {
    /// Queue it: running if nothing runs, else pending.
    Queue,
    /// Answer with this status and body, queue nothing.
    Reject(u16, Value),
    /// Queue it and answer 200 with these `node_errors` (ComfyUI's partial acceptance).
    QueueWithNodeErrors(Value),
    /// Answer 200 but keep nothing (as if ComfyUI restarted right after).
    Forget,
    /// Queue it, then cut the connection instead of answering (the client cannot tell whether
    /// it was queued).
    QueueThenDrop,
    /// Cut the connection without queueing anything (the server died while validating).
    DropWithoutQueueing,
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Value,
}

/// One recorded upload.
#[derive(Clone, Debug)]
pub struct Upload {
    pub filename: String,
    pub subfolder: String,
    pub overwrite: bool,
    pub bytes: Vec<u8>,
}

/// The fake's state; tests read and change it through [`Fake::with`].
pub struct FakeState {
    pub running: Vec<String>,
    pub pending: Vec<String>,
    pub history: serde_json::Map<String, Value>,
    pub requests: Vec<Recorded>,
    pub ws_client_ids: Vec<String>,
    pub on_prompt: OnPrompt,
    /// When true, a targeted interrupt of the running prompt ends it as interrupted.
    pub interrupt_works: bool,
    /// When set, uploads are renamed to this (as ComfyUI does on a collision).
    pub rename_uploads_to: Option<String>,
    pub uploads: Vec<Upload>,
    pub files: HashMap<String, (String, Vec<u8>)>,
    /// The next this many `GET /history/{id}` answers are cut off mid-response.
    pub cut_history: u32,
    /// The next this many `GET /queue` and `GET /api/jobs` answers are cut off mid-response.
    pub cut_active: u32,
    /// Every HTTP request (not the socket) is accepted and never answered.
    pub hang_http: bool,
    /// `GET /history`, `/queue` and `/api/jobs` answer 500 (the other routes still work).
    pub fail_polls: bool,
    /// Every socket is closed right after its greeting (and replay), so the client reconnects.
    pub flap_sockets: bool,
    /// On connect, send `executing` for this node without a prompt id, as ComfyUI does.
    pub replay_executing: Option<String>,
    /// Serve `GET /api/jobs` and `GET /api/jobs/{id}` (ComfyUI with the jobs API, C1);
    /// otherwise they are 404s as in 0.3.64.
    pub jobs_api: bool,
    /// Serve `POST /api/jobs/{id}/cancel` (C3; needs `jobs_api`); otherwise it is a 404.
    pub jobs_cancel: bool,
    /// The body of `GET /features` and of the socket's `feature_flags` reply; `None`: no route
    /// and no reply.
    pub features: Option<Value>,
    /// Uploads larger than this are answered 413, as aiohttp does past `--max-upload-size`.
    pub max_upload: Option<usize>,
    /// Every route answers 401 unless `Authorization: Bearer <token>` (HTTP) or `?token=` (`/ws`).
    pub require_token: Option<String>,
    /// Request headers per path (`name: value` lines), in order of arrival.
    pub headers: Vec<(String, Vec<String>)>,
    /// The graph each `/queue` item carries (ComfyUI sends every queued prompt's whole graph).
    pub queue_graph: Value,
    /// Response body bytes served, per route (`/queue`, `/api/jobs`, `/history`).
    pub served_bytes: HashMap<&'static str, usize>,
    sockets: Vec<mpsc::UnboundedSender<Message>>,
}

struct Shared {
    state: Mutex<FakeState>,
    version: watch::Sender<u64>,
}

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        let result = {
            let mut state = self.state.lock().expect("fake state");
            f(&mut state)
        };
        self.version.send_modify(|v| *v += 1);
        result
    }
}

/// A running fake server; stops when dropped.
pub struct Fake {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl Fake {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::serve(listener)
    }

    /// Starts on a given address (to bring a "crashed" server back).
    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind again");
        Self::serve(listener)
    }

    fn serve(listener: tokio::net::TcpListener) -> Self {
        let (version, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(FakeState {
                running: Vec::new(),
                pending: Vec::new(),
                history: serde_json::Map::new(),
                requests: Vec::new(),
                ws_client_ids: Vec::new(),
                on_prompt: OnPrompt::Queue,
                interrupt_works: true,
                rename_uploads_to: None,
                uploads: Vec::new(),
                files: HashMap::new(),
                cut_history: 0,
                cut_active: 0,
                hang_http: false,
                fail_polls: false,
                flap_sockets: false,
                replay_executing: None,
                jobs_api: false,
                jobs_cancel: false,
                features: None,
                max_upload: None,
                require_token: None,
                headers: Vec::new(),
                queue_graph: json!({}),
                served_bytes: HashMap::new(),
                sockets: Vec::new(),
            }),
            version,
        });
        let app = Router::new()
            .route("/prompt", post(post_prompt))
            .route("/queue", get(get_queue).post(post_queue))
            .route("/history/{id}", get(get_history))
            .route("/history", post(post_history))
            .route("/interrupt", post(post_interrupt))
            .route("/system_stats", get(system_stats))
            .route("/upload/image", post(upload))
            .route("/view", get(view))
            .route("/api/jobs", get(get_jobs))
            .route("/api/jobs/{id}", get(get_job))
            .route("/api/jobs/{id}/cancel", post(cancel_job))
            .route("/features", get(get_features))
            .route("/ws", get(ws))
            .layer(axum::middleware::from_fn_with_state(shared.clone(), hang))
            .layer(axum::middleware::from_fn_with_state(shared.clone(), auth))
            // ComfyUI accepts 100 MB uploads; axum's default limit is 2 MB.
            .layer(DefaultBodyLimit::max(100 * 1024 * 1024))
            .with_state(shared.clone());
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        });
        Self { addr, shared, _stop: stop.drop_guard() }
    }

    pub fn endpoint(&self) -> ComfyEndpoint {
        ComfyEndpoint::parse(&format!("http://{}", self.addr)).expect("endpoint")
    }

    pub fn client(&self) -> ComfyClient {
        client_for(self.endpoint())
    }

    /// Reads or changes the state (and wakes waiters).
    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        self.shared.with(f)
    }

    /// Waits until `condition` holds; panics after 20 s so a broken test cannot hang CI.
    pub async fn wait_until(&self, what: &str, mut condition: impl FnMut(&FakeState) -> bool) {
        let mut version = self.shared.version.subscribe();
        let waiting = async {
            loop {
                if condition(&self.shared.state.lock().expect("fake state")) {
                    return;
                }
                if version.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), waiting).await.is_err() {
            panic!("fake: timed out waiting for {what}");
        }
    }

    /// Sends a JSON event to every connected socket.
    pub fn push(&self, event: Value) {
        self.with(|s| {
            s.sockets.retain(|socket| socket.send(Message::Text(event.to_string().into())).is_ok());
        });
    }

    /// Drops every socket (the client should reconnect).
    pub fn close_sockets(&self) {
        self.with(|s| {
            for socket in s.sockets.drain(..) {
                let _ = socket.send(Message::Close(None));
            }
        });
    }

    /// Removes a prompt from the queue and stores a history entry for it.
    pub fn complete(&self, id: &str, entry: Value) {
        self.with(|s| {
            s.running.retain(|p| p != id);
            s.pending.retain(|p| p != id);
            s.history.insert(id.to_owned(), entry);
        });
    }

    /// Recorded requests with this method and path.
    pub fn requests(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.with(|s| s.requests.iter().filter(|r| r.method == method && r.path == path).cloned().collect())
    }
}

pub fn client_for(endpoint: ComfyEndpoint) -> ComfyClient {
    let timeouts = ComfyTimeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_secs(5),
        upload: Duration::from_secs(10),
        read_idle: Duration::from_secs(5),
    };
    ComfyClient::new(endpoint, ClientId::new(), timeouts).expect("client")
}

/// A history entry that ended in success with these outputs.
pub fn success_entry(id: &str, outputs: Value) -> Value {
    json!({
        "prompt": [0, id, {}, {}, []],
        "outputs": outputs,
        "status": {"status_str": "success", "completed": true, "messages": [
            ["execution_start", {"prompt_id": id, "timestamp": 1}],
            ["execution_cached", {"nodes": [], "prompt_id": id, "timestamp": 2}],
            ["execution_success", {"prompt_id": id, "timestamp": 3}]
        ]},
        "meta": {}
    })
}

/// A history entry that ended with an interrupt at `node`.
pub fn interrupted_entry(id: &str, node: &str, node_type: &str) -> Value {
    json!({
        "prompt": [0, id, {}, {}, []],
        "outputs": {},
        "status": {"status_str": "error", "completed": false, "messages": [
            ["execution_start", {"prompt_id": id, "timestamp": 1}],
            ["execution_interrupted", {"prompt_id": id, "node_id": node, "node_type": node_type, "executed": [], "timestamp": 2}]
        ]},
        "meta": {}
    })
}

fn record(state: &mut FakeState, method: &str, path: &str, body: Value) {
    state.requests.push(Recorded { method: method.to_owned(), path: path.to_owned(), body });
}

fn parse_body(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

async fn post_prompt(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let body = parse_body(&body);
    shared.with(|s| {
        record(s, "POST", "/prompt", body.clone());
        let id = body["prompt_id"].as_str().unwrap_or("server-chosen").to_owned();
        let queue = |s: &mut FakeState| {
            if s.running.is_empty() {
                s.running.push(id.clone());
            } else {
                s.pending.push(id.clone());
            }
        };
        match s.on_prompt.clone() {
            OnPrompt::Queue => {
                queue(s);
                Json200(json!({"prompt_id": id, "number": 1, "node_errors": {}})).into_response()
            }
            OnPrompt::QueueWithNodeErrors(errors) => {
                queue(s);
                Json200(json!({"prompt_id": id, "number": 1, "node_errors": errors})).into_response()
            }
            OnPrompt::Forget => Json200(json!({"prompt_id": id, "number": 1, "node_errors": {}})).into_response(),
            OnPrompt::QueueThenDrop => {
                queue(s);
                // Only the first submission is cut off; a second one is answered normally.
                s.on_prompt = OnPrompt::Queue;
                cut_off()
            }
            OnPrompt::DropWithoutQueueing => {
                s.on_prompt = OnPrompt::Queue;
                cut_off()
            }
            OnPrompt::Reject(status, body) => (
                StatusCode::from_u16(status).expect("status"),
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response(),
        }
    })
}

struct Json200(Value);

/// A 200 whose body breaks off: the client sees the connection drop mid-answer.
fn cut_off() -> Response {
    let broken = futures_util::stream::once(async { Err::<Bytes, _>(std::io::Error::other("cut off by the fake")) });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(broken))
        .expect("response")
}

/// Serialises `body`, counting its bytes under `route`.
fn counted(state: &mut FakeState, route: &'static str, body: &Value) -> Response {
    let text = body.to_string();
    *state.served_bytes.entry(route).or_default() += text.len();
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// With `hang_http`, records the request and never answers it (the socket still works).
async fn hang(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let hung = shared.with(|s| s.hang_http) && request.uri().path() != "/ws";
    if !hung {
        return next.run(request).await;
    }
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap_or_default();
    shared.with(|s| match path.strip_prefix("/history/") {
        Some(id) => record(s, &method, "/history", json!(id)),
        None => record(s, &method, &path, parse_body(&body)),
    });
    std::future::pending().await
}

/// Records the headers, and with `require_token` answers 401 to requests without it (ComfyUI's
/// token wrappers do so on every route, C19).
async fn auth(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let lines: Vec<String> = request
        .headers()
        .iter()
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap_or("<binary>")))
        .collect();
    let wanted = shared.with(|s| {
        s.headers.push((path.clone(), lines));
        s.require_token.clone()
    });
    if let Some(token) = wanted {
        let bearer = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = if path == "/ws" {
            query.split('&').any(|pair| pair == format!("token={token}"))
        } else {
            bearer == Some(format!("Bearer {token}").as_str())
        };
        if !ok {
            let body = json!({"error": {"type": "unauthorized", "message": "Unauthorized"}});
            return (StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "application/json")], body.to_string())
                .into_response();
        }
    }
    next.run(request).await
}

impl IntoResponse for Json200 {
    fn into_response(self) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], self.0.to_string()).into_response()
    }
}

async fn get_queue(State(shared): State<Arc<Shared>>) -> Response {
    shared.with(|s| {
        record(s, "GET", "/queue", Value::Null);
        if s.fail_polls {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        if s.cut_active > 0 {
            s.cut_active -= 1;
            return cut_off();
        }
        let graph = &s.queue_graph;
        let item = |(n, id): (usize, &String)| json!([n, id, graph, {"client_id": "x"}, []]);
        let body = json!({
            "queue_running": s.running.iter().enumerate().map(item).collect::<Vec<_>>(),
            "queue_pending": s.pending.iter().enumerate().map(|(n, id)| item((n + 100, id))).collect::<Vec<_>>(),
        });
        counted(s, "/queue", &body)
    })
}

/// `GET /api/jobs?status=…` as in ComfyUI 0.38 (`comfy_execution/jobs.py`): light items, no graphs.
async fn get_jobs(State(shared): State<Arc<Shared>>, Query(query): Query<HashMap<String, String>>) -> Response {
    shared.with(|s| {
        record(s, "GET", "/api/jobs", json!(query));
        if !s.jobs_api {
            return StatusCode::NOT_FOUND.into_response();
        }
        if s.fail_polls {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        if s.cut_active > 0 {
            s.cut_active -= 1;
            return cut_off();
        }
        let wanted = query.get("status").cloned().unwrap_or_else(|| "pending,in_progress".to_owned());
        let wanted: Vec<&str> = wanted.split(',').collect();
        let job = |id: &String, status: &str, priority: usize| {
            json!({"id": id, "status": status, "priority": priority, "create_time": 1, "outputs_count": 0})
        };
        let mut jobs = Vec::new();
        if wanted.contains(&"in_progress") {
            jobs.extend(s.running.iter().enumerate().map(|(n, id)| job(id, "in_progress", n)));
        }
        if wanted.contains(&"pending") {
            jobs.extend(s.pending.iter().enumerate().map(|(n, id)| job(id, "pending", n + 100)));
        }
        let total = jobs.len();
        // Paginated like ComfyUI's (C1): `limit` cuts the list and `has_more` says so.
        let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok());
        if let Some(limit) = limit {
            jobs.truncate(limit);
        }
        let has_more = jobs.len() < total;
        let body = json!({"jobs": jobs, "pagination": {"offset": 0, "limit": limit, "total": total, "has_more": has_more}});
        counted(s, "/api/jobs", &body)
    })
}

/// The jobs API's status of a finished prompt (`comfy_execution/jobs.py`): an interrupt is
/// `cancelled`, another error `failed`.
fn finished_status(entry: &Value) -> &'static str {
    let messages = entry.pointer("/status/messages").and_then(Value::as_array).cloned().unwrap_or_default();
    let last = messages.iter().rev().find_map(|m| {
        m.get(0)
            .and_then(Value::as_str)
            .filter(|k| k.starts_with("execution_") && *k != "execution_start" && *k != "execution_cached")
            .map(str::to_owned)
    });
    match last.as_deref() {
        Some("execution_success") => "completed",
        Some("execution_interrupted") => "cancelled",
        _ if entry.pointer("/status/status_str").and_then(Value::as_str) == Some("success") => "completed",
        _ => "failed",
    }
}

/// `GET /api/jobs/{id}` as in ComfyUI 0.38: the job with its outputs and status, 404 if unknown.
async fn get_job(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    shared.with(|s| {
        record(s, "GET", "/api/jobs/{id}", json!(id));
        if !s.jobs_api {
            return StatusCode::NOT_FOUND.into_response();
        }
        if s.fail_polls {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        let body = if s.running.contains(&id) {
            json!({"id": id, "status": "in_progress", "priority": 0, "outputs_count": 0})
        } else if s.pending.contains(&id) {
            json!({"id": id, "status": "pending", "priority": 100, "outputs_count": 0})
        } else if let Some(entry) = s.history.get(&id) {
            let status = finished_status(entry);
            let error = entry
                .pointer("/status/messages")
                .and_then(Value::as_array)
                .and_then(|m| m.iter().find(|m| m[0] == "execution_error"))
                .map(|m| m[1].clone());
            json!({"id": id, "status": status, "priority": 0, "outputs": entry["outputs"], "execution_status": entry["status"],
                   "execution_error": error, "execution_start_time": 1, "execution_end_time": 3})
        } else {
            let body = json!({"error": "Job not found"});
            return (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        };
        counted(s, "/api/jobs/{id}", &body)
    })
}

/// `POST /api/jobs/{id}/cancel` as in ComfyUI 0.38 (C3): removes a pending prompt or interrupts the
/// running one in one step; 200 `{"cancelled": bool}` even for unknown ids.
async fn cancel_job(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    shared.with(|s| {
        record(s, "POST", "/api/jobs/{id}/cancel", json!(id));
        if !(s.jobs_api && s.jobs_cancel) {
            return StatusCode::NOT_FOUND.into_response();
        }
        let cancelled = if s.pending.contains(&id) {
            s.pending.retain(|p| *p != id);
            true
        } else if s.interrupt_works && s.running.first() == Some(&id) {
            s.running.remove(0);
            s.history.insert(id.clone(), interrupted_entry(&id, "2", "KSampler"));
            if !s.pending.is_empty() {
                let next = s.pending.remove(0);
                s.running.push(next);
            }
            let event = json!({"type": "execution_interrupted", "data": {"prompt_id": id, "node_id": "2", "node_type": "KSampler", "executed": []}});
            s.sockets.retain(|socket| socket.send(Message::Text(event.to_string().into())).is_ok());
            true
        } else {
            false
        };
        Json200(json!({"cancelled": cancelled})).into_response()
    })
}

async fn get_features(State(shared): State<Arc<Shared>>) -> Response {
    shared.with(|s| {
        record(s, "GET", "/features", Value::Null);
        match &s.features {
            Some(features) => Json200(features.clone()).into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        }
    })
}

async fn post_queue(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    let body = parse_body(&body);
    shared.with(|s| {
        record(s, "POST", "/queue", body.clone());
        if let Some(ids) = body["delete"].as_array() {
            s.pending.retain(|p| !ids.iter().any(|id| id == p));
        }
    });
    StatusCode::OK
}

async fn get_history(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    shared.with(|s| {
        record(s, "GET", "/history", json!(id));
        if s.fail_polls {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        if s.cut_history > 0 {
            s.cut_history -= 1;
            return cut_off();
        }
        let body = match s.history.get(&id) {
            Some(entry) => json!({ id.clone(): entry }),
            None => json!({}),
        };
        counted(s, "/history", &body)
    })
}

async fn post_history(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    let body = parse_body(&body);
    shared.with(|s| {
        record(s, "POST", "/history", body.clone());
        if let Some(ids) = body["delete"].as_array() {
            s.history.retain(|k, _| !ids.iter().any(|id| id == k));
        }
    });
    StatusCode::OK
}

async fn post_interrupt(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    let body = parse_body(&body);
    shared.with(|s| {
        record(s, "POST", "/interrupt", body.clone());
        let Some(id) = body["prompt_id"].as_str() else { return };
        if s.interrupt_works && s.running.first().is_some_and(|r| r == id) {
            s.running.remove(0);
            s.history.insert(id.to_owned(), interrupted_entry(id, "2", "KSampler"));
            if !s.pending.is_empty() {
                let next = s.pending.remove(0);
                s.running.push(next);
            }
            let event = json!({"type": "execution_interrupted", "data": {"prompt_id": id, "node_id": "2", "node_type": "KSampler", "executed": []}});
            s.sockets
                .retain(|socket| socket.send(Message::Text(event.to_string().into())).is_ok());
        }
    });
    StatusCode::OK
}

async fn system_stats(State(shared): State<Arc<Shared>>) -> Response {
    shared.with(|s| record(s, "GET", "/system_stats", Value::Null));
    Json200(json!({
        "system": {"os": "posix", "comfyui_version": "0.3.64", "argv": ["/opt/ComfyUI/main.py", "--base-directory", "/data/comfy"]},
        "devices": [{"name": "cuda:0 Fake GPU", "type": "cuda", "index": 0, "vram_total": 8, "vram_free": 4}]
    }))
    .into_response()
}

async fn upload(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let length = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if let (Some(limit), Some(length)) = (shared.with(|s| s.max_upload), length)
        && length > limit
    {
        shared.with(|s| record(s, "POST", "/upload/image", json!("413")));
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let Ok(mut multipart) = <Multipart as axum::extract::FromRequest<()>>::from_request(request, &()).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut upload = Upload { filename: String::new(), subfolder: String::new(), overwrite: false, bytes: Vec::new() };
    let mut kind = "input".to_owned();
    while let Ok(Some(field)) = multipart.next_field().await {
        match field.name().unwrap_or_default() {
            "image" => {
                upload.filename = field.file_name().unwrap_or_default().to_owned();
                upload.bytes = field.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            }
            "subfolder" => upload.subfolder = field.text().await.unwrap_or_default(),
            "overwrite" => upload.overwrite = field.text().await.unwrap_or_default() == "true",
            "type" => kind = field.text().await.unwrap_or_default(),
            _ => {}
        }
    }
    if upload.filename.is_empty() {
        return StatusCode::BAD_REQUEST.into_response();
    }
    shared.with(|s| {
        record(s, "POST", "/upload/image", Value::Null);
        let name = s.rename_uploads_to.clone().unwrap_or_else(|| upload.filename.clone());
        let answer = json!({"name": name, "subfolder": upload.subfolder, "type": kind});
        s.uploads.push(upload);
        Json200(answer).into_response()
    })
}

async fn view(State(shared): State<Arc<Shared>>, Query(query): Query<HashMap<String, String>>) -> Response {
    shared.with(|s| {
        record(s, "GET", "/view", json!(query));
        let filename = query.get("filename").cloned().unwrap_or_default();
        match s.files.get(&filename) {
            Some((content_type, bytes)) => {
                ([(header::CONTENT_TYPE, content_type.clone())], bytes.clone()).into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        }
    })
}

async fn ws(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_id = query.get("clientId").cloned().unwrap_or_default();
    upgrade.on_upgrade(move |socket| serve_socket(shared, client_id, socket))
}

async fn serve_socket(shared: Arc<Shared>, client_id: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (queue_remaining, replay, flap) = shared.with(|s| {
        record(s, "WS", "/ws", json!(client_id));
        s.ws_client_ids.push(client_id.clone());
        s.sockets.push(tx);
        (s.running.len() + s.pending.len(), s.replay_executing.clone(), s.flap_sockets)
    });
    let hello = json!({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": queue_remaining}}, "sid": client_id}});
    if socket.send(Message::Text(hello.to_string().into())).await.is_err() {
        return;
    }
    if let Some(node) = replay {
        // ComfyUI re-sends the node it is executing to a reconnected client id, without a prompt id.
        let replay = json!({"type": "executing", "data": {"node": node}});
        if socket.send(Message::Text(replay.to_string().into())).await.is_err() {
            return;
        }
    }
    if flap {
        let _ = socket.send(Message::Close(None)).await;
        return;
    }
    loop {
        tokio::select! {
            outgoing = rx.recv() => match outgoing {
                Some(Message::Close(_)) | None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Some(message) => if socket.send(message).await.is_err() { return },
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(Message::Text(text))) => {
                    let hello = serde_json::from_str::<Value>(text.as_str()).unwrap_or(Value::Null);
                    let reply = shared.with(|s| s.features.clone());
                    if hello["type"] == "feature_flags"
                        && let Some(features) = reply
                    {
                        shared.with(|s| record(s, "WS", "feature_flags", hello["data"].clone()));
                        let answer = json!({"type": "feature_flags", "data": features});
                        if socket.send(Message::Text(answer.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(_)) => {}
            },
        }
    }
}
