//! Budget arithmetic, pure: which jobs a budget selects, where its window starts, and
//! whether it is over its limit. No clock, no store: spending and `now` come in.

use crate::manifest::{Budget, BudgetAction, Job};
use crate::model::{JobName, Timestamp, Usd};
use std::collections::BTreeMap;

/// True when `job` counts against `budget`: it names the budget, or its labels match
/// every entry of a non-empty selector.
pub fn selects(budget: &Budget, job: &Job) -> bool {
    if job.spec.budget.as_deref() == Some(budget.name.as_str()) {
        return true;
    }
    !budget.selector.is_empty()
        && budget
            .selector
            .iter()
            .all(|(k, v)| job.labels.get(k) == Some(v))
}

/// Names of the jobs among `jobs` that count against `budget`.
pub fn jobs_of(budget: &Budget, jobs: &[Job]) -> Vec<JobName> {
    jobs.iter()
        .filter(|j| selects(budget, j))
        .map(|j| j.name.clone())
        .collect()
}

/// Start of the budget's current window: `now - period`, or `None` for all time.
pub fn window_start(budget: &Budget, now: Timestamp) -> Option<Timestamp> {
    budget
        .period
        .map(|p| now.saturating_sub(i64::try_from(p.as_secs()).unwrap_or(i64::MAX)))
}

/// Money a live instance has cost since `since` at `price_per_hour`, up to `now`.
pub fn accrued(price_per_hour: Usd, since: Timestamp, now: Timestamp) -> Usd {
    price_per_hour.per_hour_over(now - since)
}

/// Where a budget stands this pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetState {
    pub name: String,
    pub limit_usd: Usd,
    /// Ledger spending in the window plus what live instances have accrued.
    pub spent_usd: Usd,
    pub action: BudgetAction,
}

impl BudgetState {
    /// Reached or beyond the limit: new attempts are blocked.
    pub fn is_over(&self) -> bool {
        self.spent_usd >= self.limit_usd
    }

    /// The reason shown on a run held back by this budget.
    pub fn reason(&self) -> String {
        format!(
            "budget {} reached: {} spent of {}",
            self.name, self.spent_usd, self.limit_usd
        )
    }
}

/// The state of every budget: `ledger` is what the store's cost ledger says each budget
/// spent in its window; `live` is `(job, price_per_hour, since)` for each live instance.
pub fn states(
    budgets: &[Budget],
    jobs: &[Job],
    ledger: &BTreeMap<String, Usd>,
    live: &[(JobName, Usd, Timestamp)],
    now: Timestamp,
) -> BTreeMap<String, BudgetState> {
    budgets
        .iter()
        .map(|b| {
            let selected = jobs_of(b, jobs);
            let live_usd: Usd = live
                .iter()
                .filter(|(job, _, _)| selected.contains(job))
                .map(|(_, price, since)| {
                    // Only the part of a live attempt inside the window counts.
                    let since = window_start(b, now).map_or(*since, |w| (*since).max(w));
                    accrued(*price, since, now)
                })
                .sum();
            let state = BudgetState {
                name: b.name.clone(),
                // The manifest's dollars become exact money here, at the boundary.
                limit_usd: Usd::from_dollars(b.limit_usd),
                spent_usd: ledger.get(&b.name).copied().unwrap_or_default() + live_usd,
                action: b.action,
            };
            (b.name.clone(), state)
        })
        .collect()
}

/// The over-limit budgets that apply to `job`, most severe (`Stop`) first.
pub fn over_limit<'a>(
    job: &Job,
    budgets: &[Budget],
    states: &'a BTreeMap<String, BudgetState>,
) -> Vec<&'a BudgetState> {
    let mut over: Vec<&BudgetState> = budgets
        .iter()
        .filter(|b| selects(b, job))
        .filter_map(|b| states.get(&b.name))
        .filter(|s| s.is_over())
        .collect();
    over.sort_by_key(|s| (s.action != BudgetAction::Stop, s.name.clone()));
    over
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{JobSpec, Origin, Placement, Resources, RetryPolicy, Source};
    use std::time::Duration;

    fn job(name: &str, budget: Option<&str>, team: &str) -> Job {
        Job {
            name: name.into(),
            labels: [("team".to_string(), team.to_string())].into(),
            spec: JobSpec {
                source: Source::None,
                files: vec![],
                setup: vec![],
                run: "true".into(),
                env: BTreeMap::new(),
                secrets: vec![],
                resources: Resources::default(),
                placement: vec![Placement::local()],
                image: None,
                max_duration: None,
                retry: RetryPolicy::default(),
                checkpoint: None,
                artifacts: None,
                stop_when: vec![],
                schedule: None,
                paused: false,
                budget: budget.map(str::to_string),
            },
            runs: vec![],
            spec_hash: "h".into(),
            origin: Origin {
                file: "j.yaml".into(),
                line: 1,
            },
        }
    }

    fn budget(name: &str, limit: f64, selector: &[(&str, &str)], period: Option<u64>) -> Budget {
        Budget {
            name: name.into(),
            labels: BTreeMap::new(),
            limit_usd: limit,
            period: period.map(Duration::from_secs),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            action: BudgetAction::Block,
            origin: Origin {
                file: "b.yaml".into(),
                line: 1,
            },
        }
    }

    #[test]
    fn selection_by_name_or_labels() {
        let by_name = budget("a", 1.0, &[], None);
        let by_label = budget("b", 1.0, &[("team", "vision")], None);
        let jobs = vec![
            job("x", Some("a"), "nlp"),
            job("y", None, "vision"),
            job("z", None, "nlp"),
        ];
        assert_eq!(jobs_of(&by_name, &jobs), vec!["x".to_string()]);
        assert_eq!(jobs_of(&by_label, &jobs), vec!["y".to_string()]);
    }

    #[test]
    fn live_spend_counts_only_inside_the_window() {
        let b = budget("a", 10.0, &[], Some(3600));
        let jobs = vec![job("x", Some("a"), "t")];
        let ledger = BTreeMap::from([("a".to_string(), Usd::from_dollars(4.0))]);
        // Running for two hours at $3/h, but the window is one hour: $3 counts.
        let live = vec![("x".to_string(), Usd::from_dollars(3.0), 10_000 - 7200)];
        let s = &states(&[b], &jobs, &ledger, &live, 10_000)["a"];
        assert_eq!(s.spent_usd, Usd::from_dollars(7.0));
        assert!(!s.is_over());
    }

    #[test]
    fn reaching_the_limit_is_over() {
        let mut b = budget("a", 5.0, &[], None);
        b.action = BudgetAction::Stop;
        let jobs = vec![job("x", Some("a"), "t"), job("y", None, "t")];
        let ledger = BTreeMap::from([("a".to_string(), Usd::from_dollars(5.0))]);
        let st = states(std::slice::from_ref(&b), &jobs, &ledger, &[], 0);
        assert_eq!(over_limit(&jobs[0], &[b.clone()], &st).len(), 1);
        assert!(over_limit(&jobs[1], &[b], &st).is_empty());
    }
}
