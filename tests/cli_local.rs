//! The README's promise on the `local` provider, through the real binary: a job runs to
//! completion, `get runs` shows it Succeeded with its commit, and `delete job` leaves no
//! process, folder or run behind. Bad input changes nothing.

mod support;

use std::time::Duration;
use support::cli::Asimov;

const HELLO: &str = r#"
apiVersion: asimov/v1
kind: Job
metadata: {name: hello}
spec:
  source: {workdir: .}
  run: |
    sh train.sh
    for i in 1 2 3 4; do echo "ASIMOV_PROGRESS $i/4"; sleep 0.2; done
"#;

#[test]
fn hello_runs_to_completion_records_its_commit_and_delete_leaves_nothing() {
    let a = Asimov::new();
    let file = a.manifest("hello.yaml", HELLO);
    let out = a.run(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("job/hello created"));

    let runs = a.runs_json();
    let run = &runs["items"][0];
    assert_eq!(run["name"], "hello-0");
    assert_eq!(run["job"], "hello");
    assert_eq!(run["phase"], "Succeeded");
    assert_eq!(run["provider"], "local");
    assert_eq!(run["exit_code"], 0);
    assert_eq!(run["attempt"], 1);
    assert_eq!(run["progress"]["done"], 4);
    assert_eq!(run["progress"]["total"], 4);
    assert_eq!(run["commit_message"], "first experiment");
    assert_eq!(run["author"], "Ada Lovelace <ada@example.com>");
    // hello.yaml itself is uncommitted.
    assert_eq!(run["dirty"], true);
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(a.repo.path())
        .output()
        .unwrap();
    assert_eq!(run["commit"], String::from_utf8_lossy(&head.stdout).trim());
    for field in ["reason", "instance_id", "gpu", "price_per_hour", "cost_usd"] {
        assert!(run.get(field).is_some(), "run JSON lacks {field}: {run}");
    }
    let log = a.ok(&["logs", "hello-0"]);
    assert!(log.contains("training"), "{log}");
    let table = a.ok(&["get", "runs"]);
    assert!(
        table.contains("hello-0") && table.contains("Succeeded"),
        "{table}"
    );

    // Re-applying the same manifest changes nothing and starts nothing.
    let again = a.ok(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(again.contains("job/hello unchanged"), "{again}");
    assert_eq!(a.runs_json()["items"][0]["attempt"], 1);

    a.ok(&["delete", "job", "hello"]);
    assert_eq!(a.runs_json()["items"], serde_json::json!([]));
    assert!(a.local_instances().is_empty(), "{:?}", a.local_instances());
    assert!(a.job_processes().is_empty());
    assert!(!a.home().join("logs/hello-0.log").exists());
    // It declared no outputs, so nothing was made for them either.
    assert!(!a.home().join("artifacts/hello-0").exists());
    assert!(!a.home().join("manifests/job.hello.yaml").exists());
}

#[test]
fn a_failing_run_makes_apply_wait_fail_and_delete_kills_a_running_one() {
    let a = Asimov::new();
    let file = a.manifest(
        "jobs.yaml",
        r#"
apiVersion: asimov/v1
kind: Job
metadata: {name: broken}
spec:
  run: echo about to fail; exit 3
---
apiVersion: asimov/v1
kind: Job
metadata: {name: forever}
spec:
  run: sleep 600
"#,
    );
    let out = a.run(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success());
    a.wait_for("forever-0 to run", Duration::from_secs(30), || {
        a.run_phase("forever-0").as_deref() == Some("Running")
    });
    assert!(!a.job_processes().is_empty());

    a.wait_for("broken-0 to fail", Duration::from_secs(30), || {
        a.run_phase("broken-0").as_deref() == Some("Failed")
    });
    let run = a.runs_json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "broken-0")
        .cloned()
        .unwrap();
    assert_eq!(run["exit_code"], 3);

    a.ok(&["delete", "job", "forever"]);
    assert!(
        a.job_processes().is_empty(),
        "the deleted job's processes must be gone"
    );
    assert_eq!(a.local_instances(), Vec::<String>::new());
    a.ok(&["delete", "job", "broken"]);
    assert_eq!(a.runs_json()["items"], serde_json::json!([]));
}

#[test]
fn apply_wait_exits_non_zero_when_a_run_fails() {
    let a = Asimov::new();
    let file = a.manifest(
        "fail.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: fails}\nspec:\n  run: exit 7\n",
    );
    let out = a.run(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fails-0 (exit code 7)"), "{stderr}");
    a.ok(&["delete", "job", "fails"]);
}

/// Everything a home holds that a bad apply must not touch.
fn snapshot(a: &Asimov) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for dir in ["manifests", "local"] {
        if let Ok(rd) = std::fs::read_dir(a.home().join(dir)) {
            for e in rd.flatten() {
                files.push((
                    e.path().display().to_string(),
                    std::fs::read(e.path()).unwrap_or_default(),
                ));
            }
        }
    }
    files.sort();
    files
}

#[test]
fn malformed_manifests_change_nothing_and_report_every_problem() {
    let a = Asimov::new();
    let good = a.manifest("good.yaml", HELLO);
    a.ok(&["apply", "-f", good.to_str().unwrap(), "--wait"]);
    a.wait_for(
        "the finished run's instance to go",
        Duration::from_secs(30),
        || a.local_instances().is_empty(),
    );
    let before = snapshot(&a);
    let runs_before = a.runs_json();

    // A valid job next to a broken one: neither is applied.
    let bad = a.manifest(
        "bad.yaml",
        r#"apiVersion: asimov/v1
kind: Job
metadata: {name: other}
spec:
  run: echo fine
---
apiVersion: asimov/v1
kind: Job
metadata: {name: Bad_Name}
spec:
  run: echo x
  max_duration: forever
  gpus: 2
"#,
    );
    let out = a.run(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = bad.display().to_string();
    assert!(
        stderr.contains(&format!("{path}:9:")),
        "name problem with its line: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{path}:12:")),
        "duration problem with its line: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{path}:13:")),
        "unknown field with its line: {stderr}"
    );
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert_eq!(snapshot(&a), before);
    assert_eq!(a.runs_json(), runs_before);

    // --dry-run of a valid change changes nothing either.
    let dry = a.ok(&[
        "apply",
        "-f",
        a.manifest(
            "other.yaml",
            "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: other}\nspec:\n  run: echo hi\n",
        )
        .to_str()
        .unwrap(),
        "--dry-run",
    ]);
    assert!(dry.contains("job/other created (dry run)"), "{dry}");
    assert_eq!(snapshot(&a), before);
    a.ok(&["delete", "job", "hello"]);
}
