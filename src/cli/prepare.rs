//! `asimov prepare FLEET`: prepares every host of a fleet (agent folder, tmux and rsync
//! presence, GPU inventory). Idempotent: a second run reports that nothing changed.

use super::{CliResult, desired, fail};
use crate::home::Home;
use std::process::ExitCode;

pub fn run(home: &Home, fleet_name: &str) -> CliResult {
    home.ensure()?;
    let current = desired::load_current(home)?;
    let fleet = current
        .manifests
        .fleets
        .iter()
        .find(|f| f.name == fleet_name)
        .ok_or_else(|| {
            fail(format!(
                "no fleet named {fleet_name:?}; apply its manifest first"
            ))
        })?;
    let provider = crate::provider::ssh::SshProvider::new(home.clone())?;
    provider.set_fleets(current.manifests.fleets.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut failed = 0;
    for host in &fleet.hosts {
        match runtime.block_on(provider.prepare_host(&fleet.name, host)) {
            Ok(report) => {
                let what = if report.changed() {
                    format!("prepared: {}", report.changes.join(", "))
                } else {
                    "already prepared, nothing changed".to_string()
                };
                let gpus = if report.gpu_names.is_empty() {
                    "no GPUs seen".to_string()
                } else {
                    report.gpu_names.join(", ")
                };
                let missing: Vec<&str> = [("tmux", report.tmux), ("rsync", report.rsync)]
                    .into_iter()
                    .filter(|(_, present)| !present)
                    .map(|(n, _)| n)
                    .collect();
                let note = if missing.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (missing: {}; runs fall back to setsid and tar)",
                        missing.join(", ")
                    )
                };
                println!("{}/{}: {what}; {gpus}{note}", fleet.name, host.name);
            }
            Err(e) => {
                failed += 1;
                eprintln!("{}/{}: {e}", fleet.name, host.name);
            }
        }
    }
    if failed > 0 {
        return Err(fail(format!(
            "{failed} of {} host(s) could not be prepared",
            fleet.hosts.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}
