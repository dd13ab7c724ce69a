//! Whole-prompt progress from ComfyUI's per-node events: each non-cached node owns a share of
//! the bar (heavier shares for samplers, VAE and video encoding), a node's share fills with its
//! own `progress` steps, and the reported fraction never goes backwards.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use serde_json::Value;

use crate::events::ComfyEvent;

/// A progress snapshot of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunProgress {
    /// Overall fraction done, 0..=1, monotonic within a run.
    pub fraction: f32,
    /// Current step of the running node, if it reports steps.
    pub step: Option<u32>,
    /// Total steps of the running node, if it reports steps.
    pub max: Option<u32>,
    /// The running node id.
    pub node: Option<String>,
    /// Its class type, from the submitted graph.
    pub node_type: Option<String>,
    /// What the running node is busy with besides steps, when ComfyUI says (`loading`, C7).
    pub stage: Option<String>,
}

/// Folds one prompt's events (already filtered to that prompt) into a [`RunProgress`].
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    weights: BTreeMap<String, f64>,
    class_types: BTreeMap<String, String>,
    cached: HashSet<String>,
    done: HashSet<String>,
    current: Option<String>,
    current_fraction: f64,
    step: Option<(f64, f64)>,
    stage: Option<String>,
    reported: f64,
}

impl ProgressTracker {
    /// Prepares a tracker for an API-format graph (`{"id": {"class_type": …}}`); any other value
    /// gives a tracker that only reports node and step information.
    pub fn new(graph: &Value) -> Self {
        let mut weights = BTreeMap::new();
        let mut class_types = BTreeMap::new();
        if let Some(nodes) = graph.as_object() {
            for (id, node) in nodes {
                let class_type = node.get("class_type").and_then(Value::as_str).unwrap_or_default();
                weights.insert(id.clone(), node_weight(class_type));
                class_types.insert(id.clone(), class_type.to_owned());
            }
        }
        Self {
            weights,
            class_types,
            cached: HashSet::new(),
            done: HashSet::new(),
            current: None,
            current_fraction: 0.0,
            step: None,
            stage: None,
            reported: 0.0,
        }
    }

    /// The class type of a node of the graph.
    pub fn class_type(&self, node: &str) -> Option<&str> {
        self.class_types.get(node).map(String::as_str).filter(|c| !c.is_empty())
    }

    /// Applies one event; returns true when the snapshot changed.
    pub fn observe(&mut self, event: &ComfyEvent) -> bool {
        let before = self.snapshot();
        match event {
            ComfyEvent::ExecutionCached { nodes, .. } => self.cached.extend(nodes.iter().cloned()),
            ComfyEvent::Executing { node: Some(node), display_node, .. } => {
                let node = self.resolve(node, [display_node.as_deref()]);
                self.start_node(&node);
            }
            ComfyEvent::Executing { node: None, .. } => {
                if let Some(current) = self.current.take() {
                    self.done.insert(current);
                }
                self.step = None;
            }
            ComfyEvent::Progress { node, value, max, .. } => {
                let node = node.as_deref().map(|n| self.resolve(n, []));
                if let Some(node) = node
                    && self.current.as_deref() != Some(node.as_str())
                {
                    self.start_node(&node);
                }
                if *max > 0.0 {
                    self.current_fraction = self.current_fraction.max((value / max).clamp(0.0, 1.0));
                    self.step = Some((*value, *max));
                }
            }
            ComfyEvent::ProgressState { nodes, .. } => {
                let mut stage = None;
                for (id, state) in nodes {
                    // Nodes inside subgraphs and loops carry ids the submitted graph does not
                    // have (C12); they count for the graph node they stand for.
                    let hints = [
                        state.real_node_id.as_deref(),
                        state.display_node_id.as_deref(),
                        state.parent_node_id.as_deref(),
                    ];
                    let id = self.resolve(id, hints);
                    match state.state.as_str() {
                        "finished" => {
                            self.done.insert(id);
                        }
                        "running" => {
                            if stage.is_none() {
                                stage = state.activity.clone().filter(|a| !a.is_empty());
                            }
                            if self.current.as_deref() == Some(id.as_str()) && state.max > 0.0 {
                                self.current_fraction =
                                    self.current_fraction.max((state.value / state.max).clamp(0.0, 1.0));
                            }
                        }
                        _ => {}
                    }
                }
                // The snapshot lists every running node: no activity in it means none any more.
                self.stage = stage;
            }
            ComfyEvent::Executed { node, .. } => {
                let node = self.resolve(node, []);
                self.done.insert(node);
            }
            _ => {}
        }
        self.snapshot() != before
    }

    /// Marks the whole prompt as done (fraction 1).
    pub fn complete(&mut self) {
        self.reported = 1.0;
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> RunProgress {
        let fraction = self.raw_fraction().max(self.reported);
        let (step, max) = match self.step {
            Some((value, max)) => (Some(to_u32(value)), Some(to_u32(max))),
            None => (None, None),
        };
        RunProgress {
            fraction: fraction as f32,
            step,
            max,
            node: self.current.clone(),
            node_type: self.current.as_deref().and_then(|n| self.class_type(n)).map(str::to_owned),
            stage: self.stage.clone(),
        }
    }

    /// The graph node an event's node id stands for: the id itself when the graph has it, else
    /// the first hint the graph has (`real_node_id`, `display_node_id`, `parent_node_id`), else
    /// the leading part of a nested id (`12:3` or `12.3` inside node 12), else the id as sent
    /// (a node added at run time: it has no share of the bar but is still reported).
    fn resolve<const N: usize>(&self, id: &str, hints: [Option<&str>; N]) -> String {
        if self.weights.is_empty() || self.weights.contains_key(id) {
            return id.to_owned();
        }
        if let Some(hint) = hints.into_iter().flatten().find(|h| self.weights.contains_key(*h)) {
            return hint.to_owned();
        }
        if let Some(head) = id.split([':', '.']).next().filter(|h| self.weights.contains_key(*h)) {
            return head.to_owned();
        }
        id.to_owned()
    }

    /// Like [`ProgressTracker::snapshot`], and remembers the fraction so later snapshots never
    /// report less (cache announcements can shrink the total, which must not move the bar back).
    pub fn take_snapshot(&mut self) -> RunProgress {
        let snapshot = self.snapshot();
        self.reported = self.reported.max(f64::from(snapshot.fraction));
        snapshot
    }

    fn start_node(&mut self, node: &str) {
        if let Some(previous) = self.current.take()
            && previous != node
        {
            self.done.insert(previous);
        }
        self.current = Some(node.to_owned());
        self.current_fraction = 0.0;
        self.step = None;
        self.stage = None;
    }

    fn raw_fraction(&self) -> f64 {
        let total: f64 = self.weights.iter().filter(|(id, _)| !self.cached.contains(*id)).map(|(_, w)| w).sum();
        if total <= 0.0 {
            return 0.0;
        }
        let mut done: f64 = self
            .weights
            .iter()
            .filter(|(id, _)| !self.cached.contains(*id) && self.done.contains(*id))
            .map(|(_, w)| w)
            .sum();
        if let Some(current) = &self.current
            && !self.done.contains(current)
            && !self.cached.contains(current)
        {
            done += self.weights.get(current).copied().unwrap_or(0.0) * self.current_fraction;
        }
        (done / total).clamp(0.0, 1.0)
    }
}

/// Relative cost of a node class. A heuristic: sampling dominates an image-to-video run, model
/// loading, VAE and video encoding are noticeable, everything else is cheap.
fn node_weight(class_type: &str) -> f64 {
    match class_type {
        "KSampler" | "KSamplerAdvanced" | "SamplerCustom" | "SamplerCustomAdvanced" => 12.0,
        c if c.starts_with("KSampler") && c != "KSamplerSelect" => 12.0,
        "VAEDecode" | "VAEDecodeTiled" | "VAEEncode" | "VAEEncodeTiled" => 3.0,
        "CheckpointLoaderSimple" | "CLIPLoader" | "DualCLIPLoader" | "UNETLoader" | "VAELoader" => 2.0,
        "CreateVideo" | "SaveVideo" | "SaveWEBM" | "SaveAnimatedWEBP" | "SaveAnimatedPNG" | "VHS_VideoCombine" => 2.0,
        _ => 1.0,
    }
}

fn to_u32(value: f64) -> u32 {
    if value.is_finite() && value > 0.0 { value.round().min(f64::from(u32::MAX)) as u32 } else { 0 }
}
