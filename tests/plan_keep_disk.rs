//! Planner table tests for `keep_disk_on_pause`: a pause that stops the instance with
//! its disk kept instead of destroying it, the resume that starts it again and runs the
//! job on the same disk, a start refused or an instance gone (a new attempt from the
//! synced checkpoint), a delete while paused (the stopped instance destroyed), and
//! budgets counting a stopped instance at its storage price. Every case goes through
//! `check` (insta snapshots of the rendered plan).

use asimov::manifest::{Budget, BudgetAction, Checkpoint, Job, JobSpec, Origin, Placement};
use asimov::model::{Outcome, OwnerTag, Phase, ProviderKind, Timestamp, Usd};
use asimov::provider::{Capabilities, Instance, InstanceState};
use asimov::reconcile::{Desired, History, ListResult, Observed, plan};
use asimov::store::{AttemptRecord, KeptDisk, Pause, RunRecord};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const ME: &str = "ctl1";
const NOW: Timestamp = 1_800_000_000;
const VAST: ProviderKind = ProviderKind::Vast;
const RUN: &str = "train-0";

fn check(desired: &Desired, observed: &Observed, history: &History, name: &str) -> String {
    let p = plan(desired, observed, history, NOW);
    assert_eq!(p, plan(desired, observed, history, NOW), "pure");
    let text = p.render();
    insta::assert_snapshot!(name, text);
    text
}

fn job(runs: u32, keep: bool) -> Job {
    let spec = JobSpec {
        placement: vec![Placement {
            provider: VAST,
            keep_disk_on_pause: keep,
            ..Placement::local()
        }],
        checkpoint: Some(Checkpoint {
            path: "ckpt".into(),
            every: Some(Duration::from_secs(3600)),
        }),
        ..JobSpec::with_run("python train.py")
    };
    Job::from_spec("train", spec, runs, "h1")
}

fn desired(jobs: Vec<Job>) -> Desired {
    Desired::new(jobs, vec![], ME)
}

/// Vast as it declares itself: keeps a disk, bills while stopped.
fn observed(instances: Vec<Instance>) -> Observed {
    let mut o = Observed::default();
    o.listed.insert(VAST, ListResult::Listed(instances));
    o.capabilities.insert(
        VAST,
        Capabilities {
            bills_while_stopped: true,
            keep_disk: Some(Duration::from_secs(300)),
            ..Capabilities::default()
        },
    );
    o
}

fn instance(state: InstanceState, price: f64) -> Instance {
    Instance {
        provider: VAST,
        id: "4242".into(),
        tag: OwnerTag::new(ME, RUN, 1),
        state,
        endpoint: None,
        gpu: Some("1x RTX 4090".into()),
        price_per_hour: Usd::from_dollars(price),
        created_at: Some(NOW - 7200),
        host: None,
    }
}

fn record(phase: Phase, reason: &str) -> RunRecord {
    RunRecord {
        seq: 1,
        phase,
        attempt: 1,
        reason: reason.into(),
        instance_id: Some("4242".into()),
        price_per_hour: Some(Usd::from_dollars(0.35)),
        billing_since: Some(NOW - 7200),
        ..RunRecord::new_pending(RUN, "train", 0, "h1", &BTreeMap::new(), "", NOW - 8000)
    }
}

fn attempt() -> AttemptRecord {
    AttemptRecord {
        run: RUN.into(),
        attempt: 1,
        tag: OwnerTag::new(ME, RUN, 1).render(),
        provider: VAST,
        placement_index: 0,
        instance_id: Some("4242".into()),
        host: None,
        intent_at: NOW - 7200,
        released_at: None,
        outcome: None,
    }
}

/// The run with its open attempt 1, seen running a minute ago; `paused` as `asimov
/// pause` (true) or `asimov resume` (false) left it; `kept` its disk record.
fn history(rec: RunRecord, paused: bool, kept: Option<KeptDisk>) -> History {
    let mut h = History::default();
    h.runs.insert(RUN.into(), rec);
    h.attempts.insert(RUN.into(), vec![attempt()]);
    h.seen.insert(RUN.into(), (1, NOW - 60));
    h.pauses.insert(
        RUN.into(),
        Pause {
            paused,
            at: NOW - 30,
        },
    );
    if let Some(k) = kept {
        h.kept.insert((RUN.into(), 1), k);
    }
    h
}

fn kept(stopped: bool, refused: Option<&str>) -> Option<KeptDisk> {
    Some(KeptDisk {
        at: NOW - 20,
        stopped_at: stopped.then_some(NOW - 19),
        refused: refused.map(str::to_string),
    })
}

#[test]
fn a_pause_keeping_the_disk_syncs_once_then_stops_the_instance_instead_of_destroying_it() {
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![instance(InstanceState::Running, 0.35)]),
        &history(record(Phase::Running, "running"), true, None),
        "pause_keep_running",
    );
    assert!(text.contains("keep-disk train-0 attempt=1"), "{text}");
    assert!(text.contains("collect train-0"), "{text}");
    assert!(
        text.contains("stop-keeping-disk train-0 attempt=1 vast/4242"),
        "{text}"
    );
    assert!(!text.contains("destroy"), "{text}");
    assert!(!text.contains("ended="), "the attempt stays open: {text}");
    // The op order: recorded kept, the final sync, then the stop.
    let keep = text.find("keep-disk").unwrap();
    let collect = text.find("collect").unwrap();
    let stop = text.find("stop-keeping-disk").unwrap();
    assert!(keep < collect && collect < stop, "{text}");
}

#[test]
fn without_the_field_a_pause_on_vast_still_destroys_the_instance() {
    let text = check(
        &desired(vec![job(1, false)]),
        &observed(vec![instance(InstanceState::Running, 0.35)]),
        &history(record(Phase::Running, "running"), true, None),
        "pause_no_keep",
    );
    assert!(text.contains("destroy vast/4242"), "{text}");
    assert!(text.contains("attempt 1 ended=paused"), "{text}");
    assert!(!text.contains("keep-disk"), "{text}");
}

#[test]
fn a_pause_recorded_kept_whose_stop_did_not_happen_stops_again_without_syncing_again() {
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![instance(InstanceState::Running, 0.35)]),
        &history(record(Phase::Paused, "x"), true, kept(false, None)),
        "pause_keep_stop_again",
    );
    assert!(text.contains("stop-keeping-disk train-0"), "{text}");
    assert!(
        !text.contains("collect"),
        "the final sync is made once: {text}"
    );
    assert!(!text.contains("keep-disk train-0"), "recorded once: {text}");
}

#[test]
fn a_paused_run_whose_instance_is_stopped_holds_it_and_plans_nothing() {
    let reason =
        "paused by `asimov pause`; vast/4242 stopped, its disk kept (storage billing only)";
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![instance(InstanceState::Stopped, 0.03)]),
        &history(record(Phase::Paused, reason), true, kept(true, None)),
        "pause_keep_stopped",
    );
    assert!(text.starts_with("no ops"), "{text}");
}

#[test]
fn a_resume_starts_the_stopped_instance_again() {
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![instance(InstanceState::Stopped, 0.03)]),
        &history(record(Phase::Paused, "paused"), false, kept(true, None)),
        "resume_keep_start",
    );
    assert!(
        text.contains("start-kept train-0 attempt=1 vast/4242"),
        "{text}"
    );
    assert!(!text.contains("create"), "{text}");
    assert!(!text.contains("destroy"), "{text}");
}

#[test]
fn a_resume_whose_instance_runs_again_restarts_the_job_on_the_same_disk() {
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![instance(InstanceState::Running, 0.35)]),
        &history(
            record(Phase::Provisioning, "starting"),
            false,
            kept(true, None),
        ),
        "resume_keep_restart_job",
    );
    assert!(
        text.contains("resume-kept train-0 attempt=1 vast/4242"),
        "{text}"
    );
    assert!(!text.contains("ended="), "{text}");
}

#[test]
fn a_start_refused_ends_the_attempt_destroys_the_instance_and_a_new_one_follows() {
    let why = "vast: start instance: 4242 did not run again within 300s (its GPUs are taken?)";
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![instance(InstanceState::Stopped, 0.03)]),
        &history(
            record(Phase::Provisioning, "starting"),
            false,
            kept(true, Some(why)),
        ),
        "resume_keep_refused",
    );
    assert!(text.contains("attempt 1 ended=paused"), "{text}");
    assert!(text.contains("resume on the kept disk failed"), "{text}");
    assert!(text.contains("destroy vast/4242"), "{text}");

    // Once the listing confirms it gone: released, then attempt 2 from the checkpoint.
    let mut h = history(record(Phase::Pending, "x"), false, kept(true, Some(why)));
    let mut a = attempt();
    a.outcome = Some(Outcome::Paused);
    h.attempts.insert(RUN.into(), vec![a]);
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![]),
        &h,
        "resume_keep_refused_released",
    );
    assert!(
        text.contains("release train-0 attempt=1 outcome=paused"),
        "{text}"
    );
    let mut a = attempt();
    a.outcome = Some(Outcome::Paused);
    a.released_at = Some(NOW - 5);
    h.attempts.insert(RUN.into(), vec![a]);
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![]),
        &h,
        "resume_keep_refused_next",
    );
    assert!(text.contains("create train-0 attempt=2"), "{text}");
}

#[test]
fn a_resume_whose_stopped_instance_is_gone_releases_the_attempt() {
    let text = check(
        &desired(vec![job(1, true)]),
        &observed(vec![]),
        &history(record(Phase::Paused, "paused"), false, kept(true, None)),
        "resume_keep_gone",
    );
    assert!(text.contains("attempt 1 ended=paused"), "{text}");
    assert!(text.contains("its stopped instance is gone"), "{text}");
    assert!(
        text.contains("release train-0 attempt=1 outcome=paused"),
        "{text}"
    );
}

#[test]
fn deleting_a_job_paused_with_its_disk_kept_destroys_the_stopped_instance() {
    let text = check(
        &desired(vec![]),
        &observed(vec![instance(InstanceState::Stopped, 0.03)]),
        &history(record(Phase::Paused, "paused"), true, kept(true, None)),
        "delete_keep_stopped",
    );
    assert!(text.contains("destroy vast/4242"), "{text}");
    assert!(!text.contains("collect"), "nothing runs to sync: {text}");
}

/// A budget of $10 with $9.90 in the ledger; run 0 paused, its instance stopped for
/// the last hour, listed at `price` (what it bills now); run 1 waits to be created.
fn budget_case(price: f64, name: &str) -> String {
    let mut j = job(2, true);
    j.spec.budget = Some("team".into());
    let mut d = desired(vec![j]);
    Arc::make_mut(&mut d.manifests).budgets.push(Budget {
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
    });
    let mut rec = record(Phase::Paused, "paused");
    // The GPU part went to the ledger when the instance was stopped, an hour ago.
    rec.billing_since = Some(NOW - 3600);
    let mut h = history(rec, true, kept(true, None));
    h.spent.insert("team".into(), Usd::from_dollars(9.90));
    check(
        &d,
        &observed(vec![instance(InstanceState::Stopped, price)]),
        &h,
        name,
    )
}

#[test]
fn a_stopped_instance_counts_against_budgets_at_its_storage_price_since_it_stopped() {
    // Storage: $0.03/h for the hour since the stop: $9.93, under the limit.
    let text = budget_case(0.03, "budget_keep_storage");
    assert!(text.contains("create train-1"), "{text}");
    // Had it counted the GPU price ($0.35/h): over.
    let text = budget_case(0.35, "budget_keep_gpu_price");
    assert!(text.contains("block train-1"), "{text}");
}

#[test]
fn a_budget_that_blocks_new_attempts_keeps_a_resumed_instance_stopped() {
    let mut j = job(1, true);
    j.spec.budget = Some("team".into());
    let mut d = desired(vec![j]);
    Arc::make_mut(&mut d.manifests).budgets.push(Budget {
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
    });
    let mut h = history(record(Phase::Paused, "paused"), false, kept(true, None));
    h.spent.insert("team".into(), Usd::from_dollars(10.5));
    let text = check(
        &d,
        &observed(vec![instance(InstanceState::Stopped, 0.03)]),
        &h,
        "resume_keep_budget_blocked",
    );
    assert!(text.contains("block train-0"), "{text}");
    assert!(!text.contains("start-kept"), "{text}");
    assert!(!text.contains("destroy"), "{text}");
}
