//! Crash safety through the real binary: the controller is killed with SIGKILL at named
//! points of apply and delete (`ASIMOV_FAILPOINT`), and at random moments; a restarted
//! controller must adopt what exists, never create a second instance for a run, finish
//! the work, and leave no orphan instance or process behind.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::time::{Duration, Instant};
use support::cli::{Asimov, kill9};

const RUNS: [&str; 3] = ["crash-0", "crash-1", "crash-2"];

fn job(run: &str) -> String {
    format!(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: crash}}\nspec:\n  matrix: {{n: [a, b, c]}}\n  run: {run}\n"
    )
}

/// Waits for a controller armed with a failpoint to die by SIGKILL.
fn expect_killed(a: &Asimov, child: &mut Child, failpoint: &str) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            if status.signal() != Some(9) {
                // It exited by itself: what it said is the only clue.
                let said = std::fs::read_to_string(a.controller_stderr()).unwrap_or_default();
                panic!("controller should die at {failpoint}, not {status}: {said}");
            }
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "failpoint {failpoint} never reached"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// No run has more than one instance, whatever the moment.
fn assert_no_duplicate_instances(a: &Asimov) {
    let instances = a.local_instances();
    for run in RUNS {
        let marker = format!(".{run}.");
        let n = instances.iter().filter(|t| t.contains(&marker)).count();
        assert!(n <= 1, "run {run} has {n} instances: {instances:?}");
    }
}

fn attempts(a: &Asimov) -> Vec<u64> {
    let runs = a.runs_json();
    runs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["attempt"].as_u64().unwrap())
        .collect()
}

fn wait_all(a: &Asimov, phase: &str) {
    let start = Instant::now();
    loop {
        assert_no_duplicate_instances(a);
        if RUNS
            .iter()
            .all(|r| a.run_phase(r).as_deref() == Some(phase))
        {
            return;
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!(
                "timed out after 60s waiting for every run {phase}: {:#?}\ninstances: {:#?}",
                RUNS.iter()
                    .map(|r| a.ok(&["describe", "run", r]))
                    .collect::<Vec<_>>(),
                instance_files(a)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each local instance's agent state files, for a failure message.
fn instance_files(a: &Asimov) -> Vec<(String, Vec<(String, String)>)> {
    a.local_instances()
        .into_iter()
        .map(|tag| {
            let root = a.home.path().join("local").join(&tag);
            let mut files: Vec<(String, String)> = std::fs::read_dir(&root)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().is_file())
                .map(|e| {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let text: String = text.chars().rev().take(300).collect();
                    let text: String = text.chars().rev().collect();
                    (e.file_name().to_string_lossy().into_owned(), text)
                })
                .collect();
            files.sort();
            (tag, files)
        })
        .collect()
}

fn assert_nothing_left(a: &Asimov) {
    assert_eq!(a.runs_json()["items"], serde_json::json!([]));
    assert!(
        a.local_instances().is_empty(),
        "orphan instances: {:?}",
        a.local_instances()
    );
    assert!(
        a.job_processes().is_empty(),
        "orphan processes: {:?}",
        a.job_processes()
    );
}

#[test]
fn killed_at_every_step_of_apply_the_restarted_controller_finishes_without_duplicates() {
    for failpoint in [
        "create:after-intent",
        "create:after-provider",
        "start:after-upload",
    ] {
        let a = Asimov::new();
        let file = a.manifest("crash.yaml", &job("sleep 1"));
        let mut armed = a.spawn_controller(Some(failpoint));
        a.ok(&["apply", "-f", file.to_str().unwrap()]);
        expect_killed(&a, &mut armed, failpoint);
        assert_no_duplicate_instances(&a);

        let mut controller = a.spawn_controller(None);
        wait_all(&a, "Succeeded");
        // One attempt each: the crash was adopted, not retried as a new instance.
        let described: Vec<String> = RUNS.iter().map(|r| a.ok(&["describe", "run", r])).collect();
        assert_eq!(
            attempts(&a),
            vec![1, 1, 1],
            "after a crash at {failpoint}: {described:#?}"
        );
        a.wait_for(
            "finished instances to be destroyed",
            Duration::from_secs(30),
            || a.local_instances().is_empty(),
        );
        a.ok(&["delete", "job", "crash"]);
        assert_nothing_left(&a);
        kill9(&mut controller);
    }
}

#[test]
fn killed_at_every_step_of_delete_the_restarted_controller_tears_everything_down() {
    for failpoint in ["destroy:after-provider", "release:before", "forget:before"] {
        let a = Asimov::new();
        let file = a.manifest("crash.yaml", &job("sleep 600"));
        let mut controller = a.spawn_controller(None);
        a.ok(&["apply", "-f", file.to_str().unwrap()]);
        wait_all(&a, "Running");
        kill9(&mut controller);

        let mut armed = a.spawn_controller(Some(failpoint));
        a.ok(&["delete", "job", "crash", "--no-wait"]);
        expect_killed(&a, &mut armed, failpoint);

        let mut controller = a.spawn_controller(None);
        a.wait_for(
            "the teardown to be confirmed",
            Duration::from_secs(60),
            || a.runs_json()["items"] == serde_json::json!([]),
        );
        assert_nothing_left(&a);
        kill9(&mut controller);
    }
}

#[test]
fn killed_at_random_moments_it_converges_with_one_instance_per_run() {
    let a = Asimov::new();
    let file = a.manifest("crash.yaml", &job("sleep 2"));
    let mut first = a.spawn_controller(None);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    // Deterministic "random" pauses: spread over the create/start/observe steps.
    for pause_ms in [30, 90, 10, 250, 60, 400, 20, 150] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        kill9(&mut first);
        assert_no_duplicate_instances(&a);
        first = a.spawn_controller(None);
    }
    wait_all(&a, "Succeeded");
    assert_eq!(attempts(&a), vec![1, 1, 1]);
    a.ok(&["delete", "job", "crash"]);
    assert_nothing_left(&a);
    kill9(&mut first);
}
