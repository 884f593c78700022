//! `asimov logs RUN [-f]`: the run's output. A finished run's log is kept in
//! `$ASIMOV_HOME/logs/`; a live one is read from its instance through the same
//! `Machine` the controller drives (whatever its provider), and `-f` follows it until
//! the run ends. Logs are streamed, never held whole in memory.

use super::{CliError, CliResult, desired, fail};
use crate::agent::Machine;
use crate::home::Home;
use crate::store::RunRecord;
use futures_util::StreamExt;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub fn run(home: &Home, run: &str, follow: bool) -> CliResult {
    let record = load(home, run)?;
    let kept = home.run_log(run);
    if kept.exists() && (record.phase.is_terminal() || !follow) {
        print_file(&kept)?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(live(home, record, follow))
}

/// Copies a file to stdout in buffered chunks.
fn print_file(path: &std::path::Path) -> Result<(), CliError> {
    let mut file = std::fs::File::open(path)?;
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut file, &mut out)?;
    out.flush()?;
    Ok(())
}

pub(super) fn load(home: &Home, run: &str) -> Result<RunRecord, CliError> {
    let missing = || fail(format!("no run named {run:?}"));
    if !home.database().exists() {
        return Err(missing());
    }
    super::read_store(home)?
        .ok_or_else(missing)?
        .run(run)?
        .ok_or_else(missing)
}

/// The machine of the run's live instance, found in its provider's listing as the
/// controller finds it.
pub(super) async fn locate(home: &Home, record: &RunRecord) -> Result<Arc<dyn Machine>, CliError> {
    let store = super::read_store(home)?.ok_or_else(|| fail("no state database yet"))?;
    let attempt = store
        .attempts(&record.name)?
        .into_iter()
        .rev()
        .find(|a| a.released_at.is_none() && a.instance_id.is_some())
        .ok_or_else(|| {
            fail(format!(
                "run {} has no instance yet: {}",
                record.name, record.reason
            ))
        })?;
    let registry = crate::reconcile::controller::providers_for(home)?;
    // The fleets are a fixed pool's configuration, as the controller gives it.
    let fleets = desired::load_current(home)?.manifests.fleets;
    for provider in registry.providers.values() {
        provider.set_fleets(&fleets);
    }
    let provider = registry.providers.get(&attempt.provider).ok_or_else(|| {
        fail(format!(
            "reading logs from {} instances is not supported yet",
            attempt.provider
        ))
    })?;
    let instance = provider
        .list()
        .await?
        .into_iter()
        .find(|i| i.tag.render() == attempt.tag)
        .ok_or_else(|| {
            fail(format!(
                "the instance of {} is not reachable now",
                record.name
            ))
        })?;
    Ok(provider.machine(&instance)?)
}

async fn live(home: &Home, record: RunRecord, follow: bool) -> CliResult {
    let machine = locate(home, &record).await?;
    let mut out = std::io::stdout();
    if !follow {
        // Byte for byte through a private temporary file, never whole in memory.
        let dir = tempfile::tempdir()?;
        let copy = dir.path().join("log");
        if machine.copy_log(&copy).await? {
            print_file(&copy)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = machine.follow_log().await?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    // Bytes printed so far: once the run ends, what the instance's log had that the
    // stream did not deliver yet (its folder may be gone by then) comes from the copy
    // the controller kept.
    let mut written: u64 = 0;
    loop {
        tokio::select! {
            chunk = stream.next() => match chunk {
                Some(Ok(bytes)) => {
                    out.write_all(&bytes)?;
                    out.flush()?;
                    written += bytes.len() as u64;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(ExitCode::SUCCESS),
            },
            _ = check.tick() => {
                let now = load(home, &record.name)?;
                if now.phase.is_terminal() || now.attempt != record.attempt {
                    // Let the last lines arrive, then stop.
                    let drain = tokio::time::sleep(Duration::from_millis(700));
                    tokio::pin!(drain);
                    loop {
                        tokio::select! {
                            chunk = stream.next() => match chunk {
                                Some(Ok(bytes)) => {
                                    out.write_all(&bytes)?;
                                    written += bytes.len() as u64;
                                }
                                _ => break,
                            },
                            _ = &mut drain => break,
                        }
                    }
                    if now.attempt == record.attempt {
                        // The controller may mark the run ended a step before it
                        // keeps the log: give it a few seconds.
                        let kept = home.run_log(&record.name);
                        for _ in 0..25 {
                            if kept.exists() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        print_kept_rest(&home.run_log(&record.name), written)?;
                    }
                    out.flush()?;
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    }
}

/// Prints the kept log from byte `from` on: the end of a run whose instance went away
/// before the follower read it. A kept log shorter than `from` was capped (its tail
/// kept), and nothing is printed from it.
fn print_kept_rest(kept: &std::path::Path, from: u64) -> Result<(), CliError> {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(kept) else {
        return Ok(());
    };
    if file.metadata()?.len() <= from {
        return Ok(());
    }
    file.seek(SeekFrom::Start(from))?;
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut file, &mut out)?;
    Ok(())
}
