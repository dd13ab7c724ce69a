//! Integration tests of `tdcomfy_comfy`: contract tests that replay real ComfyUI 0.3.64 captures
//! through the parsers, HTTP tests and prompt-supervision tests against an in-test fake ComfyUI.

mod captures;
mod client_http;
mod endpoint;
mod events;
mod fake;
mod headers;
mod history;
mod outputs;
mod progress;
mod run;
mod sim;
mod validation;
mod versions;
