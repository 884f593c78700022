//! The agent: the POSIX sh script asimov uploads to every instance (local folders and
//! remote machines alike), the `Machine` operations built on it over a `Transport`, and
//! the parser of what it writes (status, heartbeat, exit code, log, progress).
//! Knows nothing of providers' APIs, the store or the planner.
//!
//! # The instance folder
//!
//! `agent.sh` manages one run in one folder `ROOT`: `agent.sh`, `spec/` (written by
//! [`Machine::start`]: `tag`, `run`, `env`, `secrets` (mode 0600, the only place a
//! secret is written), `setup.sh`, `run.sh`, `max_duration` in seconds, `outputs`),
//! `work/` (the uploaded folder or git clone; the job's current directory) and the state
//! files the agent writes: `status` (`starting|setup|running|succeeded|failed|timeout|
//! stopped`), `pid` (the supervisor, leader of its own process group), `run_pid` (the
//! process group of the current setup or run command), `heartbeat`, `started_at`,
//! `finished_at` (Unix seconds), `exit_code` (124 on timeout) and `log` (setup and run
//! output, stdout and stderr). The job sees `ASIMOV_INSTANCE` (the tag), `ASIMOV_RUN` and
//! `ASIMOV_ROOT`, the spec's env and its secrets as environment variables.
//!
//! Paths in `files` destinations and `outputs`: `~/...` is the machine's `$HOME`, a
//! relative path is inside `work/`. [`Machine::collect`] puts a relative output at the
//! same relative path in the outputs folder and an absolute one under its last
//! component (`/tmp/output` → `output`); missing outputs are skipped with a warning.
//!
//! `agent.sh status ROOT` prints `key=value` lines, then the line [`LOG_MARKER`], then
//! the last 4 KiB of the log: the controller reads everything in one exec
//! ([`parse_status`]).
//!
//! # Progress
//!
//! Read from the log by [`parse_progress`]; the last report wins:
//! - an explicit line `ASIMOV_PROGRESS <done>/<total>` or `ASIMOV_PROGRESS <done>`
//!   (integers, at the start of a line; anything after a space is ignored), e.g.
//!   `print(f"ASIMOV_PROGRESS {step}/{steps}", flush=True)`;
//! - a tqdm bar, `45%|████▌     | 45/100 [00:01<00:01, 30.00it/s]`, with or without a
//!   description before it, unit-scaled counts (`1.2k/10.0k`) and `\r`-separated updates.

use crate::model::{Progress, RunName, Secret, Timestamp};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod machine;
mod parse;

pub use machine::{AgentMachine, cap_log_file, output_name, sh_quote};
pub use parse::{LOG_MARKER, parse_progress, parse_status};

/// The most of a run's log the agent keeps, and the most `collect` keeps of the copy
/// under `$ASIMOV_HOME/logs/`: 16 MiB. Past it the oldest output goes and the newest
/// [`LOG_KEEP`] bytes stay (the same numbers as `LOG_CAP` in `agent.sh`).
pub const LOG_CAP: u64 = 16 << 20;

/// What a log is cut back to when it passes [`LOG_CAP`].
pub const LOG_KEEP: u64 = LOG_CAP / 2;

/// The agent script uploaded to every instance as `ROOT/agent.sh`.
pub const AGENT_SCRIPT: &str = include_str!("agent.sh");

/// How the agent marks a failed setup in the job's log (followed by the exit code).
pub const SETUP_FAILED_MARKER: &str = "asimov: setup failed with exit code";

/// What an interactive session on a run's machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// A login shell in the job's working folder, with the job's (non-secret) env.
    Shell,
    /// The run's own tmux session, read-only (Ctrl-b d detaches); where the agent ran
    /// the job without tmux, its log followed instead.
    Attach,
}

/// Everything the agent needs to start one attempt of a run.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub run: RunName,
    /// Rendered ownership tag; exported to the job as `ASIMOV_INSTANCE`.
    pub tag: String,
    pub setup: Vec<String>,
    pub command: String,
    pub env: BTreeMap<String, String>,
    /// Handed to the job through a 0600 file, never a command line.
    pub secrets: Vec<(String, Secret)>,
    pub max_duration: Option<Duration>,
    pub source: LaunchSource,
    /// Local path → path on the instance.
    pub files: Vec<(PathBuf, String)>,
    /// Paths on the instance to bring back when the run ends.
    pub outputs: Vec<String>,
    /// Local folders a workdir upload never sends, wherever they are: `$ASIMOV_HOME`
    /// and local outputs folders (what asimov itself writes).
    pub exclude: Vec<PathBuf>,
    /// Set when `artifacts.to` is S3: the agent syncs outputs and checkpoints there
    /// itself (`agent.sh sync`), and restores a checkpoint from there.
    pub s3: Option<S3Launch>,
}

/// What the agent needs to sync a run with S3 (see `crate::artifacts::s3`).
#[derive(Debug, Clone)]
pub struct S3Launch {
    /// The URL of the run's objects, `.../bucket/prefix/<run>` (path style).
    pub url: String,
    /// The curl config (`-K`) signing every request: holds the keys, so 0600.
    pub curl_config: Secret,
    /// Outputs: (path on the instance, name under the run's prefix).
    pub outputs: Vec<(String, String)>,
    /// The job's checkpoint folder (relative: inside `work/`).
    pub checkpoint: Option<String>,
    /// The checkpoint generation to restore before the job starts.
    pub restore: Option<String>,
    /// The seq of this attempt's first checkpoint.
    pub next_seq: u64,
    pub attempt: u32,
}

/// What one `agent.sh sync` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Synced {
    /// The generation of the checkpoint it made complete (or found unchanged).
    pub checkpoint: Option<String>,
    /// Files and bytes uploaded.
    pub files: u64,
    pub bytes: u64,
    /// A final sync that failed for good (after the agent's retries): why.
    pub failed: Option<String>,
}

/// A piece of a job's metrics file ([`Machine::metrics_since`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetricsRead {
    /// The file's identity (its inode), `None` when not known (nothing resumes then).
    pub file: Option<u64>,
    /// The byte of the file `text` starts at.
    pub start: u64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LaunchSource {
    None,
    /// Upload this local folder (respecting `.gitignore`) as the job's working folder.
    Workdir(PathBuf),
    /// Clone `repo`, check out `commit` (or `reference`), then apply `diff`.
    Git {
        repo: String,
        reference: Option<String>,
        commit: Option<String>,
        diff: Option<String>,
    },
}

/// What the agent says about its run, read in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Uploaded and launched, setup not yet begun.
    Starting,
    Setup,
    Running,
    Succeeded,
    Failed,
    /// Killed by the agent at `max_duration`.
    TimedOut,
    /// Stopped on request (pause, budget, delete).
    Stopped,
}

impl AgentState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            AgentState::Succeeded | AgentState::Failed | AgentState::TimedOut | AgentState::Stopped
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentStatus {
    pub state: AgentState,
    pub exit_code: Option<i32>,
    /// Last time the agent proved it was alive.
    pub heartbeat: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub progress: Option<Progress>,
    /// Not finished, no supervisor alive, and its state unchanged this many seconds (by
    /// the machine's clock): an agent that died before it could say so (a full disk,
    /// a reboot). `None` while the supervisor lives, or when the agent did not say.
    pub dead_for: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent on {machine}: {step}")]
    Transport {
        machine: String,
        step: &'static str,
        #[source]
        source: crate::transport::TransportError,
    },
    #[error("agent on {machine}: {step}: {message}")]
    Failed {
        machine: String,
        step: &'static str,
        message: String,
    },
    /// What the run asks for cannot be done as it stands (a working folder over the
    /// upload limit): trying again changes nothing until the user does.
    #[error("{step}: {message}")]
    Rejected { step: &'static str, message: String },
}

impl AgentError {
    /// True when a retry cannot succeed without a change by the user.
    pub fn is_permanent(&self) -> bool {
        matches!(self, AgentError::Rejected { .. })
    }
}

/// What a machine's `nvidia-smi` says of its GPUs, checked before a job that asks for
/// GPUs starts on a rented instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuProbe {
    /// This machine is not checked (this computer, fleet hosts: their inventory is).
    Unchecked,
    /// No `nvidia-smi` on the machine (test servers, CPU images): nothing to check.
    NoNvidiaSmi,
    /// `nvidia-smi -L` lists this many GPUs.
    Shows(u32),
}

/// One instance's agent, as the executor drives it. Every method is required, so a
/// wrapper (a provider's machine around the SSH agent) cannot silently lose one by
/// falling back to a refusing default.
#[async_trait]
pub trait Machine: Send + Sync {
    /// The machine's GPUs as `nvidia-smi` shows them; `Unchecked` where they are not
    /// probed.
    async fn gpus(&self) -> Result<GpuProbe, AgentError>;

    /// Uploads the agent, source and files, then starts setup + run detached. A second
    /// call for the same run changes nothing.
    async fn start(&self, spec: &LaunchSpec) -> Result<(), AgentError>;

    /// The run's status; `None` when nothing was started on this instance yet.
    async fn observe(&self) -> Result<Option<AgentStatus>, AgentError>;

    /// The last `max_bytes` of the run's log.
    async fn log_tail(&self, max_bytes: usize) -> Result<String, AgentError>;

    /// Copies the log to `log` and the run's outputs into `outputs`.
    async fn collect(&self, log: &Path, outputs: &Path) -> Result<(), AgentError>;

    /// Copies the run's log, byte for byte and never whole in memory, to the local file
    /// `to`; false when there is no log yet. Machines that keep no log refuse.
    async fn copy_log(&self, to: &Path) -> Result<bool, AgentError>;

    /// The run's log from its start, then every byte appended to it, live (`logs -f`).
    /// Machines that keep no log refuse.
    async fn follow_log(&self) -> Result<crate::transport::ByteStream<'_>, AgentError>;

    /// Copies the folder `path` on the machine (relative: inside the job's working
    /// folder) into the local folder `into`, sending only what changed where the
    /// transport can (rsync); false when the folder does not exist (yet). Machines that
    /// keep no files refuse.
    async fn sync_checkpoint(&self, path: &str, into: &Path) -> Result<bool, AgentError>;

    /// The last `max_bytes` of the metrics file the job writes (`ASIMOV_METRICS`),
    /// empty when there is none. Machines that keep no files have none.
    async fn metrics_tail(&self, max_bytes: usize) -> Result<String, AgentError>;

    /// The metrics file from byte `offset` on (from the newline before it, so that the
    /// caller can tell the file is still the one it read), at most `max_bytes`; from
    /// its last `max_bytes` when `offset` is 0, past its end, or `file` is not its
    /// identity. Empty when there is none.
    async fn metrics_since(
        &self,
        offset: u64,
        file: Option<u64>,
        max_bytes: usize,
    ) -> Result<MetricsRead, AgentError>;

    /// Syncs the run's checkpoint folder to S3 (`last`: and its outputs, once; the
    /// final sync, which the agent also makes by itself when the job ends: this waits
    /// for it). Machines that keep no files refuse.
    async fn sync_s3(&self, last: bool) -> Result<S3Synced, AgentError>;

    /// The command for an interactive session on the machine (`asimov ssh`,
    /// `asimov attach`), to spawn with the caller's terminal and wait for; ending it
    /// leaves the run as it was. Machines without a terminal refuse.
    async fn interactive(
        &self,
        session: Session,
        run: &str,
    ) -> Result<std::process::Command, AgentError>;

    /// Stops the run (its whole process group); idempotent.
    async fn stop(&self) -> Result<(), AgentError>;
}
