//! Push routes: Server-Sent Events (`/events`, `/jobs/{id}/events`) and the WebSocket (`/ws`),
//! all fed by the same [`EventHub`](crate::events::EventHub) and carrying the same JSON.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::{FutureExt, Stream, StreamExt, stream};
use serde::Deserialize;
use tdcomfy_api::{JobEvent, JobEventKind, JobId, JobView};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;
use utoipa::IntoParams;

use super::error::ApiError;
use super::extract::{ApiQuery, job_id};
use crate::events::{
    PublishedEvent, PublishedPreview, Resume, Resync, ResyncReason, Subscription, event_name, resync_wanted,
};
use crate::metrics::Subscriber;
use crate::service::Broker;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

const LAST_EVENT_ID_DOC: &str = "The `id:` of the last event the client received: the stream first replays what it missed, or sends `resync` when it cannot";

fn sse_event(ev: &PublishedEvent) -> Event {
    Event::default().id(ev.id.as_str()).event(event_name(ev.event.event)).data(ev.json.as_str())
}

/// What a push stream sends.
enum Push {
    Job(Arc<PublishedEvent>),
    Resync(Resync),
    /// A job's current state (`/jobs/{id}/events` only), with the id it is current at.
    Snapshot(String, String),
    /// A newer preview image is there.
    Preview(Arc<PublishedPreview>),
}

impl Push {
    fn sse(&self) -> Event {
        match self {
            Push::Job(ev) => sse_event(ev),
            // The id moves the client's `Last-Event-ID` past what it missed, so a reconnect after
            // the re-read does not ask for the same events again.
            Push::Resync(r) => Event::default().id(r.id.as_str()).event("resync").data(r.json()),
            Push::Snapshot(id, json) => Event::default().id(id.as_str()).event("snapshot").data(json.as_str()),
            // No `id:`: a preview is not in the replay ring, and an event without an id leaves
            // the client's Last-Event-ID where the last state change put it.
            Push::Preview(p) => Event::default().event("preview").data(p.json.as_str()),
        }
    }

    fn text(&self) -> String {
        match self {
            Push::Job(ev) => ev.json.clone(),
            Push::Resync(r) => r.json(),
            Push::Snapshot(_, json) => json.clone(),
            Push::Preview(p) => p.json.clone(),
        }
    }
}

/// The client's `Last-Event-ID`, if it sent one it can mean (EventSource sends it on reconnect).
fn last_event_id(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("last-event-id")?.to_str().ok()?.trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// Subscribes for a stream: live from now, or resumed after `last_event_id`.
fn open(broker: &Broker, last_event_id: Option<&str>) -> (Subscription, Option<Resume>) {
    match last_event_id {
        Some(last) => {
            let (sub, resume) = broker.hub().resume(last);
            (sub, Some(resume))
        }
        None => (broker.hub().subscribe_now(), None),
    }
}

/// The next event for `filter` on `rx`, or a resync for a subscriber that fell behind the channel
/// (subscribed again from now), never a silent gap. `None` when the hub closed.
async fn next_event(
    broker: &Broker,
    rx: &mut broadcast::Receiver<Arc<PublishedEvent>>,
    resyncs: &mut watch::Receiver<u64>,
    filter: Option<JobId>,
) -> Option<Result<Arc<PublishedEvent>, Resync>> {
    loop {
        let next = tokio::select! {
            // Before anything still queued: that backlog is as stale as what was missed.
            biased;
            _ = resync_wanted(resyncs) => {
                // The broker may have missed other brokers' changes: like a lag, the client
                // re-reads, and the stream goes on from now.
                let sub = broker.hub().subscribe_now();
                *rx = sub.rx;
                *resyncs = sub.resyncs;
                tracing::debug!("the broker may have missed other brokers' changes; sent resync");
                return Some(Err(Resync { reason: ResyncReason::Missed, id: sub.id }));
            }
            next = rx.recv() => next,
        };
        match next {
            Ok(ev) if filter.is_none_or(|id| ev.job_id() == id) => return Some(Ok(ev)),
            Ok(_) => continue,
            Err(RecvError::Lagged(missed)) => {
                // What is still in the channel is stale too: the client re-reads the state, so
                // going on from now catches it up at once instead of after a backlog.
                let sub = broker.hub().subscribe_now();
                *rx = sub.rx;
                tracing::debug!(missed, "an event subscriber fell behind; sent resync");
                return Some(Err(Resync { reason: ResyncReason::Lagged, id: sub.id }));
            }
            Err(RecvError::Closed) => return None,
        }
    }
}

/// The next preview event for `filter`. Previews replace each other, so a subscriber that fell
/// behind just goes on with the newest; a closed channel waits forever (the job events end the
/// stream).
async fn next_preview(
    rx: &mut broadcast::Receiver<Arc<PublishedPreview>>,
    filter: Option<JobId>,
) -> Arc<PublishedPreview> {
    loop {
        match rx.recv().await {
            Ok(p) if filter.is_none_or(|id| p.event.job_id == id) => return p,
            Ok(_) | Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// What comes next on a stream: a job event (or resync), or a preview.
enum Next {
    Job(Result<Arc<PublishedEvent>, Resync>),
    Preview(Arc<PublishedPreview>),
}

/// The next job event or preview, whichever comes first; `None` when the hub closed.
async fn next_push(
    broker: &Broker,
    rx: &mut broadcast::Receiver<Arc<PublishedEvent>>,
    resyncs: &mut watch::Receiver<u64>,
    previews: &mut broadcast::Receiver<Arc<PublishedPreview>>,
    filter: Option<JobId>,
) -> Option<Next> {
    tokio::select! {
        // State changes first when both are ready: a preview never holds one up.
        biased;
        ev = next_event(broker, rx, resyncs, filter) => ev.map(Next::Job),
        p = next_preview(previews, filter) => Some(Next::Preview(p)),
    }
}

/// Events of every job (or of `filter`): first what `start` gives, then live.
fn all_events(
    broker: Broker,
    sub: Subscription,
    start: Option<Resume>,
    filter: Option<JobId>,
) -> impl Stream<Item = Push> {
    let pending: VecDeque<Push> = match start {
        None => VecDeque::new(),
        Some(Resume::Replay(events)) => {
            events.into_iter().filter(|ev| filter.is_none_or(|id| ev.job_id() == id)).map(Push::Job).collect()
        }
        Some(Resume::Resync(r)) => VecDeque::from([Push::Resync(r)]),
    };
    let (previews, resyncs) = (sub.previews, sub.resyncs);
    stream::unfold(
        (broker, sub.rx, resyncs, previews, pending),
        move |(broker, mut rx, mut resyncs, mut previews, mut pending)| async move {
            if let Some(push) = pending.pop_front() {
                return Some((push, (broker, rx, resyncs, previews, pending)));
            }
            let push = match next_push(&broker, &mut rx, &mut resyncs, &mut previews, filter).await? {
                Next::Job(ev) => ev.map_or_else(Push::Resync, Push::Job),
                Next::Preview(p) => Push::Preview(p),
            };
            Some((push, (broker, rx, resyncs, previews, pending)))
        },
    )
}

/// Query of `GET /events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// API token, for clients that cannot set headers.
    #[allow(dead_code)]
    token: Option<String>,
    /// Send the events in batches, each written at most this many milliseconds after its first
    /// event (0, the default: every event at once). For viewers such as the dashboard: fifty of
    /// them cost the broker a write per batch instead of one per event.
    #[param(minimum = 0, maximum = 1000)]
    batch_ms: Option<u64>,
}

/// The longest `batch_ms`.
const MAX_BATCH_MS: u64 = 1000;

/// Server-Sent Events for all jobs.
#[utoipa::path(
    get, path = "/events", tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = LAST_EVENT_ID_DOC),
    ),
    responses(
        (status = 200, description = "An endless text/event-stream of job events (JobEvent), `preview` events (PreviewEvent, no id) and `resync` events", content_type = "text/event-stream", body = String),
        (status = 400, description = "batch_ms over 1000", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn events(
    State(broker): State<Broker>,
    ApiQuery(q): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let batch = q.batch_ms.unwrap_or(0);
    if batch > MAX_BATCH_MS {
        return Err(ApiError::limit(
            "invalid_batch_ms",
            "batch_ms",
            MAX_BATCH_MS,
            format!("batch_ms must be 0 to {MAX_BATCH_MS} milliseconds, got {batch}"),
        ));
    }
    let slot = subscriber_slot(&broker, Subscriber::Sse)?;
    let (sub, start) = open(&broker, last_event_id(&headers).as_deref());
    let stop = broker.shutdown_token().clone();
    let pushes = all_events(broker, sub, start, None).take_until(stop.cancelled_owned());
    if batch > 0 {
        return Ok(batched_sse(pushes, Duration::from_millis(batch), slot));
    }
    let stream = pushes.map(move |push| {
        let _held = &slot; // the slot lives as long as the stream
        Ok::<_, Infallible>(push.sse())
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// One event in the `text/event-stream` format, appended to `out`.
fn write_frame(out: &mut BytesMut, push: &Push) {
    let (id, name, data): (Option<&str>, &str, std::borrow::Cow<'_, str>) = match push {
        Push::Job(ev) => (Some(ev.id.as_str()), event_name(ev.event.event), ev.json.as_str().into()),
        Push::Resync(r) => (Some(r.id.as_str()), "resync", r.json().into()),
        Push::Snapshot(id, json) => (Some(id.as_str()), "snapshot", json.as_str().into()),
        Push::Preview(p) => (None, "preview", p.json.as_str().into()),
    };
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\n");
    // Compact JSON has no line breaks; were there one, each line is a data line of its own.
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

/// An SSE response whose events are written in batches: the first event of a batch waits
/// `batch` for the ones after it, and the whole batch is one write. A comment keeps an idle
/// stream alive every `KEEP_ALIVE`, as the unbatched stream does.
fn batched_sse(
    pushes: impl Stream<Item = Push> + Send + 'static,
    batch: Duration,
    slot: crate::service::SubscriberSlot,
) -> Response {
    let pushes = Box::pin(pushes.fuse());
    let frames = stream::unfold((pushes, slot, false), move |(mut pushes, slot, ended)| async move {
        if ended {
            return None;
        }
        let first = match tokio::time::timeout(KEEP_ALIVE, pushes.next()).await {
            Err(_) => return Some((Ok::<_, Infallible>(bytes::Bytes::from_static(b":\n\n")), (pushes, slot, false))),
            Ok(None) => return None,
            Ok(Some(push)) => push,
        };
        let mut out = BytesMut::with_capacity(4096);
        write_frame(&mut out, &first);
        // Not woken per event: the stream waits out the window, then takes what arrived (the
        // hub's channel holds it; one that fell behind gets its resync as any stream does). Fifty
        // viewers then cost two wake-ups per window each, not one per event.
        tokio::time::sleep(batch).await;
        let mut ended = false;
        while let Some(next) = pushes.next().now_or_never() {
            match next {
                Some(push) => write_frame(&mut out, &push),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        Some((Ok(out.freeze()), (pushes, slot, ended)))
    });
    let mut resp = axum::body::Body::from_stream(frames).into_response();
    let h = resp.headers_mut();
    h.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("text/event-stream"));
    h.insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-cache"));
    resp
}

/// A place under `MAX_SUBSCRIBERS`, or the 429 that says there is none.
fn subscriber_slot(broker: &Broker, kind: Subscriber) -> Result<crate::service::SubscriberSlot, ApiError> {
    broker.subscriber_slot(kind).ok_or(ApiError::TooManySubscribers { limit: broker.config().max_subscribers as u64 })
}

/// The `snapshot` of a job as it is now.
async fn snapshot(broker: &Broker, id: JobId, at: String) -> Result<(Push, JobView), ApiError> {
    let record = broker.job(id).await?.ok_or_else(|| ApiError::JobNotFound(id.to_string()))?;
    let view = broker.view(&record).await?;
    let json = serde_json::to_string(&JobEvent::new(JobEventKind::Snapshot, view.clone())).unwrap_or_default();
    Ok((Push::Snapshot(at, json), view))
}

/// Whether the stream of one job ends after `ev`: a terminal state (progress of a finished job,
/// which the store refuses anyway, does not count).
fn ends_job_stream(ev: &PublishedEvent) -> bool {
    ev.event.job.status.is_terminal() && ev.event.event != JobEventKind::Progress
}

/// Server-Sent Events for one job: a snapshot first, then every change, ending after a terminal
/// state.
#[utoipa::path(
    get, path = "/jobs/{id}/events", tag = "events",
    params(
        ("id" = String, Path, description = "Job id"),
        ("token" = Option<String>, Query, description = "API token"),
        ("Last-Event-ID" = Option<String>, Header, description = LAST_EVENT_ID_DOC),
    ),
    responses(
        (status = 200, description = "text/event-stream of this job's events (JobEvent) and `preview` events (PreviewEvent, no id)", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such job", body = tdcomfy_api::ErrorBody),
    )
)]
pub async fn job_events(
    State(broker): State<Broker>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let slot = subscriber_slot(&broker, Subscriber::Sse)?;
    // Subscribe before reading the job, so a change in between is not missed.
    let (sub, start) = open(&broker, last_event_id(&headers).as_deref());
    let (snap, view) = snapshot(&broker, id, sub.id.clone()).await?;
    let mut pending = VecDeque::new();
    // The version the client has; live events at or below it are already in what it was sent.
    let (version, done) = match start {
        None => {
            pending.push_back(snap);
            (view.version, view.status.is_terminal())
        }
        Some(Resume::Resync(r)) => {
            // The snapshot is the re-read the resync asks for, sent along to save the client a call.
            pending.extend([Push::Resync(r), snap]);
            (view.version, view.status.is_terminal())
        }
        Some(Resume::Replay(events)) => {
            let mut version = 0;
            let mut done = false;
            for ev in events.into_iter().filter(|ev| ev.job_id() == id) {
                version = ev.event.job.version;
                done = ends_job_stream(&ev);
                pending.push_back(Push::Job(ev));
                if done {
                    break;
                }
            }
            if !done && view.status.is_terminal() {
                // The job ended, but its last event is not among those replayed: the client saw it
                // before, or it was published while this stream opened. Either way the final
                // state closes the stream rather than a wait for an event that may never come.
                pending.push_back(snap);
                done = true;
            }
            (version, done)
        }
    };
    if !done && let Some(current) = broker.hub().current_preview(id) {
        // A stream that (re)opens mid-run gets the newest preview at once: the ones it missed are
        // not kept, and this one is all it needs.
        pending.push_back(Push::Preview(current));
    }
    struct St {
        rx: broadcast::Receiver<Arc<PublishedEvent>>,
        resyncs: watch::Receiver<u64>,
        previews: broadcast::Receiver<Arc<PublishedPreview>>,
        broker: Broker,
        pending: VecDeque<Push>,
        done: bool,
        version: u64,
        /// Held for the stream's life (MAX_SUBSCRIBERS).
        _slot: crate::service::SubscriberSlot,
    }
    let st = St {
        rx: sub.rx,
        resyncs: sub.resyncs,
        previews: sub.previews,
        broker: broker.clone(),
        pending,
        done,
        version,
        _slot: slot,
    };
    let rest = stream::unfold(st, move |mut st| async move {
        if let Some(push) = st.pending.pop_front() {
            return Some((push, st));
        }
        if st.done {
            return None;
        }
        loop {
            let ev = match next_push(&st.broker, &mut st.rx, &mut st.resyncs, &mut st.previews, Some(id)).await? {
                Next::Job(ev) => ev,
                Next::Preview(p) => return Some((Push::Preview(p), st)),
            };
            match ev {
                Ok(ev) if ev.event.job.version > st.version => {
                    st.version = ev.event.job.version;
                    st.done = ends_job_stream(&ev);
                    return Some((Push::Job(ev), st));
                }
                Ok(_) => continue,
                Err(r) => {
                    // Missed events: send the job's current state after the resync instead of guessing.
                    let (snap, view) = snapshot(&st.broker, id, r.id.clone()).await.ok()?;
                    st.version = view.version;
                    st.done = view.status.is_terminal();
                    st.pending.push_back(snap);
                    return Some((Push::Resync(r), st));
                }
            }
        }
    });
    let stop = broker.shutdown_token().clone();
    let stream = rest.map(|push| Ok::<_, Infallible>(push.sse())).take_until(stop.cancelled_owned());
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
    let slot = subscriber_slot(&broker, Subscriber::WebSocket)?;
    let sub = broker.hub().subscribe_now();
    // Clients only listen: a message from them is never more than a close or a pong, so nothing
    // large is buffered for anyone (tungstenite would take up to 64 MiB by default).
    let upgrade = upgrade.max_message_size(WS_MAX_MESSAGE).max_frame_size(WS_MAX_MESSAGE);
    Ok(upgrade.on_upgrade(move |socket| async move {
        let _slot = slot;
        forward(socket, broker, sub, filter).await
    }))
}

/// Largest WebSocket message or frame a client may send.
const WS_MAX_MESSAGE: usize = 4096;

async fn forward(mut socket: WebSocket, broker: Broker, sub: Subscription, filter: Option<JobId>) {
    let stop = broker.shutdown_token().clone();
    let hello = serde_json::json!({"type": "hello", "job_id": filter}).to_string();
    if socket.send(Message::Text(hello.into())).await.is_err() {
        return;
    }
    let events = all_events(broker, sub, None, filter);
    tokio::pin!(events);
    let mut ping = tokio::time::interval(KEEP_ALIVE);
    ping.tick().await;
    loop {
        tokio::select! {
            ev = events.next() => {
                let Some(ev) = ev else { break };
                if socket.send(Message::Text(ev.text().into())).await.is_err() {
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
