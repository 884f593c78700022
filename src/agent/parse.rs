//! Parsers of what the agent prints: the `agent.sh status` block and progress lines in
//! the job's log. Pure functions of text.

use super::{AgentState, AgentStatus};
use crate::model::Progress;

/// The line `agent.sh status` prints between the state files and the log tail.
pub const LOG_MARKER: &str = "--- asimov log tail ---";

/// Parses the output of `agent.sh status`: the run's status and the log tail after the
/// marker line. `None` when nothing was started (empty output) or the block has no
/// recognisable `status=` line. Progress is read from the log tail.
pub fn parse_status(text: &str) -> Option<(AgentStatus, String)> {
    let (head, tail) = match text.find(LOG_MARKER) {
        Some(at) => {
            let rest = &text[at + LOG_MARKER.len()..];
            (&text[..at], rest.strip_prefix('\n').unwrap_or(rest))
        }
        None => (text, ""),
    };
    let mut state = None;
    let mut status = AgentStatus {
        state: AgentState::Starting,
        exit_code: None,
        heartbeat: None,
        started_at: None,
        finished_at: None,
        progress: None,
        dead_for: None,
    };
    let (mut alive, mut now, mut changed_at) = (None, None, None);
    for line in head.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "alive" => alive = Some(value == "1"),
            "now" => now = value.parse::<i64>().ok(),
            "changed_at" => changed_at = value.parse::<i64>().ok(),
            "status" => state = parse_state(value),
            "exit_code" => status.exit_code = value.parse().ok(),
            "heartbeat" => status.heartbeat = value.parse().ok(),
            "started_at" => status.started_at = value.parse().ok(),
            "finished_at" => status.finished_at = value.parse().ok(),
            _ => {}
        }
    }
    status.state = state?;
    if alive == Some(false) && !status.state.is_finished() {
        status.dead_for = now
            .zip(changed_at)
            .map(|(now, at)| now.saturating_sub(at).max(0));
    }
    status.progress = parse_progress(tail);
    Some((status, tail.to_string()))
}

fn parse_state(value: &str) -> Option<AgentState> {
    Some(match value {
        // The claim writes the file before its content: empty means starting.
        "" | "starting" => AgentState::Starting,
        "setup" => AgentState::Setup,
        "running" => AgentState::Running,
        "succeeded" => AgentState::Succeeded,
        "failed" => AgentState::Failed,
        "timeout" => AgentState::TimedOut,
        "stopped" => AgentState::Stopped,
        _ => return None,
    })
}

/// The job's progress as its output last reported it: explicit
/// `ASIMOV_PROGRESS <done>[/<total>]` lines or tqdm-style bars
/// (`45%|████▌     | 45/100 [00:01<00:01, 30.0it/s]`), whichever comes last. Lines may
/// be separated by `\n` or `\r` (tqdm rewrites its bar in place with `\r`).
pub fn parse_progress(log_tail: &str) -> Option<Progress> {
    log_tail
        .split(['\n', '\r'])
        .filter_map(|segment| explicit_progress(segment).or_else(|| tqdm_progress(segment)))
        .next_back()
}

fn explicit_progress(segment: &str) -> Option<Progress> {
    let rest = segment.trim().strip_prefix("ASIMOV_PROGRESS")?;
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let word = rest.split_whitespace().next()?;
    match word.split_once('/') {
        Some((done, total)) => Some(Progress {
            done: done.parse().ok()?,
            total: Some(total.parse().ok()?),
        }),
        None => Some(Progress {
            done: word.parse().ok()?,
            total: None,
        }),
    }
}

/// A tqdm bar: `<pct>%|<bar>| <n>/<total> ...`; the last bar in the segment counts.
fn tqdm_progress(segment: &str) -> Option<Progress> {
    let mut found = None;
    let mut from = 0;
    while let Some(pos) = segment[from..].find("%|") {
        let start = from + pos;
        from = start + 2;
        // The percentage right before `%|` must be a number.
        let before = &segment[..start];
        let digits = before
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .count();
        if digits == 0 {
            continue;
        }
        let after = &segment[start + 2..];
        let Some(bar_end) = after.find('|') else {
            continue;
        };
        let counts = after[bar_end + 1..].trim_start();
        let word = counts
            .split(|c: char| c.is_whitespace() || c == '[')
            .next()
            .unwrap_or("");
        let Some((done, total)) = word.split_once('/') else {
            continue;
        };
        if let (Some(done), Some(total)) = (scaled_count(done), scaled_count(total)) {
            found = Some(Progress {
                done,
                total: Some(total),
            });
        }
    }
    found
}

/// A tqdm count, possibly unit-scaled: `45`, `1.23k`, `10.0M`.
fn scaled_count(text: &str) -> Option<u64> {
    let (number, factor) = match text.chars().last()? {
        'k' | 'K' => (&text[..text.len() - 1], 1e3),
        'M' => (&text[..text.len() - 1], 1e6),
        'G' => (&text[..text.len() - 1], 1e9),
        'T' => (&text[..text.len() - 1], 1e12),
        _ => (text, 1.0),
    };
    if factor == 1.0 {
        return number.parse().ok();
    }
    let value: f64 = number.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Some((value * factor).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(done: u64, total: Option<u64>) -> Option<Progress> {
        Some(Progress { done, total })
    }

    #[test]
    fn explicit_lines() {
        assert_eq!(parse_progress("ASIMOV_PROGRESS 3/10\n"), p(3, Some(10)));
        assert_eq!(parse_progress("x\nASIMOV_PROGRESS 42\nmore\n"), p(42, None));
        assert_eq!(
            parse_progress("  ASIMOV_PROGRESS 7/8 epoch 2\n"),
            p(7, Some(8))
        );
        assert_eq!(parse_progress("ASIMOV_PROGRESSIVE 3/10\n"), None);
        assert_eq!(parse_progress("ASIMOV_PROGRESS x/10\n"), None);
        assert_eq!(parse_progress("nothing here\n"), None);
    }

    #[test]
    fn tqdm_bars_with_carriage_returns() {
        let log = "epoch 1\n  0%|          | 0/100 [00:00<?, ?it/s]\r 45%|████▌     | 45/100 [00:01<00:01, 30.00it/s]\r 46%|████▌     | 46/100 [00:01<00:01, 30.00it/s]";
        assert_eq!(parse_progress(log), p(46, Some(100)));
        let described = "Epoch 3: 100%|██████████| 500/500 [01:02<00:00,  8.01it/s, loss=0.12]\n";
        assert_eq!(parse_progress(described), p(500, Some(500)));
        assert_eq!(
            parse_progress(" 12%|█▏        | 1.23k/10.0k [00:01<00:07, 1.1kit/s]"),
            p(1230, Some(10000))
        );
    }

    #[test]
    fn last_occurrence_wins_across_kinds() {
        let log = " 45%|████▌     | 45/100 [00:01<00:01]\nASIMOV_PROGRESS 7/9\n";
        assert_eq!(parse_progress(log), p(7, Some(9)));
        let log = "ASIMOV_PROGRESS 7/9\n 45%|████▌     | 45/100 [00:01<00:01]\nloss 0.3\n";
        assert_eq!(parse_progress(log), p(45, Some(100)));
        assert_eq!(parse_progress("a|b| 3/4\n"), None);
    }

    #[test]
    fn a_dead_supervisor_before_the_end_says_for_how_long() {
        let block = |status: &str, alive: u8| {
            format!(
                "status={status}\nalive={alive}\nchanged_at=1000\nnow=1075\n--- asimov log tail ---\n"
            )
        };
        let dead = |status, alive| parse_status(&block(status, alive)).unwrap().0.dead_for;
        assert_eq!(dead("starting", 0), Some(75));
        assert_eq!(dead("setup", 0), Some(75));
        assert_eq!(dead("setup", 1), None, "a live supervisor");
        assert_eq!(
            dead("succeeded", 0),
            None,
            "a finished run needs no supervisor"
        );
        // An agent that does not say when its state changed: no claim either way.
        let (old, _) = parse_status("status=starting\nalive=0\nnow=5\n").unwrap();
        assert_eq!(old.dead_for, None);
    }

    #[test]
    fn status_block() {
        let text = "status=running\nexit_code=\npid=12\nheartbeat=1700000005\nstarted_at=1700000000\nalive=1\nnow=1700000006\n--- asimov log tail ---\nhello\nASIMOV_PROGRESS 2/5\n";
        let (status, tail) = parse_status(text).unwrap();
        assert_eq!(status.state, AgentState::Running);
        assert_eq!(status.exit_code, None);
        assert_eq!(status.heartbeat, Some(1700000005));
        assert_eq!(status.started_at, Some(1700000000));
        assert_eq!(status.finished_at, None);
        assert_eq!(status.progress, p(2, Some(5)));
        assert_eq!(tail, "hello\nASIMOV_PROGRESS 2/5\n");

        let (done, _) =
            parse_status("status=timeout\nexit_code=124\nfinished_at=9\n--- asimov log tail ---\n")
                .unwrap();
        assert_eq!(done.state, AgentState::TimedOut);
        assert_eq!(done.exit_code, Some(124));
        assert_eq!(done.finished_at, Some(9));
        assert!(parse_status("").is_none());
        assert!(parse_status("status=bogus\n").is_none());
    }
}
