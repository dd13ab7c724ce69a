//! Prompt supervision against the fake: the outcome comes from history, never from the socket
//! alone; lost, stalled, timed-out, cancelled and rejected prompts end the right way; stopping a
//! prompt always names it.

use std::time::Duration;

use serde_json::{Value, json};
use tdcomfy_comfy::{
    ExpectedOutputs, HubOptions, MediaKind, PromptId, PromptRun, PromptRunner, RunConfig, RunFailure, RunFailureKind,
    RunUpdate,
};
use tokio_util::sync::CancellationToken;

use crate::captures;
use crate::fake::{Fake, OnPrompt, client_for, interrupted_entry, success_entry};

fn config() -> RunConfig {
    RunConfig {
        poll_interval: Duration::from_millis(40),
        presence_interval: Duration::from_millis(400),
        // Long enough never to fire unless a test wants it to.
        stall_timeout: Duration::from_secs(60),
        total_timeout: Duration::from_secs(60),
        queue_timeout: None,
        lost_after_polls: 3,
        start_budget: Duration::from_secs(5),
        start_backoff_initial: Duration::from_millis(20),
        start_backoff_max: Duration::from_millis(100),
        socket_wait: Duration::from_secs(5),
        unreachable_timeout: Duration::from_secs(5),
        cancel_grace: Duration::from_secs(5),
        expected_outputs: ExpectedOutputs::AtLeastOne,
        hub: HubOptions {
            reconnect_initial: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(100),
            ..HubOptions::default()
        },
        preview_method: tdcomfy_comfy::PreviewMethod::None,
    }
}

fn graph() -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "td/frame.png"}},
        "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "td/ltxv"}}
    })
}

fn video_outputs() -> Value {
    json!({"3": {"images": [{"filename": "ltxv_00001_.mp4", "subfolder": "td", "type": "output"}], "animated": [true]}})
}

/// Reads updates until the terminal one (guarded so a bug cannot hang the suite).
async fn drain(run: &mut PromptRun, seen: &mut Vec<RunUpdate>) -> Result<Vec<tdcomfy_comfy::OutputFile>, RunFailure> {
    drain_within(run, seen, Duration::from_secs(30)).await
}

/// [`drain`] with a time limit of the caller's choosing.
pub(crate) async fn drain_within(
    run: &mut PromptRun,
    seen: &mut Vec<RunUpdate>,
    limit: Duration,
) -> Result<Vec<tdcomfy_comfy::OutputFile>, RunFailure> {
    let reading = async {
        while let Some(update) = run.next().await {
            seen.push(update.clone());
            match update {
                RunUpdate::Finished { outputs, .. } => return Ok(outputs),
                RunUpdate::Failed(failure) => return Err(failure),
                _ => {}
            }
        }
        panic!("run ended without a terminal update")
    };
    tokio::time::timeout(limit, reading).await.expect("run did not finish")
}

/// Reads updates until one matches.
async fn until(run: &mut PromptRun, seen: &mut Vec<RunUpdate>, what: impl Fn(&RunUpdate) -> bool) {
    let reading = async {
        while let Some(update) = run.next().await {
            let found = what(&update);
            seen.push(update);
            if found {
                return;
            }
        }
        panic!("run ended before the expected update; saw {seen:?}")
    };
    tokio::time::timeout(Duration::from_secs(20), reading).await.expect("expected update did not come");
}

fn interrupts_name_only(fake: &Fake, id: &PromptId) -> usize {
    let interrupts = fake.requests("POST", "/interrupt");
    for interrupt in &interrupts {
        assert_eq!(interrupt.body, json!({"prompt_id": id.as_str()}), "every interrupt names exactly this prompt");
    }
    interrupts.len()
}

#[tokio::test]
async fn finishes_from_history_after_socket_progress() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let key = id.to_string();
    fake.wait_until("prompt queued", |s| s.running.contains(&key)).await;

    // The socket was open before the prompt was posted, under the id sent with the prompt.
    let (ws_index, post_index, client_id, posted) = fake.with(|s| {
        let ws = s.requests.iter().position(|r| r.method == "WS").expect("socket opened");
        let post = s.requests.iter().position(|r| r.path == "/prompt").expect("posted");
        (ws, post, s.ws_client_ids[0].clone(), s.requests[post].body.clone())
    });
    assert!(ws_index < post_index, "socket must be open before POST /prompt");
    assert_eq!(posted["client_id"], json!(client_id));
    assert_eq!(posted["prompt_id"], json!(key));
    assert_eq!(posted["prompt"], graph());

    for event in [
        json!({"type": "execution_start", "data": {"prompt_id": key}}),
        json!({"type": "execution_cached", "data": {"nodes": ["1"], "prompt_id": key}}),
        json!({"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": key}}),
        // Another client's prompt must not move our bar.
        json!({"type": "progress", "data": {"value": 9, "max": 10, "node": "2", "prompt_id": "someone-else"}}),
    ] {
        fake.push(event);
    }
    for step in 1..=4 {
        fake.push(json!({"type": "progress", "data": {"value": step, "max": 4, "node": "2", "prompt_id": key}}));
    }
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| matches!(u, RunUpdate::Progress(p) if p.step == Some(4))).await;

    // The socket says done, but only history makes it so.
    fake.complete(&key, success_entry(&key, video_outputs()));
    fake.push(json!({"type": "execution_success", "data": {"prompt_id": key}}));
    fake.push(json!({"type": "executing", "data": {"node": null, "prompt_id": key}}));
    let outputs = drain(&mut run, &mut seen).await.expect("finished");

    assert_eq!(outputs.len(), 1);
    assert_eq!((outputs[0].filename.as_str(), outputs[0].media), ("ltxv_00001_.mp4", MediaKind::Video));
    assert!(seen.contains(&RunUpdate::Started));
    let fractions: Vec<f32> = seen
        .iter()
        .filter_map(|u| match u {
            RunUpdate::Progress(p) => Some(p.fraction),
            _ => None,
        })
        .collect();
    assert!(fractions.windows(2).all(|w| w[1] >= w[0]), "monotonic: {fractions:?}");
    assert_eq!(fractions.last(), Some(&1.0));
    let sampler = seen
        .iter()
        .find_map(|u| match u {
            RunUpdate::Progress(p) if p.step == Some(2) => Some(p.clone()),
            _ => None,
        })
        .expect("step 2");
    assert_eq!(
        (sampler.max, sampler.node.as_deref(), sampler.node_type.as_deref()),
        (Some(4), Some("2"), Some("KSampler"))
    );
    assert!(sampler.fraction > 0.0 && sampler.fraction < 1.0);
    assert!(
        !seen.iter().any(|u| matches!(u, RunUpdate::Progress(p) if p.step == Some(9))),
        "foreign progress leaked into this run"
    );
}

#[tokio::test]
async fn finishes_by_polling_when_the_socket_stays_silent() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.complete(&key, success_entry(&key, video_outputs()));
    let outputs = drain(&mut run, &mut seen).await.expect("finished");
    assert_eq!(outputs[0].filename, "ltxv_00001_.mp4");
}

#[tokio::test]
async fn a_socket_success_without_history_is_never_a_result() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    // The socket claims success and the prompt leaves the queue, but history never records it
    // (e.g. ComfyUI died while saving): that is a lost prompt, not a finished one.
    fake.with(|s| s.running.clear());
    fake.push(json!({"type": "execution_success", "data": {"prompt_id": key}}));
    fake.push(json!({"type": "executing", "data": {"node": null, "prompt_id": key}}));
    let failure = drain(&mut run, &mut seen).await.expect_err("must not finish");
    assert_eq!(failure.kind, RunFailureKind::Lost);
    assert!(failure.kind.is_retryable());
    assert!(fake.requests("GET", "/history").len() >= 3);
}

#[tokio::test]
async fn a_prompt_forgotten_by_comfyui_is_lost() {
    let fake = Fake::start().await;
    fake.with(|s| s.on_prompt = OnPrompt::Forget);
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let failure = runner.run_prompt(graph(), id.clone(), CancellationToken::new()).finish().await.expect_err("lost");
    assert_eq!(failure.kind, RunFailureKind::Lost);
    assert!(failure.message.contains(id.as_str()), "{}", failure.message);
}

#[tokio::test]
async fn a_prompt_comfyui_stops_answering_about_is_stalled_and_interrupted_by_id() {
    let fake = Fake::start().await;
    let mut config = config();
    config.stall_timeout = Duration::from_secs(1);
    config.cancel_grace = Duration::from_millis(500);
    let runner = PromptRunner::new(fake.client(), config);
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.push(json!({"type": "executing", "data": {"node": "2", "prompt_id": key}}));
    until(&mut run, &mut seen, |u| matches!(u, RunUpdate::Progress(p) if p.node.as_deref() == Some("2"))).await;
    // From here on no event comes and every question about the prompt gets a 500.
    fake.with(|s| s.fail_polls = true);
    let failure = drain(&mut run, &mut seen).await.expect_err("stalled");
    assert_eq!(failure.kind, RunFailureKind::Stalled);
    assert_eq!(failure.node_type.as_deref(), Some("KSampler"));
    assert!(interrupts_name_only(&fake, &id) >= 1);
    fake.with(|s| assert!(!s.running.contains(&key), "the stalled prompt was stopped"));
}

#[tokio::test]
async fn a_long_silent_node_is_not_a_stall_while_comfyui_lists_it_as_running() {
    let fake = Fake::start().await;
    let stall = Duration::from_secs(1);
    let mut config = config();
    config.stall_timeout = stall;
    let runner = PromptRunner::new(fake.client(), config);
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.push(json!({"type": "executing", "data": {"node": "2", "prompt_id": key}}));
    until(&mut run, &mut seen, |u| matches!(u, RunUpdate::Progress(p) if p.node.as_deref() == Some("2"))).await;
    // A first model load: the node runs three stall timeouts without a single event, while
    // ComfyUI keeps answering and listing the prompt as running.
    let silent = tokio::time::sleep(stall * 3);
    tokio::pin!(silent);
    tokio::select! {
        _ = &mut silent => {}
        update = run.next() => panic!("the run must stay quiet while the node works, got {update:?}"),
    }
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
    assert_eq!(fake.requests("POST", "/interrupt").len(), 0, "nothing was interrupted");
}

#[tokio::test]
async fn events_that_arrive_while_a_poll_hangs_keep_the_prompt_alive() {
    let fake = Fake::start().await;
    let stall = Duration::from_secs(1);
    let mut config = config();
    config.stall_timeout = stall;
    let runner = PromptRunner::new(fake.client(), config);
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    // ComfyUI's HTTP side stops answering while its socket keeps reporting sampler steps for
    // three stall timeouts: the steps are signs of life, even though they wait behind a poll.
    fake.with(|s| s.hang_http = true);
    let started = tokio::time::Instant::now();
    let mut step = 0;
    while started.elapsed() < stall * 3 {
        step += 1;
        fake.push(json!({"type": "progress", "data": {"value": step, "max": 100, "node": "2", "prompt_id": key}}));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fake.with(|s| s.hang_http = false);
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
    assert!(seen.iter().any(|u| matches!(u, RunUpdate::Progress(p) if p.step == Some(step))), "every step arrived");
}

#[tokio::test]
async fn a_reconnecting_socket_does_not_hide_a_hung_comfyui() {
    let fake = Fake::start().await;
    let stall = Duration::from_millis(500);
    let mut config = config();
    config.stall_timeout = stall;
    config.cancel_grace = Duration::from_millis(500);
    // Only the stall rule may end this run in time.
    config.unreachable_timeout = Duration::from_secs(60);
    let runner = PromptRunner::new(fake.client(), config);
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.push(json!({"type": "executing", "data": {"node": "2", "prompt_id": key}}));
    until(&mut run, &mut seen, |u| matches!(u, RunUpdate::Progress(p) if p.node.as_deref() == Some("2"))).await;
    // ComfyUI hangs: HTTP requests are accepted and never answered, while the socket keeps
    // connecting, replaying the node it was executing, and dropping.
    let sockets_before = fake.with(|s| {
        s.hang_http = true;
        s.flap_sockets = true;
        s.replay_executing = Some("2".into());
        s.ws_client_ids.len()
    });
    fake.close_sockets();
    let failure = drain_within(&mut run, &mut seen, Duration::from_secs(10)).await.expect_err("stalled");
    assert_eq!(failure.kind, RunFailureKind::Stalled, "{failure}");
    assert!(fake.with(|s| s.ws_client_ids.len()) > sockets_before + 2, "the socket kept reconnecting");
    assert!(interrupts_name_only(&fake, &id) >= 1, "an interrupt of exactly this prompt was attempted");
}

#[tokio::test]
async fn the_total_timeout_removes_a_prompt_stuck_in_the_queue() {
    let fake = Fake::start().await;
    fake.with(|s| {
        s.running.push("someone-elses-prompt".into());
        s.interrupt_works = true;
    });
    let mut config = config();
    config.total_timeout = Duration::from_millis(400);
    let runner = PromptRunner::new(fake.client(), config);
    let id = PromptId::new();
    let key = id.to_string();
    let failure =
        runner.run_prompt(graph(), id.clone(), CancellationToken::new()).finish().await.expect_err("timed out");
    assert_eq!(failure.kind, RunFailureKind::TimedOut);
    let deletes = fake.requests("POST", "/queue");
    assert!(deletes.iter().any(|d| d.body == json!({"delete": [key]})));
    interrupts_name_only(&fake, &id);
    fake.with(|s| {
        assert!(!s.pending.contains(&key));
        assert_eq!(s.running, vec!["someone-elses-prompt".to_owned()], "other work is untouched");
    });
}

#[tokio::test]
async fn cancelling_a_pending_prompt_deletes_it_from_the_queue() {
    let fake = Fake::start().await;
    fake.with(|s| s.running.push("someone-elses-prompt".into()));
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let cancel = CancellationToken::new();
    let mut run = runner.run_prompt(graph(), id.clone(), cancel.clone());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Queued { position: 0 }).await;
    cancel.cancel();
    let failure = drain(&mut run, &mut seen).await.expect_err("cancelled");
    assert_eq!(failure.kind, RunFailureKind::Interrupted);
    assert!(fake.requests("POST", "/queue").iter().any(|d| d.body == json!({"delete": [key]})));
    interrupts_name_only(&fake, &id);
    fake.with(|s| {
        assert!(!s.pending.contains(&key));
        assert_eq!(s.running, vec!["someone-elses-prompt".to_owned()]);
    });
}

#[tokio::test]
async fn cancelling_a_running_prompt_interrupts_exactly_it() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let cancel = CancellationToken::new();
    let mut run = runner.run_prompt(graph(), id.clone(), cancel.clone());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    cancel.cancel();
    let failure = drain(&mut run, &mut seen).await.expect_err("cancelled");
    assert_eq!(failure.kind, RunFailureKind::Interrupted);
    assert!(interrupts_name_only(&fake, &id) >= 1);
    fake.with(|s| assert!(s.history.contains_key(&key) && s.running.is_empty()));
}

#[tokio::test]
async fn a_rejected_graph_fails_once_with_a_readable_report() {
    let fake = Fake::start().await;
    let run95 = captures::load("run_95_ltxv_template_validation.json");
    let body = captures::response_json(&run95["validate_without_models"]).clone();
    fake.with(|s| s.on_prompt = OnPrompt::Reject(400, body));
    let runner = PromptRunner::new(fake.client(), config());
    let failure =
        runner.run_prompt(graph(), PromptId::new(), CancellationToken::new()).finish().await.expect_err("rejected");
    assert_eq!(failure.kind, RunFailureKind::Validation);
    assert!(!failure.kind.is_retryable());
    assert!(
        failure
            .message
            .contains("node 44 (CheckpointLoaderSimple): ckpt_name: 'ltx-video-2b-v0.9.5.safetensors' not in []"),
        "{}",
        failure.message
    );
    assert_eq!(failure.validation.expect("report").nodes.len(), 2);
    assert_eq!(fake.requests("POST", "/prompt").len(), 1, "a rejection is not retried");
}

#[tokio::test]
async fn a_partially_valid_prompt_is_removed_before_it_runs_half() {
    let fake = Fake::start().await;
    let cases = captures::load("http_30_validation_errors.json");
    let node_errors = captures::response_json(&cases["invalid_input_type"])["node_errors"].clone();
    fake.with(|s| s.on_prompt = OnPrompt::QueueWithNodeErrors(node_errors));
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let failure =
        runner.run_prompt(graph(), id.clone(), CancellationToken::new()).finish().await.expect_err("rejected");
    assert_eq!(failure.kind, RunFailureKind::Validation);
    assert_eq!(failure.node_id.as_deref(), Some("5"));
    assert_eq!(failure.node_type.as_deref(), Some("CreateVideo"));
    assert!(interrupts_name_only(&fake, &id) >= 1);
    fake.with(|s| assert!(s.running.is_empty() && s.pending.is_empty(), "nothing of it keeps running"));
}

#[tokio::test]
async fn an_execution_error_names_node_type_and_exception() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    // The captured run_41 history entry, re-keyed to our prompt id.
    let run41 = captures::load("run_41_execution_error_custom_node.json");
    let captured = captures::history_body(&run41)[captures::prompt_id(&run41)].clone();
    fake.complete(&key, captured);
    let failure = drain(&mut run, &mut seen).await.expect_err("error");
    assert_eq!(failure.kind, RunFailureKind::Execution);
    assert_eq!(failure.message, "FailAlways (node 2) raised RuntimeError: synthetic failure for capture");
    assert_eq!(
        (failure.node_id.as_deref(), failure.node_type.as_deref(), failure.exception_type.as_deref()),
        (Some("2"), Some("FailAlways"), Some("RuntimeError"))
    );
}

#[tokio::test]
async fn an_interrupt_by_someone_else_is_reported_as_such() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.complete(&key, interrupted_entry(&key, "2", "KSampler"));
    let failure = drain(&mut run, &mut seen).await.expect_err("interrupted");
    assert_eq!(failure.kind, RunFailureKind::Interrupted);
    assert!(failure.message.contains("KSampler (node 2)"), "{}", failure.message);
    assert_eq!(fake.requests("POST", "/interrupt").len(), 0, "we did not interrupt anything");
}

#[tokio::test]
async fn success_without_the_expected_files_is_not_a_result() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    fake.with(|s| s.on_prompt = OnPrompt::Forget);
    fake.complete(&key, success_entry(&key, json!({})));
    let failure =
        runner.run_prompt(graph(), id.clone(), CancellationToken::new()).finish().await.expect_err("no outputs");
    assert_eq!(failure.kind, RunFailureKind::NoOutputs);

    let mut expect_node = config();
    expect_node.expected_outputs = ExpectedOutputs::Nodes(vec!["3".into(), "9".into()]);
    let runner = PromptRunner::new(fake.client(), expect_node);
    let id = PromptId::new();
    let key = id.to_string();
    fake.complete(&key, success_entry(&key, video_outputs()));
    let failure = runner.run_prompt(graph(), id, CancellationToken::new()).finish().await.expect_err("node 9 missing");
    assert_eq!((failure.kind, failure.node_id.as_deref()), (RunFailureKind::NoOutputs, Some("9")));

    let mut nothing = config();
    nothing.expected_outputs = ExpectedOutputs::Nothing;
    let runner = PromptRunner::new(fake.client(), nothing);
    let id = PromptId::new();
    let key = id.to_string();
    fake.complete(&key, success_entry(&key, json!({})));
    let outputs = runner
        .run_prompt(graph(), id, CancellationToken::new())
        .finish()
        .await
        .expect("websocket-only graphs may succeed without files");
    assert!(outputs.is_empty());
}

#[tokio::test]
async fn an_unreachable_server_fails_after_the_start_budget() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let endpoint = tdcomfy_comfy::ComfyEndpoint::parse(&format!("http://{addr}")).expect("endpoint");
    let mut config = config();
    config.start_budget = Duration::from_millis(300);
    config.socket_wait = Duration::from_millis(100);
    let runner = PromptRunner::new(client_for(endpoint), config);
    let failure =
        runner.run_prompt(graph(), PromptId::new(), CancellationToken::new()).finish().await.expect_err("unreachable");
    assert_eq!(failure.kind, RunFailureKind::BackendUnreachable);
    assert!(failure.kind.is_retryable());
}

#[tokio::test]
async fn a_server_that_comes_up_within_the_start_budget_runs_the_prompt() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let endpoint = tdcomfy_comfy::ComfyEndpoint::parse(&format!("http://{addr}")).expect("endpoint");
    let mut config = config();
    config.start_budget = Duration::from_secs(20);
    let runner = PromptRunner::new(client_for(endpoint), config);
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    // Wait until the client has seen the server down, then bring it up.
    let mut state = runner.hub().state_changes();
    tokio::time::timeout(Duration::from_secs(20), state.wait_for(|s| s.last_error.is_some()))
        .await
        .expect("connect attempt")
        .expect("hub alive");
    let fake = Fake::start_on(addr).await;
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
    assert_eq!(fake.requests("POST", "/prompt").len(), 1);
}

#[tokio::test]
async fn a_dropped_socket_reconnects_with_the_same_client_id() {
    let fake = Fake::start().await;
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.close_sockets();
    fake.wait_until("second socket", |s| s.ws_client_ids.len() >= 2).await;
    fake.with(|s| assert_eq!(s.ws_client_ids[0], s.ws_client_ids[1]));
    // Events on the new socket reach the run.
    fake.push(json!({"type": "executing", "data": {"node": "2", "prompt_id": key}}));
    fake.push(json!({"type": "progress", "data": {"value": 3, "max": 6, "node": "2", "prompt_id": key}}));
    until(&mut run, &mut seen, |u| matches!(u, RunUpdate::Progress(p) if p.step == Some(3))).await;
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
}

#[tokio::test]
async fn attach_supervises_an_already_queued_prompt_without_posting() {
    let fake = Fake::start().await;
    let id = PromptId::new();
    let key = id.to_string();
    fake.with(|s| s.running.push(key.clone()));
    let runner = PromptRunner::new(fake.client(), config());
    let mut run = runner.attach(id.clone(), None, CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
    assert!(fake.requests("POST", "/prompt").is_empty());
}

/// How many times the fake holds `key` in its queue (running or pending).
fn times_queued(fake: &Fake, key: &str) -> usize {
    fake.with(|s| s.running.iter().chain(&s.pending).filter(|p| *p == key).count())
}

#[tokio::test]
async fn an_ambiguous_submission_is_not_queued_twice_when_the_check_fails() {
    let fake = Fake::start().await;
    // ComfyUI queues the prompt but the answer is lost, and the next checks of whether it knows
    // the prompt break off too: nothing says it is unknown, so it must not be posted again.
    fake.with(|s| {
        s.on_prompt = OnPrompt::QueueThenDrop;
        s.cut_history = 2;
        s.cut_active = 2;
    });
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    assert_eq!(fake.requests("POST", "/prompt").len(), 1, "posted once");
    assert_eq!(times_queued(&fake, &key), 1, "queued exactly once");
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
    assert_eq!(fake.requests("POST", "/prompt").len(), 1);
}

#[tokio::test]
async fn an_ambiguous_submission_that_cannot_be_checked_in_time_is_supervised_not_reposted() {
    let fake = Fake::start().await;
    fake.with(|s| {
        s.on_prompt = OnPrompt::QueueThenDrop;
        s.cut_history = u32::MAX;
    });
    let mut config = config();
    config.start_budget = Duration::from_millis(300);
    let runner = PromptRunner::new(fake.client(), config);
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    // Checks back off from 20 ms, so the 300 ms start budget allows at most six of them: more
    // history requests than that are the supervision's polls.
    fake.wait_until("supervision polls", |s| s.requests.iter().filter(|r| r.path == "/history").count() >= 15).await;
    fake.with(|s| s.cut_history = 0);
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    assert_eq!(fake.requests("POST", "/prompt").len(), 1, "not posted again");
    assert_eq!(times_queued(&fake, &key), 1);
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
}

#[tokio::test]
async fn an_ambiguous_submission_that_comfyui_denies_knowing_is_posted_again() {
    let fake = Fake::start().await;
    // The connection drops and ComfyUI then answers, repeatedly, that it has no such prompt:
    // only that positive answer makes a second submission safe.
    fake.with(|s| s.on_prompt = OnPrompt::DropWithoutQueueing);
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    assert_eq!(fake.requests("POST", "/prompt").len(), 2);
    assert_eq!(times_queued(&fake, &key), 1);
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
}

/// What one job cost in polling requests and bytes.
#[derive(Debug)]
struct PollCost {
    history: (usize, usize),
    queue: (usize, usize),
    jobs: (usize, usize),
    /// `GET /api/jobs/{id}`.
    job: (usize, usize),
}

/// Runs one job for `running_for` on a fake whose queue holds ten large prompts of other users,
/// with sampler progress events every 100 ms or (`silent`) none, and returns what its
/// supervision asked of ComfyUI.
async fn poll_cost(jobs_api: bool, silent: bool, running_for: Duration) -> PollCost {
    let fake = Fake::start().await;
    // About 20 KB per queued graph: a UI user's workflow with its widget values.
    let nodes: serde_json::Map<String, Value> = (0..150)
        .map(|n| (n.to_string(), json!({"class_type": "CLIPTextEncode", "inputs": {"text": "x".repeat(100)}})))
        .collect();
    fake.with(|s| {
        s.jobs_api = jobs_api;
        s.queue_graph = Value::Object(nodes);
        s.pending.extend((0..10).map(|n| format!("someone-elses-prompt-{n}")));
    });
    let runner = PromptRunner::new(fake.client(), config());
    let id = PromptId::new();
    let key = id.to_string();
    let mut run = runner.run_prompt(graph(), id.clone(), CancellationToken::new());
    let mut seen = Vec::new();
    until(&mut run, &mut seen, |u| *u == RunUpdate::Started).await;
    fake.push(json!({"type": "executing", "data": {"node": "2", "prompt_id": key}}));
    let started = tokio::time::Instant::now();
    let mut step = 0;
    while started.elapsed() < running_for {
        if !silent {
            step += 1;
            fake.push(json!({"type": "progress", "data": {"value": step, "max": 1000, "node": "2", "prompt_id": key}}));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fake.complete(&key, success_entry(&key, video_outputs()));
    drain(&mut run, &mut seen).await.expect("finished");
    let count = |method: &str, path: &str, bytes_key: &str| {
        (fake.requests(method, path).len(), fake.with(|s| s.served_bytes.get(bytes_key).copied().unwrap_or_default()))
    };
    PollCost {
        history: count("GET", "/history", "/history"),
        queue: count("GET", "/queue", "/queue"),
        jobs: count("GET", "/api/jobs", "/api/jobs"),
        job: count("GET", "/api/jobs/{id}", "/api/jobs/{id}"),
    }
}

#[tokio::test]
async fn a_job_does_not_poll_the_whole_queue_of_a_shared_comfyui() {
    let running_for = Duration::from_secs(2);
    for silent in [false, true] {
        let node = if silent { "a silent node" } else { "a sampler sending progress" };
        let legacy = poll_cost(false, silent, running_for).await;
        eprintln!("ComfyUI 0.3.64, {node}, {running_for:?}, poll 40 ms, presence 400 ms: {legacy:?}");
        // History is asked every poll; the queue only when nothing else shows where the prompt
        // is (with events flowing: once, to see it; silent: every presence interval).
        assert!(legacy.history.0 >= 10, "{legacy:?}");
        let most = if silent { (running_for.as_millis() / 400) as usize + 2 } else { 2 };
        assert!(legacy.queue.0 <= most, "at most {most} GET /queue: {legacy:?}");

        let jobs = poll_cost(true, silent, running_for).await;
        eprintln!("ComfyUI with the jobs API, {node}, {running_for:?}, poll 40 ms, presence 400 ms: {jobs:?}");
        assert_eq!(jobs.queue.0, 0, "never the full queue when the jobs API exists: {jobs:?}");
        assert!(
            (jobs.jobs.1 + jobs.job.1) * 20 < legacy.queue.1,
            "the jobs API carries no graphs: {jobs:?} vs {legacy:?}"
        );
        let most = if silent { (running_for.as_millis() / 400) as usize + 3 } else { 3 };
        assert!(jobs.job.0 <= most, "where the prompt is is asked only when in doubt: {jobs:?}");
    }
}

#[tokio::test]
async fn a_socket_that_keeps_dropping_is_reconnected_with_growing_delays() {
    let fake = Fake::start().await;
    fake.with(|s| s.flap_sockets = true);
    let options = HubOptions {
        reconnect_initial: Duration::from_millis(10),
        reconnect_max: Duration::from_millis(300),
        ..HubOptions::default()
    };
    let _hub = tdcomfy_comfy::EventHub::spawn(&fake.client(), options);
    fake.wait_until("first socket", |s| !s.ws_client_ids.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // 10 + 20 + 40 + … ms, capped at 300: about eight attempts in 1.5 s. Reconnecting at the
    // first delay after every short-lived connection would be well over a hundred.
    let attempts = fake.with(|s| s.ws_client_ids.len());
    assert!(attempts <= 12, "{attempts} connections in 1.5 s");
}
