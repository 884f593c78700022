//! Reading a running job's metrics file a piece at a time: each attempt keeps the byte
//! offset it has read up to (always just after a newline) and the records of its last
//! [`METRICS_TAIL`](super::controller::METRICS_TAIL) bytes, so a pass reads and parses
//! only what the job wrote since the last one. The `stop_when` rules and the METRIC
//! column see the same window a full re-read of the tail would give.
//!
//! A read resumes only when the file is the same (its inode) and the byte before the
//! offset is still the newline it was; otherwise (the file truncated, rotated or
//! replaced, a controller restart with no cursor yet) the window starts again from the
//! file's tail. No cursor survives a restart: the first pass after one reads the tail.

use super::stop::{Record, parse_metrics};
use crate::agent::MetricsRead;
use std::collections::VecDeque;
use std::sync::Arc;

/// One attempt's place in its metrics file.
#[derive(Debug, Default)]
pub struct MetricsCursor {
    /// The file's identity (inode) when last read.
    file: Option<u64>,
    /// Bytes of the file read and parsed: the end of the last complete line.
    offset: u64,
    /// The records of the window, oldest first, shared with the pass's observations.
    records: Arc<Vec<Record>>,
    /// The bytes of each record's line in the window (for its cap).
    sizes: VecDeque<usize>,
    bytes: usize,
}

impl MetricsCursor {
    /// Where the next read starts.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The window's records.
    pub fn records(&self) -> Arc<Vec<Record>> {
        Arc::clone(&self.records)
    }

    /// The file's identity when last read.
    pub fn file(&self) -> Option<u64> {
        self.file
    }

    /// Takes in what a read returned, keeping at most `cap` bytes of lines in the
    /// window: the lines after the offset when the read [`resumes`] it, else (a read
    /// of the file's tail) a new window.
    pub fn advance(&mut self, read: &MetricsRead, cap: usize) {
        let (body, base) = if resumes(self.file, self.offset, read) {
            (&read.text[1..], self.offset)
        } else {
            self.sizes.clear();
            self.bytes = 0;
            Arc::make_mut(&mut self.records).clear();
            (read.text.as_str(), read.start)
        };
        // Complete lines only: a half-written last line is read whole next time.
        let end = body.rfind('\n').map_or(0, |i| i + 1);
        let records = Arc::make_mut(&mut self.records);
        for line in body[..end].split_inclusive('\n') {
            if let Some(record) = parse_metrics(line).pop() {
                records.push(record);
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
        records.drain(..drop);
        self.offset = base + end as u64;
        self.file = read.file;
    }
}

/// True when `read`, asked from `offset` of the file `file`, goes on where the last one
/// ended: the same file, starting at the newline just before the offset. When not (and
/// the offset was not 0), the file changed under it: read its tail instead.
pub fn resumes(file: Option<u64>, offset: u64, read: &MetricsRead) -> bool {
    read.file.is_some()
        && read.file == file
        && offset > 0
        && read.start + 1 == offset
        && read.text.starts_with('\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(file: Option<u64>, start: u64, text: &str) -> MetricsRead {
        MetricsRead {
            file,
            start,
            text: text.to_string(),
        }
    }

    fn steps(c: &MetricsCursor) -> Vec<f64> {
        c.records().iter().map(|r| r["step"]).collect()
    }

    #[test]
    fn reads_on_from_its_offset_and_starts_over_when_the_file_changes() {
        let mut c = MetricsCursor::default();
        let first = "{\"step\": 1}\n{\"step\": 2}\n{\"st";
        c.advance(&read(Some(7), 0, first), 1 << 20);
        assert_eq!(steps(&c), [1.0, 2.0]);
        assert_eq!(c.offset(), 24);
        // The next read starts at the newline before the offset; the half line is whole.
        c.advance(&read(Some(7), 23, "\n{\"step\": 3}\n"), 1 << 20);
        assert_eq!(steps(&c), [1.0, 2.0, 3.0]);
        assert_eq!(c.offset(), 36);
        // Nothing new.
        c.advance(&read(Some(7), 35, "\n"), 1 << 20);
        assert_eq!(steps(&c), [1.0, 2.0, 3.0]);
        // Truncated and rewritten past the offset: the byte there is no newline, so
        // the tail is read instead, and a new window starts.
        assert!(!resumes(c.file(), c.offset(), &read(Some(7), 35, "9}\n")));
        c.advance(&read(Some(7), 0, "{\"step\": 1}\n{\"step\": 9}\n"), 1 << 20);
        assert_eq!(steps(&c), [1.0, 9.0]);
        assert_eq!(c.offset(), 24);
        // Rotated: another file, read from its tail (a cut first line skipped).
        let rotated = read(Some(8), 23, "\n{\"step\": 5}\n");
        assert!(!resumes(c.file(), c.offset(), &rotated));
        c.advance(&read(Some(8), 100, "p\": 41}\n{\"step\": 42}\n"), 1 << 20);
        assert_eq!(steps(&c), [42.0]);
        assert_eq!(c.offset(), 100 + 21);
    }

    #[test]
    fn the_window_keeps_the_newest_lines_within_its_cap() {
        let mut c = MetricsCursor::default();
        let text: String = (0..10).map(|i| format!("{{\"step\": {i}}}\n")).collect();
        c.advance(&read(Some(1), 0, &text), 12 * 3);
        assert_eq!(steps(&c), [7.0, 8.0, 9.0]);
        c.advance(&read(Some(1), 119, "\n{\"step\": 10}\n"), 12 * 3);
        assert_eq!(steps(&c), [9.0, 10.0]);
    }
}
