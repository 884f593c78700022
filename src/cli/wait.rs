//! `apply --wait`: one progress bar per run, fed by polling the store read-only, until
//! every run has ended under the applied spec. Exits non-zero if any run failed.

use super::{CliResult, daemon, fail};
use crate::home::Home;
use crate::manifest::Job;
use crate::model::Phase;
use crate::store::{RunRecord, Store};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(200);
/// How often to check the controller is still alive (and restart it when not).
const LIVENESS: Duration = Duration::from_secs(2);

pub fn follow(home: &Home, jobs: &[Job]) -> CliResult {
    // Run name → the spec hash it must have ended under.
    let expected: BTreeMap<String, &str> = jobs
        .iter()
        .flat_map(|job| {
            job.runs
                .iter()
                .map(move |r| (r.name.clone(), job.spec_hash.as_str()))
        })
        .collect();
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
    let style = ProgressStyle::with_template(
        "{prefix:<24} [{bar:30.cyan/blue}] {percent:>3}% {elapsed:>4} {msg}",
    )
    .map_err(|e| fail(format!("progress bar template: {e}")))?
    .progress_chars("=> ");
    let bars: BTreeMap<&str, ProgressBar> = expected
        .keys()
        .map(|name| {
            let bar = multi.add(ProgressBar::new(100));
            bar.set_style(style.clone());
            bar.set_prefix(name.clone());
            bar.set_message("waiting for the controller");
            bar.enable_steady_tick(Duration::from_millis(250));
            (name.as_str(), bar)
        })
        .collect();

    let mut store: Option<Store> = None;
    let mut last_liveness = Instant::now();
    let mut finished: BTreeMap<String, RunRecord> = BTreeMap::new();
    while finished.len() < expected.len() {
        std::thread::sleep(POLL);
        if last_liveness.elapsed() > LIVENESS {
            last_liveness = Instant::now();
            daemon::ensure_running(home)?;
        }
        if store.is_none() && home.database().exists() {
            store = super::read_store(home).ok().flatten();
        }
        let Some(db) = &store else { continue };
        for (name, hash) in &expected {
            if finished.contains_key(name) {
                continue;
            }
            let Some(run) = db.run(name)? else { continue };
            let bar = &bars[name.as_str()];
            if run.spec_hash != *hash {
                bar.set_message("waiting for the controller");
                continue;
            }
            if let Some(fraction) = fraction(&run) {
                bar.set_position((fraction * 100.0).round() as u64);
            }
            bar.set_message(message(&run));
            if run.phase.is_terminal() {
                if run.phase == Phase::Succeeded {
                    bar.set_position(100);
                }
                bar.finish_with_message(message(&run));
                finished.insert(name.clone(), run);
            }
        }
    }
    let failed: Vec<&RunRecord> = finished
        .values()
        .filter(|r| r.phase != Phase::Succeeded)
        .collect();
    if failed.is_empty() {
        eprintln!("{} run(s) succeeded", finished.len());
        return Ok(ExitCode::SUCCESS);
    }
    let names: Vec<String> = failed
        .iter()
        .map(|r| match r.exit_code {
            Some(code) => format!("{} (exit code {code})", r.name),
            None => format!("{} ({})", r.name, r.reason),
        })
        .collect();
    Err(fail(format!(
        "{} of {} run(s) failed: {}; see `asimov logs {}`",
        failed.len(),
        finished.len(),
        names.join(", "),
        failed[0].name
    )))
}

fn fraction(run: &RunRecord) -> Option<f64> {
    match (run.progress_done, run.progress_total) {
        (Some(d), Some(t)) if t > 0 => Some((d as f64 / t as f64).min(1.0)),
        _ => None,
    }
}

fn message(run: &RunRecord) -> String {
    let mut text = run.phase.as_str().to_string();
    if let (Some(d), Some(t)) = (run.progress_done, run.progress_total) {
        text.push_str(&format!(" {d}/{t}"));
    }
    if !run.reason.is_empty() {
        text.push_str(": ");
        text.push_str(&run.reason);
    }
    text
}
