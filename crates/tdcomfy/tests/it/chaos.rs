//! The chaos run's CI form: `tdcomfy bench chaos --short` SIGKILLs and restarts the broker (down
//! longer than LEASE_TTL), the worker (mid-prompt and mid-delivery) and the simulator twice each
//! while three clients submit, follow and verify jobs — on one broker (SQLite), and on three
//! brokers sharing PostgreSQL and a bucket. Its figures are what a user would read.

use std::time::{Duration, Instant};

/// The number printed after `label` on the report line that starts with it.
fn figure(report: &str, label: &str) -> usize {
    let line = report
        .lines()
        .map(str::trim_start)
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in the report:\n{report}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number on {line:?}"))
}

#[tokio::test]
async fn chaos_short_loses_nothing_leaves_nothing_stuck_and_returns_only_right_results() {
    let report = chaos_short(&[], &[]).await;
    assert_eq!(figure(&report, "jobs no worker/simulator fault hit, run twice"), 0, "{report}");
}

/// The same run on the several-brokers topology: three `tdcomfy serve` on one PostgreSQL database
/// and one S3 bucket (moto; a shared directory without it), the broker fault killing one of them.
/// On top of the one-broker figures, no job is run twice because of a broker's death.
#[tokio::test]
async fn chaos_short_on_three_brokers_over_postgres_loses_nothing_and_a_broker_kill_runs_nothing_twice() {
    let Some(db) = crate::pg::TestDb::create("chaos").await else { return };
    let moto = crate::process::Moto::start("chaos").await;
    let mut args = vec!["--brokers".to_owned(), "3".to_owned(), "--database-url".to_owned(), db.url.clone()];
    let mut env = Vec::new();
    if let Some(moto) = &moto {
        args.extend(["--storage-url".to_owned(), "s3://chaos/run".to_owned()]);
        env = moto.env();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = chaos_short(&args, &env).await;
    assert!(report.contains("3 brokers on one PostgreSQL database"), "{report}");
    assert_eq!(figure(&report, "jobs no worker/simulator fault hit, run twice"), 0, "{report}");
}

/// Runs `tdcomfy bench chaos --short` with `extra` arguments, checks the figures every topology
/// must show, and returns the report.
async fn chaos_short(extra: &[&str], env: &[(&str, String)]) -> String {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tdcomfy"));
    cmd.args(["bench", "chaos", "--short"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "warn")
        .env_remove("API_TOKEN")
        .env_remove("WORKER_TOKEN")
        .env_remove("TDCOMFY_CONFIG")
        .kill_on_drop(true);
    // The run bounds itself (faults, then at most 40 s to settle); this is the backstop.
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("the chaos run ends by itself")
        .expect("tdcomfy runs");
    let report = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}\n{stderr}\nchaos --short took {:.1} s", started.elapsed().as_secs_f64());

    for fault in [
        "faults: broker SIGKILL (down > LEASE_TTL)",
        "faults: worker SIGKILL mid-prompt",
        "faults: worker SIGKILL mid-delivery",
        "faults: simulator SIGKILL (queue+history lost)",
    ] {
        assert_eq!(figure(&report, fault), 2, "{fault}");
    }
    let accepted = figure(&report, "jobs accepted");
    assert!(accepted >= 5, "too few jobs to mean anything: {accepted}");
    assert_eq!(figure(&report, "lost (accepted, then 404)"), 0, "lost jobs");
    assert_eq!(figure(&report, "forgotten (ended, then 404 or another state)"), 0, "forgotten jobs");
    assert_eq!(figure(&report, "stuck (not ended 40 s after the last fault)"), 0, "stuck jobs");
    assert_eq!(figure(&report, "wrong results (missing, not the inverse, not byte-identical)"), 0, "wrong results");
    let done = figure(&report, "done");
    let error = figure(&report, "error");
    let cancelled = figure(&report, "cancelled");
    assert_eq!(done + error + cancelled, accepted, "every accepted job ended");
    assert!(out.status.success(), "chaos run failed: {}", out.status);
    report.into_owned()
}
