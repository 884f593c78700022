//! Raw manifest types: a faithful mirror of the YAML, with serde rejecting unknown fields
//! and schemars turning the doc comments into the JSON Schemas in `schemas/`. Nothing
//! here is validated beyond shape; `convert` turns these into the `desired` types.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// The only manifest API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ApiVersion {
    #[serde(rename = "asimov/v1")]
    V1,
}

/// The kind tag of a Job manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JobKind {
    Job,
}

/// The kind tag of a Fleet manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FleetKind {
    Fleet,
}

/// The kind tag of a Budget manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BudgetKind {
    Budget,
}

/// Name and labels of an object.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Name of the object: a DNS label (lowercase letters, digits and `-`, at most 63
    /// characters, starting and ending with a letter or digit). A job's runs are named
    /// `<name>-<index>` and must fit in 63 characters too.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Free-form labels; budgets select jobs by them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A Job: what to run, and under which constraints. One job expands into one run per
/// matrix combination.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "asimov Job")]
pub struct JobManifest {
    /// Always `asimov/v1`.
    pub api_version: ApiVersion,
    /// Always `Job`.
    pub kind: JobKind,
    pub metadata: Metadata,
    pub spec: JobSpec,
}

/// A Fleet: a fixed pool of SSH hosts that jobs with an `ssh` placement run on.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "asimov Fleet")]
pub struct FleetManifest {
    /// Always `asimov/v1`.
    pub api_version: ApiVersion,
    /// Always `Fleet`.
    pub kind: FleetKind,
    pub metadata: Metadata,
    pub spec: FleetSpec,
}

/// A Budget: a spending limit over a period for the jobs it selects.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "asimov Budget")]
pub struct BudgetManifest {
    /// Always `asimov/v1`.
    pub api_version: ApiVersion,
    /// Always `Budget`.
    pub kind: BudgetKind,
    pub metadata: Metadata,
    pub spec: BudgetSpec,
}

/// What a job runs and where.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The code to run: a local folder (`workdir`) uploaded to the instance, or a git
    /// repository cloned there. The commit and uncommitted diff are recorded per run.
    #[serde(default)]
    pub source: Option<Source>,
    /// Extra local files copied to the instance before setup.
    #[serde(default)]
    pub files: Vec<FileCopy>,
    /// Shell commands run once on the instance, in order, before `run`. May use
    /// `${matrix.KEY}`.
    #[serde(default)]
    pub setup: Vec<String>,
    /// The shell command that is the job. May use `${matrix.KEY}`. Progress is read from
    /// its output: tqdm-style `n/total` bars or `ASIMOV_PROGRESS n/total` lines.
    #[schemars(length(min = 1))]
    pub run: String,
    /// Environment variables for setup and run.
    #[serde(default)]
    pub env: BTreeMap<String, Scalar>,
    /// Names of secrets from the credential store, given to the job as environment
    /// variables of the same name (read from a 0600 file, never on a command line).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Runs to expand the job into: named lists whose cartesian product gives one run per
    /// combination (`{config: [a.yaml, b.yaml], branch: [main, exp]}`), or
    /// `{file: runs.txt}`, a text file of `config,branch` lines (one run per line; a blank
    /// branch means the source's ref; blank lines and `#` comments are skipped).
    #[serde(default)]
    pub matrix: Option<Matrix>,
    /// What the machine must have.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Where the job may run, tried in order and looping back while none has capacity.
    /// Defaults to the local machine.
    #[serde(default)]
    pub placement: Vec<Placement>,
    /// Container image to run in, on providers that start containers.
    #[serde(default)]
    pub image: Option<String>,
    /// Longest a run may take, like `43h` or `1h30m`; enforced on the machine itself.
    #[serde(default)]
    pub max_duration: Option<String>,
    /// When a failed attempt is followed by another one.
    #[serde(default)]
    pub retry: Option<Retry>,
    /// Where the job writes checkpoints; synced back and restored on a new attempt.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// Outputs to bring back when a run ends.
    #[serde(default)]
    pub artifacts: Option<Artifacts>,
    /// Stop a run early when a metric stops improving.
    #[serde(default)]
    pub stop_when: Vec<StopRule>,
    /// When to start, pause and run: a start time, a pause time, a daily window.
    #[serde(default)]
    pub schedule: Option<Schedule>,
    /// Keep the job's runs paused (checkpoint synced, no instance) while true; removing
    /// it (or `false`) resumes them from their checkpoint.
    #[serde(default)]
    pub paused: bool,
    /// Name of the Budget this job's spending counts against.
    #[serde(default)]
    pub budget: Option<String>,
}

/// Exactly one of `workdir` or `git`.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// A local folder, relative to the manifest's folder; `~` is expanded. Uploaded
    /// respecting `.gitignore`.
    #[serde(default)]
    pub workdir: Option<String>,
    /// A git repository cloned on the instance.
    #[serde(default)]
    pub git: Option<GitSource>,
}

/// A git repository and the ref to check out.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    /// Clone URL, like `https://github.com/org/repo` or `git@github.com:org/repo.git`.
    #[schemars(length(min = 1))]
    pub repo: String,
    /// Branch, tag or commit; the remote's default branch when absent. A matrix `branch`
    /// overrides it per run.
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
}

/// A local file copied to the instance.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileCopy {
    /// Local path, relative to the manifest's folder; `~` is expanded.
    #[schemars(length(min = 1))]
    pub from: String,
    /// Path on the instance; `~` is the instance user's home.
    #[schemars(length(min = 1))]
    pub to: String,
}

/// Matrix of runs: see `JobSpec.matrix`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matrix {
    /// A `config,branch` file, relative to the manifest's folder.
    pub file: Option<String>,
    /// Named lists, keys sorted; values in written order.
    pub lists: BTreeMap<String, Vec<Scalar>>,
}

impl<'de> Deserialize<'de> for Matrix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Entry {
            List(Vec<Scalar>),
            File(String),
        }
        let entries = BTreeMap::<String, Entry>::deserialize(d)?;
        let mut matrix = Matrix::default();
        for (key, entry) in entries {
            match (key.as_str(), entry) {
                ("file", Entry::File(f)) => matrix.file = Some(f),
                ("file", Entry::List(_)) => {
                    return Err(de::Error::custom("matrix `file` must be a file name"));
                }
                (_, Entry::List(l)) => {
                    matrix.lists.insert(key, l);
                }
                (_, Entry::File(_)) => {
                    return Err(de::Error::custom(format!(
                        "matrix `{key}` must be a list of values"
                    )));
                }
            }
        }
        Ok(matrix)
    }
}

impl JsonSchema for Matrix {
    fn schema_name() -> Cow<'static, str> {
        "Matrix".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Named lists of values whose cartesian product gives the runs, or `file`: a text file of `config,branch` lines.",
            "type": "object",
            "properties": {
                "file": {
                    "description": "A text file of `config,branch` lines, relative to the manifest's folder: one run per line, a blank branch means the source's ref, blank lines and `#` comments are skipped.",
                    "type": "string"
                }
            },
            "additionalProperties": {
                "description": "Values of this matrix key, used as `${matrix.KEY}`.",
                "type": "array",
                "items": {"type": ["string", "number", "boolean"]},
                "minItems": 1
            }
        })
    }
}

/// A string, number or boolean, kept as text (`OMP_NUM_THREADS: 4`, `lr: [1e-4, 3e-4]`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}

impl Serialize for Scalar {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl JsonSchema for Scalar {
    fn schema_name() -> Cow<'static, str> {
        "Scalar".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": ["string", "number", "boolean"]})
    }
}

/// One name or a list of names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Shape::deserialize(d)? {
            Shape::One(s) => OneOrMany(vec![s]),
            Shape::Many(v) => OneOrMany(v),
        })
    }
}

impl JsonSchema for OneOrMany {
    fn schema_name() -> Cow<'static, str> {
        "OneOrMany".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": ["string", "array"], "items": {"type": "string"}})
    }
}

/// Machine requirements.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs the machine must have; none when absent.
    #[serde(default)]
    pub gpu: Option<Gpu>,
    /// Free disk space in GB.
    #[serde(default)]
    pub disk_gb: Option<u32>,
    /// Minimum CUDA version, like `"12.1"` (quote it to keep trailing zeros).
    #[serde(default)]
    pub cuda: Option<Scalar>,
    /// Minimum CPU cores.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Minimum memory in GB.
    #[serde(default)]
    pub memory_gb: Option<u32>,
}

fn one() -> u32 {
    1
}

/// GPU requirements.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Acceptable GPU models in order of preference (`H100` or `[H100, A100]`); any when
    /// absent.
    #[serde(default)]
    pub name: Option<OneOrMany>,
    /// Number of GPUs, at least 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub count: u32,
    /// Minimum memory per GPU in GB.
    #[serde(default)]
    pub min_vram_gb: Option<u32>,
}

/// A provider backend: `local` (this machine, the default), `ssh` (the hosts of a
/// Fleet), `vast` (Vast.ai offers), `lambda` (Lambda Cloud) or `runpod` (RunPod pods).
/// The in-process fake is not one: it is a test and benchmark double, which tests and
/// `asimov bench` place runs on by building a `manifest::Placement` in code.
// Variants carry no doc comments: with them schemars writes a `oneOf` of constants,
// whose validation error cannot say which values were expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Local,
    Ssh,
    Vast,
    Lambda,
    Runpod,
}

/// One place a job may run.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// The provider to ask.
    pub provider: Provider,
    /// For `ssh`: the Fleet whose hosts the run may use (required there).
    #[serde(default)]
    pub fleet: Option<String>,
    /// Instance types to try, first to last (Lambda `gpu_1x_h100_pcie`, ...).
    #[serde(default)]
    pub instance_types: Vec<String>,
    /// Regions to accept; any when empty.
    #[serde(default)]
    pub regions: Vec<String>,
    /// Highest acceptable price per hour in USD.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_price_per_hour: Option<f64>,
    /// Bid this many percent over the offer's current price (Vast).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub premium_pct: Option<f64>,
    /// Offer filters as written, like `reliability: ">=0.98"` or `dph_total: "<=2"`.
    #[serde(default)]
    pub filters: BTreeMap<String, Scalar>,
    /// Accept interruptible (spot/bid) instances.
    #[serde(default)]
    pub spot: bool,
    /// Log in to the instance as this user instead of the provider's default (Vast and
    /// RunPod `root`, Lambda `ubuntu`): for custom images.
    #[serde(default)]
    pub ssh_user: Option<String>,
    /// Lambda: launch with this SSH key of the account (its name in Lambda's console)
    /// instead of asimov's own; needs `identity_file`.
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// Lambda: the local private key of `ssh_key`.
    #[serde(default)]
    pub identity_file: Option<String>,
    /// Lambda: the name of a stored secret (`asimov secret set NAME`) holding a separate
    /// Lambda API key, made for this and revocable on its own. It is handed to the
    /// instance in a 0600 file so that the instance terminates itself after the final
    /// sync, also when the controller is down.
    #[serde(default)]
    pub terminate_key: Option<String>,
    /// Vast: on pause, stop the instance and keep its disk (it bills storage only, at the
    /// offer's `storage_cost`) instead of destroying it, so `asimov resume` restarts the
    /// job on the same disk without copying its data again. When the stopped instance
    /// cannot start again (its GPUs rented meanwhile) it is destroyed and the run
    /// resumes on a new instance from its synced checkpoint.
    #[serde(default)]
    pub keep_disk_on_pause: bool,
}

/// A reason to start another attempt: `no-capacity` (no placement had capacity),
/// `preemption` (the instance was lost: preempted, died, stopped answering) or `error`
/// (the run command exited non-zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    NoCapacity,
    Preemption,
    Error,
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Reasons that start another attempt; default `[no-capacity, preemption]`.
    #[serde(default)]
    pub on: Option<Vec<RetryOn>>,
    /// Further attempts after the first for preemptions and errors together; default 3,
    /// 0 never restarts.
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// At most this many restarts after a preemption (or a lost host); default
    /// `max_restarts`.
    #[serde(default)]
    pub max_preemptions: Option<u32>,
    /// At most this many restarts after the run command failed; default `max_restarts`.
    #[serde(default)]
    pub max_errors: Option<u32>,
    /// At most this many tries after no placement had capacity; default unlimited (with
    /// backoff).
    #[serde(default)]
    pub max_no_capacity: Option<u32>,
    /// Exit codes that restart the run (as an `error`), even when `on` lacks `error`;
    /// when given, other codes do not restart.
    #[serde(default)]
    pub on_exit_codes: Vec<i64>,
    /// Exit codes that never restart the run, whatever `on` says.
    #[serde(default)]
    pub never_on_exit_codes: Vec<i64>,
}

/// Checkpoints to keep across attempts.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Folder on the instance where the job writes checkpoints.
    #[schemars(length(min = 1))]
    pub path: String,
    /// How often to sync it back, like `30m`.
    #[serde(default)]
    pub every: Option<String>,
}

/// Outputs to bring back.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifacts {
    /// Paths on the instance.
    #[schemars(length(min = 1))]
    pub paths: Vec<String>,
    /// `s3://bucket/prefix` or a local folder (relative to the manifest's folder; `~`
    /// expanded); default `$ASIMOV_HOME/artifacts/<run>/`. With S3, outputs go to
    /// `s3://bucket/prefix/<run>/` and checkpoints under its `_checkpoints/`; the keys
    /// are the secrets `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub to: Option<String>,
    /// S3 endpoint URL for an S3-compatible store (`http://127.0.0.1:9000`); default
    /// `ASIMOV_S3_ENDPOINT_URL`, else AWS's endpoint of the region.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// S3 region; default `ASIMOV_S3_REGION`, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
}

/// Whether larger or smaller metric values are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MetricMode {
    Max,
    Min,
}

/// Stop a run early on its metrics (JSON lines the job writes to `ASIMOV_METRICS`):
/// always when `metric` is NaN or infinite, and when any of `patience`, `threshold` or
/// `max_steps` says so. The run ends with reason EarlyStopped after its final sync.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRule {
    /// Metric name as written by the job to its metrics file (`val_acc`).
    #[schemars(length(min = 1))]
    pub metric: String,
    /// `max` if larger is better, `min` if smaller is.
    pub mode: MetricMode,
    /// Reports without improvement before stopping, at least 1.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub patience: Option<u32>,
    /// Stop once `metric` reaches this value (`>=` for `max`, `<=` for `min`).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Stop once the metrics' `step` field reaches this.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_steps: Option<u64>,
}

/// When a job's runs start, pause and run.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Start no earlier than this RFC 3339 time, like `2026-11-23T05:23:00Z`.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub at: Option<String>,
    /// Pause the runs at this RFC 3339 time (checkpoint synced, instance released) until
    /// `asimov resume`.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub pause_at: Option<String>,
    /// Run only inside this daily window (UTC), paused outside it and resumed from the
    /// checkpoint when it opens again.
    #[serde(default)]
    pub window: Option<Window>,
}

/// A daily window in UTC, `start` to `end` (`22:00` to `06:00` spans midnight).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// `HH:MM`, UTC.
    #[schemars(length(min = 1))]
    pub start: String,
    /// `HH:MM`, UTC.
    #[schemars(length(min = 1))]
    pub end: String,
}

/// The hosts of a fleet.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    /// The machines, at least one.
    #[schemars(length(min = 1))]
    pub hosts: Vec<Host>,
}

fn ssh_port() -> u16 {
    22
}

/// One SSH host.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Short name (a DNS label); defaults to the address.
    #[serde(default)]
    pub name: Option<String>,
    /// Login user; the SSH default when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Host name or IP address.
    #[schemars(length(min = 1))]
    pub address: String,
    /// SSH port.
    #[serde(default = "ssh_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Private key file, relative to the manifest's folder; `~` is expanded.
    #[serde(default)]
    pub identity_file: Option<String>,
    /// A bastion the host is reached through, as OpenSSH's `ProxyJump`:
    /// `[user@]host[:port]` (port 22, and the local user, when absent). Its host key
    /// is pinned on first use like the host's own.
    #[serde(default)]
    #[schemars(length(min = 1))]
    pub proxy_jump: Option<String>,
    /// Private key for the bastion, relative to the manifest's folder; `~` is expanded.
    /// Defaults to `identity_file`.
    #[serde(default)]
    pub proxy_jump_identity_file: Option<String>,
    /// Number of GPUs on the host; jobs needing more are not placed there.
    #[serde(default)]
    pub gpus: u32,
    /// Labels of the host.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What happens when a budget is spent: `block` (no new attempts start; running ones
/// finish) or `stop` (running attempts are stopped too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    #[default]
    Block,
    Stop,
}

/// A spending limit.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// Limit in USD, more than 0.
    #[schemars(range(min = 0))]
    pub limit_usd: f64,
    /// Length of the rolling window, like `24h` or `30days`; for ever when absent.
    #[serde(default)]
    pub period: Option<String>,
    /// Jobs whose labels include all of these count against the budget, as do jobs
    /// naming it in `spec.budget`.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// `block` (default) or `stop`.
    #[serde(default)]
    pub action: BudgetAction,
}
