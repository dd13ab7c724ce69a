//! A TCP proxy on 127.0.0.1 that slows the client-to-server direction to a set rate: a slow uplink
//! between a worker and its broker, as a real one would be (the bytes really wait in socket
//! buffers; nothing is faked above TCP).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct SlowUplink {
    pub addr: SocketAddr,
    /// Bytes per second towards the server; 0 means unlimited.
    rate: Arc<AtomicU64>,
    /// Bytes forwarded towards the server so far, on all connections.
    pub forwarded: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    /// Closes every connection when the proxy is dropped (a pulled cable, not a draining one).
    cut: tokio_util::sync::CancellationToken,
}

impl SlowUplink {
    pub async fn start(upstream: SocketAddr, bytes_per_sec: u64) -> SlowUplink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rate = Arc::new(AtomicU64::new(bytes_per_sec));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (r, f) = (rate.clone(), forwarded.clone());
        let cut = tokio_util::sync::CancellationToken::new();
        let cut_all = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (r, f, cut) = (r.clone(), f.clone(), cut_all.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 8 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let rate = r.load(Ordering::Relaxed);
                            if rate > 0 {
                                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            f.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        SlowUplink { addr, rate, forwarded, task, cut }
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}

impl Drop for SlowUplink {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.cancel();
    }
}
