//! The tdcomfy worker: leases jobs from the broker ([`broker_client`]), runs each on ComfyUI
//! through `tdcomfy_comfy` (the only code that knows ComfyUI's wire format), relays progress and
//! cancellation, and streams the result back ([`run`]).

pub mod broker_client;
pub mod comfy_files;
pub mod config;
mod lease_keeper;
pub mod preflight;
pub mod previews;
pub mod run;
mod spooled;

pub use config::{WorkerArgs, WorkerConfig, WorkerConfigError};
pub use run::{WorkerError, run};
