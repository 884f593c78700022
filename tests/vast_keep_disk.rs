//! `keep_disk_on_pause` on Vast, through the real binary against the Vast test server
//! (its instances' SSH lands on a real sshd; each instance's disk is its own folder
//! there), judged by the server's own records: a pause syncs the checkpoint, stops the
//! job and stops the instance, which then bills storage only and is not destroyed; a
//! resume starts it again and the job goes on in the same working folder from the
//! checkpoint on that disk (`ASIMOV_RESUME_FROM`), in the same attempt; a start the
//! server keeps "scheduling" (its GPUs rented meanwhile) ends in the stopped instance
//! destroyed and a new attempt from the synced checkpoint; deleting the paused job
//! destroys the stopped instance; controllers SIGKILLed mid-pause and mid-resume leave
//! no duplicate and no orphan.

mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;
use support::cli::{Asimov, Cloud, kill9};
use support::sshd::Sshd;
use vast_server::{Config, InstanceRecord, SshTarget, VastServer, offer};

const STEPS: u64 = 60;
const RUN: &str = "kd-0";

/// Counts steps (0.2 s each) to `$STEP_LOG` (outside the instance), checkpoints every 2
/// steps into `ckpt/`, resumes from `ASIMOV_RESUME_FROM`. Its disk names itself once
/// (`disk_id` in the working folder): the same id again means the same disk.
const TRAIN: &str = r#"#!/bin/sh
set -eu
[ -f disk_id ] || echo "disk-$$-$(date +%s)" >disk_id
echo "disk $(cat disk_id)" >>"$STEP_LOG"
step=0
if [ -n "${ASIMOV_RESUME_FROM:-}" ] && [ -f "$ASIMOV_RESUME_FROM/step" ]; then
  step=$(cat "$ASIMOV_RESUME_FROM/step")
  echo "resume $step" >>"$STEP_LOG"
fi
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

struct World {
    server: VastServer,
    sshd: Sshd,
    a: Asimov,
    _logs: tempfile::TempDir,
    step_log: PathBuf,
    /// `ASIMOV_VAST_START_WITHIN` for controllers: how long a start may stay
    /// "scheduling" before the instance is given up.
    start_within: &'static str,
}

fn world(start_within: &'static str) -> Option<World> {
    let sshd = Sshd::start_or_skip()?;
    let config = Config {
        ssh: Some(SshTarget {
            host: sshd.host().to_string(),
            port: sshd.port(),
            authorized_keys: sshd.dir().join("authorized_keys"),
        }),
        loading_after: Duration::from_millis(300),
        running_after: Duration::from_millis(1000),
        ..Config::default()
    };
    let server = VastServer::start(
        config,
        vec![
            offer(301, "RTX 4090", 1, 24.0, 0.41),
            offer(302, "RTX 4090", 1, 24.0, 0.35),
        ],
    );
    let a = Asimov::new();
    a.set_secret("VAST_API_KEY", vast_server::API_KEY);
    std::fs::write(a.repo.path().join("train_kd.sh"), TRAIN).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let step_log = logs.path().join("steps.log");
    Some(World {
        server,
        sshd,
        a,
        _logs: logs,
        step_log,
        start_within,
    })
}

impl Cloud for World {
    fn asimov(&self) -> &Asimov {
        &self.a
    }

    fn command(&self) -> Command {
        let mut cmd = self.a.command();
        cmd.env("ASIMOV_VAST_API_URL", self.server.url())
            .env("ASIMOV_VAST_PACING", "0")
            .env("ASIMOV_VAST_START_WITHIN", self.start_within)
            .env_remove("VAST_API_KEY");
        cmd
    }

    fn state(&self) -> String {
        format!(
            "{}\n{:#?}\nsteps: {:?}\n{}",
            self.a.run(&["describe", "run", RUN]).stdout_text(),
            self.server.instances(),
            read_log(&self.step_log),
            self.a.controller_logs(20)
        )
    }
}

/// Output text of a finished command, whatever its status.
trait Text {
    fn stdout_text(&self) -> String;
}

impl Text for std::process::Output {
    fn stdout_text(&self) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

#[derive(Debug, Default)]
struct Log {
    steps: Vec<u64>,
    resumes: Vec<u64>,
    disks: Vec<String>,
}

fn read_log(path: &Path) -> Log {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut log = Log::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["step", n] => log.steps.push(n.parse().unwrap()),
            ["resume", n] => log.resumes.push(n.parse().unwrap()),
            ["disk", id] => log.disks.push(id.to_string()),
            _ => panic!("unexpected step log line {line:?}"),
        }
    }
    log
}

impl World {
    fn job(&self) -> PathBuf {
        self.a.manifest(
            "kd.yaml",
            &format!(
                r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: kd}}
spec:
  source: {{workdir: .}}
  run: sh train_kd.sh
  env: {{STEP_LOG: "{log}", STEPS: "{STEPS}"}}
  checkpoint: {{path: ckpt, every: 1s}}
  resources: {{gpu: {{name: RTX_4090, count: 1}}, disk_gb: 20}}
  image: pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime
  placement:
    - {{provider: vast, ssh_user: {user}, keep_disk_on_pause: true}}
"#,
                log = self.step_log.display(),
                user = self.sshd.user()
            ),
        )
    }

    fn controller(&self, failpoint: Option<&str>) -> Child {
        match failpoint {
            Some(fp) => self.spawn_controller_with(&[("ASIMOV_FAILPOINT", fp)]),
            None => self.spawn_controller(),
        }
    }

    /// `asimov ARGS` pointed at the server; must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "asimov {args:?}: {}\n{}",
            out.stdout_text(),
            self.state()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn newest_checkpoint_step(&self) -> Option<u64> {
        let dir = self.a.home().join("checkpoints").join(RUN);
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

    /// Applies the job and waits for a few steps and a checkpoint at home.
    fn run_until_checkpointed(&self) {
        self.apply(&self.job());
        self.until("8 steps and a checkpoint at home", 120, || {
            read_log(&self.step_log).steps.len() >= 8 && self.newest_checkpoint_step().is_some()
        });
    }

    fn only_instance(&self) -> InstanceRecord {
        let all = self.server.instances();
        assert_eq!(all.len(), 1, "one instance ever: {all:#?}");
        all.into_iter().next().unwrap()
    }

    /// The state a pause keeping the disk leaves: the run Paused, its one instance
    /// stopped (not destroyed) and billing storage only since, its job not running.
    /// Returns the step checkpointed at home.
    fn assert_paused_keeping_disk(&self) -> u64 {
        assert_eq!(self.a.run_phase(RUN).as_deref(), Some("Paused"));
        let i = self.only_instance();
        assert!(!i.destroyed, "a kept disk is not destroyed: {i:#?}");
        assert_eq!(i.cur_state, "stopped", "{i:#?}");
        assert_eq!(i.intended_status, "stopped", "{i:#?}");
        assert!(i.billing_stopped.is_none(), "its disk still bills: {i:#?}");
        assert_eq!(i.stopped_periods.len(), 1, "stopped once: {i:#?}");
        assert!(i.stopped_periods[0].1.is_none(), "still stopped: {i:#?}");
        // The job does not run on: no step is added while paused (one every 0.2 s
        // while it runs).
        let steps = read_log(&self.step_log).steps.len();
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            read_log(&self.step_log).steps.len(),
            steps,
            "the job ran on while paused: {}",
            self.state()
        );
        assert!((steps as u64) < STEPS, "the job ended before the pause");
        // The run bills its disk only: the server's storage price ($0.15/GB/month for
        // 20 GB), not the GPU's $0.35/h.
        let runs = self.a.runs_json();
        let price = runs["items"][0]["price_per_hour"].as_f64().unwrap_or(-1.0);
        let storage = i.storage_per_hour;
        assert!(
            (price - storage).abs() < 0.0001 && price < 0.01,
            "billing {price}/h while stopped, storage is {storage}/h: {runs}"
        );
        self.newest_checkpoint_step().expect("a checkpoint at home")
    }

    fn kill_controller(&self) {
        let pid = std::fs::read_to_string(self.a.home().join("controller.pid")).unwrap();
        let pid: i32 = pid.trim().parse().unwrap();
        // SAFETY: signalling the controller this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.until("the controller gone", 30, || !self.a.controller_running());
    }

    fn until_succeeded(&self) {
        self.until("the run to succeed", 180, || {
            self.a.run_phase(RUN).as_deref() == Some("Succeeded")
        });
    }

    fn until_nothing_left(&self) {
        self.until("every instance destroyed", 90, || {
            self.server.live_instances().is_empty()
        });
        assert!(
            self.server
                .instances()
                .iter()
                .all(|i| i.billing_stopped.is_some()),
            "{:#?}",
            self.server.instances()
        );
    }
}

/// After a resume on the kept disk: the job went on from the checkpoint on that disk,
/// on the same disk, in attempt 1, to its end.
fn assert_resumed_on_the_same_disk(w: &World, at_pause: u64) {
    let log = read_log(&w.step_log);
    assert_eq!(log.resumes.len(), 1, "{log:?}\n{}", w.state());
    assert!(
        log.resumes[0] >= at_pause,
        "resumed from step {} though step {at_pause} was checkpointed",
        log.resumes[0]
    );
    assert_eq!(log.disks.len(), 2, "{log:?}");
    assert_eq!(log.disks[0], log.disks[1], "another disk: {log:?}");
    assert_eq!(log.steps.last(), Some(&STEPS), "{log:?}");
    assert_eq!(w.a.attempt(), 1, "the same attempt: {}", w.state());
}

#[test]
fn a_pause_keeps_the_instance_stopped_on_storage_billing_and_resume_goes_on_on_its_disk() {
    let Some(w) = world("60") else { return };
    let mut controller = w.controller(None);
    w.run_until_checkpointed();
    let out = w.ok(&["pause", RUN]);
    assert!(out.contains("stopped with its disk kept"), "{out}");
    let at_pause = w.assert_paused_keeping_disk();

    let out = w.ok(&["resume", RUN]);
    assert!(out.contains("starts again on its kept disk"), "{out}");
    w.until_succeeded();
    assert_resumed_on_the_same_disk(&w, at_pause);
    let i = &w.server.instances()[0];
    assert!(i.stopped_periods[0].1.is_some(), "started again: {i:#?}");
    assert!(i.stopped_secs() >= 2.0, "{i:#?}");
    let described = w.ok(&["describe", "run", RUN]);
    assert!(described.contains("DiskKept"), "{described}");
    w.until_nothing_left();
    assert_eq!(w.server.instances().len(), 1, "no second instance");
    kill9(&mut controller);
}

#[test]
fn a_start_kept_scheduling_destroys_the_stopped_instance_and_resumes_elsewhere_from_the_checkpoint()
{
    let Some(w) = world("3") else { return };
    let mut controller = w.controller(None);
    w.run_until_checkpointed();
    w.ok(&["pause", RUN]);
    let at_pause = w.assert_paused_keeping_disk();
    let first = w.only_instance();
    // Someone else rents its GPUs meanwhile: the start is accepted and stays
    // "scheduling".
    w.server.take_offer(first.offer_id);
    w.ok(&["resume", RUN]);
    w.until_succeeded();
    let all = w.server.instances();
    assert_eq!(all.len(), 2, "{all:#?}");
    let old = all.iter().find(|i| i.id == first.id).unwrap();
    assert!(old.destroyed, "the stopped instance is destroyed: {old:#?}");
    assert_eq!(w.a.attempt(), 2, "{}", w.state());
    // The new attempt restored the checkpoint synced at the pause, on a new disk.
    let log = read_log(&w.step_log);
    assert_eq!(log.resumes.len(), 1, "{log:?}");
    assert!(log.resumes[0] >= at_pause, "{log:?}");
    assert_eq!(log.disks.len(), 2, "{log:?}");
    assert_ne!(log.disks[0], log.disks[1], "{log:?}");
    let described = w.ok(&["describe", "run", RUN]);
    assert!(
        described.contains("resume on the kept disk failed"),
        "the reason is recorded: {described}"
    );
    w.until_nothing_left();
    kill9(&mut controller);
}

#[test]
fn deleting_a_job_paused_with_its_disk_kept_destroys_the_stopped_instance() {
    let Some(w) = world("60") else { return };
    let mut controller = w.controller(None);
    w.run_until_checkpointed();
    w.ok(&["pause", RUN]);
    w.assert_paused_keeping_disk();
    w.ok(&["delete", "job", "kd"]);
    w.until_nothing_left();
    w.until("the run forgotten", 60, || {
        w.a.runs_json()["items"]
            .as_array()
            .is_some_and(|v| v.is_empty())
    });
    kill9(&mut controller);
}

#[test]
fn controllers_killed_mid_pause_and_mid_resume_leave_no_duplicate_and_no_orphan() {
    let Some(w) = world("60") else { return };
    // Killed right after the provider stopped the instance, before the stop is
    // recorded; `pause` starts a controller of its own, which finishes the pause.
    let mut first = w.controller(Some("keep-disk:after-stop"));
    w.run_until_checkpointed();
    w.ok(&["pause", RUN]);
    let status = first.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "died at the failpoint");
    let at_pause = w.assert_paused_keeping_disk();

    // Killed right after the provider started it again, before anything recorded it.
    w.kill_controller();
    let mut second = w.controller(Some("start-kept:after-provider"));
    w.ok(&["resume", RUN]);
    let status = second.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "died at the failpoint");
    // `resume` may have started a controller of its own after the kill; if not, one is.
    let mut third = (!w.a.live_controller()).then(|| w.controller(None));
    w.until_succeeded();
    assert_resumed_on_the_same_disk(&w, at_pause);
    w.until_nothing_left();
    assert_eq!(w.server.instances().len(), 1, "no duplicate");
    if let Some(c) = third.as_mut() {
        kill9(c);
    }
}
