//! The tdcomfy broker: the job API TouchDesigner talks to and workers lease jobs from.
//!
//! [`run`] serves the API on a listener until `shutdown` resolves. Jobs are durable in SQLite under
//! the data directory ([`store`]), their files beside it ([`blobs`]); [`service`] holds the rules
//! of the job lifecycle and publishes every change as an event ([`events`]); [`http`] is the thin
//! HTTP layer on top.

pub mod blobs;
pub mod clock;
pub mod config;
pub mod data_dir;
pub mod events;
pub mod http;
pub mod image_check;
pub mod image_sniff;
pub mod listener;
pub mod metrics;
pub mod previews;
pub mod service;
pub mod store;
pub mod tls;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;

pub use config::{BrokerArgs, BrokerConfig, ConfigError, NetArgs, NetConfig, ObserveArgs, StorageArgs};
pub use service::{Broker, BrokerError};

/// Serves the broker on `listener` until `shutdown` resolves, then finishes in-flight requests.
///
/// Opening the data directory happens before the first request is accepted; a job accepted by
/// this function is on disk before its response is sent.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: BrokerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BrokerError> {
    let addr = listener.local_addr()?;
    warn_if_exposed(addr, &config);
    // Held until this function ends (or its task is dropped), so a restart in the same process
    // can take it again.
    let _lock = data_dir::DataDirLock::acquire(&config.data_dir, addr)?;
    let broker = Broker::open_on(config, Some(addr)).await?;
    // Like the sweeper: a broker whose `run` is over (or dropped) stops saying it is alive and
    // stops following other brokers, though a connection of its may still hold it.
    let _background = StopBackground(broker.clone());
    // Aborted when this future ends or is dropped: a broker that stopped must not go on requeueing
    // jobs in the data directory it no longer serves.
    let sweeper = AbortOnDrop(tokio::spawn(sweep_forever(broker.clone())));
    let stop = broker.shutdown_token().clone();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    });
    let net = broker.config().net.clone();
    let leaving = broker.clone();
    let app = http::router(broker);
    let scheme = if net.tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, "broker listening");
    let mut connections = listener::serve(listener, app, &net, stop.clone()).await;
    // Streams and long-polls end on the token; a client still uploading gets a few seconds.
    let drained =
        tokio::time::timeout(SHUTDOWN_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("requests still open {SHUTDOWN_GRACE:?} after shutdown began; closing them");
        connections.shutdown().await;
    }
    drop(sweeper);
    // Only on a graceful stop: a crashed broker's row lapses by itself (see `others_alive`).
    leaving.leave().await;
    Ok(())
}

/// A task aborted when its handle is dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stops a broker's background tasks when dropped.
struct StopBackground(Broker);

impl Drop for StopBackground {
    fn drop(&mut self) {
        self.0.stop_background();
    }
}

/// How long a shutdown waits for requests in flight (uploads) before closing them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn warn_if_exposed(addr: SocketAddr, config: &BrokerConfig) {
    if !addr.ip().is_loopback() && config.api_token.is_none() {
        tracing::warn!(
            %addr,
            "listening on a non-loopback address without API_TOKEN: anyone who can reach this port can \
             submit, read and cancel jobs; set API_TOKEN (and WORKER_TOKEN) or API_HOST=127.0.0.1"
        );
    }
    if !addr.ip().is_loopback() && config.api_token.is_none() && config.worker_token.is_none() {
        tracing::info!("WORKER_TOKEN is not set: worker routes answer only workers on this machine");
    }
    if !addr.ip().is_loopback() && config.api_token.is_some() && config.worker_token.is_none() {
        tracing::warn!("WORKER_TOKEN is not set: workers authenticate with the client token API_TOKEN");
    }
}

async fn sweep_forever(broker: Broker) {
    let mut tick = tokio::time::interval(broker.config().sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = broker.sweep().await {
            tracing::error!(error = %e, "housekeeping failed; retrying");
        }
    }
}
