//! `tdcomfy status`: the dashboard's data in a terminal. The queue with positions, running jobs
//! with progress bars, recent finished jobs, workers and ComfyUI servers; `--watch` keeps it
//! current from the broker's event stream.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tdcomfy_api::{ErrorBody, JobEvent, JobId, JobList, JobStatus, JobView};
use tokio::time::Instant;

use crate::broker_target::BrokerTarget;
use crate::sse::JobEvents;

/// `tdcomfy status`.
#[derive(Debug, clap::Args)]
pub struct StatusCmd {
    /// Keep the view current from the broker's event stream (Ctrl-C ends it).
    #[arg(long, short)]
    watch: bool,
    /// Finished jobs to list.
    #[arg(long, default_value_t = 5)]
    recent: usize,
    #[command(flatten)]
    broker: BrokerTarget,
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let mut rb = self.http.get(format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb.send().await.with_context(|| format!("reaching the broker at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        match resp.json::<ErrorBody>().await {
            Ok(body) if status == reqwest::StatusCode::UNAUTHORIZED => {
                anyhow::bail!("{} (set API_TOKEN or pass --token)", body.error.message)
            }
            Ok(body) => anyhow::bail!("{} ({}, HTTP {})", body.error.message, body.error.code, status.as_u16()),
            Err(_) => anyhow::bail!("GET {path}: the broker answered HTTP {status}"),
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self.get(path).await?.json().await?)
    }
}

/// What the view shows.
#[derive(Default)]
struct State {
    jobs: HashMap<JobId, JobView>,
    health: Value,
    workflows: Value,
}

impl State {
    fn upsert(&mut self, job: JobView) {
        match self.jobs.get(&job.id) {
            Some(known) if known.version > job.version => {}
            _ => {
                self.jobs.insert(job.id, job);
            }
        }
    }

    /// Queued and running jobs, and the newest finished ones, from the broker.
    async fn load_jobs(&mut self, c: &Client, recent: usize) -> anyhow::Result<()> {
        let queued: JobList = c.json("/jobs?status=queued&limit=500").await?;
        let running: JobList = c.json("/jobs?status=running&limit=500").await?;
        let latest: JobList = c.json(&format!("/jobs?limit={}", recent + 20)).await?;
        // A re-read replaces what was open: a job no longer listed as queued or running ended.
        self.jobs.retain(|_, j| j.status.is_terminal());
        for j in latest.jobs.into_iter().chain(running.jobs).chain(queued.jobs) {
            self.upsert(j);
        }
        Ok(())
    }

    /// Forgets all but the newest finished jobs `keep` (a long watch must not grow).
    fn trim(&mut self, keep: usize) {
        let mut done: Vec<(i64, JobId)> = self
            .jobs
            .values()
            .filter(|j| j.status.is_terminal())
            .map(|j| (j.finished_at.map(|t| t.millis()).unwrap_or(0), j.id))
            .collect();
        if done.len() <= keep {
            return;
        }
        done.sort_unstable();
        for (_, id) in &done[..done.len() - keep] {
            self.jobs.remove(id);
        }
    }

    async fn load_service(&mut self, c: &Client) -> anyhow::Result<()> {
        self.health = c.json("/health").await?;
        self.workflows = c.json("/workflows").await?;
        Ok(())
    }

    fn render(&self, base: &str, recent: usize, width: usize) -> String {
        let mut out = String::new();
        let h = &self.health;
        let n = |k: &str| h[k].as_u64().unwrap_or(0);
        // Several brokers on one database: how many are alive (a lone broker, or one older than
        // the field, says nothing).
        let brokers = h["brokers"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "tdcomfy {base} · {} queued · {} running · {} done · {} failed · {} cancelled{}",
            n("queued"),
            n("running"),
            n("done"),
            n("error"),
            n("cancelled"),
            if brokers > 1 { format!(" · {brokers} brokers") } else { String::new() }
        );
        let mut running: Vec<&JobView> = self.jobs.values().filter(|j| j.status == JobStatus::Running).collect();
        running.sort_by_key(|j| j.started_at.map(|t| t.millis()));
        let _ = writeln!(out, "\nRUNNING ({})", running.len());
        for j in &running {
            let p = j.progress.value.clamp(0.0, 1.0);
            let mut detail = Vec::new();
            if let (Some(s), Some(m)) = (j.progress.step, j.progress.max_steps) {
                detail.push(format!("step {s}/{m}"));
            }
            detail.extend(j.progress.node_type.clone());
            detail.extend(j.progress.stage.clone());
            let _ = writeln!(
                out,
                "  {}  {}  {} {:>3.0}%  {}  {}",
                short(j.id),
                j.workflow,
                bar(p, 24),
                p * 100.0,
                secs(j.processing_time),
                clip(&detail.join(" · "), width.saturating_sub(70))
            );
        }
        let mut queued: Vec<&JobView> = self.jobs.values().filter(|j| j.status == JobStatus::Queued).collect();
        queued.sort_by_key(|j| j.queue_position.unwrap_or(u64::MAX));
        let _ = writeln!(out, "\nQUEUE ({})", queued.len());
        for j in queued.iter().take(20) {
            let pos = j.queue_position.map(|p| format!("#{p}")).unwrap_or_else(|| "#?".into());
            let why = j.waiting_reason.as_deref().map(|w| format!("  waiting: {w}")).unwrap_or_default();
            let line = format!("  {pos:>4}  {}  {}  {:?}{why}", short(j.id), j.workflow, j.prompt);
            let _ = writeln!(out, "{}", clip(&line, width));
        }
        if queued.len() > 20 {
            let _ = writeln!(out, "  … and {} more", queued.len() - 20);
        }
        let mut done: Vec<&JobView> = self.jobs.values().filter(|j| j.status.is_terminal()).collect();
        done.sort_by_key(|j| std::cmp::Reverse(j.finished_at.map(|t| t.millis())));
        let _ = writeln!(out, "\nRECENT");
        for j in done.iter().take(recent) {
            let what = match j.status {
                JobStatus::Error => j.error_message.clone().unwrap_or_default(),
                JobStatus::Cancelled => j.cancel_reason.clone().unwrap_or_default(),
                _ => j.result.as_ref().map(|r| format!("{} {} B", r.content_type, r.size)).unwrap_or_default(),
            };
            let line = format!(
                "  {:<9}  {}  {}  {}  {what}",
                j.status.as_str(),
                short(j.id),
                j.workflow,
                secs(j.timings.total)
            );
            let _ = writeln!(out, "{}", clip(&line, width));
        }
        let workers = h["workers"].as_array().cloned().unwrap_or_default();
        let _ = writeln!(out, "\nWORKERS ({})", workers.len());
        for w in &workers {
            // Fields newer brokers add (server, state, prefetched jobs, GPUs) are shown when there.
            let mut parts = vec![w["id"].as_str().unwrap_or("?").to_owned()];
            if let Some(s) = w["server"].as_str() {
                parts.push(s.to_owned());
            }
            let state = w["state"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| if w["job_id"].is_string() { "running".into() } else { "idle".into() });
            parts.push(state);
            if let Some(job) = w["job_id"].as_str() {
                parts.push(format!("job {}", &job[..job.len().min(8)]));
            }
            match &w["prefetched_jobs"] {
                Value::Array(a) if !a.is_empty() => parts.push(format!("prefetched {}", a.len())),
                Value::Number(n) if n.as_u64() != Some(0) => parts.push(format!("prefetched {n}")),
                _ => {}
            }
            if let Some(wf) = w["last_workflow"].as_str() {
                parts.push(format!("last {wf}"));
            }
            for d in w["devices"].as_array().into_iter().flatten() {
                let name = d["name"].as_str().unwrap_or("device");
                match (d["vram_total"].as_u64(), d["vram_free"].as_u64()) {
                    (Some(t), Some(f)) => parts.push(format!("{name} {}/{} GiB VRAM used", gib(t - f.min(t)), gib(t))),
                    _ => parts.push(name.to_owned()),
                }
            }
            parts.push(format!("seen {}", secs(w["last_seen_ms_ago"].as_f64().map(|ms| ms / 1000.0))));
            let _ = writeln!(out, "{}", clip(&format!("  {}", parts.join("  ")), width));
        }
        let servers = servers(&self.workflows);
        let _ = writeln!(out, "\nCOMFYUI SERVERS ({})", servers.len());
        for (server, (up, can, cannot)) in &servers {
            let mut line = format!("  {server}  {}  can run: {}", if *up { "up" } else { "DOWN" }, can.join(", "));
            if !cannot.is_empty() {
                line.push_str(&format!("  cannot: {}", cannot.join("; ")));
            }
            let _ = writeln!(out, "{}", clip(&line, width));
        }
        out
    }
}

/// Per server: up, workflows it can run, the ones it cannot (with why).
type Servers = Vec<(String, (bool, Vec<String>, Vec<String>))>;

fn servers(workflows: &Value) -> Servers {
    let mut map: Servers = Vec::new();
    for wf in workflows["workflows"].as_array().into_iter().flatten() {
        let name = wf["name"].as_str().unwrap_or("?");
        for r in wf["readiness"].as_array().into_iter().flatten() {
            let server = r["server"].as_str().unwrap_or("?").to_owned();
            let idx = match map.iter().position(|(s, _)| *s == server) {
                Some(i) => i,
                None => {
                    map.push((server, (true, Vec::new(), Vec::new())));
                    map.len() - 1
                }
            };
            let entry = &mut map[idx].1;
            entry.0 &= r["reachable"].as_bool().unwrap_or(false);
            if r["ready"].as_bool() == Some(true) {
                entry.1.push(name.to_owned());
            } else {
                let problems: Vec<&str> =
                    r["problems"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                entry.2.push(format!("{name} ({})", problems.join(", ")));
            }
        }
    }
    map
}

fn short(id: JobId) -> String {
    id.to_string().chars().take(8).collect()
}

fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

fn secs(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(s) if s < 10.0 => format!("{s:.1} s"),
        Some(s) => format!("{s:.0} s"),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

/// `line` cut to `width` characters (0: no limit).
fn clip(line: &str, width: usize) -> String {
    if width == 0 || line.chars().count() <= width {
        return line.to_owned();
    }
    let mut s: String = line.chars().take(width.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// Runs `status`.
pub async fn run(cmd: StatusCmd) -> anyhow::Result<std::process::ExitCode> {
    let client = Client { http: cmd.broker.http()?, base: cmd.broker.base(), token: cmd.broker.token() };
    let terminal = std::io::stdout().is_terminal();
    // A terminal gets lines cut to its width (COLUMNS, as shells export it); a pipe gets them whole.
    let width = if terminal { std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(120) } else { 0 };
    let mut state = State::default();
    if !cmd.watch {
        state.load_service(&client).await?;
        state.load_jobs(&client, cmd.recent).await?;
        print!("{}", state.render(&client.base, cmd.recent, width));
        return Ok(std::process::ExitCode::SUCCESS);
    }
    watch(&client, &mut state, cmd.recent, width, terminal).await
}

/// How often the view is drawn at most, and how often workers and servers (which come and go
/// without job events) are read again.
const FRAME: Duration = Duration::from_millis(200);
const SERVICE_EVERY: Duration = Duration::from_secs(2);

async fn watch(
    client: &Client,
    state: &mut State,
    recent: usize,
    width: usize,
    terminal: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let draw = |state: &State| {
        let frame = state.render(&client.base, recent, width);
        let mut stdout = std::io::stdout().lock();
        // A terminal is redrawn in place; a pipe gets each view after a form feed.
        let _ = if terminal { write!(stdout, "\x1b[H\x1b[2J{frame}") } else { write!(stdout, "\x0c\n{frame}") };
        let _ = stdout.flush();
    };
    let shutdown = crate::cli::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        // Subscribed before the re-read, so nothing between the two is missed.
        // Batched: a view redrawn at most 5 times a second needs no write per event.
        let mut events = JobEvents::new(client.get("/events?batch_ms=200").await?);
        state.load_service(client).await?;
        state.load_jobs(client, recent).await?;
        draw(state);
        let mut dirty = false;
        let mut reread_queue = false;
        let mut next_frame = Instant::now() + FRAME;
        let mut next_service = Instant::now() + SERVICE_EVERY;
        let ended = loop {
            let wake = if dirty { next_frame.min(next_service) } else { next_service };
            tokio::select! {
                ev = events.next_raw() => match ev {
                    Ok(Some((name, data))) => match name.as_str() {
                        "resync" => break false,
                        "preview" | "snapshot" => {}
                        _ => if let Ok(ev) = serde_json::from_str::<JobEvent>(&data) {
                            let was_queued = state.jobs.get(&ev.job_id).is_some_and(|j| j.status == JobStatus::Queued);
                            // Positions of the others move when a job joins or leaves the queue.
                            reread_queue |= was_queued != (ev.job.status == JobStatus::Queued);
                            state.upsert(ev.job);
                            state.trim(recent + 20);
                            dirty = true;
                        },
                    },
                    Ok(None) => break true,
                    Err(e) => {
                        tracing::debug!(error = %e, "event stream broke");
                        break true;
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= next_service {
                        state.load_service(client).await?;
                        next_service = Instant::now() + SERVICE_EVERY;
                        dirty = true;
                    }
                    if reread_queue {
                        let queued: JobList = client.json("/jobs?status=queued&limit=500").await?;
                        state.jobs.retain(|_, j| j.status != JobStatus::Queued);
                        queued.jobs.into_iter().for_each(|j| state.upsert(j));
                        reread_queue = false;
                    }
                    if dirty && Instant::now() >= next_frame {
                        draw(state);
                        dirty = false;
                        next_frame = Instant::now() + FRAME;
                    }
                }
                _ = &mut shutdown => return Ok(std::process::ExitCode::SUCCESS),
            }
        };
        if ended {
            // The broker went away (restart): try again after a moment.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::State;

    #[test]
    fn the_header_counts_brokers_only_when_several_share_the_database() {
        let one = |brokers: serde_json::Value| {
            let state = State { health: json!({"queued": 2, "brokers": brokers}), ..State::default() };
            state.render("http://b", 5, 100).lines().next().unwrap_or_default().to_owned()
        };
        assert!(one(json!([{"id": "a"}, {"id": "b"}, {"id": "c"}])).ends_with("0 cancelled · 3 brokers"));
        assert!(one(json!([{"id": "a"}])).ends_with("0 cancelled"));
        assert!(one(serde_json::Value::Null).ends_with("0 cancelled"), "a broker older than the field");
    }
}
