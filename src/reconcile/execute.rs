//! The executor: applies ONE planned op at a time, idempotently, against the providers,
//! the agents and the store. Every failure is classified by `ErrorKind` so the
//! controller's error policy can pick the requeue; nothing here retries inline. It holds
//! providers only as `dyn Provider` and reads what they are from their capabilities.

use super::checkpoint::Teardown;
use super::plan::{Desired, Op, StatusUpdate, spec_changed};
use crate::agent::{AgentError, LaunchSource, LaunchSpec, S3Launch};
use crate::artifacts::{
    Generation, S3Client, S3Config, S3Credentials, S3Error, S3Location, S3Target, curl_config,
};
use crate::failpoint;
use crate::home::Home;
use crate::manifest::{Job, RunSpec, Source};
use crate::model::{Outcome, Phase, ProviderKind, RunName, Secret, Timestamp, Usd};
use crate::provider::{CreateRequest, ErrorKind, InstanceState, Provider, ProviderError};
use crate::store::{AttemptRecord, CostEntry, Event, RunError, RunRecord, Store, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why an op could not be applied. Each variant names the op and keeps its cause.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{op}")]
    Provider {
        op: String,
        #[source]
        source: Box<ProviderError>,
    },
    #[error("{op}")]
    Store {
        op: String,
        #[source]
        source: StoreError,
    },
    #[error("{op}")]
    Agent {
        op: String,
        #[source]
        source: Box<AgentError>,
    },
    #[error("{op}: provider {provider} is not configured")]
    NoProvider { op: String, provider: ProviderKind },
    #[error("{op}: run {run} is not in the store")]
    MissingRun { op: String, run: RunName },
    #[error("{op}: run {run} is not in the desired state")]
    NotDesired { op: String, run: RunName },
    #[error("{op}: cannot read secret {name} from the credential store")]
    Secret {
        op: String,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: cannot create {}", path.display())]
    Local {
        op: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}")]
    Checkpoint {
        op: String,
        #[source]
        source: Box<super::checkpoint::SyncError>,
    },
    #[error("{op}")]
    S3 {
        op: String,
        #[source]
        source: Box<crate::artifacts::S3Error>,
    },
    /// A create for an attempt that has already ended (an op planned before the
    /// attempt's end reached the store): creating now would start a second instance
    /// under a tag whose first one is gone, billing for a run that is over.
    #[error("{op}: attempt {attempt} of {run} has already ended; not creating it again")]
    AttemptEnded {
        op: String,
        run: RunName,
        attempt: u32,
    },
    #[error("{op}: {attempts} attempt(s) of {run} are not released yet")]
    Unreleased {
        op: String,
        run: RunName,
        attempts: usize,
    },
}

impl ExecError {
    /// The canonical class of the failure, for the error policy.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExecError::Provider { source, .. } => source.kind.clone(),
            ExecError::Agent { source, .. } => ErrorKind::of_agent(source),
            // The store is local: a failure is a busy or full disk, worth a retry.
            ExecError::Store { .. } => ErrorKind::Transient,
            ExecError::Unreleased { .. } | ExecError::MissingRun { .. } => ErrorKind::Transient,
            // The next pass plans from what the store now says.
            ExecError::AttemptEnded { .. } => ErrorKind::AlreadyExists,
            ExecError::NoProvider { .. } | ExecError::NotDesired { .. } => ErrorKind::Permanent,
            ExecError::Secret { .. } => ErrorKind::Permanent,
            ExecError::Local { .. } => ErrorKind::Transient,
            ExecError::Checkpoint { source, .. } if source.is_permanent() => ErrorKind::Permanent,
            ExecError::Checkpoint { .. } => ErrorKind::Transient,
            ExecError::S3 { source, .. } if source.is_permanent() => ErrorKind::Permanent,
            ExecError::S3 { .. } => ErrorKind::Transient,
        }
    }
}

/// The folder, inside a deleted run's outputs folder, its last checkpoint is kept in.
pub const KEPT_CHECKPOINT: &str = "checkpoint";

/// Applies ops. Shared by the controller's concurrent op groups.
pub struct Executor {
    pub providers: BTreeMap<ProviderKind, Arc<dyn Provider>>,
    pub store: Arc<Mutex<Store>>,
    pub home: Home,
    /// API calls (create, destroy) in flight per provider, as its pacing allows. A
    /// paced create waits for its turn holding one of these.
    limits: BTreeMap<ProviderKind, Arc<Semaphore>>,
    /// Work on a provider's machines (agent start, status reads, collect) in flight:
    /// apart from the API calls, so a ready instance never waits behind other runs'
    /// paced creates.
    machine_limits: BTreeMap<ProviderKind, Arc<Semaphore>>,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // Every store write is one transaction: a panic mid-op leaves nothing half-written.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

impl Executor {
    pub fn new(
        providers: BTreeMap<ProviderKind, Arc<dyn Provider>>,
        store: Arc<Mutex<Store>>,
        home: Home,
    ) -> Self {
        let limits = providers
            .iter()
            .map(|(k, p)| (*k, limit_of(p.as_ref())))
            .collect();
        let machine_limits = providers
            .iter()
            .map(|(k, p)| (*k, limit_of(p.as_ref())))
            .collect();
        Executor {
            providers,
            store,
            home,
            limits,
            machine_limits,
        }
    }

    /// Also registers `provider` under its kind (replacing one of that kind).
    pub fn with_provider(mut self, provider: Arc<dyn Provider>) -> Self {
        let kind = provider.kind();
        self.limits.insert(kind, limit_of(provider.as_ref()));
        self.machine_limits
            .insert(kind, limit_of(provider.as_ref()));
        self.providers.insert(kind, provider);
        self
    }

    /// At a controller's start: a create a predecessor left in flight when it died
    /// (an intent without an instance) may have waited in the pacer or retried in
    /// place for longer than the listing lag before it was sent, and may still land:
    /// its lag counts from now, or it would be bought twice.
    pub fn creates_in_flight_until(&self, now: Timestamp) -> Result<(), StoreError> {
        let store = lock(&self.store);
        for mut a in store.unreleased_attempts()? {
            if a.instance_id.is_none() && a.intent_at < now {
                a.intent_at = now;
                store.put_attempt(&a)?;
            }
        }
        Ok(())
    }

    /// Waits for room to call `kind`'s API (its pacing's calls in flight); no limit for
    /// a provider that is not registered (its call fails at once anyway).
    pub async fn permit(&self, kind: ProviderKind) -> Option<OwnedSemaphorePermit> {
        let limit = Arc::clone(self.limits.get(&kind)?);
        limit.acquire_owned().await.ok()
    }

    /// Waits for room to work on one of `kind`'s machines (agent start, status, collect).
    pub async fn machine_permit(&self, kind: ProviderKind) -> Option<OwnedSemaphorePermit> {
        let limit = Arc::clone(self.machine_limits.get(&kind)?);
        limit.acquire_owned().await.ok()
    }

    fn provider(&self, op: &Op, kind: ProviderKind) -> Result<&Arc<dyn Provider>, ExecError> {
        self.providers
            .get(&kind)
            .ok_or_else(|| ExecError::NoProvider {
                op: op.to_string(),
                provider: kind,
            })
    }

    fn store<T>(
        &self,
        op: &Op,
        f: impl FnOnce(&Store) -> Result<T, StoreError>,
    ) -> Result<T, ExecError> {
        f(&lock(&self.store)).map_err(|source| ExecError::Store {
            op: op.to_string(),
            source,
        })
    }

    fn run_record(&self, op: &Op, run: &str) -> Result<RunRecord, ExecError> {
        self.store(op, |s| s.run(run))?
            .ok_or_else(|| ExecError::MissingRun {
                op: op.to_string(),
                run: run.to_string(),
            })
    }

    fn attempt(&self, op: &Op, run: &str, n: u32) -> Result<Option<AttemptRecord>, ExecError> {
        Ok(self
            .store(op, |s| s.attempts(run))?
            .into_iter()
            .find(|a| a.attempt == n))
    }

    fn event(&self, op: &Op, run: &str, reason: &str, message: String, now: Timestamp) {
        let e = Event {
            at: now,
            object_kind: "run".into(),
            object_name: run.to_string(),
            reason: reason.into(),
            message,
        };
        // Events are for people reading `describe`; losing one must not fail the op.
        if let Err(err) = self.store(op, |s| s.add_event(&e)) {
            tracing::warn!(error = %err, "cannot record event");
        }
    }

    /// Applies one op. Idempotent: applying it again, or after a crash half-way through,
    /// leaves the same state. A failed step of a run is recorded as the run's last
    /// error (readers show it beside the reason) until a start goes through.
    pub async fn apply(&self, op: &Op, desired: &Desired, now: Timestamp) -> Result<(), ExecError> {
        let result = self.apply_op(op, desired, now).await;
        self.note_outcome(op, &result, now);
        result
    }

    /// Keeps the run's last step error in the store; losing it must not fail the op.
    fn note_outcome(&self, op: &Op, result: &Result<(), ExecError>, now: Timestamp) {
        let Some(run) = op.run() else { return };
        let written = match (op, result) {
            // Store-only bookkeeping: its failures are the store's, not the run's.
            (Op::RecordRun { .. } | Op::SetStatus(_) | Op::Forget { .. } | Op::Block { .. }, _) => {
                return;
            }
            (_, Err(e)) => {
                let mut message = e.to_string();
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    let text = c.to_string();
                    if !message.contains(&text) {
                        message.push_str(": ");
                        message.push_str(&text);
                    }
                    cause = c.source();
                }
                let error = RunError {
                    step: op.kind().to_string(),
                    message,
                    detail: String::new(),
                    at: now,
                };
                lock(&self.store).set_run_error(run, &error)
            }
            (Op::Start { .. }, Ok(())) => lock(&self.store).clear_run_error(run),
            (_, Ok(())) => return,
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the run's last error");
        }
    }

    /// A failed setup, as the agent marks it in the collected log: the run's last error,
    /// with the last lines the setup printed.
    fn note_setup_failure(&self, run: &str, log: &std::path::Path, now: Timestamp) {
        const TAIL: u64 = 64 * 1024;
        const LINES: usize = 20;
        let Ok(text) = read_tail(log, TAIL) else {
            return;
        };
        let lines: Vec<&str> = text.lines().collect();
        let Some(at) = lines
            .iter()
            .rposition(|l| l.starts_with(crate::agent::SETUP_FAILED_MARKER))
        else {
            return;
        };
        let message = lines[at].trim_start_matches("asimov: ").to_string();
        let detail = lines[at.saturating_sub(LINES)..at].join("\n");
        let error = RunError {
            step: "setup".into(),
            message,
            detail,
            at: now,
        };
        if let Err(e) = lock(&self.store).set_run_error(run, &error) {
            tracing::warn!(error = %e, "cannot record the run's failed setup");
        }
    }

    async fn apply_op(&self, op: &Op, desired: &Desired, now: Timestamp) -> Result<(), ExecError> {
        match op {
            Op::RecordRun {
                run,
                job,
                index,
                spec_hash,
                matrix,
                supersede,
            } => {
                let existing = self.store(op, |s| s.run(run))?;
                let mut rec = match existing {
                    None => RunRecord::new_pending(
                        run,
                        job,
                        *index,
                        spec_hash,
                        matrix,
                        "waiting to start",
                        now,
                    ),
                    Some(mut r) => {
                        r.spec_hash = spec_hash.clone();
                        r.matrix = matrix.clone();
                        r.phase = Phase::Pending;
                        r.reason = "spec changed; starting afresh".into();
                        r.exit_code = None;
                        r.progress_done = None;
                        r.progress_total = None;
                        r.finished_at = None;
                        r.updated_at = now;
                        r
                    }
                };
                let diff = match find_run(desired, run) {
                    Some((job, spec)) => {
                        let exclude = self.written_by_asimov(desired, run);
                        record_source(&mut rec, job, spec, exclude).await
                    }
                    None => None,
                };
                // Mark the superseded attempt first: the run row is what the planner
                // reads as "done", so it is written last.
                if let Some(n) = supersede
                    && let Some(mut a) = self.attempt(op, run, *n)?
                    && !matches!(a.outcome, Some(Outcome::SpecChanged(_)))
                {
                    a.outcome = Some(spec_changed(a.outcome.take()));
                    self.store(op, |s| s.put_attempt(&a))?;
                }
                self.store(op, |s| s.put_run_with_diff(&rec, diff.as_deref()))?;
                self.event(op, run, "Recorded", format!("spec {spec_hash}"), now);
                Ok(())
            }
            Op::Create {
                run,
                attempt,
                placement_index,
                provider,
                tag,
            } => {
                let (job, _) = find_run(desired, run).ok_or_else(|| ExecError::NotDesired {
                    op: op.to_string(),
                    run: run.clone(),
                })?;
                let backend = Arc::clone(self.provider(op, *provider)?);
                let mut rec = self.run_record(op, run)?;
                // Intent FIRST: whatever happens to the create call, the tag is known.
                // The attempt and the run row pointing at it are one transaction.
                let existing = self.attempt(op, run, *attempt)?;
                if existing
                    .as_ref()
                    .is_some_and(|a| a.outcome.is_some() || a.released_at.is_some())
                {
                    return Err(ExecError::AttemptEnded {
                        op: op.to_string(),
                        run: run.clone(),
                        attempt: *attempt,
                    });
                }
                let mut a = existing.unwrap_or_else(|| AttemptRecord {
                    run: run.clone(),
                    attempt: *attempt,
                    tag: tag.render(),
                    provider: *provider,
                    placement_index: *placement_index,
                    instance_id: None,
                    host: None,
                    intent_at: now,
                    released_at: None,
                    outcome: None,
                });
                // A create sent again for the same attempt: the listing lag counts from
                // this one (a controller killed during it must not buy a third).
                a.intent_at = a.intent_at.max(now);
                let asked = tokio::time::Instant::now();
                rec.attempt = *attempt;
                rec.placement_index = *placement_index;
                rec.provider = Some(*provider);
                rec.instance_id = None;
                rec.billing_since = None;
                rec.phase = Phase::Provisioning;
                rec.reason = format!("creating an instance on {provider}");
                rec.updated_at = now;
                self.store(op, |s| s.put_intent(&a, &rec))?;
                failpoint::hit("create:after-intent");
                let placement = job
                    .spec
                    .placement
                    .get(*placement_index as usize)
                    .cloned()
                    .unwrap_or_else(crate::manifest::Placement::local);
                let req = CreateRequest {
                    tag: tag.clone(),
                    placement,
                    resources: job.spec.resources.clone(),
                    image: job.spec.image.clone(),
                };
                let created = {
                    let _permit = self.permit(*provider).await;
                    backend.create(&req).await
                };
                failpoint::hit("create:after-provider");
                match created {
                    Ok(inst) => {
                        a.instance_id = Some(inst.id.clone());
                        a.host = inst.host.clone();
                        self.store(op, |s| s.put_attempt(&a))?;
                        rec.instance_id = Some(inst.id.clone());
                        rec.host = inst.host.clone();
                        rec.gpu = inst.gpu.clone();
                        rec.price_per_hour = Some(inst.price_per_hour);
                        // Billing counts from the request: a cloud may bill the boot.
                        rec.billing_since = Some(a.intent_at);
                        rec.reason = format!("instance {provider}/{} created", inst.id);
                        self.store(op, |s| s.put_run(&rec))?;
                        self.event(op, run, "Created", rec.reason.clone(), now);
                        Ok(())
                    }
                    // Definitely nothing was created: close the attempt now so the
                    // planner moves to the next placement.
                    Err(e) if e.kind == ErrorKind::NoCapacity || e.kind.refuses_create() => {
                        let no_capacity = e.kind == ErrorKind::NoCapacity;
                        // A full fixed pool is a queue, not a failure: the planner waits
                        // for a free host without a backoff.
                        let queued = no_capacity && backend.capabilities().fixed_pool;
                        a.outcome = Some(if queued {
                            Outcome::Queued
                        } else if no_capacity {
                            Outcome::NoCapacity
                        } else {
                            Outcome::Rejected
                        });
                        a.released_at = Some(now);
                        self.store(op, |s| s.put_attempt(&a))?;
                        rec.phase = Phase::Pending;
                        rec.reason = if queued {
                            format!("no free host on {provider}: {}", e.message)
                        } else if no_capacity {
                            // What was tried and why each refused (Lambda names every
                            // type and region): why the run waits, in its events.
                            format!("no capacity on {provider}: {}", e.message)
                        } else {
                            format!("{provider} rejected the create: {}", e.message)
                        };
                        self.store(op, |s| s.put_run(&rec))?;
                        self.event(op, run, "CreateFailed", rec.reason.clone(), now);
                        if no_capacity {
                            Ok(())
                        } else {
                            Err(ExecError::Provider {
                                op: op.to_string(),
                                source: Box::new(e),
                            })
                        }
                    }
                    // Ambiguous (timeout, 5xx, rate limit): the intent stays; the next
                    // pass adopts the instance if the listing shows the tag. The create
                    // was in flight until now, after waits in the pacer and retries in
                    // place that can outlast the listing lag: the lag counts from here,
                    // or a create that lands late is bought twice.
                    Err(e) => {
                        let secs = asked.elapsed().as_secs_f64().ceil() as Timestamp;
                        a.intent_at = a.intent_at.max(now.saturating_add(secs));
                        if let Err(store) = self.store(op, |s| s.put_attempt(&a)) {
                            tracing::warn!(error = %store, "cannot record when the create ended");
                        }
                        Err(ExecError::Provider {
                            op: op.to_string(),
                            source: Box::new(e),
                        })
                    }
                }
            }
            Op::Adopt {
                run,
                attempt,
                provider,
                instance,
            } => {
                if let Some(mut a) = self.attempt(op, run, *attempt)?
                    && a.instance_id.is_none()
                {
                    a.instance_id = Some(instance.clone());
                    self.store(op, |s| s.put_attempt(&a))?;
                }
                let mut rec = self.run_record(op, run)?;
                // A create cut off before its run row was written: the row catches up
                // with the attempt the planner took as current.
                if rec.attempt < *attempt
                    && let Some(a) = self.attempt(op, run, *attempt)?
                    && a.released_at.is_none()
                {
                    rec.attempt = *attempt;
                    rec.placement_index = a.placement_index;
                }
                if rec.attempt == *attempt {
                    rec.instance_id = Some(instance.clone());
                    rec.provider = Some(*provider);
                    if let Some(a) = self.attempt(op, run, *attempt)? {
                        rec.billing_since = Some(a.intent_at);
                    }
                    rec.updated_at = now;
                    self.store(op, |s| s.put_run(&rec))?;
                }
                self.event(op, run, "Adopted", format!("{provider}/{instance}"), now);
                Ok(())
            }
            Op::Start {
                run,
                attempt,
                instance,
            } => {
                let (job, spec) = find_run(desired, run).ok_or_else(|| ExecError::NotDesired {
                    op: op.to_string(),
                    run: run.clone(),
                })?;
                let rec = self.run_record(op, run)?;
                let mut launch = self.launch_spec(op, job, spec, &rec, &instance.tag.render())?;
                // What asimov writes is never uploaded, even inside the working folder.
                launch.exclude = self.written_by_asimov(desired, run);
                let restored = if s3_url(job).is_some() {
                    self.s3_launch(op, job, run, *attempt, &mut launch).await?
                } else {
                    self.restore_point(op, job, run, &mut launch)?
                };
                let backend = self.provider(op, instance.provider)?;
                let machine = backend
                    .machine(instance)
                    .map_err(|source| ExecError::Provider {
                        op: op.to_string(),
                        source: Box::new(source),
                    })?;
                // Before the job can start: its teardown must find this even once the
                // job is deleted.
                let teardown = self.teardown_of(desired, job, run);
                let dir = super::checkpoint::CheckpointDir::new(self.home.checkpoints().join(run));
                dir.record_teardown(&teardown)
                    .map_err(|source| ExecError::Local {
                        op: op.to_string(),
                        path: self.home.checkpoints().join(run),
                        source,
                    })?;
                let _permit = self.machine_permit(instance.provider).await;
                self.check_gpus(op, job, machine.as_ref(), &mut launch, now)
                    .await?;
                machine
                    .start(&launch)
                    .await
                    .map_err(|source| ExecError::Agent {
                        op: op.to_string(),
                        source: Box::new(source),
                    })?;
                failpoint::hit("start:after-upload");
                if let Some(seq) = restored
                    && self.store(op, |s| s.set_resumed_from(run, *attempt, seq, now))?
                {
                    self.event(
                        op,
                        run,
                        "Resumed",
                        format!("attempt {attempt} from checkpoint {seq}"),
                        now,
                    );
                }
                // When the run started, even if it ends before the next look; and the
                // spec it runs: the job may have been edited since the run was recorded,
                // and a run that started with the edit has run it (re-running it once
                // it ends would pay for the same spec twice).
                let mut rec = self.run_record(op, run)?;
                if rec.started_at.is_none() || rec.spec_hash != job.spec_hash {
                    rec.started_at.get_or_insert(now);
                    rec.spec_hash = job.spec_hash.clone();
                    self.store(op, |s| s.put_run(&rec))?;
                }
                self.event(
                    op,
                    run,
                    "Started",
                    format!("{}/{}", instance.provider, instance.id),
                    now,
                );
                Ok(())
            }
            Op::SetStatus(update) => self.set_status(op, update, now),
            Op::SyncCheckpoint {
                run,
                attempt,
                instance,
            } => {
                let backend = self.provider(op, instance.provider)?;
                let machine = backend
                    .machine(instance)
                    .map_err(|source| ExecError::Provider {
                        op: op.to_string(),
                        source: Box::new(source),
                    })?;
                let Some((job, _)) = find_run(desired, run) else {
                    return Ok(());
                };
                if s3_url(job).is_some() {
                    return self
                        .sync_s3(op, Some(job), machine.as_ref(), run, *attempt, false, now)
                        .await;
                }
                let path = job.spec.checkpoint.as_ref().map(|c| c.path.as_str());
                self.sync_checkpoint(op, path, machine.as_ref(), run, *attempt, false, now)
                    .await
            }
            Op::Collect {
                run,
                attempt,
                instance,
            } => {
                let backend = self.provider(op, instance.provider)?;
                let machine = backend
                    .machine(instance)
                    .map_err(|source| ExecError::Provider {
                        op: op.to_string(),
                        source: Box::new(source),
                    })?;
                let teardown = self.teardown(desired, run);
                let job = find_run(desired, run).map(|(job, _)| job);
                let limit = final_sync_limit();
                let collected = tokio::time::timeout(
                    limit,
                    self.collect(
                        op,
                        instance.provider,
                        job,
                        &teardown,
                        machine.as_ref(),
                        run,
                        *attempt,
                        now,
                    ),
                )
                .await;
                match collected {
                    Ok(result) => result,
                    // A sync that does not finish in time has failed for good: the
                    // teardown goes on without it, and the run says so.
                    Err(_) => {
                        let message = format!(
                            "final sync did not finish within {}s; torn down without it",
                            limit.as_secs()
                        );
                        tracing::warn!(run = %run, attempt, "{message}");
                        self.event(op, run, "SyncFailed", message, now);
                        Ok(())
                    }
                }
            }
            Op::Destroy {
                provider,
                instance_id,
                run,
                reason,
            } => {
                let backend = self.provider(op, *provider)?;
                let destroyed = {
                    let _permit = self.permit(*provider).await;
                    backend.destroy(instance_id).await
                };
                match destroyed {
                    Ok(()) => {}
                    // Already gone is what we wanted.
                    Err(e) if e.kind == ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(ExecError::Provider {
                            op: op.to_string(),
                            source: Box::new(source),
                        });
                    }
                }
                failpoint::hit("destroy:after-provider");
                if let Some(run) = run {
                    self.event(
                        op,
                        run,
                        "Destroyed",
                        format!("{provider}/{instance_id}: {reason}"),
                        now,
                    );
                }
                Ok(())
            }
            Op::Release {
                run,
                attempt,
                outcome,
            } => {
                let Some(mut a) = self.attempt(op, run, *attempt)? else {
                    return Ok(());
                };
                if a.released_at.is_some() {
                    return Ok(());
                }
                failpoint::hit("release:before");
                a.released_at = Some(now);
                a.outcome.get_or_insert_with(|| outcome.clone());
                let rec = self.store(op, |s| s.run(run))?;
                if let Some(mut rec) = rec
                    && a.instance_id.is_some()
                    && let Some(price) = rec.price_per_hour.filter(|_| rec.attempt == *attempt)
                {
                    // The ledger entry lands with the release, once per attempt: from
                    // the request, or from where its price last changed (a disk kept on
                    // pause bills storage only; its slices are in the ledger already).
                    let from = rec.billing_since.unwrap_or(a.intent_at).max(a.intent_at);
                    let entry = CostEntry {
                        run: run.clone(),
                        job: rec.job.clone(),
                        attempt: *attempt,
                        from,
                        to: now,
                        usd: super::budget::accrued(price, from, now),
                    };
                    self.store(op, |s| s.add_cost(&entry))?;
                    // The ledger now holds what the instance cost: nothing bills on.
                    rec.cost_usd = self.ledger_cost(op, run)?;
                    rec.billing_since = None;
                    self.store(op, |s| s.put_run(&rec))?;
                }
                self.store(op, |s| s.put_attempt(&a))?;
                self.event(
                    op,
                    run,
                    "Released",
                    format!("attempt {attempt}: {outcome}"),
                    now,
                );
                Ok(())
            }
            Op::Forget { run } => {
                let open = self
                    .store(op, |s| s.attempts(run))?
                    .into_iter()
                    .filter(|a| a.released_at.is_none())
                    .count();
                if open > 0 {
                    return Err(ExecError::Unreleased {
                        op: op.to_string(),
                        run: run.clone(),
                        attempts: open,
                    });
                }
                failpoint::hit("forget:before");
                let checkpoints =
                    super::checkpoint::CheckpointDir::new(self.home.checkpoints().join(run));
                // The newest checkpoint brought home stays the user's, beside the
                // outputs (a copy cut off by a crash is made again: Forget is retried).
                let outputs = checkpoints
                    .teardown()
                    .and_then(|t| t.outputs)
                    .unwrap_or_else(|| self.home.artifacts().join(run));
                let kept = outputs.join(KEPT_CHECKPOINT);
                match checkpoints.keep_latest(&kept) {
                    Ok(Some(seq)) => {
                        tracing::info!(run = %run, seq, to = %kept.display(), "kept the run's last checkpoint");
                    }
                    Ok(None) => {}
                    Err(source) => {
                        return Err(ExecError::Local {
                            op: op.to_string(),
                            path: kept,
                            source,
                        });
                    }
                }
                if let Err(e) = checkpoints.remove() {
                    tracing::warn!(run = %run, error = %e, "cannot remove the run's checkpoints");
                }
                // The kept log belongs to the run (outputs in artifacts/ are the user's).
                // Removed first: a crash in between leaves the run, and Forget retried.
                match std::fs::remove_file(self.home.run_log(run)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(run = %run, error = %e, "cannot remove the run's log");
                    }
                    _ => {}
                }
                self.store(op, |s| s.forget_run(run))
            }
            Op::KeepDisk { run, attempt } => {
                self.store(op, |s| s.put_kept_disk(run, *attempt, now))?;
                failpoint::hit("keep-disk:after-record");
                Ok(())
            }
            Op::StopKeepingDisk {
                run,
                attempt,
                instance,
            } => {
                let backend = self.provider(op, instance.provider)?;
                if instance.state == InstanceState::Running {
                    // The job stops first, its run not over (no end-of-run hook: that
                    // would destroy the instance), so the disk is still when stopped.
                    // A machine that does not answer is stopped all the same: the
                    // provider's stop ends its container, and a pause never leaves a
                    // GPU billing.
                    let paused = match backend.machine(instance) {
                        Ok(machine) => {
                            let _permit = self.machine_permit(instance.provider).await;
                            machine.pause().await.map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(message) = paused {
                        tracing::warn!(run = %run, attempt, "{message}");
                        self.event(op, run, "PauseUnconfirmed", message, now);
                    }
                }
                failpoint::hit("keep-disk:after-agent");
                let storage = {
                    let _permit = self.permit(instance.provider).await;
                    backend.stop_keeping_disk(&instance.id).await
                }
                .map_err(|source| ExecError::Provider {
                    op: op.to_string(),
                    source: Box::new(source),
                })?;
                failpoint::hit("keep-disk:after-stop");
                self.store(op, |s| s.stopped_kept_disk(run, *attempt, now))?;
                if let Some(price) = storage {
                    self.reprice(op, run, *attempt, price, now)?;
                }
                self.event(
                    op,
                    run,
                    "DiskKept",
                    format!(
                        "{}/{} stopped, its disk kept{}",
                        instance.provider,
                        instance.id,
                        storage.map_or_else(String::new, |p| format!(" at ${:.4}/h", p.dollars()))
                    ),
                    now,
                );
                Ok(())
            }
            Op::StartKept {
                run,
                attempt,
                instance,
            } => {
                let backend = self.provider(op, instance.provider)?;
                // No API permit held: the start waits for the instance to run, and the
                // provider's pacing spaces its calls anyway.
                match backend.start_kept(&instance.id).await {
                    Ok(running) => {
                        failpoint::hit("start-kept:after-provider");
                        self.reprice(op, run, *attempt, running.price_per_hour, now)?;
                        self.event(
                            op,
                            run,
                            "Restarted",
                            format!(
                                "{}/{} runs again on its kept disk",
                                running.provider, running.id
                            ),
                            now,
                        );
                        Ok(())
                    }
                    // It will not run again (its GPUs taken, or it is gone): the planner
                    // destroys it and resumes from the synced checkpoint elsewhere.
                    Err(e)
                        if matches!(
                            e.kind,
                            ErrorKind::NoCapacity | ErrorKind::NotFound | ErrorKind::Permanent
                        ) =>
                    {
                        let why = e.to_string();
                        self.store(op, |s| s.refuse_kept_disk(run, *attempt, &why))?;
                        self.event(op, run, "StartRefused", why, now);
                        Ok(())
                    }
                    Err(source) => Err(ExecError::Provider {
                        op: op.to_string(),
                        source: Box::new(source),
                    }),
                }
            }
            Op::ResumeKept {
                run,
                attempt,
                instance,
            } => {
                let (job, _) = find_run(desired, run).ok_or_else(|| ExecError::NotDesired {
                    op: op.to_string(),
                    run: run.clone(),
                })?;
                let backend = self.provider(op, instance.provider)?;
                let machine = backend
                    .machine(instance)
                    .map_err(|source| ExecError::Provider {
                        op: op.to_string(),
                        source: Box::new(source),
                    })?;
                // The checkpoint the job wrote on this disk (relative: in its working
                // folder, as the agent resolves it).
                let resume_from = job.spec.checkpoint.as_ref().map(|c| c.path.as_str());
                {
                    let _permit = self.machine_permit(instance.provider).await;
                    machine
                        .resume(resume_from)
                        .await
                        .map_err(|source| ExecError::Agent {
                            op: op.to_string(),
                            source: Box::new(source),
                        })?;
                }
                failpoint::hit("resume-kept:after-agent");
                // Billing at the running price again, if the start's own repricing was
                // cut off by a crash.
                self.reprice(op, run, *attempt, instance.price_per_hour, now)?;
                self.store(op, |s| s.drop_kept_disk(run, *attempt))?;
                self.event(
                    op,
                    run,
                    "Resumed",
                    format!(
                        "attempt {attempt} on its kept disk{}",
                        resume_from.map_or_else(String::new, |p| format!(" from {p}"))
                    ),
                    now,
                );
                Ok(())
            }
            Op::Block { run, reason } => {
                let mut rec = self.run_record(op, run)?;
                rec.phase = Phase::Pending;
                rec.reason = reason.clone();
                rec.updated_at = now;
                self.store(op, |s| s.put_run(&rec))?;
                self.event(op, run, "Blocked", reason.clone(), now);
                Ok(())
            }
        }
    }

    /// Readiness of a rented instance for a job that asks for GPUs: `nvidia-smi` must
    /// show at least that many. Too few: the job is not run there, it fails in setup
    /// with the reason in its log (the retry policy decides what next, and the instance
    /// is destroyed as for any ended attempt). No `nvidia-smi`: a warning event only.
    async fn check_gpus(
        &self,
        op: &Op,
        job: &Job,
        machine: &dyn crate::agent::Machine,
        launch: &mut crate::agent::LaunchSpec,
        now: Timestamp,
    ) -> Result<(), ExecError> {
        use crate::agent::GpuProbe;
        let want = job.spec.resources.gpu.as_ref().map_or(0, |g| g.count);
        if want == 0 {
            return Ok(());
        }
        let probe = machine.gpus().await.map_err(|source| ExecError::Agent {
            op: op.to_string(),
            source: Box::new(source),
        })?;
        let run = &launch.run;
        match probe {
            GpuProbe::Shows(n) if n < want => {
                let why = format!("nvidia-smi shows {n} GPU(s), the job asks for {want}");
                self.event(op, run, "GpuMismatch", why.clone(), now);
                launch.setup = vec![format!(
                    "echo {} >&2; exit 1",
                    crate::agent::sh_quote(&format!("asimov: {why}"))
                )];
            }
            GpuProbe::NoNvidiaSmi => self.event(
                op,
                run,
                "GpusUnchecked",
                format!("warning: no nvidia-smi on the instance; its {want} GPU(s) not checked"),
                now,
            ),
            GpuProbe::Shows(_) | GpuProbe::Unchecked => {}
        }
        Ok(())
    }

    /// Brings the run's checkpoint home (when the job declares one). A machine that
    /// keeps no files can never sync: the run's events say so and the op goes on, so
    /// that a teardown waits for a sync that can finish, never for one that cannot.
    #[allow(clippy::too_many_arguments)]
    async fn sync_checkpoint(
        &self,
        op: &Op,
        path: Option<&str>,
        machine: &dyn crate::agent::Machine,
        run: &str,
        attempt: u32,
        last: bool,
        now: Timestamp,
    ) -> Result<(), ExecError> {
        let Some(path) = path else {
            return Ok(());
        };
        let synced = super::checkpoint::sync(
            &self.home,
            &self.store,
            machine,
            run,
            attempt,
            path,
            last,
            now,
        )
        .await;
        match synced {
            Ok(Some(seq)) => {
                let what = if last {
                    "final checkpoint"
                } else {
                    "checkpoint"
                };
                self.event(op, run, "Checkpointed", format!("{what} {seq}"), now);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) if e.is_permanent() => {
                let message = format!("checkpoint not synced: {}", error_text(&e));
                self.event(op, run, "CheckpointFailed", message, now);
                Ok(())
            }
            Err(source) => Err(ExecError::Checkpoint {
                op: op.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// What the teardown of a desired run's attempt syncs, from its job.
    fn teardown_of(&self, desired: &Desired, job: &Job, run: &str) -> Teardown {
        let s3 = s3_url(job).is_some();
        // An outputs folder only for a job that declares outputs kept at home: nothing
        // is left in artifacts/ for the rest.
        let has_outputs = !s3
            && job
                .spec
                .artifacts
                .as_ref()
                .is_some_and(|a| !a.paths.is_empty());
        Teardown {
            s3,
            checkpoint: job.spec.checkpoint.as_ref().map(|c| c.path.clone()),
            outputs: has_outputs.then(|| self.outputs_dir(desired, run)),
        }
    }

    /// What the teardown of `run`'s attempt syncs: from its job while desired, else (a
    /// deleted job) as recorded when the attempt started; without a record (an attempt
    /// started by an older asimov), the log and the outputs its agent lists.
    fn teardown(&self, desired: &Desired, run: &str) -> Teardown {
        if let Some((job, _)) = find_run(desired, run) {
            return self.teardown_of(desired, job, run);
        }
        super::checkpoint::CheckpointDir::new(self.home.checkpoints().join(run))
            .teardown()
            .unwrap_or_else(|| Teardown {
                s3: false,
                checkpoint: None,
                outputs: Some(self.home.artifacts().join(run)),
            })
    }

    /// The final sync before a teardown: the log and the outputs home, then the
    /// checkpoint (to S3: the agent's own final sync, waited for, or made here if it
    /// has not been).
    #[allow(clippy::too_many_arguments)]
    async fn collect(
        &self,
        op: &Op,
        provider: ProviderKind,
        job: Option<&Job>,
        teardown: &Teardown,
        machine: &dyn crate::agent::Machine,
        run: &str,
        attempt: u32,
        now: Timestamp,
    ) -> Result<(), ExecError> {
        let log = self.home.run_log(run);
        // Where the agent puts outputs: nothing lands there without a folder for them.
        let outputs = teardown
            .outputs
            .clone()
            .unwrap_or_else(|| self.home.artifacts().join(run));
        for dir in [log.parent(), teardown.outputs.as_deref()]
            .into_iter()
            .flatten()
        {
            std::fs::create_dir_all(dir).map_err(|source| ExecError::Local {
                op: op.to_string(),
                path: dir.to_path_buf(),
                source,
            })?;
        }
        {
            let _permit = self.machine_permit(provider).await;
            machine
                .collect(&log, &outputs)
                .await
                .map_err(|source| ExecError::Agent {
                    op: op.to_string(),
                    source: Box::new(source),
                })?;
        }
        self.note_setup_failure(run, &log, now);
        if teardown.s3 {
            self.sync_s3(op, job, machine, run, attempt, true, now)
                .await?;
        } else {
            let path = teardown.checkpoint.as_deref();
            self.sync_checkpoint(op, path, machine, run, attempt, true, now)
                .await?;
        }
        let what = match &teardown.outputs {
            Some(dir) => format!("log and outputs to {}", dir.display()),
            None => "log".to_string(),
        };
        self.event(op, run, "Collected", what, now);
        Ok(())
    }

    /// The job's S3 target: where, and the keys from the credential store.
    fn s3_target(&self, op: &Op, job: &Job) -> Result<Option<S3Target>, ExecError> {
        let Some(to) = s3_url(job) else {
            return Ok(None);
        };
        let artifacts = job.spec.artifacts.as_ref();
        let target = (|| {
            Ok::<_, S3Error>(S3Target {
                config: S3Config::resolve(
                    artifacts.and_then(|a| a.endpoint.as_deref()),
                    artifacts.and_then(|a| a.region.as_deref()),
                )?,
                location: S3Location::parse(to)?,
                credentials: S3Credentials::read(&self.home.credentials())?,
            })
        })();
        target.map(Some).map_err(|source| ExecError::S3 {
            op: op.to_string(),
            source: Box::new(source),
        })
    }

    /// Makes `launch` sync with S3: the agent gets the run's URL, a curl config with
    /// the keys (0600 on the instance), its outputs by name, and the newest complete
    /// checkpoint in S3 to restore (named in `ASIMOV_RESUME_FROM`), whose number it
    /// returns.
    async fn s3_launch(
        &self,
        op: &Op,
        job: &Job,
        run: &str,
        attempt: u32,
        launch: &mut LaunchSpec,
    ) -> Result<Option<u64>, ExecError> {
        let Some(target) = self.s3_target(op, job)? else {
            return Ok(None);
        };
        let s3 = |source| ExecError::S3 {
            op: op.to_string(),
            source: Box::new(source),
        };
        let url = target.run_url(run).map_err(s3)?;
        let curl = curl_config(&target.credentials, &target.config.region);
        let cp = job.spec.checkpoint.as_ref();
        let latest = match cp {
            Some(_) => {
                let client = S3Client::new(target).map_err(s3)?;
                client.latest_checkpoint(run).await.map_err(s3)?
            }
            None => None,
        };
        if let (Some(cp), Some(_)) = (cp, latest) {
            // The agent makes a relative or `~` path absolute for the job.
            launch
                .env
                .insert("ASIMOV_RESUME_FROM".into(), cp.path.clone());
        }
        // Outputs go to S3, not home: `collect` brings only the log.
        let outputs = std::mem::take(&mut launch.outputs)
            .into_iter()
            .map(|o| {
                let name = crate::agent::output_name(&o).to_string_lossy().into_owned();
                (o, name)
            })
            .collect();
        launch.s3 = Some(S3Launch {
            url,
            curl_config: curl,
            outputs,
            checkpoint: cp.map(|c| c.path.clone()),
            restore: latest.map(|g| g.to_string()),
            next_seq: latest.map_or(1, |g| g.seq + 1),
            attempt,
        });
        Ok(latest.map(|g| g.seq))
    }

    /// Has the agent sync the run with S3 (`last`: the final sync, checkpoint and
    /// outputs) and records the checkpoint it made complete. A final sync that failed
    /// for good is said in the run's events and does not hold back the teardown; a
    /// transient failure (the machine unreachable) fails the op, and so holds it back.
    #[allow(clippy::too_many_arguments)]
    async fn sync_s3(
        &self,
        op: &Op,
        job: Option<&Job>,
        machine: &dyn crate::agent::Machine,
        run: &str,
        attempt: u32,
        last: bool,
        now: Timestamp,
    ) -> Result<(), ExecError> {
        let synced = {
            let synced = machine.sync_s3(last).await;
            match synced {
                Ok(s) => s,
                Err(e) if e.is_permanent() => {
                    let message = format!("not synced to S3: {}", error_text(&e));
                    self.event(op, run, "SyncFailed", message, now);
                    return Ok(());
                }
                Err(source) => {
                    return Err(ExecError::Agent {
                        op: op.to_string(),
                        source: Box::new(source),
                    });
                }
            }
        };
        if let Some(why) = &synced.failed {
            let message = format!("final sync to S3 failed: {why}");
            self.event(op, run, "SyncFailed", message, now);
            return Ok(());
        }
        let generation = synced
            .checkpoint
            .as_deref()
            .and_then(|g| g.parse::<Generation>().ok());
        if let Some(g) = generation {
            let record = crate::store::CheckpointSync {
                run: run.to_string(),
                attempt,
                seq: g.seq,
                at: now,
                last,
            };
            self.store(op, |s| s.add_checkpoint_sync(&record))?;
            if let Some(job) = job {
                self.prune_s3(op, job, run, attempt, now).await;
            }
            if synced.files > 0 || last {
                let what = if last {
                    "final checkpoint"
                } else {
                    "checkpoint"
                };
                self.event(
                    op,
                    run,
                    "Checkpointed",
                    format!("{what} {} in S3 ({g})", g.seq),
                    now,
                );
            }
        }
        if last {
            self.event(
                op,
                run,
                "Synced",
                format!(
                    "to S3: {} files, {} uploaded",
                    synced.files,
                    crate::source::human(synced.bytes)
                ),
                now,
            );
        }
        Ok(())
    }

    /// Removes the run's checkpoints in S3 past the newest [`KEEP`](super::checkpoint::KEEP)
    /// (never the one this attempt resumed from). Pruning is housekeeping: a failure is
    /// logged and tried again after the next sync, never the op's failure.
    async fn prune_s3(&self, op: &Op, job: &Job, run: &str, attempt: u32, now: Timestamp) {
        let protect: Vec<u64> = match self.store(op, |s| s.resumed_from(run)) {
            Ok(resumed) => resumed.get(&attempt).copied().into_iter().collect(),
            // Unknown: nothing older than the newest complete ones can be proven unused.
            Err(_) => return,
        };
        let pruned = async {
            let Some(target) = self.s3_target(op, job).map_err(|e| e.to_string())? else {
                return Ok(Default::default());
            };
            let client = S3Client::new(target).map_err(|e| e.to_string())?;
            client
                .prune_checkpoints(run, super::checkpoint::KEEP, &protect)
                .await
                .map_err(|e| error_text(&e))
        };
        match pruned.await {
            Ok(p) if p.checkpoints > 0 => {
                let message = format!(
                    "removed {} older checkpoint(s) from S3 ({} objects), keeping the newest {}",
                    p.checkpoints,
                    p.objects,
                    super::checkpoint::KEEP
                );
                self.event(op, run, "Pruned", message, now);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(run = %run, error = %e, "cannot prune old checkpoints in S3"),
        }
    }

    /// Adds the run's newest complete checkpoint to what `launch` copies to the
    /// instance, at the job's checkpoint path, and names it in `ASIMOV_RESUME_FROM`;
    /// returns its number.
    fn restore_point(
        &self,
        op: &Op,
        job: &Job,
        run: &str,
        launch: &mut LaunchSpec,
    ) -> Result<Option<u64>, ExecError> {
        let Some(cp) = &job.spec.checkpoint else {
            return Ok(None);
        };
        let dir = super::checkpoint::CheckpointDir::new(self.home.checkpoints().join(run));
        let latest = dir.latest().map_err(|source| ExecError::Local {
            op: op.to_string(),
            path: self.home.checkpoints().join(run),
            source,
        })?;
        let Some((seq, folder)) = latest else {
            return Ok(None);
        };
        launch.files.push((folder, cp.path.clone()));
        // The agent makes a relative or `~` path absolute for the job.
        launch
            .env
            .insert("ASIMOV_RESUME_FROM".into(), cp.path.clone());
        Ok(Some(seq))
    }

    fn set_status(&self, op: &Op, u: &StatusUpdate, now: Timestamp) -> Result<(), ExecError> {
        let mut rec = self.run_record(op, &u.run)?;
        let changed_phase = rec.phase != u.phase;
        rec.phase = u.phase;
        rec.reason = u.reason.clone();
        if let Some(p) = u.progress {
            rec.progress_done = Some(p.done);
            rec.progress_total = p.total;
        }
        if u.exit_code.is_some() {
            rec.exit_code = u.exit_code;
        }
        if u.phase == Phase::Running && rec.started_at.is_none() {
            rec.started_at = Some(now);
        }
        if u.phase.is_terminal() {
            rec.finished_at.get_or_insert(now);
        }
        rec.updated_at = now;
        // The run row first, then the attempt's outcome: a crash in between leaves a
        // terminal run with an open attempt, which the planner destroys and releases.
        self.store(op, |s| s.put_run(&rec))?;
        if let Some((n, outcome)) = &u.outcome
            && let Some(mut a) = self.attempt(op, &u.run, *n)?
            && a.outcome.is_none()
        {
            a.outcome = Some(outcome.clone());
            self.store(op, |s| s.put_attempt(&a))?;
            // Why it ended and what follows (restart n of m, paused, failed), for
            // `describe run`.
            self.store(op, |s| s.put_ended_reason(&u.run, *n, &u.reason))?;
        }
        if changed_phase {
            self.event(op, &u.run, u.phase.as_str(), u.reason.clone(), now);
        }
        Ok(())
    }

    /// Sum of the run's ledger entries (released attempts).
    /// Attempt `attempt` of `run` bills `price` an hour from `now` (its disk kept on
    /// pause, or running again): what it billed at the old price since it last changed
    /// goes to the ledger as one slice. Nothing when the price is the same (done
    /// already) or the run holds another attempt.
    fn reprice(
        &self,
        op: &Op,
        run: &str,
        attempt: u32,
        price: Usd,
        now: Timestamp,
    ) -> Result<(), ExecError> {
        let mut rec = self.run_record(op, run)?;
        if rec.attempt != attempt || rec.price_per_hour == Some(price) {
            return Ok(());
        }
        if let (Some(old), Some(since)) = (rec.price_per_hour, rec.billing_since)
            && now > since
        {
            let entry = CostEntry {
                run: run.to_string(),
                job: rec.job.clone(),
                attempt,
                from: since,
                to: now,
                usd: super::budget::accrued(old, since, now),
            };
            self.store(op, |s| s.add_cost(&entry))?;
            rec.cost_usd = self.ledger_cost(op, run)?;
        }
        rec.price_per_hour = Some(price);
        rec.billing_since = Some(now);
        self.store(op, |s| s.put_run(&rec))
    }

    fn ledger_cost(&self, op: &Op, run: &str) -> Result<Usd, ExecError> {
        Ok(self
            .store(op, |s| s.costs(run))?
            .iter()
            .map(|c| c.usd)
            .sum())
    }

    /// Where a run's outputs land: `<artifacts.to>/<run>/` when the job names a local
    /// folder (relative to its manifest's folder), else `$ASIMOV_HOME/artifacts/<run>/`.
    fn outputs_dir(&self, desired: &Desired, run: &str) -> PathBuf {
        let to = find_run(desired, run).and_then(|(job, _)| {
            let to = job.spec.artifacts.as_ref()?.to.as_deref()?;
            // Object stores (`s3://`) are not pulled to here: outputs come home.
            if to.contains("://") {
                return None;
            }
            let to = match to.strip_prefix("~/") {
                Some(rest) => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(rest))?,
                None => PathBuf::from(to),
            };
            Some(match job.origin.file.parent() {
                Some(dir) if to.is_relative() => dir.join(to),
                _ => to,
            })
        });
        to.unwrap_or_else(|| self.home.artifacts()).join(run)
    }

    /// The local folders asimov writes for `run` (its home, the run's local outputs
    /// folder): never uploaded, never recorded in a diff, wherever they are.
    fn written_by_asimov(&self, desired: &Desired, run: &str) -> Vec<PathBuf> {
        [
            Some(self.home.root()),
            self.outputs_dir(desired, run).parent(),
        ]
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .collect()
    }

    /// What the agent needs to start `spec`: secrets are read from the credential
    /// store's 0600 files here and travel only inside the spec.
    fn launch_spec(
        &self,
        op: &Op,
        job: &Job,
        spec: &RunSpec,
        rec: &RunRecord,
        tag: &str,
    ) -> Result<LaunchSpec, ExecError> {
        let mut secrets = Vec::new();
        for name in &job.spec.secrets {
            let path = self.home.credentials().join(name);
            let value = std::fs::read_to_string(&path).map_err(|source| ExecError::Secret {
                op: op.to_string(),
                name: name.clone(),
                source,
            })?;
            secrets.push((name.clone(), Secret::new(value.trim_end_matches('\n'))));
        }
        let source = match &job.spec.source {
            Source::None => LaunchSource::None,
            Source::Workdir(dir) => LaunchSource::Workdir(dir.clone()),
            Source::Git { repo, reference } => LaunchSource::Git {
                repo: repo.clone(),
                reference: spec.git_ref.clone().or_else(|| reference.clone()),
                commit: rec.commit.clone(),
                diff: self.store(op, |s| s.diff(&rec.name))?,
            },
        };
        let mut env = job.spec.env.clone();
        for (k, v) in &spec.matrix {
            env.entry(format!("ASIMOV_MATRIX_{}", k.to_uppercase()))
                .or_insert_with(|| v.clone());
        }
        // One id for the run's whole life, so experiment tracking (wandb) continues the
        // same run after a restart or a resume; the job's own values win.
        let controller = crate::model::OwnerTag::parse(tag).map(|t| t.controller);
        let run_id = super::plan::run_id(
            controller.as_deref().unwrap_or(""),
            &rec.name,
            rec.created_at,
        );
        env.insert("ASIMOV_RUN_ID".into(), run_id.clone());
        env.entry("WANDB_RUN_ID".into()).or_insert(run_id);
        env.entry("WANDB_RESUME".into())
            .or_insert_with(|| "allow".into());
        Ok(LaunchSpec {
            run: spec.name.clone(),
            tag: tag.to_string(),
            setup: spec.setup.clone(),
            command: spec.command.clone(),
            env,
            secrets,
            max_duration: job.spec.max_duration,
            source,
            files: job
                .spec
                .files
                .iter()
                .map(|f| (f.from.clone(), f.to.clone()))
                .collect(),
            outputs: job
                .spec
                .artifacts
                .as_ref()
                .map(|a| a.paths.clone())
                .unwrap_or_default(),
            exclude: Vec::new(),
            s3: None,
        })
    }
}

fn limit_of(provider: &dyn Provider) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(
        provider.capabilities().pacing.max_in_flight.max(1),
    ))
}

/// How long a teardown waits for its final sync (the log, outputs and checkpoint
/// brought out) before it goes on without it: 30 minutes, or
/// `ASIMOV_FINAL_SYNC_TIMEOUT` seconds. A machine that does not answer at all fails
/// sooner, at the SSH connect timeout; either way the sync is tried once.
pub const FINAL_SYNC_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// [`FINAL_SYNC_LIMIT`], or `ASIMOV_FINAL_SYNC_TIMEOUT` (seconds) when set.
fn final_sync_limit() -> std::time::Duration {
    std::env::var("ASIMOV_FINAL_SYNC_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(FINAL_SYNC_LIMIT, std::time::Duration::from_secs)
}

/// The job's `artifacts.to` when it is an S3 URL.
fn s3_url(job: &Job) -> Option<&str> {
    job.spec
        .artifacts
        .as_ref()?
        .to
        .as_deref()
        .filter(|to| to.starts_with("s3://"))
}

/// The job and run spec of a desired run.
pub fn find_run<'a>(desired: &'a Desired, run: &str) -> Option<(&'a Job, &'a RunSpec)> {
    desired.find_run(run)
}

/// Records which code the run executes: for a workdir inside a git work tree, the
/// commit, its message, the author and the uncommitted diff (jasnah's reproducibility
/// record); for a git source, the commit its ref points at now, so every attempt runs
/// the same code. Returns the diff (nothing under `exclude` in it), which the store keeps
/// apart from the record. git runs off the async workers (a blocking task, or a child
/// process with a time limit).
async fn record_source(
    rec: &mut RunRecord,
    job: &Job,
    spec: &RunSpec,
    exclude: Vec<PathBuf>,
) -> Option<String> {
    match &job.spec.source {
        Source::None => None,
        Source::Workdir(dir) => {
            let dir = dir.clone();
            let info =
                tokio::task::spawn_blocking(move || crate::source::capture_git(&dir, &exclude))
                    .await
                    .ok()
                    .flatten();
            if let Some(info) = info {
                rec.repository = info.repository;
                rec.commit = Some(info.commit);
                rec.commit_message = Some(info.commit_message);
                rec.author = Some(info.author);
                rec.dirty = info.dirty;
                return info.diff;
            }
            None
        }
        Source::Git { repo, reference } => {
            let reference = spec.git_ref.as_deref().or(reference.as_deref());
            rec.repository = Some(repo.clone());
            rec.commit = crate::source::resolve_remote_commit(repo, reference).await;
            rec.commit_message = None;
            rec.author = None;
            rec.dirty = false;
            None
        }
    }
}

/// The last `max` bytes of a file, as text.
fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// An error and its causes on one line.
fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
