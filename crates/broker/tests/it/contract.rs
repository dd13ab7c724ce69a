//! What schemathesis found when fuzzing `/openapi.json`: every answer is the documented JSON error,
//! and the document states the bounds and token rules the handlers actually enforce.

use serde_json::{Value, json};

use crate::helpers::{error_of, spawn_app, spawn_with};

#[tokio::test]
async fn since_past_int64_is_a_400_not_a_silent_answer() {
    let app = spawn_app().await;
    let id = app.submit_png("x").await;
    let (status, err) = error_of(app.get(&format!("/jobs/{id}?since=9223372036854775808")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str(), err["field"].as_str()), (400, Some("invalid_since"), Some("since")));
    // The largest int64 is still a valid `since`.
    let ok = app.get(&format!("/jobs/{id}?since=9223372036854775807")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn an_oversized_json_body_is_a_413_naming_the_limit() {
    // JSON bodies are capped at 64 KiB whatever MAX_UPLOAD_MB is (issue 8: one bad client must
    // not make the broker buffer megabytes per request).
    let app = spawn_app().await;
    let body = format!(r#"{{"worker_id":"w","pad":"{}"}}"#, "a".repeat(8 << 20));
    let resp = app.post("/worker/lease").header("content-type", "application/json").body(body).send().await.unwrap();
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["code"].as_str()), (413, Some("payload_too_large")));
    assert_eq!(err["limit"], 64 << 10);
}

async fn document(app: &crate::helpers::TestApp) -> Value {
    app.get("/openapi.json").send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn the_document_states_the_bounds_the_handlers_enforce() {
    let app = spawn_app().await;
    let doc = document(&app).await;
    let schemas = &doc["components"]["schemas"];
    let worker_id = &schemas["LeaseRequest"]["properties"]["worker_id"];
    assert_eq!((worker_id["minLength"].as_u64(), worker_id["maxLength"].as_u64()), (Some(1), Some(128)));
    assert_eq!(schemas["LeaseRequest"]["properties"]["wait"]["maximum"], 60);
    assert_eq!(schemas["Progress"]["properties"]["value"]["maximum"], 1);
    let form = &schemas["SubmitForm"]["properties"];
    assert_eq!(form["prompt"]["maxLength"], 10_000);
    let workflows = form["workflow"]["enum"].as_array().expect("workflow names are listed");
    assert!(workflows.contains(&json!("ltxv_image_to_video")), "{workflows:?}");

    // And the handlers agree: one past each bound is a 400 naming the field.
    let lease = |body: Value| app.post("/worker/lease").json(&body).send();
    let (status, err) = error_of(lease(json!({"worker_id": "", "wait": 0})).await.unwrap()).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("worker_id")));
    let (status, err) = error_of(lease(json!({"worker_id": "w", "wait": 60.5})).await.unwrap()).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("wait")));

    // Every documented 400 of the worker routes that read a Lease-Token or JSON is declared.
    for (path, method) in [
        ("/worker/jobs/{id}/input", "get"),
        ("/worker/jobs/{id}/result", "put"),
        ("/worker/jobs/{id}/heartbeat", "post"),
        ("/worker/jobs/{id}/fail", "post"),
    ] {
        assert!(doc["paths"][path][method]["responses"]["400"].is_object(), "{method} {path} documents 400");
    }
    let id = app.submit_png("x").await;
    let resp = app.post(&format!("/worker/jobs/{id}/heartbeat")).send().await.unwrap();
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_json")));
}

#[tokio::test]
async fn the_document_declares_bearer_auth_exactly_when_a_token_is_set() {
    let open = spawn_app().await;
    let doc = document(&open).await;
    assert!(doc["paths"]["/jobs"]["get"]["security"].is_null(), "no token: no security requirement");
    assert!(doc["paths"]["/jobs"]["get"]["responses"]["401"].is_null());

    let guarded = spawn_with(|a| a.api_token = Some("client-secret".into())).await;
    let doc = document(&guarded).await;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let declared = op["security"] == json!([{ "bearer": [] }]) && op["responses"]["401"].is_object();
            assert_eq!(declared, path != "/health", "{method} {path}");
        }
    }

    // WORKER_TOKEN alone guards the worker routes only.
    let workers_only = spawn_with(|a| a.worker_token = Some("worker-secret".into())).await;
    let doc = document(&workers_only).await;
    assert!(doc["paths"]["/worker/lease"]["post"]["security"].is_array());
    assert!(doc["paths"]["/jobs"]["post"]["security"].is_null());
}
