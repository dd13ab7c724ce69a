//! HTTP routes: the same paths and response shapes as ComfyUI 0.3.64's `server.py`.
//!
//! Owns: routing (every route also under `/api`), the Origin check, JSON bodies with aiohttp's
//! `application/json; charset=utf-8`, bare empty-body statuses where ComfyUI gives them, and the
//! request handlers for prompts, queue, history, interrupt, uploads, `/view` (with HTTP Range),
//! system info and `object_info`. Validation lives in `validate`, execution in `executor`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use crate::assets;
use crate::catalog;
use crate::executor::Shared;
use crate::files::{self, UploadError, ViewRefusal};
use crate::json::{OMap, OValue, OrderedPairs};
use crate::queue::{QueueItem, QueueNumber};
use crate::validate::{self, Verdict};

/// Router state.
#[derive(Clone)]
pub struct AppState {
    /// shared simulator state
    pub shared: Arc<Shared>,
    /// flips to `true` when the server shuts down (ends WebSocket tasks)
    pub shutdown: watch::Receiver<bool>,
}

/// `extra_data` keys ComfyUI never stores (`execution.SENSITIVE_EXTRA_DATA_KEYS`).
const SENSITIVE_EXTRA_DATA_KEYS: &[&str] = &["auth_token_comfy_org", "api_key_comfy_org"];

const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

fn routes() -> Router<AppState> {
    Router::new()
        .route("/ws", get(crate::ws::handler))
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{prompt_id}", get(get_history_item))
        .route("/upload/image", post(upload_image))
        .route("/view", get(view))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/object_info", get(object_info))
        .route("/object_info/{node_class}", get(object_info_node))
        .route("/embeddings", get(|| async { json(StatusCode::OK, &Vec::<String>::new()) }))
        .route("/models", get(|| async { json(StatusCode::OK, &MODEL_FOLDERS) }))
        .route("/models/{folder}", get(models_in_folder))
        .route("/free", post(post_free))
}

/// Routes 0.38 has, with and without `/api` like the others.
fn newer_plain_routes() -> Router<AppState> {
    Router::new().route("/node_replacements", get(|| async { json(StatusCode::OK, &crate::replace::listing()) }))
}

/// Routes 0.38 declares with their `/api` prefix (so they exist only there).
fn newer_routes() -> Router<AppState> {
    Router::new()
        .route("/api/jobs", get(crate::jobs::list))
        .route("/api/jobs/cancel", post(crate::jobs::cancel_many))
        .route("/api/jobs/{job_id}", get(crate::jobs::get))
        .route("/api/jobs/{job_id}/cancel", post(crate::jobs::cancel))
}

/// The complete application.
pub fn router(state: AppState) -> Router {
    let limit = usize::try_from(state.shared.config.max_upload_bytes).unwrap_or(usize::MAX);
    let mut app = Router::new().merge(routes()).nest("/api", routes());
    if state.shared.config.comfy_version.is_newer() {
        app = app.merge(newer_routes()).merge(newer_plain_routes()).nest("/api", newer_plain_routes());
    }
    app.layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(origin_only))
        .layer(middleware::from_fn_with_state(state.clone(), bearer_auth))
        .with_state(state)
}

/// A JSON response as aiohttp's `json_response` sends it.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json; charset=utf-8")], bytes).into_response(),
        Err(_) => bare(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// A status with an empty body.
pub fn bare(status: StatusCode) -> Response {
    status.into_response()
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Splits `host[:port]` (IPv6 in brackets) into host and optional port.
fn split_host_port(authority: &str) -> (String, Option<&str>) {
    let authority = authority.trim();
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        return (host.to_lowercase(), after.strip_prefix(':'));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_lowercase(), Some(p)),
        _ => (authority.to_lowercase(), None),
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The optional bearer check of an authenticating wrapper (C19, `--auth-token`): every route wants
/// `Authorization: Bearer <token>`; `/ws` may carry `?token=<token>` instead (browsers cannot set
/// headers on a WebSocket). Both profiles: it is not ComfyUI's own rule.
async fn bearer_auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.shared.config.auth_token.as_deref() else {
        return next.run(request).await;
    };
    let header_ok = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same_secret(t.trim().as_bytes(), expected.as_bytes()));
    let path = request.uri().path();
    let query_ok = (path == "/ws" || path == "/api/ws")
        && request.uri().query().is_some_and(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .any(|(k, v)| k == "token" && same_secret(&percent_decode(v), expected.as_bytes()))
        });
    if header_ok || query_ok {
        return next.run(request).await;
    }
    let mut error = OMap::new();
    error.insert("type", OValue::str("unauthorized"));
    error.insert(
        "message",
        OValue::str("Missing or invalid token: send Authorization: Bearer <token> (or ?token= on /ws)"),
    );
    let mut body = OMap::new();
    body.insert("error", OValue::Object(error));
    let mut response = json(StatusCode::UNAUTHORIZED, &body);
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// `%XX` decoding of a query value (`+` is a space); a malformed escape stays as it is.
fn percent_decode(v: &str) -> Vec<u8> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// ComfyUI's origin-only middleware: on a loopback Host, a mismatching Origin gets 403.
async fn origin_only(request: Request, next: Next) -> Response {
    let headers = request.headers();
    if let (Some(host), Some(origin)) = (
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
    ) {
        let origin_authority = origin.split_once("://").map_or("", |(_, rest)| rest).split('/').next().unwrap_or("");
        let (host_name, host_port) = split_host_port(host);
        let (origin_name, origin_port) = split_host_port(origin_authority);
        if is_loopback(&host_name) && !origin_name.is_empty() && !host_name.is_empty() {
            // Ports are compared only when both sides carry one, like ComfyUI does.
            let mismatch =
                host_name != origin_name || (host_port.is_some() && origin_port.is_some() && host_port != origin_port);
            if mismatch {
                tracing::warn!(host, origin, "request with non matching host and origin, returning 403");
                return bare(StatusCode::FORBIDDEN);
            }
        }
    }
    next.run(request).await
}

fn queue_info(state: &AppState) -> OValue {
    let mut exec_info = OMap::new();
    exec_info.insert("queue_remaining", OValue::Number((state.shared.queue.remaining() as u64).into()));
    let mut m = OMap::new();
    m.insert("exec_info", OValue::Object(exec_info));
    OValue::Object(m)
}

async fn get_prompt(State(state): State<AppState>) -> Response {
    json(StatusCode::OK, &queue_info(&state))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn is_canonical_uuid(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

fn prompt_error(kind: &str, message: &str, details: &str) -> Response {
    let mut error = OMap::new();
    error.insert("type", OValue::str(kind));
    error.insert("message", OValue::str(message));
    error.insert("details", OValue::str(details));
    error.insert("extra_info", OValue::Object(OMap::new()));
    let mut body = OMap::new();
    body.insert("error", OValue::Object(error));
    body.insert("node_errors", OValue::Object(OMap::new()));
    json(StatusCode::BAD_REQUEST, &body)
}

async fn post_prompt(State(state): State<AppState>, body: Bytes) -> Response {
    let shared = &state.shared;
    let Ok(OValue::Object(request)) = OValue::parse(&body) else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let number = match request.get("number") {
        Some(v) => match validate::convert(v, "FLOAT") {
            Ok(Some(OValue::Number(n))) => QueueNumber::Given(n.as_f64().unwrap_or(0.0)),
            _ => return bare(StatusCode::INTERNAL_SERVER_ERROR),
        },
        None => shared.queue.next_number(request.get("front").is_some_and(OValue::truthy)),
    };
    let Some(prompt) = request.get("prompt") else {
        return prompt_error("no_prompt", "No prompt provided", "No prompt provided");
    };
    let prompt_id = match request.get("prompt_id") {
        None | Some(OValue::Null) => uuid::Uuid::new_v4().to_string(),
        // 0.3.64 takes any value as `str(prompt_id)` (captured: "my-own-id-123"); 0.38 wants a
        // canonical UUID (C4).
        Some(other) if !shared.config.comfy_version.is_newer() => other.py_str(),
        Some(OValue::String(id)) if is_canonical_uuid(id) => id.clone(),
        Some(_) => {
            return prompt_error(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
            );
        }
    };
    let partial: Option<Vec<String>> = request
        .get("partial_execution_targets")
        .and_then(OValue::as_array)
        .map(|a| a.iter().map(OValue::py_str).collect());
    let OValue::Object(mut graph) = prompt.clone() else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    if shared.config.comfy_version.is_newer() {
        let lists = shared.lists();
        crate::replace::apply(&mut graph, |class| catalog::node_spec(class, &lists).is_some());
    }
    let Some((verdict, graph)) = validate_on_big_stack(graph, partial, shared).await else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };

    let mut extra_data = request.get("extra_data").and_then(OValue::as_object).cloned().unwrap_or_default();
    if let Some(client_id) = request.get("client_id") {
        extra_data.insert("client_id", client_id.clone());
    }
    if shared.config.comfy_version.is_newer() {
        // 0.38 stamps every prompt (C14); the jobs API sorts by it.
        extra_data.insert("create_time", OValue::Number(now_ms().into()));
    }
    for key in SENSITIVE_EXTRA_DATA_KEYS {
        extra_data.remove(key);
    }
    match verdict {
        Verdict::Accepted { outputs, node_errors } => {
            shared.queue.put(QueueItem {
                number,
                prompt_id: prompt_id.clone(),
                graph: Arc::new(graph),
                extra_data: Arc::new(extra_data),
                outputs: Arc::new(outputs),
            });
            let mut body = OMap::new();
            body.insert("prompt_id", OValue::String(prompt_id));
            body.insert("number", number.to_ovalue());
            body.insert("node_errors", OValue::Object(node_errors));
            json(StatusCode::OK, &body)
        }
        Verdict::Rejected { error, node_errors } => {
            tracing::info!(error = ?error.get("type"), "invalid prompt");
            let mut body = OMap::new();
            body.insert("error", OValue::Object(error));
            body.insert("node_errors", OValue::Object(node_errors));
            json(StatusCode::BAD_REQUEST, &body)
        }
        Verdict::Malformed => bare(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

/// Validation recurses along links like ComfyUI's does (up to Python's recursion limit), which
/// needs more stack than an async worker thread has; it runs on its own thread instead.
async fn validate_on_big_stack(
    mut graph: OMap,
    partial: Option<Vec<String>>,
    shared: &Shared,
) -> Option<(Verdict, OMap)> {
    let lists = shared.lists();
    let dirs = shared.dirs.clone();
    let newer = shared.config.comfy_version.is_newer();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("validate-prompt".into())
        .stack_size(256 * 1024 * 1024)
        .spawn(move || {
            let verdict = validate::validate_prompt(&mut graph, partial.as_deref(), &lists, &dirs, newer);
            let _ = tx.send((verdict, graph));
        })
        .ok()?;
    rx.await.ok()
}

#[derive(Serialize)]
struct QueueBody {
    queue_running: Vec<QueueItem>,
    queue_pending: Vec<QueueItem>,
}

async fn get_queue(State(state): State<AppState>) -> Response {
    let (queue_running, queue_pending) = state.shared.queue.snapshot();
    json(StatusCode::OK, &QueueBody { queue_running, queue_pending })
}

fn ids_of(value: Option<&OValue>) -> Vec<String> {
    value.and_then(OValue::as_array).map(|a| a.iter().map(OValue::py_str).collect()).unwrap_or_default()
}

async fn post_queue(State(state): State<AppState>, body: Bytes) -> Response {
    let Ok(OValue::Object(request)) = OValue::parse(&body) else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    if request.get("clear").is_some_and(OValue::truthy) {
        state.shared.queue.wipe();
    }
    for id in ids_of(request.get("delete")) {
        state.shared.queue.delete(&id);
    }
    bare(StatusCode::OK)
}

async fn post_interrupt(State(state): State<AppState>, body: Bytes) -> Response {
    let request = OValue::parse(&body).ok();
    let target = request.as_ref().and_then(|r| r.get("prompt_id")).filter(|v| v.truthy()).map(OValue::py_str);
    match target {
        Some(id) => {
            if state.shared.queue.running_id().as_deref() == Some(id.as_str()) {
                tracing::info!(prompt_id = %id, "interrupting prompt");
                state.shared.interrupt.trigger();
            } else {
                tracing::info!(prompt_id = %id, "prompt is not currently running, skipping interrupt");
            }
        }
        None => state.shared.interrupt.trigger(),
    }
    bare(StatusCode::OK)
}

fn parse_int_param(params: &HashMap<String, String>, key: &str) -> Result<Option<i64>, ()> {
    params.get(key).map(|v| v.trim().parse::<i64>().map_err(|_| ())).transpose()
}

async fn get_history(State(state): State<AppState>, Query(params): Query<HashMap<String, String>>) -> Response {
    let (Ok(max_items), Ok(offset)) = (parse_int_param(&params, "max_items"), parse_int_param(&params, "offset"))
    else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let entries = state.shared.queue.history_list(max_items, offset);
    let pairs: Vec<(String, &crate::queue::HistoryEntry)> = entries.iter().map(|(k, v)| (k.clone(), &**v)).collect();
    json(StatusCode::OK, &OrderedPairs(&pairs))
}

async fn get_history_item(State(state): State<AppState>, UrlPath(prompt_id): UrlPath<String>) -> Response {
    match state.shared.queue.history_get(&prompt_id) {
        Some(entry) => json(StatusCode::OK, &OrderedPairs(&[(prompt_id, &*entry)])),
        None => json(StatusCode::OK, &OMap::new()),
    }
}

async fn post_history(State(state): State<AppState>, body: Bytes) -> Response {
    let Ok(OValue::Object(request)) = OValue::parse(&body) else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    if request.get("clear").is_some_and(OValue::truthy) {
        state.shared.queue.history_clear();
    }
    for id in ids_of(request.get("delete")) {
        state.shared.queue.history_delete(&id);
    }
    bare(StatusCode::OK)
}

async fn post_free(body: Bytes) -> Response {
    match OValue::parse(&body) {
        Ok(OValue::Object(_)) => bare(StatusCode::OK),
        _ => bare(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

async fn upload_image(State(state): State<AppState>, multipart: Result<Multipart, MultipartRejection>) -> Response {
    let delay = state.shared.config.faults.upload_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let Ok(mut multipart) = multipart else {
        return bare(StatusCode::BAD_REQUEST);
    };
    let mut image: Option<(Option<String>, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                if name == "image" {
                    let file_name = field.file_name().map(str::to_string);
                    let Ok(bytes) = field.bytes().await else {
                        return bare(StatusCode::BAD_REQUEST);
                    };
                    if image.is_none() {
                        image = Some((file_name, bytes));
                    }
                } else {
                    let Ok(text) = field.text().await else {
                        return bare(StatusCode::BAD_REQUEST);
                    };
                    fields.entry(name).or_insert(text);
                }
            }
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return bare(StatusCode::PAYLOAD_TOO_LARGE);
            }
            Err(_) => return bare(StatusCode::BAD_REQUEST),
        }
    }
    let Some((Some(filename), bytes)) = image else {
        return bare(StatusCode::BAD_REQUEST);
    };
    if filename.is_empty() {
        return bare(StatusCode::BAD_REQUEST);
    }
    let dir_type = fields.get("type").cloned().unwrap_or_else(|| "input".to_string());
    let Some(dir) = state.shared.dirs.by_type(&dir_type) else {
        // ComfyUI crashes on an unknown type (UnboundLocalError).
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let overwrite = matches!(fields.get("overwrite").map(String::as_str), Some("true" | "1"));
    // File work goes to the blocking pool: in `tdcomfy up` the simulator shares its runtime with
    // the broker and the worker.
    let (dir, sub, name) = (dir.to_path_buf(), subfolder.clone(), filename.clone());
    let tag = dir_type.clone();
    let with_asset = state.shared.config.assets && state.shared.config.comfy_version.is_newer();
    let placed = tokio::task::spawn_blocking(move || {
        let target = files::place_upload(&dir, &sub, &name, &bytes, overwrite)?;
        if target.write {
            files::write_atomic(&target.path, &bytes).map_err(UploadError::Io)?;
        }
        let asset = with_asset.then(|| assets::upload_asset(&target.name, &bytes, &tag));
        Ok::<_, UploadError>((target, asset))
    })
    .await;
    let (target, asset) = match placed {
        Ok(Ok(t)) => t,
        Ok(Err(UploadError::Escapes)) => return bare(StatusCode::BAD_REQUEST),
        Ok(Err(UploadError::Io(e))) => {
            tracing::warn!(error = %e, "upload failed");
            return bare(StatusCode::INTERNAL_SERVER_ERROR);
        }
        Err(e) => {
            tracing::warn!(error = %e, "upload task failed");
            return bare(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    let mut body = OMap::new();
    body.insert("name", OValue::String(target.name));
    body.insert("subfolder", OValue::String(subfolder));
    body.insert("type", OValue::String(dir_type));
    if let Some(asset) = asset {
        body.insert("asset", asset);
    }
    json(StatusCode::OK, &body)
}

fn disposition(name: &str) -> HeaderValue {
    let safe = name.replace('\\', "\\\\").replace('"', "\\\"");
    // from_bytes keeps UTF-8 names (aiohttp sends them raw); control characters fall back.
    HeaderValue::from_bytes(format!("filename=\"{safe}\"").as_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// Parses a single `bytes=` range against a file length. `Err(())` means unsatisfiable.
fn parse_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let suffix: u64 = end.parse().ok()?;
        if suffix == 0 {
            return Some(Err(()));
        }
        (len.saturating_sub(suffix), len.saturating_sub(1))
    } else {
        let s: u64 = start.parse().ok()?;
        if s >= len {
            return Some(Err(()));
        }
        let e: u64 = if end.is_empty() { len.saturating_sub(1) } else { end.parse().ok()? };
        if e < s {
            return None;
        }
        (s, e.min(len.saturating_sub(1)))
    };
    if range.0 >= len { Some(Err(())) } else { Some(Ok(range)) }
}

fn encoded_image(body: Vec<u8>, content_type: &str, name: &str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("image/png")),
    );
    headers.insert(header::CONTENT_DISPOSITION, disposition(name));
    (StatusCode::OK, headers, body).into_response()
}

/// `preview=` / `channel=` re-encodings of an image file.
fn transcode(path: &std::path::Path, name: &str, preview: Option<&str>, channel: &str) -> Response {
    let Ok(img) = image::open(path) else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let mut out = std::io::Cursor::new(Vec::new());
    if let Some(preview) = preview {
        let parts: Vec<&str> = preview.split(';').collect();
        let mut format = parts.first().copied().unwrap_or("webp");
        if !matches!(format, "webp" | "jpeg") || channel.contains('a') {
            format = "webp";
        }
        let quality = parts.last().and_then(|q| q.parse::<u8>().ok()).unwrap_or(90).clamp(1, 100);
        let ok = if format == "jpeg" {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(&img.to_rgb8()).is_ok()
        } else if channel == "rgb" {
            img.to_rgb8().write_to(&mut out, image::ImageFormat::WebP).is_ok()
        } else {
            img.write_to(&mut out, image::ImageFormat::WebP).is_ok()
        };
        if !ok {
            return bare(StatusCode::INTERNAL_SERVER_ERROR);
        }
        return encoded_image(out.into_inner(), &format!("image/{format}"), name);
    }
    let converted = if channel == "rgb" {
        image::DynamicImage::ImageRgb8(img.to_rgb8())
    } else {
        let alpha = img.to_rgba8();
        image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(alpha.width(), alpha.height(), |x, y| {
            image::Rgba([0, 0, 0, alpha.get_pixel(x, y)[3]])
        }))
    };
    if converted.write_to(&mut out, image::ImageFormat::Png).is_err() {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    }
    encoded_image(out.into_inner(), "image/png", name)
}

async fn view(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(filename) = params.get("filename") else {
        return bare(StatusCode::NOT_FOUND);
    };
    let (path, name) = match files::resolve_view(
        &state.shared.dirs,
        filename,
        params.get("type").map(String::as_str),
        params.get("subfolder").map(String::as_str),
    ) {
        Ok(found) => found,
        Err(ViewRefusal::BadRequest) => return bare(StatusCode::BAD_REQUEST),
        Err(ViewRefusal::Forbidden) => return bare(StatusCode::FORBIDDEN),
        Err(ViewRefusal::NotFound) => return bare(StatusCode::NOT_FOUND),
    };
    let channel = params.get("channel").cloned().unwrap_or_default();
    if params.contains_key("preview") || channel == "rgb" || channel == "a" {
        let preview = params.get("preview").cloned();
        let name2 = name.clone();
        return tokio::task::spawn_blocking(move || transcode(&path, &name2, preview.as_deref(), &channel))
            .await
            .unwrap_or_else(|_| bare(StatusCode::INTERNAL_SERVER_ERROR));
    }
    serve_file(&path, &name, &headers).await
}

async fn serve_file(path: &std::path::Path, name: &str, request_headers: &HeaderMap) -> Response {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return bare(StatusCode::NOT_FOUND);
    };
    let Ok(len) = file.metadata().await.map(|m| m.len()) else {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(files::content_type(name)));
    headers.insert(header::CONTENT_DISPOSITION, disposition(name));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let range = request_headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| parse_range(v, len));
    let (status, start, count) = match range {
        Some(Ok((start, end))) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Some(Err(())) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            return (StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response();
        }
        None => (StatusCode::OK, 0, len),
    };
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return bare(StatusCode::INTERNAL_SERVER_ERROR);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    // Large reads: every read of a tokio file is a hop to the blocking pool.
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), 256 * 1024);
    (status, headers, Body::from_stream(stream)).into_response()
}

async fn system_stats(State(state): State<AppState>) -> Response {
    const GIB: u64 = 1 << 30;
    let config = &state.shared.config;
    let newer = config.comfy_version.is_newer();
    // 0.3.64 lists the device it runs on; 0.38 every GPU, the primary first (C15).
    let gpus = if newer { config.gpus.max(1) } else { 1 };
    let devices: Vec<serde_json::Value> = (0..gpus)
        .map(|i| {
            serde_json::json!({
                "name": format!("cuda:{i} tdcomfy simulated GPU : cudaMallocAsync"),
                "type": "cuda",
                "index": i,
                "vram_total": 24 * GIB,
                "vram_free": 22 * GIB,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            })
        })
        .collect();
    let mut body = serde_json::json!({
        "system": {
            // `os.name` on 0.3.64, `sys.platform` on 0.38
            "os": if newer { "linux" } else { "posix" },
            "ram_total": 64 * GIB,
            "ram_free": 48 * GIB,
            "comfyui_version": state.shared.config.comfy_version.full(),
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (tdcomfy sim) [rustc]",
            "pytorch_version": "2.8.0+cu128",
            "embedded_python": false,
            // Absolute, like a real ComfyUI started with `--base-directory`: a worker on the same
            // machine finds input/ and output/ from it.
            "argv": ["main.py", "--listen", "--tdcomfy-sim", "--base-directory", state.shared.dirs.root.to_string_lossy()],
        },
        "devices": devices,
    });
    if newer {
        body["system"]["comfy_package_versions"] = serde_json::json!({
            "comfyui_frontend_package": "1.30.6",
            "comfyui_workflow_templates": "0.7.25",
            "comfyui_embedded_docs": "0.3.1",
        });
        body["system"]["deploy_environment"] = serde_json::json!("local");
    }
    json(StatusCode::OK, &body)
}

/// The server's feature flags (`comfy_api/feature_flags.py`), the `feature_flags` reply and
/// `GET /features` alike: 0.3.64 has two, 0.38 more (C8).
pub fn server_feature_flags(config: &crate::SimConfig) -> OMap {
    let mut body = OMap::new();
    body.insert("supports_preview_metadata", OValue::Bool(true));
    body.insert("max_upload_size", OValue::Number(config.max_upload_bytes.into()));
    if config.comfy_version.is_newer() {
        body.insert("supports_model_type_tags", OValue::Bool(true));
        let mut manager = OMap::new();
        manager.insert("supports_v4", OValue::Bool(true));
        let mut extension = OMap::new();
        extension.insert("manager", OValue::Object(manager));
        body.insert("extension", OValue::Object(extension));
        body.insert("node_replacements", OValue::Bool(true));
        body.insert("assets", OValue::Bool(config.assets));
    }
    body
}

async fn features(State(state): State<AppState>) -> Response {
    json(StatusCode::OK, &server_feature_flags(&state.shared.config))
}

async fn object_info(State(state): State<AppState>) -> Response {
    json(StatusCode::OK, &catalog::all_node_info(&state.shared.lists()))
}

async fn object_info_node(State(state): State<AppState>, UrlPath(node_class): UrlPath<String>) -> Response {
    let mut body = OMap::new();
    if let Some(info) = catalog::node_info(&node_class, &state.shared.lists()) {
        body.insert(node_class, info);
    }
    json(StatusCode::OK, &body)
}

async fn models_in_folder(State(state): State<AppState>, UrlPath(folder): UrlPath<String>) -> Response {
    if !MODEL_FOLDERS.contains(&folder.as_str()) {
        return bare(StatusCode::NOT_FOUND);
    }
    let models: Vec<String> = if matches!(folder.as_str(), "checkpoints" | "text_encoders") {
        state.shared.lists().models
    } else {
        Vec::new()
    };
    json(StatusCode::OK, &models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_http() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert!(is_canonical_uuid("ed1b3726-29db-4308-a3e7-1b26e127d1f4"));
        assert!(!is_canonical_uuid("ED1B3726-29DB-4308-A3E7-1B26E127D1F4"));
        assert!(!is_canonical_uuid("my-own-id-123"));
        assert!(!is_canonical_uuid("ed1b372629db4308a3e71b26e127d1f4"));
    }
}
