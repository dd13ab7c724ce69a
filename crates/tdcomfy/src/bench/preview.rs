//! `tdcomfy bench preview`: how long a preview takes from ComfyUI's binary WebSocket frame to a
//! complete image file on the client's disk.
//!
//! The simulator runs in this process behind a TCP relay that notes the moment each binary
//! WebSocket frame (a preview) has passed to the worker; broker and worker run as a `tdcomfy up`
//! child process whose worker talks to ComfyUI through that relay, with `PREVIEW_FPS=1000` so no
//! frame is throttled away. This process then plays the TouchDesigner client: it follows the job's
//! events, fetches each announced preview and writes it to a temporary file renamed onto one of
//! two names, as `touchdesigner_client.FramePipeline(previews=True)` does. Frames are
//! `--interval` apart, far more than the latency, so each file belongs to the latest frame before
//! it; a file later than half an interval is counted as unmatched instead of guessed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::loadgen::quantile;
use super::{ChildServer, TempDir, fmt_ms};

/// Options of the preview benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct PreviewBenchArgs {
    /// Jobs to run one after the other.
    #[arg(long, default_value_t = 5)]
    pub jobs: usize,
    /// Preview frames per job (the test node's steps).
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    /// Seconds between two preview frames.
    #[arg(long, default_value_t = 0.1)]
    pub interval: f64,
}

/// When each binary WebSocket frame from ComfyUI finished passing the relay.
type FrameTimes = Arc<Mutex<Vec<Instant>>>;

/// Runs the benchmark and prints the figures.
pub async fn run(args: PreviewBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.interval > 0.0 && args.jobs > 0 && args.steps > 0,
        "jobs, steps and interval must be positive"
    );
    let dir = TempDir::new("tdcomfy-bench-preview")?;
    let workflows = dir.0.join("workflows");
    std::fs::create_dir_all(&workflows)?;
    for entry in std::fs::read_dir(std::env::current_dir()?.join("workflows")).context("reading ./workflows")? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&path, workflows.join(path.file_name().context("file name")?))?;
        }
    }
    // The simulator's test node sends a JPEG preview (the frame fitted into 512×512) every step.
    let graph = serde_json::json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "SlowPassthrough", "inputs": {"images": ["1", 0], "steps": args.steps, "step_seconds": args.interval, "send_preview": true}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "tdcomfy/bench-preview"}}
    });
    std::fs::write(workflows.join("bench_preview.json"), graph.to_string())?;

    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = sim_listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let sim_stop = stop.clone();
    let sim_config = tdcomfy_sim::SimConfig::new(dir.0.join("sim"));
    tokio::spawn(async move { tdcomfy_sim::run(sim_listener, sim_config, sim_stop.cancelled_owned()).await });
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let relay_port = relay.local_addr()?.port().to_string();
    let frames: FrameTimes = Arc::default();
    tokio::spawn(serve_relay(relay, sim_addr, frames.clone()));

    let workflows_dir = workflows.to_string_lossy().into_owned();
    let server = ChildServer::start(
        &["up"],
        &[
            ("COMFYUI_HOST", "127.0.0.1"),
            ("COMFYUI_PORT", relay_port.as_str()),
            ("WORKFLOWS_DIR", workflows_dir.as_str()),
            ("PREVIEW_FPS", "1000"),
        ],
    )
    .await?;
    println!(
        "tdcomfy preview benchmark: {} jobs x {} preview frames {} s apart, simulator → relay → worker → broker → client file",
        args.jobs, args.steps, args.interval
    );
    let http = reqwest::Client::new();
    let frame = super::noise_png(512, 320);
    let out = dir.0.join("client");
    std::fs::create_dir_all(&out)?;
    let (mut latencies, mut unmatched, mut slot) = (Vec::new(), 0usize, 0usize);
    for i in 0..args.jobs {
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(frame.clone()).file_name("frame.png"))
            .text("prompt", format!("preview {i}"))
            .text("workflow", "bench_preview")
            .text("previews", "true");
        let resp = http.post(format!("{}/jobs", server.base)).multipart(form).send().await?;
        anyhow::ensure!(resp.status() == 200, "submit answered {}: {}", resp.status(), resp.text().await?);
        let id = resp.json::<serde_json::Value>().await?["job_id"].as_str().context("job_id")?.to_owned();
        let events = http.get(format!("{}/jobs/{id}/events", server.base)).send().await?;
        let mut events = crate::sse::JobEvents::new(events);
        while let Some((name, data)) = events.next_raw().await? {
            let data: serde_json::Value = serde_json::from_str(&data)?;
            if name == "preview" {
                let url = data["url"].as_str().context("preview url")?;
                let resp = http.get(format!("{}{url}", server.base)).send().await?;
                if resp.status() != 200 {
                    continue; // the job ended meanwhile
                }
                let bytes = resp.bytes().await?;
                let path = out.join(format!("preview_{slot}.jpg"));
                let part = out.join(format!("preview_{slot}.jpg.part"));
                tokio::fs::write(&part, &bytes).await?;
                tokio::fs::rename(&part, &path).await?;
                let written = Instant::now();
                slot = 1 - slot;
                let sent =
                    frames.lock().unwrap_or_else(|p| p.into_inner()).iter().rev().find(|t| **t <= written).copied();
                match sent.map(|t| written - t) {
                    Some(latency) if latency.as_secs_f64() < args.interval / 2.0 => latencies.push(latency),
                    _ => unmatched += 1,
                }
            } else if data["job"]["status"].as_str().is_some_and(|s| matches!(s, "done" | "error" | "cancelled")) {
                anyhow::ensure!(data["job"]["status"] == "done", "job {id} ended {}", data["job"]["status"]);
                break;
            }
        }
    }
    stop.cancel();
    let sent = frames.lock().unwrap_or_else(|p| p.into_inner()).len();
    latencies.sort();
    println!("{:<44} {sent}", "binary preview frames from ComfyUI");
    println!("{:<44} {} (+{unmatched} unmatched)", "preview files written by the client", latencies.len());
    println!(
        "{:<44} p50 {}  p99 {}  max {}",
        "ComfyUI frame → client preview file",
        fmt_ms(quantile(&latencies, 0.5)),
        fmt_ms(quantile(&latencies, 0.99)),
        fmt_ms(latencies.last().copied().unwrap_or_default())
    );
    Ok(())
}

/// Relays connections to `upstream`, noting when each binary WebSocket frame from it has passed.
async fn serve_relay(listener: tokio::net::TcpListener, upstream: std::net::SocketAddr, frames: FrameTimes) {
    while let Ok((client, _)) = listener.accept().await {
        let frames = frames.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            let up = async {
                let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                let _ = server_tx.shutdown().await;
            };
            let down = async {
                let mut watch = FrameWatch::default();
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = server_rx.read(&mut buf).await {
                    if n == 0 || client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let binary = watch.feed(&buf[..n]);
                    if binary > 0 {
                        let now = Instant::now();
                        frames.lock().unwrap_or_else(|p| p.into_inner()).extend(std::iter::repeat_n(now, binary));
                    }
                }
                let _ = client_tx.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

/// Follows a server's side of one connection: an HTTP response head, then, after a `101`,
/// WebSocket frames (unmasked, as servers send them).
#[derive(Default)]
struct FrameWatch {
    buf: Vec<u8>,
    upgraded: bool,
    /// A plain HTTP connection: nothing to watch.
    plain: bool,
}

impl FrameWatch {
    /// Takes bytes just relayed; returns how many binary frames they completed.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        if self.plain {
            return 0;
        }
        self.buf.extend_from_slice(bytes);
        if !self.upgraded {
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else { return 0 };
            if !self.buf.starts_with(b"HTTP/1.1 101") {
                self.plain = true;
                self.buf = Vec::new();
                return 0;
            }
            self.upgraded = true;
            self.buf.drain(..end + 4);
        }
        let mut binary = 0;
        loop {
            let b = &self.buf;
            if b.len() < 2 {
                break;
            }
            let (len, header) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap_or_default()), 10),
                126 | 127 => break,
                n => (u64::from(n), 2),
            };
            let total = header + len as usize;
            if b.len() < total {
                break;
            }
            if b[0] & 0x0F == 0x2 {
                binary += 1;
            }
            self.buf.drain(..total);
        }
        binary
    }
}
