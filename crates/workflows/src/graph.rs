//! Read-only model of a ComfyUI API-format graph (`{"<id>": {"class_type", "inputs", "_meta"}}`):
//! structural checks, link parsing, node ordering and upstream reachability. Rewriting happens on
//! the raw `serde_json::Value` in `workflow.rs`; this module never mutates anything.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// One input of a node: either a link to another node's output or a literal value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    /// `["<node id>", <output index>]`, exactly as ComfyUI's `is_link` recognises it.
    Link { node: String, output: u64 },
    /// Anything else is a widget value that ComfyUI coerces to the input's type.
    Literal(Value),
}

/// One node of the graph.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub id: String,
    pub class_type: String,
    /// `_meta.title`, which ComfyUI itself ignores and we use for `@name` markers.
    pub title: Option<String>,
    pub inputs: BTreeMap<String, Input>,
}

impl Node {
    /// The literal value of `input`, if it exists and is not a link.
    pub fn literal(&self, input: &str) -> Option<&Value> {
        match self.inputs.get(input) {
            Some(Input::Literal(v)) => Some(v),
            _ => None,
        }
    }

    /// The `(node, output)` of a linked input.
    pub fn link(&self, input: &str) -> Option<(&str, u64)> {
        match self.inputs.get(input) {
            Some(Input::Link { node, output }) => Some((node.as_str(), *output)),
            _ => None,
        }
    }

    /// Names of all literal inputs, in name order.
    pub fn literal_names(&self) -> Vec<&str> {
        self.inputs.iter().filter(|(_, i)| matches!(i, Input::Literal(_))).map(|(n, _)| n.as_str()).collect()
    }

    /// `6 (CLIPTextEncode)`, the way every message refers to a node.
    pub fn label(&self) -> String {
        format!("{} ({})", self.id, self.class_type)
    }
}

/// A parsed graph with nodes kept in natural id order (2 before 10), so every list we
/// report or bind is deterministic and reads the way a user numbers nodes.
#[derive(Debug, Clone)]
pub(crate) struct Graph {
    nodes: Vec<Node>,
    index: BTreeMap<String, usize>,
}

impl Graph {
    /// Parses and structurally checks an API-format graph. Returns every structural problem
    /// found, not only the first, so one load reports everything to fix.
    pub fn parse(value: &Value) -> Result<Graph, Vec<String>> {
        let Some(obj) = value.as_object() else {
            return Err(vec![format!(
                "the file holds a JSON {}, but an API-format workflow is an object of nodes keyed by id",
                json_kind(value)
            )]);
        };
        // The UI format (what "Save" writes) is the most common wrong export; say so directly.
        if obj.get("nodes").is_some_and(Value::is_array) && obj.contains_key("links") {
            return Err(vec![
                "this is a UI-format workflow (it has `nodes` and `links` arrays); in ComfyUI use \
                 \"Export (API)\" / \"Save (API Format)\" and save that file instead"
                    .to_string(),
            ]);
        }
        if obj.is_empty() {
            return Err(vec!["the workflow has no nodes".to_string()]);
        }

        let mut problems = Vec::new();
        let mut nodes = Vec::new();
        for (id, raw) in obj {
            match parse_node(id, raw) {
                Ok(node) => nodes.push(node),
                Err(reason) => problems.push(reason),
            }
        }
        nodes.sort_by(|a, b| cmp_node_ids(&a.id, &b.id));
        let index: BTreeMap<String, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.clone(), i)).collect();

        for node in &nodes {
            for (name, input) in &node.inputs {
                if let Input::Link { node: src, .. } = input
                    && !index.contains_key(src)
                {
                    problems.push(format!(
                        "node {} input `{name}` links to node {src}, which does not exist",
                        node.label()
                    ));
                }
            }
        }

        if problems.is_empty() { Ok(Graph { nodes, index }) } else { Err(problems) }
    }

    /// All nodes in natural id order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.index.get(id).map(|&i| &self.nodes[i])
    }

    /// Every node that `targets` depend on, transitively, plus the targets themselves.
    pub fn upstream_of<'a>(&self, targets: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<String> = targets.into_iter().map(str::to_string).collect();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(node) = self.node(&id) {
                for input in node.inputs.values() {
                    if let Input::Link { node: src, .. } = input {
                        stack.push(src.clone());
                    }
                }
            }
        }
        seen
    }
}

fn parse_node(id: &str, raw: &Value) -> Result<Node, String> {
    let Some(obj) = raw.as_object() else {
        return Err(format!(
            "node {id} is a JSON {}, expected an object with `class_type` and `inputs`",
            json_kind(raw)
        ));
    };
    let class_type = match obj.get("class_type") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => {
            return Err(format!("node {id} has a `class_type` that is not a non-empty string"));
        }
        None => return Err(format!("node {id} has no `class_type`")),
    };
    let inputs = match obj.get("inputs") {
        // A node without inputs is legal in ComfyUI (e.g. some loaders export `{}` or nothing).
        None => BTreeMap::new(),
        Some(Value::Object(map)) => map.iter().map(|(name, v)| (name.clone(), parse_input(v))).collect(),
        Some(other) => {
            return Err(format!(
                "node {id} ({class_type}) has `inputs` as a JSON {}, expected an object",
                json_kind(other)
            ));
        }
    };
    let title = obj.get("_meta").and_then(|m| m.get("title")).and_then(Value::as_str).map(str::to_string);
    Ok(Node { id: id.to_string(), class_type, title, inputs })
}

/// Mirrors ComfyUI's `is_link`: a two-element list of a string id and an integer index.
fn parse_input(v: &Value) -> Input {
    if let Value::Array(items) = v
        && let [Value::String(node), Value::Number(idx)] = items.as_slice()
        && let Some(output) = idx.as_u64()
    {
        return Input::Link { node: node.clone(), output };
    }
    Input::Literal(v.clone())
}

/// Natural order for node ids: numeric ids by value, then anything else (e.g. subgraph ids
/// like `12:3`) by text.
pub(crate) fn cmp_node_ids(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// "a string", "an array", ... for messages about unexpected JSON.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "fractional number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
