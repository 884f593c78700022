//! `asimov get jobs|runs|fleets|budgets [NAME] [-o table|wide|json|yaml]`.

use super::args::{Kind, Output};
use super::render::{RunView, RunsTable};
use super::{CliResult, fail};
use crate::home::Home;
use crate::store::{Fields, ListError, Listing, RunError, RunRecord, Store, StoreError};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

pub fn run(home: &Home, kind: Kind, name: Option<&str>, output: Output) -> CliResult {
    match kind {
        Kind::Runs => runs(home, name, output),
        Kind::Jobs => jobs(home, name, output),
        Kind::Fleets => fleets(home, name, output),
        Kind::Budgets => budgets(home, name, output),
    }
}

/// Which runs `get runs [NAME]` lists: NAME is a run, or else a job.
fn listing<'a>(store: &Store, name: Option<&'a str>) -> Result<Listing<'a>, super::CliError> {
    let Some(n) = name else {
        return Ok(Listing::All);
    };
    for which in [Listing::Run(n), Listing::Job(n)] {
        if store.count_runs(which)? > 0 {
            return Ok(which);
        }
    }
    Err(fail(format!("no run or job named {n:?}")))
}

/// `{"items": [...]}` for YAML, each run serialized as its row is read (no list in
/// between).
#[derive(serde::Serialize)]
struct RunList<'a> {
    items: StreamedRuns<'a>,
}

struct StreamedRuns<'a> {
    store: &'a Store,
    which: Listing<'a>,
    errors: &'a BTreeMap<String, RunError>,
    /// The time costs so far are derived at.
    now: crate::model::Timestamp,
    /// A store error met while serializing, to return as itself rather than as text.
    failed: RefCell<Option<StoreError>>,
}

impl serde::Serialize for StreamedRuns<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = serializer.serialize_seq(None)?;
        let listed = self.store.list_runs(self.which, Fields::All, |run| {
            seq.serialize_element(&RunView::listed(&run, self.errors.get(run.name), self.now))
        });
        match listed {
            Ok(()) => seq.end(),
            Err(ListError::Callback(e)) => Err(e),
            Err(ListError::Store(e)) => {
                let message = e.to_string();
                *self.failed.borrow_mut() = Some(e);
                Err(S::Error::custom(message))
            }
        }
    }
}

fn list_error(e: ListError<std::convert::Infallible>) -> StoreError {
    match e {
        ListError::Store(e) => e,
        ListError::Callback(never) => match never {},
    }
}

fn runs(home: &Home, name: Option<&str>, output: Output) -> CliResult {
    // Before any store exists, every listing is empty (a name included, as before).
    let Some(store) = open_store(home)? else {
        return empty_runs(output);
    };
    let which = listing(&store, name)?;
    let errors = store.run_errors()?;
    if store.any_unfinished_run(which)?
        && let Some(note) = super::daemon::absence(home, Some(&store))
    {
        eprintln!("warning: {note}");
    }
    let now = super::now();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    match output {
        Output::Table | Output::Wide => {
            // Column widths depend on every row, so the table is built before it is
            // written; its cells go into one buffer.
            let wide = output == Output::Wide;
            let mut table = RunsTable::new(wide, now);
            if wide {
                table = table.with_metrics(store.metric_values()?);
            }
            let fields = if wide { Fields::All } else { Fields::Table };
            store
                .list_runs(which, fields, |run| {
                    table.push(&run, errors.get(run.name));
                    Ok(())
                })
                .map_err(list_error)?;
            if table.is_empty() {
                writeln!(out, "No runs.")?;
            } else {
                table.write(&mut out)?;
            }
        }
        Output::Json => {
            // `{"items": [...]}` as serde_json's pretty printer lays it out, each run's
            // object (kept rendered by the store, `store::listing`) completed into one
            // buffer as its row is read, written out when it fills.
            const FLUSH_AT: usize = 1 << 16;
            let mut buf: Vec<u8> = Vec::with_capacity(FLUSH_AT + 4096);
            buf.extend_from_slice(b"{\n  \"items\": [");
            let mut first = true;
            store
                .list_runs_json(which, |run| {
                    buf.extend_from_slice(if first { b"\n    " } else { b",\n    " });
                    first = false;
                    run.write_into(&mut buf, errors.get(run.name), now)?;
                    if buf.len() >= FLUSH_AT {
                        out.write_all(&buf)?;
                        buf.clear();
                    }
                    Ok::<_, std::io::Error>(())
                })
                .map_err(|e| match e {
                    ListError::Store(e) => super::CliError::from(e),
                    ListError::Callback(e) => super::CliError::from(e),
                })?;
            if !first {
                buf.extend_from_slice(b"\n  ");
            }
            buf.extend_from_slice(b"]\n}\n");
            out.write_all(&buf)?;
        }
        Output::Yaml => {
            let list = RunList {
                items: StreamedRuns {
                    store: &store,
                    which,
                    errors: &errors,
                    now,
                    failed: RefCell::new(None),
                },
            };
            let written = serde_yaml::to_writer(&mut out, &list).map_err(super::CliError::from);
            if let Some(e) = list.items.failed.take() {
                return Err(e.into());
            }
            written?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `get runs` before anything was ever recorded.
fn empty_runs(output: Output) -> CliResult {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Table | Output::Wide => writeln!(out, "No runs.")?,
        Output::Json => writeln!(out, "{{\n  \"items\": []\n}}")?,
        Output::Yaml => writeln!(out, "items: []")?,
    }
    Ok(ExitCode::SUCCESS)
}

fn write_structured(output: Output, value: &serde_json::Value) -> CliResult {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Yaml => write!(out, "{}", serde_yaml::to_string(value)?)?,
        _ => writeln!(out, "{}", serde_json::to_string_pretty(value)?)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn open_store(home: &Home) -> Result<Option<Store>, super::CliError> {
    if !home.database().exists() {
        return Ok(None);
    }
    super::read_store(home)
}

fn phase_counts(runs: &[RunRecord]) -> std::collections::BTreeMap<&'static str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for run in runs {
        *counts.entry(run.phase.as_str()).or_insert(0) += 1;
    }
    counts
}

/// Where an object came from: `file:line`, with the folder's commit when it has one.
fn source_cell(view: &super::desired::View, file: &std::path::Path, line: usize) -> String {
    let commit = view
        .source
        .as_ref()
        .and_then(|s| s.commit.as_deref())
        .map(|c| format!(" @{}", c.chars().take(8).collect::<String>()))
        .unwrap_or_default();
    format!("{}:{line}{commit}", file.display())
}

fn problem_json(p: &crate::store::DesiredProblem) -> serde_json::Value {
    serde_json::json!({
        "file": p.file, "line": p.line, "column": p.column, "message": p.message,
        "since": super::render::rfc3339(p.since),
    })
}

/// Stderr notes every reader of the desired state gives: the watched folder's broken
/// files, and no controller watching.
pub(super) fn warn_state(home: &Home, store: Option<&Store>, view: Option<&super::desired::View>) {
    if let Some(v) = view {
        super::desired::warn_problems(v);
    }
    let anything = view.is_some_and(|v| !v.loaded.documents.is_empty())
        || store.is_some_and(|s| s.any_unfinished_run(Listing::All).unwrap_or(false));
    if anything && let Some(note) = super::daemon::absence(home, store) {
        eprintln!("warning: {note}");
    }
}

pub(super) fn jobs(home: &Home, name: Option<&str>, output: Output) -> CliResult {
    let store = open_store(home)?;
    let view = super::desired::view(home, store.as_ref())?;
    let mut items = Vec::new();
    let wide = output == Output::Wide;
    let mut header = vec!["NAME", "RUNS", "PHASES", "PLACEMENT", "COST"];
    if wide {
        header.push("SOURCE");
    }
    let mut table = super::render::new_table(&header);
    for job in view
        .loaded
        .manifests
        .jobs
        .iter()
        .filter(|j| name.is_none_or(|n| n == j.name))
    {
        let runs = match &store {
            Some(s) => s.runs_of_job(&job.name)?,
            None => Vec::new(),
        };
        let counts = phase_counts(&runs);
        let now = super::now();
        let cost = runs
            .iter()
            .map(|r| r.cost_at(now))
            .sum::<crate::model::Usd>()
            .dollars();
        let placement: Vec<String> = job
            .spec
            .placement
            .iter()
            .map(|p| match &p.fleet {
                Some(f) => format!("{}:{f}", p.provider),
                None => p.provider.to_string(),
            })
            .collect();
        let phases: Vec<String> = counts.iter().map(|(p, n)| format!("{n} {p}")).collect();
        let problem = view.problem_of(&job.origin.file);
        let mut row = vec![
            job.name.clone(),
            job.runs.len().to_string(),
            if phases.is_empty() {
                "-".into()
            } else {
                phases.join(", ")
            },
            placement.join(" → "),
            format!("${cost:.2}"),
        ];
        if wide {
            let mut cell = source_cell(&view, &job.origin.file, job.origin.line);
            if problem.is_some() {
                cell.push_str(" (does not validate; last good state)");
            }
            row.push(cell);
        }
        table.add_row(row);
        items.push(serde_json::json!({
            "name": job.name, "labels": job.labels, "runs": job.runs.iter().map(|r| &r.name).collect::<Vec<_>>(),
            "phases": counts, "placement": placement, "cost_usd": cost, "spec_hash": job.spec_hash,
            "source": {
                "file": job.origin.file, "line": job.origin.line,
                "folder": view.folder(home),
                "commit": view.source.as_ref().and_then(|s| s.commit.clone()),
            },
            "problem": problem.map(problem_json),
        }));
    }
    warn_state(home, store.as_ref(), Some(&view));
    if let (Some(n), true) = (name, items.is_empty()) {
        return Err(fail(format!("no job named {n:?}")));
    }
    match output {
        Output::Table | Output::Wide if items.is_empty() => println!("No jobs."),
        Output::Table | Output::Wide => println!("{table}"),
        _ => {
            let problems: Vec<serde_json::Value> = view.problems.iter().map(problem_json).collect();
            return write_structured(
                output,
                &serde_json::json!({ "items": items, "problems": problems }),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Run names for the ownership tags a host reports (tags asimov did not write as is).
fn run_names(tags: &[String]) -> Vec<String> {
    tags.iter()
        .map(|t| crate::model::OwnerTag::parse(t).map_or_else(|| t.clone(), |tag| tag.run))
        .collect()
}

pub(super) fn fleets(home: &Home, name: Option<&str>, output: Output) -> CliResult {
    let store = open_store(home)?;
    let view = super::desired::view(home, store.as_ref())?;
    warn_state(home, store.as_ref(), Some(&view));
    let current = view.loaded;
    let mut items = Vec::new();
    let mut table = super::render::new_table(&[
        "FLEET",
        "HOST",
        "ADDRESS",
        "REACHABLE",
        "STATE",
        "GPUS",
        "RUNNING",
        "CHECKED",
    ]);
    let now = super::now();
    for fleet in current
        .manifests
        .fleets
        .iter()
        .filter(|f| name.is_none_or(|n| n == f.name))
    {
        let records = match &store {
            Some(s) => s.hosts(Some(&fleet.name))?,
            None => Vec::new(),
        };
        let mut hosts = Vec::new();
        for host in &fleet.hosts {
            let rec = records.iter().find(|r| r.host == host.name);
            let address = format!("{}:{}", host.address, host.port);
            let (reachable, state, gpus, running, checked) = match rec {
                Some(r) => (
                    if r.reachable { "yes" } else { "no" }.to_string(),
                    if r.busy { "busy" } else { "free" }.to_string(),
                    format!("{}/{} free", r.gpus_free, r.gpus_total),
                    if r.running.is_empty() {
                        "-".into()
                    } else {
                        run_names(&r.running).join(",")
                    },
                    format!("{} ago", super::render::age(now - r.checked_at)),
                ),
                None => (
                    "?".into(),
                    "unknown".into(),
                    format!("{} declared", host.gpus),
                    "-".into(),
                    "never".into(),
                ),
            };
            table.add_row(vec![
                fleet.name.clone(),
                host.name.clone(),
                address.clone(),
                reachable,
                state,
                gpus,
                running,
                checked,
            ]);
            hosts.push(serde_json::json!({
                "name": host.name, "address": host.address, "port": host.port, "user": host.user,
                "gpus_declared": host.gpus, "labels": host.labels,
                "reachable": rec.map(|r| r.reachable), "busy": rec.map(|r| r.busy),
                "gpus_total": rec.map(|r| r.gpus_total), "gpus_free": rec.map(|r| r.gpus_free),
                "gpu_names": rec.map(|r| r.gpu_names.clone()), "running": rec.map(|r| run_names(&r.running)),
                "message": rec.map(|r| r.message.clone().unwrap_or_default()),
                "checked_at": rec.map(|r| super::render::rfc3339(r.checked_at)),
            }));
        }
        items.push(
            serde_json::json!({ "name": fleet.name, "labels": fleet.labels, "hosts": hosts }),
        );
    }
    if let (Some(n), true) = (name, items.is_empty()) {
        return Err(fail(format!("no fleet named {n:?}")));
    }
    match output {
        Output::Table | Output::Wide if items.is_empty() => println!("No fleets."),
        Output::Table | Output::Wide => println!("{table}"),
        _ => return write_structured(output, &serde_json::json!({ "items": items })),
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn budgets(home: &Home, name: Option<&str>, output: Output) -> CliResult {
    use crate::reconcile::budget;
    let store = open_store(home)?;
    let view = super::desired::view(home, store.as_ref())?;
    warn_state(home, store.as_ref(), Some(&view));
    let current = view.loaded;
    let now = super::now();
    let mut items = Vec::new();
    let mut table =
        super::render::new_table(&["NAME", "LIMIT", "PERIOD", "SPENT", "ACTION", "JOBS"]);
    for b in current
        .manifests
        .budgets
        .iter()
        .filter(|b| name.is_none_or(|n| n == b.name))
    {
        let jobs = budget::jobs_of(b, &current.manifests.jobs);
        let since = budget::window_start(b, now);
        let spent = match &store {
            Some(s) => s.spent(&jobs, since)?,
            None => crate::model::Usd::ZERO,
        };
        let period = b
            .period
            .map(|p| humantime::format_duration(p).to_string())
            .unwrap_or_else(|| "forever".into());
        let action = match b.action {
            crate::manifest::BudgetAction::Block => "block",
            crate::manifest::BudgetAction::Stop => "stop",
        };
        table.add_row(vec![
            b.name.clone(),
            format!("${:.2}", b.limit_usd),
            period.clone(),
            spent.to_string(),
            action.to_string(),
            if jobs.is_empty() {
                "-".into()
            } else {
                jobs.join(",")
            },
        ]);
        items.push(serde_json::json!({
            "name": b.name, "limit_usd": b.limit_usd, "period": period, "spent_usd": spent,
            "action": action, "jobs": jobs, "over_limit": spent >= crate::model::Usd::from_dollars(b.limit_usd),
        }));
    }
    if let (Some(n), true) = (name, items.is_empty()) {
        return Err(fail(format!("no budget named {n:?}")));
    }
    match output {
        Output::Table | Output::Wide if items.is_empty() => println!("No budgets."),
        Output::Table | Output::Wide => println!("{table}"),
        _ => return write_structured(output, &serde_json::json!({ "items": items })),
    }
    Ok(ExitCode::SUCCESS)
}
