//! Early stopping (`stop_when`), pure: the job's metrics as it wrote them (JSON lines in
//! `ASIMOV_METRICS`), and whether a rule says the run should stop. No I/O, no clock.
//!
//! A rule watches one metric. It stops the run when the metric is NaN or infinite (the
//! training diverged), when a `threshold` is reached (`>=` for `max`, `<=` for `min`),
//! when the job's `step` reaches `max_steps`, or when `patience` evaluations in a row did
//! not improve on the best value so far (strictly better counts as improving).

use crate::manifest::{MetricMode, StopRule};
use std::collections::{BTreeMap, VecDeque};

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
fn non_finite_as_strings(line: &str) -> std::borrow::Cow<'_, str> {
    // Most lines have none: no copy for them.
    if !line.contains("NaN") && !line.contains("Infinity") {
        return std::borrow::Cow::Borrowed(line);
    }
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
    std::borrow::Cow::Owned(out)
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

/// Parses one metrics line as [`parse_metrics`] does (the same lines are records, the
/// same fields are numbers), but stores only the fields `keep` accepts: the others are
/// checked as JSON (the same recursion and number limits) and dropped, so what a line
/// costs in memory is its kept fields, whatever else it holds. A field already kept
/// stays kept when its name comes again (the last value wins, as in `parse_metrics`).
/// `None`: not a record.
pub fn parse_line(line: &str, keep: &mut dyn FnMut(&str) -> bool) -> Option<Record> {
    use serde::de::DeserializeSeed;
    let line = line.trim();
    if !line.starts_with('{') {
        return None;
    }
    let fixed = non_finite_as_strings(line);
    let mut de = serde_json::Deserializer::from_str(&fixed);
    let record = Fields { keep }.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(record)
}

/// The top-level object of a line: its kept numeric fields.
struct Fields<'k> {
    keep: &'k mut dyn FnMut(&str) -> bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Fields<'_> {
    type Value = Record;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Record, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Fields<'_> {
    type Value = Record;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
        let mut record = Record::new();
        loop {
            let key = map.next_key_seed(Key {
                keep: &mut *self.keep,
                kept: &record,
            })?;
            match key {
                None => return Ok(record),
                Some(Some(name)) => match map.next_value::<Number>()?.0 {
                    Some(x) => {
                        record.insert(name, x);
                    }
                    None => {
                        record.remove(&name);
                    }
                },
                Some(None) => {
                    map.next_value::<Skip>()?;
                }
            }
        }
    }
}

/// A field's name: `Some` when it is kept (allocated only then).
struct Key<'k> {
    keep: &'k mut dyn FnMut(&str) -> bool,
    kept: &'k Record,
}

impl<'de> serde::de::DeserializeSeed<'de> for Key<'_> {
    type Value = Option<String>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Key<'_> {
    type Value = Option<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok((self.kept.contains_key(name) || (self.keep)(name)).then(|| name.to_string()))
    }
}

/// A field's value as `parse_metrics` reads it: a number, or one of the non-finite
/// markers; anything else is `None` (and is not a field of the record).
struct Number(Option<f64>);

impl<'de> serde::Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumberVisitor)
    }
}

struct NumberVisitor;

impl<'de> serde::de::Visitor<'de> for NumberVisitor {
    type Value = Number;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Number, E> {
        Ok(Number(None))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Number, E> {
        Ok(Number(Some(n as f64)))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Number, E> {
        Ok(Number(Some(n as f64)))
    }
    fn visit_f64<E>(self, x: f64) -> Result<Number, E> {
        Ok(Number(Some(x)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Number, E> {
        Ok(Number(match s {
            NAN => Some(f64::NAN),
            INF => Some(f64::INFINITY),
            NEG_INF => Some(f64::NEG_INFINITY),
            _ => None,
        }))
    }
    fn visit_unit<E>(self) -> Result<Number, E> {
        Ok(Number(None))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Number, A::Error> {
        SkipVisitor.visit_seq(seq).map(|_| Number(None))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Number, A::Error> {
        SkipVisitor.visit_map(map).map(|_| Number(None))
    }
}

/// Any JSON value, checked through `deserialize_any` as `serde_json::Value` is (not
/// `IgnoredAny`, which skips the recursion and number range checks) and not stored.
struct Skip;

impl<'de> serde::Deserialize<'de> for Skip {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> serde::de::Visitor<'de> for SkipVisitor {
    type Value = Skip;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// What the rules need of a window of records, kept as the records come instead of the
/// records themselves: per metric a rule names, its last value, its non-finite values
/// and the candidates for its best; the last `step`; the last record (a bounded part of
/// it, for the METRIC column). [`Watch::evaluate`] decides as [`evaluate`] does over
/// the window's records.
///
/// The window is the newest records whose lines, newline included, hold at most `cap`
/// bytes together (what [`MetricsCursor`](super::metrics::MetricsCursor) kept as
/// records before). A record that starts at byte `start` of the record lines taken is
/// in it while `taken - start <= cap`. Memory: a few entries per rule metric in
/// practice; at worst one per record of the window that holds the metric (a series
/// that never improves), so bounded by `cap` whatever the job writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Watch {
    cap: u64,
    /// Bytes of the record lines taken since the window started.
    taken: u64,
    /// By metric name, for each metric a rule names.
    series: BTreeMap<String, Series>,
    /// The `step` of the last record that had one.
    step: Option<(u64, f64)>,
    /// Where the last record starts, and its fields within [`LAST_FIELDS`].
    last: Option<(u64, Record)>,
}

/// Fields kept of the last record beside `step` and the rules' metrics (the METRIC
/// column shows them), and the bytes their names may take, so that a line of a million
/// names costs what a short one does.
pub const LAST_FIELDS: usize = 64;
const LAST_NAME_BYTES: usize = 2048;

#[derive(Debug, Clone, Default, PartialEq)]
struct Series {
    /// Values taken so far: the next one's index.
    count: u64,
    last: Option<Entry>,
    /// The window's NaN and infinite values, oldest first.
    non_finite: VecDeque<Entry>,
    /// For a `max` rule, the window's finite values that no later one beats, oldest
    /// first (so non-increasing): the first is the best, the first of its ties.
    max: Option<VecDeque<Entry>>,
    /// The same for a `min` rule (non-decreasing).
    min: Option<VecDeque<Entry>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    start: u64,
    index: u64,
    step: Option<f64>,
    value: f64,
}

impl Watch {
    /// An empty window for `rules`, of `cap` bytes.
    pub fn new(rules: &[StopRule], cap: usize) -> Watch {
        let mut series: BTreeMap<String, Series> = BTreeMap::new();
        for rule in rules {
            let s = series.entry(rule.metric.clone()).or_default();
            let candidates = match rule.mode {
                MetricMode::Max => &mut s.max,
                MetricMode::Min => &mut s.min,
            };
            candidates.get_or_insert_with(VecDeque::new);
        }
        Watch {
            cap: cap as u64,
            series,
            ..Watch::default()
        }
    }

    /// True when this window keeps what `rules` need (of `cap` bytes): when not, it
    /// must be built again from the file.
    pub fn covers(&self, rules: &[StopRule], cap: usize) -> bool {
        self.cap == cap as u64
            && rules.iter().all(|rule| {
                self.series
                    .get(&rule.metric)
                    .is_some_and(|s| match rule.mode {
                        MetricMode::Max => s.max.is_some(),
                        MetricMode::Min => s.min.is_some(),
                    })
            })
    }

    /// True for the fields the rules read: `step` and the rules' metrics.
    pub fn wants(&self, name: &str) -> bool {
        name == "step" || self.series.contains_key(name)
    }

    /// A keep function for [`parse_line`] that takes what [`Watch::wants`], and some
    /// other fields for the last record: at most [`LAST_FIELDS`] names of at most
    /// [`LAST_NAME_BYTES`] bytes in all.
    pub fn keep_for_last(&self) -> impl FnMut(&str) -> bool + '_ {
        let (mut fields, mut bytes) = (0usize, 0usize);
        move |name: &str| {
            if self.wants(name) {
                return true;
            }
            if fields < LAST_FIELDS && bytes + name.len() <= LAST_NAME_BYTES {
                fields += 1;
                bytes += name.len();
                return true;
            }
            false
        }
    }

    /// Takes in the next record, parsed from a line of `bytes` bytes (its newline
    /// included) with at least the fields the rules want. The window's oldest records
    /// leave as this one's bytes push them out.
    pub fn take(&mut self, bytes: usize, record: &Record) {
        let start = self.taken;
        self.taken += bytes as u64;
        let step = record.get("step").copied();
        if let Some(s) = step {
            self.step = Some((start, s));
        }
        self.last = Some((start, Record::new()));
        for (name, series) in &mut self.series {
            let Some(&value) = record.get(name) else {
                continue;
            };
            let entry = Entry {
                start,
                index: series.count,
                step,
                value,
            };
            series.count += 1;
            series.last = Some(entry);
            if !value.is_finite() {
                // Non-finite values are never the best: while one is in the window the
                // rule stops on it first; the values before it leave before it does.
                series.non_finite.push_back(entry);
                continue;
            }
            if let Some(max) = &mut series.max {
                while max.back().is_some_and(|b| value > b.value) {
                    max.pop_back();
                }
                max.push_back(entry);
            }
            if let Some(min) = &mut series.min {
                while min.back().is_some_and(|b| value < b.value) {
                    min.pop_back();
                }
                min.push_back(entry);
            }
        }
        let (taken, cap) = (self.taken, self.cap);
        let out = |e: &Entry| taken - e.start > cap;
        for series in self.series.values_mut() {
            for q in [
                Some(&mut series.non_finite),
                series.max.as_mut(),
                series.min.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                while q.front().is_some_and(out) {
                    q.pop_front();
                }
                // A burst of entries that left gives its memory back.
                if q.capacity() > 64 && q.len() * 4 < q.capacity() {
                    q.shrink_to(q.len() * 2);
                }
            }
        }
    }

    /// Sets the fields kept of the last record taken (see [`Watch::keep_for_last`]).
    pub fn set_last(&mut self, record: Record) {
        if let Some((_, last)) = &mut self.last {
            *last = record;
        }
    }

    /// The last record of the window, as far as it was kept.
    pub fn last(&self) -> Option<&Record> {
        self.last
            .as_ref()
            .filter(|(start, _)| self.inside(*start))
            .map(|(_, r)| r)
    }

    /// Values held over the window, all rules together (what its memory grows with).
    pub fn entries(&self) -> usize {
        self.series
            .values()
            .map(|s| {
                s.non_finite.len()
                    + s.max.as_ref().map_or(0, VecDeque::len)
                    + s.min.as_ref().map_or(0, VecDeque::len)
            })
            .sum()
    }

    fn inside(&self, start: u64) -> bool {
        self.taken - start <= self.cap
    }

    /// The first rule (in manifest order) that says the run should stop: the same as
    /// [`evaluate`] over the window's records. A rule whose metric this window does
    /// not keep (see [`Watch::covers`]) sees no value of it.
    pub fn evaluate(&self, rules: &[StopRule]) -> Option<Stop> {
        rules.iter().find_map(|rule| self.evaluate_rule(rule))
    }

    fn evaluate_rule(&self, rule: &StopRule) -> Option<Stop> {
        let stop = |why: String, diverged: bool| {
            Some(Stop {
                metric: rule.metric.clone(),
                why,
                diverged,
            })
        };
        let at = |step: Option<f64>| step.map_or_else(String::new, |s| format!(" at step {s}"));
        let series = self.series.get(&rule.metric);
        if let Some(e) = series.and_then(|s| s.non_finite.front()) {
            return stop(
                format!("{} is {}{}", rule.metric, e.value, at(e.step)),
                true,
            );
        }
        let last = series.and_then(|s| s.last).filter(|e| self.inside(e.start));
        if let (Some(threshold), Some(e)) = (rule.threshold, last) {
            let reached = match rule.mode {
                MetricMode::Max => e.value >= threshold,
                MetricMode::Min => e.value <= threshold,
            };
            if reached {
                return stop(
                    format!(
                        "{} reached {threshold} ({}{})",
                        rule.metric,
                        e.value,
                        at(e.step)
                    ),
                    false,
                );
            }
        }
        if let Some(max) = rule.max_steps {
            let last_step = self.step.filter(|(start, _)| self.inside(*start));
            if let Some((_, step)) = last_step.filter(|(_, s)| *s >= max as f64) {
                return stop(format!("step {step} reached max_steps {max}"), false);
            }
        }
        let patience = rule.patience?;
        let last = last?;
        let candidates = match rule.mode {
            MetricMode::Max => series?.max.as_ref(),
            MetricMode::Min => series?.min.as_ref(),
        };
        let best = candidates?.front()?;
        let since = last.index - best.index;
        if since >= u64::from(patience) {
            return stop(
                format!(
                    "{} did not improve for {since} evaluations (best {}{})",
                    rule.metric,
                    best.value,
                    at(best.step)
                ),
                false,
            );
        }
        None
    }
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

    /// The watch decides as `evaluate` over every prefix of a series: ties, new bests,
    /// both modes, thresholds, max_steps, NaN, -0.0, records without the metric or
    /// without `step`, and a window of three records.
    #[test]
    fn the_watch_decides_as_evaluate_over_the_window() {
        let values = [
            0.1, 0.5, 0.5, 0.4, -0.0, 0.0, 0.9, 0.9, 0.2, 0.95, 0.3, 0.1, 0.1, 0.05, 0.6,
        ];
        let mut records: Vec<Record> = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut r = Record::new();
            if i % 4 != 3 {
                r.insert("step".into(), i as f64 * 10.0);
            }
            if i % 5 != 4 {
                r.insert("val".into(), *v);
            }
            records.push(r);
        }
        records.insert(12, Record::from([("val".into(), f64::NAN)]));
        let mut rules = Vec::new();
        for mode in [MetricMode::Max, MetricMode::Min] {
            for patience in [None, Some(1), Some(2), Some(4)] {
                for threshold in [None, Some(0.9), Some(0.1)] {
                    for max_steps in [None, Some(90)] {
                        rules.push(StopRule {
                            patience,
                            threshold,
                            max_steps,
                            ..rule(mode)
                        });
                    }
                }
            }
        }
        let line = 10; // every record's line counts 10 bytes
        for cap in [usize::MAX / 2, 3 * line] {
            for r in &rules {
                let rules = std::slice::from_ref(r);
                let mut watch = Watch::new(rules, cap);
                for n in 1..=records.len() {
                    watch.take(line, &records[n - 1]);
                    let from = n.saturating_sub(cap / line);
                    assert_eq!(
                        watch.evaluate(rules),
                        evaluate(rules, &records[from..n]),
                        "{r:?} cap {cap} after {n}"
                    );
                }
            }
        }
    }

    /// `parse_line` reads what `parse_metrics` reads, keeping only the fields asked.
    #[test]
    fn parse_line_reads_as_parse_metrics_does() {
        let deep = |n: usize| format!("{{\"val\": 1, \"x\": {}{}}}", "[".repeat(n), "]".repeat(n));
        let lines = [
            "{\"step\": 1, \"val\": 0.5, \"name\": \"a: NaN\"}".to_string(),
            "{\"step\": 2, \"val\": NaN, \"b\": Infinity, \"c\": -Infinity}".into(),
            "{\"val\": 1, \"val\": \"x\"}".into(),
            "{\"val\": \"x\", \"val\": 2}".into(),
            "{\"v\\u0061l\": 3, \"o\": {\"val\": 9}, \"l\": [1, {\"a\": NaN}]}".into(),
            "{\"val\": 1e999}".into(),
            "{\"val\": 1, \"x\": 1e999}".into(),
            "{\"val\": -0, \"n\": null, \"t\": true, \"big\": 18446744073709551615}".into(),
            "  {\"val\": 1}\r".into(),
            "{\"val\": 1} trailing".into(),
            "{\"val\": 1,}".into(),
            "{\"val\": 1".into(),
            "[{\"val\": 1}]".into(),
            "ep\": 3}".into(),
            "{}".into(),
            "{\"val\": \"\\u0000NaN\"}".into(),
            deep(126),
            deep(127),
            deep(128),
            deep(400),
        ];
        for line in &lines {
            let whole = parse_metrics(line).pop();
            let all = parse_line(line, &mut |_| true);
            assert_eq!(format!("{all:?}"), format!("{whole:?}"), "{line}");
            let val = parse_line(line, &mut |name| name == "val");
            let only: Option<Record> =
                whole.map(|r| r.into_iter().filter(|(k, _)| k == "val").collect());
            assert_eq!(format!("{val:?}"), format!("{only:?}"), "{line}");
        }
    }
}
