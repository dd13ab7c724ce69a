//! Tests of the `tdcomfy` binary itself: real processes, real signals.

mod chaos;
mod cli;
mod crash;
mod logs;
mod process;
mod tls;
