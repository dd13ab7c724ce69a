//! The broker's settings: command-line flags, each with an environment variable of the original
//! design's name, parsed once into a validated [`BrokerConfig`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tdcomfy_workflows::WorkflowRegistry;

use crate::clock::Clock;

/// Flags and environment variables of `tdcomfy serve` (and of the broker inside `tdcomfy up`).
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Address the broker listens on. 0.0.0.0 accepts TouchDesigner machines on the network; set
    /// API_TOKEN when you do.
    #[arg(long, env = "API_HOST", default_value = "0.0.0.0")]
    pub api_host: String,

    /// Port of the broker's HTTP API.
    #[arg(long, env = "API_PORT", default_value_t = 8080)]
    pub api_port: u16,

    /// Directory for the job database, input frames and results. Created if missing.
    #[arg(long, env = "DATA_DIR", default_value = "tdcomfy-data")]
    pub data_dir: PathBuf,

    /// Largest accepted upload in MB (MiB); larger requests get a 413 naming this limit.
    #[arg(long, env = "MAX_UPLOAD_MB", default_value_t = 50)]
    pub max_upload_mb: u64,

    /// Largest result a worker may upload, in MB (MiB).
    #[arg(long, env = "MAX_RESULT_MB", default_value_t = 4096)]
    pub max_result_mb: u64,

    /// Largest accepted image width or height in pixels, read from the image header.
    #[arg(long, env = "MAX_IMAGE_DIM", default_value_t = 8192)]
    pub max_image_dim: u32,

    /// Longest accepted prompt or negative prompt, in characters.
    #[arg(long, env = "MAX_PROMPT_CHARS", default_value_t = 10_000)]
    pub max_prompt_chars: usize,

    /// Bearer token clients must send (Authorization: Bearer …, or ?token= on /events and /ws).
    /// /health stays open. Unset: no authentication.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// Bearer token workers must send on /worker/* routes; the client token is then refused there.
    /// Unset: workers use API_TOKEN (or nothing, when that is unset too).
    #[arg(long, env = "WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,

    /// Seconds to keep finished jobs' files (input and result) before deleting them; 0 keeps them.
    #[arg(long, env = "RESULT_TTL", default_value_t = 86_400)]
    pub result_ttl: u64,

    /// Seconds a finished job's record is kept (with any files it still has) before it is deleted,
    /// so the database does not grow without end; its GET then answers 404 and its Idempotency-Key
    /// may be used again. 0 keeps records forever.
    #[arg(long, env = "JOB_RETENTION", default_value_t = 604_800)]
    pub job_retention: u64,

    /// Seconds one attempt of a job may run before it fails as timed out.
    #[arg(long, env = "JOB_TIMEOUT", default_value_t = 600.0)]
    pub job_timeout: f64,

    /// Seconds a worker's lease lasts without a heartbeat; then the job goes back to the queue.
    #[arg(long, env = "LEASE_TTL", default_value_t = 30.0)]
    pub lease_ttl: f64,

    /// Leases a job may get (a worker died or the backend was down) before it fails.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,

    /// Most queued jobs; past it `POST /jobs` answers 429 queue_full with Retry-After, so a client
    /// that submits faster than the GPUs run learns it at once instead of queueing hours of work.
    #[arg(long, env = "MAX_QUEUE", default_value_t = 1000)]
    pub max_queue: u64,

    /// Most open event streams (SSE and WebSocket together); past it a new one gets 429
    /// too_many_subscribers, so a client that reconnects in a loop cannot pile them up.
    #[arg(long, env = "MAX_SUBSCRIBERS", default_value_t = 256)]
    pub max_subscribers: usize,
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range.
    #[error("{name}: {message}")]
    Invalid {
        /// The setting's environment variable name.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Validated broker settings.
#[derive(Clone)]
pub struct BrokerConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Upload limit in bytes.
    pub max_upload_bytes: u64,
    /// Result limit in bytes.
    pub max_result_bytes: u64,
    /// Image width/height limit.
    pub max_image_dim: u32,
    /// Prompt length limit in characters.
    pub max_prompt_chars: usize,
    /// Client token.
    pub api_token: Option<String>,
    /// Worker token.
    pub worker_token: Option<String>,
    /// Keep finished jobs' files this long (`None`: forever).
    pub result_ttl: Option<Duration>,
    /// Keep finished jobs' records this long (`None`: forever).
    pub job_retention: Option<Duration>,
    /// Longest attempt.
    pub job_timeout: Duration,
    /// Lease lifetime without a heartbeat.
    pub lease_ttl: Duration,
    /// Most leases per job.
    pub max_attempts: u32,
    /// Most queued jobs.
    pub max_queue: u64,
    /// Most open event streams.
    pub max_subscribers: usize,
    /// Loaded workflows.
    pub workflows: Arc<WorkflowRegistry>,
    /// How often expired leases, timeouts and old files are swept.
    pub sweep_interval: Duration,
    /// The source of every time the broker records or compares (a test may inject its own).
    pub clock: Clock,
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("data_dir", &self.data_dir)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("api_token", &self.api_token.as_ref().map(|_| "<set>"))
            .field("worker_token", &self.worker_token.as_ref().map(|_| "<set>"))
            .field("job_timeout", &self.job_timeout)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

fn positive_secs(name: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if v.is_finite() && v > 0.0 && v < 1e9 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(ConfigError::Invalid { name, message: format!("must be a positive number of seconds, got {v}") })
    }
}

fn non_empty(token: &Option<String>) -> Option<String> {
    token.as_ref().filter(|t| !t.is_empty()).cloned()
}

impl BrokerArgs {
    /// Checks every value; `workflows` are the loaded workflows jobs may name.
    pub fn into_config(self, workflows: Arc<WorkflowRegistry>) -> Result<BrokerConfig, ConfigError> {
        if self.max_upload_mb == 0 || self.max_upload_mb > 1 << 20 {
            return Err(ConfigError::Invalid { name: "MAX_UPLOAD_MB", message: "must be 1 ..= 1048576".into() });
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::Invalid { name: "MAX_ATTEMPTS", message: "must be at least 1".into() });
        }
        let lease_ttl = positive_secs("LEASE_TTL", self.lease_ttl)?;
        Ok(BrokerConfig {
            data_dir: self.data_dir,
            max_upload_bytes: self.max_upload_mb * 1024 * 1024,
            max_result_bytes: self.max_result_mb.saturating_mul(1024 * 1024),
            max_image_dim: self.max_image_dim,
            max_prompt_chars: self.max_prompt_chars,
            api_token: non_empty(&self.api_token),
            worker_token: non_empty(&self.worker_token),
            result_ttl: (self.result_ttl > 0).then(|| Duration::from_secs(self.result_ttl)),
            job_retention: (self.job_retention > 0).then(|| Duration::from_secs(self.job_retention)),
            job_timeout: positive_secs("JOB_TIMEOUT", self.job_timeout)?,
            sweep_interval: (lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            lease_ttl,
            max_attempts: self.max_attempts,
            max_queue: self.max_queue.max(1),
            max_subscribers: self.max_subscribers.max(1),
            workflows,
            clock: Clock::system(),
        })
    }
}
