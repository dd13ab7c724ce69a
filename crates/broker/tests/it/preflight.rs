//! Preflight on the broker's side: a lease request's workflow list filters the claim (absent: any
//! workflow, as old workers lease), and workers' reports show in `GET /workflows` and as a queued
//! job's `waiting_reason`.

use serde_json::{Value, json};

use crate::helpers::{TestApp, error_of, png_form, spawn_app};

const LTXV: &str = "ltxv_image_to_video";

async fn submit_to(app: &TestApp, workflow: &str) -> String {
    let resp = app.submit(png_form("p").text("workflow", workflow.to_owned())).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned()
}

async fn lease_for(app: &TestApp, worker: &str, workflows: Value) -> Option<Value> {
    let body = json!({"worker_id": worker, "wait": 0.2, "workflows": workflows});
    let resp = app.post("/worker/lease").json(&body).send().await.unwrap();
    match resp.status().as_u16() {
        200 => Some(resp.json::<Value>().await.unwrap()["job"].clone()),
        204 => None,
        s => panic!("lease answered {s}: {}", resp.text().await.unwrap()),
    }
}

async fn report(app: &TestApp, body: Value) -> reqwest::Response {
    app.post("/worker/preflight").json(&body).send().await.unwrap()
}

async fn workflow(app: &TestApp, name: &str) -> Value {
    let all: Value = app.get("/workflows").send().await.unwrap().json().await.unwrap();
    all["workflows"].as_array().unwrap().iter().find(|w| w["name"] == name).cloned().unwrap()
}

#[tokio::test]
async fn a_lease_takes_only_jobs_of_the_workflows_it_names_and_an_old_style_lease_takes_any() {
    let app = spawn_app().await;
    let ltxv = submit_to(&app, LTXV).await;
    let invert = submit_to(&app, "image_invert").await;
    // The older job is of a workflow this server cannot run: the next one is handed out instead.
    let leased = lease_for(&app, "gpu-a", json!(["image_invert"])).await.expect("the invert job");
    assert_eq!(leased["job_id"], invert.as_str());
    assert_eq!(lease_for(&app, "gpu-a", json!(["image_invert"])).await, None);
    assert_eq!(lease_for(&app, "gpu-a", json!([])).await, None, "an empty list runs nothing");
    assert_eq!(app.job(&ltxv).await["status"], "queued");
    // A worker that sends no list (older than preflight) gets any job, as before.
    let leased = app.lease("old-worker", 0.2).await.expect("the ltxv job");
    assert_eq!(leased["job_id"], ltxv.as_str());
}

#[tokio::test]
async fn reports_show_per_server_in_workflows_and_as_the_waiting_reason_of_a_queued_job() {
    let app = spawn_app().await;
    let id = submit_to(&app, LTXV).await;
    // No report yet: nothing is known, nothing is claimed.
    assert_eq!(app.job(&id).await["waiting_reason"], Value::Null);
    assert_eq!(workflow(&app, LTXV).await["ready"], Value::Null);
    assert_eq!(workflow(&app, LTXV).await["readiness"], json!([]));

    let missing = "node 44 (CheckpointLoaderSimple): ckpt_name 'ltx.safetensors' is not installed on http://gpu1:8188; installed: []";
    let resp = report(
        &app,
        json!({"worker_id": "w1/0", "server": "http://gpu1:8188", "reachable": true, "workflows": [
            {"name": LTXV, "ready": false, "problems": [missing]},
            {"name": "image_invert", "ready": true, "problems": []},
        ]}),
    )
    .await;
    assert_eq!(resp.status(), 204);
    let w = workflow(&app, LTXV).await;
    assert_eq!(w["ready"], false);
    assert_eq!(
        w["readiness"],
        json!([{"worker": "w1/0", "server": "http://gpu1:8188", "reachable": true, "ready": false, "problems": [missing]}])
    );
    assert_eq!(workflow(&app, "image_invert").await["ready"], true);
    let job = app.job(&id).await;
    assert_eq!(job["waiting_reason"], format!("no server can run {LTXV}: {missing}"));

    // A second server that can run it: the job no longer waits for a reason.
    let resp = report(
        &app,
        json!({"worker_id": "w1/1", "server": "http://gpu2:8188", "reachable": true, "workflows": [
            {"name": LTXV, "ready": true, "problems": []},
        ]}),
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(workflow(&app, LTXV).await["ready"], true);
    assert_eq!(app.job(&id).await["waiting_reason"], Value::Null);
    // Once running, a job has no waiting reason whatever the reports say.
    lease_for(&app, "w1/1", json!([LTXV])).await.expect("leased");
    assert_eq!(app.job(&id).await["waiting_reason"], Value::Null);
}

#[tokio::test]
async fn malformed_reports_and_lists_get_a_400_naming_the_field_and_limit() {
    let app = spawn_app().await;
    let names: Vec<String> = (0..1001).map(|i| format!("w{i}")).collect();
    let resp = app.post("/worker/lease").json(&json!({"worker_id": "w", "wait": 0, "workflows": names})).send().await;
    let (status, body) = error_of(resp.unwrap()).await;
    assert_eq!((status, body["field"].as_str(), body["limit"].as_u64()), (400, Some("workflows"), Some(1000)));

    let resp = report(&app, json!({"worker_id": "bad id", "server": "s", "reachable": true, "workflows": []})).await;
    let (status, body) = error_of(resp).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("worker_id")), "{body}");

    let problems: Vec<String> = (0..201).map(|i| format!("p{i}")).collect();
    let resp = report(
        &app,
        json!({"worker_id": "w", "server": "s", "reachable": true, "workflows": [{"name": LTXV, "ready": false, "problems": problems}]}),
    )
    .await;
    let (status, body) = error_of(resp).await;
    assert_eq!((status, body["field"].as_str(), body["limit"].as_u64()), (400, Some("workflows.problems"), Some(200)));

    let resp = report(&app, json!({"worker_id": "w", "server": "s"})).await;
    assert_eq!(error_of(resp).await.0, 400, "missing fields are a client error");
}

#[tokio::test]
async fn the_openapi_document_declares_the_report_route_and_the_lease_list() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").send().await.unwrap().json().await.unwrap();
    let route = &doc["paths"]["/worker/preflight"]["post"];
    assert!(route["requestBody"].is_object() && route["responses"]["204"].is_object(), "{route}");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["LeaseRequest"]["properties"]["workflows"]["maxItems"], 1000, "{}", schemas["LeaseRequest"]);
    assert!(schemas["PreflightReport"]["required"].as_array().unwrap().contains(&json!("workflows")));
    assert!(schemas["JobView"]["properties"]["waiting_reason"].is_object());
}

#[tokio::test]
async fn a_report_goes_with_its_worker_when_it_stops_calling() {
    let app = spawn_app().await;
    let id = submit_to(&app, LTXV).await;
    let resp = report(
        &app,
        json!({"worker_id": "gone", "server": "http://gpu9:8188", "reachable": true, "workflows": [
            {"name": LTXV, "ready": false, "problems": ["node 44 (CheckpointLoaderSimple): missing"]},
        ]}),
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert!(app.job(&id).await["waiting_reason"].is_string());
    // The worker counts as connected for 30 s after its last call (as in /health); then its
    // report no longer speaks for any server.
    tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    assert_eq!(app.health().await["workers_connected"], 0);
    assert_eq!(workflow(&app, LTXV).await["readiness"], json!([]));
    assert_eq!(app.job(&id).await["waiting_reason"], Value::Null);
}
