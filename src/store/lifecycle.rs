//! A run's life across attempts: pauses and resumes (desired state that the planner
//! honours, like `stops`), when each attempt's agent last answered and why each attempt
//! ended, and the latest metrics line of each run.

use super::{Store, StoreResult, query};
use crate::model::{RunName, Timestamp};
use rusqlite::{OptionalExtension, params};
use std::collections::BTreeMap;

/// The last `asimov pause` or `asimov resume` of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    /// True: paused until resumed; false: resumed (scheduled pauses before `at` are
    /// lifted).
    pub paused: bool,
    pub at: Timestamp,
}

/// The latest metrics line a run's job wrote, and the value of its stop rule's metric.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetrics {
    pub attempt: u32,
    /// The JSON line as the job wrote it.
    pub line: String,
    /// The first `stop_when` rule's metric and its value in that line.
    pub metric: Option<String>,
    pub value: Option<f64>,
    pub at: Timestamp,
}

impl Store {
    /// Records a pause (`paused`) or a resume of `run`, replacing the last one.
    pub fn put_pause(&self, run: &str, paused: bool, at: Timestamp) -> StoreResult<()> {
        const STEP: &str = "recording a pause";
        self.conn
            .execute(
                "INSERT INTO run_pauses (run, paused, at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (run) DO UPDATE SET paused = excluded.paused, at = excluded.at",
                params![run, paused, at],
            )
            .map(|_| ())
            .map_err(query(STEP))
    }

    /// The last pause or resume of every run that had one.
    pub fn pauses(&self) -> StoreResult<BTreeMap<RunName, Pause>> {
        const STEP: &str = "reading pauses";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT run, paused, at FROM run_pauses")
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Pause {
                        paused: r.get(1)?,
                        at: r.get(2)?,
                    },
                ))
            })
            .map_err(query(STEP))?;
        rows.collect::<Result<_, _>>().map_err(query(STEP))
    }

    /// Records that the agents of these attempts `(run, attempt, at)` answered at `at`.
    /// One transaction for all; an attempt of a forgotten run is skipped.
    pub fn put_seen(&self, seen: &[(RunName, u32, Timestamp)]) -> StoreResult<()> {
        const STEP: &str = "recording agents seen";
        if seen.is_empty() {
            return Ok(());
        }
        let tx = self.write(STEP)?;
        for (run, attempt, at) in seen {
            tx.prepare_cached(
                "INSERT INTO attempt_notes (run, attempt, seen_at) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM runs WHERE name = ?1) \
                 ON CONFLICT (run, attempt) DO UPDATE SET seen_at = excluded.seen_at",
            )
            .and_then(|mut stmt| stmt.execute(params![run, attempt, at]))
            .map_err(query(STEP))?;
        }
        tx.commit().map_err(query(STEP))
    }

    /// When the agent of each run's newest seen attempt last answered: run → (attempt,
    /// at).
    pub fn seen(&self) -> StoreResult<BTreeMap<RunName, (u32, Timestamp)>> {
        const STEP: &str = "reading agents seen";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT run, attempt, seen_at FROM attempt_notes WHERE seen_at IS NOT NULL",
            )
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Timestamp>(2)?,
                ))
            })
            .map_err(query(STEP))?;
        let mut out: BTreeMap<RunName, (u32, Timestamp)> = BTreeMap::new();
        for row in rows {
            let (run, attempt, at) = row.map_err(query(STEP))?;
            let slot = out.entry(run).or_insert((attempt, at));
            if attempt > slot.0 {
                *slot = (attempt, at);
            }
        }
        Ok(out)
    }

    /// Records why `attempt` of `run` ended (the decision that followed it), once.
    pub fn put_ended_reason(&self, run: &str, attempt: u32, reason: &str) -> StoreResult<()> {
        const STEP: &str = "recording why an attempt ended";
        self.conn
            .execute(
                "INSERT INTO attempt_notes (run, attempt, ended_reason) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM runs WHERE name = ?1) \
                 ON CONFLICT (run, attempt) DO UPDATE SET ended_reason = \
                 coalesce(attempt_notes.ended_reason, excluded.ended_reason)",
                params![run, attempt, reason],
            )
            .map(|_| ())
            .map_err(query(STEP))
    }

    /// Why each ended attempt of `run` ended: attempt → reason.
    pub fn ended_reasons(&self, run: &str) -> StoreResult<BTreeMap<u32, String>> {
        const STEP: &str = "reading why attempts ended";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT attempt, ended_reason FROM attempt_notes \
                 WHERE run = ?1 AND ended_reason IS NOT NULL",
            )
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([run], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?)))
            .map_err(query(STEP))?;
        rows.collect::<Result<_, _>>().map_err(query(STEP))
    }

    /// Records the latest metrics of these runs, in one transaction; a forgotten run is
    /// skipped.
    pub fn put_metrics(&self, metrics: &[(RunName, RunMetrics)]) -> StoreResult<()> {
        const STEP: &str = "recording metrics";
        if metrics.is_empty() {
            return Ok(());
        }
        let tx = self.write(STEP)?;
        for (run, m) in metrics {
            tx.prepare_cached(
                "INSERT INTO run_metrics (run, attempt, line, metric, value, at) \
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM runs WHERE name = ?1) \
                 ON CONFLICT (run) DO UPDATE SET attempt = excluded.attempt, \
                 line = excluded.line, metric = excluded.metric, value = excluded.value, \
                 at = excluded.at",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![run, m.attempt, m.line, m.metric, m.value, m.at])
            })
            .map_err(query(STEP))?;
        }
        tx.commit().map_err(query(STEP))
    }

    /// The latest metrics of `run`, if its job wrote any.
    pub fn metrics(&self, run: &str) -> StoreResult<Option<RunMetrics>> {
        const STEP: &str = "reading metrics";
        self.conn
            .prepare_cached(
                "SELECT attempt, line, metric, value, at FROM run_metrics WHERE run = ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([run], |r| {
                    Ok(RunMetrics {
                        attempt: r.get(0)?,
                        line: r.get(1)?,
                        metric: r.get(2)?,
                        value: r.get(3)?,
                        at: r.get(4)?,
                    })
                })
                .optional()
            })
            .map_err(query(STEP))
    }

    /// The stop rule's metric and latest value of every run that has one: run →
    /// (metric, value).
    pub fn metric_values(&self) -> StoreResult<BTreeMap<RunName, (String, f64)>> {
        const STEP: &str = "reading metrics";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT run, metric, value FROM run_metrics \
                 WHERE metric IS NOT NULL AND value IS NOT NULL",
            )
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get::<_, String>(1)?, r.get::<_, f64>(2)?),
                ))
            })
            .map_err(query(STEP))?;
        rows.collect::<Result<_, _>>().map_err(query(STEP))
    }
}
