//! The explicit node map: the operator's override of which node input a parameter binds to,
//! parsed from JSON such as the `WORKFLOW_NODES` env var. Shape:
//!
//! ```json
//! {"image": "78", "seed": "72.noise_seed", "fps": ["80.fps", "69.frame_rate"],
//!  "image_invert": {"image": "1"}}
//! ```
//!
//! A string or list-of-strings value binds a parameter; an object value scopes its entries to
//! the workflow of that name. Unscoped entries apply to the default workflow only (the
//! single-workflow legacy meaning of `WORKFLOW_NODES`: other workflows have other node ids);
//! a scoped entry for the default workflow wins over an unscoped one of the same name.
//! The key `output` names the primary output node instead of a parameter.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::error::WorkflowError;
use crate::graph::json_kind;

/// Which node (and optionally which input) a node-map entry points at: `"72"` or
/// `"72.noise_seed"`. Split against the actual graph at resolution time, because node ids
/// themselves may contain dots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef(String);

impl NodeRef {
    /// The reference as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The node-map entries that apply to one workflow: parameter name → inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeBindings {
    entries: BTreeMap<String, Vec<NodeRef>>,
}

impl NodeBindings {
    /// No overrides.
    pub fn new() -> NodeBindings {
        NodeBindings::default()
    }

    /// The entries, by parameter name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[NodeRef])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The whole node map: unscoped entries (for the default workflow) plus per-workflow scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMap {
    unscoped: NodeBindings,
    scoped: BTreeMap<String, NodeBindings>,
}

impl NodeMap {
    /// An empty map (no overrides).
    pub fn new() -> NodeMap {
        NodeMap::default()
    }

    /// Parses the JSON text of a node map. Empty or whitespace-only text is an empty map, so an
    /// unset-but-present env var does not need special casing.
    pub fn parse(text: &str) -> Result<NodeMap, WorkflowError> {
        if text.trim().is_empty() {
            return Ok(NodeMap::default());
        }
        let value: Value = serde_json::from_str(text).map_err(|e| WorkflowError::NodeMap {
            reason: format!("not valid JSON ({e}); expected e.g. {{\"image\":\"78\",\"seed\":\"72.noise_seed\"}}"),
        })?;
        NodeMap::from_value(&value)
    }

    /// Builds a node map from already-parsed JSON.
    pub fn from_value(value: &Value) -> Result<NodeMap, WorkflowError> {
        let Some(obj) = value.as_object() else {
            return Err(node_map_error(format!("expected a JSON object, got a JSON {}", json_kind(value))));
        };
        let mut map = NodeMap::default();
        for (key, v) in obj {
            match v {
                Value::Object(scope) => {
                    let mut bindings = NodeBindings::default();
                    for (name, refs) in scope {
                        bindings.entries.insert(name.clone(), parse_refs(&format!("{key}.{name}"), name, refs)?);
                    }
                    map.scoped.insert(key.clone(), bindings);
                }
                other => {
                    map.unscoped.entries.insert(key.clone(), parse_refs(key, key, other)?);
                }
            }
        }
        Ok(map)
    }

    /// Whether the map has no entries at all.
    pub fn is_empty(&self) -> bool {
        self.unscoped.is_empty() && self.scoped.is_empty()
    }

    /// The workflow names the map has scopes for (checked against the loaded files, so a typo
    /// is reported rather than silently ignored).
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scoped.keys().map(String::as_str)
    }

    /// The entries that apply to workflow `name`.
    pub fn for_workflow(&self, name: &str, is_default: bool) -> NodeBindings {
        let mut out = if is_default { self.unscoped.clone() } else { NodeBindings::default() };
        if let Some(scope) = self.scoped.get(name) {
            for (k, v) in &scope.entries {
                out.entries.insert(k.clone(), v.clone());
            }
        }
        out
    }
}

impl FromStr for NodeMap {
    type Err = WorkflowError;

    fn from_str(s: &str) -> Result<NodeMap, WorkflowError> {
        NodeMap::parse(s)
    }
}

/// Lets a config file (TOML, JSON) carry the node map as a table.
impl<'de> Deserialize<'de> for NodeMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<NodeMap, D::Error> {
        let value = Value::deserialize(deserializer)?;
        NodeMap::from_value(&value).map_err(serde::de::Error::custom)
    }
}

fn parse_refs(path: &str, name: &str, v: &Value) -> Result<Vec<NodeRef>, WorkflowError> {
    if !is_param_name(name) {
        return Err(node_map_error(format!(
            "`{path}`: `{name}` is not a valid parameter name (letters, digits and `_`, starting with a letter)"
        )));
    }
    let one = |item: &Value| match item {
        Value::String(s) if !s.trim().is_empty() => Ok(NodeRef(s.trim().to_string())),
        other => Err(node_map_error(format!(
            "`{path}` must be a node id such as \"72\" or \"72.noise_seed\" (or a list of them), got a JSON {}",
            json_kind(other)
        ))),
    };
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Array(_) => Err(node_map_error(format!("`{path}` is an empty list"))),
        other => Ok(vec![one(other)?]),
    }
}

fn node_map_error(reason: String) -> WorkflowError {
    WorkflowError::NodeMap { reason }
}

/// Parameter names: ASCII letter first, then letters, digits or `_`; at most 64 characters.
pub(crate) fn is_param_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
