//! The `local` provider, the embedded default: an instance is a folder
//! `$ASIMOV_HOME/local/<tag>/` on this machine, and its job runs as detached local
//! process groups started by the same agent as on remote machines.
//!
//! Instances are listed from what exists, never from the store: the folders, and the
//! process table (every process the agent starts carries `ASIMOV_INSTANCE=<tag>` and
//! `ASIMOV_ROOT=<folder>` in its environment), so a job whose folder was removed while
//! it still runs is listed (as `Terminating`) and destroyed like any other.

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

/// A process of this user that carries an instance tag in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaggedProcess {
    pid: i32,
    pgid: i32,
    tag: String,
    root: PathBuf,
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

    /// Processes of instances of this home (their `ASIMOV_ROOT` is in our folder).
    fn tagged_processes(&self) -> Vec<TaggedProcess> {
        let dir = self.dir();
        scan_processes()
            .into_iter()
            .filter(|p| p.root.parent() == Some(dir.as_path()))
            .collect()
    }

    fn processes_of(&self, id: &str, root: &Path) -> Vec<TaggedProcess> {
        self.tagged_processes()
            .into_iter()
            .filter(|p| p.tag == id && p.root == root)
            .collect()
    }
}

/// Reads `/proc/*/environ` (readable for this user's own processes) for
/// `ASIMOV_INSTANCE` and `ASIMOV_ROOT`.
fn scan_processes() -> Vec<TaggedProcess> {
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
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let mut tag = None;
        let mut root = None;
        for var in environ.split(|b| *b == 0) {
            if let Some(v) = var.strip_prefix(b"ASIMOV_INSTANCE=") {
                tag = Some(String::from_utf8_lossy(v).into_owned());
            } else if let Some(v) = var.strip_prefix(b"ASIMOV_ROOT=") {
                use std::os::unix::ffi::OsStrExt;
                root = Some(PathBuf::from(std::ffi::OsStr::from_bytes(v)));
            }
        }
        let (Some(tag), Some(root)) = (tag, root) else {
            continue;
        };
        // SAFETY: getpgid only reads the process table.
        let pgid = unsafe { libc::getpgid(pid) };
        if pgid < 0 {
            continue; // exited meanwhile
        }
        found.push(TaggedProcess {
            pid,
            pgid,
            tag,
            root,
        });
    }
    found
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends `sig` to every process of the instance, and to their process groups when the
/// group's leader is one of them (reaching children that scrubbed their environment).
fn signal_all(processes: &[TaggedProcess], sig: i32) {
    let pids: BTreeSet<i32> = processes.iter().map(|p| p.pid).collect();
    for p in processes {
        if pids.contains(&p.pgid) && p.pgid > 1 {
            signal(-p.pgid, sig);
        }
        signal(p.pid, sig);
    }
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
                let machine = AgentMachine::new(Arc::new(LocalTransport::new()), root);
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
        // and the last process exiting, or a folder removed by hand.
        for p in self.tagged_processes() {
            if instances.contains_key(&p.tag) || self.root_of(&p.tag) != Some(p.root.clone()) {
                continue;
            }
            if let Some(tag) = OwnerTag::parse(&p.tag) {
                let instance = self.instance(tag, p.root, InstanceState::Terminating);
                instances.insert(p.tag, instance);
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
                    format!("{} processes of {id} survive SIGKILL", processes.len()),
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
