//! ComfyUI after 0.3.64 against the fake, each mechanism where the server has it and its fallback
//! where it does not: feature detection per connection, `GET /api/jobs/{id}`, the atomic jobs
//! cancel, `max_upload_size`, `extra_data.preview_method`, tokens, and what every request carries.

use std::time::Duration;

use serde_json::{Value, json};
use tdcomfy_comfy::{
    ClientId, ComfyClient, ComfyError, ComfyTimeouts, ImageUpload, PreviewMethod, PromptId, PromptOptions,
    PromptRunner, RunFailureKind, RunUpdate,
};
use tokio_util::sync::CancellationToken;

use crate::fake::{Fake, OnPrompt, success_entry};
use crate::run::{config, drain_within, graph, until, video_outputs};

/// Waits (bounded) until the client's view of the server's features satisfies `what`.
async fn features_until(client: &ComfyClient, what: impl Fn(&tdcomfy_comfy::ServerFeatures) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !what(&client.features()) {
        assert!(tokio::time::Instant::now() < deadline, "features never became as expected: {:?}", client.features());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn newer_features(max_upload: u64) -> Value {
    json!({"supports_preview_metadata": true, "max_upload_size": max_upload, "supports_model_type_tags": true})
}

#[tokio::test]
async fn features_are_found_out_per_connection_and_again_after_a_reconnect() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let client = runner.client().clone();
    // 0.3.64: no jobs API, no /features.
    features_until(&client, |f| f.jobs_api == Some(false)).await;
    assert_eq!(client.features().max_upload_size, None);
    assert_eq!(client.features().jobs_cancel, Some(false), "no jobs API, so no jobs cancel");
    let probes = fake.requests("GET", "/api/jobs");
    assert!(
        probes.iter().any(|r| r.body["limit"] == "1" && r.body.get("status").is_none()),
        "detected with GET /api/jobs?limit=1: {probes:?}"
    );
    assert!(probes.iter().all(|r| r.body.get("sort_by").is_none()), "never sort_by (C2): {probes:?}");

    // The server is upgraded behind the same address; the socket drops and comes back.
    fake.with(|s| {
        s.jobs_api = true;
        s.jobs_cancel = true;
        s.features = Some(newer_features(4096));
    });
    fake.close_sockets();
    features_until(&client, |f| f.jobs_api == Some(true) && f.max_upload_size == Some(4096)).await;
    let features = client.features();
    assert_eq!(features.supports_preview_metadata, Some(true));
    assert!(features.connection >= 2, "found for the new connection: {features:?}");
    assert_eq!(features.jobs_cancel, None, "cancel is found out at the first cancel");
}

#[tokio::test]
async fn the_socket_feature_flags_reply_is_read() {
    let fake = Fake::start().await;
    // Only the socket tells: /features is absent (answers 404) until the reply set it.
    fake.with(|s| s.features = Some(newer_features(777)));
    let runner = PromptRunner::new(fake.client(), config());
    fake.wait_until("the handshake", |s| s.requests.iter().any(|r| r.path == "feature_flags")).await;
    let hello = fake.requests("WS", "feature_flags");
    assert_eq!(hello[0].body["supports_preview_metadata"], true, "the client asks for preview metadata");
    features_until(runner.client(), |f| f.max_upload_size == Some(777)).await;
}

#[tokio::test]
async fn a_frame_over_max_upload_size_is_refused_before_a_byte_is_sent() {
    let fake = Fake::start().await;
    fake.with(|s| s.features = Some(newer_features(1000)));
    let client = fake.client();
    let error =
        client.upload_image(ImageUpload::from_bytes("frame.png", vec![7u8; 5000])).await.expect_err("too large");
    assert!(matches!(error, ComfyError::UploadTooLarge { size: 5000, limit: Some(1000), .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("5000 bytes") && message.contains("max_upload_size 1000 bytes"), "{message}");
    assert!(!error.is_transient(), "retrying cannot shrink the frame");
    assert!(fake.requests("POST", "/upload/image").is_empty(), "nothing was uploaded");
    // A frame under the limit goes through.
    client.upload_image(ImageUpload::from_bytes("frame.png", vec![7u8; 500])).await.expect("small frame");

    // A server that does not advertise its limit and answers 413 (0.3.64 with a smaller
    // --max-upload-size): the same clear error, without a limit to name.
    let old = Fake::start().await;
    old.with(|s| s.max_upload = Some(1000));
    let error =
        old.client().upload_image(ImageUpload::from_bytes("frame.png", vec![7u8; 5000])).await.expect_err("413");
    assert!(matches!(error, ComfyError::UploadTooLarge { size: 5000, limit: None, .. }), "{error:?}");
}

#[tokio::test]
async fn with_the_jobs_api_where_the_prompt_is_comes_from_api_jobs_id() {
    let fake = Fake::start().await;
    fake.with(|s| s.jobs_api = true);
    let runner = PromptRunner::new(fake.client(), config());
    features_until(runner.client(), |f| f.jobs_api == Some(true)).await;
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.complete(&key, success_entry(&key, video_outputs()));
    let outputs = drain_within(&mut run, &mut seen, Duration::from_secs(20)).await.expect("finished");
    assert_eq!(outputs[0].filename, "ltxv_00001_.mp4");
    let lookups = fake.requests("GET", "/api/jobs/{id}");
    assert!(lookups.iter().any(|r| r.body == json!(key)), "asked GET /api/jobs/{key}: {lookups:?}");
    assert!(fake.requests("GET", "/queue").is_empty(), "never the queue with its graphs");
}

#[tokio::test]
async fn with_the_jobs_api_a_prompt_the_server_does_not_know_is_lost() {
    let fake = Fake::start().await;
    fake.with(|s| {
        s.jobs_api = true;
        s.on_prompt = OnPrompt::Forget;
    });
    let runner = PromptRunner::new(fake.client(), config());
    features_until(runner.client(), |f| f.jobs_api == Some(true)).await;
    let failure = tokio::time::timeout(
        Duration::from_secs(20),
        runner.run_prompt(graph(), PromptId::new(), CancellationToken::new()).finish(),
    )
    .await
    .expect("outcome")
    .expect_err("lost");
    assert_eq!(failure.kind, RunFailureKind::Lost);
    assert!(fake.requests("GET", "/api/jobs/{id}").len() >= 3, "404s counted as absent");
    assert!(fake.requests("GET", "/queue").is_empty());
}

#[tokio::test]
async fn an_ambiguous_submission_is_confirmed_through_api_jobs_id_and_not_posted_twice() {
    let fake = Fake::start().await;
    fake.with(|s| {
        s.jobs_api = true;
        s.on_prompt = OnPrompt::QueueThenDrop;
    });
    let runner = PromptRunner::new(fake.client(), config());
    features_until(runner.client(), |f| f.jobs_api == Some(true)).await;
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain_within(&mut run, &mut seen, Duration::from_secs(20)).await.expect("finished");
    assert_eq!(fake.requests("POST", "/prompt").len(), 1, "ComfyUI had it: posted once");
}

async fn cancel_while_running(fake: &Fake, runner: &PromptRunner) -> PromptId {
    let id = PromptId::new();
    let cancel = CancellationToken::new();
    let mut run = runner.run_prompt(graph(), id.clone(), cancel.clone());
    let mut seen = Vec::new();
    fake.push(json!({"type": "executing", "data": {"node": "2", "prompt_id": id.to_string()}}));
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    cancel.cancel();
    let failure = drain_within(&mut run, &mut seen, Duration::from_secs(20)).await.expect_err("cancelled");
    assert_eq!(failure.kind, RunFailureKind::Interrupted);
    assert!(fake.with(|s| !s.running.contains(&id.to_string()) && !s.pending.contains(&id.to_string())));
    id
}

#[tokio::test]
async fn cancel_is_the_atomic_jobs_cancel_where_the_server_has_it() {
    let fake = Fake::start().await;
    fake.with(|s| {
        s.jobs_api = true;
        s.jobs_cancel = true;
    });
    let runner = PromptRunner::new(fake.client(), config());
    features_until(runner.client(), |f| f.jobs_api == Some(true)).await;
    let id = cancel_while_running(&fake, &runner).await;
    let cancels = fake.requests("POST", "/api/jobs/{id}/cancel");
    assert_eq!(cancels.first().map(|r| r.body.clone()), Some(json!(id.to_string())), "{cancels:?}");
    assert!(fake.requests("POST", "/interrupt").is_empty(), "no check-then-interrupt");
    assert!(fake.requests("POST", "/queue").is_empty(), "no queue delete");
    assert_eq!(runner.client().features().jobs_cancel, Some(true));
}

#[tokio::test]
async fn without_the_jobs_cancel_a_cancel_deletes_and_interrupts_by_prompt_id() {
    let fake = Fake::start().await;
    // The jobs API (C1) came months before its cancel (C3).
    fake.with(|s| s.jobs_api = true);
    let runner = PromptRunner::new(fake.client(), config());
    features_until(runner.client(), |f| f.jobs_api == Some(true)).await;
    let first = cancel_while_running(&fake, &runner).await;
    let interrupts = fake.requests("POST", "/interrupt");
    assert!(interrupts.iter().any(|r| r.body["prompt_id"] == first.to_string()), "{interrupts:?}");
    assert_eq!(runner.client().features().jobs_cancel, Some(false), "the 404 is remembered");
    cancel_while_running(&fake, &runner).await;
    assert_eq!(fake.requests("POST", "/api/jobs/{id}/cancel").len(), 1, "asked once per connection");

    // 0.3.64: no jobs API at all, so the jobs cancel is never tried.
    let old = Fake::start().await;
    let runner = PromptRunner::new(old.client(), config());
    features_until(runner.client(), |f| f.jobs_api == Some(false)).await;
    cancel_while_running(&old, &runner).await;
    assert!(old.requests("POST", "/api/jobs/{id}/cancel").is_empty());
    assert!(!old.requests("POST", "/interrupt").is_empty());
}

#[tokio::test]
async fn every_prompt_names_its_preview_method_client_and_a_lowercase_uuid4() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let first = PromptId::new();
    let run = runner.run_prompt(graph(), first.clone(), CancellationToken::new());
    fake.wait_until("first prompt", |s| s.requests.iter().any(|r| r.path == "/prompt")).await;
    fake.complete(first.as_str(), success_entry(first.as_str(), video_outputs()));
    run.finish().await.expect("first");
    let options = PromptOptions { preview_method: Some(PreviewMethod::Auto) };
    let second = PromptId::new();
    let run = runner.run_prompt_with(graph(), second.clone(), CancellationToken::new(), options);
    fake.wait_until("second prompt", |s| s.requests.iter().filter(|r| r.path == "/prompt").count() == 2).await;
    fake.complete(second.as_str(), success_entry(second.as_str(), video_outputs()));
    run.finish().await.expect("second");

    let posts = fake.requests("POST", "/prompt");
    assert_eq!(posts[0].body["extra_data"]["preview_method"], "none", "previews off unless asked (C5)");
    assert_eq!(posts[1].body["extra_data"]["preview_method"], "auto");
    for post in &posts {
        assert_eq!(post.body["client_id"], runner.client().client_id().as_str(), "always the socket's id (C6)");
        let id = post.body["prompt_id"].as_str().expect("prompt id");
        let canonical = uuid::Uuid::parse_str(id).expect("a uuid").hyphenated().to_string();
        assert_eq!(id, canonical, "canonical lowercase hyphenated (C4)");
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4, "a v4 UUID");
    }
    let socket_id = runner.client().client_id().as_str().to_owned();
    assert!(fake.with(|s| s.ws_client_ids.iter().all(|c| *c == socket_id)), "one client id for socket and prompts");
}

fn token_client(fake: &Fake, token: Option<&str>) -> ComfyClient {
    let timeouts = ComfyTimeouts {
        connect: Duration::from_secs(2),
        request: Duration::from_secs(5),
        upload: Duration::from_secs(10),
        read_idle: Duration::from_secs(5),
    };
    ComfyClient::with_token(fake.endpoint(), ClientId::new(), timeouts, token.map(str::to_owned)).expect("client")
}

#[tokio::test]
async fn a_refused_token_is_one_clear_failure_not_a_retry_loop() {
    let fake = Fake::start().await;
    fake.with(|s| s.require_token = Some("s3cret".into()));
    for (token, words) in [(None, "requires a token"), (Some("wrong"), "refused the token")] {
        let posts = || fake.with(|s| s.headers.iter().filter(|(path, _)| path == "/prompt").count());
        let before = posts();
        // The socket is refused too; no point waiting long for it before the post.
        let quick = tdcomfy_comfy::RunConfig { socket_wait: Duration::from_millis(200), ..config() };
        let runner = PromptRunner::new(token_client(&fake, token), quick);
        let failure = tokio::time::timeout(
            Duration::from_secs(10),
            runner.run_prompt(graph(), PromptId::new(), CancellationToken::new()).finish(),
        )
        .await
        .expect("quick outcome")
        .expect_err("refused");
        assert_eq!(failure.kind, RunFailureKind::Unauthorized);
        assert!(!failure.kind.is_retryable());
        assert!(failure.message.contains(words) && failure.message.contains("COMFYUI_TOKEN"), "{}", failure.message);
        assert!(failure.message.contains(&fake.endpoint().to_string()), "names the server: {}", failure.message);
        assert_eq!(posts(), before + 1, "posted once, not retried");
    }

    let runner = PromptRunner::new(token_client(&fake, Some("s3cret")), config());
    assert!(runner.hub().wait_connected(Duration::from_secs(5)).await, "the socket is let in with ?token=");
    let id = PromptId::new();
    let run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    fake.wait_until("the prompt", |s| s.running.contains(&id.to_string())).await;
    fake.complete(id.as_str(), success_entry(id.as_str(), video_outputs()));
    run.finish().await.expect("accepted with the token");
    let headers = fake.with(|s| s.headers.iter().rev().find(|(path, _)| path == "/prompt").cloned()).expect("recorded");
    assert!(headers.1.iter().any(|h| h == "authorization: Bearer s3cret"), "{headers:?}");
}

#[tokio::test]
async fn a_loading_activity_reaches_the_caller_as_the_run_stage() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.push(json!({"type": "executing", "data": {"node": "1", "prompt_id": key}}));
    fake.push(json!({"type": "progress_state", "data": {"prompt_id": key, "nodes": {
        "1": {"value": 0, "max": 1, "state": "running", "node_id": "1", "display_node_id": "1", "real_node_id": "1",
              "parent_node_id": null, "prompt_id": key, "activity": "loading"}}}}));
    until(&mut run, &mut seen, |u| matches!(u, RunUpdate::Progress(p) if p.stage.as_deref() == Some("loading"))).await;
    fake.push(json!({"type": "executing", "data": {"node": "2", "prompt_id": key}}));
    until(
        &mut run,
        &mut seen,
        |u| matches!(u, RunUpdate::Progress(p) if p.node.as_deref() == Some("2") && p.stage.is_none()),
    )
    .await;
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain_within(&mut run, &mut seen, Duration::from_secs(20)).await.expect("finished");
}
