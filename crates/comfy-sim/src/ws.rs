//! `GET /ws?clientId=`: one task per socket that forwards hub messages and reads client frames.
//!
//! Owns: the socket loop, the optional `feature_flags` handshake (honoured only as the first text
//! message, like ComfyUI) and the cleanup rule on disconnect. A connection the hub dropped (fault
//! injection, shutdown) ends without a close frame, which is what a client sees on a network drop.

use std::collections::HashMap;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;

use crate::hub::{Outgoing, Registration};
use crate::json::OValue;
use crate::server::AppState;

/// Upgrades the request.
pub async fn handler(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let client_id = params.get("clientId").cloned();
    ws.on_upgrade(move |socket| serve(state, socket, client_id))
}

async fn serve(state: AppState, mut socket: WebSocket, client_id: Option<String>) {
    let mut shutdown = state.shutdown.clone();
    if *shutdown.borrow() {
        return;
    }
    let shared = &state.shared;
    let Registration { sid, conn_id, mut rx } = shared.hub.register(client_id.as_deref(), shared.queue.remaining());
    let mut first_message = true;
    let server_dropped = loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Outgoing::Text(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break false;
                    }
                }
                Some(Outgoing::Binary(bytes)) => {
                    if socket.send(Message::Binary(bytes)).await.is_err() {
                        break false;
                    }
                }
                None => break true,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if let Ok(OValue::Object(msg)) = OValue::parse(text.as_str().as_bytes()) {
                        if first_message && msg.get("type").and_then(OValue::as_str) == Some("feature_flags") {
                            let flags = msg.get("data").cloned().unwrap_or(OValue::Null);
                            shared.hub.negotiate(&sid, conn_id, &flags, crate::server::server_feature_flags(&shared.config));
                        }
                        first_message = false;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break false,
                Some(Ok(_)) => {}
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break true;
                }
            }
        }
    };
    shared.hub.disconnect(&sid, conn_id, server_dropped);
}
