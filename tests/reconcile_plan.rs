//! Planner table tests: every case goes through `check`, which renders the plan as
//! stable text and compares it with an insta snapshot.

use asimov::agent::{AgentState, AgentStatus};
use asimov::manifest::{
    Budget, BudgetAction, Job, JobSpec, Origin, Placement, RetryOn, RetryPolicy, Schedule,
};
use asimov::model::{HostStatus, Outcome, OwnerTag, Phase, Progress, ProviderKind, Timestamp, Usd};
use asimov::provider::{Capabilities, ErrorKind, Instance, InstanceState};
use asimov::reconcile::{AgentObservation, Desired, History, ListResult, Observed, plan};
use asimov::store::{AttemptRecord, RunRecord};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const ME: &str = "ctl1";
const NOW: Timestamp = 1_800_000_000;

fn check(desired: &Desired, observed: &Observed, history: &History, now: Timestamp, name: &str) {
    let p = plan(desired, observed, history, now);
    // Pure: the same inputs give the same plan.
    assert_eq!(p, plan(desired, observed, history, now));
    insta::assert_snapshot!(name, p.render());
}

fn job(name: &str, runs: u32, placement: &[ProviderKind]) -> Job {
    let spec = JobSpec {
        placement: placement
            .iter()
            .map(|p| Placement {
                provider: *p,
                ..Placement::local()
            })
            .collect(),
        ..JobSpec::with_run("python train.py")
    };
    Job::from_spec(name, spec, runs, "h1")
}

fn desired(jobs: Vec<Job>) -> Desired {
    Desired::new(jobs, vec![], ME)
}

fn listed(provider: ProviderKind, instances: Vec<Instance>) -> Observed {
    let mut o = Observed::default();
    o.listed.insert(provider, ListResult::Listed(instances));
    o
}

fn instance(provider: ProviderKind, id: &str, tag: OwnerTag, state: InstanceState) -> Instance {
    Instance {
        provider,
        id: id.into(),
        tag,
        state,
        endpoint: None,
        gpu: Some("H100".into()),
        price_per_hour: Usd::from_dollars(2.0),
        created_at: Some(NOW - 600),
        host: None,
    }
}

fn tag(run: &str, attempt: u32) -> OwnerTag {
    OwnerTag::new(ME, run, attempt)
}

fn record(run: &str, job: &str, phase: Phase, attempt: u32) -> RunRecord {
    RunRecord {
        seq: 1,
        phase,
        attempt,
        ..RunRecord::new_pending(run, job, 0, "h1", &BTreeMap::new(), "", NOW - 1000)
    }
}

fn attempt(run: &str, n: u32, provider: ProviderKind, instance: Option<&str>) -> AttemptRecord {
    AttemptRecord {
        run: run.into(),
        attempt: n,
        tag: tag(run, n).render(),
        provider,
        placement_index: 0,
        instance_id: instance.map(str::to_string),
        host: None,
        intent_at: NOW - 700,
        released_at: None,
        outcome: None,
    }
}

fn outcome(text: &str) -> Outcome {
    Outcome::parse(text).unwrap_or_else(|| panic!("no outcome {text:?}"))
}

fn released(mut a: AttemptRecord, text: &str, at: Timestamp) -> AttemptRecord {
    a.outcome = Some(outcome(text));
    a.released_at = Some(at);
    a
}

fn history(runs: Vec<RunRecord>, attempts: Vec<AttemptRecord>) -> History {
    let mut h = History::default();
    for r in runs {
        h.runs.insert(r.name.clone(), r);
    }
    for a in attempts {
        h.attempts.entry(a.run.clone()).or_default().push(a);
    }
    h
}

fn agent(state: AgentState, progress: Option<(u64, u64)>, exit: Option<i32>) -> AgentObservation {
    AgentObservation::Status(AgentStatus {
        state,
        exit_code: exit,
        heartbeat: Some(NOW - 5),
        started_at: Some(NOW - 300),
        finished_at: None,
        progress: progress.map(|(done, t)| Progress {
            done,
            total: Some(t),
        }),
        dead_for: None,
    })
}

const FAKE: ProviderKind = ProviderKind::Fake;

#[test]
fn create_new_run() {
    let d = desired(vec![job("train", 2, &[FAKE])]);
    check(
        &d,
        &listed(FAKE, vec![]),
        &History::default(),
        NOW,
        "create_new_run",
    );
}

#[test]
fn recorded_run_without_attempt_creates() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let h = history(vec![record("train-0", "train", Phase::Pending, 0)], vec![]);
    check(&d, &listed(FAKE, vec![]), &h, NOW, "recorded_run_creates");
}

#[test]
fn unconfigured_provider_blocks() {
    let d = desired(vec![job("train", 1, &[ProviderKind::Lambda])]);
    let h = history(vec![record("train-0", "train", Phase::Pending, 0)], vec![]);
    check(
        &d,
        &listed(FAKE, vec![]),
        &h,
        NOW,
        "unconfigured_provider_blocks",
    );
}

#[test]
fn adopt_listed_intent() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let mut a = attempt("train-0", 1, FAKE, None);
    // Asked for a minute ago: still within any boot timeout.
    a.intent_at = NOW - 60;
    let h = history(
        vec![record("train-0", "train", Phase::Provisioning, 1)],
        vec![a],
    );
    let o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-7",
            tag("train-0", 1),
            InstanceState::Provisioning,
        )],
    );
    check(&d, &o, &h, NOW, "adopt_listed_intent");
}

#[test]
fn start_on_running_instance() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let h = history(
        vec![record("train-0", "train", Phase::Provisioning, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    let mut o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-7",
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    o.agents
        .insert(tag("train-0", 1).render(), AgentObservation::NotStarted);
    check(&d, &o, &h, NOW, "start_on_running_instance");
}

#[test]
fn running_reports_progress_then_idles() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let mut rec = record("train-0", "train", Phase::Starting, 1);
    let h = history(
        vec![rec.clone()],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    let mut o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-7",
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    o.agents.insert(
        tag("train-0", 1).render(),
        agent(AgentState::Running, Some((3, 10)), None),
    );
    check(&d, &o, &h, NOW, "running_reports_progress");
    // Once recorded, the same observation changes nothing.
    rec.phase = Phase::Running;
    rec.reason = "running on fake/i-7".into();
    rec.progress_done = Some(3);
    rec.progress_total = Some(10);
    let h = history(
        vec![rec.clone()],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    check(&d, &o, &h, NOW, "running_steady_state");
    // Issue 7 item 22: what time alone changes makes no op. The agent's progress moved
    // on (the controller records it, as an observation) and the paid run's record was
    // written long ago (its cost so far is derived when read): still nothing to do.
    rec.price_per_hour = Some(Usd::from_dollars(2.0));
    rec.billing_since = Some(NOW - 700);
    rec.updated_at = NOW - 3600;
    let h = history(vec![rec], vec![attempt("train-0", 1, FAKE, Some("i-7"))]);
    o.agents.insert(
        tag("train-0", 1).render(),
        agent(AgentState::Running, Some((7, 10)), None),
    );
    check(&d, &o, &h, NOW, "running_time_alone_plans_nothing");
}

/// Defect 4: an instance stuck in Provisioning was polled forever (billing all the
/// while). Past its provider's boot timeout the attempt ends, the instance is destroyed
/// and the run moves on, with the reason.
#[test]
fn provisioning_past_the_boot_timeout_ends_the_attempt() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let mut rec = record("train-0", "train", Phase::Provisioning, 1);
    rec.reason = "waiting for i-7 to boot".into();
    let booting = |since: Timestamp| {
        let mut a = attempt("train-0", 1, FAKE, Some("i-7"));
        a.intent_at = since;
        history(vec![rec.clone()], vec![a])
    };
    let slow = |boot_timeout: u64| {
        let mut o = listed(
            FAKE,
            vec![instance(
                FAKE,
                "i-7",
                tag("train-0", 1),
                InstanceState::Provisioning,
            )],
        );
        o.capabilities.insert(
            FAKE,
            Capabilities {
                boot_timeout: Duration::from_secs(boot_timeout),
                ..Capabilities::default()
            },
        );
        o
    };
    // Within the timeout: wait (and wake at the deadline at the latest).
    check(
        &d,
        &slow(900),
        &booting(NOW - 700),
        NOW,
        "boot_within_timeout",
    );
    // Past it: ended, destroyed, next attempt after a backoff.
    check(
        &d,
        &slow(600),
        &booting(NOW - 700),
        NOW,
        "boot_timeout_ends_attempt",
    );
    // Its release, then the retry on the (only) placement once the backoff is over.
    let mut ended = attempt("train-0", 1, FAKE, Some("i-7"));
    ended.intent_at = NOW - 700;
    ended.outcome = Some(Outcome::BootTimeout);
    let mut pending = rec.clone();
    pending.phase = Phase::Pending;
    let h = history(vec![pending.clone()], vec![ended.clone()]);
    check(&d, &listed(FAKE, vec![]), &h, NOW, "boot_timeout_released");
    let h = history(
        vec![pending],
        vec![released(ended, "boot-timeout", NOW - 10)],
    );
    check(&d, &listed(FAKE, vec![]), &h, NOW, "boot_timeout_retry");
}

/// Defect 3: an idle controller never looked again. Every key now wants a look within
/// its providers' resync period (never faster than their pacing allows), so a run whose
/// instance bills behind asimov's back, or whose agent went silent, is seen while idle.
#[test]
fn every_key_is_resynced_per_provider() {
    let d = desired(vec![
        job("done", 1, &[FAKE]),
        job("mixed", 1, &[FAKE, ProviderKind::Local]),
    ]);
    let mut done = record("done-0", "done", Phase::Succeeded, 1);
    done.reason = "exit code 0".into();
    let mut mixed = record("mixed-0", "mixed", Phase::Succeeded, 1);
    mixed.reason = "exit code 0".into();
    let h = history(
        vec![done, mixed],
        vec![
            released(
                attempt("done-0", 1, FAKE, Some("i-1")),
                "succeeded",
                NOW - 5,
            ),
            released(
                attempt("mixed-0", 1, FAKE, Some("i-2")),
                "succeeded",
                NOW - 5,
            ),
        ],
    );
    let mut o = listed(FAKE, vec![]);
    o.listed
        .insert(ProviderKind::Local, ListResult::Listed(vec![]));
    // The fake asks for a look every 10 min; local every 2 min but paces at 3 min.
    o.capabilities.insert(
        FAKE,
        Capabilities {
            resync: Duration::from_secs(600),
            ..Capabilities::default()
        },
    );
    let mut local = Capabilities {
        resync: Duration::from_secs(120),
        ..Capabilities::default()
    };
    local.pacing.min_resync = Duration::from_secs(180);
    o.capabilities.insert(ProviderKind::Local, local);
    check(&d, &o, &h, NOW, "resync_per_provider");
}

/// A failed listing's kind reaches the planner: a 429's retry-after decides when to
/// look again, not a fixed wait; credentials that need a person are looked at rarely.
#[test]
fn failed_listing_requeue_follows_its_kind() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let mut rec = record("train-0", "train", Phase::Running, 1);
    rec.reason = "running on fake/i-7".into();
    let h = history(vec![rec], vec![attempt("train-0", 1, FAKE, Some("i-7"))]);
    let failed = |kind: ErrorKind| {
        let mut o = Observed::default();
        o.listed.insert(
            FAKE,
            ListResult::Failed {
                kind,
                message: "refused".into(),
            },
        );
        o
    };
    let limited = ErrorKind::RateLimited {
        retry_after: Some(Duration::from_secs(42)),
    };
    check(&d, &failed(limited), &h, NOW, "failed_listing_rate_limited");
    check(
        &d,
        &failed(ErrorKind::PaymentRequired),
        &h,
        NOW,
        "failed_listing_payment_required",
    );
}

#[test]
fn restart_on_preemption() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let h = history(
        vec![record("train-0", "train", Phase::Running, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    check(&d, &listed(FAKE, vec![]), &h, NOW, "preempted_is_released");
    // Next pass: the released attempt is followed by a new one on the same placement.
    let mut rec = record("train-0", "train", Phase::Pending, 1);
    rec.reason = "instance preempted; restart 1 of 3".into();
    let h = history(
        vec![rec],
        vec![released(
            attempt("train-0", 1, FAKE, Some("i-7")),
            "preempted",
            NOW - 1,
        )],
    );
    check(&d, &listed(FAKE, vec![]), &h, NOW, "preempted_restarts");
}

#[test]
fn preemption_not_retried_fails() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.retry = RetryPolicy {
        on: vec![RetryOn::Error],
        max_restarts: 3,
        ..RetryPolicy::default()
    };
    let h = history(
        vec![record("train-0", "train", Phase::Running, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    check(
        &desired(vec![j]),
        &listed(FAKE, vec![]),
        &h,
        NOW,
        "preemption_not_retried",
    );
}

#[test]
fn failure_retried_then_exhausted() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.retry = RetryPolicy {
        on: vec![RetryOn::Error],
        max_restarts: 1,
        ..RetryPolicy::default()
    };
    let d = desired(vec![j]);
    let o = |id: &str, n: u32| {
        let mut o = listed(
            FAKE,
            vec![instance(
                FAKE,
                id,
                tag("train-0", n),
                InstanceState::Running,
            )],
        );
        o.agents.insert(
            tag("train-0", n).render(),
            agent(AgentState::Failed, Some((5, 10)), Some(3)),
        );
        o
    };
    let h = history(
        vec![record("train-0", "train", Phase::Running, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-1"))],
    );
    check(&d, &o("i-1", 1), &h, NOW, "failure_retried");
    let h = history(
        vec![record("train-0", "train", Phase::Running, 2)],
        vec![
            released(
                attempt("train-0", 1, FAKE, Some("i-1")),
                "failed",
                NOW - 400,
            ),
            attempt("train-0", 2, FAKE, Some("i-2")),
        ],
    );
    check(&d, &o("i-2", 2), &h, NOW, "failure_retries_exhausted");
}

#[test]
fn destroy_on_success() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let inst = instance(FAKE, "i-7", tag("train-0", 1), InstanceState::Running);
    let mut o = listed(FAKE, vec![inst.clone()]);
    o.agents.insert(
        tag("train-0", 1).render(),
        agent(AgentState::Succeeded, Some((10, 10)), Some(0)),
    );
    let h = history(
        vec![record("train-0", "train", Phase::Running, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    check(&d, &o, &h, NOW, "success_collects_and_destroys");
    // The destroy did not land yet: destroy again; once gone: release; then idle.
    let mut rec = record("train-0", "train", Phase::Succeeded, 1);
    rec.reason = "exit code 0".into();
    let mut a = attempt("train-0", 1, FAKE, Some("i-7"));
    a.outcome = Some(Outcome::Succeeded);
    let h = history(vec![rec.clone()], vec![a.clone()]);
    check(
        &d,
        &listed(FAKE, vec![inst]),
        &h,
        NOW,
        "success_destroy_again",
    );
    check(&d, &listed(FAKE, vec![]), &h, NOW, "success_release");
    let h = history(vec![rec], vec![released(a, "succeeded", NOW)]);
    check(&d, &listed(FAKE, vec![]), &h, NOW, "success_idle");
}

#[test]
fn orphans_are_destroyed() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let mut rec = record("train-0", "train", Phase::Running, 2);
    rec.reason = "running on fake/i-2".into();
    let h = history(
        vec![rec],
        vec![
            released(
                attempt("train-0", 1, FAKE, Some("i-1")),
                "preempted",
                NOW - 500,
            ),
            attempt("train-0", 2, FAKE, Some("i-2")),
        ],
    );
    let o = listed(
        FAKE,
        vec![
            // A run nobody knows.
            instance(FAKE, "i-9", tag("ghost-0", 1), InstanceState::Running),
            // An attempt already released that came back.
            instance(FAKE, "i-1", tag("train-0", 1), InstanceState::Running),
            // The live one: kept.
            instance(FAKE, "i-2", tag("train-0", 2), InstanceState::Running),
            // A second instance under the live tag.
            instance(FAKE, "i-3", tag("train-0", 2), InstanceState::Running),
            // An attempt number never recorded.
            instance(FAKE, "i-4", tag("train-0", 5), InstanceState::Running),
        ],
    );
    check(&d, &o, &h, NOW, "orphans_are_destroyed");
}

#[test]
fn other_controllers_instances_are_left_alone() {
    let d = desired(vec![]);
    let o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-1",
            OwnerTag::new("someone-else", "train-0", 1),
            InstanceState::Running,
        )],
    );
    check(
        &d,
        &o,
        &History::default(),
        NOW,
        "other_controller_left_alone",
    );
}

fn budget(action: BudgetAction) -> Budget {
    Budget {
        name: "team-a".into(),
        labels: BTreeMap::new(),
        limit_usd: 10.0,
        period: None,
        selector: BTreeMap::new(),
        action,
        origin: Origin {
            file: "b.yaml".into(),
            line: 1,
        },
    }
}

#[test]
fn blocked_by_budget() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.budget = Some("team-a".into());
    let mut d = desired(vec![j]);
    Arc::make_mut(&mut d.manifests).budgets = vec![budget(BudgetAction::Block)];
    let mut h = history(vec![record("train-0", "train", Phase::Pending, 0)], vec![]);
    h.spent.insert("team-a".into(), Usd::from_dollars(10.5));
    check(&d, &listed(FAKE, vec![]), &h, NOW, "blocked_by_budget");
    // Under the limit: created.
    h.spent.insert("team-a".into(), Usd::from_dollars(9.0));
    check(&d, &listed(FAKE, vec![]), &h, NOW, "under_budget_creates");
}

#[test]
fn budget_stop_destroys_running() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.budget = Some("team-a".into());
    let mut d = desired(vec![j]);
    Arc::make_mut(&mut d.manifests).budgets = vec![budget(BudgetAction::Stop)];
    let mut h = history(
        vec![record("train-0", "train", Phase::Running, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    // $9 in the ledger plus 10 minutes at $2/h of the live instance: over $10.
    h.spent.insert("team-a".into(), Usd::from_dollars(9.9));
    let mut o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-7",
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    o.agents.insert(
        tag("train-0", 1).render(),
        agent(AgentState::Running, Some((3, 10)), None),
    );
    check(&d, &o, &h, NOW, "budget_stop_destroys_running");
}

#[test]
fn scheduled_in_future_waits() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.schedule = Some(Schedule {
        at: Some(NOW + 3600),
        ..Schedule::default()
    });
    let h = history(vec![record("train-0", "train", Phase::Pending, 0)], vec![]);
    check(
        &desired(vec![j]),
        &listed(FAKE, vec![]),
        &h,
        NOW,
        "scheduled_in_future",
    );
}

fn failed_listing() -> Observed {
    let mut o = Observed::default();
    o.listed.insert(
        FAKE,
        ListResult::Failed {
            kind: ErrorKind::Transient,
            message: "connection reset".into(),
        },
    );
    o
}

#[test]
fn failed_listing_never_destroys_or_forgets() {
    // A running run whose instance the failed listing does not show: not preempted.
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let mut rec = record("train-0", "train", Phase::Running, 1);
    rec.reason = "running on fake/i-7".into();
    let h = history(vec![rec], vec![attempt("train-0", 1, FAKE, Some("i-7"))]);
    check(&d, &failed_listing(), &h, NOW, "failed_listing_running");
    // A deleted job: marked Deleting, but not released nor forgotten.
    let mut rec = record("old-0", "old", Phase::Deleting, 1);
    rec.reason = "job deleted".into();
    let h = history(vec![rec], vec![attempt("old-0", 1, FAKE, Some("i-3"))]);
    check(
        &desired(vec![]),
        &failed_listing(),
        &h,
        NOW,
        "failed_listing_deleted",
    );
}

#[test]
fn intent_grace_before_recreate() {
    let vast = ProviderKind::Vast;
    // A cloud that may take two minutes to list what it created.
    let lagging = |o: Observed| {
        let mut o = o;
        o.capabilities.insert(
            vast,
            Capabilities {
                listing_lag: Duration::from_secs(120),
                ..Capabilities::default()
            },
        );
        o
    };
    let d = desired(vec![job("train", 1, &[vast])]);
    let mut a = attempt("train-0", 1, vast, None);
    a.intent_at = NOW - 30;
    let h = history(
        vec![record("train-0", "train", Phase::Provisioning, 1)],
        vec![a.clone()],
    );
    check(
        &d,
        &lagging(listed(vast, vec![])),
        &h,
        NOW,
        "intent_within_grace_waits",
    );
    a.intent_at = NOW - 130;
    let h = history(
        vec![record("train-0", "train", Phase::Provisioning, 1)],
        vec![a],
    );
    check(
        &d,
        &lagging(listed(vast, vec![])),
        &h,
        NOW,
        "intent_after_grace_recreates_same_tag",
    );
}

#[test]
fn placement_failover_loops_back() {
    let ps = [ProviderKind::Lambda, ProviderKind::Vast, FAKE];
    let mut j = job("train", 1, &ps);
    j.spec.retry = RetryPolicy {
        on: vec![RetryOn::NoCapacity],
        max_restarts: 0,
        ..RetryPolicy::default()
    };
    let d = desired(vec![j]);
    let mut o = Observed::default();
    for p in ps {
        o.listed.insert(p, ListResult::Listed(vec![]));
    }
    let nc = |n: u32, p: ProviderKind, idx: u32, at: Timestamp| {
        let mut a = released(attempt("train-0", n, p, None), "no-capacity", at);
        a.placement_index = idx;
        a
    };
    // Lambda full: next is Vast after a 5 s backoff.
    let h = history(
        vec![record("train-0", "train", Phase::Pending, 1)],
        vec![nc(1, ps[0], 0, NOW - 10)],
    );
    check(&d, &o, &h, NOW, "failover_to_second");
    // All three full, the last just now: wait for the backoff, then loop back to Lambda.
    let h = history(
        vec![record("train-0", "train", Phase::Pending, 3)],
        vec![
            nc(1, ps[0], 0, NOW - 100),
            nc(2, ps[1], 1, NOW - 50),
            nc(3, ps[2], 2, NOW - 1),
        ],
    );
    check(&d, &o, &h, NOW, "failover_backoff_waits");
    check(&d, &o, &h, NOW + 30, "failover_loops_back_to_first");
}

#[test]
fn no_capacity_not_retried_fails_after_every_placement() {
    let ps = [ProviderKind::Lambda, FAKE];
    let mut j = job("train", 1, &ps);
    j.spec.retry = RetryPolicy {
        on: vec![],
        max_restarts: 0,
        ..RetryPolicy::default()
    };
    let mut o = Observed::default();
    for p in ps {
        o.listed.insert(p, ListResult::Listed(vec![]));
    }
    let mut a2 = released(attempt("train-0", 2, FAKE, None), "no-capacity", NOW - 1);
    a2.placement_index = 1;
    let h = history(
        vec![record("train-0", "train", Phase::Pending, 2)],
        vec![
            released(attempt("train-0", 1, ps[0], None), "no-capacity", NOW - 20),
            a2,
        ],
    );
    check(
        &desired(vec![j]),
        &o,
        &h,
        NOW,
        "no_capacity_not_retried_fails",
    );
}

#[test]
fn deleted_job_destroys_then_forgets() {
    let d = desired(vec![]);
    let h = history(
        vec![record("old-0", "old", Phase::Running, 1)],
        vec![attempt("old-0", 1, FAKE, Some("i-3"))],
    );
    let o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-3",
            tag("old-0", 1),
            InstanceState::Running,
        )],
    );
    check(&d, &o, &h, NOW, "deleted_destroys");
    // Its agent answered: the final sync comes first, in the same op group.
    let mut seen = h.clone();
    seen.seen.insert("old-0".into(), (1, NOW - 5));
    check(&d, &o, &seen, NOW, "deleted_running_syncs_then_destroys");
    let mut rec = record("old-0", "old", Phase::Deleting, 1);
    rec.reason = "job deleted".into();
    let h = history(
        vec![rec.clone()],
        vec![attempt("old-0", 1, FAKE, Some("i-3"))],
    );
    check(&d, &o, &h, NOW, "deleted_still_listed");
    check(
        &d,
        &listed(FAKE, vec![]),
        &h,
        NOW,
        "deleted_gone_releases_and_forgets",
    );
    let h = history(
        vec![rec],
        vec![released(
            attempt("old-0", 1, FAKE, Some("i-3")),
            "deleted",
            NOW,
        )],
    );
    check(
        &d,
        &listed(FAKE, vec![]),
        &h,
        NOW,
        "deleted_released_forgets",
    );
}

#[test]
fn spec_change_on_finished_run_starts_fresh() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec_hash = "h2".into();
    let mut rec = record("train-0", "train", Phase::Succeeded, 1);
    rec.reason = "exit code 0".into();
    let h = history(
        vec![rec],
        vec![released(
            attempt("train-0", 1, FAKE, Some("i-1")),
            "succeeded",
            NOW - 50,
        )],
    );
    let d = desired(vec![j]);
    check(
        &d,
        &listed(FAKE, vec![]),
        &h,
        NOW,
        "spec_change_fresh_attempt",
    );
    // After the RecordRun landed (it marked attempt 1) but the create did not: still a
    // fresh attempt, not "Succeeded" again.
    let mut rec = record("train-0", "train", Phase::Pending, 1);
    rec.spec_hash = "h2".into();
    let h = history(
        vec![rec],
        vec![released(
            attempt("train-0", 1, FAKE, Some("i-1")),
            "succeeded (spec changed)",
            NOW - 50,
        )],
    );
    check(
        &d,
        &listed(FAKE, vec![]),
        &h,
        NOW,
        "spec_change_after_record",
    );
}

#[test]
fn max_duration_exceeded_and_stale_heartbeat() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.max_duration = Some(Duration::from_secs(60));
    let h = history(
        vec![record("train-0", "train", Phase::Running, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    let mut o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-7",
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    o.agents.insert(
        tag("train-0", 1).render(),
        agent(AgentState::Running, Some((3, 10)), None),
    );
    check(&desired(vec![j]), &o, &h, NOW, "max_duration_exceeded");
    let mut stale = AgentStatus {
        state: AgentState::Running,
        exit_code: None,
        heartbeat: Some(NOW - 90),
        started_at: Some(NOW - 300),
        finished_at: None,
        progress: None,
        dead_for: None,
    };
    o.agents.insert(
        tag("train-0", 1).render(),
        AgentObservation::Status(stale.clone()),
    );
    let d = desired(vec![job("train", 1, &[FAKE])]);
    check(&d, &o, &h, NOW, "stale_heartbeat_is_lost");
    stale.heartbeat = Some(NOW - 30);
    o.agents
        .insert(tag("train-0", 1).render(), AgentObservation::Status(stale));
    let mut rec = record("train-0", "train", Phase::Running, 1);
    rec.reason = "running on fake/i-7".into();
    let h = history(vec![rec], vec![attempt("train-0", 1, FAKE, Some("i-7"))]);
    check(&d, &o, &h, NOW, "fresh_heartbeat_is_fine");
}

/// A limit too large for seconds in an `i64` (the manifest refuses it; a job built in
/// code need not) and a start time in the far past do not wrap into "exceeded".
#[test]
fn huge_max_duration_does_not_wrap() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.max_duration = Some(Duration::from_secs(u64::MAX));
    let h = history(
        vec![record("train-0", "train", Phase::Running, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    let mut o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-7",
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    for started_at in [NOW - 300, i64::MIN] {
        o.agents.insert(
            tag("train-0", 1).render(),
            AgentObservation::Status(AgentStatus {
                state: AgentState::Running,
                exit_code: None,
                heartbeat: Some(NOW - 5),
                started_at: Some(started_at),
                finished_at: None,
                progress: None,
                dead_for: None,
            }),
        );
        let p = plan(&desired(vec![j.clone()]), &o, &h, NOW).render();
        assert!(!p.contains("max_duration"), "started at {started_at}: {p}");
    }
}

#[test]
fn planner_sources_stay_pure() {
    for file in [
        "src/reconcile/plan.rs",
        "src/reconcile/budget.rs",
        "src/reconcile/preview.rs",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).expect("read planner source");
        for banned in [
            "tokio",
            "std::fs",
            "SystemTime",
            "Instant::now",
            "reqwest",
            "rusqlite",
        ] {
            assert!(
                !text.contains(banned),
                "{file} mentions {banned}: the planner must stay pure"
            );
        }
    }
}

/// What a provider is reaches the planner, executor and controller as data (its
/// capabilities, its hosts): none of them names a provider to decide anything.
#[test]
fn reconcile_names_no_provider() {
    for file in [
        "src/reconcile/plan.rs",
        "src/reconcile/execute.rs",
        "src/reconcile/controller.rs",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).expect("read reconcile source");
        for banned in [
            "ProviderKind::",
            "provider::ssh",
            "provider::local",
            "provider::fake",
            "SshProvider",
            "LocalProvider",
            "FakeProvider",
        ] {
            assert!(
                !text.contains(banned),
                "{file} mentions {banned}: provider facts belong to the provider"
            );
        }
    }
}

#[test]
fn spec_change_waits_for_the_old_instance_to_go() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec_hash = "h2".into();
    let mut rec = record("train-0", "train", Phase::Succeeded, 1);
    rec.reason = "exit code 0".into();
    let mut a = attempt("train-0", 1, FAKE, Some("i-1"));
    a.outcome = Some(Outcome::Succeeded);
    let h = history(vec![rec], vec![a]);
    let o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-1",
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    check(
        &desired(vec![j]),
        &o,
        &h,
        NOW,
        "spec_change_waits_for_old_instance",
    );
}

#[test]
fn edited_job_after_exhausted_failure_gets_all_restarts() {
    let mut j = job("train", 1, &[FAKE]);
    j.spec.retry = RetryPolicy {
        on: vec![RetryOn::Error],
        max_restarts: 1,
        ..RetryPolicy::default()
    };
    let d = desired(vec![j]);
    // Attempt 2 exhausted the restarts; the job was then edited (attempt 2 superseded)
    // and attempt 3 failed: a restart is still left in the new generation.
    let mut rec = record("train-0", "train", Phase::Running, 3);
    rec.spec_hash = "h1".into();
    let h = history(
        vec![rec],
        vec![
            released(
                attempt("train-0", 1, FAKE, Some("i-1")),
                "failed",
                NOW - 900,
            ),
            released(
                attempt("train-0", 2, FAKE, Some("i-2")),
                "failed (spec changed)",
                NOW - 800,
            ),
            attempt("train-0", 3, FAKE, Some("i-3")),
        ],
    );
    let mut o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-3",
            tag("train-0", 3),
            InstanceState::Running,
        )],
    );
    o.agents.insert(
        tag("train-0", 3).render(),
        agent(AgentState::Failed, None, Some(1)),
    );
    check(&d, &o, &h, NOW, "edited_job_restarts_again");
}

// ---- fleet queue ------------------------------------------------------------------

const SSH: ProviderKind = ProviderKind::Ssh;

/// A job placed on fleet `lab`, asking for `gpus` GPUs (none when 0).
fn fleet_job(name: &str, runs: u32, gpus: u32) -> Job {
    let mut j = job(name, runs, &[SSH]);
    j.spec.placement[0].fleet = Some("lab".into());
    if gpus > 0 {
        j.spec.resources.gpu = Some(asimov::manifest::GpuRequest {
            names: vec![],
            count: gpus,
            min_vram_gb: None,
        });
    }
    j
}

fn host(name: &str, gpus: u32) -> HostStatus {
    HostStatus {
        fleet: "lab".into(),
        host: name.into(),
        reachable: true,
        gpus_total: gpus,
        gpus_free: gpus,
        ..HostStatus::default()
    }
}

/// `host` with one slot of `gpus` GPUs taken (0: the whole host) by someone else.
fn used(h: HostStatus, gpus: u32) -> HostStatus {
    used_by(h, gpus, "other-0", 1)
}

/// `host` with the slot of `run`'s attempt `attempt` on it, holding `gpus` GPUs.
fn used_by(mut h: HostStatus, gpus: u32, run: &str, attempt: u32) -> HostStatus {
    h.take(gpus, &tag(run, attempt).render());
    h
}

fn down(mut h: HostStatus) -> HostStatus {
    h.reachable = false;
    h
}

/// The capabilities of a fixed pool, as the ssh provider declares them.
fn pool() -> Capabilities {
    Capabilities {
        fixed_pool: true,
        ..Capabilities::default()
    }
}

fn fleet_observed(instances: Vec<Instance>, hosts: Vec<HostStatus>) -> Observed {
    let mut o = listed(SSH, instances);
    o.capabilities.insert(SSH, pool());
    o.hosts.insert(SSH, hosts);
    o
}

fn slot(run: &str, attempt: u32, host: &str, state: InstanceState) -> Instance {
    let t = tag(run, attempt);
    let mut i = instance(SSH, &format!("lab/{host}/{}", t.render()), t, state);
    i.host = Some(host.into());
    i.price_per_hour = Usd::ZERO;
    i
}

fn queued_records(job: &str, seqs: &[i64]) -> Vec<RunRecord> {
    seqs.iter()
        .enumerate()
        .map(|(i, seq)| {
            let mut r = record(&format!("{job}-{i}"), job, Phase::Pending, 0);
            r.seq = *seq;
            r
        })
        .collect()
}

#[test]
fn fleet_queue_holds_the_third_of_three_on_two_hosts() {
    let d = desired(vec![fleet_job("train", 3, 0)]);
    let h = history(queued_records("train", &[1, 2, 3]), vec![]);
    let o = fleet_observed(vec![], vec![host("h1", 0), host("h2", 0)]);
    check(&d, &o, &h, NOW, "fleet_queue_holds_third");
}

#[test]
fn fleet_queue_respects_apply_order_across_jobs() {
    // `b` was applied first (seq 1), `a` after (seq 2, 3); one free host.
    let d = desired(vec![fleet_job("a", 2, 0), fleet_job("b", 1, 0)]);
    let mut recs = queued_records("a", &[2, 3]);
    recs.extend(queued_records("b", &[1]));
    let h = history(recs, vec![]);
    let o = fleet_observed(vec![], vec![host("h1", 0)]);
    check(&d, &o, &h, NOW, "fleet_queue_apply_order");
}

#[test]
fn fleet_queue_gpu_host_fits_two_one_gpu_jobs() {
    let d = desired(vec![fleet_job("train", 3, 1)]);
    let h = history(queued_records("train", &[1, 2, 3]), vec![]);
    let o = fleet_observed(vec![], vec![host("gpu", 2)]);
    check(&d, &o, &h, NOW, "fleet_queue_gpu_slots");
    // One GPU already taken: only one more fits.
    let o = fleet_observed(vec![], vec![used(host("gpu", 2), 1)]);
    let p = plan(&d, &o, &h, NOW);
    let creates = p.ops.iter().filter(|op| op.kind() == "create").count();
    assert_eq!(creates, 1, "{}", p.render());
}

#[test]
fn fleet_queue_picks_up_a_freed_host_next_pass() {
    let d = desired(vec![fleet_job("train", 2, 0)]);
    let mut running = record("train-0", "train", Phase::Running, 1);
    running.reason = "running on ssh/lab/h1/asimov.ctl1.train-0.1".into();
    let mut waiting = queued_records("train", &[1, 2]).remove(1);
    waiting.reason = "waiting for a free host in fleet lab (next in line)".into();
    let a1 = attempt("train-0", 1, SSH, Some("lab/h1/asimov.ctl1.train-0.1"));
    // Pass 1: train-0 finished; its slot still holds the host.
    let h = history(vec![running, waiting.clone()], vec![a1.clone()]);
    let mut o = fleet_observed(
        vec![slot("train-0", 1, "h1", InstanceState::Running)],
        vec![used_by(host("h1", 0), 0, "train-0", 1)],
    );
    o.agents.insert(
        tag("train-0", 1).render(),
        agent(AgentState::Succeeded, None, Some(0)),
    );
    check(&d, &o, &h, NOW, "fleet_queue_busy_until_destroyed");
    // Pass 2: the slot is destroyed and released; the host is free again.
    let mut done = record("train-0", "train", Phase::Succeeded, 1);
    done.reason = "exit code 0".into();
    let h = history(
        vec![done, waiting],
        vec![released(a1, "succeeded", NOW - 1)],
    );
    let o = fleet_observed(vec![], vec![host("h1", 0)]);
    check(&d, &o, &h, NOW, "fleet_queue_freed_host_taken");
}

#[test]
fn fleet_queue_race_no_capacity_requeues_without_backoff() {
    let d = desired(vec![fleet_job("train", 1, 0)]);
    let mut rec = record("train-0", "train", Phase::Pending, 1);
    rec.reason = "no free host on ssh".into();
    let h = history(
        vec![rec],
        vec![released(
            attempt("train-0", 1, SSH, None),
            "queued",
            NOW - 1,
        )],
    );
    let o = fleet_observed(vec![], vec![host("h1", 0)]);
    check(&d, &o, &h, NOW, "fleet_queue_race_requeued");
    // Still full: waits in the queue at the fast requeue, no backoff, no failure.
    let o = fleet_observed(vec![], vec![used(host("h1", 0), 0)]);
    check(&d, &o, &h, NOW, "fleet_queue_race_still_full");
}

#[test]
fn fleet_queue_skips_unreachable_hosts() {
    let d = desired(vec![fleet_job("train", 2, 0)]);
    let h = history(queued_records("train", &[1, 2]), vec![]);
    let o = fleet_observed(vec![], vec![down(host("h1", 0)), host("h2", 0)]);
    check(&d, &o, &h, NOW, "fleet_queue_unreachable_skipped");
}

#[test]
fn unreachable_host_reschedules_elsewhere() {
    let d = desired(vec![fleet_job("train", 1, 0)]);
    let id1 = "lab/h1/asimov.ctl1.train-0.1";
    let a1 = attempt("train-0", 1, SSH, Some(id1));
    let mut rec = record("train-0", "train", Phase::Running, 1);
    rec.reason = format!("running on ssh/{id1}");
    let stranded = slot("train-0", 1, "h1", InstanceState::Stopped);
    let hosts = vec![down(used_by(host("h1", 0), 0, "train-0", 1)), host("h2", 0)];
    // Pass 1: h1 stopped answering; its slot is listed Stopped: a preemption. No
    // destroy while the host is down.
    let h = history(vec![rec.clone()], vec![a1.clone()]);
    let o = fleet_observed(vec![stranded.clone()], hosts.clone());
    check(&d, &o, &h, NOW, "unreachable_host_preempts");
    // Pass 2: the attempt ended but cannot be destroyed yet; the run goes on on h2.
    rec.phase = Phase::Pending;
    rec.reason = "instance preempted; restart 1 of 3".into();
    let mut ended = a1.clone();
    ended.outcome = Some(Outcome::Preempted);
    let h = history(vec![rec.clone()], vec![ended.clone()]);
    check(&d, &o, &h, NOW, "unreachable_host_new_attempt");
    // The new attempt runs on h2; h1 is still down: nothing touches the old slot, and
    // the run's live instance is attempt 2's.
    let id2 = "lab/h2/asimov.ctl1.train-0.2";
    let mut rec2 = rec.clone();
    rec2.attempt = 2;
    rec2.phase = Phase::Running;
    rec2.reason = format!("running on ssh/{id2}");
    let a2 = attempt("train-0", 2, SSH, Some(id2));
    let h = history(vec![rec2], vec![ended.clone(), a2]);
    let mut o = fleet_observed(
        vec![stranded, slot("train-0", 2, "h2", InstanceState::Running)],
        vec![
            down(used_by(host("h1", 0), 0, "train-0", 1)),
            used_by(host("h2", 0), 0, "train-0", 2),
        ],
    );
    o.agents.insert(
        tag("train-0", 2).render(),
        agent(AgentState::Running, None, None),
    );
    check(&d, &o, &h, NOW, "unreachable_host_old_slot_waits");
    // h1 answers again: its old slot is destroyed, then released.
    o.listed.insert(
        SSH,
        ListResult::Listed(vec![
            slot("train-0", 1, "h1", InstanceState::Running),
            slot("train-0", 2, "h2", InstanceState::Running),
        ]),
    );
    o.hosts.insert(
        SSH,
        vec![
            used_by(host("h1", 0), 0, "train-0", 1),
            used_by(host("h2", 0), 0, "train-0", 2),
        ],
    );
    check(&d, &o, &h, NOW, "unreachable_host_back_destroys_old_slot");
}

/// A create cut off between its attempt intent and its run row (a crash, or a failed
/// store write, while other runs' ops ran) leaves attempt 1 open with the run row still
/// at attempt 0. That intent is the run's current attempt: it is re-created under the
/// same tag (or adopted when listed), never superseded by an attempt 2.
#[test]
fn intent_ahead_of_run_row_is_the_current_attempt() {
    let local = ProviderKind::Local;
    let d = desired(vec![job("train", 1, &[local])]);
    let mut a = attempt("train-0", 1, local, None);
    a.intent_at = NOW - 2;
    let h = history(
        vec![record("train-0", "train", Phase::Pending, 0)],
        vec![a.clone()],
    );
    check(
        &d,
        &listed(local, vec![]),
        &h,
        NOW,
        "intent_ahead_of_run_row_recreates_same_tag",
    );
    let o = listed(
        local,
        vec![instance(
            local,
            &tag("train-0", 1).render(),
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    check(&d, &o, &h, NOW, "intent_ahead_of_run_row_adopts");
}

/// An agent stuck in setup whose supervisor is dead (`dead_for`, by the machine's own
/// clock) is lost once past the heartbeat threshold, and waited for before it: a
/// supervisor that died before the job started leaves no heartbeat to go stale.
#[test]
fn a_dead_supervisor_in_setup_is_lost_past_the_threshold() {
    let d = desired(vec![job("train", 1, &[FAKE])]);
    let h = history(
        vec![record("train-0", "train", Phase::Starting, 1)],
        vec![attempt("train-0", 1, FAKE, Some("i-7"))],
    );
    let mut o = listed(
        FAKE,
        vec![instance(
            FAKE,
            "i-7",
            tag("train-0", 1),
            InstanceState::Running,
        )],
    );
    let setup = |dead_for| {
        AgentObservation::Status(AgentStatus {
            state: AgentState::Setup,
            exit_code: None,
            heartbeat: None,
            started_at: None,
            finished_at: None,
            progress: None,
            dead_for,
        })
    };
    let ends = |o: &Observed| {
        let p = plan(&d, o, &h, NOW).render();
        (p.contains("destroy") && p.contains("lost"), p)
    };
    o.agents.insert(tag("train-0", 1).render(), setup(Some(61)));
    let (lost, p) = ends(&o);
    assert!(lost, "past the threshold the attempt ends as lost:\n{p}");
    o.agents.insert(tag("train-0", 1).render(), setup(Some(30)));
    let (lost, p) = ends(&o);
    assert!(!lost, "within the threshold it is waited for:\n{p}");
    o.agents.insert(tag("train-0", 1).render(), setup(None));
    let (lost, p) = ends(&o);
    assert!(
        !lost,
        "a live supervisor's setup takes as long as it takes:\n{p}"
    );
}
