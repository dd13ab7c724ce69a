//! `Workflow::bind`: the graph a job posts to ComfyUI.

use serde_json::{Value, json};
use tdcomfy_workflows::{BindError, JobInputs, job_output_subfolder};

use crate::support::{job, params, raw_template, shipped, workflow};

fn ltxv() -> tdcomfy_workflows::Workflow {
    workflow("ltxv_image_to_video", shipped("ltxv_image_to_video"))
}

#[test]
fn bind_writes_image_prompts_and_seed() {
    let w = ltxv();
    let inputs = JobInputs {
        prompt: Some("a red fox runs through snow".into()),
        negative_prompt: Some("blurry".into()),
        seed: Some(123_456_789),
        ..job("job-1")
    };
    let g = w.bind(&inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g["78"]["inputs"]["image"], "td/frame_000123.png");
    assert_eq!(g["6"]["inputs"]["text"], "a red fox runs through snow");
    assert_eq!(g["7"]["inputs"]["text"], "blurry");
    assert_eq!(g["72"]["inputs"]["noise_seed"], 123_456_789);
}

#[test]
fn bind_leaves_every_other_input_untouched() {
    let w = ltxv();
    let original = w.graph().clone();
    let inputs = JobInputs { prompt: Some("p".into()), seed: Some(1), ..job("job-2") };
    let g = w.bind(&inputs).unwrap_or_else(|e| panic!("{e}"));
    let changed = [("78", "image"), ("6", "text"), ("72", "noise_seed"), ("81", "filename_prefix")];
    let (Some(before), Some(after)) = (original.as_object(), g.as_object()) else {
        panic!("graphs are objects");
    };
    assert_eq!(before.len(), after.len());
    for (id, node) in before {
        assert_eq!(node["class_type"], after[id]["class_type"], "node {id}");
        assert_eq!(node["_meta"], after[id]["_meta"], "node {id}");
        let Some(inputs) = node["inputs"].as_object() else {
            continue;
        };
        for (name, value) in inputs {
            if changed.contains(&(id.as_str(), name.as_str())) {
                continue;
            }
            assert_eq!(value, &after[id]["inputs"][name], "node {id} input {name}");
        }
    }
    // The negative prompt was not given, so it keeps the workflow's text.
    assert_eq!(g["7"]["inputs"]["text"], original["7"]["inputs"]["text"]);
}

#[test]
fn absent_seed_keeps_the_workflow_literal() {
    let g = ltxv().bind(&job("job-3")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g["72"]["inputs"]["noise_seed"], 42);
    assert_eq!(g["6"]["inputs"]["text"], shipped("ltxv_image_to_video")["6"]["inputs"]["text"]);
}

#[test]
fn output_prefixes_are_unique_per_job() {
    let w = ltxv();
    let a = w.bind(&job("job-a")).unwrap_or_else(|e| panic!("{e}"));
    let b = w.bind(&job("job-b")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a["81"]["inputs"]["filename_prefix"], "tdcomfy/job-a/81");
    assert_eq!(b["81"]["inputs"]["filename_prefix"], "tdcomfy/job-b/81");
    assert_eq!(job_output_subfolder("job-a"), "tdcomfy/job-a");
}

#[test]
fn every_output_node_gets_a_job_prefix() {
    let mut g = raw_template();
    g["90"] = json!({"class_type": "SaveAnimatedWEBP", "inputs": {
        "images": ["8", 0], "filename_prefix": "td/preview", "fps": 25.0,
        "lossless": false, "quality": 90, "method": "default"}});
    let w = workflow("two_outputs", g);
    let bound = w.bind(&job("j7")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bound["81"]["inputs"]["filename_prefix"], "tdcomfy/j7/81");
    assert_eq!(bound["90"]["inputs"]["filename_prefix"], "tdcomfy/j7/90");
}

#[test]
fn named_params_are_written_to_all_their_inputs() {
    let w = ltxv();
    let inputs = JobInputs {
        params: params(json!({"frames": 49, "fps": 12, "width": 384, "out_width": 768, "cfg": 2.5})),
        ..job("job-4")
    };
    let g = w.bind(&inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g["77"]["inputs"]["length"], 49);
    assert_eq!(g["80"]["inputs"]["fps"], 12);
    assert_eq!(g["69"]["inputs"]["frame_rate"], 12);
    assert_eq!(g["77"]["inputs"]["width"], 384);
    assert_eq!(g["83"]["inputs"]["width"], 768);
    assert_eq!(g["72"]["inputs"]["cfg"], 2.5);
    assert_eq!(g["77"]["inputs"]["height"], 160, "unset params keep the literal");
}

#[test]
fn integral_floats_from_touchdesigner_become_integers() {
    let inputs = JobInputs { params: params(json!({"frames": 97.0})), ..job("job-5") };
    let g = ltxv().bind(&inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g["77"]["inputs"]["length"], json!(97));
    assert!(g["77"]["inputs"]["length"].is_u64() || g["77"]["inputs"]["length"].is_i64());
}

#[test]
fn full_u64_seed_round_trips() {
    let inputs = JobInputs { seed: Some(u64::MAX), ..job("job-6") };
    let g = ltxv().bind(&inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g["72"]["inputs"]["noise_seed"].as_u64(), Some(u64::MAX));
}

#[test]
fn standard_params_may_come_through_params() {
    let inputs = JobInputs { params: params(json!({"prompt": "from params", "seed": 5})), ..job("job-7") };
    let g = ltxv().bind(&inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g["6"]["inputs"]["text"], "from params");
    assert_eq!(g["72"]["inputs"]["noise_seed"], 5);
}

#[test]
fn a_standard_param_given_twice_differently_is_a_conflict() {
    let inputs = JobInputs { seed: Some(1), params: params(json!({"seed": 2})), ..job("job-8") };
    assert_eq!(ltxv().bind(&inputs), Err(BindError::Conflict { name: "seed".into() }));
    let same = JobInputs { seed: Some(2), params: params(json!({"seed": 2})), ..job("job-8") };
    assert!(ltxv().bind(&same).is_ok());
}

#[test]
fn fields_a_workflow_does_not_bind_are_ignored() {
    let w = workflow("image_invert", shipped("image_invert"));
    let inputs = JobInputs { prompt: Some("ignored".into()), seed: Some(3), ..job("job-9") };
    let g = w.bind(&inputs).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g["1"]["inputs"]["image"], "td/frame_000123.png");
    assert_eq!(g["3"]["inputs"]["filename_prefix"], "tdcomfy/job-9/3");
    assert_eq!(g["2"], shipped("image_invert")["2"]);
}

#[test]
fn unsafe_job_ids_and_missing_images_are_refused() {
    let w = ltxv();
    for bad in ["", "../escape", "a/b", "a b", "C:x"] {
        let err = w.bind(&job(bad)).err();
        assert_eq!(err, Some(BindError::InvalidJobId { job_id: bad.into() }), "{bad:?}");
    }
    let no_image = JobInputs { image_name: String::new(), ..job("ok") };
    assert_eq!(w.bind(&no_image), Err(BindError::MissingImage));
}

#[test]
fn bound_graph_is_a_plain_api_prompt() {
    // What gets POSTed: node objects with class_type and inputs, nothing added.
    let g: Value = ltxv().bind(&job("job-10")).unwrap_or_else(|e| panic!("{e}"));
    let nodes = g.as_object().expect("object");
    assert_eq!(nodes.len(), 15);
    assert!(nodes.values().all(|n| n["class_type"].is_string() && n["inputs"].is_object()));
}
