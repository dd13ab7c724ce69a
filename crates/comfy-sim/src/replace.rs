//! 0.38's node replacement (`app/node_replace_manager.py`, C10): a node whose `class_type` is not
//! installed but has a registered replacement is rewritten in place at `POST /prompt` (same node
//! id, the new class, inputs renamed by the mapping), before validation; `GET /node_replacements`
//! lists the mappings. Absent on 0.3.64, where such a node is an unknown class.

use crate::json::{OMap, OValue};

/// One registered replacement.
struct Replacement {
    old_class: &'static str,
    new_class: &'static str,
    /// `(old input name, new input name)`
    inputs: &'static [(&'static str, &'static str)],
}

/// The simulator's registry: one deprecated name of the invert node (the plural input name the
/// old node had) → the current `ImageInvert`.
const REPLACEMENTS: &[Replacement] =
    &[Replacement { old_class: "InvertImage", new_class: "ImageInvert", inputs: &[("images", "image")] }];

/// `GET /node_replacements`: old class → its replacements.
pub fn listing() -> OMap {
    let mut out = OMap::new();
    for r in REPLACEMENTS {
        let mapping: Vec<OValue> = r
            .inputs
            .iter()
            .map(|(old, new)| {
                let mut m = OMap::new();
                m.insert("new_id", OValue::str(*new));
                m.insert("old_id", OValue::str(*old));
                OValue::Object(m)
            })
            .collect();
        let mut entry = OMap::new();
        entry.insert("new_node_id", OValue::str(r.new_class));
        entry.insert("old_node_id", OValue::str(r.old_class));
        entry.insert("old_widget_ids", OValue::Null);
        entry.insert("input_mapping", OValue::Array(mapping));
        entry.insert("output_mapping", OValue::Null);
        out.insert(r.old_class, OValue::Array(vec![OValue::Object(entry)]));
    }
    out
}

/// Rewrites replaced nodes of `graph` in place; `installed` tells whether a class exists (only
/// missing classes are replaced). Input order is kept, so execution order does not change.
pub fn apply(graph: &mut OMap, installed: impl Fn(&str) -> bool) {
    let ids: Vec<String> = graph.keys().cloned().collect();
    for id in ids {
        let Some(OValue::Object(node)) = graph.get_mut(&id) else { continue };
        let Some(class) = node.get("class_type").and_then(OValue::as_str).map(str::to_string) else { continue };
        if installed(&class) {
            continue;
        }
        let Some(r) = REPLACEMENTS.iter().find(|r| r.old_class == class) else { continue };
        tracing::info!(node = %id, from = r.old_class, to = r.new_class, "replacing a deprecated node");
        node.insert("class_type", OValue::str(r.new_class));
        if let Some(OValue::Object(inputs)) = node.get("inputs") {
            let mut renamed = OMap::new();
            for (name, value) in inputs.iter() {
                let new_name = r.inputs.iter().find(|(old, _)| old == name).map_or(name.as_str(), |(_, new)| new);
                renamed.insert(new_name, value.clone());
            }
            node.insert("inputs", OValue::Object(renamed));
        }
    }
}
