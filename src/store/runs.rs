//! The `runs` table: one row per run, every `RunRecord` field a column, plus the run's
//! recorded diff, which only `diff`/`put_diff` read and write: it can be large, and
//! listing thousands of runs must not carry it.

use super::{RunRecord, Store, StoreResult, bad_value, json_column, query, to_json};
use crate::model::{Phase, Progress, ProviderKind, RunName, Usd};
use rusqlite::{Row, Transaction, named_params};

/// The columns of `runs`, in the order `from_row` reads them.
const COLUMNS: &str = "name, job, run_index, seq, phase, reason, spec_hash, matrix, attempt, \
     placement_index, provider, instance_id, host, gpu, price_per_hour, cost_usd, \
     progress_done, progress_total, exit_code, repository, commit_id, commit_message, \
     author, dirty, created_at, updated_at, started_at, finished_at, billing_since";

/// Upsert that keeps a run's `seq` when the record carries 0, and gives a new run the next
/// one. An update in place (not REPLACE) so the run's attempts are not cascaded away.
const UPSERT: &str = "INSERT INTO runs (name, job, run_index, seq, phase, reason, spec_hash, \
     matrix, attempt, placement_index, provider, instance_id, host, gpu, price_per_hour, \
     cost_usd, progress_done, progress_total, exit_code, repository, commit_id, \
     commit_message, author, dirty, created_at, updated_at, started_at, finished_at, \
     billing_since) \
     VALUES (:name, :job, :run_index, \
       CASE WHEN :seq <> 0 THEN :seq ELSE coalesce( \
         (SELECT seq FROM runs WHERE name = :name), \
         (SELECT coalesce(max(seq), 0) + 1 FROM runs)) END, \
       :phase, :reason, :spec_hash, :matrix, :attempt, :placement_index, :provider, \
       :instance_id, :host, :gpu, :price_per_hour, :cost_usd, :progress_done, \
       :progress_total, :exit_code, :repository, :commit_id, :commit_message, :author, \
       :dirty, :created_at, :updated_at, :started_at, :finished_at, :billing_since) \
     ON CONFLICT (name) DO UPDATE SET job = excluded.job, run_index = excluded.run_index, \
       seq = excluded.seq, phase = excluded.phase, reason = excluded.reason, \
       spec_hash = excluded.spec_hash, matrix = excluded.matrix, attempt = excluded.attempt, \
       placement_index = excluded.placement_index, provider = excluded.provider, \
       instance_id = excluded.instance_id, host = excluded.host, gpu = excluded.gpu, \
       price_per_hour = excluded.price_per_hour, cost_usd = excluded.cost_usd, \
       progress_done = excluded.progress_done, progress_total = excluded.progress_total, \
       exit_code = excluded.exit_code, repository = excluded.repository, \
       commit_id = excluded.commit_id, commit_message = excluded.commit_message, \
       author = excluded.author, dirty = excluded.dirty, \
       created_at = excluded.created_at, updated_at = excluded.updated_at, \
       started_at = excluded.started_at, finished_at = excluded.finished_at, \
       billing_since = excluded.billing_since";

fn from_row(row: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let phase = row.get_ref(4)?.as_str()?;
    let phase = Phase::parse(phase).ok_or_else(|| bad_value(4, "phase", phase))?;
    let provider = match row.get_ref(10)?.as_str_or_null()? {
        None => None,
        Some(p) => Some(ProviderKind::parse(p).ok_or_else(|| bad_value(10, "provider", p))?),
    };
    Ok(RunRecord {
        name: row.get(0)?,
        job: row.get(1)?,
        index: row.get(2)?,
        seq: row.get(3)?,
        phase,
        reason: row.get(5)?,
        spec_hash: row.get(6)?,
        matrix: json_column(row, 7)?,
        attempt: row.get(8)?,
        placement_index: row.get(9)?,
        provider,
        instance_id: row.get(11)?,
        host: row.get(12)?,
        gpu: row.get(13)?,
        price_per_hour: row.get::<_, Option<f64>>(14)?.map(Usd::from_dollars),
        cost_usd: Usd::from_dollars(row.get(15)?),
        progress_done: unsigned(row, 16)?,
        progress_total: unsigned(row, 17)?,
        exit_code: row.get(18)?,
        repository: row.get(19)?,
        commit: row.get(20)?,
        commit_message: row.get(21)?,
        author: row.get(22)?,
        dirty: row.get(23)?,
        created_at: row.get(24)?,
        updated_at: row.get(25)?,
        started_at: row.get(26)?,
        finished_at: row.get(27)?,
        billing_since: row.get(28)?,
    })
}

/// SQLite integers are signed; progress counters beyond `i64::MAX` are refused rather
/// than wrapped.
fn signed(value: Option<u64>) -> rusqlite::Result<Option<i64>> {
    value
        .map(i64::try_from)
        .transpose()
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn unsigned(row: &Row<'_>, column: usize) -> rusqlite::Result<Option<u64>> {
    row.get::<_, Option<i64>>(column)?
        .map(u64::try_from)
        .transpose()
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(
                column,
                rusqlite::types::Type::Integer,
                Box::new(e),
            )
        })
}

/// Writes one run inside `tx`.
pub(super) fn upsert(tx: &Transaction<'_>, run: &RunRecord) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(UPSERT)?;
    stmt.execute(named_params! {
        ":name": run.name,
        ":job": run.job,
        ":run_index": run.index,
        ":seq": run.seq,
        ":phase": run.phase.as_str(),
        ":reason": run.reason,
        ":spec_hash": run.spec_hash,
        ":matrix": to_json(&run.matrix)?,
        ":attempt": run.attempt,
        ":placement_index": run.placement_index,
        ":provider": run.provider.map(ProviderKind::as_str),
        ":instance_id": run.instance_id,
        ":host": run.host,
        ":gpu": run.gpu,
        ":price_per_hour": run.price_per_hour.map(Usd::dollars),
        ":cost_usd": run.cost_usd.dollars(),
        ":progress_done": signed(run.progress_done)?,
        ":progress_total": signed(run.progress_total)?,
        ":exit_code": run.exit_code,
        ":repository": run.repository,
        ":commit_id": run.commit,
        ":commit_message": run.commit_message,
        ":author": run.author,
        ":dirty": run.dirty,
        ":created_at": run.created_at,
        ":updated_at": run.updated_at,
        ":started_at": run.started_at,
        ":finished_at": run.finished_at,
        ":billing_since": run.billing_since,
    })?;
    Ok(())
}

impl Store {
    /// The uncommitted diff recorded with a run's code, if any.
    pub fn diff(&self, run: &str) -> StoreResult<Option<String>> {
        const STEP: &str = "reading a run's diff";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT diff FROM runs WHERE name = ?1")
            .map_err(query(STEP))?;
        let mut rows = stmt.query([run]).map_err(query(STEP))?;
        match rows.next().map_err(query(STEP))? {
            Some(row) => row.get(0).map_err(query(STEP)),
            None => Ok(None),
        }
    }

    /// Writes a run together with the diff of its code (`None` clears it), in one
    /// transaction: the record of which code a run executes is never half written.
    pub fn put_run_with_diff(&self, run: &RunRecord, diff: Option<&str>) -> StoreResult<()> {
        const STEP: &str = "writing a run and its diff";
        let tx = self.write(STEP)?;
        upsert(&tx, run).map_err(query(STEP))?;
        tx.prepare_cached("UPDATE runs SET diff = ?2 WHERE name = ?1")
            .and_then(|mut stmt| stmt.execute((&run.name, diff)))
            .map_err(query(STEP))?;
        tx.commit().map_err(query(STEP))
    }

    /// All runs, ordered by `seq` (then name, should two runs share a seq).
    pub fn runs(&self) -> StoreResult<Vec<RunRecord>> {
        const STEP: &str = "reading runs";
        // A plain table scan sorted here: walking the (seq, name) index would cost one
        // table lookup per row, several times slower with 10,000 runs.
        let sql = format!("SELECT {COLUMNS} FROM runs");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        let rows = stmt.query_map([], from_row).map_err(query(STEP))?;
        let mut runs: Vec<RunRecord> =
            rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))?;
        runs.sort_unstable_by(|a, b| (a.seq, &a.name).cmp(&(b.seq, &b.name)));
        Ok(runs)
    }

    /// The runs of one job, ordered by `seq`.
    pub fn runs_of_job(&self, job: &str) -> StoreResult<Vec<RunRecord>> {
        const STEP: &str = "reading the runs of a job";
        let sql = format!("SELECT {COLUMNS} FROM runs WHERE job = ?1 ORDER BY seq, name");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        let rows = stmt.query_map([job], from_row).map_err(query(STEP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query(STEP))
    }

    /// One run by name, `None` when the store does not know it.
    pub fn run(&self, name: &str) -> StoreResult<Option<RunRecord>> {
        const STEP: &str = "reading a run";
        let sql = format!("SELECT {COLUMNS} FROM runs WHERE name = ?1");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        let mut rows = stmt.query_map([name], from_row).map_err(query(STEP))?;
        rows.next().transpose().map_err(query(STEP))
    }

    /// Inserts or replaces a run. A new run gets the next `seq` when `seq` is 0; an
    /// existing run written with `seq` 0 keeps the one it has.
    pub fn put_run(&self, run: &RunRecord) -> StoreResult<()> {
        self.put_runs(std::slice::from_ref(run))
    }

    /// `put_run` for many runs, in one transaction: all are written or none.
    pub fn put_runs(&self, runs: &[RunRecord]) -> StoreResult<()> {
        const STEP: &str = "writing runs";
        let tx = self.write(STEP)?;
        for run in runs {
            upsert(&tx, run).map_err(query(STEP))?;
        }
        tx.commit().map_err(query(STEP))
    }

    /// Records the progress agents reported, in one transaction: an observation, not a
    /// decision, so the controller writes it without a planned op. Runs the store does
    /// not know are skipped.
    pub fn put_progress(&self, progress: &[(RunName, Progress)]) -> StoreResult<()> {
        const STEP: &str = "writing progress";
        if progress.is_empty() {
            return Ok(());
        }
        let tx = self.write(STEP)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE runs SET progress_done = ?2, progress_total = ?3 WHERE name = ?1",
                )
                .map_err(query(STEP))?;
            for (run, p) in progress {
                let done = signed(Some(p.done)).map_err(query(STEP))?;
                let total = signed(p.total).map_err(query(STEP))?;
                stmt.execute((run, done, total)).map_err(query(STEP))?;
            }
        }
        tx.commit().map_err(query(STEP))
    }

    /// Removes a run with its attempts, its events (`object_kind` "run") and its cost
    /// entries, in one transaction. Callers do this only once every attempt is released.
    /// Forgetting an unknown run is not an error.
    pub fn forget_run(&self, name: &str) -> StoreResult<()> {
        const STEP: &str = "forgetting a run";
        let tx = self.write(STEP)?;
        for sql in [
            "DELETE FROM attempts WHERE run = ?1",
            "DELETE FROM events WHERE object_kind = 'run' AND object_name = ?1",
            "DELETE FROM cost WHERE run = ?1",
            "DELETE FROM run_errors WHERE run = ?1",
            "DELETE FROM runs WHERE name = ?1",
        ] {
            tx.prepare_cached(sql)
                .and_then(|mut stmt| stmt.execute([name]))
                .map_err(query(STEP))?;
        }
        tx.commit().map_err(query(STEP))
    }
}
