//! A minimal HTTP/1.1 load generator over raw keep-alive TCP connections.
//!
//! The benchmark runs on the same two cores as the broker, so the client must be cheaper than the
//! server: no connection pool, no header maps, one reused buffer per connection.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Latencies and count of a load run.
pub struct LoadReport {
    /// Requests completed with a 2xx status.
    pub ok: u64,
    /// Requests that got another status or broke.
    pub failed: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Sorted per-request latencies.
    pub latencies: Vec<Duration>,
}

impl LoadReport {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// The `q`-quantile (0..=1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx]
}

/// Sends `GET path` over `connections` keep-alive connections for `duration`.
pub async fn get_load(addr: &str, path: &str, connections: usize, duration: Duration) -> std::io::Result<LoadReport> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (addr, request) = (addr.to_owned(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(&addr).await?;
            conn.set_nodelay(true)?;
            let mut buf = vec![0u8; 16 * 1024];
            let (mut ok, mut failed, mut lat) = (0u64, 0u64, Vec::new());
            while Instant::now() < deadline {
                let t = Instant::now();
                conn.write_all(&request).await?;
                let status = read_response(&mut conn, &mut buf).await?;
                lat.push(t.elapsed());
                if (200..300).contains(&status) {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            Ok::<_, std::io::Error>((ok, failed, lat))
        }));
    }
    let mut report = LoadReport { ok: 0, failed: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for t in tasks {
        let (ok, failed, lat) = t.await.map_err(std::io::Error::other)??;
        report.ok += ok;
        report.failed += failed;
        report.latencies.extend(lat);
    }
    report.elapsed = start.elapsed();
    report.latencies.sort();
    Ok(report)
}

/// Reads one response (headers plus a Content-Length body) and returns its status.
pub async fn read_response(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let mut filled = 0;
    let header_end = loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = conn.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        filled += n;
        if let Some(pos) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(std::io::Error::other)?;
    let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut have = filled - header_end;
    while have < length {
        let n = conn.read(&mut buf[..]).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "body cut short"));
        }
        have += n;
    }
    Ok(status)
}
