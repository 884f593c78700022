//! How an attempt ended. One type shared by the planner (which decides it), the executor
//! (which records it) and the store (which keeps its stable text form).

use std::fmt;

/// How an attempt (one instance lifetime of a run) ended. Stored as [`Outcome::as_text`];
/// every `match` on it is exhaustive, so a new way of ending is decided everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The run command exited 0.
    Succeeded,
    /// The run command failed; its exit code when the agent reported one.
    Failed { exit_code: Option<i32> },
    /// The run exceeded `max_duration`.
    TimedOut,
    /// The instance vanished or was stopped by the provider (preempted, outbid).
    Preempted,
    /// The agent's heartbeat went stale.
    Lost,
    /// The agent reports the job was stopped on the machine.
    Stopped,
    /// The provider had no capacity for the create.
    NoCapacity,
    /// A fixed pool (a fleet) had no free machine at create time: back in its queue.
    Queued,
    /// The provider refused the create for good (bad request, credentials, quota).
    Rejected,
    /// A `stop_when` rule stopped it (after its final sync); `diverged` when its metric
    /// went NaN or infinite.
    EarlyStopped { diverged: bool },
    /// A budget with `action: stop` ended it.
    Budget,
    /// Its job was deleted.
    Deleted,
    /// `asimov destroy` ended it; the run stays Stopped until its job's spec changes.
    Destroyed,
    /// The run was paused: its checkpoint synced, its instance released.
    Paused,
    /// A newer attempt of the same run took over.
    Superseded,
    /// The instance stayed provisioning past its provider's boot timeout.
    BootTimeout,
    /// The job's spec changed after this attempt finished the run with the inner
    /// outcome: the run starts afresh, with all its restarts.
    SpecChanged(Box<Outcome>),
}

impl Outcome {
    /// The stable text form kept in the store: `succeeded`, `failed`, `failed:3`,
    /// `timed-out`, ..., `<inner> (spec changed)`.
    pub fn as_text(&self) -> String {
        match self {
            Outcome::Failed { exit_code: Some(c) } => format!("failed:{c}"),
            Outcome::EarlyStopped { diverged: true } => "early-stopped:diverged".to_string(),
            Outcome::SpecChanged(inner) => format!("{} (spec changed)", inner.as_text()),
            other => other.word().to_string(),
        }
    }

    /// The short word of the variant (`failed` for any exit code).
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut => "timed-out",
            Outcome::Preempted => "preempted",
            Outcome::Lost => "lost",
            Outcome::Stopped => "stopped",
            Outcome::NoCapacity => "no-capacity",
            Outcome::Queued => "queued",
            Outcome::Rejected => "rejected",
            Outcome::EarlyStopped { .. } => "early-stopped",
            Outcome::Budget => "budget",
            Outcome::Deleted => "deleted",
            Outcome::Destroyed => "destroyed",
            Outcome::Paused => "paused",
            Outcome::Superseded => "superseded",
            Outcome::BootTimeout => "boot-timeout",
            Outcome::SpecChanged(_) => "spec-changed",
        }
    }

    /// Parses [`Outcome::as_text`]; `None` for anything else.
    pub fn parse(text: &str) -> Option<Outcome> {
        if let Some(inner) = text.strip_suffix(" (spec changed)") {
            return Outcome::parse(inner)
                .filter(|o| !matches!(o, Outcome::SpecChanged(_)))
                .map(|o| Outcome::SpecChanged(Box::new(o)));
        }
        if let Some(code) = text.strip_prefix("failed:") {
            return code
                .parse()
                .ok()
                .map(|c| Outcome::Failed { exit_code: Some(c) });
        }
        Some(match text {
            "succeeded" => Outcome::Succeeded,
            "failed" => Outcome::Failed { exit_code: None },
            "timed-out" => Outcome::TimedOut,
            "preempted" => Outcome::Preempted,
            "lost" => Outcome::Lost,
            "stopped" => Outcome::Stopped,
            "no-capacity" => Outcome::NoCapacity,
            "queued" => Outcome::Queued,
            "rejected" => Outcome::Rejected,
            "early-stopped" => Outcome::EarlyStopped { diverged: false },
            "early-stopped:diverged" => Outcome::EarlyStopped { diverged: true },
            "budget" => Outcome::Budget,
            "deleted" => Outcome::Deleted,
            "destroyed" => Outcome::Destroyed,
            "paused" => Outcome::Paused,
            "superseded" => Outcome::Superseded,
            "boot-timeout" => Outcome::BootTimeout,
            _ => return None,
        })
    }

    /// True when the job's command actually ran on the instance, so its log and outputs
    /// are worth bringing home.
    pub fn ran(&self) -> bool {
        match self {
            Outcome::Succeeded
            | Outcome::Failed { .. }
            | Outcome::TimedOut
            | Outcome::EarlyStopped { .. } => true,
            Outcome::Preempted
            | Outcome::Lost
            | Outcome::Stopped
            | Outcome::NoCapacity
            | Outcome::Queued
            | Outcome::Rejected
            | Outcome::Budget
            | Outcome::Deleted
            | Outcome::Destroyed
            | Outcome::Paused
            | Outcome::Superseded
            | Outcome::BootTimeout
            | Outcome::SpecChanged(_) => false,
        }
    }
}

/// For people (events, `describe`): the text form, with an exit code spelt out.
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Failed { exit_code: Some(c) } => write!(f, "failed (exit code {c})"),
            Outcome::SpecChanged(inner) => write!(f, "{inner} (spec changed)"),
            other => f.write_str(other.word()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        let all = [
            Outcome::Succeeded,
            Outcome::Failed { exit_code: None },
            Outcome::Failed {
                exit_code: Some(-3),
            },
            Outcome::TimedOut,
            Outcome::Preempted,
            Outcome::Lost,
            Outcome::Stopped,
            Outcome::NoCapacity,
            Outcome::Queued,
            Outcome::Rejected,
            Outcome::EarlyStopped { diverged: false },
            Outcome::EarlyStopped { diverged: true },
            Outcome::Budget,
            Outcome::Deleted,
            Outcome::Destroyed,
            Outcome::Paused,
            Outcome::Superseded,
            Outcome::BootTimeout,
            Outcome::SpecChanged(Box::new(Outcome::Failed { exit_code: Some(2) })),
        ];
        for o in all {
            assert_eq!(Outcome::parse(&o.as_text()), Some(o.clone()), "{o}");
        }
        assert_eq!(Outcome::parse("ended"), None);
        assert_eq!(Outcome::parse("failed:x"), None);
        assert_eq!(Outcome::parse("lost (spec changed) (spec changed)"), None);
        assert_eq!(
            Outcome::SpecChanged(Box::new(Outcome::Succeeded)).as_text(),
            "succeeded (spec changed)"
        );
    }
}
