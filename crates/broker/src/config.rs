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

    /// Most memory, in MB (MiB), for the latest preview images of running jobs together (one per
    /// job, each at most 2 MiB); past it the previews updated longest ago are dropped. 0 turns
    /// previews off (workers' uploads get 413).
    #[arg(long, env = "MAX_PREVIEW_MB", default_value_t = 64)]
    pub max_preview_mb: u64,
    /// How the broker meets the network: browsers, connection limits, TLS.
    #[command(flatten)]
    pub net: NetArgs,
    /// Where frames and results live.
    #[command(flatten)]
    pub storage: StorageArgs,

    /// The dashboard and `/metrics`.
    #[command(flatten)]
    pub observe: ObserveArgs,
}

/// Where the broker keeps frames and results, and how results are handed out.
#[derive(Clone, Default, clap::Args)]
pub struct StorageArgs {
    /// Where jobs are recorded: unset keeps them in DATA_DIR/jobs.sqlite3 (SQLite, one broker);
    /// postgres://user:password@host:5432/database selects PostgreSQL, which several brokers may
    /// share (give them the same STORAGE_URL too).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Where frames and results live: unset keeps them under DATA_DIR/files; file:///path is a
    /// directory brokers may share (a network file system); s3://bucket/prefix is any
    /// S3-compatible store, configured by AWS_ENDPOINT_URL (or S3_ENDPOINT), AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY and AWS_REGION (path-style requests).
    #[arg(long, env = "STORAGE_URL")]
    pub storage_url: Option<String>,

    /// How GET /jobs/{id}/result hands out a result: `stream` (through the broker, the default)
    /// or `presigned` (a 307 to a presigned URL of the object store, valid RESULT_REDIRECT_TTL
    /// seconds; needs STORAGE_URL=s3://…).
    #[arg(long, env = "RESULT_REDIRECT", default_value = "stream")]
    pub result_redirect: String,

    /// Seconds a presigned result URL stays valid (a download started in time finishes).
    #[arg(long, env = "RESULT_REDIRECT_TTL", default_value_t = 300)]
    pub result_redirect_ttl: u64,

    /// The S3 endpoint for STORAGE_URL=s3://… (MinIO, Garage, R2, Ceph…; S3_ENDPOINT works too).
    /// Unset: AWS itself.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,

    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub aws_access_key_id: Option<String>,

    /// S3 secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub aws_secret_access_key: Option<String>,

    /// S3 region (default us-east-1, which most S3-compatible stores accept).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
}

/// Settings of what the broker shows about itself: the web dashboard and the Prometheus metrics.
#[derive(Debug, Clone, clap::Args)]
pub struct ObserveArgs {
    /// The web dashboard at `/`: `on` (default) or `off`.
    #[arg(long, env = "DASHBOARD", default_value = "on")]
    pub dashboard: String,

    /// A token that reads `GET /metrics` (Prometheus' `bearer_token`), besides API_TOKEN, so a
    /// scraper need not hold the token that submits and cancels jobs. Unset with API_TOKEN unset:
    /// `/metrics` is open like every client route.
    #[arg(long, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
}

impl Default for ObserveArgs {
    fn default() -> ObserveArgs {
        ObserveArgs { dashboard: "on".into(), metrics_token: None }
    }
}

/// The broker's connection settings: which browser pages may call it, how long a client may take,
/// how many connections it serves, and TLS.
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// Web page origins (e.g. https://dashboard.example:3000) allowed to use the broker from a
    /// browser, comma-separated; * allows any. A browser request from another origin that changes
    /// something, or opens /ws or an event stream, gets a 403. The broker's own origin is always
    /// allowed; clients that send no Origin (TouchDesigner, Python, the CLI, workers) are unaffected.
    /// `null` allows pages opened from a file.
    #[arg(long, env = "ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: String,

    /// Seconds a client may take to send a request's headers (and the TLS handshake); a slow or
    /// half-sent header is closed then. A keep-alive connection idle this long is closed too.
    #[arg(long, env = "HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,

    /// Seconds a request body may go without a byte; then the request fails, its connection is
    /// closed and the partial upload is deleted.
    #[arg(long, env = "BODY_TIMEOUT", default_value_t = 30.0)]
    pub body_timeout: f64,

    /// Most connections served at once. Further connections wait, unanswered, in the OS backlog
    /// until one closes (an open WebSocket or event stream counts).
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// PEM file with the certificate chain; with TLS_KEY the broker serves HTTPS and WSS itself.
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the private key of TLS_CERT (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl Default for NetArgs {
    fn default() -> NetArgs {
        NetArgs {
            allowed_origins: String::new(),
            header_timeout: 10.0,
            body_timeout: 30.0,
            max_connections: 1024,
            tls_cert: None,
            tls_key: None,
        }
    }
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
    /// What the broker keeps of preview images (`MAX_PREVIEW_MB`).
    pub preview_limits: crate::previews::PreviewLimits,
    /// Loaded workflows.
    pub workflows: Arc<WorkflowRegistry>,
    /// How often expired leases, timeouts and old files are swept.
    pub sweep_interval: Duration,
    /// The source of every time the broker records or compares (a test may inject its own).
    pub clock: Clock,
    /// Connection settings.
    pub net: NetConfig,
    /// Where frames and results live (`STORAGE_URL`).
    pub storage: crate::blobs::StorageLocation,
    /// `DATABASE_URL`: the PostgreSQL database jobs are recorded in (`None`: SQLite under
    /// `data_dir`). Its `Debug` hides the password.
    pub database: Option<crate::store::DatabaseUrl>,
    /// `RESULT_REDIRECT=presigned`: how long the presigned URL a result download is sent to
    /// stays valid; `None` streams results through the broker.
    pub result_redirect: Option<Duration>,
    /// Whether `/` serves the dashboard (`DASHBOARD`).
    pub dashboard: bool,
    /// The token that reads `/metrics` besides API_TOKEN (`METRICS_TOKEN`).
    pub metrics_token: Option<String>,
}

/// Validated [`NetArgs`].
#[derive(Clone)]
pub struct NetConfig {
    /// Browser origins allowed besides the broker's own (lowercase, no trailing slash).
    pub allowed_origins: Vec<String>,
    /// `ALLOWED_ORIGINS=*`.
    pub any_origin: bool,
    /// Longest time to send a request's headers (and the TLS handshake).
    pub header_timeout: Duration,
    /// Longest pause within a request body.
    pub body_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
    /// TLS, when TLS_CERT and TLS_KEY are set.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Test hook: treat loopback peers as remote, so a test on 127.0.0.1 can see what a LAN peer
    /// sees. Not a setting.
    #[doc(hidden)]
    pub loopback_is_remote: bool,
}

/// The start-up warning for `DATABASE_URL` without `STORAGE_URL`, if that is the setting. Not
/// refused: one broker on PostgreSQL with its files in `DATA_DIR` is legitimate. But with several
/// brokers on the database each keeps frames and results in its own `DATA_DIR`, and a worker
/// leasing through one broker cannot fetch a frame submitted through another.
pub fn local_files_warning(database: bool, storage_url: Option<&str>) -> Option<String> {
    let local = storage_url.is_none_or(|u| u.trim().is_empty());
    (database && local).then(|| {
        "DATABASE_URL is set but STORAGE_URL is not: frames and results stay in this broker's DATA_DIR. \
         Fine for a single broker; several brokers sharing the database need one shared STORAGE_URL \
         (s3://… or a shared file:// directory), or a worker leasing through one broker cannot \
         fetch a frame submitted through another"
            .to_owned()
    })
}

// By hand: DATABASE_URL holds the database password and AWS_SECRET_ACCESS_KEY is a secret, and
// a printed `BrokerArgs` (a log line, a panic message) must show neither.
impl std::fmt::Debug for StorageArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let database = self.database_url.as_deref().map(|u| match crate::store::DatabaseUrl::parse(u) {
            Ok(url) => url.redacted().to_owned(),
            Err(_) => "<invalid>".to_owned(),
        });
        f.debug_struct("StorageArgs")
            .field("database_url", &database)
            .field("storage_url", &self.storage_url)
            .field("result_redirect", &self.result_redirect)
            .field("result_redirect_ttl", &self.result_redirect_ttl)
            .field("aws_endpoint_url", &self.aws_endpoint_url)
            .field("aws_access_key_id", &self.aws_access_key_id)
            .field("aws_secret_access_key", &self.aws_secret_access_key.as_ref().map(|_| "<set>"))
            .field("aws_region", &self.aws_region)
            .finish()
    }
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
            .field("allowed_origins", &self.net.allowed_origins)
            .field("tls", &self.net.tls.is_some())
            .field("storage", &self.storage)
            .field("database", &self.database)
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

/// A token that is set and not empty; the template's placeholders (`change-me-…` in
/// `deploy/tdcomfy.env`) are refused, since a copied template would otherwise guard the broker with
/// a value anyone can read on GitHub.
fn token(name: &'static str, token: &Option<String>) -> Result<Option<String>, ConfigError> {
    match token.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) if t.to_ascii_lowercase().starts_with("change-me") => Err(ConfigError::Invalid {
            name,
            message: format!(
                "still the template's placeholder {t:?}; set a secret of your own (e.g. `openssl rand -hex 32`)"
            ),
        }),
        Some(_) => Ok(token.clone()),
    }
}

/// Parses `ALLOWED_ORIGINS`: `*`, or comma-separated `scheme://host[:port]` origins.
fn on_off(name: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::Invalid { name, message: format!("must be on or off, got {v:?}") }),
    }
}

fn allowed_origins(raw: &str) -> Result<(Vec<String>, bool), ConfigError> {
    let mut origins = Vec::new();
    let mut any = false;
    for item in raw.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if item == "*" {
            any = true;
            continue;
        }
        // What browsers send for a page opened from a file or a sandboxed frame.
        if item.eq_ignore_ascii_case("null") {
            origins.push("null".to_owned());
            continue;
        }
        let origin = item.trim_end_matches('/').to_ascii_lowercase();
        let valid = origin
            .split_once("://")
            .is_some_and(|(scheme, host)| !scheme.is_empty() && !host.is_empty() && !host.contains('/'));
        if !valid {
            return Err(ConfigError::Invalid {
                name: "ALLOWED_ORIGINS",
                message: format!("{item:?} is not an origin such as https://dashboard.example:3000"),
            });
        }
        origins.push(origin);
    }
    Ok((origins, any))
}

impl NetArgs {
    fn into_config(self) -> Result<NetConfig, ConfigError> {
        let (allowed_origins, any_origin) = allowed_origins(&self.allowed_origins)?;
        if self.max_connections == 0 || self.max_connections > 1 << 20 {
            return Err(ConfigError::Invalid { name: "MAX_CONNECTIONS", message: "must be 1 ..= 1048576".into() });
        }
        let tls = match (self.tls_cert, self.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(crate::tls::server_config(&cert, &key)?),
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    name: "TLS_KEY",
                    message: "TLS_CERT is set; TLS_KEY is needed too".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    name: "TLS_CERT",
                    message: "TLS_KEY is set; TLS_CERT is needed too".into(),
                });
            }
        };
        Ok(NetConfig {
            allowed_origins,
            any_origin,
            header_timeout: positive_secs("HEADER_TIMEOUT", self.header_timeout)?,
            body_timeout: positive_secs("BODY_TIMEOUT", self.body_timeout)?,
            max_connections: self.max_connections,
            tls,
            loopback_is_remote: false,
        })
    }
}

impl BrokerArgs {
    /// The documented defaults (the flags' `default_value`s, no environment read), serving on
    /// 127.0.0.1 port 0 with its data in `data_dir`: what tests and benchmarks start from before
    /// changing the settings they are about.
    pub fn loopback(data_dir: PathBuf) -> BrokerArgs {
        BrokerArgs {
            api_host: "127.0.0.1".into(),
            api_port: 0,
            data_dir,
            max_upload_mb: 50,
            max_result_mb: 4096,
            max_image_dim: 8192,
            max_prompt_chars: 10_000,
            api_token: None,
            worker_token: None,
            result_ttl: 86_400,
            job_retention: 604_800,
            job_timeout: 600.0,
            lease_ttl: 30.0,
            max_attempts: 3,
            max_queue: 1000,
            max_subscribers: 256,
            max_preview_mb: 64,
            net: Default::default(),
            storage: Default::default(),
            observe: Default::default(),
        }
    }

    /// Checks every value; `workflows` are the loaded workflows jobs may name.
    pub fn into_config(self, workflows: Arc<WorkflowRegistry>) -> Result<BrokerConfig, ConfigError> {
        if self.max_upload_mb == 0 || self.max_upload_mb > 1 << 20 {
            return Err(ConfigError::Invalid { name: "MAX_UPLOAD_MB", message: "must be 1 ..= 1048576".into() });
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::Invalid { name: "MAX_ATTEMPTS", message: "must be at least 1".into() });
        }
        let lease_ttl = positive_secs("LEASE_TTL", self.lease_ttl)?;
        let s3 = crate::blobs::S3Settings {
            endpoint: self.storage.aws_endpoint_url.clone(),
            access_key_id: self.storage.aws_access_key_id.clone(),
            secret_access_key: self.storage.aws_secret_access_key.clone(),
            region: self.storage.aws_region.clone(),
        };
        let storage = crate::blobs::StorageLocation::parse(self.storage.storage_url.as_deref(), s3)
            .map_err(|message| ConfigError::Invalid { name: "STORAGE_URL", message })?;
        let result_redirect = match self.storage.result_redirect.trim().to_ascii_lowercase().as_str() {
            "" | "stream" => None,
            "presigned" => {
                if !matches!(storage, crate::blobs::StorageLocation::S3 { .. }) {
                    return Err(ConfigError::Invalid {
                        name: "RESULT_REDIRECT",
                        message: "presigned needs object storage: set STORAGE_URL=s3://bucket/prefix".into(),
                    });
                }
                // S3 refuses a presigned URL valid longer than 7 days.
                if self.storage.result_redirect_ttl == 0 || self.storage.result_redirect_ttl > 604_800 {
                    return Err(ConfigError::Invalid {
                        name: "RESULT_REDIRECT_TTL",
                        message: "must be 1 ..= 604800 seconds".into(),
                    });
                }
                Some(Duration::from_secs(self.storage.result_redirect_ttl))
            }
            other => {
                return Err(ConfigError::Invalid {
                    name: "RESULT_REDIRECT",
                    message: format!("{other:?}: expected stream or presigned"),
                });
            }
        };
        let database = match self.storage.database_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(
                crate::store::DatabaseUrl::parse(url)
                    .map_err(|message| ConfigError::Invalid { name: "DATABASE_URL", message })?,
            ),
        };
        if let Some(warning) = local_files_warning(database.is_some(), self.storage.storage_url.as_deref()) {
            tracing::warn!("{warning}");
        }
        Ok(BrokerConfig {
            database,
            storage,
            result_redirect,
            data_dir: self.data_dir,
            max_upload_bytes: self.max_upload_mb * 1024 * 1024,
            max_result_bytes: self.max_result_mb.saturating_mul(1024 * 1024),
            max_image_dim: self.max_image_dim,
            max_prompt_chars: self.max_prompt_chars,
            api_token: token("API_TOKEN", &self.api_token)?,
            worker_token: token("WORKER_TOKEN", &self.worker_token)?,
            result_ttl: (self.result_ttl > 0).then(|| Duration::from_secs(self.result_ttl)),
            job_retention: (self.job_retention > 0).then(|| Duration::from_secs(self.job_retention)),
            job_timeout: positive_secs("JOB_TIMEOUT", self.job_timeout)?,
            sweep_interval: (lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            lease_ttl,
            max_attempts: self.max_attempts,
            max_queue: self.max_queue.max(1),
            max_subscribers: self.max_subscribers.max(1),
            preview_limits: crate::previews::PreviewLimits::with_total(self.max_preview_mb.saturating_mul(1024 * 1024)),
            workflows,
            clock: Clock::system(),
            net: self.net.into_config()?,
            dashboard: on_off("DASHBOARD", &self.observe.dashboard)?,
            metrics_token: token("METRICS_TOKEN", &self.observe.metrics_token)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_without_shared_storage_warns_naming_both() {
        let w = local_files_warning(true, None).expect("warned");
        assert!(w.contains("DATABASE_URL") && w.contains("STORAGE_URL"), "{w}");
        assert!(local_files_warning(true, Some("  ")).is_some(), "blank is unset");
        assert_eq!(local_files_warning(true, Some("s3://bucket/prefix")), None);
        assert_eq!(local_files_warning(true, Some("file:///srv/tdcomfy")), None);
        assert_eq!(local_files_warning(false, None), None, "SQLite: one broker by construction");
    }

    #[test]
    fn loopback_settings_are_the_flags_documented_defaults() {
        let cmd = <BrokerArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        let default = |id: &str| {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id).unwrap_or_else(|| panic!("no flag {id}"));
            arg.get_default_values().first().map(|v| v.to_string_lossy().into_owned())
        };
        let l = BrokerArgs::loopback("d".into());
        let ours = [
            ("max_upload_mb", l.max_upload_mb.to_string()),
            ("max_result_mb", l.max_result_mb.to_string()),
            ("max_image_dim", l.max_image_dim.to_string()),
            ("max_prompt_chars", l.max_prompt_chars.to_string()),
            ("result_ttl", l.result_ttl.to_string()),
            ("job_retention", l.job_retention.to_string()),
            ("job_timeout", l.job_timeout.to_string()),
            ("lease_ttl", l.lease_ttl.to_string()),
            ("max_attempts", l.max_attempts.to_string()),
            ("max_queue", l.max_queue.to_string()),
            ("max_subscribers", l.max_subscribers.to_string()),
            ("max_preview_mb", l.max_preview_mb.to_string()),
        ];
        for (id, value) in ours {
            let documented = default(id).expect("a default");
            // "600" and "600.0" are the same number.
            let same = documented == value
                || matches!((documented.parse::<f64>(), value.parse::<f64>()), (Ok(a), Ok(b)) if a == b);
            assert!(same, "{id}: flag default {documented}, loopback() {value}");
        }
    }

    #[test]
    fn template_tokens_are_refused_by_name() {
        let e = token("WORKER_TOKEN", &Some("change-me-worker-token".into())).unwrap_err();
        assert!(e.to_string().starts_with("WORKER_TOKEN: still the template's placeholder"), "{e}");
        assert_eq!(token("API_TOKEN", &Some("  ".into())).unwrap(), None);
        assert_eq!(token("API_TOKEN", &Some("s3cret".into())).unwrap().as_deref(), Some("s3cret"));
    }

    #[test]
    fn allowed_origins_parse() {
        let (o, any) = allowed_origins(" https://A.example:3000/ , http://b ").unwrap();
        assert_eq!((o, any), (vec!["https://a.example:3000".to_owned(), "http://b".to_owned()], false));
        assert!(allowed_origins("*").unwrap().1);
        assert_eq!(allowed_origins("null").unwrap().0, vec!["null".to_owned()]);
        let e = allowed_origins("a.example").unwrap_err();
        assert!(e.to_string().starts_with("ALLOWED_ORIGINS:"), "{e}");
    }
}
