//! The broker's Prometheus metrics (`GET /metrics`), in a registry of this broker's own.
//!
//! Counters and histograms are bumped where the change they count happens ([`crate::service`]
//! for jobs, the HTTP layer for requests and bytes, the push routes for subscribers); each bump
//! is an atomic add behind a read lock, never an await, so metrics stay off a job's critical path.
//! Gauges that mirror state the broker keeps anyway (queue depth, running jobs, workers, servers)
//! are read when scraped instead of being kept in step with it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the per-workflow metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkflowLabels {
    /// The workflow's name (names are checked against the loaded workflows at submit, so the set
    /// of values is bounded by the workflows folder).
    pub workflow: String,
}

/// Labels of `tdcomfy_jobs_finished_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The workflow's name.
    pub workflow: String,
    /// `done`, `error`, `cancelled` or `superseded`.
    pub outcome: &'static str,
}

/// Labels of `tdcomfy_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route's template (`/jobs/{id}`), or `unmatched`: never the raw path, whose ids would
    /// make one series per job.
    pub route: String,
    /// The HTTP status answered.
    pub status: u16,
}

/// Which push route a subscriber is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subscriber {
    /// `/events` or `/jobs/{id}/events`.
    Sse,
    /// `/ws`.
    WebSocket,
}

type HistogramFamily = Family<WorkflowLabels, Histogram, fn() -> Histogram>;

/// Seconds, from 10 ms to about 40 min: a queue wait or a run of a frame's workflow fits.
fn seconds_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 18))
}

/// Every metric of one broker.
pub struct Metrics {
    registry: Registry,
    submitted: Family<WorkflowLabels, Counter>,
    finished: Family<OutcomeLabels, Counter>,
    queue_wait: HistogramFamily,
    comfy_execution: HistogramFamily,
    overhead: HistogramFamily,
    http_requests: Family<HttpLabels, Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    sse_subscribers: Gauge,
    ws_subscribers: Gauge,
    queue_depth: Gauge,
    running: Gauge,
    workers_connected: Gauge,
    servers_up: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tdcomfy");
        let submitted = Family::<WorkflowLabels, Counter>::default();
        registry.register("jobs_submitted", "Jobs accepted by POST /jobs (new jobs, not replays)", submitted.clone());
        let finished = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state, by outcome: done, error, cancelled (by a client) or superseded (by a newer job of their stream)",
            finished.clone(),
        );
        let histogram = || HistogramFamily::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let queue_wait = histogram();
        registry.register(
            "queue_wait_seconds",
            "From acceptance to the start of the attempt, observed at each start",
            queue_wait.clone(),
        );
        let comfy_execution = histogram();
        registry.register(
            "comfy_execution_seconds",
            "ComfyUI's own execution time of done jobs, as the worker reported it",
            comfy_execution.clone(),
        );
        let overhead = histogram();
        registry.register(
            "broker_overhead_seconds",
            "Of a done job's run, the time not spent in ComfyUI's execution: frame to ComfyUI, result back, waits in ComfyUI's queue",
            overhead.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route template and status",
            http_requests.clone(),
        );
        let bytes_in = Counter::default();
        registry.register(
            "http_received_bytes",
            "HTTP request body bytes read (uploads, JSON bodies)",
            bytes_in.clone(),
        );
        let bytes_out = Counter::default();
        registry.register(
            "http_sent_bytes",
            "HTTP response body bytes sent (results, previews, JSON, SSE); WebSocket frames not included",
            bytes_out.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let sse_subscribers = gauge(&mut registry, "sse_subscribers", "Open Server-Sent Events streams");
        let ws_subscribers = gauge(&mut registry, "websocket_subscribers", "Open WebSocket event streams");
        let queue_depth = gauge(&mut registry, "queue_depth", "Jobs queued, waiting for a worker");
        let running = gauge(&mut registry, "jobs_running", "Jobs leased to a worker");
        let workers_connected =
            gauge(&mut registry, "workers_connected", "Workers waiting on a lease or heard from in the last 30 s");
        let servers_up = gauge(
            &mut registry,
            "comfyui_servers_up",
            "ComfyUI servers whose worker's last preflight report says they answer",
        );
        Metrics {
            registry,
            submitted,
            finished,
            queue_wait,
            comfy_execution,
            overhead,
            http_requests,
            bytes_in,
            bytes_out,
            sse_subscribers,
            ws_subscribers,
            queue_depth,
            running,
            workers_connected,
            servers_up,
        }
    }

    /// A job was accepted.
    pub fn job_submitted(&self, workflow: &str) {
        self.submitted.get_or_create(&WorkflowLabels { workflow: workflow.to_owned() }).inc();
    }

    /// A job reached a final state (`outcome`: done, error, cancelled, superseded).
    pub fn job_finished(&self, workflow: &str, outcome: &'static str) {
        self.finished.get_or_create(&OutcomeLabels { workflow: workflow.to_owned(), outcome }).inc();
    }

    /// An attempt started after `queue_wait` seconds in the queue.
    pub fn job_started(&self, workflow: &str, queue_wait: f64) {
        self.queue_wait.get_or_create(&WorkflowLabels { workflow: workflow.to_owned() }).observe(queue_wait);
    }

    /// A done job's run: `comfy` seconds in ComfyUI's execution of `run` seconds in all.
    pub fn job_timings(&self, workflow: &str, comfy: f64, run: f64) {
        let labels = WorkflowLabels { workflow: workflow.to_owned() };
        self.comfy_execution.get_or_create(&labels).observe(comfy);
        self.overhead.get_or_create(&labels).observe((run - comfy).max(0.0));
    }

    /// A request was answered.
    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests.get_or_create(&HttpLabels { route: route.to_owned(), status }).inc();
    }

    /// Counter of request body bytes.
    pub fn bytes_in(&self) -> &Counter {
        &self.bytes_in
    }

    /// Counter of response body bytes.
    pub fn bytes_out(&self) -> &Counter {
        &self.bytes_out
    }

    /// The gauge of open subscribers of `kind`.
    pub fn subscribers(&self, kind: Subscriber) -> &Gauge {
        match kind {
            Subscriber::Sse => &self.sse_subscribers,
            Subscriber::WebSocket => &self.ws_subscribers,
        }
    }

    /// The Prometheus text exposition (format 0.0.4), with the state gauges set from `state`.
    pub fn render(&self, state: ScrapeState) -> String {
        self.queue_depth.set(clamp(state.queued));
        self.running.set(clamp(state.running));
        self.workers_connected.set(clamp(state.workers_connected));
        self.servers_up.set(clamp(state.servers_up));
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The state the gauges show, read by the scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScrapeState {
    /// Jobs queued.
    pub queued: u64,
    /// Jobs running.
    pub running: u64,
    /// Workers connected.
    pub workers_connected: u64,
    /// ComfyUI servers up.
    pub servers_up: u64,
}

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
