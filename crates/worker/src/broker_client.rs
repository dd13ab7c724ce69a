//! The worker's side of the broker's worker protocol (`/worker/*`): lease, input download,
//! heartbeat, streamed result upload, preview upload, failure report.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use reqwest::StatusCode;
use tdcomfy_api::{
    ErrorBody, FailRequest, HeartbeatRequest, HeartbeatResponse, JobId, Lease, LeaseRequest, LeaseResponse, LeaseToken,
    PreflightReport, Progress,
};
use tdcomfy_comfy::error_chain;
use tokio::io::AsyncWriteExt;

/// A result upload whose link moved no byte for this long (nor got an answer after the last one)
/// is given up and retried: the broker is gone without a reset, or the link is dead.
const UPLOAD_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerCallError {
    /// The broker could not be reached or the connection broke: worth retrying.
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    /// The lease is no longer ours (expired and re-leased, timed out, or the job ended).
    #[error("lease lost: {0}")]
    LeaseLost(String),
    /// A client cancelled the job.
    #[error("the job was cancelled")]
    Cancelled,
    /// The broker answered with another error.
    #[error("broker answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The broker's message.
        message: String,
    },
    /// A local file could not be read or written.
    #[error("local file error: {0}")]
    Io(#[from] std::io::Error),
}

impl BrokerCallError {
    /// True for failures that a later retry may not see.
    pub fn is_transient(&self) -> bool {
        match self {
            BrokerCallError::Unreachable(_) => true,
            BrokerCallError::Refused { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Which certificates the worker accepts from an HTTPS broker (`BROKER_URL=https://…`).
#[derive(Debug, Clone, Default)]
pub enum BrokerTrust {
    /// The operating system's roots: a broker behind Caddy or nginx with a public certificate.
    #[default]
    System,
    /// The system's roots and these certificates (`BROKER_CA`: a self-signed broker, a private CA).
    WithCa(Vec<reqwest::Certificate>),
    /// Only these certificates, whatever name the broker is reached by: `tdcomfy up`'s own worker,
    /// which reaches its TLS broker over loopback, a name its certificate need not carry.
    Pinned(Vec<reqwest::Certificate>),
}

impl BrokerTrust {
    /// The certificates of a PEM file (one or more `CERTIFICATE` blocks).
    pub fn read_pem(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no PEM CERTIFICATE block", path.display()));
        }
        Ok(certs)
    }
}

/// The broker URLs of a `BROKER_URL` value: one URL, or several separated by commas (brokers
/// sharing one database, any of which can serve every call). Blank entries are skipped.
pub fn broker_urls(list: &str) -> Vec<String> {
    list.split(',').map(|u| u.trim().trim_end_matches('/')).filter(|u| !u.is_empty()).map(str::to_owned).collect()
}

/// An HTTP client for the broker, or for one of several brokers sharing a database: every call
/// goes to the current one, and a connection-level failure (refused, reset, timed out) moves
/// every later call to the next (the lease token is valid on each, the state being shared).
#[derive(Debug, Clone)]
pub struct BrokerClient {
    http: reqwest::Client,
    bases: Arc<[String]>,
    /// Index into `bases` of the broker calls go to; shared by every clone, so the lease loops,
    /// lease keepers and uploads of one worker move together.
    current: Arc<AtomicUsize>,
    token: Option<String>,
}

/// A request and the broker (index into `bases`) it goes to.
struct Call {
    rb: reqwest::RequestBuilder,
    broker: usize,
}

impl BrokerClient {
    /// A client for the broker at `base` (e.g. `http://127.0.0.1:8080`, or a comma-separated
    /// list, see [`broker_urls`]), sending `token` if set.
    pub fn new(base: &str, token: Option<String>) -> Result<BrokerClient, BrokerCallError> {
        BrokerClient::with_trust(base, token, &BrokerTrust::System)
    }

    /// A client for the broker(s) at `base` that accepts the certificates `trust` names over HTTPS.
    pub fn with_trust(base: &str, token: Option<String>, trust: &BrokerTrust) -> Result<BrokerClient, BrokerCallError> {
        let builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).tcp_nodelay(true);
        let builder = match trust {
            BrokerTrust::System => builder,
            BrokerTrust::WithCa(certs) => builder.tls_certs_merge(certs.iter().cloned()),
            // Trusting exactly the broker's own chain is what makes ignoring the name safe.
            BrokerTrust::Pinned(certs) => {
                builder.tls_certs_only(certs.iter().cloned()).tls_danger_accept_invalid_hostnames(true)
            }
        };
        let http = builder.build().map_err(|e| BrokerCallError::Unreachable(error_chain(&e)))?;
        let mut bases = broker_urls(base);
        if bases.is_empty() {
            // Kept as before for a single value: the request itself reports what is wrong with it.
            bases.push(base.trim_end_matches('/').to_owned());
        }
        Ok(BrokerClient { http, bases: bases.into(), current: Arc::new(AtomicUsize::new(0)), token })
    }

    /// The broker calls go to now.
    pub fn current_url(&self) -> &str {
        &self.bases[self.current.load(Ordering::Acquire) % self.bases.len()]
    }

    /// A request to the current broker, completed by `build` (body, headers, timeout).
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Call {
        let broker = self.current.load(Ordering::Acquire) % self.bases.len();
        let rb = self.http.request(method, format!("{}{}", self.bases[broker], path));
        let rb = match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        };
        Call { rb: build(rb), broker }
    }

    /// The connection to broker `used` failed: later calls go to the next broker. Only the first
    /// of several calls failing on the same broker at once moves on, so a burst of failures does
    /// not skip a healthy broker.
    fn unreachable(&self, used: usize, error: String) -> BrokerCallError {
        let n = self.bases.len();
        if n > 1 && self.current.compare_exchange(used, (used + 1) % n, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            tracing::warn!(
                from = %self.bases[used], to = %self.bases[(used + 1) % n], %error,
                "broker unreachable: switching to the next one of BROKER_URL"
            );
        }
        BrokerCallError::Unreachable(error)
    }

    /// A reply body that could not be read: the connection broke mid-body (move on, as for any
    /// connection failure), or it arrived whole but is not what this worker expects (a proxy's
    /// page, a broker of another version): that broker is reachable, so the worker stays.
    fn unreadable(&self, used: usize, e: reqwest::Error) -> BrokerCallError {
        if e.is_decode() {
            return BrokerCallError::Unreachable(error_chain(&e));
        }
        self.unreachable(used, e.to_string())
    }

    async fn send(&self, call: Call) -> Result<reqwest::Response, BrokerCallError> {
        let resp = call.rb.send().await.map_err(|e| self.unreachable(call.broker, error_chain(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.json::<ErrorBody>().await.ok();
        let (code, message) =
            body.map(|b| (b.error.code, b.error.message)).unwrap_or_else(|| (String::new(), status.to_string()));
        Err(match (status, code.as_str()) {
            (StatusCode::CONFLICT, "lease_lost") => BrokerCallError::LeaseLost(message),
            (StatusCode::CONFLICT, "job_cancelled") => BrokerCallError::Cancelled,
            (StatusCode::NOT_FOUND, "job_not_found") => BrokerCallError::LeaseLost(message),
            _ => BrokerCallError::Refused { status: status.as_u16(), message },
        })
    }

    /// Waits up to `wait` for a job of any workflow; `None` when none came.
    pub async fn lease(&self, worker_id: &str, wait: Duration) -> Result<Option<Lease>, BrokerCallError> {
        self.lease_for(worker_id, wait, None).await
    }

    /// [`BrokerClient::lease`] restricted, with `workflows`, to jobs of those workflows (the ones
    /// this loop's ComfyUI server can run).
    pub async fn lease_for(
        &self,
        worker_id: &str,
        wait: Duration,
        workflows: Option<Vec<String>>,
    ) -> Result<Option<Lease>, BrokerCallError> {
        self.lease_with(worker_id, wait, workflows, false, None).await
    }

    /// [`BrokerClient::lease_for`] saying whether the loop's server is busy (`prefetch`: the job
    /// will wait in ComfyUI's queue) and which workflow it ran last.
    pub async fn lease_with(
        &self,
        worker_id: &str,
        wait: Duration,
        workflows: Option<Vec<String>>,
        prefetch: bool,
        last_workflow: Option<String>,
    ) -> Result<Option<Lease>, BrokerCallError> {
        let body = LeaseRequest {
            worker_id: worker_id.to_owned(),
            wait: Some(wait.as_secs_f64()),
            workflows,
            prefetch,
            last_workflow,
        };
        let call = self.request(reqwest::Method::POST, "/worker/lease", |rb| {
            rb.json(&body).timeout(wait + Duration::from_secs(15))
        });
        let used = call.broker;
        let resp = self.send(call).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let lease: LeaseResponse = resp.json().await.map_err(|e| self.unreadable(used, e))?;
        Ok(Some(lease.job))
    }

    /// Tells the broker what this loop's ComfyUI server can run (`POST /worker/preflight`).
    pub async fn preflight(&self, report: &PreflightReport) -> Result<(), BrokerCallError> {
        let call = self
            .request(reqwest::Method::POST, "/worker/preflight", |rb| rb.json(report).timeout(Duration::from_secs(10)));
        self.send(call).await?;
        Ok(())
    }

    /// Streams the job's input image into `dest`.
    pub async fn download_input(&self, job: JobId, token: &LeaseToken, dest: &Path) -> Result<u64, BrokerCallError> {
        let call = self.request(reqwest::Method::GET, &format!("/worker/jobs/{job}/input"), |rb| {
            rb.header("lease-token", token.as_str()).timeout(Duration::from_secs(120))
        });
        let used = call.broker;
        let mut resp = self.send(call).await?;
        // Buffered: every write to a tokio file is a hop to the blocking pool.
        let mut file = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::create(dest).await?);
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(used, e.to_string()))? {
            n += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok(n)
    }

    /// Renews the lease and reports progress. `Ok(true)` when the job was cancelled.
    pub async fn heartbeat(
        &self,
        job: JobId,
        token: &LeaseToken,
        progress: Option<Progress>,
    ) -> Result<bool, BrokerCallError> {
        self.heartbeat_with(job, token, progress, false, Duration::ZERO).await
    }

    /// [`BrokerClient::heartbeat`] that may say ComfyUI started a prefetched job (`started`) and
    /// lets the broker hold the answer up to `wait` unless the job is cancelled meanwhile.
    pub async fn heartbeat_with(
        &self,
        job: JobId,
        token: &LeaseToken,
        progress: Option<Progress>,
        started: bool,
        wait: Duration,
    ) -> Result<bool, BrokerCallError> {
        let body = HeartbeatRequest {
            lease_token: token.clone(),
            progress,
            started,
            wait: (!wait.is_zero()).then_some(wait.as_secs_f64()),
        };
        let call = self.request(reqwest::Method::POST, &format!("/worker/jobs/{job}/heartbeat"), |rb| {
            rb.json(&body).timeout(Duration::from_secs(10) + wait)
        });
        let used = call.broker;
        let resp: HeartbeatResponse = self.send(call).await?.json().await.map_err(|e| self.unreadable(used, e))?;
        Ok(resp.cancelled)
    }

    /// Uploads `path` as the job's result, streamed from disk.
    pub async fn upload_result(
        &self,
        job: JobId,
        token: &LeaseToken,
        path: &Path,
        content_type: &str,
        comfy_execution: Option<Duration>,
    ) -> Result<(), BrokerCallError> {
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        // hyper pulls the next chunk only once the previous one is on the wire, so the time of the
        // last pull tells whether the link still moves. A whole-request timeout would cut off a
        // large result on a slow but healthy link; a stall limit does not.
        let started = Instant::now();
        let last_pull = Arc::new(AtomicU64::new(0));
        let mark = last_pull.clone();
        let chunks = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect(move |_| {
            mark.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        });
        let body = reqwest::Body::wrap_stream(chunks);
        let call = self.request(reqwest::Method::PUT, &format!("/worker/jobs/{job}/result"), |rb| {
            let rb = rb
                .header("lease-token", token.as_str())
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(body);
            match comfy_execution {
                Some(d) => rb.header("comfy-execution-ms", d.as_millis().to_string()),
                None => rb,
            }
        });
        let used = call.broker;
        let stalled = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let idle = started.elapsed().saturating_sub(Duration::from_millis(last_pull.load(Ordering::Relaxed)));
                if idle >= UPLOAD_STALL_TIMEOUT {
                    return idle;
                }
            }
        };
        tokio::select! {
            sent = self.send(call) => sent.map(|_| ()),
            // A broker that stopped taking bytes without a reset is as gone as one that refuses.
            idle = stalled => Err(self.unreachable(used, format!(
                "the result upload made no progress for {} s", idle.as_secs()
            ))),
        }
    }

    /// Puts `image` as the job's latest preview. No retries and no stall handling here: the
    /// caller bounds the time and drops a preview that does not make it.
    pub async fn upload_preview(
        &self,
        job: JobId,
        token: &LeaseToken,
        content_type: &str,
        image: impl Into<reqwest::Body>,
    ) -> Result<(), BrokerCallError> {
        let call = self.request(reqwest::Method::PUT, &format!("/worker/jobs/{job}/preview"), |rb| {
            rb.header("lease-token", token.as_str()).header(reqwest::header::CONTENT_TYPE, content_type).body(image)
        });
        self.send(call).await?;
        Ok(())
    }

    /// Reports a failure; `retryable` lets the broker requeue the job while attempts remain;
    /// `handed_back` (this worker is stopping) requeues it without counting the attempt.
    pub async fn fail(
        &self,
        job: JobId,
        token: &LeaseToken,
        message: &str,
        retryable: bool,
        handed_back: bool,
    ) -> Result<(), BrokerCallError> {
        let body = FailRequest { lease_token: token.clone(), message: message.to_owned(), retryable, handed_back };
        let call = self.request(reqwest::Method::POST, &format!("/worker/jobs/{job}/fail"), |rb| {
            rb.json(&body).timeout(Duration::from_secs(30))
        });
        self.send(call).await?;
        Ok(())
    }
}
