//! The `runs` table: one row per run, every `RunRecord` field a column, plus the run's
//! recorded diff, which only `diff`/`put_diff` read and write: it can be large, and
//! listing thousands of runs must not carry it.

use super::listing::RunJson;
use super::{RunRecord, Store, StoreResult, bad_value, json_column, listing, query, to_json};
use crate::model::{Phase, Progress, ProviderKind, RunName, Timestamp, Usd};
use rusqlite::types::Type;
use rusqlite::{Row, Transaction, named_params};
use std::collections::BTreeMap;

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
       billing_since = excluded.billing_since \
     RETURNING seq, ";

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

/// Writes one run inside `tx`, with its listing rows.
pub(super) fn upsert(tx: &Transaction<'_>, run: &RunRecord) -> rusqlite::Result<()> {
    // A run written with another seq than it has moves in the listing: its rows under
    // the old key go.
    let moved_from = if run.seq != 0 {
        tx.prepare_cached("SELECT seq FROM runs WHERE name = ?1")?
            .query([&run.name])?
            .next()?
            .map(|row| row.get::<_, i64>(0))
            .transpose()?
            .filter(|old| *old != run.seq)
    } else {
        None
    };
    if let Some(old) = moved_from {
        listing::remove(tx, old, &run.name)?;
    }
    let sql = format!("{UPSERT}{LISTED_COLUMNS}");
    let mut stmt = tx.prepare_cached(&sql)?;
    let mut rows = stmt.query(named_params! {
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
    refresh_returned(tx, rows.next()?)
}

/// Refreshes the listing rows of the run a write returned (`RETURNING seq,
/// LISTED_COLUMNS`): they are rendered from the row as stored.
fn refresh_returned(tx: &Transaction<'_>, row: Option<&Row<'_>>) -> rusqlite::Result<()> {
    match row {
        Some(row) => listing::refresh(tx, row.get(0)?, &listed_at(row, 1)?),
        None => Ok(()),
    }
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
            let sql = format!(
                "UPDATE runs SET progress_done = ?2, progress_total = ?3 WHERE name = ?1 \
                 RETURNING seq, {LISTED_COLUMNS}"
            );
            let mut stmt = tx.prepare_cached(&sql).map_err(query(STEP))?;
            for (run, p) in progress {
                let done = signed(Some(p.done)).map_err(query(STEP))?;
                let total = signed(p.total).map_err(query(STEP))?;
                let mut rows = stmt.query((run, done, total)).map_err(query(STEP))?;
                let row = rows.next().map_err(query(STEP))?;
                refresh_returned(&tx, row).map_err(query(STEP))?;
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
        let seq: Option<i64> = tx
            .prepare_cached("SELECT seq FROM runs WHERE name = ?1")
            .and_then(|mut stmt| {
                let mut rows = stmt.query([name])?;
                rows.next()?.map(|row| row.get(0)).transpose()
            })
            .map_err(query(STEP))?;
        if let Some(seq) = seq {
            listing::remove(&tx, seq, name).map_err(query(STEP))?;
        }
        for sql in [
            "DELETE FROM attempts WHERE run = ?1",
            "DELETE FROM events WHERE object_kind = 'run' AND object_name = ?1",
            "DELETE FROM cost WHERE run = ?1",
            "DELETE FROM run_errors WHERE run = ?1",
            "DELETE FROM runs WHERE name = ?1",
            "DELETE FROM stops WHERE run = ?1",
            "DELETE FROM run_pauses WHERE run = ?1",
        ] {
            tx.prepare_cached(sql)
                .and_then(|mut stmt| stmt.execute([name]))
                .map_err(query(STEP))?;
        }
        tx.commit().map_err(query(STEP))
    }

    /// Records that `run` is to stay stopped while its job's spec hash is `spec_hash`
    /// (`asimov destroy`); a later stop of the same run replaces it.
    pub fn put_stop(&self, run: &str, spec_hash: &str, at: Timestamp) -> StoreResult<()> {
        const STEP: &str = "recording a stop";
        self.conn
            .execute(
                "INSERT INTO stops (run, spec_hash, at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (run) DO UPDATE SET spec_hash = excluded.spec_hash, at = excluded.at",
                rusqlite::params![run, spec_hash, at],
            )
            .map(|_| ())
            .map_err(query(STEP))
    }

    /// Every recorded stop: run name → the spec hash it holds for.
    pub fn stops(&self) -> StoreResult<BTreeMap<RunName, String>> {
        const STEP: &str = "reading stops";
        let mut stmt = self
            .conn
            .prepare_cached("SELECT run, spec_hash FROM stops")
            .map_err(query(STEP))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(query(STEP))?;
        rows.collect::<Result<_, _>>().map_err(query(STEP))
    }
}

/// Which columns a listing reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    /// Every field of `ListedRun`.
    All,
    /// Only what the `get runs` table shows (name, phase, reason, provider, cost,
    /// progress, commit, dirty, created): the other fields read as empty (`""`, `{}`, 0,
    /// `None`). Fewer columns decoded and checked per row.
    Table,
}

/// Which runs a listing reads.
#[derive(Debug, Clone, Copy)]
pub enum Listing<'a> {
    All,
    /// The runs of one job.
    Job(&'a str),
    /// One run by name.
    Run(&'a str),
}

/// A run as `get runs` lists it: only the columns a listing shows, borrowed from the
/// SQLite row being read, so listing 100,000 runs allocates nothing per field. Valid
/// only inside the callback of `Store::list_runs`.
#[derive(Debug, Clone, Copy)]
pub struct ListedRun<'r> {
    pub name: &'r str,
    pub job: &'r str,
    pub phase: Phase,
    pub reason: &'r str,
    /// The matrix as the store keeps it: a JSON object of strings, keys sorted.
    pub matrix_json: &'r str,
    pub attempt: u32,
    pub provider: Option<ProviderKind>,
    pub instance_id: Option<&'r str>,
    pub host: Option<&'r str>,
    pub gpu: Option<&'r str>,
    pub price_per_hour: Option<Usd>,
    /// The ledger's cost; `cost_at` adds what the held instance has accrued.
    pub cost_usd: Usd,
    pub billing_since: Option<Timestamp>,
    pub progress_done: Option<u64>,
    pub progress_total: Option<u64>,
    pub exit_code: Option<i32>,
    pub repository: Option<&'r str>,
    pub commit: Option<&'r str>,
    pub commit_message: Option<&'r str>,
    pub author: Option<&'r str>,
    pub dirty: bool,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

impl ListedRun<'_> {
    /// Cost so far at `now`, as `RunRecord::cost_at` derives it.
    pub fn cost_at(&self, now: Timestamp) -> Usd {
        let live = match (self.price_per_hour, self.billing_since) {
            (Some(price), Some(since)) => price.per_hour_over(now - since),
            _ => Usd::ZERO,
        };
        self.cost_usd + live
    }
}

/// The columns a listing reads, in the order `listed_from_row` reads them: not the
/// seq, spec hash, placement index or update time, which no listing shows.
pub(super) const LISTED_COLUMNS: &str = "name, job, phase, reason, matrix, attempt, provider, \
     instance_id, host, gpu, price_per_hour, cost_usd, progress_done, progress_total, \
     exit_code, repository, commit_id, commit_message, author, dirty, created_at, \
     started_at, finished_at, billing_since";

/// Only the columns the `get runs` table shows, in the order `table_from_row` reads
/// them: each column read costs a trip through SQLite's VM and rusqlite's checks, even
/// for a constant, so the table's rows carry nothing else.
const TABLE_COLUMNS: &str = "name, phase, reason, provider, price_per_hour, cost_usd, \
     progress_done, progress_total, commit_id, dirty, created_at, billing_since";

fn text<'r>(row: &'r Row<'_>, column: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(column)?
        .as_str()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, Box::new(e)))
}

fn optional_text<'r>(row: &'r Row<'_>, column: usize) -> rusqlite::Result<Option<&'r str>> {
    row.get_ref(column)?
        .as_str_or_null()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(column, Type::Text, Box::new(e)))
}

fn listed_from_row<'r>(row: &'r Row<'_>) -> rusqlite::Result<ListedRun<'r>> {
    listed_at(row, 0)
}

/// A row of `LISTED_COLUMNS` starting at column `at`.
pub(super) fn listed_at<'r>(row: &'r Row<'_>, at: usize) -> rusqlite::Result<ListedRun<'r>> {
    let phase = text(row, at + 2)?;
    let phase = Phase::parse(phase).ok_or_else(|| bad_value(at + 2, "phase", phase))?;
    let provider = match optional_text(row, at + 6)? {
        None => None,
        Some(p) => Some(ProviderKind::parse(p).ok_or_else(|| bad_value(at + 6, "provider", p))?),
    };
    Ok(ListedRun {
        name: text(row, at)?,
        job: text(row, at + 1)?,
        phase,
        reason: text(row, at + 3)?,
        matrix_json: text(row, at + 4)?,
        attempt: row.get(at + 5)?,
        provider,
        instance_id: optional_text(row, at + 7)?,
        host: optional_text(row, at + 8)?,
        gpu: optional_text(row, at + 9)?,
        price_per_hour: row.get::<_, Option<f64>>(at + 10)?.map(Usd::from_dollars),
        cost_usd: Usd::from_dollars(row.get(at + 11)?),
        progress_done: unsigned(row, at + 12)?,
        progress_total: unsigned(row, at + 13)?,
        exit_code: row.get(at + 14)?,
        repository: optional_text(row, at + 15)?,
        commit: optional_text(row, at + 16)?,
        commit_message: optional_text(row, at + 17)?,
        author: optional_text(row, at + 18)?,
        dirty: row.get(at + 19)?,
        created_at: row.get(at + 20)?,
        started_at: row.get(at + 21)?,
        finished_at: row.get(at + 22)?,
        billing_since: row.get(at + 23)?,
    })
}

/// A row of `TABLE_COLUMNS`; the fields the table does not show read as empty.
fn table_from_row<'r>(row: &'r Row<'_>) -> rusqlite::Result<ListedRun<'r>> {
    let phase = text(row, 1)?;
    let phase = Phase::parse(phase).ok_or_else(|| bad_value(1, "phase", phase))?;
    let provider = match optional_text(row, 3)? {
        None => None,
        Some(p) => Some(ProviderKind::parse(p).ok_or_else(|| bad_value(3, "provider", p))?),
    };
    Ok(ListedRun {
        name: text(row, 0)?,
        job: "",
        phase,
        reason: text(row, 2)?,
        matrix_json: "{}",
        attempt: 0,
        provider,
        instance_id: None,
        host: None,
        gpu: None,
        price_per_hour: row.get::<_, Option<f64>>(4)?.map(Usd::from_dollars),
        cost_usd: Usd::from_dollars(row.get(5)?),
        progress_done: unsigned(row, 6)?,
        progress_total: unsigned(row, 7)?,
        exit_code: None,
        repository: None,
        commit: optional_text(row, 8)?,
        commit_message: None,
        author: None,
        dirty: row.get(9)?,
        created_at: row.get(10)?,
        started_at: None,
        finished_at: None,
        billing_since: row.get(11)?,
    })
}

const LISTING: &str = "listing runs";

/// A listing row that does not decode.
fn corrupt_listing<E>() -> ListError<E> {
    ListError::Store(super::StoreError::Corrupt(format!(
        "{LISTING}: a listing row does not decode"
    )))
}

/// Why a listing stopped: the store, or the callback that was handed each run.
#[derive(Debug)]
pub enum ListError<E> {
    Store(super::StoreError),
    Callback(E),
}

impl Store {
    /// Hands each run of `which` to `each`, in `seq` order (then name), as the rows are
    /// read: nothing is collected, so a caller can write each run out at once.
    ///
    /// `Fields::Table` reads the narrow `run_cells` rows (`listing.rs`). `Fields::All`
    /// reads the full rows, in the table's own (rowid) order when that is already the
    /// seq order, which it is unless a run was written with an explicit seq out of
    /// order; a walk of the (seq, name) index, with one table lookup per row, costs
    /// about twice as much. A scan of that index alone (it holds the rowid) tells which
    /// case it is.
    pub fn list_runs<E>(
        &self,
        which: Listing<'_>,
        fields: Fields,
        mut each: impl FnMut(ListedRun<'_>) -> Result<(), E>,
    ) -> Result<(), ListError<E>> {
        let store = |e| ListError::Store(query(LISTING)(e));
        // One read snapshot for the checks and the rows, whatever a controller writes
        // meanwhile.
        let snapshot = self.conn.unchecked_transaction().map_err(store)?;
        if fields == Fields::Table && self.listing_complete(which, "run_cells").map_err(store)? {
            self.each_listing_row(which, "run_cells", |bytes| {
                let run = listing::decode_cells(bytes).ok_or_else(corrupt_listing)?;
                each(run).map_err(ListError::Callback)
            })?;
        } else {
            self.each_full_row(which, fields, &mut each)?;
        }
        // Nothing was written: ending the snapshot only releases it.
        snapshot.rollback().map_err(store)
    }

    /// Hands each run of `which` to `each` as its `get runs -o json` object, in the
    /// order of `list_runs`. The objects come from the `run_json` rows, rendered when
    /// the run was written; should those be incomplete, they are rendered from the full
    /// rows here, by the same code.
    pub fn list_runs_json<E>(
        &self,
        which: Listing<'_>,
        mut each: impl FnMut(RunJson<'_>) -> Result<(), E>,
    ) -> Result<(), ListError<E>> {
        let store = |e| ListError::Store(query(LISTING)(e));
        let snapshot = self.conn.unchecked_transaction().map_err(store)?;
        if self.listing_complete(which, "run_json").map_err(store)? {
            self.each_listing_row(which, "run_json", |bytes| {
                let run = listing::decode_json(bytes).ok_or_else(corrupt_listing)?;
                each(run).map_err(ListError::Callback)
            })?;
        } else {
            let mut scratch = Vec::with_capacity(1024);
            self.each_full_row(which, Fields::All, &mut |run| {
                scratch.clear();
                listing::encode_json(&run, &mut scratch).map_err(|e| {
                    ListError::Store(super::StoreError::Corrupt(format!("{LISTING}: {e}")))
                })?;
                let run = listing::decode_json(&scratch).ok_or_else(corrupt_listing)?;
                each(run).map_err(ListError::Callback)
            })
            .map_err(|e| match e {
                ListError::Store(e) => ListError::Store(e),
                ListError::Callback(e) => e,
            })?;
        }
        snapshot.rollback().map_err(store)
    }

    /// True when every run of `which` has its row in the listing table `table` (one of
    /// `run_cells`, `run_json`), as the writers keep it; should it not, a listing reads
    /// the full rows rather than leave a run out. Counts, not a join: for all runs,
    /// two index counts (about a millisecond at 100,000 runs).
    pub(super) fn listing_complete(
        &self,
        which: Listing<'_>,
        table: &str,
    ) -> rusqlite::Result<bool> {
        let sql = match which {
            Listing::All => {
                format!("SELECT (SELECT count(*) FROM runs) = (SELECT count(*) FROM {table})")
            }
            Listing::Job(_) => format!(
                "SELECT count(*) = count(l.run) FROM runs r LEFT JOIN {table} l \
                 ON l.seq = r.seq AND l.run = r.name WHERE r.job = ?1"
            ),
            Listing::Run(_) => format!(
                "SELECT count(*) = count(l.run) FROM runs r LEFT JOIN {table} l \
                 ON l.seq = r.seq AND l.run = r.name WHERE r.name = ?1"
            ),
        };
        let mut stmt = self.conn.prepare_cached(&sql)?;
        match which {
            Listing::All => stmt.query_row([], |r| r.get(0)),
            Listing::Job(key) | Listing::Run(key) => stmt.query_row([key], |r| r.get(0)),
        }
    }

    /// Hands the blob of each listing row of `which` in `table` to `each`, in listing
    /// order: the table's key order for all runs.
    fn each_listing_row<E>(
        &self,
        which: Listing<'_>,
        table: &str,
        mut each: impl FnMut(&[u8]) -> Result<(), ListError<E>>,
    ) -> Result<(), ListError<E>> {
        let store = |e| ListError::Store(query(LISTING)(e));
        let sql = match which {
            Listing::All => format!("SELECT row FROM {table} ORDER BY seq, run"),
            Listing::Job(_) => format!(
                "SELECT l.row FROM runs r JOIN {table} l ON l.seq = r.seq AND l.run = r.name \
                 WHERE r.job = ?1 ORDER BY r.seq, r.name"
            ),
            Listing::Run(_) => format!(
                "SELECT l.row FROM runs r JOIN {table} l ON l.seq = r.seq AND l.run = r.name \
                 WHERE r.name = ?1"
            ),
        };
        let mut stmt = self.conn.prepare_cached(&sql).map_err(store)?;
        let mut rows = match which {
            Listing::All => stmt.query([]),
            Listing::Job(key) | Listing::Run(key) => stmt.query([key]),
        }
        .map_err(store)?;
        while let Some(row) = rows.next().map_err(store)? {
            let bytes = row
                .get_ref(0)
                .and_then(|v| v.as_blob().map_err(rusqlite::Error::from))
                .map_err(store)?;
            each(bytes)?;
        }
        Ok(())
    }

    /// `list_runs` from the full `runs` rows.
    pub(super) fn each_full_row<E>(
        &self,
        which: Listing<'_>,
        fields: Fields,
        each: &mut impl FnMut(ListedRun<'_>) -> Result<(), E>,
    ) -> Result<(), ListError<E>> {
        let store = |e| ListError::Store(query(LISTING)(e));
        let columns = match fields {
            Fields::All => LISTED_COLUMNS,
            Fields::Table => TABLE_COLUMNS,
        };
        let sql = match which {
            Listing::All if self.rowids_in_seq_order().map_err(store)? => {
                format!("SELECT {columns} FROM runs ORDER BY rowid")
            }
            Listing::All => format!("SELECT {columns} FROM runs ORDER BY seq, name"),
            Listing::Job(_) => {
                format!("SELECT {columns} FROM runs WHERE job = ?1 ORDER BY seq, name")
            }
            Listing::Run(_) => format!("SELECT {columns} FROM runs WHERE name = ?1"),
        };
        let mut stmt = self.conn.prepare_cached(&sql).map_err(store)?;
        let mut rows = match which {
            Listing::All => stmt.query([]),
            Listing::Job(key) | Listing::Run(key) => stmt.query([key]),
        }
        .map_err(store)?;
        let from_row = match fields {
            Fields::All => listed_from_row,
            Fields::Table => table_from_row,
        };
        while let Some(row) = rows.next().map_err(store)? {
            let run = from_row(row).map_err(store)?;
            each(run).map_err(ListError::Callback)?;
        }
        Ok(())
    }

    /// True when reading the table in rowid order gives the runs in (seq, name) order.
    fn rowids_in_seq_order(&self) -> rusqlite::Result<bool> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT rowid FROM runs INDEXED BY runs_seq ORDER BY seq, name")?;
        let mut rows = stmt.query([])?;
        let mut last = i64::MIN;
        while let Some(row) = rows.next()? {
            let rowid: i64 = row.get(0)?;
            if rowid <= last {
                return Ok(false);
            }
            last = rowid;
        }
        Ok(true)
    }

    /// How many runs `which` names (0 or 1 for one run).
    pub fn count_runs(&self, which: Listing<'_>) -> StoreResult<u64> {
        const STEP: &str = "counting runs";
        let (sql, key) = match which {
            Listing::All => ("SELECT count(*) FROM runs", None),
            Listing::Job(job) => ("SELECT count(*) FROM runs WHERE job = ?1", Some(job)),
            Listing::Run(name) => ("SELECT count(*) FROM runs WHERE name = ?1", Some(name)),
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(query(STEP))?;
        let count: i64 = match key {
            None => stmt.query_row([], |r| r.get(0)),
            Some(key) => stmt.query_row([key], |r| r.get(0)),
        }
        .map_err(query(STEP))?;
        Ok(count.max(0) as u64)
    }

    /// True when some run of `which` is not in a terminal phase (a controller still has
    /// work to do for it).
    pub fn any_unfinished_run(&self, which: Listing<'_>) -> StoreResult<bool> {
        const STEP: &str = "looking for unfinished runs";
        // The phases `Phase::is_terminal` names, asked of it rather than repeated here.
        let list = Phase::ALL
            .iter()
            .filter(|p| p.is_terminal())
            .map(|p| format!("'{}'", p.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let filter = match which {
            Listing::All => "",
            Listing::Job(_) => "AND job = ?1",
            Listing::Run(_) => "AND name = ?1",
        };
        let sql =
            format!("SELECT EXISTS (SELECT 1 FROM runs WHERE phase NOT IN ({list}) {filter})");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(query(STEP))?;
        match which {
            Listing::All => stmt.query_row([], |r| r.get(0)),
            Listing::Job(key) | Listing::Run(key) => stmt.query_row([key], |r| r.get(0)),
        }
        .map_err(query(STEP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn names(store: &Store, fields: Fields) -> Vec<(String, String)> {
        let mut out = Vec::new();
        store
            .list_runs(Listing::All, fields, |r| {
                out.push((r.name.to_string(), r.phase.as_str().to_string()));
                Ok::<_, std::convert::Infallible>(())
            })
            .unwrap();
        out
    }

    fn expected(store: &Store) -> Vec<(String, String)> {
        store
            .runs()
            .unwrap()
            .into_iter()
            .map(|r| (r.name, r.phase.as_str().to_string()))
            .collect()
    }

    #[test]
    fn listing_follows_seq_whether_or_not_the_table_is_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        for name in ["c-0", "b-0", "a-0", "d-0"] {
            let run = RunRecord::new_pending(name, "j", 0, "", &BTreeMap::new(), "", 1);
            store.put_run(&run).unwrap();
        }
        // Written in seq order: the table's own order is used.
        assert!(store.rowids_in_seq_order().unwrap());
        assert_eq!(names(&store, Fields::All), expected(&store));
        assert_eq!(names(&store, Fields::Table), expected(&store));

        // An explicit seq out of write order: the index order is used.
        let mut moved = store.run("c-0").unwrap().unwrap();
        moved.seq = 99;
        store.put_run(&moved).unwrap();
        assert!(!store.rowids_in_seq_order().unwrap());
        let listed = names(&store, Fields::All);
        assert_eq!(listed, expected(&store));
        assert_eq!(listed.last().map(|(n, _)| n.as_str()), Some("c-0"));
        assert_eq!(names(&store, Fields::Table), listed);

        assert_eq!(store.count_runs(Listing::All).unwrap(), 4);
        assert_eq!(store.count_runs(Listing::Job("j")).unwrap(), 4);
        assert_eq!(store.count_runs(Listing::Run("a-0")).unwrap(), 1);
        assert_eq!(store.count_runs(Listing::Run("zz")).unwrap(), 0);
        assert!(store.any_unfinished_run(Listing::All).unwrap());
        let mut done = store.run("a-0").unwrap().unwrap();
        done.phase = Phase::Succeeded;
        store.put_run(&done).unwrap();
        assert!(!store.any_unfinished_run(Listing::Run("a-0")).unwrap());
        assert!(store.any_unfinished_run(Listing::Job("j")).unwrap());
        // A run ended by `asimov destroy` is finished too (it was missed once).
        done.phase = Phase::Stopped;
        store.put_run(&done).unwrap();
        assert!(!store.any_unfinished_run(Listing::Run("a-0")).unwrap());
        // A paused run is not: it resumes.
        done.phase = Phase::Paused;
        store.put_run(&done).unwrap();
        assert!(store.any_unfinished_run(Listing::Run("a-0")).unwrap());
    }
}
