//! Shared vocabulary of asimov: names, identifiers, phases, money (`Usd`), progress,
//! how an attempt ended (`Outcome`), fleet hosts (`HostStatus`), market offers (`Offer`)
//! and the ownership tag. Pure data; knows nothing of YAML, SQLite, providers or the
//! clock.

mod host;
mod money;
mod offer;
mod outcome;

pub use host::HostStatus;
pub use money::Usd;
pub use offer::{Offer, OfferQuery};
pub use outcome::Outcome;

use serde::{Deserialize, Serialize};
use std::fmt;

/// Name of a job (a DNS label, validated by `manifest`).
pub type JobName = String;

/// Name of a run: `<job>-<index>`, stable across applies.
pub type RunName = String;

/// A provider's own identifier of an instance (Vast integer, Lambda hex, RunPod id,
/// local folder name, ssh `host/slot`).
pub type InstanceId = String;

/// Seconds since the Unix epoch, UTC. The planner receives `now` as one of these.
pub type Timestamp = i64;

/// Where a run is placed. `Local` is the embedded default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    Ssh,
    Vast,
    Lambda,
    Runpod,
    /// The in-process fake used by tests and benchmarks.
    Fake,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Ssh => "ssh",
            ProviderKind::Vast => "vast",
            ProviderKind::Lambda => "lambda",
            ProviderKind::Runpod => "runpod",
            ProviderKind::Fake => "fake",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "local" => ProviderKind::Local,
            "ssh" => ProviderKind::Ssh,
            "vast" => ProviderKind::Vast,
            "lambda" => ProviderKind::Lambda,
            "runpod" => ProviderKind::Runpod,
            "fake" => ProviderKind::Fake,
            _ => return None,
        })
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lifecycle of a run as users see it in `asimov get runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting: for its scheduled time, a free host in a fleet, capacity, or a budget.
    Pending,
    /// An instance has been asked for and is not yet usable.
    Provisioning,
    /// The instance is up; code is being uploaded and setup commands run.
    Starting,
    /// The job's run command is executing.
    Running,
    /// The run command exited 0.
    Succeeded,
    /// The run command failed, timed out, or retries were exhausted.
    Failed,
    /// The job was deleted; its instance is being destroyed.
    Deleting,
    /// Ended by `asimov destroy`: its instance destroyed, not restarted until the job's
    /// spec changes.
    Stopped,
    /// Paused (`asimov pause`, `spec.paused`, `schedule.pause_at` or outside its
    /// `schedule.window`): checkpoint synced, no instance; resumes from it.
    Paused,
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 9] = [
        Phase::Pending,
        Phase::Provisioning,
        Phase::Starting,
        Phase::Running,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Deleting,
        Phase::Stopped,
        Phase::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Provisioning => "Provisioning",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Deleting => "Deleting",
            Phase::Stopped => "Stopped",
            Phase::Paused => "Paused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Pending" => Phase::Pending,
            "Provisioning" => Phase::Provisioning,
            "Starting" => Phase::Starting,
            "Running" => Phase::Running,
            "Succeeded" => Phase::Succeeded,
            "Failed" => Phase::Failed,
            "Deleting" => Phase::Deleting,
            "Stopped" => Phase::Stopped,
            "Paused" => Phase::Paused,
            _ => return None,
        })
    }

    /// True once the run will not change on its own any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Stopped)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a run has got, as read from its output.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: Option<u64>,
}

impl Progress {
    /// Fraction in 0..=1 when the total is known.
    pub fn fraction(&self) -> Option<f64> {
        match self.total {
            Some(t) if t > 0 => Some((self.done as f64 / t as f64).min(1.0)),
            _ => None,
        }
    }
}

/// The ownership tag every instance asimov creates carries in the create call itself
/// (Vast `label`, Lambda `name`, RunPod `name`, a file in a local or ssh instance folder).
///
/// Rendered as `asimov.<controller>.<run>.<attempt>`. Run names are DNS labels, which
/// cannot contain a dot, so the rendering parses back unambiguously.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OwnerTag {
    /// Identifies the `$ASIMOV_HOME` whose controller owns the instance.
    pub controller: String,
    pub run: RunName,
    pub attempt: u32,
}

impl OwnerTag {
    pub fn new(controller: impl Into<String>, run: impl Into<String>, attempt: u32) -> Self {
        OwnerTag {
            controller: controller.into(),
            run: run.into(),
            attempt,
        }
    }

    pub fn render(&self) -> String {
        format!("asimov.{}.{}.{}", self.controller, self.run, self.attempt)
    }

    /// Parses a rendered tag; `None` for anything asimov did not write.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('.');
        if parts.next()? != "asimov" {
            return None;
        }
        let controller = parts.next()?;
        let run = parts.next()?;
        let attempt = parts.next()?.parse().ok()?;
        if parts.next().is_some() || controller.is_empty() || run.is_empty() {
            return None;
        }
        Some(OwnerTag::new(controller, run, attempt))
    }
}

impl fmt::Display for OwnerTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// A secret value (API key, Hugging Face token). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that must hand it on (a 0600 file, a header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tag_round_trips() {
        let tag = OwnerTag::new("k3x9", "swag-train-0", 2);
        assert_eq!(tag.render(), "asimov.k3x9.swag-train-0.2");
        assert_eq!(OwnerTag::parse(&tag.render()), Some(tag));
        assert_eq!(OwnerTag::parse("my-own-box"), None);
        assert_eq!(OwnerTag::parse("asimov.a.b.x"), None);
        assert_eq!(OwnerTag::parse("asimov.a.b.1.2"), None);
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hf_abc");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
    }
}
