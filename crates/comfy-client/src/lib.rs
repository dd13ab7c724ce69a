//! `tdcomfy_comfy`: the only code in tdcomfy that knows ComfyUI's client-side wire format.
//!
//! - [`ComfyEndpoint`] / [`ComfyEndpoints`]: where servers are (`COMFYUI_URLS`, or
//!   `COMFYUI_HOST`/`COMFYUI_PORT`).
//! - [`ComfyClient`]: HTTP calls (upload, queue, history, jobs API, queue control, targeted
//!   interrupt and atomic cancel, streamed download, health), optionally with a token.
//! - [`ServerFeatures`]: what a server supports, detected once per connection (not from its
//!   version string); [`PreviewMethod`]: `extra_data.preview_method` of each prompt.
//! - [`ComfySocket`] / [`ComfyEvent`]: the `/ws` event stream, typed; [`EventHub`] keeps one
//!   reconnecting socket per server and fans events out.
//! - [`collect_outputs`] / [`pick_primary`]: output files from every output key, video first.
//! - [`PromptRunner::run_prompt`]: supervision of one prompt to a trustworthy outcome
//!   ([`RunUpdate`]).

mod client;
mod endpoint;
mod error;
mod events;
mod features;
mod hub;
mod ids;
mod outputs;
mod progress;
mod responses;
mod run;
mod socket;

pub use client::{ComfyClient, ComfyTimeouts, Download, ImageUpload, UploadSource};
pub use endpoint::{ComfyEndpoint, ComfyEndpoints, DEFAULT_HOST, DEFAULT_PORT, EndpointError};
pub use error::{ComfyError, InputValidationError, NodeRef, NodeValidationErrors, ValidationReport, error_chain};
pub use events::{
    ComfyEvent, EventParseError, ExecutionErrorInfo, InterruptInfo, NodeProgress, PreviewFormat, PreviewImage,
    PreviewMeta,
};
pub use features::{PreviewMethod, ServerFeatures};
pub use hub::{EventHub, HubNotice, HubOptions, HubState};
pub use ids::{ClientId, InvalidId, PromptId};
pub use outputs::{FolderType, MediaKind, NodeOutput, OutputFile, collect_outputs, pick_primary};
pub use progress::{ProgressTracker, RunProgress};
pub use responses::{
    DeviceStats, HistoryEntry, HistoryOutcome, HistoryStatus, JobLookup, QueueItem, QueuePosition, QueueState,
    QueuedPrompt, SystemStats, UploadedImage,
};
pub use run::{
    ExpectedOutputs, PromptOptions, PromptRun, PromptRunner, RunConfig, RunFailure, RunFailureKind, RunUpdate,
};
pub use socket::{ComfySocket, SocketOptions};
