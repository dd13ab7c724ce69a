//! One WebSocket connection to ComfyUI's `/ws?clientId=…`, yielding typed [`ComfyEvent`]s.
//!
//! Reconnection is not handled here but by the event hub in `hub.rs`; this type is one
//! connection's lifetime.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::endpoint::ComfyEndpoint;
use crate::error::{ComfyError, error_chain};
use crate::events::ComfyEvent;
use crate::ids::ClientId;

/// What one read from the socket produced.
pub(crate) enum Received {
    /// A parsed event.
    Event(ComfyEvent),
    /// A frame that carries no event but shows the peer is alive.
    Alive,
}

/// Options for opening a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// Limit for TCP connect + WebSocket handshake.
    pub connect_timeout: Duration,
    /// Send the `feature_flags` handshake asking for type-4 previews (which carry the node and
    /// prompt id). Harmless on servers that do not know it.
    pub preview_metadata: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(5), preview_metadata: true }
    }
}

/// An open `/ws` connection.
pub struct ComfySocket {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    label: String,
}

impl std::fmt::Debug for ComfySocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComfySocket").field("endpoint", &self.label).finish_non_exhaustive()
    }
}

impl ComfySocket {
    /// Connects to `/ws?clientId=<client_id>`. Reconnecting with the same client id replaces any
    /// older socket of that id on the server.
    pub async fn connect(
        endpoint: &ComfyEndpoint,
        client_id: &ClientId,
        options: &SocketOptions,
    ) -> Result<Self, ComfyError> {
        Self::connect_with_token(endpoint, client_id, None, options).await
    }

    /// [`ComfySocket::connect`] with `?token=` for a ComfyUI that checks one (C19). The
    /// handshake sends no `Origin` header (ComfyUI refuses a foreign one with 403, C18), and a
    /// 401 is [`ComfyError::Unauthorized`].
    pub async fn connect_with_token(
        endpoint: &ComfyEndpoint,
        client_id: &ClientId,
        token: Option<&str>,
        options: &SocketOptions,
    ) -> Result<Self, ComfyError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let label = endpoint.to_string();
        let url = endpoint.ws_url_with_token(client_id, token);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ComfyError::WebSocket { endpoint: label.clone(), reason: error_chain(&e) })?;
        request.headers_mut().insert("comfy-usage-source", http_value("tdcomfy"));
        if let Some(token) = token {
            // Proxies in front of ComfyUI check the header; ComfyUI wrappers the query.
            request.headers_mut().insert("authorization", http_value(&format!("Bearer {token}")));
        }
        let connecting = tokio_tungstenite::connect_async(request);
        let (stream, _response) = tokio::time::timeout(options.connect_timeout, connecting)
            .await
            .map_err(|_| ComfyError::Unreachable {
                endpoint: label.clone(),
                reason: "WebSocket connect timed out".to_owned(),
            })?
            .map_err(|e| {
                use tokio_tungstenite::tungstenite::Error;
                match e {
                    // Connection refused and friends: the server is not there.
                    Error::Io(io) => ComfyError::Unreachable { endpoint: label.clone(), reason: io.to_string() },
                    Error::Http(response) if response.status().as_u16() == 401 => {
                        ComfyError::Unauthorized { endpoint: label.clone(), token_sent: token.is_some() }
                    }
                    other => ComfyError::WebSocket { endpoint: label.clone(), reason: error_chain(&other) },
                }
            })?;
        let mut socket = Self { stream, label };
        if options.preview_metadata {
            let hello = r#"{"type":"feature_flags","data":{"supports_preview_metadata":true}}"#;
            socket.stream.send(Message::text(hello)).await.map_err(|e| socket.ws_error(&e))?;
        }
        Ok(socket)
    }

    /// The next event. `None` once the server closed the connection; an `Err` means the
    /// connection broke. Frames that cannot be parsed are logged and skipped.
    pub async fn next_event(&mut self) -> Option<Result<ComfyEvent, ComfyError>> {
        loop {
            match self.receive().await? {
                Ok(Received::Alive) => continue,
                Ok(Received::Event(event)) => return Some(Ok(event)),
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// Like [`ComfySocket::next_event`], but also reports frames that only prove the connection
    /// is alive (pongs, unparseable frames), for idle detection.
    pub(crate) async fn receive(&mut self) -> Option<Result<Received, ComfyError>> {
        let message = match self.stream.next().await? {
            Ok(message) => message,
            Err(e) => return Some(Err(self.ws_error(&e))),
        };
        let parsed = match message {
            Message::Text(text) => ComfyEvent::from_text(text.as_str()),
            Message::Binary(bytes) => ComfyEvent::from_binary(&bytes),
            Message::Close(_) => return None,
            // Pings are answered by tungstenite itself; pongs only prove liveness.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                return Some(Ok(Received::Alive));
            }
        };
        Some(Ok(match parsed {
            Ok(event) => Received::Event(event),
            Err(error) => {
                tracing::warn!(endpoint = %self.label, %error, "skipping unparseable ComfyUI frame");
                Received::Alive
            }
        }))
    }

    /// Sends a WebSocket ping; a dead connection shows up as an error here or on the next read.
    pub async fn ping(&mut self) -> Result<(), ComfyError> {
        self.stream.send(Message::Ping(bytes::Bytes::from_static(b"tdcomfy"))).await.map_err(|e| self.ws_error(&e))
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }

    fn ws_error(&self, error: &tokio_tungstenite::tungstenite::Error) -> ComfyError {
        ComfyError::WebSocket { endpoint: self.label.clone(), reason: error_chain(error) }
    }
}

/// A header value from text this module builds; a token with characters a header cannot carry
/// is refused when the client is created, so this cannot fail for it.
fn http_value(text: &str) -> tokio_tungstenite::tungstenite::http::HeaderValue {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_str(text)
        .unwrap_or_else(|_| tokio_tungstenite::tungstenite::http::HeaderValue::from_static(""))
}
