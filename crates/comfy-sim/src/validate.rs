//! Prompt validation with ComfyUI 0.3.64's rules and error shapes (`execution.validate_prompt`).
//!
//! Owns: graph-level errors (`invalid_prompt`, `prompt_no_outputs`), per-input errors
//! (`required_input_missing`, `bad_linked_input`, `return_type_mismatch`, `invalid_input_type`,
//! `value_smaller_than_min`, `value_bigger_than_max`, `value_not_in_list`,
//! `custom_validation_failed`, `exception_during_(inner_)validation`), the literal conversions
//! (`int()`, `float()`, `str()`, `bool()`, written back into the graph as ComfyUI does), and the
//! "some outputs valid → 200 with `node_errors`" rule. V3 `COMBO` options are not checked at submit,
//! exactly like 0.3.64.

use std::collections::HashMap;

use crate::catalog::{self, DynamicLists, InputCategory, InputSpec, InputType, NodeSpec};
use crate::files::{self, DataDirs};
use crate::json::{OMap, OValue, py_float, py_number, py_str_repr};

/// Python's default recursion limit, reached by cycles and absurdly deep graphs.
const MAX_DEPTH: usize = 900;

/// The outcome of validating a prompt.
#[derive(Debug)]
pub enum Verdict {
    /// At least one output is valid: queue these outputs; `node_errors` lists the others.
    Accepted {
        /// output node ids to execute, in prompt order
        outputs: Vec<String>,
        /// errors of the outputs that will not run
        node_errors: OMap,
    },
    /// Nothing can run: HTTP 400 with `{error, node_errors}`.
    Rejected {
        /// the top-level error
        error: OMap,
        /// per-node errors
        node_errors: OMap,
    },
    /// The input would crash ComfyUI's validator (HTTP 500 there).
    Malformed,
}

/// An error entry `{type, message, details, extra_info}`.
pub fn error_entry(kind: &str, message: impl Into<String>, details: impl Into<String>, extra_info: OMap) -> OValue {
    let mut m = OMap::new();
    m.insert("type", OValue::str(kind));
    m.insert("message", OValue::str(message.into()));
    m.insert("details", OValue::str(details.into()));
    m.insert("extra_info", OValue::Object(extra_info));
    OValue::Object(m)
}

fn top_error(kind: &str, message: &str, details: &str) -> OMap {
    match error_entry(kind, message, details, OMap::new()) {
        OValue::Object(m) => m,
        _ => OMap::new(),
    }
}

fn extra(pairs: Vec<(&str, OValue)>) -> OMap {
    let mut m = OMap::new();
    for (k, v) in pairs {
        m.insert(k, v);
    }
    m
}

/// A Python exception raised while validating.
#[derive(Debug, Clone)]
struct PyException {
    type_name: &'static str,
    message: String,
}

impl PyException {
    fn traceback(&self) -> OValue {
        OValue::Array(vec![OValue::str(
            "  File \"/opt/ComfyUI/execution.py\", line 764, in validate_inputs\n    o_class_type = prompt[o_id]['class_type']\n",
        )])
    }
}

#[derive(Debug, Clone)]
struct NodeVerdict {
    valid: bool,
    errors: Vec<OValue>,
}

struct Ctx<'a> {
    graph: &'a mut OMap,
    /// 0.38's rules (C11)
    newer: bool,
    lists: &'a DynamicLists,
    dirs: &'a DataDirs,
    specs: HashMap<String, Option<NodeSpec>>,
    validated: Vec<(String, NodeVerdict)>,
}

impl Ctx<'_> {
    fn verdict(&self, id: &str) -> Option<&NodeVerdict> {
        self.validated.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    fn set_verdict(&mut self, id: &str, verdict: NodeVerdict) {
        match self.validated.iter_mut().find(|(k, _)| k == id) {
            Some(slot) => slot.1 = verdict,
            None => self.validated.push((id.to_string(), verdict)),
        }
    }

    fn class_of(&self, id: &str) -> Option<String> {
        self.graph.get(id).and_then(|n| n.get("class_type")).map(OValue::py_str)
    }

    fn spec(&mut self, class_type: &str) -> Option<NodeSpec> {
        let lists = self.lists;
        self.specs.entry(class_type.to_string()).or_insert_with(|| catalog::node_spec(class_type, lists)).clone()
    }
}

/// Validates `graph` in place (literal inputs are converted like ComfyUI converts them).
pub fn validate_prompt(
    graph: &mut OMap,
    partial_targets: Option<&[String]>,
    lists: &DynamicLists,
    dirs: &DataDirs,
    newer: bool,
) -> Verdict {
    let mut outputs = Vec::new();
    let ids: Vec<String> = graph.keys().cloned().collect();
    for id in &ids {
        let title = graph.get(id).and_then(|n| n.get("_meta")).and_then(|m| m.get("title")).and_then(OValue::as_str);
        let title = title.map(str::to_string);
        if newer && let Some(rejected) = missing_node_type(graph, id, title, lists) {
            return rejected;
        }
        let missing = || Verdict::Rejected {
            error: top_error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                &format!("Node ID '#{id}'"),
            ),
            node_errors: OMap::new(),
        };
        // Python's `'class_type' not in node` works on dicts, strings and lists; other types crash.
        let class_type = match graph.get(id) {
            Some(OValue::Object(m)) => match m.get("class_type") {
                Some(ct) => ct,
                None => return missing(),
            },
            Some(OValue::String(_) | OValue::Array(_)) => return missing(),
            _ => return Verdict::Malformed,
        };
        if matches!(class_type, OValue::Array(_) | OValue::Object(_)) {
            return Verdict::Malformed;
        }
        let class_name = class_type.py_str();
        let Some(spec) = catalog::node_spec(&class_name, lists) else {
            return Verdict::Rejected {
                error: top_error(
                    "invalid_prompt",
                    &format!("Cannot execute because node {class_name} does not exist."),
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: OMap::new(),
            };
        };
        if spec.output_node && partial_targets.is_none_or(|t| t.contains(id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Verdict::Rejected {
            error: top_error("prompt_no_outputs", "Prompt has no outputs", ""),
            node_errors: OMap::new(),
        };
    }

    if newer && let Some(cycle) = find_cycle(graph, &outputs) {
        return Verdict::Rejected {
            error: match error_entry(
                "dependency_cycle",
                "Dependency cycle detected",
                format!("Nodes {} depend on each other", cycle.join(", ")),
                extra(vec![("node_ids", OValue::Array(cycle.into_iter().map(OValue::String).collect()))]),
            ) {
                OValue::Object(m) => m,
                _ => OMap::new(),
            },
            node_errors: OMap::new(),
        };
    }

    let mut ctx = Ctx { graph, lists, dirs, newer, specs: HashMap::new(), validated: Vec::new() };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<OValue>)> = Vec::new();
    let mut node_errors = OMap::new();
    for o in &outputs {
        let (valid, reasons) = match validate_inputs(&mut ctx, o, 0) {
            Ok(v) => (v.valid, v.errors),
            Err(ex) => {
                let reasons = vec![error_entry(
                    "exception_during_validation",
                    "Exception when validating node",
                    ex.message.clone(),
                    extra(vec![("exception_type", OValue::str(ex.type_name)), ("traceback", ex.traceback())]),
                )];
                ctx.set_verdict(o, NodeVerdict { valid: false, errors: reasons.clone() });
                (false, reasons)
            }
        };
        if valid {
            good.push(o.clone());
            continue;
        }
        failed.push((o.clone(), reasons));
        // As in ComfyUI, every invalid node validated so far is attributed to this output.
        for (node_id, verdict) in &ctx.validated {
            if verdict.valid || verdict.errors.is_empty() {
                continue;
            }
            if !node_errors.contains_key(node_id) {
                let class_type = ctx.class_of(node_id).unwrap_or_default();
                node_errors.insert(
                    node_id.clone(),
                    OValue::Object(extra(vec![
                        ("errors", OValue::Array(verdict.errors.clone())),
                        ("dependent_outputs", OValue::Array(vec![])),
                        ("class_type", OValue::String(class_type)),
                    ])),
                );
            }
            if let Some(OValue::Array(deps)) = node_errors
                .get_mut(node_id)
                .and_then(OValue::as_object_mut)
                .and_then(|m| m.get_mut("dependent_outputs"))
            {
                deps.push(OValue::str(o.clone()));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|r| {
                let field = |k: &str| r.get(k).map(OValue::py_str).unwrap_or_default();
                format!("{}: {}", field("message"), field("details"))
            })
            .collect();
        return Verdict::Rejected {
            error: top_error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &details.join("\n"),
            ),
            node_errors,
        };
    }
    Verdict::Accepted { outputs: good, node_errors }
}

/// 0.38's `missing_node_type` (C11): a node without `class_type`, or of a class that is not
/// installed, named by id, class and title. `None` when the node's class is there.
fn missing_node_type(graph: &OMap, id: &str, title: Option<String>, lists: &DynamicLists) -> Option<Verdict> {
    let node = graph.get(id)?;
    let class = match node {
        OValue::Object(m) => m.get("class_type"),
        _ => return None,
    };
    let (message, class_value, title_value) = match class {
        None => (
            format!(
                "Node '{}' has no class_type. The workflow may be corrupted or a custom node is missing.",
                title.clone().unwrap_or_else(|| format!("ID #{id}"))
            ),
            OValue::Null,
            title.map_or(OValue::Null, OValue::String),
        ),
        Some(OValue::String(class)) if catalog::node_spec(class, lists).is_none() => {
            let shown = title.unwrap_or_else(|| class.clone());
            (
                format!("Node '{shown}' not found. The custom node may not be installed."),
                OValue::str(class.clone()),
                OValue::String(shown),
            )
        }
        _ => return None,
    };
    let error = error_entry(
        "missing_node_type",
        message,
        format!("Node ID '#{id}'"),
        extra(vec![("node_id", OValue::str(id)), ("class_type", class_value), ("node_title", title_value)]),
    );
    Some(Verdict::Rejected {
        error: match error {
            OValue::Object(m) => m,
            _ => OMap::new(),
        },
        node_errors: OMap::new(),
    })
}

/// The first dependency cycle among the nodes the outputs need (0.38 names it, C11; 0.3.64
/// recurses until Python's recursion limit). Iterative, so a deep graph cannot overflow.
fn find_cycle(graph: &OMap, outputs: &[String]) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let links = |id: &str| -> Vec<String> {
        graph
            .get(id)
            .and_then(|n| n.get("inputs"))
            .and_then(OValue::as_object)
            .map(|inputs| {
                inputs
                    .iter()
                    .filter_map(|(_, v)| match v.as_array().map(Vec::as_slice) {
                        Some([OValue::String(from), OValue::Number(_)]) if graph.contains_key(from) => {
                            Some(from.clone())
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut marks: HashMap<String, Mark> = HashMap::new();
    for start in outputs {
        if marks.contains_key(start) {
            continue;
        }
        // (node, its links, next link to follow); the stack is the current path.
        let mut stack: Vec<(String, Vec<String>, usize)> = vec![(start.clone(), links(start), 0)];
        marks.insert(start.clone(), Mark::Open);
        while let Some((node, next, i)) = stack.last_mut() {
            if *i >= next.len() {
                marks.insert(node.clone(), Mark::Done);
                stack.pop();
                continue;
            }
            let dep = next[*i].clone();
            *i += 1;
            match marks.get(&dep) {
                Some(Mark::Done) => {}
                Some(Mark::Open) => {
                    let from = stack.iter().position(|(n, ..)| *n == dep).unwrap_or(0);
                    return Some(stack[from..].iter().map(|(n, ..)| n.clone()).collect());
                }
                None => {
                    marks.insert(dep.clone(), Mark::Open);
                    let deps = links(&dep);
                    stack.push((dep, deps, 0));
                }
            }
        }
    }
    None
}

/// Resolves `prompt[o_id]['class_type']`, raising what Python would raise.
fn linked_class(ctx: &Ctx<'_>, o_id: &OValue) -> Result<(String, String), PyException> {
    let id = match o_id {
        OValue::String(s) => s.clone(),
        OValue::Array(_) | OValue::Object(_) => {
            return Err(PyException {
                type_name: "TypeError",
                message: format!("unhashable type: '{}'", o_id.py_type_name()),
            });
        }
        other => {
            return Err(PyException { type_name: "KeyError", message: other.py_repr() });
        }
    };
    match ctx.class_of(&id) {
        Some(class) => Ok((id, class)),
        None => Err(PyException { type_name: "KeyError", message: py_str_repr(&id) }),
    }
}

/// `RETURN_TYPES[slot]` with Python indexing rules.
fn return_type(spec: &NodeSpec, slot: &OValue) -> Result<String, PyException> {
    let idx = match slot {
        OValue::Number(n) if n.as_i64().is_some() => n.as_i64().unwrap_or(0),
        OValue::Bool(b) => i64::from(*b),
        other => {
            return Err(PyException {
                type_name: "TypeError",
                message: format!("tuple indices must be integers or slices, not {}", other.py_type_name()),
            });
        }
    };
    let len = spec.outputs.len() as i64;
    let real = if idx < 0 { idx + len } else { idx };
    if real < 0 || real >= len {
        return Err(PyException { type_name: "IndexError", message: "tuple index out of range".to_string() });
    }
    Ok(spec.outputs[real as usize].clone())
}

/// ComfyUI's `validate_node_input`: equal, wildcard, or overlapping comma-separated sets.
fn types_compatible(received: &str, input: &InputType) -> bool {
    let input = match input {
        InputType::Named(s) => s.as_str(),
        InputType::Combo(_) => return received == "COMBO" || received == "*",
    };
    if received == input || received == "*" || input == "*" {
        return true;
    }
    let set = |s: &str| s.split(',').map(|t| t.trim().to_string()).collect::<Vec<_>>();
    let (a, b) = (set(received), set(input));
    a.iter().any(|t| b.contains(t))
}

fn validate_inputs(ctx: &mut Ctx<'_>, id: &str, depth: usize) -> Result<NodeVerdict, PyException> {
    if let Some(v) = ctx.verdict(id) {
        return Ok(v.clone());
    }
    if depth > MAX_DEPTH {
        return Err(PyException {
            type_name: "RecursionError",
            message: "maximum recursion depth exceeded while calling a Python object".to_string(),
        });
    }
    let class_type = ctx.class_of(id).unwrap_or_default();
    let spec = ctx
        .spec(&class_type)
        .ok_or_else(|| PyException { type_name: "KeyError", message: py_str_repr(&class_type) })?;
    let inputs = match ctx.graph.get(id).and_then(|n| n.get("inputs")) {
        Some(OValue::Object(m)) => m.clone(),
        Some(other) => {
            return Err(PyException {
                type_name: "AttributeError",
                message: format!("'{}' object has no attribute 'get'", other.py_type_name()),
            });
        }
        None => {
            return Err(PyException { type_name: "KeyError", message: "'inputs'".to_string() });
        }
    };
    // LoadImage-style nodes validate their file input with VALIDATE_INPUTS instead of the combo.
    let custom_validated: &[&str] = match class_type.as_str() {
        "LoadImage" | "LoadImageOutput" => &["image"],
        _ => &[],
    };

    let mut errors = Vec::new();
    let mut valid = true;
    let mut converted: Vec<(String, OValue)> = Vec::new();
    if ctx.newer {
        // 0.38 checks the inputs of dynamic (V3 autogrow-style `group.name`) slots against the
        // node's declaration; the simulator's nodes declare none, so any such input is invalid.
        for name in inputs.keys().filter(|n| n.contains('.') && !spec.inputs.iter().any(|i| i.name == **n)) {
            errors.push(error_entry(
                "invalid_dynamic_input",
                "Invalid dynamic input",
                format!("{name}: no dynamic input group of this node accepts it"),
                extra(vec![("input_name", OValue::str(name.clone()))]),
            ));
            valid = false;
        }
    }
    for input in &spec.inputs {
        let x = input.name.as_str();
        let Some(raw) = inputs.get(x) else {
            if input.category == InputCategory::Required {
                errors.push(error_entry(
                    "required_input_missing",
                    "Required input is missing",
                    x,
                    extra(vec![("input_name", OValue::str(x))]),
                ));
            }
            continue;
        };
        if let OValue::Array(link) = raw {
            if link.len() != 2 {
                errors.push(error_entry(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    x,
                    extra(vec![
                        ("input_name", OValue::str(x)),
                        ("input_config", input.input_config()),
                        ("received_value", raw.clone()),
                    ]),
                ));
                continue;
            }
            let (o_id, o_class) = linked_class(ctx, &link[0])?;
            let o_spec = ctx
                .spec(&o_class)
                .ok_or_else(|| PyException { type_name: "KeyError", message: py_str_repr(&o_class) })?;
            let received = return_type(&o_spec, &link[1])?;
            if !types_compatible(&received, &input.input_type) {
                errors.push(error_entry(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    format!("{x}, received_type({received}) mismatch input_type({})", input.input_type.name()),
                    extra(vec![
                        ("input_name", OValue::str(x)),
                        ("input_config", input.input_config()),
                        ("received_type", OValue::str(received.clone())),
                        ("linked_node", raw.clone()),
                    ]),
                ));
                continue;
            }
            match validate_inputs(ctx, &o_id, depth + 1) {
                Ok(r) if !r.valid => valid = false,
                Ok(_) => {}
                Err(ex) => {
                    valid = false;
                    let reasons = vec![error_entry(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        ex.message.clone(),
                        extra(vec![
                            ("input_name", OValue::str(x)),
                            ("input_config", input.input_config()),
                            ("exception_message", OValue::str(ex.message.clone())),
                            ("exception_type", OValue::str(ex.type_name)),
                            ("traceback", ex.traceback()),
                            ("linked_node", raw.clone()),
                        ]),
                    )];
                    ctx.set_verdict(&o_id, NodeVerdict { valid: false, errors: reasons });
                }
            }
            continue;
        }

        let mut val = raw.clone();
        if let Some(inner) = raw.get("__value__") {
            val = inner.clone();
            converted.push((x.to_string(), val.clone()));
        }
        match convert(&val, input.input_type.name()) {
            Ok(Some(v)) => {
                val = v;
                converted.push((x.to_string(), val.clone()));
            }
            Ok(None) => {}
            Err(msg) => {
                errors.push(error_entry(
                    "invalid_input_type",
                    format!("Failed to convert an input value to a {} value", input.input_type.name()),
                    format!("{x}, {}, {msg}", val.py_str()),
                    extra(vec![
                        ("input_name", OValue::str(x)),
                        ("input_config", input.input_config()),
                        ("received_value", val.clone()),
                        ("exception_message", OValue::str(msg)),
                    ]),
                ));
                continue;
            }
        }
        if custom_validated.contains(&x) {
            continue;
        }
        if let Some(err) = range_error(x, &val, input) {
            errors.push(err);
            continue;
        }
        if let InputType::Combo(options) = &input.input_type
            && !options.iter().any(|o| py_eq(o, &val))
        {
            let (list_info, input_config) = if options.len() > 20 {
                (format!("(list of length {})", options.len()), OValue::Null)
            } else {
                (OValue::Array(options.clone()).py_repr(), input.input_config())
            };
            errors.push(error_entry(
                "value_not_in_list",
                "Value not in list",
                format!("{x}: '{}' not in {list_info}", val.py_str()),
                extra(vec![
                    ("input_name", OValue::str(x)),
                    ("input_config", input_config),
                    ("received_value", val.clone()),
                ]),
            ));
        }
    }

    // Store converted literals back into the prompt, as ComfyUI mutates `inputs[x]`.
    if let Some(node_inputs) = ctx
        .graph
        .get_mut(id)
        .and_then(|n| n.as_object_mut())
        .and_then(|m| m.get_mut("inputs").and_then(OValue::as_object_mut))
    {
        for (k, v) in converted {
            node_inputs.insert(k, v);
        }
    }

    for &name in custom_validated {
        if let Some(value) = inputs.get(name).filter(|v| !matches!(v, OValue::Array(_))) {
            let text = value.py_str();
            let exists =
                files::resolve_annotated(ctx.dirs, &text, default_dir(&class_type)).is_some_and(|p| p.exists());
            if !exists {
                errors.push(error_entry(
                    "custom_validation_failed",
                    "Custom validation failed for node",
                    format!("{name} - Invalid image file: {text}"),
                    extra(vec![("input_name", OValue::str(name))]),
                ));
            }
        }
    }

    let verdict = NodeVerdict { valid: valid && errors.is_empty(), errors };
    ctx.set_verdict(id, verdict.clone());
    Ok(verdict)
}

fn default_dir(class_type: &str) -> &'static str {
    if class_type == "LoadImageOutput" { "output" } else { "input" }
}

/// Python equality between JSON scalars (`1 == 1.0`, `True == 1`).
fn py_eq(a: &OValue, b: &OValue) -> bool {
    let num = |v: &OValue| match v {
        OValue::Number(n) => n.as_f64(),
        OValue::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The literal conversions of `validate_inputs`. `Ok(None)` means the value is kept as is.
pub fn convert(val: &OValue, input_type: &str) -> Result<Option<OValue>, String> {
    match input_type {
        "INT" => py_int(val).map(|i| Some(int_value(i))),
        "FLOAT" => py_float_of(val).map(|f| Some(float_value(f))),
        "STRING" => Ok(Some(OValue::String(val.py_str()))),
        "BOOLEAN" => Ok(Some(OValue::Bool(val.truthy()))),
        _ => Ok(None),
    }
}

fn int_value(i: i128) -> OValue {
    if let Ok(v) = i64::try_from(i) {
        OValue::Number(v.into())
    } else if let Ok(v) = u64::try_from(i) {
        OValue::Number(v.into())
    } else {
        serde_json::Number::from_f64(i as f64).map_or(OValue::Null, OValue::Number)
    }
}

fn float_value(f: f64) -> OValue {
    serde_json::Number::from_f64(f).map_or(OValue::Null, OValue::Number)
}

/// Python `int(x)`.
fn py_int(val: &OValue) -> Result<i128, String> {
    match val {
        OValue::Bool(b) => Ok(i128::from(*b)),
        OValue::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i128::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(i128::from(u))
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                if f.is_finite() {
                    Ok(f.trunc() as i128)
                } else {
                    Err("cannot convert float infinity to integer".into())
                }
            }
        }
        OValue::String(s) => {
            let t = s.trim().replace('_', "");
            t.parse::<i128>().map_err(|_| format!("invalid literal for int() with base 10: {}", py_str_repr(s)))
        }
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            other.py_type_name()
        )),
    }
}

/// Python `float(x)`.
fn py_float_of(val: &OValue) -> Result<f64, String> {
    match val {
        OValue::Bool(b) => Ok(f64::from(u8::from(*b))),
        OValue::Number(n) => Ok(n.as_f64().unwrap_or(0.0)),
        OValue::String(s) => {
            let t = s.trim().to_ascii_lowercase();
            match t.as_str() {
                "inf" | "+inf" | "infinity" | "+infinity" => Ok(f64::INFINITY),
                "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
                "nan" | "+nan" | "-nan" => Ok(f64::NAN),
                _ => t
                    .replace('_', "")
                    .parse::<f64>()
                    .map_err(|_| format!("could not convert string to float: {}", py_str_repr(s))),
            }
        }
        other => Err(format!("float() argument must be a string or a real number, not '{}'", other.py_type_name())),
    }
}

fn as_f64(v: &OValue) -> Option<f64> {
    match v {
        OValue::Number(n) => n.as_f64(),
        OValue::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn range_error(x: &str, val: &OValue, input: &InputSpec) -> Option<OValue> {
    let v = as_f64(val)?;
    let show = |v: &OValue| match v {
        OValue::Number(n) => py_number(n),
        OValue::Bool(true) => "True".to_string(),
        OValue::Bool(false) => "False".to_string(),
        other => other.py_str(),
    };
    let bound_text = |n: &serde_json::Number| {
        if matches!(input.input_type.name(), "FLOAT") && !n.is_f64() {
            py_float(n.as_f64().unwrap_or(0.0))
        } else {
            py_number(n)
        }
    };
    if let Some(min) = input.bound("min")
        && min.as_f64().is_some_and(|m| v < m)
    {
        return Some(error_entry(
            "value_smaller_than_min",
            format!("Value {} smaller than min of {}", show(val), bound_text(min)),
            x,
            extra(vec![
                ("input_name", OValue::str(x)),
                ("input_config", input.input_config()),
                ("received_value", val.clone()),
            ]),
        ));
    }
    if let Some(max) = input.bound("max")
        && max.as_f64().is_some_and(|m| v > m)
    {
        return Some(error_entry(
            "value_bigger_than_max",
            format!("Value {} bigger than max of {}", show(val), bound_text(max)),
            x,
            extra(vec![
                ("input_name", OValue::str(x)),
                ("input_config", input.input_config()),
                ("received_value", val.clone()),
            ]),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_follow_python() {
        assert_eq!(convert(&OValue::str(" 12 "), "INT"), Ok(Some(OValue::Number(12.into()))));
        assert_eq!(convert(&OValue::str("abc"), "FLOAT"), Err("could not convert string to float: 'abc'".to_string()));
        assert_eq!(convert(&OValue::Null, "STRING"), Ok(Some(OValue::str("None"))));
        assert_eq!(convert(&OValue::str("false"), "BOOLEAN"), Ok(Some(OValue::Bool(true))));
        assert_eq!(
            convert(&OValue::Number(serde_json::Number::from_f64(3.7).expect("finite")), "INT"),
            Ok(Some(OValue::Number(3.into())))
        );
    }
}
