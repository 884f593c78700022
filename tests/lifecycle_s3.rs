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
    controller_with(a, s3, &[])
}

fn controller_with(a: &Asimov, s3: Option<&S3Server>, env: &[(&str, &str)]) -> Child {
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
    cmd.envs(env.iter().copied());
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
    // Old checkpoints were pruned: the newest two stay, and the one the second attempt
    // resumed from (protected while it runs).
    assert!(all.len() <= 3, "{all:?}");

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

/// `describe run ckpt-0` once its events show `reason` (the instance can be gone a
/// moment before its Destroyed event is written).
fn describe_with(a: &Asimov, reason: &str) -> String {
    let has = |d: &str| d.find("Events:").is_some_and(|i| d[i..].contains(reason));
    wait(a, &format!("a {reason} event"), 60, || {
        has(&a.ok(&["describe", "run", "ckpt-0"]))
    });
    a.ok(&["describe", "run", "ckpt-0"])
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
    let describe = describe_with(&a, "Destroyed");
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
    let describe = describe_with(&a, "Destroyed");
    assert!(
        event_at(&describe, "SyncFailed") < event_at(&describe, "Destroyed"),
        "{describe}"
    );
    assert!(describe.contains("final sync to S3 failed"), "{describe}");
    support::cli::kill9(&mut ctl);
}

#[test]
fn pruning_keeps_the_newest_complete_checkpoints_and_every_object_they_name() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let client = s3.client(BUCKET);
    let run = "prune-0";
    let base = format!("{run}/_checkpoints");
    let put = |key: String, body: &str| {
        s3.block_on(client.put(&key, body.as_bytes().to_vec()))
            .expect("put");
    };
    let g = |seq: u64, attempt: u32| format!("{seq:08}-a{attempt}");
    // weights.bin written once by generation 1 and named by every later checkpoint;
    // step rewritten by each; gen 3 of attempt 1 never completed (its instance died);
    // gen 6 is a sync under way (objects, no manifest yet).
    put(format!("{base}/objects/{}/weights.bin", g(1, 1)), "w");
    for (seq, attempt) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)] {
        put(
            format!("{base}/objects/{}/step", g(seq, attempt)),
            &seq.to_string(),
        );
    }
    for (seq, attempt) in [(1, 1), (2, 1), (4, 2), (5, 2)] {
        let manifest = format!("{}\tweights.bin\n{}\tstep\n", g(1, 1), g(seq, attempt));
        put(format!("{base}/manifests/{}", g(seq, attempt)), &manifest);
    }
    // Attempt 2 resumed from checkpoint 2: it stays while that attempt runs.
    let pruned = s3
        .block_on(client.prune_checkpoints(run, 2, &[2]))
        .expect("prune");
    assert_eq!((pruned.checkpoints, pruned.objects), (1, 2), "{pruned:?}");
    let mut left = s3.keys(BUCKET, &format!("{base}/"));
    left.sort();
    let want: Vec<String> = [
        format!("manifests/{}", g(2, 1)),
        format!("manifests/{}", g(4, 2)),
        format!("manifests/{}", g(5, 2)),
        format!("objects/{}/step", g(2, 1)),
        format!("objects/{}/weights.bin", g(1, 1)),
        format!("objects/{}/step", g(4, 2)),
        format!("objects/{}/step", g(5, 2)),
        format!("objects/{}/step", g(6, 2)),
    ]
    .into_iter()
    .map(|k| format!("{base}/{k}"))
    .collect::<std::collections::BTreeSet<_>>()
    .into_iter()
    .collect();
    assert_eq!(left, want);
    // Unprotected, checkpoint 2 goes too; again, nothing more goes.
    let pruned = s3
        .block_on(client.prune_checkpoints(run, 2, &[]))
        .expect("prune");
    assert_eq!((pruned.checkpoints, pruned.objects), (1, 1), "{pruned:?}");
    let again = s3
        .block_on(client.prune_checkpoints(run, 2, &[]))
        .expect("prune");
    assert_eq!((again.checkpoints, again.objects), (0, 0));
    let left = s3.keys(BUCKET, &format!("{base}/"));
    assert_eq!(left.len(), 6, "{left:?}");
    assert!(left.contains(&format!("{base}/objects/{}/weights.bin", g(1, 1))));
    // Keep 0 still keeps the newest.
    s3.block_on(client.prune_checkpoints(run, 0, &[]))
        .expect("prune");
    let complete: Vec<String> = s3.keys(BUCKET, &format!("{base}/manifests/"));
    assert_eq!(complete, vec![format!("{base}/manifests/{}", g(5, 2))]);
}

#[test]
fn an_object_past_the_single_put_limit_goes_up_in_parts() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    // The limit lowered from S3's 5 GiB so the test stays small; parts of 5 MiB, the
    // least S3 (and moto) take for every part but the last: three parts.
    let client = s3.client(BUCKET).with_multipart(6 << 20, 5 << 20);
    let body: Vec<u8> = (0..(11u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    s3.block_on(client.put("big/weights.bin", body.clone()))
        .expect("multipart put");
    let listed = s3.block_on(client.list("big/")).expect("list");
    assert_eq!(
        listed,
        vec![("big/weights.bin".to_string(), body.len() as u64)]
    );
    let back = s3.get(BUCKET, "big/weights.bin").expect("the object");
    assert!(back == body, "the object came back different");
    // Under the limit: one PUT, as before.
    s3.block_on(client.put("big/small.txt", b"small".to_vec()))
        .expect("put");
    assert_eq!(
        s3.get(BUCKET, "big/small.txt").as_deref(),
        Some(&b"small"[..])
    );
    // A bucket that is not there: a clear error, not a half-made object.
    let missing = s3.client("no-such-bucket").with_multipart(6 << 20, 5 << 20);
    let err = s3
        .block_on(missing.put("big/weights.bin", body))
        .expect_err("no bucket");
    assert!(err.to_string().contains("multipart upload"), "{err}");
}

/// The newest step the job logged.
fn last_step(step_log: &std::path::Path) -> u64 {
    read_log(step_log).0.last().map_or(0, |(n, _)| *n)
}

/// A long job (100,000 steps) in a fresh bucket whose checkpoint syncs are an hour
/// apart, so any sync seen is a final one: the home, the folder of its step log (kept
/// while the test runs), the step log and the manifest.
fn hourly_checkpoint_job(
    s3: &S3Server,
) -> (
    Asimov,
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
) {
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
            100_000,
            "",
            &format!(
                "  checkpoint: {{path: ckpt, every: 1h}}\n  \
                 artifacts: {{paths: [out], to: s3://{BUCKET}/runs}}\n"
            ),
        ),
    );
    (a, logs, step_log, file)
}

#[test]
fn deleting_a_running_job_syncs_its_checkpoint_to_s3_before_teardown() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    // Checkpoint syncs an hour apart: the one in S3 is the delete's.
    let (a, _logs, step_log, file) = hourly_checkpoint_job(&s3);
    let mut ctl = controller(&a, Some(&s3));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    wait(&a, "10 steps", 90, || last_step(&step_log) >= 10);
    assert!(
        manifests(&s3, "ckpt-0").is_empty(),
        "no sync before the delete"
    );
    let at_delete = last_step(&step_log);
    a.ok(&["delete", "job", "ckpt"]);
    assert!(a.local_instances().is_empty(), "{:?}", a.local_instances());
    let complete = manifests(&s3, "ckpt-0");
    assert_eq!(complete.len(), 1, "{complete:?}");
    let step = checkpoint_step(&s3, "ckpt-0", &complete[0]);
    // The job writes its checkpoint every CKPT_STEPS steps.
    assert!(
        step + CKPT_STEPS > at_delete,
        "the final checkpoint is at step {step}, the job was at {at_delete} when deleted"
    );
    support::cli::kill9(&mut ctl);
}

#[test]
fn deleting_a_job_whose_final_sync_hangs_tears_down_at_the_bound() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    let (a, _logs, step_log, file) = hourly_checkpoint_job(&s3);
    let mut ctl = controller_with(&a, Some(&s3), &[("ASIMOV_FINAL_SYNC_TIMEOUT", "3")]);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    wait(&a, "5 steps", 90, || last_step(&step_log) >= 5);
    // The endpoint hangs: the agent's uploads wait for an answer that never comes.
    s3.freeze();
    let started = std::time::Instant::now();
    let deleted = a.run(&["delete", "job", "ckpt"]);
    let took = started.elapsed();
    s3.thaw();
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    assert!(a.local_instances().is_empty(), "{:?}", a.local_instances());
    let stderr = std::fs::read_to_string(a.controller_stderr()).unwrap_or_default();
    assert!(
        stderr.contains("final sync did not finish within 3s; torn down without it"),
        "{stderr}"
    );
    eprintln!("deleted in {took:?} with the final sync hanging");
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
    let describe = describe_with(&a, "Destroyed");
    assert!(
        event_at(&describe, "Collected") < event_at(&describe, "Destroyed"),
        "{describe}"
    );
    support::cli::kill9(&mut ctl);
}

/// BENCHMARKS.md: time and bytes to sync a checkpoint folder (1 GB by default,
/// `ASIMOV_BENCH_MB` to change) after a 1 % change, to the local S3 server (the agent's
/// own `sync-checkpoint`, as on an instance) and over rsync from an SSH host (rsync
/// with the transport's flags). Two layouts: 100 files of which one is rewritten, and
/// one file of which 1 % is overwritten in place. Prints figures, asserts only that
/// the second sync sent less than the first where it can.
///
/// `cargo test --test lifecycle_s3 bench_sync -- --ignored --nocapture` (the work is
/// the agent's sh, curl and rsync: a debug build of the harness measures the same)
#[test]
#[ignore]
fn bench_sync_checkpoint_after_one_percent_change() {
    let (Some(s3), Some(sshd)) = (S3Server::start_or_skip(), Sshd::start_or_skip()) else {
        return;
    };
    s3.create_bucket(BUCKET);
    let total: u64 = std::env::var("ASIMOV_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
        * 1_000_000;
    let random = |path: &std::path::Path, bytes: u64| {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c {bytes} /dev/urandom > '{}'",
                path.display()
            ))
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    // Overwrites `bytes` in the middle of `path`, in place (as a partial rewrite does).
    let patch = |path: &std::path::Path, bytes: u64| {
        let size = std::fs::metadata(path).unwrap().len();
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c {bytes} /dev/urandom | dd of='{}' bs=1M seek={}c conv=notrunc iflag=fullblock oflag=seek_bytes status=none",
                path.display(),
                (size - bytes) / 2
            ))
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let layouts: [(&str, u64); 2] = [("100 files, 1 rewritten", 100), ("1 file, 1 % patched", 1)];
    println!("| layout | target | first sync | after 1 % change: time | bytes sent |");
    println!("|---|---|---|---|---|");
    for (n, (layout, files)) in layouts.into_iter().enumerate() {
        // The folder lives in the SSH host's home (this machine), read by both.
        let ckpt = sshd.home().join(format!("bench{n}/ckpt"));
        std::fs::create_dir_all(&ckpt).unwrap();
        let each = total / files;
        for i in 0..files {
            random(&ckpt.join(format!("shard-{i:03}.bin")), each);
        }
        let change = |ckpt: &std::path::Path| {
            if files > 1 {
                random(&ckpt.join("shard-042.bin"), each);
            } else {
                patch(&ckpt.join("shard-000.bin"), total / 100);
            }
        };

        // S3: an instance folder as the agent has it, syncing that checkpoint folder.
        let root = tempfile::tempdir().unwrap();
        let spec = root.path().join("spec");
        std::fs::create_dir_all(&spec).unwrap();
        std::fs::write(root.path().join("agent.sh"), asimov::agent::AGENT_SCRIPT).unwrap();
        std::fs::write(
            spec.join("s3"),
            format!(
                "S3_BASE='{}/{BUCKET}/bench/run{n}'\nS3_NEXT=1\nS3_ATTEMPT=1\nS3_CHECKPOINT='{}'\n",
                s3.endpoint(),
                ckpt.display()
            ),
        )
        .unwrap();
        let creds = asimov::artifacts::S3Credentials {
            key_id: asimov::model::Secret::new(KEY_ID),
            secret: asimov::model::Secret::new(SECRET_KEY),
            token: None,
        };
        std::fs::write(
            spec.join("s3.curl"),
            asimov::artifacts::curl_config(&creds, "us-east-1").expose(),
        )
        .unwrap();
        let s3_sync = || {
            let start = std::time::Instant::now();
            let out = std::process::Command::new("sh")
                .arg(root.path().join("agent.sh"))
                .arg("sync-checkpoint")
                .arg(root.path())
                .output()
                .unwrap();
            let took = start.elapsed();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success() && text.contains("result=done"),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let bytes: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("bytes="))
                .and_then(|b| b.parse().ok())
                .unwrap_or(0);
            (took, bytes)
        };

        // rsync: as the SSH transport runs it (`-a --protect-args`), into a staging
        // folder that holds the previous sync, with --stats for the bytes.
        let staging = tempfile::tempdir().unwrap();
        let rsync = || {
            let start = std::time::Instant::now();
            let out = std::process::Command::new("rsync")
                .args(["-a", "--protect-args", "--stats", "-e"])
                .arg(format!(
                    "ssh -i {} -p {} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
                    sshd.client_key().display(),
                    sshd.port()
                ))
                .arg(format!("{}@{}:{}/", sshd.user(), sshd.host(), ckpt.display()))
                .arg(staging.path())
                .output()
                .unwrap();
            let took = start.elapsed();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let field = |name: &str| -> u64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.split_whitespace().next().unwrap_or("0").replace(',', ""))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            // What crossed the link both ways: data plus rsync's checksums.
            (
                took,
                field("Total bytes received:") + field("Total bytes sent:"),
            )
        };

        let (s3_first, s3_first_bytes) = s3_sync();
        let (rs_first, rs_first_bytes) = rsync();
        change(&ckpt);
        let (s3_after, s3_bytes) = s3_sync();
        let (rs_after, rs_bytes) = rsync();
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        println!(
            "| {layout} | S3 (moto_server, curl) | {:.1} s, {} | {:.2} s | {} |",
            s3_first.as_secs_f64(),
            mb(s3_first_bytes),
            s3_after.as_secs_f64(),
            mb(s3_bytes)
        );
        println!(
            "| {layout} | rsync over SSH | {:.1} s, {} | {:.2} s | {} |",
            rs_first.as_secs_f64(),
            mb(rs_first_bytes),
            rs_after.as_secs_f64(),
            mb(rs_bytes)
        );
        assert!(
            rs_bytes < rs_first_bytes / 10,
            "rsync sent only what changed"
        );
        if files > 1 {
            assert!(s3_bytes < s3_first_bytes / 10, "S3 sent only what changed");
        }
        std::fs::remove_dir_all(sshd.home().join(format!("bench{n}"))).unwrap();
    }
}

/// The agent's S3 sync and restore by themselves (every request's signature checked),
/// under the system's sh and under busybox (sh, find, awk, od... as on minimal images): names with spaces and
/// non-ASCII characters, a second sync that sends only what changed and drops what was
/// deleted, and a new instance folder restoring that checkpoint before its job runs.
#[test]
fn agent_sync_and_restore_round_trip_under_sh_and_busybox() {
    // A server that checks signatures as S3 does: curl must sign every request right.
    let Some(s3) = S3Server::start_verifying_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let busybox = std::process::Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let mut shells = vec![("sh", None)];
    match &busybox {
        Some(b) => shells.push(("busybox", Some(b.clone()))),
        None => eprintln!("busybox not installed: only the system sh tested"),
    }
    for (n, (name, busybox)) in shells.into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut path = std::env::var("PATH").unwrap_or_default();
        if let Some(busybox) = &busybox {
            let bin = dir.path().join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for applet in [
                "sh", "setsid", "date", "tail", "sleep", "mv", "cat", "sed", "tr", "mkdir", "od",
                "awk", "find", "cmp", "readlink", "ln", "grep", "wc", "rm", "sort",
            ] {
                std::os::unix::fs::symlink(busybox, bin.join(applet)).unwrap();
            }
            path = format!("{}:{path}", bin.display());
        }
        let base = format!("{}/{BUCKET}/unit/{name}", s3.endpoint());
        let creds = asimov::artifacts::S3Credentials {
            key_id: asimov::model::Secret::new(s3.key_id()),
            secret: asimov::model::Secret::new(s3.secret_key()),
            token: None,
        };
        let instance = |root: &std::path::Path, settings: &str| {
            std::fs::create_dir_all(root.join("spec")).unwrap();
            std::fs::write(root.join("agent.sh"), asimov::agent::AGENT_SCRIPT).unwrap();
            std::fs::write(
                root.join("spec/s3"),
                format!("S3_BASE='{base}'\n{settings}"),
            )
            .unwrap();
            std::fs::write(
                root.join("spec/s3.curl"),
                asimov::artifacts::curl_config(&creds, "us-east-1").expose(),
            )
            .unwrap();
        };
        let agent = |root: &std::path::Path, command: &str| {
            let out = std::process::Command::new("sh")
                .arg(root.join("agent.sh"))
                .arg(command)
                .arg(root)
                .env("PATH", &path)
                .env("ASIMOV_NO_TMUX", "1")
                .output()
                .unwrap();
            assert!(out.status.success(), "{name} {command}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let field = |text: &str, key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_default()
                .to_string()
        };

        // A file over S3's largest object (lowered to 1000 bytes here) is not sent:
        // the sync fails, saying why, and nothing of it reaches the bucket. (Files over
        // the single-PUT limit go up in parts: tests/agent_multipart.rs.)
        let big = dir.path().join("big");
        let big_ckpt = dir.path().join("big-ckpt");
        std::fs::create_dir_all(&big_ckpt).unwrap();
        std::fs::write(big_ckpt.join("weights.bin"), vec![7u8; 2000]).unwrap();
        instance(
            &big,
            &format!(
                "S3_NEXT=1\nS3_ATTEMPT=9\nS3_CHECKPOINT='{}'\n",
                big_ckpt.display()
            ),
        );
        let out = std::process::Command::new("sh")
            .arg(big.join("agent.sh"))
            .arg("sync-checkpoint")
            .arg(&big)
            .env("PATH", &path)
            .env("ASIMOV_S3_OBJECT_MAX", "1000")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {out:?}");
        assert!(
            said.contains("is 2000 bytes, over the 1000 bytes of S3's largest object"),
            "{name}: {said}"
        );
        assert!(
            s3.keys(
                BUCKET,
                &format!("unit/{name}/_checkpoints/objects/00000001-a9/")
            )
            .is_empty(),
            "{name}"
        );

        // First instance: two syncs of its checkpoint folder.
        let one = dir.path().join("one");
        let ckpt = dir.path().join("ckpt");
        std::fs::create_dir_all(ckpt.join("dir")).unwrap();
        std::fs::write(ckpt.join("a.txt"), "a1").unwrap();
        std::fs::write(ckpt.join("dir/b c.bin"), "b").unwrap();
        std::fs::write(ckpt.join("ünï 100%.txt"), "u").unwrap();
        instance(
            &one,
            &format!(
                "S3_NEXT=1\nS3_ATTEMPT=1\nS3_CHECKPOINT='{}'\n",
                ckpt.display()
            ),
        );
        let first = agent(&one, "sync-checkpoint");
        assert_eq!(
            field(&first, "checkpoint"),
            "00000001-a1",
            "{name}: {first}"
        );
        assert_eq!(field(&first, "files"), "3", "{name}: {first}");
        std::fs::write(ckpt.join("a.txt"), "a2").unwrap();
        std::fs::write(ckpt.join("new.txt"), "n").unwrap();
        std::fs::remove_file(ckpt.join("dir/b c.bin")).unwrap();
        let second = agent(&one, "sync-checkpoint");
        assert_eq!(
            field(&second, "checkpoint"),
            "00000002-a1",
            "{name}: {second}"
        );
        assert_eq!(
            field(&second, "files"),
            "2",
            "{name}: only what changed: {second}"
        );
        // Unchanged since: no new checkpoint, nothing sent.
        let third = agent(&one, "sync-checkpoint");
        assert_eq!(
            field(&third, "checkpoint"),
            "00000002-a1",
            "{name}: {third}"
        );
        assert_eq!(field(&third, "files"), "0", "{name}: {third}");
        let manifest = s3
            .get(
                BUCKET,
                &format!("unit/{name}/_checkpoints/manifests/00000002-a1"),
            )
            .expect("manifest");
        let mut lines: Vec<String> = String::from_utf8(manifest)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                "00000001-a1\tünï 100%.txt",
                "00000002-a1\ta.txt",
                "00000002-a1\tnew.txt"
            ],
            "{name}"
        );

        // Second instance: restores that checkpoint (relative path, inside work/),
        // runs a job that reads it, and syncs its outputs at the end by itself.
        let two = dir.path().join("two");
        instance(
            &two,
            "S3_NEXT=3\nS3_ATTEMPT=2\nS3_CHECKPOINT='ckpt'\nS3_RESTORE='00000002-a1'\n",
        );
        std::fs::write(two.join("spec/tag"), format!("asimov.t.s3unit{n}-0.2\n")).unwrap();
        std::fs::write(
            two.join("spec/run.sh"),
            "mkdir -p out && cat ckpt/a.txt ckpt/new.txt 'ckpt/ünï 100%.txt' > out/seen \
             && test ! -e 'ckpt/dir/b c.bin'\n",
        )
        .unwrap();
        std::fs::write(two.join("spec/s3_outputs"), "out\tout\n").unwrap();
        agent(&two, "start");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let status = agent(&two, "status");
            if status.contains("status=succeeded") {
                break;
            }
            assert!(
                !status.contains("status=failed") && std::time::Instant::now() < deadline,
                "{name}: {status}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let last = agent(&two, "sync-final");
        assert_eq!(field(&last, "result"), "done", "{name}: {last}");
        assert_eq!(
            s3.get(BUCKET, &format!("unit/{name}/out/seen")).as_deref(),
            Some(&b"a2nu"[..]),
            "{name}"
        );
        // The restore sent nothing back: the final checkpoint names the old objects.
        assert_eq!(field(&last, "checkpoint"), "00000002-a1", "{name}: {last}");
    }
}
