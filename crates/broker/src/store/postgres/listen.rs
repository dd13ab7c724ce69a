//! The LISTEN task: one dedicated (unpooled) connection that hears the notes every broker's
//! transactions send on [`super::CHANNEL`] and forwards the other brokers' ones as
//! [`ClusterNote`]s on a broadcast channel (a slow receiver lags and is told so; it never holds
//! this task up). On connection loss it reconnects with backoff and sends
//! [`ClusterNote::Missed`] once it listens again, since notes sent meanwhile are lost.
//!
//! An idle connection that a NAT or firewall dropped silently looks alive forever (nothing is
//! sent on it, so nothing fails), and every note would be lost without a `Missed`: so the task
//! sends `SELECT 1` every [`Liveness::every`] and treats no answer within
//! [`Liveness::timeout`] as a lost connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// How the listening connection checks it is still alive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Liveness {
    /// Time between pings.
    pub every: Duration,
    /// Longest wait for a ping's answer.
    pub timeout: Duration,
}

impl Default for Liveness {
    /// A ping every 20 s, answered within 10 s: a silent drop is noticed within half a minute,
    /// at a cost of one trivial statement per broker every 20 s.
    fn default() -> Liveness {
        Liveness { every: Duration::from_secs(20), timeout: Duration::from_secs(10) }
    }
}

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
    pub(crate) async fn start(
        mut config: tokio_postgres::Config,
        me: String,
        liveness: Liveness,
        changes: Arc<AtomicU64>,
    ) -> Result<Listener, String> {
        config.application_name(APPLICATION_NAME);
        let first = config.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        let (notes, _) = broadcast::channel(CAPACITY);
        let (ready, listening) = oneshot::channel();
        let task = tokio::spawn(run(config, me, notes.clone(), first, ready, liveness, changes));
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
    liveness: Liveness,
    changes: Arc<AtomicU64>,
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
                let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + liveness.every, liveness.every);
                pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // The ping in flight, if any; it makes progress, like LISTEN, only while the
                // connection is polled below.
                let mut ping = None;
                loop {
                    tokio::select! {
                        _ = pings.tick(), if listening && ping.is_none() => {
                            ping = Some(Box::pin(tokio::time::timeout(liveness.timeout, client.batch_execute("SELECT 1"))));
                        }
                        r = async { ping.as_mut().expect("guarded").await }, if ping.is_some() => {
                            ping = None;
                            match r {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::warn!(error = %e, "the PostgreSQL listening connection failed its ping");
                                    break;
                                }
                                Err(_) => {
                                    tracing::warn!(
                                        timeout_ms = liveness.timeout.as_millis() as u64,
                                        "the PostgreSQL listening connection did not answer its ping: reconnecting"
                                    );
                                    break;
                                }
                            }
                        }
                        r = &mut listen, if !listening => match r {
                            Ok(()) => {
                                listening = true;
                                backoff = Duration::from_millis(100);
                                if let Some(ready) = ready.take() {
                                    let _ = ready.send(());
                                }
                                if lost {
                                    changes.fetch_add(1, Ordering::Release);
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
                                // A committed change of the queue, this broker's own included,
                                // moves queue positions (the store's snapshot of them is stale
                                // now); progress and wake-ups do not.
                                if moves_queue(n.payload()) {
                                    changes.fetch_add(1, Ordering::Release);
                                }
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

/// The kind word of a [`ClusterNote::Wake`] (not an event kind: no event is published for it).
pub(crate) const WAKE: &str = "wake";

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

/// Whether a note's change may move queue positions: all but progress and wake-ups.
fn moves_queue(payload: &str) -> bool {
    let kind = payload.split(' ').nth(1);
    !matches!(kind, Some(k) if k == WAKE || k == kind_name(JobEventKind::Progress))
}

/// `<broker_id> <kind> <job_id> <version>`; `None` for this broker's own notes and for payloads
/// that are not ours (anything may NOTIFY on a channel).
fn parse(payload: &str, me: &str) -> Option<ClusterNote> {
    let mut parts = payload.split(' ');
    let (from, kind, id, version) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if from == me || parts.next().is_some() {
        return None;
    }
    let (id, version): (JobId, u64) = (JobId::parse(id)?, version.parse().ok()?);
    if kind == WAKE {
        return Some(ClusterNote::Wake);
    }
    Some(ClusterNote::Changed { id, kind: parse_kind(kind)?, version })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TCP relay to `upstream` whose connections can be cut silently: once `cut`, a connection
    /// forwards nothing more and never closes, like a NAT that forgot it. Connections accepted
    /// later forward normally.
    async fn silent_relay(upstream: String) -> (u16, Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let flags: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = flags.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                let cut = Arc::new(AtomicBool::new(false));
                registry.lock().unwrap().push(cut.clone());
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (mut from, mut to, cut) in [
                    (
                        Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        cut.clone(),
                    ),
                    (Box::new(ro), Box::new(wi), cut),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if cut.load(Ordering::SeqCst) {
                                // Swallow everything, keep both ends open.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        (port, flags)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silently_dropped_connection_fails_its_ping_and_reports_missed() {
        let Some(url) = std::env::var("TDCOMFY_TEST_DATABASE_URL").ok().filter(|u| !u.trim().is_empty()) else {
            println!("SKIPPED: TDCOMFY_TEST_DATABASE_URL is unset");
            return;
        };
        let direct: tokio_postgres::Config = url.parse().unwrap();
        let tokio_postgres::config::Host::Tcp(host) = &direct.get_hosts()[0] else { return };
        let upstream = format!("{host}:{}", direct.get_ports().first().copied().unwrap_or(5432));
        let (port, connections) = silent_relay(upstream).await;
        let mut relayed = tokio_postgres::Config::new();
        relayed.host(host).port(port).dbname(direct.get_dbname().unwrap_or("postgres"));
        relayed.user(direct.get_user().unwrap_or("postgres"));
        if let Some(password) = direct.get_password() {
            relayed.password(password);
        }
        let liveness = Liveness { every: Duration::from_millis(200), timeout: Duration::from_secs(2) };
        let listener = Listener::start(relayed, "me".into(), liveness, Default::default()).await.unwrap();
        let mut heard = listener.subscribe();
        let (client, connection) = direct.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let notify = |id: JobId| format!("NOTIFY {}, 'other queued {id} 1'", super::super::CHANNEL);
        let id = JobId::new();
        client.batch_execute(&notify(id)).await.unwrap();
        let note = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await.unwrap().unwrap();
        assert_eq!(note, ClusterNote::Changed { id, kind: JobEventKind::Queued, version: 1 });
        // The network forgets the connection: no error, no close, just silence.
        for cut in connections.lock().unwrap().iter() {
            cut.store(true, Ordering::SeqCst);
        }
        let note = tokio::time::timeout(Duration::from_secs(10), heard.recv()).await;
        assert_eq!(note.expect("the silent drop is noticed").unwrap(), ClusterNote::Missed);
        // Listening again, on a fresh connection.
        let id = JobId::new();
        client.batch_execute(&notify(id)).await.unwrap();
        let note = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await.unwrap().unwrap();
        assert_eq!(note, ClusterNote::Changed { id, kind: JobEventKind::Queued, version: 1 });
    }

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
