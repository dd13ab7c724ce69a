//! Precedence between the three binding sources: node map > title markers > detection.

use serde_json::json;
use tdcomfy_workflows::{BindingSource, NodeMap, WorkflowRegistry};

use crate::support::{map_for, raw_template, set_title, shipped, t, targets, temp_dir_with, workflow, workflow_with};

/// The template plus a second prompt-like encoder that nothing traces to.
fn template_with_spare_encoder() -> serde_json::Value {
    let mut g = raw_template();
    g["50"] = json!({"class_type": "CLIPTextEncode", "inputs": {"clip": ["38", 0], "text": "spare"}});
    g
}

#[test]
fn marker_beats_detection() {
    let mut g = template_with_spare_encoder();
    set_title(&mut g, "50", "@prompt");
    let w = workflow("marked", g);
    assert_eq!(targets(&w, "prompt"), [t("50", "text")]);
    assert_eq!(w.param("prompt").map(|p| p.source()), Some(BindingSource::Marker));
    // Other names keep their detected bindings.
    assert_eq!(targets(&w, "negative"), [t("7", "text")]);
}

#[test]
fn explicit_map_beats_detection() {
    let g = template_with_spare_encoder();
    let w = workflow_with("mapped", g, &map_for(r#"{"prompt": "50"}"#, "mapped"));
    assert_eq!(targets(&w, "prompt"), [t("50", "text")]);
    assert_eq!(w.param("prompt").map(|p| p.source()), Some(BindingSource::NodeMap));
}

#[test]
fn explicit_map_beats_marker() {
    let mut g = template_with_spare_encoder();
    set_title(&mut g, "50", "@prompt");
    let w = workflow_with("both", g, &map_for(r#"{"prompt": "6"}"#, "both"));
    assert_eq!(targets(&w, "prompt"), [t("6", "text")]);
}

#[test]
fn map_accepts_explicit_inputs_and_lists() {
    let w = workflow_with(
        "explicit",
        raw_template(),
        &map_for(r#"{"seed": "72.noise_seed", "fps": ["80.fps"], "strength": "77.strength"}"#, "explicit"),
    );
    assert_eq!(targets(&w, "seed"), [t("72", "noise_seed")]);
    // The map's fps replaces the detected pair entirely.
    assert_eq!(targets(&w, "fps"), [t("80", "fps")]);
    assert_eq!(targets(&w, "strength"), [t("77", "strength")]);
}

#[test]
fn marker_with_explicit_input_and_bare_marker_rules() {
    let mut g = raw_template();
    // `@frames` alone on LTXVImgToVideo means its `length`; `@amount:strength` is explicit;
    // LTXVPreprocess has a single value input, so a bare marker is unambiguous.
    set_title(&mut g, "77", "@frames @amount:strength");
    set_title(&mut g, "82", "@compression");
    let w = workflow("markers", g);
    assert_eq!(targets(&w, "frames"), [t("77", "length")]);
    assert_eq!(targets(&w, "amount"), [t("77", "strength")]);
    assert_eq!(targets(&w, "compression"), [t("82", "img_compression")]);
    assert_eq!(w.param("frames").map(|p| p.source()), Some(BindingSource::Marker));
}

#[test]
fn an_input_claimed_by_a_stronger_source_leaves_the_weaker_parameter() {
    // The map binds 77.length as `len`; detection's `frames` would bind the same input.
    let w = workflow_with("claim", raw_template(), &map_for(r#"{"len": "77.length"}"#, "claim"));
    assert_eq!(targets(&w, "len"), [t("77", "length")]);
    assert!(w.param("frames").is_none());
}

#[test]
fn unscoped_map_applies_to_the_default_workflow_only_and_scopes_to_their_workflow() {
    let mut ltxv = strip_prompt_markers(shipped("ltxv_image_to_video"));
    ltxv["50"] = json!({"class_type": "CLIPTextEncode", "inputs": {"clip": ["38", 0], "text": "spare"}});
    let dir = temp_dir_with(&[("ltxv.json", &ltxv.to_string()), ("invert.json", &shipped("image_invert").to_string())]);
    let map = NodeMap::parse(r#"{"prompt": "50", "invert": {"image": "1.image"}}"#).unwrap_or_else(|e| panic!("{e}"));
    let reg = WorkflowRegistry::load(dir.path(), "ltxv", &map).unwrap_or_else(|e| panic!("{e}"));
    let ltxv = reg.get("ltxv").expect("ltxv");
    assert_eq!(targets(ltxv, "prompt"), [t("50", "text")]);
    let invert = reg.get("invert").expect("invert");
    assert_eq!(invert.param("image").map(|p| p.source()), Some(BindingSource::NodeMap));
    assert!(invert.param("prompt").is_none(), "unscoped entries must not leak into other workflows");
}

fn strip_prompt_markers(mut g: serde_json::Value) -> serde_json::Value {
    for id in ["6", "7"] {
        if let Some(node) = g[id].as_object_mut() {
            node.remove("_meta");
        }
    }
    g
}
