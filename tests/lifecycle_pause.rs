//! Pause and resume through the real binary. A job that counts steps and checkpoints
//! every few is paused mid-run: its checkpoint comes home, no instance is left, the run
//! shows Paused and stays so across a controller restart; resumed, a new attempt goes
//! on from that checkpoint, with the same `ASIMOV_RUN_ID` (and `WANDB_RUN_ID`). On
//! local and on an SSH fleet host; `spec.paused` and `schedule.pause_at` pause the same
//! way.

mod support;

use std::path::Path;
use std::time::Duration;
use support::cli::Asimov;
use support::sshd::Sshd;

const STEPS: u64 = 50;

/// Resumes from `ASIMOV_RESUME_FROM`, logs its ids once and every step to `$STEP_LOG`
/// (outside the instance), checkpoints every 2 steps, atomically.
const TRAIN: &str = r#"#!/bin/sh
set -eu
step=0
if [ -n "${ASIMOV_RESUME_FROM:-}" ] && [ -f "$ASIMOV_RESUME_FROM/step" ]; then
  step=$(cat "$ASIMOV_RESUME_FROM/step")
  echo "resume $step" >>"$STEP_LOG"
fi
echo "ids ${ASIMOV_RUN_ID:-none} ${WANDB_RUN_ID:-none} ${WANDB_RESUME:-none}" >>"$STEP_LOG"
mkdir -p ckpt
while [ "$step" -lt "$STEPS" ]; do
  sleep 0.2
  step=$((step + 1))
  echo "step $step" >>"$STEP_LOG"
  echo "ASIMOV_PROGRESS $step/$STEPS"
  if [ $((step % 2)) -eq 0 ]; then
    printf '%s\n' "$step" >ckpt/.step.tmp && mv ckpt/.step.tmp ckpt/step
  fi
done
"#;

fn job(name: &str, step_log: &Path, extra: &str) -> String {
    format!(
        r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: {name}}}
spec:
  source: {{workdir: .}}
  run: sh train_pause.sh
  env: {{STEP_LOG: "{log}", STEPS: "{STEPS}"}}
  checkpoint: {{path: ckpt, every: 1s}}
{extra}"#,
        log = step_log.display()
    )
}

#[derive(Debug, Default)]
struct Log {
    steps: Vec<u64>,
    resumes: Vec<u64>,
    /// (ASIMOV_RUN_ID, WANDB_RUN_ID, WANDB_RESUME) of each attempt.
    ids: Vec<(String, String, String)>,
}

fn read_log(path: &Path) -> Log {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut log = Log::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["step", n] => log.steps.push(n.parse().unwrap()),
            ["resume", n] => log.resumes.push(n.parse().unwrap()),
            ["ids", a, b, c] => log.ids.push((a.to_string(), b.to_string(), c.to_string())),
            _ => panic!("unexpected step log line {line:?}"),
        }
    }
    log
}

fn newest_checkpoint_step(a: &Asimov, run: &str) -> Option<u64> {
    let dir = a.home().join("checkpoints").join(run);
    let newest: u64 = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .max()?;
    std::fs::read_to_string(dir.join(newest.to_string()).join("step"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Pauses `run` mid-run and checks what is left: nothing running, the checkpoint home.
/// Returns the newest checkpoint's step.
fn pause_mid_run(a: &Asimov, run: &str, step_log: &Path, left: impl Fn() -> Vec<String>) -> u64 {
    a.wait_for("8 steps and a checkpoint", Duration::from_secs(90), || {
        read_log(step_log).steps.len() >= 8 && newest_checkpoint_step(a, run).is_some()
    });
    let out = a.ok(&["pause", run]);
    assert!(out.contains(&format!("run/{run} paused")), "{out}");
    assert_eq!(a.run_phase(run).as_deref(), Some("Paused"));
    let instances = left();
    assert!(
        instances.is_empty(),
        "pause left an instance: {instances:?}"
    );
    let at_pause = newest_checkpoint_step(a, run).expect("a checkpoint at home");
    let paused_steps = read_log(step_log).steps.len();
    assert!(
        (paused_steps as u64) < STEPS,
        "the job ran to its end before the pause ({paused_steps} steps)"
    );
    at_pause
}

/// Resumes `run` and checks it went on from the checkpoint kept at the pause.
fn resume_and_finish(a: &Asimov, run: &str, step_log: &Path, at_pause: u64) {
    let before = read_log(step_log);
    let out = a.ok(&["resume", run]);
    assert!(out.contains(&format!("run/{run} resumed")), "{out}");
    a.wait_for("the run to succeed", Duration::from_secs(120), || {
        a.run_phase(run).as_deref() == Some("Succeeded")
    });
    let log = read_log(step_log);
    assert_eq!(log.resumes.len(), 1, "{log:?}");
    assert!(
        log.resumes[0] >= at_pause,
        "resumed from step {} though step {at_pause} was checkpointed",
        log.resumes[0]
    );
    // The new attempt's first step follows its checkpoint; the job reached its end.
    let after: Vec<u64> = log.steps[before.steps.len()..].to_vec();
    assert_eq!(after.first(), Some(&(log.resumes[0] + 1)), "{after:?}");
    assert_eq!(log.steps.last(), Some(&STEPS));
    // One run id across both attempts, handed to wandb too.
    assert_eq!(log.ids.len(), 2, "{log:?}");
    assert_eq!(log.ids[0], log.ids[1], "the ids changed across attempts");
    let (id, wandb, resume) = &log.ids[0];
    assert!(
        id.starts_with(&format!("{run}-")) && id.len() == run.len() + 9,
        "{id}"
    );
    assert_eq!(wandb, id);
    assert_eq!(resume, "allow");
    let run_json = a.runs_json()["items"][0].clone();
    assert_eq!(run_json["attempt"], 2, "{run_json}");
    let describe = a.ok(&["describe", "run", run]);
    assert!(describe.contains("paused"), "{describe}");
    assert!(describe.contains("checkpoint "), "{describe}");
    assert!(
        describe.contains(id.as_str()),
        "describe shows the run id: {describe}"
    );
}

#[test]
fn local_pause_leaves_no_instance_survives_a_restart_and_resume_continues() {
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_pause.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let file = a.manifest("pz.yaml", &job("pz", &step_log, ""));
    let mut controller = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    let at_pause = pause_mid_run(&a, "pz-0", &step_log, || {
        let mut left = a.local_instances();
        left.extend(a.job_processes().iter().map(|p| format!("pid {p}")));
        left
    });
    // Pausing again is harmless.
    assert!(a.ok(&["pause", "pz"]).contains("already paused"));

    // The controller restarts while the run is paused: it stays paused. A second job
    // that runs to its end proves the new controller made its passes meanwhile.
    support::cli::kill9(&mut controller);
    let mut controller = a.spawn_controller(None);
    let marker = a.manifest(
        "marker.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: marker}\nspec:\n  run: \"true\"\n",
    );
    a.ok(&["apply", "-f", marker.to_str().unwrap()]);
    a.wait_for("the marker job to succeed", Duration::from_secs(60), || {
        a.run_phase("marker-0").as_deref() == Some("Succeeded")
    });
    assert_eq!(a.run_phase("pz-0").as_deref(), Some("Paused"));
    let left: Vec<String> = a
        .local_instances()
        .into_iter()
        .filter(|i| i.contains(".pz-0."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let steps = read_log(&step_log).steps.len();
    assert!(
        read_log(&step_log).resumes.is_empty(),
        "started again while paused"
    );

    resume_and_finish(&a, "pz-0", &step_log, at_pause);
    assert!(read_log(&step_log).steps.len() > steps);
    // A finished run cannot be paused, a running one not resumed.
    let out = a.run(&["pause", "pz-0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already ended"));
    support::cli::kill9(&mut controller);
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
fn ssh_pause_leaves_no_slot_on_the_host_and_resume_continues() {
    let Some(h1) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_pause.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let fleet = a.manifest("fleet.yaml", &fleet(&[("box-1", &h1)]));
    let file = a.manifest(
        "pz.yaml",
        &job(
            "pzs",
            &step_log,
            "  placement: [{provider: ssh, fleet: lab}]\n",
        ),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    let slots = h1.home().join(".asimov-agent/instances");
    let at_pause = pause_mid_run(&a, "pzs-0", &step_log, || {
        let mut left: Vec<String> = std::fs::read_dir(&slots)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path().display().to_string())
                    .collect()
            })
            .unwrap_or_default();
        left.extend(
            support::sshd::processes_with_env("ASIMOV_INSTANCE=")
                .iter()
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/environ"))
                        .is_ok_and(|e| String::from_utf8_lossy(&e).contains("pzs-0"))
                })
                .map(|p| format!("pid {p}")),
        );
        left
    });
    let fleets = a.ok(&["get", "fleets", "-o", "json"]);
    assert!(
        !fleets.contains("pzs-0"),
        "the host still runs it: {fleets}"
    );
    resume_and_finish(&a, "pzs-0", &step_log, at_pause);
    a.ok(&["delete", "job", "pzs"]);
}

#[test]
fn spec_paused_holds_runs_until_the_manifest_lifts_it() {
    let a = Asimov::new();
    let text = |paused: bool| {
        format!(
            "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: held}}\nspec:\n  run: \"true\"\n  paused: {paused}\n"
        )
    };
    let file = a.manifest("held.yaml", &text(true));
    let mut controller = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("held-0 to show Paused", Duration::from_secs(60), || {
        a.run_phase("held-0").as_deref() == Some("Paused")
    });
    assert!(a.local_instances().is_empty());
    assert_eq!(a.runs_json()["items"][0]["attempt"], 0);
    // The CLI does not override the manifest.
    let out = a.run(&["resume", "held-0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("paused: true"), "{err}");
    // The manifest lifts it.
    std::fs::write(&file, text(false)).unwrap();
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("held-0 to succeed", Duration::from_secs(60), || {
        a.run_phase("held-0").as_deref() == Some("Succeeded")
    });
    support::cli::kill9(&mut controller);
}

#[test]
fn schedule_pause_at_pauses_at_its_time_and_resume_lifts_it() {
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_pause.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let file = a.manifest("pa.yaml", &job("pa", &step_log, ""));
    let mut controller = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("8 steps and a checkpoint", Duration::from_secs(90), || {
        read_log(&step_log).steps.len() >= 8 && newest_checkpoint_step(&a, "pa-0").is_some()
    });
    // Pause in two seconds, by the manifest (the spec hash changes; a running run goes
    // on until the time comes).
    // Whole seconds, as the manifest holds it: the pause is due at this instant, not at
    // the sub-second one it was rounded from.
    let at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let at = chrono::DateTime::from_timestamp(at.timestamp(), 0).expect("a time in range");
    let extra = format!(
        "  schedule: {{pause_at: \"{}\"}}\n",
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    std::fs::write(&file, job("pa", &step_log, &extra)).unwrap();
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("pa-0 to pause at its time", Duration::from_secs(60), || {
        a.run_phase("pa-0").as_deref() == Some("Paused") && a.local_instances().is_empty()
    });
    assert!(chrono::Utc::now() >= at);
    let run = a.runs_json()["items"][0].clone();
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("schedule.pause_at"),
        "{run}"
    );
    let at_pause = newest_checkpoint_step(&a, "pa-0").unwrap();
    resume_and_finish(&a, "pa-0", &step_log, at_pause);
    support::cli::kill9(&mut controller);
}

#[test]
fn a_job_keeps_its_own_wandb_run_id() {
    let a = Asimov::new();
    let logs = tempfile::tempdir().unwrap();
    let out = logs.path().join("env.txt");
    let file = a.manifest(
        "own.yaml",
        &format!(
            "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: own}}\nspec:\n  run: sh -c 'echo \"$ASIMOV_RUN_ID $WANDB_RUN_ID $WANDB_RESUME\" > {}'\n  env: {{WANDB_RUN_ID: mine, WANDB_RESUME: must}}\n",
            out.display()
        ),
    );
    let mut controller = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("own-0 to succeed", Duration::from_secs(60), || {
        a.run_phase("own-0").as_deref() == Some("Succeeded")
    });
    let text = std::fs::read_to_string(&out).unwrap();
    let parts: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{text}");
    assert!(parts[0].starts_with("own-0-"), "{text}");
    assert_eq!(&parts[1..], ["mine", "must"]);
    support::cli::kill9(&mut controller);
}

#[test]
fn wide_listing_and_describe_show_the_latest_metric_of_the_stop_rule() {
    let a = Asimov::new();
    let logs = tempfile::tempdir().unwrap();
    let go = logs.path().join("go");
    std::fs::write(
        a.repo.path().join("met.sh"),
        format!(
            "for i in 1 2 3; do echo \"{{\\\"step\\\": $i, \\\"val_acc\\\": 0.$i}}\" >>\"$ASIMOV_METRICS\"; done\nwhile [ ! -e {go} ]; do sleep 0.2; done\n",
            go = go.display()
        ),
    )
    .unwrap();
    let file = a.manifest(
        "met.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: met}\nspec:\n  source: {workdir: .}\n  run: sh met.sh\n  stop_when: [{metric: val_acc, mode: max, patience: 50}]\n",
    );
    let mut controller = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for(
        "the metric in get runs -o wide",
        Duration::from_secs(60),
        || a.ok(&["get", "runs", "-o", "wide"]).contains("val_acc=0.3"),
    );
    let wide = a.ok(&["get", "runs", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("METRIC"), "{wide}");
    let describe = a.ok(&["describe", "run", "met-0"]);
    assert!(
        describe.contains("Metrics:     step=3 val_acc=0.3 (attempt 1"),
        "{describe}"
    );
    std::fs::write(&go, "").unwrap();
    a.wait_for("met-0 to succeed", Duration::from_secs(60), || {
        a.run_phase("met-0").as_deref() == Some("Succeeded")
    });
    support::cli::kill9(&mut controller);
}

// ---- The planner's side of scheduled pauses (pure). ----

mod window {
    use asimov::manifest::{Job, JobSpec, Schedule, Window};
    use asimov::model::{Outcome, OwnerTag, Phase, ProviderKind, Timestamp, Usd};
    use asimov::provider::{Instance, InstanceState};
    use asimov::reconcile::{AgentObservation, Desired, History, ListResult, Observed, Op, plan};
    use asimov::store::{AttemptRecord, Pause, RunRecord};
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// 2027-01-15 00:00:00 UTC, a midnight.
    const MIDNIGHT: Timestamp = 1_800_000_000 - 1_800_000_000 % 86_400;
    const RUN: &str = "w-0";

    fn job(window: Window) -> Desired {
        let spec = JobSpec {
            schedule: Some(Schedule {
                window: Some(window),
                ..Schedule::default()
            }),
            ..JobSpec::with_run("python train.py")
        };
        Desired::new(vec![Job::from_spec("w", spec, 1, "h1")], vec![], "c")
    }

    /// A run Running on local attempt 1.
    fn running() -> (History, Observed) {
        let tag = OwnerTag::new("c", RUN, 1);
        let mut h = History::default();
        h.runs.insert(
            RUN.into(),
            RunRecord {
                seq: 1,
                phase: Phase::Running,
                reason: "running on local/i-1".into(),
                attempt: 1,
                ..RunRecord::new_pending(RUN, "w", 0, "h1", &BTreeMap::new(), "", MIDNIGHT - 9000)
            },
        );
        h.attempts.insert(
            RUN.into(),
            vec![AttemptRecord {
                run: RUN.into(),
                attempt: 1,
                tag: tag.render(),
                provider: ProviderKind::Local,
                placement_index: 0,
                instance_id: Some("i-1".into()),
                host: None,
                intent_at: MIDNIGHT - 9000,
                released_at: None,
                outcome: None,
            }],
        );
        let mut o = Observed::default();
        o.listed.insert(
            ProviderKind::Local,
            ListResult::Listed(vec![Instance {
                provider: ProviderKind::Local,
                id: "i-1".into(),
                tag: tag.clone(),
                state: InstanceState::Running,
                endpoint: None,
                gpu: None,
                price_per_hour: Usd::from_dollars(0.0),
                created_at: Some(MIDNIGHT - 9000),
                host: None,
            }]),
        );
        o.agents.insert(
            tag.render(),
            AgentObservation::Status(asimov::agent::AgentStatus {
                state: asimov::agent::AgentState::Running,
                exit_code: None,
                heartbeat: None,
                started_at: None,
                finished_at: None,
                progress: None,
                dead_for: None,
            }),
        );
        (h, o)
    }

    fn paused_by(d: &Desired, h: &History, o: &Observed, now: Timestamp) -> Option<String> {
        plan(d, o, h, now).ops.iter().find_map(|op| match op {
            Op::SetStatus(s) if s.phase == Phase::Paused => {
                assert_eq!(s.outcome.as_ref().map(|(_, o)| o), Some(&Outcome::Paused));
                Some(s.reason.clone())
            }
            _ => None,
        })
    }

    #[test]
    fn a_daily_window_pauses_outside_it_and_a_resume_lifts_it_until_the_next_close() {
        // Cheap hours: 22:00 to 06:00 UTC, across midnight.
        let w = Window {
            start: 22 * 60,
            end: 6 * 60,
        };
        assert!(w.contains(MIDNIGHT + 3600) && w.contains(MIDNIGHT - 3600));
        assert!(!w.contains(MIDNIGHT + 6 * 3600) && w.contains(MIDNIGHT + 6 * 3600 - 1));
        assert!(!w.contains(MIDNIGHT + 12 * 3600));
        let d = job(w);
        let (mut h, o) = running();
        // Inside: it runs, and the planner looks again no later than the close.
        let at_one = MIDNIGHT + 3600;
        assert_eq!(paused_by(&d, &h, &o, at_one), None);
        let p = plan(&d, &o, &h, at_one);
        assert!(p.requeue_after.unwrap() <= Duration::from_secs(5 * 3600));
        // Outside (noon): paused, its checkpoint collected, the instance destroyed,
        // the wake set for 22:00.
        let noon = MIDNIGHT + 12 * 3600;
        let why = paused_by(&d, &h, &o, noon).expect("paused at noon");
        assert!(
            why.contains("outside its daily window 22:00-06:00 UTC"),
            "{why}"
        );
        let p = plan(&d, &o, &h, noon);
        let kinds: Vec<&str> = p.ops.iter().map(|op| op.kind()).collect();
        assert_eq!(
            kinds,
            ["set-status", "collect", "destroy"],
            "{}",
            p.render()
        );
        // Once paused and released, a pass plans nothing (and is looked at again).
        let mut steady = h.clone();
        let rec = steady.runs.get_mut(RUN).unwrap();
        rec.phase = Phase::Paused;
        rec.reason = why.clone();
        let a = &mut steady.attempts.get_mut(RUN).unwrap()[0];
        a.outcome = Some(Outcome::Paused);
        a.released_at = Some(noon);
        let mut gone = o.clone();
        gone.listed
            .insert(ProviderKind::Local, ListResult::Listed(vec![]));
        let p = plan(&d, &gone, &steady, noon + 60);
        assert!(p.ops.is_empty(), "{}", p.render());
        assert!(p.requeue_after.is_some());
        // At 22:00 the window opens: a new attempt, counting no restart.
        let p = plan(&d, &gone, &steady, MIDNIGHT + 22 * 3600);
        assert!(
            p.ops
                .iter()
                .any(|op| matches!(op, Op::Create { attempt: 2, .. })),
            "{}",
            p.render()
        );
        // `asimov resume` at 13:00 lifts the window's pause until its next close.
        h.pauses.insert(
            RUN.into(),
            Pause {
                paused: false,
                at: MIDNIGHT + 13 * 3600,
            },
        );
        assert_eq!(paused_by(&d, &h, &o, MIDNIGHT + 14 * 3600), None);
        let next_day = MIDNIGHT + 86_400 + 7 * 3600;
        assert!(paused_by(&d, &h, &o, next_day).is_some());
        // `asimov pause` holds whatever the window says.
        h.pauses.insert(
            RUN.into(),
            Pause {
                paused: true,
                at: MIDNIGHT,
            },
        );
        let why = paused_by(&d, &h, &o, at_one).expect("paused by the CLI");
        assert!(why.contains("asimov pause"), "{why}");
    }
}
