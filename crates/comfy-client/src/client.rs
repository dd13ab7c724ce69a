//! HTTP client for one ComfyUI server: upload, queue, history, queue control, targeted interrupt,
//! streamed downloads and the health probe. Every ComfyUI route the product uses is spelled here
//! and nowhere else.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

use crate::endpoint::ComfyEndpoint;
use crate::error::{ComfyError, ValidationReport};
use crate::features::{PreviewMethod, ServerFeatures};
use crate::ids::{ClientId, PromptId};
use crate::outputs::OutputFile;
use crate::responses::{HistoryEntry, JobLookup, QueueState, QueuedPrompt, SystemStats, UploadedImage};

/// Time limits for HTTP calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComfyTimeouts {
    /// TCP connect (a dead host should fail fast).
    pub connect: Duration,
    /// Whole request for small JSON calls (`/prompt`, `/history`, `/queue`, …).
    pub request: Duration,
    /// Whole request for uploads.
    pub upload: Duration,
    /// Longest silence while streaming a download body; there is no total limit because videos
    /// can be large.
    pub read_idle: Duration,
}

impl Default for ComfyTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
            upload: Duration::from_secs(120),
            read_idle: Duration::from_secs(60),
        }
    }
}

/// Where the bytes of an upload come from.
#[derive(Debug, Clone)]
pub enum UploadSource {
    /// Bytes already in memory.
    Bytes(Bytes),
    /// A local file, streamed from disk.
    File(PathBuf),
}

/// One `POST /upload/image` request.
#[derive(Debug, Clone)]
pub struct ImageUpload {
    /// File name to store under (ComfyUI may rename it; use [`UploadedImage::name`]).
    pub name: String,
    /// Sub-directory of `input/` (e.g. a job-scoped `td/<job>`); empty for none.
    pub subfolder: String,
    /// Replace an existing file of the same name instead of getting a renamed copy.
    pub overwrite: bool,
    /// The bytes.
    pub source: UploadSource,
}

impl ImageUpload {
    /// Upload of in-memory bytes.
    pub fn from_bytes(name: impl Into<String>, bytes: impl Into<Bytes>) -> Self {
        Self {
            name: name.into(),
            subfolder: String::new(),
            overwrite: false,
            source: UploadSource::Bytes(bytes.into()),
        }
    }

    /// Upload of a local file, streamed.
    pub fn from_file(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self { name: name.into(), subfolder: String::new(), overwrite: false, source: UploadSource::File(path.into()) }
    }

    /// Sets the sub-directory.
    pub fn in_subfolder(mut self, subfolder: impl Into<String>) -> Self {
        self.subfolder = subfolder.into();
        self
    }

    /// Sets the overwrite flag.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }
}

/// A streamed `/view` download. Implements `Stream<Item = Result<Bytes, ComfyError>>`; the body
/// is never buffered whole.
pub struct Download {
    /// `Content-Length`, when the server sent one.
    pub content_length: Option<u64>,
    /// `Content-Type`, when the server sent one.
    pub content_type: Option<String>,
    body: BoxStream<'static, Result<Bytes, ComfyError>>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("content_length", &self.content_length)
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

impl Stream for Download {
    type Item = Result<Bytes, ComfyError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.body.poll_next_unpin(cx)
    }
}

/// HTTP client for one ComfyUI server, bound to one client id. Cheap to clone.
///
/// The client id must be unique per process and server: ComfyUI sends a prompt's execution
/// events only to the (last) socket opened with the client id the prompt was posted with.
#[derive(Clone)]
pub struct ComfyClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: ComfyEndpoint,
    label: String,
    client_id: ClientId,
    timeouts: ComfyTimeouts,
    http: reqwest::Client,
    /// `COMFYUI_TOKEN`, for `?token=` on the WebSocket (HTTP sends it as a default header).
    token: Option<String>,
    /// What the server showed it supports on the current connection. A std mutex: it is only
    /// held to copy or change a few fields, never across an await.
    features: Mutex<FeatureState>,
}

#[derive(Default)]
struct FeatureState {
    features: ServerFeatures,
    /// A full detection ([`ComfyClient::detect_features`]) ran for the current connection.
    detected: bool,
}

/// The `Comfy-Usage-Source` header (C14): newer ComfyUI records it in `extra_data`.
const USAGE_SOURCE: &str = "tdcomfy";

impl std::fmt::Debug for ComfyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfyClient")
            .field("endpoint", &self.inner.endpoint)
            .field("client_id", &self.inner.client_id)
            .finish_non_exhaustive()
    }
}

impl ComfyClient {
    /// Creates a client. Fails only if the HTTP stack cannot be initialised.
    pub fn new(endpoint: ComfyEndpoint, client_id: ClientId, timeouts: ComfyTimeouts) -> Result<Self, ComfyError> {
        Self::with_token(endpoint, client_id, timeouts, None)
    }

    /// Creates a client that authenticates with `token` (C19: `Authorization: Bearer` on every
    /// HTTP request, `?token=` on `/ws`), for a ComfyUI behind a token-checking wrapper or proxy.
    pub fn with_token(
        endpoint: ComfyEndpoint,
        client_id: ClientId,
        timeouts: ComfyTimeouts,
        token: Option<String>,
    ) -> Result<Self, ComfyError> {
        let label = endpoint.to_string();
        let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        let invalid = |reason: String| ComfyError::Transport { endpoint: label.clone(), route: String::new(), reason };
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("comfy-usage-source", reqwest::header::HeaderValue::from_static(USAGE_SOURCE));
        if let Some(token) = &token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ComfyError::InvalidInput("COMFYUI_TOKEN must be visible ASCII".to_owned()))?;
            // Kept out of reqwest's debug output.
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        // No `Origin` header, ever: ComfyUI answers 403 to a loopback Host with a foreign Origin
        // (C18), and reqwest sends none unless told to.
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read_idle)
            // ComfyUI is on the LAN; an HTTP(S)_PROXY meant for internet traffic must not
            // capture it.
            .no_proxy()
            .build()
            .map_err(|e| invalid(crate::error::error_chain(&e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                label,
                client_id,
                timeouts,
                http,
                token,
                features: Mutex::new(FeatureState::default()),
            }),
        })
    }

    /// The token sent to ComfyUI, if any (the event socket puts it in its URL).
    pub(crate) fn token(&self) -> Option<&str> {
        self.inner.token.as_deref()
    }

    /// The server.
    pub fn endpoint(&self) -> &ComfyEndpoint {
        &self.inner.endpoint
    }

    /// The client id sent with every prompt and used for the WebSocket.
    pub fn client_id(&self) -> &ClientId {
        &self.inner.client_id
    }

    /// The configured time limits.
    pub fn timeouts(&self) -> &ComfyTimeouts {
        &self.inner.timeouts
    }

    /// `POST /upload/image`: stores an input file. Use the returned name (ComfyUI renames on a
    /// collision with different bytes unless `overwrite` is set).
    pub async fn upload_image(&self, upload: ImageUpload) -> Result<UploadedImage, ComfyError> {
        const ROUTE: &str = "upload/image";
        validate_file_name(&upload.name)?;
        let subfolder = normalise_subfolder(&upload.subfolder)?;
        let mime = tdcomfy_api::media::mime_for_extension(upload.name.rsplit_once('.').map_or("", |(_, e)| e));
        let (part, size) = match upload.source {
            UploadSource::Bytes(bytes) => {
                let size = bytes.len() as u64;
                (reqwest::multipart::Part::stream_with_length(bytes, size), size)
            }
            UploadSource::File(path) => file_part(&path).await?,
        };
        // Refused here, before a byte travels: ComfyUI would cut the upload off with a 413 after
        // reading up to its limit (C8), and no retry can make the frame smaller.
        let limit = self.ensure_features().await.max_upload_size;
        if let Some(limit) = limit
            && size > limit
        {
            return Err(ComfyError::UploadTooLarge { endpoint: self.inner.label.clone(), size, limit: Some(limit) });
        }
        let part = part
            .file_name(upload.name.clone())
            .mime_str(mime)
            .map_err(|e| ComfyError::InvalidInput(format!("mime type {mime}: {e}")))?;
        let mut form = reqwest::multipart::Form::new().part("image", part).text("type", "input");
        if !subfolder.is_empty() {
            form = form.text("subfolder", subfolder);
        }
        if upload.overwrite {
            form = form.text("overwrite", "true");
        }
        let response = self
            .send(
                ROUTE,
                self.inner
                    .http
                    .post(self.inner.endpoint.http_url(ROUTE))
                    .multipart(form)
                    .timeout(self.inner.timeouts.upload),
            )
            .await?;
        if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Err(ComfyError::UploadTooLarge { endpoint: self.inner.label.clone(), size, limit });
        }
        let response = self.check_status(ROUTE, response).await?;
        let body = self.read_json(ROUTE, response).await?;
        serde_json::from_value::<UploadedImage>(body).map_err(|e| ComfyError::Protocol {
            route: ROUTE.to_owned(),
            reason: format!("upload answer without a name: {e}"),
        })
    }

    /// `POST /prompt` with our client id and `prompt_id`, without previews
    /// ([`ComfyClient::queue_prompt_with`] with [`PreviewMethod::None`]).
    pub async fn queue_prompt(&self, graph: &Value, prompt_id: &PromptId) -> Result<QueuedPrompt, ComfyError> {
        self.queue_prompt_with(graph, prompt_id, PreviewMethod::None).await
    }

    /// `POST /prompt` with our client id, `prompt_id` and `extra_data.preview_method`.
    ///
    /// The client id is always sent: without it ComfyUI sends none of the prompt's execution
    /// events (C6). The preview method is always sent: newer ComfyUI resets it per prompt (C5).
    ///
    /// A 400, or a 200 whose `node_errors` is non-empty, becomes [`ComfyError::Validation`]. In the
    /// 200 case ComfyUI has already queued the valid outputs; this method removes that prompt
    /// (queue delete + targeted interrupt) before returning, so nothing half-valid runs.
    pub async fn queue_prompt_with(
        &self,
        graph: &Value,
        prompt_id: &PromptId,
        preview_method: PreviewMethod,
    ) -> Result<QueuedPrompt, ComfyError> {
        const ROUTE: &str = "prompt";
        if graph.as_object().is_none_or(|g| g.is_empty()) {
            return Err(ComfyError::InvalidInput("the graph must be a non-empty JSON object".to_owned()));
        }
        let body = json!({
            "prompt": graph,
            "client_id": self.inner.client_id.as_str(),
            "prompt_id": prompt_id.as_str(),
            "extra_data": {"preview_method": preview_method.as_str()},
        });
        let response = self.post_json(ROUTE, &body).await?;
        let status = response.status();
        if status == StatusCode::BAD_REQUEST {
            let text = self.read_text(ROUTE, response).await?;
            let parsed = serde_json::from_str::<Value>(&text).ok();
            return Err(match parsed.and_then(|v| ValidationReport::from_body(400, &v)) {
                Some(mut report) => {
                    report.name_nodes_from(graph);
                    ComfyError::Validation(report)
                }
                None => ComfyError::Status { route: ROUTE.to_owned(), status: 400, body: truncate(&text) },
            });
        }
        let response = self.check_status(ROUTE, response).await?;
        let body = self.read_json(ROUTE, response).await?;
        if let Some(mut report) = ValidationReport::from_body(status.as_u16(), &body) {
            report.partially_queued = true;
            report.name_nodes_from(graph);
            // Best effort: the prompt must not run half-valid; a failure here is logged, the
            // validation error is what the caller needs to see.
            if let Err(error) = self.delete_pending(prompt_id).await {
                tracing::warn!(%prompt_id, %error, "could not delete partially valid prompt from the queue");
            }
            if let Err(error) = self.interrupt(prompt_id).await {
                tracing::warn!(%prompt_id, %error, "could not interrupt partially valid prompt");
            }
            return Err(ComfyError::Validation(report));
        }
        let echoed = body.get("prompt_id").and_then(Value::as_str);
        if let Some(echoed) = echoed
            && !prompt_id.matches(echoed)
        {
            return Err(ComfyError::Protocol {
                route: ROUTE.to_owned(),
                reason: format!("server queued prompt {echoed:?} instead of {prompt_id}"),
            });
        }
        let number = body.get("number").and_then(Value::as_f64).unwrap_or_default();
        Ok(QueuedPrompt { prompt_id: prompt_id.clone(), number })
    }

    /// `GET /history/{id}`: `None` while the prompt is queued/running, or if unknown/evicted.
    pub async fn history(&self, prompt_id: &PromptId) -> Result<Option<HistoryEntry>, ComfyError> {
        let route = format!("history/{prompt_id}");
        let body = self.get_json(&route).await?;
        Ok(HistoryEntry::from_response(prompt_id.as_str(), &body))
    }

    /// `GET /queue`.
    pub async fn queue(&self) -> Result<QueueState, ComfyError> {
        let body = self.get_json("queue").await?;
        if !body.is_object() {
            return Err(ComfyError::Protocol {
                route: "queue".to_owned(),
                reason: "expected a JSON object".to_owned(),
            });
        }
        Ok(QueueState::from_value(&body))
    }

    /// The running and pending prompts, without their graphs where the server allows it: ComfyUI
    /// with the jobs API (C1, after 0.3.64) answers `GET /api/jobs?status=in_progress,pending`
    /// with a few hundred bytes per prompt, while `GET /queue` carries every queued graph (MBs
    /// on a ComfyUI shared with UI users). Which one the server has comes from
    /// [`ComfyClient::detect_features`], or from this call's own 404 when that has not run.
    pub async fn active_prompts(&self) -> Result<QueueState, ComfyError> {
        const ROUTE: &str = "api/jobs";
        let known = self.features().jobs_api;
        if known != Some(false) {
            let mut url = self.inner.endpoint.http_url(ROUTE);
            // No `sort_by`: its accepted names differ between versions (C2).
            // An explicit page size: the list is paginated (C1), and a prompt beyond the first page
            // must not look gone.
            url.query_pairs_mut().append_pair("status", "in_progress,pending").append_pair("limit", "1000");
            let request = self.inner.http.get(url).timeout(self.inner.timeouts.request);
            let response = self.send(ROUTE, request).await?;
            let status = response.status();
            if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
                self.note_jobs_api(false, &format!("HTTP {status}"));
            } else {
                let response = self.check_status(ROUTE, response).await?;
                let body = self.read_text(ROUTE, response).await?;
                let parsed = serde_json::from_str::<Value>(&body).ok();
                let more = parsed.as_ref().and_then(|b| b.pointer("/pagination/has_more")).and_then(Value::as_bool);
                match parsed.as_ref().and_then(QueueState::from_jobs) {
                    // More than a page of active prompts: this answer is not the whole truth, so
                    // this one call asks the queue instead.
                    Some(_) if more == Some(true) => self.note_jobs_api(true, "job list"),
                    Some(state) => {
                        self.note_jobs_api(true, "job list");
                        return Ok(state);
                    }
                    // E.g. a proxy's HTML page for unknown routes: not the jobs API.
                    None if known.is_none() => self.note_jobs_api(false, "not a job list"),
                    None => {
                        return Err(ComfyError::Protocol {
                            route: ROUTE.to_owned(),
                            reason: format!("expected a job list: {}", truncate(&body)),
                        });
                    }
                }
            }
        }
        self.queue().await
    }

    /// Whether the server has shown that it has the jobs API (`None` until detection or the first
    /// [`ComfyClient::active_prompts`] call found out).
    pub fn has_jobs_api(&self) -> Option<bool> {
        self.features().jobs_api
    }

    /// What the server showed it supports on the current connection (a copy).
    pub fn features(&self) -> ServerFeatures {
        self.lock_features().features.clone()
    }

    /// Asks the server what it supports, once for the current connection: `GET /api/jobs?limit=1`
    /// (a job list means the jobs API; 404/405 or anything else means none, C1) and
    /// `GET /features` (preview metadata and upload limit, C8). Whether the atomic cancel exists
    /// is found out by the first cancel. An error leaves what is unknown unknown.
    pub async fn detect_features(&self) -> Result<ServerFeatures, ComfyError> {
        const JOBS: &str = "api/jobs";
        let mut url = self.inner.endpoint.http_url(JOBS);
        // No `sort_by` (C2) and one item: only whether the route answers with a job list matters.
        url.query_pairs_mut().append_pair("limit", "1");
        let response = self.send(JOBS, self.inner.http.get(url).timeout(self.inner.timeouts.request)).await?;
        let status = response.status();
        let jobs_api = if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
            false
        } else {
            let response = self.check_status(JOBS, response).await?;
            let body = self.read_text(JOBS, response).await?;
            serde_json::from_str::<Value>(&body).ok().and_then(|b| QueueState::from_jobs(&b)).is_some()
        };
        self.note_jobs_api(jobs_api, "detection");
        const FEATURES: &str = "features";
        let request = self.inner.http.get(self.inner.endpoint.http_url(FEATURES)).timeout(self.inner.timeouts.request);
        let response = self.send(FEATURES, request).await?;
        // 0.3.x servers before the feature flags have no such route: nothing to learn there.
        if response.status() != StatusCode::NOT_FOUND {
            let response = self.check_status(FEATURES, response).await?;
            if let Ok(Value::Object(flags)) = self.read_json(FEATURES, response).await {
                self.lock_features().features.apply_flags(&flags);
            }
        }
        let mut state = self.lock_features();
        state.detected = true;
        Ok(state.features.clone())
    }

    /// The features, detected first if that has not happened on this connection (a failed
    /// detection gives what is known).
    pub async fn ensure_features(&self) -> ServerFeatures {
        if self.lock_features().detected {
            return self.features();
        }
        match self.detect_features().await {
            Ok(features) => features,
            Err(error) => {
                tracing::debug!(endpoint = %self.inner.label, %error, "could not detect ComfyUI's features");
                self.features()
            }
        }
    }

    /// Forgets what the server supports: the event socket reconnected (as `connection`), and the
    /// server behind it may have been restarted as another version.
    pub(crate) fn forget_features(&self, connection: u64) {
        let mut state = self.lock_features();
        *state = FeatureState::default();
        state.features.connection = connection;
    }

    /// The server's `feature_flags` reply on the event socket (C8).
    pub(crate) fn note_feature_flags(&self, flags: &serde_json::Map<String, Value>) {
        self.lock_features().features.apply_flags(flags);
    }

    fn note_jobs_api(&self, present: bool, why: &str) {
        let mut state = self.lock_features();
        if state.features.jobs_api != Some(present) {
            tracing::debug!(endpoint = %self.inner.label, present, why, "jobs API");
        }
        state.features.jobs_api = Some(present);
        if !present {
            state.features.jobs_cancel = Some(false);
        }
    }

    fn lock_features(&self) -> std::sync::MutexGuard<'_, FeatureState> {
        // The state is a few plain fields; a panic elsewhere cannot leave it half-written.
        self.inner.features.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `GET /api/jobs/{id}` (C1): where the server says the prompt is; 404 is
    /// [`JobLookup::Unknown`]. Only meaningful where the server has the jobs API (elsewhere every
    /// id is a 404).
    pub async fn job(&self, prompt_id: &PromptId) -> Result<JobLookup, ComfyError> {
        let route = format!("api/jobs/{prompt_id}");
        let request = self.inner.http.get(self.inner.endpoint.http_url(&route)).timeout(self.inner.timeouts.request);
        let response = self.send(&route, request).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(JobLookup::Unknown);
        }
        let response = self.check_status(&route, response).await?;
        let body = self.read_json(&route, response).await?;
        JobLookup::from_job(prompt_id.as_str(), &body).ok_or_else(|| ComfyError::Protocol {
            route: route.clone(),
            reason: format!("expected a job: {}", truncate(&body.to_string())),
        })
    }

    /// `POST /api/jobs/{id}/cancel` (C3): removes the prompt whether it is pending or running, in
    /// one step on the server (no window between "is it running?" and the interrupt). `Ok(None)`
    /// when the server has no such route (404/405), which is remembered: callers then use
    /// [`ComfyClient::delete_pending`] and [`ComfyClient::interrupt`]. `Ok(Some(cancelled))`
    /// otherwise (`false` for a prompt that is unknown or already over).
    pub async fn cancel_job(&self, prompt_id: &PromptId) -> Result<Option<bool>, ComfyError> {
        if self.features().jobs_cancel == Some(false) {
            return Ok(None);
        }
        let route = format!("api/jobs/{prompt_id}/cancel");
        let response = self.post_json(&route, &json!({})).await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
            tracing::debug!(endpoint = %self.inner.label, %status, "no jobs cancel; using /queue delete and /interrupt");
            self.lock_features().features.jobs_cancel = Some(false);
            return Ok(None);
        }
        let response = self.check_status(&route, response).await?;
        self.lock_features().features.jobs_cancel = Some(true);
        let body = self.read_json(&route, response).await.unwrap_or(Value::Null);
        Ok(Some(body.get("cancelled").and_then(Value::as_bool).unwrap_or(false)))
    }

    /// `POST /queue {"delete": [id]}`: removes a pending prompt (no effect once it runs; unknown
    /// ids are ignored by ComfyUI).
    pub async fn delete_pending(&self, prompt_id: &PromptId) -> Result<(), ComfyError> {
        self.post_ok("queue", &json!({ "delete": [prompt_id.as_str()] })).await
    }

    /// `POST /interrupt {"prompt_id": id}`: stops the prompt only if it is the one running.
    ///
    /// There is deliberately no way to send a bare (global) interrupt: it would kill whatever runs,
    /// possibly someone else's prompt that started a moment ago.
    pub async fn interrupt(&self, prompt_id: &PromptId) -> Result<(), ComfyError> {
        self.post_ok("interrupt", &json!({ "prompt_id": prompt_id.as_str() })).await
    }

    /// `POST /history {"delete": [id]}`: forgets a finished prompt.
    pub async fn delete_history(&self, prompt_id: &PromptId) -> Result<(), ComfyError> {
        self.post_ok("history", &json!({ "delete": [prompt_id.as_str()] })).await
    }

    /// `GET /system_stats`: a cheap health and version probe.
    pub async fn system_stats(&self) -> Result<SystemStats, ComfyError> {
        let body = self.get_json("system_stats").await?;
        if !body.is_object() {
            return Err(ComfyError::Protocol {
                route: "system_stats".to_owned(),
                reason: "expected a JSON object".to_owned(),
            });
        }
        Ok(SystemStats::from_value(&body))
    }

    /// The `/view` URL of an output file.
    pub fn view_url(&self, file: &OutputFile) -> reqwest::Url {
        let mut url = self.inner.endpoint.http_url("view");
        url.query_pairs_mut()
            .append_pair("filename", &file.filename)
            .append_pair("subfolder", &file.subfolder)
            .append_pair("type", file.kind.as_str());
        url
    }

    /// `GET /view`: streams an output file. A missing file is [`ComfyError::NotFound`].
    pub async fn download(&self, file: &OutputFile) -> Result<Download, ComfyError> {
        let route = format!("view?filename={}", file.filename);
        let response = self.send(&route, self.inner.http.get(self.view_url(file))).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(ComfyError::NotFound { route });
        }
        let response = self.check_status(&route, response).await?;
        let content_length = response.content_length();
        let content_type =
            response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let label = self.inner.label.clone();
        let body = response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|e| ComfyError::from_reqwest(&label, &route, e)))
            .boxed();
        Ok(Download { content_length, content_type, body })
    }

    async fn get_json(&self, route: &str) -> Result<Value, ComfyError> {
        let request = self.inner.http.get(self.inner.endpoint.http_url(route)).timeout(self.inner.timeouts.request);
        let response = self.send(route, request).await?;
        let response = self.check_status(route, response).await?;
        self.read_json(route, response).await
    }

    async fn post_json(&self, route: &str, body: &Value) -> Result<Response, ComfyError> {
        let request =
            self.inner.http.post(self.inner.endpoint.http_url(route)).json(body).timeout(self.inner.timeouts.request);
        self.send(route, request).await
    }

    async fn post_ok(&self, route: &str, body: &Value) -> Result<(), ComfyError> {
        let response = self.post_json(route, body).await?;
        self.check_status(route, response).await?;
        Ok(())
    }

    async fn send(&self, route: &str, request: reqwest::RequestBuilder) -> Result<Response, ComfyError> {
        request.send().await.map_err(|e| ComfyError::from_reqwest(&self.inner.label, route, e))
    }

    async fn check_status(&self, route: &str, response: Response) -> Result<Response, ComfyError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(ComfyError::Unauthorized {
                endpoint: self.inner.label.clone(),
                token_sent: self.inner.token.is_some(),
            });
        }
        let body = response.text().await.unwrap_or_default();
        Err(ComfyError::Status { route: route.to_owned(), status: status.as_u16(), body: truncate(&body) })
    }

    async fn read_text(&self, route: &str, response: Response) -> Result<String, ComfyError> {
        response.text().await.map_err(|e| ComfyError::from_reqwest(&self.inner.label, route, e))
    }

    async fn read_json(&self, route: &str, response: Response) -> Result<Value, ComfyError> {
        let text = self.read_text(route, response).await?;
        serde_json::from_str(&text).map_err(|e| ComfyError::Protocol {
            route: route.to_owned(),
            reason: format!("invalid JSON ({e}): {}", truncate(&text)),
        })
    }
}

async fn file_part(path: &Path) -> Result<(reqwest::multipart::Part, u64), ComfyError> {
    let source = |e| ComfyError::UploadSource { path: path.display().to_string(), source: e };
    let file = tokio::fs::File::open(path).await.map_err(source)?;
    let length = file.metadata().await.map_err(source)?.len();
    // Large reads: every read of a tokio file is a hop to the blocking pool.
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    Ok((reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), length), length))
}

fn validate_file_name(name: &str) -> Result<(), ComfyError> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control);
    if bad {
        return Err(ComfyError::InvalidInput(format!("upload name {name:?} must be a plain file name")));
    }
    Ok(())
}

fn normalise_subfolder(subfolder: &str) -> Result<String, ComfyError> {
    let normalised = subfolder.replace('\\', "/");
    let normalised = normalised.trim_matches('/');
    let bad =
        normalised.split('/').any(|part| part == ".." || part == "." || (part.is_empty() && !normalised.is_empty()))
            || normalised.chars().any(char::is_control)
            || normalised.contains(':');
    if bad {
        return Err(ComfyError::InvalidInput(format!(
            "upload subfolder {subfolder:?} must be a relative path without '..'"
        )));
    }
    Ok(normalised.to_owned())
}

fn truncate(text: &str) -> String {
    const MAX: usize = 512;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
