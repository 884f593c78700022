//! The `lambda` provider: Lambda Cloud's v1 API (`shared/providers.md` §2) over reqwest,
//! and the VMs it rents reached over the pooled OpenSSH transport.
//!
//! - **Where**: `ASIMOV_LAMBDA_API_URL` (up to and including `/api/v1`), else
//!   `https://cloud.lambda.ai/api/v1`. **Key**: `LAMBDA_API_KEY` from the credential
//!   store, else this process's environment; without one the provider is not built.
//! - **Ownership**: the tag is the instance's `name` (≤64 characters), set in the launch
//!   call itself; `list` is one `GET /instances` keeping the names that parse as tags.
//! - **Renting**: the placement's `instance_types` are tried first to last, each in the
//!   regions `/instance-types` lists with capacity (only the placement's `regions` when
//!   it names some). A launch refused for capacity although listed (Lambda's listing is
//!   racy) moves on to the next region, then the next type. When none launches the
//!   create answers `NoCapacity`, and the next attempt starts again from the first type:
//!   the note's "looping back while none has capacity". Without `instance_types`, the
//!   listed types whose GPUs fit the job's resources are tried, cheapest first.
//! - **Errors**: every answer goes through `classify`, once: Lambda's
//!   `{"error":{"code",...}}` codes first, then the HTTP status; HTML 5xx pages are
//!   transient. Terminating an instance already `terminating` answers an error that is
//!   not "not found": the instance is looked up, and `terminating` counts as done.
//! - **Retries and pacing**: about one request a second and one launch per 10 s, shared
//!   by every run of this process (`ASIMOV_LAMBDA_PACING` scales both, `0` disables).
//!   Idempotent calls retry in place on 429 and 5xx; a launch only on 429 (a 5xx may
//!   have launched: the planner adopts by tag instead).
//! - **SSH**: asimov's own key (`$ASIMOV_HOME/ssh/id_ed25519`) is registered by name
//!   (`asimov-<8 hex of the key>`) through `/ssh-keys` unless the account already has
//!   it, and named at launch; Lambda puts it in the VM. The VM is reached on port 22 of
//!   its `ip` as `ubuntu` unless the placement's `ssh_user` says otherwise.
//!   `ASIMOV_LAMBDA_SSH_PORT` replaces port 22 for tests that cannot bind it. A
//!   placement's `ssh_key` (an account key) with its `identity_file` replaces asimov's.
//! - **Self-termination**: Lambda has no instance-scoped key, so only a separate account
//!   key the user names (`terminate_key`, a stored secret) is handed over, through the
//!   shared end hook (`cloud::SelfEnd`); without one the controller terminates.
//! - **Boot**: by the type's GPU count, since billing runs from the launch: 1 GPU 10
//!   minutes (measured boots take 4-6), 2 GPUs 15, 3-4 GPUs 20, more (8-GPU types take
//!   20-25) or unknown 30. `ASIMOV_LAMBDA_BOOT_TIMEOUT` overrides: seconds for every
//!   type (`1800`), or per GPU count (`1x=900,8x=2700`), or both (`1200,8x=2700`).
//!
//! Must not know about the store or the planner.

use super::cloud::{self, LoginUsers, Pacer, ensure_identity, key_body, short_body};
use crate::home::Home;
use crate::manifest::Resources;
use crate::model::{InstanceId, OwnerTag, ProviderKind, Secret};
use crate::model::{Offer, OfferQuery, Usd};
use crate::provider::{
    Capabilities, CreateRequest, Endpoint, ErrorKind, Instance, InstanceState,
    Pacing as ProviderPacing, Provider, ProviderError, ProviderResult,
};
use crate::retry::{Backoff, retry_transient};
use crate::transport::Transport;
use crate::transport::ssh::SshPool;
use async_trait::async_trait;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_API_URL: &str = "https://cloud.lambda.ai/api/v1";
pub const URL_ENV: &str = "ASIMOV_LAMBDA_API_URL";
pub const KEY_NAME: &str = "LAMBDA_API_KEY";
pub const PACING_ENV: &str = "ASIMOV_LAMBDA_PACING";
/// Test-only: the port to reach instances on instead of 22.
pub const SSH_PORT_ENV: &str = "ASIMOV_LAMBDA_SSH_PORT";
/// Seconds an instance waits for the controller to collect its run before it ends itself.
pub const GRACE_ENV: &str = "ASIMOV_LAMBDA_SELF_END_GRACE";
/// Seconds an instance may boot before its attempt ends: `SECS` for every type,
/// `Nx=SECS` for types with N GPUs, comma-separated (see [`BootTimeouts`]).
pub const BOOT_TIMEOUT_ENV: &str = "ASIMOV_LAMBDA_BOOT_TIMEOUT";
/// Test servers only: seconds a new instance may be missing from the listing instead
/// of `LISTING_LAG`, so that tests and campaigns need not wait two minutes.
pub const LISTING_LAG_ENV: &str = "ASIMOV_LAMBDA_LISTING_LAG_SECS";
/// Whether Lambda lists a launch at once is unverified: the planner waits this long.
const LISTING_LAG: Duration = Duration::from_secs(120);
/// Lambda's login user on its images.
pub const DEFAULT_SSH_USER: &str = "ubuntu";
/// Lambda's limit on an instance name.
const MAX_NAME: usize = 64;
const REMOTE_ROOT: &str = "~/.asimov-agent";

const INSUFFICIENT_CAPACITY: &str = "instance-operations/launch/insufficient-capacity";

/// Classes of call with their own pacing: every request keeps the general gap, a
/// launch also keeps the launch gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    Any,
    Launch,
}

/// Lambda's documented limits (about 1 request/s, one launch per 10 s) times `factor`.
pub fn pacing(factor: f64) -> BTreeMap<Call, Duration> {
    BTreeMap::from([
        (Call::Any, Duration::from_secs_f64(1.0 * factor)),
        (Call::Launch, Duration::from_secs_f64(10.0 * factor)),
    ])
}

/// How long an instance may boot, by its type's GPU count: a hung 1-GPU VM stops
/// billing after 10 minutes, an 8-GPU one booting for 25 is never given up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootTimeouts {
    /// Replaces the defaults for every type (a bare `SECS` in the override).
    every: Option<Duration>,
    /// Per GPU count (`Nx=SECS`), before `every` and the defaults.
    by_gpus: BTreeMap<u32, Duration>,
}

impl BootTimeouts {
    /// Lambda's defaults. Third parties measured 4-6 minutes to `active` for 1-GPU
    /// types, 10-15 (up to 25) for 8-GPU ones (`shared/providers.md` §2.8).
    pub fn default_for(gpus: u32) -> Duration {
        let minutes = match gpus {
            1 => 10,
            2 => 15,
            3 | 4 => 20,
            // 8 GPUs, or a type whose GPU count the listing did not say: the slowest.
            _ => 30,
        };
        Duration::from_secs(minutes * 60)
    }

    /// The table with `ASIMOV_LAMBDA_BOOT_TIMEOUT` applied (`None`: the defaults).
    /// Entries that do not parse are left out with a warning.
    pub fn parse(text: Option<&str>) -> BootTimeouts {
        let mut out = BootTimeouts {
            every: None,
            by_gpus: BTreeMap::new(),
        };
        for entry in text.unwrap_or("").split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            let secs = |v: &str| v.trim().parse::<u64>().ok().map(Duration::from_secs);
            let parsed = match entry.split_once('=') {
                Some((gpus, v)) => gpus
                    .trim()
                    .strip_suffix('x')
                    .and_then(|n| n.parse::<u32>().ok())
                    .zip(secs(v))
                    .map(|(n, d)| {
                        out.by_gpus.insert(n, d);
                    }),
                None => secs(entry).map(|d| out.every = Some(d)),
            };
            if parsed.is_none() {
                tracing::warn!(%entry, "{BOOT_TIMEOUT_ENV}: not SECS or Nx=SECS; left out");
            }
        }
        out
    }

    /// The boot timeout of a type with `gpus` GPUs (0: not known).
    pub fn of(&self, gpus: u32) -> Duration {
        self.by_gpus
            .get(&gpus)
            .copied()
            .or(self.every)
            .unwrap_or_else(|| BootTimeouts::default_for(gpus))
    }

    /// The longest of the table: for an instance whose type is not known.
    pub fn longest(&self) -> Duration {
        let defaults = [0, 1, 2, 4, 8].map(|n| self.of(n));
        defaults
            .into_iter()
            .chain(self.by_gpus.values().copied())
            .max()
            .unwrap_or_else(|| BootTimeouts::default_for(0))
    }
}

/// The GPU count of a listed type: its `specs.gpus`, else its name (`gpu_8x_h100_sxm5`).
fn type_gpus(instance_type: Option<&Value>) -> u32 {
    let specs = instance_type
        .and_then(|t| t.get("specs"))
        .and_then(|s| s.get("gpus"))
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    specs.unwrap_or_else(|| {
        instance_type
            .and_then(|t| t.get("name"))
            .and_then(Value::as_str)
            .and_then(|n| n.strip_prefix("gpu_"))
            .and_then(|n| n.split_once("x_"))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(0)
    })
}

/// The API key: the credential store first, then this process's environment.
pub fn api_key(home: &Home) -> Option<Secret> {
    cloud::api_key(home, KEY_NAME)
}

fn err(kind: ErrorKind, step: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderKind::Lambda, kind, step, message)
}

/// One HTTP answer before classification.
#[derive(Debug)]
struct Raw {
    status: u16,
    retry_after: Option<Duration>,
    text: String,
}

/// Every Lambda answer into its `data` or a canonical error: the one place that reads
/// status codes, error codes and messages.
fn classify(step: &'static str, raw: &Raw) -> ProviderResult<Value> {
    let json: Option<Value> = serde_json::from_str(&raw.text).ok();
    let error = json.as_ref().and_then(|v| v.get("error"));
    let code = error
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let msg = error
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| short_body(&raw.text));
    if (200..300).contains(&raw.status) && error.is_none() {
        return match json.and_then(|mut v| v.get_mut("data").map(Value::take)) {
            Some(data) => Ok(data),
            // A 200 without the envelope comes from something in between.
            None => Err(err(
                ErrorKind::Transient,
                step,
                format!("HTTP {}: answer without data: {msg}", raw.status),
            )),
        };
    }
    // Lambda's suggestion says where there is capacity (for a type its listing shows
    // yet refuses): worth keeping in what the user reads.
    let msg = match error
        .and_then(|e| e.get("suggestion"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(suggestion) => format!("{msg} ({suggestion})"),
        None => msg,
    };
    let message = if code.is_empty() {
        format!("HTTP {}: {msg}", raw.status)
    } else {
        format!("HTTP {}: {code}: {msg}", raw.status)
    };
    let rate_limited = ErrorKind::RateLimited {
        retry_after: raw.retry_after,
    };
    let kind = match code {
        INSUFFICIENT_CAPACITY => ErrorKind::NoCapacity,
        // The account's instance quota: frees up as other instances end.
        "global/quota-exceeded" => ErrorKind::NoCapacity,
        "global/object-does-not-exist" if raw.status == 404 => ErrorKind::NotFound,
        "global/invalid-api-key" | "global/account-inactive" => ErrorKind::Unauthenticated,
        _ => match raw.status {
            401 | 403 => ErrorKind::Unauthenticated,
            404 => ErrorKind::NotFound,
            429 => rate_limited,
            408 | 500..=599 => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        },
    };
    Err(err(kind, step, message))
}

/// One instance type as `/instance-types` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceType {
    pub name: String,
    pub gpu_description: String,
    pub gpus: u32,
    pub price_per_hour: f64,
    /// Regions listed with capacity now (racy: a launch may still be refused).
    pub regions: Vec<String>,
}

fn parse_types(data: &Value) -> Vec<InstanceType> {
    let Some(map) = data.as_object() else {
        return Vec::new();
    };
    let mut out: Vec<InstanceType> = map
        .iter()
        .filter_map(|(key, v)| {
            let t = v.get("instance_type")?;
            Some(InstanceType {
                name: t
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or(key)
                    .to_string(),
                gpu_description: t
                    .get("gpu_description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                gpus: t
                    .get("specs")
                    .and_then(|s| s.get("gpus"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as u32,
                price_per_hour: t
                    .get("price_cents_per_hour")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
                    / 100.0,
                regions: v
                    .get("regions_with_capacity_available")
                    .and_then(Value::as_array)
                    .map(|rs| {
                        rs.iter()
                            .filter_map(|r| r.get("name").and_then(Value::as_str))
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The types to try, in order: the placement's as written, else those whose GPUs fit
/// the job, cheapest first.
pub fn candidates(
    listed: &[InstanceType],
    wanted: &[String],
    resources: &Resources,
) -> Vec<InstanceType> {
    if !wanted.is_empty() {
        return wanted
            .iter()
            .map(|w| {
                listed
                    .iter()
                    .find(|t| &t.name == w)
                    .cloned()
                    // Unlisted: no capacity anywhere, but still a type the user asked for.
                    .unwrap_or_else(|| InstanceType {
                        name: w.clone(),
                        gpu_description: String::new(),
                        gpus: 0,
                        price_per_hour: 0.0,
                        regions: Vec::new(),
                    })
            })
            .collect();
    }
    let mut fit: Vec<InstanceType> = listed
        .iter()
        .filter(|t| match &resources.gpu {
            Some(g) => {
                t.gpus == g.count
                    && (g.names.is_empty()
                        || g.names.iter().any(|n| {
                            let n = n.replace(['_', ' '], "").to_uppercase();
                            t.gpu_description
                                .replace(['_', ' '], "")
                                .to_uppercase()
                                .contains(&n)
                                || t.name.replace('_', "").to_uppercase().contains(&n)
                        }))
            }
            None => true,
        })
        .cloned()
        .collect();
    fit.sort_by(|a, b| {
        a.price_per_hour
            .partial_cmp(&b.price_per_hour)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.name.cmp(&b.name))
    });
    fit
}

struct Api {
    http: reqwest::Client,
    base: String,
    key: Secret,
    pacer: Pacer<Call>,
    retry: Backoff,
}

impl Api {
    async fn send(
        &self,
        launch: bool,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> ProviderResult<Raw> {
        // The launch slot first: the overall slot must be the last wait before sending,
        // or a launch leaves a launch gap after its overall slot, among later requests.
        if launch {
            self.pacer.wait(Call::Launch).await;
        }
        self.pacer.wait(Call::Any).await;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.key.expose());
        if let Some(body) = body {
            req = req.json(body);
        }
        let step = "call the lambda api";
        let resp = req
            .send()
            .await
            .map_err(|e| err(ErrorKind::Transient, step, format!("{path}: {e}")).with_source(e))?;
        let status = resp.status().as_u16();
        let retry_after = cloud::retry_after(resp.headers());
        if status == 429 {
            // Everyone in this process waits, not only this call.
            let by = retry_after.unwrap_or(self.pacer.gap(Call::Any));
            self.pacer
                .back_off(if launch { Call::Launch } else { Call::Any }, by);
        }
        let text = resp
            .text()
            .await
            .map_err(|e| err(ErrorKind::Transient, step, format!("{path}: {e}")).with_source(e))?;
        Ok(Raw {
            status,
            retry_after,
            text,
        })
    }

    async fn call(
        &self,
        step: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> ProviderResult<Value> {
        retry_transient(&self.retry, super::cloud::transient, || async {
            let raw = self
                .send(false, method.clone(), path, body)
                .await
                .map_err(|e| ProviderError { step, ..e })?;
            classify(step, &raw)
        })
        .await
    }
}

pub struct LambdaProvider {
    api: Api,
    home: Home,
    pool: Arc<SshPool>,
    identity: PathBuf,
    users: LoginUsers,
    /// Per tag: the local identity file of a placement's `ssh_key` (asimov's otherwise).
    identities: LoginUsers,
    /// Per tag: the stored secret holding the key the instance ends itself with.
    terminate_keys: LoginUsers,
    self_end_grace: Duration,
    boot_timeouts: BootTimeouts,
    /// The boot timeout of each instance still booting, by the last listing.
    booting: std::sync::Mutex<BTreeMap<InstanceId, Duration>>,
    ssh_port: u16,
    /// The account key name asimov's key is registered under, once known.
    key_name: tokio::sync::Mutex<Option<String>>,
    /// `LISTING_LAG`, or `LISTING_LAG_ENV` seconds against a test server.
    listing_lag: Duration,
}

impl std::fmt::Debug for LambdaProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LambdaProvider")
            .field("base", &self.api.base)
            .finish_non_exhaustive()
    }
}

impl LambdaProvider {
    /// The provider for this home when a key is configured (`None` otherwise).
    pub fn from_home(home: &Home, pool: Arc<SshPool>) -> std::io::Result<Option<LambdaProvider>> {
        let Some(key) = api_key(home) else {
            return Ok(None);
        };
        let base = cloud::api_url(URL_ENV, DEFAULT_API_URL);
        let pacing = pacing(cloud::pacing_factor(PACING_ENV));
        LambdaProvider::new(home, pool, base, key, pacing).map(Some)
    }

    pub fn new(
        home: &Home,
        pool: Arc<SshPool>,
        base: impl Into<String>,
        key: Secret,
        pacing: BTreeMap<Call, Duration>,
    ) -> std::io::Result<LambdaProvider> {
        let ssh_port = std::env::var(SSH_PORT_ENV)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(22);
        Ok(LambdaProvider {
            api: Api {
                http: cloud::http_client()?,
                base: base.into().trim_end_matches('/').to_string(),
                key,
                pacer: Pacer::new(pacing),
                retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(15), 2.0)
                    .with_max_elapsed(Some(Duration::from_secs(90))),
            },
            home: home.clone(),
            pool,
            identity: home.ssh_identity(),
            users: LoginUsers::new(
                home.provider_state("lambda").join("users"),
                DEFAULT_SSH_USER,
            ),
            identities: LoginUsers::new(
                home.provider_state("lambda").join("identities"),
                home.ssh_identity().to_string_lossy(),
            ),
            terminate_keys: LoginUsers::new(
                home.provider_state("lambda").join("terminate-keys"),
                "",
            ),
            self_end_grace: cloud::self_end_grace(GRACE_ENV),
            boot_timeouts: BootTimeouts::parse(std::env::var(BOOT_TIMEOUT_ENV).ok().as_deref()),
            booting: std::sync::Mutex::new(BTreeMap::new()),
            ssh_port,
            key_name: tokio::sync::Mutex::new(None),
            listing_lag: super::seconds_env(LISTING_LAG_ENV, LISTING_LAG),
        })
    }

    /// Retries in place within this policy (tests shorten it).
    pub fn with_retry(mut self, policy: Backoff) -> LambdaProvider {
        self.api.retry = policy;
        self
    }

    /// Logs in as `user` where no placement says otherwise.
    pub fn with_default_user(mut self, user: impl Into<String>) -> LambdaProvider {
        self.users = LoginUsers::new(self.users.dir().to_path_buf(), user);
        self
    }

    /// Reaches instances on `port` instead of 22 (tests that cannot bind port 22).
    pub fn with_ssh_port(mut self, port: u16) -> LambdaProvider {
        self.ssh_port = port;
        self
    }

    pub fn identity_file(&self) -> &Path {
        &self.identity
    }

    /// Instance types with prices and the regions listing capacity.
    pub async fn instance_types(&self) -> ProviderResult<Vec<InstanceType>> {
        let data = self
            .api
            .call(
                "list instance types",
                reqwest::Method::GET,
                "/instance-types",
                None,
            )
            .await?;
        Ok(parse_types(&data))
    }

    /// The instance types that fit `resources` and `placement` (its `instance_types`
    /// when it names some, its `max_price_per_hour`), with the regions listing capacity.
    pub async fn offers(
        &self,
        resources: &Resources,
        placement: &crate::manifest::Placement,
    ) -> ProviderResult<Vec<cloud::CatalogOffer>> {
        let listed = self.instance_types().await?;
        let mut out: Vec<cloud::CatalogOffer> =
            candidates(&listed, &placement.instance_types, resources)
                .into_iter()
                .filter(|t| {
                    placement
                        .max_price_per_hour
                        .is_none_or(|max| t.price_per_hour <= max + 1e-9)
                })
                .filter(|t| {
                    let want = resources.gpu.as_ref().and_then(|g| g.min_vram_gb);
                    want.is_none_or(|w| vram_gb(&t.gpu_description).is_none_or(|v| v >= w as f64))
                })
                .map(|t| cloud::CatalogOffer {
                    available: !t.regions.is_empty(),
                    vram_gb: vram_gb(&t.gpu_description),
                    id: t.name,
                    gpu: t.gpu_description,
                    count: t.gpus,
                    price_per_hour: t.price_per_hour,
                    regions: t.regions,
                })
                .collect();
        cloud::sort_offers(&mut out);
        Ok(out)
    }

    /// The name asimov's key has in the account, registering it the first time.
    async fn ensure_key(&self) -> ProviderResult<String> {
        let step = "register the ssh key";
        let mut known = self.key_name.lock().await;
        if let Some(name) = known.as_ref() {
            return Ok(name.clone());
        }
        let public = ensure_identity(&self.identity).map_err(|e| {
            err(
                ErrorKind::Permanent,
                step,
                format!("{}: {e}", self.identity.display()),
            )
        })?;
        let ours = key_body(&public);
        let keys = self
            .api
            .call(step, reqwest::Method::GET, "/ssh-keys", None)
            .await?;
        let existing = keys.as_array().and_then(|ks| {
            ks.iter().find_map(|k| {
                let text = k.get("public_key").and_then(Value::as_str)?;
                (key_body(text) == ours)
                    .then(|| k.get("name").and_then(Value::as_str).map(str::to_string))
                    .flatten()
            })
        });
        let name = match existing {
            Some(name) => name,
            None => {
                let name = format!("asimov-{}", fingerprint(&ours));
                self.api
                    .call(
                        step,
                        reqwest::Method::POST,
                        "/ssh-keys",
                        Some(&json!({"name": name, "public_key": public})),
                    )
                    .await?;
                tracing::info!(key = %name, "registered asimov's ssh key with the lambda account");
                name
            }
        };
        *known = Some(name.clone());
        Ok(name)
    }

    /// One launch; `NoCapacity` when Lambda refuses for capacity.
    async fn launch(
        &self,
        tag: &str,
        type_name: &str,
        region: &str,
        key: &str,
    ) -> ProviderResult<String> {
        let step = "launch instance";
        let body = json!({
            "region_name": region,
            "instance_type_name": type_name,
            "ssh_key_names": [key],
            "name": tag,
            "quantity": 1,
        });
        let data = retry_transient(&self.api.retry, super::cloud::refused, || async {
            let raw = self
                .api
                .send(
                    true,
                    reqwest::Method::POST,
                    "/instance-operations/launch",
                    Some(&body),
                )
                .await
                .map_err(|e| ProviderError { step, ..e })?;
            classify(step, &raw)
        })
        .await?;
        data.get("instance_ids")
            .and_then(Value::as_array)
            .and_then(|ids| ids.first())
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                // "Success" that launched nothing: the listing is the truth; look again.
                err(
                    ErrorKind::Transient,
                    step,
                    format!("answer without instance_ids: {data}"),
                )
            })
    }

    fn instance(&self, v: &Value) -> Option<Instance> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::trim);
        let name = s("name")?;
        let tag = OwnerTag::parse(name)?;
        let id = s("id")?.to_string();
        let ip = s("ip").filter(|ip| !ip.is_empty());
        let endpoint = ip.map(|ip| Endpoint::Ssh {
            host: ip.to_string(),
            port: self.ssh_port,
            user: self.users.get(name),
            identity_file: Some(PathBuf::from(self.identities.get(name))),
            root: format!("{REMOTE_ROOT}/{name}"),
        });
        let state = match s("status").unwrap_or("") {
            "active" if endpoint.is_some() => InstanceState::Running,
            "terminating" | "terminated" => InstanceState::Terminating,
            // Lambda has no stop: preempted means the machine is gone for this run.
            "preempted" => InstanceState::Stopped,
            // booting, unhealthy (may come back by restart), active without ip yet.
            _ => InstanceState::Provisioning,
        };
        let itype = v.get("instance_type");
        let gpu = itype
            .and_then(|t| t.get("gpu_description"))
            .and_then(Value::as_str)
            .map(|d| {
                let n = itype
                    .and_then(|t| t.get("specs"))
                    .and_then(|s| s.get("gpus"))
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                format!("{n}x {d}")
            });
        Some(Instance {
            provider: ProviderKind::Lambda,
            id,
            tag,
            state,
            endpoint,
            gpu,
            price_per_hour: Usd::from_dollars(
                itype
                    .and_then(|t| t.get("price_cents_per_hour"))
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
                    / 100.0,
            ),
            created_at: None,
            host: None,
        })
    }

    /// Whether `id` is already on its way out (or gone), after a terminate refused.
    async fn terminating(&self, id: &str) -> ProviderResult<bool> {
        match self
            .api
            .call(
                "look up instance",
                reqwest::Method::GET,
                &format!("/instances/{id}"),
                None,
            )
            .await
        {
            Ok(v) => Ok(matches!(
                v.get("status").and_then(Value::as_str),
                Some("terminating" | "terminated")
            )),
            Err(e) => Err(e),
        }
    }
}

/// Per-GPU memory from Lambda's description (`A10 (24 GB PCIe)`, `H100 (80 GB SXM5)`).
fn vram_gb(description: &str) -> Option<f64> {
    let at = description.find(" GB")?;
    let digits: String = description[..at]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().ok()
}

/// 8 hex digits naming a public key (FNV-1a of its text): stable across processes.
fn fingerprint(key: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

#[async_trait]
impl Provider for LambdaProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Lambda
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            listing_lag: self.listing_lag,
            // By type: a 1-GPU VM that hangs stops billing after 10 minutes, an 8-GPU
            // one booting in 25 is never given up early.
            boot_timeout: self.boot_timeouts.longest(),
            boot_timeouts: self
                .booting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            pacing: ProviderPacing {
                // Launches queue 10 s apart in the pacer; more in flight only waits.
                max_in_flight: 4,
                min_resync: Duration::from_secs(30),
            },
            resync: Duration::from_secs(300),
            // No stop on Lambda: a preempted instance is gone, not billing.
            bills_while_stopped: false,
            ssh_user: Some(DEFAULT_SSH_USER.to_string()),
            fixed_pool: false,
            keep_disk: None,
        }
    }

    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        let resources = Resources {
            gpu: query.min_count.map(|n| crate::manifest::GpuRequest {
                names: Vec::new(),
                count: n,
                min_vram_gb: None,
            }),
            ..Resources::default()
        };
        let mut listed = self.instance_types().await?;
        listed.retain(|t| query.min_count.is_none_or(|n| t.gpus >= n));
        let types = candidates(
            &listed,
            &[],
            &Resources {
                gpu: None,
                ..resources
            },
        );
        Ok(types
            .into_iter()
            .filter(|t| !t.regions.is_empty())
            .map(|t| Offer {
                provider: ProviderKind::Lambda,
                id: t.name.clone(),
                gpu: (!t.gpu_description.is_empty()).then(|| t.gpu_description.clone()),
                count: t.gpus,
                vram_gb: vram_gb(&t.gpu_description),
                price_per_hour: Usd::from_dollars(t.price_per_hour),
                cuda: None,
                disk_gb: None,
                reliability: None,
                location: Some(t.regions.join(",")),
                extra: Vec::new(),
            })
            .filter(|o| query.matches(o))
            .collect())
    }

    async fn list(&self) -> ProviderResult<Vec<Instance>> {
        let step = "list instances";
        let data = self
            .api
            .call(step, reqwest::Method::GET, "/instances", None)
            .await?;
        let items = data
            .as_array()
            .ok_or_else(|| err(ErrorKind::Transient, step, "answer without a list"))?;
        let mut booting = BTreeMap::new();
        let instances: Vec<Instance> = items
            .iter()
            .filter_map(|v| {
                let i = self.instance(v)?;
                if i.state == InstanceState::Provisioning {
                    let gpus = type_gpus(v.get("instance_type"));
                    booting.insert(i.id.clone(), self.boot_timeouts.of(gpus));
                }
                Some(i)
            })
            .collect();
        // A complete listing: what no longer boots drops out.
        *self.booting.lock().unwrap_or_else(|e| e.into_inner()) = booting;
        Ok(instances)
    }

    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance> {
        let step = "create instance";
        let tag = req.tag.render();
        if tag.len() > MAX_NAME {
            return Err(err(
                ErrorKind::Permanent,
                step,
                format!(
                    "the ownership tag {tag:?} is longer than Lambda's {MAX_NAME}-character name; shorten the job name"
                ),
            ));
        }
        // What the placement names is recorded by tag before the launch, so a
        // controller restarted mid-create adopts with the same user, key and hand-over.
        let keys = &req.placement.keys;
        let remember = [
            (&self.users, req.placement.ssh_user.clone()),
            (
                &self.identities,
                keys.identity_file
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
            ),
            (&self.terminate_keys, keys.terminate_key.clone()),
        ];
        for (store, value) in remember {
            if let Some(value) = value {
                store.remember(&tag, &value).map_err(|e| {
                    err(
                        ErrorKind::Transient,
                        step,
                        format!("{}: {e}", store.dir().display()),
                    )
                })?;
            }
        }
        // A create retried after being cut off (timeout, crash) finds the first one.
        if let Some(existing) = self
            .list()
            .await?
            .into_iter()
            .find(|i| i.tag == req.tag && i.state != InstanceState::Terminating)
        {
            tracing::info!(instance = %existing.id, %tag, "lambda instance with this tag exists; adopting it");
            return Ok(existing);
        }
        let key = match &keys.ssh_key {
            // The account key the placement names; Lambda refuses the launch if unknown.
            Some(name) => name.clone(),
            None => self.ensure_key().await?,
        };
        let listed = self.instance_types().await?;
        let types = candidates(&listed, &req.placement.instance_types, &req.resources);
        if types.is_empty() {
            return Err(err(
                ErrorKind::NoCapacity,
                step,
                "no instance type fits the job's resources",
            ));
        }
        let mut refused_at = Vec::new();
        for t in &types {
            let regions: Vec<&String> = t
                .regions
                .iter()
                .filter(|r| req.placement.regions.is_empty() || req.placement.regions.contains(r))
                .collect();
            if regions.is_empty() {
                tracing::info!(instance_type = %t.name, "no lambda capacity listed; trying the next type");
                refused_at.push(format!("{} (none listed)", t.name));
            }
            for region in regions {
                match self.launch(&tag, &t.name, region, &key).await {
                    Ok(id) => {
                        return Ok(Instance {
                            provider: ProviderKind::Lambda,
                            id,
                            tag: req.tag.clone(),
                            state: InstanceState::Provisioning,
                            endpoint: None,
                            gpu: (!t.gpu_description.is_empty())
                                .then(|| format!("{}x {}", t.gpus.max(1), t.gpu_description)),
                            price_per_hour: Usd::from_dollars(t.price_per_hour),
                            created_at: None,
                            host: None,
                        });
                    }
                    Err(e) if e.kind == ErrorKind::NoCapacity => {
                        tracing::info!(instance_type = %t.name, %region, error = %e, "lambda launch refused for capacity; moving on");
                        refused_at.push(format!("{} in {region}: {}", t.name, e.message));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Err(err(
            ErrorKind::NoCapacity,
            step,
            format!("no capacity: {}", refused_at.join(", ")),
        ))
    }

    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()> {
        let step = "terminate instance";
        let result = self
            .api
            .call(
                step,
                reqwest::Method::POST,
                "/instance-operations/terminate",
                Some(&json!({"instance_ids": [id]})),
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::NotFound
                        | ErrorKind::Unauthenticated
                        | ErrorKind::RateLimited { .. }
                ) =>
            {
                Err(e)
            }
            // Lambda answers a terminate of a `terminating` instance with an unhelpful
            // error: look, and count "on its way out" as done.
            Err(e) => match self.terminating(id).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(e),
                Err(look) if look.kind == ErrorKind::NotFound => Err(look),
                Err(_) => Err(e),
            },
        }
    }

    fn machine(&self, instance: &Instance) -> ProviderResult<Arc<dyn crate::agent::Machine>> {
        let (transport, root) =
            cloud::ssh_transport(&self.pool, instance, "reach instance", "has no ip yet")?;
        let tag = instance.tag.render();
        let secret = self.terminate_keys.get(&tag);
        if secret.is_empty() {
            // No key handed over: the controller terminates it (it bills until then).
            return Ok(cloud::agent_machine(transport, root));
        }
        let Some(key) = cloud::api_key(&self.home, &secret) else {
            tracing::warn!(instance = %instance.id, %secret, "the terminate key is not stored: this instance cannot end itself");
            return Ok(cloud::agent_machine(transport, root));
        };
        let transport = Arc::new(transport) as Arc<dyn Transport>;
        let end = cloud::SelfEnd {
            name: "lambda",
            method: "POST",
            url: format!("{}/instance-operations/terminate", self.api.base),
            body: json!({"instance_ids": [instance.id]}).to_string(),
            // Lambda's errors come in an `error` envelope, also inside HTTP 200.
            refused_in_ok: r#""error""#,
            grace: self.self_end_grace,
            find_key: None,
        };
        let auth = Secret::new(format!("Authorization: Bearer {}", key.expose()));
        Ok(Arc::new(
            cloud::CloudMachine::new(transport, root).ending(end, Some(auth)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(status: u16, text: &str) -> Raw {
        Raw {
            status,
            retry_after: None,
            text: text.to_string(),
        }
    }

    fn kind(status: u16, text: &str) -> Option<ErrorKind> {
        classify("test", &raw(status, text)).err().map(|e| e.kind)
    }

    #[test]
    fn answers_map_to_canonical_kinds() {
        let e = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
        let table: Vec<(u16, String, Option<ErrorKind>)> = vec![
            (200, r#"{"data":[]}"#.into(), None),
            (400, e(INSUFFICIENT_CAPACITY), Some(ErrorKind::NoCapacity)),
            (400, e("global/quota-exceeded"), Some(ErrorKind::NoCapacity)),
            (
                404,
                e("global/object-does-not-exist"),
                Some(ErrorKind::NotFound),
            ),
            (
                400,
                e("global/object-does-not-exist"),
                Some(ErrorKind::Permanent),
            ),
            (
                400,
                e("global/invalid-parameters"),
                Some(ErrorKind::Permanent),
            ),
            (
                401,
                e("global/invalid-api-key"),
                Some(ErrorKind::Unauthenticated),
            ),
            (
                429,
                "Too Many Requests".into(),
                Some(ErrorKind::RateLimited { retry_after: None }),
            ),
            (
                502,
                "<html><head><title>502 Bad Gateway</title></head></html>".into(),
                Some(ErrorKind::Transient),
            ),
            (
                200,
                "<html>maintenance</html>".into(),
                Some(ErrorKind::Transient),
            ),
            (200, e("global/internal-error"), Some(ErrorKind::Permanent)),
        ];
        for (status, text, want) in table {
            assert_eq!(kind(status, &text), want, "{status} {text}");
        }
    }

    #[test]
    fn boot_timeouts_go_by_gpu_count_and_the_override_replaces_all_or_some() {
        let min = |m: u64| Duration::from_secs(m * 60);
        let d = BootTimeouts::parse(None);
        assert_eq!(
            [1, 2, 4, 8, 0].map(|n| d.of(n)),
            [min(10), min(15), min(20), min(30), min(30)]
        );
        assert_eq!(d.longest(), min(30));
        let every = BootTimeouts::parse(Some("1800"));
        assert_eq!(every.of(1), min(30));
        let some = BootTimeouts::parse(Some(" 1x=8, 8x=2700 ,bogus, 3x=q"));
        assert_eq!(some.of(1), Duration::from_secs(8));
        assert_eq!(some.of(8), min(45));
        assert_eq!(some.of(2), min(15), "the default where none is given");
        assert_eq!(some.longest(), min(45));
        let both = BootTimeouts::parse(Some("20,8x=30"));
        assert_eq!(both.of(1), Duration::from_secs(20));
        assert_eq!(both.of(8), Duration::from_secs(30));
        assert_eq!(both.longest(), Duration::from_secs(30));
        let named = json!({"name": "gpu_8x_h100_sxm5"});
        assert_eq!(type_gpus(Some(&named)), 8);
        let specs = json!({"name": "odd", "specs": {"gpus": 2}});
        assert_eq!(type_gpus(Some(&specs)), 2);
        assert_eq!(type_gpus(None), 0);
    }

    #[test]
    fn placement_types_keep_their_order_and_unlisted_ones_have_no_regions() {
        let listed = vec![InstanceType {
            name: "gpu_1x_a10".into(),
            gpu_description: "A10 (24 GB PCIe)".into(),
            gpus: 1,
            price_per_hour: 0.75,
            regions: vec!["us-east-1".into()],
        }];
        let got = candidates(
            &listed,
            &["gpu_1x_gh200".into(), "gpu_1x_a10".into()],
            &Resources::default(),
        );
        assert_eq!(got[0].name, "gpu_1x_gh200");
        assert!(got[0].regions.is_empty());
        assert_eq!(got[1].regions, vec!["us-east-1".to_string()]);
    }
}
