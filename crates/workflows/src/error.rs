//! The two error boundaries of this crate: `WorkflowError` (loading the workflow directory and
//! the node map, reported once at startup) and `BindError` (a job's inputs do not fit the chosen
//! workflow, reported to the client as a 400). Messages say what to change, not just what failed.

use std::fmt;
use std::path::PathBuf;

use serde_json::Number;

use crate::spec::ParamType;

/// One thing wrong with one workflow (or with the node map), as a line of the load report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: the workflow file path, or `node map` for a problem in the overrides.
    pub location: String,
    /// The parameter concerned, if the problem is about one binding.
    pub param: Option<String>,
    /// Why, and usually how to fix it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.param {
            Some(p) => write!(f, "{}: parameter `{p}`: {}", self.location, self.reason),
            None => write!(f, "{}: {}", self.location, self.reason),
        }
    }
}

/// Why the workflow registry could not be loaded. The broker refuses to start on any of these.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The workflow directory could not be listed or a file in it could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The directory has no `*.json` files.
    #[error(
        "no workflows found: {} contains no *.json files (put ComfyUI API-format exports there)",
        .dir.display()
    )]
    NoWorkflows {
        /// The directory searched.
        dir: PathBuf,
    },
    /// The configured default workflow is not one of the files.
    #[error(
        "default workflow `{default}` does not exist in {} (available: {})",
        .dir.display(),
        .available.join(", ")
    )]
    UnknownDefault {
        /// The configured default.
        default: String,
        /// The directory searched.
        dir: PathBuf,
        /// The workflow names that do exist.
        available: Vec<String>,
    },
    /// The node map (e.g. the `WORKFLOW_NODES` env var) is malformed.
    #[error("invalid workflow node map: {reason}")]
    NodeMap {
        /// What is wrong and what shape is expected.
        reason: String,
    },
    /// One or more workflows have problems; `problems` lists all of them.
    #[error("{}", Report(.problems))]
    Invalid {
        /// Every problem found, across all files.
        problems: Vec<Problem>,
    },
}

/// Formats the multi-line load report.
struct Report<'a>(&'a [Problem]);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "workflow check failed with {n} problem{}:", if n == 1 { "" } else { "s" })?;
        for p in self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Why a job's inputs cannot be applied to a workflow. Every variant is the client's to fix,
/// so the broker maps all of them to HTTP 400 with this message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BindError {
    /// The requested workflow does not exist.
    #[error("unknown workflow `{name}` (available: {})", .known.join(", "))]
    UnknownWorkflow {
        /// The requested name.
        name: String,
        /// The workflows that exist.
        known: Vec<String>,
    },
    /// A parameter name the workflow does not bind.
    #[error("unknown parameter `{name}` (this workflow accepts: {})", list_or_none(.known))]
    UnknownParam {
        /// The name given.
        name: String,
        /// The parameters the workflow does accept.
        known: Vec<String>,
    },
    /// A parameter that cannot be passed in `params` (the image is always the uploaded frame).
    #[error("`{name}` cannot be set as a parameter: {why}")]
    ReservedParam {
        /// The name given.
        name: String,
        /// Why, and what to do instead.
        why: &'static str,
    },
    /// The same standard parameter was given twice with different values.
    #[error("`{name}` was given both as its own field and in `params`, with different values; send it once")]
    Conflict {
        /// The parameter.
        name: String,
    },
    /// A value of the wrong JSON type.
    #[error("parameter `{name}` must be {}, got a JSON {got}", .expected.with_article())]
    WrongType {
        /// The parameter.
        name: String,
        /// The type it needs.
        expected: ParamType,
        /// The JSON type received.
        got: &'static str,
    },
    /// A value below the minimum.
    #[error("parameter `{name}` = {value} is below the minimum {min}")]
    TooSmall {
        /// The parameter.
        name: String,
        /// The value received.
        value: Number,
        /// The smallest allowed value.
        min: Number,
    },
    /// A value above the maximum.
    #[error("parameter `{name}` = {value} is above the maximum {max}")]
    TooLarge {
        /// The parameter.
        name: String,
        /// The value received.
        value: Number,
        /// The largest allowed value.
        max: Number,
    },
    /// A value between allowed steps (e.g. a width that is not a multiple of 32).
    #[error(
        "parameter `{name}` = {value} is not allowed: values are {base} + a multiple of {step} ({})",
        nearest(.below.as_ref(), .above)
    )]
    NotOnStep {
        /// The parameter.
        name: String,
        /// The value received.
        value: Number,
        /// The first allowed value.
        base: Number,
        /// The distance between allowed values.
        step: u64,
        /// The nearest allowed value below, if any.
        below: Option<Number>,
        /// The nearest allowed value above.
        above: Number,
    },
    /// The job has no uploaded image name.
    #[error("the job has no input image name (upload the frame first and pass the name ComfyUI returned)")]
    MissingImage,
    /// The job id cannot be used in an output file name.
    #[error("job id `{job_id}` cannot be used in an output file name: use 1-128 ASCII letters, digits, `-` or `_`")]
    InvalidJobId {
        /// The job id given.
        job_id: String,
    },
    /// A bound input vanished from the graph. Cannot happen for a workflow built by this crate;
    /// reported instead of panicking.
    #[error("internal error: node {node_id} input `{input}` is missing from the workflow graph")]
    MissingTarget {
        /// The node.
        node_id: String,
        /// The input.
        input: String,
    },
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() { "no parameters".to_string() } else { names.join(", ") }
}

fn nearest(below: Option<&Number>, above: &Number) -> String {
    match below {
        Some(b) => format!("try {b} or {above}"),
        None => format!("try {above}"),
    }
}
