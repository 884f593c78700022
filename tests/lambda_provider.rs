//! The Lambda client in-process against the local Lambda test server: the provider
//! conformance suite, and the answers users of other tools have hit (a terminate of an
//! instance already `terminating` answering an unknown error; a launch "success" that
//! launched nothing; an error inside HTTP 200).

#[path = "support/lambda_server.rs"]
mod lambda_server;
mod support;

use asimov::home::Home;
use asimov::manifest::{Placement, Resources};
use asimov::model::{OwnerTag, ProviderKind, Secret};
use asimov::provider::lambda::{LambdaProvider, pacing};
use asimov::provider::{CreateRequest, ErrorKind, InstanceState, Provider};
use asimov::retry::Backoff;
use asimov::transport::ssh::{SshOptions, SshPool};
use lambda_server::{Config, Endpoint as Api, Fault, LambdaServer, SshTarget, instance_type};
use std::sync::Arc;
use std::time::Duration;
use support::conformance::{Harness, Injected, conformance};
use support::sshd::Sshd;

struct Kept {
    _server: Arc<LambdaServer>,
    _sshd: Sshd,
    _home: tempfile::TempDir,
}

fn setup(quota: usize) -> (Arc<LambdaServer>, LambdaProvider, Kept) {
    let sshd = Sshd::start_on_port_22();
    let server = Arc::new(LambdaServer::start(
        Config {
            ssh: Some(SshTarget {
                host: sshd.host().to_string(),
                port: sshd.port(),
                authorized_keys: sshd.dir().join("authorized_keys"),
            }),
            quota,
            ..Config::default()
        },
        vec![
            instance_type("gpu_1x_gh200", "GH200 (96 GB)", 1, 149, &[]),
            instance_type("gpu_1x_a10", "A10 (24 GB PCIe)", 1, 75, &["us-east-1"]),
        ],
    ));
    let home = tempfile::tempdir().expect("temp home");
    let pool = SshPool::with_options(
        Home::at(home.path()),
        SshOptions {
            connect_timeout: Duration::from_secs(5),
            ..SshOptions::default()
        },
    )
    .expect("ssh pool");
    let provider = LambdaProvider::new(
        &Home::at(home.path()),
        pool,
        server.url(),
        Secret::new(lambda_server::API_KEY),
        pacing(0.0),
    )
    .expect("provider")
    // No retries in place: what the server answers is what the caller sees.
    .with_retry(
        Backoff::new(Duration::from_millis(1), Duration::from_millis(1), 1.0)
            .with_max_elapsed(Some(Duration::ZERO)),
    )
    .with_default_user(sshd.user())
    .with_ssh_port(sshd.port());
    (
        Arc::clone(&server),
        provider,
        Kept {
            _server: server,
            _sshd: sshd,
            _home: home,
        },
    )
}

fn request(run: &str) -> CreateRequest {
    CreateRequest {
        tag: OwnerTag::new("lamtest", run, 1),
        placement: Placement {
            provider: ProviderKind::Lambda,
            instance_types: vec!["gpu_1x_gh200".into(), "gpu_1x_a10".into()],
            ..Placement::local()
        },
        resources: Resources::default(),
        image: None,
    }
}

#[tokio::test]
async fn lambda_provider_conforms() {
    conformance(|| async {
        let (server, provider, kept) = setup(2);
        let mut h = Harness::new(Arc::new(provider), kept);
        h.capacity = Some(2);
        let s = Arc::clone(&server);
        h.plant_untagged = Some(Box::new(move || {
            s.plant("gpu_1x_a10", "us-east-1", "my notebook");
        }));
        let s = Arc::clone(&server);
        h.inject = Some(Box::new(move |what| match what {
            // Capacity gone everywhere: the listing shows none.
            Injected::NoCapacity => s.set_types(|ts| ts.iter_mut().for_each(|t| t.regions.clear())),
            Injected::RateLimited => s.inject(Some(Api::List), Fault::TooManyRequests, 1),
        }));
        let s = Arc::clone(&server);
        h.stop = Some(Box::new(move |i| s.preempt(&i.id)));
        h
    })
    .await;
}

#[tokio::test]
async fn terminating_an_instance_already_terminating_counts_as_done() {
    let (server, p, _kept) = setup(5);
    let a = p.create(&request("twice-0")).await.expect("create");
    p.destroy(&a.id).await.expect("terminate");
    // The server answers an unknown error now; the instance is on its way out.
    p.destroy(&a.id)
        .await
        .expect("a second terminate is not an error");
    let unknown = server
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Api::Terminate && r.status == 400)
        .count();
    assert_eq!(unknown, 1, "the server did answer the unknown error");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gone = p.destroy(&a.id).await.expect_err("gone");
    assert_eq!(gone.kind, ErrorKind::NotFound, "{gone}");
}

#[tokio::test]
async fn a_launch_success_that_launched_nothing_is_transient_and_leaves_nothing() {
    let (server, p, _kept) = setup(5);
    server.inject(Some(Api::Launch), Fault::EmptySuccess, 1);
    let e = p
        .create(&request("empty-0"))
        .await
        .expect_err("nothing launched");
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    assert!(server.instances().is_empty());
    let a = p
        .create(&request("empty-0"))
        .await
        .expect("the next one launches");
    assert_eq!(server.instances().len(), 1);
    p.destroy(&a.id).await.expect("cleanup");
}

#[tokio::test]
async fn an_error_inside_http_200_is_not_a_listing() {
    let (server, p, _kept) = setup(5);
    let a = p.create(&request("ok-0")).await.expect("create");
    server.inject(Some(Api::List), Fault::ErrorInOk, 1);
    let e = p
        .list()
        .await
        .expect_err("an error body is not an empty listing");
    assert_ne!(e.kind, ErrorKind::NotFound);
    let listed = p.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, InstanceState::Provisioning);
    p.destroy(&a.id).await.expect("cleanup");
}

#[tokio::test]
async fn a_launch_refused_for_capacity_although_listed_names_where_there_is_capacity() {
    let (server, p, _kept) = setup(5);
    // The listing shows gh200 in us-west-1, yet Lambda refuses it there; a10 has
    // capacity in us-east-1, which this placement excludes.
    server.set_types(|ts| {
        ts[0].regions = vec!["us-west-1".into()];
        ts[0].refuse_launches = true;
    });
    let mut req = request("west-0");
    req.placement.regions = vec!["us-west-1".into()];
    let e = p.create(&req).await.expect_err("no capacity in us-west-1");
    assert_eq!(e.kind, ErrorKind::NoCapacity, "{e}");
    assert!(
        e.to_string().contains("gpu_1x_gh200 in us-west-1")
            && e.to_string().contains("gpu_1x_a10 (us-east-1)"),
        "the error names the regions Lambda says have capacity: {e}"
    );
    assert!(server.instances().is_empty());
}

/// The server finishes a launch whose client hung up, as a real API does: the fault
/// campaign's `Slow` holds the launch past the client's timeout, and the instance
/// lands all the same.
#[tokio::test]
async fn a_launch_held_past_the_clients_timeout_still_lands_in_the_servers_records() {
    let faults = support::faults::Faults::new(
        7,
        support::faults::Rates {
            slow: 1.0,
            slow_for: Duration::from_secs(8),
            creates_only: true,
            ..Default::default()
        },
    );
    let server = LambdaServer::start(
        Config {
            faults: Some(faults),
            ..Config::default()
        },
        vec![instance_type(
            "gpu_1x_a10",
            "A10 (24 GB PCIe)",
            1,
            75,
            &["us-east-1"],
        )],
    );
    server.add_key(
        "late-key",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOlate late@test",
    );
    // reqwest is built without a crypto provider (asimov installs ring): so here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let err = client
        .post(format!("{}/instance-operations/launch", server.url()))
        .bearer_auth(lambda_server::API_KEY)
        .json(&serde_json::json!({
            "region_name": "us-east-1",
            "instance_type_name": "gpu_1x_a10",
            "ssh_key_names": ["late-key"],
            "name": "late",
        }))
        .send()
        .await
        .expect_err("the launch is held past the client's timeout");
    assert!(err.is_timeout(), "{err}");
    // The hold is 8 s, the client gave up after 1: nothing is launched yet.
    assert!(server.instances().is_empty(), "{:?}", server.instances());
    let start = std::time::Instant::now();
    while server.instances().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the launch whose client hung up never landed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recs = server.instances();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].name, "late");
    assert_eq!(server.launches_received(), 1);
}

/// Found by the fault campaign once the server finished requests whose client hung up
/// (seed 1796149630520658100): a listing held 4 s was recorded when it was answered,
/// among the client's later, well-paced requests, and the campaign read three requests
/// within two gaps as asimov's pacing violation. A slow request is judged, and
/// recorded, on its arrival.
#[tokio::test]
async fn a_slow_request_is_recorded_when_the_rate_limits_judged_it_on_arrival() {
    let faults = support::faults::Faults::new(
        7,
        support::faults::Rates {
            slow: 1.0,
            slow_for: Duration::from_secs(6),
            ..Default::default()
        },
    );
    let server = Arc::new(LambdaServer::start(
        Config {
            faults: Some(Arc::clone(&faults)),
            request_gap: Duration::from_secs(2),
            ..Config::default()
        },
        vec![instance_type(
            "gpu_1x_a10",
            "A10 (24 GB PCIe)",
            1,
            75,
            &["us-east-1"],
        )],
    ));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("{}/instances", server.url());
    let list = || client.get(&url).bearer_auth(lambda_server::API_KEY).send();
    let first = tokio::spawn(list());
    let start = std::time::Instant::now();
    while faults.counts().0.get("timeout").copied().unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    faults.set(support::faults::Rates::default());
    // 3 s after the first arrived: past the 2 s gap, before the first is acted on.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(start.elapsed())).await;
    let second = list().await.expect("the second listing");
    let first = first.await.unwrap().expect("the first listing");
    assert_eq!(first.status().as_u16(), 200);
    assert_eq!(second.status().as_u16(), 200);
    // Pushed as answered: the second first, then the slow one.
    let recs = server.requests();
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert!(
        recs[1].at < recs[0].at,
        "the slow one is recorded at its arrival, before the second: {recs:#?}"
    );
    assert_eq!(server.rate_limited(), 0);
}
