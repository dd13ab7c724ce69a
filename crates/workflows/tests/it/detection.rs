//! Detection by class type and graph tracing, on the raw captured LTXV template and on other
//! common graph shapes.

use serde_json::json;
use tdcomfy_workflows::{BindingSource, ParamType};

use crate::support::{ksampler_graph, raw_template, shipped, strip_titles, t, targets, workflow};

#[test]
fn raw_template_resolves_every_standard_binding_by_tracing() {
    let w = workflow("template", raw_template());
    assert_eq!(targets(&w, "image"), [t("78", "image")]);
    assert_eq!(targets(&w, "prompt"), [t("6", "text")]);
    assert_eq!(targets(&w, "negative"), [t("7", "text")]);
    assert_eq!(targets(&w, "seed"), [t("72", "noise_seed")]);
    for p in w.params() {
        assert_eq!(p.source(), BindingSource::Detected, "{}", p.name());
    }
}

#[test]
fn raw_template_exposes_ltxv_size_length_fps_steps_cfg() {
    let w = workflow("template", raw_template());
    assert_eq!(targets(&w, "width"), [t("77", "width")]);
    assert_eq!(targets(&w, "height"), [t("77", "height")]);
    assert_eq!(targets(&w, "frames"), [t("77", "length")]);
    assert_eq!(targets(&w, "fps"), [t("69", "frame_rate"), t("80", "fps")]);
    assert_eq!(targets(&w, "steps"), [t("71", "steps")]);
    assert_eq!(targets(&w, "cfg"), [t("72", "cfg")]);
    assert_eq!(w.param("width").map(|p| p.default_value().clone()), Some(json!(768)));
    assert_eq!(w.param("fps").map(|p| p.default_value().clone()), Some(json!(25.0)));
    assert_eq!(w.param("fps").map(|p| p.param_type()), Some(ParamType::Number));
    assert_eq!(w.param("frames").map(|p| p.param_type()), Some(ParamType::Integer));
    assert_eq!(w.primary_output_hint(), Some("81"));
}

#[test]
fn shipped_ltxv_without_markers_detects_the_same_standard_bindings() {
    let w = workflow("stripped", strip_titles(shipped("ltxv_image_to_video")));
    assert_eq!(targets(&w, "image"), [t("78", "image")]);
    assert_eq!(targets(&w, "prompt"), [t("6", "text")]);
    assert_eq!(targets(&w, "negative"), [t("7", "text")]);
    assert_eq!(targets(&w, "seed"), [t("72", "noise_seed")]);
    // The upscale size is only exposed through its marker.
    assert!(w.param("out_width").is_none());
    assert_eq!(w.primary_output_hint(), Some("81"));
}

#[test]
fn prompt_and_negative_follow_the_wiring_not_the_node_ids() {
    // Swap which encoder feeds LTXVImgToVideo's positive/negative: tracing must follow suit.
    let mut g = raw_template();
    g["77"]["inputs"]["positive"] = json!(["7", 0]);
    g["77"]["inputs"]["negative"] = json!(["6", 0]);
    let w = workflow("swapped", g);
    assert_eq!(targets(&w, "prompt"), [t("7", "text")]);
    assert_eq!(targets(&w, "negative"), [t("6", "text")]);
}

#[test]
fn tracing_follows_conditioning_output_indices_through_passthrough_nodes() {
    // The sampler takes LTXVConditioning's outputs crosswise: positive ← output 1, which is
    // LTXVConditioning's negative, which traces to node 7.
    let mut g = raw_template();
    g["72"]["inputs"]["positive"] = json!(["69", 1]);
    g["72"]["inputs"]["negative"] = json!(["69", 0]);
    let w = workflow("crossed", g);
    assert_eq!(targets(&w, "prompt"), [t("7", "text")]);
    assert_eq!(targets(&w, "negative"), [t("6", "text")]);
}

#[test]
fn ksampler_graph_binds_seed_steps_cfg_and_prompts() {
    let w = workflow("sd", ksampler_graph());
    assert_eq!(targets(&w, "image"), [t("10", "image")]);
    assert_eq!(targets(&w, "prompt"), [t("6", "text")]);
    assert_eq!(targets(&w, "negative"), [t("2", "text")]);
    assert_eq!(targets(&w, "seed"), [t("3", "seed")]);
    assert_eq!(targets(&w, "steps"), [t("3", "steps")]);
    assert_eq!(targets(&w, "cfg"), [t("3", "cfg")]);
    assert!(w.param("fps").is_none() && w.param("frames").is_none());
}

#[test]
fn negative_made_from_the_positive_is_not_a_negative_prompt() {
    // Flux-style: the negative is ConditioningZeroOut of the positive encoder.
    let mut g = ksampler_graph();
    g.as_object_mut().map(|m| m.remove("2"));
    g["12"] = json!({"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}});
    g["3"]["inputs"]["negative"] = json!(["12", 0]);
    let w = workflow("flux_like", g);
    assert_eq!(targets(&w, "prompt"), [t("6", "text")]);
    assert!(w.param("negative").is_none(), "no separate negative prompt exists");
}

#[test]
fn workflow_without_text_encoders_has_only_the_image() {
    let w = workflow("invert", shipped("image_invert"));
    assert!(w.param("prompt").is_none());
    assert!(w.param("negative").is_none());
    assert!(w.param("seed").is_none());
}

#[test]
fn one_of_two_load_images_feeding_the_output_is_picked() {
    // A leftover LoadImage that feeds nothing does not make the binding ambiguous.
    let mut g = shipped("image_invert");
    g["9"] = json!({"class_type": "LoadImage", "inputs": {"image": "leftover.png"}});
    let w = workflow("leftover", g);
    assert_eq!(targets(&w, "image"), [t("1", "image")]);
}

#[test]
fn all_fps_inputs_bind_together_and_take_the_tightest_range() {
    let mut g = raw_template();
    g["90"] = json!({"class_type": "SaveAnimatedWEBP", "inputs": {
        "images": ["8", 0], "filename_prefix": "tdcomfy/preview", "fps": 25.0,
        "lossless": false, "quality": 90, "method": "default"}});
    let w = workflow("two_outputs", g);
    assert_eq!(targets(&w, "fps"), [t("69", "frame_rate"), t("80", "fps"), t("90", "fps")]);
    let info = w.describe(false);
    let fps = info.parameters.iter().find(|p| p.name == "fps").expect("fps described");
    // CreateVideo allows 1..120, LTXVConditioning > 0..1000, SaveAnimatedWEBP 0.01..1000.
    assert_eq!(fps.min.as_ref().and_then(|n| n.as_f64()), Some(1.0));
    assert_eq!(fps.max.as_ref().and_then(|n| n.as_f64()), Some(120.0));
    // SaveVideo is a video, SaveAnimatedWEBP an animation: the video is the primary result.
    assert_eq!(w.output_nodes(), ["81", "90"]);
    assert_eq!(w.primary_output_hint(), Some("81"));
}

#[test]
fn two_equally_ranked_outputs_give_no_primary_hint_unless_marked() {
    let mut g = raw_template();
    g["91"] = json!({"class_type": "SaveVideo", "inputs": {
        "video": ["80", 0], "filename_prefix": "tdcomfy/copy", "format": "mp4", "codec": "h264"}});
    let w = workflow("two_videos", g.clone());
    assert_eq!(w.primary_output_hint(), None);
    crate::support::set_title(&mut g, "91", "@output");
    let w = workflow("two_videos_marked", g);
    assert_eq!(w.primary_output_hint(), Some("91"));
}
