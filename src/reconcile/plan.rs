//! The planner: a pure function from (desired, observed, history, now) to the ops that
//! move the world one step closer to the desired state, and when to look again.
//!
//! No runtime, no clock, no I/O: everything it decides on is passed in, so every rule
//! (create, adopt, restart, failover, budgets, orphans, deletion) is a table test.
//!
//! Invariants it keeps:
//! - an instance is created only under a recorded attempt intent, and re-created with the
//!   SAME tag only once the provider had a grace period to list it: never two instances
//!   for one run;
//! - absence from a failed listing is never read as "gone": nothing is released or
//!   forgotten on a provider whose listing failed this pass;
//! - an instance carrying this controller's tag that no live attempt owns is destroyed;
//!   other controllers' instances are never touched;
//! - runs on a fixed pool (a fleet) wait in a queue, per fleet in apply order (`seq`),
//!   and are created only when the fit rule (`HostStatus::fits`) finds them a reachable
//!   host; an instance on a host that does not answer is never destroyed nor counted as
//!   a live instance until the host answers again;
//! - every key is looked at again within its providers' resync period, so what changes
//!   behind asimov's back (a billing instance, a silent agent) is noticed while idle;
//! - a paused attempt that keeps its disk (`keep_disk_on_pause`) holds its stopped
//!   instance, and nothing else: a delete, `asimov destroy` or a start refused on
//!   resume destroys it, so no stopped disk bills on unowned;
//! - what time alone changes (cost so far, progress between phases) is no op: readers
//!   derive cost from the price and the billing start, and the controller records
//!   observed progress; a steady pass plans nothing, however many runs there are.
//!
//! What a provider is (listing lag, boot timeout, resync, fixed pool) comes in as data,
//! its `Capabilities`; the planner names no provider.

use super::budget::{self, BudgetState};
use crate::agent::{AgentState, AgentStatus};
use crate::manifest::{Budget, BudgetAction, Job, Manifests, RunSpec};
use crate::model::{
    HostStatus, InstanceId, JobName, Outcome, OwnerTag, Phase, Progress, ProviderKind, RunName,
    Timestamp, Usd,
};
use crate::provider::{Capabilities, ErrorKind, Instance, InstanceState};
use crate::store::{AttemptRecord, KeptDisk, Pause, RunRecord};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Look again at once: a step was just taken (created, started, collected, destroyed...)
/// and the next one can usually follow; waiting longer only adds to what asimov costs
/// on top of the job.
pub const REQUEUE_STEP: Duration = Duration::from_millis(200);
/// Look again soon: something is being provisioned, started or destroyed.
pub const REQUEUE_FAST: Duration = Duration::from_secs(2);
/// Look again at a running job: its progress, and above all whether it ended (the
/// outputs come back and a paid instance is destroyed within this much of the end).
pub const REQUEUE_RUNNING: Duration = Duration::from_secs(3);
/// How often a running job's checkpoint folder is synced when `checkpoint.every` is
/// not given.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10 * 60);
/// A provider's listing failed with no hint of when to come back; try it again.
pub const REQUEUE_LISTING_FAILED: Duration = Duration::from_secs(10);
/// A listing refused for a reason a person must fix (credentials, payment).
pub const REQUEUE_NEEDS_PERSON: Duration = Duration::from_secs(300);
/// A run held back by a budget or a missing provider.
pub const REQUEUE_BLOCKED: Duration = Duration::from_secs(60);
/// An agent whose heartbeat is older than this is lost (treated like a preemption); so
/// is an attempt whose agent (or fleet host) has not answered for this long. Shorter
/// silences (a network blip, failed status calls) are waited out: never a restart.
pub const HEARTBEAT_STALE_SECS: i64 = 60;

/// The desired state this pass: validated jobs (with their runs) and budgets.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// Shared with the source that loaded them, not copied: at 10,000 jobs a copy per
    /// pass was some 10 MiB of the controller's peak.
    pub manifests: Arc<Manifests>,
    /// This home's controller id, the `<controller>` of ownership tags.
    pub controller: String,
    /// Every run as (job, run) positions, by run name; built on first use.
    runs_by_name: std::sync::OnceLock<Vec<(u32, u32)>>,
}

impl PartialEq for Desired {
    fn eq(&self, other: &Desired) -> bool {
        self.manifests == other.manifests && self.controller == other.controller
    }
}

impl Desired {
    /// The desired state `manifests` for controller `controller`.
    pub fn of(manifests: Arc<Manifests>, controller: impl Into<String>) -> Desired {
        Desired {
            manifests,
            controller: controller.into(),
            runs_by_name: std::sync::OnceLock::new(),
        }
    }

    /// A desired state of its own (tests, previews): `jobs` and `budgets`, no fleets.
    pub fn new(jobs: Vec<Job>, budgets: Vec<Budget>, controller: impl Into<String>) -> Desired {
        let manifests = Manifests {
            jobs,
            budgets,
            ..Manifests::default()
        };
        Desired::of(Arc::new(manifests), controller)
    }

    /// The job and run spec of the desired run `run`. A lookup, not a scan: the
    /// executor asks it for every op, 20,000 of them in a pass at 10,000 jobs.
    pub fn find_run(&self, run: &str) -> Option<(&Job, &RunSpec)> {
        let jobs = self.jobs();
        let spec = |&(j, r): &(u32, u32)| {
            let job = &jobs[j as usize];
            (job, &job.runs[r as usize])
        };
        let index = self.runs_by_name.get_or_init(|| {
            let mut index: Vec<(u32, u32)> = (0u32..)
                .zip(jobs)
                .flat_map(|(j, job)| (0u32..).zip(&job.runs).map(move |(r, _)| (j, r)))
                .collect();
            // Stable: of two runs with one name (never valid), the first one wins, as
            // with a scan.
            index.sort_by(|a, b| spec(a).1.name.cmp(&spec(b).1.name));
            index
        });
        let at = index.partition_point(|p| spec(p).1.name.as_str() < run);
        index.get(at).map(spec).filter(|(_, r)| r.name == run)
    }

    pub fn jobs(&self) -> &[Job] {
        &self.manifests.jobs
    }

    pub fn budgets(&self) -> &[Budget] {
        &self.manifests.budgets
    }
}

/// One provider's listing this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum ListResult {
    Listed(Vec<Instance>),
    /// The listing failed: absence tells nothing this pass.
    Failed {
        kind: ErrorKind,
        message: String,
    },
}

/// What the agent on an instance said this pass.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentObservation {
    /// The machine answered: nothing was started on it yet.
    NotStarted,
    Status(AgentStatus),
    /// The machine could not be reached (yet).
    Unreachable {
        message: String,
    },
}

/// What exists, as providers and agents said this pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// One entry per configured provider; a provider without an entry is not configured.
    pub listed: BTreeMap<ProviderKind, ListResult>,
    /// What each configured provider declares about itself; a provider without an entry
    /// has `Capabilities::default()`.
    pub capabilities: BTreeMap<ProviderKind, Capabilities>,
    /// The hosts of fixed pools, by provider, in manifest order, as the same listing saw
    /// them. A fleet with no host here is not queued: its runs go straight to create.
    pub hosts: BTreeMap<ProviderKind, Vec<HostStatus>>,
    /// Agent observations keyed by the instance's rendered ownership tag. An instance
    /// without an entry was not observed this pass: the planner waits, it never guesses.
    pub agents: BTreeMap<String, AgentObservation>,
    /// What the `stop_when` rules need of the latest metrics of running jobs that have
    /// them, by rendered tag (see `reconcile::stop::Watch`).
    pub metrics: BTreeMap<String, std::sync::Arc<super::stop::Watch>>,
}

/// What the store remembers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub runs: BTreeMap<RunName, RunRecord>,
    /// Every attempt of every run, any order.
    pub attempts: BTreeMap<RunName, Vec<AttemptRecord>>,
    /// Ledger spending of each budget inside its window, by budget name.
    pub spent: BTreeMap<String, Usd>,
    /// Runs stopped by `asimov destroy`, with the job spec hash the stop holds for.
    pub stops: BTreeMap<RunName, String>,
    /// The last complete checkpoint sync of each run: (attempt, when).
    pub checkpoints: BTreeMap<RunName, (u32, Timestamp)>,
    /// The last `asimov pause` / `asimov resume` of each run that had one.
    pub pauses: BTreeMap<RunName, Pause>,
    /// When the agent of each run's newest seen attempt last answered: (attempt, when).
    pub seen: BTreeMap<RunName, (u32, Timestamp)>,
    /// How attempts' jobs ended as their agents said, recorded when first seen:
    /// (run, attempt) → outcome. An instance gone after that ended the job, not a
    /// preemption.
    pub ends: BTreeMap<(RunName, u32), Outcome>,
    /// Attempts whose instance is (being) stopped with its disk kept on pause:
    /// (run, attempt) → record. Such an attempt stays open while paused.
    pub kept: BTreeMap<(RunName, u32), KeptDisk>,
}

/// A change of a run's status, with the outcome of its current attempt when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub run: RunName,
    pub phase: Phase,
    pub reason: String,
    pub progress: Option<Progress>,
    pub exit_code: Option<i32>,
    /// `(attempt, outcome)`: the attempt has ended this way (its instance is now to be
    /// destroyed and then released).
    pub outcome: Option<(u32, Outcome)>,
}

/// One idempotent step. Applying an op twice, or after a crash half-way, is harmless.
///
/// An instance rides boxed: inline it made every op (a status change as much as a
/// start) some 300 bytes, and a pass at 10,000 jobs plans 20,000 ops.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Insert (or, on a spec change, reset to Pending) the store row of a desired run.
    RecordRun {
        run: RunName,
        job: JobName,
        index: u32,
        spec_hash: String,
        matrix: BTreeMap<String, String>,
        /// On a spec change of a finished run: this attempt's outcome becomes
        /// [`Outcome::SpecChanged`], which starts a fresh generation of attempts.
        supersede: Option<u32>,
    },
    /// Write the attempt intent FIRST, then ask the provider for an instance with `tag`.
    Create {
        run: RunName,
        attempt: u32,
        placement_index: u32,
        provider: ProviderKind,
        tag: OwnerTag,
    },
    /// The listing shows our tag but the store lacks the instance id: record it.
    Adopt {
        run: RunName,
        attempt: u32,
        provider: ProviderKind,
        instance: InstanceId,
    },
    /// Start the job on the instance through the agent (a no-op when already started).
    Start {
        run: RunName,
        attempt: u32,
        instance: Box<Instance>,
    },
    SetStatus(StatusUpdate),
    /// Bring the run's checkpoint folder home while it runs (its last sync is part of
    /// `Collect`).
    SyncCheckpoint {
        run: RunName,
        attempt: u32,
        instance: Box<Instance>,
    },
    /// Bring the log, the checkpoint and the outputs home.
    Collect {
        run: RunName,
        attempt: u32,
        instance: Box<Instance>,
    },
    /// Destroy an instance; `NotFound` counts as done.
    Destroy {
        provider: ProviderKind,
        instance_id: InstanceId,
        /// The run the instance belongs to, `None` for an orphan of an unknown run.
        run: Option<RunName>,
        reason: String,
    },
    /// The provider confirmed the attempt's instance gone: close the attempt.
    Release {
        run: RunName,
        attempt: u32,
        outcome: Outcome,
    },
    /// The job was deleted and every attempt is released: drop the run.
    Forget {
        run: RunName,
    },
    /// Hold the run in Pending with a reason (budget, unconfigured provider).
    Block {
        run: RunName,
        reason: String,
    },
    /// Record that the paused attempt keeps its disk, before its final sync and the
    /// stop: the attempt stays open, its stopped instance is started again on resume.
    KeepDisk {
        run: RunName,
        attempt: u32,
    },
    /// Stop the job on the machine (its run not ended: no end-of-run hook), then stop
    /// the instance keeping its disk; from then it bills storage only.
    StopKeepingDisk {
        run: RunName,
        attempt: u32,
        instance: Box<Instance>,
    },
    /// Start the kept attempt's stopped instance again (waiting, within the provider's
    /// `keep_disk` time, for it to run); a refusal for good is recorded for the planner.
    StartKept {
        run: RunName,
        attempt: u32,
        instance: Box<Instance>,
    },
    /// Run the job again on the kept disk, in the same working folder, resuming from
    /// the checkpoint there (`ASIMOV_RESUME_FROM`); the attempt is no longer kept.
    ResumeKept {
        run: RunName,
        attempt: u32,
        instance: Box<Instance>,
    },
}

impl Op {
    /// The run this op acts on, `None` for the destroy of an orphan of an unknown run.
    pub fn run(&self) -> Option<&str> {
        match self {
            Op::RecordRun { run, .. }
            | Op::Create { run, .. }
            | Op::Adopt { run, .. }
            | Op::Start { run, .. }
            | Op::Collect { run, .. }
            | Op::SyncCheckpoint { run, .. }
            | Op::Release { run, .. }
            | Op::Forget { run }
            | Op::Block { run, .. }
            | Op::KeepDisk { run, .. }
            | Op::StopKeepingDisk { run, .. }
            | Op::StartKept { run, .. }
            | Op::ResumeKept { run, .. } => Some(run),
            Op::SetStatus(s) => Some(&s.run),
            Op::Destroy { run, .. } => run.as_deref(),
        }
    }

    /// Short name of the op's kind: "create", "destroy", ...
    pub fn kind(&self) -> &'static str {
        match self {
            Op::RecordRun { .. } => "record-run",
            Op::Create { .. } => "create",
            Op::Adopt { .. } => "adopt",
            Op::Start { .. } => "start",
            Op::SetStatus(_) => "set-status",
            Op::Collect { .. } => "collect",
            Op::SyncCheckpoint { .. } => "sync-checkpoint",
            Op::Destroy { .. } => "destroy",
            Op::Release { .. } => "release",
            Op::Forget { .. } => "forget",
            Op::Block { .. } => "block",
            Op::KeepDisk { .. } => "keep-disk",
            Op::StopKeepingDisk { .. } => "stop-keeping-disk",
            Op::StartKept { .. } => "start-kept",
            Op::ResumeKept { .. } => "resume-kept",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::RecordRun {
                run,
                job,
                index,
                spec_hash,
                matrix,
                supersede,
            } => {
                write!(
                    f,
                    "record-run {run} job={job} index={index} spec={spec_hash}"
                )?;
                for (k, v) in matrix {
                    write!(f, " {k}={v}")?;
                }
                if let Some(a) = supersede {
                    write!(f, " supersede-attempt={a}")?;
                }
                Ok(())
            }
            Op::Create {
                run,
                attempt,
                placement_index,
                provider,
                tag,
            } => write!(
                f,
                "create {run} attempt={attempt} placement={placement_index} provider={provider} tag={tag}"
            ),
            Op::Adopt {
                run,
                attempt,
                provider,
                instance,
            } => write!(f, "adopt {run} attempt={attempt} {provider}/{instance}"),
            Op::Start {
                run,
                attempt,
                instance,
            } => write!(
                f,
                "start {run} attempt={attempt} {}/{}",
                instance.provider, instance.id
            ),
            Op::SetStatus(s) => {
                write!(f, "set-status {} {} {:?}", s.run, s.phase, s.reason)?;
                if let Some(p) = s.progress {
                    match p.total {
                        Some(t) => write!(f, " progress={}/{t}", p.done)?,
                        None => write!(f, " progress={}", p.done)?,
                    }
                }
                if let Some(c) = s.exit_code {
                    write!(f, " exit={c}")?;
                }
                if let Some((a, o)) = &s.outcome {
                    write!(f, " attempt {a} ended={o}")?;
                }
                Ok(())
            }
            Op::Collect {
                run,
                attempt,
                instance,
            } => write!(
                f,
                "collect {run} attempt={attempt} {}/{}",
                instance.provider, instance.id
            ),
            Op::SyncCheckpoint {
                run,
                attempt,
                instance,
            } => write!(
                f,
                "sync-checkpoint {run} attempt={attempt} {}/{}",
                instance.provider, instance.id
            ),
            Op::Destroy {
                provider,
                instance_id,
                run,
                reason,
            } => write!(
                f,
                "destroy {provider}/{instance_id} run={} {reason:?}",
                run.as_deref().unwrap_or("-")
            ),
            Op::Release {
                run,
                attempt,
                outcome,
            } => write!(f, "release {run} attempt={attempt} outcome={outcome}"),
            Op::Forget { run } => write!(f, "forget {run}"),
            Op::Block { run, reason } => write!(f, "block {run} {reason:?}"),
            Op::KeepDisk { run, attempt } => write!(f, "keep-disk {run} attempt={attempt}"),
            Op::StopKeepingDisk {
                run,
                attempt,
                instance,
            }
            | Op::StartKept {
                run,
                attempt,
                instance,
            }
            | Op::ResumeKept {
                run,
                attempt,
                instance,
            } => write!(
                f,
                "{} {run} attempt={attempt} {}/{}",
                self.kind(),
                instance.provider,
                instance.id
            ),
        }
    }
}

/// What the controller's queue is keyed by: one key per job, and one for orphans of
/// runs nobody knows any more.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QueueKey {
    Job(JobName),
    Orphans,
}

impl fmt::Display for QueueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueKey::Job(j) => write!(f, "job/{j}"),
            QueueKey::Orphans => f.write_str("orphans"),
        }
    }
}

/// The ops of one pass, in order, and when to look again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub ops: Vec<Op>,
    /// The earliest of `requeue`; `None` when everything is idle.
    pub requeue_after: Option<Duration>,
    /// When each key wants to be looked at again; a key absent here is idle.
    pub requeue: BTreeMap<QueueKey, Duration>,
    /// The job of every run an op names, so the controller can key ops.
    pub jobs_of_runs: BTreeMap<RunName, JobName>,
}

impl Plan {
    /// The queue key an op belongs to.
    pub fn key_of(&self, op: &Op) -> QueueKey {
        op.run()
            .and_then(|r| self.jobs_of_runs.get(r))
            .map_or(QueueKey::Orphans, |j| QueueKey::Job(j.clone()))
    }

    /// Stable text for snapshots and `apply --dry-run`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.ops.is_empty() {
            out.push_str("no ops\n");
        }
        for op in &self.ops {
            out.push_str(&op.to_string());
            out.push('\n');
        }
        match self.requeue_after {
            Some(d) => out.push_str(&format!("requeue after {}s", d.as_secs())),
            None => out.push_str("idle"),
        }
        for (k, d) in &self.requeue {
            out.push_str(&format!("; {k} {}s", d.as_secs()));
        }
        out.push('\n');
        out
    }
}

/// When to look again at a provider whose listing failed with `kind`: its retry-after
/// when it gave one (a 429), rarely when a person must act, soon otherwise.
pub fn listing_retry(kind: &ErrorKind) -> Duration {
    match kind {
        ErrorKind::RateLimited {
            retry_after: Some(d),
        } => (*d).max(Duration::from_secs(1)),
        ErrorKind::Unauthenticated
        | ErrorKind::PermissionDenied
        | ErrorKind::PaymentRequired
        | ErrorKind::Quota
        | ErrorKind::Permanent => REQUEUE_NEEDS_PERSON,
        ErrorKind::RateLimited { retry_after: None }
        | ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::NoCapacity
        | ErrorKind::Transient => REQUEUE_LISTING_FAILED,
    }
}

/// Delay before the next try after `failures` consecutive failures: 5 s doubling, at
/// most 10 min, without jitter so the plan stays a function of its inputs.
pub fn backoff_delay(failures: u32) -> Duration {
    crate::retry::Backoff::new(Duration::from_secs(5), Duration::from_secs(600), 2.0)
        .without_jitter()
        .delay(failures)
}

/// Plans one pass. Pure: same inputs, same plan.
pub fn plan(desired: &Desired, observed: &Observed, history: &History, now: Timestamp) -> Plan {
    let mut p = Planner::new(desired, observed, history, now);
    p.plan_all();
    p.finish()
}

/// The view of a provider's listing the planner needs.
enum Seen<'a> {
    /// The listing of the attempt's provider failed or is missing.
    Unknown,
    Absent,
    Listed(&'a Instance),
}

struct Planner<'a> {
    desired: &'a Desired,
    observed: &'a Observed,
    history: &'a History,
    now: Timestamp,
    /// Listed instances carrying this controller's tag, by run.
    ours: BTreeMap<&'a str, Vec<&'a Instance>>,
    /// Every successfully listed instance by provider and rendered tag: one lookup per
    /// attempt, not a scan of the listing (10,000 runs would make that 10^8 compares).
    by_tag: BTreeMap<(ProviderKind, String), Vec<&'a Instance>>,
    budgets: BTreeMap<String, BudgetState>,
    /// Creates on queued fleets, decided once every run was seen.
    queued: Vec<Queued>,
    /// The periodic resync of each key seen: the shortest of its providers'.
    resync: BTreeMap<QueueKey, Duration>,
    plan: Plan,
}

/// A create waiting for its turn in a fleet queue.
struct Queued {
    key: QueueKey,
    rec: RunRecord,
    provider: ProviderKind,
    fleet: String,
    gpus: u32,
    /// Apply order: the run's `seq`, runs not recorded yet last (in desired order).
    order: (i64, usize),
    op: Op,
}

/// What follows an ended attempt.
#[derive(Debug, Clone, PartialEq)]
enum Next {
    Create {
        placement_index: u32,
        not_before: Timestamp,
        reason: String,
    },
    Finished {
        phase: Phase,
        reason: String,
    },
}

impl<'a> Planner<'a> {
    fn new(
        desired: &'a Desired,
        observed: &'a Observed,
        history: &'a History,
        now: Timestamp,
    ) -> Self {
        let mut ours: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        let mut by_tag: BTreeMap<(ProviderKind, String), Vec<&Instance>> = BTreeMap::new();
        for (provider, result) in &observed.listed {
            if let ListResult::Listed(instances) = result {
                for i in instances {
                    by_tag
                        .entry((*provider, i.tag.render()))
                        .or_default()
                        .push(i);
                    if i.tag.controller == desired.controller {
                        ours.entry(i.tag.run.as_str()).or_default().push(i);
                    }
                }
            }
        }
        let job_of_run: BTreeMap<&str, &RunRecord> = history
            .runs
            .values()
            .map(|r| (r.name.as_str(), r))
            .collect();
        let bills = |i: &Instance| {
            i.state != InstanceState::Stopped
                || observed
                    .capabilities
                    .get(&i.provider)
                    .is_none_or(|c| c.bills_while_stopped)
        };
        let live: Vec<(JobName, Usd, Timestamp)> = ours
            .iter()
            .flat_map(|(run, insts)| insts.iter().map(move |i| (*run, *i)))
            .filter(|(_, i)| bills(i))
            .filter_map(|(run, i)| {
                let rec = job_of_run.get(run)?;
                // At the price it bills now (a stopped instance whose disk is kept: its
                // storage), since its price last changed: what it billed before that is
                // in the ledger already.
                let created = i.created_at.unwrap_or(now);
                let since = match rec.billing_since {
                    Some(b) if rec.attempt == i.tag.attempt => created.max(b),
                    _ => created,
                };
                Some((rec.job.to_string(), i.price_per_hour, since))
            })
            .collect();
        let budgets = budget::states(
            desired.budgets(),
            desired.jobs(),
            &history.spent,
            &live,
            now,
        );
        Planner {
            desired,
            observed,
            history,
            now,
            ours,
            by_tag,
            budgets,
            queued: Vec::new(),
            resync: BTreeMap::new(),
            plan: Plan::default(),
        }
    }

    fn finish(mut self) -> Plan {
        // Polling is our watch: no key is left without a time to look again.
        for (key, period) in std::mem::take(&mut self.resync) {
            self.wake(&key, period);
        }
        self.plan.requeue_after = self.plan.requeue.values().min().copied();
        self.plan
    }

    /// What `provider` declares about itself.
    fn caps(&self, provider: ProviderKind) -> Capabilities {
        self.observed
            .capabilities
            .get(&provider)
            .cloned()
            .unwrap_or_default()
    }

    /// `key` uses `provider`: it is resynced at least as often as the provider asks.
    fn resync_with(&mut self, key: &QueueKey, provider: ProviderKind) {
        let period = self.caps(provider).resync_period();
        let slot = self.resync.entry(key.clone()).or_insert(period);
        *slot = (*slot).min(period);
    }

    /// How long an intent may go unlisted before it counts as absent.
    fn listing_lag(&self, provider: ProviderKind) -> i64 {
        i64::try_from(self.caps(provider).listing_lag.as_secs()).unwrap_or(i64::MAX)
    }

    /// The hosts of fleet `fleet` on a fixed-pool `provider`, as its listing saw them.
    fn fleet_hosts(&self, provider: ProviderKind, fleet: &str) -> Vec<HostStatus> {
        if !self.caps(provider).fixed_pool {
            return Vec::new();
        }
        self.observed
            .hosts
            .get(&provider)
            .map(|hs| hs.iter().filter(|h| h.fleet == fleet).cloned().collect())
            .unwrap_or_default()
    }

    fn push(&mut self, key: &QueueKey, op: Op) {
        if let (Some(run), QueueKey::Job(job)) = (op.run(), key) {
            self.plan
                .jobs_of_runs
                .insert(run.to_string(), job.to_string());
        }
        // A status update records what was seen; any other op changes the world, and
        // the next step should follow it promptly.
        let after = if matches!(op, Op::SetStatus(_)) {
            REQUEUE_FAST
        } else {
            REQUEUE_STEP
        };
        self.plan.ops.push(op);
        self.wake(key, after);
    }

    /// Holds a run back as Pending for `reason` (recorded once), and looks again later.
    fn block(&mut self, key: &QueueKey, rec: &RunRecord, reason: String) {
        if rec.phase != Phase::Pending || rec.reason != reason {
            self.push(
                key,
                Op::Block {
                    run: rec.name.clone(),
                    reason,
                },
            );
        }
        self.wake(key, REQUEUE_BLOCKED);
    }

    fn wake(&mut self, key: &QueueKey, after: Duration) {
        let slot = self.plan.requeue.entry(key.clone()).or_insert(after);
        *slot = (*slot).min(after);
    }

    fn wake_at(&mut self, key: &QueueKey, at: Timestamp) {
        let secs = (at - self.now).max(1) as u64;
        self.wake(key, Duration::from_secs(secs));
    }

    fn listing(&self, provider: ProviderKind) -> Option<&'a ListResult> {
        self.observed.listed.get(&provider)
    }

    fn listing_ok(&self, provider: ProviderKind) -> bool {
        matches!(self.listing(provider), Some(ListResult::Listed(_)))
    }

    /// Where the attempt's instance stands in its provider's listing, by tag.
    fn seen(&self, a: &AttemptRecord) -> Seen<'a> {
        match self.listing(a.provider) {
            Some(ListResult::Listed(_)) => self
                .by_tag
                .get(&(a.provider, a.tag.clone()))
                .and_then(|found| found.iter().copied().find(|i| owned_by(a, i)))
                .map_or(Seen::Absent, Seen::Listed),
            _ => Seen::Unknown,
        }
    }

    /// When to look again at something that waits on `provider`'s listing.
    fn listing_wait(&self, provider: ProviderKind) -> Duration {
        match self.listing(provider) {
            Some(ListResult::Failed { kind, .. }) => listing_retry(kind),
            _ => REQUEUE_LISTING_FAILED,
        }
    }

    fn plan_all(&mut self) {
        let listed: Vec<(ProviderKind, Option<Duration>)> = self
            .observed
            .listed
            .iter()
            .map(|(p, l)| match l {
                ListResult::Failed { kind, .. } => (*p, Some(listing_retry(kind))),
                ListResult::Listed(_) => (*p, None),
            })
            .collect();
        for (provider, failed) in listed {
            self.resync_with(&QueueKey::Orphans, provider);
            if let Some(after) = failed {
                self.wake(&QueueKey::Orphans, after);
            }
        }
        let mut handled: BTreeSet<&str> = BTreeSet::new();
        for job in self.desired.jobs() {
            for spec in &job.runs {
                handled.insert(spec.name.as_str());
                self.desired_run(job, spec);
            }
        }
        for rec in self.history.runs.values() {
            if handled.insert(rec.name.as_str()) {
                self.undesired_run(rec);
            }
        }
        // Instances of ours naming a run nobody knows: orphans.
        let unknown: Vec<&Instance> = self
            .ours
            .iter()
            .filter(|(run, _)| !handled.contains(*run))
            .flat_map(|(_, insts)| insts.iter().copied())
            .collect();
        for i in unknown {
            self.destroy_orphan(&QueueKey::Orphans, None, i, "orphan: no such run");
        }
        self.place_queued();
    }

    /// True when `i` is on a pool host that does not answer: it runs nothing we can
    /// see or stop, so it is neither destroyed (that fails until the host is back) nor
    /// taken as its run's live instance.
    fn on_unreachable_host(&self, i: &Instance) -> bool {
        let tag = i.tag.render();
        self.observed.hosts.get(&i.provider).is_some_and(|hosts| {
            hosts
                .iter()
                .any(|h| !h.reachable && h.running.contains(&tag))
        })
    }

    /// Sends `op` (a create) to the provider now, or, for a placement on a fleet of a
    /// fixed pool whose hosts the listing reported, into that fleet's queue.
    fn create_or_queue(&mut self, key: &QueueKey, job: &Job, rec: &RunRecord, op: Op) {
        let Op::Create {
            placement_index,
            provider,
            ..
        } = &op
        else {
            return self.push(key, op);
        };
        let fleet = job
            .spec
            .placement
            .get(*placement_index as usize)
            .and_then(|p| p.fleet.clone());
        let Some(fleet) = fleet.filter(|f| !self.fleet_hosts(*provider, f).is_empty()) else {
            return self.push(key, op);
        };
        let seq = if rec.seq > 0 { rec.seq } else { i64::MAX };
        let order = (seq, self.queued.len());
        self.queued.push(Queued {
            key: key.clone(),
            rec: rec.clone(),
            provider: *provider,
            fleet,
            gpus: job.spec.resources.gpu.as_ref().map_or(0, |g| g.count),
            order,
            op,
        });
    }

    /// The fleet queues: per fleet, in apply order, a run is created when it fits the
    /// free capacity left by those before it, and waits otherwise. A waiting run holds
    /// back those behind it (runs start in apply order), unless no reachable host could
    /// ever take it.
    fn place_queued(&mut self) {
        let mut queued = std::mem::take(&mut self.queued);
        queued.sort_by_key(|q| (q.provider, q.fleet.clone(), q.order));
        let mut hosts: Vec<HostStatus> = Vec::new();
        let mut current: Option<(ProviderKind, String)> = None;
        let mut held = 0usize;
        let mut blocked = false;
        for q in queued {
            let fleet = q.fleet.clone();
            if current.as_ref() != Some(&(q.provider, fleet.clone())) {
                hosts = self.fleet_hosts(q.provider, &fleet);
                current = Some((q.provider, fleet.clone()));
                held = 0;
                blocked = false;
            }
            // No host of the fleet could ever take it: the provider says so for good.
            if !hosts.iter().any(|h| h.could_take(q.gpus)) {
                self.push(&q.key, q.op);
                continue;
            }
            if !blocked && let Some(h) = hosts.iter_mut().find(|h| h.fits(q.gpus)) {
                if let Op::Create { tag, .. } = &q.op {
                    h.take(q.gpus, &tag.render());
                }
                self.push(&q.key, q.op);
                continue;
            }
            let place = match held {
                0 => "next in line".to_string(),
                n => format!("{n} ahead"),
            };
            let reason = format!("waiting for a free host in fleet {fleet} ({place})");
            self.set_status(&q.key, &q.rec, Phase::Pending, reason, None, None, None);
            self.wake(&q.key, REQUEUE_FAST);
            held += 1;
            blocked |= hosts.iter().any(|h| h.reachable && h.could_take(q.gpus));
        }
    }

    fn attempts_of(&self, run: &str) -> Vec<&'a AttemptRecord> {
        let mut v: Vec<&AttemptRecord> = self
            .history
            .attempts
            .get(run)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        v.sort_by_key(|a| a.attempt);
        v
    }

    fn destroy_orphan(&mut self, key: &QueueKey, run: Option<&str>, i: &Instance, why: &str) {
        if self.on_unreachable_host(i) {
            // Destroying fails until the host answers; its listing will say when.
            self.wake(key, self.listing_wait(i.provider));
            return;
        }
        if i.state == InstanceState::Terminating {
            self.wake(key, REQUEUE_FAST);
            return;
        }
        self.push(
            key,
            Op::Destroy {
                provider: i.provider,
                instance_id: i.id.clone(),
                run: run.map(str::to_string),
                reason: why.to_string(),
            },
        );
    }

    /// Listed instances of `run` that no unreleased attempt owns: destroyed.
    fn destroy_stray(&mut self, key: &QueueKey, run: &str, attempts: &[&AttemptRecord]) {
        let listed = self.ours.get(run).cloned().unwrap_or_default();
        for i in listed {
            let owner = attempts.iter().find(|a| a.attempt == i.tag.attempt);
            let why = match owner {
                None => "orphan: no attempt record",
                Some(a) if a.released_at.is_some() => "orphan: attempt already released",
                Some(a) if !owned_by(a, i) => "duplicate: attempt owns another instance",
                Some(_) => continue,
            };
            self.destroy_orphan(key, Some(run), i, why);
        }
    }

    /// The finalizer for one attempt that must end: destroy while listed, release once
    /// the provider's (successful) listing confirms it gone. Returns true when this pass
    /// releases it.
    fn finish_attempt(&mut self, key: &QueueKey, a: &AttemptRecord, outcome: Outcome) -> bool {
        let outcome = a.outcome.clone().unwrap_or(outcome);
        match self.seen(a) {
            Seen::Unknown => {
                self.wake(key, self.listing_wait(a.provider));
                false
            }
            Seen::Listed(i) => {
                let why = format!("attempt {} ended: {outcome}", a.attempt);
                self.destroy_orphan(key, Some(&a.run), i, &why);
                false
            }
            Seen::Absent => {
                // An intent whose create may still land: wait out the listing lag.
                let grace = self.listing_lag(a.provider);
                if a.instance_id.is_none() && self.now - a.intent_at < grace {
                    self.wake_at(key, a.intent_at + grace);
                    return false;
                }
                self.push(
                    key,
                    Op::Release {
                        run: a.run.clone(),
                        attempt: a.attempt,
                        outcome,
                    },
                );
                true
            }
        }
    }

    fn undesired_run(&mut self, rec: &'a RunRecord) {
        let key = QueueKey::Job(rec.job.clone());
        let attempts = self.attempts_of(&rec.name);
        for a in &attempts {
            self.resync_with(&key, a.provider);
        }
        // The attempt still running when its job went: it ends as deleted, recorded
        // before its final sync so that a sync that fails (a dead machine) is tried
        // once and never holds back the destroy on a later pass.
        let live = attempts
            .iter()
            .copied()
            .filter(|a| a.released_at.is_none() && a.outcome.is_none())
            .max_by_key(|a| a.attempt);
        let outcome = live.map(|a| (a.attempt, Outcome::Deleted));
        if rec.phase != Phase::Deleting || outcome.is_some() {
            self.push(
                &key,
                Op::SetStatus(StatusUpdate {
                    run: rec.name.clone(),
                    phase: Phase::Deleting,
                    reason: "job deleted".into(),
                    progress: None,
                    exit_code: rec.exit_code,
                    outcome,
                }),
            );
        }
        // The final sync (checkpoint, outputs, log) before the teardown below, in the
        // same op group, as for a run that ends; only where its agent ever answered
        // (nothing to sync on a machine the job never started on).
        if let Some(a) = live
            && self.last_seen(a, false).is_some()
            && let Seen::Listed(i) = self.seen(a)
            && i.state == InstanceState::Running
            && !self.on_unreachable_host(i)
        {
            self.push(
                &key,
                Op::Collect {
                    run: rec.name.clone(),
                    attempt: a.attempt,
                    instance: Box::new(i.clone()),
                },
            );
        }
        self.destroy_stray(&key, &rec.name, &attempts);
        let mut all_released = true;
        for a in attempts.iter().filter(|a| a.released_at.is_none()) {
            all_released &= self.finish_attempt(&key, a, Outcome::Deleted);
        }
        // Forget only when every provider the run ever used listed successfully this
        // pass and shows nothing of it: a failed listing proves nothing.
        let providers_ok = attempts.iter().all(|a| self.listing_ok(a.provider));
        let nothing_listed = self.ours.get(rec.name.as_str()).is_none_or(Vec::is_empty);
        if all_released && providers_ok && nothing_listed {
            self.push(
                &key,
                Op::Forget {
                    run: rec.name.clone(),
                },
            );
        } else {
            // Destroys and waits above already asked to look again soon.
            let wait = attempts
                .iter()
                .map(|a| self.listing_wait(a.provider))
                .min()
                .unwrap_or(REQUEUE_LISTING_FAILED);
            self.wake(&key, wait);
        }
    }

    fn desired_run(&mut self, job: &'a Job, spec: &'a RunSpec) {
        let key = QueueKey::Job(job.name.clone());
        let attempts = self.attempts_of(&spec.name);
        for provider in job
            .spec
            .placement
            .iter()
            .map(|p| p.provider)
            .chain(attempts.iter().map(|a| a.provider))
        {
            self.resync_with(&key, provider);
        }
        let record_op = |supersede| Op::RecordRun {
            run: spec.name.clone(),
            job: job.name.clone(),
            index: spec.index,
            spec_hash: job.spec_hash.clone(),
            matrix: spec.matrix.clone(),
            supersede,
        };
        // The row as it will be after this pass's RecordRun, if any.
        let mut rec = match self.history.runs.get(&spec.name) {
            Some(r) => r.clone(),
            None => {
                self.push(&key, record_op(None));
                new_record(job, spec, self.now)
            }
        };
        // The create writes its attempt intent, then the run row: a crash (or a failed
        // store write) in between leaves the newest attempt open above `rec.attempt`.
        // No other write puts an open attempt there, and its tag may already name an
        // instance, so it is the run's current attempt, not a stale one to supersede.
        if let Some(newest) = attempts.iter().max_by_key(|a| a.attempt)
            && newest.attempt > rec.attempt
            && newest.released_at.is_none()
            && newest.outcome.is_none()
        {
            rec.attempt = newest.attempt;
            rec.placement_index = newest.placement_index;
            rec.provider = Some(newest.provider);
        }
        let mut superseded: AttemptRecord;
        let mut attempts: Vec<&AttemptRecord> = attempts;
        let all_released = attempts.iter().all(|a| a.released_at.is_some());
        // An edited job re-runs its finished runs, once their instance is gone.
        if rec.spec_hash != job.spec_hash && rec.phase.is_terminal() && all_released {
            let last = attempts.iter().position(|a| a.attempt == rec.attempt);
            self.push(&key, record_op(last.map(|_| rec.attempt)));
            rec.spec_hash = job.spec_hash.clone();
            rec.phase = Phase::Pending;
            if let Some(i) = last {
                superseded = attempts[i].clone();
                superseded.outcome = Some(spec_changed(superseded.outcome.take()));
                attempts[i] = &superseded;
            }
        }
        if rec.phase == Phase::Deleting {
            // Re-applied while being deleted: it lives on.
            rec.phase = Phase::Pending;
        }
        self.destroy_stray(&key, &spec.name, &attempts);
        if self.history.stops.get(&spec.name) == Some(&job.spec_hash) {
            return self.stopped_run(&key, &rec, &attempts);
        }
        if let Some(why) = self.paused(&key, job, &rec) {
            return self.paused_run(&key, job, &rec, &attempts, why);
        }
        // Older attempts still open (superseded): end them.
        for a in attempts
            .iter()
            .filter(|a| a.released_at.is_none() && a.attempt != rec.attempt)
        {
            self.finish_attempt(&key, a, Outcome::Superseded);
        }
        let current = attempts
            .iter()
            .copied()
            .find(|a| a.attempt == rec.attempt && rec.attempt > 0);
        // Resumed with its disk kept: its stopped instance runs the job again.
        if let Some(a) = current
            && a.released_at.is_none()
            && a.outcome.is_none()
            && let Some(kept) = self.history.kept.get(&(rec.name.clone(), a.attempt))
        {
            return self.resume_kept(&key, job, &rec, a, kept);
        }

        match current {
            Some(a) if a.released_at.is_none() => {
                if rec.phase.is_terminal() {
                    let outcome = if rec.phase == Phase::Succeeded {
                        Outcome::Succeeded
                    } else {
                        Outcome::Failed {
                            exit_code: rec.exit_code,
                        }
                    };
                    self.finish_attempt(&key, a, outcome);
                } else if a.outcome.is_some() {
                    // An ended attempt stranded on a host that does not answer waits
                    // there for its destroy; the run goes on elsewhere meanwhile.
                    let stranded =
                        matches!(self.seen(a), Seen::Listed(i) if self.on_unreachable_host(i));
                    self.finish_attempt(&key, a, Outcome::Superseded);
                    if stranded {
                        let next = next_step(job, &attempts, rec.exit_code);
                        self.next_attempt(&key, job, &rec, &attempts, next);
                    }
                } else {
                    self.live_attempt(&key, job, &rec, &attempts, a);
                }
            }
            // No attempt open: absent + desired.
            _ => {
                if rec.phase.is_terminal() {
                    return;
                }
                let next = next_step(job, &attempts, rec.exit_code);
                self.next_attempt(&key, job, &rec, &attempts, next);
            }
        }
    }

    /// Stopped by `asimov destroy` for the job's current spec: every open attempt ends
    /// (destroyed, released once the listing confirms it gone) and the run stays
    /// Stopped, across restarts, until the spec changes.
    fn stopped_run(&mut self, key: &QueueKey, rec: &RunRecord, attempts: &[&AttemptRecord]) {
        let current = attempts
            .iter()
            .find(|a| a.attempt == rec.attempt && a.released_at.is_none() && a.outcome.is_none());
        let reason = "destroyed by `asimov destroy`".to_string();
        let outcome = current.map(|a| (a.attempt, Outcome::Destroyed));
        if rec.phase != Phase::Stopped || outcome.is_some() {
            self.set_status(
                key,
                rec,
                Phase::Stopped,
                reason,
                None,
                rec.exit_code,
                outcome,
            );
        }
        self.sync_then_release(key, rec, current.copied(), attempts, Outcome::Destroyed);
    }

    /// Why the run is to be paused now, if it is: `spec.paused`, `asimov pause`, a
    /// `schedule.pause_at` reached or outside its `schedule.window`. A resume lifts the
    /// scheduled pauses that came before it (not `spec.paused`, which the manifest
    /// lifts). Wakes the key when a scheduled pause or the window's opening is due.
    fn paused(&mut self, key: &QueueKey, job: &Job, rec: &RunRecord) -> Option<String> {
        // A finished run has nothing to pause.
        if rec.phase.is_terminal() {
            return None;
        }
        if job.spec.paused {
            return Some("paused by spec.paused".into());
        }
        let pause = self.history.pauses.get(&rec.name);
        if pause.is_some_and(|p| p.paused) {
            return Some("paused by `asimov pause`".into());
        }
        let resumed_at = pause.map_or(i64::MIN, |p| p.at);
        let schedule = job.spec.schedule.as_ref()?;
        if let Some(at) = schedule.pause_at {
            if at <= self.now && at > resumed_at {
                return Some(format!(
                    "paused at schedule.pause_at {}; `asimov resume` resumes it",
                    render_time(at)
                ));
            }
            if at > self.now {
                self.wake_at(key, at);
            }
        }
        let w = schedule.window?;
        if w.contains(self.now) {
            // Wake for the close: the pause is due then.
            self.wake_at(key, w.last_close(self.now) + 24 * 60 * 60);
            return None;
        }
        let open = w.next_open(self.now);
        if w.last_close(self.now) <= resumed_at {
            return None;
        }
        self.wake_at(key, open);
        Some(format!(
            "outside its daily window {}-{} UTC; resumes at {}",
            crate::manifest::Window::render(w.start),
            crate::manifest::Window::render(w.end),
            render_time(open)
        ))
    }

    /// Paused: the open attempt ends (its checkpoint and outputs synced once, after the
    /// outcome is recorded, then its instance destroyed and released once the listing
    /// confirms it gone) and the run stays Paused, across restarts, until resumed; the
    /// next attempt then resumes from that checkpoint, counting no restart.
    fn paused_run(
        &mut self,
        key: &QueueKey,
        job: &Job,
        rec: &RunRecord,
        attempts: &[&AttemptRecord],
        reason: String,
    ) {
        let current = attempts
            .iter()
            .find(|a| a.attempt == rec.attempt && a.released_at.is_none() && a.outcome.is_none());
        if let Some(a) = current
            && self.paused_keeping_disk(key, job, rec, a, &reason)
        {
            return;
        }
        let outcome = current.map(|a| (a.attempt, Outcome::Paused));
        if rec.phase != Phase::Paused || rec.reason != reason || outcome.is_some() {
            self.set_status(
                key,
                rec,
                Phase::Paused,
                reason,
                None,
                rec.exit_code,
                outcome,
            );
        }
        self.sync_then_release(key, rec, current.copied(), attempts, Outcome::Paused);
    }

    /// True when attempt `a` of a paused run keeps its disk: it was recorded so, or its
    /// placement asks for it on a provider that can.
    fn keeps_disk(&self, job: &Job, a: &AttemptRecord) -> bool {
        self.history.kept.contains_key(&(a.run.clone(), a.attempt))
            || (self.caps(a.provider).keep_disk.is_some()
                && job
                    .spec
                    .placement
                    .get(a.placement_index as usize)
                    .is_some_and(|p| p.keep_disk_on_pause && p.provider == a.provider))
    }

    /// A pause that keeps the open attempt `a`'s disk: the pause is recorded on the
    /// attempt first, then (once) the final sync as for any pause, then the job stopped
    /// and the instance stopped, not destroyed; the attempt stays open, holding its
    /// stopped instance, until resumed. False when there is nothing to keep (no
    /// instance, or one that is booting, going or gone): the pause then releases it as
    /// any other.
    fn paused_keeping_disk(
        &mut self,
        key: &QueueKey,
        job: &Job,
        rec: &RunRecord,
        a: &AttemptRecord,
        reason: &str,
    ) -> bool {
        if !self.keeps_disk(job, a) {
            return false;
        }
        let kept = self.history.kept.get(&(rec.name.clone(), a.attempt));
        let instance = match self.seen(a) {
            Seen::Unknown => {
                self.set_status(
                    key,
                    rec,
                    Phase::Paused,
                    reason.to_string(),
                    None,
                    None,
                    None,
                );
                self.wake(key, self.listing_wait(a.provider));
                return true;
            }
            Seen::Absent => return false,
            Seen::Listed(i) => i,
        };
        let kept_reason = format!(
            "{reason}; {}/{} stopped, its disk kept (storage billing only)",
            instance.provider, instance.id
        );
        match instance.state {
            // Booting before its first start, or going: nothing to resume on.
            InstanceState::Provisioning if kept.is_none() => false,
            InstanceState::Terminating => false,
            InstanceState::Running | InstanceState::Provisioning => {
                let stopping = format!(
                    "{reason}; stopping {}/{}, keeping its disk",
                    instance.provider, instance.id
                );
                self.set_status(key, rec, Phase::Paused, stopping, None, None, None);
                if kept.is_none() {
                    self.push(
                        key,
                        Op::KeepDisk {
                            run: rec.name.clone(),
                            attempt: a.attempt,
                        },
                    );
                    // The final sync, once: recorded kept before it, a sync that fails
                    // never holds back the stop.
                    if instance.state == InstanceState::Running
                        && self.last_seen(a, false).is_some()
                    {
                        self.push(
                            key,
                            Op::Collect {
                                run: rec.name.clone(),
                                attempt: a.attempt,
                                instance: Box::new(instance.clone()),
                            },
                        );
                    }
                }
                self.push(
                    key,
                    Op::StopKeepingDisk {
                        run: rec.name.clone(),
                        attempt: a.attempt,
                        instance: Box::new(instance.clone()),
                    },
                );
                true
            }
            InstanceState::Stopped => {
                // Stopped already (by us, or outbid while paused): its disk is kept.
                if kept.is_none() {
                    self.push(
                        key,
                        Op::KeepDisk {
                            run: rec.name.clone(),
                            attempt: a.attempt,
                        },
                    );
                }
                self.set_status(key, rec, Phase::Paused, kept_reason, None, None, None);
                // The stop not recorded as confirmed (a crash right after it): once more,
                // harmless on a stopped instance, to record it and its storage price.
                if kept.is_none_or(|k| k.stopped_at.is_none()) {
                    self.push(
                        key,
                        Op::StopKeepingDisk {
                            run: rec.name.clone(),
                            attempt: a.attempt,
                            instance: Box::new(instance.clone()),
                        },
                    );
                }
                true
            }
        }
    }

    /// Resumed, attempt `a` kept its disk: its stopped instance is started again, then
    /// the job runs again on that disk. A start refused for good, or an instance gone
    /// meanwhile, ends the attempt (`Paused`, with why) and destroys what is left: the
    /// next attempt resumes from the synced checkpoint on a new instance.
    fn resume_kept(
        &mut self,
        key: &QueueKey,
        job: &Job,
        rec: &RunRecord,
        a: &AttemptRecord,
        kept: &KeptDisk,
    ) {
        let instance = match self.seen(a) {
            Seen::Unknown => {
                self.wake(key, self.listing_wait(a.provider));
                return;
            }
            Seen::Absent => None,
            Seen::Listed(i) => Some(i),
        };
        let gone = match (instance, &kept.refused) {
            (_, Some(why)) => Some(why.clone()),
            (None, None) => Some("its stopped instance is gone".to_string()),
            (Some(i), None) if i.state == InstanceState::Terminating => {
                Some(format!("{}/{} is going", i.provider, i.id))
            }
            _ => None,
        };
        if let Some(why) = gone {
            let reason = format!(
                "resume on the kept disk failed: {why}; a new attempt resumes from the synced checkpoint"
            );
            self.set_status(
                key,
                rec,
                Phase::Pending,
                reason,
                None,
                rec.exit_code,
                Some((a.attempt, Outcome::Paused)),
            );
            match instance {
                Some(i) => {
                    let why = format!(
                        "attempt {} ended: resume on its kept disk failed",
                        a.attempt
                    );
                    self.destroy_orphan(key, Some(&rec.name), i, &why);
                }
                None => self.push(
                    key,
                    Op::Release {
                        run: rec.name.clone(),
                        attempt: a.attempt,
                        outcome: Outcome::Paused,
                    },
                ),
            }
            return;
        }
        let Some(i) = instance else { return };
        // A budget that blocks new attempts holds a stopped one too: starting it bills
        // the GPU again. It stays stopped (storage only) until the budget allows.
        if i.state != InstanceState::Running
            && let Some(b) = budget::over_limit(job, self.desired.budgets(), &self.budgets).first()
        {
            self.block(key, rec, b.reason());
            return;
        }
        let op = if i.state == InstanceState::Running {
            let reason = format!("resuming the job on {}/{}'s kept disk", i.provider, i.id);
            self.set_status(key, rec, Phase::Starting, reason, None, None, None);
            Op::ResumeKept {
                run: rec.name.clone(),
                attempt: a.attempt,
                instance: Box::new(i.clone()),
            }
        } else {
            let reason = format!("starting the stopped {}/{} again", i.provider, i.id);
            self.set_status(key, rec, Phase::Provisioning, reason, None, None, None);
            Op::StartKept {
                run: rec.name.clone(),
                attempt: a.attempt,
                instance: Box::new(i.clone()),
            }
        };
        self.push(key, op);
    }

    /// The end of a stopped or paused run's open attempts: the final sync, once, after
    /// the outcome is recorded (so a sync that keeps failing never holds back the
    /// destroy, on this pass or the next), then every open attempt finished as `outcome`.
    fn sync_then_release(
        &mut self,
        key: &QueueKey,
        rec: &RunRecord,
        current: Option<&AttemptRecord>,
        attempts: &[&AttemptRecord],
        outcome: Outcome,
    ) {
        if let Some(a) = current
            && let Seen::Listed(i) = self.seen(a)
            && i.state == InstanceState::Running
            && !self.on_unreachable_host(i)
        {
            let instance = Box::new(i.clone());
            self.push(
                key,
                Op::Collect {
                    run: rec.name.clone(),
                    attempt: a.attempt,
                    instance,
                },
            );
        }
        for a in attempts.iter().filter(|a| a.released_at.is_none()) {
            self.finish_attempt(key, a, outcome.clone());
        }
    }

    /// When the agent of attempt `a` last answered (or, never seen, when it was asked
    /// for when `or_intent`).
    fn last_seen(&self, a: &AttemptRecord, or_intent: bool) -> Option<Timestamp> {
        match self.history.seen.get(&a.run) {
            Some((n, at)) if *n == a.attempt => Some(*at),
            _ => or_intent.then_some(a.intent_at),
        }
    }

    /// An attempt whose machine does not answer (its agent, or its fleet host): lost
    /// once it has been silent past `HEARTBEAT_STALE_SECS`, else waited for. True when
    /// it is lost.
    fn silent_past_threshold(
        &mut self,
        key: &QueueKey,
        a: &AttemptRecord,
        or_intent: bool,
    ) -> bool {
        let Some(seen) = self.last_seen(a, or_intent) else {
            self.wake(key, REQUEUE_FAST);
            return false;
        };
        if self.now.saturating_sub(seen) > HEARTBEAT_STALE_SECS {
            return true;
        }
        self.wake(key, REQUEUE_FAST);
        self.wake_at(key, seen + HEARTBEAT_STALE_SECS + 1);
        false
    }

    /// Absent + desired: make the next attempt, unless something holds it back.
    fn next_attempt(
        &mut self,
        key: &QueueKey,
        job: &'a Job,
        rec: &RunRecord,
        attempts: &[&AttemptRecord],
        next: Next,
    ) {
        let (placement_index, not_before, reason) = match next {
            Next::Finished { phase, reason } => {
                self.set_status(key, rec, phase, reason, None, rec.exit_code, None);
                return;
            }
            Next::Create {
                placement_index,
                not_before,
                reason,
            } => (placement_index, not_before, reason),
        };
        if let Some(at) = job.spec.schedule.as_ref().and_then(|s| s.at)
            && at > self.now
        {
            let reason = format!("scheduled for {}", render_time(at));
            self.set_status(key, rec, Phase::Pending, reason, None, None, None);
            self.wake_at(key, at);
            return;
        }
        if let Some(b) = budget::over_limit(job, self.desired.budgets(), &self.budgets).first() {
            self.block(key, rec, b.reason());
            return;
        }
        if not_before > self.now {
            self.set_status(key, rec, Phase::Pending, reason, None, None, None);
            self.wake_at(key, not_before);
            return;
        }
        let placements = &job.spec.placement;
        let Some(placement) = placements.get(placement_index as usize % placements.len().max(1))
        else {
            self.set_status(
                key,
                rec,
                Phase::Failed,
                "job has no placement".into(),
                None,
                None,
                None,
            );
            return;
        };
        match self.listing(placement.provider) {
            None => {
                let reason = format!("provider {} is not configured", placement.provider);
                self.block(key, rec, reason);
                return;
            }
            Some(ListResult::Failed { kind, .. }) => {
                self.wake(key, listing_retry(kind));
                return;
            }
            Some(ListResult::Listed(_)) => {}
        }
        // Never reuse a number: not one in the store, nor one a listing shows.
        let highest_listed = self
            .ours
            .get(rec.name.as_str())
            .map_or(0, |v| v.iter().map(|i| i.tag.attempt).max().unwrap_or(0));
        let highest_recorded = attempts.iter().map(|a| a.attempt).max().unwrap_or(0);
        let attempt = rec.attempt.max(highest_listed).max(highest_recorded) + 1;
        let op = Op::Create {
            run: rec.name.clone(),
            attempt,
            placement_index: placement_index % placements.len() as u32,
            provider: placement.provider,
            tag: OwnerTag::new(&self.desired.controller, &rec.name, attempt),
        };
        self.create_or_queue(key, job, rec, op);
    }

    /// Present + desired: converge the current attempt.
    fn live_attempt(
        &mut self,
        key: &QueueKey,
        job: &'a Job,
        rec: &RunRecord,
        attempts: &[&AttemptRecord],
        a: &AttemptRecord,
    ) {
        let instance = match (self.seen(a), &a.instance_id) {
            (Seen::Unknown, _) => {
                self.wake(key, self.listing_wait(a.provider));
                return;
            }
            (Seen::Absent, None) => {
                let grace = self.listing_lag(a.provider);
                if self.now - a.intent_at < grace {
                    self.wake_at(key, a.intent_at + grace);
                } else {
                    // Same tag: if the first create did land after all, the listing
                    // will show one tag, and the stray check destroys a duplicate.
                    let op = Op::Create {
                        run: rec.name.clone(),
                        attempt: a.attempt,
                        placement_index: a.placement_index,
                        provider: a.provider,
                        tag: OwnerTag::parse(&a.tag).unwrap_or_else(|| {
                            OwnerTag::new(&self.desired.controller, &rec.name, a.attempt)
                        }),
                    };
                    self.create_or_queue(key, job, rec, op);
                }
                return;
            }
            (Seen::Absent, Some(_)) => {
                // Gone while we held it: preempted (or destroyed behind our back),
                // unless its agent was seen saying the job had ended (an instance that
                // ended itself before its run was collected): then the job is done.
                let seen_end = self.history.ends.get(&(rec.name.clone(), a.attempt));
                let outcome = seen_end.cloned().unwrap_or(Outcome::Preempted);
                let exit_code = match &outcome {
                    Outcome::Succeeded => Some(0),
                    Outcome::Failed { exit_code } => *exit_code,
                    _ => rec.exit_code,
                };
                let (phase, reason) = decide(job, attempts, a, &outcome, exit_code);
                self.set_status(
                    key,
                    rec,
                    phase,
                    reason,
                    None,
                    exit_code,
                    Some((a.attempt, outcome.clone())),
                );
                self.push(
                    key,
                    Op::Release {
                        run: rec.name.clone(),
                        attempt: a.attempt,
                        outcome,
                    },
                );
                return;
            }
            (Seen::Listed(i), id) => {
                if id.is_none() {
                    self.push(
                        key,
                        Op::Adopt {
                            run: rec.name.clone(),
                            attempt: a.attempt,
                            provider: i.provider,
                            instance: i.id.clone(),
                        },
                    );
                }
                i
            }
        };
        match instance.state {
            InstanceState::Provisioning => {
                // Counted from the create request: a cloud bills from there.
                let timeout = self.caps(a.provider).boot_timeout_of(&instance.id);
                let deadline = a
                    .intent_at
                    .saturating_add(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX));
                if self.now >= deadline {
                    self.end_attempt(
                        key,
                        job,
                        rec,
                        attempts,
                        a,
                        instance,
                        Outcome::BootTimeout,
                        None,
                        None,
                    );
                    return;
                }
                let reason = format!("waiting for {} to boot", instance.id);
                self.set_status(key, rec, Phase::Provisioning, reason, None, None, None);
                self.wake(key, REQUEUE_FAST);
                self.wake_at(key, deadline);
            }
            // A fleet host that does not answer lists its slots Stopped: that is no
            // confirmation, only silence, lost once past the threshold.
            InstanceState::Stopped | InstanceState::Terminating
                if self.on_unreachable_host(instance)
                    && !self.silent_past_threshold(key, a, true) => {}
            InstanceState::Stopped | InstanceState::Terminating
                if self.on_unreachable_host(instance) =>
            {
                self.end_attempt(
                    key,
                    job,
                    rec,
                    attempts,
                    a,
                    instance,
                    Outcome::Lost,
                    None,
                    None,
                );
            }
            InstanceState::Stopped | InstanceState::Terminating => {
                self.end_attempt(
                    key,
                    job,
                    rec,
                    attempts,
                    a,
                    instance,
                    Outcome::Preempted,
                    None,
                    None,
                );
            }
            InstanceState::Running => self.running_instance(key, job, rec, attempts, a, instance),
        }
    }

    fn running_instance(
        &mut self,
        key: &QueueKey,
        job: &'a Job,
        rec: &RunRecord,
        attempts: &[&AttemptRecord],
        a: &AttemptRecord,
        instance: &'a Instance,
    ) {
        let status = match self.observed.agents.get(&a.tag) {
            None => {
                // Not observed this pass: no news is no decision.
                self.wake(key, REQUEUE_RUNNING);
                return;
            }
            Some(AgentObservation::Unreachable { .. }) => {
                // Past its max_duration an unreachable instance is ended from outside
                // (the backstop); before that a failed status call is no news: lost
                // only once the agent, seen before, has been silent past the threshold.
                let silent = self.silent_past_threshold(key, a, false);
                if !self.backstop_max_duration(key, job, rec, attempts, a, instance, silent)
                    && silent
                {
                    self.end_attempt(
                        key,
                        job,
                        rec,
                        attempts,
                        a,
                        instance,
                        Outcome::Lost,
                        None,
                        None,
                    );
                }
                return;
            }
            Some(AgentObservation::NotStarted) => {
                let reason = format!("starting on {}/{}", instance.provider, instance.id);
                self.set_status(key, rec, Phase::Starting, reason, None, None, None);
                self.push(
                    key,
                    Op::Start {
                        run: rec.name.clone(),
                        attempt: a.attempt,
                        instance: Box::new(instance.clone()),
                    },
                );
                return;
            }
            Some(AgentObservation::Status(s)) => s,
        };
        let exceeded = job.spec.max_duration.is_some_and(|max| {
            status
                .started_at
                // Saturating: neither a huge limit nor a hostile start time may wrap.
                .is_some_and(|t| {
                    self.now.saturating_sub(t) > i64::try_from(max.as_secs()).unwrap_or(i64::MAX)
                })
        });
        let stop_budget = budget::over_limit(job, self.desired.budgets(), &self.budgets)
            .into_iter()
            .find(|b| b.action == BudgetAction::Stop)
            .map(BudgetState::reason);
        let beat = status.heartbeat.or(status.started_at);
        let stale = beat.is_some_and(|h| self.now - h > HEARTBEAT_STALE_SECS);
        // Every arm either records what it sees or names how the attempt ended.
        let outcome = match status.state {
            s if !s.is_finished() && exceeded => Outcome::TimedOut,
            s if !s.is_finished() && stop_budget.is_some() => Outcome::Budget,
            AgentState::Running if let Some(stop) = self.early_stop(job, a) => {
                Outcome::EarlyStopped {
                    diverged: stop.diverged,
                }
            }
            // Its supervisor died before the job could start (a full disk, a reboot):
            // nothing will move it on, and no heartbeat will go stale.
            AgentState::Starting | AgentState::Setup
                if status.dead_for.is_some_and(|d| d > HEARTBEAT_STALE_SECS) =>
            {
                Outcome::Lost
            }
            AgentState::Starting | AgentState::Setup => {
                let reason = format!("running setup on {}/{}", instance.provider, instance.id);
                self.set_status(
                    key,
                    rec,
                    Phase::Starting,
                    reason,
                    status.progress,
                    None,
                    None,
                );
                self.wake(key, REQUEUE_FAST);
                return;
            }
            AgentState::Running if stale => Outcome::Lost,
            AgentState::Running => {
                let reason = format!("running on {}/{}", instance.provider, instance.id);
                self.set_status(
                    key,
                    rec,
                    Phase::Running,
                    reason,
                    status.progress,
                    None,
                    None,
                );
                // After the status: a failed sync must not hold back the progress.
                self.checkpoint(key, job, rec, a, instance, status.started_at);
                self.wake(key, REQUEUE_RUNNING);
                return;
            }
            AgentState::Succeeded => Outcome::Succeeded,
            AgentState::Failed => Outcome::Failed {
                exit_code: status.exit_code,
            },
            AgentState::TimedOut => Outcome::TimedOut,
            AgentState::Stopped => Outcome::Stopped,
        };
        self.end_attempt(
            key,
            job,
            rec,
            attempts,
            a,
            instance,
            outcome,
            status.exit_code,
            status.progress,
        );
    }

    /// The controller's backstop for `max_duration`. The agent enforces it on the
    /// machine and then ends its own instance; an instance whose agent cannot be reached
    /// (hung, its SSH gone, its self-destroy failed) is ended from outside once its
    /// deadline is `HEARTBEAT_STALE_SECS` behind: the attempt ends `TimedOut` with
    /// nothing to collect, and the destroy is retried until the listing confirms it
    /// gone. The deadline counts from this attempt's start when known, else from its
    /// create plus the provider's boot timeout (an attempt starts by then or ends).
    /// True when it ended the attempt.
    #[allow(clippy::too_many_arguments)]
    fn backstop_max_duration(
        &mut self,
        key: &QueueKey,
        job: &'a Job,
        rec: &RunRecord,
        attempts: &[&AttemptRecord],
        a: &AttemptRecord,
        instance: &Instance,
        // The agent has been silent past the threshold already: the deadline needs no
        // further allowance (else a silent instance past its max_duration is taken
        // for a lost one and its run started again).
        silent: bool,
    ) -> bool {
        let Some(max) = job.spec.max_duration else {
            return false;
        };
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let started = match rec.started_at {
            Some(t) if t >= a.intent_at => t,
            _ => a
                .intent_at
                .saturating_add(secs(self.caps(a.provider).boot_timeout)),
        };
        let allowance = if silent { 0 } else { HEARTBEAT_STALE_SECS };
        let deadline = started.saturating_add(secs(max)).saturating_add(allowance);
        if self.now < deadline {
            self.wake_at(key, deadline);
            return false;
        }
        let outcome = Outcome::TimedOut;
        let (phase, reason) = decide(job, attempts, a, &outcome, rec.exit_code);
        let why = format!(
            "attempt {} ended: {outcome}, unreachable past max_duration",
            a.attempt
        );
        self.set_status(
            key,
            rec,
            phase,
            reason,
            None,
            rec.exit_code,
            Some((a.attempt, outcome)),
        );
        self.destroy_orphan(key, Some(&rec.name), instance, &why);
        true
    }

    /// What the job's `stop_when` rules say of the attempt's latest metrics.
    fn early_stop(&self, job: &Job, a: &AttemptRecord) -> Option<super::stop::Stop> {
        if job.spec.stop_when.is_empty() {
            return None;
        }
        self.observed
            .metrics
            .get(&a.tag)?
            .evaluate(&job.spec.stop_when)
    }

    /// Syncs the running attempt's checkpoint folder every `checkpoint.every` (counted
    /// from its last sync, or from the start of the job), and wakes the run when the
    /// next one is due.
    fn checkpoint(
        &mut self,
        key: &QueueKey,
        job: &Job,
        rec: &RunRecord,
        a: &AttemptRecord,
        instance: &Instance,
        started_at: Option<Timestamp>,
    ) {
        let Some(cp) = &job.spec.checkpoint else {
            return;
        };
        let every = cp.every.unwrap_or(CHECKPOINT_EVERY).as_secs().max(1) as i64;
        let last = match self.history.checkpoints.get(&rec.name) {
            Some((n, at)) if *n == a.attempt => *at,
            _ => started_at.unwrap_or(a.intent_at),
        };
        if self.now.saturating_sub(last) >= every {
            self.push(
                key,
                Op::SyncCheckpoint {
                    run: rec.name.clone(),
                    attempt: a.attempt,
                    instance: Box::new(instance.clone()),
                },
            );
            self.wake(key, Duration::from_secs(every as u64));
        } else {
            self.wake_at(key, last + every);
        }
    }

    /// The attempt ends with `outcome`: bring home what it made (when it ran), record the
    /// decision (retry or finish), and destroy its instance.
    #[allow(clippy::too_many_arguments)]
    fn end_attempt(
        &mut self,
        key: &QueueKey,
        job: &'a Job,
        rec: &RunRecord,
        attempts: &[&AttemptRecord],
        a: &AttemptRecord,
        instance: &Instance,
        outcome: Outcome,
        exit_code: Option<i32>,
        // The agent's last word on progress: a short run may end between two looks.
        progress: Option<Progress>,
    ) {
        if outcome.ran() {
            self.push(
                key,
                Op::Collect {
                    run: rec.name.clone(),
                    attempt: a.attempt,
                    instance: Box::new(instance.clone()),
                },
            );
        }
        let (phase, reason) = match outcome {
            Outcome::EarlyStopped { diverged } => (
                if diverged {
                    Phase::Failed
                } else {
                    Phase::Succeeded
                },
                self.early_stop(job, a).map_or_else(
                    || "EarlyStopped".to_string(),
                    |stop| format!("EarlyStopped: {}", stop.why),
                ),
            ),
            Outcome::Budget => (
                Phase::Pending,
                budget::over_limit(job, self.desired.budgets(), &self.budgets)
                    .first()
                    .map_or_else(|| "stopped by budget".to_string(), |b| b.reason()),
            ),
            _ => decide(job, attempts, a, &outcome, exit_code),
        };
        let why = format!("attempt {} ended: {outcome}", a.attempt);
        self.set_status(
            key,
            rec,
            phase,
            reason,
            progress,
            exit_code,
            Some((a.attempt, outcome)),
        );
        self.destroy_orphan(key, Some(&rec.name), instance, &why);
    }

    /// Emits a SetStatus when the phase, reason or exit code would change, or an outcome
    /// is to be recorded. Progress rides along but does not by itself make an op: the
    /// controller records observed progress, and nothing is rewritten because time
    /// passed (cost so far is derived when read).
    #[allow(clippy::too_many_arguments)]
    fn set_status(
        &mut self,
        key: &QueueKey,
        rec: &RunRecord,
        phase: Phase,
        reason: String,
        progress: Option<Progress>,
        exit_code: Option<i32>,
        outcome: Option<(u32, Outcome)>,
    ) {
        let old_progress = rec.progress_done.map(|done| Progress {
            done,
            total: rec.progress_total,
        });
        let progress = progress.or(old_progress);
        let unchanged = rec.phase == phase
            && rec.reason == reason
            && (exit_code.is_none() || rec.exit_code == exit_code)
            && outcome.is_none();
        if unchanged {
            return;
        }
        self.push(
            key,
            Op::SetStatus(StatusUpdate {
                run: rec.name.clone(),
                phase,
                reason,
                progress,
                exit_code,
                outcome,
            }),
        );
    }
}

/// True when `i` is the instance attempt `a` holds (any instance with its tag while the
/// attempt has no id yet).
fn owned_by(a: &AttemptRecord, i: &Instance) -> bool {
    i.provider == a.provider && a.instance_id.as_ref().is_none_or(|id| *id == i.id)
}

fn new_record(job: &Job, spec: &RunSpec, now: Timestamp) -> RunRecord {
    RunRecord::new_pending(
        &spec.name,
        &job.name,
        spec.index,
        &job.spec_hash,
        &spec.matrix,
        "",
        now,
    )
}

/// A run's stable id across its attempts (`ASIMOV_RUN_ID`, and `WANDB_RUN_ID` unless the
/// job sets one): its name and 8 hex of a hash of the controller, the name and when the
/// run was first recorded, so a deleted and re-applied run is a new id.
pub fn run_id(controller: &str, run: &str, created_at: Timestamp) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{controller}\n{run}\n{created_at}").as_bytes());
    format!("{run}-{}", &hex::encode(digest)[..8])
}

/// `2026-11-23 05:23:00 UTC`.
fn render_time(at: Timestamp) -> String {
    chrono::DateTime::from_timestamp(at, 0).map_or_else(
        || at.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// `outcome` marked as superseded by a spec change (once; an attempt that never
/// recorded an outcome counts as superseded).
pub fn spec_changed(outcome: Option<Outcome>) -> Outcome {
    match outcome {
        Some(o @ Outcome::SpecChanged(_)) => o,
        Some(o) => Outcome::SpecChanged(Box::new(o)),
        None => Outcome::SpecChanged(Box::new(Outcome::Superseded)),
    }
}

/// How an ended attempt weighs on what follows it.
enum Weight {
    /// Finished the run.
    Finished(Phase, String),
    /// Ran and failed in a way the retry policy may restart (`on`), described `what`.
    Restart(crate::manifest::RetryOn, String),
    /// The provider gave no (working) machine: the next placement, after a backoff.
    NoMachine,
    /// Back in the fleet queue: nothing counted, no backoff.
    Requeue,
    /// Ended from outside (budget, delete, supersede): go again, counting nothing.
    Again,
    /// The job changed after it: a fresh start with every restart.
    Fresh,
}

fn weigh(outcome: &Outcome, exit_code: Option<i32>) -> Weight {
    use crate::manifest::RetryOn;
    match outcome {
        Outcome::Succeeded => Weight::Finished(Phase::Succeeded, "exit code 0".into()),
        Outcome::TimedOut => Weight::Finished(Phase::Failed, "exceeded max_duration".into()),
        Outcome::EarlyStopped { diverged } => Weight::Finished(
            if *diverged {
                Phase::Failed
            } else {
                Phase::Succeeded
            },
            "EarlyStopped".into(),
        ),
        Outcome::Failed { exit_code: code } => {
            let what = match code.or(exit_code) {
                Some(c) => format!("failed with exit code {c}"),
                None => "failed".to_string(),
            };
            Weight::Restart(RetryOn::Error, what)
        }
        Outcome::Preempted => Weight::Restart(RetryOn::Preemption, "instance preempted".into()),
        Outcome::Lost => {
            Weight::Restart(RetryOn::Preemption, "agent lost (heartbeat stale)".into())
        }
        Outcome::NoCapacity | Outcome::Rejected | Outcome::BootTimeout => Weight::NoMachine,
        Outcome::Queued => Weight::Requeue,
        Outcome::Stopped
        | Outcome::Budget
        | Outcome::Deleted
        | Outcome::Destroyed
        | Outcome::Paused
        | Outcome::Superseded => Weight::Again,
        Outcome::SpecChanged(_) => Weight::Fresh,
    }
}

/// Restarts used so far in a run's generation, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restarts {
    pub preemption: u32,
    pub error: u32,
    /// Tries that found no capacity (or no machine that booted), in a row.
    pub no_capacity: u32,
}

impl Restarts {
    pub fn total(&self) -> u32 {
        self.preemption + self.error
    }
}

/// Why a restart of cause `on` is refused under `retry` with `used` restarts, if it is.
fn restart_refused(
    retry: &crate::manifest::RetryPolicy,
    on: crate::manifest::RetryOn,
    used: &Restarts,
) -> Option<String> {
    use crate::manifest::RetryOn;
    let (count, field) = match on {
        RetryOn::Preemption => (used.preemption, "max_preemptions"),
        RetryOn::Error => (used.error, "max_errors"),
        RetryOn::NoCapacity => return None,
    };
    if used.total() >= retry.max_restarts {
        return Some(format!("all {} restarts used", retry.max_restarts));
    }
    let max = retry.max_of(on);
    (count >= max).then(|| format!("all {max} {field} used"))
}

/// Folds the ended attempts in order: what follows the last one, and whether it closed
/// a generation (the run finished). Restarts are counted within a generation, by cause
/// (preemption, error, no capacity), so an edited job's fresh attempt starts with all
/// its restarts.
fn fold(job: &Job, attempts: &[&AttemptRecord], exit_code: Option<i32>) -> (Next, Restarts) {
    use crate::manifest::RetryOn;
    let retry = &job.spec.retry;
    let placements = job.spec.placement.len().max(1) as u32;
    let mut used = Restarts::default();
    // No-capacity tries in a row, for the backoff and the walk through placements.
    let mut no_cap = 0u32;
    let mut next = Next::Create {
        placement_index: 0,
        not_before: i64::MIN,
        reason: String::new(),
    };
    for a in attempts.iter() {
        let Some(outcome) = &a.outcome else { continue };
        let same = a.placement_index;
        let weight = weigh(outcome, exit_code);
        if !matches!(weight, Weight::NoMachine | Weight::Requeue) {
            no_cap = 0;
        }
        next = match weight {
            Weight::Fresh => {
                // The job was edited after this attempt finished the run: a fresh start.
                used = Restarts::default();
                Next::Create {
                    placement_index: 0,
                    not_before: i64::MIN,
                    reason: "spec changed; starting afresh".into(),
                }
            }
            // The fleet was full when the create ran (another controller, or a host
            // filled up since the listing): back in the queue, nothing counted.
            Weight::Requeue => Next::Create {
                placement_index: same,
                not_before: i64::MIN,
                reason: "no free host at create time; back in the queue".into(),
            },
            Weight::NoMachine => {
                no_cap += 1;
                used.no_capacity += 1;
                let next_index = (same + 1) % placements;
                let wait = backoff_delay(no_cap).as_secs() as i64;
                let at = a.released_at.unwrap_or(a.intent_at) + wait;
                let capacity = matches!(outcome, Outcome::NoCapacity | Outcome::BootTimeout);
                let gives_up =
                    capacity && !retry.retries(RetryOn::NoCapacity) && no_cap >= placements;
                let exhausted = capacity
                    && retry
                        .max_no_capacity
                        .is_some_and(|max| used.no_capacity > max);
                let what = match outcome {
                    Outcome::BootTimeout => "no placement booted in time",
                    _ => "no capacity on any placement",
                };
                if gives_up {
                    Next::Finished {
                        phase: Phase::Failed,
                        reason: what.into(),
                    }
                } else if exhausted {
                    Next::Finished {
                        phase: Phase::Failed,
                        reason: format!(
                            "{what}; all {} max_no_capacity tries used",
                            retry.max_no_capacity.unwrap_or(0)
                        ),
                    }
                } else {
                    let provider = job
                        .spec
                        .placement
                        .get(same as usize)
                        .map_or("?", |p| p.provider.as_str());
                    Next::Create {
                        placement_index: next_index,
                        not_before: at,
                        reason: format!(
                            "{} on {provider}, next try at {}",
                            outcome.word().replace('-', " "),
                            render_time(at)
                        ),
                    }
                }
            }
            Weight::Finished(phase, reason) => Next::Finished { phase, reason },
            Weight::Restart(on, what) => {
                let allowed = match on {
                    RetryOn::Error => {
                        let code = match outcome {
                            Outcome::Failed { exit_code: c } => c.or(exit_code),
                            _ => exit_code,
                        };
                        retry.restarts_failure(code)
                    }
                    _ if retry.retries(on) => Ok(()),
                    _ => Err("retry.on has no `preemption`".to_string()),
                };
                match allowed.map(|()| restart_refused(retry, on, &used)) {
                    Err(why) => Next::Finished {
                        phase: Phase::Failed,
                        reason: format!("{what}; not restarted: {why}"),
                    },
                    Ok(Some(why)) => Next::Finished {
                        phase: Phase::Failed,
                        reason: format!("{what}; {why}"),
                    },
                    Ok(None) => {
                        let (cause, n) = match on {
                            RetryOn::Error => {
                                used.error += 1;
                                ("error", used.error)
                            }
                            _ => {
                                used.preemption += 1;
                                ("preemption", used.preemption)
                            }
                        };
                        // The cause's own count when it has its own limit.
                        let own = match on {
                            RetryOn::Error => retry.max_errors,
                            _ => retry.max_preemptions,
                        }
                        .map_or_else(String::new, |_| {
                            format!(" ({cause} {n} of {})", retry.max_of(on))
                        });
                        Next::Create {
                            placement_index: same,
                            not_before: i64::MIN,
                            reason: format!(
                                "{what}; restart {} of {}{own}",
                                used.total(),
                                retry.max_restarts,
                            ),
                        }
                    }
                }
            }
            // Stopped by a budget, superseded, paused, deleted then re-applied: go
            // again, without counting a restart.
            Weight::Again => Next::Create {
                placement_index: same,
                not_before: i64::MIN,
                reason: format!("attempt {} ended: {outcome}", a.attempt),
            },
        };
    }
    (next, used)
}

/// The restarts a run has used in its current generation, by cause (for `describe`).
pub fn restarts_used(job: &Job, attempts: &[AttemptRecord]) -> Restarts {
    let mut sorted: Vec<&AttemptRecord> = attempts.iter().collect();
    sorted.sort_by_key(|a| a.attempt);
    fold(job, &sorted, None).1
}

/// What follows the ended attempts of a run.
fn next_step(job: &Job, attempts: &[&AttemptRecord], exit_code: Option<i32>) -> Next {
    fold(job, attempts, exit_code).0
}

/// The phase and reason a run takes when its live attempt `a` ends with `outcome`.
fn decide(
    job: &Job,
    attempts: &[&AttemptRecord],
    a: &AttemptRecord,
    outcome: &Outcome,
    exit_code: Option<i32>,
) -> (Phase, String) {
    let mut ended = a.clone();
    ended.outcome = Some(outcome.clone());
    let mut hypothetical: Vec<&AttemptRecord> = attempts
        .iter()
        .copied()
        .filter(|x| x.attempt != a.attempt)
        .collect();
    hypothetical.push(&ended);
    hypothetical.sort_by_key(|x| x.attempt);
    match fold(job, &hypothetical, exit_code).0 {
        Next::Finished { phase, reason } => (phase, reason),
        Next::Create { reason, .. } => (Phase::Pending, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::JobSpec;

    #[test]
    fn a_desired_run_is_found_by_name_whatever_the_order_of_its_jobs() {
        let job = |name: &str, runs| Job::from_spec(name, JobSpec::with_run("true"), runs, "h");
        let d = Desired::new(
            vec![job("zeta", 2), job("alpha", 1), job("mid", 3)],
            vec![],
            "c",
        );
        for (job, run) in [("zeta", "zeta-1"), ("alpha", "alpha-0"), ("mid", "mid-2")] {
            let (j, r) = d.find_run(run).expect(run);
            assert_eq!((j.name.as_str(), r.name.as_str()), (job, run));
        }
        for missing in ["zeta-2", "alpha", "", "mid-10", "zz"] {
            assert!(d.find_run(missing).is_none(), "{missing}");
        }
        assert!(Desired::default().find_run("a-0").is_none());
    }
}
