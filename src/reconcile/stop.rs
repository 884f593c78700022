//! Early stopping (`stop_when`), pure: the job's metrics as it wrote them (JSON lines in
//! `ASIMOV_METRICS`), and whether a rule says the run should stop. No I/O, no clock.
//!
//! A rule watches one metric. It stops the run when the metric is NaN or infinite (the
//! training diverged), when a `threshold` is reached (`>=` for `max`, `<=` for `min`),
//! when the job's `step` reaches `max_steps`, or when `patience` evaluations in a row did
//! not improve on the best value so far (strictly better counts as improving).

use crate::manifest::{MetricMode, StopRule};
use std::collections::BTreeMap;

/// One metrics line: every numeric field by name (`step` included).
pub type Record = BTreeMap<String, f64>;

/// Why a rule stops the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Stop {
    pub metric: String,
    /// One short sentence for the run's reason.
    pub why: String,
    /// The metric went NaN or infinite: the run failed rather than finished.
    pub diverged: bool,
}

/// Parses JSON lines of metrics; lines that are not a JSON object (a line cut by the
/// tail window, a half-written last line) are skipped. `NaN`, `Infinity` and
/// `-Infinity` (what Python's `json.dumps` writes for them) are read as such.
pub fn parse_metrics(text: &str) -> Vec<Record> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if !line.starts_with('{') {
                return None;
            }
            let fixed = non_finite_as_strings(line);
            let value: serde_json::Value = serde_json::from_str(&fixed).ok()?;
            let object = value.as_object()?;
            let record: Record = object
                .iter()
                .filter_map(|(k, v)| {
                    let x = match v {
                        serde_json::Value::Number(n) => n.as_f64()?,
                        serde_json::Value::String(s) => match s.as_str() {
                            NAN => f64::NAN,
                            INF => f64::INFINITY,
                            NEG_INF => f64::NEG_INFINITY,
                            _ => return None,
                        },
                        _ => return None,
                    };
                    Some((k.clone(), x))
                })
                .collect();
            Some(record)
        })
        .collect()
}

const NAN: &str = "\u{0}NaN";
const INF: &str = "\u{0}Infinity";
const NEG_INF: &str = "\u{0}-Infinity";

/// Turns the bare values `NaN`, `Infinity`, `-Infinity` after a `:` into marker strings
/// serde_json accepts.
fn non_finite_as_strings(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    let mut in_string = false;
    let mut escaped = false;
    let mut after_colon = false;
    while let Some(c) = rest.chars().next() {
        if !in_string && after_colon {
            let found = [("-Infinity", NEG_INF), ("Infinity", INF), ("NaN", NAN)]
                .into_iter()
                .find(|(token, _)| rest.starts_with(token));
            if let Some((token, marker)) = found {
                out.push_str(&format!("\"{}\"", marker.replace('\u{0}', "\\u0000")));
                rest = &rest[token.len()..];
                after_colon = false;
                continue;
            }
        }
        match c {
            _ if in_string && escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            ':' if !in_string => after_colon = true,
            c if !c.is_whitespace() && !in_string => after_colon = false,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The first rule (in manifest order) that says the run should stop, given every
/// metrics record in the order the job wrote them.
pub fn evaluate(rules: &[StopRule], records: &[Record]) -> Option<Stop> {
    rules.iter().find_map(|rule| evaluate_rule(rule, records))
}

fn evaluate_rule(rule: &StopRule, records: &[Record]) -> Option<Stop> {
    let stop = |why: String, diverged: bool| {
        Some(Stop {
            metric: rule.metric.clone(),
            why,
            diverged,
        })
    };
    let series: Vec<(Option<f64>, f64)> = records
        .iter()
        .filter_map(|r| Some((r.get("step").copied(), *r.get(&rule.metric)?)))
        .collect();
    let at = |step: Option<f64>| step.map_or_else(String::new, |s| format!(" at step {s}"));
    if let Some((step, x)) = series.iter().find(|(_, x)| !x.is_finite()) {
        return stop(format!("{} is {x}{}", rule.metric, at(*step)), true);
    }
    let better = |x: f64, than: f64| match rule.mode {
        MetricMode::Max => x > than,
        MetricMode::Min => x < than,
    };
    if let (Some(threshold), Some((step, x))) = (rule.threshold, series.last()) {
        let reached = match rule.mode {
            MetricMode::Max => *x >= threshold,
            MetricMode::Min => *x <= threshold,
        };
        if reached {
            return stop(
                format!("{} reached {threshold} ({x}{})", rule.metric, at(*step)),
                false,
            );
        }
    }
    if let Some(max) = rule.max_steps {
        let last_step = records.iter().rev().find_map(|r| r.get("step").copied());
        if let Some(step) = last_step.filter(|s| *s >= max as f64) {
            return stop(format!("step {step} reached max_steps {max}"), false);
        }
    }
    let patience = rule.patience?;
    let (best_at, (best_step, best)) = series.iter().enumerate().fold(
        None,
        |best: Option<(usize, (Option<f64>, f64))>, (i, (s, x))| match best {
            Some((_, (_, b))) if !better(*x, b) => best,
            _ => Some((i, (*s, *x))),
        },
    )?;
    let since = series.len() - 1 - best_at;
    if since >= patience as usize {
        return stop(
            format!(
                "{} did not improve for {since} evaluations (best {best}{})",
                rule.metric,
                at(best_step)
            ),
            false,
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(mode: MetricMode) -> StopRule {
        StopRule {
            metric: "val".into(),
            mode,
            patience: None,
            threshold: None,
            max_steps: None,
        }
    }

    fn series(values: &[f64]) -> Vec<Record> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Record::from([("step".into(), i as f64), ("val".into(), *v)]))
            .collect()
    }

    #[test]
    fn patience_counts_evaluations_since_the_best() {
        let r = StopRule {
            patience: Some(3),
            ..rule(MetricMode::Max)
        };
        // Ties do not improve; the best is 0.5 at step 1.
        assert_eq!(
            evaluate(std::slice::from_ref(&r), &series(&[0.1, 0.5, 0.5, 0.4])),
            None
        );
        let stop = evaluate(
            std::slice::from_ref(&r),
            &series(&[0.1, 0.5, 0.5, 0.4, 0.3]),
        )
        .unwrap();
        assert_eq!(
            stop.why,
            "val did not improve for 3 evaluations (best 0.5 at step 1)"
        );
        assert!(!stop.diverged);
        // A new best resets the count.
        assert_eq!(
            evaluate(&[r], &series(&[0.1, 0.5, 0.4, 0.6, 0.5, 0.5])),
            None
        );
        let min = StopRule {
            patience: Some(2),
            ..rule(MetricMode::Min)
        };
        assert!(evaluate(std::slice::from_ref(&min), &series(&[3.0, 2.0, 2.5, 2.1])).is_some());
        assert!(evaluate(&[min], &series(&[3.0, 2.0, 2.5, 1.9])).is_none());
    }

    #[test]
    fn nan_and_infinity_stop_as_diverged_whatever_else_the_rule_says() {
        let r = rule(MetricMode::Min);
        let stop = evaluate(std::slice::from_ref(&r), &series(&[1.0, f64::NAN])).unwrap();
        assert!(stop.diverged);
        assert_eq!(stop.why, "val is NaN at step 1");
        assert!(
            evaluate(std::slice::from_ref(&r), &series(&[f64::INFINITY]))
                .unwrap()
                .diverged
        );
        assert_eq!(evaluate(&[r], &series(&[1.0, 0.5])), None);
    }

    #[test]
    fn threshold_and_max_steps() {
        let t = StopRule {
            threshold: Some(0.9),
            ..rule(MetricMode::Max)
        };
        assert_eq!(
            evaluate(std::slice::from_ref(&t), &series(&[0.5, 0.89])),
            None
        );
        assert!(evaluate(&[t], &series(&[0.5, 0.9])).is_some());
        let m = StopRule {
            max_steps: Some(3),
            ..rule(MetricMode::Max)
        };
        assert_eq!(
            evaluate(std::slice::from_ref(&m), &series(&[1.0, 2.0, 3.0])),
            None
        );
        assert_eq!(
            evaluate(&[m], &series(&[1.0, 2.0, 3.0, 4.0])).unwrap().why,
            "step 3 reached max_steps 3"
        );
    }

    #[test]
    fn metrics_lines_parse_with_python_non_finite_values_and_skip_broken_lines() {
        let text = "ep\": 3}\n{\"step\": 1, \"val\": 0.5, \"name\": \"a: NaN\"}\n\
                    {\"step\": 2, \"val\": NaN}\n{\"step\":3,\"val\":-Infinity}\nnot json\n{\"step\": 4, \"val";
        let records = parse_metrics(text);
        assert_eq!(records.len(), 3, "{records:?}");
        assert_eq!(records[0]["val"], 0.5);
        assert!(!records[0].contains_key("name"));
        assert!(records[1]["val"].is_nan());
        assert_eq!(records[2]["val"], f64::NEG_INFINITY);
    }
}
