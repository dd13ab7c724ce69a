//! Preflight: before the first job, whether each ComfyUI server can run each workflow this worker
//! serves — every node class is installed, and every fixed option value of the graph (sampler,
//! scheduler, model file names, any input whose spec is a list) is among the server's options.
//!
//! Here and not in `tdcomfy-workflows` because the check needs a server's catalog
//! ([`NodeCatalog`], ComfyUI wire format read by `tdcomfy-comfy`), and the workflows crate knows
//! nothing of ComfyUI's client side; what the graph *is* stays the workflows crate's, what the
//! server *has* stays comfy-client's, and this module only compares the two.
//!
//! Only literals are checked: an input linked to another node (`["44", 0]`) is not a value. The
//! inputs the `image` parameter writes are skipped (each job uploads its own frame under its own
//! name). Other bound parameters are checked twice: their default (the graph's literal, used by
//! a job that omits the parameter) with the workflow, and a job's own value against the server
//! just before its prompt is posted ([`check_graph`] on the bound graph), so a value the server
//! lacks fails the job with the same sentence instead of a GPU attempt.
//!
//! [`watch_server`] keeps one server's result current: at start, after the server was
//! unreachable and answers again (a restart may have brought new nodes or models), and every
//! [`PreflightTiming::recheck`] while something is missing (a model file copied in without a
//! restart shows up in ComfyUI's lists at once).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tdcomfy_api::WorkflowReadiness;
use tdcomfy_comfy::{ComfyClient, ComfyError, InputSpec, NodeCatalog};
use tdcomfy_workflows::{Workflow, WorkflowRegistry};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How many of a list's options a problem quotes before "…and N more".
const QUOTED_OPTIONS: usize = 20;

/// How often [`watch_server`] looks at its server.
#[derive(Debug, Clone, Copy)]
pub struct PreflightTiming {
    /// Between `/system_stats` probes (cheap), which notice a server going away and coming back.
    pub probe: Duration,
    /// Between full `/object_info` checks while a workflow cannot run (or the last one failed).
    pub recheck: Duration,
}

impl Default for PreflightTiming {
    fn default() -> Self {
        PreflightTiming { probe: Duration::from_secs(2), recheck: Duration::from_secs(30) }
    }
}

/// What a lease loop knows about its server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerState {
    /// The first look is over (successful or not): the loop may lease.
    pub looked: bool,
    /// Whether the server answered at the last look.
    pub reachable: bool,
    /// The server's catalog from the last successful check (`None` before one).
    pub catalog: Option<Arc<NodeCatalog>>,
    /// Per workflow, from that catalog.
    pub workflows: Vec<WorkflowReadiness>,
}

impl ServerState {
    /// The workflows the server can run, for the lease request; `None` (any) before a check
    /// succeeded, as a worker without preflight would lease.
    pub fn runnable(&self) -> Option<Vec<String>> {
        self.catalog.as_ref()?;
        Some(self.workflows.iter().filter(|w| w.ready).map(|w| w.name.clone()).collect())
    }
}

/// How preflight names a server in its sentences and reports: its base URL without the final
/// slash (`http://gpu1:8188`).
pub fn server_name(endpoint: &tdcomfy_comfy::ComfyEndpoint) -> String {
    endpoint.to_string().trim_end_matches('/').to_owned()
}

/// The problems of `workflow` on a server with `catalog` (`server` names it in each sentence);
/// empty when it can run there.
pub fn check_workflow(workflow: &Workflow, catalog: &NodeCatalog, server: &str) -> Vec<String> {
    check_graph(workflow.graph(), catalog, server, &frame_inputs(workflow))
}

/// Every workflow of `registry` on one server, by name.
pub fn check_all(registry: &WorkflowRegistry, catalog: &NodeCatalog, server: &str) -> Vec<WorkflowReadiness> {
    registry
        .names()
        .into_iter()
        .filter_map(|name| registry.get(name))
        .map(|w| {
            let problems = cap_problems(check_workflow(w, catalog, server));
            WorkflowReadiness { name: w.name().to_owned(), ready: problems.is_empty(), problems }
        })
        .collect()
}

/// Most problems a report lists per workflow, and longest sentence, within the broker's limits
/// for `POST /worker/preflight` (200 and 4000 characters): a graph on an empty server can have a
/// problem per node, and a list of 20 long file names makes a long sentence.
const MAX_PROBLEMS: usize = 100;
const MAX_PROBLEM_CHARS: usize = 2000;

fn cap_problems(mut problems: Vec<String>) -> Vec<String> {
    for p in &mut problems {
        if p.chars().count() > MAX_PROBLEM_CHARS {
            *p = p.chars().take(MAX_PROBLEM_CHARS - 1).chain(['…']).collect();
        }
    }
    if problems.len() > MAX_PROBLEMS {
        let more = problems.len() - (MAX_PROBLEMS - 1);
        problems.truncate(MAX_PROBLEMS - 1);
        problems.push(format!("…and {more} more problems"));
    }
    problems
}

/// The (node, input) pairs the job's uploaded frame goes to: never checked, since the upload
/// makes the value exist.
pub fn frame_inputs(workflow: &Workflow) -> BTreeSet<(String, String)> {
    workflow
        .param("image")
        .map(|p| p.targets().iter().map(|t| (t.node_id.clone(), t.input.clone())).collect())
        .unwrap_or_default()
}

/// The problems of an API-format `graph` on a server with `catalog`, leaving out `skip` inputs.
pub fn check_graph(
    graph: &Value,
    catalog: &NodeCatalog,
    server: &str,
    skip: &BTreeSet<(String, String)>,
) -> Vec<String> {
    let Some(nodes) = graph.as_object() else { return vec!["the graph is not a JSON object".to_owned()] };
    let mut ids: Vec<&String> = nodes.keys().collect();
    // Numeric ids in number order, so the report reads like the graph.
    ids.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    let used = used_nodes(nodes, catalog);
    let mut problems = Vec::new();
    for id in ids {
        let node = &nodes[id];
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or_default();
        // ComfyUI refuses a graph with an unknown class anywhere in it…
        let Some(info) = catalog.node(class) else {
            problems.push(format!("node {id} ({class}): the node type {class} is not installed on {server}"));
            continue;
        };
        // …but checks (and runs) only the nodes an output node depends on.
        if used.as_ref().is_some_and(|used| !used.contains(id.as_str())) {
            continue;
        }
        let Some(inputs) = node.get("inputs").and_then(Value::as_object) else { continue };
        for (name, value) in inputs {
            if skip.contains(&(id.clone(), name.clone())) || is_link(value) {
                continue;
            }
            let Some(InputSpec::Choices { options, multiselect }) = info.input(name) else { continue };
            // Newer front ends wrap list widget values as {"__value__": …} (C11).
            let value = value.get("__value__").unwrap_or(value);
            let values: Vec<&Value> = match value {
                Value::Array(items) if *multiselect => items.iter().collect(),
                // A list for a single choice is not something this check can judge.
                Value::Array(_) | Value::Object(_) => continue,
                one => vec![one],
            };
            for v in values {
                if !options.iter().any(|o| same_option(o, v)) {
                    problems.push(format!("node {id} ({class}): {}", missing_option(name, v, options, server)));
                }
            }
        }
    }
    problems
}

/// The nodes the graph's output nodes (by the server's `output_node` flags) depend on, themselves
/// included; `None` when the server knows no output node in it (then every node is checked).
fn used_nodes<'a>(nodes: &'a serde_json::Map<String, Value>, catalog: &NodeCatalog) -> Option<BTreeSet<&'a str>> {
    let class_of = |node: &Value| node.get("class_type").and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut stack: Vec<&str> = nodes
        .iter()
        .filter(|(_, n)| catalog.node(&class_of(n)).is_some_and(|info| info.is_output()))
        .map(|(id, _)| id.as_str())
        .collect();
    if stack.is_empty() {
        return None;
    }
    let mut used = BTreeSet::new();
    while let Some(id) = stack.pop() {
        let Some((key, node)) = nodes.get_key_value(id) else { continue };
        if !used.insert(key.as_str()) {
            continue;
        }
        let inputs = node.get("inputs").and_then(Value::as_object).into_iter().flat_map(|m| m.values());
        stack.extend(inputs.filter(|v| is_link(v)).filter_map(|v| v[0].as_str()));
    }
    Some(used)
}

/// `["44", 0]`: the output of another node, not a literal.
fn is_link(value: &Value) -> bool {
    matches!(value.as_array().map(Vec::as_slice), Some([Value::String(_), n]) if n.is_u64() || n.is_i64())
}

fn same_option(option: &Value, value: &Value) -> bool {
    match (option, value) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn missing_option(input: &str, value: &Value, options: &[Value], server: &str) -> String {
    let mut quoted: Vec<String> = options.iter().take(QUOTED_OPTIONS).map(show).collect();
    if options.len() > QUOTED_OPTIONS {
        quoted.push(format!("…and {} more", options.len() - QUOTED_OPTIONS));
    }
    let list = quoted.join(", ");
    // A file name (model, LoRA, VAE…) is "installed" or not; a sampler is an option.
    let is_file = matches!(value, Value::String(s) if s.contains('.') || s.contains('/'));
    if is_file {
        format!("{input} '{}' is not installed on {server}; installed: [{list}]", show(value))
    } else {
        format!("{input} '{}' is not among the options of {server}: [{list}]", show(value))
    }
}

/// One check of every workflow on one server, as [`watch_server`] and `--check` make it.
pub async fn check_server(
    client: &ComfyClient,
    registry: &WorkflowRegistry,
    server: &str,
) -> Result<ServerState, ComfyError> {
    let catalog = client.object_info().await?;
    let workflows = check_all(registry, &catalog, server);
    Ok(ServerState { looked: true, reachable: true, catalog: Some(Arc::new(catalog)), workflows })
}

/// Keeps `state` current for one server until shutdown (see the module docs for when it looks).
pub async fn watch_server(
    client: ComfyClient,
    registry: Arc<WorkflowRegistry>,
    server: String,
    timing: PreflightTiming,
    state: watch::Sender<ServerState>,
    devices: watch::Sender<Vec<tdcomfy_api::DeviceInfo>>,
    shutdown: CancellationToken,
) {
    loop {
        let looked = check_server(&client, &registry, &server).await;
        // Answering with an error (a custom node breaking /object_info) is not being away: such a
        // server is asked again at the recheck pace, not at every probe.
        let broken = matches!(looked, Err(ComfyError::Status { .. } | ComfyError::Protocol { .. }));
        if let Err(e) = &looked {
            tracing::warn!(comfyui = %server, error = %e, "preflight: could not read /object_info");
        }
        let checked = looked.is_ok();
        let all_ready = looked.as_ref().is_ok_and(|s| s.workflows.iter().all(|w| w.ready));
        state.send_if_modified(|s| {
            let next = match &looked {
                Ok(fresh) => fresh.clone(),
                // A failed look keeps what the last good one found: the server is down, not
                // stripped of its models.
                Err(_) => ServerState { looked: true, reachable: false, ..s.clone() },
            };
            if checked && next.workflows != s.workflows {
                log_result(&server, &next.workflows);
            }
            let changed = *s != next;
            *s = next;
            changed
        });
        let looked_at = Instant::now();
        // Probe until there is a reason for another full check.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(timing.probe) => {}
            }
            let stats = client.system_stats().await;
            let up = stats.is_ok();
            if let Ok(stats) = stats {
                // For /health only: read at each report, never a reason to lease again.
                devices.send_replace(
                    stats
                        .devices
                        .into_iter()
                        .map(|d| tdcomfy_api::DeviceInfo {
                            name: d.name,
                            kind: d.kind,
                            vram_total: d.vram_total,
                            vram_free: d.vram_free,
                        })
                        .collect(),
                );
            }
            let was_up = state.borrow().reachable;
            if !up {
                if was_up {
                    tracing::warn!(comfyui = %server, "preflight: ComfyUI does not answer");
                    state.send_modify(|s| s.reachable = false);
                }
                continue;
            }
            let recheck_due = looked_at.elapsed() >= timing.recheck;
            if broken {
                if recheck_due {
                    break;
                }
                continue;
            }
            if !was_up {
                // Back after an outage (or up for the first time): a restart may have changed
                // its nodes and models.
                tracing::info!(comfyui = %server, "preflight: ComfyUI answers; checking the workflows");
                break;
            }
            if !all_ready && recheck_due {
                break;
            }
        }
    }
}

fn log_result(server: &str, workflows: &[WorkflowReadiness]) {
    for w in workflows {
        if w.ready {
            tracing::info!(comfyui = server, workflow = %w.name, "preflight: ready");
        } else {
            tracing::warn!(comfyui = server, workflow = %w.name, problems = %w.problems.join("; "), "preflight: cannot run");
        }
    }
}

/// `tdcomfy worker --check`: one look at every server of `config`, without the broker. Returns
/// the report as text (per server, per workflow: ready or the problems, then per workflow on
/// how many servers it runs) and whether every workflow runs on at least one server.
pub async fn check_report(config: &crate::WorkerConfig) -> (String, bool) {
    use std::fmt::Write as _;
    let registry = &config.workflows;
    let names: Vec<&str> = registry.names();
    let mut runs_on = vec![0usize; names.len()];
    let mut out = String::new();
    for endpoint in config.comfy.iter() {
        let server = server_name(endpoint);
        let looked = match ComfyClient::new(
            endpoint.clone(),
            tdcomfy_comfy::ClientId::new(),
            tdcomfy_comfy::ComfyTimeouts::default(),
        ) {
            Ok(client) => check_server(&client, registry, &server).await,
            Err(e) => Err(e),
        };
        match looked {
            Err(e) => {
                let _ = writeln!(out, "ComfyUI {server}: cannot check: {e}");
            }
            Ok(state) => {
                let classes = state.catalog.as_ref().map_or(0, |c| c.len());
                let _ = writeln!(out, "ComfyUI {server}: {classes} node types");
                for w in &state.workflows {
                    if w.ready {
                        let _ = writeln!(out, "  {}: ready", w.name);
                    } else {
                        let _ = writeln!(out, "  {}: cannot run", w.name);
                        for p in &w.problems {
                            let _ = writeln!(out, "    - {p}");
                        }
                    }
                    if let (true, Some(i)) = (w.ready, names.iter().position(|n| *n == w.name)) {
                        runs_on[i] += 1;
                    }
                }
            }
        }
    }
    let servers = config.comfy.len();
    let _ = writeln!(out);
    for (name, n) in names.iter().zip(&runs_on) {
        match n {
            0 => writeln!(out, "{name}: runs on no server"),
            n => writeln!(out, "{name}: runs on {n} of {servers} server(s)"),
        }
        .ok();
    }
    (out, runs_on.iter().all(|n| *n > 0))
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tdcomfy_workflows::NodeBindings;

    use super::*;

    fn catalog() -> NodeCatalog {
        NodeCatalog::from_value(&json!({
            "LoadImage": {"input": {"required": {"image": [["example.png"], {"image_upload": true}]}}},
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors"]]}}},
            "KSamplerSelect": {"input": {"required": {"sampler_name": [["euler", "heun"]]}}},
            "ImageInvert": {"input": {"required": {"image": ["IMAGE"]}}},
            "SaveVideo": {"output_node": true, "input": {"required": {
                "video": ["VIDEO"],
                "format": ["COMBO", {"options": ["auto", "mp4"], "multiselect": false}],
                "tags": ["COMBO", {"options": ["x", "y"], "multiselect": true}],
                "remote": ["COMBO", {"remote": {"route": "/models"}}],
            }}},
            "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING"]}}, "output_node": true},
        }))
        .unwrap()
    }

    fn problems(graph: Value) -> Vec<String> {
        check_graph(&graph, &catalog(), "http://gpu1:8188", &BTreeSet::new())
    }

    #[test]
    fn literals_are_checked_against_classic_and_v3_options() {
        let p = problems(json!({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
            "2": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_9m"}},
            "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "also": ["1", 0], "format": "webm", "tags": ["x", "z"], "remote": "anything"}},
        }));
        assert_eq!(
            p,
            [
                "node 1 (CheckpointLoaderSimple): ckpt_name 'b.safetensors' is not installed on http://gpu1:8188; installed: [a.safetensors]",
                "node 2 (KSamplerSelect): sampler_name 'dpmpp_9m' is not among the options of http://gpu1:8188: [euler, heun]",
                "node 3 (SaveVideo): format 'webm' is not among the options of http://gpu1:8188: [auto, mp4]",
                "node 3 (SaveVideo): tags 'z' is not among the options of http://gpu1:8188: [x, y]",
            ]
        );
        let ok = problems(json!({
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": {"__value__": "a.safetensors"}}},
            "2": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "heun"}},
            "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "also": ["1", 0], "format": "mp4", "tags": ["y"]}},
        }));
        assert_eq!(ok, Vec::<String>::new());
    }

    #[test]
    fn a_linked_input_is_not_a_literal_and_a_missing_class_is_named() {
        // The sampler name comes from another node: nothing to check, whatever that node is.
        let p = problems(json!({
            "2": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": ["7", 0]}},
            "7": {"class_type": "PrimitiveStringFromSomePack", "inputs": {"value": "dpmpp_9m"}},
        }));
        assert_eq!(
            p,
            [
                "node 7 (PrimitiveStringFromSomePack): the node type PrimitiveStringFromSomePack is not installed on http://gpu1:8188"
            ]
        );
    }

    #[test]
    fn a_report_stays_within_the_brokers_limits() {
        let capped = cap_problems((0..150).map(|i| format!("p{i}")).collect());
        assert_eq!(capped.len(), MAX_PROBLEMS);
        assert_eq!(capped.last().unwrap(), "…and 51 more problems");
        let long = cap_problems(vec!["x".repeat(5000)]);
        assert_eq!(long[0].chars().count(), MAX_PROBLEM_CHARS);
    }

    #[test]
    fn only_nodes_an_output_depends_on_have_their_values_checked_as_comfyui_does() {
        let p = problems(json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
            // Left over in the graph, feeding nothing: ComfyUI neither runs nor checks it.
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "gone.safetensors"}},
            "5": {"class_type": "NotInstalled", "inputs": {}},
        }));
        assert_eq!(p, ["node 5 (NotInstalled): the node type NotInstalled is not installed on http://gpu1:8188"]);
    }

    #[test]
    fn the_frame_input_is_skipped_and_long_option_lists_are_capped() {
        let graph = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "whatever-the-job-uploads.png"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        });
        let w = Workflow::from_graph("w", graph, &NodeBindings::new()).unwrap();
        assert_eq!(check_workflow(&w, &catalog(), "s"), Vec::<String>::new());

        let many: Vec<String> = (0..25).map(|i| format!("m{i:02}.safetensors")).collect();
        let c =
            NodeCatalog::from_value(&json!({"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [many]}}}}))
                .unwrap();
        let p = check_graph(
            &json!({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "z.safetensors"}}}),
            &c,
            "s",
            &BTreeSet::new(),
        );
        assert!(p[0].ends_with("m18.safetensors, m19.safetensors, …and 5 more]"), "{}", p[0]);
    }
}
