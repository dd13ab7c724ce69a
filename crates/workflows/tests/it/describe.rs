//! `describe()`: the JSON served by `GET /workflows`.

use serde_json::{Value, json};
use tdcomfy_workflows::{NodeMap, WorkflowInfo, WorkflowRegistry};

use crate::support::workflows_dir;

fn described() -> Value {
    let reg = WorkflowRegistry::load(&workflows_dir(), "ltxv_image_to_video", &NodeMap::new())
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::to_value(reg.describe()).expect("serialize")
}

fn param<'a>(workflow: &'a Value, name: &str) -> &'a Value {
    workflow["parameters"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no parameter {name} in {workflow}"))
}

#[test]
fn describe_lists_every_workflow_with_the_default_flagged() {
    let v = described();
    let list = v.as_array().expect("array");
    let flags: Vec<(&str, bool)> =
        list.iter().map(|w| (w["name"].as_str().unwrap_or(""), w["is_default"].as_bool().unwrap_or(false))).collect();
    assert_eq!(flags, [("image_invert", false), ("ltxv_image_to_video", true)]);
}

#[test]
fn parameter_objects_have_the_documented_shape() {
    let v = described();
    let ltxv = &v[1];
    assert_eq!(
        param(ltxv, "frames"),
        &json!({
            "name": "frames", "type": "integer", "default": 97, "min": 9, "max": 16384, "step": 8,
            "description": "Number of generated frames, 8k+1 (9, 17, ..., 97)",
            "node_id": "77", "input": "length",
            "targets": [{"node_id": "77", "input": "length"}], "bound_by": "detected"
        })
    );
    let seed = param(ltxv, "seed");
    assert_eq!(seed["type"], "integer");
    assert_eq!(seed["default"], 42);
    assert_eq!(seed["min"], 0);
    assert_eq!(seed["max"].as_u64(), Some(u64::MAX));
    assert_eq!(seed["node_id"], "72");
    assert_eq!(seed["input"], "noise_seed");
    assert_eq!(seed["bound_by"], "marker");

    let image = param(ltxv, "image");
    assert_eq!(image["type"], "image");
    assert_eq!(image["min"], Value::Null);
    assert_eq!(image["step"], Value::Null);

    assert_eq!(param(ltxv, "prompt")["type"], "string");
    let fps = param(ltxv, "fps");
    assert_eq!(fps["type"], "number");
    assert_eq!(fps["default"], 24.0);
    assert_eq!(fps["targets"].as_array().map(Vec::len), Some(2));

    for p in ltxv["parameters"].as_array().expect("params") {
        let keys: Vec<&str> = p.as_object().expect("object").keys().map(String::as_str).collect();
        for required in ["name", "type", "default", "min", "max", "description", "node_id", "input"] {
            assert!(keys.contains(&required), "{} lacks {required}", p["name"]);
        }
        assert!(!p["description"].as_str().unwrap_or("").is_empty(), "{}", p["name"]);
    }
}

#[test]
fn standard_parameters_come_first() {
    let v = described();
    let names: Vec<&str> =
        v[1]["parameters"].as_array().expect("params").iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(&names[..4], ["image", "prompt", "negative", "seed"]);
}

#[test]
fn description_round_trips_for_rust_clients() {
    let v = described();
    let parsed: Vec<WorkflowInfo> = serde_json::from_value(v.clone()).expect("deserialize");
    assert_eq!(serde_json::to_value(&parsed).expect("serialize"), v);
}
