//! Tokens (API_TOKEN, WORKER_TOKEN) and the OpenAPI document.

use serde_json::{Value, json};

use crate::helpers::{error_of, png_form, spawn_with};

#[tokio::test]
async fn api_token_guards_every_route_but_health() {
    let app = spawn_with(|a| a.api_token = Some("client-secret".into())).await;
    let anon = reqwest::Client::new();
    assert_eq!(anon.get(app.url("/health")).send().await.unwrap().status(), 200);
    for path in ["/jobs", "/events", "/openapi.json", "/workflows"] {
        let (status, err) = error_of(anon.get(app.url(path)).send().await.unwrap()).await;
        assert_eq!((status, err["code"].as_str()), (401, Some("unauthorized")), "{path}");
    }
    let resp = anon.post(app.url("/jobs")).multipart(png_form("x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = anon.post(app.url("/jobs")).bearer_auth("wrong").multipart(png_form("x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(app.health().await["jobs_count"], 0, "refused submits store nothing");

    // The app's own client sends the right token.
    app.submit_png("allowed").await;
    let sse = anon.get(app.url("/events?token=client-secret")).send().await.unwrap();
    assert_eq!(sse.status(), 200);
    // Without WORKER_TOKEN, workers use the client token.
    assert!(app.lease("w", 1.0).await.is_some());
}

#[tokio::test]
async fn worker_token_is_required_on_worker_routes_and_the_client_token_is_refused_there() {
    let app = spawn_with(|a| {
        a.api_token = Some("client-secret".into());
        a.worker_token = Some("worker-secret".into());
    })
    .await;
    app.submit_png("job").await;
    let lease = |token: &'static str| {
        app.http.post(app.url("/worker/lease")).bearer_auth(token).json(&json!({"worker_id": "w", "wait": 0.5})).send()
    };
    assert_eq!(lease("client-secret").await.unwrap().status(), 401);
    let ok = lease("worker-secret").await.unwrap();
    assert_eq!(ok.status(), 200);
    // And the worker token opens no client route.
    let resp = app.http.get(app.url("/jobs")).bearer_auth("worker-secret").send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn openapi_document_is_3_1_and_covers_every_route() {
    let app = spawn_with(|_| {}).await;
    let doc: Value = app.get("/openapi.json").send().await.unwrap().json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let expected = [
        ("/jobs", "post"),
        ("/jobs", "get"),
        ("/jobs/{id}", "get"),
        ("/jobs/{id}", "delete"),
        ("/jobs/{id}/cancel", "post"),
        ("/jobs/{id}/result", "get"),
        ("/jobs/{id}/events", "get"),
        ("/events", "get"),
        ("/ws", "get"),
        ("/health", "get"),
        ("/workflows", "get"),
        ("/worker/lease", "post"),
        ("/worker/jobs/{id}/input", "get"),
        ("/worker/jobs/{id}/heartbeat", "post"),
        ("/worker/jobs/{id}/result", "put"),
        ("/worker/jobs/{id}/fail", "post"),
    ];
    for (path, method) in expected {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} missing from the spec");
        for (code, response) in op["responses"].as_object().unwrap() {
            assert!(
                response["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{method} {path} {code} lacks a description"
            );
        }
    }
    let submit = &doc["paths"]["/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"];
    assert!(submit.is_object(), "submit body is documented as multipart");
    // Everything the spec lists is actually routed (no 404 route_not_found for a documented path).
    for path in doc["paths"].as_object().unwrap().keys() {
        let concrete = path.replace("{id}", "9b2f6a4e-1d2c-4d3e-8f90-123456789abc");
        let resp = app.get(&concrete).send().await.unwrap();
        if resp.status() == 404 {
            let (_, err) = error_of(resp).await;
            assert_ne!(err["code"], "route_not_found", "{path} is documented but not routed");
        }
    }
}

#[tokio::test]
async fn workflows_are_listed_with_their_parameters() {
    let app = spawn_with(|_| {}).await;
    let body: Value = app.get("/workflows").send().await.unwrap().json().await.unwrap();
    assert_eq!(body["default"], "ltxv_image_to_video");
    let names: Vec<&str> = body["workflows"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"ltxv_image_to_video") && names.contains(&"image_invert"), "{names:?}");
    let ltxv = body["workflows"].as_array().unwrap().iter().find(|w| w["name"] == "ltxv_image_to_video").unwrap();
    let params: Vec<&str> =
        ltxv["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for p in ["image", "prompt", "negative", "seed"] {
        assert!(params.contains(&p), "ltxv lacks {p}: {params:?}");
    }
}
