//! Reading a running job's metrics file a piece at a time: each attempt keeps the byte
//! offset it has read up to and a [`Watch`] of its last
//! [`METRICS_TAIL`](super::controller::METRICS_TAIL) bytes of records, so a pass reads
//! and parses only what the job wrote since the last one, and keeps only what the
//! `stop_when` rules need of it (their metrics and `step`), never the records. The
//! rules and the METRIC column see the same window a full re-read of the tail would
//! give (see `stop::Watch`).
//!
//! A read resumes only when the file is the same (its inode) and the byte before the
//! offset is still the newline it was; otherwise (the file truncated, rotated or replaced, a
//! controller restart with no cursor yet, rules naming a metric the window does not
//! keep) the window starts again from the file's tail. No cursor survives a restart:
//! the first pass after one reads the tail.
//!
//! A line longer than a read (`cap` bytes) is never a record: while in one, each pass
//! reads the file's tail, and the window goes on after the line's newline, so such a
//! line neither stalls the cursor (before, it read the line's first bytes every pass
//! and never got past them) nor costs more than a read.

use super::stop::{Watch, parse_line};
use crate::agent::MetricsRead;
use crate::manifest::StopRule;
use std::sync::Arc;

/// Where the next read of an attempt's metrics starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The file's identity (inode) when last read.
    pub file: Option<u64>,
    /// Bytes of the file read and parsed, up to just after a newline: 0 for none (read
    /// its tail).
    pub offset: u64,
}

/// One attempt's place in its metrics file.
#[derive(Debug, Default)]
pub struct MetricsCursor {
    at: Position,
    /// Inside a line longer than a read: the file, and how far into it the bytes read
    /// had no newline. The next reads are of the file's tail, where the line's end (or
    /// more of it) is.
    skipping: Option<Position>,
    /// The rules' state over the window, shared with the pass's observations.
    watch: Arc<Watch>,
}

impl MetricsCursor {
    /// Where the next read starts for `rules` (with reads of `cap` bytes): from the
    /// offset; the file's tail when this window does not keep what they need, or
    /// inside a line too long for a read.
    pub fn position(&self, rules: &[StopRule], cap: usize) -> Position {
        if self.watch.covers(rules, cap) && self.skipping.is_none() {
            self.at
        } else {
            Position::default()
        }
    }

    /// The rules' state over the window.
    pub fn watch(&self) -> Arc<Watch> {
        Arc::clone(&self.watch)
    }

    /// Takes in what a read of at most `cap` bytes returned, keeping what `rules` need
    /// of the window: the lines after the offset when the read [`resumes`] from this
    /// cursor's position for these rules, the lines after the end of a long line being
    /// skipped, else (a read of the file's tail) a new window.
    pub fn advance(&mut self, read: &MetricsRead, rules: &[StopRule], cap: usize) {
        let (body, base) = if resumes(&self.position(rules, cap), read) {
            (&read.text[1..], self.at.offset)
        } else if self.skipping.is_some_and(|skip| {
            self.watch.covers(rules, cap)
                && read.file.is_some()
                && read.file == skip.file
                && read.start + read.text.len() as u64 >= skip.offset
        }) {
            // The tail of the same file, no shorter: the long line ends at its first
            // newline (none was in the bytes of it read before).
            match read.text.find('\n') {
                Some(i) => {
                    self.skipping = None;
                    (&read.text[i + 1..], read.start + i as u64 + 1)
                }
                None => {
                    self.skipping = Some(Position {
                        file: read.file,
                        offset: read.start + read.text.len() as u64,
                    });
                    return;
                }
            }
        } else {
            self.watch = Arc::new(Watch::new(rules, cap));
            self.skipping = None;
            (read.text.as_str(), read.start)
        };
        self.at.file = read.file;
        // Complete lines only: a half-written last line is read whole next time.
        let Some(end) = body.rfind('\n').map(|i| i + 1) else {
            if body.len() + 1 >= cap {
                // No newline in a whole read: a line too long to ever be a record.
                self.skipping = Some(Position {
                    file: read.file,
                    offset: base + body.len() as u64,
                });
            } else {
                self.at.offset = base;
            }
            return;
        };
        let watch = Arc::make_mut(&mut self.watch);
        let mut last = None;
        for line in body[..end].split_inclusive('\n') {
            if let Some(record) = parse_line(line, &mut |name| watch.wants(name)) {
                watch.take(line.len(), &record);
                last = Some(line);
            }
        }
        let whole = last.and_then(|line| parse_line(line, &mut watch.keep_for_last()));
        if let Some(record) = whole {
            watch.set_last(record);
        }
        self.at.offset = base + end as u64;
    }
}

/// True when `read`, asked from `at`, goes on where the last one ended: the same file,
/// starting at the newline just before the offset. When not (and the offset was not
/// 0), the file changed under it: read its tail instead.
pub fn resumes(at: &Position, read: &MetricsRead) -> bool {
    read.file.is_some()
        && read.file == at.file
        && at.offset > 0
        && read.start + 1 == at.offset
        && read.text.starts_with('\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::MetricMode;
    use crate::reconcile::stop::{self, LAST_FIELDS, Record};

    fn read(file: Option<u64>, start: u64, text: &str) -> MetricsRead {
        MetricsRead {
            file,
            start,
            text: text.to_string(),
        }
    }

    fn rule(metric: &str, mode: MetricMode) -> StopRule {
        StopRule {
            metric: metric.into(),
            mode,
            patience: None,
            threshold: None,
            max_steps: None,
        }
    }

    fn last_step(c: &MetricsCursor) -> Option<f64> {
        c.watch().last().and_then(|r| r.get("step").copied())
    }

    /// The cursor as it was before it kept a `Watch`: the window's records, every field
    /// of every line. The tests below check that the new one decides the same.
    #[derive(Default)]
    struct RecordsCursor {
        file: Option<u64>,
        offset: u64,
        records: Vec<Record>,
        sizes: std::collections::VecDeque<usize>,
        bytes: usize,
    }

    impl RecordsCursor {
        fn resumes(&self, read: &MetricsRead) -> bool {
            read.file.is_some()
                && read.file == self.file
                && self.offset > 0
                && read.start + 1 == self.offset
                && read.text.starts_with('\n')
        }

        fn advance(&mut self, read: &MetricsRead, cap: usize) {
            let (body, base) = if self.resumes(read) {
                (&read.text[1..], self.offset)
            } else {
                self.sizes.clear();
                self.bytes = 0;
                self.records.clear();
                (read.text.as_str(), read.start)
            };
            let end = body.rfind('\n').map_or(0, |i| i + 1);
            for line in body[..end].split_inclusive('\n') {
                if let Some(record) = stop::parse_metrics(line).pop() {
                    self.records.push(record);
                    self.sizes.push_back(line.len());
                    self.bytes += line.len();
                }
            }
            let mut drop = 0;
            while self.bytes > cap
                && let Some(size) = self.sizes.pop_front()
            {
                self.bytes -= size;
                drop += 1;
            }
            self.records.drain(..drop);
            self.offset = base + end as u64;
            self.file = read.file;
        }
    }

    /// A metrics file as the agent's `metrics_since` reads it, made of pieces so that a
    /// line of 100 MB costs no memory.
    #[derive(Clone, Default)]
    struct File {
        inode: u64,
        pieces: Vec<Piece>,
    }

    #[derive(Clone)]
    enum Piece {
        Text(String),
        Repeat(u8, u64),
    }

    impl File {
        fn new(inode: u64) -> File {
            File {
                inode,
                pieces: Vec::new(),
            }
        }

        fn push(&mut self, text: &str) {
            self.pieces.push(Piece::Text(text.to_string()));
        }

        fn len(&self) -> u64 {
            self.pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.len() as u64,
                    Piece::Repeat(_, n) => *n,
                })
                .sum()
        }

        fn bytes(&self, from: u64, to: u64) -> Vec<u8> {
            let mut out = Vec::new();
            let mut at = 0u64;
            for p in &self.pieces {
                let len = match p {
                    Piece::Text(t) => t.len() as u64,
                    Piece::Repeat(_, n) => *n,
                };
                let (lo, hi) = (from.max(at), to.min(at + len));
                if lo < hi {
                    match p {
                        Piece::Text(t) => out.extend_from_slice(
                            &t.as_bytes()[(lo - at) as usize..(hi - at) as usize],
                        ),
                        Piece::Repeat(b, _) => out.resize(out.len() + (hi - lo) as usize, *b),
                    }
                }
                at += len;
            }
            out
        }

        /// What `Machine::metrics_since` answers (see its shell script).
        fn since(&self, offset: u64, file: Option<u64>, max: usize) -> MetricsRead {
            let size = self.len();
            let start = if offset > 0 && file == Some(self.inode) && size >= offset {
                offset - 1
            } else {
                size.saturating_sub(max as u64)
            };
            let bytes = self.bytes(start, (start + max as u64).min(size));
            MetricsRead {
                file: Some(self.inode),
                start,
                text: String::from_utf8_lossy(&bytes).into_owned(),
            }
        }
    }

    /// One pass of the controller over the new cursor: from its position, the tail
    /// when the read does not go on from it.
    fn pass(c: &mut MetricsCursor, f: &File, rules: &[StopRule], cap: usize) {
        let at = c.position(rules, cap);
        let mut r = f.since(at.offset, at.file, cap);
        if at.offset > 0 && !resumes(&at, &r) {
            r = f.since(0, None, cap);
        }
        c.advance(&r, rules, cap);
    }

    /// The same over the old cursor.
    fn pass_records(c: &mut RecordsCursor, f: &File, cap: usize) {
        let mut r = f.since(c.offset, c.file, cap);
        if c.offset > 0 && !c.resumes(&r) {
            r = f.since(0, None, cap);
        }
        c.advance(&r, cap);
    }

    /// A small seeded generator (xorshift), so that a failure replays from its seed.
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
        fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
            &v[self.below(v.len() as u64) as usize]
        }
    }

    fn random_rules(rng: &mut Rng) -> Vec<StopRule> {
        (0..1 + rng.below(3))
            .map(|_| StopRule {
                metric: rng.pick(&["val", "loss", "acc"]).to_string(),
                mode: *rng.pick(&[MetricMode::Max, MetricMode::Min]),
                patience: rng
                    .pick(&[None, Some(1), Some(3), Some(8), Some(30)])
                    .to_owned(),
                threshold: rng.pick(&[None, Some(0.85), Some(0.15)]).to_owned(),
                max_steps: rng.pick(&[None, None, Some(40), Some(200)]).to_owned(),
            })
            .collect()
    }

    fn random_line(rng: &mut Rng, step: &mut u64) -> String {
        *step += 1;
        let value = |rng: &mut Rng| -> String {
            match rng.below(40) {
                0 => "NaN".into(),
                1 => "Infinity".into(),
                2 => "-Infinity".into(),
                3 => "-0.0".into(),
                4 => "0".into(),
                _ => format!("{}", rng.below(10) as f64 / 10.0),
            }
        };
        match rng.below(30) {
            0 => "not json\n".into(),
            1 => "{\"step\": 3, \"val\"\n".into(),
            2 => "[1, 2]\n".into(),
            3 => "{}\n".into(),
            4 => "\n".into(),
            5 => format!("{{\"val\": \"x\", \"loss\": {}}}\r\n", value(rng)),
            6 => format!(
                "{{\"step\": {step}, \"val\": {}, \"val\": true}}\n",
                value(rng)
            ),
            7 => format!(
                "{{\"step\": {step}, \"note\": \"a: NaN\", \"acc\": {}}}\n",
                value(rng)
            ),
            8 => format!("{{\"acc\": {}, \"ünï\": 1}}\n", value(rng)),
            9 => {
                // A long record (within a read): it pushes several records out at once.
                let extra: String = (0..rng.below(40))
                    .map(|i| format!(", \"f{i}\": {i}"))
                    .collect();
                format!("{{\"step\": {step}, \"val\": {}{extra}}}\n", value(rng))
            }
            10 => format!(
                "{{\"val\": {}, \"deep\": {}{}}}\n",
                value(rng),
                "[".repeat(130),
                "]".repeat(130)
            ),
            11 => format!("{{\"val\": {}, \"big\": 1e999}}\n", value(rng)),
            _ => {
                let mut fields = Vec::new();
                if rng.below(8) != 0 {
                    fields.push(format!("\"step\": {step}"));
                }
                for m in ["val", "loss", "acc"] {
                    if rng.below(3) != 0 {
                        fields.push(format!("\"{m}\": {}", value(rng)));
                    }
                }
                format!("{{{}}}\n", fields.join(", "))
            }
        }
    }

    fn render(r: Option<&Record>) -> String {
        format!("{r:?}")
    }

    /// The new cursor decides as the old one did over the same reads: random appends
    /// (lines split across two reads, malformed lines, NaN, long records, more than a
    /// read between two passes), truncation in place, rotation to a new inode,
    /// controller restarts; random rules in both modes with patience, thresholds and
    /// max_steps; a window small enough that records leave it all the time.
    #[test]
    fn decides_as_the_window_of_records_did() {
        let cap = 1024;
        let mut stops = 0;
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let rules = random_rules(&mut rng);
            let mut file = File::new(1);
            let mut inode = 1;
            let (mut new, mut old) = (MetricsCursor::default(), RecordsCursor::default());
            let mut step = 0;
            let mut pending = String::new();
            for op in 0..80 {
                match rng.below(20) {
                    0 => {
                        // Truncated in place, rewritten shorter (or equal and different).
                        file = File::new(inode);
                        for _ in 0..rng.below(4) {
                            file.push(&random_line(&mut rng, &mut step));
                        }
                        pending.clear();
                    }
                    1 => {
                        inode += 1;
                        file = File::new(inode);
                        for _ in 0..rng.below(6) {
                            file.push(&random_line(&mut rng, &mut step));
                        }
                        pending.clear();
                    }
                    2 => {
                        // A controller restart: no cursor survives it.
                        new = MetricsCursor::default();
                        old = RecordsCursor::default();
                    }
                    _ => {
                        let mut text = std::mem::take(&mut pending);
                        let most = if rng.below(10) == 0 { 60 } else { 5 };
                        for _ in 0..rng.below(most) {
                            text.push_str(&random_line(&mut rng, &mut step));
                        }
                        if rng.below(4) == 0 {
                            // Half a line now, the rest with the next write.
                            let line = random_line(&mut rng, &mut step);
                            let cut = rng.below(line.len() as u64) as usize;
                            let cut = (0..=cut)
                                .rev()
                                .find(|i| line.is_char_boundary(*i))
                                .unwrap_or(0);
                            text.push_str(&line[..cut]);
                            pending = line[cut..].to_string();
                        }
                        file.push(&text);
                    }
                }
                pass(&mut new, &file, &rules, cap);
                pass_records(&mut old, &file, cap);
                let ctx = || format!("seed {seed} op {op} rules {rules:?}");
                assert_eq!(new.position(&rules, cap).offset, old.offset, "{}", ctx());
                assert_eq!(
                    new.watch().evaluate(&rules),
                    stop::evaluate(&rules, &old.records),
                    "{}\nwindow {:?}",
                    ctx(),
                    old.records
                );
                assert_eq!(
                    render(new.watch().last()),
                    render(old.records.last()),
                    "{}",
                    ctx()
                );
                if let Some(s) = stop::evaluate(&rules, &old.records) {
                    let kind = ["max_steps", "did not improve", "reached", " is "]
                        .iter()
                        .position(|k| s.why.contains(k));
                    kinds.insert(kind);
                    stops += 1;
                }
            }
        }
        // Not a comparison of two Nones: the rules stop often (a third of the passes).
        assert!(stops > 300 * 80 / 5, "{stops} stops");
        // Every kind of stop: max_steps, patience, threshold, divergence.
        assert_eq!(kinds, (0..4).map(Some).collect(), "{stops} stops");
    }

    #[test]
    fn reads_on_from_its_offset_and_starts_over_when_the_file_changes() {
        let rules = [rule("val", MetricMode::Max)];
        let cap = 1 << 20;
        let mut c = MetricsCursor::default();
        let first = "{\"step\": 1}\n{\"step\": 2}\n{\"st";
        c.advance(&read(Some(7), 0, first), &rules, cap);
        assert_eq!(last_step(&c), Some(2.0));
        assert_eq!(c.position(&rules, cap).offset, 24);
        // The next read starts at the newline before the offset; the half line is whole.
        let at = c.position(&rules, cap);
        assert!(resumes(&at, &read(Some(7), 23, "\n{\"step\": 3}\n")));
        c.advance(&read(Some(7), 23, "\n{\"step\": 3}\n"), &rules, cap);
        assert_eq!(last_step(&c), Some(3.0));
        assert_eq!(c.position(&rules, cap).offset, 36);
        // Nothing new.
        c.advance(&read(Some(7), 35, "\n"), &rules, cap);
        assert_eq!(last_step(&c), Some(3.0));
        // Truncated and rewritten past the offset: the byte there is no newline, so
        // the tail is read instead, and a new window starts.
        let at = c.position(&rules, cap);
        assert!(!resumes(&at, &read(Some(7), 35, "9}\n")));
        c.advance(
            &read(Some(7), 0, "{\"step\": 1}\n{\"step\": 9}\n"),
            &rules,
            cap,
        );
        assert_eq!(last_step(&c), Some(9.0));
        assert_eq!(c.position(&rules, cap).offset, 24);
        // Rotated: another file, read from its tail (a cut first line skipped).
        let at = c.position(&rules, cap);
        assert!(!resumes(&at, &read(Some(8), 23, "\n{\"step\": 5}\n")));
        c.advance(
            &read(Some(8), 100, "p\": 41}\n{\"step\": 42}\n"),
            &rules,
            cap,
        );
        assert_eq!(last_step(&c), Some(42.0));
        assert_eq!(c.position(&rules, cap).offset, 100 + 21);
        // Rules naming a metric this window does not keep: read the tail again.
        let more = [rule("val", MetricMode::Max), rule("loss", MetricMode::Min)];
        assert_eq!(c.position(&more, cap), Position::default());
        assert_eq!(c.position(&rules, 1 << 10), Position::default());
    }

    #[test]
    fn the_window_keeps_the_newest_lines_within_its_cap() {
        // Patience 2 on a series that only falls: the window's best is its oldest.
        let rules = [StopRule {
            patience: Some(2),
            ..rule("v", MetricMode::Max)
        }];
        let line = |i: i32| format!("{{\"step\":{i},\"v\":{}}}\n", 100 - i);
        let size = line(0).len();
        let mut c = MetricsCursor::default();
        let text: String = (0..10).map(line).collect();
        c.advance(&read(Some(1), 0, &text), &rules, size * 3);
        let stop = c.watch().evaluate(&rules).expect("stops");
        assert_eq!(
            stop.why,
            "v did not improve for 2 evaluations (best 93 at step 7)"
        );
        let start = text.len() as u64 - 1;
        c.advance(
            &read(Some(1), start, &format!("\n{}", line(10))),
            &rules,
            size * 3,
        );
        let stop = c.watch().evaluate(&rules).expect("stops");
        assert_eq!(
            stop.why,
            "v did not improve for 2 evaluations (best 92 at step 8)"
        );
    }

    /// A restart keeps no cursor: the window is built again from the file's tail, and
    /// decides as the whole tail's records do.
    #[test]
    fn after_a_restart_the_tail_rebuilds_the_state() {
        let rules = [StopRule {
            patience: Some(5),
            threshold: Some(0.95),
            ..rule("val", MetricMode::Max)
        }];
        let cap = 4096;
        let mut file = File::new(3);
        let mut c = MetricsCursor::default();
        for i in 0..400 {
            let v = if i == 150 {
                0.9
            } else {
                0.5 + (i % 7) as f64 / 100.0
            };
            file.push(&format!("{{\"step\": {i}, \"val\": {v}, \"loss\": 1}}\n"));
            pass(&mut c, &file, &rules, cap);
        }
        let mut restarted = MetricsCursor::default();
        pass(&mut restarted, &file, &rules, cap);
        let tail = file.since(0, None, cap);
        let whole = stop::evaluate(&rules, &stop::parse_metrics(&tail.text));
        assert!(whole.is_some());
        assert_eq!(restarted.watch().evaluate(&rules), whole);
        assert_eq!(c.watch().evaluate(&rules), whole);
    }

    /// A line longer than a read (100 MB here) neither stalls the cursor (before, it
    /// read the same first 256 KiB of it every pass and never saw a line after it)
    /// nor costs more than a read; the records after it count again, in the same
    /// window as the ones before it.
    #[test]
    fn a_line_of_100_mb_neither_stalls_nor_costs_memory() {
        let rules = [StopRule {
            threshold: Some(0.9),
            ..rule("val", MetricMode::Max)
        }];
        let cap = 256 * 1024;
        let mut file = File::new(5);
        file.push("{\"step\": 1, \"val\": 0.5}\n{\"step\": 2, \"val\": 0.6, \"x\": \"");
        let mut c = MetricsCursor::default();
        pass(&mut c, &file, &rules, cap);
        assert_eq!(last_step(&c), Some(1.0));
        // Being written: each pass skips what came of it.
        for _ in 0..50 {
            file.pieces.push(Piece::Repeat(b'a', 2 << 20));
            pass(&mut c, &file, &rules, cap);
        }
        file.pieces.push(Piece::Repeat(b'b', 3 << 20));
        file.push("\"}\n{\"step\": 3, \"val\": 0.95}\n");
        let mut passes = 0;
        while last_step(&c) != Some(3.0) {
            pass(&mut c, &file, &rules, cap);
            passes += 1;
            assert!(passes <= 2, "stalled at {:?}", c.position(&rules, cap));
        }
        assert_eq!(c.position(&rules, cap).offset, file.len());
        assert_eq!(
            c.watch().evaluate(&rules).map(|s| s.why),
            Some("val reached 0.9 (0.95 at step 3)".to_string())
        );
        // Still the same window: the records before the long line count.
        file.push("{\"step\": 4, \"val\": 0.1}\n");
        pass(&mut c, &file, &rules, cap);
        assert_eq!(last_step(&c), Some(4.0));
        assert_eq!(c.watch().evaluate(&rules), None);
        // A restart inside such a line: its tail has no newline, and it is skipped too.
        let mut file = File::new(6);
        file.push("{\"step\": 1, \"val\": 0.5}\n{\"x\": \"");
        file.pieces.push(Piece::Repeat(b'a', 10 << 20));
        let mut c = MetricsCursor::default();
        pass(&mut c, &file, &rules, cap);
        assert_eq!(c.position(&rules, cap), Position::default());
        assert_eq!(c.watch().last(), None);
        file.push("\"}\n{\"step\": 2, \"val\": 0.7}\n");
        pass(&mut c, &file, &rules, cap);
        assert_eq!(last_step(&c), Some(2.0));
    }

    /// A million distinct metric names, 256 KiB lines: the state keeps the rules'
    /// metrics and `step`, and a bounded part of the last record.
    #[test]
    fn a_million_metric_names_keep_what_the_rules_need() {
        let rules = [StopRule {
            patience: Some(1000),
            ..rule("val", MetricMode::Min)
        }];
        let cap = 256 * 1024;
        let mut file = File::new(9);
        let mut c = MetricsCursor::default();
        let mut names = 0;
        let mut step = 0;
        while names < 1_000_000 {
            let mut line = format!("{{\"step\": {step}, \"val\": {step}");
            while line.len() < cap - 100 {
                line.push_str(&format!(", \"metric_{names}\": 1"));
                names += 1;
            }
            line.push_str("}\n");
            file.push(&line);
            step += 1;
            pass(&mut c, &file, &rules, cap);
        }
        let watch = c.watch();
        let last = watch.last().expect("a last record");
        assert_eq!(last.get("step"), Some(&((step - 1) as f64)));
        assert!(last.len() <= LAST_FIELDS + 2, "{} fields kept", last.len());
        // A rising series under `min` keeps each value of the window as a candidate for
        // the best; the window holds one such line.
        assert!(watch.entries() <= 1, "{} entries", watch.entries());
    }
}
