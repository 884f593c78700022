//! `asimov delete job` of a running job through the real binary: the final sync
//! (checkpoint and outputs brought home) happens before the teardown, as when a run
//! ends, on the local provider and on an SSH fleet host. The run's last checkpoint stays
//! the user's beside its outputs once the run is forgotten. (S3: `lifecycle_s3.rs`.)

mod support;

use std::time::Duration;
use support::cli::Asimov;
use support::sshd::Sshd;

/// Counts steps of 0.2 s for as long as it is let, writing its checkpoint (atomically)
/// and an output every step, and each step to `$STEP_LOG` outside the instance.
const TRAIN: &str = r#"#!/bin/sh
set -eu
step=0
mkdir -p ckpt out
while :; do
  sleep 0.2
  step=$((step + 1))
  printf '%s\n' "$step" >ckpt/.step.tmp && mv ckpt/.step.tmp ckpt/step
  printf '%s\n' "$step" >out/.progress.tmp && mv out/.progress.tmp out/progress.txt
  echo "step $step" >>"$STEP_LOG"
done
"#;

fn job(step_log: &std::path::Path, placement: &str) -> String {
    // Checkpoint syncs an hour apart: the one this test sees is the delete's.
    format!(
        r#"
apiVersion: asimov/v1
kind: Job
metadata: {{name: doomed}}
spec:
  source: {{workdir: .}}
  run: sh train_delete.sh
  env: {{STEP_LOG: "{log}"}}
  checkpoint: {{path: ckpt, every: 1h}}
  artifacts: {{paths: [out]}}
{placement}"#,
        log = step_log.display()
    )
}

fn last_step(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("step ")?.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

fn read_step(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Deletes the running job once it has made `steps` steps and checks that the
/// checkpoint and the outputs came home first, as they were at the delete.
fn delete_running_job(a: &Asimov, step_log: &std::path::Path) {
    a.wait_for("the job to run 10 steps", Duration::from_secs(90), || {
        last_step(step_log) >= 10
    });
    let at_delete = last_step(step_log);
    a.ok(&["delete", "job", "doomed"]);
    assert_eq!(a.runs_json()["items"], serde_json::json!([]));
    let kept = a.home().join("artifacts/doomed-0");
    let checkpoint = read_step(&kept.join("checkpoint/step"));
    let output = read_step(&kept.join("out/progress.txt"));
    assert!(
        checkpoint.is_some_and(|s| s >= at_delete),
        "the final checkpoint kept is at step {checkpoint:?}, the job was at {at_delete} when deleted"
    );
    assert!(
        output.is_some_and(|s| s >= at_delete),
        "the output brought home is at step {output:?}, the job was at {at_delete}"
    );
    // The run's own checkpoints folder went with it.
    assert!(!a.home().join("checkpoints/doomed-0").exists());
}

#[test]
fn deleting_a_running_local_job_syncs_its_checkpoint_and_outputs_before_teardown() {
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_delete.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let file = a.manifest("doomed.yaml", &job(&step_log, ""));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    delete_running_job(&a, &step_log);
    assert!(a.local_instances().is_empty(), "{:?}", a.local_instances());
    assert!(a.job_processes().is_empty(), "the job's processes are gone");
    let stopped_at = last_step(&step_log);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(last_step(&step_log), stopped_at, "nothing runs on");
}

fn fleet(sshd: &Sshd) -> String {
    format!(
        "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {{name: lab}}\nspec:\n  hosts:\n    \
         - {{name: box-1, user: {}, address: {}, port: {}, identity_file: {}, gpus: 0}}\n",
        sshd.user(),
        sshd.host(),
        sshd.port(),
        sshd.client_key().display()
    )
}

#[test]
fn deleting_a_running_fleet_job_syncs_over_rsync_before_its_slot_goes() {
    let Some(sshd) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_delete.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let fleet = a.manifest("fleet.yaml", &fleet(&sshd));
    let file = a.manifest(
        "doomed.yaml",
        &job(&step_log, "  placement: [{provider: ssh, fleet: lab}]\n"),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    let tag = {
        a.wait_for("the run on box-1", Duration::from_secs(60), || {
            a.runs_json()["items"][0]["instance_id"].is_string()
        });
        a.runs_json()["items"][0]["instance_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    delete_running_job(&a, &step_log);
    a.wait_for(
        "the job on the host to end",
        Duration::from_secs(30),
        || support::sshd::processes_with_env(&format!("ASIMOV_INSTANCE={tag}")).is_empty(),
    );
}
