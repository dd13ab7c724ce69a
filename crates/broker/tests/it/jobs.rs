//! Looking jobs up, long-polling, listing, cancelling, health, and JSON for unknown routes.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestApp, error_of, spawn_app};

#[tokio::test]
async fn unknown_jobs_routes_and_methods_answer_json() {
    let app = spawn_app().await;
    for path in ["/jobs/9b2f6a4e-1d2c-4d3e-8f90-123456789abc", "/jobs/not-a-uuid", "/jobs/not-a-uuid/result"] {
        let (status, err) = error_of(app.get(path).send().await.unwrap()).await;
        assert_eq!((status, err["code"].as_str()), (404, Some("job_not_found")), "{path}");
    }
    let (status, err) = error_of(app.get("/no/such/route").send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("route_not_found")));
    let (status, err) = error_of(app.put("/jobs").send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (405, Some("method_not_allowed")));
    let (status, err) = error_of(app.get("/jobs?limit=abc").send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_query")));
}

#[tokio::test]
async fn long_poll_wakes_on_a_change_and_otherwise_returns_the_current_state() {
    long_poll_wakes_on_a_change_and_otherwise_returns_the_current_state_on(spawn_app().await).await
}

#[tokio::test]
async fn long_poll_wakes_on_a_change_and_otherwise_returns_the_current_state_postgres() {
    if let Some(db) =
        crate::helpers::TestDb::create("long_poll_wakes_on_a_change_and_otherwise_returns_the_current_state").await
    {
        long_poll_wakes_on_a_change_and_otherwise_returns_the_current_state_on(
            crate::helpers::spawn_postgres(&db.url, |_| {}).await,
        )
        .await
    }
}

async fn long_poll_wakes_on_a_change_and_otherwise_returns_the_current_state_on(app: TestApp) {
    let id = app.submit_png("wait for me").await;
    let v0 = app.job(&id).await["version"].as_u64().unwrap();

    // Nothing happens: after the wait the current (unchanged) state comes back.
    let same: Value = app.get(&format!("/jobs/{id}?wait=0.3")).send().await.unwrap().json().await.unwrap();
    assert_eq!((same["status"].as_str(), same["version"].as_u64()), (Some("queued"), Some(v0)));

    // A worker takes the job while a client waits: the waiter sees it, well before its 30 s.
    let waiter = {
        let (http, url) = (app.http.clone(), app.url(&format!("/jobs/{id}?wait=30&since={v0}")));
        tokio::spawn(async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::task::yield_now().await;
    app.lease("w", 1.0).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(20), waiter).await.expect("woken, not timed out").unwrap();
    assert_eq!(seen["status"], "running");
    assert!(seen["version"].as_u64().unwrap() > v0);

    // `since` older than the current version answers at once.
    let now: Value = app.get(&format!("/jobs/{id}?wait=30&since={v0}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(now["status"], "running");

    let (status, err) = error_of(app.get(&format!("/jobs/{id}?wait=61")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str(), err["limit"].as_u64()), (400, Some("invalid_wait"), Some(60)));
}

#[tokio::test]
async fn list_filters_by_status_newest_first_and_caps_the_limit() {
    list_filters_by_status_newest_first_and_caps_the_limit_on(spawn_app().await).await
}

#[tokio::test]
async fn list_filters_by_status_newest_first_and_caps_the_limit_postgres() {
    if let Some(db) = crate::helpers::TestDb::create("list_filters_by_status_newest_first_and_caps_the_limit").await {
        list_filters_by_status_newest_first_and_caps_the_limit_on(crate::helpers::spawn_postgres(&db.url, |_| {}).await)
            .await
    }
}

async fn list_filters_by_status_newest_first_and_caps_the_limit_on(app: TestApp) {
    let a = app.submit_png("a").await;
    let b = app.submit_png("b").await;
    let c = app.submit_png("c").await;
    app.lease("w", 1.0).await.unwrap(); // takes a

    let all: Value = app.get("/jobs").send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = all["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![c.as_str(), b.as_str(), a.as_str()]);
    assert_eq!(all["count"], 3);

    let queued: Value = app.get("/jobs?status=queued&limit=1").send().await.unwrap().json().await.unwrap();
    assert_eq!(queued["count"], 1);
    assert_eq!(queued["jobs"][0]["id"], c);
    let running: Value = app.get("/jobs?status=running").send().await.unwrap().json().await.unwrap();
    assert_eq!(running["jobs"][0]["id"], a);

    let capped: Value = app.get("/jobs?limit=100000").send().await.unwrap().json().await.unwrap();
    assert_eq!(capped["count"], 3);
    let (status, err) = error_of(app.get("/jobs?status=finished").send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str(), err["field"].as_str()), (400, Some("invalid_status"), Some("status")));
    let (status, _) = error_of(app.get("/jobs?limit=0").send().await.unwrap()).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn delete_cancels_a_queued_job_removes_its_files_and_is_repeatable() {
    delete_cancels_a_queued_job_removes_its_files_and_is_repeatable_on(spawn_app().await).await
}

#[tokio::test]
async fn delete_cancels_a_queued_job_removes_its_files_and_is_repeatable_postgres() {
    if let Some(db) =
        crate::helpers::TestDb::create("delete_cancels_a_queued_job_removes_its_files_and_is_repeatable").await
    {
        delete_cancels_a_queued_job_removes_its_files_and_is_repeatable_on(
            crate::helpers::spawn_postgres(&db.url, |_| {}).await,
        )
        .await
    }
}

async fn delete_cancels_a_queued_job_removes_its_files_and_is_repeatable_on(app: TestApp) {
    let id = app.submit_png("never mind").await;
    let resp = app.delete(&format!("/jobs/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!((body["job_id"].as_str(), body["status"].as_str()), (Some(id.as_str()), Some("cancelled")));
    assert!(app.files("inputs").is_empty(), "input file must be deleted");

    let job = app.job(&id).await;
    assert_eq!(job["status"], "cancelled");
    assert!(job["finished_at"].is_f64(), "finished_at is epoch seconds");
    // A cancelled job is never handed to a worker.
    assert!(app.lease("w", 0.2).await.is_none());

    let again = app.delete(&format!("/jobs/{id}")).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["status"], "cancelled");
    let cancel_alias = app.post(&format!("/jobs/{id}/cancel")).send().await.unwrap();
    assert_eq!(cancel_alias.status(), 200);
    let (status, _) = error_of(app.delete("/jobs/9b2f6a4e-1d2c-4d3e-8f90-123456789abc").send().await.unwrap()).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn health_counts_jobs_by_status_and_shows_waiting_workers() {
    health_counts_jobs_by_status_and_shows_waiting_workers_on(spawn_app().await).await
}

#[tokio::test]
async fn health_counts_jobs_by_status_and_shows_waiting_workers_postgres() {
    if let Some(db) = crate::helpers::TestDb::create("health_counts_jobs_by_status_and_shows_waiting_workers").await {
        health_counts_jobs_by_status_and_shows_waiting_workers_on(crate::helpers::spawn_postgres(&db.url, |_| {}).await)
            .await
    }
}

async fn health_counts_jobs_by_status_and_shows_waiting_workers_on(app: TestApp) {
    let h = app.health().await;
    assert_eq!(h["status"], "healthy");
    assert_eq!((h["jobs_count"].as_u64(), h["workers_connected"].as_u64()), (Some(0), Some(0)));

    let a = app.submit_png("a").await;
    let lease = app.lease("gpu-1", 1.0).await.unwrap();
    assert_eq!(lease["job_id"], a);
    app.delete(&format!("/jobs/{}", app.submit_png("c").await)).send().await.unwrap();

    // A worker blocked in a lease long-poll counts as connected.
    let waiting = {
        let (http, url) = (app.http.clone(), app.url("/worker/lease"));
        tokio::spawn(
            async move { http.post(url).json(&serde_json::json!({"worker_id": "gpu-2", "wait": 2})).send().await },
        )
    };
    let h = app.wait_health(|h| h["workers_connected"] == 2).await;
    assert_eq!(
        (h["jobs_count"].as_u64(), h["queued"].as_u64(), h["running"].as_u64(), h["cancelled"].as_u64()),
        (Some(2), Some(0), Some(1), Some(1)),
        "{h}"
    );
    let workers: Vec<&str> = h["workers"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(workers, vec!["gpu-1", "gpu-2"]);
    assert_eq!(h["workers"][0]["job_id"], a);
    waiting.abort();
}

impl crate::helpers::TestApp {
    /// Polls /health until `pred` holds (bounded), for state that has no event to wait on.
    pub async fn wait_health(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let h = self.health().await;
            if pred(&h) || tokio::time::Instant::now() > deadline {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
