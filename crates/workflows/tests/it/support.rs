//! Shared fixtures: paths to the shipped workflows and the raw LTXV template, and helpers to
//! build graphs and temporary workflow directories.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use tdcomfy_workflows::{JobInputs, NodeBindings, NodeMap, Workflow};

/// The repository's `workflows/` directory.
pub fn workflows_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../workflows")
}

/// A shipped workflow file as JSON.
pub fn shipped(name: &str) -> Value {
    read_json(&workflows_dir().join(format!("{name}.json")))
}

/// The LTXV API template exactly as captured (no markers, 768×512, fps 25).
pub fn raw_template() -> Value {
    read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ltxv_i2v_api_template.json"))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Removes every `_meta` from a graph, i.e. all title markers.
pub fn strip_titles(mut graph: Value) -> Value {
    if let Some(nodes) = graph.as_object_mut() {
        for node in nodes.values_mut() {
            if let Some(obj) = node.as_object_mut() {
                obj.remove("_meta");
            }
        }
    }
    graph
}

/// Sets `_meta.title` of a node.
pub fn set_title(graph: &mut Value, node: &str, title: &str) {
    graph[node]["_meta"] = json!({ "title": title });
}

/// Builds a workflow without overrides, panicking with the report on failure.
pub fn workflow(name: &str, graph: Value) -> Workflow {
    workflow_with(name, graph, &NodeBindings::new())
}

/// Builds a workflow with node-map entries, panicking with the report on failure.
pub fn workflow_with(name: &str, graph: Value, overrides: &NodeBindings) -> Workflow {
    Workflow::from_graph(name, graph, overrides).unwrap_or_else(|e| panic!("{e}"))
}

/// The node-map entries for `name` as the default workflow.
pub fn map_for(json_text: &str, name: &str) -> NodeBindings {
    NodeMap::parse(json_text).unwrap_or_else(|e| panic!("{e}")).for_workflow(name, true)
}

/// `(node_id, input)` pairs a parameter writes to.
pub fn targets(w: &Workflow, param: &str) -> Vec<(String, String)> {
    w.param(param)
        .unwrap_or_else(|| panic!("workflow {} has no parameter `{param}`", w.name()))
        .targets()
        .iter()
        .map(|t| (t.node_id.clone(), t.input.clone()))
        .collect()
}

/// Shorthand for expected targets.
pub fn t(node: &str, input: &str) -> (String, String) {
    (node.to_string(), input.to_string())
}

/// A temporary directory holding the given `(file name, contents)` files.
pub fn temp_dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("create temp dir");
    for (name, contents) in files {
        std::fs::write(dir.path().join(name), contents).expect("write fixture");
    }
    dir
}

/// Job inputs with an image and a job id; everything else unset.
pub fn job(job_id: &str) -> JobInputs {
    JobInputs { image_name: "td/frame_000123.png".to_string(), job_id: job_id.to_string(), ..JobInputs::default() }
}

/// A params map from a JSON object literal.
pub fn params(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("params must be an object, got {other}"),
    }
}

/// The classic SD1.5 text-to-image-like graph (img2img) with KSampler.
pub fn ksampler_graph() -> Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad, blurry"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a lighthouse"}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 7, "steps": 20, "cfg": 7.5, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["2", 0],
            "latent_image": ["11", 0], "denoise": 0.6}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sd"}}
    })
}
