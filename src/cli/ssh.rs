//! `asimov ssh RUN` and `asimov attach RUN`: an interactive shell on the machine of a
//! run's live instance, or the run's own tmux session attached (read-only; Ctrl-b d
//! detaches). The machine is found in its provider's listing as `logs` finds it, and
//! reached through the same `Machine` the controller drives: over ssh, the master
//! connection with the pinned host key and asimov's key (fleet hosts and clouds
//! alike); on `local`, this machine. Leaving either leaves the run running.

use super::{CliResult, fail, logs};
use crate::agent::Session;
use crate::home::Home;
use std::process::ExitCode;

/// The exit code with which the session's script says the run had already ended.
const RUN_ENDED: i32 = 3;

pub fn run(home: &Home, run: &str, session: Session) -> CliResult {
    let verb = match session {
        Session::Shell => "ssh",
        Session::Attach => "attach",
    };
    if !super::prompt::on_terminal() {
        return Err(fail(format!(
            "`asimov {verb}` needs a terminal, and this is not one; \
             `asimov logs {run}` prints the run's output"
        )));
    }
    let record = logs::load(home, run)?;
    if record.phase.is_terminal() {
        return Err(fail(format!(
            "run {run} has ended ({}); its log: asimov logs {run}",
            record.phase
        )));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let machine = logs::locate(home, &record).await?;
        let command = machine.interactive(session, &record.name).await?;
        // A Ctrl-C typed while the session runs is the session's (a local `tail -f`
        // ends by it); asimov stays to close its ssh master. A handler, not SIG_IGN,
        // so that the child gets the default disposition back on exec.
        let _interrupts =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let status = tokio::process::Command::from(command)
            .status()
            .await
            .map_err(|e| fail(format!("cannot start the session on {run}'s machine: {e}")))?;
        match status.code() {
            Some(0) => Ok(ExitCode::SUCCESS),
            // The script said why already.
            Some(RUN_ENDED) => Ok(ExitCode::from(RUN_ENDED as u8)),
            Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
            None => Ok(ExitCode::FAILURE),
        }
    })
}
