//! Retry by cause. The planner (pure) is driven through every exit-code rule, the
//! per-cause limits and the silence threshold; then the real binary: exit-code rules
//! end to end with `describe run` telling why each attempt ended, and an SSH host that
//! blips (its server down for a few seconds) causes no restart.

mod support;

use asimov::agent::{AgentState, AgentStatus};
use asimov::manifest::{Context, Job, JobSpec, Placement, RetryOn, RetryPolicy, load_str};
use asimov::model::{HostStatus, Outcome, OwnerTag, Phase, ProviderKind, Timestamp, Usd};
use asimov::provider::{Capabilities, Instance, InstanceState};
use asimov::reconcile::plan::HEARTBEAT_STALE_SECS;
use asimov::reconcile::{AgentObservation, Desired, History, ListResult, Observed, Op, plan};
use asimov::store::{AttemptRecord, RunRecord};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const ME: &str = "ctl1";
const NOW: Timestamp = 1_800_000_000;
const FAKE: ProviderKind = ProviderKind::Fake;
const RUN: &str = "train-0";

fn job(retry: RetryPolicy) -> Job {
    let spec = JobSpec {
        placement: vec![Placement {
            provider: FAKE,
            ..Placement::local()
        }],
        retry,
        ..JobSpec::with_run("python train.py")
    };
    Job::from_spec("train", spec, 1, "h1")
}

fn desired(job: Job) -> Desired {
    Desired::new(vec![job], vec![], ME)
}

fn tag(n: u32) -> OwnerTag {
    OwnerTag::new(ME, RUN, n)
}

fn attempt(n: u32, outcome: Option<&str>) -> AttemptRecord {
    AttemptRecord {
        run: RUN.into(),
        attempt: n,
        tag: tag(n).render(),
        provider: FAKE,
        placement_index: 0,
        instance_id: Some(format!("i-{n}")),
        host: None,
        intent_at: NOW - 700 + i64::from(n),
        released_at: outcome.map(|_| NOW - 600 + i64::from(n)),
        outcome: outcome.map(|o| Outcome::parse(o).unwrap_or_else(|| panic!("outcome {o}"))),
    }
}

/// A run at its attempt `n`, still live, after the ended attempts `before`.
fn history(n: u32, before: &[&str]) -> History {
    let mut h = History::default();
    let rec = RunRecord {
        seq: 1,
        phase: Phase::Running,
        attempt: n,
        ..RunRecord::new_pending(RUN, "train", 0, "h1", &BTreeMap::new(), "", NOW - 1000)
    };
    h.runs.insert(RUN.into(), rec);
    let mut atts: Vec<AttemptRecord> = before
        .iter()
        .enumerate()
        .map(|(i, o)| attempt(i as u32 + 1, Some(o)))
        .collect();
    atts.push(attempt(n, None));
    h.attempts.insert(RUN.into(), atts);
    h
}

fn instance(n: u32, state: InstanceState) -> Instance {
    Instance {
        provider: FAKE,
        id: format!("i-{n}"),
        tag: tag(n),
        state,
        endpoint: None,
        gpu: None,
        price_per_hour: Usd::from_dollars(1.0),
        created_at: Some(NOW - 600),
        host: None,
    }
}

fn status(state: AgentState, exit_code: Option<i32>) -> AgentObservation {
    AgentObservation::Status(AgentStatus {
        state,
        exit_code,
        heartbeat: Some(NOW - 2),
        started_at: Some(NOW - 300),
        finished_at: None,
        progress: None,
        dead_for: None,
    })
}

/// The attempt `n`'s instance listed in `state`, its agent saying `agent`.
fn observed(n: u32, state: InstanceState, agent: Option<AgentObservation>) -> Observed {
    let mut o = Observed::default();
    o.listed
        .insert(FAKE, ListResult::Listed(vec![instance(n, state)]));
    if let Some(a) = agent {
        o.agents.insert(tag(n).render(), a);
    }
    o
}

/// How the plan ends the live attempt: (phase, reason, outcome), or `None` when it
/// does not end it.
fn ending(d: &Desired, o: &Observed, h: &History) -> Option<(Phase, String, Outcome)> {
    let p = plan(d, o, h, NOW);
    p.ops.iter().find_map(|op| match op {
        Op::SetStatus(s) => s
            .outcome
            .clone()
            .map(|(_, outcome)| (s.phase, s.reason.clone(), outcome)),
        _ => None,
    })
}

/// The attempt `n` failed with `code`: the run's phase and reason after it.
fn after_failure(
    retry: &RetryPolicy,
    n: u32,
    before: &[&str],
    code: Option<i32>,
) -> (Phase, String) {
    let d = desired(job(retry.clone()));
    let o = observed(
        n,
        InstanceState::Running,
        Some(status(AgentState::Failed, code)),
    );
    let (phase, reason, outcome) = ending(&d, &o, &history(n, before)).expect("the attempt ends");
    assert_eq!(outcome, Outcome::Failed { exit_code: code });
    (phase, reason)
}

fn policy(on: &[RetryOn], max_restarts: u32) -> RetryPolicy {
    RetryPolicy {
        on: on.to_vec(),
        max_restarts,
        ..RetryPolicy::default()
    }
}

#[test]
fn exit_code_rules_each_decide_a_restart() {
    use RetryOn::{Error, Preemption};
    let restarts = |(phase, reason): (Phase, String)| {
        assert_eq!(phase, Phase::Pending, "{reason}");
        assert!(reason.contains("restart 1 of"), "{reason}");
    };
    let fails = |(phase, reason): (Phase, String), why: &str| {
        assert_eq!(phase, Phase::Failed, "{reason}");
        assert!(reason.contains(why), "{reason:?} lacks {why:?}");
    };

    // `on: [error]`: any non-zero exit restarts, an unknown exit code too.
    restarts(after_failure(&policy(&[Error], 3), 1, &[], Some(1)));
    restarts(after_failure(&policy(&[Error], 3), 1, &[], None));
    // Without `error`: a failure is final.
    fails(
        after_failure(&policy(&[Preemption], 3), 1, &[], Some(1)),
        "retry.on has no `error`",
    );

    // never_on_exit_codes: those codes never restart, even with `error`; others do.
    let never = RetryPolicy {
        never_on_exit_codes: vec![2, 64],
        ..policy(&[Error], 3)
    };
    fails(
        after_failure(&never, 1, &[], Some(2)),
        "exit code 2 is in retry.never_on_exit_codes",
    );
    fails(after_failure(&never, 1, &[], Some(64)), "exit code 64");
    restarts(after_failure(&never, 1, &[], Some(1)));

    // on_exit_codes: those codes restart even without `error` in `on`...
    let only = RetryPolicy {
        on_exit_codes: vec![137, 143],
        ..policy(&[Preemption], 3)
    };
    restarts(after_failure(&only, 1, &[], Some(137)));
    restarts(after_failure(&only, 1, &[], Some(143)));
    // ...and, given, no other code does (nor an unknown one), `error` or not.
    fails(
        after_failure(&only, 1, &[], Some(1)),
        "exit code 1 is not in retry.on_exit_codes",
    );
    fails(after_failure(&only, 1, &[], None), "no exit code");
    let with_error = RetryPolicy {
        on_exit_codes: vec![137],
        ..policy(&[Error], 3)
    };
    fails(
        after_failure(&with_error, 1, &[], Some(3)),
        "not in retry.on_exit_codes",
    );
    restarts(after_failure(&with_error, 1, &[], Some(137)));

    // Both lists: never wins for its codes, the restart list for its own.
    let both = RetryPolicy {
        on_exit_codes: vec![137],
        never_on_exit_codes: vec![2],
        ..policy(&[Error], 3)
    };
    fails(after_failure(&both, 1, &[], Some(2)), "never_on_exit_codes");
    restarts(after_failure(&both, 1, &[], Some(137)));

    // A restarting code still counts against the limits.
    let once = RetryPolicy {
        on_exit_codes: vec![137],
        ..policy(&[], 1)
    };
    fails(
        after_failure(&once, 2, &["failed:137"], Some(137)),
        "all 1 restarts used",
    );
}

#[test]
fn causes_are_counted_separately() {
    use RetryOn::{Error, Preemption};
    let retry = RetryPolicy {
        max_preemptions: Some(1),
        max_errors: Some(2),
        ..policy(&[Preemption, Error], 10)
    };
    let d = desired(job(retry.clone()));
    let gone = |n: u32| observed(n, InstanceState::Stopped, None);
    // The first preemption restarts, counted as a preemption.
    let (phase, reason, outcome) = ending(&d, &gone(1), &history(1, &[])).unwrap();
    assert_eq!((phase, outcome), (Phase::Pending, Outcome::Preempted));
    assert!(reason.contains("(preemption 1 of 1)"), "{reason}");
    // Errors have their own count: two failures after it still restart...
    let (phase, reason) = after_failure(&retry, 2, &["preempted"], Some(1));
    assert_eq!(phase, Phase::Pending, "{reason}");
    assert!(reason.contains("(error 1 of 2)"), "{reason}");
    let (phase, reason) = after_failure(&retry, 3, &["preempted", "failed:1"], Some(1));
    assert_eq!(phase, Phase::Pending, "{reason}");
    assert!(
        reason.contains("restart 3 of 10 (error 2 of 2)"),
        "{reason}"
    );
    // ...a third does not,
    let (phase, reason) = after_failure(&retry, 4, &["preempted", "failed:1", "failed:1"], Some(1));
    assert_eq!(phase, Phase::Failed, "{reason}");
    assert!(reason.contains("all 2 max_errors used"), "{reason}");
    // and a second preemption does not either, whatever the errors did.
    let (phase, reason, _) = ending(&d, &gone(3), &history(3, &["preempted", "failed:1"])).unwrap();
    assert_eq!(phase, Phase::Failed, "{reason}");
    assert!(reason.contains("all 1 max_preemptions used"), "{reason}");

    // max_restarts bounds the causes together.
    let total = RetryPolicy {
        max_preemptions: Some(5),
        max_errors: Some(5),
        ..policy(&[Preemption, Error], 2)
    };
    let (phase, reason) = after_failure(&total, 3, &["preempted", "failed:1"], Some(1));
    assert_eq!(phase, Phase::Failed, "{reason}");
    assert!(reason.contains("all 2 restarts used"), "{reason}");

    // The counts `describe run` shows (a lost host counts as a preemption).
    let h = history(4, &["preempted", "failed:1", "lost"]);
    let roomy = job(policy(&[Preemption, Error], 10));
    let used = asimov::reconcile::plan::restarts_used(&roomy, &h.attempts[RUN]);
    assert_eq!((used.preemption, used.error, used.total()), (2, 1, 3));
}

#[test]
fn no_capacity_tries_have_their_own_limit() {
    let retry = RetryPolicy {
        max_no_capacity: Some(2),
        ..policy(&[RetryOn::NoCapacity], 0)
    };
    let d = desired(job(retry));
    let mut h = history(1, &[]);
    h.runs.get_mut(RUN).unwrap().phase = Phase::Pending;
    let set = |h: &mut History, outcomes: &[&str]| {
        let atts: Vec<AttemptRecord> = outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| attempt(i as u32 + 1, Some(o)))
            .collect();
        h.runs.get_mut(RUN).unwrap().attempt = atts.len() as u32;
        h.attempts.insert(RUN.into(), atts);
    };
    let mut o = Observed::default();
    o.listed.insert(FAKE, ListResult::Listed(vec![]));
    // Two tries without capacity: a third is planned (after its backoff).
    set(&mut h, &["no-capacity", "no-capacity"]);
    let p = plan(&d, &o, &h, NOW + 3600);
    assert!(
        p.ops
            .iter()
            .any(|op| matches!(op, Op::Create { attempt: 3, .. })),
        "{}",
        p.render()
    );
    // Three: the limit is spent and the run fails, saying so.
    set(&mut h, &["no-capacity", "no-capacity", "no-capacity"]);
    let p = plan(&d, &o, &h, NOW + 3600);
    let failed = p.ops.iter().any(|op| {
        matches!(op, Op::SetStatus(s) if s.phase == Phase::Failed
            && s.reason.contains("all 2 max_no_capacity tries used"))
    });
    assert!(failed, "{}", p.render());
}

#[test]
fn a_failed_status_call_is_no_restart_until_silent_past_the_threshold() {
    let d = desired(job(policy(&[RetryOn::Preemption], 3)));
    let unreachable = || {
        observed(
            1,
            InstanceState::Running,
            Some(AgentObservation::Unreachable {
                message: "ssh: connection refused".into(),
            }),
        )
    };
    let mut h = history(1, &[]);
    // Never seen yet (booting): waited for, whatever the time.
    assert_eq!(ending(&d, &unreachable(), &h), None);
    // Seen 10 s ago: a blip, no restart, and the run is looked at again soon.
    h.seen.insert(RUN.into(), (1, NOW - 10));
    assert_eq!(ending(&d, &unreachable(), &h), None);
    let p = plan(&d, &unreachable(), &h, NOW);
    assert!(
        p.requeue_after.is_some_and(|r| r <= Duration::from_secs(5)),
        "{}",
        p.render()
    );
    assert!(
        !p.ops
            .iter()
            .any(|op| matches!(op, Op::Destroy { .. } | Op::Create { .. }))
    );
    // Just at the threshold: still waited for.
    h.seen.insert(RUN.into(), (1, NOW - HEARTBEAT_STALE_SECS));
    assert_eq!(ending(&d, &unreachable(), &h), None);
    // Past it: lost, a preemption restart.
    h.seen
        .insert(RUN.into(), (1, NOW - HEARTBEAT_STALE_SECS - 1));
    let (phase, reason, outcome) = ending(&d, &unreachable(), &h).unwrap();
    assert_eq!(
        (phase, outcome),
        (Phase::Pending, Outcome::Lost),
        "{reason}"
    );
    // An answer seen for an older attempt says nothing of this one.
    h.seen.insert(RUN.into(), (0, NOW));
    assert_eq!(ending(&d, &unreachable(), &h), None);
}

#[test]
fn a_silent_fleet_host_is_lost_only_past_the_threshold_a_confirmed_stop_at_once() {
    let d = desired(job(policy(&[RetryOn::Preemption], 3)));
    // The fleet host does not answer: the listing shows its slot Stopped.
    let on_silent_host = |fixed_pool: bool| {
        let mut o = observed(1, InstanceState::Stopped, None);
        o.hosts.insert(
            FAKE,
            vec![HostStatus {
                fleet: "lab".into(),
                host: "box-1".into(),
                reachable: false,
                running: vec![tag(1).render()],
                ..HostStatus::default()
            }],
        );
        o.capabilities.insert(
            FAKE,
            Capabilities {
                fixed_pool,
                ..Capabilities::default()
            },
        );
        o
    };
    let mut h = history(1, &[]);
    h.seen.insert(RUN.into(), (1, NOW - 20));
    assert_eq!(
        ending(&d, &on_silent_host(true), &h),
        None,
        "a blip restarts nothing"
    );
    h.seen
        .insert(RUN.into(), (1, NOW - HEARTBEAT_STALE_SECS - 5));
    let (_, _, outcome) = ending(&d, &on_silent_host(true), &h).unwrap();
    assert_eq!(outcome, Outcome::Lost);
    // A provider that says the instance is stopped (answering; outbid, preempted) is
    // believed at once.
    h.seen.insert(RUN.into(), (1, NOW - 1));
    let (_, _, outcome) = ending(&d, &observed(1, InstanceState::Stopped, None), &h).unwrap();
    assert_eq!(outcome, Outcome::Preempted);
    // So is an instance gone from a successful listing.
    let mut gone = Observed::default();
    gone.listed.insert(FAKE, ListResult::Listed(vec![]));
    let (_, _, outcome) = ending(&d, &gone, &h).unwrap();
    assert_eq!(outcome, Outcome::Preempted);
}

fn problems(yaml: &str) -> String {
    match load_str(Path::new("/m/job.yaml"), yaml, &Context::default()) {
        Ok(_) => String::new(),
        Err(p) => p.to_string(),
    }
}

#[test]
fn exit_code_lists_are_checked_with_their_positions() {
    let text = problems(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: t}\nspec:\n  run: x\n  retry:\n    on_exit_codes: [0, 137, 300]\n    never_on_exit_codes: [137]\n",
    );
    assert!(
        text.contains("/m/job.yaml:7:21: expected an exit code from 1 to 255, found 0"),
        "{text}"
    );
    assert!(text.contains("found 300"), "{text}");
    assert!(
        text.contains("/m/job.yaml:8:27: exit code 137 is also in on_exit_codes"),
        "{text}"
    );
    let ok = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: t}\nspec:\n  run: x\n  retry: {on: [preemption], max_restarts: 4, max_preemptions: 3, max_errors: 1, max_no_capacity: 10, on_exit_codes: [137], never_on_exit_codes: [2]}\n";
    assert_eq!(problems(ok), "");
    let loaded = load_str(Path::new("/m/job.yaml"), ok, &Context::default()).unwrap();
    let r = &loaded.manifests.jobs[0].spec.retry;
    assert_eq!(
        (
            r.max_restarts,
            r.max_preemptions,
            r.max_errors,
            r.max_no_capacity
        ),
        (4, Some(3), Some(1), Some(10))
    );
    assert_eq!(
        (r.on_exit_codes.clone(), r.never_on_exit_codes.clone()),
        (vec![137], vec![2])
    );
}

// ---- Through the real binary. ----

use support::cli::Asimov;
use support::sshd::Sshd;

fn exit_job(name: &str, code: i32, retry: &str, placement: &str) -> String {
    format!(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  run: sh -c 'echo trying; exit {code}'\n  retry: {retry}\n{placement}"
    )
}

#[test]
fn exit_code_rules_through_the_binary_and_describe_says_why_each_attempt_ended() {
    let a = Asimov::new();
    let never = a.manifest(
        "never.yaml",
        &exit_job(
            "never",
            3,
            "{on: [error], max_restarts: 3, never_on_exit_codes: [3]}",
            "",
        ),
    );
    let again = a.manifest(
        "again.yaml",
        &exit_job(
            "again",
            75,
            "{on: [], max_restarts: 1, on_exit_codes: [75]}",
            "",
        ),
    );
    let mut controller = a.spawn_controller(None);
    a.ok(&[
        "apply",
        "-f",
        never.to_str().unwrap(),
        again.to_str().unwrap(),
    ]);
    a.wait_for("both runs to fail", Duration::from_secs(90), || {
        a.run_phase("never-0").as_deref() == Some("Failed")
            && a.run_phase("again-0").as_deref() == Some("Failed")
    });
    let runs = a.runs_json();
    let run = |name: &str| {
        runs["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(run("never-0")["attempt"], 1, "{runs}");
    assert_eq!(run("never-0")["exit_code"], 3, "{runs}");
    assert_eq!(run("again-0")["attempt"], 2, "{runs}");
    let describe = a.ok(&["describe", "run", "never-0"]);
    assert!(
        describe.contains("not restarted: exit code 3 is in retry.never_on_exit_codes"),
        "{describe}"
    );
    let describe = a.ok(&["describe", "run", "again-0"]);
    assert!(describe.contains("WHY / WHAT FOLLOWED"), "{describe}");
    assert!(
        describe.contains("failed with exit code 75; restart 1 of 1"),
        "attempt 1's row says it was restarted: {describe}"
    );
    assert!(
        describe.contains("failed with exit code 75; all 1 restarts used"),
        "attempt 2's row says why the run ended: {describe}"
    );
    assert!(
        describe.contains("Restarts:   1 of 1 (preemption 0 of 1, error 1 of 1)"),
        "{describe}"
    );
    assert!(describe.contains("Run id:"), "{describe}");
    support::cli::kill9(&mut controller);
}

fn fleet(hosts: &[(&str, &Sshd)]) -> String {
    let mut text = String::from(
        "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  hosts:\n",
    );
    for (name, sshd) in hosts {
        text.push_str(&format!(
            "    - {{name: {name}, user: {}, address: {}, port: {}, identity_file: {}, gpus: 0}}\n",
            sshd.user(),
            sshd.host(),
            sshd.port(),
            sshd.client_key().display()
        ));
    }
    text
}

#[test]
fn an_ssh_host_that_blips_causes_no_restart() {
    let Some(mut h1) = Sshd::start_or_skip() else {
        return;
    };
    let Some(h2) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    let marker = tempfile::tempdir().unwrap();
    let go = marker.path().join("go");
    let fleet = a.manifest("fleet.yaml", &fleet(&[("box-1", &h1), ("box-2", &h2)]));
    // The job runs until the test lets it finish, so the blip falls inside it.
    let job = a.manifest(
        "blip.yaml",
        &format!(
            "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: blip}}\nspec:\n  run: sh -c 'while [ ! -e {go} ]; do sleep 0.2; done'\n  retry: {{on: [preemption, error], max_restarts: 3}}\n  placement: [{{provider: ssh, fleet: lab}}]\n",
            go = go.display()
        ),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    a.wait_for("blip-0 to run", Duration::from_secs(60), || {
        a.run_phase("blip-0").as_deref() == Some("Running")
    });
    assert_eq!(a.runs_json()["items"][0]["host"], "box-1");
    // Let the controller see the agent answer at least once more (its last-seen time).
    std::thread::sleep(Duration::from_secs(2));
    // The blip: box-1's server goes away (its job keeps running), long enough for the
    // controller to see the host unreachable, then comes back.
    h1.stop();
    let blip = std::time::Instant::now();
    a.wait_for("box-1 to show unreachable", Duration::from_secs(40), || {
        a.ok(&["get", "fleets", "-o", "json"])
            .contains("\"reachable\": false")
    });
    h1.restart();
    eprintln!("blip lasted {:?}", blip.elapsed());
    a.wait_for("box-1 to answer again", Duration::from_secs(60), || {
        !a.ok(&["get", "fleets", "-o", "json"])
            .contains("\"reachable\": false")
    });
    std::fs::write(&go, "").unwrap();
    a.wait_for("blip-0 to succeed", Duration::from_secs(60), || {
        a.run_phase("blip-0").as_deref() == Some("Succeeded")
    });
    let run = a.runs_json()["items"][0].clone();
    assert_eq!(
        run["attempt"],
        1,
        "a blip restarted the run: {run}\n{}",
        a.ok(&["describe", "run", "blip-0"])
    );
    assert_eq!(run["host"], "box-1", "{run}");
    a.ok(&["delete", "job", "blip"]);
}
