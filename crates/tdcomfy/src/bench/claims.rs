//! `tdcomfy bench claims`: store claim throughput, SQLite against PostgreSQL with several store
//! handles (as separate brokers) claiming from one database at once.

use std::collections::HashSet;
use std::time::Instant;

use anyhow::Context;
use tdcomfy_api::{InputInfo, JobId, ResultInfo, StreamMode};
use tdcomfy_broker::clock::Clock;
use tdcomfy_broker::store::{DatabaseUrl, InsertOutcome, NewJob, Store, postgres};

/// Options of the claims benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct ClaimsBenchArgs {
    /// A PostgreSQL server (a user that may create databases): the benchmark creates a scratch
    /// database there and drops it after. Unset: SQLite only.
    #[arg(long, env = "TDCOMFY_BENCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Jobs claimed per run.
    #[arg(long, default_value_t = 2000)]
    pub jobs: usize,
    /// Store handles on PostgreSQL (each is what one broker has).
    #[arg(long, default_value_t = 3)]
    pub handles: usize,
    /// Concurrent claim loops (spread over the handles), each claiming and completing.
    #[arg(long, default_value_t = 12)]
    pub tasks: usize,
}

fn job(i: usize) -> NewJob {
    NewJob {
        id: JobId::new(),
        prompt: "bench".into(),
        negative_prompt: String::new(),
        seed: None,
        workflow: "bench".into(),
        params: serde_json::Map::new(),
        input: InputInfo { content_type: "image/png".into(), size: 1, width: 1, height: 1 },
        idempotency: None,
        // A third anonymous, the rest over 16 named streams: both claim paths.
        stream: if i.is_multiple_of(3) { String::new() } else { format!("s{}", i % 16) },
        mode: StreamMode::Queue,
        preempt: false,
        previews: false,
        dedupe_key: None,
        dedupe: false,
        reuse: None,
    }
}

/// Fills the queue through `handles`, then runs `tasks` claim-and-complete loops until it is
/// empty; prints inserts/s and claims/s, and fails if a job was leased twice or not at all.
async fn one_run(label: &str, handles: Vec<Store>, args: &ClaimsBenchArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut fills = Vec::new();
    for (h, store) in handles.iter().enumerate() {
        let (store, n, count) = (store.clone(), args.jobs, handles.len());
        fills.push(tokio::spawn(async move {
            for i in (h..n).step_by(count) {
                match store.insert(job(i)).await? {
                    InsertOutcome::Created(_) => {}
                    other => anyhow::bail!("unexpected {other:?}"),
                }
            }
            anyhow::Ok(())
        }));
    }
    for f in fills {
        f.await??;
    }
    let insert_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut loops = Vec::new();
    for k in 0..args.tasks {
        let store = handles[k % handles.len()].clone();
        loops.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(r) = store.claim_next(format!("w{k}"), 60_000, None).await? {
                let token = r.lease.as_ref().context("a claimed job has a lease")?.token.clone();
                store.complete(r.id, token, ResultInfo { content_type: "video/mp4".into(), size: 1 }, None).await?;
                mine.push(r.id);
            }
            anyhow::Ok(mine)
        }));
    }
    let mut all = Vec::new();
    for l in loops {
        all.extend(l.await??);
    }
    let secs = t.elapsed().as_secs_f64();
    let distinct: HashSet<JobId> = all.iter().copied().collect();
    anyhow::ensure!(distinct.len() == all.len(), "{label}: a job was leased twice");
    anyhow::ensure!(all.len() == args.jobs, "{label}: {} of {} jobs leased", all.len(), args.jobs);
    println!(
        "{label:<36} inserts {:>7.0} /s   claim+complete {:>7.0} /s   ({} jobs, {} handles, {} claim loops)",
        args.jobs as f64 / insert_secs,
        all.len() as f64 / secs,
        args.jobs,
        handles.len(),
        args.tasks
    );
    Ok(())
}

/// `tdcomfy bench claims`.
pub async fn run(args: ClaimsBenchArgs) -> anyhow::Result<()> {
    let dir = super::TempDir::new("tdcomfy-bench-claims")?;
    let sqlite = Store::open(&dir.0.join("jobs.sqlite3"), Clock::system())?;
    one_run("sqlite (one broker)", vec![sqlite], &args).await?;
    let Some(url) = &args.database_url else {
        println!("postgres: skipped (set --database-url or TDCOMFY_BENCH_DATABASE_URL)");
        return Ok(());
    };
    let admin = DatabaseUrl::parse(url).map_err(|e| anyhow::anyhow!("--database-url {e}"))?;
    let name = format!("tdcomfy_bench_{}", uuid::Uuid::new_v4().simple());
    let db = postgres::create_database(&admin, &name).await?;
    let outcome = async {
        for handles in [1, args.handles] {
            let mut stores = Vec::new();
            for _ in 0..handles {
                stores.push(Store::connect(&db, Clock::system(), uuid::Uuid::new_v4().simple().to_string()).await?);
            }
            one_run(&format!("postgres ({handles} broker handles)"), stores, &args).await?;
        }
        anyhow::Ok(())
    }
    .await;
    postgres::drop_database(&admin, &name).await?;
    outcome
}
