//! The `vast` provider: Vast.ai's REST API (`shared/providers.md` §1) over reqwest with
//! rustls and timeouts, and the instances it rents reached over the pooled OpenSSH
//! transport.
//!
//! - **Where**: `ASIMOV_VAST_API_URL` (the host; the `/api/v0/...` paths are ours), else
//!   `https://console.vast.ai`. **Key**: `VAST_API_KEY` from the credential store, else
//!   from this process's environment (a foreground controller); without one the
//!   provider is not built.
//! - **Ownership**: the tag is the instance's `label`, set in the create call itself.
//!   `list` pages through `GET /api/v1/instances/` (the v0 listing answers 410) and keeps
//!   the instances whose label parses as an asimov tag.
//! - **Renting**: offers are searched with the job's resources and the placement's
//!   filters in Vast's names and units (MB of VRAM, GPU names with spaces), the cheapest
//!   that fits is bought, and an offer taken in between (404/410 `no_such_ask`) moves on
//!   to the next. `spot` bids `premium_pct` over the offer's `min_bid`.
//! - **Errors**: every response goes through `classify`, once, into the canonical kinds:
//!   `success:false` inside HTTP 200, plain-text 429s without Retry-After, nginx HTML
//!   5xx pages, `no_such_instance` as gone. A create that fails yet names a
//!   `new_contract` returns that instance (it exists and bills; the planner ends it).
//! - **Retries and pacing**: 429/5xx of idempotent calls are retried in place through
//!   `retry::retry_transient`; a create only after a 429 (a 5xx may have created: the
//!   planner adopts by tag instead). Calls keep Vast's documented per-endpoint gaps,
//!   shared by every run of this process (`ASIMOV_VAST_PACING` scales them).
//! - **SSH**: asimov's own ed25519 key (`$ASIMOV_HOME/ssh/id_ed25519`) is registered as
//!   an account key before the first create (Vast copies account keys into new
//!   instances); login user `root` unless the placement's `ssh_user` says otherwise.
//! - **Stop and start** (`stop`, `start`): `PUT /api/v0/instances/{id}/` with `state`.
//!   A stopped instance keeps its disk and bills its storage, and its GPUs go back to
//!   the market: a start is accepted even when someone rented them meanwhile, and the
//!   instance then stays stopped ("scheduling") until they are free, maybe for ever, so
//!   `start` answers whether it runs again within the caller's deadline.
//!
//! Must not know about the store or the planner.

use super::cloud::{LoginUsers, Pacer, ensure_identity, key_body, short_body};
use crate::agent::AgentError;
use crate::home::Home;
use crate::manifest::{GpuRequest, Placement, Resources};
use crate::model::{InstanceId, Offer, OfferQuery, OwnerTag, ProviderKind, Secret, Usd};
use crate::provider::{
    Capabilities, CreateRequest, Endpoint, ErrorKind, Instance, InstanceState,
    Pacing as ProviderPacing, Provider, ProviderError, ProviderResult,
};
use crate::retry::{Backoff, retry_transient};
use crate::transport::Transport;
use crate::transport::ssh::SshPool;
use async_trait::async_trait;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const DEFAULT_API_URL: &str = "https://console.vast.ai";
pub const URL_ENV: &str = "ASIMOV_VAST_API_URL";
pub const KEY_NAME: &str = "VAST_API_KEY";
pub const PACING_ENV: &str = "ASIMOV_VAST_PACING";
/// Seconds an ended run's instance waits for the controller before destroying itself.
pub const GRACE_ENV: &str = "ASIMOV_VAST_SELF_DESTROY_GRACE";
/// Seconds a stopped instance, started again on resume, may take to run before it is
/// given up (its GPUs rented meanwhile) and the run rents anew; default
/// [`DEFAULT_START_WITHIN`].
pub const START_WITHIN_ENV: &str = "ASIMOV_VAST_START_WITHIN";
/// A start that gets its GPUs back runs again within a minute or two (the image is on
/// the disk already); one "scheduling" for five minutes is waiting for someone else's
/// rental to end, which may never happen.
pub const DEFAULT_START_WITHIN: Duration = Duration::from_secs(300);
/// Hours in the month Vast's `storage_cost` ($/GB/month) is priced over.
const STORAGE_HOURS_PER_MONTH: f64 = 30.0 * 24.0;
const DEFAULT_SELF_DESTROY_GRACE: Duration = Duration::from_secs(300);
/// Seconds one call keeps retrying 429s and 5xx in place before the op fails (and the
/// controller tries again on a later pass).
pub const RETRY_ENV: &str = "ASIMOV_VAST_RETRY_SECS";
const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(90);
/// Test servers only: seconds a new instance may be missing from the listing instead
/// of `LISTING_LAG`, so that tests and campaigns need not wait two minutes.
pub const LISTING_LAG_ENV: &str = "ASIMOV_VAST_LISTING_LAG_SECS";
/// How long a new instance may be missing from the listing (unverified: taken long).
const LISTING_LAG: Duration = Duration::from_secs(120);

fn retry_budget() -> Duration {
    std::env::var(RETRY_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_BUDGET, Duration::from_secs)
}

/// Vast's login user on its images.
pub const DEFAULT_SSH_USER: &str = "root";
/// What runs when a job names no image: a stock CUDA runtime image.
pub const DEFAULT_IMAGE: &str = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime";
/// Vast's minimum disk, GB.
const MIN_DISK_GB: u32 = 8;
const DEFAULT_DISK_GB: u32 = 16;
/// Where a run's folder lives on the instance (the agent resolves `~`).
const REMOTE_ROOT: &str = "~/.asimov-agent";
/// `limit` of one page of the v1 listing (Vast's maximum).
const PAGE: u32 = 25;
/// At most this many pages per listing: 10 000 instances, a bound, not a expectation.
const MAX_PAGES: u32 = 400;

/// Vast's fields one may filter offers on (the CLI's list, plus dstack's two).
const FILTER_FIELDS: &[&str] = &[
    "bw_nvlink",
    "compute_cap",
    "cpu_arch",
    "cpu_cores",
    "cpu_cores_effective",
    "cpu_ghz",
    "cpu_ram",
    "cuda_max_good",
    "datacenter",
    "direct_port_count",
    "driver_version",
    "disk_bw",
    "disk_space",
    "dlperf",
    "dlperf_per_dphtotal",
    "dph_total",
    "duration",
    "external",
    "flops_per_dphtotal",
    "gpu_arch",
    "gpu_frac",
    "gpu_mem_bw",
    "gpu_name",
    "gpu_ram",
    "gpu_total_ram",
    "gpu_max_power",
    "gpu_max_temp",
    "gpu_display_active",
    "has_avx",
    "host_id",
    "id",
    "inet_down",
    "inet_down_cost",
    "inet_up",
    "inet_up_cost",
    "machine_id",
    "min_bid",
    "mobo_name",
    "num_gpus",
    "pci_gen",
    "pcie_bw",
    "reliability",
    "reliability2",
    "rentable",
    "rented",
    "score",
    "storage_cost",
    "static_ip",
    "total_flops",
    "ubuntu_version",
    "verification",
    "verified",
    "vms_enabled",
    "geolocation",
    "cluster_id",
];

/// Requests leave in their slots but reach the server with some jitter: keeping 10%
/// over the documented gap keeps them apart there too (measured: at exactly the gap, a
/// listing per second drew a 429 within six calls).
const PACING_MARGIN: f64 = 1.1;

/// One class of call, each with its own rate limit at Vast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    Search,
    Create,
    List,
    Show,
    Destroy,
    Manage,
    Keys,
}

/// The minimum gap between two calls of one class.
#[derive(Debug, Clone, PartialEq)]
pub struct Pacing {
    gaps: BTreeMap<Call, Duration>,
}

impl Pacing {
    /// Vast's documented thresholds (create 4.5, destroy 3, show 2, manage 1; read as
    /// seconds between calls), and one second for the rest.
    pub fn documented() -> Pacing {
        Pacing::scaled(1.0)
    }

    /// The documented gaps multiplied by `factor` (0 disables pacing).
    pub fn scaled(factor: f64) -> Pacing {
        let factor = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            0.0
        };
        let gaps = [
            (Call::Search, 1.0),
            (Call::Create, 4.5),
            (Call::List, 1.0),
            (Call::Show, 2.0),
            (Call::Destroy, 3.0),
            (Call::Manage, 1.0),
            (Call::Keys, 1.0),
        ]
        .into_iter()
        .map(|(c, s)| (c, Duration::from_secs_f64(s * factor * PACING_MARGIN)))
        .collect();
        Pacing { gaps }
    }

    /// `ASIMOV_VAST_PACING` (a factor) when set and valid, else the documented gaps.
    pub fn from_env() -> Pacing {
        match std::env::var(PACING_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            Some(f) => Pacing::scaled(f),
            None => Pacing::documented(),
        }
    }

    pub fn gap(&self, call: Call) -> Duration {
        self.gaps.get(&call).copied().unwrap_or_default()
    }
}

/// The API key: the credential store first, then this process's environment.
pub fn api_key(home: &Home) -> Option<Secret> {
    super::cloud::api_key(home, KEY_NAME)
}

/// The API's host: `ASIMOV_VAST_API_URL`, else Vast's.
pub fn api_url() -> String {
    super::cloud::api_url(URL_ENV, DEFAULT_API_URL)
}

/// One HTTP answer before classification.
#[derive(Debug)]
struct Raw {
    status: u16,
    retry_after: Option<Duration>,
    text: String,
}

fn err(kind: ErrorKind, step: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderKind::Vast, kind, step, message)
}

/// Every Vast answer into a JSON body or a canonical error: the one place that reads
/// status codes, error codes and messages.
fn classify(step: &'static str, raw: &Raw) -> ProviderResult<Value> {
    let json: Option<Value> = serde_json::from_str(&raw.text).ok();
    let code = json
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let msg = json
        .as_ref()
        .and_then(|v| {
            v.get("msg")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("detail"))
        })
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| short_body(&raw.text));
    let message = if code.is_empty() {
        format!("HTTP {}: {msg}", raw.status)
    } else {
        format!("HTTP {}: {code}: {msg}", raw.status)
    };
    // The codes decide first: they also appear inside HTTP 200.
    let by_code = match code.as_str() {
        "no_such_ask" => Some(ErrorKind::NoCapacity),
        "no_such_instance" | "not_found" => Some(ErrorKind::NotFound),
        "auth_error" => Some(ErrorKind::Unauthenticated),
        "missing_billing" | "insufficient_credit" => Some(ErrorKind::PaymentRequired),
        "rate_limit_exceeded" => Some(ErrorKind::RateLimited {
            retry_after: raw.retry_after,
        }),
        // A daily quota: retrying today does not help; say when it resets if known.
        "search_quota_exceeded" => Some(ErrorKind::Permanent),
        _ => None,
    };
    let failed = json
        .as_ref()
        .and_then(|v| v.get("success"))
        .and_then(Value::as_bool)
        == Some(false);
    if (200..300).contains(&raw.status) {
        return match (json, failed) {
            (Some(v), false) => Ok(v),
            (Some(_), true) => Err(err(by_code.unwrap_or(ErrorKind::Permanent), step, message)),
            // A 200 that is not JSON comes from something in between (a proxy page).
            (None, _) => Err(err(ErrorKind::Transient, step, message)),
        };
    }
    // "no_such_ask" also hides in the text of a 404 `invalid_args` (an offer taken).
    let kind = if let Some(kind) = by_code {
        kind
    } else if msg.contains("no_such_ask") {
        ErrorKind::NoCapacity
    } else {
        match raw.status {
            403 if code == "invalid_args" => ErrorKind::Permanent,
            401 => ErrorKind::Unauthenticated,
            403 => ErrorKind::PermissionDenied,
            402 => ErrorKind::PaymentRequired,
            404 => ErrorKind::NotFound,
            410 => ErrorKind::Permanent,
            429 => ErrorKind::RateLimited {
                retry_after: raw.retry_after,
            },
            408 | 500..=599 => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    };
    Err(err(kind, step, message))
}

/// An offer as the client uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct VastOffer {
    pub id: u64,
    /// The machine behind the offer: steadier than the offer id, which changes with
    /// the host's ask.
    pub machine_id: Option<u64>,
    pub gpu_name: String,
    pub num_gpus: u32,
    /// Per GPU, GB (the API says MB).
    pub vram_gb: f64,
    pub dph_total: f64,
    /// Compute only; `dph_total` adds storage and bandwidth.
    pub dph_base: Option<f64>,
    pub min_bid: Option<f64>,
    pub cuda: Option<f64>,
    pub disk_gb: Option<f64>,
    pub reliability: Option<f64>,
    pub geolocation: Option<String>,
    pub dlperf: Option<f64>,
    pub verified: Option<bool>,
    pub storage_cost: Option<f64>,
    pub inet_up_cost: Option<f64>,
    pub inet_down_cost: Option<f64>,
}

impl VastOffer {
    fn parse(v: &Value) -> Option<VastOffer> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Some(VastOffer {
            id: v.get("id")?.as_u64()?,
            machine_id: v.get("machine_id").and_then(Value::as_u64),
            gpu_name: v.get("gpu_name")?.as_str()?.trim().to_string(),
            num_gpus: v.get("num_gpus").and_then(Value::as_u64).unwrap_or(0) as u32,
            vram_gb: f("gpu_ram").unwrap_or(0.0) / 1000.0,
            dph_total: f("dph_total")?,
            dph_base: f("dph_base"),
            min_bid: f("min_bid"),
            cuda: f("cuda_max_good"),
            disk_gb: f("disk_space"),
            reliability: f("reliability2").or_else(|| f("reliability")),
            geolocation: v
                .get("geolocation")
                .and_then(Value::as_str)
                .map(|s| s.trim().to_string()),
            dlperf: f("dlperf"),
            verified: v.get("verified").and_then(Value::as_bool),
            storage_cost: f("storage_cost"),
            inet_up_cost: f("inet_up_cost"),
            inet_down_cost: f("inet_down_cost"),
        })
    }

    /// What this placement would pay per hour: the bid for spot, else `dph_total`
    /// (storage included).
    pub fn price(&self, placement: &Placement) -> f64 {
        match bid(self, placement) {
            Some(b) => {
                b + self
                    .dph_base
                    .map_or(0.0, |base| (self.dph_total - base).max(0.0))
            }
            None => self.dph_total,
        }
    }
}

impl VastOffer {
    /// The shared model of an offer, priced as `placement` would pay.
    pub fn to_offer(&self, placement: &Placement) -> Offer {
        let mut o = Offer::new(
            ProviderKind::Vast,
            self.id.to_string(),
            Usd::from_dollars(self.price(placement)),
        );
        o.gpu = Some(self.gpu_name.clone());
        o.count = self.num_gpus;
        o.vram_gb = Some(self.vram_gb);
        o.cuda = self.cuda.map(|c| format!("{c:.1}"));
        o.disk_gb = self.disk_gb;
        o.reliability = self.reliability;
        o.location = self.geolocation.clone();
        o.extra = [
            ("storage_cost", self.storage_cost),
            ("inet_up_cost", self.inet_up_cost),
            ("inet_down_cost", self.inet_down_cost),
            ("dlperf", self.dlperf),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
        o
    }
}

/// The bid for an interruptible placement: `premium_pct` over the offer's minimum.
fn bid(offer: &VastOffer, placement: &Placement) -> Option<f64> {
    if !placement.spot {
        return None;
    }
    let base = offer.min_bid.unwrap_or(offer.dph_total);
    let premium = placement.premium_pct.unwrap_or(0.0).max(0.0);
    let b = base * (1.0 + premium / 100.0);
    Some((b * 10_000.0).round() / 10_000.0)
}

/// GPU names as users write them: case, `_` for space, and a family (`H100`) matching
/// its variants (`H100 SXM`, `H100 PCIE`).
pub fn gpu_matches(offer: &str, wanted: &str) -> bool {
    let norm = |s: &str| {
        s.replace('_', " ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_uppercase()
    };
    let (o, w) = (norm(offer), norm(wanted));
    if w.is_empty() {
        return true;
    }
    o == w || o.starts_with(&format!("{w} ")) || o.ends_with(&format!(" {w}"))
}

/// A filter value as written (`">=0.98"`, `"<=2"`, `"true"`, `"US,CA"`) into Vast's
/// `{op: value}`, in Vast's units.
fn parse_filter(name: &str, text: &str) -> Result<(String, Value), String> {
    let field = match name {
        "cuda_vers" => "cuda_max_good",
        "dph" => "dph_total",
        "dlperf_usd" => "dlperf_per_dphtotal",
        "flops_usd" => "flops_per_dphtotal",
        "display_active" => "gpu_display_active",
        other => other,
    };
    if !FILTER_FIELDS.contains(&field) {
        return Err(format!("{name} is not a Vast offer field"));
    }
    let t = text.trim();
    let (op, rest) = [
        (">=", "gte"),
        ("<=", "lte"),
        ("!=", "neq"),
        ("==", "eq"),
        (">", "gt"),
        ("<", "lt"),
        ("=", "eq"),
    ]
    .iter()
    .find_map(|(sym, op)| t.strip_prefix(sym).map(|r| (*op, r.trim())))
    .unwrap_or(("eq", t));
    let scale = match field {
        "cpu_ram" | "gpu_ram" | "gpu_total_ram" => 1000.0,
        "duration" => 86_400.0,
        _ => 1.0,
    };
    let one = |s: &str| -> Value {
        let s = s.trim().trim_matches('"');
        match s {
            "true" => json!(true),
            "false" => json!(false),
            _ => match s.parse::<f64>() {
                Ok(n) => json!(n * scale),
                Err(_) => json!(s.replace('_', " ")),
            },
        }
    };
    if rest.is_empty() {
        return Err(format!("{name}: no value in {text:?}"));
    }
    if rest.contains(',') {
        let list: Vec<Value> = rest
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(one)
            .collect();
        let op = if op == "neq" { "notin" } else { "in" };
        return Ok((field.to_string(), json!({ op: list })));
    }
    Ok((field.to_string(), json!({ op: one(rest) })))
}

/// The search body for a job's resources and one placement. Errors name bad filters.
pub fn search_query(resources: &Resources, placement: &Placement) -> Result<Value, String> {
    let mut q = Map::new();
    q.insert("rentable".into(), json!({"eq": true}));
    q.insert("rented".into(), json!({"eq": false}));
    q.insert("verified".into(), json!({"eq": true}));
    q.insert("external".into(), json!({"eq": false}));
    let disk = resources
        .disk_gb
        .unwrap_or(DEFAULT_DISK_GB)
        .max(MIN_DISK_GB);
    q.insert("disk_space".into(), json!({"gte": disk}));
    q.insert("allocated_storage".into(), json!(disk));
    if let Some(gpu) = &resources.gpu {
        q.insert("num_gpus".into(), json!({"eq": gpu.count}));
        if let Some(vram) = gpu.min_vram_gb {
            q.insert("gpu_ram".into(), json!({"gte": vram * 1000}));
        }
        // GPU names are matched here, after the search: users write families (`H100`)
        // and any case, which Vast's exact `in` would miss.
    }
    if let Some(cuda) = &resources.cuda
        && let Ok(v) = cuda.trim().parse::<f64>()
    {
        q.insert("cuda_max_good".into(), json!({"gte": v}));
    }
    if let Some(cpus) = resources.cpus {
        q.insert("cpu_cores_effective".into(), json!({"gte": cpus}));
    }
    if !placement.regions.is_empty() {
        q.insert("geolocation".into(), json!({"in": placement.regions}));
    }
    if let Some(max) = placement.max_price_per_hour
        && !placement.spot
    {
        q.insert("dph_total".into(), json!({"lte": max}));
    }
    let mut problems = Vec::new();
    for (name, text) in &placement.filters {
        match parse_filter(name, text) {
            Ok((field, cond)) => {
                q.insert(field, cond);
            }
            Err(p) => problems.push(p),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    q.insert(
        "type".into(),
        json!(if placement.spot { "bid" } else { "on-demand" }),
    );
    q.insert("order".into(), json!([["dph_total", "asc"]]));
    q.insert("limit".into(), json!(1000));
    Ok(Value::Object(q))
}

/// Offers that fit, cheapest first, as the placement would pay for them.
pub fn fitting(
    offers: Vec<VastOffer>,
    resources: &Resources,
    placement: &Placement,
) -> Vec<VastOffer> {
    let mut out: Vec<VastOffer> = offers
        .into_iter()
        .filter(|o| match &resources.gpu {
            Some(g) => {
                o.num_gpus == g.count
                    && (g.names.is_empty() || g.names.iter().any(|n| gpu_matches(&o.gpu_name, n)))
                    && g.min_vram_gb.is_none_or(|v| o.vram_gb + 1e-9 >= v as f64)
            }
            None => true,
        })
        .filter(|o| {
            placement
                .max_price_per_hour
                .is_none_or(|max| o.price(placement) <= max + 1e-9)
        })
        .collect();
    out.sort_by(|a, b| {
        a.price(placement)
            .partial_cmp(&b.price(placement))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.id.cmp(&b.id))
    });
    out
}

impl Api {
    async fn send(
        &self,
        call: Call,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Raw, ProviderError> {
        self.pacer.wait(call).await;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(query);
        if !self.key.expose().is_empty() {
            req = req.bearer_auth(self.key.expose());
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let step = "call the vast api";
        let resp = req
            .send()
            .await
            .map_err(|e| err(ErrorKind::Transient, step, format!("{path}: {e}")).with_source(e))?;
        let status = resp.status().as_u16();
        let retry_after = super::cloud::retry_after(resp.headers());
        let text = resp.text().await.map_err(|e| {
            err(
                ErrorKind::Transient,
                step,
                format!("{path}: reading the answer: {e}"),
            )
            .with_source(e)
        })?;
        Ok(Raw {
            status,
            retry_after,
            text,
        })
    }

    /// One idempotent call, retried in place on 429 and 5xx.
    async fn call(
        &self,
        step: &'static str,
        call: Call,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> ProviderResult<Value> {
        retry_transient(&self.retry, super::cloud::transient, || async {
            let raw = self
                .send(call, method.clone(), path, query, body)
                .await
                .map_err(|e| ProviderError { step, ..e })?;
            classify(step, &raw)
        })
        .await
    }
}

/// The HTTP side: client, host, key, pacing and retry policy, shared by the provider
/// and the machines it hands out (which re-attach the SSH key through it).
struct Api {
    http: reqwest::Client,
    base: String,
    key: Secret,
    pacer: Pacer<Call>,
    retry: Backoff,
}

pub struct VastProvider {
    api: Arc<Api>,
    pool: Arc<SshPool>,
    identity: PathBuf,
    default_user: String,
    /// Login users asked for by placements, by tag (kept beyond this process).
    users: LoginUsers,
    /// Per-instance keys, one 0600 file per instance id.
    keys_dir: PathBuf,
    /// How long an ended run's agent waits for the controller before it destroys its
    /// own instance.
    self_destroy_grace: Duration,
    /// How long a start of a stopped instance may take (`START_WITHIN_ENV`).
    start_within: Duration,
    /// Per-instance keys from create answers, by instance id.
    instance_keys: Mutex<BTreeMap<InstanceId, Secret>>,
    key_registered: tokio::sync::Mutex<bool>,
    /// Offers this process is buying, bought or was refused lately, with when to try
    /// them again: parallel creates skip them instead of all racing for the cheapest
    /// one (each loser would pay a paced create).
    claimed: Mutex<BTreeMap<u64, tokio::time::Instant>>,
    /// `LISTING_LAG`, or `LISTING_LAG_ENV` seconds against a test server.
    listing_lag: Duration,
}

/// How long an offer being bought (or bought) is skipped; bought offers leave the
/// market anyway.
const CLAIM_TTL: Duration = Duration::from_secs(600);
/// How long an offer that answered "no capacity" is skipped: hosts do come back.
const REFUSED_TTL: Duration = Duration::from_secs(60);

impl std::fmt::Debug for VastProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VastProvider")
            .field("base", &self.api.base)
            .finish_non_exhaustive()
    }
}

impl VastProvider {
    /// Stops instance `id`, keeping its disk (which still bills) and releasing its GPUs.
    pub async fn stop(&self, id: &InstanceId) -> ProviderResult<()> {
        self.set_state("stop instance", id, "stopped").await
    }

    /// Asks instance `id` to run again and waits up to `within` for it to be listed
    /// running; `NoCapacity` when it is still stopped then (its GPUs rented by someone
    /// else: Vast keeps it "scheduling"), so the caller can destroy it and rent anew.
    pub async fn start(&self, id: &InstanceId, within: Duration) -> ProviderResult<Instance> {
        let step = "start instance";
        self.set_state(step, id, "running").await?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let listed = self.list().await?;
            let Some(i) = listed.into_iter().find(|i| &i.id == id) else {
                return Err(err(ErrorKind::NotFound, step, format!("{id} is gone")));
            };
            match i.state {
                InstanceState::Running => return Ok(i),
                InstanceState::Terminating => {
                    return Err(err(ErrorKind::NotFound, step, format!("{id} is going")));
                }
                InstanceState::Provisioning | InstanceState::Stopped => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(err(
                    ErrorKind::NoCapacity,
                    step,
                    format!(
                        "{id} did not run again within {}s (its GPUs are taken?)",
                        within.as_secs()
                    ),
                ));
            }
            // Listing is paced per endpoint already; this only spaces the looks.
            tokio::time::sleep(Duration::from_secs(2).min(within)).await;
        }
    }

    async fn set_state(
        &self,
        step: &'static str,
        id: &InstanceId,
        state: &str,
    ) -> ProviderResult<()> {
        if id.parse::<u64>().is_err() {
            return Err(err(
                ErrorKind::NotFound,
                step,
                format!("{id:?} is not a vast instance id"),
            ));
        }
        self.api
            .call(
                step,
                Call::Manage,
                reqwest::Method::PUT,
                &format!("/api/v0/instances/{id}/"),
                &[],
                Some(&json!({ "state": state })),
            )
            .await
            .map(|_| ())
    }

    /// The provider for this home when a key is configured (`None` otherwise), at
    /// `ASIMOV_VAST_API_URL` or Vast's host, paced per `ASIMOV_VAST_PACING`.
    pub fn from_home(home: &Home, pool: Arc<SshPool>) -> std::io::Result<Option<VastProvider>> {
        let Some(key) = api_key(home) else {
            return Ok(None);
        };
        VastProvider::new(home, pool, api_url(), key, Pacing::from_env()).map(Some)
    }

    /// A provider for searching offers (which Vast answers without a key): the
    /// configured key when there is one.
    pub fn searcher(home: &Home) -> std::io::Result<VastProvider> {
        let key = api_key(home).unwrap_or_else(|| Secret::new(""));
        let pool = SshPool::new(home.clone())?;
        VastProvider::new(home, pool, api_url(), key, Pacing::from_env())
    }

    pub fn new(
        home: &Home,
        pool: Arc<SshPool>,
        base: impl Into<String>,
        key: Secret,
        pacing: Pacing,
    ) -> std::io::Result<VastProvider> {
        let http = super::cloud::http_client()?;
        Ok(VastProvider {
            api: Arc::new(Api {
                http,
                base: base.into().trim_end_matches('/').to_string(),
                key,
                pacer: Pacer::new(pacing.gaps),
                retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(10), 2.0)
                    .with_max_elapsed(Some(retry_budget())),
            }),
            pool,
            identity: home.ssh_identity(),
            keys_dir: home.provider_state("vast").join("instance-keys"),
            self_destroy_grace: std::env::var(GRACE_ENV)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map_or(DEFAULT_SELF_DESTROY_GRACE, Duration::from_secs),
            start_within: std::env::var(START_WITHIN_ENV)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .map_or(DEFAULT_START_WITHIN, Duration::from_secs),
            default_user: DEFAULT_SSH_USER.to_string(),
            users: LoginUsers::new(home.provider_state("vast").join("users"), DEFAULT_SSH_USER),
            instance_keys: Mutex::new(BTreeMap::new()),
            key_registered: tokio::sync::Mutex::new(false),
            claimed: Mutex::new(BTreeMap::new()),
            listing_lag: super::seconds_env(LISTING_LAG_ENV, LISTING_LAG),
        })
    }

    /// Retries in place within `budget` (tests shorten it).
    pub fn with_retry(mut self, policy: Backoff) -> VastProvider {
        if let Some(api) = Arc::get_mut(&mut self.api) {
            api.retry = policy;
        }
        self
    }

    /// Logs in as `user` where no placement says otherwise.
    pub fn with_default_user(mut self, user: impl Into<String>) -> VastProvider {
        self.default_user = user.into();
        self.users = LoginUsers::new(self.users.dir().to_path_buf(), self.default_user.clone());
        self
    }

    /// asimov's private key file for instances.
    pub fn identity_file(&self) -> &Path {
        &self.identity
    }

    /// The per-instance key Vast returned when `id` was created (by this process or an
    /// earlier one of this home).
    pub fn instance_key(&self, id: &str) -> Option<Secret> {
        let mut keys = self.instance_keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keys.get(id) {
            return Some(k.clone());
        }
        let stored = std::fs::read_to_string(self.keys_dir.join(id))
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())?;
        let key = Secret::new(stored);
        keys.insert(id.to_string(), key.clone());
        Some(key)
    }

    /// Offers that fit `resources` under `placement`, cheapest first.
    pub async fn search(
        &self,
        resources: &Resources,
        placement: &Placement,
    ) -> ProviderResult<Vec<VastOffer>> {
        let step = "search offers";
        let query =
            search_query(resources, placement).map_err(|m| err(ErrorKind::Permanent, step, m))?;
        let v = self
            .api
            .call(
                step,
                Call::Search,
                reqwest::Method::POST,
                "/api/v0/bundles/",
                &[],
                Some(&query),
            )
            .await?;
        let offers = v
            .get("offers")
            .and_then(Value::as_array)
            .ok_or_else(|| err(ErrorKind::Transient, step, "answer without offers"))?
            .iter()
            .filter_map(VastOffer::parse)
            .collect();
        Ok(fitting(offers, resources, placement))
    }

    /// Registers asimov's key with the account once per process, if it is not there.
    async fn ensure_account_key(&self) -> ProviderResult<()> {
        let step = "register the ssh key";
        let mut done = self.key_registered.lock().await;
        if *done {
            return Ok(());
        }
        let public = ensure_identity(&self.identity).map_err(|e| {
            err(
                ErrorKind::Permanent,
                step,
                format!("{}: {e}", self.identity.display()),
            )
        })?;
        let keys = self
            .api
            .call(
                step,
                Call::Keys,
                reqwest::Method::GET,
                "/api/v0/ssh/",
                &[],
                None,
            )
            .await?;
        let list = keys
            .as_array()
            .or_else(|| keys.get("ssh_keys").and_then(Value::as_array))
            .or_else(|| keys.get("keys").and_then(Value::as_array))
            .cloned()
            .unwrap_or_default();
        let ours = key_body(&public);
        let present = list.iter().any(|k| {
            ["public_key", "ssh_key", "key"]
                .iter()
                .filter_map(|f| k.get(*f).and_then(Value::as_str))
                .any(|text| key_body(text) == ours)
        });
        if !present {
            self.api
                .call(
                    step,
                    Call::Keys,
                    reqwest::Method::POST,
                    "/api/v0/ssh/",
                    &[],
                    Some(&json!({ "ssh_key": public })),
                )
                .await?;
            tracing::info!(key = %self.identity.display(), "registered asimov's ssh key with the vast account");
        }
        *done = true;
        Ok(())
    }

    /// Buys one offer. `NoCapacity` when it was taken meanwhile.
    async fn rent(&self, offer: &VastOffer, req: &CreateRequest) -> ProviderResult<Instance> {
        let step = "create instance";
        let tag = req.tag.render();
        let disk = req
            .resources
            .disk_gb
            .unwrap_or(DEFAULT_DISK_GB)
            .max(MIN_DISK_GB);
        let bid = bid(offer, &req.placement);
        let mut body = json!({
            "client_id": "me",
            "image": req.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
            "disk": disk,
            "label": tag,
            "runtype": "ssh_direc ssh_proxy",
            "target_state": "running",
            "cancel_unavail": bid.is_none(),
        });
        if let Some(b) = bid {
            body["price"] = json!(b);
        }
        let path = format!("/api/v0/asks/{}/", offer.id);
        let answer = retry_transient(&self.api.retry, super::cloud::refused, || async {
            let raw = self
                .api
                .send(Call::Create, reqwest::Method::PUT, &path, &[], Some(&body))
                .await
                .map_err(|e| ProviderError { step, ..e })?;
            // An error that names the instance it made anyway: the instance is ours.
            if let Ok(v) = serde_json::from_str::<Value>(&raw.text)
                && v.get("new_contract").and_then(Value::as_u64).is_some()
            {
                if v.get("success").and_then(Value::as_bool) == Some(false) {
                    tracing::warn!(offer = offer.id, answer = %short_body(&raw.text), "vast create failed yet made an instance; keeping it for the planner");
                }
                return Ok(v);
            }
            classify(step, &raw)
        })
        .await?;
        let id = answer
            .get("new_contract")
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                err(
                    ErrorKind::Transient,
                    step,
                    format!("answer without new_contract: {answer}"),
                )
            })?
            .to_string();
        if let Some(k) = answer.get("instance_api_key").and_then(Value::as_str) {
            // Kept (0600) beyond this process: the agent needs it to end the instance.
            if let Err(e) = crate::home::write_private(&self.keys_dir.join(&id), k.as_bytes()) {
                tracing::warn!(instance = %id, error = %e, "cannot keep the instance's own key; it will not destroy itself");
            }
            self.instance_keys
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.clone(), Secret::new(k));
        }
        Ok(Instance {
            provider: ProviderKind::Vast,
            id,
            tag: req.tag.clone(),
            state: InstanceState::Provisioning,
            endpoint: None,
            gpu: Some(format!("{}x {}", offer.num_gpus, offer.gpu_name)),
            price_per_hour: Usd::from_dollars(offer.price(&req.placement)),
            created_at: None,
            host: None,
        })
    }

    /// The live instance labelled `tag`, if any: one page of the listing, filtered by
    /// the server.
    async fn find_tag(&self, tag: &OwnerTag) -> ProviderResult<Option<Instance>> {
        let step = "look for the tag";
        let query = [
            ("limit", PAGE.to_string()),
            ("select_cols", json!(["*"]).to_string()),
            (
                "select_filters",
                json!({"label": {"eq": tag.render()}}).to_string(),
            ),
        ];
        let page = self
            .api
            .call(
                step,
                Call::List,
                reqwest::Method::GET,
                "/api/v1/instances/",
                &query,
                None,
            )
            .await?;
        let items = page
            .get("instances")
            .and_then(Value::as_array)
            .ok_or_else(|| err(ErrorKind::Transient, step, "answer without instances"))?;
        Ok(items
            .iter()
            .filter_map(|v| self.instance(v))
            .find(|i| &i.tag == tag && i.state != InstanceState::Terminating))
    }

    /// One listed instance in asimov's terms; `None` for instances without our tag.
    fn instance(&self, v: &Value) -> Option<Instance> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::trim);
        let label = s("label")?;
        let tag = OwnerTag::parse(label)?;
        let id = v.get("id")?.as_u64()?.to_string();
        let actual = s("actual_status").unwrap_or("");
        let intended = s("intended_status").unwrap_or("");
        let cur = s("cur_state").unwrap_or("");
        let next = s("next_state").unwrap_or("");
        let status_msg = s("status_msg").unwrap_or("");
        let direct = s("public_ipaddr")
            .filter(|ip| !ip.is_empty())
            .and_then(|ip| {
                let port = v
                    .get("ports")?
                    .get("22/tcp")?
                    .get(0)?
                    .get("HostPort")?
                    .as_str()?
                    .trim()
                    .parse::<u16>()
                    .ok()?;
                Some((ip.to_string(), port))
            });
        let user = self.users.get(label);
        let endpoint = direct.map(|(host, port)| Endpoint::Ssh {
            host,
            port,
            user,
            identity_file: Some(self.identity.clone()),
            root: format!("{REMOTE_ROOT}/{label}"),
        });
        let state = if cur == "unloaded" || next == "unloaded" {
            InstanceState::Terminating
        } else if actual == "created" && status_msg.contains("OCI runtime create failed") {
            // The container will never start: lost, like a preempted one.
            InstanceState::Stopped
        } else if matches!(actual, "stopped" | "exited" | "offline" | "frozen")
            || (intended == "stopped" && cur == "stopped" && next == "stopped")
        {
            InstanceState::Stopped
        } else if actual == "running" && intended != "stopped" && endpoint.is_some() {
            InstanceState::Running
        } else {
            InstanceState::Provisioning
        };
        let gpu = match (v.get("num_gpus").and_then(Value::as_u64), s("gpu_name")) {
            (Some(n), Some(name)) if n > 0 => Some(format!("{n}x {name}")),
            _ => None,
        };
        Some(Instance {
            provider: ProviderKind::Vast,
            id,
            tag,
            state,
            endpoint,
            gpu,
            // What it bills now: a stopped instance only its disk, where the listing
            // says what that costs.
            price_per_hour: match (state, storage_price(v)) {
                (InstanceState::Stopped, Some(storage)) => storage,
                _ => Usd::from_dollars(v.get("dph_total").and_then(Value::as_f64).unwrap_or(0.0)),
            },
            created_at: v
                .get("start_date")
                .and_then(Value::as_f64)
                .map(|t| t as i64),
            host: None,
        })
    }
}

/// What instance `v`'s disk bills an hour: `storage_cost` ($/GB/month) for its
/// `disk_space` GB; `None` when the listing lacks either.
fn storage_price(v: &Value) -> Option<Usd> {
    let per_gb_month = v.get("storage_cost").and_then(Value::as_f64)?;
    let gb = v.get("disk_space").and_then(Value::as_f64)?;
    (per_gb_month.is_finite() && gb.is_finite() && per_gb_month >= 0.0 && gb >= 0.0)
        .then(|| Usd::from_dollars(per_gb_month * gb / STORAGE_HOURS_PER_MONTH))
}

#[async_trait]
impl Provider for VastProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Vast
    }

    /// Vast's facts: a fresh instance may take a while to be listed; images take
    /// minutes to pull ("typically 1-5 minutes"); a stopped (outbid) instance still
    /// bills its disk; login as `root`.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            listing_lag: self.listing_lag,
            boot_timeout: Duration::from_secs(20 * 60),
            boot_timeouts: Default::default(),
            pacing: ProviderPacing {
                // Creates queue in the pacer 4.95 s apart; more in flight only holds
                // a pass behind them.
                max_in_flight: 8,
                min_resync: Duration::from_secs(30),
            },
            resync: Duration::from_secs(300),
            bills_while_stopped: true,
            ssh_user: Some(self.default_user.clone()),
            fixed_pool: false,
            keep_disk: Some(self.start_within),
        }
    }

    /// `PUT state: stopped`, then the listing's word on what the stopped instance bills
    /// (its disk at `storage_cost`); `None` when the listing does not show it stopped yet.
    async fn stop_keeping_disk(&self, id: &InstanceId) -> ProviderResult<Option<Usd>> {
        self.stop(id).await?;
        let listed = self.list().await?;
        Ok(listed
            .into_iter()
            .find(|i| &i.id == id && i.state == InstanceState::Stopped)
            .map(|i| i.price_per_hour))
    }

    async fn start_kept(&self, id: &InstanceId) -> ProviderResult<Instance> {
        self.start(id, self.start_within).await
    }

    /// The offers that fit `query` now, as the search reports them.
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        let resources = Resources {
            gpu: Some(GpuRequest {
                names: query.gpus.clone(),
                count: query.min_count.unwrap_or(1),
                min_vram_gb: query.min_vram_gb.map(|v| v.ceil() as u32),
            }),
            ..Resources::default()
        };
        let placement = Placement {
            provider: ProviderKind::Vast,
            max_price_per_hour: query.max_price_per_hour.map(Usd::dollars),
            ..Placement::local()
        };
        Ok(self
            .search(&resources, &placement)
            .await?
            .iter()
            .map(|o| o.to_offer(&placement))
            .filter(|o| query.matches(o))
            .collect())
    }

    async fn list(&self) -> ProviderResult<Vec<Instance>> {
        let step = "list instances";
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut query = vec![
                ("limit", PAGE.to_string()),
                ("order_by", json!([{"col": "id", "dir": "asc"}]).to_string()),
                ("select_cols", json!(["*"]).to_string()),
            ];
            if let Some(t) = &after {
                query.push(("after_token", t.clone()));
            }
            let page = self
                .api
                .call(
                    step,
                    Call::List,
                    reqwest::Method::GET,
                    "/api/v1/instances/",
                    &query,
                    None,
                )
                .await?;
            let items = page
                .get("instances")
                .and_then(Value::as_array)
                .ok_or_else(|| err(ErrorKind::Transient, step, "answer without instances"))?;
            out.extend(items.iter().filter_map(|v| self.instance(v)));
            after = match page.get("next_token") {
                Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            if after.is_none() || items.is_empty() {
                return Ok(out);
            }
        }
        // A listing cut short must not read as "the rest is gone".
        Err(err(
            ErrorKind::Transient,
            step,
            format!("more than {MAX_PAGES} pages of instances"),
        ))
    }

    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance> {
        let step = "create instance";
        if let Some(user) = &req.placement.ssh_user {
            let tag = req.tag.render();
            // Before the create: a controller killed mid-create adopts with the right user.
            self.users.remember(&tag, user).map_err(|e| {
                err(
                    ErrorKind::Transient,
                    step,
                    format!("{}: {e}", self.users.dir().display()),
                )
            })?;
        }
        // A create retried after being cut off (timeout, crash) finds the first one.
        if let Some(existing) = self.find_tag(&req.tag).await? {
            tracing::info!(instance = %existing.id, tag = %req.tag.render(), "vast instance with this tag exists; adopting it");
            return Ok(existing);
        }
        self.ensure_account_key().await?;
        let offers = self.search(&req.resources, &req.placement).await?;
        if offers.is_empty() {
            return Err(err(
                ErrorKind::NoCapacity,
                step,
                "no offer fits the job's resources and the placement's filters",
            ));
        }
        let mut taken = Vec::new();
        for offer in &offers {
            {
                let mut claimed = self.claimed.lock().unwrap_or_else(|e| e.into_inner());
                let now = tokio::time::Instant::now();
                claimed.retain(|_, until| *until > now);
                if claimed.contains_key(&offer.id) {
                    continue;
                }
                claimed.insert(offer.id, now + CLAIM_TTL);
            }
            match self.rent(offer, req).await {
                Ok(instance) => return Ok(instance),
                // Bought by someone else since the search: the next one.
                Err(e) if e.kind == ErrorKind::NoCapacity => {
                    tracing::info!(offer = offer.id, error = %e, "vast offer taken; trying the next");
                    self.claimed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(offer.id, tokio::time::Instant::now() + REFUSED_TTL);
                    taken.push(offer.id.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Err(err(
            ErrorKind::NoCapacity,
            step,
            format!("every fitting offer was taken ({})", taken.join(", ")),
        ))
    }

    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()> {
        let step = "destroy instance";
        if id.parse::<u64>().is_err() {
            return Err(err(
                ErrorKind::NotFound,
                step,
                format!("{id:?} is not a vast instance id"),
            ));
        }
        let result = self
            .api
            .call(
                step,
                Call::Destroy,
                reqwest::Method::DELETE,
                &format!("/api/v0/instances/{id}/"),
                &[],
                Some(&json!({})),
            )
            .await
            .map(|_| ());
        // Gone (now or before): its own key is of no use any more.
        if result.is_ok()
            || result
                .as_ref()
                .is_err_and(|e| e.kind == ErrorKind::NotFound)
        {
            let _ = std::fs::remove_file(self.keys_dir.join(id));
            self.instance_keys
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
        result
    }

    fn machine(&self, instance: &Instance) -> ProviderResult<Arc<dyn crate::agent::Machine>> {
        let (transport, root) = super::cloud::ssh_transport(
            &self.pool,
            instance,
            "reach instance",
            "has no ssh port yet",
        )?;
        let Some(key) = self.instance_key(&instance.id) else {
            tracing::warn!(instance = %instance.id, "no key of its own for this instance: it cannot destroy itself");
            return Ok(super::cloud::agent_machine(transport, root));
        };
        let hook = self_destroy(
            &format!("{}/api/v0/instances/{}/", self.api.base, instance.id),
            self.self_destroy_grace,
        );
        let auth = Secret::new(format!("Authorization: Bearer {}", key.expose()));
        let reattach = Reattach {
            api: Arc::clone(&self.api),
            id: instance.id.clone(),
            machine: transport.machine().to_string(),
            public_key: self.identity.with_extension("pub"),
        };
        Ok(Arc::new(
            super::cloud::CloudMachine::new(Arc::new(transport), root)
                .ending(hook, Some(auth))
                .reattaching(reattach),
        ))
    }
}

/// The agent's end-of-run hook on a Vast instance (the shared [`super::cloud::SelfEnd`]):
/// once the controller collected the run, or after `grace` without it, it destroys
/// this instance with the instance's own key, retrying until Vast confirms it gone.
fn self_destroy(url: &str, grace: Duration) -> super::cloud::SelfEnd {
    super::cloud::SelfEnd {
        name: "vast",
        method: "DELETE",
        url: url.to_string(),
        body: "{}".to_string(),
        refused_in_ok: r#""success": *false"#,
        grace,
        find_key: None,
    }
}

/// A login refused on a Vast instance: asimov's key is attached to it again through
/// the API (`POST /instances/{id}/ssh/`).
struct Reattach {
    api: Arc<Api>,
    id: InstanceId,
    machine: String,
    public_key: PathBuf,
}

#[async_trait]
impl super::cloud::Reattach for Reattach {
    async fn reattach(&self, why: &AgentError) -> Result<(), AgentError> {
        let step = "re-attach the ssh key";
        tracing::warn!(instance = %self.id, error = %why, "ssh login refused; attaching asimov's key to the instance again");
        let fail = |message: String| AgentError::Failed {
            machine: self.machine.clone(),
            step,
            message,
        };
        let public = std::fs::read_to_string(&self.public_key)
            .map_err(|e| fail(format!("{}: {e}", self.public_key.display())))?;
        self.api
            .call(
                step,
                Call::Manage,
                reqwest::Method::POST,
                &format!("/api/v0/instances/{}/ssh/", self.id),
                &[],
                Some(&json!({ "ssh_key": public.trim() })),
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::GpuRequest;

    fn raw(status: u16, text: &str) -> Raw {
        Raw {
            status,
            retry_after: None,
            text: text.to_string(),
        }
    }

    fn kind(status: u16, text: &str) -> ErrorKind {
        classify("test", &raw(status, text))
            .map(|_| "ok")
            .map_err(|e| e.kind)
            .err()
            .unwrap_or(ErrorKind::Permanent)
    }

    #[test]
    fn answers_map_to_canonical_kinds() {
        let rl = ErrorKind::RateLimited { retry_after: None };
        let table: Vec<(u16, &str, ErrorKind)> = vec![
            (429, "API requests too frequent", rl.clone()),
            (
                429,
                "API requests too frequent: endpoint threshold=4.5",
                rl.clone(),
            ),
            (
                429,
                r#"{"detail":"API requests too frequent endpoint threshold=4.5"}"#,
                rl.clone(),
            ),
            (
                429,
                r#"{"success":false,"error":"rate_limit_exceeded","msg":"slow down"}"#,
                rl.clone(),
            ),
            (
                429,
                r#"{"error":"search_quota_exceeded"}"#,
                ErrorKind::Permanent,
            ),
            (
                502,
                "<html>\r\n<head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
                ErrorKind::Transient,
            ),
            (
                504,
                "<html><title>504 Gateway Time-out</title></html>",
                ErrorKind::Transient,
            ),
            (
                200,
                r#"{"success":false,"error":"no_such_instance","msg":"x"}"#,
                ErrorKind::NotFound,
            ),
            (
                200,
                r#"{"success":false,"error":"invalid_args","msg":"x"}"#,
                ErrorKind::Permanent,
            ),
            (200, "<html>maintenance</html>", ErrorKind::Transient),
            (
                401,
                r#"{"success":false,"error":"auth_error","msg":"Invalid user key"}"#,
                ErrorKind::Unauthenticated,
            ),
            (
                403,
                r#"{"success":false,"error":"invalid_args","msg":"Offer 5 is not your own"}"#,
                ErrorKind::Permanent,
            ),
            (
                404,
                r#"{"success":false,"error":"invalid_args","msg":"error 404/3603: no_such_ask Instance type by id 5 is not available."}"#,
                ErrorKind::NoCapacity,
            ),
            (
                410,
                r#"{"success":false,"error":"no_such_ask","msg":"error 410/3907: no_such_ask gone"}"#,
                ErrorKind::NoCapacity,
            ),
            (
                404,
                r#"{"success":false,"error":"not_found","msg":"x"}"#,
                ErrorKind::NotFound,
            ),
            (
                404,
                r#"{"success":false,"error":"no_such_instance","msg":"x"}"#,
                ErrorKind::NotFound,
            ),
            (
                410,
                r#"{"success":false,"error":"gone","msg":"deprecated"}"#,
                ErrorKind::Permanent,
            ),
            (
                400,
                r#"{"success":false,"error":"invalid_price","msg":"x"}"#,
                ErrorKind::Permanent,
            ),
            (
                400,
                r#"{"success":false,"error":"missing_billing","msg":"x"}"#,
                ErrorKind::PaymentRequired,
            ),
            (402, "Payment Required", ErrorKind::PaymentRequired),
            (
                403,
                r#"{"detail":"forbidden"}"#,
                ErrorKind::PermissionDenied,
            ),
        ];
        for (status, text, want) in table {
            assert_eq!(kind(status, text), want, "{status} {text}");
        }
        let ok = classify("test", &raw(200, r#"{"success":true,"new_contract":5}"#)).unwrap();
        assert_eq!(ok["new_contract"], 5);
        let hinted = Raw {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
            text: "API requests too frequent".into(),
        };
        assert_eq!(
            classify("t", &hinted).unwrap_err().kind,
            ErrorKind::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        // The page's title, not the whole HTML, is what a person reads.
        let e = classify(
            "t",
            &raw(
                502,
                "<html><head><title>502 Bad Gateway</title></head></html>",
            ),
        )
        .unwrap_err();
        assert_eq!(e.message, "HTTP 502: 502 Bad Gateway");
    }

    #[test]
    fn gpu_names_match_as_users_write_them() {
        assert!(gpu_matches("H100 SXM", "H100"));
        assert!(gpu_matches("H100 PCIE", "h100"));
        assert!(gpu_matches("RTX 4090", "RTX_4090"));
        assert!(gpu_matches("RTX 4090", "rtx 4090"));
        assert!(!gpu_matches("RTX 4090", "RTX 409"));
        assert!(!gpu_matches("H200", "H100"));
        assert!(!gpu_matches("RTX A6000", "A6000 Ada"));
    }

    #[test]
    fn filters_go_out_in_vast_names_and_units() {
        let f = |n: &str, t: &str| parse_filter(n, t).unwrap();
        assert_eq!(
            f("reliability", ">=0.98"),
            ("reliability".into(), json!({"gte": 0.98}))
        );
        assert_eq!(f("dph", "<=2"), ("dph_total".into(), json!({"lte": 2.0})));
        assert_eq!(
            f("gpu_ram", ">=24"),
            ("gpu_ram".into(), json!({"gte": 24000.0}))
        );
        assert_eq!(
            f("cuda_vers", ">=12.1"),
            ("cuda_max_good".into(), json!({"gte": 12.1}))
        );
        assert_eq!(
            f("verified", "true"),
            ("verified".into(), json!({"eq": true}))
        );
        assert_eq!(
            f("gpu_name", "RTX_4090"),
            ("gpu_name".into(), json!({"eq": "RTX 4090"}))
        );
        assert_eq!(
            f("geolocation", "US,CA"),
            ("geolocation".into(), json!({"in": ["US", "CA"]}))
        );
        assert_eq!(
            f("duration", ">=3"),
            ("duration".into(), json!({"gte": 259200.0}))
        );
        assert!(
            parse_filter("colour", "red")
                .unwrap_err()
                .contains("colour")
        );
        assert!(parse_filter("reliability", ">=").is_err());
    }

    fn resources(names: &[&str], count: u32, vram: Option<u32>) -> Resources {
        Resources {
            gpu: Some(GpuRequest {
                names: names.iter().map(|s| s.to_string()).collect(),
                count,
                min_vram_gb: vram,
            }),
            disk_gb: Some(50),
            cuda: Some("12.1".into()),
            cpus: None,
            memory_gb: None,
        }
    }

    fn vast_placement() -> Placement {
        Placement {
            provider: ProviderKind::Vast,
            ..Placement::local()
        }
    }

    #[test]
    fn the_search_query_carries_resources_and_placement() {
        let mut p = vast_placement();
        p.max_price_per_hour = Some(2.5);
        p.regions = vec!["US".into()];
        p.filters.insert("inet_down_cost".into(), "<=0.02".into());
        let q = search_query(&resources(&["RTX_4090", "RTX 3090"], 2, Some(24)), &p).unwrap();
        assert_eq!(q["num_gpus"], json!({"eq": 2}));
        assert_eq!(q["gpu_ram"], json!({"gte": 24000}));
        assert!(q.get("gpu_name").is_none());
        assert_eq!(q["cuda_max_good"], json!({"gte": 12.1}));
        assert_eq!(q["disk_space"], json!({"gte": 50}));
        assert_eq!(q["dph_total"], json!({"lte": 2.5}));
        assert_eq!(q["geolocation"], json!({"in": ["US"]}));
        assert_eq!(q["inet_down_cost"], json!({"lte": 0.02}));
        assert_eq!(q["type"], "on-demand");
        assert_eq!(q["rentable"], json!({"eq": true}));
        p.filters.insert("colour".into(), "red".into());
        assert!(search_query(&resources(&[], 1, None), &p).is_err());
    }

    fn offer(id: u64, name: &str, n: u32, vram: f64, price: f64) -> VastOffer {
        VastOffer {
            id,
            machine_id: None,
            gpu_name: name.into(),
            num_gpus: n,
            vram_gb: vram,
            dph_total: price,
            dph_base: None,
            min_bid: Some(price / 2.0),
            cuda: Some(12.4),
            disk_gb: Some(200.0),
            reliability: Some(0.99),
            geolocation: None,
            dlperf: None,
            verified: Some(true),
            storage_cost: None,
            inet_up_cost: None,
            inet_down_cost: None,
        }
    }

    #[test]
    fn the_cheapest_fitting_offer_comes_first() {
        let offers = vec![
            offer(1, "H100 SXM", 1, 80.0, 3.0),
            offer(2, "H100 PCIE", 1, 80.0, 2.2),
            offer(3, "H200", 1, 141.0, 1.0),
            offer(4, "H100 NVL", 2, 94.0, 1.5),
            offer(5, "H100 PCIE", 1, 40.0, 1.9),
        ];
        let mut p = vast_placement();
        let got: Vec<u64> = fitting(offers.clone(), &resources(&["H100"], 1, Some(80)), &p)
            .iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(got, vec![2, 1]);
        p.max_price_per_hour = Some(2.5);
        let got: Vec<u64> = fitting(offers.clone(), &resources(&["H100"], 1, Some(80)), &p)
            .iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(got, vec![2]);
        // Spot pays the bid: premium over min_bid.
        p.spot = true;
        p.premium_pct = Some(10.0);
        let o = &offers[0];
        assert_eq!(bid(o, &p), Some(1.65));
    }
}
