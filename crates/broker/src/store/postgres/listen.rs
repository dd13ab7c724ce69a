//! The LISTEN task: one dedicated (unpooled) connection that hears the notes every broker's
//! transactions send on [`super::CHANNEL`] and forwards the other brokers' ones as
//! [`ClusterNote`]s on a broadcast channel (a slow receiver lags and is told so; it never holds
//! this task up). On connection loss it reconnects with backoff and sends
//! [`ClusterNote::Missed`] once it listens again, since notes sent meanwhile are lost.

use std::time::Duration;

use futures_util::StreamExt;
use tdcomfy_api::{JobEventKind, JobId};
use tokio::sync::{broadcast, oneshot};
use tokio_postgres::AsyncMessage;

use crate::store::ClusterNote;

/// Notes a receiver may fall behind by before it is told it lagged.
const CAPACITY: usize = 4096;

/// The name the listening connection gives itself (`pg_stat_activity.application_name`).
pub const APPLICATION_NAME: &str = "tdcomfy-listen";

/// The running LISTEN task; dropping the last store handle stops it.
pub(crate) struct Listener {
    notes: broadcast::Sender<ClusterNote>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Connects, and returns once `LISTEN` is in effect (so no change committed after the store
    /// is open goes unheard).
    pub(crate) async fn start(mut config: tokio_postgres::Config, me: String) -> Result<Listener, String> {
        config.application_name(APPLICATION_NAME);
        let first = config.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        let (notes, _) = broadcast::channel(CAPACITY);
        let (ready, listening) = oneshot::channel();
        let task = tokio::spawn(run(config, me, notes.clone(), first, ready));
        match tokio::time::timeout(Duration::from_secs(10), listening).await {
            Ok(Ok(())) => Ok(Listener { notes, task }),
            _ => {
                task.abort();
                Err("LISTEN did not take effect".into())
            }
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ClusterNote> {
        self.notes.subscribe()
    }
}

type Connected =
    (tokio_postgres::Client, tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>);

async fn run(
    config: tokio_postgres::Config,
    me: String,
    notes: broadcast::Sender<ClusterNote>,
    first: Connected,
    ready: oneshot::Sender<()>,
) {
    let (mut next, mut ready, mut lost) = (Some(first), Some(ready), false);
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = match next.take() {
            Some(c) => Ok(c),
            None => config.connect(tokio_postgres::NoTls).await,
        };
        match connected {
            Ok((client, mut connection)) => {
                // The client's LISTEN only makes progress while the connection is polled, so the
                // two run side by side.
                let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!("LISTEN {}", super::CHANNEL);
                let listen = client.batch_execute(&statement);
                tokio::pin!(listen);
                let mut listening = false;
                loop {
                    tokio::select! {
                        r = &mut listen, if !listening => match r {
                            Ok(()) => {
                                listening = true;
                                backoff = Duration::from_millis(100);
                                if let Some(ready) = ready.take() {
                                    let _ = ready.send(());
                                }
                                if lost {
                                    let _ = notes.send(ClusterNote::Missed);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "PostgreSQL LISTEN failed");
                                break;
                            }
                        },
                        m = messages.next() => match m {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                if let Some(note) = parse(n.payload(), &me) {
                                    // No receivers is fine (nobody listening yet).
                                    let _ = notes.send(note);
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "the PostgreSQL listening connection was lost");
                                break;
                            }
                            None => {
                                tracing::warn!("the PostgreSQL listening connection closed");
                                break;
                            }
                        },
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reconnect the PostgreSQL listening connection"),
        }
        lost = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The payload's name of an event kind.
pub(crate) fn kind_name(kind: JobEventKind) -> &'static str {
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

fn parse_kind(name: &str) -> Option<JobEventKind> {
    Some(match name {
        "snapshot" => JobEventKind::Snapshot,
        "queued" => JobEventKind::Queued,
        "started" => JobEventKind::Started,
        "progress" => JobEventKind::Progress,
        "done" => JobEventKind::Done,
        "error" => JobEventKind::Error,
        "cancelled" => JobEventKind::Cancelled,
        "deleted" => JobEventKind::Deleted,
        _ => return None,
    })
}

/// `<broker_id> <kind> <job_id> <version>`; `None` for this broker's own notes and for payloads
/// that are not ours (anything may NOTIFY on a channel).
fn parse(payload: &str, me: &str) -> Option<ClusterNote> {
    let mut parts = payload.split(' ');
    let (from, kind, id, version) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if from == me || parts.next().is_some() {
        return None;
    }
    Some(ClusterNote::Changed { id: JobId::parse(id)?, kind: parse_kind(kind)?, version: version.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_of_other_brokers_parse_and_own_ones_are_dropped() {
        let id = JobId::new();
        let note = parse(&format!("b2 started {id} 7"), "b1");
        assert_eq!(note, Some(ClusterNote::Changed { id, kind: JobEventKind::Started, version: 7 }));
        assert_eq!(parse(&format!("b1 started {id} 7"), "b1"), None, "own note");
        assert_eq!(parse(&format!("b2 bogus {id} 7"), "b1"), None);
        assert_eq!(parse("b2 done not-an-id 7", "b1"), None);
        assert_eq!(parse(&format!("b2 done {id} 7 extra"), "b1"), None);
    }
}
