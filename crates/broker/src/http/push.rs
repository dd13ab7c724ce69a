//! Push routes: Server-Sent Events (`/events`, `/jobs/{id}/events`) and the WebSocket (`/ws`),
//! all fed by the same [`EventHub`](crate::events::EventHub) and carrying the same JSON.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt, stream};
use serde::Deserialize;
use tdcomfy_api::{JobEvent, JobEventKind, JobId};
use tokio::sync::broadcast::{self, error::RecvError};
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{ApiQuery, job_id};
use crate::events::PublishedEvent;
use crate::service::Broker;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn sse_event(ev: &PublishedEvent) -> Event {
    Event::default().id(ev.seq.to_string()).event(event_name(ev.event.event)).data(ev.json.as_str())
}

fn event_name(kind: JobEventKind) -> &'static str {
    match kind {
        JobEventKind::Snapshot => "snapshot",
        JobEventKind::Queued => "queued",
        JobEventKind::Started => "started",
        JobEventKind::Progress => "progress",
        JobEventKind::Done => "done",
        JobEventKind::Error => "error",
        JobEventKind::Cancelled => "cancelled",
        JobEventKind::Deleted => "deleted",
    }
}

/// Events of every job, from now on; a subscriber that falls behind skips what it missed.
fn all_events(
    rx: broadcast::Receiver<Arc<PublishedEvent>>,
    filter: Option<JobId>,
) -> impl Stream<Item = Arc<PublishedEvent>> {
    stream::unfold(rx, move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) if filter.is_none_or(|id| ev.job_id() == id) => return Some((ev, rx)),
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

/// Server-Sent Events for all jobs.
#[utoipa::path(
    get, path = "/events", tag = "events",
    params(("token" = Option<String>, Query, description = "API token, for clients that cannot set headers")),
    responses((status = 200, description = "An endless text/event-stream of job events", content_type = "text/event-stream", body = String))
)]
pub async fn events(State(broker): State<Broker>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = all_events(broker.hub().subscribe(), None)
        .map(|ev| Ok(sse_event(&ev)))
        .take_until(broker.shutdown_token().clone().cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// Server-Sent Events for one job: a snapshot first, then every change, ending after a terminal
/// state.
#[utoipa::path(
    get, path = "/jobs/{id}/events", tag = "events",
    params(("id" = String, Path, description = "Job id"), ("token" = Option<String>, Query, description = "API token")),
    responses(
        (status = 200, description = "text/event-stream of this job's events", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn job_events(State(broker): State<Broker>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let rx = broker.hub().subscribe();
    let record = broker.job(id).await?.ok_or_else(|| ApiError::JobNotFound(id.to_string()))?;
    let snapshot = JobEvent::new(JobEventKind::Snapshot, broker.view(&record).await?);
    let first = Event::default().event("snapshot").data(serde_json::to_string(&snapshot).unwrap_or_default());
    let terminal_now = record.status.is_terminal();
    struct St {
        rx: broadcast::Receiver<Arc<PublishedEvent>>,
        broker: Broker,
        done: bool,
        version: u64,
    }
    let st_broker_token = broker.shutdown_token().clone();
    let st = St { rx, broker, done: terminal_now, version: record.version };
    let rest = stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            match st.rx.recv().await {
                Ok(ev) if ev.job_id() == id && ev.event.job.version > st.version => {
                    st.version = ev.event.job.version;
                    st.done = ev.event.job.status.is_terminal() && ev.event.event != JobEventKind::Progress;
                    return Some((sse_event(&ev), st));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => {
                    // Missed events: send the job's current state instead of guessing.
                    let record = st.broker.job(id).await.ok().flatten()?;
                    let view = st.broker.view(&record).await.ok()?;
                    st.version = view.version;
                    st.done = view.status.is_terminal();
                    let ev = JobEvent::new(JobEventKind::Snapshot, view);
                    let sse = Event::default().event("snapshot").data(serde_json::to_string(&ev).unwrap_or_default());
                    return Some((sse, st));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let stop = st_broker_token;
    let stream =
        stream::once(async move { first }).chain(rest).map(Ok::<_, Infallible>).take_until(stop.cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// Query of `GET /ws`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// Only this job's events.
    job_id: Option<String>,
    /// API token, for clients that cannot set headers (TouchDesigner's WebSocket DAT).
    #[allow(dead_code)]
    token: Option<String>,
}

/// WebSocket carrying the same JSON events as `/events`.
#[utoipa::path(
    get, path = "/ws", tag = "events", params(WsQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade request", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn websocket(
    State(broker): State<Broker>,
    ApiQuery(q): ApiQuery<WsQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let filter = match q.job_id.as_deref() {
        None | Some("") => None,
        Some(raw) => Some(job_id(raw)?),
    };
    let upgrade = upgrade.map_err(|e| ApiError::bad_request("websocket_required", e.body_text()))?;
    let rx = broker.hub().subscribe();
    let stop = broker.shutdown_token().clone();
    Ok(upgrade.on_upgrade(move |socket| forward(socket, rx, filter, stop)))
}

async fn forward(
    mut socket: WebSocket,
    rx: broadcast::Receiver<Arc<PublishedEvent>>,
    filter: Option<JobId>,
    stop: tokio_util::sync::CancellationToken,
) {
    let hello = serde_json::json!({"type": "hello", "job_id": filter}).to_string();
    if socket.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    let events = all_events(rx, filter);
    tokio::pin!(events);
    let mut ping = tokio::time::interval(KEEP_ALIVE);
    ping.tick().await;
    loop {
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else { break };
                if socket.send(Message::Text(ev.json.clone().into())).await.is_err() {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                // The client only listens; anything it says is ignored, a close ends the stream.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            _ = stop.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
            }
        }
    }
}
