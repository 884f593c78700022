//! `asimov apply -f PATH... [--dry-run] [--wait]`: validate everything first (every
//! problem at once, nothing written when any), store each object as its own file in the
//! manifests folder, make sure a controller runs, and optionally follow the runs.

use super::args::Output;
use super::desired::{self, Change};
use super::{CliResult, daemon, wait};
use crate::home::Home;
use crate::manifest;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub fn run(home: &Home, files: &[PathBuf], dry_run: bool, wait_for_runs: bool) -> CliResult {
    run_as(home, files, dry_run, wait_for_runs, Output::Table)
}

/// `run`, printing a dry run's plan as `output` says.
pub fn run_as(
    home: &Home,
    files: &[PathBuf],
    dry_run: bool,
    wait_for_runs: bool,
    output: Output,
) -> CliResult {
    let current = desired::load_current(home).unwrap_or_else(|problems| {
        eprintln!(
            "warning: the stored manifests have problems; fix them in {}:",
            home.manifests().display()
        );
        eprintln!("{problems}");
        Default::default()
    });
    let ctx = desired::context(home, &current);
    let loaded = manifest::load_paths(files, &ctx)?;
    // An empty file or folder is almost always a wrong path or a generator that wrote
    // nothing; like `kubectl apply`, refuse it rather than succeed silently, and start
    // no controller for it.
    if loaded.documents.is_empty() {
        let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(super::fail(format!(
            "nothing to apply: no manifest in {} (folders are read for *.yaml and *.yml \
             files directly inside); nothing was changed",
            paths.join(", ")
        )));
    }

    let changes: Vec<(Change, &manifest::Document)> = loaded
        .documents
        .iter()
        .map(|doc| (desired::change_of(home, doc), doc))
        .collect();
    let written_at_ms = chrono::Utc::now().timestamp_millis();
    if !dry_run {
        home.ensure()?;
        for (change, doc) in &changes {
            if *change != Change::Unchanged {
                desired::write(home, doc)?;
            }
        }
    }
    if dry_run {
        let plan = super::dry_run::plan(home, &current, &loaded, &changes)?;
        super::dry_run::print(&plan, output)?;
    } else {
        for (change, doc) in &changes {
            println!(
                "{}/{} {}",
                doc.kind.as_str().to_lowercase(),
                doc.name,
                change.as_str()
            );
        }
    }
    // Valid, but it would wait for ever: say so now rather than leave `--wait` hanging.
    for job in &loaded.manifests.jobs {
        let undriven: Vec<&str> = job
            .spec
            .placement
            .iter()
            .map(|p| p.provider)
            .filter(|k| !crate::reconcile::controller::drives(*k))
            .map(|k| k.as_str())
            .collect();
        if undriven.len() == job.spec.placement.len() {
            eprintln!(
                "warning: job/{} is placed only on {}, which this asimov cannot drive yet; \
                 its runs will wait as Pending",
                job.name,
                undriven.join(", ")
            );
        } else if !job.spec.placement.is_empty()
            && job
                .spec
                .placement
                .iter()
                .all(|p| p.provider == crate::model::ProviderKind::Vast)
            && crate::provider::vast::api_key(home).is_none()
        {
            eprintln!(
                "warning: job/{} is placed only on vast, and no {} is stored \
                 (asimov login vast, or asimov secret set {}; then restart the controller); \
                 its runs will wait as Pending",
                job.name,
                crate::provider::vast::KEY_NAME,
                crate::provider::vast::KEY_NAME,
            );
        }
    }
    if dry_run {
        return Ok(ExitCode::SUCCESS);
    }
    let started = daemon::ensure_running(home)?;
    if started {
        eprintln!(
            "started a background controller (log: {})",
            home.controller_log().display()
        );
    }
    let changed = changes.iter().any(|(c, _)| *c != Change::Unchanged);
    warn_if_unwatched(home, (changed || started).then_some(written_at_ms), started)?;
    if wait_for_runs && !loaded.manifests.jobs.is_empty() {
        return wait::follow(home, &loaded.manifests.jobs);
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `apply` waits for the controller to read what it wrote.
const PICKUP: Duration = Duration::from_secs(10);

/// Waits (when `since_ms` is given) until the controller has read its folder after
/// `since_ms`, so a `get` right after `apply` shows what was applied; then warns when
/// that folder is not the one `apply` writes to (a controller started with
/// `--manifests` on a git checkout).
fn warn_if_unwatched(
    home: &Home,
    since_ms: Option<i64>,
    started: bool,
) -> Result<(), super::CliError> {
    let deadline = Instant::now() + PICKUP;
    let ours = std::fs::canonicalize(home.manifests()).unwrap_or_else(|_| home.manifests());
    loop {
        let source = super::read_store(home)?.and_then(|s| s.desired_source().ok().flatten());
        let read = match (since_ms, &source) {
            (None, _) => true,
            (Some(since), Some(s)) => s.read_at_ms >= since,
            (Some(_), None) => false,
        };
        // A controller just started records its folder at once; before that, the record
        // may be an earlier controller's.
        let elsewhere = source
            .as_ref()
            .filter(|s| s.folder != ours && (read || !started));
        if let Some(s) = elsewhere {
            // A controller watching another folder never reads ours: no use waiting.
            eprintln!(
                "warning: the running controller watches {} (started with --manifests), not {}; \
                 put these manifests there instead",
                s.folder.display(),
                home.manifests().display()
            );
            return Ok(());
        }
        if read {
            return Ok(());
        }
        if Instant::now() > deadline {
            eprintln!(
                "note: the controller has not read the manifests yet; `asimov get` shows them \
                 once it has"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
