//! Integration tests for tdcomfy-workflows: loading the shipped `workflows/` directory, binding
//! resolution (markers, detection by tracing, node map), refusal reports, per-job binding and
//! parameter validation, and the `GET /workflows` description shape.

mod bind;
mod describe;
mod detection;
mod precedence;
mod refusal;
mod registry;
mod support;
mod validation;
