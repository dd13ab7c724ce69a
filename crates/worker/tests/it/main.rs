//! End-to-end tests of the worker with the real broker and the ComfyUI simulator on 127.0.0.1.

mod comfy_files;
mod failover;
mod harness;
mod lease;
mod pg;
mod pipeline;
mod prefetch;
mod preflight;
mod previews;
mod proxy;
mod recovery;
mod tls;
