//! The prompt worker: runs queued prompts one at a time and speaks the captured event order.
//!
//! Owns: the WebSocket sequence of a run (`execution_start`, `execution_cached`, per node
//! `progress_state` → `executing` → [`progress`…] → [`executed`] → `progress_state`, then
//! `execution_success|error|interrupted`, `status`, `executing{node:null}`), the routing rules
//! (execution events only to the prompt's `client_id`; `progress_state`/`progress` broadcast when
//! there is none), interrupts (checked before every node and at every progress tick, waking
//! sleeping ticks at once), simulated sampler time, failure injection (`[sim:…]` markers and
//! [`FaultConfig`](crate::FaultConfig)), and writing the history entry before the final events.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::assets;
use crate::catalog::{self, DynamicLists};
use crate::files::DataDirs;
use crate::hub::Hub;
use crate::json::{OMap, OValue};
use crate::nodes::{self, EvalJob, Input, NodeFailure, NodeOutput, Value};
use crate::order::{ExecutionList, as_link};
use crate::queue::{ExecutionStatus, HistoryEntry, PromptQueue, QueueItem};
use crate::{FaultConfig, PreviewMethod, SimConfig};

/// The interrupt flag (`nodes.interrupt_processing`) with a wake-up for sleeping ticks.
#[derive(Default)]
pub struct Interrupt {
    flag: AtomicBool,
    wake: Notify,
    /// the prompt a targeted interrupt (0.38's jobs cancel) was meant for
    target: std::sync::Mutex<Option<String>>,
}

impl Interrupt {
    /// Requests an interrupt of whatever runs now.
    pub fn trigger(&self) {
        *self.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.flag.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    /// Requests an interrupt of `prompt_id`, which the queue has just marked running. Called under
    /// the queue's lock, so the prompt may not have reset the flag yet: [`Interrupt::reset_for`]
    /// keeps an interrupt aimed at the prompt it starts (the atomicity of 0.38's cancel, C3).
    pub fn trigger_for(&self, prompt_id: &str) {
        *self.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(prompt_id.to_string());
        self.flag.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    /// The reset at the start of a prompt: clears the flag unless it was aimed at this prompt.
    fn reset_for(&self, prompt_id: &str) {
        let mut target = self.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let keep = target.as_deref() == Some(prompt_id) && self.flag.load(Ordering::SeqCst);
        *target = None;
        self.flag.store(keep, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps for `d`; returns true as soon as an interrupt is requested.
    async fn sleep(&self, d: Duration) -> bool {
        let notified = self.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_set() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(d) => self.is_set(),
            () = notified => true,
        }
    }
}

/// State shared by the HTTP handlers and the worker.
pub struct Shared {
    /// the configuration
    pub config: SimConfig,
    /// data directories
    pub dirs: DataDirs,
    /// the queue and history
    pub queue: Arc<PromptQueue>,
    /// the sockets
    pub hub: Arc<Hub>,
    /// the interrupt flag
    pub interrupt: Interrupt,
    /// outputs of image loaders by [`loader_signature`], kept from the previous prompt
    pub loader_cache: std::sync::Mutex<HashMap<String, Arc<Vec<Value>>>>,
}

impl Shared {
    /// Current dropdown contents (input images, models).
    pub fn lists(&self) -> DynamicLists {
        DynamicLists::gather(&self.dirs.input, &self.config.models)
    }
}

/// Loaders whose `IS_CHANGED` is a hash of the file they read.
const CONTENT_KEYED_LOADERS: &[&str] = &["LoadImage", "LoadImageOutput"];

/// The cache key of a loader node: its class and inputs plus a hash of the file's bytes (ComfyUI
/// hashes the file with SHA-256 in `IS_CHANGED`; any content hash gives the same behaviour), so
/// the same name with new bytes is a new key. `None` for other nodes and unreadable files.
fn loader_signature(dirs: &DataDirs, class_type: &str, node: &OValue) -> Option<String> {
    use std::hash::Hasher;
    if !CONTENT_KEYED_LOADERS.contains(&class_type) {
        return None;
    }
    let inputs = node.get("inputs")?.as_object()?;
    if inputs.iter().any(|(_, v)| as_link(v).is_some()) {
        return None;
    }
    let name = inputs.get("image")?.as_str()?;
    let default_dir = if class_type == "LoadImageOutput" { "output" } else { "input" };
    let bytes = std::fs::read(crate::files::resolve_annotated(dirs, name, default_dir)?).ok()?;
    let mut hash = std::hash::DefaultHasher::new();
    hash.write(&bytes);
    Some(format!("{class_type}|{}|{}:{:016x}", OValue::Object(inputs.clone()).py_str(), bytes.len(), hash.finish()))
}

/// The loader signatures of a prompt's nodes, computed off the async threads (files are read).
async fn loader_signatures(shared: &Shared, graph: &Arc<OMap>) -> HashMap<String, String> {
    let (dirs, graph) = (shared.dirs.clone(), graph.clone());
    tokio::task::spawn_blocking(move || {
        graph
            .iter()
            .filter_map(|(id, node)| {
                let class = node.get("class_type").and_then(OValue::as_str)?;
                Some((id.clone(), loader_signature(&dirs, class, node)?))
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn obj(pairs: Vec<(&str, OValue)>) -> OValue {
    let mut m = OMap::new();
    for (k, v) in pairs {
        m.insert(k, v);
    }
    OValue::Object(m)
}

fn s(v: &str) -> OValue {
    OValue::str(v)
}

fn ids(list: &[String]) -> OValue {
    OValue::Array(list.iter().map(|i| OValue::str(i.clone())).collect())
}

/// Faults that apply to one prompt.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    error: bool,
    silent: bool,
    drop: bool,
    restart: bool,
}

impl Faults {
    fn for_prompt(config: &FaultConfig, graph: &OMap) -> Self {
        let mut f = Faults {
            error: config.execution_error,
            silent: config.silent_ws,
            drop: config.drop_ws,
            restart: config.lose_history,
        };
        for (_, node) in graph.iter() {
            if node.get("class_type").and_then(OValue::as_str) != Some("CLIPTextEncode") {
                continue;
            }
            if let Some(text) = node.get("inputs").and_then(|i| i.get("text")).and_then(OValue::as_str) {
                f.error |= text.contains("[sim:error]");
                f.silent |= text.contains("[sim:silent]");
                f.drop |= text.contains("[sim:drop]");
                f.restart |= text.contains("[sim:restart]");
            }
        }
        f
    }

    fn mid_run(&self) -> bool {
        self.error || self.drop || self.restart
    }
}

/// Event routing for one prompt.
struct Events<'a> {
    hub: &'a Hub,
    client: Option<String>,
    prompt_id: String,
    silent: bool,
}

impl Events<'_> {
    /// Execution events: sent only when the prompt has a client (`if server.client_id is not None`).
    fn exec(&self, kind: &str, data: OValue) {
        if !self.silent && self.client.is_some() {
            self.hub.send(self.client.as_deref(), kind, data);
        }
    }

    /// Progress events and interrupts: to the client, or to every socket when there is none.
    fn any(&self, kind: &str, data: OValue) {
        if !self.silent {
            self.hub.send(self.client.as_deref(), kind, data);
        }
    }

    fn preview(&self, node: &str, image: &[u8], is_png: bool) {
        if self.silent {
            return;
        }
        let mut meta = OMap::new();
        meta.insert("node_id", s(node));
        meta.insert("prompt_id", s(&self.prompt_id));
        meta.insert("display_node_id", s(node));
        meta.insert("parent_node_id", OValue::Null);
        meta.insert("real_node_id", s(node));
        self.hub.send_preview(self.client.as_deref(), image, is_png, meta);
    }

    fn wants_metadata(&self) -> bool {
        self.hub.wants_preview_metadata(self.client.as_deref())
    }
}

/// One node's entry in `progress_state`.
struct NodeProgress {
    id: String,
    value: OValue,
    max: OValue,
    state: &'static str,
    /// the node of the submitted graph it shows as (itself, or the node it was expanded from)
    display: String,
    /// the node it was expanded from (C12)
    parent: Option<String>,
    /// what the node is busy with, e.g. `loading` (0.38, C7)
    activity: Option<&'static str>,
}

/// Per-node entries of `progress_state`, in start order.
struct ProgressState {
    prompt_id: String,
    nodes: Vec<NodeProgress>,
}

impl ProgressState {
    fn set(&mut self, node: &str, value: OValue, max: OValue, state: &'static str) {
        match self.nodes.iter_mut().find(|n| n.id == node) {
            Some(entry) => {
                entry.value = value;
                entry.max = max;
                entry.state = state;
                if state != "running" {
                    entry.activity = None;
                }
            }
            None => self.nodes.push(NodeProgress {
                id: node.to_string(),
                value,
                max,
                state,
                display: node.to_string(),
                parent: None,
                activity: None,
            }),
        }
    }

    /// Marks `node` as expanded from `parent` (an ephemeral node of a subgraph, C12).
    fn set_parent(&mut self, node: &str, parent: &str) {
        if let Some(entry) = self.nodes.iter_mut().find(|n| n.id == node) {
            entry.display = parent.to_string();
            entry.parent = Some(parent.to_string());
        }
    }

    fn set_activity(&mut self, node: &str, activity: Option<&'static str>) {
        if let Some(entry) = self.nodes.iter_mut().find(|n| n.id == node) {
            entry.activity = activity;
        }
    }

    fn current(&self, node: &str) -> Option<(OValue, OValue)> {
        self.nodes.iter().find(|n| n.id == node).map(|n| (n.value.clone(), n.max.clone()))
    }

    fn data(&self) -> OValue {
        let mut nodes = OMap::new();
        for n in &self.nodes {
            let mut fields = vec![
                ("value", n.value.clone()),
                ("max", n.max.clone()),
                ("state", s(n.state)),
                ("node_id", s(&n.id)),
                ("prompt_id", s(&self.prompt_id)),
                ("display_node_id", s(&n.display)),
                ("parent_node_id", n.parent.as_deref().map_or(OValue::Null, s)),
                ("real_node_id", s(&n.id)),
            ];
            if let Some(activity) = n.activity {
                fields.push(("activity", s(activity)));
            }
            nodes.insert(n.id.clone(), obj(fields));
        }
        obj(vec![("prompt_id", s(&self.prompt_id)), ("nodes", OValue::Object(nodes))])
    }
}

/// The preview method a prompt samples with: on 0.38 `extra_data.preview_method` when it names
/// one, else (absent, `default`, unknown) the CLI default, so one prompt's choice never leaks into
/// the next (C5). 0.3.64 has only the CLI setting.
fn preview_method_for(config: &SimConfig, extra_data: &OMap) -> PreviewMethod {
    if !config.comfy_version.is_newer() {
        return config.preview_method;
    }
    extra_data
        .get("preview_method")
        .and_then(OValue::as_str)
        .and_then(|m| m.parse().ok())
        .unwrap_or(config.preview_method)
}

/// A sampler's step preview: a small JPEG whose colour moves with the step, the size of a
/// latent preview (ComfyUI sends them as type-1 JPEGs, or type 4 to clients that asked).
fn sampler_preview(step: u32, steps: u32) -> Option<Vec<u8>> {
    let t = step as f32 / steps.max(1) as f32;
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(t * 255.0) as u8, (x * 4) as u8, ((y * 4) as f32 * (1.0 - t)) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80).encode_image(&img).ok()?;
    Some(out)
}

/// Model loaders: on 0.38 their `progress_state` entry says `activity: "loading"` while they run.
fn is_loader(class_type: &str) -> bool {
    class_type.contains("Loader")
}

/// A node that runs as a subgraph on 0.38: its work is done by an ephemeral node `<id>.0` whose
/// events carry the submitted node as `display_node` (C12). Reached with `[sim:subgraph]` in the
/// node's `_meta.title`, since the simulator has no real subgraph nodes.
fn expanded_child(newer: bool, node_id: &str, node: &OValue) -> Option<String> {
    let title = node.get("_meta").and_then(|m| m.get("title")).and_then(OValue::as_str)?;
    (newer && title.contains("[sim:subgraph]")).then(|| format!("{node_id}.0"))
}

fn float(f: f64) -> OValue {
    serde_json::Number::from_f64(f).map_or(OValue::Null, OValue::Number)
}

fn int(i: u64) -> OValue {
    OValue::Number(i.into())
}

/// How a prompt ended.
enum Outcome {
    Success,
    Error {
        node: String,
        class_type: String,
        failure: NodeFailure,
        inputs: OMap,
    },
    Interrupted {
        node: String,
        class_type: String,
    },
    /// simulated restart: no history, no events
    Vanished,
}

/// Runs queued prompts forever (the task is aborted on shutdown).
pub async fn worker(shared: Arc<Shared>) {
    loop {
        let item = shared.queue.next().await;
        run_prompt(&shared, item).await;
    }
}

fn describe_inputs(inputs: &[(String, Input)]) -> OMap {
    let mut out = OMap::new();
    for (name, input) in inputs {
        let v = match input {
            Input::Literal(v @ (OValue::Null | OValue::Bool(_) | OValue::Number(_) | OValue::String(_))) => v.clone(),
            Input::Literal(other) => OValue::String(other.py_str()),
            Input::Link(value) => OValue::String(value.describe()),
        };
        out.insert(name.clone(), OValue::Array(vec![v]));
    }
    out
}

fn resolve_inputs(node: &OValue, results: &HashMap<String, Arc<Vec<Value>>>) -> Vec<(String, Input)> {
    let mut out = Vec::new();
    if let Some(inputs) = node.get("inputs").and_then(OValue::as_object) {
        for (name, value) in inputs.iter() {
            match as_link(value) {
                Some((from, slot)) => {
                    if let Some(v) = results.get(from).and_then(|vals| vals.get(slot)) {
                        out.push((name.clone(), Input::Link(v.clone())));
                    }
                }
                None => out.push((name.clone(), Input::Literal(value.clone()))),
            }
        }
    }
    out
}

fn injected_failure(class_type: &str) -> NodeFailure {
    let (file, line, function) = match class_type {
        "SamplerCustom" => ("comfy_extras/nodes_custom_sampler.py", 481, "sample"),
        "KSampler" => ("nodes.py", 1525, "sample"),
        _ => ("nodes.py", 1, "execute"),
    };
    NodeFailure::new(
        "RuntimeError",
        "CUDA error: an illegal memory access was encountered (simulated failure injected by tdcomfy sim [sim:error])",
        file,
        line,
        function,
        "samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, noise_mask=noise_mask, callback=callback, disable_pbar=disable_pbar, seed=noise_seed)",
    )
}

/// What a mid-run fault did.
enum FaultEffect {
    None,
    Fail(NodeFailure),
    Vanish,
}

fn fire_faults(shared: &Shared, faults: Faults, class_type: &str) -> FaultEffect {
    if faults.restart {
        tracing::info!("sim fault: simulated ComfyUI restart, forgetting queue and history");
        // Forget state before closing sockets: a client that sees the close must find it gone.
        shared.queue.restart();
        shared.loader_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        shared.hub.set_exec_client(None);
        shared.hub.drop_all();
        return FaultEffect::Vanish;
    }
    if faults.drop {
        tracing::info!("sim fault: dropping every WebSocket connection");
        shared.hub.drop_all();
    }
    if faults.error {
        return FaultEffect::Fail(injected_failure(class_type));
    }
    FaultEffect::None
}

async fn run_prompt(shared: &Arc<Shared>, item: QueueItem) {
    let graph = item.graph.clone();
    let client = item.client_id();
    let faults = Faults::for_prompt(&shared.config.faults, &graph);
    shared.interrupt.reset_for(&item.prompt_id);
    shared.hub.set_exec_client(client.clone());
    let mut ev = Events { hub: &shared.hub, client: client.clone(), prompt_id: item.prompt_id.clone(), silent: false };
    let newer = shared.config.comfy_version.is_newer();
    let previews_on = preview_method_for(&shared.config, &item.extra_data) != PreviewMethod::NoPreviews;
    let prompt_id = item.prompt_id.clone();
    let mut messages: Vec<(String, OValue)> = Vec::new();

    let start = obj(vec![("prompt_id", s(&prompt_id)), ("timestamp", OValue::Number(now_ms().into()))]);
    messages.push(("execution_start".into(), start.clone()));
    ev.exec("execution_start", start);
    ev.silent = faults.silent;
    let signatures = loader_signatures(shared, &graph).await;
    let cached_values: HashMap<String, Arc<Vec<Value>>> = {
        let mut cache = shared.loader_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // ComfyUI's classic cache keeps only what the current prompt uses (`clean_unused`).
        let used: std::collections::HashSet<&String> = signatures.values().collect();
        cache.retain(|k, _| used.contains(k));
        signatures.iter().filter_map(|(id, sig)| cache.get(sig).map(|v| (id.clone(), v.clone()))).collect()
    };
    let cached_ids: Vec<String> = graph.keys().filter(|id| cached_values.contains_key(*id)).cloned().collect();
    let cached = obj(vec![
        ("nodes", ids(&cached_ids)),
        ("prompt_id", s(&prompt_id)),
        ("timestamp", OValue::Number(now_ms().into())),
    ]);
    messages.push(("execution_cached".into(), cached.clone()));
    ev.exec("execution_cached", cached);

    let lists = shared.lists();
    let mut specs: HashMap<String, Option<catalog::NodeSpec>> = HashMap::new();
    let mut spec_of = |class: &str| -> Option<catalog::NodeSpec> {
        specs.entry(class.to_string()).or_insert_with(|| catalog::node_spec(class, &lists)).clone()
    };
    let class_of = |id: &str| graph.get(id).and_then(|n| n.get("class_type")).map(OValue::py_str).unwrap_or_default();
    let output_classes: HashMap<String, bool> =
        graph.keys().map(|id| (id.clone(), spec_of(&class_of(id)).is_some_and(|s| s.output_node))).collect();
    let mut plan = ExecutionList::with_cached(
        &graph,
        &item.outputs,
        |id| output_classes.get(id).copied().unwrap_or(false),
        |id| cached_values.contains_key(id),
    );
    let planned = plan.planned();
    let has_sampler = planned.iter().any(|id| catalog::SAMPLER_CLASSES.contains(&class_of(id).as_str()));

    let mut results: HashMap<String, Arc<Vec<Value>>> = cached_values.clone();
    let mut executed: Vec<String> = Vec::new();
    let mut ui_outputs: HashMap<String, OValue> = HashMap::new();
    // submitted node → the ephemeral node that ran it (C12)
    let mut displayed_as: HashMap<String, String> = HashMap::new();
    let mut progress = ProgressState { prompt_id: prompt_id.clone(), nodes: Vec::new() };
    let mut faults_pending = faults.mid_run();

    let outcome = 'run: loop {
        let Some(node_id) = plan.next() else {
            break Outcome::Success;
        };
        let class_type = class_of(&node_id);
        let Some(node) = graph.get(&node_id) else {
            continue;
        };

        progress.set(&node_id, float(0.0), float(1.0), "running");
        if newer && is_loader(&class_type) {
            progress.set_activity(&node_id, Some("loading"));
        }
        ev.any("progress_state", progress.data());
        if client.is_some() && !ev.silent {
            shared.hub.set_last_node(Some(node_id.clone()));
        }
        ev.exec(
            "executing",
            obj(vec![("node", s(&node_id)), ("display_node", s(&node_id)), ("prompt_id", s(&prompt_id))]),
        );
        if shared.interrupt.is_set() {
            break Outcome::Interrupted { node: node_id, class_type };
        }
        let child = expanded_child(newer, &node_id, node);
        if let Some(child) = &child {
            progress.set(child, float(0.0), float(1.0), "running");
            progress.set_parent(child, &node_id);
            ev.any("progress_state", progress.data());
            ev.exec(
                "executing",
                obj(vec![("node", s(child)), ("display_node", s(&node_id)), ("prompt_id", s(&prompt_id))]),
            );
        }
        let inputs = resolve_inputs(node, &results);

        let is_sampler = catalog::SAMPLER_CLASSES.contains(&class_type.as_str());
        let is_output = output_classes.get(&node_id).copied().unwrap_or(false);
        if is_sampler || class_type == "SlowPassthrough" {
            let literal = |name: &str| {
                inputs.iter().find(|(k, _)| k == name).and_then(|(_, v)| match v {
                    Input::Literal(v) => Some(v.clone()),
                    Input::Link(_) => None,
                })
            };
            let (steps, tick, preview) = if is_sampler {
                let steps = shared.config.progress_steps.max(1);
                (steps, shared.config.job_time / steps, None)
            } else {
                let steps = literal("steps").and_then(|v| v.to_value().as_u64()).unwrap_or(5).clamp(1, 10_000) as u32;
                let secs = literal("step_seconds").and_then(|v| v.to_value().as_f64()).unwrap_or(0.2).clamp(0.0, 60.0);
                let send = literal("send_preview").is_some_and(|v| v.truthy());
                let preview = if send { preview_jpeg(&inputs).await } else { None };
                (steps, Duration::from_secs_f64(secs), preview)
            };
            for step in 1..=steps {
                if shared.interrupt.sleep(tick).await {
                    break 'run Outcome::Interrupted { node: node_id, class_type };
                }
                if is_sampler && faults_pending && step > steps / 2 {
                    faults_pending = false;
                    match fire_faults(shared, faults, &class_type) {
                        FaultEffect::Vanish => break 'run Outcome::Vanished,
                        FaultEffect::Fail(failure) => {
                            break 'run Outcome::Error {
                                node: node_id,
                                class_type,
                                failure,
                                inputs: describe_inputs(&inputs),
                            };
                        }
                        FaultEffect::None => {}
                    }
                }
                progress.set(&node_id, int(u64::from(step)), int(u64::from(steps)), "running");
                ev.any("progress_state", progress.data());
                let tick_data = obj(vec![
                    ("value", int(u64::from(step))),
                    ("max", int(u64::from(steps))),
                    ("prompt_id", s(&prompt_id)),
                    ("node", s(&node_id)),
                ]);
                let step_preview = if is_sampler && previews_on { sampler_preview(step, steps) } else { None };
                match step_preview.as_ref().or(preview.as_ref()) {
                    Some(jpeg) if ev.wants_metadata() => {
                        ev.preview(&node_id, jpeg, false);
                        ev.any("progress", tick_data);
                    }
                    Some(jpeg) => {
                        ev.any("progress", tick_data);
                        ev.preview(&node_id, jpeg, false);
                    }
                    None => ev.any("progress", tick_data),
                }
            }
        } else if is_output && faults_pending && !has_sampler {
            faults_pending = false;
            match fire_faults(shared, faults, &class_type) {
                FaultEffect::Vanish => break 'run Outcome::Vanished,
                FaultEffect::Fail(failure) => {
                    break 'run Outcome::Error { node: node_id, class_type, failure, inputs: describe_inputs(&inputs) };
                }
                FaultEffect::None => {}
            }
        }

        let job = EvalJob {
            dirs: shared.dirs.clone(),
            class_type: class_type.clone(),
            inputs: inputs.clone(),
            graph: graph.clone(),
            extra_data: item.extra_data.clone(),
        };
        let evaluated = tokio::task::spawn_blocking(move || nodes::evaluate(&job)).await;
        let output: NodeOutput = match evaluated {
            Ok(Ok(out)) => out,
            Ok(Err(failure)) => {
                break Outcome::Error { node: node_id, class_type, failure, inputs: describe_inputs(&inputs) };
            }
            Err(join_error) => {
                let failure = NodeFailure::new(
                    "RuntimeError",
                    format!("simulated node crashed: {join_error}"),
                    "execution.py",
                    277,
                    "process_inputs",
                    "result = f(**inputs)",
                );
                break Outcome::Error { node: node_id, class_type, failure, inputs: describe_inputs(&inputs) };
            }
        };

        if !output.ws_images.is_empty() {
            let total = output.ws_images.len() as u64;
            for (i, png) in output.ws_images.iter().enumerate() {
                progress.set(&node_id, int(i as u64), int(total), "running");
                ev.any("progress_state", progress.data());
                let tick = obj(vec![
                    ("value", int(i as u64)),
                    ("max", int(total)),
                    ("prompt_id", s(&prompt_id)),
                    ("node", s(&node_id)),
                ]);
                ev.any("progress", tick);
                ev.preview(&node_id, png, true);
            }
            progress.set(&node_id, int(total), int(total), "running");
        }

        let values = Arc::new(output.values);
        if let Some(sig) = signatures.get(&node_id) {
            shared
                .loader_cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(sig.clone(), values.clone());
        }
        results.insert(node_id.clone(), values);
        executed.push(node_id.clone());
        // An expanded node's UI output is the ephemeral node's, shown on the submitted one.
        let real_id = child.clone().unwrap_or_else(|| node_id.clone());
        if let Some(mut ui) = output.ui {
            if newer && shared.config.assets {
                assets::enrich_outputs(&mut ui);
            }
            ev.exec(
                "executed",
                obj(vec![
                    ("node", s(&real_id)),
                    ("display_node", s(&node_id)),
                    ("output", ui.clone()),
                    ("prompt_id", s(&prompt_id)),
                ]),
            );
            ui_outputs.insert(node_id.clone(), ui);
        }
        if let Some(child) = &child {
            displayed_as.insert(node_id.clone(), child.clone());
            progress.set(child, float(1.0), float(1.0), "finished");
        }
        let (value, max) = match progress.current(&node_id) {
            Some((OValue::Number(ref n), m)) if !n.is_f64() => (m.clone(), m),
            _ => (float(1.0), float(1.0)),
        };
        progress.set(&node_id, value, max, "finished");
        ev.any("progress_state", progress.data());
    };

    let status = match outcome {
        Outcome::Vanished => {
            ev.silent = true;
            tracing::info!(prompt_id = %prompt_id, "prompt vanished with the simulated restart");
            return;
        }
        Outcome::Success => {
            let data = obj(vec![("prompt_id", s(&prompt_id)), ("timestamp", OValue::Number(now_ms().into()))]);
            messages.push(("execution_success".into(), data.clone()));
            ev.exec("execution_success", data);
            ExecutionStatus { status_str: "success", completed: true, messages }
        }
        Outcome::Error { node, class_type, failure, inputs } => {
            let tips = if failure.exception_type == "torch.OutOfMemoryError" {
                "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
            } else {
                ""
            };
            let data = obj(vec![
                ("prompt_id", s(&prompt_id)),
                ("node_id", s(&node)),
                ("node_type", s(&class_type)),
                ("executed", ids(&executed)),
                ("exception_message", OValue::String(format!("{}\n{tips}", failure.message))),
                ("exception_type", s(&failure.exception_type)),
                (
                    "traceback",
                    OValue::Array(nodes::full_traceback(&failure.frames).into_iter().map(OValue::String).collect()),
                ),
                ("current_inputs", OValue::Object(inputs)),
                ("current_outputs", ids(&planned)),
                ("timestamp", OValue::Number(now_ms().into())),
            ]);
            messages.push(("execution_error".into(), data.clone()));
            ev.exec("execution_error", data);
            ExecutionStatus { status_str: "error", completed: false, messages }
        }
        Outcome::Interrupted { node, class_type } => {
            let data = obj(vec![
                ("prompt_id", s(&prompt_id)),
                ("node_id", s(&node)),
                ("node_type", s(&class_type)),
                ("executed", ids(&executed)),
                ("timestamp", OValue::Number(now_ms().into())),
            ]);
            messages.push(("execution_interrupted".into(), data.clone()));
            ev.any("execution_interrupted", data);
            ExecutionStatus { status_str: "error", completed: false, messages }
        }
    };

    shared.hub.set_last_node(None);
    let mut outputs = Vec::new();
    let mut meta = Vec::new();
    for id in item.outputs.iter() {
        if let Some(ui) = ui_outputs.remove(id) {
            // Like ComfyUI, outputs of an expanded node are keyed by the node that ran.
            let (key, parent) = match displayed_as.get(id) {
                Some(child) => (child.clone(), s(id)),
                None => (id.clone(), OValue::Null),
            };
            outputs.push((key.clone(), ui));
            meta.push((
                key.clone(),
                obj(vec![
                    ("node_id", s(&key)),
                    ("display_node", s(id)),
                    ("parent_node", parent),
                    ("real_node_id", s(&key)),
                ]),
            ));
        }
    }
    shared.queue.task_done(HistoryEntry { item, outputs, status, meta });
    ev.exec("executing", obj(vec![("node", OValue::Null), ("prompt_id", s(&prompt_id))]));
}

/// The JPEG preview SlowPassthrough sends: the first image, fitted into 512×512.
async fn preview_jpeg(inputs: &[(String, Input)]) -> Option<Vec<u8>> {
    let batch = inputs.iter().find_map(|(k, v)| match (k.as_str(), v) {
        ("images", Input::Link(Value::Image(b))) => Some(b.clone()),
        _ => None,
    })?;
    tokio::task::spawn_blocking(move || {
        let frame = batch.render(0)?;
        let (w, h) = frame.dimensions();
        let scale = (512.0 / f64::from(w.max(h))).min(1.0);
        let frame = if scale < 1.0 {
            image::imageops::resize(
                &frame,
                ((f64::from(w) * scale) as u32).max(1),
                ((f64::from(h) * scale) as u32).max(1),
                image::imageops::FilterType::Triangle,
            )
        } else {
            frame
        };
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(&frame).ok()?;
        Some(out)
    })
    .await
    .ok()
    .flatten()
}
