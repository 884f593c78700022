//! Pins what `asimov get runs` prints, byte for byte, in every output format: the JSON
//! shape is a documented contract (README "Output for scripts"), and the listing is
//! tuned for speed, so any change to its encoding must show up here first.
//!
//! The store is written through the library (a real SQLite file in a temp home) and read
//! by the real binary. The runs cover every field set, every optional field empty, a
//! matrix needing JSON escapes, a recorded step error, and a `seq` given out of write
//! order (so the listing cannot rely on the table's physical order).

mod support;

use asimov::model::{Phase, ProviderKind, Usd};
use asimov::store::{RunError, RunRecord, Store};
use std::collections::BTreeMap;
use support::cli::Asimov;

/// Two days and half an hour ago: the AGE column reads "2d0h" for the next half hour.
fn created_at() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    now - 2 * 86_400 - 1_800
}

fn full_run(name: &str, job: &str, created: i64) -> RunRecord {
    let mut matrix = BTreeMap::new();
    matrix.insert("lr".to_string(), "3e-4".to_string());
    matrix.insert("model".to_string(), "llama \"7b\"\t/ ü".to_string());
    RunRecord {
        name: name.to_string(),
        job: job.to_string(),
        index: 3,
        seq: 0,
        phase: Phase::Running,
        reason: "training".to_string(),
        spec_hash: "ab12cd".to_string(),
        matrix,
        attempt: 2,
        placement_index: 1,
        provider: Some(ProviderKind::Lambda),
        instance_id: Some("0920582c7ff041399e34823a0be62549".to_string()),
        host: Some("gpu3".to_string()),
        gpu: Some("H100_SXM".to_string()),
        price_per_hour: Some(Usd::from_dollars(2.49)),
        cost_usd: Usd::from_dollars(12.345678),
        progress_done: Some(1234),
        progress_total: Some(5000),
        exit_code: Some(-9),
        repository: Some("git@github.com:example/train.git".to_string()),
        commit: Some("0123456789abcdef0123456789abcdef01234567".to_string()),
        commit_message: Some("tune lr, ünïcode".to_string()),
        author: Some("Ada <ada@example.com>".to_string()),
        dirty: true,
        created_at: created,
        updated_at: created + 100,
        started_at: Some(1_700_000_050),
        finished_at: Some(1_700_000_099),
        billing_since: None,
    }
}

fn bare_run(name: &str, job: &str, created: i64) -> RunRecord {
    RunRecord::new_pending(name, job, 0, "", &BTreeMap::new(), "", created)
}

/// A home whose store holds the runs above, and the `created_at` they were given.
fn seeded() -> (Asimov, i64) {
    let a = Asimov::new();
    let created = created_at();
    let store = Store::open(&a.home().join("state.db")).unwrap();
    store
        .put_run(&full_run("sweep-0", "sweep", created))
        .unwrap();
    // Its stop rule's metric, as the controller records it (`-o wide` shows it).
    store
        .put_metrics(&[(
            "sweep-0".to_string(),
            asimov::store::RunMetrics {
                attempt: 2,
                line: "step=120 val_acc=0.71".into(),
                metric: Some("val_acc".into()),
                value: Some(0.71),
                at: created + 50,
            },
        )])
        .unwrap();
    store
        .put_run(&bare_run("other-0", "other", created))
        .unwrap();
    store
        .put_run(&RunRecord {
            phase: Phase::Failed,
            reason: "failed with exit code 3".into(),
            progress_done: Some(7),
            cost_usd: Usd::ZERO,
            ..bare_run("sweep-1", "sweep", created)
        })
        .unwrap();
    // Written second to last but listed first: its seq is given, not the next one.
    store
        .put_run(&RunRecord {
            seq: -5,
            phase: Phase::Succeeded,
            reason: "done".into(),
            progress_done: Some(10),
            progress_total: Some(0),
            exit_code: Some(0),
            ..bare_run("early-0", "early", created)
        })
        .unwrap();
    store.put_run(&bare_run("last-0", "last", created)).unwrap();
    store
        .set_run_error(
            "sweep-1",
            &RunError {
                step: "setup".into(),
                message: "pip install failed".into(),
                detail: String::new(),
                at: 1_700_000_200,
            },
        )
        .unwrap();
    store
        .set_run_error(
            "other-0",
            &RunError {
                step: "create".into(),
                message: "no capacity".into(),
                detail: String::new(),
                at: 1_700_000_300,
            },
        )
        .unwrap();
    (a, created)
}

/// stdout of `asimov ARGS`, with the run's creation time (which moves with the clock)
/// replaced by a fixed mark.
fn listed(a: &Asimov, created: i64, args: &[&str]) -> String {
    let stamp = chrono::DateTime::from_timestamp(created, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    a.ok(args).replace(&stamp, "<created_at>")
}

#[test]
fn get_runs_json_is_pinned() {
    let (a, created) = seeded();
    insta::assert_snapshot!(
        "get_runs_json",
        listed(&a, created, &["get", "runs", "-o", "json"])
    );
    insta::assert_snapshot!(
        "get_runs_job_json",
        listed(&a, created, &["get", "runs", "sweep", "-o", "json"])
    );
    insta::assert_snapshot!(
        "get_runs_one_json",
        listed(&a, created, &["get", "runs", "sweep-0", "-o", "json"])
    );
}

#[test]
fn get_runs_yaml_is_pinned() {
    let (a, created) = seeded();
    insta::assert_snapshot!(
        "get_runs_yaml",
        listed(&a, created, &["get", "runs", "-o", "yaml"])
    );
}

#[test]
fn get_runs_tables_are_pinned() {
    let (a, created) = seeded();
    insta::assert_snapshot!("get_runs_table", listed(&a, created, &["get", "runs"]));
    insta::assert_snapshot!(
        "get_runs_wide",
        listed(&a, created, &["get", "runs", "-o", "wide"])
    );
}

#[test]
fn get_runs_before_anything_was_recorded() {
    let a = Asimov::new();
    assert!(!a.home().join("state.db").exists());
    assert_eq!(a.ok(&["get", "runs"]), "No runs.\n");
    assert_eq!(
        a.ok(&["get", "runs", "-o", "json"]),
        "{\n  \"items\": []\n}\n"
    );
    assert_eq!(a.ok(&["get", "runs", "-o", "yaml"]), "items: []\n");
}

#[test]
fn get_runs_of_an_unknown_name_prints_nothing_and_fails() {
    let (a, _) = seeded();
    let out = a.run(&["get", "runs", "nosuch", "-o", "json"]);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run or job named \"nosuch\""));
}

#[test]
fn get_runs_of_an_empty_store() {
    let a = Asimov::new();
    Store::open(&a.home().join("state.db")).unwrap();
    assert_eq!(a.ok(&["get", "runs"]), "No runs.\n");
    assert_eq!(
        a.ok(&["get", "runs", "-o", "json"]),
        "{\n  \"items\": []\n}\n"
    );
    assert_eq!(a.ok(&["get", "runs", "-o", "yaml"]), "items: []\n");
}
