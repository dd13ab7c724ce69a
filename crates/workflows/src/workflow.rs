//! One loaded workflow: its raw API graph, resolved parameter bindings and output nodes, and
//! the per-job rewrite (`bind`) that produces the exact graph to POST to ComfyUI.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::binding::{BindingSource, InputTarget, ParamBinding, STANDARD_PARAMS, resolve};
use crate::error::{BindError, Problem, WorkflowError};
use crate::graph::Graph;
use crate::node_map::NodeBindings;
use crate::spec::ParamType;

/// Root folder (under ComfyUI's output dir) of every file a bound workflow writes.
pub const OUTPUT_ROOT: &str = "tdcomfy";

/// The ComfyUI output subfolder all files of one job land in (`tdcomfy/<job_id>`), i.e. the
/// `subfolder` of its output items; the worker can delete it as a whole after fetching.
pub fn job_output_subfolder(job_id: &str) -> String {
    format!("{OUTPUT_ROOT}/{job_id}")
}

/// What one job supplies to a workflow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobInputs {
    /// The uploaded frame as ComfyUI returned it: `"<subfolder>/<name>"` or just `"<name>"`.
    pub image_name: String,
    /// Positive prompt; `None` keeps the workflow's text.
    pub prompt: Option<String>,
    /// Negative prompt; `None` keeps the workflow's text.
    pub negative_prompt: Option<String>,
    /// Noise seed; `None` keeps the workflow's seed.
    pub seed: Option<u64>,
    /// Named parameters (`frames`, `fps`, ...). May also carry `prompt`, `negative` or `seed`
    /// instead of the dedicated fields.
    pub params: Map<String, Value>,
    /// The job id; it makes the output file names unique per job.
    pub job_id: String,
}

/// One parameter as served by `GET /workflows`, enough for a client to build a typed UI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// Parameter name.
    pub name: String,
    /// `image`, `string`, `integer`, `number` or `boolean`.
    #[serde(rename = "type")]
    pub param_type: ParamType,
    /// The workflow's own value, used when the job does not set the parameter.
    pub default: Value,
    /// Smallest allowed value, if limited.
    pub min: Option<Number>,
    /// Largest allowed value, if limited.
    pub max: Option<Number>,
    /// Allowed values are `min + k·step`, if stepped (e.g. frames: min 9, step 8 → 8k+1).
    pub step: Option<u64>,
    /// What the parameter does.
    pub description: String,
    /// The (first) node it writes to.
    pub node_id: String,
    /// The input on that node.
    pub input: String,
    /// Every input it writes to (more than one for e.g. `fps`).
    pub targets: Vec<InputTarget>,
    /// How the binding was found: `node_map`, `marker` or `detected`.
    pub bound_by: BindingSource,
}

/// One workflow as served by `GET /workflows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowInfo {
    /// Workflow name (the file stem).
    pub name: String,
    /// Whether jobs without a `workflow` field use this one.
    pub is_default: bool,
    /// The parameters it accepts, standard ones first.
    pub parameters: Vec<ParamInfo>,
}

/// A validated workflow, ready to bind jobs to.
#[derive(Debug, Clone)]
pub struct Workflow {
    name: String,
    graph: Value,
    params: Vec<ParamBinding>,
    output_nodes: Vec<String>,
    primary_output: Option<String>,
}

impl Workflow {
    /// Validates an API-format graph and resolves its bindings. `overrides` are the node-map
    /// entries for this workflow (see [`crate::NodeMap::for_workflow`]). On failure the error
    /// lists every problem, located as `workflow <name>`.
    pub fn from_graph(name: &str, graph: Value, overrides: &NodeBindings) -> Result<Workflow, WorkflowError> {
        Workflow::build(name, graph, overrides).map_err(|problems| WorkflowError::Invalid {
            problems: problems
                .into_iter()
                .map(|(param, reason)| Problem { location: format!("workflow {name}"), param, reason })
                .collect(),
        })
    }

    /// The registry's entry point: same as `from_graph`, but returns the raw problems so the
    /// caller can locate them by file.
    pub(crate) fn build(
        name: &str,
        graph: Value,
        overrides: &NodeBindings,
    ) -> Result<Workflow, Vec<(Option<String>, String)>> {
        let parsed = Graph::parse(&graph).map_err(|e| e.into_iter().map(|r| (None, r)).collect::<Vec<_>>())?;
        let resolved = resolve(&parsed, name, overrides)?;
        Ok(Workflow {
            name: name.to_string(),
            graph,
            params: resolved.params,
            output_nodes: resolved.output_nodes,
            primary_output: resolved.primary_output,
        })
    }

    /// The workflow name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The workflow's API graph as loaded (with its literals, before any job binding).
    pub fn graph(&self) -> &Value {
        &self.graph
    }

    /// All parameters, standard ones (`image`, `prompt`, `negative`, `seed`) first.
    pub fn params(&self) -> &[ParamBinding] {
        &self.params
    }

    /// The parameter called `name`, if bound.
    pub fn param(&self, name: &str) -> Option<&ParamBinding> {
        self.params.iter().find(|p| p.name() == name)
    }

    /// Ids of the nodes that write results, in node order.
    pub fn output_nodes(&self) -> &[String] {
        &self.output_nodes
    }

    /// The output node expected to produce the main result: a node titled `@output` (or named by
    /// the node map), else the only video writer (SaveVideo, VHS_VideoCombine, SaveWEBM), else
    /// the only animation, else the only image writer. `None` when that is ambiguous.
    pub fn primary_output_hint(&self) -> Option<&str> {
        self.primary_output.as_deref()
    }

    /// This workflow as served by `GET /workflows`.
    pub fn describe(&self, is_default: bool) -> WorkflowInfo {
        WorkflowInfo {
            name: self.name.clone(),
            is_default,
            parameters: self
                .params
                .iter()
                .map(|p| {
                    let first = p.targets().first();
                    ParamInfo {
                        name: p.name().to_string(),
                        param_type: p.param_type(),
                        default: p.default_value().clone(),
                        min: p.spec.min.and_then(|l| l.to_number()),
                        max: p.spec.max.and_then(|l| l.to_number()),
                        step: p.spec.step.filter(|s| *s > 1),
                        description: p.description().to_string(),
                        node_id: first.map(|t| t.node_id.clone()).unwrap_or_default(),
                        input: first.map(|t| t.input.clone()).unwrap_or_default(),
                        targets: p.targets().to_vec(),
                        bound_by: p.source(),
                    }
                })
                .collect(),
        }
    }

    /// Checks a job's named parameters without binding, so the broker can answer 400 at submit
    /// time instead of failing a queued job. `prompt`, `negative` and `seed` may appear here too;
    /// a workflow that does not bind them ignores them (they are product-wide fields).
    pub fn validate_params(&self, params: &Map<String, Value>) -> Result<(), BindError> {
        self.checked_params(params).map(|_| ())
    }

    /// Produces the API graph to POST for one job: the uploaded image, prompt texts, seed and
    /// named parameters written into their inputs, and every output node's `filename_prefix`
    /// set to `tdcomfy/<job_id>/<node_id>` so a re-run never collides with, or is served from
    /// ComfyUI's cache as, an earlier job. Everything else is left exactly as loaded.
    pub fn bind(&self, inputs: &JobInputs) -> Result<Value, BindError> {
        if !is_valid_job_id(&inputs.job_id) {
            return Err(BindError::InvalidJobId { job_id: inputs.job_id.clone() });
        }
        if inputs.image_name.trim().is_empty() {
            return Err(BindError::MissingImage);
        }
        let mut values = self.checked_params(&inputs.params)?;

        let standard_fields = [
            ("prompt", inputs.prompt.clone().map(Value::String)),
            ("negative", inputs.negative_prompt.clone().map(Value::String)),
            ("seed", inputs.seed.map(Value::from)),
        ];
        for (name, field) in standard_fields {
            let (Some(field), Some(binding)) = (field, self.param(name)) else {
                continue;
            };
            let field = binding.check(&field)?;
            match values.iter().find(|(p, _)| p.name() == name) {
                Some((_, from_params)) if *from_params != field => {
                    return Err(BindError::Conflict { name: name.to_string() });
                }
                Some(_) => {}
                None => values.push((binding, field)),
            }
        }
        if let Some(image) = self.param("image") {
            values.push((image, Value::String(inputs.image_name.clone())));
        }

        let mut graph = self.graph.clone();
        for (binding, value) in values {
            for target in binding.targets() {
                set_input(&mut graph, &target.node_id, &target.input, value.clone())?;
            }
        }
        for node_id in &self.output_nodes {
            let has_prefix = graph
                .get(node_id)
                .and_then(|n| n.get("inputs"))
                .and_then(|i| i.get("filename_prefix"))
                .is_some_and(Value::is_string);
            if has_prefix {
                let prefix = format!("{}/{}", job_output_subfolder(&inputs.job_id), file_safe(node_id));
                set_input(&mut graph, node_id, "filename_prefix", Value::String(prefix))?;
            }
        }
        Ok(graph)
    }

    /// Validates every entry of `params`, returning the bindings with normalised values.
    fn checked_params(&self, params: &Map<String, Value>) -> Result<Vec<(&ParamBinding, Value)>, BindError> {
        let mut out = Vec::new();
        for (name, value) in params {
            if name == "image" {
                return Err(BindError::ReservedParam {
                    name: name.clone(),
                    why: "the image is always the uploaded frame; send it as the job's image",
                });
            }
            match self.param(name) {
                Some(binding) => out.push((binding, binding.check(value)?)),
                None if STANDARD_PARAMS.contains(&name.as_str()) => {}
                None => {
                    return Err(BindError::UnknownParam {
                        name: name.clone(),
                        known: self.params.iter().map(|p| p.name().to_string()).filter(|n| n != "image").collect(),
                    });
                }
            }
        }
        Ok(out)
    }
}

fn set_input(graph: &mut Value, node_id: &str, input: &str, value: Value) -> Result<(), BindError> {
    let slot = graph
        .get_mut(node_id)
        .and_then(|n| n.get_mut("inputs"))
        .and_then(|i| i.get_mut(input))
        .ok_or_else(|| BindError::MissingTarget { node_id: node_id.to_string(), input: input.to_string() })?;
    *slot = value;
    Ok(())
}

/// Job ids become path components of ComfyUI output files, so only a conservative character
/// set passes: no separators, no `..`, nothing Windows rejects.
fn is_valid_job_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Node ids like `12:3` (subgraphs) are not valid file names on Windows.
fn file_safe(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
