//! The schema, as an append-only list of steps. Step `i` takes a file from
//! `PRAGMA user_version` `i` to `i + 1`; a released step is never edited, only followed
//! by a new one, so every old file migrates along the same path.

use super::{StoreError, StoreResult};
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;

/// One schema step: SQL, then (for steps that fill what they made from what is there)
/// code run in the same transaction.
struct Step {
    sql: &'static str,
    fill: Option<fn(&Connection) -> rusqlite::Result<()>>,
}

const fn sql(sql: &'static str) -> Step {
    Step { sql, fill: None }
}

/// The schema steps, oldest first.
const STEPS: &[Step] = &[
    // 1: runs, attempts, events and the cost ledger.
    sql(r#"
    CREATE TABLE runs (
        name            TEXT PRIMARY KEY NOT NULL,
        job             TEXT NOT NULL,
        run_index       INTEGER NOT NULL,
        seq             INTEGER NOT NULL,
        phase           TEXT NOT NULL,
        reason          TEXT NOT NULL,
        spec_hash       TEXT NOT NULL,
        matrix          TEXT NOT NULL,
        attempt         INTEGER NOT NULL,
        placement_index INTEGER NOT NULL,
        provider        TEXT,
        instance_id     TEXT,
        host            TEXT,
        gpu             TEXT,
        price_per_hour  REAL,
        cost_usd        REAL NOT NULL,
        progress_done   INTEGER,
        progress_total  INTEGER,
        exit_code       INTEGER,
        repository      TEXT,
        commit_id       TEXT,
        commit_message  TEXT,
        author          TEXT,
        dirty           INTEGER NOT NULL,
        diff            TEXT,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL,
        started_at      INTEGER,
        finished_at     INTEGER
    );
    CREATE INDEX runs_job ON runs (job);
    CREATE INDEX runs_seq ON runs (seq, name);

    CREATE TABLE attempts (
        run             TEXT NOT NULL REFERENCES runs (name) ON DELETE CASCADE,
        attempt         INTEGER NOT NULL,
        tag             TEXT NOT NULL,
        provider        TEXT NOT NULL,
        placement_index INTEGER NOT NULL,
        instance_id     TEXT,
        host            TEXT,
        intent_at       INTEGER NOT NULL,
        released_at     INTEGER,
        outcome         TEXT,
        PRIMARY KEY (run, attempt)
    );
    CREATE INDEX attempts_unreleased ON attempts (run, attempt) WHERE released_at IS NULL;

    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          INTEGER NOT NULL,
        object_kind TEXT NOT NULL,
        object_name TEXT NOT NULL,
        reason      TEXT NOT NULL,
        message     TEXT NOT NULL
    );
    CREATE INDEX events_object ON events (object_kind, object_name, at, id);

    CREATE TABLE cost (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        run     TEXT NOT NULL,
        job     TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        from_at INTEGER NOT NULL,
        to_at   INTEGER NOT NULL,
        usd     REAL NOT NULL
    );
    CREATE INDEX cost_job ON cost (job, to_at);
    CREATE INDEX cost_run ON cost (run);
    "#),
    // 2: last known status of fleet hosts.
    sql(r#"
    CREATE TABLE hosts (
        fleet      TEXT NOT NULL,
        host       TEXT NOT NULL,
        reachable  INTEGER NOT NULL,
        busy       INTEGER NOT NULL,
        gpus_total INTEGER NOT NULL,
        gpus_free  INTEGER NOT NULL,
        gpu_names  TEXT NOT NULL,
        running    TEXT NOT NULL,
        checked_at INTEGER NOT NULL,
        message    TEXT NOT NULL,
        PRIMARY KEY (fleet, host)
    );
    "#),
    // 3: what the controller reconciles (its desired state, where each object came
    // from, the problems of files kept at their last good state), whether a controller
    // watches this home, and the last error of each run's steps.
    sql(r#"
    CREATE TABLE desired_source (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        folder      TEXT NOT NULL,
        git_commit  TEXT,
        generation  INTEGER NOT NULL,
        read_at_ms  INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL
    );
    CREATE TABLE desired_objects (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        file TEXT NOT NULL,
        line INTEGER NOT NULL,
        yaml TEXT NOT NULL,
        PRIMARY KEY (kind, name)
    );
    CREATE TABLE desired_problems (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        file     TEXT NOT NULL,
        line     INTEGER NOT NULL,
        col      INTEGER NOT NULL,
        message  TEXT NOT NULL,
        since    INTEGER NOT NULL
    );
    CREATE TABLE controller_status (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        pid         INTEGER NOT NULL,
        started_at  INTEGER NOT NULL,
        seen_at     INTEGER NOT NULL,
        stopping_at INTEGER,
        stopped_at  INTEGER
    );
    CREATE TABLE run_errors (
        run     TEXT PRIMARY KEY NOT NULL,
        step    TEXT NOT NULL,
        message TEXT NOT NULL,
        detail  TEXT NOT NULL,
        at      INTEGER NOT NULL
    );
    "#),
    // 4: attempt outcomes in the stable text form of `model::Outcome` (a failure keeps
    // its exit code, `ended` was a superseded attempt); runs remember when their held
    // instance started billing, and `cost_usd` is the ledger alone: cost so far is
    // derived when read instead of rewritten as time passes.
    sql(r#"
    UPDATE attempts SET outcome = 'superseded' WHERE outcome = 'ended';
    UPDATE attempts SET outcome = 'superseded (spec changed)'
        WHERE outcome = 'ended (spec changed)';
    UPDATE attempts SET outcome = 'failed:' || (
            SELECT r.exit_code FROM runs r WHERE r.name = attempts.run AND r.attempt = attempts.attempt)
        || CASE WHEN outcome = 'failed' THEN '' ELSE ' (spec changed)' END
        WHERE outcome IN ('failed', 'failed (spec changed)') AND EXISTS (
            SELECT 1 FROM runs r WHERE r.name = attempts.run AND r.attempt = attempts.attempt
            AND r.exit_code IS NOT NULL AND r.exit_code <> 0);
    ALTER TABLE runs ADD COLUMN billing_since INTEGER;
    UPDATE runs SET billing_since = (
            SELECT a.intent_at FROM attempts a WHERE a.run = runs.name AND a.attempt = runs.attempt
            AND a.released_at IS NULL AND a.instance_id IS NOT NULL)
        WHERE price_per_hour IS NOT NULL;
    UPDATE runs SET cost_usd = coalesce((SELECT sum(c.usd) FROM cost c WHERE c.run = runs.name), 0.0);
    "#),
    // 5: runs stopped by `asimov destroy`, for the spec they had: desired state the
    // planner honours (a restarted controller does not bring them back). IF NOT EXISTS
    // keeps the step harmless wherever it lands in the order of steps.
    sql(r#"
    CREATE TABLE IF NOT EXISTS stops (
        run       TEXT PRIMARY KEY,
        spec_hash TEXT NOT NULL,
        at        INTEGER NOT NULL
    );
    "#),
    // 6: checkpoints: each sync of a run's checkpoint folder brought home complete, and
    // which checkpoint each attempt resumed from (gone with the run).
    sql(r#"
    CREATE TABLE checkpoint_syncs (
        run      TEXT NOT NULL REFERENCES runs (name) ON DELETE CASCADE,
        attempt  INTEGER NOT NULL,
        seq      INTEGER NOT NULL,
        at       INTEGER NOT NULL,
        final    INTEGER NOT NULL,
        PRIMARY KEY (run, seq)
    );
    CREATE TABLE attempt_resumes (
        run        TEXT NOT NULL REFERENCES runs (name) ON DELETE CASCADE,
        attempt    INTEGER NOT NULL,
        checkpoint INTEGER NOT NULL,
        at         INTEGER NOT NULL,
        PRIMARY KEY (run, attempt)
    );
    "#),
    // 7: run lifecycle: pauses and resumes (desired state, like `stops`), when each
    // attempt's agent last answered and why it ended, the latest metrics of each run.
    sql(r#"
    CREATE TABLE IF NOT EXISTS run_pauses (
        run    TEXT PRIMARY KEY,
        paused INTEGER NOT NULL,
        at     INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS attempt_notes (
        run          TEXT NOT NULL REFERENCES runs (name) ON DELETE CASCADE,
        attempt      INTEGER NOT NULL,
        seen_at      INTEGER,
        ended_reason TEXT,
        PRIMARY KEY (run, attempt)
    );
    CREATE TABLE IF NOT EXISTS run_metrics (
        run     TEXT PRIMARY KEY REFERENCES runs (name) ON DELETE CASCADE,
        attempt INTEGER NOT NULL,
        line    TEXT NOT NULL,
        metric  TEXT,
        value   REAL,
        at      INTEGER NOT NULL
    );
    "#),
    // 8: how each attempt's job ended, as its agent reported it the first time the
    // controller saw it, before anything was collected. An instance that then ends
    // itself is not taken for a preempted one.
    sql(r#"
    CREATE TABLE IF NOT EXISTS attempt_ends (
        run      TEXT NOT NULL REFERENCES runs (name) ON DELETE CASCADE,
        attempt  INTEGER NOT NULL,
        outcome  TEXT NOT NULL,
        seen_at  INTEGER NOT NULL,
        PRIMARY KEY (run, attempt)
    );
    "#),
    // 9: attempts whose instance was stopped with its disk kept on pause (and a start
    // of it refused for good), gone with the run.
    sql(r#"
    CREATE TABLE IF NOT EXISTS attempt_disks (
        run      TEXT NOT NULL REFERENCES runs (name) ON DELETE CASCADE,
        attempt  INTEGER NOT NULL,
        at       INTEGER NOT NULL,
        stopped_at INTEGER,
        refused  TEXT,
        PRIMARY KEY (run, attempt)
    );
    "#),
    // 10: the listing rows `get runs` reads instead of the full rows (`listing.rs`),
    // filled from every run there is.
    Step {
        sql: super::listing::TABLES,
        fill: Some(super::listing::rebuild),
    },
];

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = STEPS.len() as u32;

/// The schema version of the open file (0 for a new one).
pub(super) fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |row| row.get(0))
}

/// Applies every step the file lacks, each in its own transaction together with the
/// `user_version` bump, so a failure leaves the file at the last complete version.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> StoreResult<()> {
    migrate_to(conn, path, SCHEMA_VERSION)
}

pub(super) fn migrate_to(conn: &mut Connection, path: &Path, target: u32) -> StoreResult<()> {
    loop {
        // IMMEDIATE, and the version read inside it: two processes opening a new file at
        // once must not both apply the same step.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let current = version(&tx).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if current > SCHEMA_VERSION {
            return Err(StoreError::Version {
                path: path.to_path_buf(),
                found: current,
                expected: SCHEMA_VERSION,
            });
        }
        if current >= target {
            return Ok(());
        }
        let next = current + 1;
        let step = &STEPS[current as usize];
        let migrate_err = |source| StoreError::Migrate {
            version: next,
            source,
        };
        tx.execute_batch(step.sql).map_err(migrate_err)?;
        if let Some(fill) = step.fill {
            fill(&tx).map_err(migrate_err)?;
        }
        tx.pragma_update(None, "user_version", next)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_apply_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = Connection::open(&path).unwrap();
        migrate_to(&mut conn, &path, 1).unwrap();
        assert_eq!(version(&conn).unwrap(), 1);
        let hosts: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'hosts'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(hosts, 0);
        migrate(&mut conn, &path).unwrap();
        assert_eq!(version(&conn).unwrap(), SCHEMA_VERSION);
        // Running again is a no-op.
        migrate(&mut conn, &path).unwrap();
        assert_eq!(version(&conn).unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn outcomes_migrate_to_their_stable_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = Connection::open(&path).unwrap();
        migrate_to(&mut conn, &path, 2).unwrap();
        conn.execute_batch(
            "INSERT INTO runs VALUES ('r-0', 'r', 0, 1, 'Failed', '', 'h', '{}', 2, 0, 'fake',
               'i2', NULL, NULL, 1.0, 9.99, NULL, NULL, 3, NULL, NULL, NULL, NULL, 0, NULL,
               0, 0, NULL, NULL);
             INSERT INTO runs VALUES ('q-0', 'q', 0, 2, 'Running', '', 'h', '{}', 1, 0, 'fake',
               'i3', NULL, NULL, 2.0, 5.0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL,
               0, 0, NULL, NULL);
             INSERT INTO attempts VALUES ('r-0', 1, 't1', 'fake', 0, 'i1', NULL, 10, 20, 'ended');
             INSERT INTO attempts VALUES ('r-0', 2, 't2', 'fake', 0, 'i2', NULL, 30, 40, 'failed');
             INSERT INTO attempts VALUES ('q-0', 1, 't3', 'fake', 0, 'i3', NULL, 50, NULL, NULL);
             INSERT INTO cost (run, job, attempt, from_at, to_at, usd) VALUES
               ('r-0', 'r', 2, 30, 40, 1.25);",
        )
        .unwrap();
        migrate(&mut conn, &path).unwrap();
        let outcomes: Vec<String> = conn
            .prepare("SELECT outcome FROM attempts WHERE run = 'r-0' ORDER BY attempt")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(outcomes, ["superseded", "failed:3"]);
        for o in &outcomes {
            assert!(crate::model::Outcome::parse(o).is_some(), "{o}");
        }
        let row = |name: &str| -> (f64, Option<i64>) {
            conn.query_row(
                "SELECT cost_usd, billing_since FROM runs WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        assert_eq!(row("r-0"), (1.25, None), "the ledger alone, nothing held");
        assert_eq!(row("q-0"), (0.0, Some(50)), "billing since its intent");
    }

    #[test]
    fn newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = migrate(&mut conn, &path).unwrap_err();
        assert!(
            matches!(err, StoreError::Version { found, .. } if found == SCHEMA_VERSION + 1),
            "{err:?}"
        );
    }
}
