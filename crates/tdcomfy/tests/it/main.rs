//! Tests of the `tdcomfy` binary itself: real processes, real signals.

mod chaos;
mod check;
mod cli;
mod cluster;
mod crash;
mod logs;
mod pg;
mod process;
mod status;
mod storage;
mod tls;
