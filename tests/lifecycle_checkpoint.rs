//! Checkpoints through the real binary: a job that counts steps and checkpoints every
//! few of them loses its instance mid-run, and the run finishes on a new attempt that
//! resumed from the newest complete checkpoint, losing at most one sync interval of
//! work (read from the job's own step log).

mod support;

use std::time::Duration;
use support::cli::Asimov;
use support::sshd::Sshd;

/// Seconds between the controller's checkpoint syncs (`checkpoint.every`).
const EVERY_SECS: f64 = 1.0;
/// How long one sync may take under load (a pass: list, observe, rsync, rename).
const SYNC_SECS: f64 = 1.0;
/// The job's step time (its `sleep`) and how often it writes its checkpoint.
const STEP_SECS: f64 = 0.2;
const CKPT_STEPS: u64 = 2;
const STEPS: u64 = 40;

/// The tiny training script: resumes from `ASIMOV_RESUME_FROM`, logs every step (and
/// the resume) to `$STEP_LOG` outside the instance, writes its checkpoint atomically.
const TRAIN: &str = r#"#!/bin/sh
set -eu
step=0
if [ -n "${ASIMOV_RESUME_FROM:-}" ]; then
  step=$(cat "$ASIMOV_RESUME_FROM/step")
  echo "resume $step $ASIMOV_RESUME_FROM" >>"$STEP_LOG"
fi
mkdir -p ckpt
while [ "$step" -lt "$STEPS" ]; do
  sleep "$STEP_SECS"
  step=$((step + 1))
  echo "step $step $ASIMOV_INSTANCE" >>"$STEP_LOG"
  echo "ASIMOV_PROGRESS $step/$STEPS"
  if [ $((step % CKPT_STEPS)) -eq 0 ]; then
    printf '%s\n' "$step" >ckpt/.step.tmp && mv ckpt/.step.tmp ckpt/step
  fi
done
"#;

fn job(step_log: &std::path::Path, placement: &str) -> String {
    format!(
        r#"
apiVersion: asimov/v1
kind: Job
metadata: {{name: ckpt}}
spec:
  source: {{workdir: .}}
  run: sh train_ckpt.sh
  env: {{STEP_LOG: "{log}", STEPS: "{STEPS}", STEP_SECS: "{STEP_SECS}", CKPT_STEPS: "{CKPT_STEPS}"}}
  retry: {{on: [preemption], max_restarts: 2}}
  checkpoint: {{path: ckpt, every: {EVERY_SECS}s}}
{placement}"#,
        log = step_log.display()
    )
}

/// A step number with the instance tag (for a step) or checkpoint path (for a resume).
type Entry = (u64, String);

/// (step reached, instance) lines and resume points, in log order.
fn read_log(path: &std::path::Path) -> (Vec<Entry>, Vec<Entry>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut steps, mut resumes) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["step", n, tag] => steps.push((n.parse().unwrap(), tag.to_string())),
            ["resume", n, from] => resumes.push((n.parse().unwrap(), from.to_string())),
            _ => panic!("unexpected step log line {line:?}"),
        }
    }
    (steps, resumes)
}

fn complete_checkpoints(a: &Asimov, run: &str) -> Vec<u64> {
    let mut seqs: Vec<u64> = std::fs::read_dir(a.home().join("checkpoints").join(run))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    seqs.sort();
    seqs
}

#[test]
fn local_instance_lost_mid_run_resumes_from_the_latest_checkpoint() {
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_ckpt.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let file = a.manifest("ckpt.yaml", &job(&step_log, ""));
    let mut controller = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);

    // Mid-run, with at least two checkpoints home: the machine dies (its processes
    // killed, its folder gone, as a preempted cloud instance vanishes from a listing).
    a.wait_for(
        "two checkpoints and 15 steps",
        Duration::from_secs(60),
        || complete_checkpoints(&a, "ckpt-0").len() >= 2 && read_log(&step_log).0.len() >= 15,
    );
    let newest = *complete_checkpoints(&a, "ckpt-0").last().unwrap();
    let newest_step: u64 = std::fs::read_to_string(
        a.home()
            .join("checkpoints/ckpt-0")
            .join(newest.to_string())
            .join("step"),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let instances = a.local_instances();
    assert_eq!(instances.len(), 1, "{instances:?}");
    // The controller goes down with it (so that no pass sees the folder half gone),
    // and comes back to find the instance missing from the listing.
    support::cli::kill9(&mut controller);
    for _ in 0..3 {
        for pid in a.job_processes() {
            // SAFETY: signalling a process by pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    std::fs::remove_dir_all(a.home().join("local").join(&instances[0])).unwrap();
    let (before, _) = read_log(&step_log);
    let lost_at = before.last().unwrap().0;
    let mut controller = a.spawn_controller(None);

    a.wait_for("the run to succeed", Duration::from_secs(120), || {
        a.run_phase("ckpt-0").as_deref() == Some("Succeeded")
    });
    let run = a.runs_json()["items"][0].clone();
    assert_eq!(
        run["attempt"],
        2,
        "{run}\n{}",
        a.ok(&["describe", "run", "ckpt-0"])
    );

    check_resumed(&step_log, &before[0].1, lost_at, newest_step);

    let describe = a.ok(&["describe", "run", "ckpt-0"]);
    assert!(describe.contains("RESUMED FROM"), "{describe}");
    assert!(describe.contains("checkpoint "), "{describe}");
    assert!(describe.contains("Checkpoints:"), "{describe}");
    assert!(
        describe.contains("final"),
        "the last sync is the final one: {describe}"
    );

    support::cli::kill9(&mut controller);
    // Deleting the job takes its checkpoints with it.
    a.ok(&["delete", "job", "ckpt"]);
    a.wait_for("the checkpoints to go", Duration::from_secs(30), || {
        !a.home().join("checkpoints/ckpt-0").exists()
    });
}

/// The run resumed once, from at least the newest checkpoint home at the loss, went on
/// from there to the end, and lost at most one interval of steps.
fn check_resumed(step_log: &std::path::Path, first_tag: &str, lost_at: u64, newest_step: u64) {
    let (steps, resumes) = read_log(step_log);
    assert_eq!(resumes.len(), 1, "one resume: {resumes:?}");
    let (resumed_at, from) = &resumes[0];
    assert!(
        from.starts_with('/') && from.ends_with("/work/ckpt"),
        "ASIMOV_RESUME_FROM is the absolute checkpoint path: {from}"
    );
    assert!(*resumed_at >= newest_step, "{resumed_at} < {newest_step}");
    // The second attempt went on from the checkpoint, not from zero, and finished.
    let second: Vec<u64> = steps
        .iter()
        .filter(|(_, tag)| *tag != first_tag)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(second.first(), Some(&(resumed_at + 1)), "{second:?}");
    assert_eq!(second.last(), Some(&STEPS));
    // At most one interval lost: the controller's sync interval in steps, plus the
    // job's own checkpoint spacing, plus the steps a sync that started on time may take
    // to finish on a loaded machine (SYNC_SECS).
    let interval_steps = ((EVERY_SECS + SYNC_SECS) / STEP_SECS).ceil() as u64 + CKPT_STEPS;
    let lost = lost_at - resumed_at;
    eprintln!("lost {lost} steps (steps {resumed_at}..{lost_at}); bound {interval_steps}");
    assert!(
        lost <= interval_steps,
        "lost {lost} steps, more than one interval ({interval_steps})"
    );
}

fn fleet(hosts: &[(&str, &Sshd)]) -> String {
    let mut text = String::from(
        "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  hosts:\n",
    );
    for (name, sshd) in hosts {
        text.push_str(&format!(
            "    - {{name: {name}, user: {}, address: {}, port: {}, identity_file: {}, gpus: 0}}\n",
            sshd.user(),
            sshd.host(),
            sshd.port(),
            sshd.client_key().display()
        ));
    }
    text
}

#[test]
fn ssh_host_lost_mid_run_resumes_on_another_host_from_the_latest_checkpoint() {
    let Some(mut h1) = Sshd::start_or_skip() else {
        return;
    };
    let Some(h2) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_ckpt.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let fleet = a.manifest("fleet.yaml", &fleet(&[("box-1", &h1), ("box-2", &h2)]));
    let file = a.manifest(
        "ckpt.yaml",
        &job(&step_log, "  placement: [{provider: ssh, fleet: lab}]\n"),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    a.wait_for(
        "two checkpoints and 15 steps",
        Duration::from_secs(60),
        || complete_checkpoints(&a, "ckpt-0").len() >= 2 && read_log(&step_log).0.len() >= 15,
    );
    let newest = *complete_checkpoints(&a, "ckpt-0").last().unwrap();
    let newest_step: u64 = std::fs::read_to_string(
        a.home()
            .join("checkpoints/ckpt-0")
            .join(newest.to_string())
            .join("step"),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    // box-1 (the fleet's first host) dies: its server and the job on it.
    let runs = a.runs_json();
    assert_eq!(runs["items"][0]["host"], "box-1", "{runs}");
    let tag = runs["items"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_string();
    h1.stop();
    for _ in 0..3 {
        for pid in support::sshd::processes_with_env(&format!("ASIMOV_INSTANCE={tag}")) {
            // SAFETY: signalling a process by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let (before, _) = read_log(&step_log);
    let lost_at = before.last().unwrap().0;

    let lost = std::time::Instant::now();
    a.wait_for("the run to succeed", Duration::from_secs(180), || {
        a.run_phase("ckpt-0").as_deref() == Some("Succeeded")
    });
    let run = a.runs_json()["items"][0].clone();
    assert_eq!(run["host"], "box-2", "{run}");
    eprintln!("finished on box-2 {:?} after box-1 died", lost.elapsed());
    check_resumed(&step_log, &before[0].1, lost_at, newest_step);
    let describe = a.ok(&["describe", "run", "ckpt-0"]);
    assert!(describe.contains("checkpoint "), "{describe}");
    // box-1 back, so that its stale slot can be destroyed and the delete finish.
    h1.restart();
    a.ok(&["delete", "job", "ckpt"]);
}
