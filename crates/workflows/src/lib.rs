//! ComfyUI workflows for tdcomfy: loads API-format workflow files, resolves which node inputs
//! the job parameters (`image`, `prompt`, `negative`, `seed` and named ones such as `frames`,
//! `fps`) bind to, describes them for `GET /workflows`, and rewrites a workflow per job into the
//! exact graph to POST to ComfyUI. Pure logic: no I/O beyond reading the workflow directory.
//!
//! Binding precedence, highest first (per parameter name; the winner supplies all targets):
//! 1. the explicit [`NodeMap`] (`WORKFLOW_NODES`): `{"image":"78","seed":"72.noise_seed"}`,
//!    optionally scoped `{"<workflow>": {...}}`; unscoped entries apply to the default workflow;
//! 2. title markers: a node whose `_meta.title` starts with `@` holds space-separated markers
//!    `@name` (the well-known input for that name, else the input called `name`, else the
//!    node's only value input) or `@name:input`; `@output` marks the primary output node;
//! 3. detection by class type and graph tracing (see the `binding` module docs).
//!
//! Only `image` is mandatory. A workflow that cannot be resolved makes
//! [`WorkflowRegistry::load`] fail with a report naming file, parameter and reason.
//!
//! ```no_run
//! use std::path::Path;
//! use tdcomfy_workflows::{JobInputs, NodeMap, WorkflowRegistry};
//!
//! let map = NodeMap::parse(&std::env::var("WORKFLOW_NODES").unwrap_or_default())?;
//! let registry = WorkflowRegistry::load(Path::new("workflows"), "ltxv_image_to_video", &map)?;
//! let workflow = registry.select(None)?;
//! let graph = workflow.bind(&JobInputs {
//!     image_name: "td/frame_000001.png".into(),
//!     prompt: Some("waves crashing".into()),
//!     job_id: "0b9e0c1e-2f4e-4d55-9a43-1c1f0f3a9a11".into(),
//!     ..JobInputs::default()
//! })?;
//! # let _ = graph;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod args;
mod binding;
mod error;
mod graph;
mod node_map;
mod registry;
mod spec;
mod workflow;

pub use args::WorkflowArgs;
pub use binding::{BindingSource, InputTarget, OUTPUT_KEY, ParamBinding, STANDARD_PARAMS};
pub use error::{BindError, Problem, WorkflowError};
pub use node_map::{NodeBindings, NodeMap, NodeRef};
pub use registry::WorkflowRegistry;
pub use spec::ParamType;
pub use workflow::{JobInputs, OUTPUT_ROOT, ParamInfo, Workflow, WorkflowInfo, job_output_subfolder};
