//! Captured `/history/{id}` entries map to the right outcome and output files.

use serde_json::json;
use tdcomfy_comfy::{
    FolderType, HistoryEntry, HistoryOutcome, MediaKind, PromptId, QueuePosition, QueueState, SystemStats, pick_primary,
};

use crate::captures;

fn entry(file: &str) -> HistoryEntry {
    let run = captures::load(file);
    let id = captures::prompt_id(&run);
    HistoryEntry::from_response(&id, captures::history_body(&run)).expect("history entry")
}

#[test]
fn run_10_is_a_success_with_one_png() {
    let entry = entry("run_10_invert_first.json");
    assert_eq!(entry.outcome(), HistoryOutcome::Success);
    let files = entry.output_files();
    assert_eq!(files.len(), 1);
    let file = &files[0];
    assert_eq!(
        (file.node_id.as_str(), file.filename.as_str(), file.subfolder.as_str()),
        ("3", "invert_00001_.png", "td")
    );
    assert_eq!(file.kind, FolderType::Output);
    assert_eq!((file.media, file.format.as_str()), (MediaKind::Image, "png"));
    assert_eq!(entry.output_node_ids, vec!["3".to_owned()]);
}

#[test]
fn run_11_fully_cached_rerun_still_lists_the_old_file() {
    let entry = entry("run_11_invert_cached.json");
    assert_eq!(entry.outcome(), HistoryOutcome::Success);
    assert_eq!(entry.cached_nodes(), vec!["1", "2", "3"]);
    assert_eq!(entry.output_files()[0].filename, "invert_00001_.png");
}

#[test]
fn run_20_video_outputs_are_classified_and_mp4_is_primary() {
    let entry = entry("run_20_video_outputs.json");
    assert_eq!(entry.outcome(), HistoryOutcome::Success);
    let files = entry.output_files();
    let summary: Vec<(&str, &str, MediaKind, &str, FolderType)> = files
        .iter()
        .map(|f| (f.node_id.as_str(), f.filename.as_str(), f.media, f.format.as_str(), f.kind.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("4", "anim_00001_.webp", MediaKind::AnimatedImage, "webp", FolderType::Output),
            ("6", "video_00001_.mp4", MediaKind::Video, "mp4", FolderType::Output),
            ("7", "webm_00001_.webm", MediaKind::Video, "webm", FolderType::Output),
            ("8", "apng_00001_.png", MediaKind::AnimatedImage, "png", FolderType::Output),
            ("10", "ComfyUI_temp_gelyx_00001_.png", MediaKind::Image, "png", FolderType::Temp),
        ],
        "all five outputs, in node order, every one under `images`"
    );
    assert!(files.iter().all(|f| f.key == "images"));
    let primary = pick_primary(&files, None).expect("primary");
    assert_eq!(primary.filename, "video_00001_.mp4");
    // A hint pointing at the webm node wins over the global ranking.
    assert_eq!(pick_primary(&files, Some("7")).expect("hinted").filename, "webm_00001_.webm");
    // A hint naming a node without files falls back to the ranking.
    assert_eq!(pick_primary(&files, Some("99")).expect("fallback").filename, "video_00001_.mp4");
}

#[test]
fn run_40_and_41_are_execution_errors_with_node_and_exception() {
    let corrupt = entry("run_40_execution_error_corrupt_image.json");
    let HistoryOutcome::Error(info) = corrupt.outcome() else { panic!("run_40 should be an execution error") };
    assert!(corrupt.output_files().is_empty());
    assert_eq!(
        info.summary(),
        "LoadImage (node 1) raised PIL.UnidentifiedImageError: cannot identify image file '<base>/input/corrupt.png'"
    );

    let custom = entry("run_41_execution_error_custom_node.json");
    let HistoryOutcome::Error(info) = custom.outcome() else { panic!("run_41 should be an execution error") };
    assert_eq!(info.node_id.as_deref(), Some("2"));
    assert_eq!(info.executed, vec!["1"]);
    assert_eq!(info.summary(), "FailAlways (node 2) raised RuntimeError: synthetic failure for capture");
}

#[test]
fn run_60_interrupt_is_not_mistaken_for_an_error() {
    let entry = entry("run_60_interrupt.json");
    assert_eq!(entry.status.status_str, "error", "ComfyUI reports interrupts as errors");
    let HistoryOutcome::Interrupted(info) = entry.outcome() else {
        panic!("run_60 should be an interrupt, got {:?}", entry.outcome())
    };
    assert_eq!(info.node_id.as_deref(), Some("2"));
    assert_eq!(info.node_type.as_deref(), Some("SlowPassthrough"));
}

#[test]
fn run_95_loader_failure_names_the_checkpoint_loader() {
    let run = captures::load("run_95_ltxv_template_validation.json");
    let id = captures::response_json(&run["with_dummy_model_files"])["prompt_id"].as_str().expect("id").to_owned();
    let entry = HistoryEntry::from_response(&id, captures::history_body(&run)).expect("entry");
    let HistoryOutcome::Error(info) = entry.outcome() else { panic!("run_95 should be an execution error") };
    assert!(info.summary().starts_with(
        "CheckpointLoaderSimple (node 44) raised safetensors._safetensors_rust.SafetensorError: Error while deserializing header"
    ));
}

#[test]
fn run_96_websocket_only_graph_succeeds_without_files() {
    let run = captures::load("run_96_ws_images_and_video_timing.json");
    let id = captures::response_json(&run["saveimagewebsocket_post"])["prompt_id"].as_str().expect("id").to_owned();
    let entry =
        HistoryEntry::from_response(&id, captures::response_json(&run["saveimagewebsocket_history"])).expect("entry");
    assert_eq!(entry.outcome(), HistoryOutcome::Success);
    assert!(entry.output_files().is_empty());
}

#[test]
fn empty_history_means_not_finished() {
    let gets = captures::load("http_01_simple_gets.json");
    assert_eq!(
        HistoryEntry::from_response("does-not-exist", captures::response_json(&gets["/history/does-not-exist"])),
        None
    );
    // A body keyed by another prompt is not ours.
    let run = captures::load("run_10_invert_first.json");
    assert_eq!(HistoryEntry::from_response(&PromptId::new().to_string(), captures::history_body(&run)), None);
}

#[test]
fn queue_capture_is_sorted_into_execution_order() {
    let ops = captures::load("http_70_queue_ops.json");
    let queue = QueueState::from_value(captures::response_json(&ops["queue_with_pending"]));
    assert_eq!(queue.running.len(), 1);
    let numbers: Vec<f64> = queue.pending.iter().map(|i| i.number).collect();
    let mut sorted = numbers.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(numbers, sorted);
    assert_eq!(queue.pending[0].number, -22.0, "front=true jumps the queue");
    let running = PromptId::parse(&queue.running[0].prompt_id).expect("uuid");
    assert_eq!(queue.position(&running), Some(QueuePosition::Running));
    let next = PromptId::parse(&queue.pending[0].prompt_id).expect("uuid");
    assert_eq!(queue.position(&next), Some(QueuePosition::Pending { position: 0 }));
    assert_eq!(queue.position(&PromptId::new()), None);
    // Garbage items are skipped rather than failing the whole queue.
    let odd = QueueState::from_value(&json!({"queue_running": [[1]], "queue_pending": ["x", [2.5, "b"]]}));
    assert_eq!((odd.running.len(), odd.pending.len()), (0, 1));
}

#[test]
fn system_stats_capture_gives_version_and_devices() {
    let gets = captures::load("http_01_simple_gets.json");
    let stats = SystemStats::from_value(captures::response_json(&gets["/system_stats"]));
    assert_eq!(stats.comfyui_version.as_deref(), Some("0.3.64"));
    assert_eq!(stats.devices.len(), 1);
    assert_eq!(stats.devices[0].kind, "cpu");
    assert_eq!(stats.devices[0].vram_total, Some(25_276_514_304));
}
