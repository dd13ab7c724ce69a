//! Request extractors that answer malformed input with [`ApiError`] JSON instead of axum's plain
//! text rejections, and the small parsers shared by the handlers.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use tdcomfy_api::{JobId, LeaseToken};

use super::error::ApiError;
use crate::service::Broker;

/// Largest JSON body a route accepts. Every JSON body of the API (lease, heartbeat, fail) is a
/// few hundred bytes; without this cap each would be buffered up to MAX_UPLOAD_MB.
pub const JSON_BODY_LIMIT: u64 = 64 * 1024;

/// JSON body of at most [`JSON_BODY_LIMIT`]; a malformed one is a 400 `invalid_json` naming serde's
/// complaint, an oversized one a 413 naming the limit.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Broker> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &Broker) -> Result<Self, Self::Rejection> {
        let too_large = || ApiError::PayloadTooLarge { limit: JSON_BODY_LIMIT, what: "JSON body" };
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > JSON_BODY_LIMIT) {
            return Err(too_large());
        }
        let json_type =
            req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| {
                t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json_type {
            return Err(ApiError::bad_request("invalid_json", "expected a body with Content-Type: application/json"));
        }
        // Read by hand, so "over the limit" (413) and "the body broke off" (400) stay apart.
        let mut body = req.into_body().into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
            let chunk =
                chunk.map_err(|e| ApiError::bad_request("upload_interrupted", format!("the body broke off: {e}")))?;
            if (bytes.len() + chunk.len()) as u64 > JSON_BODY_LIMIT {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("the JSON body is invalid: {e}")))
    }
}

/// Query string; a malformed one is a 400 `invalid_query`.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ApiError::bad_request("invalid_query", rejection.body_text())),
        }
    }
}

/// Parses a job id from the path. A string that is not a UUID cannot name a job: 404.
pub fn job_id(raw: &str) -> Result<JobId, ApiError> {
    JobId::parse(raw).ok_or_else(|| ApiError::JobNotFound(raw.chars().take(64).collect()))
}

/// The `Lease-Token` header of a worker request.
pub fn lease_token(headers: &axum::http::HeaderMap) -> Result<LeaseToken, ApiError> {
    headers
        .get("lease-token")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(|v| LeaseToken::from_string(v.to_owned()))
        .ok_or_else(|| ApiError::field("missing_lease_token", "Lease-Token", "the Lease-Token header is required"))
}

/// Bounds a `wait` in seconds to 0 ..= 60; anything else is a 400 naming `field`.
pub fn wait_secs(field: &'static str, v: Option<f64>) -> Result<std::time::Duration, ApiError> {
    match v {
        None => Ok(std::time::Duration::ZERO),
        Some(s) if s.is_finite() && (0.0..=60.0).contains(&s) => Ok(std::time::Duration::from_secs_f64(s)),
        Some(s) => Err(ApiError::limit(
            "invalid_wait",
            field,
            60,
            format!("{field} must be a number of seconds from 0 to 60, got {s}"),
        )),
    }
}
