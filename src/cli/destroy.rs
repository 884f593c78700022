//! `asimov destroy [RUN] [--yes]`: stop a run for good and destroy its instance. The
//! stop is desired state — a row of the store's `stops` table naming the run and its
//! job's spec hash — which the planner honours on every pass: it ends the run's open
//! attempts (destroy, then release once the provider's listing confirms the instance
//! gone) and keeps the run Stopped, so a restarted controller does not bring it back.
//! Changing the job's spec (re-applying it edited) runs it again.

use super::{CliError, CliResult, daemon, fail};
use crate::home::Home;
use crate::model::Phase;
use crate::store::{RunRecord, Store};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long to wait for the controller to confirm the instance gone before saying so.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs that may hold or soon hold an instance.
fn candidates(store: &Store) -> Result<Vec<RunRecord>, CliError> {
    Ok(store
        .runs()?
        .into_iter()
        .filter(|r| !r.phase.is_terminal() && r.phase != Phase::Deleting)
        .collect())
}

fn describe(r: &RunRecord) -> String {
    let place = match (&r.provider, &r.instance_id) {
        (Some(p), Some(id)) => format!("{p} {id}"),
        (Some(p), None) => p.to_string(),
        _ => "no instance yet".to_string(),
    };
    format!("{} ({}, {place})", r.name, r.phase)
}

pub fn run(home: &Home, name: Option<&str>, yes: bool) -> CliResult {
    let Some(store) = super::read_store(home)? else {
        return Err(fail("nothing to destroy: no run was ever applied"));
    };
    let live = candidates(&store)?;
    let run = match name {
        Some(name) => match store.run(name)? {
            Some(r) if r.phase == Phase::Stopped => {
                println!("run/{name} is already stopped");
                return Ok(ExitCode::SUCCESS);
            }
            Some(r) if r.phase.is_terminal() => {
                return Err(fail(format!(
                    "run/{name} has already ended ({}); nothing is running",
                    r.phase
                )));
            }
            Some(r) => r,
            None => return Err(fail(format!("no run named {name:?}"))),
        },
        None => match live.len() {
            0 => return Err(fail("nothing to destroy: no run is pending or running")),
            1 => live[0].clone(),
            _ => {
                let list: Vec<String> = live.iter().map(|r| format!("  {}", describe(r))).collect();
                return Err(fail(format!(
                    "{} runs could be destroyed; name one (`asimov destroy RUN`):\n{}",
                    live.len(),
                    list.join("\n")
                )));
            }
        },
    };
    drop(store);
    if !yes {
        if !super::prompt::on_terminal() {
            return Err(fail(format!(
                "destroying run/{} needs confirmation: pass --yes",
                run.name
            )));
        }
        let question = format!("Destroy {}? Its instance is deleted.", describe(&run));
        let confirmed = inquire::Confirm::new(&question)
            .with_default(false)
            .prompt();
        match confirmed {
            Ok(true) => {}
            Ok(false) => {
                eprintln!("Not destroyed; nothing was changed.");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => return super::prompt::cancelled_or(Box::new(e)),
        }
    }
    // The stop holds for the job's spec as the controller will read it: the stored
    // manifest's hash, else the run's own.
    let current = super::desired::load_current(home).ok();
    let spec_hash = current
        .as_ref()
        .and_then(|l| l.manifests.jobs.iter().find(|j| j.name == run.job))
        .map_or_else(|| run.spec_hash.clone(), |j| j.spec_hash.clone());
    let writer = Store::open(&home.database())?;
    writer.put_stop(&run.name, &spec_hash, super::now())?;
    drop(writer);
    wake_controller(home, &run.job);
    daemon::ensure_running(home)?;
    eprintln!(
        "run/{} is stopping; waiting for its instance to be destroyed…",
        run.name
    );
    wait_until_stopped(home, &run.name)
}

/// A store write does not wake the controller; a touch of the job's stored manifest
/// does (its folder watch). Without one, its next timed pass comes soon anyway.
fn wake_controller(home: &Home, job: &str) {
    let file = super::desired::object_file(home, crate::manifest::Kind::Job, job);
    if let Ok(f) = std::fs::File::options().write(true).open(&file) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

fn wait_until_stopped(home: &Home, name: &str) -> CliResult {
    let started = Instant::now();
    let mut last_liveness = Instant::now();
    loop {
        if let Some(store) = super::read_store(home)? {
            let phase = store.run(name)?.map(|r| r.phase);
            let open = store
                .attempts(name)?
                .iter()
                .filter(|a| a.released_at.is_none())
                .count();
            if phase.is_none_or(|p| p == Phase::Stopped) && open == 0 {
                println!("run/{name} stopped; its instance is confirmed destroyed");
                return Ok(ExitCode::SUCCESS);
            }
        }
        if started.elapsed() > CONFIRM_TIMEOUT {
            return Err(fail(format!(
                "run/{name} is marked stopped, but its instance is not yet confirmed gone \
                 after {}s; the controller keeps trying (see `asimov describe run {name}`)",
                CONFIRM_TIMEOUT.as_secs()
            )));
        }
        if last_liveness.elapsed() > Duration::from_secs(2) {
            last_liveness = Instant::now();
            daemon::ensure_running(home)?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
