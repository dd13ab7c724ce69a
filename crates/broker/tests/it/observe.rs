//! `GET /metrics` counted against the jobs a test ran, its token rules, the dashboard's routes and
//! the input frame route the dashboard shows.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::{SseReader, error_of, png_bytes, spawn_app, spawn_with};

/// The value of the sample `name{labels}` in a Prometheus text exposition (labels in any order,
/// all of them given).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').map_or((series, ""), |(m, r)| (m, r.trim_end_matches('}')));
        if metric != name {
            return None;
        }
        let mut have: Vec<(String, String)> = rest
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned())))
            .collect();
        let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        have.sort();
        want.sort();
        (have == want).then(|| value.parse().ok()).flatten()
    })
}

fn form(workflow: &str, stream: Option<&str>) -> Form {
    let mut f = Form::new()
        .part("image", Part::bytes(png_bytes(64, 40)).file_name("frame.png").mime_str("image/png").unwrap())
        .text("prompt", "metrics")
        .text("workflow", workflow.to_owned());
    if let Some(s) = stream {
        f = f.text("stream", s.to_owned()).text("mode", "latest");
    }
    f
}

async fn submit(app: &crate::helpers::TestApp, f: Form) -> String {
    let resp = app.submit(f).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    resp.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_owned()
}

async fn scrape(app: &crate::helpers::TestApp) -> String {
    let resp = app.get("/metrics").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    resp.text().await.unwrap()
}

#[tokio::test]
async fn scraped_counts_match_the_jobs_run() {
    let app = spawn_app().await;
    let ltx = "ltxv_image_to_video";
    let inv = "image_invert";
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit(&app, form(ltx, None)).await);
    }
    ids.push(submit(&app, form(inv, None)).await);
    // Two done (one of each workflow is leased first in claim order: ltx, ltx), one error.
    for (i, expected_done) in [true, true, false].into_iter().enumerate() {
        let lease = app.lease("w1", 1.0).await.expect("a job to lease");
        let (id, token) = (lease["job_id"].as_str().unwrap(), lease["lease_token"].as_str().unwrap());
        assert_eq!(id, ids[i]);
        if expected_done {
            let resp = app
                .put(&format!("/worker/jobs/{id}/result"))
                .header("lease-token", token)
                .header("content-type", "video/mp4")
                .header("comfy-execution-ms", "1500")
                .body(vec![7u8; 1000])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        } else {
            assert_eq!(app.fail(id, token, "boom", false).await.status(), 200);
        }
    }
    // The image_invert job is cancelled by a client, twice: the repeat is no second cancellation.
    for _ in 0..2 {
        assert_eq!(app.delete(&format!("/jobs/{}", ids[3])).send().await.unwrap().status(), 200);
    }
    // Latest wins: the second job of the stream supersedes the first; the second stays queued.
    submit(&app, form(inv, Some("cam"))).await;
    submit(&app, form(inv, Some("cam"))).await;
    let _sse = SseReader::new(app.get("/events").send().await.unwrap());
    let text = scrape(&app).await;

    let get = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels).unwrap_or(f64::NAN);
    assert_eq!(get("tdcomfy_jobs_submitted_total", &[("workflow", ltx)]), 3.0, "{text}");
    assert_eq!(get("tdcomfy_jobs_submitted_total", &[("workflow", inv)]), 3.0);
    assert_eq!(get("tdcomfy_jobs_finished_total", &[("workflow", ltx), ("outcome", "done")]), 2.0);
    assert_eq!(get("tdcomfy_jobs_finished_total", &[("workflow", ltx), ("outcome", "error")]), 1.0);
    assert_eq!(get("tdcomfy_jobs_finished_total", &[("workflow", inv), ("outcome", "cancelled")]), 1.0);
    assert_eq!(get("tdcomfy_jobs_finished_total", &[("workflow", inv), ("outcome", "superseded")]), 1.0);
    assert_eq!(get("tdcomfy_queue_depth", &[]), 1.0);
    assert_eq!(get("tdcomfy_jobs_running", &[]), 0.0);
    assert_eq!(get("tdcomfy_sse_subscribers", &[]), 1.0);
    assert_eq!(get("tdcomfy_websocket_subscribers", &[]), 0.0);
    // Three attempts started; two done jobs with 1.5 s of ComfyUI execution each.
    assert_eq!(get("tdcomfy_queue_wait_seconds_count", &[("workflow", ltx)]), 3.0);
    assert_eq!(get("tdcomfy_comfy_execution_seconds_count", &[("workflow", ltx)]), 2.0);
    assert_eq!(get("tdcomfy_comfy_execution_seconds_sum", &[("workflow", ltx)]), 3.0);
    assert_eq!(get("tdcomfy_broker_overhead_seconds_count", &[("workflow", ltx)]), 2.0);
    // Routes by template, never by job id.
    assert_eq!(get("tdcomfy_http_requests_total", &[("route", "/jobs"), ("status", "200")]), 6.0);
    assert_eq!(get("tdcomfy_http_requests_total", &[("route", "/jobs/{id}"), ("status", "200")]), 2.0);
    assert_eq!(get("tdcomfy_http_requests_total", &[("route", "/worker/jobs/{id}/result"), ("status", "200")]), 2.0);
    assert!(!text.contains(&ids[0]), "a job id leaked into a label");
    // Six frames and two 1000-byte results came in.
    let frame = png_bytes(64, 40).len() as f64;
    assert!(get("tdcomfy_http_received_bytes_total", &[]) >= 6.0 * frame + 2000.0);
    assert!(get("tdcomfy_http_sent_bytes_total", &[]) > 0.0);
    // The workers gauge reads the broker's registry (the worker leased within 30 s).
    assert_eq!(get("tdcomfy_workers_connected", &[]), 1.0);
    assert_eq!(get("tdcomfy_comfyui_servers_up", &[]), 0.0);

    // Closing the event stream takes it off the gauge.
    drop(_sse);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = scrape(&app).await;
        if sample(&text, "tdcomfy_sse_subscribers", &[]) == Some(0.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the SSE gauge stayed up after the stream closed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_ws_subscriber_and_a_refused_request_are_counted() {
    let app = spawn_with(|a| a.api_token = Some("client-secret".into())).await;
    let ws_url = format!("{}/ws?token=client-secret", app.base.replace("http://", "ws://"));
    let (_ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let refused = app.http.get(app.url("/jobs")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let text = scrape(&app).await;
    assert_eq!(sample(&text, "tdcomfy_websocket_subscribers", &[]), Some(1.0), "{text}");
    assert_eq!(sample(&text, "tdcomfy_http_requests_total", &[("route", "/jobs"), ("status", "401")]), Some(1.0));
}

#[tokio::test]
async fn metrics_need_the_api_or_metrics_token_when_one_is_set() {
    let app = spawn_with(|a| {
        a.api_token = Some("client-secret".into());
        a.observe.metrics_token = Some("scrape-secret".into());
    })
    .await;
    let url = app.url("/metrics");
    let (status, err) = error_of(app.http.get(&url).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (401, Some("unauthorized")));
    assert!(err["message"].as_str().unwrap().contains("METRICS_TOKEN"), "{err}");
    assert_eq!(app.http.get(&url).bearer_auth("wrong").send().await.unwrap().status(), 401);
    assert_eq!(app.http.get(&url).bearer_auth("scrape-secret").send().await.unwrap().status(), 200);
    assert_eq!(app.http.get(&url).bearer_auth("client-secret").send().await.unwrap().status(), 200);
    // The scrape token reads metrics only.
    assert_eq!(app.http.get(app.url("/jobs")).bearer_auth("scrape-secret").send().await.unwrap().status(), 401);

    // Without any token, /metrics is open like every client route.
    let open = spawn_app().await;
    assert_eq!(open.http.get(open.url("/metrics")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn the_dashboard_is_served_without_a_token_and_can_be_turned_off() {
    let app = spawn_with(|a| a.api_token = Some("client-secret".into())).await;
    let page = app.http.get(app.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/dashboard/app.js"), "{html}");
    for (file, ct) in [("app.js", "text/javascript"), ("api.js", "text/javascript"), ("style.css", "text/css")] {
        let resp = app.http.get(app.url(&format!("/dashboard/{file}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{file}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with(ct), "{file}");
        assert!(!resp.text().await.unwrap().is_empty(), "{file}");
    }
    // An unknown file is a JSON 404, and it is not a way around the token.
    let (status, err) = error_of(app.http.get(app.url("/dashboard/secret.js")).send().await.unwrap()).await;
    assert_eq!(status, 401, "{err}");

    let off = spawn_with(|a| a.observe.dashboard = "off".into()).await;
    let (status, err) = error_of(off.http.get(off.url("/")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("route_not_found")));
    assert_eq!(off.http.get(off.url("/dashboard/app.js")).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn a_jobs_input_frame_is_readable_until_its_files_go() {
    let app = spawn_with(|a| a.api_token = Some("client-secret".into())).await;
    let id = submit(&app, crate::helpers::png_form("frame")).await;
    let resp = app.get(&format!("/jobs/{id}/input")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), png_bytes(64, 40));
    // Behind the client token like the result.
    assert_eq!(app.http.get(app.url(&format!("/jobs/{id}/input"))).send().await.unwrap().status(), 401);
    assert_eq!(app.delete(&format!("/jobs/{id}")).send().await.unwrap().status(), 200);
    let (status, err) = error_of(app.get(&format!("/jobs/{id}/input")).send().await.unwrap()).await;
    assert_eq!((status, err["code"].as_str()), (410, Some("input_gone")));
}

#[tokio::test]
async fn the_grafana_dashboard_uses_only_metrics_the_broker_exposes() {
    let app = spawn_app().await;
    // One job of every outcome-labelled kind is not needed: every family is declared in the
    // exposition from the start (HELP/TYPE), and the histograms' series appear with a job.
    let id = submit(&app, crate::helpers::png_form("grafana")).await;
    let lease = app.lease("w", 1.0).await.unwrap();
    let token = lease["lease_token"].as_str().unwrap();
    let resp = app
        .put(&format!("/worker/jobs/{id}/result"))
        .header("lease-token", token)
        .header("content-type", "video/mp4")
        .header("comfy-execution-ms", "10")
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = scrape(&app).await;
    let exposed: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .chain(text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()))
        .collect();
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana-dashboard.json")).unwrap();
    let _: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut used: Vec<&str> = Vec::new();
    let mut rest = dashboard.as_str();
    while let Some(i) = rest.find("tdcomfy_") {
        let name_len = rest[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len() - i);
        used.push(&rest[i..i + name_len]);
        rest = &rest[i + name_len..];
    }
    assert!(used.len() >= 10, "{used:?}");
    for name in used {
        assert!(exposed.contains(name), "deploy/grafana-dashboard.json uses {name}, which /metrics does not expose");
    }
}

#[tokio::test]
async fn batched_events_arrive_together_in_order_and_resume_like_the_others() {
    use futures_util::StreamExt;
    let app = spawn_app().await;
    let (status, err) = error_of(app.get("/events?batch_ms=5000").send().await.unwrap()).await;
    assert_eq!((status, err["field"].as_str(), err["limit"].as_u64()), (400, Some("batch_ms"), Some(1000)));

    let resp = app.get("/events?batch_ms=300").send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut chunks = resp.bytes_stream();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(submit(&app, crate::helpers::png_form("batch")).await);
    }
    let mut text = String::new();
    let mut writes = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while text.matches("event: queued").count() < 5 {
        let chunk =
            tokio::time::timeout_at(deadline, chunks.next()).await.expect("five queued events").unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        writes += 1;
    }
    // Five events published within the window: at most a couple of writes, not five.
    assert!(writes <= 2, "{writes} writes for 5 events:\n{text}");
    let seen: Vec<String> = text
        .split("\n\n")
        .filter_map(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|data| serde_json::from_str::<Value>(data).unwrap()["job_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, ids, "every event, in publication order");
    let event_ids: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(event_ids.len(), 5);

    // Resuming a batched stream after the second event replays the three after it.
    let resumed = app.get("/events?batch_ms=100").header("last-event-id", event_ids[1]).send().await.unwrap();
    let mut reader = SseReader::new(resumed);
    for expected in &ids[2..] {
        let (name, data) = reader.next(5.0).await.expect("a replayed event");
        assert_eq!((name.as_str(), data["job_id"].as_str()), ("queued", Some(expected.as_str())));
    }
}
