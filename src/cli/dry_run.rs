//! `apply --dry-run`: the plan before money moves. For each object, what changes (a
//! unified diff of the stored, normalised document against the applied one, as
//! `kubectl diff` shows); for each run of a changed job, what the controller would do
//! (`reconcile::preview`): the placement and the offer it would take now, asked live
//! from the provider with the same search its create makes, the price per hour, and
//! what its budgets have left; which runs keep running, restart or stop. Nothing is
//! rented, nothing is written.

use super::args::Output;
use super::desired::Change;
use super::{CliError, offers};
use crate::home::Home;
use crate::manifest::{self, Document, Job, Kind, Loaded, Placement};
use crate::model::{ProviderKind, Timestamp, Usd};
use crate::reconcile::budget::{self, BudgetState};
use crate::reconcile::preview::{self, Action, Claims, Placed, Quote, RunPreview, Taken};
use crate::reconcile::{History, controller};
use crate::transport::ssh::SshPool;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What `apply --dry-run` found, ready to print.
pub struct DryRun {
    objects: Vec<ObjectPlan>,
    now: Timestamp,
}

struct ObjectPlan {
    kind: Kind,
    name: String,
    change: Change,
    /// Unified diff of the stored document against the applied one (Configured only).
    diff: Option<String>,
    runs: Vec<RunPreview>,
    /// The budgets that count this job, as they stand now.
    budgets: Vec<BudgetState>,
}

/// The unified diff of `old` against `new`, labelled with the object.
fn diff(label: &str, old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{label} (stored)"), &format!("{label} (applied)"))
        .to_string()
}

/// The store's history (runs, attempts, stops), empty before anything was applied.
fn history(store: Option<&crate::store::Store>) -> Result<History, CliError> {
    let mut h = History::default();
    let Some(store) = store else {
        return Ok(h);
    };
    h.stops = store.stops()?;
    for run in store.runs()? {
        h.attempts
            .insert(run.name.clone(), store.attempts(&run.name)?);
        h.runs.insert(run.name.clone(), run);
    }
    Ok(h)
}

/// This machine's name, for the `local` placement.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "this machine".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// What each placement of `job` could get now. Clouds are asked live (nothing rented);
/// a cloud without a key, or one this asimov does not drive, is unavailable.
fn quotes(
    home: &Home,
    pool: &mut Option<Arc<SshPool>>,
    runtime: &tokio::runtime::Runtime,
    job: &Job,
    fleets: &[manifest::Fleet],
) -> Result<Vec<Quote>, CliError> {
    let mut out = Vec::new();
    for placement in &job.spec.placement {
        out.push(quote(home, pool, runtime, job, placement, fleets)?);
    }
    Ok(out)
}

fn quote(
    home: &Home,
    pool: &mut Option<Arc<SshPool>>,
    runtime: &tokio::runtime::Runtime,
    job: &Job,
    placement: &Placement,
    fleets: &[manifest::Fleet],
) -> Result<Quote, CliError> {
    let kind = placement.provider;
    if !controller::drives(kind) {
        return Ok(Quote::Unavailable("this asimov cannot drive it".into()));
    }
    Ok(match kind {
        ProviderKind::Local => Quote::Host(format!("this machine, {}", hostname())),
        ProviderKind::Ssh => {
            let name = placement.fleet.clone().unwrap_or_default();
            match fleets.iter().find(|f| f.name == name) {
                Some(f) => {
                    let hosts: Vec<&str> = f.hosts.iter().map(|h| h.name.as_str()).collect();
                    Quote::Host(format!(
                        "fleet {name}, the first free of {}",
                        hosts.join(", ")
                    ))
                }
                None => Quote::Unavailable(format!("no fleet named {name:?}")),
            }
        }
        ProviderKind::Vast | ProviderKind::Lambda | ProviderKind::Runpod => {
            let key = offers::key_name(kind).unwrap_or_default();
            if !offers::configured_clouds(home).contains(&kind) {
                return Ok(Quote::Unavailable(format!(
                    "no {key} stored (asimov login {kind})"
                )));
            }
            let pool = match pool {
                Some(p) => Arc::clone(p),
                None => Arc::clone(pool.insert(SshPool::new(home.clone())?)),
            };
            match runtime.block_on(offers::search(
                home,
                &pool,
                kind,
                &job.spec.resources,
                placement,
            )) {
                Ok(found) => Quote::Offers {
                    offers: found
                        .into_iter()
                        .filter(|f| f.available)
                        .map(|f| f.offer)
                        .collect(),
                    // A market offer is one machine: two runs never take the same one.
                    // A catalog's instance type launches as often as it has capacity.
                    exclusive: kind == ProviderKind::Vast,
                },
                Err(e) => Quote::Unavailable(format!(
                    "cannot search offers now: {}",
                    super::chain(e.as_ref())
                )),
            }
        }
        ProviderKind::Fake => Quote::Unavailable("this asimov cannot drive it".into()),
    })
}

/// The plan of applying `loaded` over `current` (the stored desired state).
pub fn plan(
    home: &Home,
    current: &Loaded,
    loaded: &Loaded,
    changes: &[(Change, &Document)],
) -> Result<DryRun, CliError> {
    let now = super::now();
    let store = super::read_store(home)?;
    let history = history(store.as_ref())?;
    // The desired state as it would be: the applied objects over the stored ones.
    let mut jobs: Vec<Job> = loaded.manifests.jobs.clone();
    jobs.extend(
        current
            .manifests
            .jobs
            .iter()
            .filter(|j| !jobs.iter().any(|n| n.name == j.name))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let mut budgets = loaded.manifests.budgets.clone();
    budgets.extend(
        current
            .manifests
            .budgets
            .iter()
            .filter(|b| !budgets.iter().any(|n| n.name == b.name))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let mut fleets = loaded.manifests.fleets.clone();
    fleets.extend(
        current
            .manifests
            .fleets
            .iter()
            .filter(|f| !fleets.iter().any(|n| n.name == f.name))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let mut ledger = BTreeMap::new();
    if let Some(store) = &store {
        for b in &budgets {
            let selected = budget::jobs_of(b, &jobs);
            ledger.insert(
                b.name.clone(),
                store.spent(&selected, budget::window_start(b, now))?,
            );
        }
    }
    let live: Vec<(String, Usd, Timestamp)> = history
        .runs
        .values()
        .filter_map(|r| Some((r.job.clone(), r.price_per_hour?, r.billing_since?)))
        .collect();
    let states = budget::states(&budgets, &jobs, &ledger, &live, now);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut pool = None;
    let mut claims = Claims::new();
    let mut objects = Vec::new();
    for (change, doc) in changes {
        let label = format!("{}/{}", doc.kind.as_str().to_lowercase(), doc.name);
        let diff = match change {
            Change::Configured => {
                std::fs::read_to_string(super::desired::object_file(home, doc.kind, &doc.name))
                    .ok()
                    .map(|old| diff(&label, &old, &doc.yaml))
            }
            Change::Created | Change::Unchanged => None,
        };
        let mut runs = Vec::new();
        let mut job_budgets = Vec::new();
        if doc.kind == Kind::Job
            && *change != Change::Unchanged
            && let Some(job) = loaded.manifests.jobs.iter().find(|j| j.name == doc.name)
        {
            let quotes = quotes(home, &mut pool, &runtime, job, &fleets)?;
            runs =
                preview::preview_job(job, &history, &quotes, &budgets, &states, &mut claims, now);
            job_budgets = budgets
                .iter()
                .filter(|b| budget::selects(b, job))
                .filter_map(|b| states.get(&b.name).cloned())
                .collect();
        }
        objects.push(ObjectPlan {
            kind: doc.kind,
            name: doc.name.clone(),
            change: *change,
            diff,
            runs,
            budgets: job_budgets,
        });
    }
    // The background controller reads keys from the credential store only.
    let mut placed: Vec<ProviderKind> = loaded
        .manifests
        .jobs
        .iter()
        .flat_map(|j| j.spec.placement.iter().map(|p| p.provider))
        .collect();
    placed.sort();
    placed.dedup();
    for kind in placed {
        if let Some(key) = offers::key_name(kind)
            && offers::configured_clouds(home).contains(&kind)
            && !home.credentials().join(key).is_file()
        {
            eprintln!(
                "note: {key} is only in this shell's environment: a foreground `asimov \
                 controller` uses it, a background one does not (asimov login {kind})"
            );
        }
    }
    Ok(DryRun { objects, now })
}

fn offer_text(taken: &Taken) -> String {
    match taken {
        Taken::Host(h) => format!("({h})"),
        Taken::Offer(o) => {
            let mut what = o.gpu.clone().unwrap_or_else(|| "no GPU".into());
            if o.count > 0 {
                what.push_str(&format!(" x{}", o.count));
            }
            if let Some(v) = o.vram_gb {
                what.push_str(&format!(", {v:.0} GB"));
            }
            if let Some(l) = &o.location {
                what.push_str(&format!(", {l}"));
            }
            format!(
                "offer {} ({what}) at ${:.3}/h",
                o.id,
                o.price_per_hour.dollars()
            )
        }
    }
}

fn budget_text(budgets: &[BudgetState]) -> String {
    budgets
        .iter()
        .map(|b| {
            let left = if b.is_over() {
                Usd::ZERO
            } else {
                b.limit_usd - b.spent_usd
            };
            format!("; budget {} has {left} of {} left", b.name, b.limit_usd)
        })
        .collect()
}

fn placed_text(p: &Placed) -> String {
    let nth = if p.index > 0 {
        format!(" (placement {})", p.index + 1)
    } else {
        String::new()
    };
    match &p.taken {
        Taken::Host(_) => format!("{}{nth} {}", p.provider, offer_text(&p.taken)),
        Taken::Offer(_) => format!("{}{nth}: {}", p.provider, offer_text(&p.taken)),
    }
}

fn run_line(r: &RunPreview, budgets: &[BudgetState], now: Timestamp) -> String {
    let name = &r.run;
    let on = |provider: &Option<ProviderKind>, instance: &Option<String>| match (provider, instance)
    {
        (Some(p), Some(i)) => format!(" on {p} (instance {i})"),
        (Some(p), None) => format!(" on {p}"),
        _ => String::new(),
    };
    match &r.action {
        Action::Start { rerun, at, placed } => {
            let verb = if *rerun {
                "would run again with the new spec"
            } else {
                "would start"
            };
            let when = at
                .filter(|t| *t > now)
                .map(|t| format!(" at {}", super::render::rfc3339(t)))
                .unwrap_or_default();
            match placed {
                Ok(p) => format!(
                    "run/{name} {verb}{when} on {}{}",
                    placed_text(p),
                    budget_text(budgets)
                ),
                Err(why) => format!(
                    "run/{name} {verb}{when} once a placement has capacity; it waits as \
                     Pending now ({})",
                    why.join("; ")
                ),
            }
        }
        Action::Blocked { reason } => format!("run/{name} would wait as Pending: {reason}"),
        Action::Keeps {
            phase,
            provider,
            instance,
            rerun_after: true,
        } => format!(
            "run/{name} is {}{}: it keeps running under the old spec, and would restart with \
             the new spec when it ends",
            phase.as_str(),
            on(provider, instance)
        ),
        Action::Keeps {
            phase,
            provider,
            instance,
            rerun_after: false,
        } => format!(
            "run/{name} unchanged ({}{})",
            phase.as_str(),
            on(provider, instance)
        ),
        Action::Unchanged { phase } => format!("run/{name} unchanged ({})", phase.as_str()),
        Action::StaysStopped => {
            format!("run/{name} stays Stopped (asimov destroy) until the spec changes")
        }
        Action::Stops { provider, instance } => format!(
            "run/{name} would stop: no longer part of the job{}",
            match (provider, instance) {
                (Some(p), Some(i)) => format!("; its instance {i} on {p} is destroyed"),
                _ => String::new(),
            }
        ),
    }
}

fn run_json(r: &RunPreview, budgets: &[BudgetState]) -> Value {
    let budgets: Vec<Value> = budgets
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "limit_usd": b.limit_usd,
                "spent_usd": b.spent_usd,
                "left_usd": if b.is_over() { Usd::ZERO } else { b.limit_usd - b.spent_usd },
            })
        })
        .collect();
    let mut v = json!({ "name": r.run });
    match &r.action {
        Action::Start { rerun, at, placed } => {
            v["action"] = json!(if *rerun { "restart" } else { "start" });
            v["at"] = json!(at.map(super::render::rfc3339));
            match placed {
                Ok(p) => {
                    v["provider"] = json!(p.provider);
                    v["placement_index"] = json!(p.index);
                    match &p.taken {
                        Taken::Host(h) => {
                            v["host"] = json!(h);
                            v["price_per_hour"] = Value::Null;
                        }
                        Taken::Offer(o) => {
                            v["offer"] = json!(o);
                            v["price_per_hour"] = json!(o.price_per_hour);
                        }
                    }
                }
                Err(why) => {
                    v["waits"] = json!(true);
                    v["reasons"] = json!(why);
                }
            }
            v["budgets"] = json!(budgets);
        }
        Action::Blocked { reason } => {
            v["action"] = json!("blocked");
            v["reasons"] = json!([reason]);
            v["budgets"] = json!(budgets);
        }
        Action::Keeps {
            phase,
            provider,
            instance,
            rerun_after,
        } => {
            v["action"] = json!(if *rerun_after {
                "restart-when-done"
            } else {
                "unchanged"
            });
            v["phase"] = json!(phase.as_str());
            v["provider"] = json!(provider);
            v["instance_id"] = json!(instance);
        }
        Action::Unchanged { phase } => {
            v["action"] = json!("unchanged");
            v["phase"] = json!(phase.as_str());
        }
        Action::StaysStopped => v["action"] = json!("stays-stopped"),
        Action::Stops { provider, instance } => {
            v["action"] = json!("stop");
            v["provider"] = json!(provider);
            v["instance_id"] = json!(instance);
        }
    }
    v
}

/// Prints the plan: lines for people, or `{"items": [...]}` for scripts.
pub fn print(plan: &DryRun, output: Output) -> Result<(), CliError> {
    match output {
        Output::Json | Output::Yaml => {
            let items: Vec<Value> = plan
                .objects
                .iter()
                .map(|o| {
                    json!({
                        "kind": o.kind.as_str().to_lowercase(),
                        "name": o.name,
                        "change": o.change.as_str(),
                        "diff": o.diff,
                        "runs": o.runs.iter().map(|r| run_json(r, &o.budgets)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let doc = json!({ "dry_run": true, "items": items });
            if output == Output::Yaml {
                print!("{}", manifest::to_yaml_string(&doc)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
        }
        Output::Table | Output::Wide => {
            for o in &plan.objects {
                println!(
                    "{}/{} {} (dry run)",
                    o.kind.as_str().to_lowercase(),
                    o.name,
                    o.change.as_str()
                );
                if let Some(d) = &o.diff {
                    for line in d.lines() {
                        println!("    {line}");
                    }
                }
                for r in &o.runs {
                    println!("  {}", run_line(r, &o.budgets, plan.now));
                }
            }
        }
    }
    Ok(())
}
