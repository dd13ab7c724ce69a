//! The workflow settings shared by `serve`, `worker` and `up` (clap flags with the design's
//! environment variables), and loading the registry from them.

use std::path::PathBuf;

use crate::{NodeMap, WorkflowError, WorkflowRegistry};

/// Where workflows are and how their parameters bind.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkflowArgs {
    /// Directory of ComfyUI API-format workflows; each *.json is selectable by its file name.
    #[arg(long, env = "WORKFLOWS_DIR", default_value = "workflows")]
    pub workflows_dir: PathBuf,

    /// Workflow used when a job names none.
    #[arg(long, env = "DEFAULT_WORKFLOW", default_value = "ltxv_image_to_video")]
    pub default_workflow: String,

    /// Explicit node-id bindings as JSON, e.g. {"image":"78","prompt":"6","seed":"72.noise_seed"},
    /// optionally per workflow: {"ltxv_image_to_video":{…}}. Beats markers and detection.
    #[arg(long, env = "WORKFLOW_NODES")]
    pub workflow_nodes: Option<String>,
}

impl WorkflowArgs {
    /// Loads and binds every workflow; the error is a readable report.
    pub fn load(&self) -> Result<WorkflowRegistry, WorkflowError> {
        let nodes = match &self.workflow_nodes {
            Some(text) if !text.trim().is_empty() => NodeMap::parse(text)?,
            _ => NodeMap::default(),
        };
        WorkflowRegistry::load(&self.workflows_dir, &self.default_workflow, &nodes)
    }
}
