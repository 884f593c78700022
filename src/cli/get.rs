//! `asimov get jobs|runs|fleets|budgets [NAME] [-o table|wide|json|yaml]`.

use super::args::{Kind, Output};
use super::render::{RunView, runs_table};
use super::{CliResult, fail};
use crate::home::Home;
use crate::store::{RunRecord, Store};
use std::io::Write;
use std::process::ExitCode;

pub fn run(home: &Home, kind: Kind, name: Option<&str>, output: Output) -> CliResult {
    match kind {
        Kind::Runs => runs(home, name, output),
        _ => Err(fail("not built yet")),
    }
}

/// Runs from the store, read-only: works while the controller writes.
fn load_runs(home: &Home, name: Option<&str>) -> Result<Vec<RunRecord>, super::CliError> {
    if !home.database().exists() {
        return Ok(Vec::new());
    }
    let store = Store::open_read_only(&home.database())?;
    Ok(match name {
        Some(n) => {
            let mut runs: Vec<RunRecord> = store.run(n)?.into_iter().collect();
            if runs.is_empty() {
                // `get runs JOB` lists a job's runs too.
                runs = store.runs_of_job(n)?;
            }
            if runs.is_empty() {
                return Err(fail(format!("no run or job named {n:?}")));
            }
            runs
        }
        None => store.runs()?,
    })
}

fn runs(home: &Home, name: Option<&str>, output: Output) -> CliResult {
    let runs = load_runs(home, name)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match output {
        Output::Table | Output::Wide => {
            if runs.is_empty() {
                writeln!(out, "No runs.")?;
            } else {
                writeln!(
                    out,
                    "{}",
                    runs_table(&runs, output == Output::Wide, super::now())
                )?;
            }
        }
        Output::Json => {
            let views: Vec<RunView> = runs.iter().map(RunView::of).collect();
            serde_json::to_writer_pretty(&mut out, &serde_json::json!({ "items": views }))?;
            writeln!(out)?;
        }
        Output::Yaml => {
            let views: Vec<RunView> = runs.iter().map(RunView::of).collect();
            write!(
                out,
                "{}",
                serde_yaml::to_string(&serde_json::json!({ "items": views }))?
            )?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
