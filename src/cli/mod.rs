//! The command line: clap types, one file per verb, rendering (tables, JSON, progress
//! bars) and exit codes. The only layer that prints.

pub fn run() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}
