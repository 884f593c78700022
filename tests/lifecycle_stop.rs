//! Early stopping through the real binary on the local provider: a job writes JSON-line
//! metrics to `ASIMOV_METRICS`; a plateauing metric stops it early (after a final
//! checkpoint sync), a NaN stops it as diverged, and nothing is left running; a metrics
//! file rotated and truncated under a controller that restarts is still judged whole.

mod support;

use std::time::Duration;
use support::cli::Asimov;

/// Counts to 300 steps of 0.1 s (30 s) unless stopped, writing one metrics line a step
/// with `val` given by the shell function in `$CURVE`, and its step to `$STEP_LOG`.
const TRAIN: &str = r#"#!/bin/sh
set -eu
mkdir -p ckpt
step=0
while [ "$step" -lt 300 ]; do
  sleep 0.1
  step=$((step + 1))
  val=$(sh -c "$CURVE" curve "$step")
  printf '{"step": %d, "val": %s}\n' "$step" "$val" >>"$ASIMOV_METRICS"
  # Atomically: a sync that copies the file mid-write must never find it empty.
  echo "$step" >ckpt/.step.tmp && mv ckpt/.step.tmp ckpt/step
  echo "step $step" >>"$STEP_LOG"
done
"#;

fn job(name: &str, step_log: &std::path::Path, curve: &str, rule: &str) -> String {
    format!(
        r#"
apiVersion: asimov/v1
kind: Job
metadata: {{name: {name}}}
spec:
  source: {{workdir: .}}
  run: sh train_stop.sh
  env: {{STEP_LOG: "{log}", CURVE: '{curve}'}}
  checkpoint: {{path: ckpt, every: 1h}}
  stop_when: [{rule}]
"#,
        log = step_log.display()
    )
}

fn last_step(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("step ")?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

fn run_json(a: &Asimov, run: &str) -> serde_json::Value {
    a.runs_json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == run)
        .cloned()
        .unwrap_or_default()
}

fn finished(a: &Asimov, run: &str) -> bool {
    matches!(
        run_json(a, run)["phase"].as_str(),
        Some("Succeeded" | "Failed")
    )
}

#[test]
fn a_plateauing_metric_stops_the_run_early_after_a_final_sync() {
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_stop.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    // Rises to 0.5 at step 5, then flat: with patience 5, stoppable from step 10.
    let curve = r#"if [ "$1" -lt 5 ]; then echo "0.$1"; else echo 0.5; fi"#;
    let file = a.manifest(
        "plateau.yaml",
        &job(
            "plateau",
            &step_log,
            curve,
            "{metric: val, mode: max, patience: 5}",
        ),
    );
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("the run to end", Duration::from_secs(60), || {
        finished(&a, "plateau-0")
    });
    let run = run_json(&a, "plateau-0");
    assert_eq!(run["phase"], "Succeeded", "{run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("EarlyStopped: val did not improve for"),
        "{reason}"
    );
    assert!(reason.contains("best 0.5 at step 5"), "{reason}");
    a.wait_for("the instance to go", Duration::from_secs(30), || {
        a.local_instances().is_empty() && a.job_processes().is_empty()
    });
    let stopped_at = last_step(&step_log);
    assert!(
        (10..150).contains(&stopped_at),
        "stopped at step {stopped_at}, not early"
    );
    // The final checkpoint sync came before the teardown.
    let describe = a.ok(&["describe", "run", "plateau-0"]);
    assert!(describe.contains("early-stopped"), "{describe}");
    assert!(describe.contains("final"), "{describe}");
    let kept: u64 = std::fs::read_to_string(a.home().join("checkpoints/plateau-0/1/step"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(kept >= 10, "final checkpoint at step {kept}");
}

#[test]
fn a_nan_stops_the_run_as_failed() {
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_stop.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    // Improves every step (patience never runs out), NaN from step 8.
    let curve = r#"if [ "$1" -lt 8 ]; then echo "$1"; else echo NaN; fi"#;
    let file = a.manifest(
        "nan.yaml",
        &job(
            "nan",
            &step_log,
            curve,
            "{metric: val, mode: max, patience: 100}",
        ),
    );
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("the run to end", Duration::from_secs(60), || {
        finished(&a, "nan-0")
    });
    let run = run_json(&a, "nan-0");
    assert_eq!(run["phase"], "Failed", "{run}");
    assert_eq!(run["reason"], "EarlyStopped: val is NaN at step 8", "{run}");
    a.wait_for("the instance to go", Duration::from_secs(30), || {
        a.local_instances().is_empty() && a.job_processes().is_empty()
    });
    assert!(last_step(&step_log) < 150, "{}", last_step(&step_log));
}

/// Improves every step to 100, then flat; its metrics file is rotated at step 40 and
/// truncated at step 80 (as log rotation does), so the controller reading it from an
/// offset must notice and start over from the new file.
const ROTATING: &str = r#"#!/bin/sh
set -eu
step=0
while [ "$step" -lt 400 ]; do
  sleep 0.1
  step=$((step + 1))
  case $step in
  40) mv "$ASIMOV_METRICS" "$ASIMOV_METRICS.1" ;;
  80) : >"$ASIMOV_METRICS" ;;
  esac
  val=$step
  [ "$step" -le 100 ] || val=100
  printf '{"step": %d, "val": %d}\n' "$step" "$val" >>"$ASIMOV_METRICS"
  echo "step $step" >>"$STEP_LOG"
done
"#;

#[test]
fn a_rotated_and_truncated_metrics_file_is_judged_whole_across_a_controller_restart() {
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_rotate.sh"), ROTATING).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let file = a.manifest(
        "rotate.yaml",
        &format!(
            r#"
apiVersion: asimov/v1
kind: Job
metadata: {{name: rotate}}
spec:
  source: {{workdir: .}}
  run: sh train_rotate.sh
  env: {{STEP_LOG: "{}"}}
  stop_when: [{{metric: val, mode: max, patience: 20}}]
"#,
            step_log.display()
        ),
    );
    let mut controller = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    // Past the rotation, the controller goes and comes back without its offsets.
    a.wait_for("step 50", Duration::from_secs(60), || {
        last_step(&step_log) >= 50
    });
    support::cli::kill9(&mut controller);
    let mut controller = a.spawn_controller(None);
    a.wait_for("the run to end", Duration::from_secs(90), || {
        finished(&a, "rotate-0")
    });
    let run = run_json(&a, "rotate-0");
    let reason = run["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("EarlyStopped: val did not improve for"),
        "{run}"
    );
    assert!(reason.contains("best 100 at step 100"), "{reason}");
    let stopped_at = last_step(&step_log);
    assert!(
        (120..300).contains(&stopped_at),
        "stopped at step {stopped_at}"
    );
    // The METRIC column: the rule's metric as last read, from the truncated file.
    let wide = a.ok(&["get", "runs", "-o", "wide"]);
    assert!(wide.contains("val=100"), "{wide}");
    support::cli::kill9(&mut controller);
}
