//! A job placed on Vast, through the real binary, against the local Vast test server
//! whose instances' SSH lands on a real sshd: it runs to completion and its instance is
//! destroyed; a controller killed by SIGKILL while its create request is at the server
//! adopts that instance on restart instead of buying a second.

mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};
use support::cli::{Asimov, Cloud, kill9};
use support::sshd::Sshd;
use vast_server::{Config, Endpoint as Api, Fault, SshTarget, VastServer, offer};

struct World {
    server: VastServer,
    sshd: Sshd,
    a: Asimov,
}

fn world() -> Option<World> {
    world_with(
        vec![
            offer(301, "RTX 4090", 1, 24.0, 0.41),
            offer(302, "RTX 4090", 1, 24.0, 0.35),
            offer(303, "RTX 3090", 1, 24.0, 0.19),
        ],
        |_| {},
    )
}

fn world_with(offers: Vec<serde_json::Value>, config: impl FnOnce(&mut Config)) -> Option<World> {
    let sshd = Sshd::start_or_skip()?;
    let mut c = Config {
        ssh: Some(SshTarget {
            host: sshd.host().to_string(),
            port: sshd.port(),
            authorized_keys: sshd.dir().join("authorized_keys"),
        }),
        loading_after: Duration::from_millis(300),
        running_after: Duration::from_millis(1000),
        ..Config::default()
    };
    config(&mut c);
    let server = VastServer::start(c, offers);
    let a = Asimov::new();
    a.set_secret("VAST_API_KEY", vast_server::API_KEY);
    Some(World { server, sshd, a })
}

impl Cloud for World {
    fn asimov(&self) -> &Asimov {
        &self.a
    }

    /// The binary pointed at the test server, unpaced (the server sets no gaps here).
    fn command(&self) -> Command {
        let mut cmd = self.a.command();
        cmd.env("ASIMOV_VAST_API_URL", self.server.url())
            .env("ASIMOV_VAST_PACING", "0")
            .env_remove("VAST_API_KEY");
        cmd
    }

    fn state(&self) -> String {
        format!(
            "{}\n{:#?}",
            self.a.ok(&["describe", "run", "gpu-0"]),
            self.server.instances()
        )
    }
}

impl World {
    fn job(&self, run: &str) -> std::path::PathBuf {
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
  resources: {{gpu: {{name: RTX_4090, count: 1}}, disk_gb: 20}}
  image: pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime
  placement:
    - {{provider: vast, ssh_user: {user}}}
"#,
                user = self.sshd.user()
            ),
        )
    }

    fn wait_destroyed(&self) {
        let start = Instant::now();
        while self.server.live_instances().iter().any(|i| !i.destroyed) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "instance never destroyed: {:?}\n{}",
                self.server.instances(),
                self.a.ok(&["describe", "run", "gpu-0"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_job_on_vast_runs_to_completion_over_ssh_and_its_instance_is_destroyed() {
    let Some(w) = world() else { return };
    let job =
        w.job(r#"sh train.sh; for i in 1 2 3 4; do echo "ASIMOV_PROGRESS $i/4"; sleep 0.2; done"#);
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
    assert_eq!(run["provider"], "vast");
    assert_eq!(run["exit_code"], 0);
    assert_eq!(run["progress"]["done"], 4);
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "one instance: {recs:?}");
    assert_eq!(recs[0].offer_id, 302, "the cheapest RTX 4090");
    assert_eq!(run["instance_id"], recs[0].id.to_string());
    assert!(recs[0].label.starts_with("asimov."), "{}", recs[0].label);
    let log = w.a.ok(&["logs", "gpu-0"]);
    assert!(log.contains("training"), "the job ran over ssh: {log}");
    w.wait_destroyed();
    let rec = &w.server.instances()[0];
    assert!(rec.billing_stopped.is_some());
    // asimov's key was registered with the account, once.
    assert_eq!(w.server.account_keys().len(), 1);
    let key = w.a.home().join("ssh/id_ed25519");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_controller_killed_while_its_create_is_at_the_server_adopts_it_on_restart() {
    let Some(w) = world() else { return };
    // The server makes the instance, then holds its answer: the controller dies first.
    w.server.inject(
        Some(Api::Create),
        Fault::HoldAnswer(Duration::from_secs(30)),
        1,
    );
    let job = w.job(r#"sh train.sh; sleep 0.5"#);
    let mut controller = w.spawn_controller();
    let out = w
        .command()
        .args(["apply", "-f", job.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    while w.server.creates_received() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no create reached the server"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The request reached the server; the answer has not left it.
    unsafe { libc::kill(controller.id() as i32, libc::SIGKILL) };
    let status = controller.wait().unwrap();
    assert_eq!(status.signal(), Some(9));
    assert_eq!(w.server.instances().len(), 1);
    w.server.clear_faults();

    let mut again = w.spawn_controller();
    let start = Instant::now();
    while w.a.run_phase("gpu-0").as_deref() != Some("Succeeded") {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "never succeeded: {}\n{:?}",
            w.a.ok(&["describe", "run", "gpu-0"]),
            w.server.instances()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "adopted, not bought twice: {recs:?}");
    assert_eq!(w.a.runs_json()["items"][0]["attempt"], 1);
    w.wait_destroyed();
    kill9(&mut again);
}

impl World {
    fn retrying_job(&self, run: &str) -> std::path::PathBuf {
        let path = self.job(run);
        let text = std::fs::read_to_string(&path).unwrap()
            + "  retry: {on: [preemption, error], max_restarts: 2}\n";
        std::fs::write(&path, text).unwrap();
        path
    }
}

#[test]
fn an_instance_destroyed_behind_asimovs_back_is_noticed_and_the_run_retried() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.retrying_job("sleep 600"));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    let first = w.server.live_instances()[0].id;
    w.server.destroy_behind_back(first);
    w.until("a second attempt on a new instance", 60, || {
        w.attempt() == 2 && w.server.live_instances().iter().any(|i| i.id != first)
    });
    assert_eq!(w.server.instances().len(), 2);
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every instance destroyed", 60, || {
        w.server.live_instances().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn an_outbid_instance_ends_the_attempt_as_preempted_and_is_destroyed() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.retrying_job("sleep 600"));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    let first = w.server.live_instances()[0].id;
    w.server.outbid(first);
    // Stopped still bills its disk: asimov destroys it, then tries again.
    w.until(
        "the outbid instance destroyed and a second attempt",
        60,
        || {
            w.attempt() == 2
                && w.server
                    .instances()
                    .iter()
                    .any(|i| i.id == first && i.billing_stopped.is_some())
        },
    );
    let described = w.a.ok(&["describe", "run", "gpu-0"]);
    assert!(described.contains("preempted"), "{described}");
    w.a.ok(&["delete", "job", "gpu"]);
    w.until("every instance destroyed", 60, || {
        w.server.live_instances().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn a_create_that_errors_yet_creates_is_adopted_and_not_leaked() {
    let Some(w) = world() else { return };
    w.server
        .inject(Some(Api::Create), Fault::CreateFailsYetCreates, 1);
    let mut controller = w.spawn_controller();
    w.apply(&w.retrying_job("sh train.sh"));
    w.until("the run to succeed", 90, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    w.until("every instance destroyed", 60, || {
        w.server.live_instances().is_empty()
    });
    let recs = w.server.instances();
    assert_eq!(
        recs.len(),
        2,
        "the failed one and the one that ran: {recs:?}"
    );
    assert!(recs.iter().all(|i| i.billing_stopped.is_some()));
    kill9(&mut controller);
}

#[test]
fn an_instance_with_our_tag_that_no_run_owns_is_destroyed_and_others_are_left() {
    let Some(w) = world() else { return };
    std::fs::create_dir_all(w.a.home()).unwrap();
    std::fs::write(w.a.home().join("controller-id"), "vastctl1").unwrap();
    let orphan = w.server.plant(301, "asimov.vastctl1.ghost-0.1");
    let foreign = w.server.plant(302, "asimov.otherctl.theirs-0.1");
    let untagged = w.server.plant(303, "my notebook");
    let mut controller = w.spawn_controller();
    w.until("the orphan destroyed", 60, || {
        w.server.live_instances().iter().all(|i| i.id != orphan)
    });
    std::thread::sleep(Duration::from_secs(2));
    let live: Vec<u64> = w.server.live_instances().iter().map(|i| i.id).collect();
    assert_eq!(live, vec![foreign, untagged]);
    kill9(&mut controller);
}

#[test]
fn a_429_and_5xx_storm_slows_parallel_launches_but_loses_nothing() {
    const RUNS: usize = 8;
    let offers = (0..RUNS as u64 + 2)
        .map(|i| offer(500 + i, "RTX 4090", 1, 24.0, 0.30 + i as f64 / 100.0))
        .collect();
    // Vast's gaps, scaled down 40 times; the client keeps three times those: requests
    // leave in their slots but reach the server with jitter, large when tests run in
    // parallel on a loaded machine.
    let Some(w) = world_with(offers, |c| c.gaps = Config::documented_gaps(0.025)) else {
        return;
    };
    for (api, fault, times) in [
        (Api::Create, Fault::TooManyRequests, 3),
        (Api::Search, Fault::NginxHtml(502), 2),
        (Api::List, Fault::TooManyRequests, 3),
        (Api::List, Fault::NginxHtml(504), 2),
        (Api::Destroy, Fault::NginxHtml(503), 3),
    ] {
        w.server.inject(Some(api), fault, times);
    }
    let job = w.job(r#"sh train.sh"#);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "spec:\n",
        "spec:\n  matrix: {n: [a, b, c, d, e, f, g, h]}\n",
    );
    std::fs::write(&job, text).unwrap();
    let mut controller = w.spawn_controller_with(&[("ASIMOV_VAST_PACING", "0.075")]);
    let start = Instant::now();
    w.apply(&job);
    w.until("every run to succeed", 120, || {
        let runs = w.a.runs_json();
        let items = runs["items"].as_array().cloned().unwrap_or_default();
        items.len() == RUNS && items.iter().all(|r| r["phase"] == "Succeeded")
    });
    let elapsed = start.elapsed();
    w.until("every instance destroyed", 60, || {
        w.server.live_instances().is_empty()
    });
    let recs = w.server.instances();
    assert_eq!(recs.len(), RUNS, "one instance per run: {recs:?}");
    let mut labels: Vec<&str> = recs.iter().map(|r| r.label.as_str()).collect();
    labels.sort();
    labels.dedup();
    assert_eq!(labels.len(), RUNS);
    let attempts: Vec<u64> = w.a.runs_json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, vec![1; RUNS]);
    // Parallel creates do not all race for the cheapest offer.
    let creates = w
        .server
        .requests()
        .iter()
        .filter(|r| r.endpoint == Api::Create && r.status != 429)
        .count();
    assert_eq!(creates, RUNS, "{:#?}", w.server.requests());
    // Beyond the injected ones, pacing kept the server from refusing anything.
    let injected_429 = 6;
    let requests = w.server.requests();
    let t0 = requests.first().map(|r| r.arrived);
    let summary: Vec<String> = requests
        .iter()
        .filter(|r| r.status == 429 || r.endpoint == Api::List)
        .map(|r| {
            format!(
                "{:?} {} {} +{:?}",
                r.endpoint,
                r.status,
                r.auth,
                t0.map(|t| r.arrived.duration_since(t))
            )
        })
        .collect();
    assert_eq!(w.server.rate_limited(), injected_429, "{summary:#?}");
    // One listing per pass for every run: never a call per instance.
    let shows = requests.iter().filter(|r| r.endpoint == Api::Show).count();
    assert_eq!(shows, 0, "per-instance polling");
    eprintln!(
        "{RUNS} runs through a storm: {elapsed:?}, {} requests, {} answered 429",
        w.server.requests().len(),
        w.server.rate_limited()
    );
    kill9(&mut controller);
}

/// The instance's own key, as the server records it.
fn destroyed_by_itself(w: &World, id: u64) -> bool {
    w.server.requests().iter().any(|r| {
        r.endpoint == Api::Destroy
            && r.status == 200
            && r.auth == format!("instance:{id}")
            && r.path.contains(&id.to_string())
    })
}

#[test]
fn with_the_controller_dead_the_instance_destroys_itself_when_the_job_ends_or_times_out() {
    for (run, extra) in [
        // The job ends by itself.
        ("sleep 4", ""),
        // max_duration hits.
        ("sleep 600", "  max_duration: 4s\n"),
    ] {
        let Some(w) = world() else { return };
        let job = w.job(run);
        let text = std::fs::read_to_string(&job).unwrap() + extra;
        std::fs::write(&job, text).unwrap();
        let mut controller = w.spawn_controller_with(&[("ASIMOV_VAST_SELF_DESTROY_GRACE", "1")]);
        w.apply(&job);
        w.until("the run to run", 60, || {
            w.a.run_phase("gpu-0").as_deref() == Some("Running")
        });
        kill9(&mut controller);
        let id = w.server.live_instances()[0].id;
        w.until("the instance to destroy itself", 60, || {
            destroyed_by_itself(&w, id)
        });
        let rec = &w.server.instances()[0];
        assert!(rec.destroyed && rec.billing_stopped.is_some(), "{rec:?}");
        // Its key reached the instance in a 0600 file, never a command line.
        let agent_dirs = w.sshd.home().join(".asimov-agent");
        let root = std::fs::read_dir(&agent_dirs)
            .unwrap()
            .flatten()
            .next()
            .unwrap()
            .path();
        use std::os::unix::fs::PermissionsExt;
        for secret in [".vast_auth", ".vast_wgetrc"] {
            let mode = std::fs::metadata(root.join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        assert!(!w.sshd.log().contains(&rec.instance_api_key));
    }
}

#[test]
fn a_replaced_authorized_keys_is_repaired_through_the_api_and_the_run_goes_on() {
    let Some(mut w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.job("sleep 6; sh train.sh"));
    w.until("the run to run", 60, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Running")
    });
    // Hours into the run, something rewrites authorized_keys; new logins fail.
    let keys = w.sshd.dir().join("authorized_keys");
    let ours = std::fs::read_to_string(w.a.home().join("ssh/id_ed25519.pub")).unwrap();
    let text = std::fs::read_to_string(&keys).unwrap();
    assert!(text.contains(ours.trim()));
    let others: String = text
        .lines()
        .filter(|l| l.trim() != ours.trim())
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&keys, others).unwrap();
    // The open master connection goes too (a restart of sshd kills every session).
    w.sshd.restart();
    w.until("the run to succeed", 90, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    assert_eq!(w.attempt(), 1, "the run was never lost");
    let id = w.server.instances()[0].id;
    assert!(
        w.server
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == format!("/api/v0/instances/{id}/ssh/")),
        "the key was attached again through the API"
    );
    w.until("the instance destroyed", 60, || {
        w.server.live_instances().is_empty()
    });
    kill9(&mut controller);
}

/// BENCHMARKS.md figures (run by hand: `cargo test --release --test vast_cli bench --
/// --ignored --nocapture`): what asimov adds between an instance becoming reachable and
/// the job running, and between the job's end and the instance destroyed; and N runs
/// launched at Vast's documented pacing (`ASIMOV_BENCH_RUNS`, default 50).
#[test]
#[ignore]
fn bench_vast_overheads_and_runs_within_pacing() {
    let runs: usize = std::env::var("ASIMOV_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let offers = (0..runs as u64 + 5)
        .map(|i| offer(900 + i, "RTX 4090", 1, 24.0, 0.30 + i as f64 / 1000.0))
        .collect();
    // The server enforces the documented gaps as they are; the client paces itself.
    let Some(w) = world_with(offers, |c| c.gaps = Config::documented_gaps(1.0)) else {
        return;
    };
    let names: Vec<String> = (0..runs).map(|i| format!("r{i}")).collect();
    let stamps = w.sshd.home().join("stamps");
    std::fs::create_dir_all(&stamps).unwrap();
    let run = format!(
        "date +%s.%N > {d}/start-$ASIMOV_MATRIX_N; sh train.sh; date +%s.%N > {d}/end-$ASIMOV_MATRIX_N",
        d = stamps.display()
    );
    let job = w.job(&run);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "spec:\n",
        &format!("spec:\n  matrix: {{n: [{}]}}\n", names.join(", ")),
    );
    std::fs::write(&job, text).unwrap();
    let mut controller = {
        // Vast's own gaps, unscaled.
        let mut cmd = w.command();
        cmd.env_remove("ASIMOV_VAST_PACING");
        w.a.start_controller(cmd)
    };
    let start = Instant::now();
    w.apply(&job);
    let launched = Instant::now();
    let mut all_running = None;
    w.until("every run to succeed", 3600, || {
        let recs = w.server.instances();
        if all_running.is_none()
            && recs.len() == runs
            && recs.iter().all(|r| r.running_at.is_some())
        {
            all_running = Some(launched.elapsed());
        }
        let runs_json = w.a.runs_json();
        let items = runs_json["items"].as_array().cloned().unwrap_or_default();
        items.len() == runs && items.iter().all(|r| r["phase"] == "Succeeded")
    });
    w.until("every instance destroyed", 3600, || {
        w.server.live_instances().is_empty()
    });
    let total = start.elapsed();
    let epoch = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let stamp = |name: &str| -> f64 {
        std::fs::read_to_string(stamps.join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let mut to_start = Vec::new();
    let mut to_destroy = Vec::new();
    let runs_json = w.a.runs_json();
    for rec in w.server.instances() {
        let item = runs_json["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["instance_id"].as_str() == Some(rec.id.to_string().as_str()))
            .unwrap();
        let n = item["name"].as_str().unwrap().rsplit('-').next().unwrap();
        let n = &names[n.parse::<usize>().unwrap()];
        to_start.push(stamp(&format!("start-{n}")) - epoch(rec.running_at.unwrap()));
        to_destroy.push(epoch(rec.billing_stopped.unwrap()) - stamp(&format!("end-{n}")));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (start_med, start_max) = median(&mut to_start);
    let (end_med, end_max) = median(&mut to_destroy);
    let requests = w.server.requests();
    let count = |e: Api| requests.iter().filter(|r| r.endpoint == e).count();
    eprintln!(
        "BENCH vast: {runs} runs; all running after {:.1}s, all done and destroyed after {:.1}s; \
         reachable->job running median {start_med:.2}s max {start_max:.2}s; \
         job end->destroyed median {end_med:.2}s max {end_max:.2}s; \
         requests {} (search {}, create {}, list {}, destroy {}, keys {}), 429s {}",
        all_running.unwrap_or_default().as_secs_f64(),
        total.as_secs_f64(),
        requests.len(),
        count(Api::Search),
        count(Api::Create),
        count(Api::List),
        count(Api::Destroy),
        count(Api::SshKeys),
        w.server.rate_limited(),
    );
    let limited: Vec<Api> = requests
        .iter()
        .filter(|r| r.status == 429)
        .map(|r| r.endpoint)
        .collect();
    eprintln!("BENCH vast: 429s on {limited:?}");
    kill9(&mut controller);
}

impl World {
    /// A job named `name` asking for `gpus` RTX 4090s, run as `run`.
    fn gpu_job(&self, name: &str, gpus: u32, run: &str, extra: &str) -> std::path::PathBuf {
        self.a.manifest(
            &format!("{name}.yaml"),
            &format!(
                r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: {name}}}
spec:
  source: {{workdir: .}}
  run: {run}
  resources: {{gpu: {{name: RTX_4090, count: {gpus}}}, disk_gb: 20}}
  placement:
    - {{provider: vast, ssh_user: {user}}}
{extra}"#,
                user = self.sshd.user()
            ),
        )
    }

    fn wait_phase(&self, run: &str, want: &str, secs: u64) {
        let start = Instant::now();
        while self.a.run_phase(run).as_deref() != Some(want) {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "{run} never {want}: {}\n{:#?}",
                self.a.ok(&["describe", "run", run]),
                self.server.instances()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn readiness_checks_the_gpus_nvidia_smi_shows_and_warns_without_it() {
    let offers = vec![
        // Each offer is one machine: rented once.
        offer(401, "RTX 4090", 1, 24.0, 0.35),
        offer(402, "RTX 4090", 2, 24.0, 0.70),
        offer(403, "RTX 4090", 1, 24.0, 0.36),
    ];
    let Some(w) = world_with(offers, |_| {}) else {
        return;
    };
    let mut controller = w.spawn_controller();
    // Without nvidia-smi (the test sshd has none): the job runs, with a warning.
    w.apply(&w.gpu_job("nosmi", 1, "sh train.sh", ""));
    w.wait_phase("nosmi-0", "Succeeded", 90);
    let described = w.a.ok(&["describe", "run", "nosmi-0"]);
    assert!(
        described.contains("GpusUnchecked") && described.contains("no nvidia-smi"),
        "{described}"
    );
    // An instance whose nvidia-smi lists one GPU: a one-GPU job runs there unwarned...
    w.sshd.install_command(
        "nvidia-smi",
        r#"[ "$1" = -L ] && echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-5e1f)""#,
    );
    w.apply(&w.gpu_job("one", 1, "sh train.sh", ""));
    w.wait_phase("one-0", "Succeeded", 90);
    let described = w.a.ok(&["describe", "run", "one-0"]);
    assert!(!described.contains("GpusUnchecked"), "{described}");
    // ...and a two-GPU job does not: it fails there with the reason, and the instance goes.
    w.apply(&w.gpu_job("two", 2, "sh train.sh", ""));
    w.wait_phase("two-0", "Failed", 90);
    let described = w.a.ok(&["describe", "run", "two-0"]);
    assert!(
        described.contains("GpuMismatch")
            && described.contains("nvidia-smi shows 1 GPU(s), the job asks for 2"),
        "{described}"
    );
    let log = w.a.ok(&["logs", "two-0"]);
    assert!(!log.contains("training"), "the job never ran: {log}");
    w.until("every instance destroyed", 60, || {
        w.server.live_instances().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn a_vast_run_syncs_its_checkpoints_home_while_it_runs() {
    let Some(w) = world() else { return };
    let mut controller = w.spawn_controller();
    let run = r#"mkdir -p ckpt; echo 7 > ckpt/step; sleep 8"#;
    w.apply(&w.gpu_job(
        "ck",
        1,
        &format!("'{run}'"),
        "  checkpoint: {path: ckpt, every: 1s}\n",
    ));
    w.until("a checkpoint synced home from the instance", 60, || {
        std::fs::read_dir(w.a.home().join("checkpoints/ck-0"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path().join("step")).is_ok_and(|s| s.trim() == "7"))
    });
    w.wait_phase("ck-0", "Succeeded", 60);
    w.until("the instance destroyed", 60, || {
        w.server.live_instances().is_empty()
    });
    kill9(&mut controller);
}

#[test]
fn an_unreachable_instance_past_max_duration_is_destroyed_by_the_controller() {
    let Some(mut w) = world() else { return };
    let mut controller = w.spawn_controller();
    w.apply(&w.gpu_job("hung", 1, "sleep 600", "  max_duration: 8s\n"));
    w.wait_phase("hung-0", "Running", 60);
    // The box hangs: its SSH goes, and with it the agent that would have ended the job
    // and destroyed the instance with its own key.
    w.sshd.stop();
    for pid in support::sshd::processes_with_env(&format!("HOME={}", w.sshd.home().display())) {
        // SAFETY: signalling a process by pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let hung = Instant::now();
    let id = w.server.live_instances()[0].id;
    w.until("the controller to destroy the instance", 150, || {
        w.server.live_instances().is_empty()
    });
    // Not before the deadline and the agent's allowance of silence.
    assert!(
        hung.elapsed() >= Duration::from_secs(50),
        "{:?}",
        hung.elapsed()
    );
    assert!(
        w.server
            .requests()
            .iter()
            .any(|r| r.endpoint == Api::Destroy
                && r.status == 200
                && r.auth == "account"
                && r.path.contains(&id.to_string())),
        "destroyed from outside, with the account's key"
    );
    w.wait_phase("hung-0", "Failed", 30);
    let described = w.a.ok(&["describe", "run", "hung-0"]);
    assert!(described.contains("timed-out"), "{described}");
    kill9(&mut controller);
}

#[test]
fn an_instance_running_without_ssh_ports_then_without_sshd_is_waited_for() {
    let Some(w) = world_with(vec![offer(311, "RTX 4090", 1, 24.0, 0.35)], |c| {
        c.ports_after = Duration::from_secs(3);
        c.sshd_after = Duration::from_secs(4);
    }) else {
        return;
    };
    let mut controller = w.spawn_controller();
    w.apply(&w.job("sh train.sh"));
    w.wait_phase("gpu-0", "Succeeded", 90);
    assert_eq!(w.attempt(), 1, "waited for, not given up on");
    assert_eq!(w.server.instances().len(), 1);
    w.wait_destroyed();
    kill9(&mut controller);
}

#[test]
fn an_offer_bought_twice_whose_instance_ends_exited_is_retried_elsewhere() {
    let Some(w) = world() else { return };
    // This buyer lost the race: its create succeeded, its instance exits before running.
    w.server
        .inject(Some(Api::Create), Fault::BoughtTwiceLost, 1);
    let mut controller = w.spawn_controller();
    w.apply(&w.retrying_job("sh train.sh"));
    w.wait_phase("gpu-0", "Succeeded", 90);
    assert_eq!(w.attempt(), 2);
    w.wait_destroyed();
    let recs = w.server.instances();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(
        recs[0].loser && recs[0].billing_stopped.is_some(),
        "{recs:?}"
    );
    let described = w.a.ok(&["describe", "run", "gpu-0"]);
    assert!(described.contains("preempted"), "{described}");
    kill9(&mut controller);
}

#[test]
fn a_destroy_answering_5xx_for_long_is_retried_until_vast_confirms_the_instance_gone() {
    let Some(w) = world() else { return };
    // Each destroy gives up after 2 s of in-place retries, so the storm below outlasts
    // several of them: the controller must come back to it pass after pass.
    let mut controller = w.spawn_controller_with(&[("ASIMOV_VAST_RETRY_SECS", "2")]);
    w.apply(&w.job("sleep 2; sh train.sh"));
    w.wait_phase("gpu-0", "Running", 60);
    let storm = Duration::from_secs(20);
    w.server
        .configure(|c| c.destroy_failing_until = Some(Instant::now() + storm));
    let start = Instant::now();
    w.wait_phase("gpu-0", "Succeeded", 60);
    // Mid-storm: the run is over, its attempt held while Vast has not confirmed.
    while start.elapsed() < storm / 2 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let described = w.a.ok(&["describe", "run", "gpu-0"]);
    assert!(described.contains("HTTP 503"), "{described}");
    assert_eq!(w.server.live_instances().len(), 1);
    let released = |w: &World| {
        w.a.ok(&["describe", "run", "gpu-0"]).lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Attempt 1's row holds two times once released: started and released.
            let times = cols
                .iter()
                .filter(|c| c.contains('T') && c.ends_with('Z'))
                .count();
            cols.first() == Some(&"1") && times >= 2
        })
    };
    assert!(!released(&w), "{described}");
    w.until("the attempt released", 90, || released(&w));
    let destroys: Vec<u16> = w
        .server
        .requests()
        .iter()
        .filter(|r| r.endpoint == Api::Destroy)
        .map(|r| r.status)
        .collect();
    // One op retries for 2 s (three or four calls): more failures mean more ops.
    let failed = destroys.iter().filter(|s| **s == 503).count();
    assert!(failed >= 6, "{destroys:?}");
    assert_eq!(destroys.last(), Some(&200), "{destroys:?}");
    assert!(w.server.instances()[0].billing_stopped.is_some());
    assert!(
        start.elapsed() >= storm,
        "released only after Vast answered"
    );
    kill9(&mut controller);
}

/// What the server billed for instance `id`: its `dph_total` over the seconds it billed.
fn billed(w: &World, id: u64) -> f64 {
    let rec = w
        .server
        .instances()
        .into_iter()
        .find(|i| i.id == id)
        .unwrap();
    let stopped = rec.billing_stopped.expect("billing stopped");
    let secs = stopped
        .duration_since(rec.billing_started)
        .unwrap()
        .as_secs_f64();
    rec.dph_total * secs / 3600.0
}

#[test]
fn each_attempts_dph_total_feeds_the_cost_ledger_and_budgets_as_vast_bills_it() {
    // 360 USD/h (0.10 USD/s, storage included; 324 of it compute): seconds show in cents.
    let offers = vec![
        offer(331, "RTX 4090", 1, 24.0, 360.0),
        offer(332, "RTX 4090", 1, 24.0, 360.0),
    ];
    let Some(w) = world_with(offers, |_| {}) else {
        return;
    };
    let mut controller = w.spawn_controller();
    w.apply(&w.gpu_job("paid", 1, "'sleep 4; sh train.sh'", ""));
    w.wait_phase("paid-0", "Succeeded", 90);
    w.wait_destroyed();
    let run = |name: &str| {
        w.a.runs_json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap()
    };
    w.until("the attempt's cost in the ledger", 30, || {
        run("paid-0")["cost_usd"].as_f64().unwrap_or(0.0) > 0.0
    });
    let r = run("paid-0");
    assert_eq!(r["price_per_hour"].as_f64(), Some(360.0), "dph_total: {r}");
    let id: u64 = r["instance_id"].as_str().unwrap().parse().unwrap();
    let vast = billed(&w, id);
    let ours = r["cost_usd"].as_f64().unwrap();
    // Never less than Vast billed (cents, and whole seconds in the store); more only by
    // the few seconds between asking and Vast answering (create, destroy).
    eprintln!("ledger {ours} USD, Vast billed {vast:.4} USD");
    assert!(
        ours >= vast - 0.11 && ours <= vast + 2.0,
        "ledger {ours} vs billed {vast}"
    );

    // A budget that stops its jobs at 1 USD: about ten seconds of this instance.
    let budget = w.a.manifest(
        "budget.yaml",
        "apiVersion: asimov/v1\nkind: Budget\nmetadata: {name: cap}\n\
         spec: {limit_usd: 1, period: 30days, selector: {team: capped}, action: stop}\n",
    );
    w.apply(&budget);
    let job = w.gpu_job("capped", 1, "sleep 600", "");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "metadata: {name: capped}",
        "metadata: {name: capped, labels: {team: capped}}",
    );
    std::fs::write(&job, text).unwrap();
    w.apply(&job);
    w.until("the budget to stop the run and its instance", 120, || {
        let live = w.server.live_instances();
        w.server.instances().len() == 2 && live.is_empty()
    });
    let r = run("capped-0");
    let id = w
        .server
        .instances()
        .iter()
        .map(|i| i.id)
        .find(|i| i.to_string() != run("paid-0")["instance_id"].as_str().unwrap())
        .unwrap();
    let vast = billed(&w, id);
    eprintln!(
        "budget of 1 USD: Vast billed {vast:.4} USD, ledger {}",
        r["cost_usd"]
    );
    assert!(vast >= 1.0 - 0.21, "stopped only once spent: billed {vast}");
    assert!(
        vast <= 1.0 + 3.0,
        "stopped near the limit: billed {vast}, {r}"
    );
    let described = w.a.ok(&["describe", "run", "capped-0"]);
    assert!(described.contains("budget"), "{described}");
    kill9(&mut controller);
}

/// Slow creates, as the fault campaign's `Slow`: each held 6 s before the server acts,
/// past the controller's 2 s client timeout.
fn slow_creates() -> std::sync::Arc<support::faults::Faults> {
    support::faults::Faults::new(
        11,
        support::faults::Rates {
            slow: 1.0,
            slow_for: Duration::from_secs(6),
            creates_only: true,
            ..Default::default()
        },
    )
}

#[test]
fn a_create_that_lands_after_its_client_timed_out_is_adopted_not_bought_twice() {
    // The server finishes the create its client hung up on (as Vast does), 4 s after
    // the client gave up; the listing lag (20 s here) covers that, so asimov sees the
    // late instance under its tag and adopts it instead of buying another.
    let Some(w) = world_with(
        vec![
            offer(301, "RTX 4090", 1, 24.0, 0.41),
            offer(302, "RTX 4090", 1, 24.0, 0.35),
        ],
        |c| c.faults = Some(slow_creates()),
    ) else {
        return;
    };
    let mut controller = w.spawn_controller_with(&[
        ("ASIMOV_HTTP_TIMEOUT", "2"),
        ("ASIMOV_VAST_LISTING_LAG_SECS", "20"),
    ]);
    w.apply(&w.job("sh train.sh; sleep 0.5"));
    w.until("the run to succeed", 120, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    w.wait_destroyed();
    let recs = w.server.instances();
    assert_eq!(recs.len(), 1, "adopted, not bought twice: {recs:?}");
    assert_eq!(w.server.creates_received(), 1);
    assert_eq!(w.attempt(), 1);
    kill9(&mut controller);
}

#[test]
fn a_create_answered_by_a_5xx_page_is_sent_again_once_the_overridden_listing_lag_is_over() {
    let Some(w) = world() else { return };
    // A proxy's 502: the instance may or may not exist, so asimov waits until the
    // listing would show it (5 s by `ASIMOV_VAST_LISTING_LAG_SECS`, not Vast's 120),
    // then creates again under the same tag.
    w.server.inject(Some(Api::Create), Fault::NginxHtml(502), 1);
    let mut controller = w.spawn_controller_with(&[("ASIMOV_VAST_LISTING_LAG_SECS", "5")]);
    let start = Instant::now();
    w.apply(&w.job("sh train.sh"));
    w.until("the run to succeed", 100, || {
        w.a.run_phase("gpu-0").as_deref() == Some("Succeeded")
    });
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(5),
        "created again before the listing lag was over: {took:?}"
    );
    assert_eq!(w.server.creates_received(), 2);
    assert_eq!(w.server.instances().len(), 1);
    assert_eq!(w.attempt(), 1, "the same attempt, the same tag");
    w.wait_destroyed();
    kill9(&mut controller);
}

#[test]
fn a_create_that_queued_in_the_pacer_and_landed_late_is_not_bought_twice() {
    // Four runs' creates queue in the create pacing (3 s apart here) and each is held
    // 9 s by the server, past the controller's 2 s client timeout, before it acts. The
    // listing lag (12 s) covers a create's whole time at the server, but the last ones
    // are sent 6 and 9 s after their intents: counted from the intent, their lag is over
    // when their timeout's backoff (5 s) ends, and asimov bought again while the first
    // create was still to land. The lag counts from when the create was last in flight.
    let offers = (0..8)
        .map(|i| offer(301 + i, "RTX 4090", 1, 24.0, 0.30 + i as f64 / 100.0))
        .collect();
    let Some(w) = world_with(offers, |c| c.faults = Some(creates_held(9))) else {
        return;
    };
    let jobs = w.four_jobs();
    let mut controller = w.spawn_controller_with(&[
        ("ASIMOV_HTTP_TIMEOUT", "2"),
        ("ASIMOV_VAST_PACING", "0.6"),
        ("ASIMOV_VAST_LISTING_LAG_SECS", "12"),
    ]);
    w.apply(&jobs);
    w.until("the four runs to succeed", 180, || {
        FOUR.iter()
            .all(|n| w.a.run_phase(&format!("{n}-0")).as_deref() == Some("Succeeded"))
    });
    w.wait_destroyed();
    let recs = w.server.instances();
    assert_eq!(
        w.server.creates_received(),
        4,
        "one create per run, none bought twice: {recs:#?}"
    );
    assert_eq!(recs.len(), 4, "{recs:#?}");
    kill9(&mut controller);
}

const FOUR: [&str; 4] = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"];

impl World {
    /// Four one-run jobs in one file, each wanting one RTX 4090.
    fn four_jobs(&self) -> std::path::PathBuf {
        let docs: Vec<String> = FOUR
            .iter()
            .map(|name| {
                format!(
                    r#"apiVersion: asimov/v1
kind: Job
metadata: {{name: {name}}}
spec:
  source: {{workdir: .}}
  run: |
    sh train.sh
  resources: {{gpu: {{name: RTX_4090, count: 1}}, disk_gb: 20}}
  image: pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime
  placement:
    - {{provider: vast, ssh_user: {user}}}
"#,
                    user = self.sshd.user()
                )
            })
            .collect();
        self.a.manifest("four.yaml", &docs.join("---\n"))
    }
}

/// Creates held `secs` before the server acts, as the fault campaign's `Slow`.
fn creates_held(secs: u64) -> std::sync::Arc<support::faults::Faults> {
    support::faults::Faults::new(
        13,
        support::faults::Rates {
            slow: 1.0,
            slow_for: Duration::from_secs(secs),
            creates_only: true,
            ..Default::default()
        },
    )
}

#[test]
fn a_create_a_killed_controller_left_queued_and_in_flight_is_adopted_after_restart_not_bought_twice()
 {
    // Four creates queue in the create pacing (3 s apart), each held 9 s at the server
    // before it acts. The controller is killed once the third has landed: the fourth
    // was sent 9 s after its intent and lands 18 s after it. The listing lag (12 s)
    // counted from the intent would be over at the restart, and the new controller
    // would buy it again; it counts from the restart for creates left in flight.
    let offers = (0..8)
        .map(|i| offer(301 + i, "RTX 4090", 1, 24.0, 0.30 + i as f64 / 100.0))
        .collect();
    let Some(w) = world_with(offers, |c| c.faults = Some(creates_held(9))) else {
        return;
    };
    let env = [
        ("ASIMOV_VAST_PACING", "0.6"),
        ("ASIMOV_VAST_LISTING_LAG_SECS", "12"),
    ];
    let mut controller = w.spawn_controller_with(&env);
    w.apply(&w.four_jobs());
    w.until("three creates landed", 90, || {
        w.server.creates_received() >= 3
    });
    kill9(&mut controller);
    let mut again = w.spawn_controller_with(&env);
    w.until("the four runs to succeed", 180, || {
        FOUR.iter()
            .all(|n| w.a.run_phase(&format!("{n}-0")).as_deref() == Some("Succeeded"))
    });
    w.wait_destroyed();
    let recs = w.server.instances();
    assert_eq!(
        w.server.creates_received(),
        4,
        "one create per run, none bought twice: {recs:#?}"
    );
    assert_eq!(recs.len(), 4, "{recs:#?}");
    kill9(&mut again);
}
