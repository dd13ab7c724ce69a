//! Preview routes: a worker puts the latest preview image of its running job, clients fetch it.
//! The images live in memory only ([`crate::previews`]); their arrival is announced by a
//! `preview` event on the push routes.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt;

use super::error::ApiError;
use super::extract::{job_id, lease_token};
use crate::image_sniff::{SniffError, sniff};
use crate::service::{Broker, BrokerError};
use crate::store::StoreError;

/// What the per-preview limit is called in a 413.
const EACH_LIMIT: &str = "the preview size limit (2 MiB, or MAX_PREVIEW_MB if smaller)";

fn lease_refused(id: tdcomfy_api::JobId) -> impl Fn(BrokerError) -> ApiError {
    move |e| match e {
        BrokerError::Store(StoreError::NotFound) => ApiError::JobNotFound(id.to_string()),
        // Unlike a repeated result upload, a preview of a finished job has nothing to add.
        BrokerError::Store(StoreError::AlreadyDone) => ApiError::lease_lost(tdcomfy_api::JobStatus::Done),
        other => other.into(),
    }
}

/// Put the latest preview image of a running job (replaces the one before).
#[utoipa::path(
    put, path = "/worker/jobs/{id}/preview", tag = "worker",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Lease-Token" = String, Header, min_length = 1, pattern = "^[!-~]([ -~]*[!-~])?$", description = "The lease's token"),
    ),
    request_body(content_type = "application/octet-stream", content = Vec<u8>, description = "A JPEG, PNG or WebP image of at most 2 MiB (judged by its bytes)"),
    responses(
        (status = 204, description = "Stored and announced with a `preview` event"),
        (status = 400, description = "Missing Lease-Token, empty body, or not a JPEG/PNG/WebP image", body = tdcomfy_api::ErrorBody),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
        (status = 409, description = "Lease lost, job finished or cancelled (`lease_lost`), or the job was submitted without previews (`previews_off`)", body = tdcomfy_api::ErrorBody),
        (status = 413, description = "Over the 2 MiB preview limit, or previews are off (MAX_PREVIEW_MB=0)", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn put_preview(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let id = job_id(&id)?;
    let token = lease_token(&headers)?;
    let limits = broker.hub().previews().limits();
    if limits.disabled() {
        return Err(ApiError::PayloadTooLarge { limit: 0, what: "MAX_PREVIEW_MB" });
    }
    if let Some(stall) = limits.stall_for_tests {
        tokio::time::sleep(stall).await;
    }
    let limit = limits.each_bytes;
    let announced =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit, what: EACH_LIMIT });
    }
    // Before reading a byte: a stale attempt learns at once that it lost the lease.
    let job = broker.check_lease(id, &token).await.map_err(lease_refused(id))?;
    if !job.previews {
        // Its client did not ask for previews: nobody would fetch them, and its events would
        // reach every listener of /events for nothing.
        return Err(ApiError::Conflict {
            code: "previews_off",
            message: "this job was submitted without previews=true; it takes no previews".to_owned(),
        });
    }
    // Held in memory by design (the preview is kept there), so read whole, but never past the cap.
    let mut bytes = BytesMut::with_capacity(announced.unwrap_or(64 * 1024) as usize);
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request("upload_interrupted", format!("the preview broke off: {e}")))?;
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::PayloadTooLarge { limit, what: EACH_LIMIT });
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(ApiError::field("empty_preview", "body", "the preview body is empty"));
    }
    // The type is the bytes' own, whatever the worker claims: the image is served to browsers too.
    let format = match sniff(&bytes) {
        Ok(h) => h.format,
        Err(SniffError::Unsupported) => {
            return Err(ApiError::field("unsupported_image", "body", "a preview must be a JPEG, PNG or WebP image"));
        }
        Err(SniffError::Corrupt | SniffError::NeedMore) => {
            return Err(ApiError::field("unsupported_image", "body", "the preview's image header is damaged"));
        }
    };
    let previews = broker.hub().previews();
    let preview = previews.put(id, format.mime(), bytes.freeze());
    // Read again after storing: a job that finished in between dropped its preview before this
    // put, so this one is dropped here. One that finishes after this check drops it itself.
    if let Err(e) = broker.check_lease(id, &token).await {
        previews.remove_if_latest(id, preview.seq);
        return Err(lease_refused(id)(e));
    }
    broker.hub().publish_preview(id, &preview);
    Ok(StatusCode::NO_CONTENT)
}

/// The latest preview image of a running job.
#[utoipa::path(
    get, path = "/jobs/{id}/preview", tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("If-None-Match" = Option<String>, Header, description = "The `ETag` of the preview the client has: 304 while it is still the latest"),
    ),
    responses(
        (status = 200, description = "The image (`image/jpeg`, `image/png` or `image/webp`); `ETag` and `Preview-Seq` name its sequence number; `Cache-Control: no-store`",
            content_type = "application/octet-stream", body = Vec<u8>),
        (status = 304, description = "The client's copy (If-None-Match) is still the latest"),
        (status = 404, description = "No such job (`job_not_found`), or no preview now (`no_preview`: none yet, previews off, or the job is not running)", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn get_preview(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let Some(preview) = broker.hub().previews().get(id) else {
        return match broker.job(id).await? {
            None => Err(ApiError::JobNotFound(id.to_string())),
            Some(_) => Err(ApiError::NoPreview),
        };
    };
    // The boot id keeps a restarted broker's sequence 1 from matching an old copy's.
    let etag = format!("\"{}-{}\"", broker.hub().boot(), preview.seq);
    let mut out = HeaderMap::new();
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    out.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    out.insert("preview-seq", HeaderValue::from(preview.seq));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        out.insert(header::ETAG, v);
    }
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim().trim_start_matches("W/") == etag || tag.trim() == "*"));
    if unchanged {
        return Ok((StatusCode::NOT_MODIFIED, out).into_response());
    }
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(preview.content_type));
    Ok((StatusCode::OK, out, preview.bytes.clone()).into_response())
}
