//! The OpenSSH transport against real `sshd` servers started on free localhost ports.

mod support;

use asimov::home::Home;
use asimov::transport::ssh::{SshJump, SshOptions, SshPool, SshTarget, SshTransport};
use asimov::transport::{Transport, TransportError};
use futures_util::StreamExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::sshd::Sshd;

struct Setup {
    sshd: Sshd,
    _home_dir: tempfile::TempDir,
    home: Home,
}

fn setup() -> Option<Setup> {
    let sshd = Sshd::start_or_skip()?;
    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());
    Some(Setup {
        sshd,
        _home_dir: home_dir,
        home,
    })
}

fn target(sshd: &Sshd, machine: &str) -> SshTarget {
    SshTarget {
        machine: machine.to_string(),
        host: sshd.host().to_string(),
        port: sshd.port(),
        user: Some(sshd.user().to_string()),
        identity_file: Some(sshd.client_key()),
        jump: None,
    }
}

fn pool(home: &Home, use_rsync: bool) -> Arc<SshPool> {
    let options = SshOptions {
        connect_timeout: Duration::from_secs(5),
        use_rsync,
        ..SshOptions::default()
    };
    SshPool::with_options(home.clone(), options).unwrap()
}

fn transport(s: &Setup, use_rsync: bool) -> SshTransport {
    pool(&s.home, use_rsync).transport(target(&s.sshd, "box-1"))
}

#[tokio::test]
async fn exec_returns_status_stdout_stderr_and_runs_in_the_hosts_home() {
    let Some(s) = setup() else { return };
    let t = transport(&s, true);
    let out = t.exec("echo out; echo err >&2; exit 3").await.unwrap();
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    // Quoting survives: the script reaches `sh -c` as written.
    let out = t.exec("printf '%s|' \"a b\" 'c'\"'\"'d'").await.unwrap();
    assert_eq!(out.stdout, "a b|c'd|");
    let home = t.exec("echo \"$HOME\"").await.unwrap();
    assert_eq!(home.stdout.trim(), s.sshd.home().display().to_string());
}

#[tokio::test]
async fn exec_with_stdin_feeds_large_input() {
    let Some(s) = setup() else { return };
    let t = transport(&s, true);
    let input = vec![b'x'; 300_000];
    let out = t.exec_with_stdin("wc -c", &input).await.unwrap();
    assert_eq!(out.status, 0);
    assert_eq!(out.stdout.trim(), "300000");
    // Output as large as the input, read while it is written: no deadlock.
    let out = t.exec_with_stdin("cat", &input).await.unwrap();
    assert_eq!(out.stdout.len(), 300_000);
    let out = t
        .exec_with_stdin("head -c 10 >/dev/null", &input)
        .await
        .unwrap();
    assert_eq!(out.status, 0);
}

#[tokio::test]
async fn one_master_connection_serves_every_command() {
    let Some(s) = setup() else { return };
    let pool = pool(&s.home, true);
    let t = pool.transport(target(&s.sshd, "box-1"));
    let socket = t.control_socket().await.unwrap();
    for i in 0..10 {
        let out = t.exec(&format!("echo {i}")).await.unwrap();
        assert_eq!(out.stdout.trim(), i.to_string());
    }
    // A second transport for the same machine rides the same master.
    let again = pool.transport(target(&s.sshd, "box-1"));
    again.exec("true").await.unwrap();
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("f"), "x").unwrap();
    again.upload(local.path(), "~/up").await.unwrap();
    assert_eq!(again.control_socket().await.unwrap(), socket);
    assert_eq!(s.sshd.logins(), 1, "sshd log:\n{}", s.sshd.log());
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("top.txt"), "top\n").unwrap();
    std::fs::write(root.join("with space.txt"), "space\n").unwrap();
    std::fs::write(root.join("sub/deeper/data.bin"), vec![7u8; 70_000]).unwrap();
    let script = root.join("run.sh");
    std::fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    asimov::home::set_mode(&script, 0o755).unwrap();
}

fn assert_same_tree(a: &Path, b: &Path) {
    for rel in ["top.txt", "with space.txt", "sub/deeper/data.bin", "run.sh"] {
        let left = std::fs::read(a.join(rel)).unwrap();
        let right = std::fs::read(b.join(rel))
            .unwrap_or_else(|e| panic!("{} missing in {}: {e}", rel, b.display()));
        assert_eq!(left, right, "{rel} differs");
    }
}

async fn round_trip(use_rsync: bool) {
    let Some(s) = setup() else { return };
    let t = transport(&s, use_rsync);
    assert_eq!(t.uses_rsync().await.unwrap(), use_rsync);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    make_tree(&src);

    // A folder lands as the named remote folder, parents created.
    t.upload(&src, "~/a/b/code").await.unwrap();
    let remote = s.sshd.home().join("a/b/code");
    assert_same_tree(&src, &remote);
    let out = t.exec("cd ~/a/b/code && ./run.sh").await.unwrap();
    assert_eq!(out.stdout, "ran\n", "mode kept: {out:?}");

    // A single file lands as the named remote file.
    t.upload(&src.join("top.txt"), "~/files/renamed.txt")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(s.sshd.home().join("files/renamed.txt")).unwrap(),
        "top\n"
    );

    // Download a folder and a file.
    t.exec("echo new > ~/a/b/code/made-remotely.txt")
        .await
        .unwrap();
    let back = local.path().join("back");
    t.download("~/a/b/code", &back).await.unwrap();
    assert_same_tree(&src, &back);
    assert_eq!(
        std::fs::read_to_string(back.join("made-remotely.txt")).unwrap(),
        "new\n"
    );
    let one = local.path().join("one/file.txt");
    t.download("~/files/renamed.txt", &one).await.unwrap();
    assert_eq!(std::fs::read_to_string(&one).unwrap(), "top\n");

    // A missing remote path is an error that names it.
    let err = t
        .download("~/nope", &local.path().join("x"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(s.sshd.logins(), 1, "transfers reuse the master");
}

#[tokio::test]
async fn upload_and_download_with_rsync() {
    round_trip(true).await;
}

#[tokio::test]
async fn upload_and_download_with_tar() {
    round_trip(false).await;
}

#[tokio::test]
async fn host_key_is_pinned_on_first_use_and_a_changed_key_is_refused() {
    let Some(mut s) = setup() else { return };
    let old = s.sshd.host_key_fingerprint();
    let t = transport(&s, true);
    t.exec("true").await.unwrap();
    let pinned = s.home.known_hosts().join("box-1");
    let pinned_text = std::fs::read_to_string(&pinned).unwrap();
    assert!(pinned_text.contains("ssh-ed25519"), "{pinned_text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&pinned).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The same key again: accepted against the pin.
    s.sshd.restart();
    t.exec("true").await.unwrap();

    s.sshd.regenerate_host_key();
    let new = s.sshd.host_key_fingerprint();
    assert_ne!(old, new);
    // The open master died with the old server; reconnecting meets the new key.
    let err = t.exec("true").await.unwrap_err();
    match &err {
        TransportError::HostKeyChanged {
            machine,
            pinned,
            offered,
        } => {
            assert_eq!(machine, "box-1");
            assert!(pinned.contains(&old), "pinned {pinned} should name {old}");
            assert!(
                offered.contains(&new),
                "offered {offered} should name {new}"
            );
        }
        other => panic!("expected HostKeyChanged, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("box-1") && message.contains(&old) && message.contains(&new));
    // The pin is untouched: refusing never re-pins.
    assert_eq!(std::fs::read_to_string(&pinned).unwrap(), pinned_text);
    // A fresh pool (a restarted controller) refuses too.
    let err = transport(&s, true).exec("true").await.unwrap_err();
    assert!(
        matches!(err, TransportError::HostKeyChanged { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_stopped_host_is_unreachable_and_comes_back() {
    let Some(mut s) = setup() else { return };
    let t = transport(&s, true);
    t.exec("true").await.unwrap();
    s.sshd.stop();
    let err = t.exec("true").await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("box-1"));
    s.sshd.restart();
    let out = t.exec("echo back").await.unwrap();
    assert_eq!(out.stdout, "back\n");
    assert_eq!(s.sshd.logins(), 2, "one new master after the restart");
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_unreachable() {
    let Some(s) = setup() else { return };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut target = target(&s.sshd, "ghost");
    target.port = port;
    let t = pool(&s.home, true).transport(target);
    let err = t.exec("true").await.unwrap_err();
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
    assert!(
        !s.home.known_hosts().join("ghost").exists() || {
            std::fs::read_to_string(s.home.known_hosts().join("ghost"))
                .unwrap()
                .is_empty()
        }
    );
}

async fn next_text(stream: &mut asimov::transport::ByteStream<'_>, want: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(want) {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {want:?}, saw {seen:?}"))
            .expect("stream ended early")
            .expect("stream error");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test]
async fn follow_streams_appended_lines_live() {
    let Some(s) = setup() else { return };
    let t = transport(&s, true);
    t.exec("mkdir -p ~/run && echo first > ~/run/log")
        .await
        .unwrap();
    let mut stream = t.follow("~/run/log").await.unwrap();
    let seen = next_text(&mut stream, "first\n").await;
    assert_eq!(seen, "first\n");
    for i in 0..3 {
        t.exec(&format!("echo line-{i} >> ~/run/log"))
            .await
            .unwrap();
        next_text(&mut stream, &format!("line-{i}\n")).await;
    }
    // Anchored at `tail`: neither the shell running pgrep nor the wrapper matches.
    let running = t
        .exec("pgrep -f \"^tail -c [+]1 -F $HOME/run/log\" || true")
        .await
        .unwrap();
    assert!(
        !running.stdout.trim().is_empty(),
        "remote tail should be running"
    );
    drop(stream);
    // Dropping the stream ends the remote tail.
    let mut gone = false;
    for _ in 0..50 {
        let out = t
            .exec("pgrep -f \"^tail -c [+]1 -F $HOME/run/log\" || true")
            .await
            .unwrap();
        if out.stdout.trim().is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "remote tail still running after the stream was dropped"
    );
}

#[tokio::test]
async fn follow_waits_for_a_file_that_does_not_exist_yet() {
    let Some(s) = setup() else { return };
    let t = transport(&s, true);
    let mut stream = t.follow("~/later.log").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.exec("echo hello > ~/later.log").await.unwrap();
    next_text(&mut stream, "hello\n").await;
}

/// `box-2` reached only through the bastion `gate`, each with its own key.
fn behind_bastion(gate: &Sshd, target_sshd: &Sshd) -> SshTarget {
    SshTarget {
        jump: Some(SshJump {
            host: gate.host().to_string(),
            port: gate.port(),
            user: Some(gate.user().to_string()),
            identity_file: Some(gate.client_key()),
        }),
        ..target(target_sshd, "lab/box-2")
    }
}

#[tokio::test]
async fn a_host_behind_a_jump_host_is_reached_through_it_with_both_keys_pinned() {
    let Some(s) = setup() else { return };
    let gate = &Sshd::start_bastion();
    let inner = Sshd::start();
    let pool = pool(&s.home, true);
    let t = pool.transport(behind_bastion(gate, &inner));
    let out = t.exec("printf '%s' \"$HOME\"").await.unwrap();
    assert_eq!(
        out.stdout,
        inner.home().display().to_string(),
        "ran on the inner host"
    );
    // The bastion forwarded a connection to the inner host's port (its session process
    // writes the line a moment after the command returns)...
    let forwarded = format!("target 127.0.0.1 port {}", inner.port());
    let shows = |log: &str| {
        log.lines()
            .any(|l| l.contains("server_request_direct_tcpip") && l.contains(&forwarded))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !shows(&gate.log()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = gate.log();
    assert!(
        shows(&log),
        "the bastion's log shows the forwarded connection:\n{log}"
    );
    assert_eq!(gate.logins(), 1, "{log}");
    assert_eq!(inner.logins(), 1);
    // ...and each key is pinned in its own file.
    for machine in ["lab/box-2", "lab/box-2.jump"] {
        let pin = std::fs::read_to_string(pool.known_hosts_file(machine)).unwrap_or_default();
        assert!(!pin.trim().is_empty(), "{machine} pinned: {pin:?}");
    }
    // Uploads and downloads ride the same master.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.txt"), "through the gate").unwrap();
    t.upload(&dir.path().join("f.txt"), "~/up/f.txt")
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(inner.home().join("up/f.txt")).unwrap(),
        "through the gate"
    );
    assert_eq!(gate.logins(), 1);
    assert_eq!(inner.logins(), 1);
}

#[tokio::test]
async fn a_changed_jump_host_key_is_refused_naming_the_jump_host() {
    let Some(mut s) = setup() else { return };
    let inner = Sshd::start();
    let home = s.home.clone();
    {
        let t = pool(&home, true).transport(behind_bastion(&s.sshd, &inner));
        t.exec("true").await.unwrap();
    }
    let pinned = s.sshd.host_key_fingerprint();
    s.sshd.regenerate_host_key();
    let offered = s.sshd.host_key_fingerprint();
    let t = pool(&home, true).transport(behind_bastion(&s.sshd, &inner));
    let e = t
        .exec("true")
        .await
        .expect_err("a changed bastion key is refused");
    let text = e.to_string();
    assert!(matches!(e, TransportError::HostKeyChanged { .. }), "{text}");
    assert!(text.contains("jump host"), "{text}");
    assert!(text.contains(&pinned) && text.contains(&offered), "{text}");
}
