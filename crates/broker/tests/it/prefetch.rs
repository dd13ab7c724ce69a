//! Prefetch at the broker: a job leased with `prefetch` (its server is busy, it waits in ComfyUI's
//! queue) counts as not started until a heartbeat says `started` — a `latest` submission
//! supersedes it, and its stream's next job is not claimed before it starts; a long-polling
//! heartbeat hears a cancel at once; among waiting lease loops an idle one, then one whose last
//! workflow is the job's, is served first; `/health` shows each server's reported state.

use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

use crate::helpers::{TestApp, error_of, png_bytes, spawn_app};

fn form(prompt: &str, fields: &[(&str, &str)]) -> Form {
    let mut f = Form::new()
        .part("image", Part::bytes(png_bytes(64, 40)).file_name("frame.png").mime_str("image/png").unwrap())
        .text("prompt", prompt.to_owned());
    for (k, v) in fields {
        f = f.text(k.to_string(), v.to_string());
    }
    f
}

async fn submit(app: &TestApp, prompt: &str, fields: &[(&str, &str)]) -> String {
    let resp = app.submit(form(prompt, fields)).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned()
}

/// Leases with a full request body; `None` on 204.
async fn lease_with(app: &TestApp, body: Value) -> Option<Value> {
    let resp = app.post("/worker/lease").json(&body).send().await.unwrap();
    match resp.status().as_u16() {
        200 => Some(resp.json::<Value>().await.unwrap()["job"].clone()),
        204 => None,
        s => panic!("lease answered {s}: {}", resp.text().await.unwrap()),
    }
}

fn token(lease: &Value) -> &str {
    lease["lease_token"].as_str().unwrap()
}

async fn beat(app: &TestApp, id: &str, body: Value) -> reqwest::Response {
    app.post(&format!("/worker/jobs/{id}/heartbeat")).json(&body).send().await.unwrap()
}

#[tokio::test]
async fn a_latest_submission_supersedes_a_prefetched_job_but_not_one_that_started() {
    let app = spawn_app().await;
    let latest = [("stream", "td"), ("mode", "latest")];
    let running = submit(&app, "a", &latest).await;
    let a = lease_with(&app, json!({"worker_id": "gpu", "wait": 1})).await.unwrap();
    assert_eq!(a["job_id"], running.as_str());
    let waiting = submit(&app, "b", &latest).await;
    let b = lease_with(&app, json!({"worker_id": "gpu", "wait": 1, "prefetch": true})).await.unwrap();
    assert_eq!(b["job_id"], waiting.as_str());

    // b waits in ComfyUI's queue: the newer frame replaces it, the running a stays.
    let third = submit(&app, "c", &latest).await;
    let b_now = app.job(&waiting).await;
    assert_eq!((b_now["status"].as_str(), b_now["cancel_reason"].as_str()), (Some("cancelled"), Some("superseded")));
    assert_eq!(b_now["superseded_by"], third.as_str());
    assert_eq!(app.job(&running).await["status"], "running");
    let hb: Value = beat(&app, &waiting, json!({"lease_token": token(&b)})).await.json().await.unwrap();
    assert_eq!(hb["cancelled"], true, "its worker hears it and removes the prompt");

    // c, prefetched, then started: now it is the stream's running job and is kept.
    let c = lease_with(&app, json!({"worker_id": "gpu", "wait": 1, "prefetch": true})).await.unwrap();
    assert_eq!(c["job_id"], third.as_str());
    assert_eq!(beat(&app, &third, json!({"lease_token": token(&c), "started": true})).await.status(), 200);
    submit(&app, "d", &latest).await;
    assert_eq!(app.job(&third).await["status"], "running", "a started job is not superseded");
}

#[tokio::test]
async fn a_streams_next_job_is_not_claimed_while_its_prefetched_one_has_not_started() {
    let app = spawn_app().await;
    let stream = [("stream", "td")];
    let first = submit(&app, "1", &stream).await;
    let second = submit(&app, "2", &stream).await;
    let anonymous = submit(&app, "other", &[]).await;
    // gpu-a is busy with something else and prefetches the stream's first job.
    let a = lease_with(&app, json!({"worker_id": "gpu-a", "wait": 1, "prefetch": true})).await.unwrap();
    assert_eq!(a["job_id"], first.as_str());
    // An idle gpu-b must not start the stream's second job before the first: it gets another
    // stream's job, then nothing.
    let b = lease_with(&app, json!({"worker_id": "gpu-b", "wait": 1})).await.unwrap();
    assert_eq!(b["job_id"], anonymous.as_str());
    assert!(lease_with(&app, json!({"worker_id": "gpu-b", "wait": 0.3})).await.is_none());
    assert_eq!(app.job(&second).await["status"], "queued");
    // Once ComfyUI started the first, the second may go anywhere.
    assert_eq!(beat(&app, &first, json!({"lease_token": token(&a), "started": true})).await.status(), 200);
    let b = lease_with(&app, json!({"worker_id": "gpu-b", "wait": 1})).await.unwrap();
    assert_eq!(b["job_id"], second.as_str());
}

#[tokio::test]
async fn a_worker_already_waiting_gets_the_streams_next_job_the_moment_the_prefetched_one_starts() {
    let app = spawn_app().await;
    let stream = [("stream", "td")];
    let first = submit(&app, "1", &stream).await;
    let second = submit(&app, "2", &stream).await;
    let a = lease_with(&app, json!({"worker_id": "gpu-a", "wait": 1, "prefetch": true})).await.unwrap();
    assert_eq!(a["job_id"], first.as_str());
    // gpu-b is idle and long-polls; the stream's second job is held back while the first waits
    // in ComfyUI's queue. Its wait is long, so only a wake-up can answer it in time.
    let b = waiting(&app, json!({"worker_id": "gpu-b", "wait": 20}));
    until_waiting(&app, 1).await;
    let started = std::time::Instant::now();
    assert_eq!(beat(&app, &first, json!({"lease_token": token(&a), "started": true})).await.status(), 200);
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), b)
        .await
        .expect("the waiting worker is answered within seconds, not at the end of its 20 s wait")
        .unwrap()
        .expect("it got a job");
    assert_eq!(got["job_id"], second.as_str());
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "answered after {:?}", started.elapsed());
}

#[tokio::test]
async fn a_long_polling_heartbeat_answers_the_moment_the_job_is_cancelled() {
    let app = spawn_app().await;
    let id = submit(&app, "x", &[]).await;
    let lease = lease_with(&app, json!({"worker_id": "gpu", "wait": 1, "prefetch": true})).await.unwrap();
    let t = token(&lease).to_owned();
    // Nothing happens: the answer comes after the wait, not cancelled.
    let t0 = Instant::now();
    let hb: Value = beat(&app, &id, json!({"lease_token": t, "wait": 0.5})).await.json().await.unwrap();
    assert_eq!(hb["cancelled"], false);
    assert!(t0.elapsed() >= Duration::from_millis(450), "held for the wait: {:?}", t0.elapsed());
    // A cancel while it waits answers it at once.
    let poll = beat(&app, &id, json!({"lease_token": t, "wait": 8}));
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        assert_eq!(app.delete(&format!("/jobs/{id}")).send().await.unwrap().status(), 200);
        t
    };
    let (resp, cancelled_at) = tokio::join!(poll, cancel);
    let answered = cancelled_at.elapsed();
    let hb: Value = resp.json().await.unwrap();
    assert_eq!(hb["cancelled"], true);
    assert!(answered < Duration::from_secs(1), "answered {answered:?} after the cancel");
    // Out of range is a 400 naming the field.
    let (status, err) = error_of(beat(&app, &id, json!({"lease_token": t, "wait": 61})).await).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("wait")));
}

#[tokio::test]
async fn a_long_polling_heartbeat_keeps_the_lease_past_lease_ttl() {
    let app = crate::helpers::spawn_with(|a| a.lease_ttl = 1.5).await;
    let id = submit(&app, "x", &[]).await;
    let lease = lease_with(&app, json!({"worker_id": "gpu", "wait": 1, "prefetch": true})).await.unwrap();
    let t0 = Instant::now();
    // Each answer comes after at most a third of LEASE_TTL, whatever the wait asked.
    while t0.elapsed() < Duration::from_secs(4) {
        let hb = beat(&app, &id, json!({"lease_token": token(&lease), "wait": 30})).await;
        assert_eq!(hb.status(), 200, "the lease holds after {:?}", t0.elapsed());
    }
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("running"), Some(1)));
}

/// Starts a lease request on its own task.
fn waiting(app: &TestApp, body: Value) -> tokio::task::JoinHandle<Option<Value>> {
    let (http, url) = (app.http.clone(), app.url("/worker/lease"));
    tokio::spawn(async move {
        let resp = http.post(url).json(&body).send().await.unwrap();
        (resp.status() == 200).then_some(())?;
        Some(resp.json::<Value>().await.unwrap()["job"].clone())
    })
}

async fn until_waiting(app: &TestApp, n: usize) {
    let waiting =
        |h: &Value| h["workers"].as_array().map_or(0, |w| w.iter().filter(|w| w["last_seen_ms_ago"] == 0).count());
    let h = app.wait_health(|h| waiting(h) >= n).await;
    assert!(waiting(&h) >= n, "{n} lease requests wait: {h}");
}

#[tokio::test]
async fn among_waiting_servers_the_one_that_last_ran_the_workflow_gets_the_job() {
    let app = spawn_app().await;
    // Registered first, so without the preference it would be served first.
    let other = waiting(&app, json!({"worker_id": "gpu-other", "wait": 3, "last_workflow": "image_invert"}));
    until_waiting(&app, 1).await;
    let warm = waiting(&app, json!({"worker_id": "gpu-warm", "wait": 3, "last_workflow": "ltxv_image_to_video"}));
    until_waiting(&app, 2).await;
    let id = submit(&app, "x", &[("workflow", "ltxv_image_to_video")]).await;
    let got = warm.await.unwrap().expect("the warm server got a job");
    assert_eq!(got["job_id"], id.as_str());
    assert!(other.await.unwrap().is_none(), "the other server waited on");
}

#[tokio::test]
async fn an_idle_server_is_served_before_a_busy_one_prefetching() {
    let app = spawn_app().await;
    let busy = waiting(&app, json!({"worker_id": "gpu-busy", "wait": 3, "prefetch": true}));
    until_waiting(&app, 1).await;
    let idle = waiting(&app, json!({"worker_id": "gpu-idle", "wait": 3}));
    until_waiting(&app, 2).await;
    let id = submit(&app, "x", &[]).await;
    let got = idle.await.unwrap().expect("the idle server got the job");
    assert_eq!(got["job_id"], id.as_str());
    assert!(busy.await.unwrap().is_none());
}

#[tokio::test]
async fn a_preferred_server_that_does_not_take_the_job_costs_the_other_little() {
    let app = spawn_app().await;
    let idle = waiting(&app, json!({"worker_id": "gpu-idle", "wait": 0.6}));
    until_waiting(&app, 1).await;
    let busy = waiting(&app, json!({"worker_id": "gpu-busy", "wait": 10, "prefetch": true}));
    until_waiting(&app, 2).await;
    // The idle one's request ends before any job arrives; the busy one is not left waiting.
    assert!(idle.await.unwrap().is_none());
    let t = Instant::now();
    let id = submit(&app, "x", &[]).await;
    let got = busy.await.unwrap().expect("the busy server got it");
    assert_eq!(got["job_id"], id.as_str());
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
}

#[tokio::test]
async fn health_shows_each_servers_reported_state() {
    let app = spawn_app().await;
    let id = submit(&app, "x", &[]).await;
    let report = json!({
        "worker_id": "gpu-1", "server": "http://gpu1:8188", "reachable": true, "workflows": [],
        "state": "running", "job_id": id, "prefetched_jobs": ["7f1c2a4e-0000-4000-8000-000000000001"],
        "last_workflow": "ltxv_image_to_video",
        "devices": [{"name": "cuda:0 NVIDIA GeForce RTX 4090", "type": "cuda",
                     "vram_total": 25_757_220_864u64, "vram_free": 20_000_000_000u64}]
    });
    assert_eq!(app.post("/worker/preflight").json(&report).send().await.unwrap().status(), 204);
    let health = app.health().await;
    let w = &health["workers"][0];
    assert_eq!(w["id"], "gpu-1");
    assert_eq!(w["server"], "http://gpu1:8188");
    assert_eq!(w["state"], "running");
    assert_eq!(w["job_id"], id.as_str());
    assert_eq!(w["prefetched_jobs"], json!(["7f1c2a4e-0000-4000-8000-000000000001"]));
    assert_eq!(w["last_workflow"], "ltxv_image_to_video");
    assert_eq!(w["devices"][0]["type"], "cuda");
    assert_eq!(w["devices"][0]["vram_total"], 25_757_220_864u64);

    // A report without them (an older worker) leaves the fields empty, not missing.
    let old = json!({"worker_id": "gpu-2", "server": "http://gpu2:8188", "reachable": true, "workflows": []});
    assert_eq!(app.post("/worker/preflight").json(&old).send().await.unwrap().status(), 204);
    let health = app.health().await;
    let w = health["workers"].as_array().unwrap().iter().find(|w| w["id"] == "gpu-2").unwrap().clone();
    assert_eq!((w["state"].clone(), w["prefetched_jobs"].clone()), (Value::Null, json!([])));
    assert_eq!(w["server"], "http://gpu2:8188");

    // Over the limits: a 400 naming the field.
    let mut many = report.clone();
    many["prefetched_jobs"] = json!(vec!["7f1c2a4e-0000-4000-8000-000000000001"; 65]);
    let (status, err) = error_of(app.post("/worker/preflight").json(&many).send().await.unwrap()).await;
    assert_eq!((status, err["field"].as_str(), err["limit"].as_u64()), (400, Some("prefetched_jobs"), Some(64)));
    let mut bad = report.clone();
    bad["state"] = json!("sleeping");
    let (status, _) = error_of(app.post("/worker/preflight").json(&bad).send().await.unwrap()).await;
    assert_eq!(status, 400);
    let (status, err) = error_of(
        app.post("/worker/lease")
            .json(&json!({"worker_id": "w", "last_workflow": "x".repeat(129)}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, err["field"].as_str()), (400, Some("last_workflow")));
}

#[tokio::test]
async fn the_document_declares_the_prefetch_fields() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").send().await.unwrap().json().await.unwrap();
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("LeaseRequest", "prefetch"),
        ("LeaseRequest", "last_workflow"),
        ("HeartbeatRequest", "started"),
        ("HeartbeatRequest", "wait"),
        ("PreflightReport", "state"),
        ("PreflightReport", "prefetched_jobs"),
        ("PreflightReport", "devices"),
        ("WorkerInfo", "server"),
        ("WorkerInfo", "state"),
        ("WorkerInfo", "prefetched_jobs"),
        ("WorkerInfo", "last_workflow"),
        ("WorkerInfo", "devices"),
    ] {
        assert!(schemas[schema]["properties"][field].is_object(), "{schema}.{field} is declared");
    }
    let states = &schemas["ServerState"]["enum"];
    assert_eq!(states, &json!(["idle", "running", "paused", "unreachable"]));
    assert_eq!(schemas["DeviceInfo"]["required"], json!(["name", "type"]));
}
