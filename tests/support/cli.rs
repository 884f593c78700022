//! Drives the real `asimov` binary against a throwaway `$ASIMOV_HOME`, the way a user
//! (or a crash) would: separate processes, a real SQLite file, real local instances.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Asimov {
    pub home: tempfile::TempDir,
    /// A git work tree holding the test's manifests and the job's source.
    pub repo: tempfile::TempDir,
}

impl Default for Asimov {
    fn default() -> Self {
        Self::new()
    }
}

impl Asimov {
    pub fn new() -> Asimov {
        let asimov = Asimov {
            home: tempfile::tempdir().expect("temp home"),
            repo: tempfile::tempdir().expect("temp repo"),
        };
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .args(args)
                .current_dir(asimov.repo.path())
                .env("GIT_AUTHOR_NAME", "Ada Lovelace")
                .env("GIT_AUTHOR_EMAIL", "ada@example.com")
                .env("GIT_COMMITTER_NAME", "Ada Lovelace")
                .env("GIT_COMMITTER_EMAIL", "ada@example.com")
                .output()
                .expect("git runs")
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q", "-b", "main"]);
        std::fs::write(asimov.repo.path().join("train.sh"), "echo training\n").unwrap();
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "first experiment"]);
        asimov
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_asimov"));
        cmd.env("ASIMOV_HOME", self.home.path())
            .env("ASIMOV_NO_TMUX", "1")
            .env_remove("ASIMOV_FAILPOINT")
            .current_dir(self.repo.path());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("asimov runs")
    }

    /// Runs and insists on success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "asimov {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a manifest into the repo and returns its path.
    pub fn manifest(&self, name: &str, text: &str) -> PathBuf {
        let path = self.repo.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A foreground controller (`asimov controller`) as a child process.
    pub fn spawn_controller(&self, failpoint: Option<&str>) -> Child {
        let mut cmd = self.command();
        if let Some(fp) = failpoint {
            cmd.env("ASIMOV_FAILPOINT", fp);
        }
        self.start_controller(cmd)
    }

    /// `cmd` (this home's `asimov`, with whatever a test set on it) run as a foreground
    /// controller; returns once it holds the lock, so an `apply` starts no other.
    pub fn start_controller(&self, mut cmd: Command) -> Child {
        // Its diagnostics go to a file, not a pipe: a pipe nobody reads fills after
        // 64 KiB and then blocks the controller in the middle of a pass.
        use std::os::unix::fs::OpenOptionsExt;
        let stderr = std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .append(true)
            .open(self.controller_stderr())
            .expect("controller stderr file");
        cmd.args(["controller"])
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().expect("controller starts");
        self.wait_for(
            "the controller to hold its lock",
            Duration::from_secs(10),
            || self.controller_running(),
        );
        child
    }

    /// Where the controllers started by `spawn_controller` write their diagnostics.
    pub fn controller_stderr(&self) -> std::path::PathBuf {
        self.home.path().join("test-controller.stderr")
    }

    pub fn controller_running(&self) -> bool {
        let lock = self.home.path().join("controller.lock");
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(lock)
        else {
            return false;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        rc != 0
    }

    /// True when a live controller holds the lock, false once the lock is free. A
    /// controller just killed can leave its lock held a moment longer (a child it was
    /// spawning holds a copy of the descriptor until it execs; seen in CI under load),
    /// so a lock whose `controller.pid` names a dead process is waited out.
    pub fn live_controller(&self) -> bool {
        let start = std::time::Instant::now();
        loop {
            if !self.controller_running() {
                return false;
            }
            let pid = std::fs::read_to_string(self.home.path().join("controller.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            let alive = pid.is_some_and(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    // The state follows the command name, which may hold spaces.
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
                })
            });
            if alive {
                return true;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the lock of a dead controller (pid {pid:?}) is still held after 30s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of the background controller's log and of the foreground
    /// controllers' stderr, for a failure's message.
    pub fn controller_logs(&self, lines: usize) -> String {
        let tail = |path: std::path::PathBuf| {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            format!(
                "--- {} (last {lines} lines)\n{}",
                path.display(),
                all[from..].join("\n")
            )
        };
        format!(
            "{}\n{}",
            tail(self.home.path().join("controller.log")),
            tail(self.controller_stderr())
        )
    }

    pub fn runs_json(&self) -> serde_json::Value {
        let text = self.ok(&["get", "runs", "-o", "json"]);
        serde_json::from_str(&text).expect("get runs -o json is JSON")
    }

    pub fn run_phase(&self, run: &str) -> Option<String> {
        self.runs_json()["items"]
            .as_array()?
            .iter()
            .find(|r| r["name"] == run)
            .map(|r| r["phase"].as_str().unwrap_or_default().to_string())
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Local instance folders, by name (ownership tags).
    pub fn local_instances(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.home.path().join("local"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Processes of this home's jobs still alive (found by their environment).
    pub fn job_processes(&self) -> Vec<u32> {
        let needle = format!("ASIMOV_ROOT={}", self.home.path().join("local").display());
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ
                .split(|b| *b == 0)
                .any(|kv| kv.starts_with(needle.as_bytes()))
            {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Asimov {
    fn drop(&mut self) {
        // Stop any controller of this home, then whatever its jobs left running.
        let pid = std::fs::read_to_string(self.home.path().join("controller.pid"));
        if let Ok(pid) = pid
            && let Ok(pid) = pid.trim().parse::<i32>()
            && self.controller_running()
        {
            // SAFETY: signalling a process by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for pid in self.job_processes() {
            // SAFETY: signalling a process by pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Kills a child with SIGKILL and reaps it.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Asimov {
    /// `asimov secret set NAME` with `value` on stdin (never on the command line).
    pub fn set_secret(&self, name: &str, value: &str) {
        use std::io::Write;
        let mut set = self
            .command()
            .args(["secret", "set", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("asimov secret set runs");
        set.stdin
            .take()
            .expect("stdin piped")
            .write_all(value.as_bytes())
            .expect("secret written");
        assert!(set.wait().expect("asimov secret set ends").success());
    }

    /// The first run's attempt number (0 before any).
    pub fn attempt(&self) -> u64 {
        self.runs_json()["items"][0]["attempt"]
            .as_u64()
            .unwrap_or(0)
    }
}

/// A test world of one cloud's test server and this home: the binary pointed at the
/// server, and what to show when a wait times out. The waits and commands the cloud
/// tests share come with it.
pub trait Cloud {
    fn asimov(&self) -> &Asimov;

    /// `asimov` with the server's URL, pacing and key set for this cloud.
    fn command(&self) -> Command;

    /// What the server and the runs look like, for a failed wait.
    fn state(&self) -> String;

    /// `apply -f JOB`, which must succeed.
    fn apply(&self, job: &Path) {
        let out = self
            .command()
            .args(["apply", "-f", &job.to_string_lossy()])
            .output()
            .expect("asimov apply runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A foreground controller with `env` added (it holds the lock, so `apply` starts
    /// none).
    fn spawn_controller_with(&self, env: &[(&str, &str)]) -> Child {
        let mut cmd = self.command();
        cmd.envs(env.iter().copied());
        self.asimov().start_controller(cmd)
    }

    fn spawn_controller(&self) -> Child {
        self.spawn_controller_with(&[])
    }

    /// Waits up to `secs` for `done`, showing `state` when it never comes.
    fn until(&self, what: &str, secs: u64, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}: {}",
                self.state()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn attempt(&self) -> u64 {
        self.asimov().attempt()
    }
}
