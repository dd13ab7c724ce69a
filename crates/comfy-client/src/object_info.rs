//! `GET /object_info`: which node classes a ComfyUI server has and, for every input whose value
//! is one of a list (samplers, schedulers, the model files actually installed), that list.
//!
//! Two shapes of a list input exist and both are read:
//! - the classic one (every ComfyUI version): `"sampler_name": [["euler", "heun", …], {…}]`, the
//!   options as the first element;
//! - the V3 schema one (`comfy_api` nodes, e.g. `SaveVideo`, and most nodes of newer versions):
//!   `"format": ["COMBO", {"options": ["auto", "mp4"], "multiselect": false, …}]`.
//!
//! A V3 combo with `"remote"` gets its options from another route at edit time; ComfyUI itself
//! does not check it (C11), so neither does this catalog ([`InputSpec::Unchecked`]).

use std::collections::HashMap;

use serde_json::Value;

/// What one node input accepts, as far as a literal value can be checked against it.
#[derive(Debug, Clone, PartialEq)]
pub enum InputSpec {
    /// One of these values (a combo); with `multiselect`, a list of them.
    Choices {
        /// The allowed values, in the server's order (strings, sometimes numbers).
        options: Vec<Value>,
        /// A V3 multiselect combo: the value is a list of options.
        multiselect: bool,
    },
    /// A list whose options the server does not give here (a V3 `remote` combo, or a `COMBO`
    /// without options): not checkable.
    Unchecked,
    /// A typed input (`INT`, `STRING`, `IMAGE`, …): no fixed options.
    Typed(String),
}

impl InputSpec {
    fn parse(decl: &Value) -> Option<InputSpec> {
        let decl = decl.as_array()?;
        let extra = decl.get(1).and_then(Value::as_object);
        match decl.first()? {
            Value::Array(options) => Some(InputSpec::Choices { options: options.clone(), multiselect: false }),
            Value::String(ty) if ty == "COMBO" => {
                let Some(extra) = extra else { return Some(InputSpec::Unchecked) };
                // Remote options are fetched by the frontend; ComfyUI skips them when validating.
                if extra.contains_key("remote") {
                    return Some(InputSpec::Unchecked);
                }
                match extra.get("options") {
                    Some(Value::Array(options)) => Some(InputSpec::Choices {
                        options: options.clone(),
                        multiselect: extra.get("multiselect").and_then(Value::as_bool).unwrap_or(false),
                    }),
                    _ => Some(InputSpec::Unchecked),
                }
            }
            Value::String(ty) => Some(InputSpec::Typed(ty.clone())),
            _ => None,
        }
    }
}

/// One node class: its required and optional inputs (hidden ones are never in a graph's
/// literals, so they are left out).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeInfo {
    inputs: HashMap<String, InputSpec>,
    output_node: bool,
}

impl NodeInfo {
    /// An output node (`"output_node": true`: SaveImage, SaveVideo…): ComfyUI runs, and
    /// validates the values of, only the nodes such a node depends on.
    pub fn is_output(&self) -> bool {
        self.output_node
    }

    /// The spec of input `name`, when the class declares it.
    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.get(name)
    }
}

/// The node classes of one server, from `GET /object_info`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeCatalog {
    nodes: HashMap<String, NodeInfo>,
}

impl NodeCatalog {
    /// Reads an `/object_info` body. Entries that are not objects are skipped (one odd custom
    /// node must not hide every other class); a body that is not an object is an error.
    pub fn from_value(body: &Value) -> Result<NodeCatalog, String> {
        let Some(classes) = body.as_object() else {
            return Err("expected a JSON object of node classes".to_owned());
        };
        let mut nodes = HashMap::with_capacity(classes.len());
        for (class, info) in classes {
            let output_node = info.get("output_node").and_then(Value::as_bool).unwrap_or(false);
            let mut node = NodeInfo { output_node, ..NodeInfo::default() };
            let Some(groups) = info.get("input").and_then(Value::as_object) else {
                if info.is_object() {
                    nodes.insert(class.clone(), node);
                }
                continue;
            };
            for group in ["required", "optional"] {
                let Some(inputs) = groups.get(group).and_then(Value::as_object) else { continue };
                for (name, decl) in inputs {
                    if let Some(spec) = InputSpec::parse(decl) {
                        node.inputs.insert(name.clone(), spec);
                    }
                }
            }
            nodes.insert(class.clone(), node);
        }
        Ok(NodeCatalog { nodes })
    }

    /// The class `class_type`, when the server has it.
    pub fn node(&self, class_type: &str) -> Option<&NodeInfo> {
        self.nodes.get(class_type)
    }

    /// Number of node classes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the server listed no class at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn classic_lists_are_choices() {
        let body = json!({
            "KSamplerSelect": {"input": {"required": {"sampler_name": [["euler", "heun"]]}}},
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"], {"tooltip": "t"}]}}},
            "CLIPLoader": {"input": {"required": {"clip_name": [[]]}, "optional": {"device": [["default", "cpu"], {"advanced": true}]}}},
        });
        let c = NodeCatalog::from_value(&body).unwrap();
        assert_eq!(c.len(), 3);
        let sampler = c.node("KSamplerSelect").unwrap().input("sampler_name").unwrap();
        assert_eq!(sampler, &InputSpec::Choices { options: vec![json!("euler"), json!("heun")], multiselect: false });
        let ckpt = c.node("CheckpointLoaderSimple").unwrap().input("ckpt_name").unwrap();
        assert_eq!(ckpt, &InputSpec::Choices { options: vec![json!("a.safetensors")], multiselect: false });
        // An empty model folder is an empty list, not an unknown input.
        let clip = c.node("CLIPLoader").unwrap();
        assert_eq!(clip.input("clip_name"), Some(&InputSpec::Choices { options: vec![], multiselect: false }));
        assert!(matches!(clip.input("device"), Some(InputSpec::Choices { .. })), "optional inputs count");
    }

    #[test]
    fn v3_combos_are_choices_and_remote_ones_unchecked() {
        let body = json!({
            "SaveVideo": {"input": {"required": {
                "video": ["VIDEO", {"tooltip": "The video to save."}],
                "format": ["COMBO", {"default": "auto", "multiselect": false, "options": ["auto", "mp4"]}],
                "tags": ["COMBO", {"multiselect": true, "options": ["a", "b"]}],
                "model": ["COMBO", {"remote": {"route": "/api/models"}, "options": []}],
                "bare": ["COMBO"],
            }, "hidden": {"prompt": "PROMPT"}}},
        });
        let c = NodeCatalog::from_value(&body).unwrap();
        let n = c.node("SaveVideo").unwrap();
        assert_eq!(
            n.input("format"),
            Some(&InputSpec::Choices { options: vec![json!("auto"), json!("mp4")], multiselect: false })
        );
        assert_eq!(
            n.input("tags"),
            Some(&InputSpec::Choices { options: vec![json!("a"), json!("b")], multiselect: true })
        );
        assert_eq!(n.input("model"), Some(&InputSpec::Unchecked));
        assert_eq!(n.input("bare"), Some(&InputSpec::Unchecked));
        assert_eq!(n.input("video"), Some(&InputSpec::Typed("VIDEO".into())));
        assert_eq!(n.input("prompt"), None, "hidden inputs are not graph literals");
    }

    #[test]
    fn the_captured_0_3_64_object_info_parses() {
        let text = include_str!("../../comfy-sim/src/object_info.json");
        let c = NodeCatalog::from_value(&serde_json::from_str(text).unwrap()).unwrap();
        assert!(c.len() > 20);
        assert!(matches!(
            c.node("ImageScale").unwrap().input("upscale_method"),
            Some(InputSpec::Choices { options, .. }) if options.contains(&json!("lanczos"))
        ));
        assert!(matches!(c.node("SaveVideo").unwrap().input("codec"), Some(InputSpec::Choices { .. })));
        assert!(c.node("SaveVideo").unwrap().is_output() && !c.node("ImageScale").unwrap().is_output());
        assert!(NodeCatalog::from_value(&json!([])).is_err());
    }
}
