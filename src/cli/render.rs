//! Rendering of store records for people (tables) and scripts (JSON, YAML). The JSON
//! shape of a run is a documented contract (README "Output for scripts"): fields are
//! only ever added, never renamed or removed.

use crate::model::Timestamp;
use crate::store::{RunError, RunRecord};
use comfy_table::{Table, presets};
use serde::Serialize;
use std::collections::BTreeMap;

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
    pub matrix: &'a std::collections::BTreeMap<String, String>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The last failure of any of the run's steps (create, start, setup, ...), kept until
    /// that work goes through.
    pub last_error: Option<ErrorView<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ErrorView<'a> {
    pub step: &'a str,
    pub message: &'a str,
    pub at: String,
}

#[derive(Debug, Serialize)]
pub struct ProgressView {
    pub done: u64,
    pub total: Option<u64>,
    pub fraction: Option<f64>,
}

impl<'a> RunView<'a> {
    /// The run as of `now` (its cost so far is derived at `now`).
    pub fn of(run: &'a RunRecord, error: Option<&'a RunError>, now: Timestamp) -> Self {
        RunView {
            name: &run.name,
            job: &run.job,
            phase: run.phase.as_str(),
            reason: &run.reason,
            provider: run.provider.map(|p| p.as_str()),
            instance_id: run.instance_id.as_deref(),
            host: run.host.as_deref(),
            gpu: run.gpu.as_deref(),
            price_per_hour: run.price_per_hour.map(|p| p.dollars()),
            cost_usd: round_cents(run.cost_at(now).dollars()),
            progress: run.progress_done.map(|done| ProgressView {
                done,
                total: run.progress_total,
                fraction: run
                    .progress_total
                    .filter(|t| *t > 0)
                    .map(|t| done as f64 / t as f64),
            }),
            attempt: run.attempt,
            repository: run.repository.as_deref(),
            commit: run.commit.as_deref(),
            commit_message: run.commit_message.as_deref(),
            author: run.author.as_deref(),
            dirty: run.dirty,
            exit_code: run.exit_code,
            matrix: &run.matrix,
            created_at: rfc3339(run.created_at),
            started_at: run.started_at.map(rfc3339),
            finished_at: run.finished_at.map(rfc3339),
            last_error: error.map(|e| ErrorView {
                step: &e.step,
                message: &e.message,
                at: rfc3339(e.at),
            }),
        }
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

/// The reason of a run as a table shows it: with the last error of its steps, if any.
pub fn reason_cell(run: &RunRecord, error: Option<&RunError>) -> String {
    match error {
        // "failed with exit code 3" says less than the step that failed.
        Some(e) if e.step == "setup" && run.phase.is_terminal() => e.message.clone(),
        Some(e) if !run.reason.contains(&e.message) => {
            format!("{}; last error ({}): {}", run.reason, e.step, e.message)
        }
        _ => run.reason.clone(),
    }
}

pub fn rfc3339(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

/// "3m", "2h5m", "4d1h": how long ago or how long, for tables.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(header.to_vec());
    table
}

fn progress_cell(run: &RunRecord) -> String {
    match (run.progress_done, run.progress_total) {
        (Some(d), Some(t)) if t > 0 => format!("{}%", (d * 100 / t).min(100)),
        (Some(d), _) => d.to_string(),
        _ => "-".into(),
    }
}

fn short_commit(run: &RunRecord) -> String {
    match &run.commit {
        Some(c) => {
            let short: String = c.chars().take(8).collect();
            if run.dirty {
                format!("{short}+dirty")
            } else {
                short
            }
        }
        None => "-".into(),
    }
}

fn dash(v: Option<&str>) -> &str {
    v.unwrap_or("-")
}

/// A plain table of left-aligned columns separated by two spaces, header first. The
/// runs table goes through this rather than `comfy_table`: with 10,000 runs the general
/// renderer alone took longer than the whole 50 ms budget of `get runs`.
pub struct Columns {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Columns {
    pub fn new(header: &[&'static str]) -> Columns {
        Columns {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub fn write(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut line = String::with_capacity(widths.iter().sum::<usize>() + 2 * widths.len());
        let mut emit = |cells: &mut dyn Iterator<Item = &str>| -> std::io::Result<()> {
            line.clear();
            for (i, cell) in cells.enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < widths.len() {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.write_all(line.trim_end().as_bytes())?;
            out.write_all(b"\n")
        };
        emit(&mut self.header.iter().copied())?;
        for row in &self.rows {
            emit(&mut row.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

/// The `get runs` table; `wide` adds placement, money and code columns.
pub fn runs_table(
    runs: &[RunRecord],
    errors: &BTreeMap<String, RunError>,
    wide: bool,
    now: Timestamp,
) -> Columns {
    let mut table = if wide {
        Columns::new(&[
            "NAME", "JOB", "PHASE", "PROGRESS", "ATTEMPT", "PROVIDER", "INSTANCE", "HOST", "GPU",
            "$/H", "COST", "COMMIT", "MESSAGE", "EXIT", "AGE", "REASON",
        ])
    } else {
        Columns::new(&[
            "NAME", "PHASE", "PROGRESS", "PROVIDER", "COST", "COMMIT", "AGE", "REASON",
        ])
    };
    for run in runs {
        let provider = run.provider.map(|p| p.as_str()).unwrap_or("-").to_string();
        let cost = run.cost_at(now).to_string();
        let reason = reason_cell(run, errors.get(&run.name));
        let age_cell = age(now - run.created_at);
        if wide {
            table.push(vec![
                run.name.clone(),
                run.job.clone(),
                run.phase.as_str().to_string(),
                progress_cell(run),
                run.attempt.to_string(),
                provider,
                dash(run.instance_id.as_deref()).to_string(),
                dash(run.host.as_deref()).to_string(),
                dash(run.gpu.as_deref()).to_string(),
                run.price_per_hour
                    .map(|p| format!("{:.3}", p.dollars()))
                    .unwrap_or_else(|| "-".into()),
                cost,
                short_commit(run),
                dash(run.commit_message.as_deref()).to_string(),
                run.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                age_cell,
                reason,
            ]);
        } else {
            table.push(vec![
                run.name.clone(),
                run.phase.as_str().to_string(),
                progress_cell(run),
                provider,
                cost,
                short_commit(run),
                age_cell,
                reason,
            ]);
        }
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
    fn ages_read_naturally() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m");
        assert_eq!(age(3600 * 2 + 300), "2h5m");
        assert_eq!(age(86_400 * 4 + 3600), "4d1h");
        assert_eq!(age(-3), "0s");
    }
}
