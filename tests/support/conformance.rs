//! The conformance suite: the contract every `Provider` backend passes, the fake and the
//! real ones alike (fake, local and ssh in `tests/provider_conformance.rs`; each cloud
//! against its HTTP test server). A backend supplies `make`, a factory of fresh
//! `Harness`es, and the hooks it can honour; `conformance(make)` runs every check, each
//! on a fresh provider. A check whose hook a backend cannot offer is skipped for it.

use asimov::manifest::{Placement, Resources};
use asimov::model::OwnerTag;
use asimov::provider::{CreateRequest, ErrorKind, Instance, InstanceState, Provider};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The controller the suite's instances belong to.
pub const CONTROLLER: &str = "conformance";
/// Another controller sharing the same account or hosts.
pub const OTHER_CONTROLLER: &str = "someone-else";

/// A failure a backend can be made to produce on its next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// The next `create` finds no capacity.
    NoCapacity,
    /// The next `list` is rate limited (an HTTP 429 with a retry-after).
    RateLimited,
}

/// A hook acting on a listed instance.
pub type InstanceHook = Box<dyn Fn(&Instance) + Send + Sync>;

/// A provider under test, fresh for each check, with what its backend can be made to do.
pub struct Harness {
    pub provider: Arc<dyn Provider>,
    /// Plants a machine beside asimov's that carries no asimov tag.
    pub plant_untagged: Option<Box<dyn Fn() + Send + Sync>>,
    /// How long an instance may take to become `Running`.
    pub boot_timeout: Duration,
    /// The fleet placements name (`ssh` only).
    pub fleet: Option<String>,
    /// How many of the suite's instances fit at once, when that is bounded: the suite
    /// fills it and expects `NoCapacity` for one more.
    pub capacity: Option<usize>,
    /// Makes the backend fail its next call as told.
    pub inject: Option<Box<dyn Fn(Injected) + Send + Sync>>,
    /// Stops a running instance behind asimov's back (a host down, an instance paused
    /// or outbid by the provider).
    pub stop: Option<InstanceHook>,
    /// Kept alive as long as the provider is used (temp dirs, servers).
    pub _keep: Box<dyn std::any::Any + Send>,
}

impl Harness {
    /// A harness with no hooks.
    pub fn new(provider: Arc<dyn Provider>, keep: impl std::any::Any + Send) -> Harness {
        Harness {
            provider,
            plant_untagged: None,
            boot_timeout: Duration::from_secs(20),
            fleet: None,
            capacity: None,
            inject: None,
            stop: None,
            _keep: Box::new(keep),
        }
    }

    fn request(&self, controller: &str, run: &str) -> CreateRequest {
        CreateRequest {
            tag: OwnerTag::new(controller, run, 1),
            placement: Placement {
                provider: self.provider.kind(),
                fleet: self.fleet.clone(),
                ..Placement::local()
            },
            resources: Resources::default(),
            image: None,
        }
    }

    fn ours(&self, run: &str) -> CreateRequest {
        self.request(CONTROLLER, run)
    }

    async fn wait_running(&self, id: &str) -> Instance {
        let deadline = tokio::time::Instant::now() + self.boot_timeout;
        loop {
            let listed = self.provider.list().await.expect("list");
            if let Some(i) = listed
                .into_iter()
                .find(|i| i.id == id && i.state == InstanceState::Running)
            {
                return i;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {id} never became running"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs every check against providers made by `make`.
pub async fn conformance<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Harness>,
{
    create_carries_tag_and_is_listed(make().await).await;
    create_with_a_tag_that_exists_adopts(make().await).await;
    destroy_then_not_listed(make().await).await;
    destroy_is_idempotent(make().await).await;
    list_shows_only_asimov_tags(make().await).await;
    other_controllers_instances_are_left_alone(make().await).await;
    no_capacity_surfaces_as_such(make().await).await;
    rate_limit_surfaces_as_such(make().await).await;
    a_stopped_instance_lists_as_stopped(make().await).await;
    listed_instance_reaches_running_with_a_machine(make().await).await;
}

pub async fn create_carries_tag_and_is_listed(h: Harness) {
    let p = &h.provider;
    let req = h.ours("conf-0");
    let created = p.create(&req).await.expect("create");
    assert_eq!(created.tag, req.tag, "create returns the tag it was given");
    assert_eq!(created.provider, p.kind());
    let listed = p.list().await.expect("list");
    let found: Vec<_> = listed.iter().filter(|i| i.id == created.id).collect();
    assert_eq!(found.len(), 1, "created instance listed once: {listed:?}");
    assert_eq!(found[0].tag, req.tag, "listing carries the tag");
    p.destroy(&created.id).await.expect("cleanup");
}

/// A create cut off after the provider acted is retried with the same tag: the retry
/// must find the instance, not start a second one.
pub async fn create_with_a_tag_that_exists_adopts(h: Harness) {
    let p = &h.provider;
    let req = h.ours("conf-adopt");
    let first = p.create(&req).await.expect("create");
    let again = p.create(&req).await.expect("create with the same tag");
    assert_eq!(
        again.id, first.id,
        "the second create adopts the first instance"
    );
    let listed = p.list().await.expect("list");
    let with_tag = listed.iter().filter(|i| i.tag == req.tag).count();
    assert_eq!(with_tag, 1, "one instance per tag: {listed:?}");
    p.destroy(&first.id).await.expect("cleanup");
}

pub async fn destroy_then_not_listed(h: Harness) {
    let p = &h.provider;
    let a = p.create(&h.ours("conf-1")).await.expect("create a");
    let b = p.create(&h.ours("conf-2")).await.expect("create b");
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

/// Destroying what is already gone is success or `NotFound`, never another error: the
/// executor retries a destroy until the listing confirms the instance gone.
pub async fn destroy_is_idempotent(h: Harness) {
    let p = &h.provider;
    let a = p.create(&h.ours("conf-3")).await.expect("create");
    p.destroy(&a.id).await.expect("destroy");
    for id in [a.id.clone(), "no-such-instance-0".to_string()] {
        if let Err(e) = p.destroy(&id).await {
            assert_eq!(e.kind, ErrorKind::NotFound, "destroy of gone {id}: {e}");
        }
    }
    let listed = p.list().await.expect("list");
    assert!(
        listed
            .iter()
            .all(|i| i.id != a.id || i.state == InstanceState::Terminating),
        "{listed:?}"
    );
}

pub async fn list_shows_only_asimov_tags(h: Harness) {
    let p = &h.provider;
    if let Some(plant) = &h.plant_untagged {
        plant();
    }
    let a = p.create(&h.ours("conf-4")).await.expect("create");
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
        listed.iter().map(|i| &i.id).collect::<Vec<_>>(),
        vec![&a.id],
        "listed only the asimov instance, not the planted machine: {listed:?}"
    );
    p.destroy(&a.id).await.expect("cleanup");
}

/// Another controller's instance is listed with its own tag (so the planner can tell it
/// is not ours) and nothing this controller does touches it.
pub async fn other_controllers_instances_are_left_alone(h: Harness) {
    let p = &h.provider;
    let theirs = p
        .create(&h.request(OTHER_CONTROLLER, "conf-6"))
        .await
        .expect("create theirs");
    let ours = p.create(&h.ours("conf-6")).await.expect("create ours");
    assert_ne!(
        ours.id, theirs.id,
        "same run, other controller: two instances"
    );
    let listed = p.list().await.expect("list");
    let tag_of = |id: &str| listed.iter().find(|i| i.id == id).map(|i| i.tag.clone());
    assert_eq!(tag_of(&theirs.id), Some(theirs.tag.clone()), "{listed:?}");
    assert_eq!(tag_of(&ours.id), Some(ours.tag.clone()), "{listed:?}");
    p.destroy(&ours.id).await.expect("destroy ours");
    let listed = p.list().await.expect("list");
    let still = listed.iter().find(|i| i.id == theirs.id);
    assert!(
        still.is_some_and(
            |i| i.tag.controller == OTHER_CONTROLLER && i.state != InstanceState::Terminating
        ),
        "the other controller's instance is untouched: {listed:?}"
    );
    p.destroy(&theirs.id).await.expect("cleanup");
}

pub async fn no_capacity_surfaces_as_such(h: Harness) {
    let p = &h.provider;
    if let Some(n) = h.capacity {
        let mut held = Vec::new();
        for i in 0..n {
            let req = h.ours(&format!("conf-full-{i}"));
            held.push(p.create(&req).await.expect("create within capacity"));
        }
        let e = p
            .create(&h.ours("conf-full-more"))
            .await
            .expect_err("one more than fits");
        assert_eq!(e.kind, ErrorKind::NoCapacity, "{e}");
        for i in held {
            p.destroy(&i.id).await.expect("cleanup");
        }
    }
    if let Some(inject) = &h.inject {
        inject(Injected::NoCapacity);
        let e = p
            .create(&h.ours("conf-none"))
            .await
            .expect_err("no capacity");
        assert_eq!(e.kind, ErrorKind::NoCapacity, "{e}");
        // Instances destroyed above may still be listed while they terminate (Lambda).
        let listed = p.list().await.expect("list");
        assert!(
            listed.iter().all(|i| i.state == InstanceState::Terminating),
            "a refused create leaves nothing: {listed:?}"
        );
    }
}

pub async fn rate_limit_surfaces_as_such(h: Harness) {
    let Some(inject) = &h.inject else { return };
    inject(Injected::RateLimited);
    let e = h.provider.list().await.expect_err("rate limited");
    assert!(
        matches!(e.kind, ErrorKind::RateLimited { .. }),
        "a 429 is RateLimited, not {:?}: {e}",
        e.kind
    );
    h.provider.list().await.expect("the next list goes through");
}

pub async fn a_stopped_instance_lists_as_stopped(h: Harness) {
    let Some(stop) = &h.stop else { return };
    let p = &h.provider;
    let a = p.create(&h.ours("conf-stop")).await.expect("create");
    let running = h.wait_running(&a.id).await;
    stop(&running);
    let listed = p.list().await.expect("list");
    let state = listed.iter().find(|i| i.id == a.id).map(|i| i.state);
    assert_eq!(
        state,
        Some(InstanceState::Stopped),
        "a stopped instance is listed, as Stopped: {listed:?}"
    );
}

pub async fn listed_instance_reaches_running_with_a_machine(h: Harness) {
    let p = &h.provider;
    let a = p.create(&h.ours("conf-5")).await.expect("create");
    let running = h.wait_running(&a.id).await;
    assert!(
        running.endpoint.is_some(),
        "a running instance has an endpoint"
    );
    let machine = p.machine(&running).expect("machine of a running instance");
    let status = machine.observe().await.expect("observe");
    assert_eq!(status, None, "nothing was started on a fresh instance");
    p.destroy(&a.id).await.expect("cleanup");
}
