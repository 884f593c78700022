//! The RunPod client in-process against the local RunPod test server: the provider
//! conformance suite, and what users of other tools have hit (RUNNING with no ports for
//! a while; strict create bodies; a pod created while the first GPU type has none).

#[path = "support/runpod_server.rs"]
mod runpod_server;
mod support;

use asimov::home::Home;
use asimov::manifest::{GpuRequest, Placement, Resources};
use asimov::model::{OwnerTag, ProviderKind, Secret};
use asimov::provider::runpod::RunpodProvider;
use asimov::provider::{CreateRequest, ErrorKind, InstanceState, Provider};
use asimov::retry::Backoff;
use asimov::transport::ssh::{SshOptions, SshPool};
use runpod_server::{Config, Endpoint as Api, Fault, RunpodServer, SshTarget, gpu};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::conformance::{Harness, Injected, conformance};
use support::sshd::Sshd;

struct Kept {
    _server: Arc<RunpodServer>,
    _sshd: Sshd,
    _home: tempfile::TempDir,
}

fn setup(stock: u32) -> (Arc<RunpodServer>, RunpodProvider, Kept) {
    let sshd = Sshd::start();
    let server = Arc::new(RunpodServer::start(
        Config {
            ssh: Some(SshTarget {
                host: sshd.host().to_string(),
                port: sshd.port(),
                authorized_keys: sshd.dir().join("authorized_keys"),
            }),
            ..Config::default()
        },
        vec![
            gpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, 0),
            gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, stock),
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
    let provider = RunpodProvider::new(
        &Home::at(home.path()),
        pool,
        server.url(),
        Secret::new(runpod_server::API_KEY),
        Duration::ZERO,
    )
    .expect("provider")
    .with_retry(
        Backoff::new(Duration::from_millis(1), Duration::from_millis(1), 1.0)
            .with_max_elapsed(Some(Duration::ZERO)),
    )
    .with_default_user(sshd.user());
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

#[tokio::test]
async fn runpod_provider_conforms() {
    conformance(|| async {
        let (server, provider, kept) = setup(2);
        let mut h = Harness::new(Arc::new(provider), kept);
        h.capacity = Some(2);
        let s = Arc::clone(&server);
        h.plant_untagged = Some(Box::new(move || {
            s.plant("NVIDIA GeForce RTX 4090", "my notebook");
        }));
        let s = Arc::clone(&server);
        h.inject = Some(Box::new(move |what| match what {
            Injected::NoCapacity => s.inject(Some(Api::Create), Fault::NoStock, 1),
            Injected::RateLimited => s.inject(Some(Api::List), Fault::TooManyRequests, 1),
        }));
        let s = Arc::clone(&server);
        h.stop = Some(Box::new(move |i| s.exit_pod(&i.id)));
        h
    })
    .await;
}

#[tokio::test]
async fn a_running_pod_without_ports_is_not_yet_reachable_and_the_proxy_is_never_used() {
    let (server, p, _kept) = setup(5);
    server.configure(|c| {
        c.running_after = Duration::from_millis(200);
        c.ports_after = Duration::from_millis(1500);
    });
    let req = CreateRequest {
        tag: OwnerTag::new("podtest", "ports-0", 1),
        placement: Placement {
            provider: ProviderKind::Runpod,
            ..Placement::local()
        },
        resources: Resources {
            gpu: Some(GpuRequest {
                names: vec!["H100".into(), "rtx_4090".into()],
                count: 1,
                min_vram_gb: None,
            }),
            ..Resources::default()
        },
        image: None,
    };
    let a = p.create(&req).await.expect("create");
    assert_eq!(server.pods()[0].gpu_id, "NVIDIA GeForce RTX 4090");
    let start = Instant::now();
    let mut saw_running_without_ports = false;
    let running = loop {
        let i = p
            .list()
            .await
            .expect("list")
            .into_iter()
            .find(|i| i.id == a.id);
        let pod = server
            .pods()
            .into_iter()
            .find(|x| x.id == a.id)
            .expect("pod");
        match i {
            Some(i) if i.state == InstanceState::Running => break i,
            Some(i) => {
                assert!(i.endpoint.is_none() || pod.status != "RUNNING", "{i:?}");
                if pod.status == "RUNNING" {
                    saw_running_without_ports = true;
                }
            }
            None => panic!("pod not listed"),
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        saw_running_without_ports,
        "the server showed RUNNING without ports first"
    );
    let machine = p.machine(&running).expect("machine");
    assert_eq!(
        machine
            .observe()
            .await
            .expect("observe over the direct port"),
        None
    );
    // Strict bodies: the server refuses unknown fields, so a create that got through
    // sent none.
    let body = &server.pods()[0].body;
    assert_eq!(body["gpu"]["id"], "NVIDIA GeForce RTX 4090");
    assert_eq!(body["ports"][0], "22/tcp");
    p.destroy(&a.id).await.expect("cleanup");
}

fn plain_request(run: &str) -> CreateRequest {
    CreateRequest {
        tag: OwnerTag::new("podtest", run, 1),
        placement: Placement {
            provider: ProviderKind::Runpod,
            ..Placement::local()
        },
        resources: Resources {
            gpu: Some(GpuRequest {
                names: vec!["rtx_4090".into()],
                count: 1,
                min_vram_gb: None,
            }),
            ..Resources::default()
        },
        image: None,
    }
}

#[tokio::test]
async fn an_error_inside_http_200_is_not_a_listing() {
    let (server, p, _kept) = setup(5);
    let a = p.create(&plain_request("ok-0")).await.expect("create");
    server.inject(Some(Api::List), Fault::ErrorInOk, 1);
    let e = p
        .list()
        .await
        .expect_err("a problem body is not an empty listing");
    assert_ne!(e.kind, ErrorKind::NotFound, "{e}");
    assert_eq!(p.list().await.expect("list").len(), 1);
    p.destroy(&a.id).await.expect("cleanup");
}
