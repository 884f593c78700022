//! `asimov offers` through the real binary against the local Vast test server: the
//! filters in Vast's names and units, GPU names as users write them, sorted by price,
//! `-o json` as `{"items": [...]}`.

mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use serde_json::Value;
use support::cli::Asimov;
use vast_server::{Config, VastServer, offer};

fn server() -> VastServer {
    let mut slow = offer(404, "RTX 4090", 1, 24.0, 0.30);
    slow["dlperf"] = serde_json::json!(10.0);
    VastServer::start(
        Config::default(),
        vec![
            offer(401, "H100 SXM", 1, 80.0, 2.40),
            offer(402, "H100 PCIE", 1, 80.0, 1.95),
            offer(403, "RTX 4090", 1, 24.0, 0.38),
            slow,
            offer(405, "RTX 4090", 2, 24.0, 0.70),
            offer(406, "H200", 1, 141.0, 3.10),
        ],
    )
}

fn offers(a: &Asimov, s: &VastServer, args: &[&str]) -> std::process::Output {
    a.command()
        .env("ASIMOV_VAST_API_URL", s.url())
        .env("ASIMOV_VAST_PACING", "0")
        .env_remove("VAST_API_KEY")
        .arg("offers")
        .args(args)
        .output()
        .unwrap()
}

fn ids(a: &Asimov, s: &VastServer, args: &[&str]) -> Vec<String> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = offers(a, s, &all);
    assert!(
        out.status.success(),
        "offers {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("offers -o json is JSON");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn offers_are_searched_with_the_filters_and_sorted_by_price() {
    let a = Asimov::new();
    let s = server();
    // A family matches its variants; cheapest first.
    assert_eq!(ids(&a, &s, &["--gpu", "H100"]), vec!["402", "401"]);
    assert_eq!(ids(&a, &s, &["--gpu", "RTX_4090"]), vec!["404", "403"]);
    assert_eq!(
        ids(&a, &s, &["--gpu", "rtx 4090", "--count", "2"]),
        vec!["405"]
    );
    assert_eq!(
        ids(&a, &s, &["--gpu", "H100", "--max-price", "2"]),
        vec!["402"]
    );
    assert_eq!(ids(&a, &s, &["--min-vram", "100"]), vec!["406"]);
    assert!(
        ids(
            &a,
            &s,
            &["--gpu", "H100", "--filter", "reliability=>=0.999"]
        )
        .is_empty()
    );
    assert_eq!(
        ids(&a, &s, &["--gpu", "RTX 4090", "--sort", "perf-per-dollar"]),
        vec!["403", "404"]
    );
    // The JSON carries the contract's fields.
    let out = offers(&a, &s, &["--gpu", "H100 PCIE", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = &v["items"][0];
    for field in [
        "provider",
        "id",
        "gpu",
        "count",
        "vram_gb",
        "price_per_hour",
        "cuda",
        "disk_gb",
        "reliability",
        "location",
    ] {
        assert!(item.get(field).is_some(), "{field} missing: {item}");
    }
    assert_eq!(item["provider"], "vast");
    assert_eq!(item["vram_gb"], 80.0);
    assert_eq!(item["price_per_hour"], 1.95);
    // The table, for people.
    let out = offers(&a, &s, &["--gpu", "H100"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("H100 PCIE") && table.contains("1.950"),
        "{table}"
    );
    assert!(table.find("H100 PCIE") < table.find("H100 SXM"), "{table}");
    // A filter Vast does not know is an error, not an empty answer.
    let out = offers(&a, &s, &["--filter", "colour=red"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
}

#[test]
fn offers_take_a_jobs_resources_and_placement() {
    let a = Asimov::new();
    let s = server();
    let job = a.manifest(
        "job.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: ft}\nspec:\n  run: python train.py\n  \
         resources: {gpu: {name: [H100, H200], count: 1, min_vram_gb: 80}}\n  \
         placement:\n    - {provider: vast, max_price_per_hour: 3}\n",
    );
    assert_eq!(
        ids(&a, &s, &["-f", job.to_str().unwrap()]),
        vec!["402", "401"]
    );
    // Flags override the job's.
    assert_eq!(
        ids(&a, &s, &["-f", job.to_str().unwrap(), "--max-price", "5"]),
        vec!["402", "401", "406"]
    );
}

#[test]
fn applying_a_vast_job_without_a_key_says_how_to_store_one() {
    let a = Asimov::new();
    let job = a.manifest(
        "job.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: ft}\nspec:\n  run: python train.py\n  \
         placement:\n    - {provider: vast}\n",
    );
    let s = server();
    let out = a
        .command()
        .env("ASIMOV_VAST_API_URL", s.url())
        .env("ASIMOV_VAST_PACING", "0")
        .env_remove("VAST_API_KEY")
        .args(["apply", "--dry-run", "-f", job.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("asimov secret set VAST_API_KEY"), "{err}");
}
