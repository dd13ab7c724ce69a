//! Serving stored files: the result download (`GET /jobs/{id}/result`) with ETag and HTTP Range,
//! streamed from storage in chunks (or, with `RESULT_REDIRECT=presigned`, a redirect to the object
//! store), and the same streaming for a worker's input download.

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use tdcomfy_api::JobStatus;

use super::error::ApiError;
use super::extract::job_id;
use crate::blobs::BlobKind;
use crate::service::Broker;
use crate::store::ResultState;

/// A byte range requested by a `Range` header, already checked against the file size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive.
    pub end: u64,
}

/// Parses a single-range `Range: bytes=…` header against `size`. `Ok(None)`: serve the whole file
/// (no header, or a form this server does not split, such as several ranges).
pub fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<ByteRange>, ApiError> {
    let Some(text) = value.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let unsatisfiable = ApiError::RangeNotSatisfiable { size };
    let range = if a.is_empty() {
        // Suffix form: the last N bytes.
        let n: u64 = b.parse().map_err(|_| ApiError::RangeNotSatisfiable { size })?;
        if n == 0 || size == 0 {
            return Err(unsatisfiable);
        }
        ByteRange { start: size.saturating_sub(n), end: size - 1 }
    } else {
        let start: u64 = a.parse().map_err(|_| ApiError::RangeNotSatisfiable { size })?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse().map_err(|_| ApiError::RangeNotSatisfiable { size })?
        };
        if start >= size || end < start {
            return Err(unsatisfiable);
        }
        ByteRange { start, end: end.min(size - 1) }
    };
    Ok(Some(range))
}

/// Streams a job's file of `kind` (or a range of it) with the given headers; `size` is the stored
/// size.
pub async fn stream_blob(
    broker: &Broker,
    kind: BlobKind,
    id: tdcomfy_api::JobId,
    size: u64,
    content_type: &str,
    range: Option<ByteRange>,
    mut extra: HeaderMap,
) -> Result<Response, ApiError> {
    let (status, start, len) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.end - r.start + 1),
        None => (StatusCode::OK, 0, size),
    };
    let body = match broker.blobs().read(kind, id, start, len).await {
        Ok(stream) => Body::from_stream(stream),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ApiError::ResultGone),
        Err(e) => return Err(ApiError::Internal(e.to_string())),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // The bytes came from a client or a worker: a browser must take them for the type stored,
    // never guess HTML or script from their content.
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(v) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Some(v) = range.and_then(|r| HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end)).ok()) {
        headers.insert(header::CONTENT_RANGE, v);
    }
    for (k, v) in extra.drain().filter_map(|(k, v)| Some((k?, v))) {
        headers.insert(k, v);
    }
    Ok(response)
}

/// Download a finished job's result.
#[utoipa::path(
    get, path = "/jobs/{id}/result", tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Range" = Option<String>, Header, description = "bytes=START-END"),
        ("If-None-Match" = Option<String>, Header, description = "ETag of a copy the client has"),
    ),
    responses(
        (status = 200, description = "The result bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 307, description = "RESULT_REDIRECT=presigned: GET the result (Range works there too) from the presigned URL in Location, without this request's Authorization"),
        (status = 304, description = "The client's copy is current"),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
        (status = 409, description = "Not finished, failed or cancelled", body = tdcomfy_api::ErrorBody),
        (status = 410, description = "The result was deleted", body = tdcomfy_api::ErrorBody),
        (status = 416, description = "Range outside the file", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn get_result(
    State(broker): State<Broker>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let job = broker.job(id).await?.ok_or_else(|| ApiError::JobNotFound(id.to_string()))?;
    let info = match (job.status, &job.result) {
        (JobStatus::Done, ResultState::Present(info)) => info.clone(),
        (JobStatus::Done, _) => return Err(ApiError::ResultGone),
        (JobStatus::Error, _) => {
            return Err(ApiError::Conflict {
                code: "job_failed",
                message: format!("the job failed: {}", job.error_message.as_deref().unwrap_or("no reason recorded")),
            });
        }
        (JobStatus::Cancelled, _) => {
            return Err(ApiError::Conflict { code: "job_cancelled", message: "the job was cancelled".into() });
        }
        (status, _) => {
            return Err(ApiError::Conflict {
                code: "result_not_ready",
                message: format!("the job is {status}; its result is not ready yet"),
            });
        }
    };
    let etag = format!("\"{}-{:x}-{:x}\"", id, info.size, job.finished_at.map(|t| t.millis()).unwrap_or(0));
    let mut extra = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        extra.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "inline; filename=\"{id}.{}\"",
        tdcomfy_api::media::extension_for_mime(&info.content_type)
    )) {
        extra.insert(header::CONTENT_DISPOSITION, v);
    }
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r.headers_mut().extend(extra);
        return Ok(r);
    }
    if let Some(ttl) = broker.config().result_redirect {
        // The store serves Range itself; the URL is short-lived and names one object, so a
        // client that was allowed to read this job's result is given just that.
        let url =
            broker.blobs().presign(BlobKind::Result, id, ttl).await.map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Some(url) = url.and_then(|u| HeaderValue::from_str(&u).ok()) {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            r.headers_mut().extend(extra);
            r.headers_mut().insert(header::LOCATION, url);
            // A signed URL expires: no cache may keep the redirect longer than that.
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Ok(r);
        }
    }
    let range = parse_range(headers.get(header::RANGE), info.size)?;
    stream_blob(&broker, BlobKind::Result, id, info.size, &info.content_type, range, extra).await
}

/// Download a job's input frame (for the dashboard's list of finished jobs and its retry).
#[utoipa::path(
    get, path = "/jobs/{id}/input", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The frame as submitted", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
        (status = 410, description = "The job's files were deleted (cancelled, RESULT_TTL)", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn get_input(State(broker): State<Broker>, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let job = broker.job(id).await?.ok_or_else(|| ApiError::JobNotFound(id.to_string()))?;
    if !job.input_present {
        return Err(ApiError::InputGone);
    }
    let mut extra = HeaderMap::new();
    // The frame never changes under its job id.
    extra.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400, immutable"));
    stream_blob(&broker, BlobKind::Input, id, job.input.size, &job.input.content_type, None, extra).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100).unwrap(), None);
        assert_eq!(parse_range(Some(&hv("bytes=0-9")), 100).unwrap(), Some(ByteRange { start: 0, end: 9 }));
        assert_eq!(parse_range(Some(&hv("bytes=90-")), 100).unwrap(), Some(ByteRange { start: 90, end: 99 }));
        assert_eq!(parse_range(Some(&hv("bytes=-10")), 100).unwrap(), Some(ByteRange { start: 90, end: 99 }));
        assert_eq!(parse_range(Some(&hv("bytes=50-500")), 100).unwrap(), Some(ByteRange { start: 50, end: 99 }));
        assert!(parse_range(Some(&hv("bytes=100-")), 100).is_err());
        assert!(parse_range(Some(&hv("bytes=9-3")), 100).is_err());
        assert_eq!(parse_range(Some(&hv("bytes=0-1,5-6")), 100).unwrap(), None);
        assert_eq!(parse_range(Some(&hv("items=0-1")), 100).unwrap(), None);
    }
}
