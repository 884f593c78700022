//! `asimov offers` across every configured cloud, and `--pick` through a real
//! pseudo-terminal, against the clouds' local test servers: the merged table sorted by
//! price; a failing cloud reported on stderr without losing the others' offers; the
//! chosen offer's placement entry printed, or written first into the job file with the
//! rest of the file kept; without a terminal, a hint and a failure.

#[path = "support/lambda_server.rs"]
mod lambda_server;
#[path = "support/runpod_server.rs"]
mod runpod_server;
mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use rexpect::process::WaitStatus;
use rexpect::reader::Options;
use rexpect::session::{PtySession, spawn_with_options};
use serde_json::Value;
use std::process::Command;
use support::cli::Asimov;

struct Clouds {
    vast: vast_server::VastServer,
    lambda: lambda_server::LambdaServer,
    runpod: runpod_server::RunpodServer,
}

fn clouds() -> Clouds {
    Clouds {
        vast: vast_server::VastServer::start(
            vast_server::Config::default(),
            vec![
                vast_server::offer(401, "H100 SXM", 1, 80.0, 2.40),
                vast_server::offer(402, "H100 PCIE", 1, 80.0, 1.95),
                vast_server::offer(403, "RTX 4090", 1, 24.0, 0.38),
            ],
        ),
        lambda: lambda_server::LambdaServer::start(
            lambda_server::Config::default(),
            vec![lambda_server::instance_type(
                "gpu_1x_h100_pcie",
                "H100 (80 GB PCIe)",
                1,
                249,
                &["us-east-1"],
            )],
        ),
        runpod: runpod_server::RunpodServer::start(
            runpod_server::Config::default(),
            vec![runpod_server::gpu(
                "NVIDIA H100 80GB HBM3",
                "H100 SXM",
                80,
                2.19,
                3,
            )],
        ),
    }
}

/// The command with every cloud pointed at its test server and given its key.
fn with_clouds(mut cmd: Command, c: &Clouds) -> Command {
    cmd.env("ASIMOV_VAST_API_URL", c.vast.url())
        .env("ASIMOV_VAST_PACING", "0")
        .env("VAST_API_KEY", vast_server::API_KEY)
        .env("ASIMOV_LAMBDA_API_URL", c.lambda.url())
        .env("ASIMOV_LAMBDA_PACING", "0")
        .env("LAMBDA_API_KEY", lambda_server::API_KEY)
        .env("ASIMOV_RUNPOD_API_URL", c.runpod.url())
        .env("ASIMOV_RUNPOD_PACING", "0")
        .env("RUNPOD_API_KEY", runpod_server::API_KEY);
    cmd
}

fn items(stdout: &[u8]) -> Vec<(String, String, f64)> {
    let v: Value = serde_json::from_slice(stdout).expect("offers -o json is JSON");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["provider"].as_str().unwrap().to_string(),
                i["id"].as_str().unwrap().to_string(),
                i["price_per_hour"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn without_provider_every_configured_cloud_is_searched_and_merged_by_price() {
    let a = Asimov::new();
    let c = clouds();
    let out = with_clouds(a.command(), &c)
        .args(["offers", "--gpu", "H100", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = items(&out.stdout);
    let want = [
        ("vast", "402", 1.95),
        ("runpod", "NVIDIA H100 80GB HBM3", 2.19),
        ("vast", "401", 2.40),
        ("lambda", "gpu_1x_h100_pcie", 2.49),
    ];
    let want: Vec<(String, String, f64)> = want
        .iter()
        .map(|(p, i, d)| (p.to_string(), i.to_string(), *d))
        .collect();
    assert_eq!(got, want);
    // The table merges them too.
    let out = with_clouds(a.command(), &c)
        .args(["offers", "--gpu", "H100"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    for p in ["vast", "lambda", "runpod"] {
        assert!(table.contains(p), "{p} missing:\n{table}");
    }

    // Lambda refuses its key: said on stderr, the other clouds' offers still shown.
    let out = with_clouds(a.command(), &c)
        .env("LAMBDA_API_KEY", "wrong-key")
        .args(["offers", "--gpu", "H100", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: lambda:"), "{err}");
    let providers: Vec<String> = items(&out.stdout).into_iter().map(|i| i.0).collect();
    assert_eq!(providers, ["vast", "runpod", "vast"]);
    // A cloud without a key is not searched at all.
    let out = with_clouds(a.command(), &c)
        .env_remove("RUNPOD_API_KEY")
        .args(["offers", "--gpu", "H100", "-o", "json"])
        .output()
        .unwrap();
    assert!(items(&out.stdout).iter().all(|i| i.0 != "runpod"));
    assert!(c.vast.instances().is_empty() && c.runpod.pods().is_empty());
}

fn spawn(cmd: Command) -> PtySession {
    spawn_with_options(
        cmd,
        Options::new()
            .timeout_ms(Some(60_000))
            .strip_ansi_escape_codes(true),
    )
    .expect("asimov starts in a pty")
}

fn terminal(mut cmd: Command) -> Command {
    cmd.env("TERM", "xterm")
        .env("COLUMNS", "160")
        .env("LINES", "40");
    cmd
}

fn keys(p: &mut PtySession, text: &str) {
    p.send(text).expect("typing");
    p.flush().expect("typing");
}

fn exit_code(p: &PtySession) -> i32 {
    match p.process().wait().expect("wait") {
        WaitStatus::Exited(_, code) => code,
        other => panic!("asimov did not exit normally: {other:?}"),
    }
}

const JOB: &str = "# our fine-tune\napiVersion: asimov/v1\nkind: Job\nmetadata: {name: ft}\nspec:\n  \
                   run: python train.py  # the script\n  \
                   resources: {gpu: {name: [H100], count: 1}}\n  \
                   placement:\n    # the fallback\n    - {provider: local}\n  image: img\n";

#[test]
fn pick_filters_as_you_type_and_writes_the_placement_into_the_job() {
    let a = Asimov::new();
    let c = clouds();
    let job = a.manifest("job.yaml", JOB);

    // Printed: type to filter, arrows to move, enter to choose.
    let mut cmd = with_clouds(terminal(a.command()), &c);
    cmd.args(["offers", "--gpu", "H100", "--pick", "--premium", "10"]);
    let mut p = spawn(cmd);
    p.exp_string("Offer (type to filter)").unwrap();
    p.exp_string("gpu_1x_h100_pcie").unwrap();
    keys(&mut p, "sxm");
    // Down from the first match (RunPod's H100 SXM, $2.19) to Vast's 401.
    keys(&mut p, "\x1b[B");
    keys(&mut p, "\r");
    p.exp_string("Picked vast offer 401").unwrap();
    p.exp_string("- {provider: vast, max_price_per_hour: 2.64, filters: {gpu_name: \"H100 SXM\"}}")
        .unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(
        std::fs::read_to_string(&job).unwrap(),
        JOB,
        "printing writes nothing"
    );
    // The printed entry rents that GPU model again, under its cap.
    let vast_job = a.manifest(
        "vast.yaml",
        &JOB.replace(
            "    - {provider: local}\n",
            "    - {provider: vast, max_price_per_hour: 2.64, filters: {gpu_name: \"H100 SXM\"}}\n",
        ),
    );
    let out = with_clouds(a.command(), &c)
        .args(["apply", "--dry-run", "-f", vast_job.to_str().unwrap()])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("run/ft-0 would start on vast: offer 401 (H100 SXM x1"),
        "{plan}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Written: the first placement of the job, every other line kept.
    let mut cmd = with_clouds(terminal(a.command()), &c);
    cmd.args([
        "offers",
        "-f",
        job.to_str().unwrap(),
        "--pick",
        "--write",
        "--provider",
        "lambda",
    ]);
    let mut p = spawn(cmd);
    p.exp_string("gpu_1x_h100_pcie").unwrap();
    keys(&mut p, "\r");
    p.exp_string("Wrote it as the first placement").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    let written = std::fs::read_to_string(&job).unwrap();
    assert_eq!(
        written,
        JOB.replace(
            "  placement:\n",
            "  placement:\n    - {provider: lambda, instance_types: [gpu_1x_h100_pcie], max_price_per_hour: 2.49}\n"
        )
    );
    // The job is valid and its dry run takes the picked type first.
    let out = with_clouds(a.command(), &c)
        .args(["apply", "--dry-run", "-f", job.to_str().unwrap()])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("run/ft-0 would start on lambda: offer gpu_1x_h100_pcie"),
        "{plan}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Esc leaves without writing.
    let mut cmd = with_clouds(terminal(a.command()), &c);
    cmd.args(["offers", "-f", job.to_str().unwrap(), "--pick", "--write"]);
    let mut p = spawn(cmd);
    p.exp_string("Offer (type to filter)").unwrap();
    keys(&mut p, "\x1b");
    p.exp_string("nothing was changed").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 130);
    assert_eq!(std::fs::read_to_string(&job).unwrap(), written);
    assert!(c.vast.instances().is_empty() && c.lambda.instances().is_empty());
}

#[test]
fn pick_without_a_terminal_fails_with_a_hint() {
    let a = Asimov::new();
    let c = clouds();
    let out = with_clouds(a.command(), &c)
        .args(["offers", "--pick"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("asks on a terminal"), "{err}");
    assert!(err.contains("asimov offers -o json"), "{err}");
}
