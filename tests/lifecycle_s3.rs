//! Outputs and checkpoints through a real S3-compatible server (moto_server) and the
//! real binary: checkpoints synced there incrementally and restored from there by a new
//! attempt after the instance is lost; the agent's own final sync when the controller
//! is killed as the job ends (and, for a fleet without S3, the outputs pulled back over
//! rsync before the teardown once the controller returns); a final sync that fails for
//! good is said in the run's events and does not hold the teardown back forever.

mod support;

use std::io::Write;
use std::process::{Child, Stdio};
use std::time::Duration;
use support::cli::Asimov;
use support::s3_server::{KEY_ID, S3Server, SECRET_KEY};
use support::sshd::Sshd;

const BUCKET: &str = "asimov-test";
/// Seconds between the controller's checkpoint syncs (`checkpoint.every`).
const EVERY_SECS: f64 = 1.0;
/// How long one sync may take under load (a pass, the agent's second of marking, curl).
const SYNC_SECS: f64 = 3.0;
const STEP_SECS: f64 = 0.2;
const CKPT_STEPS: u64 = 2;
const STEPS: u64 = 40;

/// The tiny training script: resumes from `ASIMOV_RESUME_FROM`, logs every step to
/// `$STEP_LOG` outside the instance, writes a large file once (a sync after it must not
/// send it again, nor a restore make it new) and its step counter atomically; at the end
/// writes outputs, and with `$GATE` set says it is ending and waits for `$GATE/go`.
const TRAIN: &str = r#"#!/bin/sh
set -eu
step=0
if [ -n "${ASIMOV_RESUME_FROM:-}" ]; then
  step=$(cat "$ASIMOV_RESUME_FROM/step")
  echo "resume $step $ASIMOV_RESUME_FROM" >>"$STEP_LOG"
fi
mkdir -p ckpt/sub out
[ -f ckpt/sub/weights.bin ] || head -c 300000 /dev/urandom >ckpt/sub/weights.bin
while [ "$step" -lt "$STEPS" ]; do
  sleep "$STEP_SECS"
  step=$((step + 1))
  echo "step $step $ASIMOV_INSTANCE" >>"$STEP_LOG"
  echo "ASIMOV_PROGRESS $step/$STEPS"
  if [ $((step % CKPT_STEPS)) -eq 0 ]; then
    printf '%s\n' "$step" >ckpt/.step.tmp && mv ckpt/.step.tmp ckpt/step
  fi
done
echo "done at $step" >out/result.txt
echo spaced >"out/with space.txt"
if [ -n "${GATE:-}" ]; then
  : >"$GATE/ending"
  while [ ! -e "$GATE/go" ]; do sleep 0.1; done
fi
"#;

fn job(step_log: &std::path::Path, steps: u64, extra_env: &str, rest: &str) -> String {
    format!(
        r#"
apiVersion: asimov/v1
kind: Job
metadata: {{name: ckpt}}
spec:
  source: {{workdir: .}}
  run: sh train_s3.sh
  env: {{STEP_LOG: "{log}", STEPS: "{steps}", STEP_SECS: "{STEP_SECS}", CKPT_STEPS: "{CKPT_STEPS}"{extra_env}}}
  retry: {{on: [preemption], max_restarts: 2}}
{rest}"#,
        log = step_log.display()
    )
}

fn set_secret(a: &Asimov, name: &str, value: &str) {
    let mut child = a
        .command()
        .args(["secret", "set", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("asimov secret set");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(value.as_bytes())
        .expect("write secret");
    assert!(child.wait().expect("secret set ends").success());
}

fn keys(a: &Asimov) {
    set_secret(a, "AWS_ACCESS_KEY_ID", KEY_ID);
    set_secret(a, "AWS_SECRET_ACCESS_KEY", SECRET_KEY);
}

/// A foreground controller that finds the S3 server through `ASIMOV_S3_ENDPOINT_URL`.
fn controller(a: &Asimov, s3: Option<&S3Server>) -> Child {
    use std::os::unix::fs::OpenOptionsExt;
    let stderr = std::fs::OpenOptions::new()
        .mode(0o600)
        .create(true)
        .append(true)
        .open(a.controller_stderr())
        .expect("controller stderr file");
    let mut cmd = a.command();
    cmd.arg("controller").stdout(Stdio::null()).stderr(stderr);
    if let Some(s3) = s3 {
        cmd.env("ASIMOV_S3_ENDPOINT_URL", s3.endpoint());
    }
    let child = cmd.spawn().expect("controller starts");
    wait(a, "the controller to hold its lock", 10, || {
        a.controller_running()
    });
    child
}

/// Waits for `done`; on a timeout, says what the run and the controller said.
fn wait(a: &Asimov, what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        if start.elapsed() > Duration::from_secs(secs) {
            let describe = a.run(&["describe", "run", "ckpt-0"]);
            let stderr = std::fs::read_to_string(a.controller_stderr()).unwrap_or_default();
            let tail: String = stderr.lines().rev().take(40).collect::<Vec<_>>().join("\n");
            panic!(
                "timed out after {secs}s waiting for {what}\n{}\ncontroller (last lines first):\n{tail}",
                String::from_utf8_lossy(&describe.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Complete checkpoints (manifests) of a run in S3, oldest first.
fn manifests(s3: &S3Server, run: &str) -> Vec<String> {
    let prefix = format!("runs/{run}/_checkpoints/manifests/");
    let mut found: Vec<String> = s3
        .keys(BUCKET, &prefix)
        .into_iter()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
        .collect();
    found.sort();
    found
}

/// The step a complete checkpoint holds, read as a restore would: its manifest, then
/// the object the manifest names for `step`.
fn checkpoint_step(s3: &S3Server, run: &str, generation: &str) -> u64 {
    let manifest = s3
        .get(
            BUCKET,
            &format!("runs/{run}/_checkpoints/manifests/{generation}"),
        )
        .expect("manifest");
    let manifest = String::from_utf8(manifest).expect("utf-8 manifest");
    let (holder, _) = manifest
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(_, p)| *p == "step")
        .unwrap_or_else(|| panic!("no step in {manifest}"));
    let bytes = s3
        .get(
            BUCKET,
            &format!("runs/{run}/_checkpoints/objects/{holder}/step"),
        )
        .expect("step object");
    String::from_utf8_lossy(&bytes)
        .trim()
        .parse()
        .expect("a step")
}

type Entry = (u64, String);

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

#[test]
fn checkpoints_round_trip_through_s3_and_outputs_arrive() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let a = Asimov::new();
    keys(&a);
    std::fs::write(a.repo.path().join("train_s3.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let file = a.manifest(
        "ckpt.yaml",
        &job(
            &step_log,
            STEPS,
            "",
            &format!(
                "  checkpoint: {{path: ckpt, every: {EVERY_SECS}s}}\n  \
                 artifacts: {{paths: [out], to: s3://{BUCKET}/runs}}\n"
            ),
        ),
    );
    let mut ctl = controller(&a, Some(&s3));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);

    wait(&a, "two checkpoints in S3 and 15 steps", 90, || {
        manifests(&s3, "ckpt-0").len() >= 2 && read_log(&step_log).0.len() >= 15
    });
    // The instance is lost (processes killed, folder gone), the controller with it.
    support::cli::kill9(&mut ctl);
    let instances = a.local_instances();
    assert_eq!(instances.len(), 1, "{instances:?}");
    for _ in 0..3 {
        for pid in a.job_processes() {
            // SAFETY: signalling a process by pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
    std::fs::remove_dir_all(a.home().join("local").join(&instances[0])).unwrap();
    let newest = manifests(&s3, "ckpt-0").last().cloned().unwrap();
    let newest_step = checkpoint_step(&s3, "ckpt-0", &newest);
    let (before, _) = read_log(&step_log);
    let lost_at = before.last().unwrap().0;
    let first_tag = before[0].1.clone();

    let mut ctl = controller(&a, Some(&s3));
    wait(&a, "the run to succeed", 180, || {
        a.run_phase("ckpt-0").as_deref() == Some("Succeeded")
    });
    let describe = a.ok(&["describe", "run", "ckpt-0"]);
    let run = a.runs_json()["items"][0].clone();
    assert_eq!(run["attempt"], 2, "{run}\n{describe}");

    // Resumed once, from at least the newest complete checkpoint in S3 at the loss,
    // with at most one interval of work lost.
    let (steps, resumes) = read_log(&step_log);
    assert_eq!(resumes.len(), 1, "{resumes:?}");
    let (resumed_at, from) = &resumes[0];
    assert!(
        from.starts_with('/') && from.ends_with("/work/ckpt"),
        "{from}"
    );
    assert!(*resumed_at >= newest_step, "{resumed_at} < {newest_step}");
    let second: Vec<u64> = steps
        .iter()
        .filter(|(_, t)| *t != first_tag)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(second.first(), Some(&(resumed_at + 1)), "{second:?}");
    assert_eq!(second.last(), Some(&STEPS));
    let bound = ((EVERY_SECS + SYNC_SECS) / STEP_SECS).ceil() as u64 + CKPT_STEPS;
    let lost = lost_at - resumed_at;
    eprintln!("lost {lost} steps (bound {bound})");
    assert!(
        lost <= bound,
        "lost {lost} steps, more than one interval ({bound})"
    );

    // Incremental: the large file was uploaded once, by the first attempt's first
    // sync; every later checkpoint (and the restore) points at that one object.
    let weights: Vec<String> = s3
        .keys(BUCKET, "runs/ckpt-0/_checkpoints/objects/")
        .into_iter()
        .filter(|k| k.ends_with("/sub/weights.bin"))
        .collect();
    assert_eq!(weights.len(), 1, "{weights:?}");
    let all = manifests(&s3, "ckpt-0");
    let last = all.last().unwrap();
    assert!(
        last.ends_with("-a2"),
        "the final checkpoint is the second attempt's: {all:?}"
    );
    assert_eq!(checkpoint_step(&s3, "ckpt-0", last), STEPS);

    // Outputs at s3://bucket/runs/<run>/out/..., names with spaces included.
    assert_eq!(
        s3.get(BUCKET, "runs/ckpt-0/out/result.txt").as_deref(),
        Some(format!("done at {STEPS}\n").as_bytes())
    );
    assert_eq!(
        s3.get(BUCKET, "runs/ckpt-0/out/with space.txt").as_deref(),
        Some(&b"spaced\n"[..])
    );
    // Nothing of the outputs came home: they went to S3.
    assert!(!a.home().join("artifacts/ckpt-0").exists());
    let describe = a.ok(&["describe", "run", "ckpt-0"]);
    assert!(describe.contains("RESUMED FROM"), "{describe}");
    assert!(describe.contains("in S3"), "{describe}");
    assert!(describe.contains("Synced"), "{describe}");
    // The keys never reached the log or the controller's diagnostics.
    for text in [
        std::fs::read_to_string(a.controller_stderr()).unwrap_or_default(),
        a.ok(&["logs", "ckpt-0"]),
        describe,
    ] {
        assert!(!text.contains(SECRET_KEY), "secret leaked: {text}");
    }
    support::cli::kill9(&mut ctl);
}

/// Index of `reason` among the run's events in `describe` (its first occurrence).
fn event_at(describe: &str, reason: &str) -> usize {
    let events = describe
        .find("Events:")
        .unwrap_or_else(|| panic!("{describe}"));
    describe[events..]
        .find(reason)
        .map(|i| events + i)
        .unwrap_or_else(|| panic!("no {reason} event: {describe}"))
}

#[test]
fn agent_syncs_to_s3_itself_when_the_controller_is_killed_as_the_job_ends() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let a = Asimov::new();
    keys(&a);
    std::fs::write(a.repo.path().join("train_s3.sh"), TRAIN).unwrap();
    let gate = tempfile::tempdir().unwrap();
    let step_log = gate.path().join("steps.log");
    let file = a.manifest(
        "ckpt.yaml",
        &job(
            &step_log,
            3,
            &format!(", GATE: \"{}\"", gate.path().display()),
            // The endpoint as a field this time (no ASIMOV_S3_ENDPOINT_URL).
            &format!(
                "  checkpoint: {{path: ckpt, every: 1h}}\n  \
                 artifacts: {{paths: [out], to: s3://{BUCKET}/runs, endpoint: \"{}\"}}\n",
                s3.endpoint()
            ),
        ),
    );
    let mut ctl = controller(&a, None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    wait(&a, "the job to end", 60, || {
        gate.path().join("ending").exists()
    });
    support::cli::kill9(&mut ctl);
    std::fs::write(gate.path().join("go"), "").unwrap();
    // No controller: the agent's own final sync brings outputs and checkpoint to S3.
    wait(&a, "the outputs in S3", 60, || {
        s3.get(BUCKET, "runs/ckpt-0/out/result.txt").is_some()
    });
    assert_eq!(
        s3.get(BUCKET, "runs/ckpt-0/out/result.txt").as_deref(),
        Some(&b"done at 3\n"[..])
    );
    wait(&a, "the final checkpoint in S3", 30, || {
        !manifests(&s3, "ckpt-0").is_empty()
    });
    assert_eq!(
        a.local_instances().len(),
        1,
        "nothing tore it down meanwhile"
    );

    let mut ctl = controller(&a, None);
    wait(&a, "the run to succeed", 60, || {
        a.run_phase("ckpt-0").as_deref() == Some("Succeeded")
    });
    wait(&a, "the teardown", 60, || a.local_instances().is_empty());
    let describe = a.ok(&["describe", "run", "ckpt-0"]);
    assert!(
        event_at(&describe, "Synced") < event_at(&describe, "Destroyed"),
        "{describe}"
    );
    assert!(describe.contains("final checkpoint 1 in S3"), "{describe}");
    support::cli::kill9(&mut ctl);
}

#[test]
fn a_final_sync_that_fails_for_good_is_said_and_the_instance_still_goes() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    // No such bucket: every upload is refused (404), which no retry changes.
    let a = Asimov::new();
    keys(&a);
    std::fs::write(a.repo.path().join("train_s3.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    let file = a.manifest(
        "ckpt.yaml",
        &job(
            &step_log,
            2,
            "",
            "  artifacts: {paths: [out], to: s3://no-such-bucket/runs}\n",
        ),
    );
    let mut ctl = controller(&a, Some(&s3));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    wait(&a, "the run to end", 120, || {
        a.run_phase("ckpt-0").as_deref() == Some("Succeeded")
    });
    wait(&a, "the teardown", 120, || a.local_instances().is_empty());
    let describe = a.ok(&["describe", "run", "ckpt-0"]);
    assert!(
        event_at(&describe, "SyncFailed") < event_at(&describe, "Destroyed"),
        "{describe}"
    );
    assert!(describe.contains("final sync to S3 failed"), "{describe}");
    support::cli::kill9(&mut ctl);
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

/// The agent's state files of the fleet's slots on `sshd` (found by name).
fn slot_files(sshd: &Sshd, name: &str) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, name: &str, depth: u32, out: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_name() == name {
                out.push(path.clone());
            }
            if depth < 6 && e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, name, depth + 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&sshd.home(), name, 0, &mut out);
    out
}

#[test]
fn fleet_outputs_come_home_over_rsync_before_teardown_when_the_controller_returns() {
    let Some(sshd) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    std::fs::write(a.repo.path().join("train_s3.sh"), TRAIN).unwrap();
    let gate = tempfile::tempdir().unwrap();
    let step_log = gate.path().join("steps.log");
    let fleet = a.manifest("fleet.yaml", &fleet(&sshd));
    let file = a.manifest(
        "ckpt.yaml",
        &job(
            &step_log,
            3,
            &format!(", GATE: \"{}\"", gate.path().display()),
            "  placement: [{provider: ssh, fleet: lab}]\n  artifacts: {paths: [out]}\n",
        ),
    );
    let mut ctl = controller(&a, None);
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    wait(&a, "the job to end", 60, || {
        gate.path().join("ending").exists()
    });
    support::cli::kill9(&mut ctl);
    std::fs::write(gate.path().join("go"), "").unwrap();
    wait(&a, "the agent to record the end", 60, || {
        slot_files(&sshd, "finished_at").len() == 1
    });
    // The controller away: the outputs still on the host, nothing torn down.
    assert!(!a.home().join("artifacts/ckpt-0/out/result.txt").exists());
    assert_eq!(slot_files(&sshd, "agent.sh").len(), 1);

    let mut ctl = controller(&a, None);
    wait(&a, "the run to succeed", 60, || {
        a.run_phase("ckpt-0").as_deref() == Some("Succeeded")
    });
    wait(&a, "the slot to go", 60, || {
        slot_files(&sshd, "agent.sh").is_empty()
    });
    assert_eq!(
        std::fs::read_to_string(a.home().join("artifacts/ckpt-0/out/result.txt")).unwrap(),
        "done at 3\n"
    );
    let describe = a.ok(&["describe", "run", "ckpt-0"]);
    assert!(
        event_at(&describe, "Collected") < event_at(&describe, "Destroyed"),
        "{describe}"
    );
    support::cli::kill9(&mut ctl);
}
