//! Attempts (instance lifetimes of a run), events and the cost ledger.

use super::{
    AttemptRecord, CostEntry, Event, RunRecord, Store, StoreResult, bad_value, query, to_json,
};
use crate::model::{JobName, Outcome, ProviderKind, Timestamp, Usd};
use rusqlite::{Row, named_params};

const ATTEMPT_COLUMNS: &str = "run, attempt, tag, provider, placement_index, instance_id, host, \
     intent_at, released_at, outcome";

fn attempt_from_row(row: &Row<'_>) -> rusqlite::Result<AttemptRecord> {
    let provider = row.get_ref(3)?.as_str()?;
    let provider =
        ProviderKind::parse(provider).ok_or_else(|| bad_value(3, "provider", provider))?;
    Ok(AttemptRecord {
        run: row.get(0)?,
        attempt: row.get(1)?,
        tag: row.get(2)?,
        provider,
        placement_index: row.get(4)?,
        instance_id: row.get(5)?,
        host: row.get(6)?,
        intent_at: row.get(7)?,
        released_at: row.get(8)?,
        outcome: match row.get_ref(9)?.as_str_or_null()? {
            None => None,
            Some(o) => Some(Outcome::parse(o).ok_or_else(|| bad_value(9, "outcome", o))?),
        },
    })
}

impl Store {
    /// The attempts of one run, by attempt number.
    pub fn attempts(&self, run: &str) -> StoreResult<Vec<AttemptRecord>> {
        const STEP: &str = "reading attempts";
        let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE run = ?1 ORDER BY attempt");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        let rows = stmt
            .query_map([run], attempt_from_row)
            .map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }

    /// Every attempt of every run, by run and then attempt number: one query where
    /// `attempts` per run would be one per run (10,000 a reconcile pass at 10,000 jobs).
    pub fn all_attempts(
        &self,
    ) -> StoreResult<std::collections::BTreeMap<String, Vec<AttemptRecord>>> {
        const STEP: &str = "reading all attempts";
        // A table scan, sorted here: walking the primary key's index costs a table
        // lookup per row.
        let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM attempts");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        let rows = stmt.query_map([], attempt_from_row).map_err(query(STEP))?;
        let mut out: std::collections::BTreeMap<String, Vec<AttemptRecord>> =
            std::collections::BTreeMap::new();
        for row in rows {
            let attempt = row.map_err(query(STEP))?;
            match out.get_mut(&attempt.run) {
                Some(list) => list.push(attempt),
                None => {
                    out.insert(attempt.run.clone(), vec![attempt]);
                }
            }
        }
        for list in out.values_mut() {
            list.sort_unstable_by_key(|a| a.attempt);
        }
        Ok(out)
    }

    /// Every attempt not yet released, across all runs: what may still exist somewhere.
    /// Ordered by run, then attempt.
    pub fn unreleased_attempts(&self) -> StoreResult<Vec<AttemptRecord>> {
        const STEP: &str = "reading unreleased attempts";
        let sql = format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE released_at IS NULL ORDER BY run, attempt"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        let rows = stmt.query_map([], attempt_from_row).map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }

    /// Records how attempts' jobs ended, as their agents reported it: `(run, attempt,
    /// outcome)`. The first record of an attempt stays.
    pub fn put_attempt_ends(
        &self,
        ends: &[(String, u32, Outcome)],
        now: Timestamp,
    ) -> StoreResult<()> {
        const STEP: &str = "recording how jobs ended";
        if ends.is_empty() {
            return Ok(());
        }
        let tx = self.write(STEP)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO attempt_ends (run, attempt, outcome, seen_at) \
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(query(STEP))?;
            for (run, attempt, outcome) in ends {
                stmt.execute((run, attempt, outcome.as_text(), now))
                    .map_err(query(STEP))?;
            }
        }
        tx.commit().map_err(query(STEP))
    }

    /// How each attempt's job ended as its agent reported it: (run, attempt) → outcome.
    pub fn attempt_ends(&self) -> StoreResult<std::collections::BTreeMap<(String, u32), Outcome>> {
        const STEP: &str = "reading how jobs ended";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT run, attempt, outcome FROM attempt_ends")
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, u32>(1)?,
                    row.get::<_, String>(2)?,
                ))
            })
            .map_err(query(STEP))?;
        let mut out = std::collections::BTreeMap::new();
        for row in rows {
            let (run, attempt, text) = row.map_err(query(STEP))?;
            // A form this build does not know is no record at all.
            if let Some(outcome) = Outcome::parse(&text) {
                out.insert((run, attempt), outcome);
            }
        }
        Ok(out)
    }

    /// Inserts or replaces the attempt `(run, attempt)`. Fails (`Query`) when the store
    /// has no run of that name: an attempt always belongs to a stored run.
    pub fn put_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()> {
        const STEP: &str = "writing an attempt";
        let tx = self.write(STEP)?;
        upsert_attempt(&tx, attempt).map_err(query(STEP))?;
        tx.commit().map_err(query(STEP))
    }

    /// Records the intent to create: the attempt and the run row that points at it, in
    /// one transaction, so a crash never leaves one without the other.
    pub fn put_intent(&self, attempt: &AttemptRecord, run: &RunRecord) -> StoreResult<()> {
        const STEP: &str = "recording an intent";
        let tx = self.write(STEP)?;
        super::runs::upsert(&tx, run).map_err(query(STEP))?;
        upsert_attempt(&tx, attempt).map_err(query(STEP))?;
        tx.commit().map_err(query(STEP))
    }

    /// Appends an event.
    pub fn add_event(&self, event: &Event) -> StoreResult<()> {
        const STEP: &str = "writing an event";
        // A single INSERT is its own transaction; no explicit one needed.
        self.conn
            .prepare_cached(
                "INSERT INTO events (at, object_kind, object_name, reason, message) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut stmt| {
                stmt.execute((
                    event.at,
                    &event.object_kind,
                    &event.object_name,
                    &event.reason,
                    &event.message,
                ))
            })
            .map_err(query(STEP))?;
        Ok(())
    }

    /// Events of one object, oldest first (by time, then by order of writing).
    pub fn events(&self, object_kind: &str, object_name: &str) -> StoreResult<Vec<Event>> {
        const STEP: &str = "reading events";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT at, object_kind, object_name, reason, message FROM events \
                 WHERE object_kind = ?1 AND object_name = ?2 ORDER BY at, id",
            )
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([object_kind, object_name], |row| {
                Ok(Event {
                    at: row.get(0)?,
                    object_kind: row.get(1)?,
                    object_name: row.get(2)?,
                    reason: row.get(3)?,
                    message: row.get(4)?,
                })
            })
            .map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }

    /// Appends a slice of spending to the ledger.
    pub fn add_cost(&self, entry: &CostEntry) -> StoreResult<()> {
        const STEP: &str = "writing a cost entry";
        self.conn
            .prepare_cached(
                "INSERT INTO cost (run, job, attempt, from_at, to_at, usd) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut stmt| {
                stmt.execute((
                    &entry.run,
                    &entry.job,
                    entry.attempt,
                    entry.from,
                    entry.to,
                    entry.usd.dollars(),
                ))
            })
            .map_err(query(STEP))?;
        Ok(())
    }

    /// The cost entries of one run, oldest first.
    pub fn costs(&self, run: &str) -> StoreResult<Vec<CostEntry>> {
        const STEP: &str = "reading cost entries";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT run, job, attempt, from_at, to_at, usd FROM cost WHERE run = ?1 \
                 ORDER BY from_at, id",
            )
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([run], |row| {
                Ok(CostEntry {
                    run: row.get(0)?,
                    job: row.get(1)?,
                    attempt: row.get(2)?,
                    from: row.get(3)?,
                    to: row.get(4)?,
                    usd: Usd::from_dollars(row.get(5)?),
                })
            })
            .map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }

    /// Money spent by the given jobs: the sum of their cost entries that end after
    /// `since` (all time when `None`). An entry straddling `since` counts whole.
    pub fn spent(&self, jobs: &[JobName], since: Option<Timestamp>) -> StoreResult<Usd> {
        const STEP: &str = "summing spending";
        if jobs.is_empty() {
            return Ok(Usd::ZERO);
        }
        // The job list travels as one JSON array so the statement text, and so its cache
        // entry, does not depend on how many jobs there are.
        let jobs = to_json(&jobs).map_err(query(STEP))?;
        self.conn
            .prepare_cached(
                // Summed as whole micro-dollars: exact, whatever the number of entries.
                "SELECT coalesce(sum(CAST(round(usd * 1000000.0) AS INTEGER)), 0) FROM cost \
                 WHERE job IN (SELECT value FROM json_each(?1)) \
                 AND (?2 IS NULL OR to_at > ?2)",
            )
            .and_then(|mut stmt| stmt.query_row((jobs, since), |row| row.get(0)))
            .map(Usd::from_micros)
            .map_err(query(STEP))
    }
}

/// Inserts or replaces the attempt `(run, attempt)` inside `tx`.
fn upsert_attempt(tx: &rusqlite::Transaction<'_>, attempt: &AttemptRecord) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO attempts (run, attempt, tag, provider, placement_index, instance_id, \
     host, intent_at, released_at, outcome) \
     VALUES (:run, :attempt, :tag, :provider, :placement_index, :instance_id, :host, \
     :intent_at, :released_at, :outcome) \
     ON CONFLICT (run, attempt) DO UPDATE SET tag = excluded.tag, \
     provider = excluded.provider, placement_index = excluded.placement_index, \
     instance_id = excluded.instance_id, host = excluded.host, \
     intent_at = excluded.intent_at, released_at = excluded.released_at, \
     outcome = excluded.outcome",
    )
    .and_then(|mut stmt| {
        stmt.execute(named_params! {
            ":run": attempt.run,
            ":attempt": attempt.attempt,
            ":tag": attempt.tag,
            ":provider": attempt.provider.as_str(),
            ":placement_index": attempt.placement_index,
            ":instance_id": attempt.instance_id,
            ":host": attempt.host,
            ":intent_at": attempt.intent_at,
            ":released_at": attempt.released_at,
            ":outcome": attempt.outcome.as_ref().map(Outcome::as_text),
        })
    })
    .map(|_| ())
}
