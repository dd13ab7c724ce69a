//! End to end against the ComfyUI simulator (`tdcomfy-sim`): upload a frame, run the LTXV
//! image-to-video template, download the mp4; and the simulator's injected faults end the way a
//! worker needs them to.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tdcomfy_comfy::{
    ClientId, ComfyClient, ComfyEndpoint, ComfyTimeouts, HubOptions, ImageUpload, MediaKind, PromptId, PromptRunner,
    RunConfig, RunFailureKind, RunUpdate, pick_primary,
};
use tdcomfy_sim::{ComfyVersion, SimConfig};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::captures;

struct Sim {
    runner: PromptRunner,
    _stop: DropGuard,
    _dir: tempfile::TempDir,
}

async fn start_sim(job_time: Duration) -> Sim {
    start_sim_with(job_time, None, |_| {}).await
}

/// A simulator of `version` whose runner's client sends `token`.
async fn start_profile(
    version: ComfyVersion,
    job_time: Duration,
    token: Option<&str>,
    tweak: impl FnOnce(&mut SimConfig),
) -> Sim {
    start_sim_with(job_time, token, |config| {
        config.comfy_version = version;
        tweak(config);
    })
    .await
}

async fn start_sim_with(job_time: Duration, token: Option<&str>, tweak: impl FnOnce(&mut SimConfig)) -> Sim {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = SimConfig::new(dir.path());
    config.job_time = job_time;
    config.progress_steps = 5;
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    tokio::spawn(async move {
        let _ = tdcomfy_sim::run(listener, config, async move { shutdown.cancelled().await }).await;
    });
    let endpoint = ComfyEndpoint::parse(&format!("http://{addr}")).expect("endpoint");
    let client = ComfyClient::with_token(endpoint, ClientId::new(), ComfyTimeouts::default(), token.map(str::to_owned))
        .expect("client");
    let config = RunConfig {
        poll_interval: Duration::from_millis(100),
        start_budget: Duration::from_secs(10),
        hub: HubOptions {
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(200),
            ..HubOptions::default()
        },
        ..RunConfig::default()
    };
    Sim { runner: PromptRunner::new(client, config), _stop: stop.drop_guard(), _dir: dir }
}

fn png_frame() -> Vec<u8> {
    let image = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).expect("encode png");
    bytes.into_inner()
}

/// The captured LTXV template, small enough to encode quickly, reading `image_ref`, with `marker`
/// appended to the positive prompt.
fn ltxv_graph(image_ref: &str, marker: &str) -> Value {
    let mut graph = captures::load("ltxv_i2v_api_template.json");
    graph["78"]["inputs"]["image"] = image_ref.into();
    graph["77"]["inputs"]["width"] = 128.into();
    graph["77"]["inputs"]["height"] = 96.into();
    graph["77"]["inputs"]["length"] = 9.into();
    let text = format!("a slow pan over the frame {marker}");
    graph["6"]["inputs"]["text"] = text.into();
    graph
}

async fn upload_frame(sim: &Sim) -> String {
    let uploaded = sim
        .runner
        .client()
        .upload_image(ImageUpload::from_bytes("frame_000001.png", png_frame()).in_subfolder("td/e2e"))
        .await
        .expect("upload");
    uploaded.load_image_ref()
}

#[tokio::test]
async fn ltxv_template_runs_end_to_end_on_the_simulator() {
    let sim = start_sim(Duration::from_millis(500)).await;
    let image = upload_frame(&sim).await;
    let id = PromptId::new();
    let mut run = sim.runner.run_prompt(ltxv_graph(&image, ""), id.clone(), CancellationToken::new());
    let mut updates = Vec::new();
    let outputs =
        crate::run::drain_within(&mut run, &mut updates, Duration::from_secs(120)).await.expect("run succeeded");

    assert!(updates.contains(&RunUpdate::Started));
    let steps: Vec<Option<u32>> = updates
        .iter()
        .filter_map(|u| match u {
            RunUpdate::Progress(p) if p.node_type.as_deref() == Some("SamplerCustom") => Some(p.step),
            _ => None,
        })
        .collect();
    assert!(steps.contains(&Some(5)), "sampler steps reported: {steps:?}");
    let fractions: Vec<f32> = updates
        .iter()
        .filter_map(|u| match u {
            RunUpdate::Progress(p) => Some(p.fraction),
            _ => None,
        })
        .collect();
    assert!(fractions.windows(2).all(|w| w[1] >= w[0]), "monotonic: {fractions:?}");

    let primary = pick_primary(&outputs, Some("81")).expect("a primary output");
    assert_eq!((primary.media, primary.format.as_str(), primary.node_id.as_str()), (MediaKind::Video, "mp4", "81"));
    let mut download = sim.runner.client().download(primary).await.expect("download");
    assert_eq!(download.content_type.as_deref(), Some("video/mp4"));
    let mut bytes = Vec::new();
    while let Some(chunk) = download.next().await {
        bytes.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(Some(bytes.len() as u64), download.content_length);
    assert_eq!(&bytes[4..8], b"ftyp", "an MP4 file");

    // Cleanup afterwards leaves no trace in history.
    sim.runner.client().delete_history(&id).await.expect("delete history");
    assert_eq!(sim.runner.client().history(&id).await.expect("history"), None);
}

async fn outcome_with_marker(marker: &str) -> Result<Vec<tdcomfy_comfy::OutputFile>, tdcomfy_comfy::RunFailure> {
    let sim = start_sim(Duration::from_millis(600)).await;
    let image = upload_frame(&sim).await;
    let run = sim.runner.run_prompt(ltxv_graph(&image, marker), PromptId::new(), CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(120), run.finish()).await.expect("outcome in time")
}

#[tokio::test]
async fn a_silent_socket_still_finishes_through_polling() {
    let outputs = outcome_with_marker("[sim:silent]").await.expect("finished");
    assert!(outputs.iter().any(|f| f.format == "mp4"));
}

#[tokio::test]
async fn a_dropped_socket_mid_run_still_finishes() {
    let outputs = outcome_with_marker("[sim:drop]").await.expect("finished");
    assert!(outputs.iter().any(|f| f.format == "mp4"));
}

#[tokio::test]
async fn a_simulated_restart_loses_the_prompt() {
    let failure = outcome_with_marker("[sim:restart]").await.expect_err("lost");
    assert_eq!(failure.kind, RunFailureKind::Lost);
}

#[tokio::test]
async fn an_injected_sampler_error_is_an_execution_failure() {
    let failure = outcome_with_marker("[sim:error]").await.expect_err("error");
    assert_eq!(failure.kind, RunFailureKind::Execution);
    assert_eq!(failure.node_type.as_deref(), Some("SamplerCustom"));
    assert!(failure.message.contains("RuntimeError"), "{}", failure.message);
}

#[tokio::test]
async fn a_missing_model_is_a_validation_failure() {
    let sim = start_sim(Duration::from_millis(100)).await;
    let image = upload_frame(&sim).await;
    let mut graph = ltxv_graph(&image, "");
    graph["44"]["inputs"]["ckpt_name"] = "not-installed.safetensors".into();
    let failure =
        sim.runner.run_prompt(graph, PromptId::new(), CancellationToken::new()).finish().await.expect_err("rejected");
    assert_eq!(failure.kind, RunFailureKind::Validation);
    assert!(
        failure.message.contains("node 44 (CheckpointLoaderSimple): ckpt_name: 'not-installed.safetensors' not in"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn cancelling_mid_run_interrupts_the_prompt_on_the_simulator() {
    let sim = start_sim(Duration::from_secs(30)).await;
    let image = upload_frame(&sim).await;
    let id = PromptId::new();
    let cancel = CancellationToken::new();
    let mut run = sim.runner.run_prompt(ltxv_graph(&image, ""), id.clone(), cancel.clone());
    let waiting = async {
        while let Some(update) = run.next().await {
            if let RunUpdate::Progress(p) = &update
                && p.node_type.as_deref() == Some("SamplerCustom")
            {
                return;
            }
            assert!(!update.is_terminal(), "ended before sampling: {update:?}");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), waiting).await.expect("sampling started");
    cancel.cancel();
    let failure = tokio::time::timeout(Duration::from_secs(30), run.finish())
        .await
        .expect("outcome in time")
        .expect_err("cancelled");
    assert_eq!(failure.kind, RunFailureKind::Interrupted);
    let client = sim.runner.client();
    assert_eq!(client.queue().await.expect("queue").position(&id), None, "no longer running");
}

const PROFILES: [ComfyVersion; 2] = [ComfyVersion::V0_3_64, ComfyVersion::V0_38];

/// Waits (bounded) until the runner's client has finished detecting the server's features.
async fn detected(sim: &Sim) -> tdcomfy_comfy::ServerFeatures {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let features = sim.runner.client().features();
        if features.jobs_api.is_some() && features.max_upload_size.is_some() {
            return features;
        }
        assert!(tokio::time::Instant::now() < deadline, "features not detected: {features:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_profile_is_run_by_what_it_has_and_the_template_finishes_on_both() {
    for version in PROFILES {
        let sim = start_profile(version, Duration::from_millis(300), None, |_| {}).await;
        let features = detected(&sim).await;
        assert_eq!(features.jobs_api, Some(version.is_newer()), "{version}: {features:?}");
        assert_eq!(features.max_upload_size, Some(100 * 1024 * 1024), "{version}: /features or the socket");
        assert_eq!(features.supports_preview_metadata, Some(true), "{version}");
        let image = upload_frame(&sim).await;
        let run = sim.runner.run_prompt(ltxv_graph(&image, ""), PromptId::new(), CancellationToken::new());
        let outputs = tokio::time::timeout(Duration::from_secs(120), run.finish())
            .await
            .expect("in time")
            .unwrap_or_else(|f| panic!("{version}: {f}"));
        assert!(outputs.iter().any(|f| f.format == "mp4"), "{version}: {outputs:?}");
    }
}

#[tokio::test]
async fn cancel_mid_run_uses_the_jobs_cancel_on_0_38_and_delete_plus_interrupt_on_0_3_64() {
    for version in PROFILES {
        let sim = start_profile(version, Duration::from_secs(30), None, |_| {}).await;
        detected(&sim).await;
        let image = upload_frame(&sim).await;
        let id = PromptId::new();
        let cancel = CancellationToken::new();
        let mut run = sim.runner.run_prompt(ltxv_graph(&image, ""), id.clone(), cancel.clone());
        let waiting = async {
            while let Some(update) = run.next().await {
                if update == RunUpdate::Started {
                    return;
                }
                assert!(!update.is_terminal(), "{version}: ended before it started: {update:?}");
            }
        };
        tokio::time::timeout(Duration::from_secs(60), waiting).await.expect("started");
        cancel.cancel();
        let failure =
            tokio::time::timeout(Duration::from_secs(30), run.finish()).await.expect("in time").expect_err("cancelled");
        assert_eq!(failure.kind, RunFailureKind::Interrupted, "{version}");
        // Set only by a 200 from POST /api/jobs/{id}/cancel; 0.3.64 has no jobs API to try.
        assert_eq!(sim.runner.client().features().jobs_cancel, Some(version.is_newer()), "{version}");
        assert_eq!(sim.runner.client().queue().await.expect("queue").position(&id), None, "{version}: stopped");
    }
}

#[tokio::test]
async fn a_simulated_restart_loses_the_prompt_on_both_profiles() {
    for version in PROFILES {
        let sim = start_profile(version, Duration::from_millis(600), None, |_| {}).await;
        detected(&sim).await;
        let image = upload_frame(&sim).await;
        let run = sim.runner.run_prompt(ltxv_graph(&image, "[sim:restart]"), PromptId::new(), CancellationToken::new());
        let failure =
            tokio::time::timeout(Duration::from_secs(60), run.finish()).await.expect("in time").expect_err("lost");
        assert_eq!(failure.kind, RunFailureKind::Lost, "{version}: {failure}");
    }
}

#[tokio::test]
async fn a_frame_over_the_simulators_upload_limit_is_refused_before_the_upload() {
    for version in PROFILES {
        let sim = start_profile(version, Duration::from_millis(100), None, |c| c.max_upload_bytes = 4096).await;
        detected(&sim).await;
        let frame = vec![0u8; 10_000];
        let error =
            sim.runner.client().upload_image(ImageUpload::from_bytes("big.png", frame)).await.expect_err("too large");
        assert!(
            matches!(error, tdcomfy_comfy::ComfyError::UploadTooLarge { size: 10_000, limit: Some(4096), .. }),
            "{version}: {error:?}"
        );
    }
}

#[tokio::test]
async fn a_token_guarded_simulator_runs_with_the_token_and_refuses_clearly_without() {
    for version in PROFILES {
        let guarded = |c: &mut SimConfig| c.auth_token = Some("td-secret".into());
        let sim = start_profile(version, Duration::from_millis(200), Some("td-secret"), guarded).await;
        assert!(sim.runner.hub().wait_connected(Duration::from_secs(5)).await, "{version}: ?token= lets the socket in");
        let image = upload_frame(&sim).await;
        let run = sim.runner.run_prompt(ltxv_graph(&image, ""), PromptId::new(), CancellationToken::new());
        tokio::time::timeout(Duration::from_secs(120), run.finish()).await.expect("in time").expect("with the token");

        let sim = start_profile(version, Duration::from_millis(200), Some("wrong"), guarded).await;
        let error = sim.runner.client().system_stats().await.expect_err("refused");
        assert!(error.to_string().contains("refused the token"), "{version}: {error}");
    }
}

#[tokio::test]
async fn every_gpu_of_a_multi_gpu_comfyui_is_listed() {
    let sim = start_profile(ComfyVersion::V0_38, Duration::from_millis(100), None, |c| c.gpus = 3).await;
    let stats = sim.runner.client().system_stats().await.expect("stats");
    assert_eq!(stats.devices.len(), 3, "{stats:?}");
    assert!(stats.devices.iter().all(|d| d.vram_total.is_some()), "{stats:?}");
}

#[tokio::test]
async fn outputs_with_asset_ids_are_collected_on_0_38() {
    let sim = start_profile(ComfyVersion::V0_38, Duration::from_millis(300), None, |c| c.assets = true).await;
    let image = upload_frame(&sim).await;
    let run = sim.runner.run_prompt(ltxv_graph(&image, ""), PromptId::new(), CancellationToken::new());
    let outputs = tokio::time::timeout(Duration::from_secs(120), run.finish()).await.expect("in time").expect("ok");
    let primary = pick_primary(&outputs, Some("81")).expect("primary");
    assert_eq!(primary.format, "mp4");
}

/// Serves a simulator of `version` on `listener` until the returned token is cancelled.
fn serve_profile(
    listener: tokio::net::TcpListener,
    dir: &std::path::Path,
    version: ComfyVersion,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut config = SimConfig::new(dir);
    config.job_time = Duration::from_millis(200);
    config.progress_steps = 3;
    config.comfy_version = version;
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    let task = tokio::spawn(async move {
        let _ = tdcomfy_sim::run(listener, config, async move { shutdown.cancelled().await }).await;
    });
    (stop, task)
}

#[tokio::test]
async fn a_comfyui_upgraded_behind_the_same_address_is_used_by_what_it_has_now() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, task) = serve_profile(listener, dir.path(), ComfyVersion::V0_3_64);
    let endpoint = ComfyEndpoint::parse(&format!("http://{addr}")).expect("endpoint");
    let client = ComfyClient::new(endpoint, ClientId::new(), ComfyTimeouts::default()).expect("client");
    let config = RunConfig {
        poll_interval: Duration::from_millis(100),
        hub: HubOptions {
            reconnect_initial: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(200),
            ..HubOptions::default()
        },
        ..RunConfig::default()
    };
    let sim =
        Sim { runner: PromptRunner::new(client, config), _stop: CancellationToken::new().drop_guard(), _dir: dir };
    assert_eq!(detected(&sim).await.jobs_api, Some(false));

    // Upgraded: stopped, and 0.38 comes up on the same port.
    stop.cancel();
    let _ = task.await;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let (stop, _task) = serve_profile(listener, sim._dir.path(), ComfyVersion::V0_38);
    let _stop = stop.drop_guard();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.runner.client().features().jobs_api != Some(true) {
        assert!(tokio::time::Instant::now() < deadline, "not re-detected: {:?}", sim.runner.client().features());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let image = upload_frame(&sim).await;
    let run = sim.runner.run_prompt(ltxv_graph(&image, ""), PromptId::new(), CancellationToken::new());
    tokio::time::timeout(Duration::from_secs(120), run.finish()).await.expect("in time").expect("runs on 0.38");
}

/// Every update of one run of the template (with `tweak` applied to the graph) and its preview
/// method.
async fn updates_of(
    sim: &Sim,
    tweak: impl FnOnce(&mut Value),
    preview: Option<tdcomfy_comfy::PreviewMethod>,
) -> Vec<RunUpdate> {
    let image = upload_frame(sim).await;
    let mut graph = ltxv_graph(&image, "");
    tweak(&mut graph);
    let options = tdcomfy_comfy::PromptOptions { preview_method: preview };
    let mut run = sim.runner.run_prompt_with(graph, PromptId::new(), CancellationToken::new(), options);
    let mut updates = Vec::new();
    crate::run::drain_within(&mut run, &mut updates, Duration::from_secs(120)).await.expect("finished");
    updates
}

#[tokio::test]
async fn previews_come_only_for_prompts_that_ask_for_them_on_0_38() {
    let sim = start_profile(ComfyVersion::V0_38, Duration::from_millis(400), None, |_| {}).await;
    let previews = |updates: &[RunUpdate]| updates.iter().filter(|u| matches!(u, RunUpdate::Preview(_))).count();
    let quiet = updates_of(&sim, |_| {}, None).await;
    assert_eq!(previews(&quiet), 0, "preview_method none (the default) costs no previews");
    let watched = updates_of(&sim, |_| {}, Some(tdcomfy_comfy::PreviewMethod::Auto)).await;
    assert!(previews(&watched) > 0, "auto for this prompt: sampler previews arrive");
    // Type 4: each preview names its prompt and node (the handshake asked for metadata).
    let meta = watched.iter().find_map(|u| match u {
        RunUpdate::Preview(p) => p.meta.clone(),
        _ => None,
    });
    assert!(meta.is_some_and(|m| m.prompt_id.is_some()), "previews carry their prompt id");
    // The next prompt without a method is quiet again: 0.38 resets it per prompt (C5).
    assert_eq!(previews(&updates_of(&sim, |_| {}, None).await), 0);
}

#[tokio::test]
async fn a_loading_model_is_a_stage_on_0_38_and_none_on_0_3_64() {
    for version in PROFILES {
        let sim = start_profile(version, Duration::from_millis(300), None, |_| {}).await;
        let updates = updates_of(&sim, |_| {}, None).await;
        let loading: Vec<Option<String>> = updates
            .iter()
            .filter_map(|u| match u {
                RunUpdate::Progress(p) if p.stage.as_deref() == Some("loading") => Some(p.node_type.clone()),
                _ => None,
            })
            .collect();
        if version.is_newer() {
            assert!(!loading.is_empty(), "{version}: a loader's activity is the stage");
            assert!(loading.iter().all(|t| t.as_deref().is_some_and(|t| t.contains("Loader"))), "{loading:?}");
        } else {
            assert!(loading.is_empty(), "{version}: 0.3.64 has no activity: {loading:?}");
        }
    }
}

#[tokio::test]
async fn a_node_run_as_a_subgraph_reports_progress_for_the_submitted_node() {
    let sim = start_profile(ComfyVersion::V0_38, Duration::from_millis(400), None, |_| {}).await;
    let updates =
        updates_of(&sim, |graph| graph["72"]["_meta"] = serde_json::json!({"title": "Sampler [sim:subgraph]"}), None)
            .await;
    let sampler: Vec<(Option<String>, Option<u32>)> = updates
        .iter()
        .filter_map(|u| match u {
            RunUpdate::Progress(p) if p.step.is_some() => Some((p.node.clone(), p.step)),
            _ => None,
        })
        .collect();
    assert!(!sampler.is_empty(), "sampler steps seen");
    assert!(sampler.iter().all(|(node, _)| node.as_deref() == Some("72")), "steps of 72.0 count for 72: {sampler:?}");
    let fractions: Vec<f32> = updates
        .iter()
        .filter_map(|u| match u {
            RunUpdate::Progress(p) => Some(p.fraction),
            _ => None,
        })
        .collect();
    assert!(fractions.windows(2).all(|w| w[1] >= w[0]), "monotonic: {fractions:?}");
    assert!(fractions.iter().any(|f| *f > 0.5 && *f < 1.0), "the sampler's share fills: {fractions:?}");
}
