//! `asimov offers --pick [--premium PCT] [-f job.yaml --write]`: choose one offer on a
//! terminal (inquire's select: arrow keys, filter as you type) and print the placement
//! entry that rents it, or write it as the job's first placement, keeping the rest of
//! the file as it was (comments, order, other documents).
//!
//! The entry pins what was chosen without pinning one market offer that may be gone
//! tomorrow: the GPU model (Vast `filters.gpu_name`) or the instance type (Lambda,
//! RunPod), and the price: `--premium PCT` over the offer's price as the cap, or as the
//! bid over the minimum for interruptible Vast placements (`--spot`).

use super::offers::{Found, Query};
use super::{CliError, CliResult, desired, fail};
use crate::home::Home;
use crate::manifest;
use crate::model::ProviderKind;
use std::process::ExitCode;

/// One line of the list: what a buyer compares.
struct Choice(Found);

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.0.offer;
        write!(
            f,
            "{:<6} {:<24} {:<22} x{:<2} {:>7} ${:>7.3}/h",
            o.provider.as_str(),
            o.id,
            o.gpu.as_deref().unwrap_or("-"),
            o.count,
            o.vram_gb.map_or("-".into(), |v| format!("{v:.0} GB")),
            o.price_per_hour.dollars(),
        )?;
        if let Some(l) = &o.location {
            write!(f, "  {l}")?;
        }
        if let Some(r) = o.reliability {
            write!(f, "  rel {r:.3}")?;
        }
        Ok(())
    }
}

pub fn run(home: &Home, q: &Query, found: Vec<Found>) -> CliResult {
    let premium = q.premium.unwrap_or(0.0);
    if !premium.is_finite() || premium < 0.0 {
        return Err(fail(format!(
            "bad --premium {premium}: expected a percentage of 0 or more"
        )));
    }
    let choices: Vec<Choice> = found
        .into_iter()
        .filter(|f| f.available)
        .map(Choice)
        .collect();
    if choices.is_empty() {
        return Err(fail("no offer fits; nothing to pick"));
    }
    let picked = inquire::Select::new("Offer (type to filter):", choices)
        .with_page_size(12)
        .with_help_message("↑↓ to move, type to filter, enter to choose, esc to cancel")
        .prompt();
    let picked = match picked {
        Ok(c) => c.0,
        Err(e) => return super::prompt::cancelled_or(Box::new(e)),
    };
    let entry = entry(&picked, premium);
    let o = &picked.offer;
    eprintln!(
        "Picked {} offer {} ({} x{}, ${:.3}/h).",
        o.provider,
        o.id,
        o.gpu.as_deref().unwrap_or("-"),
        o.count,
        o.price_per_hour.dollars()
    );
    match (&q.file, q.write) {
        (Some(file), true) => {
            write_entry(home, file, &entry)?;
            eprintln!(
                "Wrote it as the first placement of {}; `asimov apply -f {}` to use it.",
                file.display(),
                file.display()
            );
        }
        _ => {
            eprintln!("Add this under the job's `placement:` (first = tried first):");
            println!("- {entry}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A YAML flow scalar: numbers and plain words as they are, anything else quoted
/// (JSON's string quoting is valid YAML).
fn scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && s.parse::<f64>().is_err()
        && !matches!(s, "true" | "false" | "null" | "yes" | "no" | "on" | "off");
    if plain {
        s.to_string()
    } else {
        serde_json::Value::String(s.to_string()).to_string()
    }
}

/// Dollars rounded up to a hundredth of a cent, so a cap never falls below the price.
fn cap(dollars: f64) -> String {
    let v = (dollars * 10_000.0 - 1e-6).ceil() / 10_000.0;
    format!("{v}")
}

/// The placement entry (YAML flow mapping) that rents `found` again: the searched
/// placement's own constraints kept, the choice and the price added.
pub fn entry(found: &Found, premium_pct: f64) -> String {
    let o = &found.offer;
    let p = &found.placement;
    let mut fields = vec![format!("provider: {}", o.provider.as_str())];
    let mut filters = p.filters.clone();
    match o.provider {
        ProviderKind::Vast => {
            if let Some(gpu) = &o.gpu {
                filters.insert("gpu_name".into(), gpu.clone());
            }
        }
        // Only the filters the provider has: the rest (a merged search's Vast filters)
        // did not choose this offer, and apply refuses them for it.
        ProviderKind::Runpod => {
            filters.retain(|k, _| k == "cloud");
            fields.push(format!("instance_types: [{}]", scalar(&o.id)));
        }
        _ => {
            filters.clear();
            fields.push(format!("instance_types: [{}]", scalar(&o.id)));
        }
    }
    if !p.regions.is_empty() {
        let regions: Vec<String> = p.regions.iter().map(|r| scalar(r)).collect();
        fields.push(format!("regions: [{}]", regions.join(", ")));
    }
    if o.provider == ProviderKind::Vast && p.spot {
        fields.push("spot: true".into());
        fields.push(format!("premium_pct: {premium_pct}"));
    } else {
        let price = o.price_per_hour.dollars() * (1.0 + premium_pct / 100.0);
        fields.push(format!("max_price_per_hour: {}", cap(price)));
    }
    if !filters.is_empty() {
        let f: Vec<String> = filters
            .iter()
            .map(|(k, v)| format!("{}: {}", scalar(k), scalar(v)))
            .collect();
        fields.push(format!("filters: {{{}}}", f.join(", ")));
    }
    if let Some(user) = &p.ssh_user {
        fields.push(format!("ssh_user: {}", scalar(user)));
    }
    format!("{{{}}}", fields.join(", "))
}

/// Writes `entry` as the first placement of the (first) job in `file`, touching no
/// other line; the result is validated before it replaces the file.
fn write_entry(home: &Home, file: &std::path::Path, entry: &str) -> Result<(), CliError> {
    let text = manifest::read_text(file)
        .map_err(|e| fail(format!("{}: cannot read: {}", file.display(), e.message)))?;
    let current = desired::load_current(home).unwrap_or_default();
    let ctx = desired::context(home, &current);
    let loaded = manifest::load_str(file, &text, &ctx)?;
    let job = loaded
        .manifests
        .jobs
        .first()
        .ok_or_else(|| fail(format!("{} defines no Job", file.display())))?;
    let edited = insert_placement(&text, job.origin.line, entry).ok_or_else(|| {
        fail(format!(
            "cannot find where to add the placement in {}; add this line under its \
             `placement:` yourself:\n- {entry}",
            file.display()
        ))
    })?;
    let again = manifest::load_str(file, &edited, &ctx)?;
    let placed = again
        .manifests
        .jobs
        .iter()
        .find(|j| j.name == job.name)
        .map(|j| j.spec.placement.len());
    if placed != Some(job.spec.placement.len() + 1) {
        return Err(fail(format!(
            "editing {} did not give the job one more placement; nothing was written",
            file.display()
        )));
    }
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".asimov-pick-")
        .tempfile_in(dir)?;
    std::io::Write::write_all(&mut tmp, edited.as_bytes())?;
    // The user's file keeps its mode; the temporary one is private.
    if let Ok(meta) = std::fs::metadata(file) {
        std::fs::set_permissions(tmp.path(), meta.permissions())?;
    }
    tmp.persist(file).map_err(|e| e.error)?;
    Ok(())
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// `text` with `entry` added first to the `spec.placement` of the document starting on
/// line `doc_line` (1-based); `None` when its shape is not one this edit knows
/// (block or one-line flow list, or no placement yet).
pub fn insert_placement(text: &str, doc_line: usize, entry: &str) -> Option<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let start = doc_line.saturating_sub(1);
    let end = (start + 1..lines.len())
        .find(|i| lines[*i].trim_end() == "---" || lines[*i].starts_with("--- "))
        .unwrap_or(lines.len());
    let spec = (start..end).find(|i| {
        let l = lines[*i];
        indent(l) == 0 && l.trim_end().starts_with("spec:")
    })?;
    // `spec: {...}` on one line is a shape this edit leaves to the user.
    if lines[spec].trim_end() != "spec:" {
        return None;
    }
    let child = (spec + 1..end)
        .map(|i| lines[i])
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(indent)
        .filter(|n| *n > 0)?;
    let key = (spec + 1..end).find(|i| {
        let l = lines[*i];
        indent(l) == child && l.trim_start().starts_with("placement:")
    });
    let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    match key {
        None => {
            let pad = " ".repeat(child);
            out.insert(
                spec + 1,
                format!("{pad}placement:{newline}{pad}  - {entry}{newline}"),
            );
        }
        Some(k) => {
            let line = lines[k];
            let value = line.trim_start()["placement:".len()..].trim();
            if value.is_empty() || value.starts_with('#') {
                // A block list: the new item goes first, indented like the others.
                let item = (k + 1..end)
                    .map(|i| lines[i])
                    .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                    .filter(|l| l.trim_start().starts_with('-'))
                    .map_or(child + 2, indent);
                out.insert(k + 1, format!("{}- {entry}{newline}", " ".repeat(item)));
            } else if value.starts_with('[') && value.trim_end().ends_with(']') {
                let open = line.find('[')?;
                let rest = line[open + 1..].trim_start();
                let sep = if rest.starts_with(']') { "" } else { ", " };
                out[k] = format!("{}{entry}{sep}{}", &line[..=open], rest);
            } else {
                return None;
            }
        }
    }
    Some(out.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: &str = "{provider: vast, max_price_per_hour: 2}";

    #[test]
    fn an_entry_keeps_only_the_filters_its_provider_has() {
        let found = |provider| {
            let mut placement = crate::manifest::Placement::local();
            placement.filters.insert("cloud".into(), "community".into());
            placement
                .filters
                .insert("reliability".into(), ">=0.98".into());
            Found {
                offer: crate::model::Offer::new(
                    provider,
                    "NVIDIA GeForce RTX 4090",
                    crate::model::Usd::from_dollars(0.5),
                ),
                available: true,
                dlperf: None,
                placement,
                item: serde_json::Value::Null,
            }
        };
        assert_eq!(
            entry(&found(ProviderKind::Runpod), 0.0),
            "{provider: runpod, instance_types: [\"NVIDIA GeForce RTX 4090\"], max_price_per_hour: 0.5, filters: {cloud: community}}"
        );
        assert_eq!(
            entry(&found(ProviderKind::Lambda), 0.0),
            "{provider: lambda, instance_types: [\"NVIDIA GeForce RTX 4090\"], max_price_per_hour: 0.5}"
        );
    }

    #[test]
    fn inserts_into_a_block_list_first() {
        let text = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: a}\nspec:\n  run: x # keep\n  placement:\n    - {provider: local}\n  image: i\n";
        let got = insert_placement(text, 1, E).unwrap();
        assert_eq!(
            got,
            text.replace("  placement:\n", &format!("  placement:\n    - {E}\n"))
        );
    }

    #[test]
    fn inserts_into_a_flow_list_and_adds_a_missing_list() {
        let text = "kind: Job\nspec:\n  placement: [{provider: local}]\n";
        assert_eq!(
            insert_placement(text, 1, E).unwrap(),
            format!("kind: Job\nspec:\n  placement: [{E}, {{provider: local}}]\n")
        );
        let text = "kind: Job\nspec:\n  run: x\n";
        assert_eq!(
            insert_placement(text, 1, E).unwrap(),
            format!("kind: Job\nspec:\n  placement:\n    - {E}\n  run: x\n")
        );
    }

    #[test]
    fn edits_only_its_own_document() {
        let text = "kind: Job\nspec:\n  run: x\n---\nkind: Job\nspec:\n  placement:\n  - {provider: local}\n";
        let got = insert_placement(text, 5, E).unwrap();
        assert!(
            got.starts_with("kind: Job\nspec:\n  run: x\n---\n"),
            "{got}"
        );
        assert!(got.ends_with(&format!("  placement:\n  - {E}\n  - {{provider: local}}\n")));
    }

    #[test]
    fn scalars_are_quoted_when_yaml_would_misread_them() {
        assert_eq!(scalar("gpu_1x_h100"), "gpu_1x_h100");
        assert_eq!(scalar("H100 SXM"), "\"H100 SXM\"");
        assert_eq!(scalar(">=0.98"), "\">=0.98\"");
        assert_eq!(scalar("12"), "\"12\"");
        assert_eq!(cap(1.95), "1.95");
        assert_eq!(cap(1.95 * 1.1), "2.145");
    }
}
