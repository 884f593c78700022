//! `asimov delete job|fleet|budget NAME` and `asimov delete -f PATH...`: remove objects
//! from the desired state, then (unless `--no-wait`) wait until the controller has
//! destroyed every instance of the deleted jobs and forgotten their runs. Nothing is
//! reported gone before the provider confirms it. The wait is for the runs that existed
//! when the delete was made: a job applied again meanwhile does not keep it waiting, and
//! is named in the report.

use super::desired;
use super::{CliError, CliResult, daemon, fail};
use crate::home::Home;
use crate::manifest::{self, Kind, Loaded};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub fn run(home: &Home, target: &[String], files: &[PathBuf], no_wait: bool) -> CliResult {
    // What the controller reconciles, wherever its folder is.
    let store = super::read_store(home)?;
    let current = desired::view(home, store.as_ref())?.loaded;
    drop(store);
    let objects: Vec<(Kind, String)> = match (target, files.is_empty()) {
        ([], false) => {
            let ctx = desired::context(home, &current);
            let loaded = manifest::load_paths(files, &ctx)?;
            loaded
                .documents
                .iter()
                .map(|d| (d.kind, d.name.clone()))
                .collect()
        }
        ([kind, name], true) => vec![(parse_kind(kind)?, name.clone())],
        _ => {
            return Err(fail(
                "say what to delete: `delete job NAME` or `delete -f FILE`",
            ));
        }
    };
    // Check everything before changing anything.
    let deleted_jobs: Vec<&str> = objects
        .iter()
        .filter(|(k, _)| *k == Kind::Job)
        .map(|(_, n)| n.as_str())
        .collect();
    for (kind, name) in &objects {
        check_deletable(home, &current, *kind, name, &deleted_jobs)?;
    }
    let removed_at_ms = chrono::Utc::now().timestamp_millis();
    for (kind, name) in &objects {
        desired::remove(home, *kind, name)?;
        println!("{}/{name} deleted", kind.as_str().to_lowercase());
    }
    if deleted_jobs.is_empty() || !home.database().exists() {
        return Ok(ExitCode::SUCCESS);
    }
    // The runs (by name and row incarnation) this delete is to tear down.
    let mut doomed = BTreeMap::new();
    if let Some(store) = super::read_store(home)? {
        for job in &deleted_jobs {
            for run in store.runs_of_job(job)? {
                doomed.insert(
                    run.name,
                    Doomed {
                        job: run.job,
                        seq: run.seq,
                        attempt: run.attempt,
                    },
                );
            }
        }
    }
    daemon::ensure_running(home)?;
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait_until_gone(home, doomed, removed_at_ms)
}

fn parse_kind(word: &str) -> Result<Kind, CliError> {
    match word {
        "job" | "jobs" => Ok(Kind::Job),
        "fleet" | "fleets" => Ok(Kind::Fleet),
        "budget" | "budgets" => Ok(Kind::Budget),
        other => Err(fail(format!(
            "cannot delete {other:?}: expected job, fleet or budget"
        ))),
    }
}

fn runs_of(home: &Home, job: &str) -> Result<usize, CliError> {
    if !home.database().exists() {
        return Ok(0);
    }
    Ok(super::read_store(home)?
        .map_or(Ok(Vec::new()), |s| s.runs_of_job(job))?
        .len())
}

fn check_deletable(
    home: &Home,
    current: &Loaded,
    kind: Kind,
    name: &str,
    deleted_jobs: &[&str],
) -> Result<(), CliError> {
    let file = desired::object_file(home, kind, name);
    let stored = file.exists();
    let defined_elsewhere = current
        .documents
        .iter()
        .find(|d| d.kind == kind && d.name == name && d.origin.file != file);
    if let Some(doc) = defined_elsewhere {
        return Err(fail(format!(
            "{}/{name} is defined in {}; remove it there",
            kind.as_str().to_lowercase(),
            doc.origin.file.display()
        )));
    }
    let users: Vec<&str> = current
        .manifests
        .jobs
        .iter()
        .filter(|j| !deleted_jobs.contains(&j.name.as_str()))
        .filter(|j| match kind {
            Kind::Fleet => j
                .spec
                .placement
                .iter()
                .any(|p| p.fleet.as_deref() == Some(name)),
            Kind::Budget => j.spec.budget.as_deref() == Some(name),
            Kind::Job => false,
        })
        .map(|j| j.name.as_str())
        .collect();
    if !users.is_empty() {
        return Err(fail(format!(
            "{}/{name} is used by job {}; delete or change those first",
            kind.as_str().to_lowercase(),
            users.join(", ")
        )));
    }
    if !stored && (kind != Kind::Job || runs_of(home, name)? == 0) {
        return Err(fail(format!(
            "no {} named {name:?}",
            kind.as_str().to_lowercase()
        )));
    }
    Ok(())
}

/// What became of a run this delete waits for.
enum Fate {
    Gone,
    /// Forgotten, and a run of the same name made since (the job was applied again).
    Replaced {
        attempt: u32,
        phase: &'static str,
    },
    /// Its job is desired again (from `file`): the deleted attempt was torn down and the
    /// run goes on with a new one.
    Restarted {
        file: PathBuf,
        phase: &'static str,
    },
    /// Its job is desired again before its instance was torn down: it goes on.
    Continues {
        file: PathBuf,
        phase: &'static str,
    },
}

/// The run `run` of `job` as this delete saw it: its row incarnation and attempt.
struct Doomed {
    job: String,
    seq: i64,
    attempt: u32,
}

fn fate(
    store: &crate::store::Store,
    run: &str,
    doomed: &Doomed,
    removed_at_ms: i64,
) -> Result<Option<Fate>, CliError> {
    let Some(now) = store.run(run)? else {
        return Ok(Some(Fate::Gone));
    };
    if now.seq != doomed.seq {
        return Ok(Some(Fate::Replaced {
            attempt: now.attempt,
            phase: now.phase.as_str(),
        }));
    }
    // Desired again in a read of the folder made after the removal: applied again.
    let Some(source) = store.desired_source()? else {
        return Ok(None);
    };
    if source.read_at_ms <= removed_at_ms {
        return Ok(None);
    }
    let Some(record) = store.desired()? else {
        return Ok(None);
    };
    let Some(file) = record
        .objects
        .iter()
        .find(|o| o.kind == Kind::Job.as_str() && o.name == doomed.job)
        .map(|o| o.file.clone())
    else {
        return Ok(None);
    };
    let phase = now.phase.as_str();
    if doomed.attempt == 0 {
        return Ok(Some(Fate::Continues { file, phase }));
    }
    let released = store
        .attempts(run)?
        .iter()
        .find(|a| a.attempt == doomed.attempt)
        .is_none_or(|a| a.released_at.is_some());
    if released {
        return Ok(Some(Fate::Restarted { file, phase }));
    }
    // The controller took the run back with its instance alive.
    let kept = now.attempt == doomed.attempt
        && now.phase != crate::model::Phase::Deleting
        && (matches!(
            now.phase,
            crate::model::Phase::Starting | crate::model::Phase::Running
        ) || now.phase.is_terminal());
    Ok(kept.then_some(Fate::Continues { file, phase }))
}

fn wait_until_gone(
    home: &Home,
    mut doomed: BTreeMap<String, Doomed>,
    removed_at_ms: i64,
) -> CliResult {
    let started = Instant::now();
    let mut last_report = None;
    let mut last_liveness = Instant::now();
    let mut replaced = Vec::new();
    loop {
        if let Some(store) = super::read_store(home)? {
            let mut settled = Vec::new();
            for (run, d) in &doomed {
                let job = &d.job;
                let Some(fate) = fate(&store, run, d, removed_at_ms)? else {
                    continue;
                };
                settled.push(run.clone());
                match fate {
                    Fate::Gone => {}
                    Fate::Replaced { attempt, phase } => replaced.push(format!(
                        "run/{run} was torn down and replaced by a new run of the re-applied \
                         job/{job} (attempt {attempt}, {phase})"
                    )),
                    Fate::Restarted { file, phase } => replaced.push(format!(
                        "run/{run}'s instance was torn down; job/{job} was applied again ({}) \
                         and the run starts over ({phase})",
                        file.display()
                    )),
                    Fate::Continues { file, phase } => replaced.push(format!(
                        "job/{job} was applied again ({}) before run/{run} was torn down; \
                         the run goes on ({phase})",
                        file.display()
                    )),
                }
            }
            for run in settled {
                doomed.remove(&run);
            }
        } else {
            doomed.clear();
        }
        if doomed.is_empty() {
            for line in &replaced {
                eprintln!("{line}");
            }
            if replaced.is_empty() {
                eprintln!(
                    "every instance is confirmed destroyed ({:.1}s)",
                    started.elapsed().as_secs_f64()
                );
            } else {
                eprintln!(
                    "the deleted runs are settled ({:.1}s)",
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        let left = doomed.len();
        if last_report != Some(left) {
            eprintln!("waiting for {left} run(s) to be torn down…");
            last_report = Some(left);
        }
        if last_liveness.elapsed() > Duration::from_secs(2) {
            last_liveness = Instant::now();
            daemon::ensure_running(home)?;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
