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
            for args in [
                &["init", "-q", "-b", "main"][..],
                &["add", "."],
                &["commit", "-q", "-m", "first"],
            ] {
                assert!(
                    Command::new("git")
                        .args(args)
                        .current_dir(n.work())
                        .env("GIT_AUTHOR_NAME", "A")
                        .env("GIT_AUTHOR_EMAIL", "a@example.com")
                        .env("GIT_COMMITTER_NAME", "A")
                        .env("GIT_COMMITTER_EMAIL", "a@example.com")
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
        assert!(
            !log.contains(".asimov"),
            "the home was uploaded (git: {git}):\n{log}"
        );
        assert!(!log.contains("LEAKED"), "{log}");
        let copies = all_files(&n.home())
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|f| f == "UNLISTED_TOKEN"))
            .count();
        assert_eq!(copies, 1, "the secret exists once, in credentials/");
        // Nor is the home recorded in the run's diff (untracked files of a work tree).
        let described = n.ok(&["describe", "run", "nested-0"]);
        assert!(!described.contains("hunter2"), "{described}");
        assert!(!described.contains("UNLISTED_TOKEN"), "{described}");
        if git {
            assert!(
                described.contains("job.yaml"),
                "the diff is recorded: {described}"
            );
        }
        // The upload's size report: train.sh and job.yaml (plus nothing of the home).
        let report = n.controller_log();
        let line = report
            .lines()
            .find(|l| l.contains("uploading working folder"))
            .unwrap_or_else(|| panic!("no upload report in:\n{report}"));
        assert!(line.contains("files=2") && line.contains("size="), "{line}");
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
    assert!(log.contains("over the upload limit of 976.6 KiB"), "{log}");
    assert!(log.contains("largest data.bin at 3.0 MiB"), "{log}");
    let staged = all_files(&n.home().join("local"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|f| f == "data.bin"))
        .count();
    assert_eq!(staged, 0, "nothing of the oversized folder was copied");
    let runs = n.ok(&["get", "runs", "-o", "json"]);
    assert!(!runs.contains("\"Running\""), "{runs}");
    n.ok(&["delete", "job", "huge"]);
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Runs the binary as a shell with `umask 022` would.
fn with_umask_022(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    cmd
}

fn ok_022(a: &Asimov, args: &[&str]) -> String {
    let mut cmd = with_umask_022(a.command());
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "asimov {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Item 2: under umask 022 the home is 0700 and what asimov writes in it is private
/// (the store with its -wal and -shm, controller.log, logs, instance folders and their
/// logs), while the job itself keeps the user's umask; a home left open by an older
/// asimov is tightened when asimov next opens it.
#[test]
fn the_home_and_its_files_are_private_under_umask_022() {
    let a = Asimov::new();
    let file = a.manifest(
        "private.yaml",
        &job(
            "private",
            "  source: {workdir: .}\n",
            "echo umask=$(umask)\ntouch made-by-job\nls -l made-by-job\nsleep 600",
        ),
    );
    ok_022(&a, &["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("private-0 to run", Duration::from_secs(30), || {
        a.run_phase("private-0").as_deref() == Some("Running")
    });
    let home = a.home();
    let instance = home.join("local").join(&a.local_instances()[0]);
    a.wait_for("the job's first lines", Duration::from_secs(10), || {
        std::fs::read_to_string(instance.join("log")).is_ok_and(|l| l.contains("made-by-job"))
    });
    let log = ok_022(&a, &["logs", "private-0"]);
    assert!(
        log.contains("umask=0022"),
        "the job keeps the user's umask: {log}"
    );
    assert!(log.contains("-rw-r--r--"), "{log}");
    assert_eq!(mode(home), 0o700);
    let mut checked = 0;
    for path in [
        home.join("state.db"),
        home.join("state.db-wal"),
        home.join("state.db-shm"),
        home.join("controller.log"),
        home.join("controller.pid"),
        home.join("logs"),
        home.join("local"),
        home.join("artifacts"),
        home.join("manifests"),
        home.join("manifests/job.private.yaml"),
        instance.clone(),
        instance.join("log"),
        instance.join("status"),
        instance.join("spec"),
        instance.join("spec/run.sh"),
    ] {
        if path.exists() {
            assert_eq!(
                mode(&path) & 0o077,
                0,
                "{} is {:o}",
                path.display(),
                mode(&path)
            );
            checked += 1;
        }
    }
    assert!(checked >= 13, "{checked}");

    a.ok(&["delete", "job", "private"]);
    // An older asimov left the home open; the next command closes it.
    for (path, m) in [
        (home.to_path_buf(), 0o755),
        (home.join("state.db"), 0o644),
        (home.join("controller.log"), 0o644),
        (home.join("logs"), 0o755),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
    }
    std::fs::write(home.join("logs/old-0.log"), "old").unwrap();
    std::fs::set_permissions(
        home.join("logs/old-0.log"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    ok_022(&a, &["get", "runs"]);
    for path in [
        home.to_path_buf(),
        home.join("state.db"),
        home.join("controller.log"),
        home.join("logs"),
        home.join("logs/old-0.log"),
    ] {
        assert_eq!(
            mode(&path) & 0o077,
            0,
            "{} is {:o}",
            path.display(),
            mode(&path)
        );
    }
}

/// Runs `asimov args` with stdout to /dev/null; returns its exit status and peak RSS in
/// KiB (from wait4).
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives the rusage
fn peak_rss(a: &Asimov, args: &[&str]) -> (i32, i64) {
    let child = a
        .command()
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid out-pointers.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(rc, child.id() as i32);
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

/// Item 3: a job printing 60 MB stores at most the documented 16 MiB (the newest
/// output, behind a line saying the rest was dropped), and `logs` streams a kept log
/// instead of loading it (a 100 MB log in well under 100 MB of memory).
#[test]
fn logs_are_capped_at_16_mib_keeping_the_tail_and_streamed() {
    const CAP: u64 = 16 << 20;
    let a = Asimov::new();
    let file = a.manifest(
        "loud.yaml",
        &job(
            "loud",
            "",
            "yes 'a line of output from a chatty training job' | head -c 60000000\necho LAST-LINE",
        ),
    );
    a.ok(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    let kept = a.home().join("logs/loud-0.log");
    let size = std::fs::metadata(&kept).unwrap().len();
    assert!(size <= CAP + 4096, "kept log is {size} bytes");
    let log = a.ok(&["logs", "loud-0"]);
    assert!(
        log.ends_with("LAST-LINE\n"),
        "{}",
        &log[log.len().saturating_sub(200)..]
    );
    assert!(
        log.starts_with("[asimov: the log passed 16777216 bytes"),
        "{}",
        &log[..200]
    );

    drop(log);
    // A kept log bigger than any cap (an older asimov's) still prints in bounded memory:
    // measured against the same command on the capped log (wait4's peak RSS counts
    // what the child shared with this test before it exec'd).
    let (status, base_kib) = peak_rss(&a, &["logs", "loud-0"]);
    assert_eq!(status, 0);
    let big = std::fs::OpenOptions::new().write(true).open(&kept).unwrap();
    big.set_len(100_000_000).unwrap();
    drop(big);
    let (status, rss_kib) = peak_rss(&a, &["logs", "loud-0"]);
    assert_eq!(status, 0);
    assert!(
        rss_kib < base_kib + 20_000,
        "logs used {rss_kib} KiB for a 100 MB log, {base_kib} KiB for a 16 MiB one"
    );
    a.ok(&["delete", "job", "loud"]);
}

/// Item 17: the background controller's log has no colour codes.
#[test]
fn controller_log_has_no_colour_codes() {
    let a = Asimov::new();
    let file = a.manifest("quiet.yaml", &job("quiet", "", "echo hi"));
    a.ok(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    let log = std::fs::read_to_string(a.home().join("controller.log")).unwrap();
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in controller.log:\n{log:?}"
    );
    a.ok(&["delete", "job", "quiet"]);
}

/// Item 19: argument errors exit 1 like every other failure; help and version exit 0.
#[test]
fn argument_errors_exit_1() {
    let a = Asimov::new();
    for args in [
        &["--no-such-flag"][..],
        &["get"],
        &["get", "nonsense"],
        &["apply"],
        &["logs"],
        &["frobnicate"],
    ] {
        let out = a.run(args);
        assert_eq!(out.status.code(), Some(1), "asimov {args:?}");
        assert!(!out.stderr.is_empty(), "asimov {args:?} says why");
    }
    for args in [&["--help"][..], &["--version"], &["get", "--help"]] {
        let out = a.run(args);
        assert_eq!(out.status.code(), Some(0), "asimov {args:?}");
        assert!(!out.stdout.is_empty());
    }
}

/// Pids of live processes whose command line is exactly `args`.
fn pids_running(args: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        if !zombie && std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| c == want) {
            pids.push(pid);
        }
    }
    pids
}

/// Item 14: processes that escape their run (a new session and an empty environment;
/// or that and another folder and closed files, with a living parent) do not survive
/// `delete`.
#[test]
fn processes_that_escape_their_run_do_not_survive_delete() {
    let a = Asimov::new();
    // Odd durations name these processes on this machine.
    let file = a.manifest(
        "escape.yaml",
        &job(
            "escape",
            "",
            "setsid env -i sleep 3141 &\n\
             (cd / && exec setsid env -i sh -c 'sleep 2718; true' </dev/null >/dev/null 2>&1) &\n\
             echo escaped\nsleep 600",
        ),
    );
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("both escapes", Duration::from_secs(30), || {
        !pids_running(&["sleep", "3141"]).is_empty() && !pids_running(&["sleep", "2718"]).is_empty()
    });
    let escaped = [
        pids_running(&["sleep", "3141"]),
        pids_running(&["sleep", "2718"]),
    ]
    .concat();
    let out = a.run(&["delete", "job", "escape"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("destroyed"), "{said}");
    let alive: Vec<i32> = escaped
        .iter()
        .copied()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
        })
        .collect();
    for pid in &alive {
        // SAFETY: cleaning up what the test started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    assert!(
        alive.is_empty(),
        "escaped processes {alive:?} survived delete"
    );
    assert!(a.local_instances().is_empty());
}

/// The sweep of escaped processes spares readers: a process outside the run that only
/// reads its log (`tail -f`, `asimov logs -f` from a script, no terminal) outlives the
/// teardown. Before, holding the log open at all was enough to be SIGKILLed with the run.
#[test]
fn a_reader_of_a_runs_log_survives_its_delete() {
    let a = Asimov::new();
    let file = a.manifest("watched.yaml", &job("watched", "", "echo hi\nsleep 600"));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("watched-0 to run", Duration::from_secs(30), || {
        a.run_phase("watched-0").as_deref() == Some("Running")
    });
    let log = a
        .home()
        .join("local")
        .join(&a.local_instances()[0])
        .join("log");
    // setsid: no controlling terminal, like a daemon or a CI job.
    let mut reader = std::process::Command::new("setsid")
        .args(["tail", "-f"])
        .arg(&log)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.ok(&["delete", "job", "watched"]);
    let still_running = reader.try_wait().unwrap().is_none();
    let _ = reader.kill();
    let _ = reader.wait();
    assert!(still_running, "a reader of the log was killed with the run");
}

/// Item 3 with issue 6: `logs` of a live local run (whole, and `-f` until the run ends)
/// goes through the run's machine like the controller's reads, bytes intact.
#[test]
fn logs_of_a_live_local_run_print_and_follow_it() {
    let a = Asimov::new();
    let file = a.manifest(
        "live.yaml",
        &job(
            "live",
            "",
            "printf 'caf\\351 first\\n'\nwhile [ ! -e go ]; do sleep 0.1; done\necho second\nsleep 1\necho END",
        ),
    );
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_for("live-0 to run", Duration::from_secs(30), || {
        a.run_phase("live-0").as_deref() == Some("Running")
    });
    let instance = a.home().join("local").join(&a.local_instances()[0]);
    a.wait_for("the first line", Duration::from_secs(10), || {
        std::fs::read(instance.join("log")).is_ok_and(|l| l.ends_with(b"first\n"))
    });
    let now = a.run(&["logs", "live-0"]);
    assert!(now.status.success());
    assert_eq!(now.stdout, b"caf\xe9 first\n", "the bytes as written");

    let follower = a
        .command()
        .args(["logs", "live-0", "-f"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(instance.join("work/go"), "").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(follower.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("logs -f ends when the run does")
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"caf\xe9 first\nsecond\nEND\n");
    a.ok(&["delete", "job", "live"]);
}
