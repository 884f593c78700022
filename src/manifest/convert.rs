//! Stage 2 of validation: raw documents that have the right shape become the typed
//! desired state. Meaning is checked here (durations, names, references between objects,
//! matrix keys) and every problem is collected, never stopping at the first.

use super::desired::{
    Artifacts, Budget, BudgetAction, Checkpoint, FileCopy, Fleet, GpuRequest, Host, Job, JobSpec,
    MetricMode, Origin, Placement, PlacementKeys, ProxyJump, Resources, RetryOn, RetryPolicy,
    RunSpec, Schedule, Source, StopRule, Window,
};
use super::raw;
use super::schema;
use super::yaml::{self, Pos, YamlDocument};
use super::{Context, Defined, Document, Kind, Loaded, Problem, Problems};
use crate::model::ProviderKind;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Longest DNS label, and so the longest object or run name.
const MAX_NAME: usize = 63;

/// More runs than this from one job is almost surely a mistake in the matrix.
const MAX_RUNS: usize = 10_000;

/// Longest duration a manifest may give (`max_duration`, `checkpoint.every`, a budget's
/// `period`): ten years, beyond any training run or budget window, and small enough
/// that seconds and timestamps derived from it fit every integer they meet (the
/// planner's `i64`, the agent's shell arithmetic, 32-bit included).
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Parses a duration like `30m`, `43h`, `1h30m` or `2days`; zero and anything above
/// [`MAX_DURATION`] are refused.
///
/// The error is the message shown to the user, saying what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let too_long = || {
        format!(
            "expected a duration of at most {}, found {text:?}",
            humantime::format_duration(MAX_DURATION)
        )
    };
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(format!(
            "expected a duration above zero like 30m or 43h, found {text:?}"
        )),
        Ok(d) if d > MAX_DURATION => Err(too_long()),
        Ok(d) => Ok(d),
        Err(humantime::DurationError::NumberOverflow) => Err(too_long()),
        Err(_) => Err(format!(
            "expected a duration like 30m or 43h, found {text:?}"
        )),
    }
}

/// True for an RFC 1123 DNS label: 1 to 63 lowercase letters, digits and `-`, starting and
/// ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn dns_message(what: &str, name: &str) -> String {
    format!(
        "expected a {what} that is a DNS label (lowercase letters, digits and `-`, starting \
         and ending with a letter or digit, at most {MAX_NAME} characters), found {name:?}"
    )
}

/// A document that parsed as YAML and has a known kind.
struct Parsed<'a> {
    file: &'a Path,
    doc: YamlDocument,
    kind: Kind,
    name: Option<String>,
    /// What stage 2 checks: the document, or, when stage 1 found problems, the document
    /// with the offending fields cut out. `None` when too much is wrong to check more.
    checkable: Option<Value>,
    /// Fields cut out for stage 2.
    pruned: Vec<String>,
}

/// Loads the texts of several files as one set: names defined in any of them can be
/// referred to from all of them.
pub(crate) fn load_sources(
    sources: &[(PathBuf, String)],
    ctx: &Context,
    mut problems: Vec<Problem>,
) -> Result<Loaded, Problems> {
    let mut parsed = Vec::new();
    for (file, text) in sources {
        let docs = match yaml::parse_documents(text) {
            Ok(docs) => docs,
            Err(errors) => {
                for e in errors {
                    problems.push(Problem::at(file, e.pos, "", e.message));
                }
                continue;
            }
        };
        for doc in docs {
            if doc.value.is_null() {
                continue; // An empty document, such as a trailing `---`.
            }
            let Some(kind) = document_kind(file, &doc, &mut problems) else {
                continue;
            };
            let shape = schema::check(file, &doc, kind);
            let (checkable, pruned) = if shape.is_empty() {
                (Some(doc.value.clone()), Vec::new())
            } else {
                match prune(kind, &doc.value) {
                    Some((v, pruned)) => (Some(v), pruned),
                    None => (None, Vec::new()),
                }
            };
            problems.extend(shape);
            let name = doc
                .value
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string);
            parsed.push(Parsed {
                file,
                doc,
                kind,
                name,
                checkable,
                pruned,
            });
        }
    }

    // Names of every document with a name, valid or not, so that one broken Fleet does
    // not also make every job using it report an unknown fleet.
    let mut defined: Defined = BTreeMap::new();
    let mut first: HashMap<(Kind, String), (PathBuf, usize)> = HashMap::new();
    for p in &parsed {
        let Some(name) = &p.name else { continue };
        defined.entry(p.kind).or_default().insert(name.clone());
        let at = p.doc.key_pos("/metadata/name");
        match first.get(&(p.kind, name.clone())) {
            Some((file, line)) => problems.push(Problem::at(
                p.file,
                at,
                "/metadata/name",
                format!(
                    "duplicate {} `{name}`, first defined at {}:{line}",
                    p.kind,
                    file.display()
                ),
            )),
            None => {
                first.insert((p.kind, name.clone()), (p.file.to_path_buf(), at.line));
            }
        }
    }

    let mut loaded = Loaded::default();
    for p in parsed {
        let Some(value) = p.checkable else { continue };
        let mut check = Check {
            file: p.file,
            doc: &p.doc,
            problems: &mut problems,
            pruned: &p.pruned,
        };
        if let Some(document) =
            convert_document(&mut check, p.kind, value, ctx, &defined, &mut loaded)
        {
            loaded.documents.push(document);
        }
    }

    if problems.is_empty() {
        return Ok(loaded);
    }
    // Files in the order given, then by position; problems about a file a manifest names
    // (a matrix file) come after the manifests.
    let order: HashMap<&Path, usize> = sources
        .iter()
        .enumerate()
        .map(|(i, (f, _))| (f.as_path(), i))
        .collect();
    problems.sort_by_key(|p| {
        (
            order.get(p.file.as_path()).copied().unwrap_or(usize::MAX),
            p.line,
            p.column,
        )
    });
    Err(Problems(problems))
}

/// Cuts the fields stage 1 objects to out of a document, repeatedly (cutting a required
/// field makes its parent the problem), so that stage 2 can still check the rest and the
/// user sees every problem at once. `None` when a top-level part would have to go.
fn prune(kind: Kind, value: &Value) -> Option<(Value, Vec<String>)> {
    let mut value = value.clone();
    let mut pruned = Vec::new();
    for _ in 0..16 {
        let paths = schema::error_paths(kind, &value);
        if paths.is_empty() {
            return Some((value, pruned));
        }
        for path in paths {
            // Cut whole fields, never single list items: removing an item would shift
            // the pointers (and so the positions) of the items after it.
            let mut field = path.as_str();
            while let Some(i) = field.rfind('/') {
                if field[i + 1..].parse::<usize>().is_ok() {
                    field = &field[..i];
                } else {
                    break;
                }
            }
            if field.matches('/').count() < 2 {
                return None; // `/spec`, `/metadata`, `/kind` or the document itself.
            }
            let (parent, key) = field.rsplit_once('/')?;
            let key = key.replace("~1", "/").replace("~0", "~");
            if let Some(Value::Object(map)) = value.pointer_mut(parent) {
                map.remove(&key);
            }
            pruned.push(field.to_string());
        }
    }
    None
}

fn document_kind(file: &Path, doc: &YamlDocument, problems: &mut Vec<Problem>) -> Option<Kind> {
    let expected = "expected kind `Job`, `Fleet` or `Budget`";
    match &doc.value {
        Value::Object(map) => match map.get("kind") {
            None => {
                problems.push(Problem::at(
                    file,
                    doc.start,
                    "",
                    format!("missing field `kind`, {expected}"),
                ));
                None
            }
            Some(k) => {
                let kind = k.as_str().and_then(Kind::parse);
                if kind.is_none() {
                    problems.push(Problem::at(
                        file,
                        doc.value_pos("/kind"),
                        "/kind",
                        format!("{expected}, found {}", schema::describe_value(k)),
                    ));
                }
                kind
            }
        },
        other => {
            problems.push(Problem::at(
                file,
                doc.start,
                "",
                format!(
                    "expected a mapping with apiVersion, kind, metadata and spec, found {}",
                    schema::describe_value(other)
                ),
            ));
            None
        }
    }
}

/// Collects problems about one document.
struct Check<'a> {
    file: &'a Path,
    doc: &'a YamlDocument,
    problems: &'a mut Vec<Problem>,
    /// Fields cut out after stage 1 problems; checks that depend on them are skipped.
    pruned: &'a [String],
}

impl Check<'_> {
    fn was_pruned(&self, pointer: &str) -> bool {
        self.pruned
            .iter()
            .any(|p| p == pointer || p.starts_with(&format!("{pointer}/")))
    }

    fn count(&self) -> usize {
        self.problems.len()
    }

    /// A problem with the value at `pointer`.
    fn value(&mut self, pointer: &str, message: String) {
        let pos = self.doc.value_pos(pointer);
        self.problems
            .push(Problem::at(self.file, pos, pointer, message));
    }

    /// A problem with the key naming `pointer` (the field as a whole).
    fn key(&mut self, pointer: &str, message: String) {
        let pos = self.doc.key_pos(pointer);
        self.problems
            .push(Problem::at(self.file, pos, pointer, message));
    }

    /// A problem at a line of another file the manifest names.
    fn elsewhere(&mut self, file: &Path, line: usize, pointer: &str, message: String) {
        let pos = Pos { line, column: 1 };
        self.problems.push(Problem::at(file, pos, pointer, message));
    }

    fn duration(&mut self, pointer: &str, text: Option<&str>) -> Option<Duration> {
        match parse_duration(text?) {
            Ok(d) => Some(d),
            Err(message) => {
                self.value(pointer, message);
                None
            }
        }
    }

    fn name(&mut self, what: &str, name: &str) {
        if !is_dns_label(name) {
            self.value("/metadata/name", dns_message(what, name));
        }
    }
}

fn convert_document(
    c: &mut Check<'_>,
    kind: Kind,
    mut value: Value,
    ctx: &Context,
    defined: &Defined,
    loaded: &mut Loaded,
) -> Option<Document> {
    let base = manifest_folder(c.file);
    absolutize(&mut value, kind, &base);
    let origin = Origin {
        file: c.file.to_path_buf(),
        line: c.doc.start.line,
    };
    let before = c.count();
    let name = match kind {
        Kind::Job => {
            let raw: raw::JobManifest = deserialize(c, &value)?;
            let job = convert_job(c, raw, &value, ctx, defined, origin.clone());
            let name = job.name.clone();
            loaded.manifests.jobs.push(job);
            name
        }
        Kind::Fleet => {
            let raw: raw::FleetManifest = deserialize(c, &value)?;
            let fleet = convert_fleet(c, raw, origin.clone());
            let name = fleet.name.clone();
            loaded.manifests.fleets.push(fleet);
            name
        }
        Kind::Budget => {
            let raw: raw::BudgetManifest = deserialize(c, &value)?;
            let budget = convert_budget(c, raw, origin.clone());
            let name = budget.name.clone();
            loaded.manifests.budgets.push(budget);
            name
        }
    };
    if c.count() > before {
        return None;
    }
    match yaml::to_yaml_string(&value) {
        Ok(yaml) => Some(Document {
            kind,
            name,
            origin,
            yaml,
        }),
        Err(e) => {
            c.value("", format!("cannot render the document as YAML: {e}"));
            None
        }
    }
}

fn deserialize<T: serde::de::DeserializeOwned>(c: &mut Check<'_>, value: &Value) -> Option<T> {
    match serde_json::from_value(value.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            // The schema accepted the document, so this is a gap between the schema and
            // the raw types; still report it rather than panic.
            c.value("", format!("invalid document: {e}"));
            None
        }
    }
}

fn convert_job(
    c: &mut Check<'_>,
    raw: raw::JobManifest,
    value: &Value,
    ctx: &Context,
    defined: &Defined,
    origin: Origin,
) -> Job {
    let name = raw.metadata.name;
    c.name("job name", &name);
    let s = raw.spec;

    let source = match s.source {
        None => Source::None,
        Some(raw::Source {
            workdir: Some(w),
            git: None,
        }) => Source::Workdir(PathBuf::from(w)),
        Some(raw::Source {
            workdir: None,
            git: Some(g),
        }) => Source::Git {
            repo: g.repo,
            reference: g.reference,
        },
        Some(_) => {
            c.key(
                "/spec/source",
                "expected exactly one of `workdir` or `git`".to_string(),
            );
            Source::None
        }
    };
    let source_ref = match &source {
        Source::Git { reference, .. } => reference.clone(),
        _ => None,
    };

    let files = s
        .files
        .into_iter()
        .map(|f| FileCopy {
            from: PathBuf::from(f.from),
            to: f.to,
        })
        .collect();

    let mut secrets = Vec::new();
    let mut seen_secrets = BTreeSet::new();
    for (i, secret) in s.secrets.into_iter().enumerate() {
        let pointer = format!("/spec/secrets/{i}");
        if !is_env_name(&secret) {
            c.value(
                &pointer,
                format!("expected a secret name usable as an environment variable (letters, digits and `_`), found {secret:?}"),
            );
        } else if !ctx.secrets.contains(&secret) {
            let known = if ctx.secrets.is_empty() {
                "no secrets are stored".to_string()
            } else {
                format!("stored: {}", list(&ctx.secrets))
            };
            c.value(
                &pointer,
                format!(
                    "unknown secret `{secret}`: expected the name of a stored secret ({known}); \
                     store it with `asimov secret set {secret}`"
                ),
            );
        }
        if !seen_secrets.insert(secret.clone()) {
            c.value(&pointer, format!("secret `{secret}` is listed twice"));
        }
        secrets.push(secret);
    }

    let mut env = BTreeMap::new();
    for (key, v) in s.env {
        let pointer = format!("/spec/env/{}", yaml::escape_pointer_segment(&key));
        if !is_env_name(&key) {
            c.key(
                &pointer,
                format!("expected an environment variable name (letters, digits and `_`, not starting with a digit), found {key:?}"),
            );
        } else if seen_secrets.contains(&key) {
            c.key(
                &pointer,
                format!("`{key}` is also a secret; a variable comes from env or secrets, not both"),
            );
        }
        env.insert(key, v.0);
    }

    let resources = convert_resources(c, s.resources.unwrap_or_default());

    let mut placement = Vec::new();
    for (i, p) in s.placement.into_iter().enumerate() {
        placement.push(convert_placement(c, i, p, ctx, defined));
    }
    if placement.is_empty() {
        placement.push(Placement::local());
    }

    let max_duration = c.duration("/spec/max_duration", s.max_duration.as_deref());

    let retry = convert_retry(c, s.retry);

    let checkpoint = s.checkpoint.map(|cp| Checkpoint {
        every: c.duration("/spec/checkpoint/every", cp.every.as_deref()),
        path: cp.path,
    });

    let artifacts = s.artifacts.map(|a| {
        if let Some(to) = &a.to
            && to.contains("://")
            && !is_s3_url(to)
        {
            c.value(
                "/spec/artifacts/to",
                format!("expected s3://bucket/prefix or a local folder, found {to:?}"),
            );
        }
        // The keys S3 needs are stored secrets, checked like the job's own.
        if let Some(to) = &a.to
            && is_s3_url(to)
        {
            let missing: Vec<&str> = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
                .into_iter()
                .filter(|k| !ctx.secrets.contains(*k))
                .collect();
            if !missing.is_empty() {
                c.value(
                    "/spec/artifacts/to",
                    format!(
                        "s3:// needs the stored secret(s) {}: store them with `asimov secret set NAME`",
                        missing.join(", ")
                    ),
                );
            }
        }
        if let Some(endpoint) = &a.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            c.value(
                "/spec/artifacts/endpoint",
                format!("expected an http(s):// URL, found {endpoint:?}"),
            );
        }
        Artifacts {
            paths: a.paths,
            to: a.to,
            endpoint: a.endpoint,
            region: a.region,
        }
    });

    let stop_when = s
        .stop_when
        .into_iter()
        .map(|r| StopRule {
            metric: r.metric,
            mode: match r.mode {
                raw::MetricMode::Max => MetricMode::Max,
                raw::MetricMode::Min => MetricMode::Min,
            },
            patience: r.patience,
            threshold: r.threshold,
            max_steps: r.max_steps,
        })
        .collect();

    let schedule = s.schedule.map(|sch| convert_schedule(c, sch));

    if let Some(budget) = &s.budget {
        let known = defined.get(&Kind::Budget);
        if !known.is_some_and(|k| k.contains(budget)) && !ctx.budgets.contains(budget) {
            let all: BTreeSet<&String> = known.into_iter().flatten().chain(&ctx.budgets).collect();
            c.value(
                "/spec/budget",
                format!(
                    "unknown budget `{budget}`: {}",
                    expected_names("Budget", &all)
                ),
            );
        }
    }

    // With a malformed matrix (cut out by stage 1, or wrong in meaning), every reference
    // to it would look unknown: those references are not checked then.
    let expanded = expand_matrix(c, s.matrix.as_ref());
    let matrix_ok = expanded.is_some() && !c.was_pruned("/spec/matrix");
    let (matrices, extra_hash) = expanded.unwrap_or_else(|| (vec![BTreeMap::new()], String::new()));
    if matrix_ok {
        check_matrix_refs(c, &s.run, "/spec/run", &matrices);
        for (i, cmd) in s.setup.iter().enumerate() {
            check_matrix_refs(c, cmd, &format!("/spec/setup/{i}"), &matrices);
        }
    }

    let runs: Vec<RunSpec> = matrices
        .iter()
        .enumerate()
        .map(|(i, m)| RunSpec {
            name: format!("{name}-{i}"),
            index: i as u32,
            command: substitute(&s.run, m),
            setup: s.setup.iter().map(|cmd| substitute(cmd, m)).collect(),
            git_ref: m
                .get("branch")
                .filter(|b| !b.is_empty())
                .cloned()
                .or_else(|| source_ref.clone()),
            matrix: m.clone(),
        })
        .collect();
    if let Some(last) = runs.last()
        && last.name.len() > MAX_NAME
        && name.len() <= MAX_NAME
    {
        c.value(
                "/metadata/name",
                format!(
                    "expected a job name short enough for its run names, found {name:?}: run `{}` has {} characters, at most {MAX_NAME} are allowed",
                    last.name,
                    last.name.len()
                ),
            );
    }

    let spec_hash = {
        let mut hasher = Sha256::new();
        // `paused` says whether to run it, not what it is: toggling it neither re-runs
        // a finished run nor lifts an `asimov destroy`.
        let mut spec = value.get("spec").cloned().unwrap_or(Value::Null);
        if let Some(m) = spec.as_object_mut() {
            m.remove("paused");
        }
        hasher.update(canonical_json(&spec).as_bytes());
        // A matrix file is part of what the job means: editing it is editing the job.
        hasher.update(extra_hash.as_bytes());
        hex::encode(hasher.finalize())
    };

    Job {
        name,
        labels: raw.metadata.labels,
        spec: JobSpec {
            source,
            files,
            setup: s.setup,
            run: s.run,
            env,
            secrets,
            resources,
            placement,
            image: s.image,
            max_duration,
            retry,
            checkpoint,
            artifacts,
            stop_when,
            schedule,
            paused: s.paused,
            budget: s.budget,
        },
        runs,
        spec_hash,
        origin,
    }
}

/// The retry policy, defaults filled in; exit codes are checked to be 1..=255 and in at
/// most one of the two lists.
fn convert_retry(c: &mut Check<'_>, r: Option<raw::Retry>) -> RetryPolicy {
    let default = RetryPolicy::default();
    let Some(r) = r else { return default };
    let mut codes = |field: &str, list: &[i64]| -> Vec<i32> {
        let mut out = Vec::new();
        for (i, &code) in list.iter().enumerate() {
            match i32::try_from(code) {
                Ok(v) if (1..=255).contains(&v) => out.push(v),
                _ => c.value(
                    &format!("/spec/retry/{field}/{i}"),
                    format!("expected an exit code from 1 to 255, found {code}"),
                ),
            }
        }
        out
    };
    let on_exit_codes = codes("on_exit_codes", &r.on_exit_codes);
    let never_on_exit_codes = codes("never_on_exit_codes", &r.never_on_exit_codes);
    for (i, code) in r.never_on_exit_codes.iter().enumerate() {
        if r.on_exit_codes.contains(code) {
            c.value(
                &format!("/spec/retry/never_on_exit_codes/{i}"),
                format!("exit code {code} is also in on_exit_codes: a code either restarts or never does"),
            );
        }
    }
    let max_restarts = r.max_restarts.unwrap_or(default.max_restarts);
    RetryPolicy {
        on: r
            .on
            .map(|on| {
                on.into_iter()
                    .map(|o| match o {
                        raw::RetryOn::NoCapacity => RetryOn::NoCapacity,
                        raw::RetryOn::Preemption => RetryOn::Preemption,
                        raw::RetryOn::Error => RetryOn::Error,
                    })
                    .collect()
            })
            .unwrap_or(default.on),
        max_restarts,
        max_preemptions: r.max_preemptions,
        max_errors: r.max_errors,
        max_no_capacity: r.max_no_capacity,
        on_exit_codes,
        never_on_exit_codes,
    }
}

/// `schedule`: RFC 3339 times and an `HH:MM` daily window.
fn convert_schedule(c: &mut Check<'_>, sch: raw::Schedule) -> Schedule {
    let mut time = |field: &str, text: Option<&String>| {
        let text = text?;
        match chrono::DateTime::parse_from_rfc3339(text.trim()) {
            Ok(t) => Some(t.timestamp()),
            Err(_) => {
                c.value(
                    &format!("/spec/schedule/{field}"),
                    format!("expected an RFC 3339 time like 2026-11-23T05:23:00Z, found {text:?}"),
                );
                None
            }
        }
    };
    let at = time("at", sch.at.as_ref());
    let pause_at = time("pause_at", sch.pause_at.as_ref());
    let window = sch.window.and_then(|w| {
        let start = hh_mm(c, "/spec/schedule/window/start", &w.start);
        let end = hh_mm(c, "/spec/schedule/window/end", &w.end);
        let (start, end) = (start?, end?);
        if start == end {
            c.value(
                "/spec/schedule/window/end",
                format!(
                    "expected a window end other than its start, found {:?}",
                    w.end
                ),
            );
            return None;
        }
        Some(Window { start, end })
    });
    Schedule {
        at,
        pause_at,
        window,
    }
}

/// Minutes after midnight of `HH:MM`.
fn hh_mm(c: &mut Check<'_>, pointer: &str, text: &str) -> Option<u32> {
    let parsed = text.trim().split_once(':').and_then(|(h, m)| {
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60 && text.trim().len() == 5).then_some(h * 60 + m)
    });
    if parsed.is_none() {
        c.value(
            pointer,
            format!("expected a time of day in UTC like \"22:00\", found {text:?}"),
        );
    }
    parsed
}

fn is_s3_url(s: &str) -> bool {
    s.strip_prefix("s3://")
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|bucket| !bucket.is_empty())
}

fn convert_resources(c: &mut Check<'_>, r: raw::Resources) -> Resources {
    if let Some(cuda) = &r.cuda {
        let ok = !cuda.0.is_empty()
            && cuda
                .0
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            c.value(
                "/spec/resources/cuda",
                format!("expected a CUDA version like \"12.1\", found {:?}", cuda.0),
            );
        }
    }
    Resources {
        gpu: r.gpu.map(|g| GpuRequest {
            names: g.name.map(|n| n.0).unwrap_or_default(),
            count: g.count,
            min_vram_gb: g.min_vram_gb,
        }),
        disk_gb: r.disk_gb,
        cuda: r.cuda.map(|v| v.0),
        cpus: r.cpus,
        memory_gb: r.memory_gb,
    }
}

fn convert_placement(
    c: &mut Check<'_>,
    i: usize,
    p: raw::Placement,
    ctx: &Context,
    defined: &Defined,
) -> Placement {
    let at = format!("/spec/placement/{i}");
    let provider = match p.provider {
        raw::Provider::Local => ProviderKind::Local,
        raw::Provider::Ssh => ProviderKind::Ssh,
        raw::Provider::Vast => ProviderKind::Vast,
        raw::Provider::Lambda => ProviderKind::Lambda,
        raw::Provider::Runpod => ProviderKind::Runpod,
    };
    match (&p.fleet, provider) {
        (None, ProviderKind::Ssh) => c.value(
            &at,
            "provider ssh needs `fleet`: expected the name of a Fleet whose hosts to use"
                .to_string(),
        ),
        (Some(_), kind) if kind != ProviderKind::Ssh => c.key(
            &format!("{at}/fleet"),
            format!("`fleet` is only used with provider ssh, not {kind}"),
        ),
        (Some(fleet), _) => {
            let known = defined.get(&Kind::Fleet);
            if !known.is_some_and(|k| k.contains(fleet)) && !ctx.fleets.contains(fleet) {
                let all: BTreeSet<&String> =
                    known.into_iter().flatten().chain(&ctx.fleets).collect();
                c.value(
                    &format!("{at}/fleet"),
                    format!("unknown fleet `{fleet}`: {}", expected_names("Fleet", &all)),
                );
            }
        }
        (None, _) => {}
    }
    let lambda_only = |c: &mut Check<'_>, field: &str, set: bool| {
        if set && provider != ProviderKind::Lambda {
            c.key(
                &format!("{at}/{field}"),
                format!(
                    "`{field}` is only used with provider lambda, not {provider} \
                     (vast and runpod instances get asimov's key, and end themselves with their own)"
                ),
            );
        }
    };
    lambda_only(c, "ssh_key", p.ssh_key.is_some());
    lambda_only(c, "identity_file", p.identity_file.is_some());
    lambda_only(c, "terminate_key", p.terminate_key.is_some());
    // Only Vast stops an instance with its disk kept and starts it again later; elsewhere
    // a pause can only release the instance (Lambda has no stop; a fleet host and this
    // machine hold nothing that bills).
    if p.keep_disk_on_pause && provider != ProviderKind::Vast {
        c.key(
            &format!("{at}/keep_disk_on_pause"),
            format!(
                "`keep_disk_on_pause` is only used with provider vast, not {provider}: \
                 asimov keeps no {provider} disk across a pause, it releases the instance"
            ),
        );
    }
    if provider == ProviderKind::Lambda {
        match (&p.ssh_key, &p.identity_file) {
            (Some(_), None) => c.value(
                &at,
                "`ssh_key` needs `identity_file`: the local private key of that account key"
                    .to_string(),
            ),
            (None, Some(_)) => c.key(
                &format!("{at}/identity_file"),
                "`identity_file` needs `ssh_key`: the name of its public key in the Lambda account"
                    .to_string(),
            ),
            _ => {}
        }
        if let Some(key) = &p.terminate_key {
            let pointer = format!("{at}/terminate_key");
            if !is_env_name(key) {
                c.value(
                    &pointer,
                    format!("expected the name of a stored secret (letters, digits and `_`), found {key:?}"),
                );
            } else if !ctx.secrets.contains(key) {
                c.value(
                    &pointer,
                    format!(
                        "unknown secret `{key}`: store the separate Lambda API key the instance ends itself with by `asimov secret set {key}`"
                    ),
                );
            }
        }
    }
    check_cloud_options(c, &at, provider, &p);
    Placement {
        provider,
        fleet: p.fleet,
        instance_types: p.instance_types,
        regions: p.regions,
        max_price_per_hour: p.max_price_per_hour,
        premium_pct: p.premium_pct,
        filters: p.filters.into_iter().map(|(k, v)| (k, v.0)).collect(),
        spot: p.spot,
        ssh_user: p.ssh_user,
        keys: PlacementKeys {
            ssh_key: p.ssh_key,
            identity_file: p.identity_file.map(PathBuf::from),
            terminate_key: p.terminate_key,
        },
        keep_disk_on_pause: p.keep_disk_on_pause,
    }
}

/// `spot` and `filters` where a cloud has no such thing are refused, not ignored: a typo
/// or a wish asimov cannot grant would otherwise rent something else than was asked
/// (providers.md: RunPod's REST API knows `SECURE` and `COMMUNITY` clouds and no
/// interruptible pods; Lambda has no spot and no offer filters).
fn check_cloud_options(c: &mut Check<'_>, at: &str, provider: ProviderKind, p: &raw::Placement) {
    match provider {
        ProviderKind::Runpod => {
            if p.spot {
                c.value(
                    &format!("{at}/spot"),
                    "`spot: true` is not supported with provider runpod: asimov rents on-demand \
                     pods through RunPod's REST API, which has no interruptible pods (only its \
                     GraphQL and deprecated v1 APIs do); remove it, or bid on vast"
                        .to_string(),
                );
            }
            for (key, value) in &p.filters {
                let pointer = format!("{at}/filters/{}", yaml::escape_pointer_segment(key));
                if key != "cloud" {
                    c.key(
                        &pointer,
                        format!("unknown filter `{key}` for provider runpod: expected `cloud`"),
                    );
                } else if !["secure", "community"]
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case(&value.0))
                {
                    c.value(
                        &pointer,
                        format!(
                            "expected `secure` or `community` (RunPod's Secure or Community Cloud), found {:?}",
                            value.0
                        ),
                    );
                }
            }
        }
        ProviderKind::Lambda => {
            if p.spot {
                c.value(
                    &format!("{at}/spot"),
                    "`spot: true` is not supported with provider lambda: Lambda Cloud has no \
                     spot or interruptible instances"
                        .to_string(),
                );
            }
            if !p.filters.is_empty() {
                c.key(
                    &format!("{at}/filters"),
                    "`filters` are not used with provider lambda: choose with `instance_types` \
                     and `regions`"
                        .to_string(),
                );
            }
        }
        _ => {}
    }
}

fn expected_names(kind: &str, names: &BTreeSet<&String>) -> String {
    if names.is_empty() {
        format!("expected the name of a {kind}, and none is defined")
    } else {
        format!("expected one of {}", list(names.iter().copied()))
    }
}

fn list<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    names
        .into_iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The matrix values of every run, in run order, and text to fold into the spec hash.
/// `None` when the matrix itself has problems (already reported): its keys are then
/// unknown, and checking `${matrix.KEY}` against them would only add false problems.
fn expand_matrix(
    c: &mut Check<'_>,
    matrix: Option<&raw::Matrix>,
) -> Option<(Vec<BTreeMap<String, String>>, String)> {
    let Some(matrix) = matrix else {
        return Some((vec![BTreeMap::new()], String::new()));
    };
    match &matrix.file {
        Some(file) => {
            if !matrix.lists.is_empty() {
                c.key(
                    "/spec/matrix/file",
                    "expected either `file` or named lists in a matrix, not both".to_string(),
                );
            }
            let runs = read_runs_file(c, Path::new(file))?;
            let extra = canonical_json(&serde_json::to_value(&runs).unwrap_or(Value::Null));
            Some((runs, extra))
        }
        None => {
            let mut ok = true;
            for key in matrix.lists.keys() {
                if !is_env_name(key) {
                    ok = false;
                    c.key(
                        &format!("/spec/matrix/{}", yaml::escape_pointer_segment(key)),
                        format!("expected a matrix key of letters, digits and `_`, found {key:?}"),
                    );
                }
            }
            let total = matrix
                .lists
                .values()
                .try_fold(1usize, |acc, l| acc.checked_mul(l.len()));
            match total {
                Some(n) if n <= MAX_RUNS => {}
                _ => {
                    let made =
                        total.map_or("more than can be counted".to_string(), |n| n.to_string());
                    c.key(
                        "/spec/matrix",
                        format!("expected at most {MAX_RUNS} runs, the matrix makes {made}"),
                    );
                    ok = false;
                }
            }
            if !ok {
                return None;
            }
            Some((cartesian(&matrix.lists), String::new()))
        }
    }
}

/// Every combination, the first key (in sorted order) varying slowest.
fn cartesian(lists: &BTreeMap<String, Vec<raw::Scalar>>) -> Vec<BTreeMap<String, String>> {
    let mut runs = vec![BTreeMap::new()];
    for (key, values) in lists {
        let mut next = Vec::with_capacity(runs.len() * values.len());
        for run in &runs {
            for v in values {
                let mut r = run.clone();
                r.insert(key.clone(), v.0.clone());
                next.push(r);
            }
        }
        runs = next;
    }
    runs
}

fn read_runs_file(c: &mut Check<'_>, file: &Path) -> Option<Vec<BTreeMap<String, String>>> {
    let pointer = "/spec/matrix/file";
    let text = match super::read_text(file) {
        Ok(t) => t,
        Err(e) => {
            let at = e
                .pos
                .map(|p| format!(" (line {} column {})", p.line, p.column));
            c.value(
                pointer,
                format!(
                    "cannot read matrix file {}{}: {}",
                    file.display(),
                    at.unwrap_or_default(),
                    e.message
                ),
            );
            return None;
        }
    };
    let mut runs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let (config, branch) = match fields.as_slice() {
            [config] => (*config, ""),
            [config, branch] => (*config, *branch),
            _ => {
                c.elsewhere(
                    file,
                    i + 1,
                    pointer,
                    format!("expected a `config,branch` line, found {line:?}"),
                );
                continue;
            }
        };
        if config.is_empty() {
            c.elsewhere(
                file,
                i + 1,
                pointer,
                format!("expected a config before the comma, found {line:?}"),
            );
            continue;
        }
        runs.push(BTreeMap::from([
            ("branch".to_string(), branch.to_string()),
            ("config".to_string(), config.to_string()),
        ]));
    }
    if runs.is_empty() {
        c.value(
            pointer,
            format!(
                "expected at least one `config,branch` line in {}",
                file.display()
            ),
        );
        return None;
    }
    if runs.len() > MAX_RUNS {
        c.value(
            pointer,
            format!(
                "expected at most {MAX_RUNS} runs, {} has {}",
                file.display(),
                runs.len()
            ),
        );
    }
    Some(runs)
}

const MATRIX_REF: &str = "${matrix.";

/// Every `${matrix.KEY}` in a command must name a key of the matrix.
fn check_matrix_refs(
    c: &mut Check<'_>,
    text: &str,
    pointer: &str,
    matrices: &[BTreeMap<String, String>],
) {
    let keys: BTreeSet<&String> = matrices.iter().flat_map(|m| m.keys()).collect();
    let mut rest = text;
    while let Some(start) = rest.find(MATRIX_REF) {
        let after = &rest[start + MATRIX_REF.len()..];
        let Some(end) = after.find('}') else {
            c.value(
                pointer,
                format!("expected `}}` to close `{MATRIX_REF}` in {text:?}"),
            );
            return;
        };
        let key = &after[..end];
        if !keys.contains(&key.to_string()) {
            let expected = if keys.is_empty() {
                "the job has no matrix".to_string()
            } else {
                format!("expected one of {}", list(keys.iter().copied()))
            };
            c.value(
                pointer,
                format!("`${{matrix.{key}}}` names no matrix key: {expected}"),
            );
        }
        rest = &after[end + 1..];
    }
}

fn substitute(text: &str, matrix: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (k, v) in matrix {
        out = out.replace(&format!("${{matrix.{k}}}"), v);
    }
    out
}

fn convert_fleet(c: &mut Check<'_>, raw: raw::FleetManifest, origin: Origin) -> Fleet {
    let name = raw.metadata.name;
    c.name("fleet name", &name);
    let mut hosts = Vec::new();
    let mut seen = HashMap::new();
    for (i, h) in raw.spec.hosts.into_iter().enumerate() {
        let at = format!("/spec/hosts/{i}");
        let host_name = match h.name {
            Some(n) => {
                if !is_dns_label(&n) {
                    c.value(&format!("{at}/name"), dns_message("host name", &n));
                }
                n
            }
            None => h.address.clone(),
        };
        if let Some(first) = seen.insert(host_name.clone(), i) {
            c.value(
                &at,
                format!("duplicate host `{host_name}`, first at /spec/hosts/{first}; give each host a distinct `name`"),
            );
        }
        let identity_file = h.identity_file.map(PathBuf::from);
        let proxy_jump = h
            .proxy_jump
            .as_deref()
            .and_then(|jump| match parse_proxy_jump(jump) {
                Ok((user, address, port)) => Some(ProxyJump {
                    user,
                    address,
                    port,
                    identity_file: h
                        .proxy_jump_identity_file
                        .clone()
                        .map(PathBuf::from)
                        .or_else(|| identity_file.clone()),
                }),
                Err(message) => {
                    c.value(&format!("{at}/proxy_jump"), message);
                    None
                }
            });
        if h.proxy_jump.is_none() && h.proxy_jump_identity_file.is_some() {
            c.value(
                &format!("{at}/proxy_jump_identity_file"),
                "`proxy_jump_identity_file` needs a `proxy_jump`".to_string(),
            );
        }
        hosts.push(Host {
            name: host_name,
            user: h.user,
            address: h.address,
            port: h.port,
            identity_file,
            proxy_jump,
            gpus: h.gpus,
            labels: h.labels,
        });
    }
    Fleet {
        name,
        labels: raw.metadata.labels,
        hosts,
        origin,
    }
}

/// `[user@]host[:port]`, as `ssh -J` takes it (`[::1]:22` for an IPv6 address).
fn parse_proxy_jump(text: &str) -> Result<(Option<String>, String, u16), String> {
    let bad = |why: &str| format!("expected `[user@]host[:port]`, found `{text}`: {why}");
    if text.contains(',') {
        return Err(bad("one bastion only"));
    }
    if text.chars().any(char::is_whitespace) {
        return Err(bad("no spaces"));
    }
    let (user, rest) = match text.rsplit_once('@') {
        Some(("", _)) => return Err(bad("empty user")),
        Some((user, rest)) => (Some(user.to_string()), rest),
        None => (None, text),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        match inner.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, port)) => match port.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad("junk after `]`")),
            },
            None => return Err(bad("unclosed `[`")),
        }
    } else {
        match rest.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err(bad("write an IPv6 address as `[addr]:port`"));
            }
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port = match port {
        None => 22,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad("the port is a number from 1 to 65535")),
        },
    };
    Ok((user, host.to_string(), port))
}

#[cfg(test)]
mod proxy_jump_tests {
    use super::parse_proxy_jump;

    #[test]
    fn proxy_jump_parses_like_ssh_dash_j() {
        let ok = |s: &str| parse_proxy_jump(s).unwrap();
        assert_eq!(ok("bastion"), (None, "bastion".into(), 22));
        assert_eq!(
            ok("al@bastion:2222"),
            (Some("al".into()), "bastion".into(), 2222)
        );
        assert_eq!(ok("[::1]:2200"), (None, "::1".into(), 2200));
        assert_eq!(
            ok("al@[fe80::1]"),
            (Some("al".into()), "fe80::1".into(), 22)
        );
        for bad in [
            "", "@h", "h:0", "h:x", "h:70000", "a,b", "::1", "[::1", "[::1]x", "a b",
        ] {
            assert!(parse_proxy_jump(bad).is_err(), "{bad:?} should be refused");
        }
    }
}

fn convert_budget(c: &mut Check<'_>, raw: raw::BudgetManifest, origin: Origin) -> Budget {
    let name = raw.metadata.name;
    c.name("budget name", &name);
    let s = raw.spec;
    if s.limit_usd <= 0.0 {
        c.value(
            "/spec/limit_usd",
            format!("expected a limit above 0, found {}", s.limit_usd),
        );
    }
    Budget {
        name,
        labels: raw.metadata.labels,
        limit_usd: s.limit_usd,
        period: c.duration("/spec/period", s.period.as_deref()),
        selector: s.selector,
        action: match s.action {
            raw::BudgetAction::Block => BudgetAction::Block,
            raw::BudgetAction::Stop => BudgetAction::Stop,
        },
        origin,
    }
}

/// JSON with object keys sorted, so equal values hash equally.
fn canonical_json(value: &Value) -> String {
    // serde_json's map is a BTreeMap (no `preserve_order`), so keys serialize sorted; the
    // test `spec_hash_ignores_key_order` keeps that assumption honest.
    serde_json::to_string(value).unwrap_or_default()
}

fn manifest_folder(file: &Path) -> PathBuf {
    let parent = file.parent().filter(|p| !p.as_os_str().is_empty());
    let folder = parent.unwrap_or(Path::new("."));
    normalize(&std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf()))
}

/// Rewrites local paths in a document to absolute ones, `~` expanded.
fn absolutize(value: &mut Value, kind: Kind, base: &Path) {
    let fix = |v: Option<&mut Value>, skip_urls: bool| {
        if let Some(Value::String(s)) = v {
            if skip_urls && s.contains("://") {
                return;
            }
            *s = local_path(base, s).to_string_lossy().into_owned();
        }
    };
    match kind {
        Kind::Job => {
            fix(value.pointer_mut("/spec/source/workdir"), false);
            fix(value.pointer_mut("/spec/matrix/file"), false);
            fix(value.pointer_mut("/spec/artifacts/to"), true);
            if let Some(Value::Array(files)) = value.pointer_mut("/spec/files") {
                for f in files {
                    fix(f.get_mut("from"), false);
                }
            }
            if let Some(Value::Array(placements)) = value.pointer_mut("/spec/placement") {
                for p in placements {
                    fix(p.get_mut("identity_file"), false);
                }
            }
        }
        Kind::Fleet => {
            if let Some(Value::Array(hosts)) = value.pointer_mut("/spec/hosts") {
                for h in hosts {
                    fix(h.get_mut("identity_file"), false);
                    fix(h.get_mut("proxy_jump_identity_file"), false);
                }
            }
        }
        Kind::Budget => {}
    }
}

/// A local path from a manifest: `~` expanded, relative to the manifest's folder.
fn local_path(base: &Path, s: &str) -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let expanded = match (s.strip_prefix('~'), home) {
        (Some(""), Some(h)) => h,
        (Some(rest), Some(h)) if rest.starts_with('/') => h.join(rest.trim_start_matches('/')),
        _ => PathBuf::from(s),
    };
    normalize(&base.join(expanded))
}

/// Removes `.` and resolves `..` without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("43h"), Ok(Duration::from_secs(43 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2days"), Ok(Duration::from_secs(2 * 86400)));
        assert_eq!(
            parse_duration("forever"),
            Err("expected a duration like 30m or 43h, found \"forever\"".to_string())
        );
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("10years"), Ok(MAX_DURATION));
        for huge in [
            "10years 1s",
            "3000000000000000h",
            "99999999999999999999999h",
        ] {
            assert_eq!(
                parse_duration(huge),
                Err(format!(
                    "expected a duration of at most 10years, found {huge:?}"
                ))
            );
        }
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "swag-train", "x1", "1x", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn cartesian_is_sorted_by_key_and_keeps_value_order() {
        let lists = BTreeMap::from([
            (
                "config".to_string(),
                vec![raw::Scalar("b.yaml".into()), raw::Scalar("a.yaml".into())],
            ),
            (
                "branch".to_string(),
                vec![raw::Scalar("main".into()), raw::Scalar("exp".into())],
            ),
        ]);
        let runs: Vec<String> = cartesian(&lists)
            .iter()
            .map(|m| format!("{}+{}", m["branch"], m["config"]))
            .collect();
        assert_eq!(
            runs,
            ["main+b.yaml", "main+a.yaml", "exp+b.yaml", "exp+a.yaml"]
        );
    }

    #[test]
    fn local_paths() {
        let base = Path::new("/m/jobs");
        assert_eq!(local_path(base, "."), PathBuf::from("/m/jobs"));
        assert_eq!(local_path(base, "../data/x"), PathBuf::from("/m/data/x"));
        assert_eq!(local_path(base, "/abs/./y"), PathBuf::from("/abs/y"));
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(
                local_path(base, "~/.tmux.conf"),
                Path::new(&home).join(".tmux.conf")
            );
        }
    }

    #[test]
    fn substitution() {
        let m = BTreeMap::from([("config".to_string(), "a.yaml".to_string())]);
        assert_eq!(
            substitute("train --config ${matrix.config} ${HOME}", &m),
            "train --config a.yaml ${HOME}"
        );
    }
}
