//! `asimov destroy` through the real binary on the local provider: the running job's
//! process and instance are gone, the run is Stopped, and it stays so across a
//! controller restart; several candidates are listed; no terminal needs `--yes`.

mod support;

use std::time::Duration;
use support::cli::Asimov;

const LONG: &str = r#"
apiVersion: asimov/v1
kind: Job
metadata: {name: long}
spec:
  source: {workdir: .}
  run: |
    for i in $(seq 1 600); do echo "ASIMOV_PROGRESS $i/600"; sleep 1; done
"#;

fn wait_running(a: &Asimov, run: &str) {
    a.wait_for(&format!("{run} to run"), Duration::from_secs(60), || {
        a.run_phase(run).as_deref() == Some("Running")
    });
}

#[test]
fn destroy_stops_the_only_run_and_a_restarted_controller_keeps_it_stopped() {
    let a = Asimov::new();
    let file = a.manifest("long.yaml", LONG);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_running(&a, "long-0");
    assert!(!a.job_processes().is_empty());

    // Without a terminal, confirmation is `--yes`.
    let out = a.run(&["destroy"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(a.run_phase("long-0").as_deref(), Some("Running"));

    let out = a.ok(&["destroy", "--yes"]);
    assert!(out.contains("run/long-0 stopped"), "{out}");
    assert_eq!(a.run_phase("long-0").as_deref(), Some("Stopped"));
    assert!(a.job_processes().is_empty(), "{:?}", a.job_processes());
    assert!(a.local_instances().is_empty(), "{:?}", a.local_instances());
    // The final sync brought the log home.
    let log = a.ok(&["logs", "long-0"]);
    assert!(log.contains("ASIMOV_PROGRESS"), "{log}");

    // A restarted controller does not bring it back.
    let pid: i32 = std::fs::read_to_string(a.home().join("controller.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling the controller this test's apply started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    a.wait_for("the controller to die", Duration::from_secs(10), || {
        !a.controller_running()
    });
    let mut ctl = a.spawn_controller(None);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(a.run_phase("long-0").as_deref(), Some("Stopped"));
    assert!(a.local_instances().is_empty(), "{:?}", a.local_instances());
    assert!(a.job_processes().is_empty());
    let again = a.ok(&["destroy", "long-0", "--yes"]);
    assert!(again.contains("already stopped"), "{again}");
    support::cli::kill9(&mut ctl);

    // Deleting the job forgets the stop with the run: the same job applied again runs.
    a.ok(&["delete", "job", "long"]);
    assert_eq!(a.runs_json()["items"], serde_json::json!([]));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_running(&a, "long-0");
    a.ok(&["delete", "job", "long"]);
}

#[test]
fn several_candidates_are_listed_and_a_named_one_is_destroyed() {
    let a = Asimov::new();
    let two = LONG.replace("metadata: {name: long}", "metadata: {name: two}");
    let two = two.replace("  run: |", "  matrix: {seed: [a, b]}\n  run: |");
    let file = a.manifest("two.yaml", &two);
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    wait_running(&a, "two-0");
    wait_running(&a, "two-1");

    let out = a.run(&["destroy", "--yes"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("two-0") && err.contains("two-1"), "{err}");
    assert!(err.contains("asimov destroy RUN"), "{err}");

    let out = a.run(&["destroy", "nope", "--yes"]);
    assert!(!out.status.success());

    a.ok(&["destroy", "two-1", "--yes"]);
    assert_eq!(a.run_phase("two-1").as_deref(), Some("Stopped"));
    assert_eq!(a.run_phase("two-0").as_deref(), Some("Running"));
    assert_eq!(a.local_instances().len(), 1, "{:?}", a.local_instances());
    a.ok(&["delete", "job", "two"]);
}
