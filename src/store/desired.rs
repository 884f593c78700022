//! What the controller reconciles, as it last recorded it: its manifests folder (and the
//! folder's git commit), every object in force with the file it came from and its
//! document, and the problems of files whose objects are kept at their last good state.
//! Every CLI reader shows this, so the CLI and the controller never disagree. Also the
//! liveness of the controller (`controller_status`) and the last error of each run's
//! steps (`run_errors`). Documents are opaque text here: the store knows no YAML.

use super::{Store, StoreResult, query};
use crate::model::Timestamp;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One object in force.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredObject {
    /// "Job", "Fleet", "Budget".
    pub kind: String,
    pub name: String,
    pub file: PathBuf,
    pub line: usize,
    /// The document as the controller validated it.
    pub yaml: String,
}

/// A problem of a file in the watched folder.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredProblem {
    pub file: PathBuf,
    /// 1-based; 0 for the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// When this file first stopped validating (kept across records while it stays broken).
    pub since: Timestamp,
}

/// The folder the controller reads, without its objects.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredFolder {
    pub folder: PathBuf,
    /// HEAD of the git work tree holding the folder, if any.
    pub commit: Option<String>,
    /// Bumped by every record.
    pub generation: i64,
    /// When the folder read of this record began (milliseconds since the epoch): a file
    /// changed before this is in it.
    pub read_at_ms: i64,
    pub recorded_at: Timestamp,
}

/// Everything the controller last recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredRecord {
    pub source: DesiredFolder,
    pub objects: Vec<DesiredObject>,
    pub problems: Vec<DesiredProblem>,
}

/// The controller process of this home, as it last reported itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerStatus {
    pub pid: u32,
    pub started_at: Timestamp,
    /// Its last heartbeat.
    pub seen_at: Timestamp,
    /// When it was asked to stop (it finishes in-flight ops first).
    pub stopping_at: Option<Timestamp>,
    /// When it stopped cleanly; `None` after a crash.
    pub stopped_at: Option<Timestamp>,
}

/// The last failure of one of a run's steps, for the reason column and `describe`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunError {
    /// "create", "start", "setup", "collect", "destroy", ...
    pub step: String,
    /// One line.
    pub message: String,
    /// Further lines (the last lines of a failed setup's output), possibly empty.
    pub detail: String,
    pub at: Timestamp,
}

fn usize_at(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<usize> {
    let v: i64 = row.get(column)?;
    Ok(usize::try_from(v).unwrap_or(0))
}

impl Store {
    /// Replaces the recorded desired state, in one transaction. A problem's `since` is
    /// kept from the previous record when its file was already broken.
    pub fn record_desired(
        &self,
        source: &DesiredFolder,
        objects: &[DesiredObject],
        problems: &[DesiredProblem],
    ) -> StoreResult<i64> {
        const STEP: &str = "recording the desired state";
        let tx = self.write(STEP)?;
        let q = query(STEP);
        let mut since: BTreeMap<String, Timestamp> = BTreeMap::new();
        {
            let mut stmt = tx
                .prepare_cached("SELECT file, min(since) FROM desired_problems GROUP BY file")
                .map_err(&q)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(&q)?;
            for row in rows {
                let (file, at) = row.map_err(&q)?;
                since.insert(file, at);
            }
        }
        let generation: i64 = tx
            .query_row(
                "SELECT coalesce(max(generation), 0) + 1 FROM desired_source",
                [],
                |r| r.get(0),
            )
            .map_err(&q)?;
        tx.execute(
            "INSERT OR REPLACE INTO desired_source \
             (id, folder, git_commit, generation, read_at_ms, recorded_at) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5)",
            (
                source.folder.to_string_lossy(),
                &source.commit,
                generation,
                source.read_at_ms,
                source.recorded_at,
            ),
        )
        .map_err(&q)?;
        tx.execute("DELETE FROM desired_objects", []).map_err(&q)?;
        tx.execute("DELETE FROM desired_problems", []).map_err(&q)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO desired_objects (kind, name, file, line, yaml) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(&q)?;
            for o in objects {
                stmt.execute((
                    &o.kind,
                    &o.name,
                    o.file.to_string_lossy(),
                    o.line as i64,
                    &o.yaml,
                ))
                .map_err(&q)?;
            }
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO desired_problems (file, line, col, message, since) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(&q)?;
            for p in problems {
                let file = p.file.to_string_lossy().into_owned();
                let at = since.get(&file).copied().unwrap_or(p.since).min(p.since);
                stmt.execute((&file, p.line as i64, p.column as i64, &p.message, at))
                    .map_err(&q)?;
            }
        }
        tx.commit().map_err(&q)?;
        Ok(generation)
    }

    /// The recorded folder, `None` before any controller recorded one.
    pub fn desired_source(&self) -> StoreResult<Option<DesiredFolder>> {
        const STEP: &str = "reading the desired state's source";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT folder, git_commit, generation, read_at_ms, recorded_at \
                 FROM desired_source WHERE id = 1",
            )
            .map_err(query(STEP))?;
        let mut rows = stmt
            .query_map([], |r| {
                Ok(DesiredFolder {
                    folder: PathBuf::from(r.get::<_, String>(0)?),
                    commit: r.get(1)?,
                    generation: r.get(2)?,
                    read_at_ms: r.get(3)?,
                    recorded_at: r.get(4)?,
                })
            })
            .map_err(query(STEP))?;
        rows.next().transpose().map_err(query(STEP))
    }

    /// The whole recorded desired state, `None` before any controller recorded one.
    /// Objects by kind then name; problems by file then position.
    pub fn desired(&self) -> StoreResult<Option<DesiredRecord>> {
        const STEP: &str = "reading the desired state";
        let Some(source) = self.desired_source()? else {
            return Ok(None);
        };
        let objects = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT kind, name, file, line, yaml FROM desired_objects ORDER BY kind, name",
                )
                .map_err(query(STEP))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(DesiredObject {
                        kind: r.get(0)?,
                        name: r.get(1)?,
                        file: PathBuf::from(r.get::<_, String>(2)?),
                        line: usize_at(r, 3)?,
                        yaml: r.get(4)?,
                    })
                })
                .map_err(query(STEP))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(query(STEP))?
        };
        let problems = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT file, line, col, message, since FROM desired_problems \
                     ORDER BY file, line, col, id",
                )
                .map_err(query(STEP))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(DesiredProblem {
                        file: PathBuf::from(r.get::<_, String>(0)?),
                        line: usize_at(r, 1)?,
                        column: usize_at(r, 2)?,
                        message: r.get(3)?,
                        since: r.get(4)?,
                    })
                })
                .map_err(query(STEP))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(query(STEP))?
        };
        Ok(Some(DesiredRecord {
            source,
            objects,
            problems,
        }))
    }

    /// A controller took this home's lock: it is the one now.
    pub fn controller_started(&self, pid: u32, now: Timestamp) -> StoreResult<()> {
        const STEP: &str = "recording the controller's start";
        self.conn
            .execute(
                "INSERT OR REPLACE INTO controller_status \
                 (id, pid, started_at, seen_at, stopping_at, stopped_at) \
                 VALUES (1, ?1, ?2, ?2, NULL, NULL)",
                (pid, now),
            )
            .map_err(query(STEP))?;
        Ok(())
    }

    /// The controller `pid` is alive (a heartbeat).
    pub fn controller_seen(&self, pid: u32, now: Timestamp) -> StoreResult<()> {
        self.controller_update(
            "UPDATE controller_status SET seen_at = ?2 WHERE pid = ?1",
            pid,
            now,
        )
    }

    /// The controller `pid` was asked to stop and no longer takes new work.
    pub fn controller_stopping(&self, pid: u32, now: Timestamp) -> StoreResult<()> {
        self.controller_update(
            "UPDATE controller_status SET seen_at = ?2, stopping_at = coalesce(stopping_at, ?2) \
             WHERE pid = ?1",
            pid,
            now,
        )
    }

    /// The controller `pid` stopped cleanly.
    pub fn controller_stopped(&self, pid: u32, now: Timestamp) -> StoreResult<()> {
        self.controller_update(
            "UPDATE controller_status SET seen_at = ?2, stopped_at = ?2 WHERE pid = ?1",
            pid,
            now,
        )
    }

    fn controller_update(&self, sql: &str, pid: u32, now: Timestamp) -> StoreResult<()> {
        const STEP: &str = "recording the controller's status";
        self.conn
            .prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute((pid, now)))
            .map_err(query(STEP))?;
        Ok(())
    }

    /// The last controller of this home, `None` if none ever ran.
    pub fn controller_status(&self) -> StoreResult<Option<ControllerStatus>> {
        const STEP: &str = "reading the controller's status";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT pid, started_at, seen_at, stopping_at, stopped_at \
                 FROM controller_status WHERE id = 1",
            )
            .map_err(query(STEP))?;
        let mut rows = stmt
            .query_map([], |r| {
                Ok(ControllerStatus {
                    pid: r.get(0)?,
                    started_at: r.get(1)?,
                    seen_at: r.get(2)?,
                    stopping_at: r.get(3)?,
                    stopped_at: r.get(4)?,
                })
            })
            .map_err(query(STEP))?;
        rows.next().transpose().map_err(query(STEP))
    }

    /// Records the last failure of one of `run`'s steps (replacing the previous one).
    pub fn set_run_error(&self, run: &str, error: &RunError) -> StoreResult<()> {
        const STEP: &str = "recording a run's error";
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO run_errors (run, step, message, detail, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut stmt| {
                stmt.execute((run, &error.step, &error.message, &error.detail, error.at))
            })
            .map_err(query(STEP))?;
        Ok(())
    }

    /// Clears `run`'s last error (its steps went through since).
    pub fn clear_run_error(&self, run: &str) -> StoreResult<()> {
        const STEP: &str = "clearing a run's error";
        self.conn
            .prepare_cached("DELETE FROM run_errors WHERE run = ?1")
            .and_then(|mut stmt| stmt.execute([run]))
            .map_err(query(STEP))?;
        Ok(())
    }

    /// The last error of every run that has one, by run name.
    pub fn run_errors(&self) -> StoreResult<BTreeMap<String, RunError>> {
        const STEP: &str = "reading runs' errors";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT run, step, message, detail, at FROM run_errors")
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    RunError {
                        step: r.get(1)?,
                        message: r.get(2)?,
                        detail: r.get(3)?,
                        at: r.get(4)?,
                    },
                ))
            })
            .map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(read_at_ms: i64) -> DesiredFolder {
        DesiredFolder {
            folder: PathBuf::from("/repo/manifests"),
            commit: Some("abc".into()),
            generation: 0,
            read_at_ms,
            recorded_at: read_at_ms / 1000,
        }
    }

    fn problem(file: &str, since: Timestamp) -> DesiredProblem {
        DesiredProblem {
            file: PathBuf::from(file),
            line: 3,
            column: 5,
            message: "expected a mapping".into(),
            since,
        }
    }

    #[test]
    fn a_broken_file_keeps_the_time_it_broke_until_it_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        assert!(store.desired().unwrap().is_none());
        let job = DesiredObject {
            kind: "Job".into(),
            name: "g1".into(),
            file: PathBuf::from("/repo/manifests/g1.yaml"),
            line: 1,
            yaml: "kind: Job\n".into(),
        };
        let g1 = store
            .record_desired(
                &source(1_000),
                std::slice::from_ref(&job),
                &[problem("/m/b.yaml", 1)],
            )
            .unwrap();
        let g2 = store
            .record_desired(
                &source(2_000),
                std::slice::from_ref(&job),
                &[problem("/m/b.yaml", 2)],
            )
            .unwrap();
        assert_eq!(g2, g1 + 1);
        let record = store.desired().unwrap().unwrap();
        assert_eq!(record.objects, vec![job.clone()]);
        assert_eq!(
            record.problems[0].since, 1,
            "still broken since the first record"
        );
        assert_eq!(record.source.read_at_ms, 2_000);
        assert_eq!(record.source.commit.as_deref(), Some("abc"));
        // Fixed, then broken again: a new since.
        store.record_desired(&source(3_000), &[], &[]).unwrap();
        store
            .record_desired(&source(4_000), &[], &[problem("/m/b.yaml", 4)])
            .unwrap();
        let record = store.desired().unwrap().unwrap();
        assert!(record.objects.is_empty());
        assert_eq!(record.problems[0].since, 4);
    }

    #[test]
    fn controller_liveness_and_run_errors_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        assert!(store.controller_status().unwrap().is_none());
        store.controller_started(42, 10).unwrap();
        store.controller_seen(42, 15).unwrap();
        // Another pid's reports do not touch the current controller's entry.
        store.controller_stopped(7, 16).unwrap();
        store.controller_stopping(42, 20).unwrap();
        store.controller_stopped(42, 21).unwrap();
        let c = store.controller_status().unwrap().unwrap();
        assert_eq!(
            c,
            ControllerStatus {
                pid: 42,
                started_at: 10,
                seen_at: 21,
                stopping_at: Some(20),
                stopped_at: Some(21),
            }
        );
        let error = RunError {
            step: "start".into(),
            message: "upload failed".into(),
            detail: String::new(),
            at: 30,
        };
        store.set_run_error("r-0", &error).unwrap();
        assert_eq!(store.run_errors().unwrap().get("r-0"), Some(&error));
        store.clear_run_error("r-0").unwrap();
        assert!(store.run_errors().unwrap().is_empty());
    }
}
