//! Typed views of ComfyUI's HTTP JSON responses: `/history/{id}` entries and their outcome,
//! `/queue`, `/system_stats`, `/upload/image` and `POST /prompt`.
//!
//! All parsers are lenient (unknown fields ignored, odd items skipped) and never panic; they take
//! `serde_json::Value` so contract tests can feed captured bodies directly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::events::{ExecutionErrorInfo, InterruptInfo};
use crate::ids::PromptId;
use crate::outputs::{FolderType, NodeOutput, OutputFile, collect_outputs};

/// One finished prompt as stored in `/history` (entries only appear once a prompt is over).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// The prompt id (the key of the history object).
    pub prompt_id: String,
    /// UI outputs per node id, including cached output nodes.
    pub outputs: BTreeMap<String, NodeOutput>,
    /// Status block.
    pub status: HistoryStatus,
    /// Output node ids ComfyUI set out to execute (`prompt[4]`).
    pub output_node_ids: Vec<String>,
}

/// The `status` block of a history entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistoryStatus {
    /// `success` or `error` (interrupts are `error` too).
    pub status_str: String,
    /// True only on success.
    pub completed: bool,
    /// `(event type, payload)` of `execution_start`, `execution_cached` and the terminal event.
    pub messages: Vec<(String, Value)>,
}

impl HistoryStatus {
    /// Parses a history `status` block (`{status_str, completed, messages: [[type, payload]…]}`).
    pub fn from_value(status: &Value) -> Self {
        let Some(status) = status.as_object() else { return Self::default() };
        Self {
            status_str: status.get("status_str").and_then(Value::as_str).unwrap_or_default().to_owned(),
            completed: status.get("completed").and_then(Value::as_bool).unwrap_or(false),
            messages: status
                .get("messages")
                .and_then(Value::as_array)
                .map(|messages| {
                    messages
                        .iter()
                        .filter_map(|message| {
                            let pair = message.as_array()?;
                            let kind = pair.first()?.as_str()?.to_owned();
                            Some((kind, pair.get(1).cloned().unwrap_or(Value::Null)))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Where the jobs API (`GET /api/jobs/{id}`, C1) says a prompt is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobLookup {
    /// 404: the server does not know the prompt (never queued, or lost in a restart). Unlike
    /// `/history/{id}`'s `{}`, this is not also the answer for a running prompt.
    Unknown,
    /// `pending`: waiting in the queue.
    Pending,
    /// `in_progress`: executing.
    Running,
    /// `completed`, `failed` or `cancelled`, as a history entry (outputs and terminal message).
    Finished(HistoryEntry),
    /// A status this client does not know (kept verbatim; treated as "still there").
    Other(String),
}

impl JobLookup {
    /// Parses a job body (`{id, status, outputs?, execution_status?, execution_error?, …}`);
    /// `None` when it is not a job.
    pub fn from_job(prompt_id: &str, job: &Value) -> Option<Self> {
        let status = job.get("status")?.as_str()?;
        Some(match status {
            "pending" => Self::Pending,
            "in_progress" | "running" => Self::Running,
            "completed" | "failed" | "cancelled" => Self::Finished(HistoryEntry::from_job(prompt_id, status, job)),
            other => Self::Other(other.to_owned()),
        })
    }
}

impl HistoryEntry {
    /// A history entry from a finished job of the jobs API: its `outputs`, and its
    /// `execution_status` (the history status block) when present, else a status made from the
    /// job's `status` and `execution_error`.
    fn from_job(prompt_id: &str, status: &str, job: &Value) -> Self {
        let outputs = node_outputs(job.get("outputs"));
        let given = job.get("execution_status").map(HistoryStatus::from_value).filter(|s| !s.messages.is_empty());
        let status = given.unwrap_or_else(|| {
            let stamp = |key: &str| job.get(key).and_then(Value::as_u64);
            let mut messages = Vec::new();
            if let Some(start) = stamp("execution_start_time") {
                messages.push((
                    "execution_start".to_owned(),
                    serde_json::json!({"prompt_id": prompt_id, "timestamp": start}),
                ));
            }
            let mut end = serde_json::Map::new();
            end.insert("prompt_id".to_owned(), Value::from(prompt_id));
            if let Some(at) = stamp("execution_end_time") {
                end.insert("timestamp".to_owned(), Value::from(at));
            }
            let kind = match status {
                "completed" => "execution_success",
                "failed" => {
                    if let Some(Value::Object(error)) = job.get("execution_error") {
                        for (key, value) in error {
                            end.entry(key.clone()).or_insert_with(|| value.clone());
                        }
                    }
                    "execution_error"
                }
                _ => "execution_interrupted",
            };
            messages.push((kind.to_owned(), Value::Object(end)));
            HistoryStatus {
                status_str: if status == "completed" { "success" } else { "error" }.to_owned(),
                completed: status == "completed",
                messages,
            }
        });
        Self { prompt_id: prompt_id.to_owned(), outputs, status, output_node_ids: Vec::new() }
    }
}

/// The `outputs` object of a history entry or a finished job: one [`NodeOutput`] per node whose
/// value is an object (anything else carries no files and is skipped).
fn node_outputs(outputs: Option<&Value>) -> BTreeMap<String, NodeOutput> {
    match outputs {
        Some(Value::Object(map)) => map
            .iter()
            .filter_map(|(node, output)| match output {
                Value::Object(dict) => Some((node.clone(), NodeOutput(dict.clone()))),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// How a finished prompt ended, read from the last terminal status message.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryOutcome {
    /// `execution_success`.
    Success,
    /// `execution_error`, with its payload.
    Error(ExecutionErrorInfo),
    /// `execution_interrupted`, with its payload.
    Interrupted(InterruptInfo),
    /// No terminal message and not marked successful; `status_str` is reported verbatim.
    Unknown {
        /// The entry's `status_str`.
        status_str: String,
    },
}

impl HistoryEntry {
    /// Parses one entry (the value under the prompt id key).
    pub fn from_value(prompt_id: &str, entry: &Value) -> Option<Self> {
        let entry = entry.as_object()?;
        let outputs = node_outputs(entry.get("outputs"));
        let status = entry.get("status").map(HistoryStatus::from_value).unwrap_or_default();
        let output_node_ids = entry
            .get("prompt")
            .and_then(Value::as_array)
            .and_then(|tuple| tuple.get(4))
            .and_then(Value::as_array)
            .map(|ids| ids.iter().filter_map(|id| id.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        Some(Self { prompt_id: prompt_id.to_owned(), outputs, status, output_node_ids })
    }

    /// Extracts the entry for `prompt_id` from a `GET /history/{id}` body; `{}` means "not
    /// finished (or unknown)" and gives `None`.
    pub fn from_response(prompt_id: &str, body: &Value) -> Option<Self> {
        let map = body.as_object()?;
        let entry = map
            .get(prompt_id)
            .or_else(|| map.iter().find(|(key, _)| key.eq_ignore_ascii_case(prompt_id)).map(|(_, value)| value))?;
        Self::from_value(prompt_id, entry)
    }

    /// How the prompt ended. The last terminal message decides, because ComfyUI reports an
    /// interrupt as `status_str: "error"` too.
    pub fn outcome(&self) -> HistoryOutcome {
        for (kind, payload) in self.status.messages.iter().rev() {
            match kind.as_str() {
                "execution_success" => return HistoryOutcome::Success,
                "execution_error" => {
                    return HistoryOutcome::Error(ExecutionErrorInfo::from_value(payload).unwrap_or_default());
                }
                "execution_interrupted" => {
                    return HistoryOutcome::Interrupted(InterruptInfo::from_value(payload).unwrap_or_default());
                }
                _ => {}
            }
        }
        if self.status.status_str == "success" && self.status.completed {
            HistoryOutcome::Success
        } else {
            HistoryOutcome::Unknown { status_str: self.status.status_str.clone() }
        }
    }

    /// Node ids that were served from the cache in this prompt.
    pub fn cached_nodes(&self) -> Vec<String> {
        self.status
            .messages
            .iter()
            .filter(|(kind, _)| kind == "execution_cached")
            .filter_map(|(_, payload)| payload.get("nodes")?.as_array().cloned())
            .flatten()
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect()
    }

    /// ComfyUI's execution time: from the `execution_start` to the terminal message's timestamp.
    pub fn execution_time(&self) -> Option<std::time::Duration> {
        let stamp = |kind: &str| {
            self.status
                .messages
                .iter()
                .find(|(k, _)| k == kind)
                .and_then(|(_, payload)| payload.get("timestamp")?.as_u64())
        };
        let start = stamp("execution_start")?;
        let end = stamp("execution_success")
            .or_else(|| stamp("execution_error"))
            .or_else(|| stamp("execution_interrupted"))?;
        Some(std::time::Duration::from_millis(end.saturating_sub(start)))
    }

    /// Every output file of the prompt, classified.
    pub fn output_files(&self) -> Vec<OutputFile> {
        collect_outputs(self.outputs.iter().map(|(node, output)| (node.as_str(), output)))
    }
}

/// One item of `/queue`: `[number, prompt_id, graph, extra_data, outputs]`, of which we keep the
/// first two.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueItem {
    /// Queue priority (lower runs first; may be negative or fractional).
    pub number: f64,
    /// Prompt id as sent by whoever queued it (any string).
    pub prompt_id: String,
}

/// The server's queue.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct QueueState {
    /// The prompt(s) currently executing (at most one in stock ComfyUI).
    pub running: Vec<QueueItem>,
    /// Waiting prompts, sorted into execution order (the wire order is heap order).
    pub pending: Vec<QueueItem>,
}

/// Where a prompt is in [`QueueState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePosition {
    /// Currently executing.
    Running,
    /// Waiting; `position` 0 runs next.
    Pending {
        /// Index in execution order among pending prompts.
        position: usize,
    },
}

impl QueueState {
    /// Parses a `GET /queue` body, skipping malformed items.
    pub fn from_value(body: &Value) -> Self {
        let items = |key: &str| -> Vec<QueueItem> {
            body.get(key)
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|item| {
                            let tuple = item.as_array()?;
                            let number = tuple.first()?.as_f64()?;
                            let prompt_id = tuple.get(1)?.as_str()?.to_owned();
                            Some(QueueItem { number, prompt_id })
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let running = items("queue_running");
        let mut pending = items("queue_pending");
        pending.sort_by(|a, b| a.number.total_cmp(&b.number).then_with(|| a.prompt_id.cmp(&b.prompt_id)));
        Self { running, pending }
    }

    /// Parses a `GET /api/jobs` body (`{"jobs": [{id, status, priority, …}], …}`): `in_progress`
    /// items are running, `pending` ones are sorted by priority as the queue's heap runs them.
    /// `None` when the body is not a job list.
    pub fn from_jobs(body: &Value) -> Option<Self> {
        let jobs = body.get("jobs")?.as_array()?;
        let mut state = Self::default();
        for job in jobs {
            let Some(prompt_id) = job.get("id").and_then(Value::as_str) else { continue };
            let item = QueueItem {
                number: job.get("priority").and_then(Value::as_f64).unwrap_or_default(),
                prompt_id: prompt_id.to_owned(),
            };
            match job.get("status").and_then(Value::as_str) {
                Some("in_progress") => state.running.push(item),
                Some("pending") => state.pending.push(item),
                _ => {}
            }
        }
        state.pending.sort_by(|a, b| a.number.total_cmp(&b.number).then_with(|| a.prompt_id.cmp(&b.prompt_id)));
        Some(state)
    }

    /// Where `prompt_id` is, or `None` if it is neither running nor pending.
    pub fn position(&self, prompt_id: &PromptId) -> Option<QueuePosition> {
        if self.running.iter().any(|item| prompt_id.matches(&item.prompt_id)) {
            return Some(QueuePosition::Running);
        }
        self.pending
            .iter()
            .position(|item| prompt_id.matches(&item.prompt_id))
            .map(|position| QueuePosition::Pending { position })
    }

    /// Running + pending prompts (what `queue_remaining` reports).
    pub fn len(&self) -> usize {
        self.running.len() + self.pending.len()
    }

    /// True when nothing is running or waiting.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty() && self.pending.is_empty()
    }
}

/// The answer to `POST /prompt` when the whole graph was accepted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueuedPrompt {
    /// The prompt id (ours, echoed).
    pub prompt_id: PromptId,
    /// The queue number the server assigned.
    pub number: f64,
}

/// The answer to `POST /upload/image`. Always use `name`: ComfyUI renames on collisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedImage {
    /// Final file name (may differ from the one sent, e.g. `frame (1).png`).
    pub name: String,
    /// Sub-directory as sent.
    #[serde(default)]
    pub subfolder: String,
    /// Folder type (`input` unless asked otherwise).
    #[serde(rename = "type", default = "default_input")]
    pub kind: FolderType,
}

fn default_input() -> FolderType {
    FolderType::Input
}

impl UploadedImage {
    /// The value for `LoadImage.inputs.image`: `subfolder/name` (or just `name`).
    pub fn load_image_ref(&self) -> String {
        let subfolder = self.subfolder.trim_matches('/');
        let reference = if subfolder.is_empty() { self.name.clone() } else { format!("{subfolder}/{}", self.name) };
        match self.kind {
            FolderType::Input => reference,
            // LoadImage reads input/ unless the name carries a folder annotation.
            ref other => format!("{reference} [{}]", other.as_str()),
        }
    }
}

/// The useful parts of `GET /system_stats` (health/version probe).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct SystemStats {
    /// `system.comfyui_version`, if reported.
    pub comfyui_version: Option<String>,
    /// `system.os`.
    pub os: Option<String>,
    /// Compute devices: every GPU on newer ComfyUI (C15), the primary first.
    pub devices: Vec<DeviceStats>,
    /// `system.argv`: ComfyUI's command line (`main.py` first), which tells where its `input/`
    /// and `output/` folders are (`--base-directory`, `--input-directory`, `--output-directory`).
    pub argv: Vec<String>,
}

/// One compute device from `/system_stats`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DeviceStats {
    /// Device name (e.g. `cuda:0 NVIDIA …`).
    pub name: String,
    /// Device type (`cuda`, `cpu`, …).
    pub kind: String,
    /// Total VRAM in bytes.
    pub vram_total: Option<u64>,
    /// Free VRAM in bytes.
    pub vram_free: Option<u64>,
    /// The device's index (`torch` numbering), when reported.
    pub index: Option<u64>,
}

impl SystemStats {
    /// Parses a `/system_stats` body leniently.
    pub fn from_value(body: &Value) -> Self {
        let system = body.get("system");
        let text = |key: &str| system.and_then(|s| s.get(key)).and_then(Value::as_str).map(str::to_owned);
        let devices = body
            .get("devices")
            .and_then(Value::as_array)
            .map(|devices| {
                devices
                    .iter()
                    .map(|d| DeviceStats {
                        name: d.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
                        kind: d.get("type").and_then(Value::as_str).unwrap_or_default().to_owned(),
                        vram_total: d.get("vram_total").and_then(Value::as_u64),
                        vram_free: d.get("vram_free").and_then(Value::as_u64),
                        index: d.get("index").and_then(Value::as_u64),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let argv = system
            .and_then(|s| s.get("argv"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();
        Self { comfyui_version: text("comfyui_version"), os: text("os"), devices, argv }
    }
}
