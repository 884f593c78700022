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

/// Takes the lock, waiting (up to [`LEAVING_PATIENCE`]) while its holder is a
/// controller on its way out: one stopping, or one that died a moment ago (a child it
/// was spawning can hold a copy of the lock until it execs). `None` when a working
/// controller holds it.
pub fn acquire_when_left(home: &Home) -> io::Result<Option<ControllerLock>> {
    let deadline = Instant::now() + LEAVING_PATIENCE;
    loop {
        if let Some(lock) = ControllerLock::try_acquire(home)? {
            return Ok(Some(lock));
        }
        match holder(home)? {
            Holder::Working => return Ok(None),
            Holder::Leaving(_) if Instant::now() > deadline => return Ok(None),
            Holder::Leaving(_) | Holder::Free => std::thread::sleep(Duration::from_millis(50)),
        }
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

/// How long `apply` waits for a leaving controller to let go of the lock.
const LEAVING_PATIENCE: Duration = Duration::from_secs(30);

/// Who holds the controller lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Free,
    /// A controller that works (or has just taken the lock and is about to say so).
    Working,
    /// The lock is held, but by a controller that is stopping or dead: it has been
    /// asked to stop, or the process the pid file names is gone or being killed. It will
    /// let go; until then nothing watches the runs.
    Leaving(u32),
}

/// Who holds this home's controller lock now.
pub fn holder(home: &Home) -> io::Result<Holder> {
    if !is_running(home)? {
        return Ok(Holder::Free);
    }
    let Some(pid) = std::fs::read_to_string(home.controller_pid())
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return Ok(Holder::Working);
    };
    if !process_alive(pid) {
        return Ok(Holder::Leaving(pid));
    }
    let stopping = super::read_store(home)
        .ok()
        .flatten()
        .and_then(|s| s.controller_status().ok().flatten())
        // Stopped but still holding the lock counts too: between recording `stopped`
        // and exiting, the process is alive and the lock taken, and trusting it then
        // left no controller (seen in CI).
        .is_some_and(|c| c.pid == pid && (c.stopping_at.is_some() || c.stopped_at.is_some()));
    Ok(if stopping {
        Holder::Leaving(pid)
    } else {
        Holder::Working
    })
}

/// True while `pid` runs and is not on its way out: a zombie, a process already exiting
/// (`PF_EXITING`) or one with a SIGKILL pending is as good as gone, though it may hold
/// its locks a moment longer. So is one with a SIGTERM or SIGINT pending.
fn process_alive(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    // A SIGTERM or SIGINT not yet delivered is a stop on its way, too.
    const SIGKILL_BIT: u64 =
        (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGTERM - 1)) | (1 << (libc::SIGINT - 1));
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        // No procfs: ask the kernel whether the pid exists at all.
        // SAFETY: signal 0 only checks for existence; nothing is delivered.
        return unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    };
    // Fields after the command name (which may itself hold spaces and parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return false;
    }
    if fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
    {
        return false;
    }
    let pending = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    !pending.lines().any(|line| {
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        matches!(key, "SigPnd" | "ShdPnd")
            && u64::from_str_radix(value.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0)
    })
}

/// Starts a background controller for `home` unless a working one runs, waiting for a
/// leaving one to go first and trying again when another starter won the lock, until a
/// working controller holds it. Returns true only when this call's controller is the
/// one that runs (so, of several concurrent `apply`s, one says it started it).
pub fn ensure_running(home: &Home) -> io::Result<bool> {
    let deadline = Instant::now() + LEAVING_PATIENCE;
    loop {
        match holder(home)? {
            Holder::Working => {
                if !runs_other_binary(home) {
                    return Ok(false);
                }
                // An upgraded asimov must not leave the old controller in charge.
                replace_outdated(home)?;
            }
            Holder::Leaving(pid) => {
                if Instant::now() > deadline {
                    return Err(io::Error::other(format!(
                        "the controller (pid {pid}) is stopping but still holds {} after {}s",
                        home.controller_lock().display(),
                        LEAVING_PATIENCE.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Holder::Free => {
                if spawn_controller(home)? {
                    return Ok(true);
                }
                // Another starter's controller took the lock: look at it again (it
                // may itself be leaving).
            }
        }
    }
}

/// Spawns `asimov controller --background`; true once it holds the lock, false when it
/// lost the lock to another controller.
fn spawn_controller(home: &Home) -> io::Result<bool> {
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
        // The lock alone may be another starter's child: ours writes its pid once it
        // holds the lock.
        if running_pid(home) == Some(child.id()) {
            return Ok(true);
        }
        if let Some(status) = child.try_wait()? {
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

/// A sentence for readers when no working controller watches this home (and since
/// when), `None` when one does.
pub fn absence(home: &Home, store: Option<&crate::store::Store>) -> Option<String> {
    let holder = holder(home).ok()?;
    let now = super::now();
    let when = |t: crate::model::Timestamp| {
        format!(
            "since {} ({} ago)",
            super::render::rfc3339(t),
            super::render::age(now - t)
        )
    };
    let status = store.and_then(|s| s.controller_status().ok().flatten());
    match holder {
        Holder::Working => None,
        Holder::Leaving(pid) => Some(format!(
            "the controller of {} (pid {pid}) is stopping; nothing will act on these runs until \
             one starts (`asimov apply` or `asimov controller`)",
            home.root().display()
        )),
        Holder::Free => {
            let since = status
                .map(|c| when(c.stopped_at.unwrap_or(c.seen_at)))
                .map(|s| format!(" {s}"))
                .unwrap_or_default();
            Some(format!(
                "no controller is watching {}{since}; what is shown is as it last saw it, and \
                 nothing acts on it until one starts (`asimov apply` or `asimov controller`)",
                home.root().display()
            ))
        }
    }
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
    fn a_zombie_or_a_dead_pid_is_not_a_live_controller() {
        assert!(process_alive(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie, which still shows in /proc.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!process_alive(pid));
        child.wait().unwrap();
        assert!(!process_alive(pid));
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

    /// The lock held a moment longer than its dead controller lived (here a second
    /// descriptor of this process, with `controller.pid` naming an exited process):
    /// a new controller waits it out instead of refusing to start.
    #[test]
    fn a_lock_left_by_a_dead_controller_is_waited_out() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let lingering = open_lock(&home).unwrap();
        assert!(flock(&lingering, libc::LOCK_EX).unwrap());
        let mut dead = Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        std::fs::write(home.controller_pid(), dead.id().to_string()).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(lingering);
        });
        let started = Instant::now();
        let lock = acquire_when_left(&home).unwrap();
        assert!(lock.is_some(), "refused though its holder is dead");
        assert!(started.elapsed() >= Duration::from_millis(250));
        release.join().unwrap();
        assert_eq!(running_pid(&home), Some(std::process::id()));
    }

    /// A working controller (a live pid that is not stopping) is not waited for.
    #[test]
    fn a_working_controller_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let _held = ControllerLock::try_acquire(&home).unwrap().expect("holder");
        let started = Instant::now();
        assert!(acquire_when_left(&home).unwrap().is_none());
        assert!(started.elapsed() < LEAVING_PATIENCE / 2);
    }
}
