//! Tests of the `tdcomfy` binary itself: real processes, real signals.

mod chaos;
mod check;
mod cli;
mod crash;
mod logs;
mod process;
mod storage;
mod status;
mod tls;
