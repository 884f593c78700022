//! `asimov controller [--manifests DIR] [--once]`: the reconcile loop in this process,
//! holding the home's controller lock. The desired state is a folder of manifests
//! watched with `notify` (debounced) and recorded in the store for the readers; a file
//! that stops validating keeps its own objects at their last good state and says why
//! (log and store), so one typo neither tears anything down nor stalls the rest. The
//! controller also reports its liveness in the store (started, heartbeat, stopping,
//! stopped).

use super::daemon;
use super::{CliResult, desired, fail};
use crate::home::Home;
use crate::manifest::{self, Loaded, Manifests};
use crate::reconcile::controller::{
    Controller, DesiredSource, Shutdown, SourceError, providers_for,
};
use crate::reconcile::execute::Executor;
use crate::store::{DesiredFolder, DesiredObject, DesiredProblem, Store};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::Notify;

/// How long file events are gathered before the folder is read.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// How often a running controller says in the store that it is alive: the precision
/// of "no controller since …" after a crash, against an idle controller's wake-ups.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// The manifests folder as a `DesiredSource`. The folder is read (debounced) on every
/// change by a thread of its own, not by the reconcile pass, and each read is recorded in
/// the store at once: readers see an `apply` within a debounce even while a long pass
/// runs, and the next pass reconciles exactly what was recorded.
pub struct FolderSource {
    folder: Arc<Folder>,
    notify: Arc<Notify>,
    /// False without a working watcher: each pass then re-reads the folder itself.
    watching: bool,
    _watcher: Option<notify::RecommendedWatcher>,
    /// Wakes the controller when a local run's agent changes its `status` file, so the
    /// end of a run is acted on at once rather than at the next timer.
    _runs_watcher: Option<notify::RecommendedWatcher>,
}

/// The folder, its last good state, and the store it is recorded in.
struct Folder {
    dir: PathBuf,
    home: Home,
    /// What is in force; `None` until a read succeeded.
    state: Mutex<Option<Loaded>>,
    /// `None` when the store cannot be opened: the controller then works unrecorded.
    store: Mutex<Option<Store>>,
}

impl Folder {
    /// Reads the folder, keeps broken files' objects at their last good state, records
    /// the result, and returns what is in force.
    fn refresh(&self) -> Result<Manifests, SourceError> {
        let read_at_ms = chrono::Utc::now().timestamp_millis();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = desired::secrets_context(&self.home);
        let last_good = state.clone();
        let no_history = last_good.is_none() && !self.has_runs();
        let loaded = match (&last_good, no_history) {
            // Nothing is known of what a broken file held, and runs exist that it may
            // own: reconciling without them would tear them down. Wait for a fix.
            (None, false) => match desired::load_folder(&self.dir, &ctx) {
                Ok(l) => desired::FolderState {
                    loaded: l,
                    problems: Vec::new(),
                },
                Err(problems) => {
                    tracing::error!(dir = %self.dir.display(), "manifests do not validate and no good state is known; reconciling nothing:\n{problems}");
                    return Err(SourceError {
                        message: format!("the manifests in {} do not validate", self.dir.display()),
                        source: Some(Box::new(problems)),
                    });
                }
            },
            (last, _) => {
                let empty = Loaded::default();
                match desired::load_tolerant(&self.dir, &ctx, last.as_ref().unwrap_or(&empty)) {
                    Ok(s) => s,
                    Err(problems) => {
                        tracing::error!(dir = %self.dir.display(), "cannot read the manifests folder; keeping the last good state:\n{problems}");
                        return match last {
                            Some(l) => Ok(l.manifests.clone()),
                            None => Err(SourceError {
                                message: format!("cannot read {}", self.dir.display()),
                                source: Some(Box::new(problems)),
                            }),
                        };
                    }
                }
            }
        };
        if !loaded.problems.is_empty() {
            let problems = manifest::Problems(loaded.problems.clone());
            tracing::error!(dir = %self.dir.display(), "some manifests do not validate; their objects keep their last good state:\n{problems}");
        }
        self.record(&loaded, read_at_ms);
        let manifests = loaded.loaded.manifests.clone();
        *state = Some(loaded.loaded);
        Ok(manifests)
    }

    fn has_runs(&self) -> bool {
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        store
            .as_ref()
            .is_none_or(|s| s.runs().map_or(true, |r| !r.is_empty()))
    }

    /// Writes what is in force to the store, for the readers. A failure is logged: the
    /// controller goes on with what it read.
    fn record(&self, state: &desired::FolderState, read_at_ms: i64) {
        let now = super::now();
        let objects: Vec<DesiredObject> = state
            .loaded
            .documents
            .iter()
            .map(|d| DesiredObject {
                kind: d.kind.as_str().to_string(),
                name: d.name.clone(),
                file: d.origin.file.clone(),
                line: d.origin.line,
                yaml: d.yaml.clone(),
            })
            .collect();
        let problems: Vec<DesiredProblem> = state
            .problems
            .iter()
            .map(|p| DesiredProblem {
                file: p.file.clone(),
                line: p.line,
                column: p.column,
                message: p.message.clone(),
                since: now,
            })
            .collect();
        let source = DesiredFolder {
            folder: self.dir.clone(),
            commit: git_commit(&self.dir),
            generation: 0,
            read_at_ms,
            recorded_at: now,
        };
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        // A stop already signalled is recorded before what this read saw: an `apply`
        // that waits for its manifests to be read then finds this controller leaving,
        // however late the signal task gets to say so itself.
        if stop_signalled()
            && let Some(store) = store.as_ref()
            && let Err(e) = store.controller_stopping(std::process::id(), now)
        {
            tracing::warn!(error = %e, "cannot record the controller's liveness");
        }
        if let Some(store) = store.as_ref()
            && let Err(e) = store.record_desired(&source, &objects, &problems)
        {
            tracing::warn!(error = %e, "cannot record the desired state for the readers");
        }
    }
}

/// The commit checked out where `dir`'s manifests are tracked, if they are.
fn git_commit(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // A folder merely inside some repository (a home under a dotfiles repo) has no
    // commit of its own: only tracked manifests name one.
    git(&["ls-files", "--", "."]).filter(|files| !files.is_empty())?;
    git(&["rev-parse", "--verify", "HEAD"]).filter(|c| !c.is_empty())
}

/// Watches `$ASIMOV_HOME/local/*/status`: the agent writes it (temp file, then rename)
/// at each change of state. Log and heartbeat writes are filtered out here, in the
/// watcher's thread, and never wake the controller.
fn watch_local_runs(home: &Home, notify: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    let dir = home.local_instances();
    let watcher = std::fs::create_dir_all(&dir)
        .map_err(notify::Error::io)
        .and_then(|()| {
            notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
                if let Ok(event) = result
                    && !matches!(event.kind, notify::EventKind::Access(_))
                    && event
                        .paths
                        .iter()
                        .any(|p| p.file_name().is_some_and(|n| n == "status"))
                {
                    notify.notify_one();
                }
            })
        })
        .and_then(|mut w| {
            use notify::Watcher;
            w.watch(&dir, notify::RecursiveMode::Recursive)?;
            Ok(w)
        });
    match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch local runs; relying on timers");
            None
        }
    }
}

impl FolderSource {
    /// Watches `dir`; without a working watcher (e.g. inotify limits) the controller
    /// still converges through its requeue timers, only slower to notice edits. The
    /// last good state starts as the store recorded it for this folder, so a broken
    /// file at start keeps its objects too.
    pub fn new(home: Home, dir: PathBuf) -> FolderSource {
        let store = match Store::open(&home.database()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the store to record the desired state");
                None
            }
        };
        let recorded = store
            .as_ref()
            .and_then(|s| s.desired().ok().flatten())
            .filter(|r| r.source.folder == dir)
            .map(|r| desired::loaded_from_record(&home, &r).0);
        let folder = Arc::new(Folder {
            dir: dir.clone(),
            home: home.clone(),
            state: Mutex::new(recorded),
            store: Mutex::new(store),
        });
        let notify = Arc::new(Notify::new());
        let (events, rx) = std::sync::mpsc::channel::<()>();
        let watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
            // Reading the folder is itself an event (open, close): reacting to those
            // would make every read trigger the next one.
            if let Ok(event) = result
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                let _ = events.send(());
            }
        })
        .and_then(|mut w| {
            use notify::Watcher;
            w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the manifests folder; relying on timers");
                None
            }
        };
        // The first read before the first pass; its failure is the first pass's error.
        let _ = folder.refresh();
        if watcher.is_some() {
            let (f, n) = (Arc::clone(&folder), Arc::clone(&notify));
            // Ends when the watcher (the channel's sender) is dropped.
            std::thread::spawn(move || {
                while rx.recv().is_ok() {
                    // Debounce: an editor's save or `apply` of many files is a burst of
                    // events; read once, after it settles.
                    while rx.recv_timeout(DEBOUNCE).is_ok() {}
                    let _ = f.refresh();
                    n.notify_one();
                }
            });
        }
        let runs_watcher = watch_local_runs(&home, notify.clone());
        FolderSource {
            folder,
            notify,
            watching: watcher.is_some(),
            _watcher: watcher,
            _runs_watcher: runs_watcher,
        }
    }
}

#[async_trait]
impl DesiredSource for FolderSource {
    async fn load(&self) -> Result<Manifests, SourceError> {
        if self.watching {
            let state = self.folder.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = state.as_ref() {
                return Ok(l.manifests.clone());
            }
        }
        let folder = Arc::clone(&self.folder);
        tokio::task::spawn_blocking(move || folder.refresh())
            .await
            .map_err(|e| SourceError {
                message: format!("reading the manifests folder: {e}"),
                source: None,
            })?
    }

    async fn changed(&self) {
        self.notify.notified().await;
    }
}

pub fn run(home: &Home, manifests: Option<PathBuf>, once: bool, background: bool) -> CliResult {
    home.ensure()?;
    let Some(_lock) = daemon::acquire_when_left(home)? else {
        let pid = daemon::running_pid(home)
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        return Err(fail(format!(
            "a controller is already running for {}{pid}",
            home.root().display()
        )));
    };
    // From the moment the lock is ours, a SIGTERM is a clean stop, not a kill: opening
    // the store and ending a predecessor's masters can take seconds on a loaded
    // machine, and a stop asked for then is acted on once the loop runs.
    if !once {
        watch_stop_flag();
    }
    // Tests widen the window between taking the lock and running the loop.
    std::thread::sleep(crate::failpoint::delay("controller:after-lock"));
    let dir = manifests.unwrap_or_else(|| home.manifests());
    if !dir.is_dir() {
        return Err(fail(format!(
            "manifests folder {} does not exist",
            dir.display()
        )));
    }
    // Recorded for the readers, who run from any directory.
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = Store::open(&home.database())?;
        let registry = providers_for(home)?;
        // Closed on every way this function returns, so no master outlives it.
        let ssh_pool = Arc::clone(&registry.ssh_pool);
        // We hold the lock: masters a killed predecessor left are ours to end.
        if let Err(e) = ssh_pool.replace_previous_controller().await {
            tracing::warn!(error = %e, "cannot end the previous controller's ssh masters");
        }
        let executor = Arc::new(Executor::new(
            registry.providers,
            Arc::new(Mutex::new(store)),
            home.clone(),
        ));
        let source = Arc::new(FolderSource::new(home.clone(), dir.clone()));
        let controller = Controller::new(executor, source, home.controller_id()?);
        if once {
            let report = controller.run_once().await;
            ssh_pool.close_all().await;
            let report = report?;
            for (op, error) in &report.failed {
                eprintln!("failed: {op}: {error}");
            }
            println!("{} op(s) applied, {} failed", report.applied, report.failed.len());
            return Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        tracing::info!(home = %home.root().display(), manifests = %dir.display(), pid = std::process::id(), "controller started");
        let liveness = Liveness::start(home);
        let (handle, shutdown) = Shutdown::new();
        watch_stop_flag();
        spawn_signal_handlers(handle.clone(), liveness.clone());
        if background {
            spawn_home_watchdog(home.clone(), handle);
        }
        liveness.spawn_heartbeat();
        let result = controller.run(shutdown).await;
        ssh_pool.close_all().await;
        liveness.stopped();
        // Still holding the lock after saying so: tests widen this window.
        tokio::time::sleep(crate::failpoint::delay("controller:after-stopped")).await;
        result?;
        tracing::info!("controller stopped");
        Ok(ExitCode::SUCCESS)
    })
}

type Handle = crate::reconcile::controller::ShutdownHandle;

/// Set by the signal handler itself (async-signal-safe), the moment SIGTERM or SIGINT
/// is delivered: the tokio task that records `stopping` may run a while later.
static STOP_FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Installs the flag's handler (once; `--once` leaves SIGTERM's default alone).
fn watch_stop_flag() {
    STOP_FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&flag)) {
                tracing::warn!(error = %e, "cannot watch for shutdown signals");
            }
        }
        flag
    });
}

fn stop_signalled() -> bool {
    STOP_FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// SIGINT and SIGTERM: the first stops new ops and lets in-flight ones finish, the
/// second aborts them.
fn spawn_signal_handlers(handle: Handle, liveness: Liveness) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot install signal handlers");
            return;
        };
        // A stop signalled before these handlers existed (the flag's handler took it).
        if stop_signalled() {
            tracing::info!("shutdown signal received before the controller loop started");
            liveness.stopping();
            handle.signal();
        }
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown signal received");
            tokio::time::sleep(crate::failpoint::delay("signal:before-stopping")).await;
            // Before anything else: an `apply` from now on waits for this controller to
            // go and starts a new one, rather than trusting one that is leaving.
            liveness.stopping();
            handle.signal();
        }
    });
}

/// A background controller whose home folder was removed has nothing left to guard
/// (tests and scratch homes): it stops instead of running for ever.
fn spawn_home_watchdog(home: Home, handle: Handle) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if !home.database().exists() {
                tracing::info!("home folder is gone; stopping");
                handle.signal();
                return;
            }
        }
    });
}

/// This controller's entry in the store: started, alive (a heartbeat), stopping,
/// stopped. Readers use it to say since when no controller watches the home; `apply`
/// to tell a leaving controller from a working one. Failures to write are logged only.
#[derive(Clone)]
struct Liveness {
    store: Arc<Mutex<Option<Store>>>,
    pid: u32,
}

impl Liveness {
    fn start(home: &Home) -> Liveness {
        let store = Store::open(&home.database())
            .map_err(|e| tracing::warn!(error = %e, "cannot record the controller's liveness"))
            .ok();
        let liveness = Liveness {
            store: Arc::new(Mutex::new(store)),
            pid: std::process::id(),
        };
        liveness.write(|s, pid, now| s.controller_started(pid, now));
        liveness
    }

    fn write(
        &self,
        f: impl FnOnce(&Store, u32, crate::model::Timestamp) -> crate::store::StoreResult<()>,
    ) {
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = store.as_ref()
            && let Err(e) = f(s, self.pid, super::now())
        {
            tracing::warn!(error = %e, "cannot record the controller's liveness");
        }
    }

    fn spawn_heartbeat(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let me = me.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    me.write(|s, pid, now| s.controller_seen(pid, now));
                })
                .await;
            }
        });
    }

    fn stopping(&self) {
        self.write(|s, pid, now| s.controller_stopping(pid, now));
    }

    fn stopped(&self) {
        self.write(|s, pid, now| s.controller_stopped(pid, now));
    }
}
