//! The `ssh` provider on a fleet of real `sshd` servers, each standing in for a host.

mod support;

use asimov::home::Home;
use asimov::manifest::{Fleet, GpuRequest, Origin, Placement, Resources};
use asimov::model::{OwnerTag, ProviderKind};
use asimov::provider::ssh::{HostStatus, SshProvider};
use asimov::provider::{CreateRequest, Endpoint, ErrorKind, InstanceState, Provider};
use asimov::transport::ssh::{SshOptions, SshPool};
use std::time::Duration;
use support::sshd::Sshd;

struct Lab {
    a: Sshd,
    b: Sshd,
    _home_dir: tempfile::TempDir,
    provider: SshProvider,
}

/// Fleet `lab`: host `a` with 2 GPUs, host `b` with none.
fn lab() -> Option<Lab> {
    let a = Sshd::start_or_skip()?;
    let b = Sshd::start();
    let home_dir = tempfile::tempdir().unwrap();
    let options = SshOptions {
        connect_timeout: Duration::from_secs(5),
        ..SshOptions::default()
    };
    let pool = SshPool::with_options(Home::at(home_dir.path()), options).unwrap();
    let provider = SshProvider::with_pool(pool);
    provider.set_fleets(vec![Fleet {
        name: "lab".into(),
        labels: Default::default(),
        hosts: vec![a.fleet_host("a", 2), b.fleet_host("b", 0)],
        origin: Origin {
            file: "fleet.yaml".into(),
            line: 1,
        },
    }]);
    Some(Lab {
        a,
        b,
        _home_dir: home_dir,
        provider,
    })
}

fn request(run: &str, gpus: u32) -> CreateRequest {
    let mut placement = Placement::local();
    placement.provider = ProviderKind::Ssh;
    placement.fleet = Some("lab".into());
    CreateRequest {
        tag: OwnerTag::new("ctl", run, 0),
        placement,
        resources: Resources {
            gpu: (gpus > 0).then(|| GpuRequest {
                names: Vec::new(),
                count: gpus,
                min_vram_gb: None,
            }),
            ..Resources::default()
        },
        image: None,
    }
}

fn status<'a>(statuses: &'a [HostStatus], host: &str) -> &'a HostStatus {
    statuses.iter().find(|s| s.host == host).unwrap()
}

fn slot_dir(sshd: &Sshd, run: &str) -> std::path::PathBuf {
    sshd.home()
        .join(".asimov-agent/instances")
        .join(OwnerTag::new("ctl", run, 0).render())
}

#[tokio::test]
async fn create_list_destroy_across_two_hosts_with_gpu_slots() {
    let Some(lab) = lab() else { return };
    let p = &lab.provider;
    assert!(p.list().await.unwrap().is_empty());

    // Two 1-GPU jobs share host a, each on its own GPU.
    let one = p.create(&request("one-0", 1)).await.unwrap();
    let two = p.create(&request("two-0", 1)).await.unwrap();
    assert_eq!(one.host.as_deref(), Some("a"));
    assert_eq!(two.host.as_deref(), Some("a"));
    assert_eq!(one.id, format!("lab/a/{}", one.tag.render()));
    let ids = |run| std::fs::read_to_string(slot_dir(&lab.a, run).join("gpu_ids")).unwrap();
    let mut both = vec![
        ids("one-0").trim().to_string(),
        ids("two-0").trim().to_string(),
    ];
    both.sort();
    assert_eq!(both, vec!["0", "1"]);

    // A third GPU job fits nowhere: a is full, b has no GPU.
    let e = p.create(&request("three-0", 1)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoCapacity, "{e}");
    // A CPU job takes the whole of b; a second one finds every host busy.
    let cpu = p.create(&request("cpu-0", 0)).await.unwrap();
    assert_eq!(cpu.host.as_deref(), Some("b"));
    assert!(slot_dir(&lab.b, "cpu-0").join("tag").exists());
    assert!(
        !slot_dir(&lab.a, "cpu-0").exists(),
        "hosts keep separate state"
    );
    let e = p.create(&request("cpu2-0", 0)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoCapacity, "{e}");
    // More GPUs than any host has can never fit.
    let e = p.create(&request("big-0", 8)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e}");

    // Creating the same tag again adopts the slot.
    assert_eq!(p.create(&request("one-0", 1)).await.unwrap().id, one.id);

    let mut listed = p.list().await.unwrap();
    listed.sort_by(|x, y| x.id.cmp(&y.id));
    let names: Vec<_> = listed.iter().map(|i| i.tag.run.clone()).collect();
    assert_eq!(names, vec!["one-0", "two-0", "cpu-0"]);
    assert!(listed.iter().all(|i| i.state == InstanceState::Running));
    match &listed[2].endpoint {
        Some(Endpoint::Ssh { port, root, .. }) => {
            assert_eq!(*port, lab.b.port());
            assert_eq!(root, &slot_dir(&lab.b, "cpu-0").display().to_string());
        }
        other => panic!("unexpected endpoint {other:?}"),
    }
    let statuses = p.host_statuses();
    let a = status(&statuses, "a");
    assert!(a.reachable && a.busy);
    assert_eq!((a.gpus_total, a.gpus_free), (2, 0));
    assert_eq!(a.running.len(), 2);
    assert!(status(&statuses, "b").busy);

    // Destroy runs the agent's stop, removes the slot, and frees the GPU.
    std::fs::write(
        slot_dir(&lab.a, "one-0").join("agent.sh"),
        "[ \"$1\" = stop ] && echo stopped > \"$HOME/agent-stopped\"\n",
    )
    .unwrap();
    p.destroy(&one.id).await.unwrap();
    assert!(!slot_dir(&lab.a, "one-0").exists());
    assert!(
        lab.a.home().join("agent-stopped").exists(),
        "agent.sh stop ran"
    );
    let e = p.destroy(&one.id).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(p.list().await.unwrap().len(), 2);
    let statuses = p.host_statuses();
    assert_eq!(status(&statuses, "a").gpus_free, 1);
    let three = p.create(&request("three-0", 1)).await.unwrap();
    assert_eq!(three.host.as_deref(), Some("a"));
}

#[tokio::test]
async fn an_unreachable_host_keeps_its_slots_as_stopped_and_rejoins() {
    let Some(mut lab) = lab() else { return };
    let cpu = lab.provider.create(&request("cpu-0", 0)).await.unwrap();
    assert_eq!(cpu.host.as_deref(), Some("a"), "first host with room");
    let other = lab.provider.create(&request("other-0", 0)).await.unwrap();
    assert_eq!(other.host.as_deref(), Some("b"));

    lab.a.stop();
    let listed = lab.provider.list().await.unwrap();
    let on_a = listed
        .iter()
        .find(|i| i.id == cpu.id)
        .expect("still listed");
    assert_eq!(on_a.state, InstanceState::Stopped);
    let on_b = listed.iter().find(|i| i.id == other.id).unwrap();
    assert_eq!(on_b.state, InstanceState::Running);
    let statuses = lab.provider.host_statuses();
    let a = status(&statuses, "a");
    assert!(!a.reachable);
    assert!(
        a.message.as_deref().unwrap_or("").contains("lab/a"),
        "{a:?}"
    );
    assert!(status(&statuses, "b").reachable);
    // Nowhere to go: a is down, b is busy.
    let e = lab
        .provider
        .create(&request("third-0", 0))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoCapacity, "{e}");
    let e = lab.provider.destroy(&cpu.id).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    let e = lab
        .provider
        .machine(on_a)
        .err()
        .expect("no machine on a down host");
    assert_eq!(e.kind, ErrorKind::Transient);

    // Every host down: the listing itself fails rather than report all as stopped.
    lab.b.stop();
    let e = lab.provider.list().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");

    lab.a.restart();
    lab.b.restart();
    let listed = lab.provider.list().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|i| i.state == InstanceState::Running));
    assert!(status(&lab.provider.host_statuses(), "a").reachable);
    lab.provider.destroy(&cpu.id).await.unwrap();
    let third = lab.provider.create(&request("third-0", 0)).await.unwrap();
    assert_eq!(third.host.as_deref(), Some("a"));
}

#[tokio::test]
async fn preparing_a_host_twice_changes_nothing_the_second_time() {
    let Some(lab) = lab() else { return };
    let host = lab.a.fleet_host("a", 2);
    let first = lab.provider.prepare_host("lab", &host).await.unwrap();
    assert!(first.changed(), "{first:?}");
    assert!(first.changes.contains(&"agent folder".to_string()));
    assert!(
        first.tmux,
        "tmux is installed by scripts/install-test-deps.sh"
    );
    assert!(first.rsync);
    assert!(lab.a.home().join(".asimov-agent/instances").is_dir());
    let second = lab.provider.prepare_host("lab", &host).await.unwrap();
    assert!(!second.changed(), "{second:?}");
    assert_eq!(second.gpu_names, first.gpu_names);
    // b was never prepared: preparing a is local to a.
    assert!(!lab.b.home().join(".asimov-agent").exists());
}

#[tokio::test]
async fn an_unknown_fleet_or_missing_fleet_is_permanent() {
    let Some(lab) = lab() else { return };
    let mut req = request("x-0", 0);
    req.placement.fleet = Some("nope".into());
    let e = lab.provider.create(&req).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.to_string().contains("nope"));
    req.placement.fleet = None;
    let e = lab.provider.create(&req).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
}

/// Fleet `nfs`: hosts `a` and `b` (one GPU-less slot each) whose users share one `$HOME`.
fn shared_home_lab() -> Option<(Sshd, Sshd, tempfile::TempDir, SshProvider)> {
    let shared = tempfile::tempdir().unwrap();
    let a = {
        Sshd::start_or_skip()?;
        Sshd::start_sharing_home(shared.path())
    };
    let b = Sshd::start_sharing_home(shared.path());
    let home_dir = tempfile::tempdir().unwrap();
    let pool = SshPool::new(Home::at(home_dir.path())).unwrap();
    let provider = SshProvider::with_pool(pool);
    provider.set_fleets(vec![Fleet {
        name: "lab".into(),
        labels: Default::default(),
        hosts: vec![a.fleet_host("a", 0), b.fleet_host("b", 0)],
        origin: Origin {
            file: "fleet.yaml".into(),
            line: 1,
        },
    }]);
    Some((a, b, shared, provider))
}

#[tokio::test]
async fn hosts_sharing_a_home_each_list_and_destroy_only_their_own_slots() {
    let Some((a, _b, _shared, provider)) = shared_home_lab() else {
        return;
    };
    let first = provider.create(&request("r-0", 0)).await.unwrap();
    let second = provider.create(&request("r-1", 0)).await.unwrap();
    assert!(first.id.starts_with("lab/a/"), "{}", first.id);
    assert!(
        second.id.starts_with("lab/b/"),
        "host a is taken, so the second slot goes to b: {}",
        second.id
    );
    // A job's process on host a (the agent writes its pid into the slot).
    let mut sleeper = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    std::fs::write(
        a.home()
            .join(".asimov-agent/instances")
            .join(OwnerTag::new("ctl", "r-0", 0).render())
            .join("pid"),
        sleeper.id().to_string(),
    )
    .unwrap();

    let listed = provider.list().await.unwrap();
    let mut ids: Vec<_> = listed.iter().map(|i| i.id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![first.id.as_str(), second.id.as_str()],
        "each slot listed once, by the host that claimed it"
    );
    let statuses = provider.host_statuses();
    assert_eq!(status(&statuses, "a").running.len(), 1, "{statuses:?}");
    assert_eq!(status(&statuses, "b").running.len(), 1, "{statuses:?}");

    // The same slot asked of the other host: not there, and nothing is signalled.
    let wrong = format!("lab/b/{}", OwnerTag::new("ctl", "r-0", 0).render());
    let e = provider.destroy(&wrong).await.expect_err("not b's slot");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "a destroy through the wrong host signalled the job"
    );
    assert_eq!(provider.list().await.unwrap().len(), 2);

    provider.destroy(&first.id).await.unwrap();
    provider.destroy(&second.id).await.unwrap();
    assert!(provider.list().await.unwrap().is_empty());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[tokio::test]
async fn preparing_hosts_sharing_a_home_keeps_each_hosts_gpu_inventory() {
    let Some((a, b, _shared, provider)) = shared_home_lab() else {
        return;
    };
    a.install_command("nvidia-smi", "echo 'NVIDIA A100-SXM4-80GB, 81920 MiB'");
    b.install_command("nvidia-smi", "echo 'NVIDIA H100 80GB HBM3, 81559 MiB'");
    let (host_a, host_b) = (a.fleet_host("a", 1), b.fleet_host("b", 1));
    let first_a = provider.prepare_host("lab", &host_a).await.unwrap();
    assert!(first_a.changed(), "{first_a:?}");
    let first_b = provider.prepare_host("lab", &host_b).await.unwrap();
    assert_eq!(first_b.gpu_names, vec!["NVIDIA H100 80GB HBM3, 81559 MiB"]);
    let again_a = provider.prepare_host("lab", &host_a).await.unwrap();
    assert!(
        !again_a.changed(),
        "preparing b did not change a's record: {again_a:?}"
    );
    assert_eq!(again_a.gpu_names, vec!["NVIDIA A100-SXM4-80GB, 81920 MiB"]);
    let again_b = provider.prepare_host("lab", &host_b).await.unwrap();
    assert!(!again_b.changed(), "{again_b:?}");
}
