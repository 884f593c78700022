//! `asimov controller [--manifests DIR] [--once]`: the reconcile loop in this process,
//! holding the home's controller lock. The desired state is a folder of manifests
//! watched with `notify` (debounced); a folder that stops validating keeps the last
//! good state in force and says why in the log, so one typo never tears anything down.

use super::daemon::{self, ControllerLock};
use super::{CliResult, desired, fail};
use crate::home::Home;
use crate::manifest::Manifests;
use crate::reconcile::controller::{
    Controller, DesiredSource, Shutdown, SourceError, providers_for,
};
use crate::reconcile::execute::Executor;
use crate::store::Store;
use async_trait::async_trait;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How long file events are gathered before the controller looks.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// The manifests folder as a `DesiredSource`.
pub struct FolderSource {
    dir: PathBuf,
    home: Home,
    /// Set by the watcher; the next `load` re-reads the folder.
    dirty: Arc<AtomicBool>,
    notify: Arc<Notify>,
    last_good: Mutex<Option<Manifests>>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// Wakes the controller when a local run's agent changes its `status` file, so the
    /// end of a run is acted on at once rather than at the next timer.
    _runs_watcher: Option<notify::RecommendedWatcher>,
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
    /// still converges through its requeue timers, only slower to notice edits.
    pub fn new(home: Home, dir: PathBuf) -> FolderSource {
        let dirty = Arc::new(AtomicBool::new(true));
        let notify = Arc::new(Notify::new());
        let (d, n) = (dirty.clone(), notify.clone());
        let watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
            // Reading the folder is itself an event (open, close): reacting to those
            // would make every pass trigger the next one.
            if let Ok(event) = result
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                d.store(true, Ordering::SeqCst);
                n.notify_one();
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
        let runs_watcher = watch_local_runs(&home, notify.clone());
        FolderSource {
            dir,
            home,
            dirty,
            notify,
            last_good: Mutex::new(None),
            _watcher: watcher,
            _runs_watcher: runs_watcher,
        }
    }
}

#[async_trait]
impl DesiredSource for FolderSource {
    async fn load(&self) -> Result<Manifests, SourceError> {
        let mut last_good = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dirty.swap(false, Ordering::SeqCst)
            && let Some(m) = last_good.as_ref()
        {
            return Ok(m.clone());
        }
        let ctx = desired::secrets_context(&self.home);
        match desired::load_folder(&self.dir, &ctx) {
            Ok(loaded) => {
                *last_good = Some(loaded.manifests.clone());
                Ok(loaded.manifests)
            }
            Err(problems) => {
                tracing::error!(dir = %self.dir.display(), "manifests do not validate; keeping the last good state:\n{problems}");
                match last_good.as_ref() {
                    Some(m) => Ok(m.clone()),
                    None => Err(SourceError {
                        message: format!("the manifests in {} do not validate", self.dir.display()),
                        source: Some(Box::new(problems)),
                    }),
                }
            }
        }
    }

    async fn changed(&self) {
        self.notify.notified().await;
        // Debounce: an editor's save or `apply` of many files is a burst of events;
        // look once, after it settles.
        tokio::time::sleep(DEBOUNCE).await;
    }
}

pub fn run(home: &Home, manifests: Option<PathBuf>, once: bool, background: bool) -> CliResult {
    home.ensure()?;
    let Some(_lock) = ControllerLock::try_acquire(home)? else {
        let pid = daemon::running_pid(home)
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        return Err(fail(format!(
            "a controller is already running for {}{pid}",
            home.root().display()
        )));
    };
    let dir = manifests.unwrap_or_else(|| home.manifests());
    if !dir.is_dir() {
        return Err(fail(format!(
            "manifests folder {} does not exist",
            dir.display()
        )));
    }
    // `apply` reads this to tell the user when it writes where this controller is not
    // looking (a controller started on a git checkout with --manifests).
    std::fs::write(home.controller_manifests(), dir.display().to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = Store::open(&home.database())?;
        let providers = providers_for(home)?;
        let executor = Arc::new(Executor::new(
            providers,
            Arc::new(Mutex::new(store)),
            home.clone(),
        ));
        let source = Arc::new(FolderSource::new(home.clone(), dir.clone()));
        let controller = Controller::new(executor, source, home.controller_id()?);
        if once {
            let report = controller.run_once().await?;
            for (op, error) in &report.failed {
                eprintln!("failed: {op}: {error}");
            }
            println!("{} op(s) applied, {} failed", report.applied, report.failed.len());
            return Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        tracing::info!(home = %home.root().display(), manifests = %dir.display(), pid = std::process::id(), "controller started");
        let (handle, shutdown) = Shutdown::new();
        spawn_signal_handlers(handle.clone());
        if background {
            spawn_home_watchdog(home.clone(), handle);
        }
        controller.run(shutdown).await?;
        tracing::info!("controller stopped");
        Ok(ExitCode::SUCCESS)
    })
}

type Handle = crate::reconcile::controller::ShutdownHandle;

/// SIGINT and SIGTERM: the first stops new ops and lets in-flight ones finish, the
/// second aborts them.
fn spawn_signal_handlers(handle: Handle) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown signal received");
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
