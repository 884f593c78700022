//! The in-process fake provider: a real, in-memory implementation of `Provider` held to
//! the same conformance suite as the real backends, with configurable latency, boot and
//! job times, and fault injection. It runs on tokio time, so tests under
//! `#[tokio::test(start_paused = true)]` run hours of simulated work instantly.

use super::{
    Capabilities, CreateRequest, Endpoint, ErrorKind, Instance, InstanceState, Provider,
    ProviderError, ProviderResult,
};
use crate::agent::{AgentError, AgentState, AgentStatus, LaunchSpec, Machine};
use crate::model::{
    InstanceId, Offer, OfferQuery, OwnerTag, Progress, ProviderKind, Timestamp, Usd,
};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// How the fake behaves when no fault is injected.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeConfig {
    /// Added to every provider call.
    pub latency: Duration,
    /// Time from create until the instance is listed `Running` and reachable.
    pub boot_time: Duration,
    /// Time from start until the simulated job ends.
    pub job_duration: Duration,
    /// Exit code of the simulated job: 0 succeeds, anything else fails.
    pub exit_code: i32,
    /// At most this many live instances; further creates get `NoCapacity`.
    pub capacity: Option<usize>,
    pub price_per_hour: Usd,
    /// What the fake declares about itself (listing lag, boot timeout, resync, ...).
    pub capabilities: Capabilities,
    /// Creates are paced as a cloud's launches are: one per gap, in turn, shared by
    /// every caller (zero: unpaced).
    pub create_gap: Duration,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            latency: Duration::from_millis(50),
            boot_time: Duration::from_secs(5),
            job_duration: Duration::from_secs(60),
            exit_code: 0,
            capacity: None,
            price_per_hour: Usd::from_dollars(1.0),
            capabilities: Capabilities::default(),
            create_gap: Duration::ZERO,
        }
    }
}

/// The operations faults can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    List,
    Create,
    Destroy,
    /// `Machine::start`.
    Start,
    /// `Machine::observe`.
    Observe,
    /// `Machine::collect`.
    Collect,
}

/// A failure to inject.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Fail with this error kind.
    Error(ErrorKind),
    /// `RateLimited` with this retry-after.
    RateLimited(Duration),
    /// `NoCapacity` (for `Create`).
    NoCapacity,
    /// The create happens but the call reports a `Transient` error: the ambiguous timeout.
    CreateThenFail,
    /// Before the call runs, the oldest running instance vanishes (a preemption).
    Vanish,
}

/// How many calls each operation received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    pub list: u64,
    pub create: u64,
    pub destroy: u64,
    pub start: u64,
    pub observe: u64,
    pub collect: u64,
}

/// One machine of the fake account, asimov's or not.
struct FakeInstance {
    /// The machine's label as the provider stores it (Vast `label`, Lambda `name`):
    /// an asimov tag, or anything a person typed. `list` shows only what parses as a tag.
    label: String,
    instance: Instance,
    created: Instant,
    /// Stopped by `stop_instance` (outbid, paused): listed `Stopped`, not reachable.
    stopped: bool,
    machine: Arc<FakeMachine>,
}

impl FakeInstance {
    fn tagged(&self) -> bool {
        OwnerTag::parse(&self.label).is_some()
    }
}

#[derive(Default)]
struct State {
    /// Every machine of the account, keyed by id: asimov's, and machines planted by
    /// `add_foreign` that `list` must filter out by their label.
    instances: BTreeMap<u64, FakeInstance>,
    next_id: u64,
    /// Deliberately wrong: `list` shows untagged machines too (see `break_tag_filter`).
    unfiltered: bool,
    faults: Vec<(Operation, Fault, u32)>,
    calls: Calls,
}

/// Seconds since the epoch that advance with tokio time (paused in tests), so the fake's
/// heartbeats agree with a controller reading the same clock.
#[derive(Debug, Clone, Copy)]
pub struct FakeClock {
    epoch_at_start: Timestamp,
    start: Instant,
}

impl FakeClock {
    pub fn new() -> Self {
        let epoch_at_start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        FakeClock {
            epoch_at_start,
            start: Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        self.epoch_at_start + self.start.elapsed().as_secs() as i64
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        FakeClock::new()
    }
}

/// The in-memory provider. Clone-free: share it as `Arc<FakeProvider>`.
pub struct FakeProvider {
    config: Mutex<FakeConfig>,
    /// When the next paced create may go (see `FakeConfig::create_gap`).
    next_create: Mutex<Option<Instant>>,
    state: Arc<Mutex<State>>,
    clock: FakeClock,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the fake: the data is still consistent per call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeProvider {
    pub fn new(config: FakeConfig) -> Self {
        FakeProvider {
            config: Mutex::new(config),
            next_create: Mutex::new(None),
            state: Arc::new(Mutex::new(State::default())),
            clock: FakeClock::new(),
        }
    }

    /// The clock the fake's heartbeats use.
    pub fn clock(&self) -> FakeClock {
        self.clock
    }

    pub fn set_config(&self, config: FakeConfig) {
        *lock(&self.config) = config;
    }

    fn config(&self) -> FakeConfig {
        lock(&self.config).clone()
    }

    /// The next `times` calls of `op` meet `fault` (faults queue up in order).
    pub fn inject(&self, op: Operation, fault: Fault, times: u32) {
        lock(&self.state).faults.push((op, fault, times));
    }

    /// Injected faults not yet consumed (counting repeats).
    pub fn pending_faults(&self) -> u32 {
        lock(&self.state).faults.iter().map(|(_, _, n)| *n).sum()
    }

    /// Call counts so far.
    pub fn calls(&self) -> Calls {
        lock(&self.state).calls
    }

    /// Every live asimov instance, without counting a call (for test assertions).
    pub fn instances(&self) -> Vec<Instance> {
        let st = lock(&self.state);
        st.instances
            .values()
            .filter(|f| f.tagged())
            .map(|f| self.current(f, &self.config()))
            .collect()
    }

    /// Adds a machine that asimov did not create, labelled `label` (not an asimov tag),
    /// to the same account as asimov's instances; `list` must filter it out.
    pub fn add_foreign(&self, label: &str) {
        let mut st = lock(&self.state);
        st.next_id += 1;
        let id = st.next_id;
        let instance = Instance {
            provider: ProviderKind::Fake,
            id: id.to_string(),
            // What a provider that ignored the label would make of it.
            tag: OwnerTag::new("?", label, 0),
            state: InstanceState::Running,
            endpoint: None,
            gpu: None,
            price_per_hour: self.config().price_per_hour,
            created_at: Some(self.clock.now()),
            host: None,
        };
        let machine = self.new_machine(id);
        st.instances.insert(
            id,
            FakeInstance {
                label: label.to_string(),
                instance,
                created: Instant::now(),
                stopped: false,
                machine,
            },
        );
    }

    /// Makes `list` show machines without an asimov tag too: a deliberately broken
    /// provider, so a test can prove the conformance suite catches one.
    pub fn break_tag_filter(&self) {
        lock(&self.state).unfiltered = true;
    }

    /// Stops the instance `id` (outbid, paused by the provider): it stays listed, as
    /// `Stopped`, and its machine cannot be reached. False when unknown.
    pub fn stop_instance(&self, id: &str) -> bool {
        let Ok(n) = id.parse::<u64>() else {
            return false;
        };
        match lock(&self.state).instances.get_mut(&n) {
            Some(f) => {
                f.stopped = true;
                true
            }
            None => false,
        }
    }

    fn new_machine(&self, id: u64) -> Arc<FakeMachine> {
        Arc::new(FakeMachine {
            state: Arc::clone(&self.state),
            id,
            clock: self.clock,
            config: self.config(),
            job: Mutex::new(None),
        })
    }

    /// The instance `id` vanishes, as a preempted spot instance does. False when unknown.
    pub fn vanish(&self, id: &str) -> bool {
        let Ok(n) = id.parse::<u64>() else {
            return false;
        };
        lock(&self.state).instances.remove(&n).is_some()
    }

    fn take_fault(&self, op: Operation) -> Option<Fault> {
        let mut st = lock(&self.state);
        let pos = st.faults.iter().position(|(o, _, n)| *o == op && *n > 0)?;
        let fault = st.faults[pos].1.clone();
        st.faults[pos].2 -= 1;
        if st.faults[pos].2 == 0 {
            st.faults.remove(pos);
        }
        if fault == Fault::Vanish {
            let oldest = st
                .instances
                .iter()
                .find(|(_, f)| f.tagged() && f.created.elapsed() >= self.config().boot_time)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                st.instances.remove(&k);
            }
            return None;
        }
        Some(fault)
    }

    fn error(&self, step: &'static str, fault: Fault) -> ProviderError {
        let kind = match fault {
            Fault::Error(kind) => kind,
            Fault::RateLimited(d) => ErrorKind::RateLimited {
                retry_after: Some(d),
            },
            Fault::NoCapacity => ErrorKind::NoCapacity,
            Fault::CreateThenFail | Fault::Vanish => ErrorKind::Transient,
        };
        ProviderError::new(ProviderKind::Fake, kind, step, "injected fault")
    }

    fn current(&self, f: &FakeInstance, config: &FakeConfig) -> Instance {
        let mut i = f.instance.clone();
        if f.stopped {
            i.state = InstanceState::Stopped;
        } else if f.created.elapsed() >= config.boot_time {
            i.state = InstanceState::Running;
            i.endpoint = Some(Endpoint::Local {
                root: format!("/fake/{}", i.id).into(),
            });
        }
        i
    }

    fn count(&self, op: Operation) {
        let mut st = lock(&self.state);
        let c = &mut st.calls;
        match op {
            Operation::List => c.list += 1,
            Operation::Create => c.create += 1,
            Operation::Destroy => c.destroy += 1,
            Operation::Start => c.start += 1,
            Operation::Observe => c.observe += 1,
            Operation::Collect => c.collect += 1,
        }
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Fake
    }

    fn capabilities(&self) -> Capabilities {
        self.config().capabilities
    }

    /// One offer, while there is room: the configured GPU-less machine at its price.
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        let config = self.config();
        tokio::time::sleep(config.latency).await;
        let full = config
            .capacity
            .is_some_and(|c| lock(&self.state).instances.len() >= c);
        let offer = Offer::new(ProviderKind::Fake, "fake", config.price_per_hour);
        Ok(std::iter::once(offer)
            .filter(|o| !full && query.matches(o))
            .collect())
    }

    async fn list(&self) -> ProviderResult<Vec<Instance>> {
        let config = self.config();
        tokio::time::sleep(config.latency).await;
        self.count(Operation::List);
        if let Some(f) = self.take_fault(Operation::List) {
            return Err(self.error("list instances", f));
        }
        let st = lock(&self.state);
        Ok(st
            .instances
            .values()
            .filter(|f| st.unfiltered || f.tagged())
            .map(|f| self.current(f, &config))
            .collect())
    }

    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance> {
        let config = self.config();
        if !config.create_gap.is_zero() {
            // Take the next turn, then wait for it (a pacer's queue).
            let turn = {
                let mut next = lock(&self.next_create);
                let now = Instant::now();
                let turn = next.map_or(now, |t| t.max(now));
                *next = Some(turn + config.create_gap);
                turn
            };
            tokio::time::sleep_until(turn).await;
        }
        tokio::time::sleep(config.latency).await;
        self.count(Operation::Create);
        let fault = self.take_fault(Operation::Create);
        if let Some(f) = &fault
            && *f != Fault::CreateThenFail
        {
            return Err(self.error("create instance", f.clone()));
        }
        let mut st = lock(&self.state);
        // The tag is already there (a create retried after an ambiguous failure): the
        // same instance, not a second one.
        let label = req.tag.render();
        if let Some(f) = st.instances.values().find(|f| f.label == label) {
            let found = self.current(f, &config);
            drop(st);
            if fault.is_some() {
                return Err(self.error("create instance", Fault::CreateThenFail));
            }
            return Ok(found);
        }
        let live = st.instances.values().filter(|f| f.tagged()).count();
        if config.capacity.is_some_and(|c| live >= c) {
            return Err(ProviderError::new(
                ProviderKind::Fake,
                ErrorKind::NoCapacity,
                "create instance",
                "no machine free",
            ));
        }
        st.next_id += 1;
        let n = st.next_id;
        let instance = Instance {
            provider: ProviderKind::Fake,
            id: n.to_string(),
            tag: req.tag.clone(),
            state: InstanceState::Provisioning,
            endpoint: None,
            gpu: req
                .resources
                .gpu
                .as_ref()
                .and_then(|g| g.names.first().cloned()),
            price_per_hour: config.price_per_hour,
            created_at: Some(self.clock.now()),
            host: None,
        };
        let machine = self.new_machine(n);
        st.instances.insert(
            n,
            FakeInstance {
                label,
                instance: instance.clone(),
                created: Instant::now(),
                stopped: false,
                machine,
            },
        );
        drop(st);
        if fault.is_some() {
            return Err(self.error("create instance", Fault::CreateThenFail));
        }
        Ok(instance)
    }

    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()> {
        tokio::time::sleep(self.config().latency).await;
        self.count(Operation::Destroy);
        if let Some(f) = self.take_fault(Operation::Destroy) {
            return Err(self.error("destroy instance", f));
        }
        let gone = id
            .parse::<u64>()
            .ok()
            .and_then(|n| lock(&self.state).instances.remove(&n));
        match gone {
            Some(_) => Ok(()),
            None => Err(ProviderError::new(
                ProviderKind::Fake,
                ErrorKind::NotFound,
                "destroy instance",
                format!("no instance {id}"),
            )),
        }
    }

    fn machine(&self, instance: &Instance) -> ProviderResult<Arc<dyn Machine>> {
        let config = self.config();
        let st = lock(&self.state);
        let found = instance
            .id
            .parse::<u64>()
            .ok()
            .and_then(|n| st.instances.get(&n));
        match found {
            Some(f) if f.stopped => Err(ProviderError::new(
                ProviderKind::Fake,
                ErrorKind::Transient,
                "reach instance",
                "stopped",
            )),
            Some(f) if f.created.elapsed() >= config.boot_time => {
                Ok(Arc::clone(&f.machine) as Arc<dyn Machine>)
            }
            Some(_) => Err(ProviderError::new(
                ProviderKind::Fake,
                ErrorKind::Transient,
                "reach instance",
                "still booting",
            )),
            None => Err(ProviderError::new(
                ProviderKind::Fake,
                ErrorKind::NotFound,
                "reach instance",
                format!("no instance {}", instance.id),
            )),
        }
    }
}

struct FakeJob {
    run: String,
    started: Instant,
    started_at: Timestamp,
    stopped: Option<Instant>,
    max_duration: Option<Duration>,
}

/// A simulated machine: a started job runs for `job_duration` of tokio time, advancing
/// its progress, then ends with the configured exit code.
pub struct FakeMachine {
    state: Arc<Mutex<State>>,
    id: u64,
    clock: FakeClock,
    config: FakeConfig,
    job: Mutex<Option<FakeJob>>,
}

impl FakeMachine {
    fn fault(&self, op: Operation, step: &'static str) -> Result<(), AgentError> {
        let mut st = lock(&self.state);
        match op {
            Operation::Start => st.calls.start += 1,
            Operation::Observe => st.calls.observe += 1,
            Operation::Collect => st.calls.collect += 1,
            _ => {}
        }
        let alive = st.instances.contains_key(&self.id);
        let pos = st.faults.iter().position(|(o, _, n)| *o == op && *n > 0);
        if let Some(pos) = pos {
            st.faults[pos].2 -= 1;
            if st.faults[pos].2 == 0 {
                st.faults.remove(pos);
            }
            return Err(AgentError::Failed {
                machine: format!("fake/{}", self.id),
                step,
                message: "injected fault".into(),
            });
        }
        if !alive {
            return Err(AgentError::Failed {
                machine: format!("fake/{}", self.id),
                step,
                message: "instance is gone".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Machine for FakeMachine {
    // The fake keeps no files, no log and no terminal: it refuses what needs them, as
    // the planner's tests expect of a machine without them.
    async fn gpus(&self) -> Result<crate::agent::GpuProbe, AgentError> {
        Ok(crate::agent::GpuProbe::Unchecked)
    }

    async fn copy_log(&self, _to: &Path) -> Result<bool, AgentError> {
        Err(keeps_no("read log", "log"))
    }

    async fn follow_log(&self) -> Result<crate::transport::ByteStream<'_>, AgentError> {
        Err(keeps_no("follow log", "log"))
    }

    async fn sync_checkpoint(&self, _path: &str, _into: &Path) -> Result<bool, AgentError> {
        Err(keeps_no("sync checkpoint", "files"))
    }

    async fn metrics_tail(&self, _max_bytes: usize) -> Result<String, AgentError> {
        Ok(String::new())
    }

    async fn metrics_since(
        &self,
        _offset: u64,
        _file: Option<u64>,
        _max_bytes: usize,
    ) -> Result<crate::agent::MetricsRead, AgentError> {
        Ok(crate::agent::MetricsRead::default())
    }

    async fn sync_s3(&self, _last: bool) -> Result<crate::agent::S3Synced, AgentError> {
        Err(keeps_no("sync to s3", "files"))
    }

    async fn interactive(
        &self,
        _session: crate::agent::Session,
        _run: &str,
    ) -> Result<std::process::Command, AgentError> {
        Err(keeps_no("open an interactive session", "terminal"))
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<(), AgentError> {
        self.fault(Operation::Start, "start job")?;
        let mut job = lock(&self.job);
        if job.is_none() {
            *job = Some(FakeJob {
                run: spec.run.clone(),
                started: Instant::now(),
                started_at: self.clock.now(),
                stopped: None,
                max_duration: spec.max_duration,
            });
        }
        Ok(())
    }

    async fn observe(&self) -> Result<Option<AgentStatus>, AgentError> {
        self.fault(Operation::Observe, "read status")?;
        let job = lock(&self.job);
        let Some(j) = job.as_ref() else {
            return Ok(None);
        };
        let total = self.config.job_duration.as_secs().max(1);
        let elapsed = j.started.elapsed();
        let (state, exit_code, ended) = if let Some(at) = j.stopped {
            (AgentState::Stopped, None, Some(at - j.started))
        } else if j
            .max_duration
            .is_some_and(|m| elapsed > m && m < self.config.job_duration)
        {
            (AgentState::TimedOut, None, j.max_duration)
        } else if elapsed >= self.config.job_duration {
            let state = if self.config.exit_code == 0 {
                AgentState::Succeeded
            } else {
                AgentState::Failed
            };
            (
                state,
                Some(self.config.exit_code),
                Some(self.config.job_duration),
            )
        } else {
            (AgentState::Running, None, None)
        };
        let done = ended.unwrap_or(elapsed).as_secs().min(total);
        Ok(Some(AgentStatus {
            state,
            exit_code,
            heartbeat: Some(self.clock.now()),
            started_at: Some(j.started_at),
            finished_at: ended.map(|d| j.started_at + d.as_secs() as i64),
            progress: Some(Progress {
                done,
                total: Some(total),
            }),
            dead_for: None,
        }))
    }

    async fn log_tail(&self, max_bytes: usize) -> Result<String, AgentError> {
        let job = lock(&self.job);
        let log = match job.as_ref() {
            Some(j) => format!("fake job {} on instance {}\n", j.run, self.id),
            None => String::new(),
        };
        let start = log.len().saturating_sub(max_bytes);
        Ok(log.get(start..).unwrap_or_default().to_string())
    }

    async fn collect(&self, log: &Path, outputs: &Path) -> Result<(), AgentError> {
        self.fault(Operation::Collect, "collect outputs")?;
        let text = self.log_tail(usize::MAX).await?;
        let io = |source: std::io::Error| AgentError::Failed {
            machine: format!("fake/{}", self.id),
            step: "collect outputs",
            message: source.to_string(),
        };
        if let Some(dir) = log.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        tokio::fs::write(log, text).await.map_err(io)?;
        tokio::fs::create_dir_all(outputs).await.map_err(io)?;
        tokio::fs::write(outputs.join("result.txt"), b"ok\n")
            .await
            .map_err(io)?;
        Ok(())
    }

    async fn stop(&self) -> Result<(), AgentError> {
        if let Some(j) = lock(&self.job).as_mut()
            && j.stopped.is_none()
        {
            j.stopped = Some(Instant::now());
        }
        Ok(())
    }
}

/// The refusal of a fake machine asked for what it does not keep.
fn keeps_no(step: &'static str, what: &str) -> AgentError {
    AgentError::Rejected {
        step,
        message: format!("this machine keeps no {what}"),
    }
}
