//! `apply --dry-run` through the real binary: the plan before money moves. For a changed
//! spec, the diff of the stored job and what happens to each run (a running one keeps
//! its instance and restarts when it ends; one the matrix no longer makes stops); for
//! runs that would start, the offer each would take now from the clouds' local test
//! servers (distinct market offers, fallback through the placements), its price and its
//! budget; `-o json`; and nothing rented or stored.

#[path = "support/lambda_server.rs"]
mod lambda_server;
#[path = "support/runpod_server.rs"]
mod runpod_server;
mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use serde_json::Value;
use std::time::Duration;
use support::cli::Asimov;

fn job_yaml(run: &str, configs: &str) -> String {
    format!(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: sweep}}\nspec:\n  \
         run: {run}\n  matrix: {{config: [{configs}]}}\n"
    )
}

/// The stored manifests folder, file by file.
fn stored(a: &Asimov) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(a.home().join("manifests"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_changed_spec_shows_its_diff_and_which_runs_keep_restart_or_stop() {
    let a = Asimov::new();
    let job = a.manifest(
        "job.yaml",
        &job_yaml("sleep 120 # ${matrix.config}", "a, b"),
    );
    a.ok(&["apply", "-f", job.to_str().unwrap()]);
    a.wait_for("both runs to run", Duration::from_secs(90), || {
        a.run_phase("sweep-0").as_deref() == Some("Running")
            && a.run_phase("sweep-1").as_deref() == Some("Running")
    });
    let before = stored(&a);
    let runs_before = a.runs_json();

    // Edit the command and shrink the matrix: run 0 is kept, run 1 is no longer made.
    let edited = a.manifest("job.yaml", &job_yaml("sleep 5 # ${matrix.config}", "a"));
    let out = a.ok(&["apply", "--dry-run", "-f", edited.to_str().unwrap()]);
    assert!(out.starts_with("job/sweep configured (dry run)\n"), "{out}");
    // The diff of the normalised spec, as `kubectl diff` shows it.
    assert!(out.contains("    --- job/sweep (stored)\n"), "{out}");
    assert!(out.contains("    +++ job/sweep (applied)\n"), "{out}");
    assert!(out.contains("    -  run: sleep 120"), "{out}");
    assert!(out.contains("    +  run: sleep 5"), "{out}");
    assert!(out.contains("    -    - b\n"), "{out}");
    // A running run is not "started": it keeps its instance and restarts after.
    let instance = runs_before["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "sweep-0")
        .and_then(|r| r["instance_id"].as_str())
        .expect("run 0 has an instance")
        .to_string();
    assert!(
        out.contains(&format!(
            "  run/sweep-0 is Running on local (instance {instance}): it keeps running under \
             the old spec, and would restart with the new spec when it ends\n"
        )),
        "{out}"
    );
    assert!(
        out.contains("  run/sweep-1 would stop: no longer part of the job; its instance "),
        "{out}"
    );
    assert!(!out.contains("would start"), "{out}");

    // The same plan for scripts.
    let json = a.ok(&[
        "apply",
        "--dry-run",
        "-o",
        "json",
        "-f",
        edited.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&json).expect("the plan is JSON");
    let item = &v["items"][0];
    assert_eq!(item["kind"], "job");
    assert_eq!(item["change"], "configured");
    assert!(item["diff"].as_str().unwrap().contains("+  run: sleep 5"));
    assert_eq!(item["runs"][0]["action"], "restart-when-done");
    assert_eq!(item["runs"][0]["instance_id"], instance.as_str());
    assert_eq!(item["runs"][1]["action"], "stop");

    // Nothing changed: the stored job, the runs, their instances.
    assert_eq!(stored(&a), before);
    let runs_after = a.runs_json();
    for (b, c) in runs_before["items"]
        .as_array()
        .unwrap()
        .iter()
        .zip(runs_after["items"].as_array().unwrap())
    {
        assert_eq!(b["instance_id"], c["instance_id"]);
        assert_eq!(c["phase"], "Running");
    }
    a.ok(&["delete", "job", "sweep"]);
}

#[test]
fn a_new_job_on_local_names_the_host() {
    let a = Asimov::new();
    let job = a.manifest(
        "job.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: one}\nspec:\n  run: echo\n",
    );
    let out = a.ok(&["apply", "--dry-run", "-f", job.to_str().unwrap()]);
    assert!(
        out.starts_with(
            "job/one created (dry run)\n  run/one-0 would start on local (this machine, "
        ),
        "{out}"
    );
    assert!(stored(&a).is_empty());
    // `-o` is for the plan only.
    let bad = a.run(&["apply", "-o", "json", "-f", job.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(stored(&a).is_empty());
}

fn vast_offers() -> Vec<Value> {
    vec![
        vast_server::offer(401, "H100 SXM", 1, 80.0, 2.40),
        vast_server::offer(402, "H100 PCIE", 1, 80.0, 1.95),
        vast_server::offer(403, "RTX 4090", 1, 24.0, 0.38),
        vast_server::offer(406, "H200", 1, 141.0, 3.10),
    ]
}

#[test]
fn runs_that_would_start_show_the_offer_they_would_take_its_price_and_their_budget() {
    let a = Asimov::new();
    let vast = vast_server::VastServer::start(vast_server::Config::default(), vast_offers());
    let lambda = lambda_server::LambdaServer::start(
        lambda_server::Config::default(),
        vec![
            lambda_server::instance_type("gpu_1x_gh200", "GH200 (96 GB)", 1, 149, &[]),
            lambda_server::instance_type(
                "gpu_1x_h100_pcie",
                "H100 (80 GB PCIe)",
                1,
                249,
                &["us-east-1"],
            ),
        ],
    );
    let text = "apiVersion: asimov/v1\nkind: Budget\nmetadata: {name: team}\nspec: {limit_usd: 50}\n\
                ---\n\
                apiVersion: asimov/v1\nkind: Job\nmetadata: {name: ft}\nspec:\n  \
                run: python train.py ${matrix.lr}\n  matrix: {lr: ['1', '2', '3', '4']}\n  budget: team\n  \
                resources: {gpu: {name: [H100], count: 1, min_vram_gb: 80}}\n  placement:\n    \
                - {provider: runpod}\n    \
                - {provider: vast, max_price_per_hour: 3}\n    \
                - {provider: lambda, instance_types: [gpu_1x_gh200, gpu_1x_h100_pcie]}\n";
    let job = a.manifest("job.yaml", text);
    let dry = |output: &[&str]| {
        let out = a
            .command()
            .env("ASIMOV_VAST_API_URL", vast.url())
            .env("ASIMOV_VAST_PACING", "0")
            .env("VAST_API_KEY", vast_server::API_KEY)
            .env("ASIMOV_LAMBDA_API_URL", lambda.url())
            .env("ASIMOV_LAMBDA_PACING", "0")
            .env("LAMBDA_API_KEY", lambda_server::API_KEY)
            .env_remove("RUNPOD_API_KEY")
            .args(["apply", "--dry-run", "-f", job.to_str().unwrap()])
            .args(output)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = dry(&[]);
    assert!(out.contains("budget/team created (dry run)\n"), "{out}");
    assert!(out.contains("job/ft created (dry run)\n"), "{out}");
    // RunPod has no key: skipped. Vast's two fitting offers go to the first two runs,
    // cheapest first, never the same one twice; then Lambda's first type with capacity.
    let budget = "; budget team has $50.00 of $50.00 left";
    for want in [
        format!(
            "  run/ft-0 would start on vast (placement 2): offer 402 (H100 PCIE x1, 80 GB, Atlantis, AT) at $1.950/h{budget}\n"
        ),
        format!(
            "  run/ft-1 would start on vast (placement 2): offer 401 (H100 SXM x1, 80 GB, Atlantis, AT) at $2.400/h{budget}\n"
        ),
        format!(
            "  run/ft-2 would start on lambda (placement 3): offer gpu_1x_h100_pcie (H100 (80 GB PCIe) x1, 80 GB, us-east-1) at $2.490/h{budget}\n"
        ),
        format!(
            "  run/ft-3 would start on lambda (placement 3): offer gpu_1x_h100_pcie (H100 (80 GB PCIe) x1, 80 GB, us-east-1) at $2.490/h{budget}\n"
        ),
    ] {
        assert!(out.contains(&want), "{want:?} not in\n{out}");
    }
    let v: Value = serde_json::from_str(&dry(&["-o", "json"])).expect("the plan is JSON");
    let job_item = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == "job")
        .expect("the job's plan")
        .clone();
    let run0 = &job_item["runs"][0];
    assert_eq!(run0["action"], "start");
    assert_eq!(run0["provider"], "vast");
    assert_eq!(run0["placement_index"], 1);
    assert_eq!(run0["offer"]["id"], "402");
    assert_eq!(run0["offer"]["gpu"], "H100 PCIE");
    assert_eq!(run0["price_per_hour"], 1.95);
    assert_eq!(run0["budgets"][0]["name"], "team");
    assert_eq!(run0["budgets"][0]["left_usd"], 50.0);
    assert_eq!(job_item["runs"][2]["offer"]["id"], "gpu_1x_h100_pcie");

    // Nothing rented, nothing stored.
    assert_eq!(vast.creates_received(), 0);
    assert!(vast.instances().is_empty());
    assert!(lambda.instances().is_empty());
    assert!(stored(&a).is_empty());
    assert!(!a.home().join("state.db").exists());

    // Capacity outside the placement's regions does not count.
    let eu = a.manifest(
        "eu.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: eu}\nspec:\n  run: x\n  \
         placement: [{provider: lambda, instance_types: [gpu_1x_h100_pcie], regions: [eu-west-1]}]\n",
    );
    let out = a
        .command()
        .env("ASIMOV_LAMBDA_API_URL", lambda.url())
        .env("ASIMOV_LAMBDA_PACING", "0")
        .env("LAMBDA_API_KEY", lambda_server::API_KEY)
        .args(["apply", "--dry-run", "-f", eu.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("run/eu-0 would start once a placement has capacity; it waits as Pending now (lambda: no offer fits now)"),
        "{text}"
    );

    // Without capacity anywhere, the plan says the runs wait and why.
    let cheap = a.manifest(
        "cheap.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: cheap}\nspec:\n  run: x\n  \
         resources: {gpu: {name: [H100], count: 1}}\n  \
         placement: [{provider: vast, max_price_per_hour: 1}, {provider: lambda}]\n",
    );
    let out = a
        .command()
        .env("ASIMOV_VAST_API_URL", vast.url())
        .env("ASIMOV_VAST_PACING", "0")
        .env("VAST_API_KEY", vast_server::API_KEY)
        .env_remove("LAMBDA_API_KEY")
        .args(["apply", "--dry-run", "-f", cheap.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // A key only in the environment reaches a foreground controller, not a background one.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("note: VAST_API_KEY is only in this shell's environment"),
        "{err}"
    );
    assert!(
        text.contains(
            "  run/cheap-0 would start once a placement has capacity; it waits as Pending now \
             (vast: no offer fits now; lambda: no LAMBDA_API_KEY stored (asimov login lambda))"
        ),
        "{text}"
    );
}

#[test]
fn runpod_gpu_types_in_stock_are_quoted_for_the_count_asked() {
    let a = Asimov::new();
    let runpod = runpod_server::RunpodServer::start(
        runpod_server::Config::default(),
        vec![
            runpod_server::gpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.99, 4),
            runpod_server::gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 0),
            runpod_server::gpu("NVIDIA RTX A6000", "RTX A6000", 48, 0.49, 5),
        ],
    );
    let job = a.manifest(
        "job.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: rp}\nspec:\n  run: x\n  \
         resources: {gpu: {name: [RTX 4090, H100, A6000], count: 2}}\n  placement: [{provider: runpod}]\n",
    );
    let out = a
        .command()
        .env("ASIMOV_RUNPOD_API_URL", runpod.url())
        .env("ASIMOV_RUNPOD_PACING", "0")
        .env("RUNPOD_API_KEY", runpod_server::API_KEY)
        .args(["apply", "--dry-run", "-f", job.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // The 4090 has no stock: the H100, named before the cheaper A6000, is what a create
    // would take, for two GPUs.
    assert!(
        text.contains("  run/rp-0 would start on runpod: offer NVIDIA H100 80GB HBM3 (H100 SXM x2, 80 GB) at $5.980/h\n"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(runpod.pods().is_empty());
}
