//! The `tdcomfy` binary: parses the command line and hands over to the library crates. Kept thin:
//! everything worth testing lives in the crates, which tests drive directly.

mod bench;
mod broker_target;
mod cli;
mod logging;
mod sse;
mod status;
mod submit;
mod up;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match cli::parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tdcomfy: {e:#}");
            return ExitCode::from(2);
        }
    };
    logging::init(command.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tdcomfy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tdcomfy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
