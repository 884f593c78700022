//! The planner and `asimov destroy`'s stop record (`History::stops`): a stopped run's
//! instance is synced, destroyed and released; the run stays Stopped on every later
//! pass (nothing is created again); an edited spec runs it again.

use asimov::agent::{AgentState, AgentStatus};
use asimov::manifest::{Job, JobSpec, Placement};
use asimov::model::{Outcome, OwnerTag, Phase, ProviderKind, Timestamp, Usd};
use asimov::provider::{Instance, InstanceState};
use asimov::reconcile::{AgentObservation, Desired, History, ListResult, Observed, Op, plan};
use asimov::store::{AttemptRecord, RunRecord};
use std::collections::BTreeMap;

const ME: &str = "ctl1";
const NOW: Timestamp = 1_800_000_000;
const RUN: &str = "train-0";
const FAKE: ProviderKind = ProviderKind::Fake;

fn desired(spec_hash: &str) -> Desired {
    let spec = JobSpec {
        placement: vec![Placement {
            provider: FAKE,
            ..Placement::local()
        }],
        ..JobSpec::with_run("python train.py")
    };
    Desired::new(
        vec![Job::from_spec("train", spec, 1, spec_hash)],
        vec![],
        ME,
    )
}

fn instance(state: InstanceState) -> Instance {
    Instance {
        provider: FAKE,
        id: "i-1".into(),
        tag: OwnerTag::new(ME, RUN, 1),
        state,
        endpoint: None,
        gpu: Some("H100".into()),
        price_per_hour: Usd::from_dollars(2.0),
        created_at: Some(NOW - 600),
        host: None,
    }
}

fn observed(instances: Vec<Instance>) -> Observed {
    let mut o = Observed::default();
    o.listed.insert(FAKE, ListResult::Listed(instances));
    o.agents.insert(
        RUN.into(),
        AgentObservation::Status(AgentStatus {
            state: AgentState::Running,
            exit_code: None,
            heartbeat: Some(NOW - 5),
            started_at: Some(NOW - 300),
            finished_at: None,
            progress: None,
            dead_for: None,
        }),
    );
    o
}

fn attempt(outcome: Option<Outcome>, released_at: Option<Timestamp>) -> AttemptRecord {
    AttemptRecord {
        run: RUN.into(),
        attempt: 1,
        tag: OwnerTag::new(ME, RUN, 1).render(),
        provider: FAKE,
        placement_index: 0,
        instance_id: Some("i-1".into()),
        host: None,
        intent_at: NOW - 700,
        released_at,
        outcome,
    }
}

fn history(phase: Phase, attempt: AttemptRecord, stop: Option<&str>) -> History {
    let rec = RunRecord {
        seq: 1,
        phase,
        attempt: 1,
        provider: Some(FAKE),
        instance_id: Some("i-1".into()),
        ..RunRecord::new_pending(RUN, "train", 0, "h1", &BTreeMap::new(), "", NOW - 1000)
    };
    let mut h = History::default();
    h.runs.insert(RUN.into(), rec);
    h.attempts.insert(RUN.into(), vec![attempt]);
    if let Some(hash) = stop {
        h.stops.insert(RUN.into(), hash.into());
    }
    h
}

fn kinds(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .map(|op| match op {
            Op::SetStatus(s) => format!("status {} {:?}", s.phase, s.outcome),
            Op::Collect { .. } => "collect".into(),
            Op::Destroy { instance_id, .. } => format!("destroy {instance_id}"),
            Op::Release { outcome, .. } => format!("release {outcome}"),
            Op::Create { .. } => "create".into(),
            Op::RecordRun { supersede, .. } => format!("record {supersede:?}"),
            Op::Start { .. } => "start".into(),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn without_a_stop_a_running_run_keeps_running() {
    let h = history(Phase::Running, attempt(None, None), None);
    let p = plan(
        &desired("h1"),
        &observed(vec![instance(InstanceState::Running)]),
        &h,
        NOW,
    );
    let ops = kinds(&p.ops);
    assert!(!ops.iter().any(|o| o.starts_with("destroy")), "{ops:?}");
}

#[test]
fn a_stopped_running_run_is_synced_then_destroyed() {
    let h = history(Phase::Running, attempt(None, None), Some("h1"));
    let p = plan(
        &desired("h1"),
        &observed(vec![instance(InstanceState::Running)]),
        &h,
        NOW,
    );
    assert_eq!(
        kinds(&p.ops),
        [
            "status Stopped Some((1, Destroyed))",
            "collect",
            "destroy i-1"
        ]
    );
}

#[test]
fn the_destroy_does_not_wait_on_a_sync_that_failed() {
    // The outcome is recorded: next pass, no second sync, the destroy again.
    let h = history(
        Phase::Stopped,
        attempt(Some(Outcome::Destroyed), None),
        Some("h1"),
    );
    let p = plan(
        &desired("h1"),
        &observed(vec![instance(InstanceState::Running)]),
        &h,
        NOW,
    );
    assert_eq!(kinds(&p.ops), ["destroy i-1"]);
}

#[test]
fn gone_from_the_listing_it_is_released_and_never_created_again() {
    let h = history(
        Phase::Stopped,
        attempt(Some(Outcome::Destroyed), None),
        Some("h1"),
    );
    let p = plan(&desired("h1"), &observed(vec![]), &h, NOW);
    assert_eq!(kinds(&p.ops), ["release destroyed"]);

    let h = history(
        Phase::Stopped,
        attempt(Some(Outcome::Destroyed), Some(NOW)),
        Some("h1"),
    );
    for later in [NOW, NOW + 3600, NOW + 86_400 * 30] {
        let p = plan(&desired("h1"), &observed(vec![]), &h, later);
        assert_eq!(kinds(&p.ops), Vec::<String>::new(), "at {later}");
    }
}

#[test]
fn a_stopped_pending_run_is_not_created() {
    let mut h = History::default();
    h.runs.insert(
        RUN.into(),
        RunRecord::new_pending(RUN, "train", 0, "h1", &BTreeMap::new(), "", NOW - 10),
    );
    h.stops.insert(RUN.into(), "h1".into());
    let p = plan(&desired("h1"), &observed(vec![]), &h, NOW);
    assert_eq!(kinds(&p.ops), ["status Stopped None"]);
}

#[test]
fn an_edited_spec_runs_a_stopped_run_again() {
    let h = history(
        Phase::Stopped,
        attempt(Some(Outcome::Destroyed), Some(NOW)),
        Some("h1"),
    );
    let p = plan(&desired("h2"), &observed(vec![]), &h, NOW);
    let ops = kinds(&p.ops);
    assert_eq!(ops[0], "record Some(1)", "{ops:?}");
    assert!(ops.contains(&"create".to_string()), "{ops:?}");
}
