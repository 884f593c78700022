//! The store against real SQLite files in temporary directories.

use asimov::model::{HostStatus, Outcome, Phase, ProviderKind, Usd};
use asimov::store::{
    AttemptRecord, CostEntry, Event, HostRecord, RunRecord, SCHEMA_VERSION, Store, StoreError,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    // A missing parent directory is part of what `open` handles.
    let path = dir.path().join("home").join("state.db");
    (dir, path)
}

/// A run with every optional field set and nothing left at a default.
fn full_run(name: &str, job: &str) -> RunRecord {
    let mut matrix = BTreeMap::new();
    matrix.insert("lr".to_string(), "3e-4".to_string());
    matrix.insert("model".to_string(), "llama \"7b\"".to_string());
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
        billing_since: Some(1_700_000_040),
        progress_done: Some(1234),
        progress_total: Some(i64::MAX as u64),
        exit_code: Some(-9),
        repository: Some("git@github.com:example/train.git".to_string()),
        commit: Some("0123456789abcdef0123456789abcdef01234567".to_string()),
        commit_message: Some("tune lr\n\nlonger message, with ünïcode".to_string()),
        author: Some("Ada <ada@example.com>".to_string()),
        dirty: true,
        created_at: 1_700_000_000,
        updated_at: 1_700_000_100,
        started_at: Some(1_700_000_050),
        finished_at: Some(1_700_000_099),
    }
}

/// A run with every optional field empty.
fn bare_run(name: &str, job: &str) -> RunRecord {
    RunRecord::new_pending(name, job, 0, "", &BTreeMap::new(), "", 1_700_000_000)
}

fn attempt(run: &str, n: u32, released: Option<i64>) -> AttemptRecord {
    AttemptRecord {
        run: run.to_string(),
        attempt: n,
        tag: format!("asimov.k3x9.{run}.{n}"),
        provider: ProviderKind::Vast,
        placement_index: n + 1,
        instance_id: Some(format!("{}", 1000 + n)),
        host: Some("box".to_string()),
        intent_at: 1_700_000_000 + n as i64,
        released_at: released,
        outcome: released.map(|_| Outcome::Preempted),
    }
}

fn event(at: i64, kind: &str, name: &str, reason: &str) -> Event {
    Event {
        at,
        object_kind: kind.to_string(),
        object_name: name.to_string(),
        reason: reason.to_string(),
        message: format!("{reason} at {at}"),
    }
}

fn cost(run: &str, job: &str, from: i64, to: i64, usd: f64) -> CostEntry {
    CostEntry {
        run: run.to_string(),
        job: job.to_string(),
        attempt: 1,
        from,
        to,
        usd: Usd::from_dollars(usd),
    }
}

fn user_version(path: &Path) -> u32 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn run_round_trips_every_field() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    let full = full_run("sweep-3", "sweep");
    let bare = bare_run("other-0", "other");
    store.put_run(&full).unwrap();
    store.put_run(&bare).unwrap();

    let got = store.run("sweep-3").unwrap().expect("stored run");
    assert_eq!(
        got,
        RunRecord {
            seq: 1,
            ..full.clone()
        }
    );
    let got = store.run("other-0").unwrap().expect("stored run");
    assert_eq!(
        got,
        RunRecord {
            seq: 2,
            ..bare.clone()
        }
    );
    assert_eq!(store.run("missing-0").unwrap(), None);

    // Every provider and phase survives the text columns.
    for (i, provider) in [
        ProviderKind::Local,
        ProviderKind::Ssh,
        ProviderKind::Vast,
        ProviderKind::Lambda,
        ProviderKind::Runpod,
        ProviderKind::Fake,
    ]
    .into_iter()
    .enumerate()
    {
        let phase = [
            Phase::Pending,
            Phase::Provisioning,
            Phase::Starting,
            Phase::Running,
            Phase::Succeeded,
            Phase::Failed,
            Phase::Deleting,
        ][i];
        let run = RunRecord {
            provider: Some(provider),
            phase,
            ..full_run(&format!("kinds-{i}"), "kinds")
        };
        store.put_run(&run).unwrap();
        let got = store.run(&run.name).unwrap().unwrap();
        assert_eq!((got.provider, got.phase), (Some(provider), phase));
    }

    // Replacing a run overwrites every field.
    let changed = RunRecord {
        phase: Phase::Succeeded,
        reason: "run command exited 0".to_string(),
        exit_code: Some(0),
        host: None,
        matrix: BTreeMap::new(),
        ..full.clone()
    };
    store.put_run(&changed).unwrap();
    assert_eq!(
        store.run("sweep-3").unwrap().unwrap(),
        RunRecord { seq: 1, ..changed }
    );
}

#[test]
fn progress_beyond_sqlite_integers_is_refused_and_bulk_write_is_atomic() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    let good = bare_run("a-0", "a");
    let bad = RunRecord {
        progress_done: Some(u64::MAX),
        ..bare_run("a-1", "a")
    };
    let err = store.put_runs(&[good, bad]).unwrap_err();
    assert!(matches!(err, StoreError::Query { .. }), "{err:?}");
    assert!(store.runs().unwrap().is_empty(), "first run must roll back");
}

#[test]
fn seq_follows_first_write_and_is_kept() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    // Names sort the other way round from the write order.
    store.put_run(&bare_run("c-0", "c")).unwrap();
    store
        .put_runs(&[bare_run("b-0", "b"), bare_run("b-1", "b")])
        .unwrap();
    store.put_run(&bare_run("a-0", "a")).unwrap();
    let names = |runs: Vec<RunRecord>| -> Vec<(String, i64)> {
        runs.into_iter().map(|r| (r.name, r.seq)).collect()
    };
    let expected = vec![
        ("c-0".to_string(), 1),
        ("b-0".to_string(), 2),
        ("b-1".to_string(), 3),
        ("a-0".to_string(), 4),
    ];
    assert_eq!(names(store.runs().unwrap()), expected);

    // Rewriting with seq 0 keeps the seq; an explicit seq is taken as given.
    store
        .put_run(&RunRecord {
            phase: Phase::Running,
            ..bare_run("c-0", "c")
        })
        .unwrap();
    assert_eq!(store.run("c-0").unwrap().unwrap().seq, 1);
    store
        .put_run(&RunRecord {
            seq: 10,
            ..bare_run("b-0", "b")
        })
        .unwrap();
    store.put_run(&bare_run("d-0", "d")).unwrap();
    assert_eq!(
        names(store.runs().unwrap()),
        vec![
            ("c-0".to_string(), 1),
            ("b-1".to_string(), 3),
            ("a-0".to_string(), 4),
            ("b-0".to_string(), 10),
            ("d-0".to_string(), 11),
        ]
    );
    assert_eq!(
        names(store.runs_of_job("b").unwrap()),
        vec![("b-1".to_string(), 3), ("b-0".to_string(), 10)]
    );
    assert!(store.runs_of_job("zzz").unwrap().is_empty());
}

#[test]
fn attempts_round_trip_and_unreleased_ones_are_found() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    store.put_run(&bare_run("a-0", "a")).unwrap();
    store.put_run(&bare_run("b-0", "b")).unwrap();

    let bare = AttemptRecord {
        instance_id: None,
        host: None,
        released_at: None,
        outcome: None,
        provider: ProviderKind::Runpod,
        ..attempt("a-0", 1, None)
    };
    store.put_attempt(&attempt("a-0", 2, None)).unwrap();
    store.put_attempt(&bare).unwrap();
    store
        .put_attempt(&attempt("b-0", 1, Some(1_700_000_500)))
        .unwrap();
    store.put_attempt(&attempt("b-0", 2, None)).unwrap();

    assert_eq!(
        store.attempts("a-0").unwrap(),
        vec![bare.clone(), attempt("a-0", 2, None)]
    );
    assert_eq!(
        store.unreleased_attempts().unwrap(),
        vec![
            bare.clone(),
            attempt("a-0", 2, None),
            attempt("b-0", 2, None)
        ]
    );
    // All of them at once (the reconcile pass's one query), each run's by attempt
    // number although attempt 2 of a-0 was written first.
    let all = store.all_attempts().unwrap();
    assert_eq!(all.keys().collect::<Vec<_>>(), ["a-0", "b-0"]);
    assert_eq!(all["a-0"], store.attempts("a-0").unwrap());
    assert_eq!(all["b-0"], store.attempts("b-0").unwrap());

    // Releasing replaces the row in place.
    let released = AttemptRecord {
        instance_id: Some("77".to_string()),
        released_at: Some(1_700_000_900),
        outcome: Some(Outcome::Deleted),
        ..bare
    };
    store.put_attempt(&released).unwrap();
    assert_eq!(store.attempts("a-0").unwrap()[0], released);
    assert_eq!(
        store.unreleased_attempts().unwrap(),
        vec![attempt("a-0", 2, None), attempt("b-0", 2, None)]
    );

    // Rewriting the run must not drop its attempts.
    store
        .put_run(&RunRecord {
            phase: Phase::Failed,
            ..bare_run("a-0", "a")
        })
        .unwrap();
    assert_eq!(store.attempts("a-0").unwrap().len(), 2);

    // An attempt of a run the store does not know is refused.
    let err = store.put_attempt(&attempt("ghost-0", 1, None)).unwrap_err();
    assert!(matches!(err, StoreError::Query { .. }), "{err:?}");
}

#[test]
fn events_come_oldest_first_per_object() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    store
        .add_event(&event(20, "run", "a-0", "Started"))
        .unwrap();
    store
        .add_event(&event(10, "run", "a-0", "Created"))
        .unwrap();
    store
        .add_event(&event(15, "job", "a-0", "Applied"))
        .unwrap();
    store
        .add_event(&event(20, "run", "a-0", "Running"))
        .unwrap();
    store.add_event(&event(5, "run", "b-0", "Created")).unwrap();
    assert_eq!(
        store.events("run", "a-0").unwrap(),
        vec![
            event(10, "run", "a-0", "Created"),
            event(20, "run", "a-0", "Started"),
            event(20, "run", "a-0", "Running"),
        ]
    );
    assert_eq!(
        store.events("job", "a-0").unwrap(),
        vec![event(15, "job", "a-0", "Applied")]
    );
    assert!(store.events("fleet", "a-0").unwrap().is_empty());
}

#[test]
fn spent_sums_jobs_and_respects_since() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    store.add_cost(&cost("a-0", "a", 0, 100, 1.25)).unwrap();
    store.add_cost(&cost("a-1", "a", 100, 200, 2.5)).unwrap();
    store.add_cost(&cost("b-0", "b", 150, 300, 4.0)).unwrap();
    store.add_cost(&cost("c-0", "c", 0, 300, 100.0)).unwrap();
    let jobs = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    assert_eq!(
        store.spent(&jobs(&["a"]), None).unwrap(),
        Usd::from_dollars(3.75)
    );
    assert_eq!(
        store.spent(&jobs(&["a", "b"]), None).unwrap(),
        Usd::from_dollars(7.75)
    );
    // Entries ending after `since` count, those ending at or before it do not.
    assert_eq!(
        store.spent(&jobs(&["a", "b"]), Some(100)).unwrap(),
        Usd::from_dollars(6.5)
    );
    assert_eq!(
        store.spent(&jobs(&["a", "b"]), Some(250)).unwrap(),
        Usd::from_dollars(4.0)
    );
    assert_eq!(
        store.spent(&jobs(&["a", "b"]), Some(300)).unwrap(),
        Usd::from_dollars(0.0)
    );
    assert_eq!(
        store.spent(&jobs(&["nobody"]), None).unwrap(),
        Usd::from_dollars(0.0)
    );
    assert_eq!(store.spent(&[], None).unwrap(), Usd::from_dollars(0.0));

    assert_eq!(
        store.costs("a-1").unwrap(),
        vec![cost("a-1", "a", 100, 200, 2.5)]
    );
}

#[test]
fn forget_run_removes_everything_of_that_run_only() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    for name in ["a-0", "a-1"] {
        store.put_run(&full_run(name, "a")).unwrap();
        store.put_attempt(&attempt(name, 1, Some(5))).unwrap();
        store.add_event(&event(1, "run", name, "Created")).unwrap();
        store.add_cost(&cost(name, "a", 0, 10, 1.0)).unwrap();
    }
    // Another kind of object that happens to share the name stays.
    store.add_event(&event(1, "job", "a-0", "Applied")).unwrap();

    store.forget_run("a-0").unwrap();
    assert_eq!(store.run("a-0").unwrap(), None);
    assert!(store.attempts("a-0").unwrap().is_empty());
    assert!(store.events("run", "a-0").unwrap().is_empty());
    assert!(store.costs("a-0").unwrap().is_empty());
    assert_eq!(store.events("job", "a-0").unwrap().len(), 1);

    assert!(store.run("a-1").unwrap().is_some());
    assert_eq!(store.attempts("a-1").unwrap().len(), 1);
    assert_eq!(store.events("run", "a-1").unwrap().len(), 1);
    assert_eq!(
        store.spent(&["a".to_string()], None).unwrap(),
        Usd::from_dollars(1.0)
    );

    // Forgetting twice is harmless.
    store.forget_run("a-0").unwrap();
}

#[test]
fn hosts_round_trip_and_removed_hosts_are_forgotten() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    let host = |fleet: &str, name: &str| HostRecord {
        status: HostStatus {
            fleet: fleet.to_string(),
            host: name.to_string(),
            reachable: true,
            busy: true,
            gpus_total: 8,
            gpus_free: 3,
            gpu_names: vec!["A100".to_string(), "A100 \"80GB\"".to_string()],
            running: vec!["a-0".to_string(), "b-1".to_string()],
            agents_alive: vec![],
            message: Some("ok".to_string()),
        },
        checked_at: 1_700_000_000,
    };
    let down = HostRecord {
        status: HostStatus {
            reachable: false,
            busy: false,
            gpus_total: 0,
            gpus_free: 0,
            gpu_names: vec![],
            running: vec![],
            message: Some("ssh: connection refused".to_string()),
            ..host("lab", "b").status
        },
        ..host("lab", "b")
    };
    store.put_host(&host("lab", "a")).unwrap();
    store.put_host(&down).unwrap();
    store.put_host(&host("lab", "c")).unwrap();
    store.put_host(&host("cloud", "z")).unwrap();

    assert_eq!(
        store.hosts(Some("lab")).unwrap(),
        vec![host("lab", "a"), down.clone(), host("lab", "c")]
    );
    assert_eq!(store.hosts(None).unwrap().len(), 4);
    assert_eq!(store.hosts(None).unwrap()[0], host("cloud", "z"));

    // Rewriting replaces.
    let updated = HostRecord {
        status: HostStatus {
            gpus_free: 8,
            running: vec![],
            ..host("lab", "a").status
        },
        ..host("lab", "a")
    };
    store.put_host(&updated).unwrap();
    assert_eq!(store.hosts(Some("lab")).unwrap()[0], updated);

    assert_eq!(store.forget_hosts_not_in("lab", &["a", "c"]).unwrap(), 1);
    assert_eq!(
        store.hosts(Some("lab")).unwrap(),
        vec![updated, host("lab", "c")]
    );
    let none: &[String] = &[];
    assert_eq!(store.forget_hosts_not_in("lab", none).unwrap(), 2);
    assert_eq!(store.hosts(None).unwrap(), vec![host("cloud", "z")]);
}

#[test]
fn reopening_keeps_everything() {
    let (_dir, path) = temp_db();
    {
        let store = Store::open(&path).unwrap();
        store.put_run(&full_run("a-0", "a")).unwrap();
        store.put_attempt(&attempt("a-0", 1, None)).unwrap();
        store.add_event(&event(1, "run", "a-0", "Created")).unwrap();
        store.add_cost(&cost("a-0", "a", 0, 10, 2.0)).unwrap();
    }
    for store in [
        Store::open(&path).unwrap(),
        Store::open_read_only(&path).unwrap(),
    ] {
        assert_eq!(
            store.runs().unwrap(),
            vec![RunRecord {
                seq: 1,
                ..full_run("a-0", "a")
            }]
        );
        assert_eq!(
            store.unreleased_attempts().unwrap(),
            vec![attempt("a-0", 1, None)]
        );
        assert_eq!(store.events("run", "a-0").unwrap().len(), 1);
        assert_eq!(
            store.spent(&["a".to_string()], None).unwrap(),
            Usd::from_dollars(2.0)
        );
    }
    assert_eq!(user_version(&path), SCHEMA_VERSION);
}

#[test]
fn read_only_open_needs_the_file_and_cannot_write() {
    let (_dir, path) = temp_db();
    let err = Store::open_read_only(&path).err().expect("missing file");
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(!path.exists(), "a read-only open must not create the file");

    drop(Store::open(&path).unwrap());
    let reader = Store::open_read_only(&path).unwrap();
    let err = reader.put_run(&bare_run("a-0", "a")).unwrap_err();
    assert!(matches!(err, StoreError::Query { .. }), "{err:?}");
    assert!(reader.runs().unwrap().is_empty());
}

#[test]
fn reader_is_not_blocked_by_a_writer_mid_transaction() {
    let (_dir, path) = temp_db();
    let writer = Store::open(&path).unwrap();
    writer.put_run(&bare_run("a-0", "a")).unwrap();

    // A second connection (as the controller would hold) opens a write transaction and
    // leaves it open.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "BEGIN IMMEDIATE;
         UPDATE runs SET phase = 'Running' WHERE name = 'a-0';",
    )
    .unwrap();

    let reader = Store::open_read_only(&path).unwrap();
    let started = Instant::now();
    let runs = reader.runs().unwrap();
    // Well under the 5 s busy timeout: the reader did not wait for the lock.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].phase,
        Phase::Pending,
        "uncommitted write must not be seen"
    );

    raw.execute_batch("COMMIT").unwrap();
    assert_eq!(reader.run("a-0").unwrap().unwrap().phase, Phase::Running);
}

#[test]
fn reader_sees_consistent_snapshots_while_another_thread_writes() {
    let (_dir, path) = temp_db();
    drop(Store::open(&path).unwrap());
    let writer_path = path.clone();
    let writer = std::thread::spawn(move || {
        let store = Store::open(&writer_path).unwrap();
        for batch in 0..50 {
            // Each batch of 10 is one transaction, so a reader sees multiples of 10.
            let runs: Vec<RunRecord> = (0..10)
                .map(|i| bare_run(&format!("w{batch}-{i}"), &format!("w{batch}")))
                .collect();
            store.put_runs(&runs).unwrap();
        }
    });
    let reader = Store::open_read_only(&path).unwrap();
    let mut last = 0;
    let mut reads = 0;
    while !writer.is_finished() || reads == 0 {
        let n = reader.runs().unwrap().len();
        assert_eq!(n % 10, 0, "saw a half-written batch: {n}");
        assert!(n >= last, "count went back from {last} to {n}");
        last = n;
        reads += 1;
    }
    writer.join().unwrap();
    assert_eq!(reader.runs().unwrap().len(), 500);
}

/// The schema as version 1 shipped it, frozen here so the test keeps checking that such
/// a file still migrates.
const V1_SCHEMA: &str = r#"
    CREATE TABLE runs (
        name TEXT PRIMARY KEY NOT NULL, job TEXT NOT NULL, run_index INTEGER NOT NULL,
        seq INTEGER NOT NULL, phase TEXT NOT NULL, reason TEXT NOT NULL,
        spec_hash TEXT NOT NULL, matrix TEXT NOT NULL, attempt INTEGER NOT NULL,
        placement_index INTEGER NOT NULL, provider TEXT, instance_id TEXT, host TEXT,
        gpu TEXT, price_per_hour REAL, cost_usd REAL NOT NULL, progress_done INTEGER,
        progress_total INTEGER, exit_code INTEGER, repository TEXT, commit_id TEXT,
        commit_message TEXT, author TEXT, dirty INTEGER NOT NULL, diff TEXT,
        created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, started_at INTEGER,
        finished_at INTEGER
    );
    CREATE INDEX runs_job ON runs (job);
    CREATE INDEX runs_seq ON runs (seq, name);
    CREATE TABLE attempts (
        run TEXT NOT NULL REFERENCES runs (name) ON DELETE CASCADE,
        attempt INTEGER NOT NULL, tag TEXT NOT NULL, provider TEXT NOT NULL,
        placement_index INTEGER NOT NULL, instance_id TEXT, host TEXT,
        intent_at INTEGER NOT NULL, released_at INTEGER, outcome TEXT,
        PRIMARY KEY (run, attempt)
    );
    CREATE INDEX attempts_unreleased ON attempts (run, attempt) WHERE released_at IS NULL;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
        object_kind TEXT NOT NULL, object_name TEXT NOT NULL, reason TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_object ON events (object_kind, object_name, at, id);
    CREATE TABLE cost (
        id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, job TEXT NOT NULL,
        attempt INTEGER NOT NULL, from_at INTEGER NOT NULL, to_at INTEGER NOT NULL,
        usd REAL NOT NULL
    );
    CREATE INDEX cost_job ON cost (job, to_at);
    CREATE INDEX cost_run ON cost (run);
    INSERT INTO runs VALUES ('old-0', 'old', 0, 7, 'Succeeded', 'done', 'h', '{"lr":"1"}',
        1, 0, 'vast', '42', NULL, 'A100', 1.5, 3.0, 10, 10, 0, NULL, NULL, NULL, NULL, 0,
        NULL, 100, 200, 110, 190);
    INSERT INTO cost (run, job, attempt, from_at, to_at, usd) VALUES ('old-0', 'old', 1, 110, 190, 3.0);
    PRAGMA user_version = 1;
"#;

#[test]
fn an_older_file_is_migrated_and_keeps_its_data() {
    let (dir, _) = temp_db();
    let path = dir.path().join("state.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(V1_SCHEMA)
        .unwrap();
    assert_eq!(user_version(&path), 1);

    // A read-only open cannot migrate, so it refuses rather than misreading.
    let err = Store::open_read_only(&path).err().expect("old schema");
    assert!(
        matches!(err, StoreError::Version { found: 1, .. }),
        "{err:?}"
    );

    let store = Store::open(&path).unwrap();
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    let old = store.run("old-0").unwrap().expect("run kept by migration");
    assert_eq!(
        (
            old.seq,
            old.phase,
            old.provider,
            old.matrix.get("lr").map(String::as_str)
        ),
        (7, Phase::Succeeded, Some(ProviderKind::Vast), Some("1"))
    );
    assert_eq!(
        store.spent(&["old".to_string()], None).unwrap(),
        Usd::from_dollars(3.0)
    );
    // The table the newer version added works.
    store
        .put_host(&HostRecord {
            status: HostStatus {
                fleet: "lab".to_string(),
                host: "a".to_string(),
                reachable: true,
                busy: false,
                gpus_total: 1,
                gpus_free: 1,
                gpu_names: vec!["L4".to_string()],
                running: vec![],
                agents_alive: vec![],
                message: None,
            },
            checked_at: 1,
        })
        .unwrap();
    assert_eq!(store.hosts(Some("lab")).unwrap().len(), 1);
    // A new run continues after the migrated run's seq.
    store.put_run(&bare_run("new-0", "new")).unwrap();
    assert_eq!(store.run("new-0").unwrap().unwrap().seq, 8);
}

#[test]
fn a_newer_file_is_refused() {
    let (_dir, path) = temp_db();
    drop(Store::open(&path).unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    for result in [Store::open(&path), Store::open_read_only(&path)] {
        let err = result.err().expect("newer schema");
        assert!(matches!(err, StoreError::Version { .. }), "{err:?}");
    }
}

#[test]
fn unknown_values_in_the_file_are_reported_as_corruption() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    store.put_run(&bare_run("a-0", "a")).unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE runs SET phase = 'Exploded'", [])
        .unwrap();
    let err = store.runs().unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains("Exploded")),
        "{err:?}"
    );
}

#[test]
fn an_intent_writes_the_run_row_and_its_attempt_together() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    let mut run = bare_run("train-0", "train");
    store.put_run(&run).unwrap();
    run.attempt = 1;
    let intent = attempt("train-0", 1, None);
    store.put_intent(&intent, &run).unwrap();
    assert_eq!(store.run("train-0").unwrap().unwrap().attempt, 1);
    assert_eq!(store.attempts("train-0").unwrap(), vec![intent.clone()]);

    // An attempt of an unknown run fails as a whole: no run row appears either.
    let mut stray = bare_run("ghost-0", "ghost");
    stray.attempt = 1;
    let mut bad = attempt("other-0", 1, None);
    bad.run = "other-0".into();
    assert!(store.put_intent(&bad, &stray).is_err());
    assert!(store.run("ghost-0").unwrap().is_none());
}

#[test]
fn a_runs_diff_is_kept_apart_and_read_only_on_request() {
    let (_dir, path) = temp_db();
    let store = Store::open(&path).unwrap();
    let run = full_run("train-0", "train");
    let diff = "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n";
    store.put_run_with_diff(&run, Some(diff)).unwrap();
    assert_eq!(store.diff("train-0").unwrap().as_deref(), Some(diff));
    // Later writes of the record (status updates) leave the diff alone.
    let mut later = store.run("train-0").unwrap().unwrap();
    later.reason = "still training".into();
    store.put_run(&later).unwrap();
    assert_eq!(store.diff("train-0").unwrap().as_deref(), Some(diff));
    // Recording the run's code again can clear it.
    store.put_run_with_diff(&later, None).unwrap();
    assert_eq!(store.diff("train-0").unwrap(), None);
    assert_eq!(store.diff("nope").unwrap(), None);
}
