//! What asimov keeps in `$ASIMOV_HOME` and what it lets out of it, through the real
//! binary on the `local` provider: the home is never uploaded (even from inside the
//! job's working folder), uploads have a limit, the home and its files are private,
//! logs are capped and streamed, a process that escapes its run does not outlive
//! `delete`, and the CLI's exit codes and log files are what the README says.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::cli::Asimov;

/// A working folder with `$ASIMOV_HOME` inside it (the default `~/.asimov` with
/// `workdir: ~`), driven through the real binary.
struct Nested {
    dir: tempfile::TempDir,
}

impl Nested {
    fn new() -> Nested {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("train.sh"), "echo training\n").unwrap();
        Nested { dir }
    }

    fn work(&self) -> &Path {
        self.dir.path()
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join(".asimov")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_asimov"));
        cmd.env("ASIMOV_HOME", self.home())
            .env("ASIMOV_NO_TMUX", "1")
            .env_remove("ASIMOV_FAILPOINT")
            .env_remove("ASIMOV_MAX_UPLOAD")
            .current_dir(self.work());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "asimov {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn secret(&self, name: &str, value: &str) {
        let mut child = self
            .command()
            .args(["secret", "set", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(value.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }

    fn controller_log(&self) -> String {
        std::fs::read_to_string(self.home().join("controller.log")).unwrap_or_default()
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        stop_controller(&self.home());
        kill_marked(&self.home());
    }
}

fn stop_controller(home: &Path) {
    if let Ok(pid) = std::fs::read_to_string(home.join("controller.pid"))
        && let Ok(pid) = pid.trim().parse::<i32>()
        && pid > 1
    {
        // SAFETY: signalling a process by pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills every process whose working folder or environment is under `home`.
fn kill_marked(home: &Path) {
    for pid in processes_under(home) {
        // SAFETY: signalling a process by pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Processes whose current folder is under `dir`, or whose environment names it.
fn processes_under(dir: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cwd = std::fs::read_link(entry.path().join("cwd")).ok();
        let in_dir = cwd.is_some_and(|c| c.starts_with(dir));
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let named = environ
            .split(|b| *b == 0)
            .any(|kv| kv.windows(needle.len()).any(|w| w == needle));
        if in_dir || named {
            pids.push(pid);
        }
    }
    pids
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn job(name: &str, extra: &str, run: &str) -> String {
    format!(
        "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n{extra}  run: |\n{}\n",
        run.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

/// Item 1: a home inside the working folder (a git work tree or a plain folder) is never
/// uploaded: no stored secret reaches the run, no upload recurses into itself.
#[test]
fn the_home_is_never_uploaded_even_from_inside_the_working_folder() {
    for git in [false, true] {
        let n = Nested::new();
        if git {
            for args in [&["init", "-q", "-b", "main"][..], &["add", "."]] {
                assert!(
                    Command::new("git")
                        .args(args)
                        .current_dir(n.work())
                        .status()
                        .unwrap()
                        .success()
                );
            }
        }
        n.secret("UNLISTED_TOKEN", "hunter2-never-uploaded");
        let text = job(
            "nested",
            "  source: {workdir: .}\n",
            "sh train.sh\nfind . | sort\ngrep -r 'hunter[2]' . && echo LEAKED; true",
        );
        std::fs::write(n.work().join("job.yaml"), &text).unwrap();
        n.ok(&["apply", "-f", "job.yaml", "--wait"]);
        let log = n.ok(&["logs", "nested-0"]);
        assert!(log.contains("training"), "{log}");
        assert!(log.contains("./train.sh"), "{log}");
        assert!(!log.contains(".asimov"), "the home was uploaded (git: {git}):\n{log}");
        assert!(!log.contains("LEAKED"), "{log}");
        let copies = all_files(&n.home())
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|f| f == "UNLISTED_TOKEN"))
            .count();
        assert_eq!(copies, 1, "the secret exists once, in credentials/");
        n.ok(&["delete", "job", "nested"]);
    }
}

/// Item 1: a working folder over the upload limit fails the start at once with a clear
/// error naming the limit and how to raise it, and nothing is copied.
#[test]
fn an_upload_over_the_limit_fails_fast_and_says_how_to_raise_it() {
    let n = Nested::new();
    std::fs::write(n.work().join("data.bin"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(
        n.work().join("job.yaml"),
        job("huge", "  source: {workdir: .}\n", "sh train.sh"),
    )
    .unwrap();
    let out = n
        .command()
        .env("ASIMOV_MAX_UPLOAD", "1MB")
        .args(["apply", "-f", "job.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let started = Instant::now();
    wait_for("the upload error", Duration::from_secs(20), || {
        n.controller_log().contains("ASIMOV_MAX_UPLOAD")
    });
    assert!(started.elapsed() < Duration::from_secs(20));
    let log = n.controller_log();
    assert!(log.contains("more than 976.6 KiB"), "{log}");
    let staged = all_files(&n.home().join("local"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|f| f == "data.bin"))
        .count();
    assert_eq!(staged, 0, "nothing of the oversized folder was copied");
    let runs = n.ok(&["get", "runs", "-o", "json"]);
    assert!(!runs.contains("\"Running\""), "{runs}");
    n.ok(&["delete", "job", "huge"]);
}
