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

use super::view::{ErrorView, Rfc3339, RunView, cost_view, progress_view, scalar};
use super::view::{write_last_error, write_progress};
use super::{ListedRun, RunError};
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

#[cfg(test)]
mod tests_support {
    use super::super::{Fields, ListError, Listing, Store};
    use super::*;
    use std::convert::Infallible;

    /// The JSON objects and table rows of `which`: as the listing rows give them, and as
    /// rendered afresh from the full rows by the code that rendered them before there
    /// were listing rows.
    pub fn both(store: &Store, which: Listing<'_>, now: i64) -> [(Vec<String>, Vec<String>); 2] {
        let errors = store.run_errors().unwrap();
        let mut kept = (Vec::new(), Vec::new());
        store
            .list_runs_json(which, |run| {
                let mut out = Vec::new();
                run.write_into(&mut out, errors.get(run.name), now).unwrap();
                kept.0.push(String::from_utf8(out).unwrap());
                Ok::<_, Infallible>(())
            })
            .unwrap();
        store
            .list_runs(which, Fields::Table, |run| {
                kept.1.push(format!("{run:?}"));
                Ok::<_, Infallible>(())
            })
            .unwrap();
        let mut fresh = (Vec::new(), Vec::new());
        store
            .each_full_row(which, Fields::All, &mut |run| {
                let mut out = Vec::new();
                RunView::listed(&run, errors.get(run.name), now)
                    .write_json_into(&mut out, ITEM_INDENT)
                    .unwrap();
                fresh.0.push(String::from_utf8(out).unwrap());
                Ok::<_, Infallible>(())
            })
            .map_err(|e| match e {
                ListError::Store(e) => panic!("{e}"),
                ListError::Callback(never) => match never {},
            })
            .unwrap();
        store
            .each_full_row(which, Fields::Table, &mut |run| {
                fresh.1.push(format!("{run:?}"));
                Ok::<_, Infallible>(())
            })
            .map_err(|_| ())
            .unwrap();
        [kept, fresh]
    }

    /// The keys of the listing tables are exactly those of the runs: the listings above
    /// came from them, not from the fallback.
    pub fn keys_match(store: &Store) {
        let keys = |sql: &str| -> Vec<(i64, String)> {
            let mut stmt = store.conn.prepare(sql).unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let runs = keys("SELECT seq, name FROM runs ORDER BY seq, name");
        assert_eq!(
            keys("SELECT seq, run FROM run_cells ORDER BY seq, run"),
            runs
        );
        assert_eq!(
            keys("SELECT seq, run FROM run_json ORDER BY seq, run"),
            runs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Listing, RunRecord, Store};
    use super::tests_support::*;
    use super::*;
    use crate::model::Progress;
    use std::collections::BTreeMap;

    /// xorshift64: deterministic, so a failure replays from its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
        fn text(&mut self) -> String {
            const PIECES: [&str; 8] = ["a", "training", " ", "\"q\"", "\\", "\n\t", "ünï", "\u{1}"];
            (0..self.below(5))
                .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
                .collect()
        }
        fn maybe_text(&mut self) -> Option<String> {
            self.chance(70).then(|| self.text())
        }
    }

    const PHASES: [Phase; 9] = Phase::ALL;

    fn random_run(rng: &mut Rng, names: &[String]) -> RunRecord {
        let name = names[rng.below(names.len() as u64) as usize].clone();
        let job = name.split('-').next().unwrap_or("j").to_string();
        let mut run = RunRecord::new_pending(&name, &job, 0, "h", &BTreeMap::new(), "", 0);
        // Mostly 0 (keep the seq it has); sometimes an explicit one, which moves the run
        // in the listing, or ties it with another run.
        run.seq = if rng.chance(70) {
            0
        } else {
            rng.below(8) as i64 + 1
        };
        run.phase = PHASES[rng.below(PHASES.len() as u64) as usize];
        run.reason = rng.text();
        for _ in 0..rng.below(3) {
            run.matrix.insert(rng.text(), rng.text());
        }
        run.attempt = rng.below(4) as u32;
        run.provider = rng.chance(70).then(|| {
            [ProviderKind::Vast, ProviderKind::Lambda, ProviderKind::Fake][rng.below(3) as usize]
        });
        run.instance_id = rng.maybe_text();
        run.host = rng.maybe_text();
        run.gpu = rng.maybe_text();
        run.price_per_hour = rng
            .chance(60)
            .then(|| Usd::from_micros(rng.below(5_000_000) as i64));
        run.cost_usd = Usd::from_micros(rng.below(100_000_000) as i64);
        run.billing_since = rng
            .chance(40)
            .then(|| 1_700_000_000 + rng.below(10_000) as i64);
        run.progress_done = rng.chance(60).then(|| rng.below(1000));
        run.progress_total = rng.chance(60).then(|| rng.below(1000));
        run.exit_code = rng.chance(40).then(|| rng.below(256) as i32 - 128);
        run.repository = rng.maybe_text();
        run.commit = rng
            .chance(70)
            .then(|| format!("{:016x}{}", rng.next(), rng.text()));
        run.commit_message = rng.maybe_text();
        run.author = rng.maybe_text();
        run.dirty = rng.chance(30);
        run.created_at = 1_699_000_000 + rng.below(1_000_000) as i64;
        run.updated_at = run.created_at + 5;
        run.started_at = rng.chance(60).then(|| run.created_at + 10);
        run.finished_at = rng.chance(40).then(|| run.created_at + 99);
        run
    }

    fn check(store: &Store, rng: &mut Rng, names: &[String], context: &str) {
        keys_match(store);
        let now = 1_700_005_000 + rng.below(100_000) as i64;
        let name = &names[rng.below(names.len() as u64) as usize];
        let job = name.split('-').next().unwrap_or("j");
        for which in [Listing::All, Listing::Job(job), Listing::Run(name)] {
            let [kept, fresh] = both(store, which, now);
            assert_eq!(kept.0, fresh.0, "JSON of {which:?} after {context}");
            assert_eq!(kept.1, fresh.1, "table of {which:?} after {context}");
        }
    }

    #[test]
    fn listing_rows_are_what_the_full_rows_render_after_any_writes() {
        for seed in 1..=12u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("state.db")).unwrap();
            let names: Vec<String> = (0..10).map(|i| format!("j{}-{i}", i % 3)).collect();
            for step in 0..60 {
                let context = match rng.below(8) {
                    0 | 1 => {
                        store.put_run(&random_run(&mut rng, &names)).unwrap();
                        "put_run"
                    }
                    2 => {
                        let runs: Vec<RunRecord> = (0..rng.below(4))
                            .map(|_| random_run(&mut rng, &names))
                            .collect();
                        store.put_runs(&runs).unwrap();
                        "put_runs"
                    }
                    3 => {
                        let run = random_run(&mut rng, &names);
                        let diff = rng.maybe_text();
                        store.put_run_with_diff(&run, diff.as_deref()).unwrap();
                        "put_run_with_diff"
                    }
                    4 => {
                        let progress: Vec<(String, Progress)> = (0..rng.below(4))
                            .map(|_| {
                                let name = names[rng.below(names.len() as u64) as usize].clone();
                                let total = rng.chance(50).then(|| rng.below(500));
                                (
                                    name,
                                    Progress {
                                        done: rng.below(500),
                                        total,
                                    },
                                )
                            })
                            .collect();
                        store.put_progress(&progress).unwrap();
                        "put_progress"
                    }
                    5 => {
                        let name = &names[rng.below(names.len() as u64) as usize];
                        store.forget_run(name).unwrap();
                        "forget_run"
                    }
                    6 => {
                        let name = &names[rng.below(names.len() as u64) as usize];
                        let error = crate::store::RunError {
                            step: rng.text(),
                            message: rng.text(),
                            detail: String::new(),
                            at: 1_700_000_000,
                        };
                        store.set_run_error(name, &error).unwrap();
                        "set_run_error"
                    }
                    _ => {
                        let name = &names[rng.below(names.len() as u64) as usize];
                        store.clear_run_error(name).unwrap();
                        "clear_run_error"
                    }
                };
                check(
                    &store,
                    &mut rng,
                    &names,
                    &format!("{context} (seed {seed}, step {step})"),
                );
            }
        }
    }

    #[test]
    fn missing_listing_rows_are_rendered_from_the_full_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        store.seed_runs_for_benchmark(40, 1_700_000_000).unwrap();
        let mut rng = Rng(7);
        let names: Vec<String> = vec!["bench-00002-3".into()];
        let [kept, fresh] = both(&store, Listing::All, 1_700_000_100);
        assert_eq!(kept, fresh);
        // A run written behind the store's back (no listing rows): still listed, as
        // its full row renders.
        store
            .conn
            .execute_batch(
                "DELETE FROM run_json WHERE run = 'bench-00002-3';
                 DELETE FROM run_cells WHERE run = 'bench-00002-3';",
            )
            .unwrap();
        assert!(!store.listing_complete(Listing::All, "run_json").unwrap());
        let [kept_after, fresh_after] = both(&store, Listing::All, 1_700_000_100);
        assert_eq!(kept_after, fresh_after);
        assert_eq!(kept_after, kept);
        for which in [Listing::Job("bench-00002"), Listing::Run("bench-00002-3")] {
            let [kept, fresh] = both(&store, which, 1_700_000_100);
            assert_eq!(kept, fresh, "{which:?}");
            assert!(!kept.0.is_empty());
        }
        // The next write of the run puts its rows back.
        let run = store.run("bench-00002-3").unwrap().unwrap();
        store.put_run(&run).unwrap();
        check(&store, &mut rng, &names, "rewriting the run");
    }
}

#[cfg(test)]
mod migration_tests {
    use super::super::{Listing, Store, migrations};
    use super::tests_support::*;

    #[test]
    fn a_store_from_before_the_listing_rows_lists_the_same_after_migrating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            migrations::migrate_to(&mut conn, &path, 9).unwrap();
            // Rows as schema 9 wrote them: every field set, every optional one empty, a
            // matrix with escapes, a seq out of write order and two runs sharing one.
            conn.execute_batch(
                r#"INSERT INTO runs VALUES ('a-0', 'a', 0, 5, 'Running', 'training', 'h',
                   '{"lr":"3e-4","model":"llama \"7b\"\tü"}', 2, 1, 'lambda', 'i-1', 'gpu3',
                   'H100', 2.49, 12.345678, 1234, 5000, -9, 'git@x:y.git', '0123456789abcdef',
                   'tune, ünï', 'Ada <a@b>', 1, 'diff', 1700000000, 1700000100, 1700000050,
                   NULL, 1700000060);
                 INSERT INTO runs VALUES ('b-0', 'b', 0, 2, 'Pending', '', '', '{}', 0, 0,
                   NULL, NULL, NULL, NULL, NULL, 0.0, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   0, NULL, 1700000001, 1700000001, NULL, NULL, NULL);
                 INSERT INTO runs VALUES ('c-0', 'b', 1, 2, 'Succeeded', 'run command exited 0',
                   'h', '{"seed":"1"}', 1, 0, 'vast', NULL, NULL, 'A100', 1.5, 3.0, 10, 10, 0,
                   NULL, 'abc', NULL, NULL, 0, NULL, 1700000002, 1700000003, 1700000004,
                   1700000005, NULL);
                 INSERT INTO run_errors VALUES ('b-0', 'create', 'no "capacity"', '', 1700000009);"#,
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            migrations::version(&store.conn).unwrap(),
            migrations::SCHEMA_VERSION
        );
        keys_match(&store);
        for which in [Listing::All, Listing::Job("b"), Listing::Run("a-0")] {
            let [kept, fresh] = both(&store, which, 1_700_003_600);
            assert_eq!(kept, fresh, "{which:?}");
        }
        let [kept, _] = both(&store, Listing::All, 1_700_003_600);
        let names: Vec<&str> = kept
            .0
            .iter()
            .map(|j| {
                if j.contains("\"a-0\"") {
                    "a-0"
                } else if j.contains("\"b-0\"") {
                    "b-0"
                } else {
                    "c-0"
                }
            })
            .collect();
        assert_eq!(names, ["b-0", "c-0", "a-0"], "seq order, then name");
        // A read-only reader (what `get runs` opens) reads the same rows.
        drop(store);
        let reader = Store::open_read_only(&path).unwrap();
        assert_eq!(both(&reader, Listing::All, 1_700_003_600)[0], kept);
    }
}
