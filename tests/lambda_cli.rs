//! Jobs placed on Lambda Cloud, through the real binary, against the local Lambda test
//! server whose instances' `ip` is a real sshd listening on port 22 of a loopback
//! address: a job runs to completion on the second machine type when the first has no
//! capacity, and its instance is terminated; three `config,branch` lines launch three
//! instances within the launch pacing; a 429 storm loses nothing; a controller killed by
//! SIGKILL while its launch is at the server adopts it on restart; an instance
//! terminated behind asimov's back is retried; an orphan is terminated; boot timeouts go
//! by the type's GPU count (a 1-GPU VM that never boots ends at its shorter one, an
//! 8-GPU one booting for 25 minutes is kept); with no type listing capacity the run
//! waits, saying why, and takes the first type once it has some.

#[path = "support/lambda_server.rs"]
mod lambda_server;
mod support;

use lambda_server::{Config, Endpoint as Api, Fault, LambdaServer, SshTarget, instance_type};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};
use support::cli::{Asimov, Cloud, kill9};
use support::sshd::Sshd;

/// Lambda's limits (1 request/s, 1 launch/10 s) scaled by this, on both sides: the
/// server answers 429 to closer calls; the client paces at a slightly wider gap.
const SCALE: f64 = 0.1;
/// The server's gaps are half the client's: at this scale a request gap is 100 ms, and
/// on a loaded CI machine arrivals jitter by tens of milliseconds (0.05 × 0.7 left 15 ms
/// and drew a 429 in CI).
const SLACK: f64 = 0.5;

struct World {
    server: LambdaServer,
    sshd: Sshd,
    a: Asimov,
}

/// The separate API key the user made for instances to end themselves.
const TERMINATE_KEY: &str = "lambda-terminate-key_abcdef987654";

fn world(types: Vec<lambda_server::TypeSpec>) -> Option<World> {
    world_with(types, |_| {})
}

fn world_with(
    types: Vec<lambda_server::TypeSpec>,
    config: impl FnOnce(&mut Config),
) -> Option<World> {
    let sshd = Sshd::start_on_port_22();
    let mut c = Config {
        ssh: Some(SshTarget {
            host: sshd.host().to_string(),
            port: sshd.port(),
            authorized_keys: sshd.dir().join("authorized_keys"),
        }),
        // Half the client's gaps: requests leave in their slots and arrive with the
        // jitter of a loaded machine.
        request_gap: Duration::from_secs_f64(1.0 * SCALE * SLACK),
        launch_gap: Duration::from_secs_f64(10.0 * SCALE * SLACK),
        other_keys: vec![TERMINATE_KEY.to_string()],
        ..Config::default()
    };
    config(&mut c);
    let server = LambdaServer::start(c, types);
    let a = Asimov::new();
    a.set_secret("LAMBDA_API_KEY", lambda_server::API_KEY);
    Some(World { server, sshd, a })
}

fn two_types() -> Vec<lambda_server::TypeSpec> {
    vec![
        // The note's first choice, with no capacity anywhere.
        instance_type("gpu_1x_gh200", "GH200 (96 GB)", 1, 149, &[]),
        instance_type("gpu_1x_a10", "A10 (24 GB PCIe)", 1, 75, &["us-east-1"]),
    ]
}

impl Cloud for World {
    fn asimov(&self) -> &Asimov {
        &self.a
    }

    fn command(&self) -> Command {
        let mut cmd = self.a.command();
        cmd.env("ASIMOV_LAMBDA_API_URL", self.server.url())
            .env("ASIMOV_LAMBDA_PACING", SCALE.to_string())
            .env_remove("LAMBDA_API_KEY");
        // Only where port 22 could not be bound (not root): say where sshd is.
        if self.sshd.port() != 22 {
            cmd.env("ASIMOV_LAMBDA_SSH_PORT", self.sshd.port().to_string());
        }
        cmd
    }

    fn state(&self) -> String {
        format!(
            "{}\n{:#?}",
            self.a.ok(&["get", "runs", "-o", "wide"]),
            self.server.instances()
        )
    }
}

impl World {
    fn job_with(&self, run: &str, extra: &str) -> std::path::PathBuf {
        self.a.manifest(
            "gpu.yaml",
            &format!(
                r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: gpu}}
spec:
  source: {{workdir: .}}
  run: |
    {run}
  placement:
    - {{provider: lambda, instance_types: [gpu_1x_gh200, gpu_1x_a10], ssh_user: {user}}}
{extra}"#,
                user = self.sshd.user()
            ),
        )
    }
}

#[test]
fn a_job_on_lambda_runs_on_the_second_machine_type_and_its_instance_is_terminated() {
    let Some(w) = world(two_types()) else { return };
    let job = w.job_with(
        r#"sh train.sh; for i in 1 2 3; do echo "ASIMOV_PROGRESS $i/3"; sleep 0.2; done"#,
        "",
    );
    let out = w
        .command()
        .args(["apply", "-f", job.to_str().unwrap(), "--wait"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply --wait: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.a.ok(&["describe", "run", "gpu-0"])
    );
    let runs = w.a.runs_json();
    let run = &runs["items"][0];
    assert_eq!(run["phase"], "Succeeded", "{run}");
    assert_eq!(run["provider"], "lambda");
    assert_eq!(run["exit_code"], 0);
    assert_eq!(run["progress"]["done"], 3);
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "one instance: {recs:?}");
    assert_eq!(
        recs[0].instance_type, "gpu_1x_a10",
        "the first type had none"
    );
    assert_eq!(recs[0].region, "us-east-1");
    assert_eq!(run["instance_id"], recs[0].id);
    assert!(recs[0].name.starts_with("asimov."), "{}", recs[0].name);
    let log = w.a.ok(&["logs", "gpu-0"]);
    assert!(log.contains("training"), "the job ran over ssh: {log}");
    assert!(w.sshd.logins() > 0, "logged in to the instance's sshd");
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(
            w.sshd.port(),
            22,
            "the VM's sshd listens on port 22 of its ip"
        );
    }
    w.until("the instance terminated and gone", 60, || {
        w.server.instances().iter().all(|i| i.gone)
    });
    assert!(w.server.instances()[0].billing_stopped.is_some());
    // asimov's key was registered by name, once, and named at launch.
    assert_eq!(w.server.key_names().len(), 1);
    assert_eq!(recs[0].ssh_key_name, w.server.key_names()[0]);
    // The launch of the type without capacity was never tried: the listing said so.
    let launches: Vec<_> = w
        .server
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Api::Launch)
        .collect();
    assert_eq!(launches.len(), 1, "{launches:?}");
    assert_eq!(w.server.rate_limited(), 0, "the client kept Lambda's pace");
}

#[test]
fn a_launch_refused_for_capacity_although_listed_moves_on_to_the_next_type() {
    let mut types = two_types();
    types[0].regions = vec!["us-west-1".into()];
    types[0].refuse_launches = true;
    let Some(w) = world(types) else { return };
    let job = w.job_with("sh train.sh", "");
    let out = w
        .command()
        .args(["apply", "-f", job.to_str().unwrap(), "--wait"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].instance_type, "gpu_1x_a10");
    let refused = w
        .server
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Api::Launch && r.status == 400)
        .count();
    assert_eq!(refused, 1, "the listed gh200 was tried once and refused");
}

#[test]
fn three_config_branch_lines_launch_three_instances_within_the_launch_pacing() {
    let Some(w) = world(two_types()) else { return };
    w.a.manifest(
        "runs.txt",
        "configs/a.yaml,main\nconfigs/b.yaml,main\nconfigs/c.yaml,\n",
    );
    let job = w.job_with(
        r#"echo "config ${matrix.config}"; sh train.sh"#,
        "  matrix: {file: runs.txt}\n",
    );
    let out = w
        .command()
        .args(["apply", "-f", job.to_str().unwrap(), "--wait"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.a.ok(&["get", "runs", "-o", "wide"])
    );
    let runs = w.a.runs_json();
    let items = runs["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|r| r["phase"] == "Succeeded"), "{runs}");
    let recs = w.server.instances();
    assert_eq!(recs.len(), 3, "{recs:?}");
    let mut at: Vec<Instant> = w
        .server
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Api::Launch && r.status == 200)
        .map(|r| r.at)
        .collect();
    at.sort();
    assert_eq!(at.len(), 3);
    let gap = Duration::from_secs_f64(10.0 * SCALE * SLACK);
    for pair in at.windows(2) {
        assert!(
            pair[1] - pair[0] >= gap,
            "launches {:?} apart",
            pair[1] - pair[0]
        );
    }
    let launch_429 = w
        .server
        .requests()
        .iter()
        .filter(|r| r.endpoint == Api::Launch && r.status == 429)
        .count();
    assert_eq!(launch_429, 0, "no launch was refused for pace");
    w.until("every instance terminated", 60, || {
        w.server.billing().is_empty()
    });
}

#[test]
fn a_429_and_5xx_storm_loses_nothing() {
    let Some(w) = world(two_types()) else { return };
    for (api, fault, times) in [
        (Some(Api::Launch), Fault::TooManyRequests, 3),
        (Some(Api::InstanceTypes), Fault::Html(502), 2),
        (Some(Api::List), Fault::TooManyRequests, 3),
        (Some(Api::List), Fault::Html(504), 2),
        (Some(Api::Terminate), Fault::Html(503), 2),
        (Some(Api::List), Fault::ErrorInOk, 1),
    ] {
        w.server.inject(api, fault, times);
    }
    let job = w.job_with("sh train.sh", "");
    let out = w
        .command()
        .args(["apply", "-f", job.to_str().unwrap(), "--wait"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.a.ok(&["describe", "run", "gpu-0"])
    );
    w.until("the instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    assert_eq!(w.server.instances().len(), 1, "{:?}", w.server.instances());
}

#[test]
fn a_controller_killed_while_its_launch_is_at_the_server_adopts_it_on_restart() {
    let Some(w) = world(two_types()) else { return };
    w.server.inject(
        Some(Api::Launch),
        Fault::HoldAnswer(Duration::from_secs(30)),
        1,
    );
    let job = w.job_with("sh train.sh; sleep 0.5", "");
    let mut controller = w.spawn_controller();
    w.apply(&job);
    w.until("a launch at the server", 30, || {
        w.server.launches_received() > 0
    });
    std::thread::sleep(Duration::from_millis(100));
    unsafe { libc::kill(controller.id() as i32, libc::SIGKILL) };
    assert_eq!(controller.wait().unwrap().signal(), Some(9));
    assert_eq!(w.server.instances().len(), 1);

    let mut again = w.spawn_controller();
    w.until("the run to succeed", 90, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "adopted, not launched twice: {recs:?}");
    assert_eq!(w.attempt(), 1);
    w.until("the instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    kill9(&mut again);
}

#[test]
fn an_instance_terminated_behind_asimovs_back_is_noticed_and_the_run_retried() {
    let Some(w) = world(two_types()) else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with(
        "sleep 600",
        "  retry: {on: [preemption, error], max_restarts: 2}\n",
    ));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    let first = w.server.billing()[0].id.clone();
    w.server.terminate_behind_back(&first);
    w.until("a second attempt on a new instance", 60, || {
        w.attempt() == 2 && w.server.billing().iter().any(|i| i.id != first)
    });
    assert_eq!(w.server.instances().len(), 2);
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn an_instance_with_our_tag_that_no_run_owns_is_terminated_and_others_are_left() {
    let Some(w) = world(two_types()) else { return };
    std::fs::create_dir_all(w.a.home()).unwrap();
    std::fs::write(w.a.home().join("controller-id"), "lamctl01").unwrap();
    let orphan = w
        .server
        .plant("gpu_1x_a10", "us-east-1", "asimov.lamctl01.ghost-0.1");
    let foreign = w
        .server
        .plant("gpu_1x_a10", "us-east-1", "asimov.otherctl.theirs-0.1");
    let untagged = w.server.plant("gpu_1x_a10", "us-east-1", "my notebook");
    let mut controller = w.spawn_controller();
    w.until("the orphan terminated", 60, || {
        w.server.billing().iter().all(|i| i.id != orphan)
    });
    std::thread::sleep(Duration::from_secs(2));
    let live: Vec<String> = w.server.billing().into_iter().map(|i| i.id).collect();
    assert_eq!(live, vec![foreign, untagged]);
    kill9(&mut controller);
}

#[test]
fn offers_lists_lambda_instance_types_with_prices_and_capacity() {
    let Some(w) = world(two_types()) else { return };
    let out = w
        .command()
        .args(["offers", "--provider", "lambda", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gpu_1x_a10", "gpu_1x_gh200"], "cheapest first: {doc}");
    assert_eq!(items[0]["provider"], "lambda");
    assert_eq!(items[0]["price_per_hour"], 0.75);
    assert_eq!(items[0]["vram_gb"], 24.0);
    assert_eq!(items[0]["available"], true);
    assert_eq!(items[0]["regions"][0], "us-east-1");
    assert_eq!(
        items[1]["available"], false,
        "no region lists gh200 capacity"
    );
    let out = w
        .command()
        .args([
            "offers",
            "--provider",
            "lambda",
            "--gpu",
            "GH200",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["items"].as_array().map(Vec::len), Some(1), "{doc}");
    assert!(w.server.instances().is_empty(), "offers rents nothing");
}

#[test]
fn a_preempted_instance_ends_the_attempt_is_terminated_and_the_run_retried() {
    let Some(w) = world(two_types()) else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with(
        "sleep 600",
        "  retry: {on: [preemption, error], max_restarts: 2}\n",
    ));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    let first = w.server.billing()[0].id.clone();
    // No warning: the status just changes.
    w.server.preempt(&first);
    w.until(
        "the preempted instance terminated and a second attempt",
        60,
        || {
            w.attempt() == 2
                && w.server
                    .instances()
                    .iter()
                    .any(|i| i.id == first && i.status != "preempted")
        },
    );
    let described = w.a.ok(&["describe", "run", "gpu-0"]);
    assert!(described.contains("preempted"), "{described}");
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn a_run_that_ends_while_the_controller_is_down_has_its_instance_terminated_once_it_is_back() {
    let Some(w) = world(two_types()) else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with("sleep 3; sh train.sh", ""));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    kill9(&mut controller);
    // Self-termination with a handed-over key is not built: the controller is the
    // backstop, and the instance bills until it is back.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(w.server.billing().len(), 1);
    let mut again = w.spawn_controller();
    w.until("the instance terminated", 30, || {
        w.server.billing().is_empty()
    });
    assert_eq!(w.a.run_phase("gpu-0").as_deref(), Some("Succeeded"));
    kill9(&mut again);
}

/// Terminated through the API with the handed-over key, as the server records it.
fn terminated_by_itself(w: &World, id: &str) -> bool {
    w.server.requests().iter().any(|r| {
        r.endpoint == Api::Terminate
            && r.status == 200
            && r.key == TERMINATE_KEY
            && r.body["instance_ids"][0].as_str() == Some(id)
    })
}

#[test]
fn with_the_controller_dead_the_instance_terminates_itself_with_the_handed_over_key() {
    for (run, extra) in [
        // The job ends by itself.
        ("sleep 4; echo done", ""),
        // max_duration hits.
        ("sleep 600", "  max_duration: 4s\n"),
    ] {
        let Some(w) = world(two_types()) else { return };
        w.a.set_secret("LAMBDA_TERMINATE_KEY", TERMINATE_KEY);
        let job = w.job_with(run, extra);
        let text = std::fs::read_to_string(&job).unwrap().replace(
            "ssh_user:",
            "terminate_key: LAMBDA_TERMINATE_KEY, ssh_user:",
        );
        std::fs::write(&job, text).unwrap();
        let mut controller = w.spawn_controller_with(&[("ASIMOV_LAMBDA_SELF_END_GRACE", "1")]);
        w.apply(&job);
        w.until("the run to run", 60, || {
            w.a.run_phase("gpu-0").as_deref() == Some("Running")
        });
        kill9(&mut controller);
        let id = w.server.billing()[0].id.clone();
        w.until("the instance to terminate itself", 60, || {
            terminated_by_itself(&w, &id)
        });
        w.until("the instance gone", 30, || w.server.billing().is_empty());
        // The controller's own key never did it: it is dead.
        assert!(
            !w.server
                .requests()
                .iter()
                .any(|r| r.endpoint == Api::Terminate && r.key == lambda_server::API_KEY),
            "terminated by the controller, not by the instance"
        );
        // The key reached the instance in 0600 files, never a command line or a log.
        let agent_dirs = w.sshd.home().join(".asimov-agent");
        let root = std::fs::read_dir(&agent_dirs)
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        use std::os::unix::fs::PermissionsExt;
        for secret in [".lambda_auth", ".lambda_wgetrc"] {
            let mode = std::fs::metadata(root.join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        // The server answered before the hook wrote its line: wait for it.
        let hook_log = || std::fs::read_to_string(root.join("on_end.log")).unwrap_or_default();
        w.until("the hook to say it ended the instance", 30, || {
            hook_log().contains("ended (200)")
        });
        let hook_log = hook_log();
        for text in [w.sshd.log(), hook_log] {
            assert!(!text.contains(TERMINATE_KEY), "{text}");
        }
        // A controller back later finds the run done and nothing to terminate.
        let mut again = w.spawn_controller();
        w.until("the run recorded as ended", 60, || {
            matches!(
                w.a.run_phase("gpu-0").as_deref(),
                Some("Succeeded" | "Failed")
            )
        });
        kill9(&mut again);
    }
}

#[test]
fn a_placement_naming_an_account_ssh_key_launches_with_it_and_logs_in_with_its_identity_file() {
    let Some(w) = world(two_types()) else { return };
    // The note's `ssh_key: aspen`: a key already in the account, its private half here.
    let identity = w.sshd.client_key();
    let public = std::fs::read_to_string(identity.with_extension("pub"))
        .or_else(|_| {
            Command::new("ssh-keygen")
                .args(["-y", "-f"])
                .arg(&identity)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        })
        .unwrap();
    w.server.add_key("aspen", &public);
    let job = w.job_with("sh train.sh", "");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "ssh_user:",
        &format!(
            "ssh_key: aspen, identity_file: {}, ssh_user:",
            identity.display()
        ),
    );
    std::fs::write(&job, text).unwrap();
    let out = w
        .command()
        .args(["apply", "-f", job.to_str().unwrap(), "--wait"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply --wait: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.a.ok(&["describe", "run", "gpu-0"])
    );
    let launches: Vec<_> = w
        .server
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Api::Launch && r.status == 200)
        .collect();
    assert_eq!(launches.len(), 1);
    assert_eq!(
        launches[0].body["ssh_key_names"],
        serde_json::json!(["aspen"])
    );
    // asimov's own key was neither registered nor authorized: the login was aspen's.
    assert_eq!(w.server.key_names(), vec!["aspen".to_string()]);
    if let Ok(ours) = std::fs::read_to_string(w.a.home().join("ssh/id_ed25519.pub")) {
        let authorized =
            std::fs::read_to_string(w.sshd.dir().join("authorized_keys")).unwrap_or_default();
        assert!(!authorized.contains(ours.trim()));
    }
    w.until("the instance terminated", 60, || {
        w.server.billing().is_empty()
    });
}

#[test]
fn a_placement_key_without_its_identity_file_or_a_terminate_key_not_stored_is_refused_at_apply() {
    let Some(w) = world(two_types()) else { return };
    let job = w.job_with("sh train.sh", "");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "ssh_user:",
        "ssh_key: aspen, terminate_key: NOT_STORED, ssh_user:",
    );
    std::fs::write(&job, text).unwrap();
    let out = w
        .command()
        .args(["apply", "-f", job.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`ssh_key` needs `identity_file`"), "{err}");
    assert!(err.contains("unknown secret `NOT_STORED`"), "{err}");
    assert!(err.contains("gpu.yaml:"), "{err}");
    assert!(w.server.requests().is_empty(), "nothing asked of Lambda");
}

#[test]
fn an_8_gpu_machine_booting_for_25_minutes_is_not_given_up_early() {
    // Time scaled 1:60 on both sides: the server boots the 8-GPU type in 25 s (its
    // 20-25 minutes), the controller's boot timeout for it is 30 s (its 30 minutes).
    let mut eight = instance_type(
        "gpu_8x_h100_sxm5",
        "H100 (80 GB SXM5)",
        8,
        2392,
        &["us-east-1"],
    );
    eight.boot = Some(Duration::from_secs(25));
    let Some(w) = world(vec![eight]) else { return };
    let job = w.a.manifest(
        "gpu.yaml",
        &format!(
            r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: gpu}}
spec:
  source: {{workdir: .}}
  run: echo trained on eight
  placement:
    - {{provider: lambda, instance_types: [gpu_8x_h100_sxm5], ssh_user: {user}}}
"#,
            user = w.sshd.user()
        ),
    );
    // The 1-GPU types' timeout (5 s) is not the 8-GPU types'.
    let mut controller = w.spawn_controller_with(&[("ASIMOV_LAMBDA_BOOT_TIMEOUT", SCALED_BOOT)]);
    let start = Instant::now();
    w.apply(&job);
    w.until("the run to succeed", 120, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    let booted_after = start.elapsed();
    assert!(booted_after >= Duration::from_secs(25), "{booted_after:?}");
    assert_eq!(w.attempt(), 1, "the booting machine was never given up");
    assert_eq!(w.server.instances().len(), 1, "one launch only");
    w.until("the instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn a_terminate_that_answered_success_but_did_nothing_is_sent_again_until_the_instance_is_gone() {
    let Some(w) = world(two_types()) else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with("sleep 600", ""));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    w.server
        .inject(Some(Api::Terminate), Fault::EmptySuccess, 1);
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("the instance terminated", 90, || {
        w.server.billing().is_empty()
    });
    let terminates = w
        .server
        .requests()
        .iter()
        .filter(|r| r.endpoint == Api::Terminate && r.status == 200)
        .count();
    assert!(
        terminates >= 2,
        "the first 200 did nothing; {terminates} terminates"
    );
    kill9(&mut controller);
}

#[test]
fn apply_dry_run_shows_which_machine_type_would_be_taken_and_launches_nothing() {
    let Some(w) = world(two_types()) else { return };
    let job = w.job_with("sh train.sh", "");
    let out = w
        .command()
        .args(["apply", "--dry-run", "-f", job.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first type has no capacity: the second, where it has some, is what a launch
    // would take now.
    assert!(
        text.contains("would start on lambda: offer gpu_1x_a10 ") && text.contains("us-east-1"),
        "{text}"
    );
    assert!(
        w.server.instances().is_empty(),
        "a dry run launches nothing"
    );
    assert_eq!(w.server.launches_received(), 0);
}

/// Lambda's boot timeouts scaled 1:60 on the 8-GPU side (30 s for its 30 minutes), and
/// the 1-GPU side shorter still, so the two tests below tell them apart.
const SCALED_BOOT: &str = "1x=5,8x=30";

#[test]
fn a_1_gpu_machine_that_never_boots_is_terminated_at_its_shorter_timeout() {
    let mut one = instance_type("gpu_1x_a10", "A10 (24 GB PCIe)", 1, 75, &["us-east-1"]);
    // Billed from the launch, never `active`.
    one.boot = Some(Duration::from_secs(3600));
    let Some(w) = world(vec![one]) else { return };
    let job = w.a.manifest(
        "gpu.yaml",
        &format!(
            r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: gpu}}
spec:
  source: {{workdir: .}}
  run: echo never
  placement:
    - {{provider: lambda, instance_types: [gpu_1x_a10], ssh_user: {user}}}
"#,
            user = w.sshd.user()
        ),
    );
    let mut controller = w.spawn_controller_with(&[("ASIMOV_LAMBDA_BOOT_TIMEOUT", SCALED_BOOT)]);
    w.apply(&job);
    w.until("the hung instance terminated", 60, || {
        w.server
            .instances()
            .first()
            .is_some_and(|i| i.billing_stopped.is_some())
    });
    let first = w.server.instances()[0].clone();
    let billed = first
        .billing_stopped
        .unwrap()
        .duration_since(first.billing_started)
        .unwrap();
    // Its own 5 s, not the 8-GPU types' 30 s (nor the 30 minutes of before). Counted
    // from the intent, in whole seconds, which comes before the paced launch: a little
    // less of it is billed.
    assert!(billed >= Duration::from_secs(3), "{billed:?}");
    assert!(billed < Duration::from_secs(30), "{billed:?}");
    let described = w.a.ok(&["describe", "run", "gpu-0"]);
    assert!(described.contains("boot-timeout"), "{described}");
    // Not failed: it tries again (no capacity and no boot are retried by default).
    assert_ne!(w.a.run_phase("gpu-0").as_deref(), Some("Failed"));
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn with_no_type_listing_capacity_the_run_waits_and_takes_the_first_type_once_it_has_some() {
    let mut types = two_types();
    types[1].regions.clear();
    let Some(w) = world(types) else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with("sh train.sh", ""));
    let looks = || {
        w.server
            .requests()
            .iter()
            .filter(|r| r.endpoint == Api::InstanceTypes)
            .count()
    };
    // Every type looked at twice over: it loops back, it does not fail.
    w.until("two tries through every type", 60, || looks() >= 2);
    let runs = w.a.runs_json();
    let run = &runs["items"][0];
    assert_eq!(run["phase"], "Pending", "{run}");
    let reason = run["reason"].as_str().unwrap_or("");
    assert!(reason.contains("no capacity on lambda"), "{reason}");
    let described = w.a.ok(&["describe", "run", "gpu-0"]);
    for why in ["gpu_1x_gh200 (none listed)", "gpu_1x_a10 (none listed)"] {
        assert!(described.contains(why), "describe says why: {described}");
    }
    assert!(w.server.instances().is_empty());
    assert_eq!(
        w.server.launches_received(),
        0,
        "nothing listed, nothing launched"
    );
    // Capacity comes back for the first type (and the second, which must not be taken).
    w.server.set_types(|t| {
        t[0].regions = vec!["us-west-1".into()];
        t[1].regions = vec!["us-east-1".into()];
    });
    w.until("the run to succeed", 90, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(
        recs[0].instance_type, "gpu_1x_gh200",
        "the first type first"
    );
    assert_eq!(recs[0].region, "us-west-1");
    w.until("the instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn a_launch_that_lands_after_its_client_timed_out_is_adopted_not_launched_twice() {
    // The server finishes the launch its client hung up on (as a real API does), held
    // 6 s, 4 s after the client's 2 s timeout; the listing lag (20 s here) covers that,
    // so asimov sees the late instance under its name and adopts it.
    let slow = support::faults::Faults::new(
        11,
        support::faults::Rates {
            slow: 1.0,
            slow_for: Duration::from_secs(6),
            creates_only: true,
            ..Default::default()
        },
    );
    let Some(w) = world_with(two_types(), |c| c.faults = Some(slow)) else {
        return;
    };
    let mut controller = w.spawn_controller_with(&[
        ("ASIMOV_HTTP_TIMEOUT", "2"),
        ("ASIMOV_LAMBDA_LISTING_LAG_SECS", "20"),
    ]);
    w.apply(&w.job_with("sh train.sh; sleep 0.5", ""));
    w.until("the run to succeed", 120, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    w.until("the instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "adopted, not launched twice: {recs:?}");
    assert_eq!(w.server.launches_received(), 1);
    assert_eq!(w.attempt(), 1);
    kill9(&mut controller);
}

#[test]
fn a_launch_answered_by_a_5xx_page_is_sent_again_once_the_overridden_listing_lag_is_over() {
    let Some(w) = world(two_types()) else { return };
    // A proxy's 502: the instance may or may not exist, so asimov waits until the
    // listing would show it (5 s by `ASIMOV_LAMBDA_LISTING_LAG_SECS`, not 120), then
    // launches again under the same name.
    w.server.inject(Some(Api::Launch), Fault::Html(502), 1);
    let mut controller = w.spawn_controller_with(&[("ASIMOV_LAMBDA_LISTING_LAG_SECS", "5")]);
    let start = Instant::now();
    w.apply(&w.job_with("sh train.sh", ""));
    w.until("the run to succeed", 100, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(5),
        "launched again before the listing lag was over: {took:?}"
    );
    assert_eq!(w.server.launches_received(), 2);
    assert_eq!(w.server.instances().len(), 1);
    assert_eq!(w.attempt(), 1, "the same attempt, the same name");
    w.until("the instance terminated", 60, || {
        w.server.billing().is_empty()
    });
    kill9(&mut controller);
}
