//! Integration tests of the broker: the real server on 127.0.0.1:0 with a temporary data
//! directory, driven over HTTP.

mod clock;
mod cluster;
mod contract;
mod data_dir;
mod events;
mod hangup;
mod helpers;
mod housekeeping;
mod jobs;
mod lease;
mod limits;
mod observe;
mod persistence;
mod postgres_http;
mod prefetch;
mod preflight;
mod previews;
mod results;
mod resume;
mod security;
mod storage;
mod store_conformance;
mod streams;
mod submit;
mod tls;
mod worker;
