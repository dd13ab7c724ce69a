//! Worker routes: lease (long-poll), preflight report, input download, heartbeat, streamed result
//! upload, fail.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tdcomfy_api::{
    FailRequest, HeartbeatRequest, HeartbeatResponse, LeaseRequest, LeaseResponse, PreflightReport, WorkerAck,
};

use super::error::ApiError;
use super::extract::{ApiJson, job_id, lease_token, wait_secs};
use super::files::stream_blob;
use crate::blobs::{BlobError, BlobKind};
use crate::service::{Broker, BrokerError};
use crate::store::StoreError;

fn worker_id(raw: &str) -> Result<&str, ApiError> {
    let ok = !raw.is_empty() && raw.len() <= 128 && raw.chars().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(raw)
    } else {
        Err(ApiError::limit(
            "invalid_worker_id",
            "worker_id",
            128,
            "worker_id must be 1 to 128 visible ASCII characters",
        ))
    }
}

/// Wait for a job and lease it.
#[utoipa::path(
    post, path = "/worker/lease", tag = "worker",
    request_body = LeaseRequest,
    responses(
        (status = 200, description = "A job was leased", body = LeaseResponse),
        (status = 204, description = "No job within `wait` seconds"),
        (status = 400, description = "Bad request", body = tdcomfy_api::ErrorBody),
        (status = 413, description = "Body over the JSON body limit", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn lease(State(broker): State<Broker>, ApiJson(req): ApiJson<LeaseRequest>) -> Result<Response, ApiError> {
    let worker = worker_id(&req.worker_id)?;
    let wait = wait_secs("wait", req.wait)?;
    if let Some(names) = &req.workflows {
        workflow_names("workflows", names.iter().map(String::as_str))?;
    }
    if let Some(name) = &req.last_workflow {
        workflow_names("last_workflow", std::iter::once(name.as_str()))?;
    }
    let wish = crate::service::LeaseWish {
        workflows: req.workflows,
        prefetch: req.prefetch,
        last_workflow: req.last_workflow,
    };
    match broker.lease_as(worker, wait, wish).await? {
        Some(job) => Ok(axum::Json(LeaseResponse { job }).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// Most prefetched job ids, and most devices, one report may carry.
const MAX_REPORTED: usize = 64;
fn at_most(field: &'static str, len: usize) -> Result<(), ApiError> {
    if len <= MAX_REPORTED {
        return Ok(());
    }
    Err(ApiError::limit(
        "too_many_entries",
        field,
        MAX_REPORTED as u64,
        format!("{field} holds at most {MAX_REPORTED} entries"),
    ))
}

/// Most workflow names one report or lease request may carry.
const MAX_WORKFLOW_NAMES: usize = 1000;
/// Longest problem list per workflow, and longest problem sentence, a report may carry: enough for
/// every node of a large graph; the worker caps the installed-files list it quotes.
const MAX_PROBLEMS: usize = 200;
const MAX_PROBLEM_CHARS: usize = 4000;

fn workflow_names<'a>(field: &'static str, names: impl ExactSizeIterator<Item = &'a str>) -> Result<(), ApiError> {
    if names.len() > MAX_WORKFLOW_NAMES {
        return Err(ApiError::limit(
            "too_many_workflows",
            field,
            MAX_WORKFLOW_NAMES as u64,
            format!("{field} may name at most {MAX_WORKFLOW_NAMES} workflows"),
        ));
    }
    for name in names {
        if name.is_empty() || name.len() > 128 {
            return Err(ApiError::limit(
                "invalid_workflow_name",
                field,
                128,
                format!("{field}: workflow names are 1 to 128 characters"),
            ));
        }
    }
    Ok(())
}

/// Tell the broker which workflows this worker's ComfyUI server can run, and what is missing for
/// the others (shown by `GET /workflows` and as a queued job's `waiting_reason`).
#[utoipa::path(
    post, path = "/worker/preflight", tag = "worker",
    request_body = PreflightReport,
    responses(
        (status = 204, description = "Kept while the worker stays connected"),
        (status = 400, description = "Malformed body or a list over its limit", body = tdcomfy_api::ErrorBody),
        (status = 413, description = "Body over the JSON body limit", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn preflight(
    State(broker): State<Broker>,
    ApiJson(report): ApiJson<PreflightReport>,
) -> Result<StatusCode, ApiError> {
    worker_id(&report.worker_id)?;
    if report.server.len() > 2048 {
        return Err(ApiError::limit("invalid_server", "server", 2048, "server is at most 2048 characters"));
    }
    workflow_names("workflows", report.workflows.iter().map(|w| w.name.as_str()))?;
    if let Some(name) = &report.last_workflow {
        workflow_names("last_workflow", std::iter::once(name.as_str()))?;
    }
    at_most("prefetched_jobs", report.prefetched_jobs.len())?;
    at_most("devices", report.devices.len())?;
    if report.devices.iter().any(|d| d.name.len() > 512 || d.kind.len() > 64) {
        return Err(ApiError::limit(
            "invalid_device",
            "devices.name",
            512,
            "a device name is at most 512 characters and its type at most 64",
        ));
    }
    for w in &report.workflows {
        if w.problems.len() > MAX_PROBLEMS {
            return Err(ApiError::limit(
                "too_many_problems",
                "workflows.problems",
                MAX_PROBLEMS as u64,
                format!("workflows.problems holds at most {MAX_PROBLEMS} entries per workflow"),
            ));
        }
        if w.problems.iter().any(|p| p.chars().count() > MAX_PROBLEM_CHARS) {
            return Err(ApiError::limit(
                "problem_too_long",
                "workflows.problems",
                MAX_PROBLEM_CHARS as u64,
                format!("each of workflows.problems is at most {MAX_PROBLEM_CHARS} characters"),
            ));
        }
    }
    broker.report_preflight(report);
    Ok(StatusCode::NO_CONTENT)
}

/// Download a leased job's input image.
#[utoipa::path(
    get, path = "/worker/jobs/{id}/input", tag = "worker",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Lease-Token" = String, Header, min_length = 1, pattern = "^[!-~]([ -~]*[!-~])?$", description = "The lease's token"),
    ),
    responses(
        (status = 200, description = "The image bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "Missing Lease-Token", body = tdcomfy_api::ErrorBody),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
        (status = 409, description = "Lease lost or job cancelled", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn input(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let token = lease_token(&headers)?;
    let job = broker.check_lease(id, &token).await.map_err(not_found_as(id))?;
    stream_blob(&broker, BlobKind::Input, id, job.input.size, &job.input.content_type, None, HeaderMap::new()).await
}

fn not_found_as(id: tdcomfy_api::JobId) -> impl Fn(BrokerError) -> ApiError {
    move |e| match e {
        BrokerError::Store(StoreError::NotFound) => ApiError::JobNotFound(id.to_string()),
        other => other.into(),
    }
}

/// Renew the lease and report progress; learn whether the job was cancelled.
#[utoipa::path(
    post, path = "/worker/jobs/{id}/heartbeat", tag = "worker",
    params(("id" = String, Path, description = "Job id")),
    request_body = HeartbeatRequest,
    responses(
        (status = 200, description = "Lease renewed", body = HeartbeatResponse),
        (status = 400, description = "Malformed body or progress out of range", body = tdcomfy_api::ErrorBody),
        (status = 413, description = "Body over the JSON body limit", body = tdcomfy_api::ErrorBody),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
        (status = 409, description = "Lease lost", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn heartbeat(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<axum::Json<HeartbeatResponse>, ApiError> {
    let id = job_id(&id)?;
    if req.progress.as_ref().is_some_and(|p| !(p.value.is_finite() && (0.0..=1.0).contains(&p.value))) {
        return Err(ApiError::field("invalid_progress", "progress.value", "progress.value must be between 0 and 1"));
    }
    let wait = wait_secs("wait", req.wait)?;
    let beat = crate::service::Beat { progress: req.progress, started: req.started, wait };
    let cancelled = broker.heartbeat_with(id, req.lease_token, beat).await.map_err(not_found_as(id))?;
    Ok(axum::Json(HeartbeatResponse { cancelled, lease_expires_in: broker.config().lease_ttl.as_secs_f64() }))
}

/// Upload the result (streamed) and finish the job.
#[utoipa::path(
    put, path = "/worker/jobs/{id}/result", tag = "worker",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Lease-Token" = String, Header, min_length = 1, pattern = "^[!-~]([ -~]*[!-~])?$", description = "The lease's token"),
        ("Comfy-Execution-Ms" = Option<u64>, Header, description = "ComfyUI's execution time of the prompt, for the job's timings"),
    ),
    request_body(content_type = "application/octet-stream", content = Vec<u8>),
    responses(
        (status = 200, description = "Job done", body = WorkerAck),
        (status = 400, description = "Missing Lease-Token or empty body", body = tdcomfy_api::ErrorBody),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
        (status = 409, description = "Lease lost or job cancelled", body = tdcomfy_api::ErrorBody),
        (status = 413, description = "Result over MAX_RESULT_MB", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn put_result(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<WorkerAck>, ApiError> {
    let id = job_id(&id)?;
    let token = lease_token(&headers)?;
    // Refuse before reading a byte when the lease is already gone.
    match broker.check_lease(id, &token).await {
        Err(BrokerError::Store(StoreError::AlreadyDone)) => {
            return Ok(axum::Json(WorkerAck { status: tdcomfy_api::JobStatus::Done }));
        }
        other => {
            other.map_err(not_found_as(id))?;
        }
    }
    // Only types of the media table are stored (and so served): whatever a worker claims.
    let content_type = tdcomfy_api::media::known_mime(
        headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default(),
    )
    .to_owned();
    let limit = broker.config().max_result_bytes;
    // A body that announces it is over the limit is refused before a byte is staged; a body without
    // a length (chunked) is still cut off at the limit while it streams.
    let announced =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit, what: "MAX_RESULT_MB" });
    }
    // The upload itself keeps the lease alive while its bytes arrive: a large result on a slow
    // link may take many LEASE_TTLs, and the worker's own heartbeats may be held up on the same link.
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = received.clone();
    let chunks = body.into_data_stream().inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            counter.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let staging = broker.blobs().stage(chunks, limit, 0);
    let staged = tokio::select! {
        staged = staging => staged,
        ended = broker.renew_while_receiving(id, token.clone(), received) => return Err(not_found_as(id)(ended)),
    };
    let staged = match staged {
        Ok(s) => s,
        Err(BlobError::TooLarge { limit }) => {
            return Err(ApiError::PayloadTooLarge { limit, what: "MAX_RESULT_MB" });
        }
        Err(BlobError::Source(m)) => return Err(ApiError::bad_request("upload_interrupted", m)),
        Err(BlobError::Io(e)) => return Err(ApiError::Internal(e.to_string())),
    };
    if staged.size == 0 {
        broker.blobs().discard(staged).await;
        return Err(ApiError::field("empty_result", "body", "the result body is empty"));
    }
    let comfy_ms = headers.get("comfy-execution-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let status = broker.complete(id, token, staged, content_type, comfy_ms).await.map_err(not_found_as(id))?;
    Ok(axum::Json(WorkerAck { status }))
}

/// Report that the job failed.
#[utoipa::path(
    post, path = "/worker/jobs/{id}/fail", tag = "worker",
    params(("id" = String, Path, description = "Job id")),
    request_body = FailRequest,
    responses(
        (status = 200, description = "Recorded", body = WorkerAck),
        (status = 400, description = "Malformed body", body = tdcomfy_api::ErrorBody),
        (status = 413, description = "Body over the JSON body limit", body = tdcomfy_api::ErrorBody),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
        (status = 409, description = "Lease lost", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn fail(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<FailRequest>,
) -> Result<axum::Json<WorkerAck>, ApiError> {
    let id = job_id(&id)?;
    let message: String = req.message.chars().take(4000).collect();
    let message =
        if message.trim().is_empty() { "the worker reported a failure without a message".into() } else { message };
    let status =
        broker.fail(id, req.lease_token, message, req.retryable, req.handed_back).await.map_err(not_found_as(id))?;
    Ok(axum::Json(WorkerAck { status }))
}
