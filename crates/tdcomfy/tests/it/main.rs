//! Tests of the `tdcomfy` binary itself: real processes, real signals.

mod cli;
mod crash;
mod process;
mod tls;
