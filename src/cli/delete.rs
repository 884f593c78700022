//! `asimov delete job|fleet|budget NAME` and `asimov delete -f PATH...`: remove objects
//! from the desired state, then (unless `--no-wait`) wait until the controller has
//! destroyed every instance of the deleted jobs and forgotten their runs. Nothing is
//! reported gone before the provider confirms it.

use super::desired;
use super::{CliError, CliResult, daemon, fail};
use crate::home::Home;
use crate::manifest::{self, Kind, Loaded};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub fn run(home: &Home, target: &[String], files: &[PathBuf], no_wait: bool) -> CliResult {
    let current = desired::load_current(home).unwrap_or_default();
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
    for (kind, name) in &objects {
        desired::remove(home, *kind, name)?;
        println!("{}/{name} deleted", kind.as_str().to_lowercase());
    }
    if deleted_jobs.is_empty() || !home.database().exists() {
        return Ok(ExitCode::SUCCESS);
    }
    daemon::ensure_running(home)?;
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait_until_forgotten(home, &deleted_jobs)
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

fn wait_until_forgotten(home: &Home, jobs: &[&str]) -> CliResult {
    let started = Instant::now();
    let mut last_report = None;
    let mut last_liveness = Instant::now();
    loop {
        let left: usize = jobs
            .iter()
            .map(|j| runs_of(home, j))
            .sum::<Result<usize, _>>()?;
        if left == 0 {
            eprintln!(
                "every instance is confirmed destroyed ({:.1}s)",
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
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
