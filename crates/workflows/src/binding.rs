//! Binding resolution: which node input each named parameter writes to, found once at load time.
//!
//! Three sources, highest precedence first:
//! 1. the **node map** (operator config such as `WORKFLOW_NODES`) — an explicit override wins;
//! 2. **title markers** — a node whose `_meta.title` starts with `@` carries one or more
//!    space-separated markers `@name` or `@name:input` (`@output` marks the primary output node);
//! 3. **detection** by `class_type` and graph tracing (LoadImage feeding the outputs, the
//!    CLIPTextEncode reached from a sampler's `positive`/`negative`, sampler seeds, LTXV size and
//!    length, all fps inputs, steps, cfg).
//!
//! For each parameter name the highest source that mentions it supplies *all* its targets
//! (a marker `@prompt` replaces the detected prompt entirely). An input claimed by a higher
//! source is dropped from lower-source parameters; two parameters of the same source claiming one
//! input is a load error. Only `image` is mandatory.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::BindError;
use crate::graph::{Graph, Input, Node};
use crate::node_map::{NodeBindings, NodeRef, is_param_name};
use crate::spec::{ParamType, ValueSpec, known_input};

/// The standard parameters every client knows; everything else is a named parameter.
pub const STANDARD_PARAMS: [&str; 4] = ["image", "prompt", "negative", "seed"];

/// The marker / node-map key that names the primary output node rather than a parameter.
pub const OUTPUT_KEY: &str = "output";

/// One node input a parameter writes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InputTarget {
    /// The node id in the API graph.
    pub node_id: String,
    /// The input name on that node.
    pub input: String,
}

/// How a binding was found. Ordered by precedence: `NodeMap` beats `Marker` beats `Detected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingSource {
    /// Found by class type and graph tracing.
    Detected,
    /// A `@name` title marker on the node.
    Marker,
    /// The operator's explicit node map.
    NodeMap,
}

/// A resolved parameter: its type, limits, default and the inputs it writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamBinding {
    pub(crate) name: String,
    pub(crate) spec: ValueSpec,
    pub(crate) default: Value,
    pub(crate) description: String,
    pub(crate) targets: Vec<InputTarget>,
    pub(crate) source: BindingSource,
}

impl ParamBinding {
    /// The parameter name (`image`, `prompt`, `frames`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The parameter type.
    pub fn param_type(&self) -> ParamType {
        self.spec.ty
    }

    /// The workflow's own value (the literal of the first target).
    pub fn default_value(&self) -> &Value {
        &self.default
    }

    /// Human description for UIs.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Every input this parameter writes (several for e.g. `fps`, which is kept consistent
    /// across CreateVideo and LTXVConditioning).
    pub fn targets(&self) -> &[InputTarget] {
        &self.targets
    }

    /// How the binding was found.
    pub fn source(&self) -> BindingSource {
        self.source
    }

    /// Checks a value for this parameter and returns it normalised for the graph.
    pub fn check(&self, value: &Value) -> Result<Value, BindError> {
        self.spec.check(&self.name, value)
    }
}

/// Everything resolution produces for one workflow.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub params: Vec<ParamBinding>,
    pub output_nodes: Vec<String>,
    pub primary_output: Option<String>,
}

/// A problem tied (or not) to one parameter; the registry adds the file.
pub(crate) type ParamProblem = (Option<String>, String);

/// Classes that write results (ComfyUI `OUTPUT_NODE`s we know). Any node with a literal
/// `filename_prefix` also counts, which covers most custom save nodes.
const OUTPUT_CLASSES: &[&str] = &[
    "SaveImage",
    "PreviewImage",
    "SaveAnimatedWEBP",
    "SaveAnimatedPNG",
    "SaveWEBM",
    "SaveVideo",
    "VHS_VideoCombine",
    "SaveImageWebsocket",
    "SaveAudio",
    "SaveAudioMP3",
    "SaveAudioOpus",
    "PreviewAudio",
    "SaveLatent",
];

/// Inputs found by class type alone, per parameter. Every listed input is bound, so e.g. all
/// fps inputs of a graph move together and the video never disagrees with the conditioning.
const DETECTED_INPUTS: &[(&str, &[(&str, &str)])] = &[
    (
        "seed",
        &[
            ("KSampler", "seed"),
            ("KSamplerAdvanced", "noise_seed"),
            ("SamplerCustom", "noise_seed"),
            ("RandomNoise", "noise_seed"),
        ],
    ),
    ("width", &[("LTXVImgToVideo", "width"), ("EmptyLTXVLatentVideo", "width")]),
    ("height", &[("LTXVImgToVideo", "height"), ("EmptyLTXVLatentVideo", "height")]),
    ("frames", &[("LTXVImgToVideo", "length"), ("EmptyLTXVLatentVideo", "length")]),
    (
        "fps",
        &[
            ("CreateVideo", "fps"),
            ("LTXVConditioning", "frame_rate"),
            ("SaveAnimatedWEBP", "fps"),
            ("SaveAnimatedPNG", "fps"),
            ("SaveWEBM", "fps"),
            ("VHS_VideoCombine", "frame_rate"),
        ],
    ),
    (
        "steps",
        &[
            ("KSampler", "steps"),
            ("KSamplerAdvanced", "steps"),
            ("BasicScheduler", "steps"),
            ("LTXVScheduler", "steps"),
            ("KarrasScheduler", "steps"),
            ("ExponentialScheduler", "steps"),
            ("PolyexponentialScheduler", "steps"),
            ("BetaSamplingScheduler", "steps"),
            ("SDTurboScheduler", "steps"),
        ],
    ),
    ("cfg", &[("KSampler", "cfg"), ("KSamplerAdvanced", "cfg"), ("SamplerCustom", "cfg"), ("CFGGuider", "cfg")]),
];

/// Which input a bare `@name` (or node-map `"<id>"`) means on a node, for the well-known names.
fn preferred_inputs(name: &str) -> &'static [&'static str] {
    match name {
        "image" => &["image"],
        "prompt" | "negative" => &["text"],
        "seed" => &["noise_seed", "seed"],
        "frames" => &["length"],
        "fps" => &["fps", "frame_rate"],
        _ => &[],
    }
}

/// Descriptions of parameters whose meaning is fixed by name rather than by one input.
fn standard_description(name: &str) -> Option<&'static str> {
    Some(match name {
        "image" => "The uploaded input frame (set from the job's upload)",
        "prompt" => "Positive prompt: what the result should show",
        "negative" => "Negative prompt: what the result should avoid",
        "seed" => "Noise seed (0 to 2^64-1); omit to keep the workflow's seed",
        // Several inputs move together here, so no single input's description fits.
        "fps" => "Frames per second (sets every fps input, e.g. the video and the model conditioning)",
        _ => return None,
    })
}

/// Where a binding request came from, for phrasing the fix in error messages.
#[derive(Clone, Copy)]
enum Via {
    Marker,
    NodeMap,
}

/// Resolves all bindings of one workflow. `name` is only used in suggested fixes.
pub(crate) fn resolve(graph: &Graph, name: &str, overrides: &NodeBindings) -> Result<Resolved, Vec<ParamProblem>> {
    let mut problems: Vec<ParamProblem> = Vec::new();
    // name → source → targets
    let mut requested: BTreeMap<String, BTreeMap<BindingSource, Vec<InputTarget>>> = BTreeMap::new();
    let mut declared_outputs: BTreeMap<BindingSource, Vec<String>> = BTreeMap::new();

    collect_markers(graph, &mut requested, &mut declared_outputs, &mut problems);
    collect_node_map(graph, overrides, &mut requested, &mut declared_outputs, &mut problems);

    let output_nodes = output_nodes(graph, &declared_outputs);
    if output_nodes.is_empty() {
        problems.push((
            None,
            format!(
                "no output node found (SaveVideo, SaveImage, VHS_VideoCombine, ... or any node with a \
                 `filename_prefix`), so the workflow would produce nothing; if your output node is a \
                 custom one, title it `@output` or map it: {{\"{name}\": {{\"output\": \"<node id>\"}}}}"
            ),
        ));
    }
    let primary_output = match primary_declared(&declared_outputs) {
        Ok(Some(id)) => Some(id),
        Ok(None) => ranked_primary_output(graph, &output_nodes),
        Err(reason) => {
            problems.push((None, reason));
            None
        }
    };

    // Detection runs always; it only supplies names no marker or map entry mentions.
    let image_detection = detect_image(graph, name, &output_nodes);
    if let Ok(targets) = &image_detection {
        add(&mut requested, "image", BindingSource::Detected, targets);
    }
    let (positive, negative) = detect_prompts(graph);
    add(&mut requested, "prompt", BindingSource::Detected, &positive);
    add(&mut requested, "negative", BindingSource::Detected, &negative);
    for (param, inputs) in DETECTED_INPUTS {
        let targets = detect_by_class(graph, inputs);
        add(&mut requested, param, BindingSource::Detected, &targets);
    }

    let params = merge(graph, requested, &mut problems);
    if !params.iter().any(|p| p.name == "image") {
        let reason = match image_detection {
            Err(reason) => reason,
            Ok(_) => "its input is claimed by another parameter; bind `image` to a LoadImage node".to_string(),
        };
        problems.push((Some("image".to_string()), reason));
    }

    if problems.is_empty() { Ok(Resolved { params, output_nodes, primary_output }) } else { Err(problems) }
}

fn add(
    requested: &mut BTreeMap<String, BTreeMap<BindingSource, Vec<InputTarget>>>,
    name: &str,
    source: BindingSource,
    targets: &[InputTarget],
) {
    if targets.is_empty() {
        return;
    }
    let list = requested.entry(name.to_string()).or_default().entry(source).or_default();
    for t in targets {
        if !list.contains(t) {
            list.push(t.clone());
        }
    }
}

fn collect_markers(
    graph: &Graph,
    requested: &mut BTreeMap<String, BTreeMap<BindingSource, Vec<InputTarget>>>,
    declared_outputs: &mut BTreeMap<BindingSource, Vec<String>>,
    problems: &mut Vec<ParamProblem>,
) {
    for node in graph.nodes() {
        let Some(title) = node.title.as_deref().map(str::trim) else {
            continue;
        };
        // Only titles that start with `@` are marker titles, so ordinary titles that merely
        // contain an `@` somewhere are never misread.
        if !title.starts_with('@') {
            continue;
        }
        for token in title.split_whitespace() {
            let (param, explicit) = match parse_marker(token) {
                Ok(parsed) => parsed,
                Err(reason) => {
                    problems.push((None, format!("node {} title \"{title}\": {reason}", node.label())));
                    continue;
                }
            };
            if param == OUTPUT_KEY {
                if explicit.is_some() {
                    problems.push((
                        None,
                        format!(
                            "node {} title \"{title}\": `@output` marks the whole node as the primary output and takes no `:input`",
                            node.label()
                        ),
                    ));
                } else {
                    declared_outputs.entry(BindingSource::Marker).or_default().push(node.id.clone());
                }
                continue;
            }
            match pick_input(node, param, explicit, Via::Marker) {
                Ok(input) => {
                    add(requested, param, BindingSource::Marker, &[InputTarget { node_id: node.id.clone(), input }])
                }
                Err(reason) => problems.push((Some(param.to_string()), reason)),
            }
        }
    }
}

/// `@name` or `@name:input`.
fn parse_marker(token: &str) -> Result<(&str, Option<&str>), String> {
    let Some(body) = token.strip_prefix('@') else {
        return Err(format!(
            "`{token}` is not a marker; a marker title holds only `@name` or `@name:input` markers separated by spaces"
        ));
    };
    let (param, input) = match body.split_once(':') {
        Some((p, i)) => (p, Some(i)),
        None => (body, None),
    };
    if !is_param_name(param) {
        return Err(format!(
            "`{token}`: `{param}` is not a valid parameter name (letters, digits and `_`, starting with a letter)"
        ));
    }
    if input.is_some_and(str::is_empty) {
        return Err(format!("`{token}` has an empty input name after `:`"));
    }
    Ok((param, input))
}

fn collect_node_map(
    graph: &Graph,
    overrides: &NodeBindings,
    requested: &mut BTreeMap<String, BTreeMap<BindingSource, Vec<InputTarget>>>,
    declared_outputs: &mut BTreeMap<BindingSource, Vec<String>>,
    problems: &mut Vec<ParamProblem>,
) {
    for (param, refs) in overrides.iter() {
        for r in refs {
            if param == OUTPUT_KEY {
                match graph.node(r.as_str()) {
                    Some(node) => declared_outputs.entry(BindingSource::NodeMap).or_default().push(node.id.clone()),
                    None => problems.push((
                        None,
                        format!(
                            "node map entry `output` → \"{}\": the workflow has no node {}",
                            r.as_str(),
                            r.as_str()
                        ),
                    )),
                }
                continue;
            }
            let result = split_ref(graph, r).and_then(|(node, explicit)| {
                pick_input(node, param, explicit, Via::NodeMap)
                    .map(|input| InputTarget { node_id: node.id.clone(), input })
            });
            match result {
                Ok(target) => add(requested, param, BindingSource::NodeMap, &[target]),
                Err(reason) => {
                    problems.push((Some(param.to_string()), format!("node map entry \"{}\": {reason}", r.as_str())))
                }
            }
        }
    }
}

/// `"72"` is a node; `"72.noise_seed"` is node 72's `noise_seed` — unless a node is literally
/// called `72.noise_seed`, which is checked first.
fn split_ref<'g, 'r>(graph: &'g Graph, r: &'r NodeRef) -> Result<(&'g Node, Option<&'r str>), String> {
    let text = r.as_str();
    if let Some(node) = graph.node(text) {
        return Ok((node, None));
    }
    if let Some((id, input)) = text.rsplit_once('.')
        && let Some(node) = graph.node(id)
    {
        if input.is_empty() {
            return Err(format!("empty input name after `{id}.`"));
        }
        return Ok((node, Some(input)));
    }
    let id = text.rsplit_once('.').map_or(text, |(id, _)| id);
    Err(format!("the workflow has no node {id}"))
}

/// The input a marker or map entry binds: the explicit one, else the well-known input for the
/// name, else an input called like the parameter, else the node's only literal input.
fn pick_input(node: &Node, param: &str, explicit: Option<&str>, via: Via) -> Result<String, String> {
    let how = match via {
        Via::Marker => format!("title the node `@{param}:<input>`"),
        Via::NodeMap => format!("map it as \"{}.<input>\"", node.id),
    };
    let literals = node.literal_names();
    let listed = || {
        if literals.is_empty() { "none".to_string() } else { literals.join(", ") }
    };
    let linked = |input: &str| {
        format!("node {} input `{input}` is fed by a link from another node, so it has no value to set", node.label())
    };
    if let Some(input) = explicit {
        return match node.inputs.get(input) {
            None => Err(format!("node {} has no input `{input}` (value inputs: {})", node.label(), listed())),
            Some(Input::Link { .. }) => Err(linked(input)),
            Some(Input::Literal(_)) => Ok(input.to_string()),
        };
    }
    for &candidate in preferred_inputs(param) {
        match node.inputs.get(candidate) {
            Some(Input::Literal(_)) => return Ok(candidate.to_string()),
            Some(Input::Link { .. }) => return Err(linked(candidate)),
            None => {}
        }
    }
    if literals.contains(&param) {
        return Ok(param.to_string());
    }
    match literals.as_slice() {
        [only] => Ok((*only).to_string()),
        [] => Err(format!("node {} has no value inputs to bind (all its inputs are links)", node.label())),
        many => Err(format!(
            "node {} has {} value inputs ({}), so it is ambiguous which one `{param}` means; {how}",
            node.label(),
            many.len(),
            listed()
        )),
    }
}

fn is_output_node(node: &Node) -> bool {
    OUTPUT_CLASSES.contains(&node.class_type.as_str()) || node.literal("filename_prefix").is_some_and(Value::is_string)
}

fn output_nodes(graph: &Graph, declared: &BTreeMap<BindingSource, Vec<String>>) -> Vec<String> {
    let declared: BTreeSet<&str> = declared.values().flatten().map(String::as_str).collect();
    graph
        .nodes()
        .iter()
        .filter(|n| is_output_node(n) || declared.contains(n.id.as_str()))
        .map(|n| n.id.clone())
        .collect()
}

fn primary_declared(declared: &BTreeMap<BindingSource, Vec<String>>) -> Result<Option<String>, String> {
    // BTreeMap iterates by ascending precedence; the last entry is the strongest source.
    let Some((source, ids)) = declared.iter().next_back() else {
        return Ok(None);
    };
    let unique: BTreeSet<&String> = ids.iter().collect();
    if unique.len() > 1 {
        let what = match source {
            BindingSource::NodeMap => "the node map names",
            _ => "titles mark",
        };
        return Err(format!(
            "{what} several primary outputs ({}); mark exactly one node `@output`",
            unique.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(unique.into_iter().next().cloned())
}

/// Video beats animation beats still images; a tie at the top gives no hint (the worker then
/// picks from the actual outputs).
fn ranked_primary_output(graph: &Graph, outputs: &[String]) -> Option<String> {
    let rank = |node: &Node| -> Option<u8> {
        match node.class_type.as_str() {
            "SaveVideo" | "VHS_VideoCombine" | "SaveWEBM" => Some(4),
            "SaveAnimatedWEBP" | "SaveAnimatedPNG" => Some(3),
            "SaveImage" => Some(2),
            "PreviewImage" => Some(1),
            // Websocket images never reach history; audio/latents are not a visual result.
            "SaveImageWebsocket" | "SaveAudio" | "SaveAudioMP3" | "SaveAudioOpus" | "PreviewAudio" | "SaveLatent" => {
                None
            }
            _ => Some(2),
        }
    };
    let ranked: Vec<(u8, &str)> =
        outputs.iter().filter_map(|id| graph.node(id)).filter_map(|n| rank(n).map(|r| (r, n.id.as_str()))).collect();
    let best = ranked.iter().map(|(r, _)| *r).max()?;
    let mut top = ranked.iter().filter(|(r, _)| *r == best);
    let first = top.next()?;
    top.next().is_none().then(|| first.1.to_string())
}

fn detect_image(graph: &Graph, name: &str, outputs: &[String]) -> Result<Vec<InputTarget>, String> {
    let loads: Vec<&Node> = graph.nodes().iter().filter(|n| n.class_type == "LoadImage").collect();
    if loads.is_empty() {
        return Err("no LoadImage node, so there is nowhere to put the uploaded frame; add a LoadImage \
             node, or title the node that should receive the frame `@image`"
            .to_string());
    }
    let upstream = graph.upstream_of(outputs.iter().map(String::as_str));
    let feeding: Vec<&Node> = loads.iter().copied().filter(|n| upstream.contains(&n.id)).collect();
    let ids = |nodes: &[&Node]| nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>().join(", ");
    match feeding.as_slice() {
        [one] => match one.literal("image") {
            Some(Value::String(_)) => Ok(vec![InputTarget { node_id: one.id.clone(), input: "image".to_string() }]),
            _ => Err(format!("LoadImage node {} has no file-name value in its `image` input", one.id)),
        },
        [] => Err(format!(
            "LoadImage node{} {} feed{} no output node, so the uploaded frame would never be used; \
             connect it, or title the node that should receive the frame `@image`",
            if loads.len() == 1 { "" } else { "s" },
            ids(&loads),
            if loads.len() == 1 { "s" } else { "" },
        )),
        many => Err(format!(
            "{} LoadImage nodes feed the outputs ({}), so it is ambiguous which one receives the \
             uploaded frame; title that node `@image`, or map it: {{\"{name}\": {{\"image\": \"{}\"}}}}",
            many.len(),
            ids(many),
            many[0].id
        )),
    }
}

/// Sampler-like nodes whose `positive`/`negative` inputs decide which prompt is which.
fn is_sampler(node: &Node) -> bool {
    let c = node.class_type.as_str();
    c.contains("KSampler") || c.starts_with("SamplerCustom") || c.contains("Guider")
}

/// The CLIPTextEncode-like nodes reached from samplers' `positive` and `negative` inputs. A
/// node reached from both sides (e.g. a negative made by ConditioningZeroOut of the positive)
/// counts as a prompt only.
fn detect_prompts(graph: &Graph) -> (Vec<InputTarget>, Vec<InputTarget>) {
    let mut positive: Vec<String> = Vec::new();
    let mut negative: Vec<String> = Vec::new();
    for node in graph.nodes().iter().filter(|n| is_sampler(n)) {
        for (side, found) in [("positive", &mut positive), ("negative", &mut negative)] {
            if let Some((src, out)) = node.link(side)
                && let Some(id) = trace_text_encoder(graph, src, out)
                && !found.contains(&id)
            {
                found.push(id);
            }
        }
    }
    negative.retain(|id| !positive.contains(id));
    let to_targets = |ids: Vec<String>| {
        let mut ids = ids;
        ids.sort_by(|a, b| crate::graph::cmp_node_ids(a, b));
        ids.into_iter().map(|node_id| InputTarget { node_id, input: "text".to_string() }).collect()
    };
    (to_targets(positive), to_targets(negative))
}

/// Follows conditioning links upstream until a node with a literal `text` string. Nodes with
/// both `positive` and `negative` inputs (LTXVConditioning, LTXVImgToVideo, ControlNetApply...)
/// pass output 0 through from `positive` and output 1 from `negative`; nodes with exactly one
/// `conditioning*` input pass it through. Anything else (combines, custom nodes) stops the trace.
fn trace_text_encoder(graph: &Graph, start: &str, start_output: u64) -> Option<String> {
    let mut current = (start.to_string(), start_output);
    let mut visited = BTreeSet::new();
    while visited.insert(current.clone()) {
        let node = graph.node(&current.0)?;
        if node.literal("text").is_some_and(Value::is_string) {
            return Some(node.id.clone());
        }
        let next = if node.link("positive").is_some() && node.link("negative").is_some() {
            match current.1 {
                0 => node.link("positive"),
                1 => node.link("negative"),
                _ => None,
            }
        } else {
            let conditioning: Vec<(&str, u64)> =
                node.inputs.keys().filter(|k| k.starts_with("conditioning")).filter_map(|k| node.link(k)).collect();
            match conditioning.as_slice() {
                [one] => Some(*one),
                _ => None,
            }
        };
        let (src, out) = next?;
        current = (src.to_string(), out);
    }
    None
}

fn detect_by_class(graph: &Graph, inputs: &[(&str, &str)]) -> Vec<InputTarget> {
    graph
        .nodes()
        .iter()
        .flat_map(|node| {
            inputs.iter().filter(move |(class, _)| node.class_type == *class).filter_map(move |(class, input)| {
                let literal = node.literal(input)?;
                let spec = known_input(class, input)?;
                spec.accepts_literal(literal)
                    .then(|| InputTarget { node_id: node.id.clone(), input: (*input).to_string() })
            })
        })
        .collect()
}

/// Picks the strongest source per name, settles inputs claimed twice, and builds the bindings.
fn merge(
    graph: &Graph,
    requested: BTreeMap<String, BTreeMap<BindingSource, Vec<InputTarget>>>,
    problems: &mut Vec<ParamProblem>,
) -> Vec<ParamBinding> {
    let mut chosen: Vec<(BindingSource, String, Vec<InputTarget>)> = requested
        .into_iter()
        .filter_map(|(name, by_source)| {
            let (source, targets) = by_source.into_iter().next_back()?;
            Some((source, name, targets))
        })
        .collect();
    // Strongest sources claim their inputs first.
    chosen.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));

    let mut claimed: HashMap<InputTarget, (String, BindingSource)> = HashMap::new();
    let mut params = Vec::new();
    for (source, name, targets) in chosen {
        let mut kept = Vec::new();
        for t in targets {
            match claimed.get(&t) {
                Some((other, other_source)) if *other_source == source && *other != name => {
                    problems.push((
                        Some(name.clone()),
                        format!(
                            "node {} input `{}` is also bound to `{other}`; one input can feed only one parameter",
                            t.node_id, t.input
                        ),
                    ));
                }
                // Claimed by a stronger source: that binding wins, this one just loses the input.
                Some(_) => {}
                None => {
                    claimed.insert(t.clone(), (name.clone(), source));
                    kept.push(t);
                }
            }
        }
        if kept.is_empty() {
            continue;
        }
        match build_binding(graph, &name, source, kept) {
            Ok(binding) => params.push(binding),
            Err(reason) => problems.push((Some(name), reason)),
        }
    }
    params.sort_by_key(|p| {
        let standard = STANDARD_PARAMS.iter().position(|s| *s == p.name);
        (standard.unwrap_or(STANDARD_PARAMS.len()), p.name.clone())
    });
    params
}

fn build_binding(
    graph: &Graph,
    name: &str,
    source: BindingSource,
    targets: Vec<InputTarget>,
) -> Result<ParamBinding, String> {
    let mut spec: Option<ValueSpec> = None;
    let mut default: Option<Value> = None;
    let mut first_label = String::new();
    for t in &targets {
        let node = graph.node(&t.node_id).ok_or_else(|| format!("node {} vanished from the graph", t.node_id))?;
        let literal =
            node.literal(&t.input).ok_or_else(|| format!("node {} input `{}` has no value", node.label(), t.input))?;
        let own = known_input(&node.class_type, &t.input).or_else(|| ValueSpec::infer(literal)).ok_or_else(|| {
            format!(
                "node {} input `{}` holds a JSON {}, which cannot be a parameter",
                node.label(),
                t.input,
                crate::graph::json_kind(literal)
            )
        })?;
        if !own.accepts_literal(literal) {
            return Err(format!(
                "node {} input `{}` holds {literal}, but that input takes {}",
                node.label(),
                t.input,
                own.ty.with_article()
            ));
        }
        // ComfyUI rejects out-of-range literals at submit; catch that now, not on every job.
        // Steps are not enforced by ComfyUI, so an off-step literal is left alone.
        if let Err(e @ (BindError::TooSmall { .. } | BindError::TooLarge { .. })) = own.check(name, literal) {
            return Err(format!(
                "the workflow's own value at node {} input `{}` is invalid: {e}",
                node.label(),
                t.input
            ));
        }
        spec = Some(match spec {
            None => {
                first_label = format!("node {} input `{}`", node.label(), t.input);
                own
            }
            Some(s) => s.intersect(&own).ok_or_else(|| {
                format!(
                    "it binds inputs of different types ({} vs node {} input `{}`, {}); bind them to separate parameters",
                    s.ty,
                    node.label(),
                    t.input,
                    own.ty
                )
            })?,
        });
        default.get_or_insert_with(|| literal.clone());
    }
    let (Some(mut spec), Some(literal)) = (spec, default) else {
        return Err("no inputs to bind".to_string());
    };

    let expected = match name {
        "image" => Some(ParamType::Image),
        "prompt" | "negative" => Some(ParamType::String),
        "seed" => Some(ParamType::Integer),
        _ => None,
    };
    if let Some(expected) = expected {
        let fits = match expected {
            ParamType::Image | ParamType::String => {
                matches!(spec.ty, ParamType::Image | ParamType::String)
            }
            other => spec.ty == other,
        };
        if !fits {
            return Err(format!(
                "`{name}` must bind {} input, but {first_label} takes {}",
                expected.with_article(),
                spec.ty.with_article()
            ));
        }
        spec.ty = expected;
        if name == "seed"
            && let Some(seed) = known_input("SamplerCustom", "noise_seed")
            && let Some(narrowed) = spec.intersect(&seed)
        {
            spec = narrowed;
        }
    }

    let default = spec.check(name, &literal).unwrap_or(literal);
    let description = standard_description(name)
        .or(spec.description)
        .map(str::to_string)
        .unwrap_or_else(|| format!("Value of {first_label}"));
    Ok(ParamBinding { name: name.to_string(), spec, default, description, targets, source })
}
