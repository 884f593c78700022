//! The controller loop: a per-key queue (one key per job, one for orphans) with requeue
//! timers; each pass lists every provider ONCE, reads the store, observes the agents of
//! due runs, plans, and applies the due keys' ops (different runs concurrently, one run's
//! ops in order). Events only enqueue keys; a pass never knows why it ran.
//!
//! Shutdown is two-step: the first signal stops starting new ops and lets in-flight ones
//! finish; the second aborts them (safe: the tag rides on the create call, so a cut-off
//! create is adopted on restart).

use super::budget;
use super::execute::{ExecError, Executor};
use super::plan::{
    self, AgentObservation, Desired, History, ListResult, Observed, Op, Plan, QueueKey,
};
use crate::home::Home;
use crate::manifest::{Fleet, Manifests};
use crate::model::{HostStatus, Outcome, OwnerTag, Progress, ProviderKind, RunName, Timestamp};
use crate::provider::{Capabilities, Provider};
use crate::provider::{ErrorKind, Instance, InstanceState};
use crate::store::HostRecord;
use crate::store::StoreError;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How much of a job's metrics file is read each pass for its `stop_when` rules: they
/// see the records in its last 256 KiB (some thousands of lines).
pub const METRICS_TAIL: usize = 256 * 1024;

/// Where the desired state comes from: the manifests folder (the lead's loader and
/// watcher) or memory (tests).
#[async_trait]
pub trait DesiredSource: Send + Sync {
    /// The desired state as it is now, shared: a pass holds the source's own copy, it
    /// does not make one (at 10,000 jobs a copy is some 10 MiB).
    async fn load(&self) -> Result<Arc<Manifests>, SourceError>;

    /// Resolves when the desired state may have changed. Spurious wake-ups are fine.
    async fn changed(&self);
}

#[derive(Debug, thiserror::Error)]
#[error("cannot load the desired state: {message}")]
pub struct SourceError {
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// An in-memory desired state, for tests and benchmarks.
#[derive(Default)]
pub struct MemorySource {
    manifests: std::sync::Mutex<Arc<Manifests>>,
    notify: Notify,
}

impl MemorySource {
    pub fn new(manifests: Manifests) -> Self {
        MemorySource {
            manifests: std::sync::Mutex::new(Arc::new(manifests)),
            notify: Notify::new(),
        }
    }

    /// Replaces the desired state and wakes the controller.
    pub fn set(&self, manifests: Manifests) {
        *self.manifests.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(manifests);
        self.notify.notify_one();
    }
}

#[async_trait]
impl DesiredSource for MemorySource {
    async fn load(&self) -> Result<Arc<Manifests>, SourceError> {
        Ok(Arc::clone(
            &self.manifests.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    async fn changed(&self) {
        self.notify.notified().await;
    }
}

/// Seconds since the epoch that advance with tokio time: real time in production,
/// paused time in tests (so `now` agrees with simulated machines).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch_at_start: Timestamp,
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        let epoch_at_start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Clock {
            epoch_at_start,
            start: Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        self.epoch_at_start + self.start.elapsed().as_secs() as i64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("reconcile pass: loading the desired state")]
    Source(#[source] SourceError),
    #[error("reconcile pass: reading the store")]
    Store(#[source] StoreError),
    #[error("reconcile pass aborted by a second shutdown signal")]
    Aborted,
}

/// The error policy: how long to wait before looking at a key again after an op of it
/// failed with `kind`, on its `failures`-th consecutive failure (1-based).
pub fn requeue_after_error(kind: &ErrorKind, failures: u32) -> Duration {
    let backoff = plan::backoff_delay(failures.max(1));
    match kind {
        // Gone already, or raced (the listing shows what exists): the next pass sees
        // the truth.
        ErrorKind::NotFound | ErrorKind::AlreadyExists => Duration::from_secs(1),
        ErrorKind::RateLimited { retry_after } => retry_after.unwrap_or(backoff).max(backoff),
        ErrorKind::NoCapacity | ErrorKind::Transient => backoff,
        // A person must act (fix a key, a spec, pay): look rarely, but do look.
        ErrorKind::Unauthenticated
        | ErrorKind::PermissionDenied
        | ErrorKind::Quota
        | ErrorKind::PaymentRequired
        | ErrorKind::Permanent => plan::REQUEUE_NEEDS_PERSON,
    }
}

/// Sends shutdown signals; the first stops new ops, the second aborts.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<u32>>);

impl ShutdownHandle {
    pub fn signal(&self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// The receiving side given to [`Controller::run`].
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<u32>);

impl Shutdown {
    pub fn new() -> (ShutdownHandle, Shutdown) {
        let (tx, rx) = watch::channel(0);
        (ShutdownHandle(Arc::new(tx)), Shutdown(rx))
    }

    fn count(&self) -> u32 {
        *self.0.borrow()
    }

    /// Resolves once at least `n` signals were sent (never, if the handle is gone).
    async fn reached(&mut self, n: u32) {
        if self.0.wait_for(|c| *c >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Every op the planner asked for (including those of keys not due); shared with
    /// the op groups that apply them, not copied.
    pub planned: Arc<Vec<Op>>,
    /// Ops applied successfully.
    pub applied: usize,
    /// Ops that failed, with their error, rendered.
    pub failed: Vec<(String, String)>,
    pub requeue_after: Option<Duration>,
    /// The plan's requeue by key, after the error policy.
    pub requeue: BTreeMap<QueueKey, Duration>,
}

enum Due {
    All,
    Keys(BTreeSet<QueueKey>),
}

impl Due {
    fn contains(&self, key: &QueueKey) -> bool {
        match self {
            Due::All => true,
            Due::Keys(k) => k.contains(key),
        }
    }
}

pub struct Controller {
    executor: Arc<Executor>,
    source: Arc<dyn DesiredSource>,
    controller_id: String,
    clock: Clock,
    /// Op groups (runs) applied at the same time, whichever pass planned them: groups
    /// still running from an earlier pass count against the same limit.
    concurrency: usize,
    stopping: Arc<AtomicBool>,
    failures: std::sync::Mutex<BTreeMap<QueueKey, u32>>,
    /// The metrics line last recorded for each run: a steady run writes nothing.
    metrics_written: std::sync::Mutex<BTreeMap<RunName, String>>,
    /// Where each open attempt's metrics file was read up to, and its window.
    metrics_cursors: std::sync::Mutex<BTreeMap<String, super::metrics::MetricsCursor>>,
}

/// One op group: a run's ops (or an orphan's destroy) of one key, applied in order.
type GroupId = (QueueKey, String);

/// How an op group ended.
struct GroupDone {
    id: GroupId,
    applied: usize,
    failed: Option<(Op, ExecError)>,
}

/// Op groups still running, possibly from earlier passes. A pass never waits for
/// them: a run whose instance is ready is started while other runs' paced creates are
/// still waiting their turn, and a slow group holds up only its own run (a pass skips
/// a group still in flight; its end requeues its key).
///
/// Only as many groups as may apply at once are tasks; the rest wait in `waiting`, in
/// the order they were planned, and start as running ones end. A waiting group holds
/// its ops and nothing else: with 10,000 groups from one pass, a task (and its future)
/// each was the largest part of the controller's memory.
#[derive(Default)]
struct InFlight {
    set: JoinSet<GroupDone>,
    /// Running and waiting groups.
    groups: BTreeSet<GroupId>,
    waiting: std::collections::VecDeque<Waiting>,
    /// Keys with a group that failed since their groups last all ended.
    errored: BTreeSet<QueueKey>,
}

/// A group planned but not yet started: its ops are positions in its pass's plan.
struct Waiting {
    id: GroupId,
    plan: Arc<Vec<Op>>,
    ops: Vec<u32>,
    desired: Arc<Desired>,
}

impl InFlight {
    fn has_key(&self, key: &QueueKey) -> bool {
        // The groups of a key are contiguous, from (key, ""): a lookup, not a scan (a
        // pass asks this for every key, with thousands of groups in flight).
        self.groups
            .range((key.clone(), String::new())..)
            .next()
            .is_some_and(|(k, _)| k == key)
    }
}

/// What the end of a group asks of the loop: look at its key again after this long;
/// `replace` when the error policy decided (it overrides a sooner timer).
struct GroupRequeue {
    key: QueueKey,
    after: Duration,
    replace: bool,
}

impl Controller {
    pub fn new(
        executor: Arc<Executor>,
        source: Arc<dyn DesiredSource>,
        controller_id: impl Into<String>,
    ) -> Self {
        Controller {
            executor,
            source,
            controller_id: controller_id.into(),
            clock: Clock::new(),
            concurrency: 16,
            stopping: Arc::new(AtomicBool::new(false)),
            failures: std::sync::Mutex::new(BTreeMap::new()),
            metrics_written: std::sync::Mutex::new(BTreeMap::new()),
            metrics_cursors: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// One pass over everything, and its ops to their end; the `--once` CLI and tests
    /// use it.
    pub async fn run_once(&self) -> Result<PassReport, ControllerError> {
        let (_handle, shutdown) = Shutdown::new();
        let mut inflight = InFlight::default();
        let mut report = self.pass(&Due::All, &shutdown, &mut inflight).await?;
        while let Some(joined) = inflight.set.join_next().await {
            let Ok(done) = joined else {
                self.start_waiting(&mut inflight);
                continue;
            };
            if let Some(r) = self.group_ended(done, &mut inflight, &mut report) {
                report.requeue.insert(r.key, r.after);
            }
        }
        report.requeue_after = report.requeue.values().min().copied();
        Ok(report)
    }

    /// Runs until shut down: passes when keys are due or the desired state changes,
    /// sleeping in between (an idle controller sleeps until an event). Op groups run
    /// beside the loop; the end of one makes its key due again.
    pub async fn run(&self, mut shutdown: Shutdown) -> Result<(), ControllerError> {
        if let Err(e) = self.executor.creates_in_flight_until(self.now()) {
            tracing::warn!(error = %e, "cannot hold back the creates a predecessor left in flight");
        }
        let mut timers: BTreeMap<QueueKey, Instant> = BTreeMap::new();
        let mut inflight = InFlight::default();
        let mut due = Some(Due::All);
        // After a pass that could not read the world: when to try the whole pass again.
        let mut retry_all: Option<Instant> = None;
        // Kept across turns of the loop: a change seen while a timer fired (during the
        // source's debounce, say) must not be dropped with its future, or the change
        // waits for the next resync.
        let mut changed = self.source.changed();
        loop {
            if shutdown.count() >= 1 {
                return self.drain(inflight, shutdown).await;
            }
            if let Some(d) = due.take() {
                match self.pass(&d, &shutdown, &mut inflight).await {
                    Ok(report) => {
                        let now = Instant::now();
                        for (key, after) in &report.requeue {
                            // A key with a group in flight is looked at again when the
                            // group ends; its other runs still get a look, but not
                            // at the pace of the in-flight ops (a pass each 200 ms
                            // through a paced create wave would only re-list).
                            let after = if inflight.has_key(key) {
                                (*after).max(plan::REQUEUE_FAST)
                            } else {
                                *after
                            };
                            if d.contains(key) || !timers.contains_key(key) {
                                timers.insert(key.clone(), now + after);
                            }
                        }
                        // A due key the plan no longer wants to see is idle, unless a
                        // group of it still runs (its end requeues it).
                        timers.retain(|k, _| {
                            report.requeue.contains_key(k) || !d.contains(k) || inflight.has_key(k)
                        });
                    }
                    Err(e) => {
                        // The world could not even be read: try the whole pass again soon.
                        tracing::warn!(error = %e, "reconcile pass failed");
                        timers.clear();
                        retry_all = Some(Instant::now() + plan::REQUEUE_LISTING_FAILED);
                    }
                }
            }
            let next = timers.values().copied().chain(retry_all).min();
            enum Wake {
                Timer,
                Changed,
                Ended(Box<GroupDone>),
                Panicked,
                Stop,
            }
            let wake = tokio::select! {
                _ = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => Wake::Timer,
                _ = &mut changed => {
                    changed = self.source.changed();
                    Wake::Changed
                }
                Some(joined) = inflight.set.join_next(), if !inflight.set.is_empty() => match joined {
                    Ok(done) => Wake::Ended(Box::new(done)),
                    // A group that panicked: its key is looked at again by its timer.
                    Err(_) => Wake::Panicked,
                },
                _ = shutdown.reached(1) => Wake::Stop,
            };
            match wake {
                Wake::Stop => return self.drain(inflight, shutdown).await,
                // Its place goes to the next waiting group.
                Wake::Panicked => self.start_waiting(&mut inflight),
                Wake::Changed => {
                    retry_all = None;
                    due = Some(Due::All);
                }
                Wake::Ended(done) => {
                    let mut report = PassReport::default();
                    if let Some(r) = self.group_ended(*done, &mut inflight, &mut report) {
                        let at = Instant::now() + r.after;
                        let timer = timers.entry(r.key).or_insert(at);
                        if r.replace || at < *timer {
                            *timer = at;
                        }
                    }
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if retry_all.is_some_and(|at| at <= now) {
                        retry_all = None;
                        due = Some(Due::All);
                        continue;
                    }
                    let keys: BTreeSet<QueueKey> = timers
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in &keys {
                        timers.remove(k);
                    }
                    due = Some(Due::Keys(keys));
                }
            }
        }
    }

    /// The first shutdown signal: no new op starts, the ops in flight finish; a second
    /// signal aborts them.
    async fn drain(
        &self,
        mut inflight: InFlight,
        mut shutdown: Shutdown,
    ) -> Result<(), ControllerError> {
        self.stopping.store(true, Ordering::SeqCst);
        loop {
            tokio::select! {
                joined = inflight.set.join_next() => {
                    if joined.is_none() {
                        return Ok(());
                    }
                }
                _ = shutdown.reached(2) => {
                    inflight.set.abort_all();
                    return Err(ControllerError::Aborted);
                }
            }
        }
    }

    /// Folds an ended group into `report` and the failure counts; says when to look at
    /// its key again.
    fn group_ended(
        &self,
        done: GroupDone,
        inflight: &mut InFlight,
        report: &mut PassReport,
    ) -> Option<GroupRequeue> {
        inflight.groups.remove(&done.id);
        // Its place goes to the next waiting group.
        self.start_waiting(inflight);
        let key = done.id.0;
        report.applied += done.applied;
        let last = !inflight.has_key(&key);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match done.failed {
            Some((op, e)) => {
                tracing::warn!(op = %op, error = %error_chain(&e), "op failed");
                let n = failures.entry(key.clone()).or_insert(0);
                *n += 1;
                let after = requeue_after_error(&e.kind(), *n);
                report.failed.push((op.to_string(), error_chain(&e)));
                if last {
                    inflight.errored.remove(&key);
                } else {
                    inflight.errored.insert(key.clone());
                }
                // The error policy decides: a failure is not "look again in 2 s".
                Some(GroupRequeue {
                    key,
                    after,
                    replace: true,
                })
            }
            None => {
                if last && !inflight.errored.remove(&key) {
                    failures.remove(&key);
                }
                // What the ops changed is seen by the next look, soon.
                Some(GroupRequeue {
                    key,
                    after: plan::REQUEUE_STEP,
                    replace: false,
                })
            }
        }
    }

    async fn pass(
        &self,
        due: &Due,
        shutdown: &Shutdown,
        inflight: &mut InFlight,
    ) -> Result<PassReport, ControllerError> {
        let manifests = self.source.load().await.map_err(ControllerError::Source)?;
        // The fleets first: a fixed pool's listing walks the hosts they name.
        for provider in self.executor.providers.values() {
            provider.set_fleets(&manifests.fleets);
        }
        let desired = Arc::new(Desired::of(
            Arc::clone(&manifests),
            self.controller_id.clone(),
        ));
        // List FIRST, then read the store: an instance in the listing was created under
        // an intent the store already holds, so nothing looks like an orphan by mistake.
        let listed = self.list_all().await;
        let now = self.now();
        let hosts = self.hosts(&manifests.fleets, now);
        let mut history = self.history(&desired, now)?;
        let stop_when: BTreeMap<String, Vec<crate::manifest::StopRule>> = desired
            .jobs()
            .iter()
            .filter(|j| !j.spec.stop_when.is_empty())
            .map(|j| (j.name.clone(), j.spec.stop_when.clone()))
            .collect();
        let (agents, metrics) = self.observe(&listed, &history, due, &stop_when).await;
        self.record_progress(&agents, &mut history);
        let now = self.now();
        self.record_seen(&agents, &mut history, now);
        self.record_metrics(&desired, &metrics, now);
        let capabilities: BTreeMap<ProviderKind, Capabilities> = self
            .executor
            .providers
            .iter()
            .map(|(k, p)| (*k, p.capabilities()))
            .collect();
        let observed = Observed {
            listed,
            capabilities,
            hosts,
            agents,
            metrics,
        };
        let now = self.now();
        let plan = plan::plan(&desired, &observed, &history, now);
        // What the plan was made from goes before its groups are queued: at 10,000 jobs
        // the listing, the observations and every run's record are tens of MiB.
        drop((observed, history));
        Ok(self.dispatch(plan, desired, due, shutdown, inflight))
    }

    /// The agents' progress is an observation, not a decision: recorded here, in one
    /// write for every run whose progress moved, and never a planned op (a steady pass
    /// plans nothing however many runs make progress). `history` is updated to match.
    fn record_progress(&self, agents: &BTreeMap<String, AgentObservation>, history: &mut History) {
        let mut moved: Vec<(RunName, Progress)> = Vec::new();
        let mut ended: Vec<(RunName, u32, Outcome)> = Vec::new();
        for (tag, obs) in agents {
            let AgentObservation::Status(status) = obs else {
                continue;
            };
            // How the job ended, kept before anything is collected: the instance may
            // end itself before the collect goes through (see `History::ends`).
            if let (Some(outcome), Some(tag)) = (agent_end(status), OwnerTag::parse(tag))
                && !history.ends.contains_key(&(tag.run.clone(), tag.attempt))
            {
                history
                    .ends
                    .insert((tag.run.clone(), tag.attempt), outcome.clone());
                ended.push((tag.run, tag.attempt, outcome));
            }
            let (Some(p), Some(tag)) = (status.progress, OwnerTag::parse(tag)) else {
                continue;
            };
            let Some(rec) = history.runs.get_mut(&tag.run) else {
                continue;
            };
            let current = rec.attempt == tag.attempt;
            if current && (rec.progress_done, rec.progress_total) != (Some(p.done), p.total) {
                rec.progress_done = Some(p.done);
                rec.progress_total = p.total;
                moved.push((tag.run, p));
            }
        }
        let store = self
            .executor
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Err(e) = store.put_progress(&moved) {
            tracing::warn!(error = %error_chain(&e), "cannot record progress");
        }
        if let Err(e) = store.put_attempt_ends(&ended, self.now()) {
            tracing::warn!(error = %error_chain(&e), "cannot record how jobs ended");
        }
    }

    /// When each attempt's agent last answered, recorded at most every
    /// `SEEN_RECORD_SECS` per attempt (the planner's silence threshold is far longer),
    /// in one write. `history` is updated to match.
    fn record_seen(
        &self,
        agents: &BTreeMap<String, AgentObservation>,
        history: &mut History,
        now: Timestamp,
    ) {
        const SEEN_RECORD_SECS: i64 = 10;
        let mut seen = Vec::new();
        for (tag, obs) in agents {
            if matches!(obs, AgentObservation::Unreachable { .. }) {
                continue;
            }
            let Some(tag) = OwnerTag::parse(tag) else {
                continue;
            };
            let fresh = history
                .seen
                .get(&tag.run)
                .is_some_and(|(n, at)| *n == tag.attempt && now - at < SEEN_RECORD_SECS);
            if !fresh {
                history.seen.insert(tag.run.clone(), (tag.attempt, now));
                seen.push((tag.run, tag.attempt, now));
            }
        }
        let store = self
            .executor
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Err(e) = store.put_seen(&seen) {
            tracing::warn!(error = %error_chain(&e), "cannot record agents seen");
        }
    }

    /// The latest metrics line of each observed run, with the value of its first stop
    /// rule's metric (for `get runs -o wide` and `describe run`), written only when it
    /// changed.
    fn record_metrics(
        &self,
        desired: &Desired,
        metrics: &BTreeMap<String, Arc<super::stop::Watch>>,
        now: Timestamp,
    ) {
        let mut written = self
            .metrics_written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        for (tag, watch) in metrics {
            let (Some(tag), Some(last)) = (OwnerTag::parse(tag), watch.last()) else {
                continue;
            };
            let line = render_metrics(last);
            if written.get(&tag.run) == Some(&line) {
                continue;
            }
            let metric = desired
                .jobs()
                .iter()
                .find(|j| j.runs.iter().any(|r| r.name == tag.run))
                .and_then(|j| j.spec.stop_when.first())
                .map(|r| r.metric.clone());
            let value = metric.as_ref().and_then(|m| last.get(m).copied());
            written.insert(tag.run.clone(), line.clone());
            changed.push((
                tag.run,
                crate::store::RunMetrics {
                    attempt: tag.attempt,
                    line,
                    metric,
                    value,
                    at: now,
                },
            ));
        }
        drop(written);
        let store = self
            .executor
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Err(e) = store.put_metrics(&changed) {
            tracing::warn!(error = %error_chain(&e), "cannot record metrics");
        }
    }

    /// The hosts of fixed pools as each provider saw them in this pass's listing, for
    /// the planner's queues; written to the store too, for `get fleets`. A failure to
    /// write them is logged, never fatal: they are a view, rewritten every pass.
    fn hosts(&self, desired: &[Fleet], now: Timestamp) -> BTreeMap<ProviderKind, Vec<HostStatus>> {
        let out: BTreeMap<ProviderKind, Vec<HostStatus>> = self
            .executor
            .providers
            .iter()
            .map(|(k, p)| (*k, p.hosts()))
            .filter(|(_, hosts)| !hosts.is_empty())
            .collect();
        let statuses: Vec<&HostStatus> = out.values().flatten().collect();
        let store = self
            .executor
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let written = (|| -> Result<(), StoreError> {
            for s in &statuses {
                store.put_host(&HostRecord::of(s, now))?;
            }
            for f in desired {
                let names: Vec<&str> = f.hosts.iter().map(|h| h.name.as_str()).collect();
                store.forget_hosts_not_in(&f.name, &names)?;
            }
            // Fleets gone from the manifests: their hosts go too.
            let gone: BTreeSet<String> = store
                .hosts(None)?
                .into_iter()
                .map(|h| h.status.fleet)
                .filter(|f| !desired.iter().any(|d| d.name == *f))
                .collect();
            for f in gone {
                store.forget_hosts_not_in::<&str>(&f, &[])?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            tracing::warn!(error = %error_chain(&e), "cannot record fleet hosts");
        }
        out
    }

    async fn list_all(&self) -> BTreeMap<ProviderKind, ListResult> {
        let mut set = JoinSet::new();
        for (kind, provider) in &self.executor.providers {
            let (kind, provider) = (*kind, Arc::clone(provider));
            set.spawn(async move { (kind, provider.list().await) });
        }
        let mut listed = BTreeMap::new();
        while let Some(joined) = set.join_next().await {
            let Ok((kind, result)) = joined else { continue };
            let entry = match result {
                Ok(mut instances) => {
                    // Held for the whole pass; a listing grown page by page may hold
                    // twice the room its instances need.
                    instances.shrink_to_fit();
                    ListResult::Listed(instances)
                }
                Err(e) => {
                    tracing::warn!(provider = %kind, error = %e, "listing failed");
                    ListResult::Failed {
                        kind: e.kind.clone(),
                        message: e.to_string(),
                    }
                }
            };
            listed.insert(kind, entry);
        }
        listed
    }

    fn history(&self, desired: &Desired, now: Timestamp) -> Result<History, ControllerError> {
        let store = self
            .executor
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut h = History {
            stops: store.stops().map_err(ControllerError::Store)?,
            pauses: store.pauses().map_err(ControllerError::Store)?,
            seen: store.seen().map_err(ControllerError::Store)?,
            ..History::default()
        };
        // All attempts in one query, not one per run.
        let mut attempts = store.all_attempts().map_err(ControllerError::Store)?;
        for run in store.runs().map_err(ControllerError::Store)? {
            h.attempts.insert(
                run.name.clone(),
                attempts.remove(&run.name).unwrap_or_default(),
            );
            h.runs.insert(run.name.clone(), run);
        }
        for b in desired.budgets() {
            let jobs = budget::jobs_of(b, desired.jobs());
            let spent = store
                .spent(&jobs, budget::window_start(b, now))
                .map_err(ControllerError::Store)?;
            h.spent.insert(b.name.clone(), spent);
        }
        h.checkpoints = store
            .last_checkpoint_syncs()
            .map_err(ControllerError::Store)?;
        h.ends = store.attempt_ends().map_err(ControllerError::Store)?;
        h.kept = store.kept_disks().map_err(ControllerError::Store)?;
        Ok(h)
    }

    /// Observes the agent of every running instance that a live attempt of a due key
    /// holds; the rest are not observed (the planner waits on them).
    async fn observe(
        &self,
        listed: &BTreeMap<ProviderKind, ListResult>,
        history: &History,
        due: &Due,
        // Jobs with `stop_when` rules, and their rules: their metrics are read with the
        // status.
        stop_when: &BTreeMap<String, Vec<crate::manifest::StopRule>>,
    ) -> (
        BTreeMap<String, AgentObservation>,
        BTreeMap<String, Arc<super::stop::Watch>>,
    ) {
        let live: BTreeMap<String, &RunName> = history
            .attempts
            .iter()
            .flat_map(|(run, atts)| atts.iter().map(move |a| (run, a)))
            .filter(|(_, a)| a.released_at.is_none() && a.outcome.is_none())
            .filter(|(run, _)| {
                history
                    .runs
                    .get(*run)
                    .is_some_and(|r| due.contains(&QueueKey::Job(r.job.clone())))
            })
            .map(|(run, a)| (a.tag.clone(), run))
            .collect();
        let with_metrics: BTreeMap<String, &[crate::manifest::StopRule]> = live
            .iter()
            .filter_map(|(tag, run)| {
                let rules = stop_when.get(&history.runs.get(*run)?.job)?;
                Some((tag.clone(), rules.as_slice()))
            })
            .collect();
        let targets: Vec<&Instance> = listed
            .values()
            .filter_map(|l| match l {
                ListResult::Listed(v) => Some(v),
                ListResult::Failed { .. } => None,
            })
            .flatten()
            .filter(|i| i.tag.controller == self.controller_id)
            .filter(|i| i.state == InstanceState::Running && live.contains_key(&i.tag.render()))
            .collect();
        // Cursors of attempts no longer open go; the rest say where to read from.
        let cursors: BTreeMap<String, super::metrics::Position> = {
            let open: BTreeSet<String> = history
                .attempts
                .values()
                .flatten()
                .filter(|a| a.released_at.is_none() && a.outcome.is_none())
                .map(|a| a.tag.clone())
                .collect();
            let mut cursors = self
                .metrics_cursors
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            cursors.retain(|tag, _| open.contains(tag));
            cursors
                .iter()
                .filter_map(|(tag, c)| {
                    let rules = with_metrics.get(tag)?;
                    Some((tag.clone(), c.position(rules, METRICS_TAIL)))
                })
                .collect()
        };
        let limit = Arc::new(Semaphore::new(self.concurrency));
        let mut set = JoinSet::new();
        let mut out = BTreeMap::new();
        let mut metrics = BTreeMap::new();
        for inst in targets {
            // Only as many tasks as may observe at once, the next started as one ends:
            // each holds its whole future (about 1 KiB), and 10,000 spawned at once were
            // the largest part of a pass's peak at 10,000 jobs.
            while set.len() >= self.concurrency {
                match set.join_next().await {
                    Some(joined) => self.observed(joined, &with_metrics, &mut out, &mut metrics),
                    None => break,
                }
            }
            let inst = inst.clone();
            let Some(provider) = self.executor.providers.get(&inst.provider).cloned() else {
                continue;
            };
            let limit = Arc::clone(&limit);
            let read_metrics = with_metrics.contains_key(&inst.tag.render());
            let at = cursors.get(&inst.tag.render()).copied().unwrap_or_default();
            let executor = Arc::clone(&self.executor);
            set.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let _paced = executor.machine_permit(inst.provider).await;
                let tag = inst.tag.render();
                let mut metrics = None;
                tokio::time::sleep(crate::failpoint::delay("observe:before-status")).await;
                let obs = match provider.machine(&inst) {
                    Err(e) => AgentObservation::Unreachable {
                        message: e.to_string(),
                    },
                    Ok(m) => match m.observe().await {
                        Ok(None) => AgentObservation::NotStarted,
                        Ok(Some(s)) => {
                            if read_metrics {
                                // Only what the job wrote since the last pass; the
                                // tail again when the file is not the one read then.
                                let mut read =
                                    m.metrics_since(at.offset, at.file, METRICS_TAIL).await;
                                if at.offset > 0
                                    && read
                                        .as_ref()
                                        .is_ok_and(|r| !super::metrics::resumes(&at, r))
                                {
                                    read = m.metrics_since(0, None, METRICS_TAIL).await;
                                }
                                match read {
                                    Ok(read) => metrics = Some(read),
                                    Err(e) => {
                                        tracing::warn!(error = %e, "cannot read metrics");
                                    }
                                }
                            }
                            AgentObservation::Status(s)
                        }
                        Err(e) => AgentObservation::Unreachable {
                            message: e.to_string(),
                        },
                    },
                };
                (tag, obs, metrics)
            });
        }
        while let Some(joined) = set.join_next().await {
            self.observed(joined, &with_metrics, &mut out, &mut metrics);
        }
        (out, metrics)
    }

    /// Folds one ended observation into the pass's agents and metrics.
    fn observed(
        &self,
        joined: Result<
            (String, AgentObservation, Option<crate::agent::MetricsRead>),
            tokio::task::JoinError,
        >,
        with_metrics: &BTreeMap<String, &[crate::manifest::StopRule]>,
        out: &mut BTreeMap<String, AgentObservation>,
        metrics: &mut BTreeMap<String, Arc<super::stop::Watch>>,
    ) {
        if let Ok((tag, obs, m)) = joined {
            if let (Some(read), Some(rules)) = (m, with_metrics.get(&tag)) {
                let mut cursors = self
                    .metrics_cursors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let cursor = cursors.entry(tag.clone()).or_default();
                cursor.advance(&read, rules, METRICS_TAIL);
                metrics.insert(tag.clone(), cursor.watch());
            }
            out.insert(tag, obs);
        }
    }

    /// Starts the due keys' ops: one group per run (or per orphan), groups concurrently
    /// up to the limit, a group's ops in order, stopping at its first failure. Returns
    /// at once; a group still in flight from an earlier pass is not started again.
    fn dispatch(
        &self,
        plan: Plan,
        desired: Arc<Desired>,
        due: &Due,
        shutdown: &Shutdown,
        inflight: &mut InFlight,
    ) -> PassReport {
        let mut groups: BTreeMap<GroupId, Vec<u32>> = BTreeMap::new();
        for (at, op) in (0u32..).zip(&plan.ops) {
            let key = plan.key_of(op);
            if !due.contains(&key) {
                continue;
            }
            let group = match (op.run(), op) {
                (Some(run), _) => run.to_string(),
                (None, Op::Destroy { instance_id, .. }) => format!("orphan/{instance_id}"),
                (None, _) => String::new(),
            };
            groups.entry((key, group)).or_default().push(at);
        }
        let requeue_after = plan.requeue.values().min().copied();
        let requeue = plan.requeue;
        let ops_of_plan = Arc::new(plan.ops);
        let mut started: BTreeSet<QueueKey> = BTreeSet::new();
        // First shutdown signal: start nothing more.
        if shutdown.count() == 0 {
            for (id, mut ops) in groups {
                if inflight.groups.contains(&id) {
                    continue;
                }
                started.insert(id.0.clone());
                inflight.groups.insert(id.clone());
                // Grown one push at a time: most groups hold one or two ops.
                ops.shrink_to_fit();
                inflight.waiting.push_back(Waiting {
                    id,
                    plan: Arc::clone(&ops_of_plan),
                    ops,
                    desired: Arc::clone(&desired),
                });
            }
            self.start_waiting(inflight);
        }
        {
            // A due key that started nothing and has nothing running passed cleanly.
            let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            f.retain(|k, _| !due.contains(k) || started.contains(k) || inflight.has_key(k));
        }
        PassReport {
            requeue_after,
            planned: ops_of_plan,
            requeue,
            ..PassReport::default()
        }
    }

    /// Starts waiting groups, oldest first, while fewer than `concurrency` run. Called
    /// after a pass and after each group's end; never once shutting down.
    fn start_waiting(&self, inflight: &mut InFlight) {
        while inflight.set.len() < self.concurrency && !self.stopping.load(Ordering::SeqCst) {
            let Some(Waiting {
                id,
                plan,
                ops,
                desired,
            }) = inflight.waiting.pop_front()
            else {
                break;
            };
            let executor = Arc::clone(&self.executor);
            let stopping = Arc::clone(&self.stopping);
            let clock = self.clock;
            inflight.set.spawn(async move {
                let mut applied = 0;
                let mut failed: Option<(Op, ExecError)> = None;
                for op in ops.iter().filter_map(|&at| plan.get(at as usize)) {
                    // First shutdown signal: finish the op in flight, start no other.
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    match executor.apply(op, &desired, clock.now()).await {
                        Ok(()) => applied += 1,
                        Err(e) => {
                            failed = Some((op.clone(), e));
                            break;
                        }
                    }
                }
                GroupDone {
                    id,
                    applied,
                    failed,
                }
            });
        }
    }
}

/// How the job ended, when the agent says it has (its own word, not a decision).
fn agent_end(status: &crate::agent::AgentStatus) -> Option<Outcome> {
    use crate::agent::AgentState;
    match status.state {
        AgentState::Succeeded => Some(Outcome::Succeeded),
        AgentState::Failed => Some(Outcome::Failed {
            exit_code: status.exit_code,
        }),
        AgentState::TimedOut => Some(Outcome::TimedOut),
        AgentState::Stopped => Some(Outcome::Stopped),
        AgentState::Starting | AgentState::Setup | AgentState::Running => None,
    }
}

/// Providers by kind, as the executor holds them.
pub type Providers = BTreeMap<ProviderKind, Arc<dyn Provider>>;

/// True for the providers [`providers_for`] builds, i.e. those a controller can drive.
pub fn drives(kind: ProviderKind) -> bool {
    crate::provider::DRIVEN.contains(&kind)
}

/// The providers a controller in `home` drives (the provider layer's registry), with
/// the SSH pool they share.
pub fn providers_for(home: &Home) -> std::io::Result<crate::provider::Registry> {
    crate::provider::registry(home)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A metrics record as `step=120 val_acc=0.71`, `step` first.
fn render_metrics(record: &super::stop::Record) -> String {
    let mut parts: Vec<String> = record
        .get("step")
        .map(|s| format!("step={s}"))
        .into_iter()
        .collect();
    parts.extend(
        record
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .map(|(k, v)| format!("{k}={v}")),
    );
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_groups_in_flight_only_when_one_of_its_own_is() {
        let job = |n: &str| QueueKey::Job(n.to_string());
        let mut inflight = InFlight::default();
        assert!(!inflight.has_key(&job("a")));
        inflight.groups.insert((job("ab"), "ab-0".into()));
        inflight
            .groups
            .insert((QueueKey::Orphans, "orphan/i-1".into()));
        // A key that sorts just before another's, or shares its prefix, is not it.
        assert!(!inflight.has_key(&job("a")));
        assert!(!inflight.has_key(&job("b")));
        assert!(inflight.has_key(&job("ab")));
        assert!(inflight.has_key(&QueueKey::Orphans));
        inflight.groups.insert((job("a"), String::new()));
        assert!(inflight.has_key(&job("a")));
    }

    #[test]
    fn error_policy_table() {
        let s = Duration::from_secs;
        let table: Vec<(ErrorKind, u32, Duration)> = vec![
            (ErrorKind::NotFound, 1, s(1)),
            (ErrorKind::NotFound, 9, s(1)),
            (ErrorKind::Transient, 1, s(5)),
            (ErrorKind::Transient, 2, s(10)),
            (ErrorKind::Transient, 3, s(20)),
            (ErrorKind::Transient, 30, s(600)),
            (ErrorKind::NoCapacity, 1, s(5)),
            (
                ErrorKind::RateLimited {
                    retry_after: Some(s(42)),
                },
                1,
                s(42),
            ),
            // A retry-after shorter than our backoff does not make us hammer.
            (
                ErrorKind::RateLimited {
                    retry_after: Some(s(1)),
                },
                3,
                s(20),
            ),
            (ErrorKind::RateLimited { retry_after: None }, 2, s(10)),
            (ErrorKind::Unauthenticated, 1, s(300)),
            (ErrorKind::PermissionDenied, 1, s(300)),
            (ErrorKind::Quota, 2, s(300)),
            (ErrorKind::PaymentRequired, 1, s(300)),
            (ErrorKind::AlreadyExists, 4, s(1)),
            (ErrorKind::Permanent, 1, s(300)),
        ];
        for (kind, failures, want) in table {
            assert_eq!(
                requeue_after_error(&kind, failures),
                want,
                "{kind:?} after {failures} failures"
            );
        }
    }
}
