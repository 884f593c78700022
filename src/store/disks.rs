//! Disks kept on pause: an attempt whose instance asimov stopped with its disk kept (a
//! pause that resumes on the same disk), and a start of it that was refused for good.
//! The planner reads them: a kept attempt stays open while its instance is stopped, and
//! is started again on resume instead of being taken for a preempted one.

use super::{Store, StoreResult, query};
use crate::model::{RunName, Timestamp};
use rusqlite::params;
use std::collections::BTreeMap;

/// An attempt whose instance is (being) stopped with its disk kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptDisk {
    /// When the pause that keeps it was recorded (before the final sync and the stop).
    pub at: Timestamp,
    /// When the provider confirmed the stop (the instance bills storage only).
    pub stopped_at: Option<Timestamp>,
    /// Why a start of it on resume was refused for good: it will not run again, and
    /// the run goes on from its synced checkpoint on a new instance.
    pub refused: Option<String>,
}

impl Store {
    /// Records that attempt `attempt` of `run` keeps its disk while paused: once (a
    /// record there already is kept, refusal included). A forgotten run is skipped.
    pub fn put_kept_disk(&self, run: &str, attempt: u32, at: Timestamp) -> StoreResult<()> {
        const STEP: &str = "recording a kept disk";
        self.conn
            .execute(
                "INSERT INTO attempt_disks (run, attempt, at) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM runs WHERE name = ?1) \
                 ON CONFLICT (run, attempt) DO NOTHING",
                params![run, attempt, at],
            )
            .map(|_| ())
            .map_err(query(STEP))
    }

    /// Records that the provider stopped the kept attempt's instance at `at`.
    pub fn stopped_kept_disk(&self, run: &str, attempt: u32, at: Timestamp) -> StoreResult<()> {
        const STEP: &str = "recording a stopped instance";
        self.conn
            .execute(
                "UPDATE attempt_disks SET stopped_at = ?3 WHERE run = ?1 AND attempt = ?2",
                params![run, attempt, at],
            )
            .map(|_| ())
            .map_err(query(STEP))
    }

    /// Records that a start of the kept attempt was refused for good, and why.
    pub fn refuse_kept_disk(&self, run: &str, attempt: u32, why: &str) -> StoreResult<()> {
        const STEP: &str = "recording a refused start";
        self.conn
            .execute(
                "UPDATE attempt_disks SET refused = ?3 WHERE run = ?1 AND attempt = ?2",
                params![run, attempt, why],
            )
            .map(|_| ())
            .map_err(query(STEP))
    }

    /// The attempt runs its job again on its kept disk: no longer kept.
    pub fn drop_kept_disk(&self, run: &str, attempt: u32) -> StoreResult<()> {
        const STEP: &str = "dropping a kept disk";
        self.conn
            .execute(
                "DELETE FROM attempt_disks WHERE run = ?1 AND attempt = ?2",
                params![run, attempt],
            )
            .map(|_| ())
            .map_err(query(STEP))
    }

    /// Every kept disk: (run, attempt) → record.
    pub fn kept_disks(&self) -> StoreResult<BTreeMap<(RunName, u32), KeptDisk>> {
        const STEP: &str = "reading kept disks";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT run, attempt, at, stopped_at, refused FROM attempt_disks")
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, u32>(1)?),
                    KeptDisk {
                        at: r.get(2)?,
                        stopped_at: r.get(3)?,
                        refused: r.get(4)?,
                    },
                ))
            })
            .map_err(query(STEP))?;
        rows.collect::<Result<_, _>>().map_err(query(STEP))
    }
}
