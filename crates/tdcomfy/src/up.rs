//! `tdcomfy worker`, `tdcomfy sim` and `tdcomfy up`: starting the pieces, alone or together in one
//! process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tdcomfy_worker::broker_client::BrokerTrust;
use tokio_util::sync::CancellationToken;

/// Simulator settings (`tdcomfy sim`, `tdcomfy up --simulate`).
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Seconds the simulated sampler takes per job.
    #[arg(long, env = "SIM_JOB_TIME", default_value_t = 2.0)]
    pub sim_job_time: f64,

    /// Progress events per job.
    #[arg(long, env = "SIM_PROGRESS_STEPS", default_value_t = 10)]
    pub sim_progress_steps: u32,

    /// Faults to inject into every prompt, comma-separated: execution_error, silent_ws, drop_ws,
    /// lose_history. (A prompt containing [sim:error], [sim:silent], [sim:drop] or [sim:restart]
    /// gets that fault alone.)
    #[arg(long, env = "SIM_FAULTS", default_value = "")]
    pub sim_faults: String,

    /// Seconds the simulator waits before answering each upload.
    #[arg(long, env = "SIM_UPLOAD_DELAY", default_value_t = 0.0)]
    pub sim_upload_delay: f64,

    /// ComfyUI version the simulator behaves as: 0.3.64 (the captured one) or 0.38 (jobs API,
    /// per-prompt preview method, node replacements, newer validation errors…).
    #[arg(long, env = "SIM_COMFY_VERSION", default_value = "0.3.64")]
    pub comfy_version: tdcomfy_sim::ComfyVersion,

    /// Sampler previews of the simulator: none, auto, latent2rgb or taesd. Default: none for
    /// `tdcomfy sim` (ComfyUI's default), auto for `tdcomfy up --simulate`. (`--sim-preview-method`:
    /// the worker's own `--preview-method` is the per-prompt method it asks for.)
    #[arg(id = "sim_preview_method", long = "sim-preview-method", env = "SIM_PREVIEW_METHOD")]
    pub preview_method: Option<tdcomfy_sim::PreviewMethod>,

    /// 0.38 profile: the asset system on (output entries get id/preview_id, uploads an asset block).
    #[arg(long, env = "SIM_ASSETS")]
    pub assets: bool,

    /// Simulated GPUs listed in /system_stats.
    #[arg(long, env = "SIM_GPUS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub gpus: u32,
}

impl SimArgs {
    /// The simulator's configuration with data under `data_dir`.
    pub fn config(&self, data_dir: PathBuf) -> anyhow::Result<tdcomfy_sim::SimConfig> {
        anyhow::ensure!(
            self.sim_job_time.is_finite() && (0.0..86_400.0).contains(&self.sim_job_time),
            "SIM_JOB_TIME must be 0 to 86400 seconds"
        );
        anyhow::ensure!(
            self.sim_upload_delay.is_finite() && (0.0..3600.0).contains(&self.sim_upload_delay),
            "SIM_UPLOAD_DELAY must be 0 to 3600 seconds"
        );
        let mut config = tdcomfy_sim::SimConfig::new(data_dir);
        config.job_time = Duration::from_secs_f64(self.sim_job_time);
        config.progress_steps = self.sim_progress_steps;
        config.faults.upload_delay = Duration::from_secs_f64(self.sim_upload_delay);
        config.comfy_version = self.comfy_version;
        config.preview_method = self.preview_method.unwrap_or_default();
        config.assets = self.assets;
        config.gpus = self.gpus;
        for fault in self.sim_faults.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            match fault {
                "execution_error" => config.faults.execution_error = true,
                "silent_ws" => config.faults.silent_ws = true,
                "drop_ws" => config.faults.drop_ws = true,
                "lose_history" => config.faults.lose_history = true,
                other => anyhow::bail!(
                    "SIM_FAULTS: unknown fault {other:?} (known: execution_error, silent_ws, drop_ws, lose_history)"
                ),
            }
        }
        Ok(config)
    }
}

/// `tdcomfy worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerCmd {
    /// Broker to lease jobs from. Default: http://127.0.0.1:$API_PORT.
    #[arg(long, env = "BROKER_URL")]
    broker_url: Option<String>,
    /// Port of a local broker, used when BROKER_URL is not set.
    #[arg(long, env = "API_PORT", default_value_t = 8080)]
    api_port: u16,
    /// Token for the broker's worker routes (WORKER_TOKEN, or API_TOKEN when the broker has no
    /// worker token).
    #[arg(long, env = "WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// The broker's client token, used when WORKER_TOKEN is not set.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// PEM file with the certificate (or CA) of an HTTPS broker whose certificate the system does
    /// not trust, e.g. a self-signed TLS_CERT; added to the system's roots.
    #[arg(long, env = "BROKER_CA")]
    broker_ca: Option<PathBuf>,
    /// Check every workflow against every ComfyUI server's /object_info (node types, model files,
    /// options), print the result and exit: 0 when each workflow runs on some server, 1 when
    /// one runs on none. Leases nothing and needs no broker.
    #[arg(long)]
    pub(crate) check: bool,
    #[command(flatten)]
    worker: tdcomfy_worker::WorkerArgs,
    #[command(flatten)]
    workflows: tdcomfy_workflows::WorkflowArgs,
}

/// `tdcomfy sim`.
#[derive(Debug, clap::Args)]
pub struct SimCmd {
    /// Address to listen on.
    #[arg(long, env = "COMFYUI_HOST", default_value = "127.0.0.1")]
    comfyui_host: String,
    /// Port to listen on.
    #[arg(long, env = "COMFYUI_PORT", default_value_t = 8999)]
    comfyui_port: u16,
    /// Directory for the simulator's input/, output/ and temp/.
    #[arg(long, env = "SIM_DATA_DIR", default_value = "tdcomfy-data/comfyui-sim")]
    sim_data_dir: PathBuf,
    /// Bearer token the simulator requires on every route (Authorization: Bearer, or ?token= on
    /// /ws), like an authenticating wrapper in front of ComfyUI. Default: none.
    #[arg(long, env = "SIM_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    #[command(flatten)]
    sim: SimArgs,
}

/// `tdcomfy up`.
#[derive(Debug, clap::Args)]
pub struct UpCmd {
    /// Also run the ComfyUI simulator on COMFYUI_HOST:COMFYUI_PORT (no GPU needed).
    #[arg(long)]
    simulate: bool,
    #[command(flatten)]
    broker: tdcomfy_broker::BrokerArgs,
    #[command(flatten)]
    worker: tdcomfy_worker::WorkerArgs,
    #[command(flatten)]
    workflows: tdcomfy_workflows::WorkflowArgs,
    #[command(flatten)]
    sim: SimArgs,
}

/// `tdcomfy worker --check`: the preflight report of every server, and its verdict as exit code.
pub async fn worker_check(cmd: WorkerCmd) -> anyhow::Result<std::process::ExitCode> {
    let workflows = Arc::new(cmd.workflows.load()?);
    let spool = std::env::temp_dir().join("tdcomfy-worker-spool");
    let config = cmd.worker.into_config(String::new(), None, workflows, spool)?;
    let (report, all_run) = tdcomfy_worker::preflight::check_report(&config).await;
    print!("{report}");
    Ok(if all_run { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

pub async fn worker(cmd: WorkerCmd, shutdown: CancellationToken) -> anyhow::Result<()> {
    let workflows = Arc::new(cmd.workflows.load()?);
    let broker_url = cmd.broker_url.unwrap_or_else(|| format!("http://127.0.0.1:{}", cmd.api_port));
    let token = cmd.worker_token.or(cmd.api_token);
    let spool = std::env::temp_dir().join("tdcomfy-worker-spool");
    let mut config = cmd.worker.into_config(broker_url, token, workflows, spool)?;
    if let Some(ca) = &cmd.broker_ca {
        let certs = BrokerTrust::read_pem(ca).map_err(|e| anyhow::anyhow!("BROKER_CA: {e}"))?;
        config.broker_trust = BrokerTrust::WithCa(certs);
    }
    tdcomfy_worker::run(config, shutdown).await?;
    Ok(())
}

pub async fn sim(cmd: SimCmd, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut config = cmd.sim.config(cmd.sim_data_dir)?;
    config.auth_token = cmd.auth_token.filter(|t| !t.is_empty());
    let addr = format!("{}:{}", cmd.comfyui_host, cmd.comfyui_port);
    let listener =
        tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding the simulator to {addr}"))?;
    println!("tdcomfy sim: a ComfyUI {} simulator at http://{}", config.comfy_version, listener.local_addr()?);
    tdcomfy_sim::run(listener, config, async move { shutdown.cancelled().await }).await?;
    Ok(())
}

pub async fn up(cmd: UpCmd, shutdown: CancellationToken) -> anyhow::Result<()> {
    let workflows = Arc::new(cmd.workflows.load()?);
    let broker_addr = format!("{}:{}", cmd.broker.api_host, cmd.broker.api_port);
    let broker_listener = tokio::net::TcpListener::bind(&broker_addr)
        .await
        .with_context(|| format!("binding the broker to {broker_addr}"))?;
    let broker_local = broker_listener.local_addr()?;
    let data_dir = cmd.broker.data_dir.clone();
    let token = cmd.broker.worker_token.clone().or_else(|| cmd.broker.api_token.clone());
    // With built-in TLS the in-process worker speaks HTTPS over loopback too, trusting exactly the
    // certificate the broker serves (127.0.0.1 is rarely a name in it).
    let tls_cert = cmd.broker.net.tls_cert.clone();
    let broker_config = cmd.broker.into_config(workflows.clone())?;
    let scheme = if broker_config.net.tls.is_some() { "https" } else { "http" };

    // The servers stop only after the worker has stopped, so the worker can still stop its prompt
    // in ComfyUI and hand its job back to the broker on the way out.
    let servers_stop = CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    let mut comfy_note = String::new();
    let mut worker_args = cmd.worker;
    if cmd.simulate {
        let sim_addr = format!("{}:{}", worker_args.comfyui_host, worker_args.comfyui_port);
        let sim_listener = tokio::net::TcpListener::bind(&sim_addr)
            .await
            .with_context(|| format!("binding the simulator to {sim_addr}"))?;
        let sim_local = sim_listener.local_addr()?;
        // The worker talks to the simulator it started, wherever COMFYUI_URLS points.
        worker_args.comfyui_urls = None;
        worker_args.comfyui_host = loopback_for(sim_local).ip().to_string();
        worker_args.comfyui_port = sim_local.port();
        let mut sim_config = cmd.sim.config(data_dir.join("comfyui-sim"))?;
        // Previews out of the box: TD shows the sampler's progress unless told otherwise.
        sim_config.preview_method = cmd.sim.preview_method.unwrap_or(tdcomfy_sim::PreviewMethod::Auto);
        let stop = servers_stop.clone();
        servers.spawn(async move {
            tdcomfy_sim::run(sim_listener, sim_config, async move { stop.cancelled().await }).await.context("simulator")
        });
        comfy_note = format!(" with the ComfyUI simulator at http://{sim_local}");
    }
    let mut worker_config = worker_args.into_config(
        format!("{scheme}://{}", loopback_for(broker_local)),
        token,
        workflows,
        data_dir.join("worker-spool"),
    )?;
    if let (Some(cert), true) = (&tls_cert, broker_config.net.tls.is_some()) {
        let certs = BrokerTrust::read_pem(cert).map_err(|e| anyhow::anyhow!("TLS_CERT: {e}"))?;
        worker_config.broker_trust = BrokerTrust::Pinned(certs);
    }
    let comfy_list: Vec<String> = worker_config.comfy.iter().map(|e| e.to_string()).collect();
    let stop = servers_stop.clone();
    servers.spawn(async move {
        tdcomfy_broker::run(broker_listener, broker_config, async move { stop.cancelled().await })
            .await
            .context("broker")
    });
    let worker_stop = CancellationToken::new();
    let mut worker = tokio::spawn(tdcomfy_worker::run(worker_config, worker_stop.clone()));

    println!(
        "tdcomfy is up{comfy_note}: send frames to {scheme}://{}/jobs (worker → {})",
        loopback_for(broker_local),
        comfy_list.join(", ")
    );
    if broker_local.ip().is_unspecified() {
        println!(
            "listening on all interfaces: other machines use this machine's address, port {}",
            broker_local.port()
        );
    }

    // Run until a signal or until a piece stops on its own (an error); then worker first, servers after.
    let mut result: anyhow::Result<()> = Ok(());
    let worker_done = tokio::select! {
        _ = shutdown.cancelled() => false,
        done = &mut worker => {
            result = done.map_err(anyhow::Error::from).and_then(|r| r.context("worker"));
            true
        }
        Some(done) = servers.join_next() => {
            result = done.map_err(anyhow::Error::from).and_then(|r| r);
            false
        }
    };
    worker_stop.cancel();
    if !worker_done && let Ok(Ok(Err(e))) = tokio::time::timeout(std::time::Duration::from_secs(20), &mut worker).await
    {
        result = result.and(Err(anyhow::Error::from(e).context("worker")));
    }
    servers_stop.cancel();
    while let Some(done) = servers.join_next().await {
        if let (Err(e), true) = (done.map_err(anyhow::Error::from).and_then(|r| r), result.is_ok()) {
            result = Err(e);
        }
    }
    result
}

/// Where a local client should connect to reach a listener bound to `addr` (0.0.0.0 → 127.0.0.1).
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()) } else { addr }
}
