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

    // On a terminal it asks; `n` changes nothing.
    let mut cmd = a.command();
    cmd.arg("destroy").env("TERM", "xterm");
    let mut p = rexpect::session::spawn_with_options(
        cmd,
        rexpect::reader::Options::new()
            .timeout_ms(Some(30_000))
            .strip_ansi_escape_codes(true),
    )
    .expect("pty");
    p.exp_string("Destroy two-0").unwrap();
    p.send("n\r").unwrap();
    p.flush().unwrap();
    p.exp_string("nothing was changed").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(a.run_phase("two-0").as_deref(), Some("Running"));
    a.ok(&["delete", "job", "two"]);
}

#[test]
fn destroy_on_a_fleet_host_ends_the_job_there_and_frees_the_host() {
    let Some(host) = support::sshd::Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    let fleet = format!(
        "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {{name: lab}}\nspec:\n  hosts:\n    \
         - {{name: box-1, user: {}, address: {}, port: {}, identity_file: {}, gpus: 0}}\n",
        host.user(),
        host.host(),
        host.port(),
        host.client_key().display()
    );
    let job = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: far}\nspec:\n  \
               source: {workdir: .}\n  run: sleep 600\n  placement: [{provider: ssh, fleet: lab}]\n";
    let fleet = a.manifest("fleet.yaml", &fleet);
    let job = a.manifest("far.yaml", job);
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    wait_running(&a, "far-0");
    let on_host = || support::sshd::processes_with_env(&format!("HOME={}", host.home().display()));
    assert!(!on_host().is_empty(), "the job runs on the host");

    let out = a.ok(&["destroy", "far-0", "--yes"]);
    assert!(out.contains("run/far-0 stopped"), "{out}");
    a.wait_for(
        "the job's processes to end on the host",
        Duration::from_secs(10),
        || on_host().is_empty(),
    );
    assert_eq!(a.run_phase("far-0").as_deref(), Some("Stopped"));
    // The host is free again: `get fleets` names no run on it.
    let fleets = a.ok(&["get", "fleets"]);
    assert!(!fleets.contains("far-0"), "{fleets}");
}
