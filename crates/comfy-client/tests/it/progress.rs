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

/// Newer ComfyUI's `progress_state` (C7, C12): an `activity` is a stage, node ids the submitted
/// graph does not have (subgraph and loop expansions) count for the node they stand for.
#[test]
fn activity_is_a_stage_and_foreign_node_ids_do_not_break_progress() {
    let graph = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
        "2": {"class_type": "KSampler", "inputs": {}},
        "3": {"class_type": "SaveVideo", "inputs": {}}
    });
    let mut tracker = ProgressTracker::new(&graph);
    let event = |v: Value| ComfyEvent::from_text(&v.to_string()).expect("parse");
    let p = "a1b2";
    let mut snapshots = Vec::new();
    let feed = |tracker: &mut ProgressTracker, snapshots: &mut Vec<RunProgress>, v: Value| {
        tracker.observe(&event(v));
        snapshots.push(tracker.take_snapshot());
    };
    feed(&mut tracker, &mut snapshots, json!({"type": "executing", "data": {"node": "1", "prompt_id": p}}));
    feed(
        &mut tracker,
        &mut snapshots,
        json!({"type": "progress_state", "data": {"prompt_id": p, "nodes": {
        "1": {"value": 0, "max": 1, "state": "running", "node_id": "1", "prompt_id": p, "display_node_id": "1",
              "parent_node_id": null, "real_node_id": "1", "activity": "loading"}}}}),
    );
    assert_eq!(snapshots.last().unwrap().stage.as_deref(), Some("loading"));
    assert_eq!(snapshots.last().unwrap().node_type.as_deref(), Some("CheckpointLoaderSimple"));
    // Inside a subgraph of node 2: an id the graph does not have, with its real node named.
    feed(
        &mut tracker,
        &mut snapshots,
        json!({"type": "executing", "data": {"node": "2:17", "display_node": "2", "prompt_id": p}}),
    );
    feed(
        &mut tracker,
        &mut snapshots,
        json!({"type": "progress", "data": {"value": 5, "max": 10, "node": "2:17", "prompt_id": p}}),
    );
    feed(
        &mut tracker,
        &mut snapshots,
        json!({"type": "progress_state", "data": {"prompt_id": p, "nodes": {
        "1": {"value": 1, "max": 1, "state": "finished", "real_node_id": "1"},
        "2:17": {"value": 5, "max": 10, "state": "running", "display_node_id": "2", "parent_node_id": "2", "real_node_id": "17",
                 "unknown_future_key": {"x": 1}}}}}),
    );
    let last = snapshots.last().unwrap().clone();
    assert_eq!(last.stage, None, "no activity any more");
    assert_eq!((last.node.as_deref(), last.node_type.as_deref()), (Some("2"), Some("KSampler")));
    assert_eq!((last.step, last.max), (Some(5), Some(10)));
    // A loop body's node finishes under its own id; `display_node` names the graph node.
    feed(
        &mut tracker,
        &mut snapshots,
        json!({"type": "executed", "data": {"node": "2.loop.1", "display_node": "2", "output": null, "prompt_id": p}}),
    );
    // A node added at run time (a loop body) is reported but has no share of the bar.
    feed(&mut tracker, &mut snapshots, json!({"type": "executing", "data": {"node": "loop-99", "prompt_id": p}}));
    assert_eq!(snapshots.last().unwrap().node.as_deref(), Some("loop-99"));
    assert!(snapshots.windows(2).all(|w| w[1].fraction >= w[0].fraction), "monotonic: {snapshots:?}");
    assert!(snapshots.last().unwrap().fraction > 0.3, "the loader and half the sampler count: {snapshots:?}");
}
