//! The node catalogue: which node classes the simulator knows and what their inputs look like.
//!
//! The definitions live in `object_info.json` (the `GET /object_info` shapes captured from ComfyUI
//! 0.3.64, plus hand-written entries for the nodes the capture did not cover). Validation reads the
//! same data, so what `/object_info` advertises and what `POST /prompt` accepts cannot drift apart.
//! Dropdowns that list files (uploaded images, model files) are filled in at request time.

use std::path::Path;
use std::sync::OnceLock;

use crate::json::{OMap, OValue};

const OBJECT_INFO: &str = include_str!("object_info.json");

/// Samplers whose run time is the simulated `job_time` and that report `progress`.
pub const SAMPLER_CLASSES: &[&str] = &["SamplerCustom", "KSampler"];

fn base_info() -> &'static OMap {
    static INFO: OnceLock<OMap> = OnceLock::new();
    INFO.get_or_init(|| match OValue::parse(OBJECT_INFO.as_bytes()) {
        Ok(OValue::Object(map)) => map,
        // The file is compiled in and covered by tests; an empty catalogue is the safe fallback.
        _ => OMap::new(),
    })
}

/// Where an input is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputCategory {
    /// under `required`
    Required,
    /// under `optional`
    Optional,
}

/// The declared type of an input.
#[derive(Debug, Clone, PartialEq)]
pub enum InputType {
    /// a named type such as `IMAGE`, `INT` or a V3 `COMBO`
    Named(String),
    /// a classic combo: the list of allowed values
    Combo(Vec<OValue>),
}

impl InputType {
    /// The type as JSON, as it appears in `input_config`.
    pub fn to_ovalue(&self) -> OValue {
        match self {
            InputType::Named(s) => OValue::str(s.clone()),
            InputType::Combo(list) => OValue::Array(list.clone()),
        }
    }

    /// The type name for link checks (`COMBO` for classic combos, as ComfyUI reports them).
    pub fn name(&self) -> &str {
        match self {
            InputType::Named(s) => s,
            InputType::Combo(_) => "COMBO",
        }
    }
}

/// One declared input of a node class.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// input name
    pub name: String,
    /// required or optional
    pub category: InputCategory,
    /// declared type
    pub input_type: InputType,
    /// the options dict (`{}` when the declaration has none)
    pub extra: OMap,
}

impl InputSpec {
    /// `[type, options]` as ComfyUI echoes it in `input_config`.
    pub fn input_config(&self) -> OValue {
        OValue::Array(vec![self.input_type.to_ovalue(), OValue::Object(self.extra.clone())])
    }

    /// A numeric bound from the options (`min`/`max`).
    pub fn bound(&self, key: &str) -> Option<&serde_json::Number> {
        match self.extra.get(key) {
            Some(OValue::Number(n)) => Some(n),
            _ => None,
        }
    }
}

/// Everything validation and execution need to know about a node class.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// inputs in declaration order (required first)
    pub inputs: Vec<InputSpec>,
    /// output slot types
    pub outputs: Vec<String>,
    /// whether the node is an output node
    pub output_node: bool,
}

/// Files that fill the dynamic dropdowns.
#[derive(Debug, Clone, Default)]
pub struct DynamicLists {
    /// image files directly in `<data>/input`, sorted
    pub input_images: Vec<String>,
    /// installed model files
    pub models: Vec<String>,
}

impl DynamicLists {
    /// Reads the input directory and takes the configured model list.
    pub fn gather(input_dir: &Path, models: &[String]) -> Self {
        let mut input_images: Vec<String> = std::fs::read_dir(input_dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|name| crate::files::is_image_name(name))
                    .collect()
            })
            .unwrap_or_default();
        input_images.sort();
        let mut models = models.to_vec();
        models.sort();
        Self { input_images, models }
    }
}

/// The `object_info` entry of one class with its dropdowns filled in.
pub fn node_info(class_type: &str, lists: &DynamicLists) -> Option<OValue> {
    let mut info = base_info().get(class_type)?.clone();
    let as_strings = |items: &[String]| OValue::Array(items.iter().map(|s| OValue::str(s.clone())).collect());
    let fill: Option<(&str, OValue)> = match class_type {
        "LoadImage" => Some(("image", as_strings(&lists.input_images))),
        "CheckpointLoaderSimple" => Some(("ckpt_name", as_strings(&lists.models))),
        "CLIPLoader" => Some(("clip_name", as_strings(&lists.models))),
        _ => None,
    };
    if let Some((input, list)) = fill {
        let slot = info
            .as_object_mut()
            .and_then(|m| m.get_mut("input"))
            .and_then(|v| v.as_object_mut())
            .and_then(|m| m.get_mut("required"))
            .and_then(|v| v.as_object_mut())
            .and_then(|m| m.get_mut(input));
        if let Some(OValue::Array(decl)) = slot
            && let Some(first) = decl.first_mut()
        {
            *first = list;
        }
    }
    Some(info)
}

/// The whole `GET /object_info` body.
pub fn all_node_info(lists: &DynamicLists) -> OMap {
    let mut out = OMap::new();
    for class in base_info().keys() {
        if let Some(info) = node_info(class, lists) {
            out.insert(class.clone(), info);
        }
    }
    out
}

/// The parsed specification of one class.
pub fn node_spec(class_type: &str, lists: &DynamicLists) -> Option<NodeSpec> {
    let info = node_info(class_type, lists)?;
    let input = info.get("input").and_then(OValue::as_object);
    let order = info.get("input_order").and_then(OValue::as_object);
    let mut inputs = Vec::new();
    for (cat_name, category) in [("required", InputCategory::Required), ("optional", InputCategory::Optional)] {
        let Some(decls) = input.and_then(|m| m.get(cat_name)).and_then(OValue::as_object) else {
            continue;
        };
        let names: Vec<String> = order
            .and_then(|m| m.get(cat_name))
            .and_then(OValue::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_else(|| decls.keys().cloned().collect());
        for name in names {
            let Some(decl) = decls.get(&name).and_then(OValue::as_array) else {
                continue;
            };
            let input_type = match decl.first() {
                Some(OValue::Array(list)) => InputType::Combo(list.clone()),
                Some(OValue::String(s)) => InputType::Named(s.clone()),
                _ => InputType::Named("*".to_string()),
            };
            let extra = decl.get(1).and_then(OValue::as_object).cloned().unwrap_or_default();
            inputs.push(InputSpec { name, category, input_type, extra });
        }
    }
    let outputs = info
        .get("output")
        .and_then(OValue::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let output_node = matches!(info.get("output_node"), Some(OValue::Bool(true)));
    Some(NodeSpec { inputs, outputs, output_node })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_parses_and_fills_dropdowns() {
        let lists = DynamicLists {
            input_images: vec!["frame.png".into()],
            models: vec!["ltx-video-2b-v0.9.5.safetensors".into()],
        };
        assert!(all_node_info(&lists).keys().count() >= 30);
        let spec = node_spec("ImageScale", &lists).expect("ImageScale known");
        let names: Vec<&str> = spec.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["image", "upscale_method", "width", "height", "crop"]);
        let ckpt = node_spec("CheckpointLoaderSimple", &lists).expect("known");
        assert_eq!(ckpt.inputs[0].input_type, InputType::Combo(vec![OValue::str("ltx-video-2b-v0.9.5.safetensors")]));
        assert_eq!(ckpt.outputs, ["MODEL", "CLIP", "VAE"]);
        let load = node_info("LoadImage", &lists).expect("known");
        assert_eq!(
            load.get("input").and_then(|v| v.get("required")).and_then(|v| v.get("image")).map(|v| v.to_value()),
            Some(serde_json::json!([["frame.png"], {"image_upload": true}]))
        );
    }
}
