//! Issue 3 end to end: a Fleet of real OpenSSH servers on localhost ports, driven through
//! the `asimov` binary. The queue, outputs coming back, `logs -f`, a host going away
//! mid-run and coming back, a changed host key, and preparing a host twice.

mod support;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::cli::{Asimov, kill9};
use support::sshd::Sshd;

fn fleet_yaml(hosts: &[(&str, &Sshd)]) -> String {
    let mut text = String::from(
        "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  hosts:\n",
    );
    for (name, sshd) in hosts {
        text.push_str(&format!(
            "    - {{name: {name}, user: {}, address: {}, port: {}, identity_file: {}, gpus: 0}}\n",
            sshd.user(),
            sshd.host(),
            sshd.port(),
            sshd.client_key().display()
        ));
    }
    text
}

fn job_yaml(name: &str, seeds: &[&str], run: &str) -> String {
    format!(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  source: {{workdir: .}}\n  \
         matrix: {{seed: [{}]}}\n  run: {run}\n  artifacts: {{paths: [out]}}\n  \
         placement: [{{provider: ssh, fleet: lab}}]\n",
        seeds.join(", ")
    )
}

fn two_hosts() -> Option<(Sshd, Sshd)> {
    let a = Sshd::start_or_skip()?;
    let b = Sshd::start_or_skip()?;
    Some((a, b))
}

fn run_field(a: &Asimov, run: &str, field: &str) -> serde_json::Value {
    a.runs_json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == run)
        .map(|r| r[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn a_fleet_of_two_queues_the_third_job_and_brings_every_output_back() {
    let Some((h1, h2)) = two_hosts() else { return };
    let a = Asimov::new();
    // An uncommitted change, which each run must record as its diff.
    std::fs::write(a.repo.path().join("train.sh"), "echo training harder\n").unwrap();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1), ("box-2", &h2)]));
    let job = a.manifest(
        "exp.yaml",
        &job_yaml(
            "exp",
            &["a", "b", "c"],
            "'sh train.sh; mkdir -p out; echo \"result ${matrix.seed}\" > out/result.txt; sleep 2'",
        ),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);

    // The queue: two run, the third waits (Pending) for a free host, in apply order.
    let mut saw_queue = false;
    let mut saw_host_running = false;
    let start = Instant::now();
    loop {
        let runs = a.runs_json();
        let items = runs["items"].as_array().cloned().unwrap_or_default();
        let phase = |n: &str| {
            items
                .iter()
                .find(|r| r["name"] == n)
                .map(|r| r["phase"].as_str().unwrap_or("").to_string())
        };
        // Placed: on an instance (a slot a host gave it). A queued run's create is tried
        // again now and then, and it shows Provisioning ("creating an instance") while
        // the hosts answer that they are full: not placed.
        let placed = |n: &str| {
            items
                .iter()
                .find(|r| r["name"] == n)
                .is_some_and(|r| !r["instance_id"].is_null())
        };
        let busy = ["exp-0", "exp-1", "exp-2"]
            .iter()
            .filter(|n| {
                placed(n)
                    && matches!(
                        phase(n).as_deref(),
                        Some("Running" | "Starting" | "Provisioning")
                    )
            })
            .count();
        assert!(busy <= 2, "never more runs than hosts: {items:?}");
        if busy > 0 && !saw_host_running {
            // `get fleets` names what each host runs, by run name.
            let fleets = a.ok(&["get", "fleets", "-o", "json"]);
            saw_host_running = fleets.contains("\"exp-0\"") || fleets.contains("\"exp-1\"");
        }
        if busy == 2 && phase("exp-2").as_deref() == Some("Pending") {
            saw_queue = true;
            let reason = run_field(&a, "exp-2", "reason");
            assert!(
                reason.as_str().unwrap_or("").contains("free host"),
                "{reason}"
            );
        }
        if ["exp-0", "exp-1", "exp-2"]
            .iter()
            .all(|n| phase(n).as_deref() == Some("Succeeded"))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "runs did not finish: {items:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        saw_queue,
        "the third run should have waited for a free host"
    );

    for (run, seed) in [("exp-0", "a"), ("exp-1", "b"), ("exp-2", "c")] {
        let result = a.home().join("artifacts").join(run).join("out/result.txt");
        let text = std::fs::read_to_string(&result)
            .unwrap_or_else(|e| panic!("{}: {e}", result.display()));
        assert_eq!(text.trim(), format!("result {seed}"));
        assert_eq!(run_field(&a, run, "commit_message"), "first experiment");
        assert_eq!(run_field(&a, run, "dirty"), true);
        let host = run_field(&a, run, "host");
        assert!(host == "box-1" || host == "box-2", "{host}");
        let described = a.ok(&["describe", "run", run]);
        assert!(
            described.contains("+echo training harder"),
            "the diff is recorded: {described}"
        );
        let log = a.ok(&["logs", run]);
        assert!(log.contains("training harder"), "{log}");
    }
    let fleets = a.ok(&["get", "fleets"]);
    assert!(
        fleets.contains("box-1") && fleets.contains("box-2"),
        "{fleets}"
    );

    a.ok(&["delete", "job", "exp"]);
    for h in [&h1, &h2] {
        let left: Vec<_> = std::fs::read_dir(h.home().join(".asimov-agent/instances"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "slots left on a host: {left:?}");
    }
}

#[test]
fn logs_follow_streams_a_running_job_live() {
    let Some(h1) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1)]));
    let job = a.manifest(
        "tick.yaml",
        &job_yaml(
            "tick",
            &["x"],
            "'for i in 1 2 3 4 5 6; do echo tick-$i; sleep 0.5; done'",
        ),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    a.wait_for("tick-0 to run", Duration::from_secs(60), || {
        a.run_phase("tick-0").as_deref() == Some("Running")
    });
    let mut follow = a
        .command()
        .args(["logs", "tick-0", "-f"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let started = Instant::now();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    // Lines arrive while the job is still running, not all at the end.
    while !seen.contains("tick-6") {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if seen.contains("tick-2") && !seen.contains("tick-6") {
            assert_ne!(
                a.run_phase("tick-0").as_deref(),
                Some("Succeeded"),
                "{seen}"
            );
        }
    }
    assert!(seen.contains("tick-1") && seen.contains("tick-6"), "{seen}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let status = follow.wait().unwrap();
    assert!(status.success());
    a.ok(&["delete", "job", "tick"]);
}

#[test]
fn a_host_that_goes_away_mid_run_is_replaced_and_rejoins() {
    let Some((mut h1, h2)) = two_hosts() else {
        return;
    };
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1), ("box-2", &h2)]));
    // The provider fills hosts in fleet order, so the run starts on box-1.
    let job = a.manifest(
        "long.yaml",
        &job_yaml(
            "long",
            &["x"],
            "'mkdir -p out; echo done > out/result.txt; sleep 4'",
        ),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    a.wait_for("long-0 to run", Duration::from_secs(60), || {
        a.run_phase("long-0").as_deref() == Some("Running")
    });
    let first_host = run_field(&a, "long-0", "host")
        .as_str()
        .unwrap()
        .to_string();
    let (gone, other) = if first_host == "box-1" {
        (&mut h1, "box-2")
    } else {
        panic!("test expects box-1 first, got {first_host}")
    };
    gone.stop();

    a.wait_for(
        "the run to move to the other host and finish",
        Duration::from_secs(120),
        || a.run_phase("long-0").as_deref() == Some("Succeeded"),
    );
    assert_eq!(run_field(&a, "long-0", "host"), other);
    assert!(run_field(&a, "long-0", "attempt").as_u64().unwrap() >= 2);
    let fleets = a.ok(&["get", "fleets", "-o", "json"]);
    assert!(
        fleets.contains("\"reachable\": false"),
        "box-1 shows unreachable: {fleets}"
    );

    gone.restart();
    a.wait_for("box-1 to rejoin", Duration::from_secs(60), || {
        let v: serde_json::Value =
            serde_json::from_str(&a.ok(&["get", "fleets", "-o", "json"])).unwrap();
        v["items"][0]["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["reachable"] == true)
    });
    a.ok(&["delete", "job", "long"]);
    // The stale slot on box-1 was destroyed once it answered again.
    let left: Vec<_> = std::fs::read_dir(h1.home().join(".asimov-agent/instances"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_changed_host_key_is_refused_with_both_fingerprints_and_prepare_is_idempotent() {
    let Some(mut h1) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1)]));
    a.ok(&["apply", "-f", fleet.to_str().unwrap()]);

    let first = a.ok(&["prepare", "lab"]);
    assert!(first.contains("lab/box-1: prepared"), "{first}");
    let second = a.ok(&["prepare", "lab"]);
    assert!(
        second.contains("lab/box-1: already prepared, nothing changed"),
        "{second}"
    );

    let pinned = h1.host_key_fingerprint();
    h1.regenerate_host_key();
    let offered = h1.host_key_fingerprint();
    let out = a.run(&["prepare", "lab"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lab/box-1"), "names the machine: {stderr}");
    assert!(
        stderr.contains(&pinned) && stderr.contains(&offered),
        "both fingerprints: {stderr}"
    );
    assert!(stderr.contains("changed"), "says why: {stderr}");
}

#[test]
fn three_runs_on_two_hosts_sharing_a_home_all_succeed_first_time() {
    let shared = tempfile::tempdir().unwrap();
    if Sshd::start_or_skip().is_none() {
        return;
    }
    let h1 = Sshd::start_sharing_home(shared.path());
    let h2 = Sshd::start_sharing_home(shared.path());
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1), ("box-2", &h2)]));
    let job = a.manifest(
        "nfs.yaml",
        &job_yaml(
            "nfs",
            &["a", "b", "c"],
            "'mkdir -p out; echo \"result ${matrix.seed}\" > out/result.txt; sleep 3'",
        ),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    let runs = ["nfs-0", "nfs-1", "nfs-2"];
    a.wait_for("the three runs to end", Duration::from_secs(120), || {
        runs.iter().all(|r| {
            matches!(
                a.run_phase(r).as_deref(),
                Some("Succeeded" | "Failed" | "Cancelled")
            )
        })
    });
    for (run, seed) in runs.iter().zip(["a", "b", "c"]) {
        assert_eq!(
            a.run_phase(run).as_deref(),
            Some("Succeeded"),
            "{run}: {}",
            a.ok(&["describe", "run", run])
        );
        assert_eq!(
            run_field(&a, run, "attempt"),
            1,
            "{run} was never preempted: {}",
            a.ok(&["describe", "run", run])
        );
        let result = a.home().join("artifacts").join(run).join("out/result.txt");
        let text = std::fs::read_to_string(&result)
            .unwrap_or_else(|e| panic!("{}: {e}", result.display()));
        assert_eq!(text.trim(), format!("result {seed}"));
    }
    a.ok(&["delete", "job", "nfs"]);
}

/// Pids of `ssh -M` master processes whose pinned-key files live in `home`.
fn ssh_masters_of(home: &std::path::Path) -> Vec<i32> {
    let needle = format!("UserKnownHostsFile={}", home.join("known_hosts").display());
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .first()
            .is_some_and(|a| a == "ssh" || a.ends_with("/ssh"))
            && args.iter().any(|a| a == "-M")
            && args.iter().any(|a| a.starts_with(&needle))
        {
            pids.push(pid);
        }
    }
    pids
}

/// A background controller with a run going on `box-1`, its masters up.
fn controller_with_masters(h1: &Sshd) -> Asimov {
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", h1)]));
    let job = a.manifest("hold.yaml", &job_yaml("hold", &["x"], "'sleep 60'"));
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    a.wait_for("hold-0 to run", Duration::from_secs(60), || {
        a.run_phase("hold-0").as_deref() == Some("Running")
    });
    assert!(
        !ssh_masters_of(a.home()).is_empty(),
        "the controller holds a master connection while it runs"
    );
    a
}

fn wait_for_controller_to_stop(a: &Asimov, pid: i32) {
    a.wait_for("the controller to exit", Duration::from_secs(30), || {
        // SAFETY: probing a pid with signal 0.
        unsafe { libc::kill(pid, 0) != 0 }
    });
}

fn controller_pid(a: &Asimov) -> i32 {
    std::fs::read_to_string(a.home().join("controller.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_controller_stopped_by_sigterm_leaves_no_ssh_master() {
    let Some(h1) = Sshd::start_or_skip() else {
        return;
    };
    let a = controller_with_masters(&h1);
    let pid = controller_pid(&a);
    // SAFETY: signalling the test's own controller.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for_controller_to_stop(&a, pid);
    a.wait_for("its masters to go", Duration::from_secs(5), || {
        ssh_masters_of(a.home()).is_empty()
    });

    // A controller started again reconnects and carries on.
    let masters_before = h1.logins();
    a.ok(&[
        "apply",
        "-f",
        a.repo.path().join("hold.yaml").to_str().unwrap(),
    ]);
    a.wait_for(
        "the new controller to reach box-1",
        Duration::from_secs(30),
        || h1.logins() > masters_before && !ssh_masters_of(a.home()).is_empty(),
    );
    assert_eq!(a.run_phase("hold-0").as_deref(), Some("Running"));
    a.ok(&["delete", "job", "hold"]);
}

#[test]
fn a_controller_whose_home_is_removed_leaves_no_ssh_master() {
    let Some(h1) = Sshd::start_or_skip() else {
        return;
    };
    let a = controller_with_masters(&h1);
    let pid = controller_pid(&a);
    let home = a.home().to_path_buf();
    std::fs::remove_dir_all(&home).unwrap();
    wait_for_controller_to_stop(&a, pid);
    a.wait_for("its masters to go", Duration::from_secs(5), || {
        ssh_masters_of(&home).is_empty()
    });
}

#[test]
fn a_host_behind_a_bastion_runs_a_job_through_it() {
    let Some(gate) = Sshd::start_or_skip().map(|_| Sshd::start_bastion()) else {
        return;
    };
    let inner = Sshd::start();
    let a = Asimov::new();
    let fleet = a.manifest(
        "fleet.yaml",
        &format!(
            "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {{name: lab}}\nspec:\n  hosts:\n    \
             - {{name: box-2, user: {user}, address: 127.0.0.1, port: {port}, identity_file: {key}, \
             gpus: 0, proxy_jump: '{user}@127.0.0.1:{gate_port}', proxy_jump_identity_file: {gate_key}}}\n",
            user = inner.user(),
            port = inner.port(),
            key = inner.client_key().display(),
            gate_port = gate.port(),
            gate_key = gate.client_key().display(),
        ),
    );
    let job = a.manifest(
        "far.yaml",
        &job_yaml(
            "far",
            &["x"],
            "'mkdir -p out; echo far away > out/result.txt'",
        ),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    a.wait_for("far-0 to succeed", Duration::from_secs(60), || {
        a.run_phase("far-0").as_deref() == Some("Succeeded")
    });
    let result = a.home().join("artifacts/far-0/out/result.txt");
    assert_eq!(std::fs::read_to_string(result).unwrap().trim(), "far away");
    let forwarded = format!("target 127.0.0.1 port {}", inner.port());
    assert!(
        gate.log()
            .lines()
            .any(|l| l.contains("server_request_direct_tcpip") && l.contains(&forwarded)),
        "the bastion forwarded the connection:\n{}",
        gate.log()
    );
    for pin in ["lab_box-2", "lab_box-2.jump"] {
        let file = a.home().join("known_hosts").join(pin);
        assert!(
            std::fs::metadata(&file).is_ok_and(|m| m.len() > 0),
            "{} pinned",
            file.display()
        );
    }
    a.ok(&["delete", "job", "far"]);
}

#[test]
fn a_controller_started_after_one_was_killed_ends_the_masters_it_left() {
    let Some(h1) = Sshd::start_or_skip() else {
        return;
    };
    let a = controller_with_masters(&h1);
    let pid = controller_pid(&a);
    let left = ssh_masters_of(a.home());
    // SAFETY: signalling the test's own controller.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for_controller_to_stop(&a, pid);
    assert_eq!(
        ssh_masters_of(a.home()),
        left,
        "SIGKILL gives no chance to close"
    );

    let logins = h1.logins();
    a.ok(&[
        "apply",
        "-f",
        a.repo.path().join("hold.yaml").to_str().unwrap(),
    ]);
    a.wait_for(
        "the killed controller's masters to end",
        Duration::from_secs(30),
        || {
            let now = ssh_masters_of(a.home());
            left.iter().all(|p| !now.contains(p))
        },
    );
    // The new controller carries on over its own master; the run is adopted.
    a.wait_for("a new master to box-1", Duration::from_secs(30), || {
        h1.logins() > logins && !ssh_masters_of(a.home()).is_empty()
    });
    assert_eq!(a.run_phase("hold-0").as_deref(), Some("Running"));
    assert_eq!(run_field(&a, "hold-0", "attempt"), 1);
    a.ok(&["delete", "job", "hold"]);
}

/// What the first claim on a test host loses, after its slot is written.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    Nothing,
    /// Its SSH connection (the session's sshd process): the answer is lost.
    Link,
    /// The whole server (the session's sshd and its listener): the host is gone.
    Host,
}

/// `mv` for a test host: renames, and logs every slot tag a claim renames into place
/// (a claim's last step) to `$HOME/claims.log`; the first such claim then loses what
/// `cut` says, before the claim can answer.
fn claim_logging_mv(cut: Cut) -> String {
    let kill = match cut {
        Cut::Host => r#"kill -9 "$(awk '{print $4}' /proc/$p/stat)" "$p""#,
        _ => r#"kill -9 "$p""#,
    };
    format!(
        r#"/bin/mv "$@"; rc=$?
for last; do :; done
case "$last" in
  */instances/*/tag)
    echo "$last" >> "$HOME/claims.log"
    if [ {cut} = yes ] && [ ! -e "$HOME/.cut" ]; then
      : > "$HOME/.cut"
      p=$PPID
      while [ "$p" -gt 1 ]; do
        case "$(cat /proc/$p/comm)" in sshd*) {kill}; break ;; esac
        p=$(awk '{{print $4}}' /proc/$p/stat)
      done
    fi ;;
esac
exit $rc"#,
        cut = if cut == Cut::Nothing { "no" } else { "yes" }
    )
}

/// How many claims reached a test host's `mv` (see [`claim_logging_mv`]).
fn claims(h: &Sshd) -> usize {
    std::fs::read_to_string(h.home().join("claims.log"))
        .unwrap_or_default()
        .lines()
        .count()
}

/// Waits for `run` to end after a cut-off claim on `cut_host`, insists it succeeded,
/// and returns its `describe run` for the assertions that follow.
fn succeeded_after_a_cut(a: &Asimov, run: &str, cut_host: &Sshd) -> String {
    a.wait_for("the run to end", Duration::from_secs(120), || {
        matches!(
            a.run_phase(run).as_deref(),
            Some("Succeeded" | "Failed" | "Cancelled")
        )
    });
    let describe = a.ok(&["describe", "run", run]);
    assert!(
        cut_host.home().join(".cut").exists(),
        "the first claim's connection was cut: {describe}"
    );
    assert_eq!(a.run_phase(run).as_deref(), Some("Succeeded"), "{describe}");
    describe
}

/// A claim cut off after it ran, on a host that then goes down: asimov waits for it
/// (`ASIMOV_SSH_UNSURE_CLAIM_SECS`, shortened here), then claims on the next host, so a
/// host that never answers again does not hold the run forever. When the first host
/// comes back, the slot the cut-off claim left there is destroyed as a duplicate: the
/// run runs once, and nothing stays claimed.
#[test]
fn a_cut_off_claim_on_a_host_that_stays_down_moves_on_and_its_slot_is_destroyed_later() {
    let Some((mut h1, h2)) = two_hosts() else {
        return;
    };
    // The cut takes the whole server down with it: the host is gone, not only the link.
    h1.install_command("mv", &claim_logging_mv(Cut::Host));
    h2.install_command("mv", &claim_logging_mv(Cut::Nothing));
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1), ("box-2", &h2)]));
    let job = a.manifest(
        "down.yaml",
        &job_yaml("down", &["a"], "'mkdir -p out; echo done > out/result.txt'"),
    );
    let apply = a
        .command()
        .env("ASIMOV_SSH_UNSURE_CLAIM_SECS", "5")
        .args(["apply", "-f"])
        .arg(&fleet)
        .arg(&job)
        .output()
        .expect("apply runs");
    assert!(apply.status.success(), "{apply:?}");
    let describe = succeeded_after_a_cut(&a, "down-0", &h1);
    assert_eq!(
        claims(&h2),
        1,
        "claimed on box-2 once box-1 stayed down: {describe}"
    );
    assert_eq!(run_field(&a, "down-0", "attempt"), 1, "{describe}");
    // Box-1 comes back holding the cut-off claim's slot: a duplicate, destroyed.
    h1.restart();
    let slots = |h: &Sshd| {
        std::fs::read_dir(h.home().join(".asimov-agent/instances"))
            .map(|d| d.flatten().count())
            .unwrap_or(0)
    };
    a.wait_for(
        "box-1's leftover slot to be destroyed",
        Duration::from_secs(120),
        || slots(&h1) == 0,
    );
    a.ok(&["delete", "job", "down"]);
}

/// A controller killed while it waits for a host whose claim was cut off, and restarted
/// while that host is still down, keeps waiting (the cut-off claim is recorded in the
/// home) instead of claiming on the next host at once; when the host is back, the slot
/// the cut-off claim left there is adopted: the run runs on one host, once. Before the
/// record, the restarted controller claimed on box-2 within its first pass.
#[test]
fn a_controller_restarted_while_it_waits_for_a_silent_host_goes_on_waiting() {
    let Some((mut h1, h2)) = two_hosts() else {
        return;
    };
    h1.install_command("mv", &claim_logging_mv(Cut::Host));
    h2.install_command("mv", &claim_logging_mv(Cut::Nothing));
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1), ("box-2", &h2)]));
    let job = a.manifest(
        "wait.yaml",
        &job_yaml("wait", &["a"], "'mkdir -p out; echo done > out/result.txt'"),
    );
    // Longer than the test: only box-1's return may end the wait.
    let wait = [("ASIMOV_SSH_UNSURE_CLAIM_SECS", "600")];
    let mut first = a.start_controller({
        let mut cmd = a.command();
        cmd.envs(wait);
        cmd
    });
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    let record = a.home().join("providers/ssh/unsure");
    a.wait_for(
        "the cut-off claim on box-1 to be recorded",
        Duration::from_secs(60),
        || claims(&h1) == 1 && std::fs::read_dir(&record).is_ok_and(|d| d.count() == 1),
    );
    kill9(&mut first);
    let mut second = a.start_controller({
        let mut cmd = a.command();
        cmd.envs(wait);
        cmd
    });
    // The new controller has looked at the run (box-1 still down) at least twice.
    let stderr_len = || std::fs::metadata(a.controller_stderr()).map_or(0, |m| m.len());
    let at_start = stderr_len();
    a.wait_for(
        "passes of the new controller",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(a.controller_stderr()).unwrap_or_default();
            text.get(at_start as usize..)
                .is_some_and(|new| new.matches("ssh host not listed").count() >= 2)
        },
    );
    assert_eq!(
        claims(&h2),
        0,
        "claimed on box-2 while box-1 may hold the run: {}",
        a.ok(&["describe", "run", "wait-0"])
    );
    h1.restart();
    let describe = succeeded_after_a_cut(&a, "wait-0", &h1);
    assert_eq!(claims(&h2), 0, "nothing claimed on box-2: {describe}");
    assert_eq!(claims(&h1), 1, "one claim, on box-1: {describe}");
    assert_eq!(run_field(&a, "wait-0", "attempt"), 1, "{describe}");
    assert!(
        std::fs::read_dir(&record).is_ok_and(|d| d.count() == 0),
        "the record is dropped once box-1 answered"
    );
    a.ok(&["delete", "job", "wait"]);
    kill9(&mut second);
}

/// A claim cut off after it ran on the first host (its slot written, its answer lost) is
/// not followed by a claim on the second: asimov waits for the first host to answer and
/// adopts the slot there, so the run never runs on two hosts. Seen in the fault
/// campaign as one attempt holding a slot on two hosts.
#[test]
fn a_claim_cut_off_after_it_ran_is_adopted_and_never_placed_on_a_second_host() {
    let Some((h1, h2)) = two_hosts() else { return };
    h1.install_command("mv", &claim_logging_mv(Cut::Link));
    h2.install_command("mv", &claim_logging_mv(Cut::Nothing));
    let a = Asimov::new();
    let fleet = a.manifest("fleet.yaml", &fleet_yaml(&[("box-1", &h1), ("box-2", &h2)]));
    let job = a.manifest(
        "cut.yaml",
        &job_yaml("cut", &["a"], "'mkdir -p out; echo done > out/result.txt'"),
    );
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    let describe = succeeded_after_a_cut(&a, "cut-0", &h1);
    assert_eq!(claims(&h1), 1, "one claim, on box-1: {describe}");
    assert_eq!(claims(&h2), 0, "nothing claimed on box-2: {describe}");
    assert_eq!(run_field(&a, "cut-0", "attempt"), 1, "{describe}");
    a.ok(&["delete", "job", "cut"]);
}
