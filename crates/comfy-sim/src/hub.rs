//! The WebSocket client registry and message routing (`PromptServer.sockets` + `send_json`).
//!
//! Routing follows ComfyUI: a message with a target `sid` goes to that socket only (silently
//! dropped if it is not connected); a message without one goes to every socket. Reconnecting with
//! the same `clientId` replaces the registration but, like ComfyUI 0.3.64, leaves the old socket
//! open and deaf; when that old socket later closes, ComfyUI's cleanup unregisters the id —
//! whichever socket holds it by then. The simulator keeps that behaviour on purpose on 0.3.64; on
//! 0.38 the replaced socket is closed (C6). Both re-send the running `executing` node.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::json::{OMap, OValue};

/// A frame queued for one socket.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// a JSON text frame
    Text(String),
    /// a binary frame (previews)
    Binary(Bytes),
}

struct Client {
    conn_id: u64,
    tx: mpsc::UnboundedSender<Outgoing>,
    preview_metadata: bool,
}

#[derive(Default)]
struct Inner {
    clients: HashMap<String, Client>,
    /// replaced connections: kept open (their sender alive) but never addressed
    orphans: HashMap<u64, mpsc::UnboundedSender<Outgoing>>,
    next_conn: u64,
    /// `server.client_id`: the client of the prompt that runs (or ran last)
    exec_client: Option<String>,
    /// `server.last_node_id`: the node running now, for reconnect notices
    last_node: Option<String>,
}

/// The registry of connected sockets.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    /// 0.38: a reconnection with the same `clientId` closes the socket it replaces (C6), instead
    /// of leaving it open and deaf as 0.3.64 does
    close_replaced: bool,
}

/// A registered connection.
pub struct Registration {
    /// the socket's id (`clientId` or a generated hex uuid)
    pub sid: String,
    /// distinguishes reconnections under one sid
    pub conn_id: u64,
    /// frames to write to the socket; `None` means the server dropped the connection
    pub rx: mpsc::UnboundedReceiver<Outgoing>,
}

/// Builds `{"type": kind, "data": data}` as text.
pub fn message(kind: &str, data: OValue) -> String {
    let mut m = OMap::new();
    m.insert("type", OValue::str(kind));
    m.insert("data", data);
    serde_json::to_string(&m).unwrap_or_default()
}

fn status_data(queue_remaining: usize, sid: Option<&str>) -> OValue {
    let mut exec_info = OMap::new();
    exec_info.insert("queue_remaining", OValue::Number((queue_remaining as u64).into()));
    let mut status = OMap::new();
    status.insert("exec_info", OValue::Object(exec_info));
    let mut data = OMap::new();
    data.insert("status", OValue::Object(status));
    if let Some(sid) = sid {
        data.insert("sid", OValue::str(sid));
    }
    OValue::Object(data)
}

impl Hub {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry that closes a socket when its `clientId` connects again (0.38).
    pub fn closing_replaced() -> Self {
        Self { close_replaced: true, ..Self::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a socket and queues its greeting: `status` with `sid`, plus `executing {node}`
    /// when this client's prompt is running.
    pub fn register(&self, client_id: Option<&str>, queue_remaining: usize) -> Registration {
        let mut inner = self.lock();
        let sid = match client_id {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => uuid::Uuid::new_v4().simple().to_string(),
        };
        inner.next_conn += 1;
        let conn_id = inner.next_conn;
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(old) = inner.clients.remove(&sid)
            && !self.close_replaced
        {
            inner.orphans.insert(old.conn_id, old.tx);
        }
        // Otherwise the old sender is dropped here: its socket ends as a server-dropped one, whose
        // cleanup leaves the new registration alone.
        let _ = tx.send(Outgoing::Text(message("status", status_data(queue_remaining, Some(&sid)))));
        if inner.exec_client.as_deref() == Some(sid.as_str())
            && let Some(node) = inner.last_node.clone()
        {
            let mut data = OMap::new();
            data.insert("node", OValue::String(node));
            let _ = tx.send(Outgoing::Text(message("executing", OValue::Object(data))));
        }
        inner.clients.insert(sid.clone(), Client { conn_id, tx, preview_metadata: false });
        Registration { sid, conn_id, rx }
    }

    /// Handles the optional first-message handshake and returns whether a reply was queued.
    pub fn negotiate(&self, sid: &str, conn_id: u64, client_flags: &OValue, server_flags: OMap) -> bool {
        let mut inner = self.lock();
        let Some(client) = inner.clients.get_mut(sid).filter(|c| c.conn_id == conn_id) else {
            return false;
        };
        client.preview_metadata = client_flags.get("supports_preview_metadata").is_some_and(OValue::truthy);
        let _ = client.tx.send(Outgoing::Text(message("feature_flags", OValue::Object(server_flags))));
        true
    }

    /// Cleanup when a connection ends. `server_dropped` connections were already removed.
    pub fn disconnect(&self, sid: &str, conn_id: u64, server_dropped: bool) {
        if server_dropped {
            return;
        }
        let mut inner = self.lock();
        inner.orphans.remove(&conn_id);
        inner.clients.remove(sid);
    }

    /// Closes every connection (simulated network drop or restart).
    pub fn drop_all(&self) {
        let mut inner = self.lock();
        inner.clients.clear();
        inner.orphans.clear();
    }

    /// Sends a JSON event to one socket (`Some`) or to all (`None`).
    pub fn send(&self, target: Option<&str>, kind: &str, data: OValue) {
        let text = message(kind, data);
        let inner = self.lock();
        match target {
            Some(sid) => {
                if let Some(c) = inner.clients.get(sid) {
                    let _ = c.tx.send(Outgoing::Text(text));
                }
            }
            None => {
                for c in inner.clients.values() {
                    let _ = c.tx.send(Outgoing::Text(text.clone()));
                }
            }
        }
    }

    /// Broadcasts `status` with the queue size.
    pub fn broadcast_status(&self, queue_remaining: usize) {
        self.send(None, "status", status_data(queue_remaining, None));
    }

    /// Sends a preview image. A targeted client that negotiated `supports_preview_metadata`
    /// gets binary type 4 (with metadata); everyone else gets the legacy type 1.
    pub fn send_preview(&self, target: Option<&str>, image: &[u8], is_png: bool, meta: OMap) {
        let inner = self.lock();
        let legacy = || {
            let mut frame = Vec::with_capacity(image.len() + 8);
            frame.extend_from_slice(&1u32.to_be_bytes());
            frame.extend_from_slice(&(if is_png { 2u32 } else { 1u32 }).to_be_bytes());
            frame.extend_from_slice(image);
            Bytes::from(frame)
        };
        match target {
            Some(sid) => {
                let Some(c) = inner.clients.get(sid) else {
                    return;
                };
                let frame = if c.preview_metadata {
                    let mut meta = meta;
                    meta.insert("image_type", OValue::str(if is_png { "image/png" } else { "image/jpeg" }));
                    let meta_json = serde_json::to_vec(&meta).unwrap_or_default();
                    let mut frame = Vec::with_capacity(image.len() + meta_json.len() + 8);
                    frame.extend_from_slice(&4u32.to_be_bytes());
                    frame.extend_from_slice(&(meta_json.len() as u32).to_be_bytes());
                    frame.extend_from_slice(&meta_json);
                    frame.extend_from_slice(image);
                    Bytes::from(frame)
                } else {
                    legacy()
                };
                let _ = c.tx.send(Outgoing::Binary(frame));
            }
            None => {
                let frame = legacy();
                for c in inner.clients.values() {
                    let _ = c.tx.send(Outgoing::Binary(frame.clone()));
                }
            }
        }
    }

    /// Whether a targeted client prefers type-4 previews (decides the event order around them).
    pub fn wants_preview_metadata(&self, target: Option<&str>) -> bool {
        target.is_some_and(|sid| self.lock().clients.get(sid).is_some_and(|c| c.preview_metadata))
    }

    /// Records which client's prompt is executing (`server.client_id`).
    pub fn set_exec_client(&self, client: Option<String>) {
        let mut inner = self.lock();
        inner.exec_client = client;
        inner.last_node = None;
    }

    /// Records the running node (`server.last_node_id`), `None` after the prompt.
    pub fn set_last_node(&self, node: Option<String>) {
        self.lock().last_node = node;
    }
}
