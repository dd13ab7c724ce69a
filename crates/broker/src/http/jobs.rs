//! Client routes: submit, look up, long-poll, list, cancel, health and workflows.

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use tdcomfy_api::{DeleteResponse, Health, JobList, JobStatus, JobView, SubmitResponse};
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{ApiQuery, job_id, wait_secs};
use super::submit_form::{SubmitForm, read_form};
use crate::service::{Broker, Submission, SubmitOutcome};

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
    if !replay && broker.queued_count().await? >= max_queue {
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

/// The workflows a job may name, with their parameters and, per connected ComfyUI server, whether
/// it can run them (`readiness`, from the workers' preflight reports; `ready` is true when one
/// can, false when servers reported and none can, null without a report).
#[utoipa::path(
    get, path = "/workflows", tag = "service",
    responses((status = 200, description = "Workflows, their parameters and readiness per server", body = Object))
)]
pub async fn list_workflows(State(broker): State<Broker>) -> axum::Json<serde_json::Value> {
    let registry = &broker.config().workflows;
    let workflows: Vec<serde_json::Value> = registry
        .describe()
        .into_iter()
        .map(|info| {
            let readiness = broker.readiness(&info.name);
            let ready = (!readiness.is_empty()).then(|| readiness.iter().any(|r| r.ready));
            let mut value = serde_json::to_value(&info).unwrap_or_default();
            if let Some(obj) = value.as_object_mut() {
                obj.insert("ready".into(), serde_json::json!(ready));
                obj.insert("readiness".into(), serde_json::json!(readiness));
            }
            value
        })
        .collect();
    axum::Json(serde_json::json!({
        "default": registry.default_name(),
        "workflows": workflows,
    }))
}
