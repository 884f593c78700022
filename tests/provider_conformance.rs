//! The conformance suite every `Provider` backend must pass. Each backend supplies a
//! factory for a fresh provider (and, where it can, a way to plant a machine asimov did
//! not create); the suite then checks the contract the planner relies on.
//!
//! Backends here: the in-memory fake, `local` (a temp home), and `ssh` (a fleet of two
//! real `sshd`s, skipped where no `sshd` binary exists).

mod support;

use asimov::home::Home;
use asimov::manifest::{Fleet, Origin, Placement, Resources};
use asimov::model::OwnerTag;
use asimov::provider::fake::{FakeConfig, FakeProvider};
use asimov::provider::local::LocalProvider;
use asimov::provider::ssh::SshProvider;
use asimov::provider::{CreateRequest, ErrorKind, InstanceState, Provider};
use asimov::transport::ssh::{SshOptions, SshPool};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// A provider under test, fresh for each check.
pub struct Harness {
    pub provider: Arc<dyn Provider>,
    /// Plants a machine without an asimov tag, when the backend can.
    pub plant_untagged: Option<Box<dyn Fn() + Send + Sync>>,
    /// How long an instance may take to become `Running`.
    pub boot_timeout: Duration,
    /// The fleet placements name (`ssh` only).
    pub fleet: Option<String>,
    /// Kept alive as long as the provider is used (temp dirs, servers).
    pub _keep: Box<dyn std::any::Any + Send>,
}

fn request(h: &Harness, run: &str, attempt: u32) -> CreateRequest {
    CreateRequest {
        tag: OwnerTag::new("conformance", run, attempt),
        placement: Placement {
            provider: h.provider.kind(),
            fleet: h.fleet.clone(),
            ..Placement::local()
        },
        resources: Resources::default(),
        image: None,
    }
}

/// Runs every check against providers made by `make`.
pub async fn conformance<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Harness>,
{
    create_carries_tag_and_is_listed(make().await).await;
    destroy_then_not_listed(make().await).await;
    destroy_of_gone_instance_is_not_found(make().await).await;
    list_shows_only_asimov_tags(make().await).await;
    listed_instance_reaches_running_with_a_machine(make().await).await;
}

async fn create_carries_tag_and_is_listed(h: Harness) {
    let p = &h.provider;
    let req = request(&h, "conf-0", 1);
    let created = p.create(&req).await.expect("create");
    assert_eq!(created.tag, req.tag, "create returns the tag it was given");
    assert_eq!(created.provider, p.kind());
    let listed = p.list().await.expect("list");
    let found: Vec<_> = listed.iter().filter(|i| i.id == created.id).collect();
    assert_eq!(found.len(), 1, "created instance listed once: {listed:?}");
    assert_eq!(found[0].tag, req.tag, "listing carries the tag");
    p.destroy(&created.id).await.expect("cleanup");
}

async fn destroy_then_not_listed(h: Harness) {
    let p = &h.provider;
    let a = p.create(&request(&h, "conf-1", 1)).await.expect("create a");
    let b = p.create(&request(&h, "conf-2", 1)).await.expect("create b");
    p.destroy(&a.id).await.expect("destroy");
    let listed = p.list().await.expect("list");
    let gone = listed
        .iter()
        .all(|i| i.id != a.id || i.state == InstanceState::Terminating);
    assert!(gone, "destroyed instance still listed as alive: {listed:?}");
    assert!(
        listed.iter().any(|i| i.id == b.id),
        "the other instance is untouched"
    );
    p.destroy(&b.id).await.expect("cleanup");
}

async fn destroy_of_gone_instance_is_not_found(h: Harness) {
    let p = &h.provider;
    let a = p.create(&request(&h, "conf-3", 1)).await.expect("create");
    p.destroy(&a.id).await.expect("destroy");
    let again = p
        .destroy(&a.id)
        .await
        .expect_err("second destroy must fail");
    assert_eq!(again.kind, ErrorKind::NotFound, "{again}");
    let never = p
        .destroy(&"no-such-instance-0".to_string())
        .await
        .expect_err("destroy of an unknown id must fail");
    assert_eq!(never.kind, ErrorKind::NotFound, "{never}");
}

async fn list_shows_only_asimov_tags(h: Harness) {
    let p = &h.provider;
    if let Some(plant) = &h.plant_untagged {
        plant();
    }
    let a = p.create(&request(&h, "conf-4", 1)).await.expect("create");
    let listed = p.list().await.expect("list");
    for i in &listed {
        let rendered = i.tag.render();
        assert_eq!(
            OwnerTag::parse(&rendered).as_ref(),
            Some(&i.tag),
            "listed a tag asimov cannot parse back: {rendered}"
        );
    }
    assert_eq!(
        listed.len(),
        1,
        "only the asimov instance is listed: {listed:?}"
    );
    p.destroy(&a.id).await.expect("cleanup");
}

async fn listed_instance_reaches_running_with_a_machine(h: Harness) {
    let p = &h.provider;
    let a = p.create(&request(&h, "conf-5", 1)).await.expect("create");
    let deadline = tokio::time::Instant::now() + h.boot_timeout;
    let running = loop {
        let listed = p.list().await.expect("list");
        if let Some(i) = listed
            .into_iter()
            .find(|i| i.id == a.id && i.state == InstanceState::Running)
        {
            break i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instance never became running"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        running.endpoint.is_some(),
        "a running instance has an endpoint"
    );
    let machine = p.machine(&running).expect("machine of a running instance");
    let status = machine.observe().await.expect("observe");
    assert_eq!(status, None, "nothing was started on a fresh instance");
    p.destroy(&a.id).await.expect("cleanup");
}

#[tokio::test(start_paused = true)]
async fn fake_provider_conforms() {
    conformance(|| async {
        let fake = Arc::new(FakeProvider::new(FakeConfig::default()));
        let planter = Arc::clone(&fake);
        Harness {
            provider: fake,
            plant_untagged: Some(Box::new(move || planter.add_foreign("my-own-box"))),
            boot_timeout: Duration::from_secs(60),
            fleet: None,
            _keep: Box::new(()),
        }
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
        Harness {
            provider: Arc::new(LocalProvider::new(home)),
            // A folder that is not an instance (no tag): never listed.
            plant_untagged: Some(Box::new(move || {
                std::fs::create_dir_all(&folder).expect("plant folder");
            })),
            boot_timeout: Duration::from_secs(10),
            fleet: None,
            _keep: Box::new(dir),
        }
    })
    .await;
}

#[tokio::test]
async fn ssh_provider_conforms() {
    // Probe once: without an sshd binary the whole suite is skipped.
    if support::sshd::Sshd::start_or_skip().is_none() {
        return;
    }
    conformance(|| async {
        let (a, b) = (support::sshd::Sshd::start(), support::sshd::Sshd::start());
        let dir = tempfile::tempdir().expect("temp home");
        let options = SshOptions {
            connect_timeout: Duration::from_secs(5),
            ..SshOptions::default()
        };
        let pool = SshPool::with_options(Home::at(dir.path()), options).expect("ssh pool");
        let provider = SshProvider::with_pool(pool);
        // Two whole hosts: the suite holds two instances at once.
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
        let foreign = a.home().join(".asimov-agent/instances/my-own-box");
        Harness {
            provider: Arc::new(provider),
            plant_untagged: Some(Box::new(move || {
                std::fs::create_dir_all(&foreign).expect("plant folder");
            })),
            boot_timeout: Duration::from_secs(20),
            fleet: Some("conf".into()),
            _keep: Box::new((a, b, dir)),
        }
    })
    .await;
}
