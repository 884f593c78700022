//! Rendering of store records for people (tables) and scripts (JSON, YAML). The JSON
//! shape of a run is a documented contract (README "Output for scripts"): fields are
//! only ever added, never renamed or removed.

use crate::model::Timestamp;
use crate::store::view::listed;
pub use crate::store::view::{ErrorView, MatrixView, ProgressView, Rfc3339, RunView, rfc3339, usd};
use crate::store::{ListedRun, RunError, RunRecord};
use comfy_table::{Table, presets};
use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;

/// The reason of a run as a table shows it: with the last error of its steps, if any.
pub fn reason_cell(run: &RunRecord, error: Option<&RunError>) -> String {
    ReasonCell(&listed(run), error).to_string()
}

struct ReasonCell<'a>(&'a ListedRun<'a>, Option<&'a RunError>);

impl fmt::Display for ReasonCell<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ReasonCell(run, error) = self;
        match error {
            // "failed with exit code 3" says less than the step that failed.
            Some(e) if e.step == "setup" && run.phase.is_terminal() => f.write_str(&e.message),
            Some(e) if !run.reason.contains(&e.message) => {
                write!(f, "{}; last error ({}): {}", run.reason, e.step, e.message)
            }
            _ => f.write_str(run.reason),
        }
    }
}

/// "3m", "2h5m", "4d1h": how long ago or how long, for tables.
pub fn age(seconds: i64) -> String {
    Age(seconds).to_string()
}

struct Age(i64);

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.max(0);
        match s {
            0..60 => write!(f, "{s}s"),
            60..3600 => write!(f, "{}m", s / 60),
            3600..86_400 => write!(f, "{}h{}m", s / 3600, (s % 3600) / 60),
            _ => write!(f, "{}d{}h", s / 86_400, (s % 86_400) / 3600),
        }
    }
}

pub fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(header.to_vec());
    table
}

/// The progress cell by the formatting machinery: what `push_progress` is tested
/// against.
#[cfg(test)]
struct ProgressCell(Option<u64>, Option<u64>);

#[cfg(test)]
impl fmt::Display for ProgressCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            // Wrapping, as release builds always did (past 1.8e17 steps), not a panic.
            (Some(d), Some(t)) if t > 0 => write!(f, "{}%", (d.wrapping_mul(100) / t).min(100)),
            (Some(d), _) => write!(f, "{d}"),
            _ => f.write_str("-"),
        }
    }
}

/// The commit cell by the formatting machinery: what `push_commit` is tested against.
#[cfg(test)]
struct CommitCell<'a>(Option<&'a str>, bool);

#[cfg(test)]
impl fmt::Display for CommitCell<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(c) => {
                let short = c.char_indices().nth(8).map_or(c, |(end, _)| &c[..end]);
                f.write_str(short)?;
                if self.1 {
                    f.write_str("+dirty")?;
                }
                Ok(())
            }
            None => f.write_str("-"),
        }
    }
}

/// Appends `n` in decimal.
fn push_int(text: &mut String, n: impl itoa::Integer) {
    text.push_str(itoa::Buffer::new().format(n));
}

/// What `ProgressCell` writes, appended to `text`.
fn push_progress(text: &mut String, done: Option<u64>, total: Option<u64>) {
    match (done, total) {
        (Some(d), Some(t)) if t > 0 => {
            // As `ProgressCell`: wrapping past 1.8e17 steps, capped at 100.
            push_int(text, (d.wrapping_mul(100) / t).min(100));
            text.push('%');
        }
        (Some(d), _) => push_int(text, d),
        _ => text.push('-'),
    }
}

/// What `Usd`'s `Display` writes (`$12.34`), appended to `text`.
fn push_usd(text: &mut String, usd: crate::model::Usd) {
    let micros = i128::from(usd.micros());
    let cents = (micros + if micros < 0 { -5_000 } else { 5_000 }) / 10_000;
    if cents < 0 {
        text.push('-');
    }
    text.push('$');
    let cents = cents.unsigned_abs();
    push_int(text, cents / 100);
    text.push('.');
    let rest = (cents % 100) as u8;
    text.push(char::from(b'0' + rest / 10));
    text.push(char::from(b'0' + rest % 10));
}

/// What `Age` writes, appended to `text`.
fn push_age(text: &mut String, seconds: i64) {
    let s = seconds.max(0);
    match s {
        0..60 => {
            push_int(text, s);
            text.push('s');
        }
        60..3600 => {
            push_int(text, s / 60);
            text.push('m');
        }
        3600..86_400 => {
            push_int(text, s / 3600);
            text.push('h');
            push_int(text, (s % 3600) / 60);
            text.push('m');
        }
        _ => {
            push_int(text, s / 86_400);
            text.push('d');
            push_int(text, (s % 86_400) / 3600);
            text.push('h');
        }
    }
}

/// What `CommitCell` writes, appended to `text`.
fn push_commit(text: &mut String, commit: Option<&str>, dirty: bool) {
    match commit {
        Some(c) => {
            let short = if c.is_ascii() {
                &c[..c.len().min(8)]
            } else {
                c.char_indices().nth(8).map_or(c, |(end, _)| &c[..end])
            };
            text.push_str(short);
            if dirty {
                text.push_str("+dirty");
            }
        }
        None => text.push('-'),
    }
}

fn dash(v: Option<&str>) -> &str {
    v.unwrap_or("-")
}

/// A plain table of left-aligned columns separated by two spaces, header first. The
/// runs table goes through this rather than `comfy_table`: with 10,000 runs the general
/// renderer alone took longer than the whole 50 ms budget of `get runs`. Cells are
/// written into one buffer as they come (no `String` per cell): a table of 100,000
/// runs is 800,000 cells.
pub struct Columns {
    header: Vec<&'static str>,
    widths: Vec<usize>,
    text: String,
    /// Where each cell ends in `text` and how many characters it has, row after row;
    /// a cell starts where the one before it ends.
    ends: Vec<(usize, usize)>,
    /// The column of the next cell (kept, not derived from `ends` by a division).
    column: usize,
}

impl Columns {
    pub fn new(header: &[&'static str]) -> Columns {
        Columns {
            header: header.to_vec(),
            widths: header.iter().map(|h| h.chars().count()).collect(),
            text: String::new(),
            ends: Vec::new(),
            column: 0,
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        for cell in &row {
            self.cell(cell);
        }
        self.end_row();
    }

    /// Appends the next cell of the current row.
    pub fn cell(&mut self, value: impl fmt::Display) {
        let start = self.text.len();
        // Writing into a `String` cannot fail.
        let _ = write!(self.text, "{value}");
        self.ended(start);
    }

    /// `cell` for text as it is, copied without the formatting machinery (most cells).
    pub fn text_cell(&mut self, value: &str) {
        let start = self.text.len();
        self.text.push_str(value);
        self.ended(start);
    }

    /// A cell `write` appends to the text directly (the table's numbers, without the
    /// formatting machinery).
    fn cell_with(&mut self, write: impl FnOnce(&mut String)) {
        let start = self.text.len();
        write(&mut self.text);
        self.ended(start);
    }

    /// Records the width of the cell written from `start` on.
    fn ended(&mut self, start: usize) {
        let cell = &self.text[start..];
        let width = if cell.is_ascii() {
            cell.len()
        } else {
            cell.chars().count()
        };
        if let Some(w) = self.widths.get_mut(self.column) {
            *w = (*w).max(width);
        }
        self.ends.push((self.text.len(), width));
        self.column += 1;
        if self.column >= self.widths.len() {
            self.column = 0;
        }
    }

    /// Ends the current row; missing cells are empty.
    pub fn end_row(&mut self) {
        while self.column != 0 {
            self.ended(self.text.len());
        }
    }

    pub fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let widths = &self.widths;
        let mut line = String::with_capacity(widths.iter().sum::<usize>() + 2 * widths.len());
        let mut emit = |cells: &mut dyn Iterator<Item = (&str, usize)>| -> std::io::Result<()> {
            line.clear();
            for (i, (cell, chars)) in cells.enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < widths.len() {
                    // In chunks of a constant run of spaces, not one char at a time.
                    const SPACES: &str = "                                ";
                    let mut pad = widths[i].saturating_sub(chars);
                    while pad > 0 {
                        let take = pad.min(SPACES.len());
                        line.push_str(&SPACES[..take]);
                        pad -= take;
                    }
                }
            }
            out.write_all(line.trim_end().as_bytes())?;
            out.write_all(b"\n")
        };
        emit(&mut self.header.iter().map(|h| (*h, h.chars().count())))?;
        let columns = widths.len().max(1);
        let mut start = 0;
        for row in self.ends.chunks(columns) {
            let mut from = start;
            emit(&mut row.iter().map(|&(end, chars)| {
                let cell = &self.text[from..end];
                from = end;
                (cell, chars)
            }))?;
            start = from;
        }
        Ok(())
    }
}

/// The `get runs` table, filled one run at a time; `wide` adds placement, money and
/// code columns.
pub struct RunsTable {
    columns: Columns,
    wide: bool,
    now: Timestamp,
    /// The latest value of each run's stop rule metric (wide only).
    metrics: BTreeMap<String, (String, f64)>,
}

impl RunsTable {
    pub fn new(wide: bool, now: Timestamp) -> RunsTable {
        let columns = if wide {
            Columns::new(&[
                "NAME", "JOB", "PHASE", "PROGRESS", "ATTEMPT", "PROVIDER", "INSTANCE", "HOST",
                "GPU", "$/H", "COST", "COMMIT", "MESSAGE", "EXIT", "METRIC", "AGE", "REASON",
            ])
        } else {
            Columns::new(&[
                "NAME", "PHASE", "PROGRESS", "PROVIDER", "COST", "COMMIT", "AGE", "REASON",
            ])
        };
        RunsTable {
            columns,
            wide,
            now,
            metrics: BTreeMap::new(),
        }
    }

    /// The wide table's METRIC column: run → (the stop rule's metric, its latest value).
    pub fn with_metrics(mut self, metrics: BTreeMap<String, (String, f64)>) -> RunsTable {
        self.metrics = metrics;
        self
    }

    pub fn push(&mut self, run: &ListedRun<'_>, error: Option<&RunError>) {
        let t = &mut self.columns;
        let provider = run.provider.map(|p| p.as_str()).unwrap_or("-");
        let progress =
            |text: &mut String| push_progress(text, run.progress_done, run.progress_total);
        let commit = |text: &mut String| push_commit(text, run.commit, run.dirty);
        let cost = run.cost_at(self.now);
        t.text_cell(run.name);
        if self.wide {
            t.text_cell(run.job);
            t.text_cell(run.phase.as_str());
            t.cell_with(progress);
            t.cell(run.attempt);
            t.text_cell(provider);
            t.text_cell(dash(run.instance_id));
            t.text_cell(dash(run.host));
            t.text_cell(dash(run.gpu));
            match run.price_per_hour {
                Some(p) => t.cell(format_args!("{:.3}", p.dollars())),
                None => t.cell("-"),
            }
            t.cell_with(|text| push_usd(text, cost));
            t.cell_with(commit);
            t.cell(dash(run.commit_message));
            match run.exit_code {
                Some(c) => t.cell(c),
                None => t.cell("-"),
            }
            match self.metrics.get(run.name) {
                Some((metric, value)) => t.cell(format_args!("{metric}={value}")),
                None => t.cell("-"),
            }
        } else {
            t.text_cell(run.phase.as_str());
            t.cell_with(progress);
            t.text_cell(provider);
            t.cell_with(|text| push_usd(text, cost));
            t.cell_with(commit);
        }
        let age = self.now - run.created_at;
        t.cell_with(|text| push_age(text, age));
        match error {
            None => t.text_cell(run.reason),
            Some(_) => t.cell(ReasonCell(run, error)),
        }
        t.end_row();
    }

    pub fn is_empty(&self) -> bool {
        self.columns.ends.is_empty()
    }

    pub fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        self.columns.write(out)
    }
}

/// The `get runs` table of records (`describe` shows a job's runs with it).
pub fn runs_table(
    runs: &[RunRecord],
    errors: &BTreeMap<String, RunError>,
    wide: bool,
    now: Timestamp,
) -> RunsTable {
    let mut table = RunsTable::new(wide, now);
    for run in runs {
        table.push(&listed(run), errors.get(&run.name));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_trim() {
        let mut t = Columns::new(&["NAME", "PHASE"]);
        t.push(vec!["a-long-name".into(), "Running".into()]);
        t.push(vec!["b".into(), "-".into()]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME         PHASE\na-long-name  Running\nb            -\n"
        );
    }

    #[test]
    fn table_numbers_appended_are_what_their_display_writes() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ints: Vec<i64> = vec![
            0,
            1,
            -1,
            59,
            60,
            3599,
            3600,
            86_399,
            86_400,
            i64::MAX,
            i64::MIN,
        ];
        for _ in 0..20_000 {
            let v = next();
            ints.push(v as i64 >> (v % 60));
        }
        for &n in &ints {
            let mut text = String::new();
            push_age(&mut text, n);
            assert_eq!(text, Age(n).to_string(), "age {n}");
            let usd = crate::model::Usd::from_micros(n);
            text.clear();
            push_usd(&mut text, usd);
            assert_eq!(text, usd.to_string(), "usd {n}");
            let done = n.unsigned_abs() >> 8;
            for total in [
                None,
                Some(0),
                Some(1),
                Some(done / 3 + 1),
                Some(n.unsigned_abs()),
            ] {
                for done in [None, Some(done)] {
                    text.clear();
                    push_progress(&mut text, done, total);
                    assert_eq!(
                        text,
                        ProgressCell(done, total).to_string(),
                        "{done:?}/{total:?}"
                    );
                }
            }
        }
        for commit in [
            None,
            Some(""),
            Some("abc"),
            Some("0123456789"),
            Some("ünïcödé-ünï"),
        ] {
            for dirty in [false, true] {
                let mut text = String::new();
                push_commit(&mut text, commit, dirty);
                assert_eq!(text, CommitCell(commit, dirty).to_string());
            }
        }
    }

    #[test]
    fn short_commits_cut_at_eight_characters() {
        assert_eq!(
            CommitCell(Some("0123456789"), false).to_string(),
            "01234567"
        );
        assert_eq!(
            CommitCell(Some("ünïcödé-ünï"), true).to_string(),
            "ünïcödé-+dirty"
        );
        assert_eq!(CommitCell(Some("abc"), false).to_string(), "abc");
        assert_eq!(CommitCell(None, true).to_string(), "-");
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m");
        assert_eq!(age(3600 * 2 + 300), "2h5m");
        assert_eq!(age(86_400 * 4 + 3600), "4d1h");
        assert_eq!(age(-3), "0s");
    }
}
