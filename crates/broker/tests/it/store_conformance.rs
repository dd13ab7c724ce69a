//! The store conformance suite: one set of tests of the `Store` interface, each run on both
//! engines (`<test>::sqlite` and `<test>::postgres`), so the two cannot drift apart; and the
//! PostgreSQL-only tests of what several brokers sharing one database must never see.
//!
//! PostgreSQL tests need `TDCOMFY_TEST_DATABASE_URL` (each creates its own database); without it
//! they print `SKIPPED` and pass, unless `TDCOMFY_REQUIRE_POSTGRES=1`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tdcomfy_api::{InputInfo, JobEventKind, JobId, JobStatus, LeaseToken, Progress, ResultInfo, StreamMode, Timestamp};
use tdcomfy_broker::clock::Clock;
use tdcomfy_broker::store::{
    ClusterNote, DatabaseUrl, InsertOutcome, JobRecord, NewJob, ResultState, Reuse, Store, StoreError,
};

use crate::helpers::TestDb;

/// Where a test's stores live: a SQLite file or a PostgreSQL database. `open` gives another
/// handle on the same data (another broker, on PostgreSQL), with its own clock.
enum Engine {
    Sqlite(tempfile::TempDir),
    Postgres(TestDb),
}

impl Engine {
    async fn sqlite() -> Option<Engine> {
        Some(Engine::Sqlite(tempfile::tempdir().unwrap()))
    }

    async fn postgres(test: &str) -> Option<Engine> {
        TestDb::create(test).await.map(Engine::Postgres)
    }

    /// A handle whose clock runs `offset_ms` ahead of the system clock (a stepped clock).
    async fn open_at(&self, offset_ms: i64) -> Store {
        let clock = Clock::from_wall(Arc::new(move || Timestamp::now().millis() + offset_ms));
        match self {
            Engine::Sqlite(dir) => Store::open(&dir.path().join("jobs.sqlite3"), clock).unwrap(),
            Engine::Postgres(db) => {
                let url = DatabaseUrl::parse(&db.url).unwrap();
                Store::connect(&url, clock, uuid::Uuid::new_v4().simple().to_string()).await.unwrap()
            }
        }
    }

    async fn open(&self) -> Store {
        self.open_at(0).await
    }
}

/// Generates `mod <test> { sqlite, postgres }` for each engine-neutral test `async fn <test>(Engine)`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(e) = super::Engine::sqlite().await {
                    super::$name(e).await
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(e) = super::Engine::postgres(stringify!($name)).await {
                    super::$name(e).await
                }
            }
        }
    )*};
}

/// Generates `mod <test> { postgres }` for a PostgreSQL-only test.
macro_rules! on_postgres {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(db) = crate::helpers::TestDb::create(stringify!($name)).await {
                    super::$name(super::Engine::Postgres(db)).await
                }
            }
        }
    )*};
}

on_both_engines!(
    insert_reads_back_every_field,
    idempotency_keys_replay_or_conflict,
    lease_lifecycle_and_token_checks,
    failures_requeue_count_and_give_up,
    cancel_queued_running_and_finished,
    lapsed_leases_requeue_then_fail_on_a_stepped_clock,
    timeout_and_restart_grace,
    restart_gives_every_running_lease_one_ttl,
    positions_equal_the_claim_order,
    latest_supersedes_and_preempts,
    requeue_of_a_superseded_latest_job_cancels_it,
    dedupe_reuses_at_insert_and_at_claim,
    prefetch_holds_the_stream_until_started,
    release_unreceived_undoes_a_claim,
    workflow_filter_and_peek,
    retention_and_file_flags,
    forgetting_turns_keeps_the_order,
);

on_postgres!(
    concurrent_claims_lease_each_job_once,
    concurrent_expire_sweeps_requeue_once,
    concurrent_latest_submits_leave_one_waiting,
    concurrent_duplicate_keys_store_one_job,
    notes_reach_other_handles_not_their_own,
    expire_sweep_continues_past_an_unreadable_id,
    repeated_cancel_is_announced_again,
    locks_held_by_a_stuck_session_fail_calls_cleanly,
    a_role_without_create_opens_a_current_schema,
    a_heartbeat_that_waited_on_a_lock_gets_a_full_lease,
    a_burst_into_one_stream_leaves_the_pool_to_others,
    lost_listen_connection_reports_missed,
    schema_migrates_once_and_newer_is_refused,
    positions_on_another_handle_follow_each_change,
    a_prefetched_job_starting_wakes_other_brokers,
);

fn new_job(stream: &str) -> NewJob {
    NewJob {
        id: JobId::new(),
        prompt: "a prompt".into(),
        negative_prompt: String::new(),
        seed: None,
        workflow: "w".into(),
        params: serde_json::Map::new(),
        input: InputInfo { content_type: "image/png".into(), size: 10, width: 8, height: 8 },
        idempotency: None,
        stream: stream.into(),
        mode: StreamMode::Queue,
        preempt: false,
        previews: false,
        dedupe_key: None,
        dedupe: false,
        reuse: None,
    }
}

async fn created(store: &Store, job: NewJob) -> JobRecord {
    match store.insert(job).await.unwrap() {
        InsertOutcome::Created(ins) => ins.record,
        other => panic!("expected a new job, got {other:?}"),
    }
}

async fn add(store: &Store, stream: &str) -> JobRecord {
    created(store, new_job(stream)).await
}

async fn claim(store: &Store) -> Option<JobRecord> {
    store.claim_next("w1".into(), 60_000, None).await.unwrap()
}

fn token(r: &JobRecord) -> LeaseToken {
    r.lease.as_ref().expect("leased").token.clone()
}

fn png() -> ResultInfo {
    ResultInfo { content_type: "video/mp4".into(), size: 1234 }
}

async fn insert_reads_back_every_field(e: Engine) {
    let store = e.open().await;
    let mut job = new_job("cam");
    job.seed = Some(u64::MAX - 1);
    job.negative_prompt = "blurry".into();
    job.params.insert("strength".into(), serde_json::json!(0.5));
    job.previews = true;
    job.dedupe_key = Some("k".into());
    job.workflow = "ltxv".into();
    job.input = InputInfo { content_type: "image/webp".into(), size: 99_999, width: 4096, height: 2160 };
    let id = job.id;
    let r = created(&store, job).await;
    let got = store.get(id).await.unwrap().unwrap();
    assert_eq!(got, r, "get reads back what insert returned");
    assert_eq!(got.status, JobStatus::Queued);
    assert_eq!(got.seed, Some(u64::MAX - 1), "the full u64 range of seeds");
    assert_eq!(got.negative_prompt, "blurry");
    assert_eq!(got.params["strength"], serde_json::json!(0.5));
    assert!(got.previews && got.input_present);
    assert_eq!(got.input.width, 4096);
    assert_eq!(got.input.size, 99_999);
    assert_eq!(got.stream, "cam");
    assert_eq!(got.dedupe_key.as_deref(), Some("k"));
    assert_eq!((got.attempts, got.version), (0, 1));
    assert_eq!(got.result, ResultState::None);
    assert!(store.get(JobId::new()).await.unwrap().is_none());

    let second = add(&store, "").await;
    assert!(second.seq > got.seq, "seq grows in insertion order");
    let listed: Vec<JobId> = store.list(None, 10).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(listed, [second.id, id], "newest first");
    let running = claim(&store).await.unwrap();
    assert_eq!(running.id, id, "the oldest job of the never-served streams first");
    let queued: Vec<JobId> = store.list(Some(JobStatus::Queued), 10).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(queued, [second.id]);
    let c = store.counts().await.unwrap();
    assert_eq!((c.queued, c.running, c.done, c.error, c.cancelled), (1, 1, 0, 0, 0));
    assert_eq!(store.queued_count().await.unwrap(), 1);
}

async fn idempotency_keys_replay_or_conflict(e: Engine) {
    let store = e.open().await;
    let mut job = new_job("");
    job.idempotency = Some(("key-1".into(), "fp-a".into()));
    let first = created(&store, job.clone()).await;
    assert!(store.knows_idempotency_key("key-1".into()).await.unwrap());
    assert!(!store.knows_idempotency_key("key-2".into()).await.unwrap());
    let mut again = job.clone();
    again.id = JobId::new();
    match store.insert(again).await.unwrap() {
        InsertOutcome::Replayed(r) => assert_eq!(r.id, first.id, "the original job answers"),
        other => panic!("{other:?}"),
    }
    let mut different = job.clone();
    different.id = JobId::new();
    different.idempotency = Some(("key-1".into(), "fp-b".into()));
    assert!(matches!(store.insert(different).await.unwrap(), InsertOutcome::KeyConflict));
    assert_eq!(store.counts().await.unwrap().queued, 1, "neither repeat stored a job");
}

async fn lease_lifecycle_and_token_checks(e: Engine) {
    let store = e.open().await;
    let queued = add(&store, "").await;
    let r = claim(&store).await.unwrap();
    assert_eq!((r.id, r.status, r.attempts), (queued.id, JobStatus::Running, 1));
    assert!(r.version > queued.version, "the claim bumps the version");
    let lease = r.lease.clone().unwrap();
    assert_eq!(lease.owner, "w1");
    assert!(lease.expires_at.unwrap().millis() > Timestamp::now().millis() + 50_000);
    assert!(claim(&store).await.is_none(), "nothing else queued");

    let wrong = LeaseToken::new();
    assert!(matches!(
        store.heartbeat(r.id, wrong.clone(), None, 60_000, false).await,
        Err(StoreError::LeaseLost { .. })
    ));
    assert!(matches!(store.check_lease(r.id, &wrong).await, Err(StoreError::LeaseLost { .. })));
    assert!(matches!(store.heartbeat(JobId::new(), wrong, None, 60_000, false).await, Err(StoreError::NotFound)));

    let p = Progress { value: 0.5, step: Some(5), max_steps: Some(10), ..Progress::default() };
    let hb = store.heartbeat(r.id, token(&r), Some(p.clone()), 60_000, false).await.unwrap();
    let changed = hb.changed.expect("new progress is a change");
    assert!(!hb.cancelled);
    assert_eq!(changed.progress, p);
    assert_eq!(changed.version, r.version + 1);
    let same = store.heartbeat(r.id, token(&r), Some(p.clone()), 60_000, false).await.unwrap();
    assert!(same.changed.is_none(), "the same progress again is no change");
    assert_eq!(store.get(r.id).await.unwrap().unwrap().version, changed.version, "a bare renewal bumps nothing");
    assert!(!store.renew_for_upload(r.id, token(&r), 60_000).await.unwrap());
    assert_eq!(store.check_lease(r.id, &token(&r)).await.unwrap().id, r.id);

    let (done, first) = store.complete(r.id, token(&r), png(), Some(777)).await.unwrap();
    assert!(first);
    assert_eq!(done.status, JobStatus::Done);
    assert_eq!(done.result, ResultState::Present(png()));
    assert_eq!(done.comfy_execution_ms, Some(777));
    assert_eq!(done.progress.value, 1.0);
    assert!(done.finished_at.is_some());
    assert_eq!(done.lease.as_ref().unwrap().expires_at, None, "the lease ends with the job");
    let (again, changed) = store.complete(r.id, token(&r), png(), Some(777)).await.unwrap();
    assert!(!changed, "a repeated upload changes nothing");
    assert_eq!(again.version, done.version);
    assert!(matches!(store.check_lease(r.id, &token(&r)).await, Err(StoreError::AlreadyDone)));
    assert!(matches!(
        store.fail(r.id, token(&r), "late".into(), true, false, 3).await,
        Err(StoreError::LeaseLost { status: JobStatus::Done })
    ));
    assert!(matches!(
        store.heartbeat(r.id, token(&r), None, 60_000, false).await,
        Err(StoreError::LeaseLost { status: JobStatus::Done })
    ));
    let c = store.counts().await.unwrap();
    assert_eq!((c.queued, c.running, c.done), (0, 0, 1));
}

async fn failures_requeue_count_and_give_up(e: Engine) {
    let store = e.open().await;
    let job = add(&store, "").await;
    // Retryable with attempts left: back in the queue, the attempt counted.
    let r = claim(&store).await.unwrap();
    let (back, changed) = store.fail(r.id, token(&r), "oom".into(), true, false, 2).await.unwrap();
    assert!(changed);
    assert_eq!((back.status, back.attempts), (JobStatus::Queued, 1));
    assert!(back.lease.is_none() && back.started_at.is_none());
    assert!(matches!(
        store.fail(r.id, token(&r), "oom".into(), true, false, 2).await,
        Err(StoreError::LeaseLost { status: JobStatus::Queued })
    ));
    // A worker handing the job back: not counted.
    let r = claim(&store).await.unwrap();
    assert_eq!(r.attempts, 2);
    let (back, _) = store.fail(r.id, token(&r), "stopping".into(), true, true, 2).await.unwrap();
    assert_eq!((back.status, back.attempts), (JobStatus::Queued, 1));
    // Attempts used up: an error that says so.
    let r = claim(&store).await.unwrap();
    assert_eq!(r.attempts, 2);
    let (failed, _) = store.fail(r.id, token(&r), "oom".into(), true, false, 2).await.unwrap();
    assert_eq!(failed.status, JobStatus::Error);
    assert_eq!(failed.error_message.as_deref(), Some("oom (gave up after 2 attempts)"));
    let (repeat, changed) = store.fail(r.id, token(&r), "oom".into(), true, false, 2).await.unwrap();
    assert!(!changed && repeat.version == failed.version, "a repeated report changes nothing");
    // Not retryable: an error at once, with the worker's message.
    let other = add(&store, "").await;
    let r = claim(&store).await.unwrap();
    assert_eq!(r.id, other.id);
    let (failed, _) = store.fail(r.id, token(&r), "bad workflow".into(), false, false, 5).await.unwrap();
    assert_eq!((failed.status, failed.error_message.as_deref()), (JobStatus::Error, Some("bad workflow")));
    assert_eq!(store.counts().await.unwrap().error, 2);
    assert_eq!(job.id, store.get(job.id).await.unwrap().unwrap().id);
}

async fn cancel_queued_running_and_finished(e: Engine) {
    let store = e.open().await;
    let queued = add(&store, "").await;
    let out = store.cancel(queued.id).await.unwrap();
    assert!(out.changed);
    assert_eq!((out.previous, out.record.status), (JobStatus::Queued, JobStatus::Cancelled));
    assert_eq!(out.record.cancel_reason.as_deref(), Some("cancelled"));
    assert!(!out.record.input_present, "files are marked gone in the same transaction");
    let again = store.cancel(queued.id).await.unwrap();
    assert!(!again.changed, "a repeat changes nothing");
    assert!(matches!(store.cancel(JobId::new()).await, Err(StoreError::NotFound)));

    add(&store, "").await;
    let r = claim(&store).await.unwrap();
    let out = store.cancel(r.id).await.unwrap();
    assert_eq!((out.previous, out.record.status), (JobStatus::Running, JobStatus::Cancelled));
    let hb = store.heartbeat(r.id, token(&r), None, 60_000, false).await.unwrap();
    assert!(hb.cancelled, "the worker's next heartbeat learns of the cancel");
    assert!(store.renew_for_upload(r.id, token(&r), 60_000).await.unwrap());
    assert!(matches!(store.complete(r.id, token(&r), png(), None).await, Err(StoreError::Cancelled)));
    assert!(matches!(store.check_lease(r.id, &token(&r)).await, Err(StoreError::Cancelled)));

    add(&store, "").await;
    let r = claim(&store).await.unwrap();
    let (done, _) = store.complete(r.id, token(&r), png(), None).await.unwrap();
    let out = store.cancel(done.id).await.unwrap();
    assert!(out.changed);
    assert_eq!(out.record.status, JobStatus::Done, "a finished job stays finished");
    assert_eq!(out.record.result, ResultState::Deleted);
    assert!(!out.record.input_present);
    assert!(!store.cancel(done.id).await.unwrap().changed);
    let c = store.counts().await.unwrap();
    assert_eq!((c.queued, c.running, c.done, c.cancelled), (0, 0, 1, 2));
}

async fn lapsed_leases_requeue_then_fail_on_a_stepped_clock(e: Engine) {
    let store = e.open().await;
    let job = add(&store, "").await;
    let r = store.claim_next("w1".into(), 1_000, None).await.unwrap().unwrap();
    assert!(store.expire_leases(2).await.unwrap().changed.is_empty(), "a live lease is left alone");
    // Ten seconds later (another handle on a clock stepped ahead: the lease lapsed).
    drop(store);
    let later = e.open_at(10_000).await;
    let swept = later.expire_leases(2).await.unwrap();
    assert_eq!(swept.changed.iter().map(|r| r.id).collect::<Vec<_>>(), [job.id]);
    assert_eq!(swept.changed[0].status, JobStatus::Queued);
    assert!(swept.failed.is_empty());
    assert!(matches!(
        later.heartbeat(r.id, token(&r), None, 1_000, false).await,
        Err(StoreError::LeaseLost { status: JobStatus::Queued })
    ));
    let r2 = later.claim_next("w2".into(), 1_000, None).await.unwrap().unwrap();
    assert_eq!(r2.attempts, 2);
    drop(later);
    let much_later = e.open_at(20_000).await;
    let swept = much_later.expire_leases(2).await.unwrap();
    assert_eq!(swept.changed.len(), 1);
    assert_eq!(swept.changed[0].status, JobStatus::Error);
    assert_eq!(
        swept.changed[0].error_message.as_deref(),
        Some("worker lost: its lease expired without a heartbeat on all 2 attempts")
    );
    assert!(much_later.expire_leases(2).await.unwrap().changed.is_empty(), "swept once");
}

async fn timeout_and_restart_grace(e: Engine) {
    let store = e.open().await;
    add(&store, "").await;
    // A 1 s lease: it lapses while the broker is down (its worker's heartbeats failed).
    let r = store.claim_next("w1".into(), 1_000, None).await.unwrap().unwrap();
    assert!(store.time_out_running(5_000).await.unwrap().changed.is_empty());
    drop(store);
    // The broker restarts 6 s later: the attempt's time ran out meanwhile, but it gets one lease
    // to report; once that lease is over too, it times out.
    let restarted = e.open_at(6_000).await;
    assert_eq!(restarted.resume_running(2_000, 5_000).await.unwrap(), 1);
    assert!(restarted.time_out_running(5_000).await.unwrap().changed.is_empty(), "within the grace");
    let resumed = restarted.get(r.id).await.unwrap().unwrap();
    assert!(resumed.lease.unwrap().expires_at.unwrap().millis() > Timestamp::now().millis() + 6_000);
    drop(restarted);
    let after_grace = e.open_at(9_000).await;
    let swept = after_grace.time_out_running(5_000).await.unwrap();
    assert_eq!(swept.changed.len(), 1);
    assert_eq!(swept.changed[0].status, JobStatus::Error);
    assert_eq!(swept.changed[0].error_message.as_deref(), Some("timed out: the job ran longer than JOB_TIMEOUT (5 s)"));
    assert!(after_grace.time_out_running(5_000).await.unwrap().changed.is_empty());
}

async fn positions_equal_the_claim_order(e: Engine) {
    let store = e.open().await;
    // Serve b then a, so a has the older turn... then queue several jobs on several streams.
    add(&store, "b").await;
    claim(&store).await.unwrap();
    add(&store, "a").await;
    claim(&store).await.unwrap();
    let mut queued = Vec::new();
    for s in ["a", "a", "b", "", "c", "a", "", "c", "b", "d"] {
        queued.push(add(&store, s).await);
    }
    let mut by_position = Vec::new();
    for r in &queued {
        by_position.push((store.queue_position(&r.stream, r.seq).await.unwrap(), r.id));
    }
    // The batch of a job list answers the same, in the order asked, 0 for a job not queued.
    let mut asked: Vec<(String, i64)> = queued.iter().rev().map(|r| (r.stream.clone(), r.seq)).collect();
    asked.push(("a".to_owned(), -1));
    let mut expected: Vec<u64> = by_position.iter().rev().map(|p| p.0).collect();
    expected.push(0);
    assert_eq!(store.queue_positions(&asked).await.unwrap(), expected);
    assert!(store.queue_positions(&[]).await.unwrap().is_empty());
    let positions: HashSet<u64> = by_position.iter().map(|p| p.0).collect();
    assert_eq!(positions, (1..=queued.len() as u64).collect(), "positions are 1..=n, each once: {by_position:?}");
    by_position.sort();
    let predicted: Vec<JobId> = by_position.into_iter().map(|p| p.1).collect();
    let mut claimed = Vec::new();
    while let Some(r) = claim(&store).await {
        claimed.push(r.id);
        // The running jobs of named streams do not hold them back (no prefetch): finish each.
        store.complete(r.id, token(&r), png(), None).await.unwrap();
    }
    assert_eq!(claimed, predicted, "the claims take the jobs in the order of their positions");
    assert_eq!(store.queue_position("a", queued[0].seq).await.unwrap(), 0, "not queued: no position");
}

async fn latest_supersedes_and_preempts(e: Engine) {
    let store = e.open().await;
    let mut first = new_job("cam");
    first.mode = StreamMode::Latest;
    let first = created(&store, first).await;
    let running = claim(&store).await.unwrap();
    assert_eq!(running.id, first.id);
    let mut second = new_job("cam");
    second.mode = StreamMode::Latest;
    let second = created(&store, second).await;
    let mut third = new_job("cam");
    third.mode = StreamMode::Latest;
    let third_id = third.id;
    let InsertOutcome::Created(ins) = store.insert(third).await.unwrap() else { panic!() };
    assert_eq!(ins.superseded.len(), 1, "the queued one goes, the running one finishes");
    let (gone, before) = &ins.superseded[0];
    assert_eq!((gone.id, *before, gone.status), (second.id, JobStatus::Queued, JobStatus::Cancelled));
    assert_eq!(gone.cancel_reason.as_deref(), Some("superseded"));
    assert_eq!(gone.superseded_by, Some(third_id));
    assert_eq!(store.get(first.id).await.unwrap().unwrap().status, JobStatus::Running);
    let mut fourth = new_job("cam");
    fourth.mode = StreamMode::Latest;
    fourth.preempt = true;
    let InsertOutcome::Created(ins) = store.insert(fourth).await.unwrap() else { panic!() };
    let mut gone: Vec<(JobId, JobStatus)> = ins.superseded.iter().map(|(r, s)| (r.id, *s)).collect();
    gone.sort_by_key(|g| g.0.to_string());
    let mut expected = vec![(first.id, JobStatus::Running), (third_id, JobStatus::Queued)];
    expected.sort_by_key(|g| g.0.to_string());
    assert_eq!(gone, expected, "preempt cancels the running one too");
    assert_eq!(store.queued_count().await.unwrap(), 1);
    assert!(store.heartbeat(first.id, token(&running), None, 60_000, false).await.unwrap().cancelled);
    // Another stream is untouched.
    let other = add(&store, "other").await;
    let mut fifth = new_job("cam");
    fifth.mode = StreamMode::Latest;
    created(&store, fifth).await;
    assert_eq!(store.get(other.id).await.unwrap().unwrap().status, JobStatus::Queued);
}

async fn requeue_of_a_superseded_latest_job_cancels_it(e: Engine) {
    let store = e.open().await;
    let mut a = new_job("cam");
    a.mode = StreamMode::Latest;
    let a = created(&store, a).await;
    let r = claim(&store).await.unwrap();
    let mut b = new_job("cam");
    b.mode = StreamMode::Latest;
    let b = created(&store, b).await;
    let (after, _) = store.fail(r.id, token(&r), "oom".into(), true, false, 3).await.unwrap();
    assert_eq!(after.id, a.id);
    assert_eq!(after.status, JobStatus::Cancelled, "requeued behind a newer scene it would be stale");
    assert_eq!(after.superseded_by, Some(b.id));
    assert_eq!(store.queued_count().await.unwrap(), 1);
}

async fn dedupe_reuses_at_insert_and_at_claim(e: Engine) {
    let store = e.open().await;
    let mut first = new_job("cam");
    first.dedupe_key = Some("same".into());
    first.dedupe = true;
    let first = created(&store, first).await;
    let r = claim(&store).await.unwrap();
    // Its twin arrives while it runs: queued, and held back (it waits for this result).
    let mut twin = new_job("cam");
    twin.dedupe_key = Some("same".into());
    twin.dedupe = true;
    let twin = created(&store, twin).await;
    assert!(claim(&store).await.is_none(), "a dedupe twin of the running job is not claimed");
    store.complete(r.id, token(&r), png(), None).await.unwrap();
    let last = store.last_done_in_stream("cam".into()).await.unwrap();
    assert_eq!(last, Some((first.id, Some("same".into()), true)));
    let claimed = claim(&store).await.unwrap();
    assert_eq!((claimed.id, claimed.attempts), (twin.id, 1));
    let reuse = Reuse { from: first.id, result: png() };
    let done = store.complete_reused(twin.id, token(&claimed), reuse.clone()).await.unwrap().unwrap();
    assert_eq!((done.status, done.reused_from, done.attempts), (JobStatus::Done, Some(first.id), 0));
    assert!(!done.input_present);
    // At insert: a third job with the key is stored done at once.
    let mut third = new_job("cam");
    third.dedupe_key = Some("same".into());
    third.dedupe = true;
    third.reuse = Some(Reuse { from: twin.id, result: png() });
    let InsertOutcome::Created(ins) = store.insert(third).await.unwrap() else { panic!() };
    assert!(ins.reused);
    assert_eq!(ins.record.status, JobStatus::Done);
    // A stale reuse (not the stream's last done job any more) queues the job as usual.
    let mut fourth = new_job("cam");
    fourth.dedupe_key = Some("same".into());
    fourth.reuse = Some(Reuse { from: first.id, result: png() });
    let InsertOutcome::Created(ins) = store.insert(fourth).await.unwrap() else { panic!() };
    assert!(!ins.reused);
    assert_eq!(ins.record.status, JobStatus::Queued);
    let c = store.counts().await.unwrap();
    assert_eq!((c.queued, c.done), (1, 3));
}

async fn prefetch_holds_the_stream_until_started(e: Engine) {
    let store = e.open().await;
    let a = add(&store, "cam").await;
    let b = add(&store, "cam").await;
    let r = store.claim_next_with("w1".into(), 60_000, None, true).await.unwrap().unwrap();
    assert_eq!(r.id, a.id);
    assert!(claim(&store).await.is_none(), "the stream waits for its prefetched job to start");
    assert!(store.peek_next(None).await.unwrap().is_none());
    store.heartbeat(a.id, token(&r), None, 60_000, true).await.unwrap();
    assert_eq!(claim(&store).await.unwrap().id, b.id, "started: the next one may go");
    // A prefetched job counts as not started for a latest submit.
    let c = add(&store, "cam2").await;
    store.claim_next_with("w1".into(), 60_000, None, true).await.unwrap().unwrap();
    let mut newer = new_job("cam2");
    newer.mode = StreamMode::Latest;
    let InsertOutcome::Created(ins) = store.insert(newer).await.unwrap() else { panic!() };
    assert_eq!(ins.superseded.iter().map(|s| (s.0.id, s.1)).collect::<Vec<_>>(), [(c.id, JobStatus::Running)]);
}

async fn release_unreceived_undoes_a_claim(e: Engine) {
    let store = e.open().await;
    let job = add(&store, "").await;
    let r = claim(&store).await.unwrap();
    let expiry = r.lease.as_ref().unwrap().expires_at;
    assert!(store.release_unreceived(r.id, LeaseToken::new(), expiry).await.unwrap().is_none(), "wrong token");
    let back = store.release_unreceived(r.id, token(&r), expiry).await.unwrap().unwrap();
    assert_eq!((back.id, back.status, back.attempts), (job.id, JobStatus::Queued, 0));
    // A lease renewed since its claim has been received: left alone.
    let r = claim(&store).await.unwrap();
    let claimed_expiry = r.lease.as_ref().unwrap().expires_at;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.heartbeat(r.id, token(&r), None, 120_000, false).await.unwrap();
    assert!(store.release_unreceived(r.id, token(&r), claimed_expiry).await.unwrap().is_none());
    assert_eq!(store.get(r.id).await.unwrap().unwrap().status, JobStatus::Running);
}

async fn workflow_filter_and_peek(e: Engine) {
    let store = e.open().await;
    let mut a = new_job("");
    a.workflow = "flux".into();
    let a = created(&store, a).await;
    let mut b = new_job("");
    b.workflow = "ltxv".into();
    let b = created(&store, b).await;
    assert_eq!(store.peek_next(None).await.unwrap().as_deref(), Some("flux"));
    assert_eq!(store.peek_next(Some(vec!["ltxv".into()])).await.unwrap().as_deref(), Some("ltxv"));
    assert!(store.peek_next(Some(vec!["sdxl".into()])).await.unwrap().is_none());
    let r = store.claim_next("w".into(), 60_000, Some(vec!["ltxv".into(), "sdxl".into()])).await.unwrap().unwrap();
    assert_eq!(r.id, b.id);
    assert!(store.claim_next("w".into(), 60_000, Some(vec!["ltxv".into()])).await.unwrap().is_none());
    assert_eq!(claim(&store).await.unwrap().id, a.id);
}

async fn retention_and_file_flags(e: Engine) {
    let store = e.open().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        add(&store, "").await;
        let r = claim(&store).await.unwrap();
        store.complete(r.id, token(&r), png(), None).await.unwrap();
        ids.push(r.id);
    }
    let failed = add(&store, "").await;
    let r = claim(&store).await.unwrap();
    store.fail(r.id, token(&r), "no".into(), false, false, 1).await.unwrap();
    let cancelled = add(&store, "").await;
    store.cancel(cancelled.id).await.unwrap();
    assert!(store.files_expired(60_000).await.unwrap().is_empty(), "nothing old yet");
    let owned = store.owned_files(vec![ids[0], failed.id, cancelled.id, JobId::new()]).await.unwrap();
    assert_eq!(owned.len(), 3, "unknown ids have no entry");
    assert_eq!(owned[&ids[0]], (true, true));
    assert_eq!(owned[&failed.id], (true, false));
    assert_eq!(owned[&cancelled.id], (false, false));
    drop(store);
    let later = e.open_at(120_000).await;
    let expired: HashSet<JobId> = later.files_expired(60_000).await.unwrap().into_iter().collect();
    assert_eq!(expired, [ids[0], ids[1], ids[2], failed.id].into_iter().collect(), "cancelled files are gone already");
    let marked = later.mark_files_deleted(ids[0]).await.unwrap().unwrap();
    assert_eq!((marked.result.clone(), marked.input_present), (ResultState::Deleted, false));
    assert!(later.mark_files_deleted(ids[0]).await.unwrap().is_none(), "nothing more to record");
    assert_eq!(later.files_expired(60_000).await.unwrap().len(), 3);
    let old: HashMap<JobId, bool> = later.records_expired(60_000).await.unwrap().into_iter().collect();
    assert_eq!(old.len(), 5);
    assert!(!old[&ids[0]] && old[&ids[1]] && !old[&cancelled.id]);
    // A job still queued is never deleted, whatever the caller passes.
    let young = add(&later, "").await;
    let n = later.delete_records(vec![ids[0], ids[1], young.id], 60_000).await.unwrap();
    assert_eq!(n, 2);
    assert!(later.get(ids[0]).await.unwrap().is_none());
    assert!(later.get(young.id).await.unwrap().is_some());
    let c = later.counts().await.unwrap();
    assert_eq!((c.queued, c.done, c.error, c.cancelled), (1, 1, 1, 1), "the counts follow deletions");
    later.fill_finished_for_benchmark(100, 1_000, 10).await.unwrap();
    assert_eq!(later.counts().await.unwrap().done, 101);
    assert_eq!(later.list(None, 1000).await.unwrap().len(), 104, "benchmark rows read back as records");
}

async fn forgetting_turns_keeps_the_order(e: Engine) {
    let store = e.open().await;
    for s in ["a", "b", "c"] {
        add(&store, s).await;
        claim(&store).await.unwrap();
    }
    add(&store, "c").await;
    claim(&store).await.unwrap();
    let queued = [add(&store, "c").await, add(&store, "b").await, add(&store, "a").await];
    let mut before = Vec::new();
    for r in &queued {
        before.push(store.queue_position(&r.stream, r.seq).await.unwrap());
    }
    assert_eq!(before, [3, 2, 1], "least recently served first: a, then b, then c");
    assert_eq!(store.forget_old_turns(1).await.unwrap(), 2, "a and b are forgotten, c is kept");
    let mut after = Vec::new();
    for r in &queued {
        after.push(store.queue_position(&r.stream, r.seq).await.unwrap());
    }
    assert_eq!(after, [3, 1, 2], "forgotten streams count as never served, ordered by age");
    let mut claimed = Vec::new();
    while let Some(r) = claim(&store).await {
        claimed.push(r.id);
    }
    assert_eq!(claimed, [queued[1].id, queued[2].id, queued[0].id], "claims follow the positions");
    // The counts survive the sweep's folding of their deltas.
    let c = store.counts().await.unwrap();
    assert_eq!((c.queued, c.running), (0, 7));
}

// ---- PostgreSQL only: several brokers on one database ----

async fn concurrent_claims_lease_each_job_once(e: Engine) {
    const JOBS: usize = 300;
    let handles = [e.open().await, e.open().await, e.open().await];
    for i in 0..JOBS {
        // Anonymous and named streams, so both claim paths race.
        let stream = if i % 3 == 0 { String::new() } else { format!("s{}", i % 7) };
        add(&handles[i % 3], &stream).await;
    }
    let mut tasks = Vec::new();
    for t in 0..12 {
        let store = handles[t % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(r) = store.claim_next(format!("w{t}"), 60_000, None).await.unwrap() {
                mine.push(r.id);
                // Finish it, so the named stream's next job may go.
                store.complete(r.id, token(&r), png(), None).await.unwrap();
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<JobId> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a job was leased twice");
    assert_eq!(all.len(), JOBS, "every job was leased");
    let c = handles[0].counts().await.unwrap();
    assert_eq!((c.queued, c.running, c.done), (0, 0, JOBS as u64));
    for r in handles[1].list(None, 1000).await.unwrap() {
        assert_eq!(r.attempts, 1, "job {} was claimed {} times", r.id, r.attempts);
    }
}

async fn concurrent_expire_sweeps_requeue_once(e: Engine) {
    const JOBS: usize = 120;
    let store = e.open().await;
    for _ in 0..JOBS {
        add(&store, "").await;
        store.claim_next("w".into(), 1_000, None).await.unwrap().unwrap();
    }
    let sweepers = [e.open_at(10_000).await, e.open_at(10_000).await, e.open_at(10_000).await];
    let mut tasks = Vec::new();
    for s in sweepers {
        tasks.push(tokio::spawn(async move {
            let mut changed = Vec::new();
            loop {
                let swept = s.expire_leases(3).await.unwrap();
                assert!(swept.failed.is_empty(), "{:?}", swept.failed);
                if swept.changed.is_empty() {
                    break;
                }
                changed.extend(swept.changed.into_iter().map(|r| r.id));
            }
            changed
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<JobId> = all.iter().copied().collect();
    assert_eq!((all.len(), distinct.len()), (JOBS, JOBS), "each job requeued exactly once");
    for r in store.list(None, 1000).await.unwrap() {
        assert_eq!((r.status, r.attempts), (JobStatus::Queued, 1));
        assert_eq!(r.version, 3, "insert, claim, one requeue");
    }
}

async fn concurrent_latest_submits_leave_one_waiting(e: Engine) {
    const TASKS: usize = 9;
    const EACH: usize = 15;
    let handles = [e.open().await, e.open().await, e.open().await];
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = handles[t % 3].clone();
        tasks.push(tokio::spawn(async move {
            // The most queued jobs one submit superseded: with two waiting jobs in the stream at
            // any moment, the next submit would cancel both.
            let mut most_queued_superseded = 0;
            for k in 0..EACH {
                let mut job = new_job("live");
                job.mode = StreamMode::Latest;
                let InsertOutcome::Created(ins) = store.insert(job).await.unwrap() else { panic!() };
                let queued = ins.superseded.iter().filter(|(_, before)| *before == JobStatus::Queued).count();
                most_queued_superseded = most_queued_superseded.max(queued);
                // A claim and a retryable failure now and then, so supersedes race requeues too.
                if t < 2
                    && k % 4 == 0
                    && let Some(r) = store.claim_next("w".into(), 60_000, None).await.unwrap()
                {
                    let _ = store.fail(r.id, token(&r), "retry".into(), true, false, 5).await;
                }
            }
            most_queued_superseded
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap() <= 1, "a submit found two waiting jobs in one latest stream");
    }
    let all = handles[0].list(None, 1000).await.unwrap();
    assert_eq!(all.len(), TASKS * EACH);
    let waiting: Vec<&JobRecord> =
        all.iter().filter(|r| r.status == JobStatus::Queued || r.status == JobStatus::Running).collect();
    assert_eq!(waiting.len(), 1, "one waiting job at the end: {waiting:?}");
    assert_eq!(waiting[0].id, all[0].id, "and it is the newest");
    assert!(
        all[1..].iter().all(|r| r.status == JobStatus::Cancelled && r.cancel_reason.as_deref() == Some("superseded"))
    );
}

async fn concurrent_duplicate_keys_store_one_job(e: Engine) {
    let handles = [e.open().await, e.open().await];
    let mut tasks = Vec::new();
    for k in 0..30 {
        for store in &handles {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut job = new_job(if k % 2 == 0 { "" } else { "named" });
                job.idempotency = Some((format!("key-{k}"), "fp".into()));
                (k, store.insert(job).await.unwrap())
            }));
        }
    }
    let mut by_key: HashMap<usize, Vec<InsertOutcome>> = HashMap::new();
    for t in tasks {
        let (k, out) = t.await.unwrap();
        by_key.entry(k).or_default().push(out);
    }
    for (k, outs) in by_key {
        let created: Vec<JobId> = outs
            .iter()
            .filter_map(|o| match o {
                InsertOutcome::Created(i) => Some(i.record.id),
                _ => None,
            })
            .collect();
        let replayed: Vec<JobId> = outs
            .iter()
            .filter_map(|o| match o {
                InsertOutcome::Replayed(r) => Some(r.id),
                _ => None,
            })
            .collect();
        assert_eq!(created.len(), 1, "key-{k}: {outs:?}");
        assert_eq!(replayed, created, "key-{k}: the duplicate answers with the original");
    }
    assert_eq!(handles[0].counts().await.unwrap().queued, 30);
}

/// The position `store` gives `r`, once it is `want`: within 800 ms, under the store's
/// one-second backstop for a positions snapshot, so only the change's note can make it true in
/// time (it arrives milliseconds after the commit).
async fn position_becomes(store: &Store, r: &JobRecord, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(800);
    loop {
        let got = store.queue_position(&r.stream, r.seq).await.unwrap();
        if got == want || std::time::Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

async fn positions_on_another_handle_follow_each_change(e: Engine) {
    // b reads positions between a's changes (so it holds a snapshot of the queue each time): each
    // change made through a must show in b's answers, not only the first.
    let (a, b) = (e.open().await, e.open().await);
    let jobs = [add(&a, "x").await, add(&a, "y").await, add(&a, "z").await];
    for (i, r) in jobs.iter().enumerate() {
        assert_eq!(position_becomes(&b, r, i as u64 + 1).await, i as u64 + 1);
    }
    // Through a: the head is claimed, so everything moves up by one on b.
    let head = claim(&a).await.unwrap();
    assert_eq!(head.id, jobs[0].id);
    assert_eq!(position_becomes(&b, &jobs[0], 0).await, 0, "claimed: no position");
    assert_eq!(position_becomes(&b, &jobs[1], 1).await, 1);
    assert_eq!(position_becomes(&b, &jobs[2], 2).await, 2);
    // A cancel through a moves the last one up again; b's own change shows at once.
    a.cancel(jobs[1].id).await.unwrap();
    assert_eq!(position_becomes(&b, &jobs[2], 1).await, 1);
    // A job queued through a a moment ago, asked of b at once (before a's note can have arrived):
    // b read the row as queued, so it never answers 0.
    let fresh = add(&a, "v").await;
    assert_ne!(b.queue_position(&fresh.stream, fresh.seq).await.unwrap(), 0, "a queued job has a position");
    let late = add(&b, "w").await;
    assert_eq!(b.queue_position(&late.stream, late.seq).await.unwrap(), 3, "b's own insert, at once");
}

async fn a_prefetched_job_starting_wakes_other_brokers(e: Engine) {
    // The start of a prefetched job is no event (clients saw it running all along), but it lets
    // its stream's next job be claimed: the other brokers' waiting workers must hear that.
    let (a, b) = (e.open().await, e.open().await);
    let mut heard_by_b = b.cluster_notes().unwrap();
    add(&a, "s").await;
    add(&a, "s").await;
    let r = a.claim_next_with("w".into(), 60_000, None, true).await.unwrap().unwrap();
    while let Ok(Ok(_)) = tokio::time::timeout(std::time::Duration::from_millis(300), heard_by_b.recv()).await {}
    assert!(claim(&b).await.is_none(), "the stream's second job waits for the first to start");
    let beat = a.heartbeat(r.id, token(&r), None, 60_000, true).await.unwrap();
    assert!(beat.unblocked, "this heartbeat ended the prefetch");
    assert_eq!(next_note(&mut heard_by_b).await, Some(ClusterNote::Wake));
    let again = a.heartbeat(r.id, token(&r), None, 60_000, true).await.unwrap();
    assert!(!again.unblocked, "a repeated `started` unblocks nothing");
    assert!(claim(&b).await.is_some(), "now the second job is claimable");
}

async fn next_note(rx: &mut tokio::sync::broadcast::Receiver<ClusterNote>) -> Option<ClusterNote> {
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.ok().map(|r| r.unwrap())
}

async fn notes_reach_other_handles_not_their_own(e: Engine) {
    let (a, b) = (e.open().await, e.open().await);
    let (mut heard_by_a, mut heard_by_b) = (a.cluster_notes().unwrap(), b.cluster_notes().unwrap());
    assert_ne!(a.broker_id(), b.broker_id());
    let job = add(&a, "").await;
    assert_eq!(
        next_note(&mut heard_by_b).await,
        Some(ClusterNote::Changed { id: job.id, kind: JobEventKind::Queued, version: job.version })
    );
    let r = claim(&b).await.unwrap();
    assert_eq!(
        next_note(&mut heard_by_a).await,
        Some(ClusterNote::Changed { id: job.id, kind: JobEventKind::Started, version: r.version }),
        "a hears b's claim, and its own insert was not echoed before it"
    );
    let p = Progress { value: 0.3, ..Progress::default() };
    let hb = b.heartbeat(r.id, token(&r), Some(p), 60_000, false).await.unwrap().changed.unwrap();
    assert_eq!(
        next_note(&mut heard_by_a).await,
        Some(ClusterNote::Changed { id: job.id, kind: JobEventKind::Progress, version: hb.version })
    );
    let (done, _) = b.complete(r.id, token(&r), png(), None).await.unwrap();
    assert_eq!(
        next_note(&mut heard_by_a).await,
        Some(ClusterNote::Changed { id: job.id, kind: JobEventKind::Done, version: done.version })
    );
    let out = a.cancel(job.id).await.unwrap();
    assert_eq!(
        next_note(&mut heard_by_b).await,
        Some(ClusterNote::Changed { id: job.id, kind: JobEventKind::Deleted, version: out.record.version })
    );
    // Superseded jobs are announced as cancelled, the new one as queued, in commit order.
    let mut first = new_job("live");
    first.mode = StreamMode::Latest;
    let first = created(&a, first).await;
    assert!(matches!(next_note(&mut heard_by_b).await, Some(ClusterNote::Changed { kind: JobEventKind::Queued, .. })));
    let mut second = new_job("live");
    second.mode = StreamMode::Latest;
    let second = created(&a, second).await;
    let got = [next_note(&mut heard_by_b).await, next_note(&mut heard_by_b).await];
    assert!(matches!(got[0], Some(ClusterNote::Changed { id, kind: JobEventKind::Cancelled, .. }) if id == first.id));
    assert!(matches!(got[1], Some(ClusterNote::Changed { id, kind: JobEventKind::Queued, .. }) if id == second.id));
    // Nothing of a's own came back to a.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), heard_by_a.recv()).await.is_err(),
        "own notes are not echoed"
    );
}

async fn lost_listen_connection_reports_missed(e: Engine) {
    let Engine::Postgres(db) = &e else { unreachable!() };
    let (a, b) = (e.open().await, e.open().await);
    let mut heard = b.cluster_notes().unwrap();
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let killed = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
            &[&tdcomfy_broker::store::postgres::listen::APPLICATION_NAME],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 2, "both handles' listening connections");
    assert_eq!(next_note(&mut heard).await, Some(ClusterNote::Missed), "the loss is reported once back");
    let job = add(&a, "").await;
    assert_eq!(
        next_note(&mut heard).await,
        Some(ClusterNote::Changed { id: job.id, kind: JobEventKind::Queued, version: job.version }),
        "and notes flow again"
    );
}

async fn schema_migrates_once_and_newer_is_refused(e: Engine) {
    let Engine::Postgres(db) = &e else { unreachable!() };
    // Brokers starting together on an empty database: one migrates, the others wait and find it done.
    let (a, b, c) = tokio::join!(e.open(), e.open(), e.open());
    add(&a, "").await;
    assert_eq!(b.counts().await.unwrap().queued, 1);
    assert_eq!(c.queued_count().await.unwrap(), 1);
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let versions = client.query("SELECT version FROM tdcomfy_schema", &[]).await.unwrap();
    assert_eq!(versions.len(), 1);
    client.execute("UPDATE tdcomfy_schema SET version = version + 1", &[]).await.unwrap();
    let url = DatabaseUrl::parse(&db.url).unwrap();
    let refused = Store::connect(&url, Clock::system(), "x".into()).await.err().expect("a newer schema is refused");
    assert!(refused.to_string().contains("newer than this broker understands"), "{refused}");
}

// ---- SQLite upgrades: old databases with rows in every status open with the current code ----

/// The version-1 DDL, as the first release created it.
const SQLITE_V1: &str = "
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    prompt TEXT NOT NULL, negative_prompt TEXT NOT NULL, seed INTEGER, workflow TEXT NOT NULL,
    params TEXT NOT NULL, input_content_type TEXT NOT NULL, input_size INTEGER NOT NULL,
    input_width INTEGER NOT NULL, input_height INTEGER NOT NULL, input_present INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT, lease_owner TEXT, lease_expires_at INTEGER, progress TEXT, error_message TEXT,
    result_state TEXT NOT NULL DEFAULT 'none', result_content_type TEXT, result_size INTEGER,
    comfy_execution_ms INTEGER, idempotency_key TEXT UNIQUE, request_fingerprint TEXT,
    version INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE status = 'running';
PRAGMA user_version = 1;
";

/// Versions 2 to 4 on top of version 1, as those releases migrated (the counts table and its
/// triggers, streams, the dedupe flag).
const SQLITE_V1_TO_V4: &str = "
ALTER TABLE jobs ADD COLUMN timeout_grace_until INTEGER;
CREATE INDEX jobs_with_files_by_finish ON jobs (finished_at) WHERE input_present = 1 OR result_state = 'present';
CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO job_counts (status, n) VALUES ('queued', 0), ('running', 0), ('done', 0), ('error', 0), ('cancelled', 0);
CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
    UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
END;
CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
END;
CREATE TRIGGER jobs_counted_update AFTER UPDATE OF status ON jobs WHEN OLD.status <> NEW.status BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
END;
ALTER TABLE jobs ADD COLUMN stream TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'queue';
ALTER TABLE jobs ADD COLUMN previews INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_reason TEXT;
ALTER TABLE jobs ADD COLUMN superseded_by TEXT;
ALTER TABLE jobs ADD COLUMN reused_from TEXT;
ALTER TABLE jobs ADD COLUMN dedupe_key TEXT;
CREATE INDEX jobs_waiting_by_stream ON jobs (stream, seq) WHERE status IN ('queued', 'running');
CREATE TABLE stream_turns (stream TEXT PRIMARY KEY, served INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX stream_turns_by_served ON stream_turns (served);
ALTER TABLE jobs ADD COLUMN dedupe INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_done_by_stream_seq ON jobs (stream, seq) WHERE status = 'done';
PRAGMA user_version = 4;
";

/// The ids of the rows [`old_sqlite_database`] writes: one per status.
const OLD_IDS: [(&str, &str); 5] = [
    ("queued", "00000000-0000-4000-8000-000000000001"),
    ("running", "00000000-0000-4000-8000-000000000002"),
    ("done", "00000000-0000-4000-8000-000000000003"),
    ("error", "00000000-0000-4000-8000-000000000004"),
    ("cancelled", "00000000-0000-4000-8000-000000000005"),
];

/// A database of version 1 (or 4, with `v4`) holding one job in every status, written with that
/// version's DDL and columns only.
fn old_sqlite_database(path: &std::path::Path, v4: bool, now: i64) {
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute_batch(SQLITE_V1).unwrap();
    if v4 {
        db.execute_batch(SQLITE_V1_TO_V4).unwrap();
    }
    for (status, id) in OLD_IDS {
        let running = status == "running";
        let finished = !matches!(status, "queued" | "running");
        db.execute(
            "INSERT INTO jobs (id, status, prompt, negative_prompt, seed, workflow, params, input_content_type, \
             input_size, input_width, input_height, input_present, created_at, started_at, finished_at, attempts, \
             lease_token, lease_owner, lease_expires_at, progress, error_message, result_state, \
             result_content_type, result_size, comfy_execution_ms, idempotency_key, request_fingerprint, version) \
             VALUES (?1, ?2, 'old ' || ?2, 'neg', 42, 'ltxv', '{\"strength\":0.25}', 'image/png', 10, 64, 40, ?3, \
             ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, 'fp', 3)",
            rusqlite::params![
                id,
                status,
                !finished || status == "error",
                now - 10_000,
                (running || finished).then_some(now - 9_000),
                finished.then_some(now - 1_000),
                i64::from(running || finished),
                (running || finished).then(|| format!("token-{status}")),
                (running || finished).then_some("gpu-old"),
                running.then_some(now + 60_000),
                running.then_some("{\"value\":0.5}"),
                (status == "error").then_some("boom"),
                if status == "done" { "present" } else { "none" },
                (status == "done").then_some("video/mp4"),
                (status == "done").then_some(999_i64),
                (status == "done").then_some(1234_i64),
                format!("key-{status}"),
            ],
        )
        .unwrap();
    }
    if v4 {
        db.execute_batch(
            "UPDATE jobs SET stream = 'cam', mode = 'latest', dedupe_key = 'dk', dedupe = 1 WHERE status = 'done'; \
             UPDATE jobs SET cancel_reason = 'superseded', superseded_by = '00000000-0000-4000-8000-000000000003' \
             WHERE status = 'cancelled'; \
             INSERT INTO stream_turns (stream, served) VALUES ('cam', 1);",
        )
        .unwrap();
    }
}

async fn old_sqlite_database_opens_with_every_record(v4: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite3");
    let now = Timestamp::now().millis();
    old_sqlite_database(&path, v4, now);
    let store = Store::open(&path, Clock::system()).unwrap();
    let get = |i: usize| {
        let store = store.clone();
        async move { store.get(JobId::parse(OLD_IDS[i].1).unwrap()).await.unwrap().expect("the old row reads back") }
    };
    for (i, (status, _)) in OLD_IDS.iter().enumerate() {
        let r = get(i).await;
        assert_eq!(r.status.as_str(), *status);
        assert_eq!(
            (r.prompt.as_str(), r.negative_prompt.as_str(), r.seed),
            (format!("old {status}").as_str(), "neg", Some(42))
        );
        assert_eq!(r.params["strength"], serde_json::json!(0.25));
        assert_eq!((r.input.width, r.input.height, r.input.size), (64, 40, 10));
        assert_eq!(r.version, 3);
        assert!(!r.previews);
    }
    let running = get(1).await;
    assert_eq!(running.lease.as_ref().unwrap().owner, "gpu-old");
    assert_eq!(running.progress.value, 0.5);
    let done = get(2).await;
    assert_eq!(done.result, ResultState::Present(ResultInfo { content_type: "video/mp4".into(), size: 999 }));
    assert_eq!(done.comfy_execution_ms, Some(1234));
    assert_eq!(get(3).await.error_message.as_deref(), Some("boom"));
    let cancelled = get(4).await;
    if v4 {
        assert_eq!((done.stream.as_str(), done.mode, done.dedupe), ("cam", StreamMode::Latest, true));
        assert_eq!(cancelled.superseded_by, Some(done.id));
        assert_eq!(cancelled.cancel_reason.as_deref(), Some("superseded"));
        assert_eq!(store.last_done_in_stream("cam".into()).await.unwrap(), Some((done.id, Some("dk".into()), true)));
    } else {
        assert_eq!((done.stream.as_str(), done.mode, done.dedupe), ("", StreamMode::Queue, false));
        // Version 1 kept no reason: the migration to 3 says a client cancelled it.
        assert_eq!(cancelled.cancel_reason.as_deref(), Some("cancelled"));
    }
    let c = store.counts().await.unwrap();
    assert_eq!((c.queued, c.running, c.done, c.error, c.cancelled), (1, 1, 1, 1, 1), "counts of the old rows");
    assert!(store.knows_idempotency_key("key-done".into()).await.unwrap());
    // The queue works: the old queued job is claimed, the old running one finishes under its lease.
    let queued = get(0).await;
    assert_eq!(store.queue_position(&queued.stream, queued.seq).await.unwrap(), 1);
    let claimed = claim(&store).await.unwrap();
    assert_eq!((claimed.id, claimed.attempts, claimed.version), (queued.id, 1, 4));
    let old_token = LeaseToken::from_string("token-running".into());
    store.heartbeat(running.id, old_token.clone(), None, 60_000, false).await.unwrap();
    let (finished, _) = store.complete(running.id, old_token, png(), None).await.unwrap();
    assert_eq!(finished.status, JobStatus::Done);
    let fresh = add(&store, "cam").await;
    assert!(fresh.seq > cancelled.seq, "new jobs follow the old ones");
    let c = store.counts().await.unwrap();
    assert_eq!((c.queued, c.running, c.done), (1, 1, 2));
}

#[tokio::test]
async fn sqlite_version_1_database_with_every_status_upgrades() {
    old_sqlite_database_opens_with_every_record(false).await;
}

#[tokio::test]
async fn sqlite_version_4_database_with_every_status_upgrades() {
    old_sqlite_database_opens_with_every_record(true).await;
}

/// A plain connection to the test database, for what no store call can do (break a row, hold a
/// lock), its driver running beside it.
async fn raw(e: &Engine) -> tokio_postgres::Client {
    let Engine::Postgres(db) = e else { unreachable!() };
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn expire_sweep_continues_past_an_unreadable_id(e: Engine) {
    let store = e.open().await;
    let (first, second) = (add(&store, "").await, add(&store, "").await);
    let a = store.claim_next("w1".into(), 1_000, None).await.unwrap().unwrap();
    let b = store.claim_next("w1".into(), 2_000, None).await.unwrap().unwrap();
    assert_eq!((a.id, b.id), (first.id, second.id));
    // The first candidate (the earliest lapse) has an id that is no job id.
    raw(&e).await.execute("UPDATE jobs SET id = 'not-an-id' WHERE id = $1", &[&first.id.to_string()]).await.unwrap();
    let later = e.open_at(10_000).await;
    let swept = later.expire_leases(5).await.unwrap();
    assert_eq!(swept.failed.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), [first.seq]);
    assert_eq!(swept.changed.iter().map(|r| (r.id, r.status)).collect::<Vec<_>>(), [(second.id, JobStatus::Queued)]);
}

async fn repeated_cancel_is_announced_again(e: Engine) {
    let (a, b) = (e.open().await, e.open().await);
    let mut heard_by_b = b.cluster_notes().unwrap();
    let job = add(&a, "").await;
    assert!(matches!(next_note(&mut heard_by_b).await, Some(ClusterNote::Changed { kind: JobEventKind::Queued, .. })));
    let first = a.cancel(job.id).await.unwrap();
    assert!(first.changed);
    let cancelled =
        Some(ClusterNote::Changed { id: job.id, kind: JobEventKind::Cancelled, version: first.record.version });
    assert_eq!(next_note(&mut heard_by_b).await, cancelled);
    // The service answers a repeated DELETE with `cancelled` again to its own clients; a client
    // of the other broker hears it too (same version: nothing changed).
    let again = a.cancel(job.id).await.unwrap();
    assert!(!again.changed);
    assert_eq!(next_note(&mut heard_by_b).await, cancelled);
    // A finished job's repeat (files already gone) stays silent.
    let other = add(&a, "").await;
    let r = claim(&a).await.unwrap();
    assert_eq!(r.id, other.id);
    a.complete(r.id, token(&r), png(), None).await.unwrap();
    assert!(a.cancel(r.id).await.unwrap().changed);
    assert!(!a.cancel(r.id).await.unwrap().changed);
    let mut kinds = Vec::new();
    while let Ok(Ok(ClusterNote::Changed { id, kind, .. })) =
        tokio::time::timeout(std::time::Duration::from_millis(500), heard_by_b.recv()).await
    {
        if id == other.id {
            kinds.push(kind);
        }
    }
    assert_eq!(kinds, [JobEventKind::Queued, JobEventKind::Started, JobEventKind::Done, JobEventKind::Deleted]);
}

async fn locks_held_by_a_stuck_session_fail_calls_cleanly(e: Engine) {
    let store = e.open().await;
    add(&store, "").await;
    let r = claim(&store).await.unwrap();
    // Another session (a broker cut off mid-transaction) holds the job's row lock and the
    // stream's advisory lock, and never commits.
    let stuck = raw(&e).await;
    stuck.batch_execute("BEGIN").await.unwrap();
    stuck.query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", &[&r.id.to_string()]).await.unwrap();
    stuck.query("SELECT pg_advisory_xact_lock(hashtextextended('s', 0))", &[]).await.unwrap();
    let started = std::time::Instant::now();
    let bounded = std::time::Duration::from_secs(30);
    let (beat, insert) = tokio::time::timeout(bounded, async {
        tokio::join!(store.heartbeat(r.id, token(&r), None, 60_000, false), store.insert(new_job("s")))
    })
    .await
    .expect("the calls fail instead of waiting on the stuck session");
    let took = started.elapsed();
    assert!(matches!(beat, Err(StoreError::Busy(_))), "{beat:?}");
    assert!(matches!(insert, Err(StoreError::Busy(_))), "{:?}", insert.map(|_| ()));
    assert!(took < std::time::Duration::from_secs(15), "within about two lock timeouts: {took:?}");
    let message = beat.unwrap_err().to_string();
    assert!(message.contains("held by another session"), "{message}");
    // The other calls of the pool went on meanwhile, and once the session ends all works again.
    assert_eq!(store.get(r.id).await.unwrap().unwrap().status, JobStatus::Running);
    drop(stuck);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    store.heartbeat(r.id, token(&r), None, 60_000, false).await.unwrap();
    created(&store, new_job("s")).await;
}

async fn a_role_without_create_opens_a_current_schema(e: Engine) {
    let Engine::Postgres(db) = &e else { unreachable!() };
    drop(e.open().await);
    // A role that may read and write the tables but create nothing (PostgreSQL 15's default for
    // any role but the owner of `public`, revoked here explicitly for older servers).
    let role = format!("tdcomfy_rw_{}", uuid::Uuid::new_v4().simple());
    let admin = raw(&e).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
             GRANT USAGE ON SCHEMA public TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        ))
        .await
        .unwrap();
    let mut config: tokio_postgres::Config = db.url.parse().unwrap();
    config.user(&role);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let refused = client.batch_execute("CREATE TABLE IF NOT EXISTS tdcomfy_schema (version BIGINT)").await;
    assert!(refused.is_err(), "the role really cannot create (even a table that exists)");
    drop(client);
    let user_url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(user_url, db.url, "the test URL names the postgres user: {}", db.url);
    let opened = Store::connect(&DatabaseUrl::parse(&user_url).unwrap(), Clock::system(), "rw".into()).await;
    let outcome = match &opened {
        Ok(store) => {
            let job = add(store, "").await;
            Ok(claim(store).await.map(|r| r.id) == Some(job.id))
        }
        Err(e) => Err(e.to_string()),
    };
    drop(opened);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    admin.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await.unwrap();
    assert_eq!(outcome, Ok(true), "the role opens the store and works in it");
}

async fn a_heartbeat_that_waited_on_a_lock_gets_a_full_lease(e: Engine) {
    let store = e.open().await;
    add(&store, "").await;
    let r = claim(&store).await.unwrap();
    let holder = raw(&e).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.query("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", &[&r.id.to_string()]).await.unwrap();
    let beat = {
        let (store, token) = (store.clone(), token(&r));
        tokio::spawn(async move { store.heartbeat(r.id, token, None, 10_000, false).await })
    };
    // The heartbeat waits 2 s on the other session's row lock (within the lock timeout).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let released = Timestamp::now().millis();
    holder.batch_execute("COMMIT").await.unwrap();
    beat.await.unwrap().unwrap();
    let expires = store.get(r.id).await.unwrap().unwrap().lease.unwrap().expires_at.unwrap().millis();
    assert!(
        expires >= released + 10_000 - 200,
        "a full lease from when the wait ended: {} ms short",
        released + 10_000 - expires
    );
}

async fn a_burst_into_one_stream_leaves_the_pool_to_others(e: Engine) {
    let store = e.open().await;
    add(&store, "").await;
    let r = claim(&store).await.unwrap();
    // Another broker is slow inside the stream's lock for 3 s (below the lock timeout).
    let holder = raw(&e).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.query("SELECT pg_advisory_xact_lock(hashtextextended('burst', 0))", &[]).await.unwrap();
    // 40 submits to that stream at once: more than the pool's 16 connections.
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.insert(new_job("burst")).await.map(|_| ()) })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Heartbeats and claims of this broker go on meanwhile.
    let started = std::time::Instant::now();
    for _ in 0..5 {
        store.heartbeat(r.id, token(&r), None, 60_000, false).await.unwrap();
    }
    add(&store, "").await;
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(1), "the pool was not taken by the waiting submits: {took:?}");
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    holder.batch_execute("COMMIT").await.unwrap();
    for t in burst {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.counts().await.unwrap().queued, 41);
}

async fn restart_gives_every_running_lease_one_ttl(e: Engine) {
    let store = e.open().await;
    let (lapsing, live) = (add(&store, "").await, add(&store, "").await);
    let a = store.claim_next("w1".into(), 1_000, None).await.unwrap().unwrap();
    let b = store.claim_next("w2".into(), 8_000, None).await.unwrap().unwrap();
    assert_eq!((a.id, b.id), (lapsing.id, live.id));
    drop(store);
    // The broker restarts 5 s later: a's lease lapsed, b's has 3 s left, but b's worker's
    // heartbeats failed meanwhile too, so both get one full lease from now.
    let restarted = e.open_at(5_000).await;
    assert_eq!(restarted.resume_running(60_000, 600_000).await.unwrap(), 2);
    let now = Timestamp::now().millis() + 5_000;
    for id in [a.id, b.id] {
        let expiry = restarted.get(id).await.unwrap().unwrap().lease.unwrap().expires_at.unwrap().millis();
        assert!((now + 59_000..=now + 61_000).contains(&expiry), "one lease from now: {expiry} vs {now}");
    }
}
