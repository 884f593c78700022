//! The `local` provider, the embedded default: an instance is a folder
//! `$ASIMOV_HOME/local/<tag>/` on this machine, and its job runs as detached local
//! process groups started by the same agent as on remote machines.
//!
//! Instances are listed from what exists, never from the store: the folders, and the
//! process table (every process the agent starts carries `ASIMOV_INSTANCE=<tag>` and
//! `ASIMOV_ROOT=<folder>` in its environment), so a job whose folder was removed while
//! it still runs is listed (as `Stopped`: nothing ends it but a destroy, which the planner
//! sends for a stopped instance, unlike a `Terminating` one it waits for) and destroyed.
//!
//! A destroy sweeps wider than the environment, since a job can shed it (`setsid env -i
//! cmd &`): a process is the instance's when its current folder or an open file is in
//! the instance folder (what `work/` and the `log` leave on every child), or when its
//! parent or process group leader is the instance's. A process that shed all of that
//! (changed folder, closed its files, and outlived its parent) cannot be told apart:
//! there is no cgroup tracking yet. Whatever survives SIGKILL is named in the error.

use super::{
    CreateRequest, Endpoint, ErrorKind, Instance, InstanceState, Provider, ProviderError,
    ProviderResult,
};
use crate::agent::{AgentMachine, Machine};
use crate::home::Home;
use crate::model::{InstanceId, Offer, OfferQuery, OwnerTag, ProviderKind, Timestamp, Usd};
use crate::transport::local::LocalTransport;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long destroy waits after TERM before it sends KILL.
const GRACE: Duration = Duration::from_secs(5);

/// Instances as folders under `home.local_instances()`.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    home: Home,
    no_tmux: bool,
}

fn error(kind: ErrorKind, step: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderKind::Local, kind, step, message)
}

fn io_error(step: &'static str, e: std::io::Error) -> ProviderError {
    error(ErrorKind::Transient, step, e.to_string()).with_source(e)
}

fn now() -> Timestamp {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as Timestamp)
        .unwrap_or(0)
}

impl LocalProvider {
    pub fn new(home: Home) -> Self {
        LocalProvider {
            home,
            no_tmux: false,
        }
    }

    /// Machines of this provider launch their agent with `setsid`, not tmux.
    pub fn without_tmux(mut self) -> Self {
        self.no_tmux = true;
        self
    }

    fn dir(&self) -> PathBuf {
        self.home.local_instances()
    }

    /// The folder of instance `id`; `None` unless `id` is an asimov tag (which also
    /// keeps `..` and slashes out of the path).
    fn root_of(&self, id: &str) -> Option<PathBuf> {
        let tag = OwnerTag::parse(id)?;
        (tag.render() == id && !id.contains('/')).then(|| self.dir().join(id))
    }

    fn instance(&self, tag: OwnerTag, root: PathBuf, state: InstanceState) -> Instance {
        let created_at = std::fs::read_to_string(root.join("created_at"))
            .ok()
            .and_then(|t| t.trim().parse().ok());
        Instance {
            provider: ProviderKind::Local,
            id: tag.render(),
            tag,
            state,
            endpoint: Some(Endpoint::Local { root }),
            gpu: None,
            price_per_hour: Usd::ZERO,
            created_at,
            host: None,
        }
    }
}

/// A process as `/proc` shows it, with the instance its environment names, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Process {
    pid: i32,
    ppid: i32,
    pgid: i32,
    /// The controlling terminal (`tty_nr`), 0 for none.
    tty: i64,
    comm: String,
    /// `ASIMOV_INSTANCE` and `ASIMOV_ROOT` from its environment.
    tag: Option<String>,
    root: Option<PathBuf>,
}

impl Process {
    fn tagged(&self, id: &str, root: &Path) -> bool {
        self.tag.as_deref() == Some(id) && self.root.as_deref() == Some(root)
    }

    /// True when its current folder is inside `root`, or it holds a file there open for
    /// writing: what a process that cleared its environment and left the job's session
    /// still holds (a job's current folder is `work/`, its output goes to `log`). A file
    /// open only for reading does not count: that is a reader such as `asimov logs -f`
    /// or a user's `tail -f`, which must outlive the run it watches.
    fn touches(&self, root: &Path) -> bool {
        let proc = PathBuf::from(format!("/proc/{}", self.pid));
        if std::fs::read_link(proc.join("cwd")).is_ok_and(|c| c.starts_with(root)) {
            return true;
        }
        std::fs::read_dir(proc.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(root))
                    && !read_only(&proc.join("fdinfo").join(fd.file_name()))
            })
    }
}

impl LocalProvider {
    /// `(tag, folder)` of processes of instances of this home (their `ASIMOV_ROOT` is in
    /// our folder), by environment alone: cheap enough for every listing.
    fn tagged_processes(&self) -> Vec<(String, PathBuf)> {
        let dir = self.dir();
        scan_processes()
            .into_iter()
            .filter_map(|p| Some((p.tag?, p.root?)))
            .filter(|(_, root)| root.parent() == Some(dir.as_path()))
            .collect()
    }

    /// Every process of instance `id`, including those that escaped it: the processes
    /// whose environment names it, those whose current folder or open files are in its
    /// folder (unless they belong to another terminal, like a user's shell looking in),
    /// and, until nothing changes, the children and process groups of all of these.
    fn processes_of(&self, id: &str, root: &Path) -> Vec<Process> {
        let all = scan_processes();
        let mut member: BTreeSet<i32> = all
            .iter()
            .filter(|p| p.tagged(id, root))
            .map(|p| p.pid)
            .collect();
        let ttys: BTreeSet<i64> = all
            .iter()
            .filter(|p| member.contains(&p.pid) && p.tty != 0)
            .map(|p| p.tty)
            .collect();
        for p in &all {
            if !member.contains(&p.pid) && (p.tty == 0 || ttys.contains(&p.tty)) && p.touches(root)
            {
                member.insert(p.pid);
            }
        }
        loop {
            let before = member.len();
            for p in &all {
                if member.contains(&p.ppid) || (p.pgid > 1 && member.contains(&p.pgid)) {
                    member.insert(p.pid);
                }
            }
            if member.len() == before {
                break;
            }
        }
        all.into_iter()
            .filter(|p| member.contains(&p.pid))
            .collect()
    }
}

/// True when `/proc/PID/fdinfo/FD` says the descriptor was opened read-only (its
/// access mode, the low two bits of the octal `flags`, is `O_RDONLY`).
fn read_only(fdinfo: &Path) -> bool {
    std::fs::read_to_string(fdinfo).is_ok_and(|info| {
        info.lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|flags| flags & i64::from(libc::O_ACCMODE) == i64::from(libc::O_RDONLY))
    })
}

/// Reads `/proc` once: `stat` of every process, and `environ` where readable (this
/// user's own processes) for `ASIMOV_INSTANCE` and `ASIMOV_ROOT`. Skips this process.
fn scan_processes() -> Vec<Process> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some((comm, ppid, pgid, tty)) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        else {
            continue; // exited meanwhile, or a zombie
        };
        let mut tag = None;
        let mut root = None;
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        for var in environ.split(|b| *b == 0) {
            if let Some(v) = var.strip_prefix(b"ASIMOV_INSTANCE=") {
                tag = Some(String::from_utf8_lossy(v).into_owned());
            } else if let Some(v) = var.strip_prefix(b"ASIMOV_ROOT=") {
                use std::os::unix::ffi::OsStrExt;
                root = Some(PathBuf::from(std::ffi::OsStr::from_bytes(v)));
            }
        }
        found.push(Process {
            pid,
            ppid,
            pgid,
            tty,
            comm,
            tag,
            root,
        });
    }
    found
}

/// `(comm, ppid, pgrp, tty_nr)` from a `/proc/PID/stat` line; the command name may hold
/// spaces and parentheses, so fields are counted from its last `)`. `None` for a zombie
/// too: it is dead already, and no signal would remove it (its parent or init reaps it).
fn parse_stat(stat: &str) -> Option<(String, i32, i32, i64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut fields = stat.get(close + 1..)?.split_whitespace();
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    let _session = fields.next()?;
    let tty = fields.next()?.parse().ok()?;
    Some((comm, ppid, pgid, tty))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends `sig` to every process of the instance, and to their process groups when the
/// group's leader is one of them.
fn signal_all(processes: &[Process], sig: i32) {
    let pids: BTreeSet<i32> = processes.iter().map(|p| p.pid).collect();
    for p in processes {
        if pids.contains(&p.pgid) && p.pgid > 1 {
            signal(-p.pgid, sig);
        }
        signal(p.pid, sig);
    }
}

/// `123 (sleep), 456 (python3)`, for the report of what survived.
fn describe(processes: &[Process]) -> String {
    processes
        .iter()
        .map(|p| format!("{} ({})", p.pid, p.comm))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a pid file of the agent.
fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p: &i32| *p > 1)
}

#[async_trait]
impl Provider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    /// A folder is listed the moment it is made and the job runs at once; this machine
    /// costs nothing to asimov.
    fn capabilities(&self) -> super::Capabilities {
        super::Capabilities::default()
    }

    /// This machine, once, free (its GPUs are not inventoried).
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        let mut offer = Offer::new(ProviderKind::Local, "local", Usd::ZERO);
        offer.location = Some("this machine".into());
        Ok(std::iter::once(offer)
            .filter(|o| query.matches(o))
            .collect())
    }

    async fn list(&self) -> ProviderResult<Vec<Instance>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.list_blocking())
            .await
            .map_err(|e| error(ErrorKind::Transient, "list instances", e.to_string()))?
    }

    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance> {
        let id = req.tag.render();
        let root = self.root_of(&id).ok_or_else(|| {
            error(
                ErrorKind::Permanent,
                "create instance",
                format!("bad tag {id}"),
            )
        })?;
        // The folder's name is the tag, so an instance interrupted halfway through its
        // creation is still listed (and adopted or destroyed), never leaked.
        std::fs::create_dir_all(&root).map_err(|e| io_error("create instance", e))?;
        if !root.join("created_at").exists() {
            crate::home::write_private(&root.join("created_at"), now().to_string().as_bytes())
                .map_err(|e| io_error("create instance", e))?;
        }
        if !root.join("tag").exists() {
            crate::home::write_private(&root.join("tag"), id.as_bytes())
                .map_err(|e| io_error("create instance", e))?;
        }
        Ok(self.instance(req.tag.clone(), root, InstanceState::Running))
    }

    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()> {
        let this = self.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || this.destroy_blocking(&id))
            .await
            .map_err(|e| error(ErrorKind::Transient, "destroy instance", e.to_string()))?
    }

    fn machine(&self, instance: &Instance) -> ProviderResult<Arc<dyn Machine>> {
        match &instance.endpoint {
            Some(Endpoint::Local { root }) => {
                let root = root.to_str().ok_or_else(|| {
                    error(
                        ErrorKind::Permanent,
                        "reach instance",
                        format!("instance folder {} is not UTF-8", root.display()),
                    )
                })?;
                let machine =
                    AgentMachine::new(Arc::new(LocalTransport::new()), root).root_is_instance();
                let machine = if self.no_tmux {
                    machine.without_tmux()
                } else {
                    machine
                };
                Ok(Arc::new(machine))
            }
            Some(_) => Err(error(
                ErrorKind::Permanent,
                "reach instance",
                format!("{} is not a local instance", instance.id),
            )),
            None => Err(error(
                ErrorKind::Transient,
                "reach instance",
                format!("{} has no folder yet", instance.id),
            )),
        }
    }
}

impl LocalProvider {
    fn list_blocking(&self) -> ProviderResult<Vec<Instance>> {
        let mut instances = BTreeMap::new();
        match std::fs::read_dir(self.dir()) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| io_error("list instances", e))?;
                    let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                        continue;
                    };
                    let Some(root) = self.root_of(&name) else {
                        continue;
                    };
                    if !root.is_dir() {
                        continue;
                    }
                    if let Some(tag) = OwnerTag::parse(&name) {
                        let instance = self.instance(tag, root, InstanceState::Running);
                        instances.insert(name, instance);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("list instances", e)),
        }
        // Processes whose folder is gone: a destroy cut off between removing the folder
        // and the last process exiting, or a folder removed by hand. Stopped, not
        // Terminating: they do not go on their own, so the planner must destroy them.
        for (id, root) in self.tagged_processes() {
            if instances.contains_key(&id) || self.root_of(&id) != Some(root.clone()) {
                continue;
            }
            if let Some(tag) = OwnerTag::parse(&id) {
                let instance = self.instance(tag, root, InstanceState::Stopped);
                instances.insert(id, instance);
            }
        }
        Ok(instances.into_values().collect())
    }

    fn destroy_blocking(&self, id: &str) -> ProviderResult<()> {
        let root = self.root_of(id).ok_or_else(|| {
            error(
                ErrorKind::NotFound,
                "destroy instance",
                format!("no instance {id}"),
            )
        })?;
        let mut processes = self.processes_of(id, &root);
        if !root.exists() && processes.is_empty() {
            return Err(error(
                ErrorKind::NotFound,
                "destroy instance",
                format!("no instance {id}"),
            ));
        }
        // The agent's own pid files name process groups; trust them only when the
        // leader is still one of this instance's processes (pids get reused).
        for file in ["pid", "run_pid"] {
            if let Some(pid) = read_pid(&root.join(file))
                && processes.iter().any(|p| p.pid == pid)
            {
                signal(-pid, libc::SIGTERM);
            }
        }
        signal_all(&processes, libc::SIGTERM);
        let deadline = std::time::Instant::now() + GRACE;
        while !processes.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            processes = self.processes_of(id, &root);
        }
        let deadline = std::time::Instant::now() + GRACE;
        while !processes.is_empty() {
            signal_all(&processes, libc::SIGKILL);
            if std::time::Instant::now() >= deadline {
                return Err(error(
                    ErrorKind::Transient,
                    "destroy instance",
                    format!(
                        "{} process(es) of {id} survive SIGKILL: {}",
                        processes.len(),
                        describe(&processes)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
            processes = self.processes_of(id, &root);
        }
        match std::fs::remove_dir_all(&root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("destroy instance", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = "4242 (we (ird) name) S 17 4242 4242 34817 4242 4194560 0 0";
        assert_eq!(
            parse_stat(line),
            Some(("we (ird) name".to_string(), 17, 4242, 34817))
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            parse_stat("4243 (sleep) Z 1 4243 4243 0 -1 4194560 0 0"),
            None
        );
    }
}
