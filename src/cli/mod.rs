//! The command line: clap types, one file per verb, rendering (tables, JSON, progress
//! bars) and exit codes. The only layer that prints; everything below returns errors
//! and data.

mod apply;
mod args;
mod bench;
mod controller;
pub mod daemon;
mod delete;
mod describe;
mod desired;
mod destroy;
mod dry_run;
mod finetune;
mod get;
mod init;
mod login;
mod logs;
mod offers;
mod pause;
mod pick;
mod prepare;
mod prompt;
pub mod render;
mod secret;
mod ssh;
mod token;
mod wait;

use crate::home::Home;
use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;

/// Any failure of a verb; printed once, as a chain, by `run`.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;
pub type CliResult = Result<ExitCode, CliError>;

/// A failure described in one sentence, for errors that have no typed source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failure(pub String);

pub fn fail(message: impl Into<String>) -> CliError {
    Box::new(Failure(message.into()))
}

pub fn run() -> ExitCode {
    // Like every Unix filter: `asimov get runs | head` ends quietly when head does.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Everything asimov writes (store, logs, controller.log, instance folders) is the
    // user's alone, whatever the shell's umask; jobs get the user's umask back.
    crate::home::private_umask();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            if let Some(problems) = err.downcast_ref::<crate::manifest::Problems>() {
                // Every problem at once, one per line, then the one-line reason.
                eprintln!("{problems}");
                eprintln!(
                    "error: {} problem(s) in the manifests; nothing was changed",
                    problems.0.len()
                );
            } else {
                eprintln!("error: {}", chain(err.as_ref()));
            }
            ExitCode::FAILURE
        }
    }
}

/// Prints clap's message; `--help` and `--version` succeed, every argument error exits 1
/// like any other failure (the README's promise), not clap's usual 2.
fn usage_error(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let _ = err.print();
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// `outer: cause: root cause`, on one line.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ASIMOV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a terminal: a background controller's stderr is controller.log.
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        // A log that cannot be written (a closed pipe, a full disk) must not take the
        // process with it: tracing's own report of that goes to the same stderr and
        // panics there.
        .log_internal_errors(false)
        .try_init();
}

fn dispatch(cli: Cli) -> CliResult {
    let home = Home::from_env()?;
    home.tighten();
    let Some(command) = cli.command else {
        init_tracing("warn");
        return prompt::run(&home);
    };
    match command {
        Command::Get { kind, name, output } => {
            init_tracing("warn");
            get::run(&home, kind, name.as_deref(), output)
        }
        Command::Apply {
            files,
            dry_run,
            wait,
            output,
        } => {
            init_tracing("warn");
            apply::run_as(&home, &files, dry_run, wait, output)
        }
        Command::Delete {
            target,
            files,
            no_wait,
        } => {
            init_tracing("warn");
            delete::run(&home, &target, &files, no_wait)
        }
        Command::Describe { kind, name } => {
            init_tracing("warn");
            describe::run(&home, kind, &name)
        }
        Command::Logs { run, follow } => {
            init_tracing("warn");
            logs::run(&home, &run, follow)
        }
        Command::Offers {
            file,
            provider,
            gpus,
            count,
            min_vram,
            max_price,
            filters,
            spot,
            sort,
            output,
            pick,
            premium,
            write,
        } => {
            init_tracing("warn");
            offers::run(
                &home,
                offers::Query {
                    file,
                    provider,
                    gpus,
                    count,
                    min_vram,
                    max_price,
                    filters,
                    spot,
                    pick,
                    premium,
                    write,
                },
                sort,
                output,
            )
        }
        Command::Login { cloud } => {
            init_tracing("warn");
            login::run(&home, cloud)
        }
        Command::Secret { action } => {
            init_tracing("warn");
            secret::run(&home, action)
        }
        Command::Prepare { fleet } => {
            init_tracing("warn");
            prepare::run(&home, &fleet)
        }
        Command::Bench {
            runs,
            jobs,
            idle_seconds,
            only,
            seed_only,
        } => {
            init_tracing("warn");
            if seed_only {
                let database = bench::seed_home(&home, runs)?;
                println!("seeded {runs} runs into {}", database.display());
                return Ok(ExitCode::SUCCESS);
            }
            let report = bench::run(bench::BenchOptions {
                runs,
                jobs,
                idle_seconds,
                only,
                binary: std::env::current_exe()?,
            })?;
            println!("{report}");
            if !report.complete() {
                return Err(fail("some figures could not be taken; see above"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { show_source } => {
            init_tracing("warn");
            token::run(&home, show_source)
        }
        Command::Destroy { run, yes } => {
            init_tracing("warn");
            destroy::run(&home, run.as_deref(), yes)
        }
        Command::Ssh { run } => {
            init_tracing("warn");
            ssh::run(&home, &run, crate::agent::Session::Shell)
        }
        Command::Attach { run } => {
            init_tracing("warn");
            ssh::run(&home, &run, crate::agent::Session::Attach)
        }
        Command::Pause { name } => {
            init_tracing("warn");
            pause::pause(&home, &name)
        }
        Command::Resume { name } => {
            init_tracing("warn");
            pause::resume(&home, &name)
        }
        Command::Init { yes } => {
            init_tracing("warn");
            init::run(&home, yes)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "asimov", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Controller {
            manifests,
            once,
            background,
        } => {
            // The controller writes to pipes and sockets of ssh and rsync children: one
            // cut mid-command is an error of that op, not the end of the controller.
            // SAFETY: setting a signal's disposition before the controller's threads.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            init_tracing("info");
            controller::run(&home, manifests, once, background)
        }
    }
}

/// Seconds since the epoch, from the system clock; the CLI's only clock.
pub fn now() -> crate::model::Timestamp {
    chrono::Utc::now().timestamp()
}

/// The store for reading, or `None` before anything was ever applied. A file the
/// controller has created but not yet migrated is migrated here (safe to race: each
/// migration step is its own immediate transaction).
pub fn read_store(home: &Home) -> Result<Option<crate::store::Store>, CliError> {
    use crate::store::{Store, StoreError};
    if !home.database().exists() {
        return Ok(None);
    }
    match Store::open_read_only(&home.database()) {
        Ok(store) => Ok(Some(store)),
        Err(StoreError::Version {
            found, expected, ..
        }) if found < expected => Ok(Some(Store::open(&home.database())?)),
        Err(e) => Err(e.into()),
    }
}
