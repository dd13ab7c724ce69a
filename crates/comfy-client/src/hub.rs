//! The one long-lived WebSocket per ComfyUI server and client id: connects, pings, detects idle
//! or broken connections, reconnects with backoff (same client id) and fans events out to every
//! prompt supervisor through a broadcast channel.
//!
//! Sharing one socket matters because ComfyUI keeps exactly one socket per client id: a second
//! connection with the same id silently steals the events of the first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::client::ComfyClient;
use crate::error::ComfyError;
use crate::events::ComfyEvent;
use crate::socket::{ComfySocket, Received, SocketOptions};

/// Tuning of the shared socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// How each connection is opened.
    pub socket: SocketOptions,
    /// First reconnect delay; doubles per failed attempt or connection shorter than
    /// `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Send a ping after this long without a frame.
    pub ping_interval: Duration,
    /// Drop and reconnect after this long without any frame (pongs included): a half-open TCP
    /// connection otherwise looks healthy forever.
    pub idle_timeout: Duration,
    /// Events buffered per subscriber before it lags (a lagging subscriber falls back to polling).
    pub capacity: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            socket: SocketOptions::default(),
            reconnect_initial: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(35),
            capacity: 1024,
        }
    }
}

/// What subscribers receive.
#[derive(Debug, Clone)]
pub enum HubNotice {
    /// A (re)connection succeeded; events sent while disconnected are lost, so poll now.
    Connected {
        /// Increments with every successful connection.
        generation: u64,
    },
    /// The connection is gone; reconnecting in the background.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// An event from the server.
    Event(Arc<ComfyEvent>),
}

/// The hub's connection state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubState {
    /// True while a socket is open.
    pub connected: bool,
    /// Number of successful connections so far.
    pub generation: u64,
    /// The last connection failure, if any.
    pub last_error: Option<String>,
}

/// Handle to the shared socket task of one [`ComfyClient`]. Cheap to clone; the background task
/// stops when the last handle is dropped.
#[derive(Clone)]
pub struct EventHub {
    shared: Arc<Shared>,
}

struct Shared {
    sender: broadcast::Sender<HubNotice>,
    state: watch::Receiver<HubState>,
    _stop: DropGuard,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub").field("state", &*self.shared.state.borrow()).finish()
    }
}

impl EventHub {
    /// Starts the socket task for `client` (its endpoint and client id). Must be called inside a
    /// tokio runtime.
    pub fn spawn(client: &ComfyClient, options: HubOptions) -> Self {
        let (sender, _) = broadcast::channel(options.capacity.max(16));
        let (state_tx, state) = watch::channel(HubState::default());
        let stop = CancellationToken::new();
        let task =
            HubTask { client: client.clone(), options, sender: sender.clone(), state: state_tx, stop: stop.clone() };
        tokio::spawn(task.run());
        Self { shared: Arc::new(Shared { sender, state, _stop: stop.drop_guard() }) }
    }

    /// Subscribes to notices from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<HubNotice> {
        self.shared.sender.subscribe()
    }

    /// The current connection state.
    pub fn state(&self) -> HubState {
        self.shared.state.borrow().clone()
    }

    /// A receiver that sees every state change (for health reporting).
    pub fn state_changes(&self) -> watch::Receiver<HubState> {
        self.shared.state.clone()
    }

    /// Waits until a socket is open, up to `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut state = self.shared.state.clone();
        tokio::time::timeout(timeout, state.wait_for(|s| s.connected)).await.is_ok_and(|r| r.is_ok())
    }
}

struct HubTask {
    client: ComfyClient,
    options: HubOptions,
    sender: broadcast::Sender<HubNotice>,
    state: watch::Sender<HubState>,
    stop: CancellationToken,
}

impl HubTask {
    async fn run(self) {
        let endpoint = self.client.endpoint().clone();
        let mut delay = self.options.reconnect_initial;
        loop {
            let connecting = ComfySocket::connect_with_token(
                &endpoint,
                self.client.client_id(),
                self.client.token(),
                &self.options.socket,
            );
            let connected = tokio::select! {
                _ = self.stop.cancelled() => return,
                result = connecting => result,
            };
            match connected {
                Ok(socket) => {
                    let connected_at = Instant::now();
                    let mut generation = 0;
                    self.state.send_modify(|s| {
                        s.connected = true;
                        s.generation += 1;
                        s.last_error = None;
                        generation = s.generation;
                    });
                    tracing::debug!(%endpoint, generation, "ComfyUI WebSocket connected");
                    // The server may have been restarted as another version while the socket was
                    // down: what it supports is found out again for this connection, off the
                    // event path.
                    self.client.forget_features(generation);
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        match client.detect_features().await {
                            Ok(features) => {
                                tracing::debug!(endpoint = %client.endpoint(), features = %features.summary(), "ComfyUI features")
                            }
                            Err(error) => {
                                tracing::debug!(endpoint = %client.endpoint(), %error, "could not detect ComfyUI's features")
                            }
                        }
                    });
                    let _ = self.sender.send(HubNotice::Connected { generation });
                    let reason = self.pump(socket).await;
                    // Only a connection that lasted counts as recovery: a server that accepts and
                    // drops at once must see the delays grow, not a reconnect every few ms.
                    if connected_at.elapsed() >= self.options.reconnect_max {
                        delay = self.options.reconnect_initial;
                    }
                    self.state.send_modify(|s| {
                        s.connected = false;
                        s.last_error = reason.clone();
                    });
                    let Some(reason) = reason else { return };
                    tracing::info!(%endpoint, %reason, "ComfyUI WebSocket lost; reconnecting");
                    let _ = self.sender.send(HubNotice::Disconnected { reason });
                }
                Err(error) => {
                    if matches!(error, ComfyError::Unauthorized { .. }) {
                        // Retrying cannot fix a token: say so plainly, then retry only slowly.
                        if self.state.borrow().last_error.as_deref() != Some(error.to_string().as_str()) {
                            tracing::error!(%endpoint, %error, "ComfyUI refused the event socket");
                        }
                        delay = self.options.reconnect_max;
                    } else {
                        tracing::debug!(%endpoint, %error, "ComfyUI WebSocket connect failed");
                    }
                    self.state.send_modify(|s| s.last_error = Some(error.to_string()));
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.options.reconnect_max);
        }
    }

    /// Forwards events until the connection ends; returns why, or `None` on shutdown.
    async fn pump(&self, mut socket: ComfySocket) -> Option<String> {
        let mut last_seen = Instant::now();
        let mut ping =
            tokio::time::interval_at(Instant::now() + self.options.ping_interval, self.options.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    socket.close().await;
                    return None;
                }
                received = socket.receive() => match received {
                    None => return Some("server closed the connection".to_owned()),
                    Some(Err(error)) => return Some(error.to_string()),
                    Some(Ok(Received::Alive)) => last_seen = Instant::now(),
                    Some(Ok(Received::Event(event))) => {
                        last_seen = Instant::now();
                        if let ComfyEvent::FeatureFlags(flags) = &event {
                            self.client.note_feature_flags(flags);
                        }
                        // No subscribers is normal between prompts.
                        let _ = self.sender.send(HubNotice::Event(Arc::new(event)));
                    }
                },
                _ = ping.tick() => {
                    if last_seen.elapsed() >= self.options.idle_timeout {
                        return Some(format!("no frame for {:?}", self.options.idle_timeout));
                    }
                    if last_seen.elapsed() >= self.options.ping_interval {
                        match tokio::time::timeout(self.options.ping_interval, socket.ping()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(error)) => return Some(error.to_string()),
                            Err(_) => return Some("ping could not be sent".to_owned()),
                        }
                    }
                }
            }
        }
    }
}
