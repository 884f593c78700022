//! The SQLite store in `$ASIMOV_HOME/state.db`: runs, attempts, events and the cost
//! ledger, with schema migrations. Holds intent, history and cost; the providers hold
//! the truth about instances. WAL mode, so CLI reads work while the controller writes.
//! Also keeps the last known status of fleet hosts. Knows nothing of providers, YAML or
//! the planner.
//!
//! Layout: `migrations` (the schema, versioned by `PRAGMA user_version`), `runs`,
//! `history` (attempts, events, cost), `hosts`, `desired` (what the controller reconciles,
//! its liveness, runs' last errors), `bench` (synthetic data for benchmarks).

use crate::model::{InstanceId, JobName, Outcome, Phase, ProviderKind, RunName, Timestamp, Usd};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

mod bench;
mod checkpoints;
mod desired;
mod disks;
mod history;
mod hosts;
mod lifecycle;
mod listing;
mod migrations;
mod runs;
pub mod view;

pub use checkpoints::CheckpointSync;
pub use desired::{
    ControllerStatus, DesiredFolder, DesiredObject, DesiredProblem, DesiredRecord, RunError,
};
pub use disks::KeptDisk;
pub use lifecycle::{Pause, RunMetrics};
pub use listing::{ITEM_INDENT, RunJson};
pub use migrations::SCHEMA_VERSION;
pub use runs::{Fields, ListError, ListedRun, Listing};

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
    pub price_per_hour: Option<Usd>,
    /// What the run's released attempts cost (the ledger). The current attempt's share
    /// is derived when read: [`RunRecord::cost_at`].
    pub cost_usd: Usd,
    /// When the current attempt's instance started billing at `price_per_hour`; `None`
    /// while no instance is held.
    pub billing_since: Option<Timestamp>,
    pub progress_done: Option<u64>,
    pub progress_total: Option<u64>,
    pub exit_code: Option<i32>,
    pub repository: Option<String>,
    pub commit: Option<String>,
    pub commit_message: Option<String>,
    pub author: Option<String>,
    pub dirty: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

impl RunRecord {
    /// A run seen for the first time: Pending, no attempt yet, nothing known of its code.
    pub fn new_pending(
        name: &str,
        job: &str,
        index: u32,
        spec_hash: &str,
        matrix: &BTreeMap<String, String>,
        reason: &str,
        now: Timestamp,
    ) -> RunRecord {
        RunRecord {
            name: name.to_string(),
            job: job.to_string(),
            index,
            seq: 0,
            phase: Phase::Pending,
            reason: reason.to_string(),
            spec_hash: spec_hash.to_string(),
            matrix: matrix.clone(),
            attempt: 0,
            placement_index: 0,
            provider: None,
            instance_id: None,
            host: None,
            gpu: None,
            price_per_hour: None,
            cost_usd: Usd::ZERO,
            billing_since: None,
            progress_done: None,
            progress_total: None,
            exit_code: None,
            repository: None,
            commit: None,
            commit_message: None,
            author: None,
            dirty: false,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        }
    }
}

impl RunRecord {
    /// Cost so far at `now`: the ledger plus what the held instance has accrued. Derived
    /// here, when read, so nothing is rewritten just because time passed.
    pub fn cost_at(&self, now: Timestamp) -> Usd {
        let live = match (self.price_per_hour, self.billing_since) {
            (Some(price), Some(since)) => price.per_hour_over(now - since),
            _ => Usd::ZERO,
        };
        self.cost_usd + live
    }
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
    /// How the attempt ended; kept in its stable text form.
    pub outcome: Option<Outcome>,
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
    pub usd: Usd,
}

/// The last known status of one host of a fleet, as the controller last probed it: the
/// one host type (`model::HostStatus`) and when it was checked. Reads as the status
/// (`record.gpus_free`); which agents are alive is not kept.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub status: crate::model::HostStatus,
    pub checked_at: Timestamp,
}

impl HostRecord {
    /// The record of `status` as checked at `checked_at`.
    pub fn of(status: &crate::model::HostStatus, checked_at: Timestamp) -> HostRecord {
        HostRecord {
            status: crate::model::HostStatus {
                agents_alive: Vec::new(),
                ..status.clone()
            },
            checked_at,
        }
    }
}

impl std::ops::Deref for HostRecord {
    type Target = crate::model::HostStatus;
    fn deref(&self) -> &Self::Target {
        &self.status
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the directory of the state database {path}")]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot migrate the state database to version {version}")]
    Migrate {
        version: u32,
        #[source]
        source: rusqlite::Error,
    },
    /// The file has a schema this build does not read: written by a newer asimov, or (for
    /// a read-only open) not yet migrated by a read-write open.
    #[error(
        "state database {path} has schema version {found}, this asimov uses version {expected}"
    )]
    Version {
        path: std::path::PathBuf,
        found: u32,
        expected: u32,
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

/// Room for every statement the store prepares (about twenty), so none is evicted and
/// re-prepared.
const STATEMENT_CACHE: usize = 64;

/// How long a connection waits for another one's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the state database. Cheap to open; the controller keeps one, each
/// CLI call opens its own. Every write is one transaction. `Send` but not `Sync` (one
/// SQLite connection): share it across tasks behind a mutex, or open one per thread.
pub struct Store {
    conn: rusqlite::Connection,
}

/// How much of the database file a reader maps (the whole file, up to this size).
const READ_MMAP_BYTES: u64 = 1 << 30;

impl Store {
    /// Opens (creating and migrating) the database at `path`, in WAL mode with a busy
    /// timeout so readers never block the controller. Creates the parent directory.
    ///
    /// Fails with `Version` when the file was written by a newer asimov, `Migrate` when a
    /// schema step fails (the file is then left at the last good version).
    pub fn open(path: &Path) -> StoreResult<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = rusqlite::Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // journal_mode answers with the mode in effect; anything but "wal" means readers
        // would block the controller, so it is an error rather than a silent slowdown.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "{} cannot use write-ahead logging (journal mode is {mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .map_err(open_err)?;
        migrations::migrate(&mut conn, path)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Store { conn })
    }

    /// Opens an existing database for reading only (CLI `get`, `describe`, `logs`); works
    /// while the controller writes. Fails with `Open` if it does not exist, and with
    /// `Version` if its schema is not the current one (a read-write `open` migrates it).
    pub fn open_read_only(path: &Path) -> StoreResult<Store> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Pages read from the mapped file instead of copied out of it: a listing of
        // 100,000 runs reads some 30 MB. The store is never truncated (no VACUUM), so
        // the mapping stays valid while the controller writes.
        conn.execute_batch(&format!("PRAGMA mmap_size={READ_MMAP_BYTES}"))
            .map_err(open_err)?;
        let found = migrations::version(&conn).map_err(open_err)?;
        if found != SCHEMA_VERSION {
            return Err(StoreError::Version {
                path: path.to_path_buf(),
                found,
                expected: SCHEMA_VERSION,
            });
        }
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Store { conn })
    }

    /// Starts a write transaction. IMMEDIATE takes the write lock up front, so a busy
    /// database is waited for (busy timeout) instead of failing midway on a stale snapshot.
    fn write(&self, step: &'static str) -> StoreResult<rusqlite::Transaction<'_>> {
        rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)
            .map_err(query(step))
    }
}

/// Maps a rusqlite error of `step`: values the schema allows but asimov cannot read
/// (an unknown phase, bad JSON) are corruption, the rest a failed query.
fn query(step: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| match source {
        rusqlite::Error::FromSqlConversionFailure(column, _, cause) => {
            StoreError::Corrupt(format!("{step}: column {column}: {cause}"))
        }
        source => StoreError::Query { step, source },
    }
}

/// A conversion failure for a text column holding a value asimov does not know.
fn bad_value(column: usize, what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        column,
        rusqlite::types::Type::Text,
        format!("unknown {what} {value:?}").into(),
    )
}

/// Reads a JSON text column into `T`.
fn json_column<T: serde::de::DeserializeOwned + Default>(
    row: &rusqlite::Row<'_>,
    column: usize,
) -> rusqlite::Result<T> {
    let text: rusqlite::types::ValueRef<'_> = row.get_ref(column)?;
    let bytes = text.as_bytes()?;
    // Most maps and lists are empty; skip the parser for them.
    if bytes == b"{}" || bytes == b"[]" {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Renders `value` as JSON text for a column.
fn to_json<T: serde::Serialize>(value: &T) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}
