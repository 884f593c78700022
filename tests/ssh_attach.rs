//! `asimov ssh RUN` and `asimov attach RUN` through a real pseudo-terminal, like a user at
//! a keyboard: on the `local` provider (the agent in tmux on this machine) and on a fleet
//! host behind a real sshd (through the controller's pinned host key and key). The shell
//! opens in the job's working folder with its env; the attached tmux session shows the
//! job's output live; exiting the shell and detaching (Ctrl-b d) leave the run running.

mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use rexpect::process::WaitStatus;
use rexpect::reader::Options;
use rexpect::session::{PtySession, spawn_with_options};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::cli::Asimov;
use support::sshd::Sshd;

/// A job that ticks for at most five minutes, with an env value the shell must see.
fn job_yaml(placement: &str) -> String {
    format!(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: tick}}\nspec:\n  \
         source: {{workdir: .}}\n  env: {{GREETING: hello-from-env}}\n  \
         run: 'i=0; while [ $i -lt 600 ]; do echo tick-$i; i=$((i+1)); sleep 0.5; done'\n  \
         placement: [{placement}]\n"
    )
}

/// A private tmux server folder for the local provider's agent and `attach` alike;
/// its server is ended on drop, also when the test fails.
struct TmuxDir(tempfile::TempDir);

impl TmuxDir {
    fn new() -> TmuxDir {
        TmuxDir(tempfile::tempdir().expect("tmux dir"))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TmuxDir {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("kill-server")
            .env("TMUX_TMPDIR", self.0.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A foreground controller whose local runs use tmux (the harness turns it off by
/// default), with its own tmux server.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        support::cli::kill9(&mut self.0);
    }
}

fn controller_with_tmux(a: &Asimov, tmux: &TmuxDir) -> Controller {
    let stderr = std::fs::File::create(a.controller_stderr()).expect("controller stderr");
    let child = a
        .command()
        .env_remove("ASIMOV_NO_TMUX")
        .env("TMUX_TMPDIR", tmux.path())
        .arg("controller")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("controller starts");
    a.wait_for("the controller", Duration::from_secs(20), || {
        a.controller_running()
    });
    Controller(child)
}

/// What every command of a test is run with: the home, the tmux server of a local run,
/// a cloud test server's address.
struct Ctx<'a> {
    a: &'a Asimov,
    tmux: Option<&'a TmuxDir>,
    env: Vec<(&'static str, String)>,
}

impl Ctx<'_> {
    fn command(&self) -> Command {
        let mut cmd = self.a.command();
        if let Some(tmux) = self.tmux {
            cmd.env("TMUX_TMPDIR", tmux.path());
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&self, args: &[&str]) -> PtySession {
        let mut cmd = self.command();
        cmd.args(args)
            .env("TERM", "xterm")
            .env("SHELL", "/bin/sh")
            .env("COLUMNS", "100")
            .env("LINES", "30");
        spawn_with_options(
            cmd,
            Options::new()
                .timeout_ms(Some(60_000))
                .strip_ansi_escape_codes(true),
        )
        .expect("asimov starts in a pty")
    }

    /// The highest `tick-N` in the run's log so far.
    fn last_tick(&self, run: &str) -> Option<u32> {
        let out = self.command().args(["logs", run]).output().unwrap();
        if !out.status.success() {
            eprintln!("logs {run}: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("tick-")?.trim().parse().ok())
            .max()
    }
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

/// Ctrl-b, then d, one key at a time as a person types them (sent in one write over ssh,
/// tmux did not take them as the prefix and d here), until tmux says it detached.
fn detach(p: &mut PtySession) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    while Instant::now() < deadline {
        keys(p, "\x02");
        std::thread::sleep(Duration::from_millis(300));
        keys(p, "d");
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            match p.try_read() {
                Some(c) => seen.push(c),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
            if seen.contains("detached") {
                return;
            }
        }
    }
    panic!("Ctrl-b d did not detach; the screen: {seen}");
}

/// Shell, then attach, then the run still running and still writing.
fn shell_and_attach(ctx: &Ctx, work_suffix: &str) {
    let a = ctx.a;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(a.run_phase("tick-0").as_deref() == Some("Running")
        && ctx.last_tick("tick-0").is_some())
    {
        if Instant::now() > deadline {
            let describe = ctx
                .command()
                .args(["describe", "run", "tick-0"])
                .output()
                .unwrap();
            panic!(
                "tick-0 did not run within 2 minutes:\n{}\n--- controller.log\n{}",
                String::from_utf8_lossy(&describe.stdout),
                std::fs::read_to_string(a.home().join("controller.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut p = ctx.spawn(&["ssh", "tick-0"]);
    p.exp_string("a shell on the machine of tick-0").unwrap();
    p.send_line("echo \"at $PWD with $GREETING run $ASIMOV_RUN $((6*7))\"")
        .unwrap();
    p.exp_string(&format!("{work_suffix} with hello-from-env run tick-0 42"))
        .unwrap();
    p.send_line("exit").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(a.run_phase("tick-0").as_deref(), Some("Running"));

    let mut p = ctx.spawn(&["attach", "tick-0"]);
    p.exp_string("attaching to the tmux session of tick-0")
        .unwrap();
    // The pane shows the job's output as it is written: a tick newer than any the log
    // had when we attached.
    let before = ctx.last_tick("tick-0").unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, tick) = p.exp_regex(r"tick-[0-9]+").unwrap();
        let n: u32 = tick["tick-".len()..].parse().unwrap();
        if n > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new tick in the pane after {before}"
        );
    }
    // Typed keys do not reach the job's terminal (read-only); Ctrl-b d detaches.
    keys(&mut p, "\x03");
    detach(&mut p);
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);

    // The run goes on, still writing.
    let at_detach = ctx.last_tick("tick-0").unwrap_or(0);
    a.wait_for(
        "the run to tick on after detaching",
        Duration::from_secs(60),
        || ctx.last_tick("tick-0").is_some_and(|n| n > at_detach + 2),
    );
    assert_eq!(a.run_phase("tick-0").as_deref(), Some("Running"));
}

#[test]
fn ssh_and_attach_on_the_local_provider() {
    let a = Asimov::new();
    let tmux = TmuxDir::new();
    let _controller = controller_with_tmux(&a, &tmux);
    let job = a.manifest("tick.yaml", &job_yaml("{provider: local}"));
    a.ok(&["apply", "-f", job.to_str().unwrap()]);
    let ctx = Ctx {
        a: &a,
        tmux: Some(&tmux),
        env: Vec::new(),
    };
    shell_and_attach(&ctx, "/work");
    a.ok(&["delete", "job", "tick"]);
    // Ended runs say so instead of opening anything.
    let out = a.run(&["attach", "tick-0"]);
    assert!(!out.status.success());
}

#[test]
fn ssh_and_attach_on_a_fleet_host() {
    let Some(host) = Sshd::start_or_skip() else {
        return;
    };
    let a = Asimov::new();
    let fleet = a.manifest(
        "fleet.yaml",
        &format!(
            "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {{name: lab}}\nspec:\n  hosts:\n    \
             - {{name: box-1, user: {}, address: {}, port: {}, identity_file: {}, gpus: 0}}\n",
            host.user(),
            host.host(),
            host.port(),
            host.client_key().display()
        ),
    );
    let job = a.manifest("tick.yaml", &job_yaml("{provider: ssh, fleet: lab}"));
    a.ok(&[
        "apply",
        "-f",
        fleet.to_str().unwrap(),
        job.to_str().unwrap(),
    ]);
    let logins_before = host.logins();
    let ctx = Ctx {
        a: &a,
        tmux: None,
        env: Vec::new(),
    };
    shell_and_attach(&ctx, "/work");
    assert!(
        host.logins() > logins_before,
        "the sessions went through the fleet's sshd"
    );
    a.ok(&["delete", "job", "tick"]);
}

/// A cloud instance: the Vast test server rents it, its SSH lands on a real sshd with
/// the key asimov registered; `ssh` and `attach` ride asimov's own connection to it.
#[test]
fn ssh_and_attach_on_a_vast_instance() {
    use vast_server::{Config, SshTarget, VastServer, offer};
    let Some(sshd) = Sshd::start_or_skip() else {
        return;
    };
    let server = VastServer::start(
        Config {
            ssh: Some(SshTarget {
                host: sshd.host().to_string(),
                port: sshd.port(),
                authorized_keys: sshd.dir().join("authorized_keys"),
            }),
            ..Config::default()
        },
        vec![offer(301, "RTX 4090", 1, 24.0, 0.35)],
    );
    let a = Asimov::new();
    let ctx = Ctx {
        a: &a,
        tmux: None,
        env: vec![
            ("ASIMOV_VAST_API_URL", server.url()),
            ("ASIMOV_VAST_PACING", "0".to_string()),
        ],
    };
    let mut set = ctx
        .command()
        .args(["secret", "set", "VAST_API_KEY"])
        .env_remove("VAST_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        set.stdin
            .take()
            .unwrap()
            .write_all(vast_server::API_KEY.as_bytes())
            .unwrap();
    }
    assert!(set.wait().unwrap().success());
    let job = a.manifest(
        "tick.yaml",
        &format!(
            "{}  resources: {{gpu: {{name: RTX_4090, count: 1}}}}\n  \
             image: pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime\n",
            job_yaml(&format!("{{provider: vast, ssh_user: {}}}", sshd.user()))
        ),
    );
    let out = ctx
        .command()
        .args(["apply", "-f", job.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shell_and_attach(&ctx, "/work");
    let out = ctx
        .command()
        .args(["delete", "job", "tick"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        server.live_instances().iter().all(|i| i.destroyed),
        "{:?}",
        server.instances()
    );
}

#[test]
fn without_a_terminal_ssh_and_attach_say_what_to_use() {
    let a = Asimov::new();
    for verb in ["ssh", "attach"] {
        let out = a.run(&[verb, "nope-0"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("needs a terminal") && err.contains("asimov logs"),
            "{err}"
        );
    }
}
