//! The web dashboard: a page and its ES modules and stylesheet, compiled into the binary from
//! `crates/broker/dashboard/`, served at `/` and `/dashboard/{file}` (unless `DASHBOARD=off`).
//!
//! The files are plain ES modules a browser runs as they are: there is no build step, so
//! `cargo build` needs no Node and the bytes served are the bytes in the repository.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::service::Broker;

/// Every file the dashboard has: name under `/dashboard/`, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../dashboard/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("../../dashboard/api.js")),
    ("view.js", "text/javascript; charset=utf-8", include_str!("../../dashboard/view.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../../dashboard/style.css")),
];

const INDEX: &str = include_str!("../../dashboard/index.html");

/// The page's rules for the browser: scripts and styles only from the broker itself, media from
/// the broker and the `blob:` URLs the page makes of downloads that needed the token.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// Adds the dashboard's routes.
pub fn routes(router: Router<Broker>) -> Router<Broker> {
    router.route("/", axum::routing::get(index)).route("/dashboard/{file}", axum::routing::get(asset))
}

/// Whether `path` is one of the dashboard's static files (open without a token).
pub fn is_asset_path(path: &str) -> bool {
    path == "/" || path.strip_prefix("/dashboard/").is_some_and(|f| ASSETS.iter().any(|(name, ..)| *name == f))
}

fn respond(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // The files change with the binary, which a browser cannot tell from a URL without a hash:
    // it asks again each time (a 200 of a few kilobytes from loopback or the LAN).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX)
}

async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    ASSETS.iter().find(|(name, ..)| *name == file).map(|(_, ct, body)| respond(ct, body)).ok_or_else(|| {
        ApiError::RouteNotFound {
            method: "GET".into(),
            path: format!("/dashboard/{}", file.chars().take(100).collect::<String>()),
        }
    })
}
