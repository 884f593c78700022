//! Validated, typed desired state: what the rest of asimov consumes. Built from the raw
//! serde types only by `manifest::load*`; downstream code never sees an `Option` that
//! "should be Some" or a string that should have been a duration.

use crate::model::{JobName, ProviderKind, RunName};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Every object from a set of manifest files, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Manifests {
    pub jobs: Vec<Job>,
    pub fleets: Vec<Fleet>,
    pub budgets: Vec<Budget>,
}

/// Where an object came from, for messages and for `delete -f`.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based line of the document's first line.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub name: JobName,
    pub labels: BTreeMap<String, String>,
    pub spec: JobSpec,
    /// One entry per run, in a stable order; names are `<job>-<index>`.
    pub runs: Vec<RunSpec>,
    /// Hash of the spec as written; a change means the job was edited.
    pub spec_hash: String,
    pub origin: Origin,
}

impl Job {
    /// A job built in code rather than loaded from a manifest (benchmarks, tests):
    /// `runs` plain runs of `spec.run` named `<name>-<i>`, with the given spec hash.
    pub fn from_spec(name: &str, spec: JobSpec, runs: u32, spec_hash: &str) -> Job {
        Job {
            name: name.to_string(),
            labels: BTreeMap::new(),
            runs: (0..runs)
                .map(|i| RunSpec {
                    name: format!("{name}-{i}"),
                    index: i,
                    matrix: BTreeMap::new(),
                    command: spec.run.clone(),
                    setup: spec.setup.clone(),
                    git_ref: None,
                })
                .collect(),
            spec,
            spec_hash: spec_hash.to_string(),
            origin: Origin {
                file: PathBuf::from("job.yaml"),
                line: 1,
            },
        }
    }
}

impl JobSpec {
    /// What a manifest with only `run:` means: no source, local placement, the default
    /// retry policy, every other field empty.
    pub fn with_run(run: impl Into<String>) -> JobSpec {
        JobSpec {
            source: Source::None,
            files: Vec::new(),
            setup: Vec::new(),
            run: run.into(),
            env: BTreeMap::new(),
            secrets: Vec::new(),
            resources: Resources::default(),
            placement: vec![Placement::local()],
            image: None,
            max_duration: None,
            retry: RetryPolicy::default(),
            checkpoint: None,
            artifacts: None,
            stop_when: Vec::new(),
            schedule: None,
            paused: false,
            budget: None,
        }
    }
}

/// One expanded run of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    pub name: RunName,
    pub index: u32,
    /// The matrix values of this run (`config`, `branch`, ...), empty without a matrix.
    pub matrix: BTreeMap<String, String>,
    /// The run command with `${matrix.KEY}` substituted.
    pub command: String,
    /// Setup commands with `${matrix.KEY}` substituted.
    pub setup: Vec<String>,
    /// Git ref to check out for this run (matrix `branch`, else the source's ref).
    pub git_ref: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub source: Source,
    pub files: Vec<FileCopy>,
    pub setup: Vec<String>,
    pub run: String,
    pub env: BTreeMap<String, String>,
    /// Names of secrets from the credential store, handed to the job as env vars.
    pub secrets: Vec<String>,
    pub resources: Resources,
    /// Tried in order, looping back. Never empty: defaults to `[local]`.
    pub placement: Vec<Placement>,
    pub image: Option<String>,
    pub max_duration: Option<Duration>,
    pub retry: RetryPolicy,
    pub checkpoint: Option<Checkpoint>,
    pub artifacts: Option<Artifacts>,
    pub stop_when: Vec<StopRule>,
    pub schedule: Option<Schedule>,
    /// `spec.paused`: the runs stay paused while true.
    pub paused: bool,
    /// Name of the Budget this job's spending counts against.
    pub budget: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// No code to upload; the run command stands alone.
    None,
    /// A local folder (absolute after loading), uploaded respecting `.gitignore`.
    Workdir(PathBuf),
    /// A git repository cloned on the instance at `reference`.
    Git {
        repo: String,
        reference: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileCopy {
    /// Local path, `~` expanded, absolute after loading.
    pub from: PathBuf,
    /// Path on the instance; `~` means the instance user's home.
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    pub gpu: Option<GpuRequest>,
    pub disk_gb: Option<u32>,
    pub cuda: Option<String>,
    pub cpus: Option<u32>,
    pub memory_gb: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuRequest {
    /// Acceptable GPU names, in order of preference; empty means any.
    pub names: Vec<String>,
    pub count: u32,
    pub min_vram_gb: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub provider: ProviderKind,
    /// For `ssh`: the Fleet whose hosts the run may use.
    pub fleet: Option<String>,
    pub instance_types: Vec<String>,
    pub regions: Vec<String>,
    pub max_price_per_hour: Option<f64>,
    pub premium_pct: Option<f64>,
    /// Offer filters such as `reliability: ">=0.98"`, kept as written.
    pub filters: BTreeMap<String, String>,
    pub spot: bool,
    /// Overrides the provider's login user.
    pub ssh_user: Option<String>,
    /// Account keys the placement names (Lambda).
    pub keys: PlacementKeys,
    /// On pause, stop the instance keeping its disk instead of destroying it (Vast).
    pub keep_disk_on_pause: bool,
}

/// Keys of the user's account a placement names instead of asimov's own (Lambda).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlacementKeys {
    /// An SSH key already in the account, by name, launched with instead of asimov's.
    pub ssh_key: Option<String>,
    /// The local private key of `ssh_key`.
    pub identity_file: Option<PathBuf>,
    /// The stored secret holding the API key the instance terminates itself with.
    pub terminate_key: Option<String>,
}

impl Placement {
    pub fn local() -> Self {
        Placement {
            provider: ProviderKind::Local,
            fleet: None,
            instance_types: Vec::new(),
            regions: Vec::new(),
            max_price_per_hour: None,
            premium_pct: None,
            filters: BTreeMap::new(),
            spot: false,
            ssh_user: None,
            keys: PlacementKeys::default(),
            keep_disk_on_pause: false,
        }
    }
}

/// What counts as a reason to start another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetryOn {
    NoCapacity,
    Preemption,
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub on: Vec<RetryOn>,
    /// Restarts after preemptions and errors together; 0 means never restart.
    pub max_restarts: u32,
    /// Restarts after a preemption (or a lost host), within `max_restarts`; `None`:
    /// only `max_restarts` bounds them.
    pub max_preemptions: Option<u32>,
    /// Restarts after the run command failed, within `max_restarts`; `None`: only
    /// `max_restarts` bounds them.
    pub max_errors: Option<u32>,
    /// Tries after no placement had capacity; `None`: no limit.
    pub max_no_capacity: Option<u32>,
    /// Exit codes that restart (as an error); when not empty, no other code does.
    pub on_exit_codes: Vec<i32>,
    /// Exit codes that never restart.
    pub never_on_exit_codes: Vec<i32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            on: vec![RetryOn::NoCapacity, RetryOn::Preemption],
            max_restarts: 3,
            max_preemptions: None,
            max_errors: None,
            max_no_capacity: None,
            on_exit_codes: Vec::new(),
            never_on_exit_codes: Vec::new(),
        }
    }
}

impl RetryPolicy {
    pub fn retries(&self, on: RetryOn) -> bool {
        self.on.contains(&on)
    }

    /// The most restarts of cause `on` (preemption or error): its own limit within
    /// `max_restarts`.
    pub fn max_of(&self, on: RetryOn) -> u32 {
        let own = match on {
            RetryOn::Preemption => self.max_preemptions,
            RetryOn::Error => self.max_errors,
            RetryOn::NoCapacity => self.max_no_capacity,
        };
        own.map_or(self.max_restarts, |m| m.min(self.max_restarts))
    }

    /// Whether a run command that failed with `exit_code` (`None`: unknown) is restarted,
    /// and why not when it is not: `never_on_exit_codes` wins, then `on_exit_codes`
    /// (when given, only those), then `on: [error]`.
    pub fn restarts_failure(&self, exit_code: Option<i32>) -> Result<(), String> {
        match exit_code {
            Some(c) if self.never_on_exit_codes.contains(&c) => {
                Err(format!("exit code {c} is in retry.never_on_exit_codes"))
            }
            Some(c) if self.on_exit_codes.contains(&c) => Ok(()),
            Some(c) if !self.on_exit_codes.is_empty() => {
                Err(format!("exit code {c} is not in retry.on_exit_codes"))
            }
            None if !self.on_exit_codes.is_empty() => {
                Err("no exit code, and retry.on_exit_codes is given".to_string())
            }
            _ if self.retries(RetryOn::Error) => Ok(()),
            _ => Err("retry.on has no `error`".to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Folder on the instance holding checkpoints; synced and restored on restart.
    pub path: String,
    pub every: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Artifacts {
    /// Paths on the instance to bring back when the run ends.
    pub paths: Vec<String>,
    /// `s3://bucket/prefix`, or a local folder; default `$ASIMOV_HOME/artifacts/<run>/`.
    pub to: Option<String>,
    /// The S3 endpoint and region, when the job names them.
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricMode {
    Max,
    Min,
}

/// Stop the run early on `metric`: NaN or infinity, `patience` reports without
/// improvement, a `threshold` reached, `max_steps` reached (see `reconcile::stop`).
#[derive(Debug, Clone, PartialEq)]
pub struct StopRule {
    pub metric: String,
    pub mode: MetricMode,
    pub patience: Option<u32>,
    pub threshold: Option<f64>,
    pub max_steps: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schedule {
    /// Start no earlier than this Unix time (seconds).
    pub at: Option<i64>,
    /// Pause at this Unix time (seconds), until resumed.
    pub pause_at: Option<i64>,
    /// Run only inside this daily window (UTC).
    pub window: Option<Window>,
}

/// A daily window in UTC, as minutes after midnight; `start > end` spans midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    const DAY: i64 = 24 * 60 * 60;

    /// True when `now` (Unix seconds) is inside the window.
    pub fn contains(&self, now: i64) -> bool {
        let m = (now.rem_euclid(Self::DAY) / 60) as u32;
        if self.start <= self.end {
            self.start <= m && m < self.end
        } else {
            m >= self.start || m < self.end
        }
    }

    /// The latest close of the window at or before `now` (Unix seconds).
    pub fn last_close(&self, now: i64) -> i64 {
        let day = now.div_euclid(Self::DAY) * Self::DAY;
        let close = day + i64::from(self.end) * 60;
        if close <= now {
            close
        } else {
            close - Self::DAY
        }
    }

    /// The next opening of the window after `now` (Unix seconds).
    pub fn next_open(&self, now: i64) -> i64 {
        let day = now.div_euclid(Self::DAY) * Self::DAY;
        let open = day + i64::from(self.start) * 60;
        if open > now { open } else { open + Self::DAY }
    }

    /// `HH:MM`.
    pub fn render(minutes: u32) -> String {
        format!("{:02}:{:02}", minutes / 60, minutes % 60)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub hosts: Vec<Host>,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// Short name used in `get fleets` and instance ids; defaults to the address.
    pub name: String,
    pub user: Option<String>,
    pub address: String,
    pub port: u16,
    pub identity_file: Option<PathBuf>,
    /// The bastion the host is reached through (`proxy_jump`), if any.
    pub proxy_jump: Option<ProxyJump>,
    pub gpus: u32,
    pub labels: BTreeMap<String, String>,
}

/// A fleet host's bastion, parsed from `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyJump {
    /// `None` uses the local user name, as `ssh -J` does.
    pub user: Option<String>,
    pub address: String,
    pub port: u16,
    /// `proxy_jump_identity_file`, else the host's `identity_file`.
    pub identity_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub limit_usd: f64,
    /// Length of the budget's window; `None` means for ever.
    pub period: Option<Duration>,
    /// Jobs whose labels match all of these (or that name the budget) count against it.
    pub selector: BTreeMap<String, String>,
    pub action: BudgetAction,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetAction {
    /// No new attempts start; running ones finish.
    Block,
    /// Running attempts are stopped too.
    Stop,
}
