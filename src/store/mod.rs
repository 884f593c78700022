//! The SQLite store in `$ASIMOV_HOME/state.db`: runs, attempts, events and the cost
//! ledger, with schema migrations. Holds intent, history and cost; the providers hold
//! the truth about instances. WAL mode, so CLI reads work while the controller writes.
//! Knows nothing of providers, YAML or the planner.

use crate::model::{InstanceId, JobName, Phase, ProviderKind, RunName, Timestamp};
use std::collections::BTreeMap;

/// A run as the store remembers it. `get runs -o json` is rendered from this.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub name: RunName,
    pub job: JobName,
    pub index: u32,
    /// Order in which runs were first seen (apply order); fleet queues start runs by it.
    pub seq: i64,
    pub phase: Phase,
    /// Why the run is in its phase, one short sentence ("waiting for a free host").
    pub reason: String,
    pub spec_hash: String,
    pub matrix: BTreeMap<String, String>,
    /// Current attempt number, 0 before the first create.
    pub attempt: u32,
    /// Index into the job's placement list of the current (or next) attempt.
    pub placement_index: u32,
    pub provider: Option<ProviderKind>,
    pub instance_id: Option<InstanceId>,
    /// For fleet runs: the host the run is on.
    pub host: Option<String>,
    pub gpu: Option<String>,
    pub price_per_hour: Option<f64>,
    pub cost_usd: f64,
    pub progress_done: Option<u64>,
    pub progress_total: Option<u64>,
    pub exit_code: Option<i32>,
    pub repository: Option<String>,
    pub commit: Option<String>,
    pub commit_message: Option<String>,
    pub author: Option<String>,
    pub dirty: bool,
    pub diff: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

/// One instance lifetime of a run. Written (as intent) before the create call, and
/// closed only once the provider confirms the instance is gone.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub run: RunName,
    pub attempt: u32,
    /// The rendered ownership tag given to the provider.
    pub tag: String,
    pub provider: ProviderKind,
    pub placement_index: u32,
    /// `None` until the create call returned or the listing showed the tag.
    pub instance_id: Option<InstanceId>,
    pub host: Option<String>,
    pub intent_at: Timestamp,
    /// Set when the provider confirmed the instance gone (or it never existed).
    pub released_at: Option<Timestamp>,
    /// How the attempt ended: "succeeded", "failed", "preempted", "lost", "deleted", ...
    pub outcome: Option<String>,
}

/// Something that happened to an object, shown by `describe`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: Timestamp,
    /// "job", "run", "fleet", "budget".
    pub object_kind: String,
    pub object_name: String,
    /// Short CamelCase reason: "Created", "Started", "Preempted", "Destroyed".
    pub reason: String,
    pub message: String,
}

/// A slice of money spent by an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct CostEntry {
    pub run: RunName,
    pub job: JobName,
    pub attempt: u32,
    pub from: Timestamp,
    pub to: Timestamp,
    pub usd: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot migrate the state database to version {version}")]
    Migrate {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database {step} failed")]
    Query {
        step: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database is corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A connection to the state database. Cheap to open; the controller keeps one, each
/// CLI call opens its own. Every write is one transaction.
pub struct Store {
    #[allow(dead_code)] // used by the implementation
    conn: rusqlite::Connection,
}

impl Store {
    /// Opens (creating and migrating) the database at `path`, in WAL mode with a busy
    /// timeout so readers never block the controller.
    pub fn open(path: &std::path::Path) -> StoreResult<Store> {
        let _ = path;
        todo!("store")
    }

    /// Opens an existing database for reading only (CLI `get`, `describe`, `logs`).
    /// Fails with `Open` if it does not exist.
    pub fn open_read_only(path: &std::path::Path) -> StoreResult<Store> {
        let _ = path;
        todo!("store")
    }

    /// All runs, ordered by `seq`.
    pub fn runs(&self) -> StoreResult<Vec<RunRecord>> {
        todo!("store")
    }

    pub fn runs_of_job(&self, job: &str) -> StoreResult<Vec<RunRecord>> {
        let _ = job;
        todo!("store")
    }

    pub fn run(&self, name: &str) -> StoreResult<Option<RunRecord>> {
        let _ = name;
        todo!("store")
    }

    /// Inserts or replaces a run. A new run gets the next `seq` when `seq` is 0.
    pub fn put_run(&self, run: &RunRecord) -> StoreResult<()> {
        let _ = run;
        todo!("store")
    }

    /// Removes a run with its attempts, events and cost entries. Callers do this only
    /// once every attempt is released.
    pub fn forget_run(&self, name: &str) -> StoreResult<()> {
        let _ = name;
        todo!("store")
    }

    pub fn attempts(&self, run: &str) -> StoreResult<Vec<AttemptRecord>> {
        let _ = run;
        todo!("store")
    }

    /// Every attempt not yet released, across all runs: what may still exist somewhere.
    pub fn unreleased_attempts(&self) -> StoreResult<Vec<AttemptRecord>> {
        todo!("store")
    }

    /// Inserts or replaces the attempt `(run, attempt)`.
    pub fn put_attempt(&self, attempt: &AttemptRecord) -> StoreResult<()> {
        let _ = attempt;
        todo!("store")
    }

    pub fn add_event(&self, event: &Event) -> StoreResult<()> {
        let _ = event;
        todo!("store")
    }

    /// Events of one object, oldest first.
    pub fn events(&self, object_kind: &str, object_name: &str) -> StoreResult<Vec<Event>> {
        let _ = (object_kind, object_name);
        todo!("store")
    }

    pub fn add_cost(&self, entry: &CostEntry) -> StoreResult<()> {
        let _ = entry;
        todo!("store")
    }

    /// Money spent by the given jobs since `since` (all time when `None`).
    pub fn spent(&self, jobs: &[JobName], since: Option<Timestamp>) -> StoreResult<f64> {
        let _ = (jobs, since);
        todo!("store")
    }
}
