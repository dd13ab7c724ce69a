//! Client routes: submit, look up, long-poll, list, cancel, health and workflows.

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use tdcomfy_api::{DeleteResponse, Health, InputInfo, JobList, JobStatus, JobView, StreamMode, SubmitResponse};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::extract::{ApiQuery, job_id, wait_secs};
use crate::blobs::{BlobError, StagedBlob};
use crate::image_check::{ContainerError, check_container};
use crate::image_sniff::{SniffError, sniff};
use crate::service::{Broker, Submission, SubmitOutcome};

/// The multipart form of `POST /jobs` (for the OpenAPI document; parsed by hand as a stream).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SubmitForm {
    /// The frame: PNG, JPEG or WebP, judged by its bytes.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    image: Vec<u8>,
    // Form fields are text or absent, never null. The prompt length and the workflow names depend
    // on the configuration; `spec::finish` adds them.
    /// Positive prompt.
    #[schema(nullable = false)]
    prompt: Option<String>,
    /// Negative prompt.
    #[schema(nullable = false)]
    negative_prompt: Option<String>,
    /// Integer seed, 0 ..= 18446744073709551615, or -1 for a random seed (reported back as the job's
    /// `seed`). Empty: the workflow's own seed.
    #[schema(nullable = false, pattern = "^[0-9]{0,19}$")]
    seed: Option<String>,
    /// Workflow name (see `GET /workflows`; empty: the default).
    #[schema(nullable = false)]
    workflow: Option<String>,
    /// JSON object of named workflow inputs.
    #[schema(nullable = false)]
    params: Option<String>,
    /// The client's stream, e.g. one per TD component: 1 to 128 visible ASCII characters (empty:
    /// none). Jobs of one stream start in submission order; streams share the workers round-robin.
    #[schema(nullable = false, max_length = 128, pattern = "^[!-~]{0,128}$")]
    stream: Option<String>,
    /// `queue` (default: every job runs) or `latest` (needs `stream`): the stream's jobs that have
    /// not started are cancelled as superseded by this one.
    #[schema(nullable = false, value_type = Option<tdcomfy_api::StreamMode>)]
    mode: Option<String>,
    /// With `mode=latest`: also cancel the stream's running job (`true`/`false`, default false).
    #[schema(nullable = false, value_type = Option<bool>)]
    preempt: Option<String>,
    /// Needs `stream`: when the frame's bytes and every parameter equal the stream's last finished
    /// job (and the seed is not -1), the job is answered `done` at once with that job's result
    /// (`reused_from`). `true`/`false`, default false.
    #[schema(nullable = false, value_type = Option<bool>)]
    dedupe: Option<String>,
    /// Ask for previews while the job runs (`true`/`false`, default false).
    #[schema(nullable = false, value_type = Option<bool>)]
    previews: Option<String>,
}

// Enough of the file to read any PNG/WebP header and nearly every JPEG's (EXIF blocks come first).
const SNIFF_HEAD: usize = 256 * 1024;
// Room for the text fields and multipart framing beside the image.
const FORM_SLACK: u64 = 1024 * 1024;

/// Submit a frame.
#[utoipa::path(
    post, path = "/jobs", tag = "jobs",
    request_body(content_type = "multipart/form-data", content = SubmitForm),
    params((
        "Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 200,
        pattern = "^[!-~]([ -~]*[!-~])?$",
        description = "Same key and same fields: the original job is returned (1 to 200 printable ASCII characters)"
    )),
    responses(
        (status = 200, description = "Job queued (or replayed)", body = SubmitResponse),
        (status = 400, description = "Invalid field", body = tdcomfy_api::ErrorBody),
        (status = 409, description = "Idempotency-Key reused with different fields", body = tdcomfy_api::ErrorBody),
        (status = 413, description = "Upload over MAX_UPLOAD_MB", body = tdcomfy_api::ErrorBody),
        (status = 429, description = "MAX_QUEUE jobs are queued already; see Retry-After", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn submit_job(State(broker): State<Broker>, req: Request) -> Result<Response, ApiError> {
    let limit = broker.config().max_upload_bytes;
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit + FORM_SLACK) {
        let expects_continue =
            req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects_continue {
            drain(req.into_body(), limit).await;
        }
        return Err(ApiError::PayloadTooLarge { limit, what: "MAX_UPLOAD_MB" });
    }
    // Checked before the body is read; concurrent submissions may pass it together, so the queue
    // can exceed MAX_QUEUE by the number of uploads in flight, never more.
    let max_queue = broker.config().max_queue;
    // A retry of a submission that was accepted (its answer lost) is a replay, not a new job:
    // it gets its job even while the queue is full.
    let replay = match idempotency_key(req.headers())? {
        Some(key) => broker.knows_idempotency_key(&key).await?,
        None => false,
    };
    if !replay && broker.queued_count() >= max_queue {
        drain(req.into_body(), limit).await;
        return Err(ApiError::QueueFull { limit: max_queue, retry_after: QUEUE_FULL_RETRY_AFTER });
    }
    let idempotency_key = idempotency_key(req.headers())?;
    let multipart = axum::extract::Multipart::from_request(req, &broker).await.map_err(|e| {
        ApiError::bad_request("invalid_multipart", format!("expected a multipart/form-data body: {}", e.body_text()))
    })?;
    let form = match read_form(&broker, multipart).await {
        Ok(form) => form,
        Err((e, staged)) => {
            if let Some(s) = staged {
                broker.blobs().discard(s).await;
            }
            return Err(e);
        }
    };
    let fingerprint = idempotency_key.map(|key| (key, form.fingerprint()));
    let submission = match form.into_submission(&broker).await {
        Ok(s) => s,
        Err((e, staged)) => {
            if let Some(s) = staged {
                broker.blobs().discard(s).await;
            }
            return Err(e);
        }
    };
    let submission = Submission { idempotency: fingerprint, ..submission };
    match broker.submit(submission).await? {
        SubmitOutcome::Accepted { response, replayed } => {
            let mut resp = axum::Json(response).into_response();
            if replayed {
                resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            Ok(resp)
        }
        SubmitOutcome::KeyConflict => Err(ApiError::Conflict {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was already used for a different request".into(),
        }),
    }
}

/// Seconds a client is asked to wait after `429 queue_full`: about one short clip's run.
const QUEUE_FULL_RETRY_AFTER: u64 = 5;

/// Reads and discards what is left of a refused body (bounded), so the client, still sending,
/// reads the 413 instead of a reset connection.
async fn drain(body: axum::body::Body, limit: u64) {
    let cap = limit.saturating_mul(4).clamp(64 << 20, 1 << 30);
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, stream.next()).await {
        seen += chunk.len() as u64;
        if seen > cap {
            break;
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = v
        .to_str()
        .map_err(|_| ApiError::field("invalid_idempotency_key", "Idempotency-Key", "must be visible ASCII"))?;
    if key.is_empty() || key.len() > 200 {
        return Err(ApiError::limit(
            "invalid_idempotency_key",
            "Idempotency-Key",
            200,
            "Idempotency-Key must be 1 to 200 characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// The fields of a submit form as read from the stream.
struct RawForm {
    image: Option<StagedBlob>,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    seed: Option<String>,
    workflow: Option<String>,
    params: Option<String>,
    stream: Option<String>,
    mode: Option<String>,
    preempt: Option<String>,
    dedupe: Option<String>,
    previews: Option<String>,
}

type FormError = (ApiError, Option<StagedBlob>);

async fn read_form(broker: &Broker, mut multipart: axum::extract::Multipart) -> Result<RawForm, FormError> {
    let cfg = broker.config();
    let mut form = RawForm {
        image: None,
        prompt: None,
        negative_prompt: None,
        seed: None,
        workflow: None,
        params: None,
        stream: None,
        mode: None,
        preempt: None,
        dedupe: None,
        previews: None,
    };
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err((multipart_error(e, cfg.max_upload_bytes), form.image)),
        };
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "image" => {
                if form.image.is_some() {
                    return Err((ApiError::field("duplicate_field", "image", "send one image per job"), form.image));
                }
                match broker.blobs().stage_hashed(field, cfg.max_upload_bytes, SNIFF_HEAD).await {
                    Ok(staged) => form.image = Some(staged),
                    Err(BlobError::TooLarge { limit }) => {
                        drain_rest(multipart).await;
                        return Err((ApiError::PayloadTooLarge { limit, what: "MAX_UPLOAD_MB" }, form.image));
                    }
                    Err(BlobError::Source(msg)) => {
                        return Err((
                            ApiError::bad_request("invalid_multipart", format!("the image upload broke off: {msg}")),
                            form.image,
                        ));
                    }
                    Err(BlobError::Io(e)) => {
                        return Err((ApiError::Internal(e.to_string()), form.image));
                    }
                }
            }
            "prompt" | "negative_prompt" | "seed" | "workflow" | "params" | "stream" | "mode" | "preempt"
            | "dedupe" | "previews" => {
                // Bytes bound: a character is at most 4 bytes of UTF-8; the exact character count
                // is checked once the text is whole.
                let max_bytes = (cfg.max_prompt_chars * 4).max(64 * 1024);
                let text = match read_text(field, max_bytes).await {
                    Ok(t) => t,
                    Err(e) => return Err((e.named(&name, cfg.max_prompt_chars), form.image)),
                };
                let slot = match name.as_str() {
                    "prompt" => &mut form.prompt,
                    "negative_prompt" => &mut form.negative_prompt,
                    "seed" => &mut form.seed,
                    "workflow" => &mut form.workflow,
                    "stream" => &mut form.stream,
                    "mode" => &mut form.mode,
                    "preempt" => &mut form.preempt,
                    "dedupe" => &mut form.dedupe,
                    "previews" => &mut form.previews,
                    _ => &mut form.params,
                };
                *slot = Some(text);
            }
            // Unknown fields are ignored, as the original API did, so newer clients keep working.
            _ => {
                let mut field = field;
                while let Ok(Some(_)) = field.chunk().await {}
            }
        }
    }
    Ok(form)
}

async fn drain_rest(mut multipart: axum::extract::Multipart) {
    while let Ok(Some(mut field)) = multipart.next_field().await {
        while let Ok(Some(_)) = field.chunk().await {}
    }
}

enum TextError {
    TooLong,
    NotUtf8,
    Broken(String),
}

impl TextError {
    fn named(self, field: &str, max_chars: usize) -> ApiError {
        let field = static_field(field);
        match self {
            TextError::TooLong => ApiError::limit(
                "field_too_long",
                field,
                max_chars as u64,
                format!("{field} is longer than {max_chars} characters"),
            ),
            TextError::NotUtf8 => ApiError::field("invalid_text", field, format!("{field} must be UTF-8 text")),
            TextError::Broken(m) => ApiError::bad_request("invalid_multipart", format!("{field}: {m}")),
        }
    }
}

fn static_field(name: &str) -> &'static str {
    match name {
        "prompt" => "prompt",
        "negative_prompt" => "negative_prompt",
        "seed" => "seed",
        "workflow" => "workflow",
        "params" => "params",
        "stream" => "stream",
        "mode" => "mode",
        "preempt" => "preempt",
        "dedupe" => "dedupe",
        "previews" => "previews",
        _ => "field",
    }
}

async fn read_text(mut field: axum::extract::multipart::Field<'_>, max_bytes: usize) -> Result<String, TextError> {
    let mut buf = Vec::new();
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max_bytes {
                    return Err(TextError::TooLong);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(TextError::Broken(e.body_text())),
        }
    }
    String::from_utf8(buf).map_err(|_| TextError::NotUtf8)
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge { limit, what: "MAX_UPLOAD_MB" }
    } else {
        ApiError::bad_request("invalid_multipart", format!("malformed multipart body: {}", e.body_text()))
    }
}

// FNV-1a: a stable 64-bit hash that stays the same across Rust versions, since fingerprints are
// stored. It detects a reused key by accident, not by an adversary.
fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl RawForm {
    fn fingerprint(&self) -> String {
        let mut h = 0xcbf2_9ce4_8422_2325;
        for part in [&self.prompt, &self.negative_prompt, &self.seed, &self.workflow, &self.params] {
            h = fnv1a(h, part.as_deref().unwrap_or("\u{0}").as_bytes());
            h = fnv1a(h, &[0xFF]);
        }
        // The stream fields join the hash only when sent, so a request without them keeps the
        // fingerprint stored before they existed (a retry across an upgrade is still a replay).
        for (name, part) in [
            ("stream", &self.stream),
            ("mode", &self.mode),
            ("preempt", &self.preempt),
            ("dedupe", &self.dedupe),
            ("previews", &self.previews),
        ] {
            if let Some(text) = part {
                h = fnv1a(h, name.as_bytes());
                h = fnv1a(h, text.as_bytes());
                h = fnv1a(h, &[0xFF]);
            }
        }
        if let Some(img) = &self.image {
            h = fnv1a(h, &img.size.to_le_bytes());
            h = fnv1a(h, &img.head);
        }
        format!("{h:016x}")
    }

    async fn into_submission(self, broker: &Broker) -> Result<Submission, FormError> {
        let cfg = broker.config();
        let Some(image) = self.image else {
            return Err((
                ApiError::field("missing_field", "image", "the image field (a PNG, JPEG or WebP file) is required"),
                None,
            ));
        };
        macro_rules! bail {
            ($e:expr) => {
                return Err(($e, Some(image)))
            };
        }
        if image.size == 0 {
            bail!(ApiError::field("empty_file", "image", "the image file is empty"));
        }
        let header = match sniff(&image.head) {
            Ok(h) => Ok(h),
            Err(SniffError::NeedMore) if image.size > image.head.len() as u64 => sniff_file(image.path()).await,
            Err(e) => Err(e),
        };
        let header = match header {
            Ok(h) => h,
            Err(SniffError::Unsupported) | Err(SniffError::NeedMore) => bail!(ApiError::field(
                "unsupported_image",
                "image",
                "the image is not a PNG, JPEG or WebP file (judged by its bytes, not its name or Content-Type)"
            )),
            Err(SniffError::Corrupt) => {
                bail!(ApiError::field("unsupported_image", "image", "the image header is damaged"))
            }
        };
        if header.width > cfg.max_image_dim || header.height > cfg.max_image_dim {
            bail!(ApiError::limit(
                "image_too_large_dimensions",
                "image",
                u64::from(cfg.max_image_dim),
                format!(
                    "the image is {}x{} pixels; at most {}x{} is accepted (MAX_IMAGE_DIM)",
                    header.width, header.height, cfg.max_image_dim, cfg.max_image_dim
                )
            ));
        }
        // After the header checks, so an absurd image is refused without reading it to the end.
        let (path, format) = (image.path().to_owned(), header.format);
        match tokio::task::spawn_blocking(move || check_container(&path, format)).await {
            Ok(Ok(())) => {}
            Ok(Err(ContainerError::Io(e))) => bail!(ApiError::Internal(e)),
            Ok(Err(e)) => bail!(ApiError::field("corrupt_image", "image", format!("{e}; send the frame again"))),
            Err(e) => bail!(ApiError::Internal(e.to_string())),
        }
        for (field, text) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
            if text.as_ref().is_some_and(|t| t.chars().count() > cfg.max_prompt_chars) {
                bail!(TextError::TooLong.named(field, cfg.max_prompt_chars));
            }
        }
        let stream = match self.stream.as_deref() {
            None | Some("") => String::new(),
            Some(s) if s.len() <= MAX_STREAM_CHARS && s.bytes().all(|b| b.is_ascii_graphic()) => s.to_owned(),
            Some(_) => bail!(ApiError::limit(
                "invalid_stream",
                "stream",
                MAX_STREAM_CHARS as u64,
                format!("stream must be 1 to {MAX_STREAM_CHARS} visible ASCII characters (no spaces)")
            )),
        };
        let mode = match self.mode.as_deref().map(str::trim) {
            None | Some("") => StreamMode::Queue,
            Some(m) => match StreamMode::parse(&m.to_ascii_lowercase()) {
                Some(mode) => mode,
                None => {
                    bail!(ApiError::field("invalid_mode", "mode", format!("mode must be queue or latest, got {m:?}")))
                }
            },
        };
        let mut flags = [false; 3];
        for (slot, (field, text)) in
            flags.iter_mut().zip([("preempt", &self.preempt), ("dedupe", &self.dedupe), ("previews", &self.previews)])
        {
            match parse_flag(text.as_deref()) {
                Some(v) => *slot = v,
                None => bail!(ApiError::field(
                    "invalid_flag",
                    static_field(field),
                    format!("{field} must be true or false (or 1/0, yes/no, on/off)")
                )),
            }
        }
        let [preempt, dedupe, previews] = flags;
        if stream.is_empty() {
            let needs = if mode == StreamMode::Latest {
                Some("mode=latest")
            } else if dedupe {
                Some("dedupe=true")
            } else {
                None
            };
            if let Some(what) = needs {
                bail!(ApiError::field(
                    "missing_field",
                    "stream",
                    format!("{what} needs a stream (1 to {MAX_STREAM_CHARS} visible ASCII characters)")
                ));
            }
        }
        if preempt && mode != StreamMode::Latest {
            bail!(ApiError::field("invalid_flag", "preempt", "preempt=true needs mode=latest"));
        }
        let seed_is_random = self.seed.as_deref().map(str::trim) == Some("-1");
        let seed = match self.seed.as_deref().map(str::trim) {
            None | Some("") => None,
            // Most diffusion UIs' "pick one for me"; the seed picked is stored and reported, so the
            // clip can be made again.
            Some("-1") => Some(random_seed()),
            Some(s) => match s.parse::<u64>() {
                Ok(v) => Some(v),
                Err(_) => bail!(ApiError::limit(
                    "invalid_seed",
                    "seed",
                    u64::MAX,
                    format!("seed must be an integer from 0 to {}, or -1 for a random one, got {s:?}", u64::MAX)
                )),
            },
        };
        let registry = &cfg.workflows;
        let workflow_name = match self.workflow.as_deref().map(str::trim) {
            None | Some("") => registry.default_name().to_owned(),
            Some(name) => name.to_owned(),
        };
        let Some(workflow) = registry.get(&workflow_name) else {
            bail!(ApiError::field(
                "unknown_workflow",
                "workflow",
                format!("unknown workflow {workflow_name:?}; known: {}", registry.names().join(", "))
            ));
        };
        let params = match self.params.as_deref().map(str::trim) {
            None | Some("") => serde_json::Map::new(),
            Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(m)) => m,
                Ok(_) => bail!(ApiError::field("invalid_params", "params", "params must be a JSON object")),
                Err(e) => bail!(ApiError::field("invalid_params", "params", format!("params is not valid JSON: {e}"))),
            },
        };
        if let Err(e) = workflow.validate_params(&params) {
            bail!(ApiError::field("invalid_params", "params", e.to_string()));
        }
        Ok(Submission {
            input: InputInfo {
                content_type: header.format.mime().to_owned(),
                size: image.size,
                width: header.width,
                height: header.height,
            },
            image,
            prompt: self.prompt.unwrap_or_default(),
            negative_prompt: self.negative_prompt.unwrap_or_default(),
            seed,
            workflow: workflow_name,
            params,
            idempotency: None,
            stream,
            mode,
            preempt,
            previews,
            dedupe,
            random_seed: seed_is_random,
        })
    }
}

async fn sniff_file(path: &std::path::Path) -> Result<crate::image_sniff::ImageHeader, SniffError> {
    // A JPEG whose metadata pushes the frame header past the first 256 KiB: read up to 16 MiB.
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(16 << 20).read_to_end(&mut buf))
            .map_err(|_| SniffError::Corrupt)?;
        sniff(&buf)
    })
    .await
    .map_err(|_| SniffError::Corrupt)?
}

/// Query of `GET /jobs/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// Long-poll: wait up to this many seconds (at most 60) for a change.
    #[param(minimum = 0, maximum = 60)]
    wait: Option<f64>,
    /// Long-poll: return as soon as the job's version is greater than this.
    #[param(value_type = Option<i64>, minimum = 0)]
    since: Option<u64>,
}

/// Look up a job.
#[utoipa::path(
    get, path = "/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id"), JobQuery),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "Bad wait or since", body = tdcomfy_api::ErrorBody),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn get_job(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<JobQuery>,
) -> Result<axum::Json<JobView>, ApiError> {
    let id = job_id(&id)?;
    let wait = wait_secs("wait", q.wait)?;
    // Versions are stored as SQLite integers, so anything past i64::MAX is not a version (and the
    // document promises an int64).
    if q.since.is_some_and(|v| v > i64::MAX as u64) {
        return Err(ApiError::limit(
            "invalid_since",
            "since",
            i64::MAX as u64,
            format!("since must be an integer from 0 to {}", i64::MAX),
        ));
    }
    let view = if wait.is_zero() {
        match broker.job(id).await? {
            Some(r) => Some(broker.view(&r).await?),
            None => None,
        }
    } else {
        broker.wait_for_change(id, q.since, wait).await?
    };
    view.map(axum::Json).ok_or_else(|| ApiError::JobNotFound(id.to_string()))
}

/// Query of `GET /jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs of this status (empty: all).
    #[param(schema_with = status_filter_schema)]
    status: Option<String>,
    /// At most this many (default 50; larger values are capped at 500).
    #[param(minimum = 1)]
    limit: Option<i64>,
}

fn status_filter_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(["", "queued", "running", "done", "error", "cancelled"]))
        .build()
}

/// List jobs, newest first.
#[utoipa::path(
    get, path = "/jobs", tag = "jobs", params(ListQuery),
    responses(
        (status = 200, description = "Jobs, newest first", body = JobList),
        (status = 400, description = "Bad status or limit", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn list_jobs(
    State(broker): State<Broker>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<axum::Json<JobList>, ApiError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::field(
                "invalid_status",
                "status",
                format!("status must be one of queued, running, done, error, cancelled; got {s:?}"),
            )
        })?),
    };
    let limit = match q.limit {
        None => 50,
        Some(n) if n >= 1 => n.min(500) as u32,
        Some(n) => {
            return Err(ApiError::limit("invalid_limit", "limit", 500, format!("limit must be 1 to 500, got {n}")));
        }
    };
    let jobs = broker.list(status, limit).await?;
    Ok(axum::Json(JobList { count: jobs.len(), jobs }))
}

/// Cancel a job and delete its files.
#[utoipa::path(
    delete, path = "/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled, or files deleted", body = DeleteResponse),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn delete_job(
    State(broker): State<Broker>,
    Path(id): Path<String>,
) -> Result<axum::Json<DeleteResponse>, ApiError> {
    let id = job_id(&id)?;
    broker.cancel(id).await?.map(axum::Json).ok_or_else(|| ApiError::JobNotFound(id.to_string()))
}

/// Cancel a job (same as `DELETE /jobs/{id}`).
#[utoipa::path(
    post, path = "/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled, or files deleted", body = DeleteResponse),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn cancel_job(state: State<Broker>, id: Path<String>) -> Result<axum::Json<DeleteResponse>, ApiError> {
    delete_job(state, id).await
}

/// Broker health and job counts. Never needs a token.
#[utoipa::path(
    get, path = "/health", tag = "service",
    responses((status = 200, description = "Counts and connected workers", body = Health))
)]
pub async fn health(State(broker): State<Broker>) -> Result<axum::Json<Health>, ApiError> {
    Ok(axum::Json(broker.health().await?))
}

/// The workflows a job may name, with their parameters.
#[utoipa::path(
    get, path = "/workflows", tag = "service",
    responses((status = 200, description = "Workflows and their parameters", body = Object))
)]
pub async fn list_workflows(State(broker): State<Broker>) -> axum::Json<serde_json::Value> {
    let registry = &broker.config().workflows;
    axum::Json(serde_json::json!({
        "default": registry.default_name(),
        "workflows": registry.describe(),
    }))
}

/// Longest `stream` id, in characters (visible ASCII, so bytes).
const MAX_STREAM_CHARS: usize = 128;

/// A form flag: absent or empty is false.
fn parse_flag(text: Option<&str>) -> Option<bool> {
    match text.map(|t| t.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("false") | Some("0") | Some("no") | Some("off") => Some(false),
        Some("true") | Some("1") | Some("yes") | Some("on") => Some(true),
        Some(_) => None,
    }
}

/// A random seed below 2^53, so it survives every JSON reader (JavaScript numbers are doubles).
fn random_seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 & ((1 << 53) - 1)
}
