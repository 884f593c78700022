//! `asimov pause RUN|JOB` and `asimov resume RUN|JOB`. A pause is desired state, like
//! `asimov destroy`'s stop: a row of the store's `run_pauses` table that the planner
//! honours on every pass (it syncs the run's checkpoint and outputs, destroys its
//! instance and keeps the run Paused, also across controller restarts). A resume
//! replaces the row by a resume, which also lifts the run's scheduled pauses
//! (`schedule.pause_at`, the `schedule.window`) that came before it; the next attempt
//! resumes from the newest checkpoint. `spec.paused` in a manifest is lifted only by
//! the manifest.

use super::{CliError, CliResult, daemon, fail};
use crate::home::Home;
use crate::model::Phase;
use crate::store::{RunRecord, Store};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How long to wait for the controller to confirm a pause (instance gone) or a resume
/// (a new attempt under way) before saying so.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);

/// The runs `name` names: the run of that name, else every run of the job of that name.
fn runs_named(store: &Store, name: &str) -> Result<Vec<RunRecord>, CliError> {
    if let Some(run) = store.run(name)? {
        return Ok(vec![run]);
    }
    let runs = store.runs_of_job(name)?;
    if runs.is_empty() {
        return Err(fail(format!("no run or job named {name:?}")));
    }
    Ok(runs)
}

pub fn pause(home: &Home, name: &str) -> CliResult {
    let Some(store) = super::read_store(home)? else {
        return Err(fail("nothing to pause: no run was ever applied"));
    };
    let runs = runs_named(&store, name)?;
    let pauses = store.pauses()?;
    let mut chosen = Vec::new();
    for r in &runs {
        if r.phase.is_terminal() || r.phase == Phase::Deleting {
            if runs.len() == 1 {
                return Err(fail(format!(
                    "run/{} has already ended ({}); there is nothing to pause",
                    r.name, r.phase
                )));
            }
            continue;
        }
        if pauses.get(&r.name).is_some_and(|p| p.paused) && r.phase == Phase::Paused {
            println!("run/{} is already paused", r.name);
            continue;
        }
        chosen.push(r.name.clone());
    }
    drop(store);
    if chosen.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let writer = Store::open(&home.database())?;
    for run in &chosen {
        writer.put_pause(run, true, super::now())?;
    }
    drop(writer);
    wake(home, &runs);
    eprintln!(
        "pausing {}; syncing the checkpoint, then releasing the instance (or stopping it, its disk kept)…",
        list(&chosen)
    );
    // Done once no instance is left, or the one left is stopped with its disk kept
    // (`keep_disk_on_pause`).
    wait_for(home, &chosen, "paused", |store, run| {
        let phase = store.run(run)?.map(|r| r.phase);
        let kept = store.kept_disks()?;
        let open = store
            .attempts(run)?
            .iter()
            .filter(|a| a.released_at.is_none())
            .filter(|a| {
                kept.get(&(run.to_string(), a.attempt))
                    .is_none_or(|k| k.stopped_at.is_none())
            })
            .count();
        Ok(phase.is_none_or(|p| p == Phase::Paused) && open == 0)
    })?;
    let store = super::read_store(home)?;
    for run in &chosen {
        match store.as_ref().and_then(|s| kept_instance(s, run)) {
            Some(instance) => println!(
                "run/{run} paused; its instance {instance} is stopped with its disk kept (it bills \
                 storage only); `asimov resume {run}` starts it again on that disk"
            ),
            None => {
                println!("run/{run} paused; no instance is left; `asimov resume {run}` resumes it")
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn resume(home: &Home, name: &str) -> CliResult {
    let Some(store) = super::read_store(home)? else {
        return Err(fail("nothing to resume: no run was ever applied"));
    };
    let runs = runs_named(&store, name)?;
    let view = super::desired::view(home, Some(&store))?;
    let mut chosen = Vec::new();
    for r in &runs {
        let in_manifest = view
            .loaded
            .manifests
            .jobs
            .iter()
            .find(|j| j.name == r.job)
            .filter(|j| j.spec.paused);
        if let Some(job) = in_manifest {
            return Err(fail(format!(
                "run/{} is paused by `paused: true` in its manifest ({}:{}); remove it there to resume",
                r.name,
                job.origin.file.display(),
                job.origin.line
            )));
        }
        if r.phase != Phase::Paused {
            if runs.len() == 1 {
                return Err(fail(format!("run/{} is not paused ({})", r.name, r.phase)));
            }
            continue;
        }
        chosen.push(r.name.clone());
    }
    drop(store);
    if chosen.is_empty() {
        return Err(fail(format!("no run of {name:?} is paused")));
    }
    let writer = Store::open(&home.database())?;
    for run in &chosen {
        writer.put_pause(run, false, super::now())?;
    }
    drop(writer);
    wake(home, &runs);
    let kept: Vec<Option<String>> = match super::read_store(home)? {
        Some(store) => chosen.iter().map(|r| kept_instance(&store, r)).collect(),
        None => vec![None; chosen.len()],
    };
    wait_for(home, &chosen, "resumed", |store, run| {
        Ok(store.run(run)?.is_none_or(|r| r.phase != Phase::Paused))
    })?;
    for (run, kept) in chosen.iter().zip(kept) {
        match kept {
            Some(instance) => println!(
                "run/{run} resumed; its stopped instance {instance} starts again on its kept disk \
                 (or, if it cannot, a new attempt starts from its latest checkpoint)"
            ),
            None => println!("run/{run} resumed; a new attempt starts from its latest checkpoint"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The stopped instance (`provider/id`) the run's open attempt keeps its disk on, if any.
fn kept_instance(store: &Store, run: &str) -> Option<String> {
    let kept = store.kept_disks().ok()?;
    store
        .attempts(run)
        .ok()?
        .into_iter()
        .filter(|a| a.released_at.is_none() && a.outcome.is_none())
        .find(|a| {
            kept.get(&(run.to_string(), a.attempt))
                .is_some_and(|k| k.stopped_at.is_some() && k.refused.is_none())
        })
        .map(|a| format!("{}/{}", a.provider, a.instance_id.as_deref().unwrap_or("?")))
}

fn list(runs: &[String]) -> String {
    let names: Vec<String> = runs.iter().map(|r| format!("run/{r}")).collect();
    names.join(", ")
}

/// A store write does not wake the controller; a touch of the job's stored manifest
/// does (its folder watch). Without one, its next timed pass comes soon anyway.
fn wake(home: &Home, runs: &[RunRecord]) {
    let mut jobs: Vec<&str> = runs.iter().map(|r| r.job.as_str()).collect();
    jobs.dedup();
    for job in jobs {
        let file = super::desired::object_file(home, crate::manifest::Kind::Job, job);
        if let Ok(f) = std::fs::File::options().write(true).open(&file) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

/// Waits until `done` holds for every run, keeping a controller running meanwhile.
fn wait_for(
    home: &Home,
    runs: &[String],
    what: &str,
    done: impl Fn(&Store, &str) -> Result<bool, CliError>,
) -> Result<(), CliError> {
    daemon::ensure_running(home)?;
    let started = Instant::now();
    let mut last_liveness = Instant::now();
    loop {
        if let Some(store) = super::read_store(home)? {
            let mut all = true;
            for run in runs {
                all &= done(&store, run)?;
            }
            if all {
                return Ok(());
            }
        }
        if started.elapsed() > CONFIRM_TIMEOUT {
            return Err(fail(format!(
                "{} is recorded as {what}, but the controller has not confirmed it after {}s; \
                 it keeps trying (see `asimov describe run`)",
                list(runs),
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
