//! `tdcomfy-sim`: a ComfyUI 0.3.64 and 0.38 simulator that needs no GPU.
//!
//! [`SimConfig::comfy_version`] picks the profile: 0.3.64 behaves as the captures in
//! `shared/reference/comfyui-captures` show; 0.38 adds the changes C1–C19 of
//! `shared/reference/comfyui-newer-versions.md` (jobs API, atomic cancel, UUID-only prompt ids,
//! per-prompt preview method, per-client events, node replacements, newer validation errors,
//! subgraph ids, assets, more `/system_stats`) and keeps the legacy routes.
//!
//! It serves ComfyUI's HTTP + WebSocket protocol the way the captured transcripts show it
//! (`/prompt`, `/queue`, `/interrupt`, `/history`, `/upload/image`, `/view`, `/object_info`,
//! `/system_stats`, `/features`, `/ws`, all also under `/api`), validates prompts with ComfyUI's
//! error shapes, runs them one at a time with the captured event order, and really evaluates the
//! graph: uploads are decoded, images resized/inverted, the LTXV image-to-video chain produces a
//! moving clip from the input frame, and save nodes write real PNG / APNG / WebP / H.264 MP4 files.
//!
//! Differences from a real ComfyUI, on purpose:
//! * only image loaders are cached: `LoadImage` / `LoadImageOutput` outputs are reused while the
//!   node's inputs and the file's *content* are those of the previous prompt (ComfyUI's classic
//!   cache with the SHA-256 `IS_CHANGED` of these nodes: a reused name with new bytes runs again),
//!   and are listed in `execution_cached`; every other node runs every time and save nodes write
//!   new files (real ComfyUI would also reuse them when their inputs are unchanged);
//! * `/system_stats` `argv` is `["main.py", "--listen", "--tdcomfy-sim", "--base-directory", <data dir>]`
//!   with the data directory absolute, so a worker on the same machine finds `input/` and
//!   `output/` as it would for a ComfyUI started with `--base-directory`;
//! * sampler nodes (`SamplerCustom`, `KSampler`) take [`SimConfig::job_time`] and report
//!   [`SimConfig::progress_steps`] `progress` events; other nodes run at real speed;
//! * `SaveWEBM` validates like the real node but fails at run time (no VP9/AV1 encoder here);
//! * failure injection through [`FaultConfig`] or markers in a `CLIPTextEncode` text:
//!   `[sim:error]`, `[sim:silent]`, `[sim:drop]`, `[sim:restart]`.
//!
//! H.264 is encoded with OpenH264 built from source; Cisco's patent licence covers only its own
//! binaries, which is fine for a test simulator.
//!
//! ```no_run
//! # async fn serve() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8188").await?;
//! let mut config = tdcomfy_sim::SimConfig::new("./sim-data");
//! config.faults.upload_delay = std::time::Duration::from_millis(200);
//! tdcomfy_sim::run(listener, config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod anim;
mod assets;
mod catalog;
mod executor;
mod files;
mod frames;
mod h264;
mod hub;
mod jobs;
mod json;
mod mp4;
mod nodes;
mod order;
mod queue;
mod replace;
mod server;
mod validate;
mod ws;

pub use mp4::{VideoInfo, video_info};

/// Failures the simulator injects into every prompt (markers in prompt text do the same per prompt).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultConfig {
    /// `[sim:error]`: the sampler node raises mid-run; `execution_error`, history status `error`.
    pub execution_error: bool,
    /// `[sim:silent]`: no WebSocket events for the prompt after `execution_start`; the history
    /// still completes, so a client has to poll `/history`.
    pub silent_ws: bool,
    /// `[sim:drop]`: every WebSocket connection is closed mid-run; the prompt still completes.
    pub drop_ws: bool,
    /// `[sim:restart]`: mid-run the simulator behaves like a restarted ComfyUI: sockets close,
    /// queue, history and counter are forgotten, and the prompt never reaches `/history`.
    pub lose_history: bool,
    /// delay before every `/upload/image` is answered
    pub upload_delay: Duration,
}

/// The ComfyUI version the simulator behaves as (`--comfy-version`, `SIM_COMFY_VERSION`).
///
/// `V0_3_64` is the version of the captures (the ground truth); `V0_38` adds what
/// `shared/reference/comfyui-newer-versions.md` lists as C1–C19 and drops what 0.38 no longer does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ComfyVersion {
    /// ComfyUI 0.3.64, as captured
    #[default]
    V0_3_64,
    /// ComfyUI 0.38.1
    V0_38,
}

impl ComfyVersion {
    /// The version as `--comfy-version` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ComfyVersion::V0_3_64 => "0.3.64",
            ComfyVersion::V0_38 => "0.38",
        }
    }

    /// `comfyui_version` in `/system_stats`.
    pub fn full(self) -> &'static str {
        match self {
            ComfyVersion::V0_3_64 => "0.3.64",
            ComfyVersion::V0_38 => "0.38.1",
        }
    }

    /// Whether this profile has the behaviours added after 0.3.64 (C1–C19).
    pub fn is_newer(self) -> bool {
        self == ComfyVersion::V0_38
    }
}

impl std::fmt::Display for ComfyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value that is not one of the accepted spellings of a setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {accepted}")]
pub struct UnknownSetting {
    /// what was given
    pub value: String,
    /// the accepted values, comma-separated
    pub accepted: &'static str,
}

impl std::str::FromStr for ComfyVersion {
    type Err = UnknownSetting;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "0.3.64" => Ok(ComfyVersion::V0_3_64),
            "0.38" | "0.38.1" => Ok(ComfyVersion::V0_38),
            other => Err(UnknownSetting { value: other.to_string(), accepted: "0.3.64, 0.38" }),
        }
    }
}

/// ComfyUI's `--preview-method` (`latent_preview.LatentPreviewMethod`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PreviewMethod {
    /// no sampler previews (ComfyUI's default)
    #[default]
    NoPreviews,
    /// the best available method
    Auto,
    /// a cheap linear projection of the latent
    Latent2Rgb,
    /// the TAESD decoder
    Taesd,
}

impl PreviewMethod {
    /// The method as ComfyUI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PreviewMethod::NoPreviews => "none",
            PreviewMethod::Auto => "auto",
            PreviewMethod::Latent2Rgb => "latent2rgb",
            PreviewMethod::Taesd => "taesd",
        }
    }
}

impl std::str::FromStr for PreviewMethod {
    type Err = UnknownSetting;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "none" => Ok(PreviewMethod::NoPreviews),
            "auto" => Ok(PreviewMethod::Auto),
            "latent2rgb" => Ok(PreviewMethod::Latent2Rgb),
            "taesd" => Ok(PreviewMethod::Taesd),
            other => Err(UnknownSetting { value: other.to_string(), accepted: "none, auto, latent2rgb, taesd" }),
        }
    }
}

/// Simulator settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// root of `input/`, `output/` and `temp/` (created if missing; `temp/` is emptied at start)
    pub data_dir: PathBuf,
    /// simulated sampler time per prompt
    pub job_time: Duration,
    /// `progress` events the sampler sends, evenly spread over `job_time`
    pub progress_steps: u32,
    /// model files that count as installed (they fill `ckpt_name` / `clip_name` dropdowns)
    pub models: Vec<String>,
    /// injected failures
    pub faults: FaultConfig,
    /// request body limit in bytes (`--max-upload-size`), advertised in `/features`
    pub max_upload_bytes: u64,
    /// the ComfyUI version to behave as
    pub comfy_version: ComfyVersion,
    /// `--preview-method`: the sampler preview method of every prompt (on 0.38 a prompt's
    /// `extra_data.preview_method` overrides it for that prompt)
    pub preview_method: PreviewMethod,
    /// `--assets` (0.38 only): output entries get `id`/`preview_id`, uploads an `asset` block
    pub assets: bool,
    /// simulated GPUs, listed in `/system_stats` `devices` (at least one)
    pub gpus: u32,
    /// `--auth-token`: when set, every route wants `Authorization: Bearer <token>` (or
    /// `?token=<token>` on `/ws`) and answers 401 without it; both profiles (a wrapper's rule, C19)
    pub auth_token: Option<String>,
}

impl SimConfig {
    /// Default settings with the given data directory: 2 s sampler time, 10 progress events,
    /// the LTXV 0.9.5 checkpoint and T5-XXL text encoder installed, no faults, 100 MiB uploads.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            job_time: Duration::from_secs(2),
            progress_steps: 10,
            models: vec!["ltx-video-2b-v0.9.5.safetensors".to_string(), "t5xxl_fp16.safetensors".to_string()],
            faults: FaultConfig::default(),
            max_upload_bytes: 100 * 1024 * 1024,
            comfy_version: ComfyVersion::default(),
            preview_method: PreviewMethod::default(),
            assets: false,
            gpus: 1,
            auth_token: None,
        }
    }
}

/// Serves the simulator on `listener` until `shutdown` completes.
///
/// Creates the data directory layout first; fails if it cannot.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let dirs = files::DataDirs::create(&config.data_dir)?;
    let version = config.comfy_version;
    let hub = Arc::new(if version.is_newer() { hub::Hub::closing_replaced() } else { hub::Hub::new() });
    let queue = Arc::new(queue::PromptQueue::new(hub.clone()));
    let shared = Arc::new(executor::Shared {
        config,
        dirs,
        queue,
        hub: hub.clone(),
        interrupt: executor::Interrupt::default(),
        loader_cache: std::sync::Mutex::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(executor::worker(shared.clone()));
    let app = server::router(server::AppState { shared, shutdown: stop_rx });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, comfy_version = %version, "tdcomfy sim (ComfyUI simulator) listening");
    }
    // aiohttp (ComfyUI's server) sets TCP_NODELAY; so does the simulator, or Nagle plus delayed ACKs
    // would add ~40 ms to responses written in two parts.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    worker.abort();
    let _ = worker.await;
    hub.drop_all();
    served
}

/// Writes a moving H.264 test clip — the synthetic zoom/pan/colour drift the simulated sampler
/// produces — as a fast-start MP4. Handy for tests that need a real video without running a prompt.
/// Width and height must be even.
pub fn write_test_clip(path: impl AsRef<Path>, width: u32, height: u32, frames: u32, fps: f64) -> std::io::Result<()> {
    let bytes = nodes::test_clip_mp4(width, height, frames, fps).map_err(|f| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{}: {}", f.exception_type, f.message))
    })?;
    files::write_atomic(path.as_ref(), &bytes)
}
