//! Progress from captured event sequences: monotonic, step-aware, complete at the end.

use serde_json::{Value, json};
use tdcomfy_comfy::{ComfyEvent, ProgressTracker, RunProgress};

use crate::captures;

fn replay(file: &str) -> Vec<RunProgress> {
    let run = captures::load(file);
    let graph = run["post_prompt"]["request"]["json"]["prompt"].clone();
    let mut tracker = ProgressTracker::new(&graph);
    let mut snapshots = Vec::new();
    for frame in run["ws_sequence"].as_array().expect("sequence") {
        if frame["frame"] != "text" {
            continue;
        }
        let event = ComfyEvent::from_text(&frame["msg"].to_string()).expect("parse");
        if tracker.observe(&event) {
            snapshots.push(tracker.take_snapshot());
        }
    }
    snapshots
}

fn assert_monotonic(file: &str, snapshots: &[RunProgress]) {
    for pair in snapshots.windows(2) {
        assert!(
            pair[1].fraction >= pair[0].fraction,
            "{file}: progress went back from {} to {}",
            pair[0].fraction,
            pair[1].fraction
        );
    }
}

#[test]
fn sampler_steps_fill_their_node_share() {
    let snapshots = replay("run_50_progress_preview_legacy_client.json");
    assert_monotonic("run_50", &snapshots);
    let steps: Vec<(Option<u32>, Option<u32>)> = snapshots
        .iter()
        .filter(|s| s.node.as_deref() == Some("2") && s.step.is_some())
        .map(|s| (s.step, s.max))
        .collect();
    assert_eq!(steps.first(), Some(&(Some(1), Some(3))));
    assert_eq!(steps.last(), Some(&(Some(3), Some(3))));
    let at_step_1 = snapshots.iter().find(|s| s.step == Some(1)).expect("step 1").fraction;
    let at_step_3 = snapshots.iter().find(|s| s.step == Some(3)).expect("step 3").fraction;
    assert!(at_step_1 > 0.0 && at_step_1 < at_step_3, "{at_step_1} then {at_step_3}");
    assert_eq!(
        snapshots.iter().find(|s| s.node.as_deref() == Some("2")).and_then(|s| s.node_type.as_deref()),
        Some("SlowPassthrough")
    );
    assert_eq!(snapshots.last().expect("last").fraction, 1.0, "all non-cached nodes done");
}

#[test]
fn every_captured_run_progresses_monotonically() {
    for file in captures::names("run_") {
        let run = captures::load(&file);
        if !run["ws_sequence"].is_array() || !run["post_prompt"].is_object() {
            continue;
        }
        let snapshots = replay(&file);
        assert_monotonic(&file, &snapshots);
        assert!(snapshots.iter().all(|s| (0.0..=1.0).contains(&s.fraction)), "{file}");
    }
}

#[test]
fn a_late_cache_announcement_never_moves_the_bar_back() {
    let graph: Value = json!({
        "1": {"class_type": "LoadImage", "inputs": {}},
        "2": {"class_type": "ImageInvert", "inputs": {}},
        "3": {"class_type": "SaveImage", "inputs": {}},
        "4": {"class_type": "SaveImage", "inputs": {}}
    });
    let mut tracker = ProgressTracker::new(&graph);
    let executing = |node: &str| ComfyEvent::Executing { prompt_id: None, node: Some(node.into()), display_node: None };
    tracker.observe(&executing("1"));
    tracker.observe(&executing("2"));
    let before = tracker.take_snapshot().fraction;
    assert!(before > 0.0);
    // A node that was counted as done now turns out to be cached: the total shrinks.
    tracker.observe(&ComfyEvent::ExecutionCached { prompt_id: None, nodes: vec!["1".into()] });
    assert!(tracker.take_snapshot().fraction >= before);
    tracker.complete();
    assert_eq!(tracker.snapshot().fraction, 1.0);
}
