//! Several brokers on one PostgreSQL database and one shared file store, in-process, over real
//! HTTP: what a client of one broker sees of the work a worker does through another.
//!
//! Each test makes a fresh database from `TDCOMFY_TEST_DATABASE_URL` (`helpers::TestDb`: an admin
//! URL of a PostgreSQL a test may create databases in) and prints SKIPPED without it; with
//! `TDCOMFY_REQUIRE_POSTGRES=1` (CI) a missing URL fails the test instead.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{SseReader, TestApp, TestDb, spawn_app, spawn_in, test_args};

/// Runs `sql` in the database at `url` and returns the first column of the first row as text.
async fn query_one(url: &str, sql: &str) -> String {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("database reachable");
    let driver = tokio::spawn(connection);
    let rows = client.simple_query(sql).await.expect(sql);
    drop(client);
    let _ = driver.await;
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

/// N brokers on one database, each with its own DATA_DIR, all on one `STORAGE_URL=file://…`.
struct Cluster {
    brokers: Vec<TestApp>,
    db: TestDb,
    storage: tempfile::TempDir,
}

impl Cluster {
    async fn start(test: &str, n: usize, tweak: impl Fn(&mut tdcomfy_broker::BrokerArgs)) -> Option<Cluster> {
        let db = TestDb::create(test).await?;
        let storage = tempfile::tempdir().unwrap();
        let mut cluster = Cluster { brokers: Vec::new(), db, storage };
        for _ in 0..n {
            let broker = cluster.spawn(&tweak).await;
            cluster.brokers.push(broker);
        }
        // Every broker answers (its start, migrations included, is over) before the test begins.
        for b in &cluster.brokers {
            assert_eq!(b.health().await["status"], "healthy");
        }
        Some(cluster)
    }

    async fn spawn(&self, tweak: &impl Fn(&mut tdcomfy_broker::BrokerArgs)) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut args = test_args(dir.path().join("data"));
        args.storage.database_url = Some(self.db.url.clone());
        args.storage.storage_url = Some(format!("file://{}", self.storage.path().display()));
        tweak(&mut args);
        spawn_in(dir, args).await
    }
}

/// An SSE stream read on a task of its own, each event stamped with when it arrived.
struct Arrivals {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Value, Option<String>, Instant)>,
    _task: tokio::task::JoinHandle<()>,
}

impl Arrivals {
    async fn open(app: &TestApp, path: &str) -> Arrivals {
        let mut reader = SseReader::new(app.get(path).send().await.unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some((name, data)) = reader.next(3600.0).await {
                if tx.send((name, data, reader.last_id.clone(), Instant::now())).is_err() {
                    return;
                }
            }
        });
        Arrivals { rx, _task: task }
    }

    /// The next event of `job` (others skipped), with its arrival time.
    async fn next_of(&mut self, job: &str, secs: f64) -> Option<(String, Value, Instant)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        loop {
            let (name, data, _, at) = tokio::time::timeout_at(deadline, self.rx.recv()).await.ok()??;
            if data["job_id"] == json!(job) || name == "resync" {
                return Some((name, data, at));
            }
        }
    }

    /// Every event that arrives within `secs`.
    async fn drain(&mut self, secs: f64) -> Vec<(String, Value)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        let mut out = Vec::new();
        while let Ok(Some((name, data, _, _))) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push((name, data));
        }
        out
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
async fn a_clients_events_follow_a_job_whose_worker_talks_to_other_brokers() {
    let Some(c) = Cluster::start("cluster events", 3, |_| {}).await else { return };
    let [b1, b2, b3] = &c.brokers[..] else { unreachable!() };
    let mut events = Arrivals::open(b1, "/events").await;
    let id = b1.submit_png("seen on broker 1").await;
    let (name, _, _) = events.next_of(&id, 10.0).await.expect("queued");
    assert_eq!(name, "queued");

    let lease = b2.lease("gpu-a", 5.0).await.expect("broker 2 leases the job broker 1 took");
    assert_eq!(lease["job_id"], json!(id));
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    let leased = Instant::now();
    let (name, data, at) = events.next_of(&id, 5.0).await.expect("started reaches broker 1");
    assert_eq!((name.as_str(), data["job"]["status"].as_str()), ("started", Some("running")));
    let mut latencies = vec![at.saturating_duration_since(leased)];

    // Progress through broker 2: each heartbeat's change is on broker 1's stream, in order.
    for step in 1..=20u32 {
        let progress = json!({"value": step as f64 / 20.0, "step": step, "max_steps": 20});
        let resp = b2.heartbeat(&id, &token, Some(progress)).await;
        assert_eq!(resp.status(), 200);
        let committed = Instant::now();
        let (name, data, at) = events.next_of(&id, 5.0).await.expect("progress reaches broker 1");
        assert_eq!(name, "progress");
        assert_eq!(data["job"]["progress"]["step"], json!(step), "in the order they happened");
        latencies.push(at.saturating_duration_since(committed));
    }

    // A WebSocket and a `?wait=` long-poll on broker 3 hear the result too.
    let ws_url = format!("{}?job_id={id}", b3.url("/ws").replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("hello"));
    let version = b3.job(&id).await["version"].as_u64().unwrap();
    let long_poll = {
        let (http, url) = (b3.http.clone(), b3.url(&format!("/jobs/{id}?wait=10&since={version}")));
        tokio::spawn(async move {
            let job: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (job, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let video = b"a result uploaded through broker 2".repeat(1000);
    assert_eq!(b2.put_result(&id, &token, video.clone()).await.status(), 200);
    let uploaded = Instant::now();
    let (name, data, at) = events.next_of(&id, 5.0).await.expect("done reaches broker 1");
    assert_eq!((name.as_str(), data["job"]["has_result"].as_bool()), ("done", Some(true)));
    latencies.push(at.saturating_duration_since(uploaded));
    let (job, answered) = long_poll.await.unwrap();
    assert_eq!(job["status"], "done", "the long-poll on broker 3 answered with the change");
    assert!(answered.saturating_duration_since(uploaded) < Duration::from_secs(1), "at the change, not after 10 s");
    // The WebSocket subscribed after the last heartbeat was committed, but broker 3 may publish
    // that heartbeat's note only after it subscribed: progress may come first, then done, and
    // versions never go back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last_version = 0;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.expect("done on the WebSocket").unwrap().unwrap();
        let ev: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        assert_eq!(ev["job_id"], json!(id), "{ev}");
        let version = ev["job"]["version"].as_u64().unwrap();
        assert!(version >= last_version, "events never go back in version: {ev}");
        last_version = version;
        if ev["event"] == json!("done") {
            break;
        }
        assert_eq!(ev["event"], json!("progress"), "only the last progress may come before done: {ev}");
    }

    let resp = b3.get(&format!("/jobs/{id}/result")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &video[..], "broker 3 serves the bytes broker 2 took");

    latencies.sort();
    eprintln!(
        "cross-broker event latency over {} changes (commit on broker 2 → event on broker 1's SSE): p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
}

#[tokio::test]
async fn a_worker_waiting_on_one_broker_gets_a_job_submitted_on_another_at_once() {
    let Some(c) = Cluster::start("cluster lease wake-up", 2, |_| {}).await else { return };
    let [b1, b2] = &c.brokers[..] else { unreachable!() };
    for round in 0..3 {
        let waiting = {
            let (http, url) = (b2.http.clone(), b2.url("/worker/lease"));
            tokio::spawn(async move {
                let resp = http.post(url).json(&json!({"worker_id": "gpu-a", "wait": 20})).send().await.unwrap();
                let answered = Instant::now();
                assert_eq!(resp.status(), 200, "a lease, not the 204 of a wait that ran out");
                (resp.json::<Value>().await.unwrap(), answered)
            })
        };
        // The request is waiting on broker 2 before the job exists.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let id = b1.submit_png(&format!("round {round}")).await;
        let submitted = Instant::now();
        let (lease, answered) = waiting.await.unwrap();
        assert_eq!(lease["job"]["job_id"], json!(id));
        let took = answered.saturating_duration_since(submitted);
        eprintln!("round {round}: submitted on broker 1 → leased on broker 2 in {took:?}");
        assert!(took < Duration::from_secs(1), "the waiting worker was woken, not left to its 20 s wait: {took:?}");
        let token = lease["job"]["lease_token"].as_str().unwrap();
        assert_eq!(b2.put_result(&id, token, b"mp4".to_vec()).await.status(), 200);
    }
}

#[tokio::test]
async fn a_cancel_through_one_broker_reaches_the_heartbeat_long_poll_on_another() {
    let Some(c) = Cluster::start("cluster cancel", 2, |_| {}).await else { return };
    let [b1, b2] = &c.brokers[..] else { unreachable!() };
    let id = b1.submit_png("cancelled from afar").await;
    let lease = b2.lease("gpu-a", 5.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    let polling = {
        let (http, url) = (b2.http.clone(), b2.url(&format!("/worker/jobs/{id}/heartbeat")));
        tokio::spawn(async move {
            let resp = http.post(url).json(&json!({"lease_token": token, "wait": 8})).send().await.unwrap();
            let answered = Instant::now();
            assert_eq!(resp.status(), 200);
            (resp.json::<Value>().await.unwrap(), answered)
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let resp = b1.delete(&format!("/jobs/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let cancelled_at = Instant::now();
    let (beat, answered) = polling.await.unwrap();
    assert_eq!(beat["cancelled"], json!(true), "the long-poll on broker 2 says the job was cancelled");
    let took = answered.saturating_duration_since(cancelled_at);
    eprintln!("DELETE on broker 1 → heartbeat answer on broker 2 in {took:?}");
    assert!(took < Duration::from_secs(1), "the long-poll answered at the cancel, not after its 8 s: {took:?}");
}

/// The `<boot>` of the ids of `app`'s events (from a job stream's snapshot).
async fn boot_of(app: &TestApp, job: &str) -> String {
    let mut reader = SseReader::new(app.get(&format!("/jobs/{job}/events")).send().await.unwrap());
    let (name, _) = reader.next(10.0).await.unwrap();
    assert_eq!(name, "snapshot");
    let id = reader.last_id.clone().unwrap();
    id.rsplit_once('-').unwrap().0.to_owned()
}

fn broker_ids(health: &Value) -> Vec<String> {
    let mut ids: Vec<String> =
        health["brokers"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn health_lists_every_live_broker_and_drops_a_stopped_one() {
    let Some(mut c) = Cluster::start("cluster health", 3, |_| {}).await else { return };
    let job = c.brokers[0].submit_png("for the event ids").await;
    // Each broker refreshes its list at every presence heartbeat (about a second).
    for b in &c.brokers {
        let deadline = Instant::now() + Duration::from_secs(10);
        while broker_ids(&b.health().await).len() < 3 {
            assert!(Instant::now() < deadline, "{}", b.health().await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut boots = Vec::new();
    for b in &c.brokers {
        let h = b.health().await;
        assert_eq!(h["store"], "postgres");
        let brokers = h["brokers"].as_array().unwrap();
        assert_eq!(brokers.len(), 3, "{h}");
        let this: Vec<&Value> = brokers.iter().filter(|b| b["this"] == json!(true)).collect();
        assert_eq!(this.len(), 1, "exactly one entry is the broker answering: {h}");
        // Its id is the boot of its event ids, so a client can tell which broker an id is from.
        assert_eq!(this[0]["id"].as_str().unwrap(), boot_of(b, &job).await);
        assert!(this[0]["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{h}");
        assert!(this[0]["last_seen"].as_f64().unwrap() >= this[0]["started_at"].as_f64().unwrap());
        boots.push(this[0]["id"].as_str().unwrap().to_owned());
    }
    boots.sort();
    for b in &c.brokers {
        assert_eq!(broker_ids(&b.health().await), boots, "every broker lists the same three");
    }

    let mut stopped = c.brokers.pop().unwrap();
    let gone = stopped.health().await["brokers"].as_array().unwrap().iter().find(|b| b["this"] == json!(true)).unwrap()
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    stopped.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ids = broker_ids(&c.brokers[0].health().await);
        if !ids.contains(&gone) {
            assert_eq!(ids.len(), 2, "the two live brokers stay listed: {ids:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the stopped broker {gone} is still listed: {ids:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_lapsed_lease_is_requeued_once_with_three_brokers_sweeping() {
    let Some(c) = Cluster::start("cluster requeue", 3, |a| a.lease_ttl = 1.0).await else { return };
    let [b1, b2, b3] = &c.brokers[..] else { unreachable!() };
    let mut streams = Vec::new();
    for b in &c.brokers {
        streams.push(Arrivals::open(b, "/events").await);
    }
    let mut jobs = Vec::new();
    for i in 0..4 {
        let id = b1.submit_png(&format!("lapses {i}")).await;
        let lease = b2.lease(&format!("gpu-{i}"), 5.0).await.unwrap();
        assert_eq!(lease["job_id"], json!(id));
        // The worker got its lease (its first beat, through another broker), then died.
        let token = lease["lease_token"].as_str().unwrap();
        assert_eq!(b3.heartbeat(&id, token, None).await.status(), 200);
        jobs.push(id);
    }
    for id in &jobs {
        let job = b3.wait_until(id, 10.0, |j| j["status"] == "queued").await;
        assert_eq!(job["status"], "queued", "the lapsed lease was taken back: {job}");
        assert_eq!(job["attempts"], 1, "the attempt is counted once: {job}");
    }
    // Several more sweeps of every broker: nothing more may happen to these jobs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (n, stream) in streams.iter_mut().enumerate() {
        let seen = stream.drain(0.5).await;
        for id in &jobs {
            let shown: Vec<(&str, u64)> = seen
                .iter()
                .filter(|(_, d)| d["job_id"] == json!(id))
                .map(|(name, d)| (name.as_str(), d["job"]["version"].as_u64().unwrap()))
                .collect();
            let current = b1.job(id).await["version"].as_u64().unwrap();
            // The requeue is one change, shown once: its `queued` is the last event and carries
            // the job's version now. A broker that re-read a note only after the next change
            // shows that one instead (submit and lease follow each other within milliseconds
            // here), but never one change twice: versions only increase.
            assert_eq!(shown.last(), Some(&("queued", current)), "broker {} showed job {id}: {shown:?}", n + 1);
            assert!(shown.windows(2).all(|w| w[0].1 < w[1].1), "broker {} showed job {id}: {shown:?}", n + 1);
            let requeues = shown.iter().filter(|(name, v)| *name == "queued" && *v > 1).count();
            assert_eq!(requeues, 1, "broker {} showed job {id}: {shown:?}", n + 1);
        }
        assert!(seen.iter().all(|(name, _)| name != "resync"), "no resync on broker {}", n + 1);
    }
    for id in &jobs {
        assert_eq!(b1.job(id).await["attempts"], 1);
    }
}

#[tokio::test]
async fn restarting_a_broker_while_another_lives_does_not_renew_running_leases() {
    let Some(c) = Cluster::start("cluster restart", 2, |a| a.lease_ttl = 5.0).await else { return };
    let mut brokers = c.brokers;
    let b2 = brokers.pop().unwrap();
    let b1 = brokers.pop().unwrap();
    let id = b1.submit_png("its worker dies").await;
    let lease = b1.lease("gpu-a", 5.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    assert_eq!(b1.heartbeat(&id, token, None).await.status(), 200);
    let last_beat = Instant::now();
    // The worker dies here. Broker 2 restarts while broker 1 lives.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b2 = b2.restart().await;
    assert_eq!(b2.health().await["status"], "healthy");
    // Renewed at the restart, the lease would run to 2.5 s + 5 s after the beat (and more: the
    // restart takes time); untouched, it lapses 5 s after it and the next sweep requeues it.
    let job = b1.wait_until(&id, 10.0, |j| j["status"] == "queued").await;
    let took = last_beat.elapsed();
    assert_eq!(job["status"], "queued");
    assert!(took < Duration::from_millis(7000), "requeued {took:?} after the last beat: the restart renewed the lease");
    drop(c.db);
}

/// The control for the test above: a broker alone on its database does renew running leases
/// when it restarts (its workers could not reach it meanwhile), even when its previous start's
/// presence row is still fresh.
#[tokio::test]
async fn a_lone_broker_restarting_renews_running_leases() {
    let Some(c) = Cluster::start("cluster lone restart", 1, |a| a.lease_ttl = 5.0).await else { return };
    let b1 = c.brokers.into_iter().next().unwrap();
    let id = b1.submit_png("its broker restarts").await;
    let lease = b1.lease("gpu-a", 5.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    assert_eq!(b1.heartbeat(&id, &token, None).await.status(), 200);
    let last_beat = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let b1 = b1.crash_and_restart().await;
    assert_eq!(b1.health().await["status"], "healthy");
    // Past when the lease would have lapsed without the renewal (5 s and a sweep).
    let until = Instant::now() + Duration::from_millis(7000).saturating_sub(last_beat.elapsed());
    let mut job = b1.job(&id).await;
    while job["status"] == "running" && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        job = b1.job(&id).await;
    }
    assert_eq!(job["status"], "running", "the restart gave the lease one more LEASE_TTL: {job}");
    assert_eq!(b1.heartbeat(&id, &token, None).await.status(), 200, "the worker's lease still holds");
    drop(c.db);
}

#[tokio::test]
async fn a_last_event_id_of_one_broker_gets_a_resync_from_another() {
    let Some(c) = Cluster::start("cluster last-event-id", 2, |_| {}).await else { return };
    let [b1, b2] = &c.brokers[..] else { unreachable!() };
    let mut first = SseReader::new(b1.get("/events").send().await.unwrap());
    let id = b1.submit_png("resumed elsewhere").await;
    let (name, _) = first.next(10.0).await.unwrap();
    assert_eq!(name, "queued");
    let last = first.last_id.clone().unwrap();
    drop(first);

    // The load balancer sends the reconnect to broker 2, whose ids are its own.
    let mut again = SseReader::new(b2.get("/events").header("last-event-id", &last).send().await.unwrap());
    let (name, data) = again.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), &data["reason"]), ("resync", &json!("unknown_id")), "{data}");
    let resync_id = again.last_id.clone().unwrap();
    // Then live: a change through broker 1 follows on broker 2's stream (after the job's
    // `queued`, if broker 2 heard of the submit only after this stream opened).
    b1.delete(&format!("/jobs/{id}")).send().await.unwrap();
    loop {
        let (name, data) = again.next(10.0).await.expect("the cancel reaches broker 2's stream");
        assert_eq!(data["job_id"], json!(id), "{name}: {data}");
        if name == "cancelled" {
            break;
        }
        assert_eq!(name, "queued", "{data}");
    }
    assert_ne!(again.last_id.unwrap(), resync_id);

    let mut job_stream =
        SseReader::new(b2.get(&format!("/jobs/{id}/events")).header("last-event-id", &last).send().await.unwrap());
    let (name, data) = job_stream.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), &data["reason"]), ("resync", &json!("unknown_id")));
    let (name, data) = job_stream.next(10.0).await.unwrap();
    assert_eq!((name.as_str(), &data["job"]["status"]), ("snapshot", &json!("cancelled")));
}

#[tokio::test]
async fn a_broken_notification_connection_resyncs_every_client_and_recovers() {
    let Some(c) = Cluster::start("cluster missed", 2, |_| {}).await else { return };
    let [b1, b2] = &c.brokers[..] else { unreachable!() };
    let mut events = Arrivals::open(b1, "/events").await;
    let id = b2.submit_png("before the break").await;
    assert_eq!(events.next_of(&id, 10.0).await.unwrap().0, "queued");
    let lease = b1.lease("gpu-a", 5.0).await.unwrap();
    assert_eq!(events.next_of(&id, 10.0).await.unwrap().0, "started");
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    // The worker's heartbeat long-polls broker 1: it must re-read, since a cancel made through
    // broker 2 while broker 1 was not listening would otherwise go unheard for the whole poll.
    let polling = {
        let (http, url) = (b1.http.clone(), b1.url(&format!("/worker/jobs/{id}/heartbeat")));
        tokio::spawn(async move {
            let resp = http.post(url).json(&json!({"lease_token": token, "wait": 8})).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            (resp.json::<Value>().await.unwrap(), Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The database drops every broker's listening connection (a restart, a network cut, an
    // administrator): changes made until each reconnects are not heard.
    let killed = query_one(
        &c.db.url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'tdcomfy-listen'",
    )
    .await;
    assert_eq!(killed.trim(), "2", "one listening connection per broker");
    let killed_at = Instant::now();
    let (name, data, _) = events.next_of(&id, 10.0).await.expect("a resync");
    assert_eq!((name.as_str(), &data["reason"]), ("resync", &json!("missed")), "{data}");
    let (beat, answered) = polling.await.unwrap();
    assert_eq!(beat["cancelled"], json!(false), "re-read: the job was not cancelled");
    let took = answered.saturating_duration_since(killed_at);
    assert!(took < Duration::from_secs(5), "the long-poll re-read at the reconnect, not after 8 s: {took:?}");

    // Listening again: the next change through broker 2 reaches broker 1's client.
    b2.delete(&format!("/jobs/{id}")).send().await.unwrap();
    let (name, data, _) = events.next_of(&id, 10.0).await.expect("the change after the reconnect");
    assert_eq!((name.as_str(), &data["job"]["status"]), ("cancelled", &json!("cancelled")));
}

/// On SQLite the broker is alone: `/health` says so, and names it with its event ids' boot.
#[tokio::test]
async fn health_on_sqlite_lists_this_broker_alone() {
    let app = spawn_app().await;
    let job = app.submit_png("for the event ids").await;
    let h = app.health().await;
    assert_eq!(h["store"], "sqlite");
    let brokers = h["brokers"].as_array().unwrap();
    assert_eq!(brokers.len(), 1, "{h}");
    assert_eq!(brokers[0]["this"], json!(true));
    assert_eq!(brokers[0]["id"].as_str().unwrap(), boot_of(&app, &job).await);
    // The presence heartbeat keeps `last_seen` current.
    let first = brokers[0]["last_seen"].as_f64().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = app.health().await["brokers"][0]["last_seen"].as_f64().unwrap();
    assert!(later > first, "last_seen moved: {first} → {later}");
    // The document describes the new fields.
    let doc: Value = app.get("/openapi.json").send().await.unwrap().json().await.unwrap();
    let health = &doc["components"]["schemas"]["Health"]["properties"];
    assert!(health["brokers"].is_object() && health["store"].is_object(), "{health}");
    let info = &doc["components"]["schemas"]["BrokerInfo"]["properties"];
    for field in ["id", "addr", "started_at", "last_seen", "this"] {
        assert!(info[field].is_object(), "BrokerInfo.{field}: {info}");
    }
}

/// The value of the `tdcomfy_jobs_finished_total` series with `outcome` on `app` (0 when absent).
async fn finished_total(app: &TestApp, outcome: &str) -> f64 {
    let text = app.get("/metrics").send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("tdcomfy_jobs_finished_total{") && l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn each_change_is_counted_once_by_the_broker_that_made_it() {
    let Some(c) = Cluster::start("cluster metrics", 2, |_| {}).await else { return };
    let [b1, b2] = &c.brokers[..] else { unreachable!() };
    let mut events = Arrivals::open(b1, "/events").await;
    let id = b1.submit_png("counted once").await;
    let lease = b2.lease("gpu-a", 5.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    assert_eq!(b2.put_result(&id, token, b"mp4".to_vec()).await.status(), 200);
    // Broker 1 showed the `done` (from broker 2's note) without counting it.
    loop {
        let (name, _, _) = events.next_of(&id, 10.0).await.expect("done reaches broker 1");
        if name == "done" {
            break;
        }
    }
    assert_eq!(finished_total(b2, "done").await, 1.0, "broker 2 finished the job");
    assert_eq!(finished_total(b1, "done").await, 0.0, "broker 1 only passed the event on");
}

#[tokio::test]
async fn result_ttl_with_several_brokers_deletes_each_job_s_files_once() {
    let Some(c) = Cluster::start("cluster result ttl", 3, |a| a.result_ttl = 1).await else { return };
    let [b1, b2, b3] = &c.brokers[..] else { unreachable!() };
    let mut streams = Vec::new();
    for b in &c.brokers {
        streams.push(Arrivals::open(b, "/events").await);
    }
    let mut jobs = Vec::new();
    for i in 0..3 {
        let id = b1.submit_png(&format!("expires {i}")).await;
        let lease = b2.lease("gpu-a", 5.0).await.unwrap();
        let token = lease["lease_token"].as_str().unwrap();
        assert_eq!(b2.put_result(&id, token, b"mp4".to_vec()).await.status(), 200);
        jobs.push(id);
    }
    let results = c.storage.path().join("results");
    assert!(results.join(&jobs[0]).exists(), "the results are in the shared storage at first");
    for id in &jobs {
        let deadline = Instant::now() + Duration::from_secs(15);
        while b3.get(&format!("/jobs/{id}/result")).send().await.unwrap().status() != 410 {
            assert!(Instant::now() < deadline, "the result of {id} outlived RESULT_TTL");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Several more sweeps of every broker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left: Vec<_> = std::fs::read_dir(&results).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "no result file is left in the shared storage: {left:?}");
    for (n, stream) in streams.iter_mut().enumerate() {
        let seen = stream.drain(0.5).await;
        for id in &jobs {
            let deleted = seen.iter().filter(|(name, d)| name == "deleted" && d["job_id"] == json!(id)).count();
            assert_eq!(deleted, 1, "broker {} showed the deletion of {id} once", n + 1);
        }
    }
}

#[tokio::test]
async fn a_lease_received_through_another_broker_is_not_handed_back_as_unreceived() {
    // LEASE_TTL 6 s: the broker that handed the lease out hands it back after 2 s without a call
    // reaching it; the worker calls only broker 3.
    let Some(c) = Cluster::start("cluster unacknowledged", 3, |a| a.lease_ttl = 6.0).await else { return };
    let [b1, b2, b3] = &c.brokers[..] else { unreachable!() };
    let id = b1.submit_png("received elsewhere").await;
    let lease = b2.lease("gpu-a", 5.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    let input = b3.get(&format!("/worker/jobs/{id}/input")).header("lease-token", token).send().await.unwrap();
    assert_eq!(input.status(), 200);
    for _ in 0..4 {
        let beat: Value = b3.heartbeat(&id, token, None).await.json().await.unwrap();
        assert_eq!(beat["cancelled"], json!(false));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let job = b1.job(&id).await;
    assert_eq!((&job["status"], &job["attempts"]), (&json!("running"), &json!(1)), "{job}");
    assert_eq!(b3.put_result(&id, token, b"mp4".to_vec()).await.status(), 200, "the lease still holds");
}

/// Waits until `app` has no SSE stream open (its gauge says 0): nobody there hears a change.
async fn until_no_sse_stream(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = app.get("/metrics").send().await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l.trim() == "tdcomfy_sse_subscribers 0") {
            return;
        }
        assert!(Instant::now() < deadline, "the SSE stream stayed open after the client hung up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_resuming_on_the_same_broker_hears_what_another_broker_changed_meanwhile() {
    let Some(c) = Cluster::start("cluster resume same broker", 2, |_| {}).await else { return };
    let [b1, b2] = &c.brokers[..] else { unreachable!() };
    let mut first = SseReader::new(b2.get("/events").send().await.unwrap());
    let id = b2.submit_png("changed elsewhere while away").await;
    let (name, _) = first.next(10.0).await.unwrap();
    assert_eq!(name, "queued");
    let last = first.last_id.clone().unwrap();
    drop(first);
    until_no_sse_stream(b2).await;

    // While nobody listens on broker 2, the job is cancelled through broker 1.
    assert_eq!(b1.delete(&format!("/jobs/{id}")).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The client comes back to broker 2 with its id: it must hear of the cancel, as the event
    // itself or as a resync that makes it re-read; never a silent "nothing happened".
    let mut again = SseReader::new(b2.get("/events").header("last-event-id", &last).send().await.unwrap());
    let (name, data) = again.next(5.0).await.expect("the resumed stream says something");
    match name.as_str() {
        "resync" => assert_eq!(data["reason"], json!("missed"), "{data}"),
        "cancelled" => assert_eq!(data["job_id"], json!(id)),
        other => panic!("the first event after the resume is {other}: {data}"),
    }
    assert_eq!(b2.job(&id).await["status"], "cancelled", "what a re-read shows");

    // Sticky no longer than needed: resuming from the resync's id replays exactly.
    if name == "resync" {
        let resumed = again.last_id.clone().unwrap();
        drop(again);
        until_no_sse_stream(b2).await;
        let mut third = SseReader::new(b2.get("/events").header("last-event-id", &resumed).send().await.unwrap());
        let id2 = b2.submit_png("after the resync").await;
        let (name, data) = third.next(5.0).await.unwrap();
        assert_eq!((name.as_str(), &data["job_id"]), ("queued", &json!(id2)), "{data}");
    }
}

#[tokio::test]
async fn a_database_outage_longer_than_a_lease_does_not_requeue_running_jobs() {
    let Some(c) = Cluster::start("cluster outage", 1, |a| a.lease_ttl = 2.0).await else { return };
    let b = &c.brokers[0];
    let id = b.submit_png("running through the outage").await;
    let lease = b.lease("gpu-a", 5.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap().to_owned();
    assert_eq!(b.heartbeat(&id, &token, None).await.status(), 200);

    // The database refuses every connection of the broker for longer than LEASE_TTL: the
    // worker's heartbeats cannot land, so the lease lapses in the database meanwhile.
    let admin = std::env::var("TDCOMFY_TEST_DATABASE_URL").unwrap();
    let name = c.db.url.rsplit('/').next().unwrap().to_owned();
    query_one(&admin, &format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false")).await;
    query_one(
        &admin,
        &format!("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{name}'"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    query_one(&admin, &format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")).await;

    // The broker reaches its database again, and sweeps a few times before the worker's next beat.
    let deadline = Instant::now() + Duration::from_secs(15);
    while b.get(&format!("/jobs/{id}")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "the broker never reached its database again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resp = b.heartbeat(&id, &token, None).await;
    assert_eq!(resp.status(), 200, "the worker keeps its lease: {}", resp.text().await.unwrap());
    let job = b.job(&id).await;
    assert_eq!((&job["status"], &job["attempts"]), (&json!("running"), &json!(1)), "not requeued: {job}");
    assert_eq!(b.put_result(&id, &token, b"mp4".to_vec()).await.status(), 200, "its result is taken");
}

#[tokio::test]
async fn a_broker_stopping_gracefully_takes_its_presence_row_with_it() {
    let Some(mut c) = Cluster::start("cluster leave", 2, |_| {}).await else { return };
    let rows = || query_one(&c.db.url, "SELECT count(*) FROM brokers");
    assert_eq!(rows().await, "2");
    let mut stopped = c.brokers.pop().unwrap();
    stopped.shutdown().await;
    // At once, not after the presence window: the live broker's next beat lists it alone.
    assert_eq!(rows().await, "1", "the stopped broker's row is gone");
    let deadline = Instant::now() + Duration::from_secs(3);
    while broker_ids(&c.brokers[0].health().await).len() != 1 {
        assert!(Instant::now() < deadline, "{}", c.brokers[0].health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_committed_submit_is_accepted_when_its_queue_position_cannot_be_read() {
    let Some(c) = Cluster::start("cluster position fails", 1, |_| {}).await else { return };
    let b = &c.brokers[0];
    // The position query reads the streams' turns; the insert does not. Without the table, every
    // position read fails after the job's commit.
    query_one(&c.db.url, "ALTER TABLE stream_turns RENAME TO stream_turns_away").await;
    let resp = b.submit(crate::helpers::png_form("committed, position unknown")).await;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    query_one(&c.db.url, "ALTER TABLE stream_turns_away RENAME TO stream_turns").await;
    assert_eq!(status, 200, "a committed job is no 500 (a retry would make a second job): {body}");
    assert!(body["queue_position"].is_null(), "shown without its position: {body}");
    let id = body["job_id"].as_str().unwrap();
    let job = b.job(id).await;
    assert_eq!((&job["status"], &job["queue_position"]), (&json!("queued"), &json!(1)), "{job}");
    let list: Value = b.get("/jobs?status=queued").send().await.unwrap().json().await.unwrap();
    assert_eq!(list.to_string().matches(id).count(), 1, "stored once: {list}");
}

#[tokio::test]
async fn a_client_away_while_notifications_broke_resyncs_when_it_resumes() {
    let Some(c) = Cluster::start("cluster resume after missed", 2, |_| {}).await else { return };
    let [b1, b2] = &c.brokers[..] else { unreachable!() };
    let mut first = SseReader::new(b1.get("/events").send().await.unwrap());
    let id = b1.submit_png("before the break").await;
    assert_eq!(first.next(10.0).await.unwrap().0, "queued");
    let last = first.last_id.clone().unwrap();
    drop(first);
    until_no_sse_stream(b1).await;
    // The listening connections break (and come back) while the client is away; a change made
    // meanwhile through broker 2 may never reach broker 1 as a note.
    query_one(
        &c.db.url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'tdcomfy-listen'",
    )
    .await;
    b2.delete(&format!("/jobs/{id}")).send().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut again = SseReader::new(b1.get("/events").header("last-event-id", &last).send().await.unwrap());
    let (name, data) = again.next(5.0).await.expect("the resumed stream says something");
    assert_eq!((name.as_str(), &data["reason"]), ("resync", &json!("missed")), "{data}");
}
