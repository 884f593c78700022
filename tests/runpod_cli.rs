//! Jobs placed on RunPod, through the real binary, against the local RunPod test server
//! whose pods' direct TCP SSH endpoint is a real sshd: a job asking for `RTX 4090` runs
//! to completion on an `NVIDIA GeForce RTX 4090` pod (the first GPU it names has none),
//! reached by the direct endpoint once ports appear, and the pod is deleted; a 429 storm
//! loses nothing; a controller killed by SIGKILL while its create is at the server
//! adopts the pod on restart; a pod deleted behind asimov's back, or EXITED without
//! warning, is retried (the EXITED one deleted); an orphan is deleted.

#[path = "support/runpod_server.rs"]
mod runpod_server;
mod support;

use runpod_server::{Config, Endpoint as Api, Fault, RunpodServer, SshTarget, gpu};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};
use support::cli::{Asimov, Cloud, kill9};
use support::sshd::Sshd;

/// The client's gap (seconds) until the server's quota headers say otherwise.
const GAP: f64 = 0.02;
/// The client's listing lag (seconds): longer than any the server is given below.
const LISTING_LAG: u64 = 10;

struct World {
    server: RunpodServer,
    sshd: Sshd,
    a: Asimov,
}

fn world() -> Option<World> {
    let sshd = Sshd::start_or_skip()?;
    let c = Config {
        ssh: Some(SshTarget {
            host: sshd.host().to_string(),
            port: sshd.port(),
            authorized_keys: sshd.dir().join("authorized_keys"),
        }),
        // 6000 a minute: a 10 ms gap, which the client learns from the headers.
        per_minute: 6000,
        ..Config::default()
    };
    let server = RunpodServer::start(
        c,
        vec![
            gpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, 0),
            gpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 20),
            gpu("NVIDIA GeForce RTX 3090", "RTX 3090", 24, 0.43, 20),
        ],
    );
    let a = Asimov::new();
    a.set_secret("RUNPOD_API_KEY", runpod_server::API_KEY);
    Some(World { server, sshd, a })
}

impl Cloud for World {
    fn asimov(&self) -> &Asimov {
        &self.a
    }

    fn command(&self) -> Command {
        let mut cmd = self.a.command();
        cmd.env("ASIMOV_RUNPOD_API_URL", self.server.url())
            .env("ASIMOV_RUNPOD_PACING", GAP.to_string())
            // RunPod's 300 s would make a lost create answer wait five minutes; the
            // server's own listing lags at most a few seconds.
            .env("ASIMOV_RUNPOD_LISTING_LAG_SECS", LISTING_LAG.to_string())
            .env_remove("RUNPOD_API_KEY");
        cmd
    }

    fn state(&self) -> String {
        format!(
            "{}\n{:#?}\n{}",
            self.a.ok(&["get", "runs", "-o", "wide"]),
            self.server.pods(),
            self.a.controller_logs(20)
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
  resources: {{gpu: {{name: [H100, RTX 4090], count: 1}}, disk_gb: 20}}
  placement:
    - {{provider: runpod, ssh_user: {user}}}
{extra}"#,
                user = self.sshd.user()
            ),
        )
    }
}

#[test]
fn a_job_on_runpod_runs_to_completion_over_the_direct_ssh_endpoint_and_its_pod_is_deleted() {
    let Some(w) = world() else { return };
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
    assert_eq!(run["provider"], "runpod");
    assert_eq!(run["exit_code"], 0);
    assert_eq!(run["progress"]["done"], 3);
    let pods = w.server.pods();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].gpu_id, "NVIDIA GeForce RTX 4090", "H100 had none");
    assert_eq!(pods[0].cloud, "SECURE");
    assert_eq!(run["instance_id"], pods[0].id);
    assert!(pods[0].name.starts_with("asimov."), "{}", pods[0].name);
    assert!(
        pods[0].env["PUBLIC_KEY"]
            .as_str()
            .is_some_and(|k| k.starts_with("ssh-ed25519 ")),
        "{:?}",
        pods[0].env
    );
    let log = w.a.ok(&["logs", "gpu-0"]);
    assert!(log.contains("training"), "the job ran over ssh: {log}");
    assert!(w.sshd.logins() > 0);
    w.until("the pod deleted", 60, || w.server.live().is_empty());
    assert!(w.server.pods()[0].billing_stopped.is_some());
    // Only one create: the H100 the catalog shows without stock was not tried.
    let creates = w
        .server
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Api::Create)
        .count();
    assert_eq!(creates, 1);
    assert_eq!(w.server.rate_limited(), 0, "the client kept to the quota");
}

#[test]
fn a_429_and_5xx_storm_loses_nothing() {
    let Some(w) = world() else { return };
    for (api, fault, times) in [
        (Some(Api::Create), Fault::TooManyRequests, 3),
        (Some(Api::Catalog), Fault::Html(502), 2),
        (Some(Api::List), Fault::TooManyRequests, 3),
        (Some(Api::List), Fault::Html(504), 2),
        (Some(Api::Delete), Fault::Html(503), 2),
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
    w.until("the pod deleted", 60, || w.server.live().is_empty());
    assert_eq!(w.server.pods().len(), 1, "{:?}", w.server.pods());
}

#[test]
fn a_controller_killed_while_its_create_is_at_the_server_adopts_the_pod_on_restart() {
    let Some(w) = world() else { return };
    w.server.inject(
        Some(Api::Create),
        Fault::HoldAnswer(Duration::from_secs(30)),
        1,
    );
    let job = w.job_with("sh train.sh; sleep 0.5", "");
    let mut controller = w.spawn_controller();
    w.apply(&job);
    w.until("a create at the server", 30, || {
        w.server.creates_received() > 0
    });
    std::thread::sleep(Duration::from_millis(100));
    unsafe { libc::kill(controller.id() as i32, libc::SIGKILL) };
    assert_eq!(controller.wait().unwrap().signal(), Some(9));
    assert_eq!(w.server.pods().len(), 1);

    let mut again = w.spawn_controller();
    w.until("the run to succeed", 90, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    let pods = w.server.pods();
    assert_eq!(pods.len(), 1, "adopted, not created twice: {pods:?}");
    assert_eq!(w.attempt(), 1);
    w.until("the pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut again);
}

#[test]
fn a_pod_deleted_behind_asimovs_back_is_noticed_and_the_run_retried() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with(
        "sleep 600",
        "  retry: {on: [preemption, error], max_restarts: 2}\n",
    ));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    let first = w.server.live()[0].id.clone();
    w.server.delete_behind_back(&first);
    w.until("a second attempt on a new pod", 60, || {
        w.attempt() == 2 && w.server.live().iter().any(|p| p.id != first)
    });
    assert_eq!(w.server.pods().len(), 2);
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

#[test]
fn an_exited_pod_counts_as_lost_is_deleted_and_the_run_retried() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with(
        "sleep 600",
        "  retry: {on: [preemption, error], max_restarts: 2}\n",
    ));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    let first = w.server.live()[0].id.clone();
    w.server.exit_pod(&first);
    // EXITED keeps its disk and machine: asimov deletes it, then tries again.
    w.until("the exited pod deleted and a second attempt", 60, || {
        w.attempt() == 2
            && w.server
                .pods()
                .iter()
                .any(|p| p.id == first && p.billing_stopped.is_some())
    });
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

#[test]
fn a_pod_with_our_tag_that_no_run_owns_is_deleted_and_others_are_left() {
    let Some(w) = world() else { return };
    std::fs::create_dir_all(w.a.home()).unwrap();
    std::fs::write(w.a.home().join("controller-id"), "podctl01").unwrap();
    let orphan = w
        .server
        .plant("NVIDIA GeForce RTX 3090", "asimov.podctl01.ghost-0.1");
    let foreign = w
        .server
        .plant("NVIDIA GeForce RTX 3090", "asimov.otherctl.theirs-0.1");
    let untagged = w.server.plant("NVIDIA GeForce RTX 3090", "my notebook");
    let mut controller = w.spawn_controller();
    w.until("the orphan deleted", 60, || {
        w.server.live().iter().all(|p| p.id != orphan)
    });
    std::thread::sleep(Duration::from_secs(2));
    let live: Vec<String> = w.server.live().into_iter().map(|p| p.id).collect();
    assert_eq!(live, vec![foreign, untagged]);
    kill9(&mut controller);
}

#[test]
fn a_new_pod_missing_from_the_listing_for_a_while_is_not_created_twice() {
    let Some(w) = world() else { return };
    w.server.configure(|c| c.list_lag = Duration::from_secs(4));
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
    let pods = w.server.pods();
    assert_eq!(
        pods.len(),
        1,
        "one pod, found by id while unlisted: {pods:?}"
    );
    assert_eq!(w.attempt(), 1);
    w.until("the pod deleted", 60, || w.server.live().is_empty());
}

#[test]
fn a_pod_deleted_while_provisioning_is_retried_not_polled_forever() {
    let Some(w) = world() else { return };
    w.server.configure(|c| {
        c.starting_after = Duration::from_secs(3);
        c.running_after = Duration::from_secs(4);
        c.ports_after = Duration::from_secs(4);
    });
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with(
        "sh train.sh",
        "  retry: {on: [preemption, error], max_restarts: 2}\n",
    ));
    w.until("a pod provisioning", 30, || !w.server.live().is_empty());
    let first = w.server.live()[0].id.clone();
    w.server.delete_behind_back(&first);
    w.until("the run to succeed on a second pod", 90, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    assert_eq!(w.attempt(), 2);
    assert_eq!(w.server.pods().len(), 2);
    w.until("every pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

#[test]
fn a_run_that_ends_while_the_controller_is_down_has_its_pod_deleted_once_it_is_back() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with("sleep 3; sh train.sh", ""));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    kill9(&mut controller);
    // The job ends meanwhile; these pods have no key of their own (the server exports
    // none), so they cannot end themselves: the controller is the backstop, and ends
    // the pod in its first pass once back.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        w.server.live().len(),
        1,
        "still billing while nobody watches"
    );
    let back = Instant::now();
    let mut again = w.spawn_controller();
    w.until("the pod deleted", 30, || w.server.live().is_empty());
    assert_eq!(w.a.run_phase("gpu-0").as_deref(), Some("Succeeded"));
    eprintln!(
        "pod deleted {:?} after the controller came back",
        back.elapsed()
    );
    kill9(&mut again);
}

#[test]
fn offers_lists_runpod_gpu_types_as_users_name_them() {
    let Some(w) = world() else { return };
    let out = w
        .command()
        .args([
            "offers",
            "--provider",
            "runpod",
            "--gpu",
            "RTX_4090",
            "--count",
            "2",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{doc}");
    assert_eq!(items[0]["id"], "NVIDIA GeForce RTX 4090");
    assert_eq!(items[0]["provider"], "runpod");
    assert_eq!(items[0]["count"], 2);
    assert_eq!(
        items[0]["price_per_hour"], 1.38,
        "secure price for two GPUs"
    );
    let out = w
        .command()
        .args(["offers", "--provider", "runpod", "-o", "json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "NVIDIA GeForce RTX 3090",
            "NVIDIA GeForce RTX 4090",
            "NVIDIA H100 80GB HBM3"
        ],
        "cheapest first"
    );
    assert!(w.server.pods().is_empty(), "offers rents nothing");
}

#[test]
fn with_the_controller_dead_the_pod_deletes_itself_with_its_own_key() {
    let Some(w) = world() else { return };
    let env_dir = w.sshd.dir().join("pods");
    w.server
        .configure(|c| c.pod_env_dir = Some(env_dir.clone()));
    let env_file = format!("{}/{{id}}/rp_environment", env_dir.display());
    let mut controller = w.spawn_controller_with(&[
        ("ASIMOV_RUNPOD_SELF_END_GRACE", "1"),
        ("ASIMOV_RUNPOD_POD_ENV_FILE", &env_file),
    ]);
    w.apply(&w.job_with("sleep 4; echo done", ""));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    kill9(&mut controller);
    let id = w.server.live()[0].id.clone();
    let agent_dirs = w.sshd.home().join(".asimov-agent");
    let hook_logs = || {
        std::fs::read_dir(&agent_dirs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| std::fs::read_to_string(d.path().join("on_end.log")).unwrap_or_default())
            .collect::<String>()
    };
    let deleted_itself = || {
        w.server.requests().iter().any(|r| {
            r.endpoint == Api::Delete
                && r.status == 204
                && r.key == format!("pod:{id}")
                && r.path.ends_with(&id)
        })
    };
    let start = Instant::now();
    while !deleted_itself() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the pod did not delete itself; its hook said: {}\n{:#?}",
            hook_logs(),
            w.server.requests().iter().rev().take(5).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(w.server.live().is_empty());
    assert!(
        !w.server
            .requests()
            .iter()
            .any(|r| r.endpoint == Api::Delete && r.key == "account"),
        "deleted by the controller, not by the pod"
    );
    let root = std::fs::read_dir(w.sshd.home().join(".asimov-agent"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join(".runpod_auth"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let hook_log = || std::fs::read_to_string(root.join("on_end.log")).unwrap_or_default();
    w.until("the hook to say it ended the pod", 30, || {
        hook_log().contains("ended (204)")
    });
    assert!(!hook_log().contains(&runpod_server::pod_key(&id)));
    // Back, the controller finds the run over and nothing left.
    let mut again = w.spawn_controller();
    w.until("the run recorded as ended", 60, || {
        matches!(
            w.a.run_phase("gpu-0").as_deref(),
            Some("Succeeded" | "Failed")
        )
    });
    kill9(&mut again);
}

#[test]
fn a_pod_that_never_boots_is_deleted_by_the_boot_timeout() {
    let Some(w) = world() else { return };
    // Stuck in STARTING (an image that never comes up), billing from the create.
    w.server.configure(|c| {
        c.running_after = Duration::from_secs(24 * 3600);
        c.ports_after = Duration::from_secs(24 * 3600);
    });
    let mut controller = w.spawn_controller_with(&[("ASIMOV_RUNPOD_BOOT_TIMEOUT", "5")]);
    w.apply(&w.job_with(
        "echo never",
        "  retry: {on: [preemption], max_restarts: 0}\n",
    ));
    w.until("a pod created", 30, || !w.server.pods().is_empty());
    let first = w.server.pods()[0].clone();
    w.until("the stuck pod deleted", 60, || {
        w.server
            .pods()
            .iter()
            .any(|p| p.id == first.id && p.deleted)
    });
    let pod = w
        .server
        .pods()
        .into_iter()
        .find(|p| p.id == first.id)
        .unwrap();
    let billed = pod
        .billing_stopped
        .unwrap()
        .duration_since(pod.billing_started)
        .unwrap();
    assert!(
        billed >= Duration::from_secs(4) && billed < Duration::from_secs(45),
        "billed {billed:?}: deleted at the boot timeout, counted from the create"
    );
    assert_eq!(pod.status, "TERMINATED");
    let described = w.a.ok(&["describe", "run", "gpu-0"]);
    assert!(described.contains("boot"), "{described}");
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

#[test]
fn a_delete_that_answered_success_but_did_nothing_is_sent_again_until_the_pod_is_gone() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with("sleep 600", ""));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    w.server.inject(Some(Api::Delete), Fault::EmptySuccess, 1);
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("the pod deleted", 90, || w.server.live().is_empty());
    let deletes = w
        .server
        .requests()
        .iter()
        .filter(|r| r.endpoint == Api::Delete && r.status == 204)
        .count();
    assert!(deletes >= 2, "the first 204 did nothing; {deletes} deletes");
    kill9(&mut controller);
}

#[test]
fn a_container_in_a_restart_loop_counts_as_lost_is_deleted_and_the_run_retried() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job_with(
        "sleep 600",
        "  retry: {on: [preemption, error], max_restarts: 2}\n",
    ));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    let first = w.server.live()[0].id.clone();
    w.server.restart_loop(&first);
    w.until("the looping pod deleted and a second attempt", 90, || {
        w.attempt() == 2 && w.server.pods().iter().any(|p| p.id == first && p.deleted)
    });
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

#[test]
fn apply_dry_run_shows_which_gpu_type_would_be_taken_and_creates_nothing() {
    let Some(w) = world() else { return };
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
    // H100 first, but none in stock: the RTX 4090 is what a create would take.
    assert!(
        text.contains("would start on runpod: offer NVIDIA GeForce RTX 4090"),
        "{text}"
    );
    assert!(w.server.pods().is_empty(), "a dry run creates nothing");
    assert_eq!(w.server.creates_received(), 0);
}

#[test]
fn a_controller_restarted_while_its_new_pod_is_still_unlisted_finds_it_by_id() {
    let Some(w) = world() else { return };
    // The pod is missing from `GET /pods` for 60 s (found by `GET /pods/{id}` only).
    w.server.configure(|c| c.list_lag = Duration::from_secs(60));
    let lag = [("ASIMOV_RUNPOD_LISTING_LAG_SECS", "120")];
    let job = w.job_with(
        "sh train.sh",
        "  retry: {on: [preemption, error], max_restarts: 2}\n",
    );
    let mut controller = w.spawn_controller_with(&lag);
    w.apply(&job);
    // Killed once the create answered and the attempt holds the pod's id.
    w.until("the pod's id recorded", 30, || {
        w.a.runs_json()["items"][0]["instance_id"].is_string()
    });
    kill9(&mut controller);
    assert_eq!(w.server.pods().len(), 1);
    let created = w.server.pods()[0].clone();
    let mut again = w.spawn_controller_with(&lag);
    w.until("the run to succeed", 90, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    assert!(
        created.billing_started.elapsed().unwrap() < Duration::from_secs(60),
        "the run must succeed while its pod is unlisted, or the test proves nothing"
    );
    let pods = w.server.pods();
    assert_eq!(
        pods.len(),
        1,
        "the unlisted pod was not taken for gone: {pods:?}"
    );
    assert_eq!(w.attempt(), 1);
    w.until("the pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut again);
}

/// The job of `world`, on `placement` (a placement entry's fields), asking for `gpus`.
fn placed_job(w: &World, gpus: &str, placement: &str) -> std::path::PathBuf {
    w.a.manifest(
        "dc.yaml",
        &format!(
            r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: dc}}
spec:
  source: {{workdir: .}}
  run: sh train.sh
  resources: {{gpu: {{name: [{gpus}], count: 1}}, disk_gb: 20}}
  placement:
    - {{provider: runpod, ssh_user: {user}, {placement}}}
"#,
            user = w.sshd.user()
        ),
    )
}

#[test]
fn community_cloud_and_data_centers_reach_the_create_body_and_place_the_pod() {
    let Some(w) = world() else { return };
    // The 4090 is in EU-RO-1 only; the 3090 in US-TX-3 only.
    w.server.configure_gpus(|gs| {
        for g in gs {
            g.data_centers = match g.id.as_str() {
                "NVIDIA GeForce RTX 4090" => vec!["EU-RO-1".into()],
                _ => vec!["US-TX-3".into()],
            };
        }
    });
    let job = placed_job(
        &w,
        "RTX 4090",
        "regions: [us-ks-2, eu-ro-1], filters: {cloud: community}",
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
        w.a.ok(&["describe", "run", "dc-0"])
    );
    let pods = w.server.pods();
    assert_eq!(pods.len(), 1, "{pods:?}");
    let body = &pods[0].body;
    assert_eq!(body["cloud"], "COMMUNITY", "{body}");
    // RunPod's ids are upper case; the preference order is the job's.
    assert_eq!(
        body["dataCenterIds"],
        serde_json::json!(["US-KS-2", "EU-RO-1"]),
        "{body}"
    );
    assert_eq!(pods[0].data_center.as_deref(), Some("EU-RO-1"));
    // Priced as community cloud (0.69 secure, 0.41 community).
    let run = &w.a.runs_json()["items"][0];
    let price = run["price_per_hour"].as_f64().unwrap_or(0.0);
    assert!((price - 0.41).abs() < 1e-6, "{run}");
    // The catalog asked was the community cloud's.
    assert!(
        w.server
            .requests()
            .iter()
            .any(|r| r.endpoint == Api::Catalog && r.query.contains("cloud=COMMUNITY")),
        "{:?}",
        w.server.requests()
    );
    w.until("the pod deleted", 60, || w.server.live().is_empty());
}

#[test]
fn on_secure_cloud_a_data_center_without_the_gpu_is_no_capacity_until_one_has_it() {
    let Some(w) = world() else { return };
    w.server.configure_gpus(|gs| {
        for g in gs {
            g.data_centers = vec!["US-TX-3".into()];
            // The 3090 rents on community cloud only.
            g.secure = g.id != "NVIDIA GeForce RTX 3090";
        }
    });
    // No 4090 in EU-RO-1; a 3090 there neither, nor on secure cloud anywhere: RunPod
    // refuses each with its "no longer any instances" 400, and the run waits, no pod.
    let job = placed_job(
        &w,
        "RTX 4090, RTX 3090",
        "regions: [EU-RO-1], filters: {cloud: secure}",
    );
    let mut controller = w.spawn_controller();
    w.apply(&job);
    w.until("a create refused for capacity", 60, || {
        w.server
            .requests()
            .iter()
            .filter(|r| r.endpoint == Api::Create && r.status == 400)
            .count()
            >= 1
    });
    let creates: Vec<_> = w
        .server
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Api::Create)
        .collect();
    assert!(w.server.pods().is_empty(), "{:?}", w.server.pods());
    assert!(creates.iter().all(|r| r.status == 400), "{creates:?}");
    let run = w.a.ok(&["describe", "run", "dc-0"]);
    assert!(run.contains("no capacity"), "{run}");
    // Secure: the 3090, which secure cloud does not rent, was not even tried.
    let bodies = w.server.create_bodies();
    assert!(!bodies.is_empty());
    for b in &bodies {
        assert_eq!(b["cloud"], "SECURE", "{b}");
        assert_eq!(b["gpu"]["id"], "NVIDIA GeForce RTX 4090", "{b}");
        assert_eq!(b["dataCenterIds"], serde_json::json!(["EU-RO-1"]), "{b}");
    }

    // The same job in US-TX-3 gets its 4090 there.
    w.a.manifest(
        "dc.yaml",
        &std::fs::read_to_string(&job)
            .unwrap()
            .replace("regions: [EU-RO-1]", "regions: [US-TX-3]"),
    );
    w.apply(&job);
    w.until("the run to succeed in US-TX-3", 90, || {
        w.a.run_phase("dc-0").as_deref() == Some("Succeeded")
    });
    let pods = w.server.pods();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0].data_center.as_deref(), Some("US-TX-3"));
    assert_eq!(pods[0].cloud, "SECURE");
    w.until("the pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

#[test]
fn the_test_server_refuses_a_data_center_id_runpod_does_not_know() {
    let Some(w) = world() else { return };
    let addr = w
        .server
        .url()
        .trim_start_matches("http://")
        .trim_end_matches("/v2")
        .to_string();
    // One HTTP/1.1 create; its status and body.
    let create = |dcs: serde_json::Value| -> (u16, serde_json::Value) {
        let body = serde_json::json!({
            "name": "x", "image": "ubuntu:22.04",
            "gpu": {"id": "NVIDIA GeForce RTX 3090"}, "dataCenterIds": dcs,
        })
        .to_string();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "POST /v2/pods HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            runpod_server::API_KEY,
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let json = answer
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(serde_json::Value::Null);
        (status, json)
    };
    // Lower case and unknown ids are schema violations (422 with errors[]).
    let (status, v) = create(serde_json::json!(["us-tx-3", "MARS-1"]));
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(w.server.pods().is_empty());
    let (status, v) = create(serde_json::json!(["US-TX-3"]));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"], "PROVISIONING", "{v}");
}

#[test]
fn a_create_whose_answer_timed_out_is_adopted_within_the_listing_lag_not_sent_twice() {
    let Some(w) = world() else { return };
    // The pod is made, its answer held past the client's 2 s timeout: the client cannot
    // know, waits the listing lag (10 s here, RunPod's 300 s otherwise), then adopts.
    w.server.inject(
        Some(Api::Create),
        Fault::HoldAnswer(Duration::from_secs(30)),
        1,
    );
    let mut controller = w.spawn_controller_with(&[("ASIMOV_HTTP_TIMEOUT", "2")]);
    let start = Instant::now();
    w.apply(&w.job_with("sh train.sh", ""));
    w.until("the run to succeed", 120, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    eprintln!("succeeded {:?} after apply", start.elapsed());
    let pods = w.server.pods();
    assert_eq!(pods.len(), 1, "adopted, not created twice: {pods:?}");
    assert_eq!(w.attempt(), 1);
    assert_eq!(w.server.creates_received(), 1);
    w.until("the pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

#[test]
fn a_create_answered_by_a_5xx_page_is_sent_again_once_the_listing_lag_is_over() {
    let Some(w) = world() else { return };
    // A proxy's 502: the pod may or may not exist, so asimov waits until the listing
    // would show it (10 s here: `ASIMOV_RUNPOD_LISTING_LAG_SECS`), then creates again
    // under the same tag.
    w.server.inject(Some(Api::Create), Fault::Html(502), 1);
    let mut controller = w.spawn_controller();
    let start = Instant::now();
    w.apply(&w.job_with("sh train.sh", ""));
    w.until("the run to succeed", 120, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(LISTING_LAG),
        "created again before the listing lag was over: {took:?}"
    );
    assert_eq!(w.server.creates_received(), 2);
    assert_eq!(w.server.pods().len(), 1);
    assert_eq!(w.attempt(), 1, "the same attempt, the same tag");
    w.until("the pod deleted", 60, || w.server.live().is_empty());
    kill9(&mut controller);
}

/// A RunPod placement asking for a cloud that does not exist, for interruptible pods
/// (which asimov does not rent on RunPod) or with a filter RunPod has not: `apply` (and
/// `apply --dry-run`) refuses it with every problem and its file:line:column at once,
/// and changes nothing (no manifest stored, no controller started).
#[test]
fn apply_refuses_a_runpod_cloud_typo_and_spot_with_positions_and_changes_nothing() {
    let a = Asimov::new();
    let job = a.manifest(
        "pods.yaml",
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: pods}\nspec:\n  run: python train.py\n  placement:\n    - {provider: runpod, filters: {cloud: typo}}\n    - {provider: runpod, spot: true}\n    - {provider: runpod, filters: {cloud: Community}}\n",
    );
    let job = job.to_str().expect("utf-8 path");
    for args in [
        vec!["apply", "--dry-run", "-f", job],
        vec!["apply", "-f", job],
    ] {
        let out = a.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr,
            format!(
                "{job}:7:43: expected `secure` or `community` (RunPod's Secure or Community Cloud), found \"typo\"\n\
                 {job}:8:32: `spot: true` is not supported with provider runpod: asimov rents on-demand pods through RunPod's REST API, which has no interruptible pods (only its GraphQL and deprecated v1 APIs do); remove it, or bid on vast\n\
                 error: 2 problem(s) in the manifests; nothing was changed\n"
            )
        );
        let stored = std::fs::read_dir(a.home().join("manifests"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(stored, 0, "manifests were stored");
        assert!(!a.controller_running(), "a controller was started");
    }
}
