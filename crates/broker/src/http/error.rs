//! `ApiError`: every error the HTTP API answers with, and the one place that maps errors to status
//! codes and JSON bodies.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tdcomfy_api::{ErrorBody, ErrorDetail, JobStatus};

use crate::service::BrokerError;
use crate::store::StoreError;

/// What a client is told about a broker fault.
const INTERNAL_MESSAGE: &str = "the broker failed to handle this request; its log has the details";

/// An error answer of the HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a field is invalid (400).
    #[error("{message}")]
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// Sentence naming the field and limit.
        message: String,
        /// The field at fault.
        field: Option<&'static str>,
        /// The limit exceeded.
        limit: Option<u64>,
    },
    /// The body is over a size limit (413).
    #[error("request body is larger than the {what} limit of {}", human_size(*limit))]
    PayloadTooLarge {
        /// Limit in bytes.
        limit: u64,
        /// Which limit (`MAX_UPLOAD_MB`, `MAX_RESULT_MB`).
        what: &'static str,
    },
    /// `MAX_QUEUE` jobs are queued already (429, with `Retry-After`).
    #[error("the queue is full: {limit} jobs are waiting (MAX_QUEUE); retry in {retry_after} s")]
    QueueFull {
        /// MAX_QUEUE.
        limit: u64,
        /// Seconds to wait before trying again.
        retry_after: u64,
    },
    /// `MAX_SUBSCRIBERS` event streams are open already (429).
    #[error("{limit} event streams are open already (MAX_SUBSCRIBERS); close one or retry later")]
    TooManySubscribers {
        /// MAX_SUBSCRIBERS.
        limit: u64,
    },
    /// No such job (404).
    #[error("no job with id {0}")]
    JobNotFound(String),
    /// The job has no preview now (404): none yet, previews off, or the job is not running.
    #[error("this job has no preview now: none arrived yet, it was submitted without previews, or it is not running")]
    NoPreview,
    /// No such route (404).
    #[error("no route for {method} {path}")]
    RouteNotFound {
        /// HTTP method.
        method: String,
        /// Path.
        path: String,
    },
    /// The route exists but not for this method (405).
    #[error("method not allowed here")]
    MethodNotAllowed,
    /// Missing or wrong token (401).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Refused by a setting: a foreign browser origin, a worker route from another machine without
    /// WORKER_TOKEN (403).
    #[error("{message}")]
    Forbidden {
        /// Stable code.
        code: &'static str,
        /// Sentence naming the setting.
        message: String,
        /// The setting that decides (`ALLOWED_ORIGINS`, `WORKER_TOKEN`).
        setting: &'static str,
    },
    /// The job is not in a state that allows this (409).
    #[error("{message}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Sentence.
        message: String,
    },
    /// The result existed but was deleted (410).
    #[error("the result of this job was deleted (DELETE or RESULT_TTL)")]
    ResultGone,
    /// The job's input frame was deleted (410): cancelled, a reused result, or RESULT_TTL.
    #[error("the input frame of this job was deleted (cancelled, reused result, or RESULT_TTL)")]
    InputGone,
    /// A Range header outside the file (416).
    #[error("range not satisfiable for a {size}-byte result")]
    RangeNotSatisfiable {
        /// File size.
        size: u64,
    },
    /// A broker fault (500). Never used for anything a client sent. The detail goes to the log
    /// only: it may name files and internals, and it helps no client.
    #[error("{INTERNAL_MESSAGE}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `field`.
    pub fn field(code: &'static str, field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest { code, message: message.into(), field: Some(field), limit: None }
    }

    /// A 400 naming `field` and the `limit` it exceeded.
    pub fn limit(code: &'static str, field: &'static str, limit: u64, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest { code, message: message.into(), field: Some(field), limit: Some(limit) }
    }

    /// A 400 about the request as a whole.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest { code, message: message.into(), field: None, limit: None }
    }

    /// A 409 for a lease that is no longer the worker's.
    pub fn lease_lost(status: JobStatus) -> ApiError {
        ApiError::Conflict {
            code: "lease_lost",
            message: format!("this lease is no longer valid; the job is {status}"),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>, Option<u64>) {
        match self {
            ApiError::BadRequest { code, field, limit, .. } => (StatusCode::BAD_REQUEST, code, *field, *limit),
            ApiError::PayloadTooLarge { limit, .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None, Some(*limit))
            }
            ApiError::QueueFull { limit, .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full", None, Some(*limit)),
            ApiError::TooManySubscribers { limit } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_subscribers", None, Some(*limit))
            }
            ApiError::JobNotFound(_) => (StatusCode::NOT_FOUND, "job_not_found", None, None),
            ApiError::NoPreview => (StatusCode::NOT_FOUND, "no_preview", None, None),
            ApiError::RouteNotFound { .. } => (StatusCode::NOT_FOUND, "route_not_found", None, None),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None, None),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", None, None),
            ApiError::Forbidden { code, setting, .. } => (StatusCode::FORBIDDEN, code, Some(*setting), None),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code, None, None),
            ApiError::ResultGone => (StatusCode::GONE, "result_gone", None, None),
            ApiError::InputGone => (StatusCode::GONE, "input_gone", None, None),
            ApiError::RangeNotSatisfiable { size } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable", None, Some(*size))
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None, None),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field, limit) = self.parts();
        match &self {
            ApiError::Internal(detail) => tracing::error!(error = %detail, "request failed"),
            _ if status.is_server_error() => tracing::error!(error = %self, "request failed"),
            _ => {}
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: self.to_string(),
                field: field.map(str::to_owned),
                limit,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        match &self {
            ApiError::Unauthorized(_) => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::TooManySubscribers { .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(5u32));
            }
            ApiError::QueueFull { retry_after, .. } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            ApiError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::JobNotFound(String::from("(requested)")),
            StoreError::LeaseLost { status } => ApiError::lease_lost(status),
            StoreError::AlreadyDone => ApiError::lease_lost(JobStatus::Done),
            StoreError::Cancelled => {
                ApiError::Conflict { code: "job_cancelled", message: "the job was cancelled by a client".into() }
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> ApiError {
        match e {
            BrokerError::Store(s) => s.into(),
            BrokerError::Io(io) => ApiError::Internal(io.to_string()),
            other @ BrokerError::DataDirInUse { .. } => ApiError::Internal(other.to_string()),
        }
    }
}

/// `50 MB`, `64 KiB`: limits as the settings name them (MB settings are MiB).
fn human_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 { format!("{} MB", bytes / (1024 * 1024)) } else { format!("{} KiB", bytes / 1024) }
}
