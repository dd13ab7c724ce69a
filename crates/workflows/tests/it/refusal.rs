//! Workflows whose bindings cannot be resolved are refused at load with a report that names
//! the file, the parameter and the reason.

use serde_json::{Value, json};
use tdcomfy_workflows::{NodeMap, Problem, WorkflowError, WorkflowRegistry};

use crate::support::{raw_template, set_title, shipped, temp_dir_with};

/// Loads a directory holding `good.json` (the default, always valid) plus the given files, and
/// returns the problems of the report.
fn problems_for(files: &[(&str, &str)], map: &str) -> (Vec<Problem>, String) {
    let good = shipped("image_invert").to_string();
    let mut all = vec![("good.json", good.as_str())];
    all.extend_from_slice(files);
    let dir = temp_dir_with(&all);
    let map = NodeMap::parse(map).unwrap_or_else(|e| panic!("{e}"));
    match WorkflowRegistry::load(dir.path(), "good", &map) {
        Ok(_) => panic!("load should have failed"),
        Err(e @ WorkflowError::Invalid { .. }) => {
            let text = e.to_string();
            match e {
                WorkflowError::Invalid { problems } => (problems, text),
                _ => unreachable!(),
            }
        }
        Err(other) => panic!("expected an Invalid report, got {other}"),
    }
}

fn one_problem(files: &[(&str, &str)]) -> (Problem, String) {
    let (mut problems, text) = problems_for(files, "");
    assert_eq!(problems.len(), 1, "{text}");
    (problems.remove(0), text)
}

fn two_load_images() -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
        "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0],
              "blend_factor": 0.5, "blend_mode": "normal"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "blend"}}
    })
}

#[test]
fn two_load_images_feeding_the_output_are_ambiguous() {
    let g = two_load_images().to_string();
    let (p, text) = one_problem(&[("blend.json", &g)]);
    assert!(p.location.ends_with("blend.json"), "{text}");
    assert_eq!(p.param.as_deref(), Some("image"));
    assert!(p.reason.contains("2 LoadImage nodes") && p.reason.contains("1, 2"), "{text}");
    assert!(p.reason.contains("@image"), "the fix is named: {text}");
    assert!(text.contains("blend.json: parameter `image`:"), "{text}");
}

#[test]
fn ambiguity_is_resolved_by_a_marker_or_the_map() {
    let mut g = two_load_images();
    set_title(&mut g, "2", "@image");
    let dir = temp_dir_with(&[("blend.json", &g.to_string())]);
    let reg = WorkflowRegistry::load(dir.path(), "blend", &NodeMap::new()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reg.get("blend").and_then(|w| w.param("image")).map(|p| p.targets()[0].node_id.as_str()), Some("2"));

    let dir = temp_dir_with(&[("blend.json", &two_load_images().to_string())]);
    let map = NodeMap::parse(r#"{"blend": {"image": "1"}}"#).unwrap_or_else(|e| panic!("{e}"));
    let reg = WorkflowRegistry::load(dir.path(), "blend", &map).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reg.get("blend").and_then(|w| w.param("image")).map(|p| p.targets()[0].node_id.as_str()), Some("1"));
}

#[test]
fn workflow_without_load_image_is_refused() {
    let g = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "empty"}}
    })
    .to_string();
    let (p, text) = one_problem(&[("noimage.json", &g)]);
    assert!(p.location.ends_with("noimage.json"), "{text}");
    assert_eq!(p.param.as_deref(), Some("image"));
    assert!(p.reason.contains("no LoadImage node"), "{text}");
}

#[test]
fn load_image_that_feeds_no_output_is_refused() {
    let g = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "empty"}}
    })
    .to_string();
    let (p, text) = one_problem(&[("dangling.json", &g)]);
    assert_eq!(p.param.as_deref(), Some("image"));
    assert!(p.reason.contains("feeds no output node"), "{text}");
}

#[test]
fn ui_format_export_is_recognised() {
    let ui = json!({"last_node_id": 9, "nodes": [], "links": [], "version": 0.4}).to_string();
    let (p, text) = one_problem(&[("ui.json", &ui)]);
    assert!(p.reason.contains("UI-format") && p.reason.contains("API"), "{text}");
}

#[test]
fn invalid_json_names_file_and_position() {
    let (p, text) = one_problem(&[("broken.json", "{\"1\": {\"class_type\": ")]);
    assert!(p.location.ends_with("broken.json"), "{text}");
    assert!(p.reason.contains("not valid JSON") && p.reason.contains("line 1"), "{text}");
}

#[test]
fn graph_without_output_node_is_refused() {
    let g = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    })
    .to_string();
    let (problems, text) = problems_for(&[("nooutput.json", &g)], "");
    assert!(problems.iter().any(|p| p.param.is_none() && p.reason.contains("no output node")), "{text}");
}

#[test]
fn link_to_a_missing_node_is_refused() {
    let mut g = shipped("image_invert");
    g["2"]["inputs"]["image"] = json!(["99", 0]);
    let (problems, text) = problems_for(&[("dangling_link.json", &g.to_string())], "");
    assert!(problems.iter().any(|p| p.reason.contains("links to node 99")), "{text}");
}

#[test]
fn ambiguous_bare_marker_asks_for_an_explicit_input() {
    let mut g = raw_template();
    set_title(&mut g, "77", "@size");
    let (p, text) = one_problem(&[("ambiguous.json", &g.to_string())]);
    assert_eq!(p.param.as_deref(), Some("size"));
    assert!(p.reason.contains("ambiguous") && p.reason.contains("@size:<input>"), "{text}");
    assert!(p.reason.contains("width") && p.reason.contains("length"), "lists the inputs: {text}");
}

#[test]
fn marker_on_a_linked_input_is_refused() {
    let mut g = raw_template();
    set_title(&mut g, "82", "@img:image");
    let (p, text) = one_problem(&[("linked.json", &g.to_string())]);
    assert!(p.reason.contains("fed by a link"), "{text}");
}

#[test]
fn malformed_marker_title_is_refused() {
    let mut g = raw_template();
    set_title(&mut g, "72", "@seed please");
    let (p, text) = one_problem(&[("title.json", &g.to_string())]);
    assert!(p.reason.contains("`please` is not a marker"), "{text}");
}

#[test]
fn standard_marker_on_the_wrong_kind_of_input_is_refused() {
    let mut g = raw_template();
    set_title(&mut g, "6", "@seed");
    let (problems, text) = problems_for(&[("seed.json", &g.to_string())], "");
    assert!(
        problems.iter().any(|p| p.param.as_deref() == Some("seed") && p.reason.contains("must bind an integer input")),
        "{text}"
    );
}

#[test]
fn two_markers_on_one_input_are_refused() {
    let mut g = raw_template();
    set_title(&mut g, "77", "@a:width @b:width");
    let (p, text) = one_problem(&[("twice.json", &g.to_string())]);
    assert!(p.reason.contains("also bound to"), "{text}");
}

#[test]
fn out_of_range_literal_in_the_workflow_is_refused() {
    let mut g = raw_template();
    g["77"]["inputs"]["width"] = json!(32);
    let (p, text) = one_problem(&[("tiny.json", &g.to_string())]);
    assert_eq!(p.param.as_deref(), Some("width"));
    assert!(p.reason.contains("below the minimum 64"), "{text}");
}

#[test]
fn node_map_pointing_at_a_missing_node_is_refused() {
    let (problems, text) = problems_for(&[], r#"{"good": {"image": "78"}}"#);
    assert_eq!(problems.len(), 1, "{text}");
    assert_eq!(problems[0].param.as_deref(), Some("image"));
    assert!(problems[0].reason.contains("no node 78"), "{text}");
}

#[test]
fn node_map_scope_for_an_unknown_workflow_is_refused() {
    let (problems, text) = problems_for(&[], r#"{"ltxv_typo": {"image": "78"}}"#);
    assert!(problems.iter().any(|p| p.location == "node map" && p.reason.contains("ltxv_typo")), "{text}");
}

#[test]
fn malformed_node_map_is_rejected_with_the_expected_shape() {
    let err = NodeMap::parse("{image: 78}").expect_err("bad JSON refused");
    assert!(matches!(err, WorkflowError::NodeMap { .. }));
    assert!(err.to_string().contains("72.noise_seed"), "shows an example: {err}");
    let err = NodeMap::parse(r#"{"image": 78}"#).expect_err("number refused");
    assert!(err.to_string().contains("`image`"), "{err}");
    assert!(NodeMap::parse("  ").is_ok_and(|m| m.is_empty()));
}

#[test]
fn every_problem_in_every_file_is_reported_at_once() {
    let blend = two_load_images().to_string();
    let (problems, text) = problems_for(&[("a.json", &blend), ("b.json", "not json")], "");
    assert_eq!(problems.len(), 2, "{text}");
    assert!(text.starts_with("workflow check failed with 2 problems:"), "{text}");
    assert_eq!(text.lines().count(), 3, "one header line plus one line per problem: {text}");
    assert!(text.contains("a.json") && text.contains("b.json"), "{text}");
}
