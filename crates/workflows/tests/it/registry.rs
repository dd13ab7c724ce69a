//! Loading the shipped `workflows/` directory and the registry's lookup API.

use tdcomfy_workflows::{BindError, BindingSource, NodeMap, WorkflowError, WorkflowRegistry};

use crate::support::{t, targets, temp_dir_with, workflows_dir};

fn load_shipped() -> WorkflowRegistry {
    WorkflowRegistry::load(&workflows_dir(), "ltxv_image_to_video", &NodeMap::new()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn shipped_directory_loads_with_ltxv_as_default() {
    let reg = load_shipped();
    assert_eq!(reg.names(), vec!["image_invert", "ltxv_image_to_video"]);
    assert_eq!(reg.default_name(), "ltxv_image_to_video");
    assert_eq!(reg.default_workflow().name(), "ltxv_image_to_video");
    assert_eq!(reg.select(None).map(|w| w.name()), Ok("ltxv_image_to_video"));
    assert_eq!(reg.select(Some("image_invert")).map(|w| w.name()), Ok("image_invert"));
}

#[test]
fn default_may_be_given_as_a_file_name() {
    let reg = WorkflowRegistry::load(&workflows_dir(), "image_invert.json", &NodeMap::new())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reg.default_name(), "image_invert");
}

#[test]
fn shipped_ltxv_binds_every_parameter_by_its_marker_or_detection() {
    let reg = load_shipped();
    let w = reg.get("ltxv_image_to_video").expect("ltxv loaded");
    let names: Vec<&str> = w.params().iter().map(|p| p.name()).collect();
    assert_eq!(
        names,
        [
            "image",
            "prompt",
            "negative",
            "seed",
            "cfg",
            "fps",
            "frames",
            "height",
            "out_height",
            "out_width",
            "steps",
            "width"
        ]
    );
    assert_eq!(targets(w, "image"), [t("78", "image")]);
    assert_eq!(targets(w, "prompt"), [t("6", "text")]);
    assert_eq!(targets(w, "negative"), [t("7", "text")]);
    assert_eq!(targets(w, "seed"), [t("72", "noise_seed")]);
    assert_eq!(targets(w, "out_width"), [t("83", "width")]);
    assert_eq!(targets(w, "out_height"), [t("83", "height")]);
    for marked in ["image", "prompt", "negative", "seed", "out_width", "out_height"] {
        assert_eq!(w.param(marked).map(|p| p.source()), Some(BindingSource::Marker), "{marked}");
    }
    assert_eq!(targets(w, "fps"), [t("69", "frame_rate"), t("80", "fps")]);
    assert_eq!(w.param("fps").map(|p| p.source()), Some(BindingSource::Detected));
    assert_eq!(w.output_nodes(), ["81"]);
    assert_eq!(w.primary_output_hint(), Some("81"));
}

#[test]
fn shipped_ltxv_has_the_product_settings() {
    let w = crate::support::shipped("ltxv_image_to_video");
    assert_eq!(w["77"]["inputs"]["width"], 256);
    assert_eq!(w["77"]["inputs"]["height"], 160);
    assert_eq!(w["77"]["inputs"]["length"], 97);
    assert_eq!(w["83"]["class_type"], "ImageScale");
    assert_eq!(w["83"]["inputs"]["image"], serde_json::json!(["8", 0]));
    assert_eq!(w["83"]["inputs"]["width"], 512);
    assert_eq!(w["83"]["inputs"]["height"], 320);
    assert_eq!(w["80"]["inputs"]["images"], serde_json::json!(["83", 0]));
    assert_eq!(w["80"]["inputs"]["fps"], 24.0);
    assert_eq!(w["69"]["inputs"]["frame_rate"], 24.0);
    assert_eq!(w["81"]["inputs"]["format"], "mp4");
    assert_eq!(w["81"]["inputs"]["codec"], "h264");
    assert!(w["81"]["inputs"]["filename_prefix"].as_str().is_some_and(|p| p.starts_with("tdcomfy/")));
    assert_eq!(w["38"]["inputs"]["clip_name"], "t5xxl_fp16.safetensors");
    assert_eq!(w["38"]["inputs"]["type"], "ltxv");
    assert_eq!(w["44"]["inputs"]["ckpt_name"], "ltx-video-2b-v0.9.5.safetensors");
}

#[test]
fn shipped_image_invert_has_no_markers_and_is_detected() {
    let raw = crate::support::shipped("image_invert");
    assert!(
        raw.as_object().is_some_and(|nodes| nodes.values().all(|n| n.get("_meta").is_none())),
        "image_invert.json must stay marker-free so detection is exercised"
    );
    let reg = load_shipped();
    let w = reg.get("image_invert").expect("image_invert loaded");
    let names: Vec<&str> = w.params().iter().map(|p| p.name()).collect();
    assert_eq!(names, ["image"]);
    assert_eq!(targets(w, "image"), [t("1", "image")]);
    assert_eq!(w.param("image").map(|p| p.source()), Some(BindingSource::Detected));
    assert_eq!(w.output_nodes(), ["3"]);
    assert_eq!(w.primary_output_hint(), Some("3"));
}

#[test]
fn unknown_workflow_name_is_a_client_error_listing_the_known_ones() {
    let reg = load_shipped();
    let err = reg.select(Some("ltxv")).expect_err("unknown name refused");
    assert_eq!(
        err,
        BindError::UnknownWorkflow {
            name: "ltxv".to_string(),
            known: vec!["image_invert".to_string(), "ltxv_image_to_video".to_string()],
        }
    );
    assert!(err.to_string().contains("image_invert, ltxv_image_to_video"), "{err}");
}

#[test]
fn unknown_default_names_the_available_workflows() {
    let err = WorkflowRegistry::load(&workflows_dir(), "ltx", &NodeMap::new()).expect_err("unknown default refused");
    assert!(matches!(err, WorkflowError::UnknownDefault { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`ltx`") && msg.contains("image_invert, ltxv_image_to_video"), "{msg}");
}

#[test]
fn empty_directory_is_refused() {
    let dir = temp_dir_with(&[("notes.txt", "not a workflow")]);
    let err = WorkflowRegistry::load(dir.path(), "x", &NodeMap::new()).expect_err("no workflows refused");
    assert!(matches!(err, WorkflowError::NoWorkflows { .. }), "{err:?}");
    assert!(err.to_string().contains("no *.json files"), "{err}");
}

#[test]
fn missing_directory_is_an_io_error_naming_it() {
    let dir = temp_dir_with(&[]);
    let missing = dir.path().join("nope");
    let err = WorkflowRegistry::load(&missing, "x", &NodeMap::new()).expect_err("missing dir refused");
    assert!(matches!(err, WorkflowError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn workflow_saved_with_a_utf8_bom_loads() {
    let text = format!("\u{feff}{}", crate::support::shipped("image_invert"));
    let dir = temp_dir_with(&[("bom.json", &text)]);
    let reg = WorkflowRegistry::load(dir.path(), "bom", &NodeMap::new()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(targets(reg.default_workflow(), "image"), [t("1", "image")]);
}
