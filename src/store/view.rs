//! A run as `get runs -o json|yaml` prints it. The JSON shape is a documented contract
//! (README "Output for scripts", `tests/get_runs_contract.rs`): fields are only ever
//! added, never renamed or removed. It lives in the store because the store's writers
//! keep each run's rendered JSON beside its row (`listing.rs`), in the same transaction.
//! Changing what these functions write means a schema step that rebuilds the listing
//! rows (`migrations.rs`), or old rows would print the old bytes.

use super::{ListedRun, RunError, RunRecord};
use crate::model::{Timestamp, Usd};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Not as _;

/// A run as `get runs -o json|yaml` prints it.
#[derive(Debug, Serialize)]
pub struct RunView<'a> {
    pub name: &'a str,
    pub job: &'a str,
    pub phase: &'static str,
    pub reason: &'a str,
    pub provider: Option<&'static str>,
    pub instance_id: Option<&'a str>,
    pub host: Option<&'a str>,
    pub gpu: Option<&'a str>,
    pub price_per_hour: Option<f64>,
    pub cost_usd: f64,
    pub progress: Option<ProgressView>,
    pub attempt: u32,
    pub repository: Option<&'a str>,
    pub commit: Option<&'a str>,
    pub commit_message: Option<&'a str>,
    pub author: Option<&'a str>,
    pub dirty: bool,
    pub exit_code: Option<i32>,
    pub matrix: MatrixView<'a>,
    pub created_at: Rfc3339,
    pub started_at: Option<Rfc3339>,
    pub finished_at: Option<Rfc3339>,
    /// The last failure of any of the run's steps (create, start, setup, ...), kept until
    /// that work goes through.
    pub last_error: Option<ErrorView<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ErrorView<'a> {
    pub step: &'a str,
    pub message: &'a str,
    pub at: Rfc3339,
}

#[derive(Debug, Serialize)]
pub struct ProgressView {
    pub done: u64,
    pub total: Option<u64>,
    pub fraction: Option<f64>,
}

/// A run's matrix: the map of a record, or the JSON text of a listed row, printed the
/// same way either way.
#[derive(Debug, Clone, Copy)]
pub enum MatrixView<'a> {
    Map(&'a BTreeMap<String, String>),
    /// A JSON object of strings, as the store keeps it.
    Json(&'a str),
}

impl Serialize for MatrixView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        match *self {
            MatrixView::Map(map) => map.serialize(serializer),
            // Most runs have no matrix: no parser for them.
            MatrixView::Json("{}") => BTreeMap::<&str, &str>::new().serialize(serializer),
            MatrixView::Json(text) => {
                // Borrowed strings unless a value has escapes, which must be decoded.
                match serde_json::from_str::<BTreeMap<&str, &str>>(text) {
                    Ok(map) => map.serialize(serializer),
                    Err(_) => serde_json::from_str::<BTreeMap<String, String>>(text)
                        .map_err(S::Error::custom)?
                        .serialize(serializer),
                }
            }
        }
    }
}

impl<'a> RunView<'a> {
    /// The run as of `now` (its cost so far is derived at `now`).
    pub fn of(run: &'a RunRecord, error: Option<&'a RunError>, now: Timestamp) -> Self {
        let mut view = RunView::listed(&listed(run), error, now);
        view.matrix = MatrixView::Map(&run.matrix);
        view
    }

    /// A listed row as of `now`.
    pub fn listed(run: &ListedRun<'a>, error: Option<&'a RunError>, now: Timestamp) -> Self {
        RunView {
            name: run.name,
            job: run.job,
            phase: run.phase.as_str(),
            reason: run.reason,
            provider: run.provider.map(|p| p.as_str()),
            instance_id: run.instance_id,
            host: run.host,
            gpu: run.gpu,
            price_per_hour: run.price_per_hour.map(|p| p.dollars()),
            cost_usd: cost_view(run.cost_at(now)),
            progress: progress_view(run.progress_done, run.progress_total),
            attempt: run.attempt,
            repository: run.repository,
            commit: run.commit,
            commit_message: run.commit_message,
            author: run.author,
            dirty: run.dirty,
            exit_code: run.exit_code,
            matrix: MatrixView::Json(run.matrix_json),
            created_at: Rfc3339(run.created_at),
            started_at: run.started_at.map(Rfc3339),
            finished_at: run.finished_at.map(Rfc3339),
            last_error: error.map(|e| ErrorView {
                step: &e.step,
                message: &e.message,
                at: Rfc3339(e.at),
            }),
        }
    }
}

/// Writes a JSON scalar (string, number, bool, null) as serde_json writes it.
pub(crate) fn scalar(out: &mut Vec<u8>, value: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer(out, value).map_err(std::io::Error::from)
}

/// True when serde_json writes `s` as is between its quotes: no quote, backslash or
/// control character (the only bytes it escapes).
fn plain(s: &str) -> bool {
    // Every byte looked at (no early exit), which the compiler turns into wide compares.
    s.bytes()
        .fold(false, |bad, b| {
            bad | (b < 0x20) | (b == b'"') | (b == b'\\')
        })
        .not()
}

/// A JSON string as serde_json writes it; most strings need no escaping and are
/// copied in one go.
fn string(out: &mut Vec<u8>, s: &str) -> std::io::Result<()> {
    if plain(s) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        scalar(out, &s)
    }
}

fn optional_string(out: &mut Vec<u8>, s: Option<&str>) -> std::io::Result<()> {
    match s {
        Some(s) => string(out, s),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

fn time(out: &mut Vec<u8>, t: Rfc3339) -> std::io::Result<()> {
    match t.ascii() {
        Some(bytes) => {
            out.push(b'"');
            out.extend_from_slice(&bytes);
            out.push(b'"');
            Ok(())
        }
        None => scalar(out, &t),
    }
}

fn optional_time(out: &mut Vec<u8>, t: Option<Rfc3339>) -> std::io::Result<()> {
    match t {
        Some(t) => time(out, t),
        None => {
            out.extend_from_slice(b"null");
            Ok(())
        }
    }
}

/// A pretty-printed JSON object written field by field, byte for byte as
/// `serde_json::to_writer_pretty` writes it at this depth (two spaces a level). It
/// writes into a `Vec`: a run is about 30 small pieces, and the pieces cost less as
/// vector appends than as calls through `io::Write`.
struct Object<'w> {
    out: &'w mut Vec<u8>,
    /// Spaces before this object's own closing brace.
    indent: usize,
    empty: bool,
}

impl<'w> Object<'w> {
    fn open(out: &'w mut Vec<u8>, indent: usize) -> Self {
        out.push(b'{');
        Object {
            out,
            indent,
            empty: true,
        }
    }

    /// An object whose fields before the cursor were written by someone else (it has
    /// at least one): the next key starts with a comma.
    fn resume(out: &'w mut Vec<u8>, indent: usize) -> Self {
        Object {
            out,
            indent,
            empty: false,
        }
    }

    /// Starts the next field: its key is a plain identifier, written as is.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        let out = &mut *self.out;
        if self.empty {
            out.push(b'\n');
        } else {
            out.extend_from_slice(b",\n");
        }
        self.empty = false;
        out.resize(out.len() + self.indent + 2, b' ');
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\": ");
        out
    }

    fn field(&mut self, key: &str, value: &impl Serialize) -> std::io::Result<()> {
        let out = self.key(key);
        scalar(out, value)
    }

    fn string(&mut self, key: &str, value: &str) -> std::io::Result<()> {
        let out = self.key(key);
        string(out, value)
    }

    fn optional_string(&mut self, key: &str, value: Option<&str>) -> std::io::Result<()> {
        let out = self.key(key);
        optional_string(out, value)
    }

    fn close(self) {
        if !self.empty {
            self.out.push(b'\n');
            self.out.resize(self.out.len() + self.indent, b' ');
        }
        self.out.push(b'}');
    }
}

impl RunView<'_> {
    /// Writes the run as `serde_json::to_writer_pretty` would, its opening brace where
    /// the cursor is and its closing one `indent` spaces in: the same bytes (a test
    /// compares them), without serde's per-key escaping and dispatch, which was most of
    /// the cost of `get runs -o json` at 100,000 runs.
    pub fn write_json(&self, out: &mut impl std::io::Write, indent: usize) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1024);
        self.write_json_into(&mut buf, indent)?;
        out.write_all(&buf)
    }

    /// `write_json` appending to `out`. In four parts, so that the listing rows can keep
    /// the two that depend only on the run (`head`, `tail`) and a reader writes the
    /// rest (`cost_usd` at its time, `progress`, `last_error`) around them with these
    /// same functions.
    pub fn write_json_into(&self, out: &mut Vec<u8>, indent: usize) -> std::io::Result<()> {
        self.write_head(out, indent)?;
        scalar(out, &self.cost_usd)?;
        write_progress(out, indent, self.progress.as_ref())?;
        self.write_tail(out, indent)?;
        write_last_error(out, indent, self.last_error.as_ref())
    }

    /// From the opening brace to the `cost_usd` key, its value not written.
    pub(crate) fn write_head(&self, out: &mut Vec<u8>, indent: usize) -> std::io::Result<()> {
        let mut o = Object::open(out, indent);
        o.string("name", self.name)?;
        o.string("job", self.job)?;
        o.string("phase", self.phase)?;
        o.string("reason", self.reason)?;
        o.optional_string("provider", self.provider)?;
        o.optional_string("instance_id", self.instance_id)?;
        o.optional_string("host", self.host)?;
        o.optional_string("gpu", self.gpu)?;
        o.field("price_per_hour", &self.price_per_hour)?;
        o.key("cost_usd");
        Ok(())
    }

    /// From the comma after `progress` to the `finished_at` value.
    pub(crate) fn write_tail(&self, out: &mut Vec<u8>, indent: usize) -> std::io::Result<()> {
        let mut o = Object::resume(out, indent);
        o.field("attempt", &self.attempt)?;
        o.optional_string("repository", self.repository)?;
        o.optional_string("commit", self.commit)?;
        o.optional_string("commit_message", self.commit_message)?;
        o.optional_string("author", self.author)?;
        o.key("dirty")
            .extend_from_slice(if self.dirty { b"true" } else { b"false" });
        o.field("exit_code", &self.exit_code)?;
        {
            let out = o.key("matrix");
            let mut inner = Object::open(out, indent + 2);
            self.matrix.each(|k, v| {
                // Matrix keys are the user's: escaped like any string.
                let sep: &[u8] = if inner.empty { b"\n" } else { b",\n" };
                inner.empty = false;
                inner.out.extend_from_slice(sep);
                inner.out.resize(inner.out.len() + indent + 4, b' ');
                string(inner.out, k)?;
                inner.out.extend_from_slice(b": ");
                string(inner.out, v)
            })?;
            inner.close();
        }
        time(o.key("created_at"), self.created_at)?;
        optional_time(o.key("started_at"), self.started_at)?;
        optional_time(o.key("finished_at"), self.finished_at)?;
        Ok(())
    }
}

/// The `progress` field (after the `cost_usd` value), key and value.
pub(crate) fn write_progress(
    out: &mut Vec<u8>,
    indent: usize,
    progress: Option<&ProgressView>,
) -> std::io::Result<()> {
    let mut o = Object::resume(out, indent);
    match progress {
        None => o.key("progress").extend_from_slice(b"null"),
        Some(p) => {
            let out = o.key("progress");
            let mut inner = Object::open(out, indent + 2);
            inner.field("done", &p.done)?;
            inner.field("total", &p.total)?;
            inner.field("fraction", &p.fraction)?;
            inner.close();
        }
    }
    Ok(())
}

/// The `last_error` field and the object's closing brace.
pub(crate) fn write_last_error(
    out: &mut Vec<u8>,
    indent: usize,
    error: Option<&ErrorView<'_>>,
) -> std::io::Result<()> {
    let mut o = Object::resume(out, indent);
    match error {
        None => o.key("last_error").extend_from_slice(b"null"),
        Some(e) => {
            let out = o.key("last_error");
            let mut inner = Object::open(out, indent + 2);
            inner.string("step", e.step)?;
            inner.string("message", e.message)?;
            time(inner.key("at"), e.at)?;
            inner.close();
        }
    }
    o.close();
    Ok(())
}

/// A run's progress as `get runs -o json` shows it.
pub(crate) fn progress_view(done: Option<u64>, total: Option<u64>) -> Option<ProgressView> {
    done.map(|done| ProgressView {
        done,
        total,
        fraction: total.filter(|t| *t > 0).map(|t| done as f64 / t as f64),
    })
}

/// A run's cost so far as `get runs -o json` shows it: to the hundredth of a cent.
pub(crate) fn cost_view(cost_at_now: Usd) -> f64 {
    round_cents(cost_at_now.dollars())
}

/// The pairs of a matrix as the store writes it (`serde_json` of a sorted map: compact,
/// keys in order) when no key or value holds anything serde_json escapes; `None` for
/// anything else, which the JSON parser then reads.
fn plain_pairs(text: &str) -> Option<Vec<(&str, &str)>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    if inner.is_empty() {
        return Some(pairs);
    }
    let mut rest = inner;
    loop {
        let (key, after) = rest.strip_prefix('"')?.split_once('"')?;
        let (value, after) = after.strip_prefix(":\"")?.split_once('"')?;
        if !plain(key) || !plain(value) || pairs.last().is_some_and(|(k, _)| *k >= key) {
            return None;
        }
        pairs.push((key, value));
        match after.strip_prefix(',') {
            Some(next) => rest = next,
            None if after.is_empty() => return Some(pairs),
            None => return None,
        }
    }
}

impl MatrixView<'_> {
    /// Each key and value, keys sorted, as the matrix serializes.
    fn each(&self, mut f: impl FnMut(&str, &str) -> std::io::Result<()>) -> std::io::Result<()> {
        let bad = |e: serde_json::Error| std::io::Error::other(e);
        match *self {
            MatrixView::Map(map) => map.iter().try_for_each(|(k, v)| f(k, v)),
            MatrixView::Json("{}") => Ok(()),
            MatrixView::Json(text) => {
                if let Some(pairs) = plain_pairs(text) {
                    return pairs.iter().try_for_each(|(k, v)| f(k, v));
                }
                match serde_json::from_str::<BTreeMap<&str, &str>>(text) {
                    Ok(map) => map.iter().try_for_each(|(k, v)| f(k, v)),
                    Err(_) => serde_json::from_str::<BTreeMap<String, String>>(text)
                        .map_err(bad)?
                        .iter()
                        .try_for_each(|(k, v)| f(k, v)),
                }
            }
        }
    }
}

/// A record seen as a listing row. The matrix is left out (`{}`): callers that show it
/// take it from the record (`RunView::of`).
pub fn listed(run: &RunRecord) -> ListedRun<'_> {
    ListedRun {
        name: &run.name,
        job: &run.job,
        phase: run.phase,
        reason: &run.reason,
        matrix_json: "{}",
        attempt: run.attempt,
        provider: run.provider,
        instance_id: run.instance_id.as_deref(),
        host: run.host.as_deref(),
        gpu: run.gpu.as_deref(),
        price_per_hour: run.price_per_hour,
        cost_usd: run.cost_usd,
        billing_since: run.billing_since,
        progress_done: run.progress_done,
        progress_total: run.progress_total,
        exit_code: run.exit_code,
        repository: run.repository.as_deref(),
        commit: run.commit.as_deref(),
        commit_message: run.commit_message.as_deref(),
        author: run.author.as_deref(),
        dirty: run.dirty,
        created_at: run.created_at,
        started_at: run.started_at,
        finished_at: run.finished_at,
    }
}

fn round_cents(usd: f64) -> f64 {
    self::usd((usd * 10_000.0).round() / 10_000.0)
}

/// A sum of money as shown: an empty sum of `f64`s is `-0.0`, which would print as
/// `$-0.00` and `-0.0`.
pub fn usd(value: f64) -> f64 {
    if value == 0.0 { 0.0 } else { value }
}

pub fn rfc3339(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

/// A time as `rfc3339` writes it, without building a `String`: listings print three
/// per run.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub Timestamp);

impl Rfc3339 {
    /// "1970-01-01T00:00:00Z" up to the end of year 9999, the range chrono also writes
    /// with four-digit years; `None` outside it.
    fn ascii(self) -> Option<[u8; 20]> {
        const END_OF_9999: i64 = 253_402_300_800;
        if !(0..END_OF_9999).contains(&self.0) {
            return None;
        }
        let days = self.0 / 86_400;
        let secs = self.0 % 86_400;
        // Days to a civil date (Howard Hinnant's algorithm), for days >= 0.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let mut out = *b"0000-00-00T00:00:00Z";
        let mut put = |at: usize, value: i64, digits: usize| {
            let mut v = value;
            for i in (0..digits).rev() {
                out[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, year, 4);
        put(5, month, 2);
        put(8, day, 2);
        put(11, secs / 3600, 2);
        put(14, secs % 3600 / 60, 2);
        put(17, secs % 60, 2);
        Some(out)
    }
}

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ascii() {
            // Only ASCII digits and separators were written.
            Some(bytes) => f.write_str(std::str::from_utf8(&bytes).map_err(|_| fmt::Error)?),
            None => f.write_str(&rfc3339(self.0)),
        }
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.ascii() {
            Some(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => serializer.serialize_str(text),
                Err(_) => serializer.serialize_str(&rfc3339(self.0)),
            },
            None => serializer.serialize_str(&rfc3339(self.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_written_field_by_field_are_what_serde_json_writes() {
        let mut full = RunRecord::new_pending("a-0", "a", 0, "h", &BTreeMap::new(), "c", 5);
        full.matrix
            .insert("model".into(), "llama \"7b\"\t/ ü".into());
        full.matrix.insert("lr".into(), "3e-4".into());
        full.provider = Some(crate::model::ProviderKind::Lambda);
        full.instance_id = Some("i-1".into());
        full.gpu = Some("H100".into());
        full.price_per_hour = Some(crate::model::Usd::from_dollars(2.49));
        full.cost_usd = crate::model::Usd::from_dollars(12.345678);
        full.progress_done = Some(7);
        full.progress_total = Some(0);
        full.exit_code = Some(-9);
        full.commit = Some("0123456789".into());
        full.commit_message = Some("line\nbreak \u{1} ünï".into());
        full.started_at = Some(1_700_000_050);
        let error = RunError {
            step: "create".into(),
            message: "no \"capacity\"".into(),
            detail: String::new(),
            at: 1_700_000_000,
        };
        let bare = RunRecord::new_pending("b-0", "b", 0, "", &BTreeMap::new(), "", 0);
        let matrix_json = serde_json::to_string(&full.matrix).unwrap();
        let mut listed_full = listed(&full);
        listed_full.matrix_json = &matrix_json;
        // A matrix with nothing to escape, as the store keeps it (read without the
        // JSON parser).
        let mut plain_run = full.clone();
        plain_run.matrix = BTreeMap::from([
            ("lr".to_string(), "3e-4".to_string()),
            ("seed".to_string(), "0".to_string()),
            ("Ünï".to_string(), "✓".to_string()),
        ]);
        let plain_json = serde_json::to_string(&plain_run.matrix).unwrap();
        let mut listed_plain = listed(&plain_run);
        listed_plain.matrix_json = &plain_json;
        let views = [
            RunView::of(&full, Some(&error), 1_700_000_100),
            RunView::of(&bare, None, 0),
            RunView::listed(&listed_full, None, 1_700_000_100),
            RunView::listed(&listed(&bare), Some(&error), 9),
            RunView::listed(&listed_plain, Some(&error), 1_700_000_100),
        ];
        for view in &views {
            for indent in [0, 4] {
                let mut ours = Vec::new();
                view.write_json(&mut ours, indent).unwrap();
                let theirs = serde_json::to_string_pretty(view).unwrap();
                // serde_json's nesting, shifted `indent` spaces in.
                let pad = " ".repeat(indent);
                let shifted = theirs.replace('\n', &format!("\n{pad}"));
                assert_eq!(String::from_utf8(ours).unwrap(), shifted);
            }
        }
    }

    #[test]
    fn plain_matrices_are_read_without_the_parser_and_the_rest_with_it() {
        let pairs = |t| plain_pairs(t);
        assert_eq!(pairs("{}"), Some(vec![]));
        assert_eq!(
            pairs(r#"{"a":"1","b":"x y"}"#),
            Some(vec![("a", "1"), ("b", "x y")])
        );
        // Escapes, keys out of order or repeated, spacing or anything else the store
        // does not write: the parser decides.
        for text in [
            r#"{"a":"say \"hi\""}"#,
            r#"{"a\\b":"1"}"#,
            r#"{"b":"1","a":"2"}"#,
            r#"{"a":"1","a":"2"}"#,
            r#"{"a": "1"}"#,
            r#"{"a":"1",}"#,
            r#"{"a":1}"#,
            r#" {"a":"1"}"#,
            "{\"a\":\"\u{1}\"}",
        ] {
            assert_eq!(pairs(text), None, "{text}");
        }
        // Whichever way a matrix is read, it prints the same.
        for text in [
            r#"{"b":"1","a":"2"}"#,
            r#"{"a":"say \"hi\""}"#,
            r#"{"a":"1"}"#,
        ] {
            let mut seen = Vec::new();
            MatrixView::Json(text)
                .each(|k, v| {
                    seen.push((k.to_string(), v.to_string()));
                    Ok(())
                })
                .unwrap();
            let parsed: BTreeMap<String, String> = serde_json::from_str(text).unwrap();
            assert_eq!(seen, parsed.into_iter().collect::<Vec<_>>(), "{text}");
        }
    }

    #[test]
    fn rfc3339_without_chrono_writes_what_chrono_writes() {
        // Every boundary that matters (epoch, leap days, century rules, the end of the
        // fast range) and a spread of times in between.
        let mut times = vec![
            -1,
            0,
            59,
            86_399,
            951_782_400,   // 2000-02-29
            4_107_542_400, // 2100-03-01
            253_402_300_799,
            253_402_300_800,
            i64::MIN,
            i64::MAX,
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            times.push((x % 260_000_000_000) as i64 - 1_000_000_000);
        }
        for t in times {
            assert_eq!(Rfc3339(t).to_string(), rfc3339(t), "at {t}");
            assert_eq!(
                serde_json::to_string(&Rfc3339(t)).unwrap(),
                serde_json::to_string(&rfc3339(t)).unwrap()
            );
        }
    }
}
