//! The worker's settings: flags with the design's environment variables, validated into a
//! [`WorkerConfig`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tdcomfy_comfy::{ComfyEndpoint, ComfyEndpoints, PreviewMethod};
use tdcomfy_workflows::WorkflowRegistry;

use crate::comfy_files::FolderSettings;

/// Flags of the worker (shared by `tdcomfy worker` and `tdcomfy up`).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// ComfyUI host (the one-server shorthand; see COMFYUI_URLS).
    #[arg(long, env = "COMFYUI_HOST", default_value = "127.0.0.1")]
    pub comfyui_host: String,

    /// ComfyUI port.
    #[arg(long, env = "COMFYUI_PORT", default_value_t = 8999)]
    pub comfyui_port: u16,

    /// Comma-separated ComfyUI base URLs (http://gpu1:8188,http://gpu2:8188); overrides
    /// COMFYUI_HOST/COMFYUI_PORT. Jobs go to them in turn; an unreachable one is skipped.
    #[arg(long, env = "COMFYUI_URLS")]
    pub comfyui_urls: Option<String>,

    /// Seconds to wait before retrying after the broker could not be reached (the design's poll
    /// interval; leases themselves are long-polls and need no polling).
    #[arg(long, env = "WORKER_POLL_INTERVAL", default_value_t = 0.5)]
    pub worker_poll_interval: f64,

    /// Name the worker leases under (shown in /health). Default: host name and process id.
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,

    /// Seconds a running prompt may show no sign of life (no event, no queue/history change)
    /// before it is interrupted and the job fails as stalled.
    #[arg(long, env = "STALL_TIMEOUT", default_value_t = 180.0)]
    pub stall_timeout: f64,

    /// Seconds between polls of ComfyUI's /history and /queue, the source of truth beside the
    /// WebSocket.
    #[arg(long, env = "COMFYUI_POLL_INTERVAL", default_value_t = 1.0)]
    pub comfyui_poll_interval: f64,

    /// Seconds to keep retrying a ComfyUI server that does not answer before the job fails as
    /// retryable (it then goes back to the queue, and this server pauses for a while).
    #[arg(long, env = "COMFYUI_RETRY_BUDGET", default_value_t = 30.0)]
    pub comfyui_retry_budget: f64,

    /// Directory for frames and results in transit (a result waits here while the broker is down).
    #[arg(long, env = "WORKER_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,

    /// ComfyUI's base directory as seen from this worker (its `input/` and `output/` are inside).
    /// Delivered jobs' output files are deleted from it. Default: detected from ComfyUI's command
    /// line (`/system_stats`), when ComfyUI runs on this machine.
    #[arg(long, env = "COMFYUI_DIR")]
    pub comfyui_dir: Option<PathBuf>,

    /// ComfyUI's output folder (overrides COMFYUI_DIR's `output/`).
    #[arg(long, env = "COMFYUI_OUTPUT_DIR")]
    pub comfyui_output_dir: Option<PathBuf>,

    /// ComfyUI's input folder (overrides COMFYUI_DIR's `input/`).
    #[arg(long, env = "COMFYUI_INPUT_DIR")]
    pub comfyui_input_dir: Option<PathBuf>,

    /// Keep delivered jobs' files in ComfyUI's output folder (e.g. to browse them in ComfyUI)
    /// instead of deleting them once the broker has the result.
    #[arg(long, env = "COMFYUI_KEEP_OUTPUTS", default_value_t = false)]
    pub comfyui_keep_outputs: bool,

    /// Most preview images per second sent to the broker for a job submitted with previews on
    /// (the newest wins; the rest are dropped). 0 sends none.
    #[arg(long, env = "PREVIEW_FPS", default_value_t = 10.0)]
    pub preview_fps: f64,
    /// Token for a ComfyUI behind a token-checking wrapper or proxy: sent as
    /// `Authorization: Bearer <token>` on every HTTP request and `?token=` on its WebSocket.
    #[arg(long, env = "COMFYUI_TOKEN", hide_env_values = true)]
    pub comfyui_token: Option<String>,

    /// Sampler previews ComfyUI renders for each prompt (`extra_data.preview_method`): none,
    /// auto, latent2rgb or taesd. `none` saves GPU time; newer ComfyUI resets the method with
    /// every prompt, so it is always sent. A job submitted with previews on gets `auto` where this
    /// says `none`.
    #[arg(long, env = "PREVIEW_METHOD", default_value = "none")]
    pub preview_method: String,

    /// Jobs leased ahead per ComfyUI server while its current one runs: their frames are uploaded
    /// and their prompts wait in ComfyUI's own queue, so it starts the next the instant the last
    /// ends. 0 leases the next job only after the last was delivered (at most 8).
    #[arg(long, env = "PREFETCH", default_value_t = 1)]
    pub prefetch: usize,
}

/// Why the worker settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum WorkerConfigError {
    /// A value is out of range or malformed.
    #[error("{name}: {message}")]
    Invalid {
        /// The environment variable.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Validated worker settings.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Broker base URL, or several separated by commas (brokers sharing one database: calls go
    /// to one and move to the next when it cannot be reached).
    pub broker_url: String,
    /// Token for the broker's worker routes.
    pub token: Option<String>,
    /// Certificates accepted from an HTTPS broker (set by the caller: `BROKER_CA`, or `up`).
    pub broker_trust: crate::broker_client::BrokerTrust,
    /// Lease name.
    pub worker_id: String,
    /// ComfyUI servers.
    pub comfy: ComfyEndpoints,
    /// Loaded workflows.
    pub workflows: Arc<WorkflowRegistry>,
    /// Delay before retrying the broker.
    pub retry_delay: Duration,
    /// How long one lease long-poll waits.
    pub lease_wait: Duration,
    /// How often progress is pushed (when it changed).
    pub progress_interval: Duration,
    /// How often the lease is renewed when nothing changed.
    pub heartbeat_interval: Duration,
    /// Stall limit.
    pub stall_timeout: Duration,
    /// ComfyUI poll period.
    pub comfy_poll_interval: Duration,
    /// How long an unreachable ComfyUI is retried within one job.
    pub comfy_retry_budget: Duration,
    /// Spool directory.
    pub spool_dir: PathBuf,
    /// Where ComfyUI's folders are, where set (the rest is detected).
    pub comfy_folders: FolderSettings,
    /// Leave delivered outputs in ComfyUI's output folder.
    pub keep_comfy_outputs: bool,
    /// Shortest time between two previews of a job (`PREVIEW_FPS`); `None` sends none.
    pub preview_interval: Option<Duration>,
    /// `COMFYUI_TOKEN`, sent to every ComfyUI server.
    pub comfy_token: Option<String>,
    /// Default preview method of prompts (a job may ask for another).
    pub preview_method: PreviewMethod,
    /// How often each server's preflight looks again.
    pub preflight: crate::preflight::PreflightTiming,
    /// Jobs leased ahead per ComfyUI server while its current one runs (`PREFETCH`).
    pub prefetch: usize,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("broker_url", &self.broker_url)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("worker_id", &self.worker_id)
            .field("comfy_token", &self.comfy_token.as_ref().map(|_| "<set>"))
            .field("preview_method", &self.preview_method)
            .finish_non_exhaustive()
    }
}

/// Most jobs leased ahead per server: each holds an upload name and a lease, and a deeper
/// ComfyUI queue only adds latency once one job covers the gap between two.
const MAX_PREFETCH: usize = 8;

fn secs(name: &'static str, v: f64) -> Result<Duration, WorkerConfigError> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(WorkerConfigError::Invalid { name, message: format!("must be a positive number of seconds, got {v}") })
    }
}

impl WorkerArgs {
    /// Validates the flags. `broker_url` and `token` come from the caller (the `worker` command's
    /// own flags, or the broker's settings inside `up`); `broker_url` may list several brokers
    /// separated by commas, and is empty for a worker that talks to none (`worker --check`).
    pub fn into_config(
        self,
        broker_url: String,
        token: Option<String>,
        workflows: Arc<WorkflowRegistry>,
        default_spool: PathBuf,
    ) -> Result<WorkerConfig, WorkerConfigError> {
        let comfy = match self.comfyui_urls.as_deref().map(str::trim) {
            Some(list) if !list.is_empty() => ComfyEndpoints::parse_list(list)
                .map_err(|e| WorkerConfigError::Invalid { name: "COMFYUI_URLS", message: e.to_string() })?,
            _ => {
                let one = ComfyEndpoint::from_host_port(&self.comfyui_host, self.comfyui_port)
                    .map_err(|e| WorkerConfigError::Invalid { name: "COMFYUI_HOST", message: e.to_string() })?;
                ComfyEndpoints::new(vec![one])
                    .map_err(|e| WorkerConfigError::Invalid { name: "COMFYUI_HOST", message: e.to_string() })?
            }
        };
        // Checked here so a typo is a start-up error naming the variable, not a worker retrying
        // forever as if the broker were down. Empty: no broker at all (`worker --check`).
        let urls = crate::broker_client::broker_urls(&broker_url);
        if urls.is_empty() && !broker_url.is_empty() {
            return Err(WorkerConfigError::Invalid {
                name: "BROKER_URL",
                message: "must be a broker URL (http://host:port) or a comma-separated list of them".to_owned(),
            });
        }
        for url in &urls {
            let scheme = reqwest::Url::parse(url).map(|u| u.scheme().to_owned());
            if !matches!(scheme.as_deref(), Ok("http" | "https")) {
                return Err(WorkerConfigError::Invalid {
                    name: "BROKER_URL",
                    message: format!("{url:?} is not an http:// or https:// URL"),
                });
            }
        }
        let worker_id = self.worker_id.filter(|w| !w.trim().is_empty()).unwrap_or_else(default_worker_id);
        // The broker refuses any other name on every lease; caught here, it is a clear message at
        // start instead of a worker retrying forever as if the broker were unreachable.
        if worker_id.len() > 128 || !worker_id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(WorkerConfigError::Invalid {
                name: "WORKER_ID",
                message: format!("must be 1 to 128 visible ASCII characters (no spaces), got {worker_id:?}"),
            });
        }
        let fps = self.preview_fps;
        if !(fps.is_finite() && (0.0..=1000.0).contains(&fps)) {
            return Err(WorkerConfigError::Invalid {
                name: "PREVIEW_FPS",
                message: format!("must be 0 (off) to 1000 previews per second, got {fps}"),
            });
        }
        let preview_method = self
            .preview_method
            .parse::<PreviewMethod>()
            .map_err(|message| WorkerConfigError::Invalid { name: "PREVIEW_METHOD", message })?;
        if self.prefetch > MAX_PREFETCH {
            return Err(WorkerConfigError::Invalid {
                name: "PREFETCH",
                message: format!("must be 0 to {MAX_PREFETCH} jobs per server, got {}", self.prefetch),
            });
        }
        let comfy_token = self.comfyui_token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        // Checked here so a token with a line break or non-ASCII is a start-up error naming the
        // variable, not a failure at the first request.
        if let Some(token) = &comfy_token
            && !token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(WorkerConfigError::Invalid {
                name: "COMFYUI_TOKEN",
                message: "must be visible ASCII characters without spaces".to_owned(),
            });
        }
        Ok(WorkerConfig {
            broker_url,
            token: token.filter(|t| !t.is_empty()),
            broker_trust: Default::default(),
            worker_id,
            comfy,
            workflows,
            retry_delay: secs("WORKER_POLL_INTERVAL", self.worker_poll_interval)?,
            lease_wait: Duration::from_secs(30),
            progress_interval: Duration::from_millis(200),
            heartbeat_interval: Duration::from_secs(2),
            stall_timeout: secs("STALL_TIMEOUT", self.stall_timeout)?,
            comfy_poll_interval: secs("COMFYUI_POLL_INTERVAL", self.comfyui_poll_interval)?,
            comfy_retry_budget: secs("COMFYUI_RETRY_BUDGET", self.comfyui_retry_budget)?,
            spool_dir: self.spool_dir.unwrap_or(default_spool),
            comfy_folders: FolderSettings {
                base: self.comfyui_dir.filter(|p| !p.as_os_str().is_empty()),
                input: self.comfyui_input_dir.filter(|p| !p.as_os_str().is_empty()),
                output: self.comfyui_output_dir.filter(|p| !p.as_os_str().is_empty()),
            },
            keep_comfy_outputs: self.comfyui_keep_outputs,
            preview_interval: (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps)),
            comfy_token,
            preview_method,
            preflight: Default::default(),
            prefetch: self.prefetch,
        })
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "worker".to_owned());
    let host: String = host.chars().filter(|c| c.is_ascii_graphic()).take(100).collect();
    format!("{host}-{}", std::process::id())
}
