//! Typed ComfyUI WebSocket events: parses JSON text frames (`{"type": …, "data": …}`) and binary
//! preview/text frames (types 1, 3 and 4) into [`ComfyEvent`].
//!
//! Parsing is lenient the way ComfyUI evolves: unknown event types become
//! [`ComfyEvent::Unknown`], unknown fields are ignored, and `prompt_id` is optional everywhere
//! (a reconnect replays `executing` without one).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::outputs::NodeOutput;

/// One message received on `/ws`.
#[derive(Debug, Clone, PartialEq)]
pub enum ComfyEvent {
    /// Queue size changed (broadcast to every socket); `sid` is set only in the first frame.
    Status {
        /// Pending + running prompts, if reported.
        queue_remaining: Option<u64>,
        /// The socket's client id (first frame after connecting).
        sid: Option<String>,
    },
    /// A prompt started executing.
    ExecutionStart {
        /// The prompt.
        prompt_id: Option<String>,
    },
    /// Nodes whose outputs are reused from the cache and will not run.
    ExecutionCached {
        /// The prompt.
        prompt_id: Option<String>,
        /// Cached node ids.
        nodes: Vec<String>,
    },
    /// A node is about to run; `node: None` means the prompt is over (whatever the result).
    Executing {
        /// The prompt (absent in the frame replayed after a reconnect).
        prompt_id: Option<String>,
        /// The node, or `None` when the prompt finished.
        node: Option<String>,
        /// The node shown in the UI (differs from `node` inside subgraphs).
        display_node: Option<String>,
    },
    /// A node's progress bar moved (sampler steps, tiles, …).
    Progress {
        /// The prompt.
        prompt_id: Option<String>,
        /// The node reporting progress.
        node: Option<String>,
        /// Current step.
        value: f64,
        /// Total steps.
        max: f64,
    },
    /// Cumulative per-node progress snapshot of a prompt.
    ProgressState {
        /// The prompt.
        prompt_id: Option<String>,
        /// Every non-pending node with its state.
        nodes: BTreeMap<String, NodeProgress>,
    },
    /// A node finished with a UI result (also sent for cached output nodes).
    Executed {
        /// The prompt.
        prompt_id: Option<String>,
        /// The node.
        node: String,
        /// Its UI output (`null` on the wire becomes `None`).
        output: Option<NodeOutput>,
    },
    /// The prompt finished without error.
    ExecutionSuccess {
        /// The prompt.
        prompt_id: Option<String>,
    },
    /// A node raised an exception; the prompt is aborted.
    ExecutionError(ExecutionErrorInfo),
    /// The prompt was interrupted.
    ExecutionInterrupted(InterruptInfo),
    /// The server's reply to our `feature_flags` handshake.
    FeatureFlags(serde_json::Map<String, Value>),
    /// A preview image (binary frame type 1 or 4).
    Preview(PreviewImage),
    /// A node's progress text (binary frame type 3).
    ProgressText {
        /// The node.
        node_id: String,
        /// The text.
        text: String,
    },
    /// An event type this client does not know (custom nodes send their own).
    Unknown {
        /// The `type` field, or `binary:<n>` for an unknown binary frame type.
        kind: String,
    },
}

impl ComfyEvent {
    /// The prompt this event belongs to, when the event says so.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            Self::ExecutionStart { prompt_id }
            | Self::ExecutionCached { prompt_id, .. }
            | Self::Executing { prompt_id, .. }
            | Self::Progress { prompt_id, .. }
            | Self::ProgressState { prompt_id, .. }
            | Self::Executed { prompt_id, .. }
            | Self::ExecutionSuccess { prompt_id } => prompt_id.as_deref(),
            Self::ExecutionError(info) => info.prompt_id.as_deref(),
            Self::ExecutionInterrupted(info) => info.prompt_id.as_deref(),
            Self::Preview(preview) => preview.meta.as_ref().and_then(|m| m.prompt_id.as_deref()),
            Self::Status { .. } | Self::FeatureFlags(_) | Self::ProgressText { .. } | Self::Unknown { .. } => None,
        }
    }

    /// Parses a JSON text frame.
    pub fn from_text(text: &str) -> Result<Self, EventParseError> {
        let envelope: Envelope = serde_json::from_str(text).map_err(|e| EventParseError::Json(e.to_string()))?;
        let Envelope { kind, data } = envelope;
        let bad = |e: serde_json::Error| EventParseError::Data { kind: kind.clone(), reason: e.to_string() };
        let event = match kind.as_str() {
            "status" => {
                let d: StatusData = serde_json::from_value(data).map_err(bad)?;
                Self::Status {
                    queue_remaining: d.status.and_then(|s| s.exec_info).and_then(|e| e.queue_remaining),
                    sid: d.sid,
                }
            }
            "execution_start" => {
                let d: PromptOnly = serde_json::from_value(data).map_err(bad)?;
                Self::ExecutionStart { prompt_id: d.prompt_id }
            }
            "execution_cached" => {
                let d: CachedData = serde_json::from_value(data).map_err(bad)?;
                Self::ExecutionCached { prompt_id: d.prompt_id, nodes: d.nodes.into_iter().map(id_string).collect() }
            }
            "executing" => {
                let d: ExecutingData = serde_json::from_value(data).map_err(bad)?;
                Self::Executing {
                    prompt_id: d.prompt_id,
                    node: d.node.and_then(opt_id_string),
                    display_node: d.display_node.and_then(opt_id_string),
                }
            }
            "progress" => {
                let d: ProgressData = serde_json::from_value(data).map_err(bad)?;
                Self::Progress {
                    prompt_id: d.prompt_id,
                    node: d.node.and_then(opt_id_string),
                    value: d.value,
                    max: d.max,
                }
            }
            "progress_state" => {
                let d: ProgressStateData = serde_json::from_value(data).map_err(bad)?;
                Self::ProgressState { prompt_id: d.prompt_id, nodes: d.nodes }
            }
            "executed" => {
                let d: ExecutedData = serde_json::from_value(data).map_err(bad)?;
                Self::Executed { prompt_id: d.prompt_id, node: id_string(d.node), output: d.output }
            }
            "execution_success" => {
                let d: PromptOnly = serde_json::from_value(data).map_err(bad)?;
                Self::ExecutionSuccess { prompt_id: d.prompt_id }
            }
            "execution_error" => Self::ExecutionError(ExecutionErrorInfo::from_value(&data).map_err(bad)?),
            "execution_interrupted" => Self::ExecutionInterrupted(InterruptInfo::from_value(&data).map_err(bad)?),
            "feature_flags" => match data {
                Value::Object(map) => Self::FeatureFlags(map),
                _ => Self::FeatureFlags(serde_json::Map::new()),
            },
            _ => Self::Unknown { kind },
        };
        Ok(event)
    }

    /// Parses a binary frame: `[u32 type][payload]`, big-endian.
    pub fn from_binary(frame: &Bytes) -> Result<Self, EventParseError> {
        let kind = read_u32(frame, 0).ok_or(EventParseError::ShortBinary(frame.len()))?;
        match kind {
            // [u32 1][u32 image_type: 1=JPEG 2=PNG][image]
            1 => {
                let image_type = read_u32(frame, 4).ok_or(EventParseError::ShortBinary(frame.len()))?;
                let format = match image_type {
                    1 => PreviewFormat::Jpeg,
                    2 => PreviewFormat::Png,
                    other => PreviewFormat::Other(format!("image-type-{other}")),
                };
                Ok(Self::Preview(PreviewImage { format, meta: None, image: frame.slice(8..) }))
            }
            // [u32 3][u32 node_id_len][node_id][text]
            3 => {
                let len = read_u32(frame, 4).ok_or(EventParseError::ShortBinary(frame.len()))? as usize;
                let end = 8usize.checked_add(len).filter(|end| *end <= frame.len());
                let end = end.ok_or(EventParseError::ShortBinary(frame.len()))?;
                Ok(Self::ProgressText {
                    node_id: String::from_utf8_lossy(&frame[8..end]).into_owned(),
                    text: String::from_utf8_lossy(&frame[end..]).into_owned(),
                })
            }
            // [u32 4][u32 meta_len][meta JSON][image]
            4 => {
                let len = read_u32(frame, 4).ok_or(EventParseError::ShortBinary(frame.len()))? as usize;
                let end = 8usize.checked_add(len).filter(|end| *end <= frame.len());
                let end = end.ok_or(EventParseError::ShortBinary(frame.len()))?;
                let meta: PreviewMeta = serde_json::from_slice(&frame[8..end])
                    .map_err(|e| EventParseError::Data { kind: "binary:4".to_owned(), reason: e.to_string() })?;
                let format = match meta.image_type.as_deref() {
                    Some("image/jpeg") => PreviewFormat::Jpeg,
                    Some("image/png") => PreviewFormat::Png,
                    Some(other) => PreviewFormat::Other(other.to_owned()),
                    None => PreviewFormat::Other("unknown".to_owned()),
                };
                Ok(Self::Preview(PreviewImage { format, meta: Some(meta), image: frame.slice(end..) }))
            }
            other => Ok(Self::Unknown { kind: format!("binary:{other}") }),
        }
    }
}

/// State of one node inside a `progress_state` snapshot.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NodeProgress {
    /// Current value.
    #[serde(default)]
    pub value: f64,
    /// Maximum value.
    #[serde(default)]
    pub max: f64,
    /// `running`, `finished`, `error` (kept as text: newer versions may add states).
    #[serde(default)]
    pub state: String,
    /// What the node is busy with besides steps, e.g. `loading` a model (C7).
    #[serde(default, deserialize_with = "de_opt_id")]
    pub activity: Option<String>,
    /// The node shown in the UI (a subgraph's node for the nodes inside it, C12).
    #[serde(default, deserialize_with = "de_opt_id")]
    pub display_node_id: Option<String>,
    /// The subgraph or loop node this one runs inside.
    #[serde(default, deserialize_with = "de_opt_id")]
    pub parent_node_id: Option<String>,
    /// The node of the submitted graph this (possibly expanded) node comes from.
    #[serde(default, deserialize_with = "de_opt_id")]
    pub real_node_id: Option<String>,
}

/// The payload of `execution_error` (also stored as the last history status message).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecutionErrorInfo {
    /// The prompt.
    pub prompt_id: Option<String>,
    /// The node that raised.
    pub node_id: Option<String>,
    /// Its class type.
    pub node_type: Option<String>,
    /// Python exception type, e.g. `torch.OutOfMemoryError`.
    pub exception_type: String,
    /// Exception message (trailing newline removed).
    pub exception_message: String,
    /// Traceback lines.
    pub traceback: Vec<String>,
    /// Nodes that ran in this prompt before the error.
    pub executed: Vec<String>,
}

impl ExecutionErrorInfo {
    /// Reads the payload leniently from its JSON object.
    pub fn from_value(data: &Value) -> Result<Self, serde_json::Error> {
        let raw: RawError = serde_json::from_value(data.clone())?;
        let traceback = match raw.traceback {
            Value::Array(lines) => lines.iter().filter_map(|l| l.as_str().map(str::to_owned)).collect(),
            Value::String(text) => vec![text],
            _ => Vec::new(),
        };
        Ok(Self {
            prompt_id: raw.prompt_id,
            node_id: raw.node_id.and_then(opt_id_string),
            node_type: raw.node_type,
            exception_type: raw.exception_type.unwrap_or_default(),
            exception_message: raw.exception_message.unwrap_or_default().trim_end().to_owned(),
            traceback,
            executed: raw.executed.into_iter().map(id_string).collect(),
        })
    }

    /// One line for logs and job errors: `LoadImage (node 1) raised PIL.UnidentifiedImageError: …`.
    pub fn summary(&self) -> String {
        let node_type = self.node_type.as_deref().unwrap_or("unknown node");
        let node_id = self.node_id.as_deref().unwrap_or("?");
        let exception = if self.exception_type.is_empty() { "an error" } else { &self.exception_type };
        if self.exception_message.is_empty() {
            format!("{node_type} (node {node_id}) raised {exception}")
        } else {
            format!("{node_type} (node {node_id}) raised {exception}: {}", self.exception_message)
        }
    }
}

/// The payload of `execution_interrupted`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InterruptInfo {
    /// The prompt.
    pub prompt_id: Option<String>,
    /// The node that was running.
    pub node_id: Option<String>,
    /// Its class type.
    pub node_type: Option<String>,
    /// Nodes that ran before the interrupt.
    pub executed: Vec<String>,
}

impl InterruptInfo {
    /// Reads the payload leniently from its JSON object.
    pub fn from_value(data: &Value) -> Result<Self, serde_json::Error> {
        let raw: RawInterrupt = serde_json::from_value(data.clone())?;
        Ok(Self {
            prompt_id: raw.prompt_id,
            node_id: raw.node_id.and_then(opt_id_string),
            node_type: raw.node_type,
            executed: raw.executed.into_iter().map(id_string).collect(),
        })
    }
}

/// A preview image frame.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewImage {
    /// Encoding of `image`.
    pub format: PreviewFormat,
    /// Node/prompt metadata (only in type-4 frames, i.e. when `supports_preview_metadata` was
    /// negotiated).
    pub meta: Option<PreviewMeta>,
    /// The encoded image bytes.
    pub image: Bytes,
}

/// Image encoding of a preview frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreviewFormat {
    /// JPEG (sampler previews).
    Jpeg,
    /// PNG (e.g. SaveImageWebsocket).
    Png,
    /// Anything else, with its MIME type or numeric code.
    Other(String),
}

impl PreviewFormat {
    /// MIME type for serving the image.
    pub fn mime(&self) -> &str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Other(other) if other.contains('/') => other,
            Self::Other(_) => "application/octet-stream",
        }
    }
}

/// Metadata of a type-4 preview frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PreviewMeta {
    /// The node producing the preview.
    #[serde(default, deserialize_with = "de_opt_id")]
    pub node_id: Option<String>,
    /// The prompt.
    #[serde(default)]
    pub prompt_id: Option<String>,
    /// The node shown in the UI.
    #[serde(default, deserialize_with = "de_opt_id")]
    pub display_node_id: Option<String>,
    /// MIME type of the image.
    #[serde(default)]
    pub image_type: Option<String>,
}

/// A frame that could not be parsed (the socket logs and skips it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventParseError {
    /// Not JSON, or no `type` field.
    #[error("malformed event frame: {0}")]
    Json(String),
    /// A known event type with a payload of the wrong shape.
    #[error("malformed {kind} event: {reason}")]
    Data {
        /// The event type.
        kind: String,
        /// What was wrong.
        reason: String,
    },
    /// A binary frame shorter than its header says.
    #[error("binary frame too short ({0} bytes)")]
    ShortBinary(usize),
}

fn read_u32(frame: &[u8], at: usize) -> Option<u32> {
    let bytes = frame.get(at..at + 4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Node ids are strings on the wire, but tolerate numbers from hand-written or odd servers.
fn id_string(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn opt_id_string(value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        other => Some(id_string(other)),
    }
}

fn de_opt_id<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Value>::deserialize(deserializer)?.and_then(opt_id_string))
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct StatusData {
    #[serde(default)]
    status: Option<StatusInner>,
    #[serde(default)]
    sid: Option<String>,
}

#[derive(Deserialize)]
struct StatusInner {
    #[serde(default)]
    exec_info: Option<ExecInfo>,
}

#[derive(Deserialize)]
struct ExecInfo {
    #[serde(default)]
    queue_remaining: Option<u64>,
}

#[derive(Deserialize)]
struct PromptOnly {
    #[serde(default)]
    prompt_id: Option<String>,
}

#[derive(Deserialize)]
struct CachedData {
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    nodes: Vec<Value>,
}

#[derive(Deserialize)]
struct ExecutingData {
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    node: Option<Value>,
    #[serde(default)]
    display_node: Option<Value>,
}

#[derive(Deserialize)]
struct ProgressData {
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    node: Option<Value>,
    value: f64,
    max: f64,
}

#[derive(Deserialize)]
struct ProgressStateData {
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    nodes: BTreeMap<String, NodeProgress>,
}

#[derive(Deserialize)]
struct ExecutedData {
    #[serde(default)]
    prompt_id: Option<String>,
    node: Value,
    #[serde(default)]
    output: Option<NodeOutput>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    node_id: Option<Value>,
    #[serde(default)]
    node_type: Option<String>,
    #[serde(default)]
    exception_type: Option<String>,
    #[serde(default)]
    exception_message: Option<String>,
    #[serde(default)]
    traceback: Value,
    #[serde(default)]
    executed: Vec<Value>,
}

#[derive(Deserialize)]
struct RawInterrupt {
    #[serde(default)]
    prompt_id: Option<String>,
    #[serde(default)]
    node_id: Option<Value>,
    #[serde(default)]
    node_type: Option<String>,
    #[serde(default)]
    executed: Vec<Value>,
}
