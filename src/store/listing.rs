//! The listing rows: what `get runs` shows of each run, kept beside its `runs` row by the
//! store's writers, in the same transaction as the row, so they are never stale.
//!
//! `runs` rows are some 625 bytes of 29 columns; reading 100,000 of them through
//! SQLite's column API was most of the cost of `get runs`. Each run also has:
//!
//! - a `run_cells` row: one small blob of the columns the table shows (read as a
//!   `ListedRun`), in a table of its own so the table is read without touching the
//!   full rows;
//! - a `run_json` row: the run's `get runs -o json` object already rendered, except
//!   what depends on the time it is read at or on another table: the cost so far, and
//!   the last step error. Progress is kept as numbers beside it and rendered when read.
//!
//! Both are `WITHOUT ROWID` tables keyed by `(seq, run)`: read in key order they are in
//! the listing's order, with no sort and no index. Every write of a run goes through
//! `refresh` (with the row as stored, from the write's own `RETURNING`) and every
//! removal through `remove`; the migration that made them fills them with `rebuild`.
//! A reader that finds the counts of the three tables apart reads the full rows instead
//! (`Store::listing_complete`).

use super::{ListedRun, RunError};
use super::view::{ErrorView, Rfc3339, RunView, cost_view, progress_view, scalar};
use super::view::{write_last_error, write_progress};
use crate::model::{Phase, ProviderKind, Timestamp, Usd};
use rusqlite::Connection;

/// The listing tables (schema step 10).
pub(super) const TABLES: &str = r#"
    CREATE TABLE IF NOT EXISTS run_cells (
        seq INTEGER NOT NULL,
        run TEXT NOT NULL,
        row BLOB NOT NULL,
        PRIMARY KEY (seq, run)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS run_json (
        seq INTEGER NOT NULL,
        run TEXT NOT NULL,
        row BLOB NOT NULL,
        PRIMARY KEY (seq, run)
    ) WITHOUT ROWID;
"#;

/// How deep a run's object sits in `{"items": [...]}`: the JSON kept is rendered there.
pub const ITEM_INDENT: usize = 4;

/// Writes (or rewrites) the listing rows of `run`, stored with `seq`.
pub(super) fn refresh(conn: &Connection, seq: i64, run: &ListedRun<'_>) -> rusqlite::Result<()> {
    let mut cells = Vec::with_capacity(160);
    encode_cells(run, &mut cells);
    let mut json = Vec::with_capacity(1024);
    encode_json(run, &mut json).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
    conn.prepare_cached("INSERT OR REPLACE INTO run_cells (seq, run, row) VALUES (?1, ?2, ?3)")?
        .execute((seq, run.name, &cells))?;
    conn.prepare_cached("INSERT OR REPLACE INTO run_json (seq, run, row) VALUES (?1, ?2, ?3)")?
        .execute((seq, run.name, &json))?;
    Ok(())
}

/// Removes the listing rows of the run `name` stored with `seq`.
pub(super) fn remove(conn: &Connection, seq: i64, name: &str) -> rusqlite::Result<()> {
    for sql in [
        "DELETE FROM run_cells WHERE seq = ?1 AND run = ?2",
        "DELETE FROM run_json WHERE seq = ?1 AND run = ?2",
    ] {
        conn.prepare_cached(sql)?.execute((seq, name))?;
    }
    Ok(())
}

/// Fills the listing rows of every run from scratch (the migration that adds them).
pub(super) fn rebuild(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DELETE FROM run_cells; DELETE FROM run_json;")?;
    let sql = format!("SELECT seq, {} FROM runs", super::runs::LISTED_COLUMNS);
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let run = super::runs::listed_at(row, 1)?;
        refresh(conn, seq, &run)?;
    }
    Ok(())
}

/// What a reader derives its cells from at the time it reads: progress and cost so far.
/// Both rows start with it.
struct Live {
    progress_done: Option<u64>,
    progress_total: Option<u64>,
    cost_usd: Usd,
    price_per_hour: Option<Usd>,
    billing_since: Option<Timestamp>,
}

impl Live {
    fn of(run: &ListedRun<'_>) -> Live {
        Live {
            progress_done: run.progress_done,
            progress_total: run.progress_total,
            cost_usd: run.cost_usd,
            price_per_hour: run.price_per_hour,
            billing_since: run.billing_since,
        }
    }

    fn cost_at(&self, now: Timestamp) -> Usd {
        let live = match (self.price_per_hour, self.billing_since) {
            (Some(price), Some(since)) => price.per_hour_over(now - since),
            _ => Usd::ZERO,
        };
        self.cost_usd + live
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let flags = u8::from(self.progress_done.is_some())
            | u8::from(self.progress_total.is_some()) << 1
            | u8::from(self.price_per_hour.is_some()) << 2
            | u8::from(self.billing_since.is_some()) << 3;
        out.push(flags);
        out.extend_from_slice(&self.progress_done.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.progress_total.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.cost_usd.micros().to_le_bytes());
        let price = self.price_per_hour.map_or(0, Usd::micros);
        out.extend_from_slice(&price.to_le_bytes());
        out.extend_from_slice(&self.billing_since.unwrap_or(0).to_le_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Option<Live> {
        let flags = r.byte()?;
        let done = r.u64()?;
        let total = r.u64()?;
        let cost = r.i64()?;
        let price = r.i64()?;
        let since = r.i64()?;
        let has = |bit: u8| flags & (1 << bit) != 0;
        Some(Live {
            progress_done: has(0).then_some(done),
            progress_total: has(1).then_some(total),
            cost_usd: Usd::from_micros(cost),
            price_per_hour: has(2).then_some(Usd::from_micros(price)),
            billing_since: has(3).then_some(since),
        })
    }
}

/// Appends `s` with its length in front.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    // Rows come from SQLite values, which are far below 4 GiB.
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

/// `put_str`, with `u32::MAX` for none.
fn put_optional_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(out, s.as_bytes()),
        None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
}

/// Reads a listing row back. Every read is bounds-checked: a row that does not decode
/// is reported as corrupt, never trusted.
struct Reader<'r> {
    bytes: &'r [u8],
}

impl<'r> Reader<'r> {
    fn take(&mut self, n: usize) -> Option<&'r [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_le_bytes)
    }

    fn optional_bytes(&mut self) -> Option<Option<&'r [u8]>> {
        let len = u32::from_le_bytes(self.array()?);
        if len == u32::MAX {
            return Some(None);
        }
        self.take(len as usize).map(Some)
    }

    fn bytes(&mut self) -> Option<&'r [u8]> {
        self.optional_bytes()?
    }

    fn str(&mut self) -> Option<&'r str> {
        std::str::from_utf8(self.bytes()?).ok()
    }

    fn optional_str(&mut self) -> Option<Option<&'r str>> {
        match self.optional_bytes()? {
            None => Some(None),
            Some(b) => std::str::from_utf8(b).ok().map(Some),
        }
    }

    fn end(&self) -> Option<()> {
        self.bytes.is_empty().then_some(())
    }
}

/// The `run_cells` row of a run: `Live`, created_at, dirty, then name, phase, reason,
/// provider and commit.
fn encode_cells(run: &ListedRun<'_>, out: &mut Vec<u8>) {
    Live::of(run).encode(out);
    out.extend_from_slice(&run.created_at.to_le_bytes());
    out.push(u8::from(run.dirty));
    put_str(out, run.name.as_bytes());
    put_str(out, run.phase.as_str().as_bytes());
    put_str(out, run.reason.as_bytes());
    put_optional_str(out, run.provider.map(ProviderKind::as_str));
    put_optional_str(out, run.commit);
}

/// A `run_cells` row as the table reads it: the fields it does not show are empty, as
/// `Fields::Table` promises.
pub(super) fn decode_cells(bytes: &[u8]) -> Option<ListedRun<'_>> {
    let mut r = Reader { bytes };
    let live = Live::decode(&mut r)?;
    let created_at = r.i64()?;
    let dirty = r.byte()? != 0;
    let name = r.str()?;
    let phase = Phase::parse(r.str()?)?;
    let reason = r.str()?;
    let provider = match r.optional_str()? {
        None => None,
        Some(p) => Some(ProviderKind::parse(p)?),
    };
    let commit = r.optional_str()?;
    r.end()?;
    Some(ListedRun {
        name,
        job: "",
        phase,
        reason,
        matrix_json: "{}",
        attempt: 0,
        provider,
        instance_id: None,
        host: None,
        gpu: None,
        price_per_hour: live.price_per_hour,
        cost_usd: live.cost_usd,
        billing_since: live.billing_since,
        progress_done: live.progress_done,
        progress_total: live.progress_total,
        exit_code: None,
        repository: None,
        commit,
        commit_message: None,
        author: None,
        dirty,
        created_at,
        started_at: None,
        finished_at: None,
    })
}

/// The `run_json` row of a run: `Live`, the name, then the JSON before the cost value and
/// the JSON after `progress` up to `last_error`, rendered by `RunView` at `ITEM_INDENT`.
pub(super) fn encode_json(run: &ListedRun<'_>, out: &mut Vec<u8>) -> std::io::Result<()> {
    Live::of(run).encode(out);
    put_str(out, run.name.as_bytes());
    // The time only moves the cost, which is not kept.
    let view = RunView::listed(run, None, 0);
    let mut part = Vec::with_capacity(512);
    view.write_head(&mut part, ITEM_INDENT)?;
    put_str(out, &part);
    part.clear();
    view.write_tail(&mut part, ITEM_INDENT)?;
    put_str(out, &part);
    Ok(())
}

/// A run's `get runs -o json` object as its listing row keeps it. Valid only inside the
/// callback of `Store::list_runs_json`.
pub struct RunJson<'r> {
    pub name: &'r str,
    live: Live,
    head: &'r [u8],
    tail: &'r [u8],
}

pub(super) fn decode_json(bytes: &[u8]) -> Option<RunJson<'_>> {
    let mut r = Reader { bytes };
    let live = Live::decode(&mut r)?;
    let name = r.str()?;
    let head = r.bytes()?;
    let tail = r.bytes()?;
    r.end()?;
    Some(RunJson {
        name,
        live,
        head,
        tail,
    })
}

impl RunJson<'_> {
    /// Appends the object, at `ITEM_INDENT`, as `RunView::write_json_into` writes it at
    /// `now` with `error`: the kept parts copied, the rest rendered by the same code.
    pub fn write_into(
        &self,
        out: &mut Vec<u8>,
        error: Option<&RunError>,
        now: Timestamp,
    ) -> std::io::Result<()> {
        out.extend_from_slice(self.head);
        scalar(out, &cost_view(self.live.cost_at(now)))?;
        let progress = progress_view(self.live.progress_done, self.live.progress_total);
        write_progress(out, ITEM_INDENT, progress.as_ref())?;
        out.extend_from_slice(self.tail);
        let error = error.map(|e| ErrorView {
            step: &e.step,
            message: &e.message,
            at: Rfc3339(e.at),
        });
        write_last_error(out, ITEM_INDENT, error.as_ref())
    }
}
