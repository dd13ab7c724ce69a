//! What the broker shows about itself over HTTP: `GET /metrics`, and the layer that counts every
//! request, its status and its body bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;

use super::error::ApiError;
use crate::service::Broker;

/// Prometheus metrics.
#[utoipa::path(
    get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4: metric names start with `tdcomfy_`. Needs API_TOKEN or METRICS_TOKEN when either is set", content_type = "text/plain", body = String),
    )
)]
pub async fn metrics(State(broker): State<Broker>) -> Result<Response, ApiError> {
    let text = broker.render_metrics().await?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
    Ok(resp)
}

/// Counts the request by route template and status, and the body bytes both ways. Outermost, so
/// refusals (401, 403) count too.
pub async fn count_requests(State(broker): State<Broker>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let metrics = broker.metrics();
    let req = req.map(|body| Body::new(Counted { inner: body, counter: metrics.bytes_in().clone() }));
    let resp = next.run(req).await;
    metrics.http_request(route.as_deref().unwrap_or("unmatched"), resp.status().as_u16());
    resp.map(|body| Body::new(Counted { inner: body, counter: metrics.bytes_out().clone() }))
}

/// A body that adds the length of each data frame that passes to `counter`.
struct Counted {
    inner: Body,
    counter: Counter,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}
