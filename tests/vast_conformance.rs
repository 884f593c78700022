//! The Vast provider held to the conformance suite every backend passes
//! (`support/conformance.rs`), against the local Vast test server whose instances' SSH
//! lands on a real sshd.

mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use asimov::home::Home;
use asimov::model::{ProviderKind, Secret};
use asimov::provider::Provider;
use asimov::provider::vast::{Pacing, VastProvider};
use asimov::retry::Backoff;
use asimov::transport::ssh::SshPool;
use std::sync::Arc;
use std::time::Duration;
use support::conformance::{Harness, Injected, conformance};
use support::sshd::Sshd;
use vast_server::{Config, Endpoint as Api, Fault, SshTarget, VastServer, offer};

/// Three offers fit the suite's resources at once; a fourth create finds none.
fn harness() -> Option<Harness> {
    let sshd = Sshd::start_or_skip()?;
    let server = Arc::new(VastServer::start(
        Config {
            ssh: Some(SshTarget {
                host: sshd.host().to_string(),
                port: sshd.port(),
                authorized_keys: sshd.dir().join("authorized_keys"),
            }),
            loading_after: Duration::from_millis(100),
            running_after: Duration::from_millis(400),
            ..Config::default()
        },
        vec![
            offer(11, "RTX 4090", 1, 24.0, 0.40),
            offer(12, "RTX 4090", 1, 24.0, 0.35),
            offer(13, "RTX 3090", 1, 24.0, 0.20),
        ],
    ));
    let dir = tempfile::tempdir().expect("temp home");
    let home = Home::at(dir.path());
    home.ensure().expect("home");
    let pool = SshPool::new(home.clone()).expect("ssh pool");
    // No retry in place: the suite checks what one call answers.
    let provider = VastProvider::new(
        &home,
        pool,
        server.url(),
        Secret::new(vast_server::API_KEY),
        Pacing::scaled(0.0),
    )
    .expect("provider")
    .with_retry(
        Backoff::new(Duration::from_millis(10), Duration::from_millis(10), 1.0)
            .with_max_elapsed(Some(Duration::ZERO)),
    )
    .with_default_user(sshd.user());
    let provider: Arc<dyn Provider> = Arc::new(provider);
    assert_eq!(provider.kind(), ProviderKind::Vast);
    let mut h = Harness::new(provider, (Arc::clone(&server), sshd, dir));
    let s = Arc::clone(&server);
    h.plant_untagged = Some(Box::new(move || {
        s.plant(13, "jupyter notebook");
    }));
    let s = Arc::clone(&server);
    h.inject = Some(Box::new(move |what| match what {
        Injected::NoCapacity => s.configure(|c| c.capacity_error_offers = vec![11, 12, 13]),
        Injected::RateLimited => s.inject(Some(Api::List), Fault::TooManyRequests, 1),
    }));
    let s = Arc::clone(&server);
    h.stop = Some(Box::new(move |i| {
        s.outbid(i.id.parse().expect("vast ids are numbers"));
    }));
    h.capacity = Some(3);
    h.boot_timeout = Duration::from_secs(20);
    Some(h)
}

#[tokio::test]
async fn vast_provider_conforms() {
    if harness().is_none() {
        return;
    }
    conformance(|| async { harness().expect("sshd was there a moment ago") }).await;
}
