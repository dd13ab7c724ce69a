//! Command-line parsing (clap, every flag with its environment variable), the optional TOML
//! config file, and dispatch to the subcommands.
//!
//! Precedence: a flag beats its environment variable, which beats the config file, which beats the
//! built-in default. The config file's keys are the flags' names with underscores
//! (`api_port = 9000`); unknown keys are an error, so a typo cannot silently do nothing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// TouchDesigner → ComfyUI video pipeline.
#[derive(Debug, Parser)]
#[command(name = "tdcomfy", version, about, long_about = None)]
pub struct Cli {
    /// TOML file with settings (keys are the flag names with underscores, e.g. api_port = 9000).
    #[arg(long, env = "TDCOMFY_CONFIG", global = true)]
    config: Option<PathBuf>,

    /// Log lines as text (coloured only when stderr is a terminal) or json (one object per line).
    #[arg(long, env = "LOG_FORMAT", global = true, value_enum, default_value_t = crate::logging::LogFormat::Text)]
    pub log_format: crate::logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

/// What to run.
// Parsed once per process: the size of the largest variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the job broker (the HTTP API TouchDesigner and workers talk to).
    Serve(ServeArgs),
    /// Run a worker: lease jobs from the broker and run them on ComfyUI.
    Worker(crate::up::WorkerCmd),
    /// Run the ComfyUI simulator (speaks ComfyUI's HTTP and WebSocket protocol; no GPU needed).
    Sim(crate::up::SimCmd),
    /// Run broker and worker together (and, with --simulate, the ComfyUI simulator): the whole
    /// pipeline in one process.
    Up(crate::up::UpCmd),
    /// Submit a frame, show live progress, download the result.
    Submit(crate::submit::SubmitCmd),
    /// Show the queue, running jobs with progress, workers and ComfyUI servers (`--watch` keeps it live)
    Status(crate::status::StatusCmd),
    /// Benchmarks that print the figures the README reports (build with --release).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
}

/// `tdcomfy serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    broker: tdcomfy_broker::BrokerArgs,
    #[command(flatten)]
    workflows: tdcomfy_workflows::WorkflowArgs,
}

/// Parses the command line, applying the config file's values as defaults.
pub fn parse() -> anyhow::Result<Cli> {
    parse_from(std::env::args_os().collect())
}

fn parse_from(argv: Vec<OsString>) -> anyhow::Result<Cli> {
    let mut command = Cli::command();
    if let Some(path) = config_path(&argv) {
        command = apply_config_file(command, &path)?;
    }
    let matches = command.get_matches_from(argv);
    Ok(Cli::from_arg_matches(&matches)?)
}

fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("TDCOMFY_CONFIG").map(PathBuf::from)
}

fn apply_config_file(mut command: clap::Command, path: &std::path::Path) -> anyhow::Result<clap::Command> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))?;
    let mut unknown: Vec<&str> = Vec::new();
    for (key, value) in &table {
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "config file {}: {key} must be a string, number or boolean, not {}",
                path.display(),
                other.type_str()
            ),
        };
        let subcommands: Vec<String> = command
            .get_subcommands()
            .filter(|sub| sub.get_arguments().any(|a| a.get_id() == key.as_str()))
            .map(|sub| sub.get_name().to_owned())
            .collect();
        if subcommands.is_empty() {
            unknown.push(key);
            continue;
        }
        for name in subcommands {
            let (key, text) = (key.clone(), text.clone());
            command = command.mut_subcommand(name, move |sub| sub.mut_arg(key, move |arg| arg.default_value(text)));
        }
    }
    if !unknown.is_empty() {
        anyhow::bail!("config file {}: unknown setting(s): {}", path.display(), unknown.join(", "));
    }
    Ok(command)
}

/// Runs the chosen subcommand.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Worker(cmd) if cmd.check => crate::up::worker_check(cmd).await,
        Command::Worker(cmd) => {
            crate::up::worker(cmd, shutdown_token()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sim(cmd) => {
            crate::up::sim(cmd, shutdown_token()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(cmd) => {
            crate::up::up(cmd, shutdown_token()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit(cmd) => crate::submit::run(cmd).await,
        Command::Status(cmd) => crate::status::run(cmd).await,
        Command::Bench(cmd) => crate::bench::run(cmd).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let workflows = std::sync::Arc::new(args.workflows.load()?);
    let args = args.broker;
    let addr = format!("{}:{}", args.api_host, args.api_port);
    let config = args.into_config(workflows)?;
    let listener =
        tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding the broker to {addr}"))?;
    tdcomfy_broker::run(listener, config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled on Ctrl-C or SIGTERM.
fn shutdown_token() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        trigger.cancel();
    });
    token
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn config_file_sets_defaults_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("tdcomfy-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "api_port = 9123\nmax_upload_mb = 7\n").unwrap();
        let f = file.to_str().unwrap();
        let serve = |extra: &[&str]| {
            let mut args = vec!["tdcomfy", "--config", f, "serve"];
            args.extend_from_slice(extra);
            match parse_from(argv(&args)).unwrap().command {
                Command::Serve(a) => a.broker,
                other => panic!("parsed {other:?}"),
            }
        };
        let a = serve(&[]);
        assert_eq!((a.api_port, a.max_upload_mb), (9123, 7));
        assert_eq!(serve(&["--api-port", "1"]).api_port, 1);
        std::fs::write(&file, "api_prot = 9123\n").unwrap();
        let err = parse_from(argv(&["tdcomfy", "--config", f, "serve"])).unwrap_err();
        assert!(err.to_string().contains("api_prot"), "{err}");
    }
}
