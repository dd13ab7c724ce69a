//! The HTTP surface: the router (built together with its OpenAPI document, so the two cannot
//! drift), authentication, and JSON answers for unknown routes and methods.

mod error;
mod extract;
mod files;
mod jobs;
mod push;
mod spec;
mod worker;

pub use error::ApiError;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::service::Broker;
use crate::store::constant_time_eq;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tdcomfy broker",
        description = "Job API between TouchDesigner and ComfyUI workers: submit frames, follow progress, fetch videos.",
        license(name = "MIT")
    ),
    tags(
        (name = "jobs", description = "Submitting and following jobs"),
        (name = "events", description = "Push: Server-Sent Events and WebSocket"),
        (name = "worker", description = "The protocol GPU workers speak"),
        (name = "service", description = "Health and workflows"),
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Builds the broker's router and its OpenAPI document.
pub fn router(broker: Broker) -> Router {
    let upload_limit = usize::try_from(body_limit(broker.config())).unwrap_or(usize::MAX);
    let (router, openapi) = api_router();
    let mut spec = serde_json::to_value(&openapi).unwrap_or_default();
    spec::finish(&mut spec, broker.config());
    router
        .route("/openapi.json", axum::routing::get(move || async move { axum::Json(spec) }))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The submit route enforces MAX_UPLOAD_MB itself while streaming; this is the backstop for
        // every other body, and the result upload has its own MAX_RESULT_MB check.
        .layer(DefaultBodyLimit::max(upload_limit))
        .layer(axum::middleware::from_fn_with_state(broker.clone(), authenticate))
        .with_state(broker)
}

/// The cap on any request body but the streamed ones: the upload limit plus room for form fields.
fn body_limit(config: &crate::config::BrokerConfig) -> u64 {
    config.max_upload_bytes + 2 * 1024 * 1024
}

/// The documented routes and their OpenAPI document, before configuration-specific touches.
fn api_router() -> (Router<Broker>, utoipa::openapi::OpenApi) {
    let (router, mut openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(jobs::submit_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job, jobs::delete_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(files::get_result))
        .routes(routes!(push::job_events))
        .routes(routes!(push::events))
        .routes(routes!(push::websocket))
        .routes(routes!(jobs::health))
        .routes(routes!(jobs::list_workflows))
        .routes(routes!(worker::lease))
        .routes(routes!(worker::input))
        .routes(routes!(worker::heartbeat))
        .routes(routes!(worker::put_result))
        .routes(routes!(worker::fail))
        .split_for_parts();
    openapi.openapi = utoipa::openapi::OpenApiVersion::Version31;
    (router, openapi)
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound { method: method.to_string(), path: uri.path().chars().take(200).collect() }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

fn query_token(req: &Request) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match (decoded, bytes[i]) {
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
    String::from_utf8_lossy(&out).into_owned()
}

/// Token checks: `/health` is open; `/worker/*` wants the worker token (or the client token when no
/// worker token is set); everything else wants the client token, in a header or, for browsers and
/// TouchDesigner's WebSocket DAT, as `?token=`.
async fn authenticate(State(broker): State<Broker>, req: Request, next: Next) -> Response {
    let cfg = broker.config();
    let path = req.uri().path();
    if path == "/health" {
        return next.run(req).await;
    }
    let (expected, why) = if path.starts_with("/worker/") {
        match (&cfg.worker_token, &cfg.api_token) {
            (Some(t), _) => (Some(t), "worker routes need Authorization: Bearer <WORKER_TOKEN>"),
            (None, Some(t)) => (Some(t), "worker routes need Authorization: Bearer <API_TOKEN>"),
            (None, None) => (None, ""),
        }
    } else {
        (cfg.api_token.as_ref(), "this broker needs Authorization: Bearer <API_TOKEN> (or ?token= on /events and /ws)")
    };
    let Some(expected) = expected else {
        return next.run(req).await;
    };
    let presented = bearer(&req).map(str::to_owned).or_else(|| query_token(&req));
    match presented {
        Some(t) if constant_time_eq(&t, expected) => next.run(req).await,
        _ => ApiError::Unauthorized(why).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("a%20b%2Bc+d"), "a b+c d");
        assert_eq!(super::percent_decode("100%"), "100%");
        assert_eq!(super::percent_decode("%zz"), "%zz");
    }
}
