//! Defects the campaigns found in request pacing, pinned in-process (issue 12).
//!
//! Lambda: a launch took its slot of the overall one-request gap first and then waited
//! for its launch slot, so it left a launch gap later without holding an overall slot
//! then: it collided with the listings queued meanwhile (the fault campaign saw the
//! server refuse a listing with 429 several seconds into a controller's life).

#[path = "support/lambda_server.rs"]
mod lambda_server;
mod support;

use asimov::home::Home;
use asimov::manifest::{Placement, Resources};
use asimov::model::{OwnerTag, ProviderKind, Secret};
use asimov::provider::lambda::{LambdaProvider, pacing};
use asimov::provider::{CreateRequest, Provider};
use asimov::transport::ssh::SshPool;
use lambda_server::{Config, LambdaServer, instance_type};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The client's scale of Lambda's limits (1 request/s, 1 launch/10 s).
const FACTOR: f64 = 0.1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_launches_keep_the_overall_gap_to_listings_queued_meanwhile() {
    // The server refuses what comes closer than 60 % of the client's gaps: room for a
    // loaded machine's jitter, none for a request sent without an overall slot.
    let server = LambdaServer::start(
        Config {
            request_gap: Duration::from_secs_f64(1.0 * FACTOR * 0.6),
            launch_gap: Duration::from_secs_f64(10.0 * FACTOR * 0.6),
            quota: 100,
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
    let home = tempfile::tempdir().expect("temp home");
    let pool = SshPool::new(Home::at(home.path())).expect("ssh pool");
    let provider = Arc::new(
        LambdaProvider::new(
            &Home::at(home.path()),
            pool,
            server.url(),
            Secret::new(lambda_server::API_KEY),
            pacing(FACTOR),
        )
        .expect("provider"),
    );
    let until = Instant::now() + Duration::from_secs(4);
    let lister = {
        let p = Arc::clone(&provider);
        tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < until {
                let _ = p.list().await;
                n += 1;
            }
            n
        })
    };
    let mut launches = Vec::new();
    for i in 0..3 {
        let p = Arc::clone(&provider);
        launches.push(tokio::spawn(async move {
            p.create(&CreateRequest {
                tag: OwnerTag::new("pacing", format!("r{i}"), 1),
                placement: Placement {
                    provider: ProviderKind::Lambda,
                    instance_types: vec!["gpu_1x_a10".into()],
                    ..Placement::local()
                },
                resources: Resources::default(),
                image: None,
            })
            .await
            .map(|_| ())
        }));
    }
    for l in launches {
        let _ = l.await;
    }
    let lists = lister.await.expect("lister");
    let refused: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.status == 429)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(lists > 5, "the listings ran alongside: {lists}");
    assert_eq!(
        server.launches_received(),
        3,
        "each launch reached the server"
    );
    assert!(
        refused.is_empty(),
        "requests the server refused for coming too close: {refused:?}"
    );
}
