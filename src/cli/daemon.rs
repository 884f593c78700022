//! One controller per `$ASIMOV_HOME`, guarded by an exclusive `flock` on
//! `controller.lock` that the controller holds for its whole life. `apply` starts a
//! background controller when the lock is free, so a single command is enough.

use crate::home::Home;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Held by the running controller; released when dropped or when the process dies.
#[derive(Debug)]
pub struct ControllerLock {
    _file: File,
}

fn open_lock(home: &Home) -> io::Result<File> {
    std::fs::create_dir_all(home.root())?;
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(home.controller_lock())
}

fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a file descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

impl ControllerLock {
    /// Takes the lock, or `None` when another controller holds it.
    pub fn try_acquire(home: &Home) -> io::Result<Option<ControllerLock>> {
        let file = open_lock(home)?;
        if !flock(&file, libc::LOCK_EX)? {
            return Ok(None);
        }
        std::fs::write(home.controller_pid(), std::process::id().to_string())?;
        Ok(Some(ControllerLock { _file: file }))
    }
}

/// Environment variables a background controller keeps from the shell that started it.
fn inherited(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    matches!(
        name,
        "PATH"
            | "HOME"
            | "USER"
            | "LOGNAME"
            | "SHELL"
            | "LANG"
            | "TZ"
            | "TMPDIR"
            | "TMUX_TMPDIR"
            | "SSH_AUTH_SOCK"
    ) || name.starts_with("LC_")
        || name.starts_with("ASIMOV_")
}

/// True when a controller holds this home's lock.
pub fn is_running(home: &Home) -> io::Result<bool> {
    let file = open_lock(home)?;
    // A shared lock is refused exactly while someone holds the exclusive one.
    Ok(!flock(&file, libc::LOCK_SH)?)
}

/// The pid the running controller wrote, if any.
pub fn running_pid(home: &Home) -> Option<u32> {
    if !is_running(home).ok()? {
        return None;
    }
    std::fs::read_to_string(home.controller_pid())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Starts a background controller for `home` unless one runs. Returns true when it
/// started one.
pub fn ensure_running(home: &Home) -> io::Result<bool> {
    if is_running(home)? {
        if !runs_other_binary(home) {
            return Ok(false);
        }
        // An upgraded asimov must not leave the old controller in charge.
        replace_outdated(home)?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.controller_log())?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    // A long-lived daemon must not carry whatever the user's shell exported (API keys,
    // tokens): it gets only what it needs, and reads secrets from the 0600 store.
    cmd.env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| inherited(k)))
        .args(["controller", "--background"])
        .env("ASIMOV_HOME", home.root())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child leaves our session so a closed
    // terminal or a Ctrl-C on `apply` does not reach the controller.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if is_running(home)? {
            return Ok(true);
        }
        if let Some(status) = child.try_wait()? {
            // Lost a race with another starter, which now holds the lock: fine.
            if is_running(home)? {
                return Ok(false);
            }
            return Err(io::Error::other(format!(
                "the background controller exited at once ({status}); see {}",
                home.controller_log().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::other(format!(
        "the background controller did not start within 5s; see {}",
        home.controller_log().display()
    )))
}

/// True when the running controller executes a binary other than this one (asimov
/// was rebuilt or upgraded: the kernel shows the old file as deleted).
fn runs_other_binary(home: &Home) -> bool {
    let (Some(pid), Ok(me)) = (running_pid(home), std::env::current_exe()) else {
        return false;
    };
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(theirs) => theirs != me,
        Err(_) => false,
    }
}

/// Asks the outdated controller to stop (SIGTERM: in-flight ops finish) and waits for
/// its lock to be released.
fn replace_outdated(home: &Home) -> io::Result<()> {
    let Some(pid) = running_pid(home) else {
        return Ok(());
    };
    // SAFETY: signalling a process by pid; no memory is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if !is_running(home)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(io::Error::other(format!(
        "the outdated controller (pid {pid}) did not stop within 30s"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_controller_inherits_no_secrets() {
        assert!(inherited(std::ffi::OsStr::new("PATH")));
        assert!(inherited(std::ffi::OsStr::new("ASIMOV_LOG")));
        assert!(inherited(std::ffi::OsStr::new("LC_ALL")));
        assert!(!inherited(std::ffi::OsStr::new("HF_TOKEN")));
        assert!(!inherited(std::ffi::OsStr::new("VAST_API_KEY")));
        assert!(!inherited(std::ffi::OsStr::new("AWS_SECRET_ACCESS_KEY")));
    }

    #[test]
    fn one_lock_holder_per_home() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        assert!(!is_running(&home).unwrap());
        let held = ControllerLock::try_acquire(&home)
            .unwrap()
            .expect("first holder");
        assert!(is_running(&home).unwrap());
        assert!(ControllerLock::try_acquire(&home).unwrap().is_none());
        assert_eq!(running_pid(&home), Some(std::process::id()));
        drop(held);
        assert!(!is_running(&home).unwrap());
    }
}
