//! The HTTP surface: the router (built together with its OpenAPI document, so the two cannot
//! drift), authentication, and JSON answers for unknown routes and methods.

mod dashboard;
mod error;
mod extract;
mod files;
mod jobs;
mod observe;
mod previews;
mod push;
mod spec;
mod submit_form;
mod worker;

pub use error::ApiError;

use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{Method, Uri, header};
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
    // The push routes' messages, which no route body names: job events and preview events.
    components(schemas(tdcomfy_api::JobEvent, tdcomfy_api::PreviewEvent)),
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
    let router = if broker.config().dashboard { dashboard::routes(router) } else { router };
    router
        .route("/openapi.json", axum::routing::get(move || async move { axum::Json(spec) }))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The submit route enforces MAX_UPLOAD_MB itself while streaming; this is the backstop for
        // every other body, and the result upload has its own MAX_RESULT_MB check.
        .layer(DefaultBodyLimit::max(upload_limit))
        .layer(axum::middleware::from_fn_with_state(broker.clone(), authenticate))
        // Outside authentication, so refused requests are counted too.
        .layer(axum::middleware::from_fn_with_state(broker.clone(), observe::count_requests))
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
        .routes(routes!(files::get_input))
        .routes(routes!(previews::get_preview))
        .routes(routes!(push::job_events))
        .routes(routes!(push::events))
        .routes(routes!(push::websocket))
        .routes(routes!(jobs::health))
        .routes(routes!(jobs::list_workflows))
        .routes(routes!(observe::metrics))
        .routes(routes!(worker::lease))
        .routes(routes!(worker::preflight))
        .routes(routes!(worker::input))
        .routes(routes!(worker::heartbeat))
        .routes(routes!(worker::put_result))
        .routes(routes!(worker::fail))
        .routes(routes!(previews::put_preview))
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

/// Whether `ip` is this machine talking to itself: 127.0.0.0/8, `::1`, or either mapped into IPv6
/// (`::ffff:127.0.0.1`, what a dual-stack socket reports for an IPv4 loopback client).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Headers a reverse proxy adds to what it forwards.
const FORWARDING_HEADERS: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];

/// The routes that take `?token=`: the push routes, for clients that cannot set headers
/// (browsers' `EventSource` and `WebSocket`, TouchDesigner's WebSocket DAT). Elsewhere a token in
/// the URL would end up in proxy logs and browser history for no gain.
fn takes_query_token(path: &str) -> bool {
    path == "/events" || path == "/ws" || (path.starts_with("/jobs/") && path.ends_with("/events"))
}

/// Token checks: `/health` and the dashboard's static files are open; `/metrics` wants the client
/// token or `METRICS_TOKEN` when either is set; `/worker/*` wants the worker token (or the client token when no
/// worker token is set, or, when neither is set, a peer on this machine); everything else wants the
/// client token, in a header or, on the push routes, as `?token=`.
async fn authenticate(State(broker): State<Broker>, req: Request, next: Next) -> Response {
    let cfg = broker.config();
    let path = req.uri().path();
    // The dashboard's page and assets hold no data (the page asks for the token and sends it
    // with every call it makes), so a browser can load them before it has the token.
    if path == "/health" || (cfg.dashboard && dashboard::is_asset_path(path)) {
        return next.run(req).await;
    }
    if path == "/metrics" {
        let tokens: Vec<&String> = [&cfg.api_token, &cfg.metrics_token].into_iter().flatten().collect();
        if tokens.is_empty() || bearer(&req).is_some_and(|t| tokens.iter().any(|e| constant_time_eq(t, e))) {
            return next.run(req).await;
        }
        return ApiError::Unauthorized("/metrics needs Authorization: Bearer <API_TOKEN or METRICS_TOKEN>")
            .into_response();
    }
    if let Err(e) = check_origin(cfg, &req) {
        return e.into_response();
    }
    let (expected, why) = if path.starts_with("/worker/") {
        match (&cfg.worker_token, &cfg.api_token) {
            (Some(t), _) => (Some(t), "worker routes need Authorization: Bearer <WORKER_TOKEN>"),
            (None, Some(t)) => (Some(t), "worker routes need Authorization: Bearer <API_TOKEN>"),
            (None, None) => {
                // Without any token a worker route would let anyone on the LAN lease jobs and
                // upload the bytes TouchDesigner then plays: only this machine may, unless a
                // WORKER_TOKEN says who else can.
                let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
                // A reverse proxy on this machine connects from loopback for everyone; a request
                // it forwarded is not this machine's own.
                let forwarded = FORWARDING_HEADERS.iter().any(|h| req.headers().contains_key(*h));
                let local = peer.is_some_and(is_loopback) && !forwarded && !cfg.net.loopback_is_remote;
                if local {
                    return next.run(req).await;
                }
                return ApiError::Forbidden {
                    code: "worker_token_required",
                    message: "worker routes accept only this machine while WORKER_TOKEN is not set; set \
                              WORKER_TOKEN on the broker and on remote workers"
                        .into(),
                    setting: "WORKER_TOKEN",
                }
                .into_response();
            }
        }
    } else {
        (
            cfg.api_token.as_ref(),
            "this broker needs Authorization: Bearer <API_TOKEN> (or ?token= on /events, /jobs/{id}/events and /ws)",
        )
    };
    let Some(expected) = expected else {
        return next.run(req).await;
    };
    let presented = match bearer(&req) {
        Some(t) => Some(t.to_owned()),
        None if takes_query_token(path) => query_token(&req),
        None => None,
    };
    match presented {
        Some(t) if constant_time_eq(&t, expected) => next.run(req).await,
        _ => ApiError::Unauthorized(why).into_response(),
    }
}

/// Refuses a browser request from a foreign page on every route that changes something and on
/// the push routes. A page on any site can send a "simple" cross-origin POST or DELETE (no
/// preflight) and open a WebSocket (no CORS at all), so without this any web page open on the TD
/// machine could submit and cancel jobs and read every event. Clients that send no `Origin`
/// (TouchDesigner, Python, the CLI, workers) pass; a page served by the broker's own origin passes.
fn check_origin(cfg: &crate::config::BrokerConfig, req: &Request) -> Result<(), ApiError> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let path = req.uri().path();
    let guarded = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) || takes_query_token(path);
    if !guarded || cfg.net.any_origin {
        return Ok(());
    }
    // Bounded: it is echoed in the refusal.
    let origin: String =
        origin.to_str().unwrap_or("").trim().trim_end_matches('/').to_ascii_lowercase().chars().take(200).collect();
    // Own origin: a page served from the host the request was sent to. Either scheme counts: behind
    // a TLS-terminating proxy the page is https while the broker itself speaks http.
    let own = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).is_some_and(|host| {
        let authority = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
        authority == Some(host.trim().to_ascii_lowercase().as_str())
    });
    if own || cfg.net.allowed_origins.contains(&origin) {
        return Ok(());
    }
    Err(ApiError::Forbidden {
        code: "origin_not_allowed",
        message: format!(
            "browser requests from {} are refused; add that origin to ALLOWED_ORIGINS to allow them",
            if origin.is_empty() { "this page" } else { origin.as_str() }
        ),
        setting: "ALLOWED_ORIGINS",
    })
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    #[test]
    fn loopback_peers() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for local in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(super::is_loopback(ip(local)), "{local}");
        }
        for remote in ["192.168.1.50", "10.0.0.2", "0.0.0.0", "::", "fe80::1", "::ffff:192.168.1.50", "::127.0.0.1"] {
            assert!(!super::is_loopback(ip(remote)), "{remote}");
        }
    }

    #[test]
    fn query_tokens_only_on_push_routes() {
        for p in ["/events", "/ws", "/jobs/abc/events"] {
            assert!(super::takes_query_token(p), "{p}");
        }
        for p in ["/jobs", "/jobs/abc", "/jobs/abc/result", "/worker/lease", "/openapi.json"] {
            assert!(!super::takes_query_token(p), "{p}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("a%20b%2Bc+d"), "a b+c d");
        assert_eq!(super::percent_decode("100%"), "100%");
        assert_eq!(super::percent_decode("%zz"), "%zz");
    }
}
