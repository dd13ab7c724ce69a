//! Node execution order, as ComfyUI's `ExecutionList` decides it.
//!
//! Nodes are added depth-first from each output (a LIFO stack over the inputs in prompt order);
//! among the nodes whose inputs are ready, ComfyUI prefers an output node, then a node that feeds
//! an output, then one two steps away, else the first ready node in insertion order. Reproducing
//! that keeps the simulator's `executing` sequence identical to ComfyUI's (captured run_20 order
//! 2,3,4,7,8,5,6,9,10).

use std::collections::{HashMap, HashSet};

use crate::json::{OMap, OValue};

/// Whether an input value is a link `[node_id, slot]`.
pub fn as_link(value: &OValue) -> Option<(&str, usize)> {
    let items = value.as_array()?;
    if items.len() != 2 {
        return None;
    }
    let id = items[0].as_str()?;
    let slot = match &items[1] {
        OValue::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?,
        _ => return None,
    };
    Some((id, usize::try_from(slot).ok()?))
}

/// The pending nodes of one prompt.
pub struct ExecutionList {
    pending: Vec<String>,
    block_count: HashMap<String, usize>,
    blocking: HashMap<String, Vec<String>>,
    outputs: HashSet<String>,
}

impl ExecutionList {
    /// Plans the execution of `outputs` in `graph`; `is_output` tells output nodes apart.
    #[cfg(test)]
    pub fn new(graph: &OMap, outputs: &[String], is_output: impl Fn(&str) -> bool) -> Self {
        Self::with_cached(graph, outputs, is_output, |_| false)
    }

    /// Like [`ExecutionList::new`], leaving out nodes whose outputs come from the cache: like
    /// ComfyUI's `add_strong_link`, a cached input neither runs nor blocks its dependents.
    pub fn with_cached(
        graph: &OMap,
        outputs: &[String],
        is_output: impl Fn(&str) -> bool,
        is_cached: impl Fn(&str) -> bool,
    ) -> Self {
        let mut list = Self {
            pending: Vec::new(),
            block_count: HashMap::new(),
            blocking: HashMap::new(),
            outputs: graph.keys().filter(|id| is_output(id)).cloned().collect(),
        };
        for output in outputs {
            list.add_node(graph, output, &is_cached);
        }
        list
    }

    fn add_node(&mut self, graph: &OMap, root: &str, is_cached: &impl Fn(&str) -> bool) {
        let mut stack = vec![root.to_string()];
        let mut links: Vec<(String, String)> = Vec::new();
        while let Some(id) = stack.pop() {
            if self.block_count.contains_key(&id) {
                continue;
            }
            self.pending.push(id.clone());
            self.block_count.insert(id.clone(), 0);
            self.blocking.insert(id.clone(), Vec::new());
            let Some(inputs) = graph.get(&id).and_then(|n| n.get("inputs")).and_then(OValue::as_object) else {
                continue;
            };
            for (_, value) in inputs.iter() {
                if let Some((from, _)) = as_link(value)
                    && graph.contains_key(from)
                    && !is_cached(from)
                {
                    stack.push(from.to_string());
                    links.push((from.to_string(), id.clone()));
                }
            }
        }
        for (from, to) in links {
            let dependents = self.blocking.entry(from).or_default();
            if !dependents.contains(&to) {
                dependents.push(to.clone());
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    /// All node ids planned for this prompt.
    pub fn planned(&self) -> Vec<String> {
        self.pending.clone()
    }

    /// Picks the next node to run and marks it done (the simulator runs nodes one by one).
    pub fn next(&mut self) -> Option<String> {
        let ready: Vec<&String> = self.pending.iter().filter(|id| self.block_count.get(*id) == Some(&0)).collect();
        let is_out = |id: &str| self.outputs.contains(id);
        let feeds_output = |id: &str| self.blocking.get(id).is_some_and(|b| b.iter().any(|d| is_out(d)));
        let picked = ready
            .iter()
            .find(|id| is_out(id))
            .or_else(|| ready.iter().find(|id| feeds_output(id)))
            .or_else(|| {
                ready
                    .iter()
                    .find(|id| self.blocking.get(id.as_str()).is_some_and(|b| b.iter().any(|d| feeds_output(d))))
            })
            .or_else(|| ready.first())
            .map(|id| id.to_string())?;
        self.pending.retain(|id| *id != picked);
        if let Some(dependents) = self.blocking.remove(&picked) {
            for d in dependents {
                if let Some(count) = self.block_count.get_mut(&d) {
                    *count = count.saturating_sub(1);
                }
            }
        }
        Some(picked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_captured_run_20_order() {
        // The run_20 graph, with node 1 already cached in the capture (so not planned there).
        let graph = OValue::parse(
            br#"{"1":{"class_type":"LoadImage","inputs":{"image":"frame.png"}},
            "2":{"class_type":"ImageScale","inputs":{"image":["1",0]}},
            "3":{"class_type":"RepeatImageBatch","inputs":{"image":["2",0],"amount":8}},
            "4":{"class_type":"SaveAnimatedWEBP","inputs":{"images":["3",0]}},
            "5":{"class_type":"CreateVideo","inputs":{"images":["3",0],"fps":8}},
            "6":{"class_type":"SaveVideo","inputs":{"video":["5",0]}},
            "7":{"class_type":"SaveWEBM","inputs":{"images":["3",0]}},
            "8":{"class_type":"SaveAnimatedPNG","inputs":{"images":["3",0]}},
            "9":{"class_type":"LTXVPreprocess","inputs":{"image":["2",0]}},
            "10":{"class_type":"PreviewImage","inputs":{"images":["9",0]}}}"#,
        )
        .expect("json");
        let graph = graph.as_object().expect("object").clone();
        let outputs: Vec<String> = ["4", "6", "7", "10", "8"].iter().map(|s| s.to_string()).collect();
        let is_output = |id: &str| ["4", "6", "7", "8", "10"].contains(&id);
        let mut list = ExecutionList::new(&graph, &outputs, is_output);
        let order: Vec<String> = std::iter::from_fn(|| list.next()).collect();
        assert_eq!(order, ["1", "2", "3", "4", "7", "8", "5", "6", "9", "10"]);
    }
}
