//! Integration tests of the ComfyUI simulator over real sockets (127.0.0.1:0).

mod cache;
mod contract;
mod faults;
mod support;
mod versions;
mod video;
