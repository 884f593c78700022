//! Every backend held to the conformance suite (`support/conformance.rs`): the in-memory
//! fake, `local` (a temp home), and `ssh` (a fleet of two real `sshd`s, also with the two
//! sharing one home; skipped where no `sshd` binary exists). And the proof that the suite
//! can fail: a fake broken on purpose does not pass.

mod support;

use asimov::home::Home;
use asimov::manifest::{Fleet, Origin};
use asimov::provider::fake::{FakeConfig, FakeProvider, Fault, Operation};
use asimov::provider::local::LocalProvider;
use asimov::provider::ssh::SshProvider;
use asimov::transport::ssh::{SshOptions, SshPool};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::conformance::{Harness, Injected, conformance};
use support::sshd::Sshd;

fn fake_harness() -> (Harness, Arc<FakeProvider>) {
    let fake = Arc::new(FakeProvider::new(FakeConfig {
        capacity: Some(2),
        ..FakeConfig::default()
    }));
    let mut h = Harness::new(fake.clone(), ());
    let f = Arc::clone(&fake);
    h.plant_untagged = Some(Box::new(move || f.add_foreign("my-own-box")));
    let f = Arc::clone(&fake);
    h.inject = Some(Box::new(move |what| match what {
        Injected::NoCapacity => f.inject(Operation::Create, Fault::NoCapacity, 1),
        Injected::RateLimited => f.inject(
            Operation::List,
            Fault::RateLimited(Duration::from_secs(30)),
            1,
        ),
    }));
    let f = Arc::clone(&fake);
    h.stop = Some(Box::new(move |i| {
        assert!(f.stop_instance(&i.id), "fake knows {}", i.id);
    }));
    h.capacity = Some(2);
    h.boot_timeout = Duration::from_secs(60);
    (h, fake)
}

#[tokio::test(start_paused = true)]
async fn fake_provider_conforms() {
    conformance(|| async { fake_harness().0 }).await;
}

/// The suite's untagged-machine check can fail: a fake whose listing does not filter
/// by tag is caught.
#[tokio::test(start_paused = true)]
#[should_panic(expected = "listed only the asimov instance")]
async fn a_fake_listing_untagged_machines_fails_the_suite() {
    conformance(|| async {
        let (h, fake) = fake_harness();
        fake.break_tag_filter();
        h
    })
    .await;
}

#[tokio::test]
async fn local_provider_conforms() {
    conformance(|| async {
        let dir = tempfile::tempdir().expect("temp home");
        let home = Home::at(dir.path());
        home.ensure().expect("home");
        let folder = home.local_instances().join("my-own-box");
        let mut h = Harness::new(Arc::new(LocalProvider::new(home)), dir);
        // A folder that is not an instance (no tag): never listed. This machine is
        // never out of capacity, rate limited or stopped while asimov runs on it.
        h.plant_untagged = Some(Box::new(move || {
            std::fs::create_dir_all(&folder).expect("plant folder");
        }));
        h.boot_timeout = Duration::from_secs(10);
        h
    })
    .await;
}

/// Fleet `conf` of two whole hosts (so two instances fit, a third finds no capacity);
/// `shared_home` gives both hosts one `$HOME`, as an NFS home does.
fn ssh_harness(shared_home: bool) -> Harness {
    let shared = tempfile::tempdir().expect("shared home");
    let start = || {
        if shared_home {
            Sshd::start_sharing_home(shared.path())
        } else {
            Sshd::start()
        }
    };
    let (a, b) = (start(), start());
    let dir = tempfile::tempdir().expect("temp home");
    let options = SshOptions {
        connect_timeout: Duration::from_secs(5),
        ..SshOptions::default()
    };
    let pool = SshPool::with_options(Home::at(dir.path()), options).expect("ssh pool");
    let provider = SshProvider::with_pool(pool);
    provider.set_fleets(vec![Fleet {
        name: "conf".into(),
        labels: Default::default(),
        hosts: vec![a.fleet_host("a", 0), b.fleet_host("b", 0)],
        origin: Origin {
            file: "fleet.yaml".into(),
            line: 1,
        },
    }]);
    // A folder beside the slots that carries no tag: not an instance.
    let foreign: PathBuf = a.home().join(".asimov-agent/instances/my-own-box");
    let hosts = Arc::new(Mutex::new(vec![("a", a), ("b", b)]));
    let mut h = Harness::new(Arc::new(provider), (hosts.clone(), dir, shared));
    h.plant_untagged = Some(Box::new(move || {
        std::fs::create_dir_all(&foreign).expect("plant folder");
    }));
    // A host that goes down keeps its slots listed, as Stopped.
    h.stop = Some(Box::new(move |i| {
        let mut hosts = hosts.lock().unwrap();
        let host = i.host.as_deref().expect("ssh instances name their host");
        let (_, sshd) = hosts
            .iter_mut()
            .find(|(name, _)| *name == host)
            .expect("a fleet host");
        sshd.stop();
    }));
    h.fleet = Some("conf".into());
    h.capacity = Some(2);
    h
}

#[tokio::test]
async fn ssh_provider_conforms() {
    // Probe once: without an sshd binary the whole suite is skipped.
    if Sshd::start_or_skip().is_none() {
        return;
    }
    conformance(|| async { ssh_harness(false) }).await;
}

#[tokio::test]
async fn ssh_provider_conforms_on_hosts_sharing_a_home() {
    if Sshd::start_or_skip().is_none() {
        return;
    }
    conformance(|| async { ssh_harness(true) }).await;
}
