//! Prefetch (`PREFETCH`, default 1): while a server's job runs, its lease loop leases the next,
//! uploads its frame and queues its prompt in ComfyUI's own queue; a prefetched job that is
//! cancelled, superseded or handed back leaves that queue and never runs there.
//!
//! What ComfyUI ran is watched from the outside: a task polls the simulator's `GET /queue` every
//! few milliseconds and records, per job (a prompt names its job in its output folder,
//! `tdcomfy/<job id>`), whether its prompt was seen pending and whether it was seen running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::harness::{ComfyVersion, Pipeline, Setup, on_both_profiles};

/// What the simulator's queue showed of one job's prompts.
#[derive(Debug, Default, Clone)]
struct Sighting {
    /// Seen in `queue_pending`: first and last time.
    pending: Option<(Instant, Instant)>,
    /// Seen in `queue_running`, distinct prompt ids.
    ran: Vec<String>,
}

/// Polls the simulator's queue until dropped.
struct QueueWatch {
    seen: Arc<Mutex<HashMap<String, Sighting>>>,
    task: tokio::task::JoinHandle<()>,
}

impl QueueWatch {
    fn start(p: &Pipeline, jobs: Arc<Mutex<Vec<String>>>) -> QueueWatch {
        let seen: Arc<Mutex<HashMap<String, Sighting>>> = Arc::default();
        let (url, http, out) = (p.sim_url("/queue"), p.http.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                if let Ok(r) = http.get(&url).send().await
                    && let Ok(q) = r.json::<Value>().await
                {
                    let now = Instant::now();
                    let ids = jobs.lock().unwrap().clone();
                    let mut seen = out.lock().unwrap();
                    for (key, running) in [("queue_running", true), ("queue_pending", false)] {
                        for entry in q[key].as_array().into_iter().flatten() {
                            let text = entry.to_string();
                            let Some(job) = ids.iter().find(|id| text.contains(id.as_str())) else { continue };
                            let s = seen.entry(job.clone()).or_default();
                            if running {
                                let prompt = entry[1].as_str().unwrap_or_default().to_owned();
                                if !s.ran.contains(&prompt) {
                                    s.ran.push(prompt);
                                }
                            } else {
                                s.pending = Some((s.pending.map_or(now, |(first, _)| first), now));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        QueueWatch { seen, task }
    }

    fn of(&self, job: &str) -> Sighting {
        self.seen.lock().unwrap().get(job).cloned().unwrap_or_default()
    }

    /// Waits until `job`'s prompt is pending in ComfyUI's queue.
    async fn until_pending(&self, job: &str, secs: f64) {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        while self.of(job).pending.is_none() {
            assert!(Instant::now() < deadline, "job {job}'s prompt never waited in ComfyUI's queue");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `job`'s prompt has been out of ComfyUI's pending queue for a few polls.
    async fn until_not_pending(&self, job: &str, secs: f64) -> Instant {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            let last = self.of(job).pending.map(|(_, last)| last).expect("was pending");
            if last.elapsed() > Duration::from_millis(100) {
                return last;
            }
            assert!(Instant::now() < deadline, "job {job}'s prompt stayed in ComfyUI's queue");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for QueueWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The one worker's entry in `/health` once `pred` holds (within 5 s).
async fn server_in_health(p: &Pipeline, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health: Value = p.http.get(p.url("/health")).send().await.unwrap().json().await.unwrap();
        let worker = health["workers"][0].clone();
        if pred(&worker) {
            return worker;
        }
        assert!(Instant::now() < deadline, "/health never showed the expected state: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn setup(version: ComfyVersion, job_time: f64) -> Setup {
    Setup { sim_job_time: job_time, ..Setup::on(version) }
}

async fn watched(p: &Pipeline) -> (QueueWatch, Arc<Mutex<Vec<String>>>) {
    let jobs: Arc<Mutex<Vec<String>>> = Arc::default();
    (QueueWatch::start(p, jobs.clone()), jobs)
}

async fn submit(p: &Pipeline, jobs: &Mutex<Vec<String>>, prompt: &str, fields: &[(&str, &str)]) -> String {
    let id = p.submit_with(crate::harness::frame_png(), prompt, None, None, fields).await;
    jobs.lock().unwrap().push(id.clone());
    id
}

/// (a) The next job's prompt waits in ComfyUI's queue while the current one runs, so ComfyUI
/// starts it the moment the first ends; both are delivered.
async fn the_next_prompt_waits_in_comfyuis_queue_before_the_current_finishes(version: ComfyVersion) {
    let p = Pipeline::start(setup(version, 1.5)).await;
    let (watch, jobs) = watched(&p).await;
    let first = submit(&p, &jobs, "first", &[]).await;
    let second = submit(&p, &jobs, "second", &[]).await;
    watch.until_pending(&second, 10.0).await;
    let busy = server_in_health(&p, |w| {
        w["state"] == "running" && w["prefetched_jobs"].as_array().is_some_and(|j| !j.is_empty())
    })
    .await;
    assert_eq!(busy["job_id"], first.as_str(), "{busy}");
    assert_eq!(busy["prefetched_jobs"], serde_json::json!([second]), "{busy}");
    // Pending while the first had not finished: it is the first that runs, the second waits.
    let first_now = p.job(&first).await;
    assert_eq!(first_now["status"], "running", "the second prompt was queued while the first ran: {first_now}");
    assert_eq!(watch.of(&first).ran.len(), 1);
    assert!(watch.of(&second).ran.is_empty(), "the prefetched prompt waits behind the first");
    for id in [&first, &second] {
        let job = p.wait_terminal(id).await;
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
    }
    assert_eq!(watch.of(&second).ran.len(), 1, "the prefetched prompt ran once");
    // The worker reports the server's state: idle again, nothing prefetched, the workflow it
    // ran, its devices from /system_stats.
    let idle =
        server_in_health(&p, |w| w["state"] == "idle" && w["devices"].as_array().is_some_and(|d| !d.is_empty())).await;
    assert_eq!(idle["prefetched_jobs"], serde_json::json!([]), "{idle}");
    assert_eq!(idle["last_workflow"], "ltxv_image_to_video", "{idle}");
    assert_eq!(idle["server"], p.sim_url("").trim_end_matches('/'), "{idle}");
    assert!(idle["devices"][0]["vram_total"].as_u64().is_some_and(|v| v > 0), "{idle}");
}

/// (b) A client cancelling a prefetched job takes its prompt out of ComfyUI's queue well before
/// the running job ends, and it never runs.
async fn a_cancelled_prefetched_job_leaves_comfyuis_queue_and_never_runs(version: ComfyVersion) {
    let p = Pipeline::start(setup(version, 3.0)).await;
    let (watch, jobs) = watched(&p).await;
    let first = submit(&p, &jobs, "first", &[]).await;
    let second = submit(&p, &jobs, "second", &[]).await;
    watch.until_pending(&second, 10.0).await;
    let cancelled_at = Instant::now();
    let resp = p.http.delete(p.url(&format!("/jobs/{second}"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let gone = watch.until_not_pending(&second, 2.0).await;
    assert!(
        gone.saturating_duration_since(cancelled_at) < Duration::from_secs(1),
        "the prompt left ComfyUI's queue {:?} after the cancel",
        gone.saturating_duration_since(cancelled_at)
    );
    assert_eq!(p.job(&first).await["status"], "running", "it left the queue while the first still ran");
    let done = p.wait_terminal(&first).await;
    assert_eq!(done["status"], "done", "{done}");
    // ComfyUI would have started it the instant the first ended: give it that chance.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(watch.of(&second).ran.is_empty(), "the cancelled prefetched prompt ran: {:?}", watch.of(&second));
    assert_eq!(p.job(&second).await["status"], "cancelled");
    assert_eq!(p.sim_queue().await, (0, 0));
}

/// (b) In `latest` mode a new frame supersedes the prefetched one: its prompt leaves ComfyUI's
/// queue and never runs; the running job finishes and the newest runs after it.
async fn a_superseded_prefetched_job_leaves_comfyuis_queue_and_never_runs(version: ComfyVersion) {
    let p = Pipeline::start(setup(version, 3.0)).await;
    let (watch, jobs) = watched(&p).await;
    let latest = [("stream", "td-1"), ("mode", "latest")];
    let first = submit(&p, &jobs, "first", &latest).await;
    p.wait_for(&first, 10.0, |j| j["status"] == "running").await;
    let second = submit(&p, &jobs, "second", &latest).await;
    watch.until_pending(&second, 10.0).await;
    let third = submit(&p, &jobs, "third", &latest).await;
    let superseded = p.wait_terminal(&second).await;
    assert_eq!(superseded["status"], "cancelled", "{superseded}");
    assert_eq!(superseded["cancel_reason"], "superseded", "{superseded}");
    assert_eq!(superseded["superseded_by"], third.as_str());
    watch.until_not_pending(&second, 2.0).await;
    assert_eq!(p.job(&first).await["status"], "running", "the running job is kept");
    for id in [&first, &third] {
        let job = p.wait_terminal(id).await;
        assert_eq!(job["status"], "done", "{job}");
    }
    assert!(watch.of(&second).ran.is_empty(), "the superseded prompt ran: {:?}", watch.of(&second));
    assert_eq!(watch.of(&third).ran.len(), 1);
}

/// (c) A prefetched job waits in ComfyUI's queue longer than `LEASE_TTL` without losing its
/// lease: its long-polling heartbeats keep it.
async fn a_prefetched_lease_outlives_lease_ttl_while_it_waits(version: ComfyVersion) {
    let p = Pipeline::start(Setup { lease_ttl: 1.5, ..setup(version, 4.0) }).await;
    let (watch, jobs) = watched(&p).await;
    let first = submit(&p, &jobs, "first", &[]).await;
    let second = submit(&p, &jobs, "second", &[]).await;
    for id in [&first, &second] {
        let job = p.wait_terminal(id).await;
        assert_eq!(job["status"], "done", "{job}");
        assert_eq!(job["attempts"], 1, "no lease lapsed: {job}");
    }
    let (first_seen, last_seen) = watch.of(&second).pending.expect("the second job was prefetched");
    assert!(
        last_seen - first_seen > Duration::from_secs_f64(1.5 * 1.5),
        "it waited {:?} in ComfyUI's queue, not longer than LEASE_TTL",
        last_seen - first_seen
    );
    assert_eq!(watch.of(&second).ran.len(), 1);
}

/// (d) A worker stopping with a prefetched job hands it back without costing an attempt, takes
/// its prompt out of ComfyUI's queue, and the job runs exactly once afterwards, on the next
/// worker.
async fn a_stopping_worker_hands_its_prefetched_job_back(version: ComfyVersion) {
    let mut p = Pipeline::start(setup(version, 2.0)).await;
    let (watch, jobs) = watched(&p).await;
    let first = submit(&p, &jobs, "first", &[]).await;
    let second = submit(&p, &jobs, "second", &[]).await;
    watch.until_pending(&second, 10.0).await;
    let mut worker = p.workers.pop().unwrap();
    worker.stop().await;
    let handed = p.job(&second).await;
    assert_eq!(handed["status"], "queued", "{handed}");
    assert_eq!(handed["attempts"], 0, "handing back costs no attempt: {handed}");
    watch.until_not_pending(&second, 2.0).await;
    assert!(watch.of(&second).ran.is_empty(), "its prompt did not run under the stopped worker");
    let next = p.start_worker("worker-2").await;
    p.workers.push(next);
    for id in [&first, &second] {
        let job = p.wait_terminal(id).await;
        assert_eq!(job["status"], "done", "{job}");
    }
    assert_eq!(p.job(&second).await["attempts"], 1);
    assert_eq!(watch.of(&second).ran.len(), 1, "it ran exactly once");
}

/// (d) A worker killed outright with a prefetched job: the job is run again once its lease
/// lapses and is delivered exactly once.
async fn a_killed_worker_s_prefetched_job_is_delivered_once(version: ComfyVersion) {
    let mut p = Pipeline::start(Setup { lease_ttl: 3.0, ..setup(version, 1.0) }).await;
    let (watch, jobs) = watched(&p).await;
    let first = submit(&p, &jobs, "first", &[]).await;
    let second = submit(&p, &jobs, "second", &[]).await;
    watch.until_pending(&second, 10.0).await;
    let mut worker = p.workers.pop().unwrap();
    worker.kill().await;
    let next = p.start_worker("worker-2").await;
    p.workers.push(next);
    for id in [&first, &second] {
        let job = p.wait_terminal(id).await;
        assert_eq!(job["status"], "done", "{job}");
        let (_, result) = p.result(id).await;
        assert!(!result.is_empty());
    }
    // One more attempt each at most: the killed worker's leases lapsed once.
    assert!(p.job(&second).await["attempts"].as_u64().unwrap() <= 2);
}

on_both_profiles!(
    the_next_prompt_waits_in_comfyuis_queue_before_the_current_finishes,
    a_cancelled_prefetched_job_leaves_comfyuis_queue_and_never_runs,
    a_superseded_prefetched_job_leaves_comfyuis_queue_and_never_runs,
    a_prefetched_lease_outlives_lease_ttl_while_it_waits,
    a_stopping_worker_hands_its_prefetched_job_back,
    a_killed_worker_s_prefetched_job_is_delivered_once,
);

/// With `PREFETCH=0` the worker leases the next job only after the last was delivered: no
/// prompt ever waits in ComfyUI's queue.
#[tokio::test]
async fn prefetch_0_keeps_comfyuis_queue_empty() {
    let p = Pipeline::start(Setup { prefetch: 0, ..setup(ComfyVersion::V0_38, 0.8) }).await;
    let (watch, jobs) = watched(&p).await;
    let first = submit(&p, &jobs, "first", &[]).await;
    let second = submit(&p, &jobs, "second", &[]).await;
    for id in [&first, &second] {
        assert_eq!(p.wait_terminal(id).await["status"], "done");
    }
    assert!(watch.of(&second).pending.is_none(), "{:?}", watch.of(&second));
}
