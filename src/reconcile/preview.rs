//! What `apply --dry-run` says each run would do, pure: from the job as it would be
//! applied, the store's history, the budgets' state and what each placement could get
//! now (asked by the CLI, passed in as [`Quote`]s), the same decisions the planner takes
//! on its next pass, without renting or recording anything. No clock, no I/O.
//!
//! It follows the planner's rules rather than calling it: the planner needs listings
//! and agents' reports that a dry run does not gather, and its ops say nothing of which
//! offer a create would take. The rules kept here, as `plan.rs` has them: a new run
//! starts; an edited job's finished runs run again; a run whose instance lives keeps it
//! and runs again once it ends; a run destroyed by `asimov destroy` stays stopped until
//! the spec changes; a budget over its limit blocks new attempts; runs no longer in the
//! job are stopped and their instances destroyed.

use super::budget::{self, BudgetState};
use super::plan::History;
use crate::manifest::{Budget, Job};
use crate::model::{InstanceId, Offer, Phase, ProviderKind, RunName, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// What one placement of a job could get now.
#[derive(Debug, Clone, PartialEq)]
pub enum Quote {
    /// A place known without asking a market: this machine, a fleet's hosts.
    Host(String),
    /// What the provider would rent now, in the order its create tries them (the
    /// cheapest first, or the placement's own order). `exclusive`: each offer is one
    /// machine that only one run can take (a market's offer), as opposed to an
    /// instance type many runs can launch.
    Offers { offers: Vec<Offer>, exclusive: bool },
    /// The provider could not be asked, or will not be driven: why.
    Unavailable(String),
}

impl Quote {
    /// An available offer (or host) for one more run, claiming it in `taken`.
    fn take(&self, taken: &mut BTreeSet<(ProviderKind, String)>) -> Option<Taken> {
        match self {
            Quote::Host(host) => Some(Taken::Host(host.clone())),
            Quote::Offers { offers, exclusive } => offers
                .iter()
                .find(|o| !*exclusive || !taken.contains(&(o.provider, o.id.clone())))
                .map(|o| {
                    if *exclusive {
                        taken.insert((o.provider, o.id.clone()));
                    }
                    Taken::Offer(o.clone())
                }),
            Quote::Unavailable(_) => None,
        }
    }
}

/// Where a run would go.
#[derive(Debug, Clone, PartialEq)]
pub enum Taken {
    Host(String),
    Offer(Offer),
}

/// The placement a run would take now.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    /// Index into the job's `placement` list.
    pub index: usize,
    pub provider: ProviderKind,
    pub taken: Taken,
}

/// What the next passes would do with one run.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A new attempt: `rerun` when the run ran before under another spec; `at` when its
    /// schedule holds it until then; `placed` is `Err` with why no placement can take it
    /// now (it would wait as Pending, trying again).
    Start {
        rerun: bool,
        at: Option<Timestamp>,
        placed: Result<Placed, Vec<String>>,
    },
    /// A budget over its limit holds it back.
    Blocked { reason: String },
    /// Its instance lives on; with `rerun_after`, the run starts again under the new
    /// spec once this attempt ends (the planner restarts only finished runs).
    Keeps {
        phase: Phase,
        provider: Option<ProviderKind>,
        instance: Option<InstanceId>,
        rerun_after: bool,
    },
    /// Nothing changes for it.
    Unchanged { phase: Phase },
    /// Destroyed by `asimov destroy` for this spec: it stays stopped.
    StaysStopped,
    /// No longer part of the job: stopped, its instance (if any) destroyed.
    Stops {
        provider: Option<ProviderKind>,
        instance: Option<InstanceId>,
    },
}

/// One run's line of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPreview {
    pub run: RunName,
    pub action: Action,
}

/// Offers already promised to earlier runs of this dry run: two runs never take one
/// market offer.
pub type Claims = BTreeSet<(ProviderKind, String)>;

/// What each run of `job` would do. `quotes` has one entry per placement of the job
/// (a missing entry is unavailable); `budgets` are the desired budgets and `states`
/// their spending now. `stored_runs` are the runs the store knows for this job: those
/// the job no longer makes are stopped.
#[allow(clippy::too_many_arguments)]
pub fn preview_job(
    job: &Job,
    history: &History,
    quotes: &[Quote],
    budgets: &[Budget],
    states: &BTreeMap<String, BudgetState>,
    claims: &mut Claims,
    now: Timestamp,
) -> Vec<RunPreview> {
    let over = budget::over_limit(job, budgets, states);
    let mut out = Vec::new();
    for spec in &job.runs {
        let rec = history.runs.get(&spec.name);
        let changed = rec.is_some_and(|r| r.spec_hash != job.spec_hash);
        let live = rec.is_some_and(|r| {
            history.attempts.get(&r.name).is_some_and(|atts| {
                atts.iter()
                    .any(|a| a.attempt == r.attempt && a.released_at.is_none())
            })
        });
        let action = match rec {
            Some(_) if history.stops.get(&spec.name) == Some(&job.spec_hash) => {
                Action::StaysStopped
            }
            Some(r) if live && !r.phase.is_terminal() => Action::Keeps {
                phase: r.phase,
                provider: r.provider,
                instance: r.instance_id.clone(),
                rerun_after: changed,
            },
            Some(r) if !changed && (r.phase.is_terminal() || live) => {
                Action::Unchanged { phase: r.phase }
            }
            // Never started, waiting, or finished under another spec: a new attempt.
            _ => match over.first() {
                Some(b) => Action::Blocked { reason: b.reason() },
                None => Action::Start {
                    rerun: changed,
                    at: job
                        .spec
                        .schedule
                        .as_ref()
                        .map(|s| s.at)
                        .filter(|at| *at > now),
                    placed: place(job, quotes, claims),
                },
            },
        };
        out.push(RunPreview {
            run: spec.name.clone(),
            action,
        });
    }
    let desired: BTreeSet<&str> = job.runs.iter().map(|r| r.name.as_str()).collect();
    for rec in history
        .runs
        .values()
        .filter(|r| r.job == job.name && !desired.contains(r.name.as_str()))
    {
        out.push(RunPreview {
            run: rec.name.clone(),
            action: Action::Stops {
                provider: rec.provider,
                instance: rec.instance_id.clone(),
            },
        });
    }
    out
}

/// The first placement, in the job's order, that can take a run now; else why none can.
fn place(job: &Job, quotes: &[Quote], claims: &mut Claims) -> Result<Placed, Vec<String>> {
    let mut why = Vec::new();
    for (index, placement) in job.spec.placement.iter().enumerate() {
        let quote = quotes.get(index);
        match quote.and_then(|q| q.take(claims)) {
            Some(taken) => {
                return Ok(Placed {
                    index,
                    provider: placement.provider,
                    taken,
                });
            }
            None => why.push(match quote {
                Some(Quote::Unavailable(reason)) => format!("{}: {reason}", placement.provider),
                Some(Quote::Offers { offers, .. }) if !offers.is_empty() => {
                    format!(
                        "{}: every fitting offer is taken by an earlier run",
                        placement.provider
                    )
                }
                Some(_) => format!("{}: no offer fits now", placement.provider),
                None => format!("{}: not asked", placement.provider),
            }),
        }
    }
    Err(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{JobSpec, Origin, Placement, Resources, RetryPolicy, RunSpec, Source};
    use crate::model::Usd;
    use crate::store::{AttemptRecord, RunRecord};

    fn job(runs: u32, placement: Vec<Placement>, hash: &str) -> Job {
        Job {
            name: "ft".into(),
            labels: BTreeMap::new(),
            spec: JobSpec {
                source: Source::None,
                files: vec![],
                setup: vec![],
                run: "true".into(),
                env: BTreeMap::new(),
                secrets: vec![],
                resources: Resources::default(),
                placement,
                image: None,
                max_duration: None,
                retry: RetryPolicy::default(),
                checkpoint: None,
                artifacts: None,
                stop_when: vec![],
                schedule: None,
                budget: None,
            },
            runs: (0..runs)
                .map(|i| RunSpec {
                    name: format!("ft-{i}"),
                    index: i,
                    matrix: BTreeMap::new(),
                    command: "true".into(),
                    setup: vec![],
                    git_ref: None,
                })
                .collect(),
            spec_hash: hash.into(),
            origin: Origin {
                file: "j.yaml".into(),
                line: 1,
            },
        }
    }

    fn vast() -> Placement {
        Placement {
            provider: ProviderKind::Vast,
            ..Placement::local()
        }
    }

    fn offer(id: &str, price: f64) -> Offer {
        Offer::new(ProviderKind::Vast, id, Usd::from_dollars(price))
    }

    fn running(history: &mut History, name: &str, hash: &str, phase: Phase) {
        let mut r = RunRecord::new_pending(name, "ft", 0, hash, &BTreeMap::new(), "", 0);
        r.phase = phase;
        r.attempt = 1;
        r.provider = Some(ProviderKind::Local);
        r.instance_id = Some("i-1".into());
        history.attempts.insert(
            name.into(),
            vec![AttemptRecord {
                run: name.into(),
                attempt: 1,
                tag: "t".into(),
                provider: ProviderKind::Local,
                placement_index: 0,
                instance_id: Some("i-1".into()),
                host: None,
                intent_at: 0,
                released_at: None,
                outcome: None,
            }],
        );
        history.runs.insert(name.into(), r);
    }

    fn preview(job: &Job, history: &History, quotes: &[Quote]) -> Vec<RunPreview> {
        preview_job(
            job,
            history,
            quotes,
            &[],
            &BTreeMap::new(),
            &mut Claims::new(),
            0,
        )
    }

    #[test]
    fn runs_take_distinct_market_offers_then_fall_back() {
        let j = job(3, vec![vast(), Placement::local()], "h");
        let quotes = [
            Quote::Offers {
                offers: vec![offer("1", 0.5), offer("2", 0.7)],
                exclusive: true,
            },
            Quote::Host("box".into()),
        ];
        let got = preview(&j, &History::default(), &quotes);
        let taken: Vec<String> = got
            .iter()
            .map(|p| match &p.action {
                Action::Start {
                    placed: Ok(placed), ..
                } => match &placed.taken {
                    Taken::Offer(o) => o.id.clone(),
                    Taken::Host(h) => h.clone(),
                },
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(taken, ["1", "2", "box"]);
    }

    #[test]
    fn without_any_offer_the_run_waits_and_says_why() {
        let j = job(1, vec![vast()], "h");
        let got = preview(
            &j,
            &History::default(),
            &[Quote::Unavailable("no key".into())],
        );
        assert_eq!(
            got[0].action,
            Action::Start {
                rerun: false,
                at: None,
                placed: Err(vec!["vast: no key".into()])
            }
        );
    }

    #[test]
    fn a_changed_spec_keeps_a_live_run_and_reruns_finished_ones() {
        let j = job(3, vec![Placement::local()], "new");
        let mut h = History::default();
        running(&mut h, "ft-0", "old", Phase::Running);
        running(&mut h, "ft-1", "old", Phase::Succeeded);
        h.attempts.get_mut("ft-1").unwrap()[0].released_at = Some(5);
        running(&mut h, "ft-5", "old", Phase::Running);
        let got = preview(&j, &h, &[Quote::Host("box".into())]);
        assert!(
            matches!(
                &got[0].action,
                Action::Keeps {
                    rerun_after: true,
                    ..
                }
            ),
            "{got:?}"
        );
        assert!(
            matches!(&got[1].action, Action::Start { rerun: true, .. }),
            "{got:?}"
        );
        assert!(
            matches!(&got[2].action, Action::Start { rerun: false, .. }),
            "{got:?}"
        );
        assert_eq!(got[3].run, "ft-5");
        assert!(matches!(&got[3].action, Action::Stops { .. }), "{got:?}");
    }

    #[test]
    fn unchanged_and_destroyed_runs_stay_as_they_are() {
        let j = job(2, vec![Placement::local()], "h");
        let mut h = History::default();
        running(&mut h, "ft-0", "h", Phase::Running);
        running(&mut h, "ft-1", "h", Phase::Stopped);
        h.stops.insert("ft-1".into(), "h".into());
        let got = preview(&j, &h, &[Quote::Host("box".into())]);
        assert!(matches!(
            &got[0].action,
            Action::Keeps {
                rerun_after: false,
                ..
            }
        ));
        assert_eq!(got[1].action, Action::StaysStopped);
    }

    #[test]
    fn a_budget_over_its_limit_blocks_new_attempts_only() {
        use crate::manifest::{Budget, BudgetAction};
        let mut j = job(2, vec![Placement::local()], "h");
        j.spec.budget = Some("team".into());
        let b = Budget {
            name: "team".into(),
            labels: BTreeMap::new(),
            limit_usd: 10.0,
            period: None,
            selector: BTreeMap::new(),
            action: BudgetAction::Block,
            origin: Origin {
                file: "b.yaml".into(),
                line: 1,
            },
        };
        let states = budget::states(
            std::slice::from_ref(&b),
            std::slice::from_ref(&j),
            &BTreeMap::from([("team".to_string(), Usd::from_dollars(10.0))]),
            &[],
            0,
        );
        let mut h = History::default();
        running(&mut h, "ft-0", "h", Phase::Running);
        let got = preview_job(
            &j,
            &h,
            &[Quote::Host("box".into())],
            &[b],
            &states,
            &mut Claims::new(),
            0,
        );
        assert!(matches!(got[0].action, Action::Keeps { .. }), "{got:?}");
        assert!(
            matches!(&got[1].action, Action::Blocked { reason } if reason.contains("team")),
            "{got:?}"
        );
    }
}
