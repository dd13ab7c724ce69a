//! Tokens (API_TOKEN, WORKER_TOKEN), worker routes on a LAN, browser origins (ALLOWED_ORIGINS),
//! broker faults, and the OpenAPI document.

use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{error_of, png_form, spawn_configured, spawn_with, test_args, test_workflows};

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
    // The 403s a browser origin or a remote worker meets are documented where they happen.
    for (path, method) in
        [("/jobs", "post"), ("/jobs/{id}", "delete"), ("/ws", "get"), ("/events", "get"), ("/worker/lease", "post")]
    {
        assert!(doc["paths"][path][method]["responses"]["403"].is_object(), "{method} {path} lacks its 403");
    }
    assert!(
        doc["paths"]["/worker/jobs/{id}/input"]["get"]["responses"]["403"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("WORKER_TOKEN"))
    );
    assert!(doc["paths"]["/jobs"]["get"]["responses"]["403"].is_null(), "reads are not origin-checked");
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

/// Every route but `/health` and `/openapi.json`, with a body that gets past its extractor.
fn routes(id: &str) -> Vec<(Method, String, Option<Value>)> {
    let lease = json!({"lease_token": "t", "progress": null});
    vec![
        (Method::POST, "/jobs".into(), None),
        (Method::GET, "/jobs".into(), None),
        (Method::GET, format!("/jobs/{id}"), None),
        (Method::DELETE, format!("/jobs/{id}"), None),
        (Method::POST, format!("/jobs/{id}/cancel"), None),
        (Method::GET, format!("/jobs/{id}/result"), None),
        (Method::GET, format!("/jobs/{id}/events"), None),
        (Method::GET, "/events".into(), None),
        (Method::GET, "/ws".into(), None),
        (Method::GET, "/workflows".into(), None),
        (Method::POST, "/worker/lease".into(), Some(json!({"worker_id": "w", "wait": 0}))),
        (Method::GET, format!("/worker/jobs/{id}/input"), None),
        (Method::POST, format!("/worker/jobs/{id}/heartbeat"), Some(lease)),
        (Method::PUT, format!("/worker/jobs/{id}/result"), None),
        (Method::POST, format!("/worker/jobs/{id}/fail"), Some(json!({"lease_token": "t", "message": "m"}))),
    ]
}

fn request(
    http: &reqwest::Client,
    base: &str,
    (method, path, body): &(Method, String, Option<Value>),
) -> reqwest::RequestBuilder {
    let rb = http.request(method.clone(), format!("{base}{path}"));
    match (method, path.as_str(), body) {
        (_, _, Some(b)) => rb.json(b),
        (&Method::POST, "/jobs", None) => rb.multipart(png_form("refused?")),
        (&Method::PUT, _, None) => rb.header("lease-token", "t").body(b"mp4".to_vec()),
        _ => rb,
    }
}

#[tokio::test]
async fn every_route_refuses_a_missing_or_wrong_token_and_the_other_side_s_token() {
    let app = spawn_with(|a| {
        a.api_token = Some("client-secret".into());
        a.worker_token = Some("worker-secret".into());
    })
    .await;
    let id = app.submit_png("guarded").await;
    let anon = reqwest::Client::new();
    for route in routes(&id) {
        let worker_route = route.1.starts_with("/worker/");
        let other_side = if worker_route { "client-secret" } else { "worker-secret" };
        let attempts = [
            ("no token", request(&anon, &app.base, &route)),
            ("a wrong token", request(&anon, &app.base, &route).bearer_auth("wrong")),
            ("the other side's token", request(&anon, &app.base, &route).bearer_auth(other_side)),
        ];
        for (what, rb) in attempts {
            let (status, err) = error_of(rb.send().await.unwrap()).await;
            assert_eq!(
                (status, err["code"].as_str()),
                (401, Some("unauthorized")),
                "{} {} with {what}",
                route.0,
                route.1
            );
            let needed = if worker_route { "WORKER_TOKEN" } else { "API_TOKEN" };
            assert!(err["message"].as_str().unwrap().contains(needed), "{}: {err}", route.1);
        }
    }
    // Nothing of that reached the job.
    let job = app.job(&id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("queued"), Some(0)), "{job}");
    assert_eq!(app.health().await["jobs_count"], 1, "no refused submit was stored");
}

#[tokio::test]
async fn a_query_token_is_taken_only_on_the_push_routes() {
    let app = spawn_with(|a| a.api_token = Some("client-secret".into())).await;
    let id = app.submit_png("query token").await;
    let anon = reqwest::Client::new();
    for path in ["/jobs".to_owned(), format!("/jobs/{id}"), "/workflows".into(), "/openapi.json".into()] {
        let (status, _) =
            error_of(anon.get(app.url(&format!("{path}?token=client-secret"))).send().await.unwrap()).await;
        assert_eq!(status, 401, "{path} took ?token=");
    }
    let resp = anon.delete(app.url(&format!("/jobs/{id}?token=client-secret"))).send().await.unwrap();
    assert_eq!(resp.status(), 401, "DELETE took ?token=");
    for path in ["/events".to_owned(), format!("/jobs/{id}/events")] {
        let resp = anon.get(app.url(&format!("{path}?token=client-secret"))).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let ws = app.base.replace("http://", "ws://");
    tokio_tungstenite::connect_async(format!("{ws}/ws?token=client-secret")).await.expect("/ws takes ?token=");
    assert_eq!(app.job(&id).await["status"], "queued");
}

#[tokio::test]
async fn without_a_token_worker_routes_refuse_a_lan_peer_with_a_403_naming_worker_token() {
    // The broker sees 127.0.0.1 as a LAN peer here (a test hook): this machine has no other
    // address a test may use.
    let app = spawn_configured(|_| {}, |c| c.net.loopback_is_remote = true).await;
    let id = app.submit_png("from TouchDesigner on the LAN").await;
    for route in routes(&id).into_iter().filter(|r| r.1.starts_with("/worker/")) {
        let (status, err) = error_of(request(&app.http, &app.base, &route).send().await.unwrap()).await;
        assert_eq!(
            (status, err["code"].as_str(), err["field"].as_str()),
            (403, Some("worker_token_required"), Some("WORKER_TOKEN")),
            "{} {}: {err}",
            route.0,
            route.1
        );
        assert!(err["message"].as_str().unwrap().contains("WORKER_TOKEN"), "{err}");
    }
    let job = app.job(&id).await;
    assert_eq!(
        (job["status"].as_str(), job["attempts"].as_u64()),
        (Some("queued"), Some(0)),
        "nobody leased it: {job}"
    );
    // The client API stays open to the LAN without a token, as the original TD scripts expect.
    let resp = app.delete(&format!("/jobs/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn without_a_token_a_worker_request_forwarded_by_a_local_reverse_proxy_is_refused() {
    let app = spawn_with(|_| {}).await;
    app.submit_png("behind caddy").await;
    for (header, value) in
        [("x-forwarded-for", "203.0.113.9"), ("forwarded", "for=203.0.113.9"), ("x-real-ip", "203.0.113.9")]
    {
        let resp = app
            .http
            .post(app.url("/worker/lease"))
            .header(header, value)
            .json(&json!({"worker_id": "w", "wait": 0}))
            .send()
            .await
            .unwrap();
        let (status, err) = error_of(resp).await;
        assert_eq!((status, err["field"].as_str()), (403, Some("WORKER_TOKEN")), "{header}: {err}");
    }
}

#[tokio::test]
async fn with_a_worker_token_a_lan_worker_gets_in() {
    let app =
        spawn_configured(|a| a.worker_token = Some("worker-secret".into()), |c| c.net.loopback_is_remote = true).await;
    let id = app.submit_png("leased by a remote worker").await;
    let resp = app
        .http
        .post(app.url("/worker/lease"))
        .bearer_auth("worker-secret")
        .json(&json!({"worker_id": "gpu-box", "wait": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["job"]["job_id"], id);
}

#[tokio::test]
async fn without_a_token_this_machine_s_worker_still_leases() {
    let app = spawn_with(|_| {}).await;
    let id = app.submit_png("local worker").await;
    assert_eq!(app.lease("local", 1.0).await.expect("leased")["job_id"], id);
}

#[tokio::test]
async fn a_foreign_browser_origin_is_refused_on_every_mutating_and_push_route() {
    let app = spawn_with(|a| a.net.allowed_origins = "https://dashboard.example".into()).await;
    let id = app.submit_png("a page tries to cancel me").await;
    let evil = "http://evil.example";
    for route in routes(&id) {
        let guarded = route.0 != Method::GET || route.1.ends_with("events") || route.1 == "/ws";
        let resp = request(&app.http, &app.base, &route).header("origin", evil).send().await.unwrap();
        if guarded {
            let (status, err) = error_of(resp).await;
            assert_eq!(
                (status, err["code"].as_str(), err["field"].as_str()),
                (403, Some("origin_not_allowed"), Some("ALLOWED_ORIGINS")),
                "{} {}: {err}",
                route.0,
                route.1
            );
            assert!(err["message"].as_str().unwrap().contains(evil), "{err}");
        } else {
            // A read: the browser's same-origin policy keeps the page from seeing the answer.
            assert_ne!(resp.status(), 403, "{} {}", route.0, route.1);
        }
    }
    // The WebSocket handshake a page would make.
    let ws = app.base.replace("http://", "ws://");
    let mut req = format!("{ws}/ws").into_client_request().unwrap();
    req.headers_mut().insert("origin", evil.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a foreign page opened /ws: {:?}", other.map(|_| ())),
    }
    let job = app.job(&id).await;
    assert_eq!(job["status"], "queued", "nothing the page sent reached the job");
    assert_eq!(app.health().await["jobs_count"], 1, "the page submitted nothing");

    // The broker's own pages, ALLOWED_ORIGINS and clients without Origin pass.
    for origin in [Some(app.base.as_str()), Some("https://dashboard.example"), None] {
        let mut rb = app.http.post(app.url("/jobs")).multipart(png_form("allowed"));
        if let Some(o) = origin {
            rb = rb.header("origin", o);
        }
        assert_eq!(rb.send().await.unwrap().status(), 200, "{origin:?}");
        let mut req = format!("{ws}/ws").into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req).await.unwrap_or_else(|e| panic!("{origin:?} refused on /ws: {e}"));
    }
    // Behind a TLS-terminating proxy the broker's own pages are https while it speaks http; another
    // port of the same host is another origin.
    let https_self = app.base.replace("http://", "https://");
    let resp =
        app.post("/jobs").header("origin", https_self.as_str()).multipart(png_form("proxied")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let other_port = format!("{}1", app.base);
    let resp = app.post("/jobs").header("origin", other_port.as_str()).multipart(png_form("x")).send().await.unwrap();
    assert_eq!(resp.status(), 403, "{other_port}");
    let resp = app.delete(&format!("/jobs/{id}")).header("origin", "https://dashboard.example").send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_template_s_placeholder_tokens_stop_the_broker_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    for (api, worker, name) in [
        (Some("change-me-client-token"), None, "API_TOKEN"),
        (Some("a-real-secret"), Some("change-me-worker-token"), "WORKER_TOKEN"),
    ] {
        let mut args = test_args(dir.path().join("data"));
        args.api_token = api.map(str::to_owned);
        args.worker_token = worker.map(str::to_owned);
        let err = args.into_config(test_workflows()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{name}: still the template's placeholder")), "{err}");
    }
}

#[tokio::test]
async fn a_broker_fault_answers_a_fixed_500_without_internals() {
    let app = spawn_with(|_| {}).await;
    app.health().await; // the data directory is open
    // The staging folder vanishes under the running broker (a disk gone read-only, a cleanup job).
    let tmp = app.args.data_dir.join("files").join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    let (status, err) = error_of(app.submit(png_form("disk fault")).await).await;
    assert_eq!((status, err["code"].as_str()), (500, Some("internal_error")), "{err}");
    let message = err["message"].as_str().unwrap();
    assert_eq!(message, "the broker failed to handle this request; its log has the details");
    assert!(!message.contains(tmp.to_str().unwrap()) && !message.contains("No such file"), "{message}");
}

#[tokio::test]
async fn served_results_carry_nosniff() {
    let app = spawn_with(|_| {}).await;
    let id = app.submit_png("sniff").await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let body = b"<html><script>alert(1)</script>".to_vec();
    assert_eq!(app.put_result(&id, lease["lease_token"].as_str().unwrap(), body).await.status(), 200);
    let resp = app.get(&format!("/jobs/{id}/result")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    assert_eq!(resp.headers()["content-type"], "video/mp4");
}
