//! Errors at the ComfyUI boundary ([`ComfyError`]) and the readable validation report built from
//! `POST /prompt` rejections ([`ValidationReport`]).

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::outputs::natural_cmp;

/// Anything that can go wrong talking to one ComfyUI server.
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    /// No connection could be made (refused, DNS failure, connect timeout): the server is down
    /// or the address is wrong. The request was never received.
    #[error("ComfyUI at {endpoint} is unreachable: {reason}")]
    Unreachable {
        /// Server base URL.
        endpoint: String,
        /// Underlying error.
        reason: String,
    },
    /// The request was sent but no complete answer arrived in time; the server may have acted on it.
    #[error("ComfyUI at {endpoint} did not answer {route} in time")]
    Timeout {
        /// Server base URL.
        endpoint: String,
        /// Route, e.g. `prompt`.
        route: String,
    },
    /// The connection broke mid-request or mid-body.
    #[error("transport error talking to ComfyUI at {endpoint} ({route}): {reason}")]
    Transport {
        /// Server base URL.
        endpoint: String,
        /// Route.
        route: String,
        /// Underlying error.
        reason: String,
    },
    /// The prompt was rejected by ComfyUI's validator (HTTP 400, or 200 with `node_errors`).
    #[error("ComfyUI rejected the prompt: {0}")]
    Validation(ValidationReport),
    /// The file asked for does not exist on the server (`/view` 404).
    #[error("ComfyUI has no file for {route}")]
    NotFound {
        /// Route with query.
        route: String,
    },
    /// Any other unexpected HTTP status.
    #[error("ComfyUI answered HTTP {status} to {route}{}", body_suffix(.body))]
    Status {
        /// Route.
        route: String,
        /// HTTP status code.
        status: u16,
        /// Start of the response body (ComfyUI usually sends none).
        body: String,
    },
    /// A 2xx answer we cannot interpret.
    #[error("unexpected answer from ComfyUI to {route}: {reason}")]
    Protocol {
        /// Route.
        route: String,
        /// What was wrong.
        reason: String,
    },
    /// The WebSocket could not be opened or broke.
    #[error("ComfyUI WebSocket at {endpoint}: {reason}")]
    WebSocket {
        /// Server base URL.
        endpoint: String,
        /// What happened.
        reason: String,
    },
    /// Reading a local file to upload failed.
    #[error("cannot read upload source {path}: {source}")]
    UploadSource {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The caller passed something ComfyUI cannot accept (e.g. a non-object graph).
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// ComfyUI (or the proxy in front of it) answered 401: the token is missing or wrong.
    /// Retrying cannot help until `COMFYUI_TOKEN` is fixed.
    #[error("ComfyUI at {endpoint} {}", if *.token_sent { "refused the token (COMFYUI_TOKEN)" } else { "requires a token: set COMFYUI_TOKEN" })]
    Unauthorized {
        /// Server base URL.
        endpoint: String,
        /// Whether a token was sent.
        token_sent: bool,
    },
    /// A file is larger than the server accepts (its `max_upload_size`, or a 413 answer).
    #[error("{size} bytes is over the upload limit of ComfyUI at {endpoint}{}", upload_limit(.limit))]
    UploadTooLarge {
        /// Server base URL.
        endpoint: String,
        /// Size of the file in bytes.
        size: u64,
        /// The server's limit in bytes, when it said.
        limit: Option<u64>,
    },
}

fn upload_limit(limit: &Option<u64>) -> String {
    match limit {
        Some(limit) => format!(" (max_upload_size {limit} bytes)"),
        None => " (HTTP 413)".to_owned(),
    }
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() { String::new() } else { format!(": {body}") }
}

impl ComfyError {
    /// True when the server could not be reached at all (the request never arrived).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    /// True when a request may or may not have reached the server (timeouts, broken
    /// connections): callers must check state before repeating a non-idempotent call.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Transport { .. })
    }

    /// True for failures that may go away by retrying later (network trouble, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::Transport { .. } | Self::WebSocket { .. } => true,
            Self::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }

    pub(crate) fn from_reqwest(endpoint: &str, route: &str, error: reqwest::Error) -> Self {
        let reason = error_chain(&error);
        if error.is_connect() {
            Self::Unreachable { endpoint: endpoint.to_owned(), reason }
        } else if error.is_timeout() {
            Self::Timeout { endpoint: endpoint.to_owned(), route: route.to_owned() }
        } else {
            Self::Transport { endpoint: endpoint.to_owned(), route: route.to_owned(), reason }
        }
    }
}

/// Renders an error with its sources, because reqwest's top-level message alone ("error sending
/// request") hides the useful part ("connection refused").
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// Why ComfyUI refused a prompt, in a form a TouchDesigner user can act on.
///
/// `Display` names each node id, class type, input and message, e.g.
/// `node 44 (CheckpointLoaderSimple): ckpt_name: 'x.safetensors' not in []`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationReport {
    /// HTTP status of the rejection (400, or 200 for a partially accepted prompt).
    pub http_status: u16,
    /// Top-level error type (`prompt_outputs_failed_validation`, `invalid_prompt`,
    /// `missing_node_type`, …); `node_errors` for a 200 with node errors.
    pub error_type: String,
    /// Top-level message.
    pub message: String,
    /// Top-level details (often empty).
    pub details: String,
    /// Per-node errors, in natural node-id order.
    pub nodes: Vec<NodeValidationErrors>,
    /// True when ComfyUI had queued the valid part of the graph anyway (200 with `node_errors`);
    /// the client deletes/interrupts it before reporting.
    pub partially_queued: bool,
    /// The node a top-level error names (`missing_node_type` carries
    /// `extra_info{node_id, class_type, node_title}`, C11).
    /// Boxed: it is rare, and `ComfyError` carries the report by value.
    pub node: Option<Box<NodeRef>>,
}

/// A node named by a top-level validation error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRef {
    /// Node id in the graph.
    pub node_id: String,
    /// Its class type (may be empty: a node without `class_type` is a `missing_node_type` too).
    pub class_type: String,
    /// Its editor title, when known.
    pub title: Option<String>,
}

/// `node <id> (<class>)`, with `, title "<title>"` when the node has a title other than its class.
fn node_label(node_id: &str, class_type: &str, title: Option<&str>) -> String {
    let class = if class_type.is_empty() { "unknown class" } else { class_type };
    match title.map(str::trim).filter(|t| !t.is_empty() && *t != class_type) {
        Some(title) => format!("node {node_id} ({class}, title {title:?})"),
        None => format!("node {node_id} ({class})"),
    }
}

/// Newer ComfyUI wraps list widget values as `{"__value__": [...]}` (C11); the wrapped value is
/// what the user set.
fn unwrap_value(value: Value) -> Value {
    match value {
        Value::Object(mut map) if map.len() == 1 && map.contains_key("__value__") => {
            map.remove("__value__").unwrap_or(Value::Null)
        }
        other => other,
    }
}

/// The validation errors of one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeValidationErrors {
    /// Node id in the graph.
    pub node_id: String,
    /// Its class type.
    pub class_type: String,
    /// Its title in the ComfyUI editor (`_meta.title` of the submitted graph, or ComfyUI's
    /// `node_title`), when it has one.
    pub title: Option<String>,
    /// Output nodes that depend on it.
    pub dependent_outputs: Vec<String>,
    /// The errors.
    pub errors: Vec<InputValidationError>,
}

/// One validation error of one node input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputValidationError {
    /// Error type (`value_not_in_list`, `required_input_missing`, …).
    pub error_type: String,
    /// Generic message.
    pub message: String,
    /// Specific details (usually names the input and value).
    pub details: String,
    /// The input concerned, when known.
    pub input_name: Option<String>,
    /// The rejected value, when reported.
    pub received_value: Option<Value>,
}

impl InputValidationError {
    /// `input: what is wrong`, without repeating the input name twice.
    pub fn describe(&self) -> String {
        let details = self.details.trim();
        let message = self.message.trim();
        match self.input_name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => {
                // ComfyUI usually prefixes details with the input: "ckpt_name: 'x' not in []",
                // "image - Invalid image file: x.png", "fps, abc, could not convert …".
                if let Some(rest) = details.strip_prefix(name) {
                    if let Some(rest) = rest.strip_prefix(": ").or_else(|| rest.strip_prefix(" - "))
                        && !rest.trim().is_empty()
                    {
                        return format!("{name}: {}", rest.trim());
                    }
                    if let Some(rest) = rest.strip_prefix(", ")
                        && !rest.trim().is_empty()
                    {
                        return format!("{name}: {message} ({})", rest.trim());
                    }
                }
                if details.is_empty() || details == name {
                    format!("{name}: {message}")
                } else {
                    format!("{name}: {message} ({details})")
                }
            }
            None if details.is_empty() || details == message => match &self.received_value {
                // A check without details (custom validation, dynamic inputs) still names the value.
                Some(value) if !value.is_null() => format!("{message} (got {value})"),
                _ => message.to_owned(),
            },
            None => format!("{message}: {details}"),
        }
    }
}

impl ValidationReport {
    /// Builds a report from a `POST /prompt` body (`{"error": {...}, "node_errors": {...}}`), or
    /// `None` if the body has neither.
    pub fn from_body(http_status: u16, body: &Value) -> Option<Self> {
        let error = body.get("error").filter(|e| !e.is_null());
        let node_errors = body.get("node_errors").and_then(Value::as_object);
        let has_node_errors = node_errors.is_some_and(|n| !n.is_empty());
        if error.is_none() && !has_node_errors {
            return None;
        }
        let text = |v: Option<&Value>, key: &str| -> String {
            match v.and_then(|v| v.get(key)) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            }
        };
        // Some servers send `"error": "text"` instead of an object.
        let (error_type, message, details) = match error {
            Some(Value::String(message)) => (String::new(), message.clone(), String::new()),
            Some(error) => (text(Some(error), "type"), text(Some(error), "message"), text(Some(error), "details")),
            None => ("node_errors".to_owned(), String::new(), String::new()),
        };
        let mut nodes: Vec<NodeValidationErrors> = node_errors
            .map(|map| {
                map.iter()
                    .map(|(node_id, node)| NodeValidationErrors {
                        node_id: node_id.clone(),
                        class_type: text(Some(node), "class_type"),
                        title: node
                            .get("node_title")
                            .or_else(|| node.pointer("/_meta/title"))
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        dependent_outputs: node
                            .get("dependent_outputs")
                            .and_then(Value::as_array)
                            .map(|ids| ids.iter().filter_map(|id| id.as_str().map(str::to_owned)).collect())
                            .unwrap_or_default(),
                        errors: node
                            .get("errors")
                            .and_then(Value::as_array)
                            .map(|errors| {
                                errors
                                    .iter()
                                    .map(|e| InputValidationError {
                                        error_type: text(Some(e), "type"),
                                        message: text(Some(e), "message"),
                                        details: text(Some(e), "details"),
                                        input_name: e
                                            .get("extra_info")
                                            .and_then(|x| x.get("input_name"))
                                            .and_then(Value::as_str)
                                            .map(str::to_owned),
                                        received_value: e
                                            .get("extra_info")
                                            .and_then(|x| x.get("received_value"))
                                            .cloned()
                                            .map(unwrap_value),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        nodes.sort_by(|a, b| natural_cmp(&a.node_id, &b.node_id));
        let node = error.and_then(|e| e.get("extra_info")).and_then(|info| {
            let node_id = match info.get("node_id")? {
                Value::String(id) => id.clone(),
                Value::Null => return None,
                other => other.to_string(),
            };
            Some(Box::new(NodeRef {
                node_id,
                class_type: text(Some(info), "class_type"),
                title: info.get("node_title").and_then(Value::as_str).map(str::to_owned),
            }))
        });
        Some(Self { http_status, error_type, message, details, nodes, partially_queued: false, node })
    }

    /// Fills in node titles (and a class type ComfyUI left out) from the submitted graph, since
    /// ComfyUI's `node_errors` name nodes only by id and class.
    pub fn name_nodes_from(&mut self, graph: &Value) {
        let title = |id: &str| graph.get(id)?.pointer("/_meta/title")?.as_str().map(str::to_owned);
        let class = |id: &str| graph.get(id)?.get("class_type")?.as_str().map(str::to_owned);
        for node in &mut self.nodes {
            if node.title.is_none() {
                node.title = title(&node.node_id);
            }
            if node.class_type.is_empty() {
                node.class_type = class(&node.node_id).unwrap_or_default();
            }
        }
        if let Some(node) = &mut self.node
            && node.title.is_none()
        {
            node.title = title(&node.node_id);
        }
    }

    /// One line per problem: `node <id> (<class>): <input>: <what>`.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for node in &self.nodes {
            let label = node_label(&node.node_id, &node.class_type, node.title.as_deref());
            if node.errors.is_empty() {
                lines.push(format!("{label}: invalid"));
            }
            for error in &node.errors {
                lines.push(format!("{label}: {}", error.describe()));
            }
        }
        if lines.is_empty() {
            let message = self.message.trim();
            let details = self.details.trim();
            let line = match (message.is_empty(), details.is_empty() || details == message) {
                (true, true) => format!("prompt rejected ({})", self.error_type),
                (true, false) => details.to_owned(),
                (false, true) => message.to_owned(),
                (false, false) => format!("{message} ({details})"),
            };
            // `missing_node_type` and friends name their node outside `node_errors` (C11).
            let line = match &self.node {
                Some(node) => format!("{}: {line}", node_label(&node.node_id, &node.class_type, node.title.as_deref())),
                None => line,
            };
            lines.push(line);
        }
        lines
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("; "))
    }
}
