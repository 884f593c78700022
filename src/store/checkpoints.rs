//! Checkpoints in the store: every complete sync of a run's checkpoint folder (its
//! sequence number, the attempt it came from, when) and the checkpoint each attempt
//! resumed from. The folders themselves live under `$ASIMOV_HOME/checkpoints/`.

use super::{Store, StoreResult, query};
use crate::model::Timestamp;
use rusqlite::named_params;

/// One complete sync of a run's checkpoint folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSync {
    pub run: String,
    pub attempt: u32,
    /// The checkpoint's number, increasing over the run's life.
    pub seq: u64,
    pub at: Timestamp,
    /// The sync made when the attempt ended (rather than a periodic one).
    pub last: bool,
}

impl Store {
    /// Records a complete sync (idempotent for the same `(run, seq)`).
    pub fn add_checkpoint_sync(&self, sync: &CheckpointSync) -> StoreResult<()> {
        const STEP: &str = "recording a checkpoint";
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO checkpoint_syncs (run, attempt, seq, at, final) \
                 VALUES (:run, :attempt, :seq, :at, :final)",
            )
            .and_then(|mut stmt| {
                stmt.execute(named_params! {
                    ":run": sync.run,
                    ":attempt": sync.attempt,
                    ":seq": sync.seq as i64,
                    ":at": sync.at,
                    ":final": sync.last,
                })
            })
            .map_err(query(STEP))?;
        Ok(())
    }

    /// The run's complete syncs, oldest first.
    pub fn checkpoint_syncs(&self, run: &str) -> StoreResult<Vec<CheckpointSync>> {
        const STEP: &str = "reading checkpoints";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT run, attempt, seq, at, final FROM checkpoint_syncs \
                 WHERE run = ?1 ORDER BY seq",
            )
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([run], |row| {
                Ok(CheckpointSync {
                    run: row.get(0)?,
                    attempt: row.get(1)?,
                    seq: row.get::<_, i64>(2)?.max(0) as u64,
                    at: row.get(3)?,
                    last: row.get(4)?,
                })
            })
            .map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }

    /// When each run's current attempt last synced its checkpoint: run → (attempt, at).
    pub fn last_checkpoint_syncs(
        &self,
    ) -> StoreResult<std::collections::BTreeMap<String, (u32, Timestamp)>> {
        const STEP: &str = "reading checkpoints";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT run, attempt, MAX(at) FROM checkpoint_syncs GROUP BY run, attempt",
            )
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, u32>(1)?,
                    row.get::<_, Timestamp>(2)?,
                ))
            })
            .map_err(query(STEP))?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (run, attempt, at) = row.map_err(query(STEP))?;
            let slot = out.entry(run).or_insert((attempt, at));
            if attempt > slot.0 {
                *slot = (attempt, at);
            }
        }
        Ok(out)
    }

    /// Records that `attempt` of `run` started from checkpoint `seq`, unless a start of
    /// that attempt was recorded before (a repeated start changes nothing on the
    /// machine); true when this call recorded it.
    pub fn set_resumed_from(
        &self,
        run: &str,
        attempt: u32,
        seq: u64,
        at: Timestamp,
    ) -> StoreResult<bool> {
        const STEP: &str = "recording a resume";
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO attempt_resumes (run, attempt, checkpoint, at) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut stmt| stmt.execute(rusqlite::params![run, attempt, seq as i64, at]))
            .map_err(query(STEP))?;
        Ok(inserted > 0)
    }

    /// Which checkpoint each attempt of `run` resumed from: attempt → seq.
    pub fn resumed_from(&self, run: &str) -> StoreResult<std::collections::BTreeMap<u32, u64>> {
        const STEP: &str = "reading resumes";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT attempt, checkpoint FROM attempt_resumes WHERE run = ?1")
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([run], |row| {
                Ok((row.get::<_, u32>(0)?, row.get::<_, i64>(1)?.max(0) as u64))
            })
            .map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }
}
