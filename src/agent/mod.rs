//! The agent: the POSIX sh script asimov uploads to every instance (local folders and
//! remote machines alike), the `Machine` operations built on it over a `Transport`, and
//! the parser of what it writes (status, heartbeat, exit code, log, progress).
//! Knows nothing of providers' APIs, the store or the planner.

use crate::model::{Progress, RunName, Secret, Timestamp};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
}

/// One instance's agent, as the executor drives it.
#[async_trait]
pub trait Machine: Send + Sync {
    /// Uploads the agent, source and files, then starts setup + run detached. A second
    /// call for the same run changes nothing.
    async fn start(&self, spec: &LaunchSpec) -> Result<(), AgentError>;

    /// The run's status; `None` when nothing was started on this instance yet.
    async fn observe(&self) -> Result<Option<AgentStatus>, AgentError>;

    /// The last `max_bytes` of the run's log.
    async fn log_tail(&self, max_bytes: usize) -> Result<String, AgentError>;

    /// Copies the log to `log` and the run's outputs into `outputs`.
    async fn collect(&self, log: &Path, outputs: &Path) -> Result<(), AgentError>;

    /// Stops the run (its whole process group); idempotent.
    async fn stop(&self) -> Result<(), AgentError>;
}
