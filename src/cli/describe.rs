//! `asimov describe job|run|fleet|budget NAME`: one object's spec, status and events,
//! for people.

use super::args::{Kind, Output};
use super::render::{age, new_table, rfc3339, runs_table};
use super::{CliResult, desired, fail, get};
use crate::home::Home;
use crate::store::{Event, Store};
use std::process::ExitCode;

pub fn run(home: &Home, kind: Kind, name: &str) -> CliResult {
    match kind {
        Kind::Jobs => job(home, name),
        Kind::Runs => run_detail(home, name),
        Kind::Fleets => get::fleets(home, Some(name), Output::Table),
        Kind::Budgets => get::budgets(home, Some(name), Output::Table),
    }
}

fn store(home: &Home) -> Result<Option<Store>, super::CliError> {
    if !home.database().exists() {
        return Ok(None);
    }
    super::read_store(home)
}

fn print_events(events: &[Event]) {
    println!("Events:");
    if events.is_empty() {
        println!("  none");
        return;
    }
    let now = super::now();
    let mut table = new_table(&["AGE", "OBJECT", "REASON", "MESSAGE"]);
    for e in events {
        table.add_row(vec![
            age(now - e.at),
            format!("{}/{}", e.object_kind, e.object_name),
            e.reason.clone(),
            e.message.clone(),
        ]);
    }
    for line in table.to_string().lines() {
        println!("  {line}");
    }
}

fn job(home: &Home, name: &str) -> CliResult {
    let store = store(home)?;
    let view = desired::view(home, store.as_ref())?;
    let doc = view
        .loaded
        .documents
        .iter()
        .find(|d| d.kind == crate::manifest::Kind::Job && d.name == name);
    let runs = match &store {
        Some(s) => s.runs_of_job(name)?,
        None => Vec::new(),
    };
    let errors = match &store {
        Some(s) => s.run_errors()?,
        None => Default::default(),
    };
    get::warn_state(home, store.as_ref(), Some(&view));
    let Some(doc) = doc else {
        if runs.is_empty() {
            return Err(fail(format!("no job named {name:?}")));
        }
        println!(
            "Job {name} is not in the desired state (the manifests in {}); its runs are being torn down.",
            view.folder(home).display()
        );
        runs_table(&runs, &errors, true, super::now()).write(&mut std::io::stdout())?;
        return Ok(ExitCode::SUCCESS);
    };
    println!("Name:      {name}");
    let folder = view.folder(home);
    match view.source.as_ref().and_then(|s| s.commit.as_deref()) {
        Some(commit) => println!("Source:    {} at commit {commit}", folder.display()),
        None => println!("Source:    {}", folder.display()),
    }
    println!(
        "Manifest:  {}:{}",
        doc.origin.file.display(),
        doc.origin.line
    );
    if let Some(p) = view.problem_of(&doc.origin.file) {
        println!("Problem:   {}", desired::describe_problem(p, super::now()));
        println!(
            "           the file does not validate; this job keeps its last good state, shown below"
        );
    }
    println!("Spec:");
    for line in doc.yaml.lines() {
        println!("  {line}");
    }
    println!("Runs:");
    if runs.is_empty() {
        println!("  none yet");
    } else {
        let mut text = Vec::new();
        runs_table(&runs, &errors, true, super::now()).write(&mut text)?;
        for line in String::from_utf8_lossy(&text).lines() {
            println!("  {line}");
        }
    }
    let mut events = Vec::new();
    if let Some(s) = &store {
        events.extend(s.events("job", name)?);
        for run in &runs {
            events.extend(s.events("run", &run.name)?);
        }
    }
    events.sort_by_key(|e| e.at);
    print_events(&events);
    Ok(ExitCode::SUCCESS)
}

fn run_detail(home: &Home, name: &str) -> CliResult {
    let Some(store) = store(home)? else {
        return Err(fail(format!("no run named {name:?}")));
    };
    let Some(run) = store.run(name)? else {
        return Err(fail(format!("no run named {name:?}")));
    };
    let error = store.run_errors()?.remove(name);
    if !run.phase.is_terminal()
        && let Some(note) = super::daemon::absence(home, Some(&store))
    {
        eprintln!("warning: {note}");
    }
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows: Vec<(&str, String)> = vec![
        ("Name", run.name.clone()),
        ("Job", run.job.clone()),
        ("Phase", run.phase.to_string()),
        ("Reason", run.reason.clone()),
        (
            "Last error",
            dash(error.as_ref().map(|e| {
                format!(
                    "{}: {} ({}, {} ago)",
                    e.step,
                    e.message,
                    rfc3339(e.at),
                    age(super::now() - e.at)
                )
            })),
        ),
        ("Attempt", run.attempt.to_string()),
        ("Provider", dash(run.provider.map(|p| p.to_string()))),
        ("Instance", dash(run.instance_id.clone())),
        ("Host", dash(run.host.clone())),
        ("GPU", dash(run.gpu.clone())),
        (
            "Price/hour",
            dash(run.price_per_hour.map(|p| format!("${:.3}", p.dollars()))),
        ),
        (
            "Cost",
            format!("${:.4}", run.cost_at(super::now()).dollars()),
        ),
        (
            "Progress",
            dash(run.progress_done.map(|d| match run.progress_total {
                Some(t) => format!("{d}/{t}"),
                None => d.to_string(),
            })),
        ),
        ("Exit code", dash(run.exit_code.map(|c| c.to_string()))),
        ("Matrix", format!("{:?}", run.matrix)),
        ("Repository", dash(run.repository.clone())),
        ("Commit", dash(run.commit.clone())),
        ("Message", dash(run.commit_message.clone())),
        ("Author", dash(run.author.clone())),
        ("Dirty", run.dirty.to_string()),
        ("Created", rfc3339(run.created_at)),
        ("Started", dash(run.started_at.map(rfc3339))),
        ("Finished", dash(run.finished_at.map(rfc3339))),
    ];
    for (k, v) in rows {
        println!("{:<11} {v}", format!("{k}:"));
    }
    if let Some(e) = error.as_ref().filter(|e| !e.detail.is_empty()) {
        println!("Last lines of the failed {}:", e.step);
        for line in e.detail.lines() {
            println!("  {line}");
        }
    }
    if let Some(diff) = store.diff(name)? {
        // The exact uncommitted changes the run used: with the commit, enough to
        // reproduce it (`git checkout COMMIT && git apply`).
        println!("Diff:");
        for line in diff.lines() {
            println!("  {line}");
        }
    }
    let attempts = store.attempts(name)?;
    lifecycle(home, &store, &run, &attempts)?;
    print_events(&store.events("run", name)?);
    Ok(ExitCode::SUCCESS)
}

/// The story of the run across its attempts: its stable id, the pause that holds it,
/// the restarts used by cause, each attempt (why it ended, which checkpoint it resumed
/// from), the checkpoint syncs and the latest metrics.
fn lifecycle(
    home: &Home,
    store: &Store,
    run: &crate::store::RunRecord,
    attempts: &[crate::store::AttemptRecord],
) -> Result<(), super::CliError> {
    let name = run.name.as_str();
    let controller = attempts
        .iter()
        .find_map(|a| crate::model::OwnerTag::parse(&a.tag))
        .map(|t| t.controller);
    if let Some(controller) = controller {
        let id = crate::reconcile::plan::run_id(&controller, name, run.created_at);
        println!(
            "{:<11} {id} (ASIMOV_RUN_ID; WANDB_RUN_ID unless the job sets it)",
            "Run id:"
        );
    }
    if let Some(p) = store.pauses()?.get(name) {
        let what = if p.paused { "paused" } else { "resumed" };
        println!("{:<11} {what} by the CLI at {}", "Pause:", rfc3339(p.at));
    }
    let view = desired::view(home, Some(store))?;
    if let Some(job) = view
        .loaded
        .manifests
        .jobs
        .iter()
        .find(|j| j.name == run.job)
    {
        let used = crate::reconcile::plan::restarts_used(job, attempts);
        let r = &job.spec.retry;
        let no_cap = r
            .max_no_capacity
            .map_or_else(|| "no limit".to_string(), |m| format!("of {m}"));
        println!(
            "{:<11} {} of {} (preemption {} of {}, error {} of {}); no capacity {} ({no_cap})",
            "Restarts:",
            used.total(),
            r.max_restarts,
            used.preemption,
            r.max_of(crate::manifest::RetryOn::Preemption),
            used.error,
            r.max_of(crate::manifest::RetryOn::Error),
            used.no_capacity,
        );
    }
    println!("Attempts:");
    let resumed = store.resumed_from(name)?;
    let reasons = store.ended_reasons(name)?;
    let mut table = new_table(&[
        "#",
        "PROVIDER",
        "INSTANCE",
        "HOST",
        "STARTED",
        "OUTCOME",
        "WHY / WHAT FOLLOWED",
        "RELEASED",
        "RESUMED FROM",
    ]);
    for a in attempts {
        table.add_row(vec![
            a.attempt.to_string(),
            a.provider.to_string(),
            a.instance_id.clone().unwrap_or_else(|| "-".into()),
            a.host.clone().unwrap_or_else(|| "-".into()),
            rfc3339(a.intent_at),
            a.outcome
                .as_ref()
                .map_or_else(|| "-".into(), |o| o.to_string()),
            reasons
                .get(&a.attempt)
                .cloned()
                .unwrap_or_else(|| "-".into()),
            a.released_at.map(rfc3339).unwrap_or_else(|| "no".into()),
            resumed
                .get(&a.attempt)
                .map_or_else(|| "-".into(), |seq| format!("checkpoint {seq}")),
        ]);
    }
    for line in table.to_string().lines() {
        println!("  {line}");
    }
    let syncs = store.checkpoint_syncs(name)?;
    match syncs.last() {
        Some(last) => {
            println!(
                "Checkpoints: {} synced, newest {} (attempt {}, {}{})",
                syncs.len(),
                last.seq,
                last.attempt,
                rfc3339(last.at),
                if last.last { ", final" } else { "" }
            );
            for s in &syncs {
                println!(
                    "  checkpoint {} from attempt {} at {}{}",
                    s.seq,
                    s.attempt,
                    rfc3339(s.at),
                    if s.last { " (final)" } else { "" }
                );
            }
        }
        None => println!("Checkpoints: none synced"),
    }
    match store.metrics(name)? {
        Some(m) => println!(
            "Metrics:     {} (attempt {}, {})",
            m.line,
            m.attempt,
            rfc3339(m.at)
        ),
        None => println!("Metrics:     none read"),
    }
    Ok(())
}
