//! The whole loop — planner, executor, controller — on a fleet of two real `sshd`s with
//! the real ssh provider and agent, and a real store: the fleet queue, and a host that
//! stops answering mid-run.

mod support;

use asimov::home::Home;
use asimov::manifest::{Fleet, Job, JobSpec, Manifests, Origin, Placement};
use asimov::model::{Phase, ProviderKind};
use asimov::provider::ssh::SshProvider;
use asimov::reconcile::controller::{Controller, MemorySource};
use asimov::reconcile::execute::Executor;
use asimov::store::{RunRecord, Store};
use asimov::transport::ssh::{SshOptions, SshPool};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::sshd::Sshd;

const ME: &str = "ctl1";

fn job(name: &str, runs: u32, command: &str) -> Job {
    let spec = JobSpec {
        placement: vec![Placement {
            provider: ProviderKind::Ssh,
            fleet: Some("lab".into()),
            ..Placement::local()
        }],
        ..JobSpec::with_run(command)
    };
    Job::from_spec(name, spec, runs, "h1")
}

struct Lab {
    a: Sshd,
    b: Sshd,
    _dir: tempfile::TempDir,
    store: Arc<Mutex<Store>>,
    ssh: Arc<SshProvider>,
    controller: Controller,
}

fn lab(jobs: Vec<Job>) -> Option<Lab> {
    let a = Sshd::start_or_skip()?;
    let b = Sshd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let home = Home::at(dir.path());
    home.ensure().expect("home");
    let store = Arc::new(Mutex::new(Store::open(&home.database()).expect("store")));
    let options = SshOptions {
        connect_timeout: Duration::from_secs(3),
        ..SshOptions::default()
    };
    let pool = SshPool::with_options(home.clone(), options).expect("pool");
    let ssh = Arc::new(SshProvider::with_pool(pool));
    let executor = Executor::new(BTreeMap::new(), Arc::clone(&store), home)
        .with_provider(Arc::clone(&ssh) as _);
    let fleet = Fleet {
        name: "lab".into(),
        labels: BTreeMap::new(),
        hosts: vec![a.fleet_host("a", 0), b.fleet_host("b", 0)],
        origin: Origin {
            file: "fleet.yaml".into(),
            line: 1,
        },
    };
    let source = Arc::new(MemorySource::new(Manifests {
        jobs,
        fleets: vec![fleet],
        budgets: vec![],
    }));
    let controller = Controller::new(Arc::new(executor), source as _, ME);
    Some(Lab {
        a,
        b,
        _dir: dir,
        store,
        ssh,
        controller,
    })
}

impl Lab {
    fn runs(&self) -> Vec<RunRecord> {
        self.store.lock().unwrap().runs().unwrap()
    }

    /// Passes until `done` holds, checking `each` after every pass.
    async fn until(&self, what: &str, mut each: impl FnMut(&Lab), done: impl Fn(&Lab) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let report = self.controller.run_once().await.expect("pass");
            each(self);
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "never reached: {what}; runs {:#?}; last pass failed ops {:?}",
                self.runs(),
                report.failed
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn all_succeeded(lab: &Lab) -> bool {
    let runs = lab.runs();
    !runs.is_empty() && runs.iter().all(|r| r.phase == Phase::Succeeded)
}

#[tokio::test]
async fn fleet_queue_runs_three_jobs_two_at_a_time_in_apply_order() {
    let Some(lab) = lab(vec![job("train", 3, "sleep 2")]) else {
        return;
    };
    let mut max_slots = 0;
    let mut saw_waiting = false;
    lab.until(
        "all three succeeded",
        |lab| {
            for h in lab.ssh.host_statuses() {
                max_slots = max_slots.max(h.running.len());
            }
            let held = lab
                .runs()
                .iter()
                .any(|r| r.reason.starts_with("waiting for a free host in fleet lab"));
            saw_waiting |= held;
        },
        all_succeeded,
    )
    .await;
    assert!(max_slots <= 1, "a whole-host job shared a host");
    assert!(saw_waiting, "the third run never waited in the queue");
    // Apply order: the third run started (its first intent) no earlier than the others.
    let store = lab.store.lock().unwrap();
    let first_intent = |run: &str| store.attempts(run).unwrap()[0].intent_at;
    assert!(first_intent("train-2") >= first_intent("train-0"));
    assert!(first_intent("train-2") >= first_intent("train-1"));
    // Every slot is gone, every host recorded for `get fleets`.
    let hosts = store.hosts(Some("lab")).unwrap();
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    assert!(hosts.iter().all(|h| h.reachable));
}

#[tokio::test]
async fn unreachable_host_run_moves_and_old_slot_is_cleaned_when_it_returns() {
    let Some(mut lab) = lab(vec![job("train", 1, "sleep 6")]) else {
        return;
    };
    lab.until(
        "running",
        |_| {},
        |lab| lab.runs()[0].phase == Phase::Running,
    )
    .await;
    let first_host = lab.runs()[0].host.clone().expect("host of attempt 1");
    let (down, other) = if first_host == "a" {
        (&mut lab.a, "b")
    } else {
        (&mut lab.b, "a")
    };
    down.stop();
    lab.until(
        "rescheduled on the other host",
        |_| {},
        |lab| {
            let r = &lab.runs()[0];
            r.attempt == 2 && r.host.as_deref() == Some(other)
        },
    )
    .await;
    // The stranded attempt stays open while its host is down; it ended as lost (its
    // host silent past the threshold), not as confirmed preempted.
    {
        let store = lab.store.lock().unwrap();
        let atts = store.attempts("train-0").unwrap();
        assert_eq!(atts[0].outcome, Some(asimov::model::Outcome::Lost));
        assert_eq!(
            atts[0].released_at, None,
            "released while its host was down"
        );
        let hosts = store.hosts(Some("lab")).unwrap();
        let h = hosts.iter().find(|h| h.host == first_host).unwrap();
        assert!(!h.reachable, "{h:?}");
    }
    if first_host == "a" {
        lab.a.restart();
    } else {
        lab.b.restart();
    }
    lab.until(
        "old slot released and the run done",
        |_| {},
        |lab| {
            let atts = lab.store.lock().unwrap().attempts("train-0").unwrap();
            all_succeeded(lab) && atts.iter().all(|a| a.released_at.is_some())
        },
    )
    .await;
    let statuses = lab.ssh.host_statuses();
    assert!(
        statuses.iter().all(|h| h.reachable && h.running.is_empty()),
        "{statuses:?}"
    );
}
