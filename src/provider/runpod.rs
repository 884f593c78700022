//! The `runpod` provider: RunPod's REST v2 pod API (`shared/providers.md` §3) over
//! reqwest, and the pods it rents reached over the pooled OpenSSH transport.
//!
//! - **Where**: `ASIMOV_RUNPOD_API_URL` (up to and including `/v2`), else
//!   `https://api.runpod.io/v2`. **Key**: `RUNPOD_API_KEY` from the credential store,
//!   else this process's environment; without one the provider is not built.
//! - **Ownership**: the tag is the pod's `name`, set in the create call itself; `list` is
//!   one `GET /pods` keeping the names that parse as tags.
//! - **Renting**: GPU types come from the placement's `instance_types` (RunPod ids such
//!   as `NVIDIA GeForce RTX 4090`, or names as users write them) else the job's GPU
//!   names, resolved against `/catalog/gpus` (`RTX 4090`, `RTX_4090` and the full id all
//!   name `NVIDIA GeForce RTX 4090`), tried in order; each create names exactly one GPU
//!   type (RunPod never substitutes), the job's `regions` as `dataCenterIds`, and the
//!   cloud (`SECURE` unless the placement's `filters` say `cloud: community`). A 400
//!   whose `detail` says no instances are available moves on to the next type.
//! - **Bodies**: only fields of v2's `CreatePodRequest` are sent; the API refuses others.
//! - **States**: `PROVISIONING`/`STARTING`, and `RUNNING` until `ssh.direct` appears, are
//!   provisioning; `RUNNING` with `ssh.direct` is running; `EXITED` and `ERROR` count as
//!   lost (the planner destroys the pod and retries), `TERMINATED` as going; so does a
//!   container seen restarting `RESTART_LOOP` times (`startedAt` changing).
//! - **Self-deletion**: the pod deletes itself with its own `RUNPOD_API_KEY` (read on
//!   the pod) through the shared end hook (`cloud::SelfEnd`); a pod without one is
//!   deleted by the controller.
//! - **SSH**: the direct TCP endpoint (`ssh.direct`, public ip and mapped port), never
//!   the `ssh.runpod.io` proxy, which offers no exec or file copy. asimov's own public key
//!   goes in the pod's `PUBLIC_KEY`, which RunPod's images put in `authorized_keys`: the
//!   account's keys are left alone. Login user `root` unless `ssh_user` says otherwise.
//! - **Pacing**: one request per `w/q` seconds of the `RateLimit-Policy` minute window
//!   (one a second until a server says), and a wait until the window resets when
//!   `RateLimit` shows none left; 429 honours `Retry-After`. Shared by every run.
//!
//! Must not know about the store or the planner.

use super::cloud::{self, LoginUsers, Pacer, ensure_identity, short_body};
use crate::home::Home;
use crate::model::{InstanceId, OwnerTag, ProviderKind, Secret};
use crate::model::{Offer, OfferQuery, Usd};
use crate::provider::{
    Capabilities, CreateRequest, Endpoint, ErrorKind, Instance, InstanceState,
    Pacing as ProviderPacing, Provider, ProviderError, ProviderResult,
};
use crate::retry::{Backoff, retry_transient};
use crate::transport::ssh::SshPool;
use async_trait::async_trait;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_API_URL: &str = "https://api.runpod.io/v2";
pub const URL_ENV: &str = "ASIMOV_RUNPOD_API_URL";
pub const KEY_NAME: &str = "RUNPOD_API_KEY";
pub const PACING_ENV: &str = "ASIMOV_RUNPOD_PACING";
pub const DEFAULT_SSH_USER: &str = "root";
/// Seconds a pod waits for the controller to collect its run before it ends itself.
pub const GRACE_ENV: &str = "ASIMOV_RUNPOD_SELF_END_GRACE";
/// Seconds a pod may take to boot before its attempt ends and it is deleted.
pub const BOOT_TIMEOUT_ENV: &str = "ASIMOV_RUNPOD_BOOT_TIMEOUT";
/// Test servers only: seconds a new pod may be missing from the listing instead of
/// RunPod's `LISTING_LAG`, so that tests and campaigns need not wait five minutes.
pub const LISTING_LAG_ENV: &str = "ASIMOV_RUNPOD_LISTING_LAG_SECS";
/// Pods bill from their create; image pulls take minutes, 20 is dstack's cut.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Where RunPod's images export the container's environment (`RUNPOD_API_KEY`, the
/// pod's own key, among it) for SSH sessions, which do not inherit it.
const POD_ENV_FILE: &str = "/etc/rp_environment";
/// Test-only: that file's path instead, `{id}` standing for the pod's id.
pub const POD_ENV_FILE_ENV: &str = "ASIMOV_RUNPOD_POD_ENV_FILE";
/// RunPod's PyTorch image: starts sshd with `PUBLIC_KEY`.
pub const DEFAULT_IMAGE: &str = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04";
const DEFAULT_DISK_GB: u32 = 20;
const REMOTE_ROOT: &str = "~/.asimov-agent";
const NO_CAPACITY_TEXT: &str = "no longer any instances available";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Call {
    Any,
}

pub fn api_key(home: &Home) -> Option<Secret> {
    cloud::api_key(home, KEY_NAME)
}

fn err(kind: ErrorKind, step: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderKind::Runpod, kind, step, message)
}

#[derive(Debug)]
struct Raw {
    status: u16,
    retry_after: Option<Duration>,
    text: String,
}

/// Every RunPod answer into its JSON body (`Null` for 204) or a canonical error.
fn classify(step: &'static str, raw: &Raw) -> ProviderResult<Value> {
    let json: Option<Value> = serde_json::from_str(&raw.text).ok();
    if (200..300).contains(&raw.status) {
        if raw.status == 204 || raw.text.trim().is_empty() {
            return Ok(Value::Null);
        }
        return match json {
            // A 200 carrying a problem body is a failure whatever the status says.
            Some(v) if v.get("title").is_some() && v.get("detail").is_some() => Err(err(
                ErrorKind::Transient,
                step,
                format!("HTTP {}: {}", raw.status, short_body(&raw.text)),
            )),
            Some(v) => Ok(v),
            None => Err(err(
                ErrorKind::Transient,
                step,
                format!("HTTP {}: not JSON: {}", raw.status, short_body(&raw.text)),
            )),
        };
    }
    let detail = json
        .as_ref()
        .and_then(|v| v.get("detail").or_else(|| v.get("message")))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| short_body(&raw.text));
    let errors = json
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(Value::as_array)
        .map(|es| {
            es.iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .filter(|s| !s.is_empty());
    let message = match errors {
        Some(es) => format!("HTTP {}: {detail}: {es}", raw.status),
        None => format!("HTTP {}: {detail}", raw.status),
    };
    let kind = match raw.status {
        400 if detail.to_lowercase().contains(NO_CAPACITY_TEXT) => ErrorKind::NoCapacity,
        401 | 403 => ErrorKind::Unauthenticated,
        404 => ErrorKind::NotFound,
        429 => ErrorKind::RateLimited {
            retry_after: raw.retry_after,
        },
        408 | 500..=599 => ErrorKind::Transient,
        // 402 (balance), 409 (action not allowed), 422 (schema): retrying will not help.
        _ => ErrorKind::Permanent,
    };
    Err(err(kind, step, message))
}

/// The minute window of `RateLimit-Policy` (`"minute";q=60;w=60, ...`) as a gap, and
/// of `RateLimit` (`"minute";r=0;t=12, ...`) as a wait when nothing is left.
fn quota(policy: Option<&str>, limit: Option<&str>) -> (Option<Duration>, Option<Duration>) {
    let field = |text: &str, key: &str| -> Option<f64> {
        let minute = text
            .split(',')
            .find(|part| part.trim().starts_with("\"minute\""))?;
        minute.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().parse::<f64>().ok())?
        })
    };
    let gap = policy.and_then(|p| {
        let q = field(p, "q")?;
        let w = field(p, "w")?;
        (q > 0.0 && w > 0.0).then(|| Duration::from_secs_f64(w / q))
    });
    let wait = limit.and_then(|l| {
        let r = field(l, "r")?;
        let t = field(l, "t")?;
        (r <= 0.0).then(|| Duration::from_secs_f64(t.clamp(0.0, 3600.0)))
    });
    (gap, wait)
}

/// One GPU type of the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuType {
    pub id: String,
    pub name: String,
    pub memory_gb: f64,
    pub secure_price: Option<f64>,
    pub community_price: Option<f64>,
    /// `NONE` | `LOW` | `MEDIUM` | `HIGH`.
    pub availability: String,
}

fn parse_gpus(v: &Value) -> Vec<GpuType> {
    v.get("gpus")
        .and_then(Value::as_array)
        .map(|gs| {
            gs.iter()
                .filter_map(|g| {
                    let price = |k: &str| {
                        g.get("price")
                            .and_then(|p| p.get(k))
                            .and_then(Value::as_f64)
                    };
                    Some(GpuType {
                        id: g.get("id")?.as_str()?.to_string(),
                        name: g
                            .get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                        memory_gb: g.get("memory").and_then(Value::as_f64).unwrap_or(0.0),
                        secure_price: price("secure"),
                        community_price: price("community"),
                        availability: g
                            .get("availability")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn words(s: &str) -> Vec<String> {
    s.replace(['_', '-'], " ")
        .split_whitespace()
        .map(str::to_uppercase)
        .collect()
}

/// A GPU type as users write it: its id, its catalog name, or a run of words of either
/// (`RTX 4090`, `rtx_4090`, `H100`).
pub fn gpu_matches(gpu: &GpuType, wanted: &str) -> bool {
    let w = words(wanted);
    if w.is_empty() {
        return false;
    }
    [&gpu.id, &gpu.name].iter().any(|s| {
        let have = words(s);
        have.windows(w.len()).any(|win| win == w.as_slice())
    })
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
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> ProviderResult<Raw> {
        self.pacer.wait(Call::Any).await;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.key.expose());
        if let Some(body) = body {
            req = req.json(body);
        }
        let step = "call the runpod api";
        let resp = req
            .send()
            .await
            .map_err(|e| err(ErrorKind::Transient, step, format!("{path}: {e}")).with_source(e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers();
        let retry_after = cloud::retry_after(headers);
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (gap, wait) = quota(header("ratelimit-policy"), header("ratelimit"));
        if let Some(gap) = gap {
            self.pacer.set_gap(Call::Any, gap);
        }
        if let Some(wait) = wait.or(if status == 429 { retry_after } else { None }) {
            self.pacer.back_off(Call::Any, wait);
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
                .send(method.clone(), path, body)
                .await
                .map_err(|e| ProviderError { step, ..e })?;
            classify(step, &raw)
        })
        .await
    }
}

pub struct RunpodProvider {
    api: Api,
    pool: Arc<SshPool>,
    identity: PathBuf,
    users: LoginUsers,
    /// Pods created lately: a new pod can be missing from `GET /pods` for a while, so a
    /// missing one is looked up by id (bounded by `listing_lag`) rather than read as
    /// gone, which would start a second pod. Kept on disk: a controller started after
    /// a crash must not take the pod its predecessor just created for gone.
    recent: Recent,
    /// `LISTING_LAG`, or `LISTING_LAG_ENV` seconds against a test server.
    listing_lag: Duration,
    self_end_grace: Duration,
    boot_timeout: Duration,
    pod_env_file: String,
    /// Per pod: the container's last `startedAt` seen and how often it changed. A
    /// container that keeps restarting (a crash loop) never runs the job.
    starts: std::sync::Mutex<BTreeMap<InstanceId, (String, u32)>>,
}

/// The pods created within the listing lag, one file per pod (`<dir>/<id>`, holding
/// the create's time in Unix seconds), so that they outlive the process.
struct Recent {
    dir: PathBuf,
}

impl Recent {
    fn new(dir: PathBuf) -> Recent {
        Recent { dir }
    }

    /// Only RunPod's short alphanumeric ids name files.
    fn file(&self, id: &str) -> Option<PathBuf> {
        (!id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| self.dir.join(id))
    }

    fn add(&self, id: &str) {
        let Some(file) = self.file(id) else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Unrecorded, a restart would read the pod as gone while it is unlisted; the
        // create itself succeeded, so that is a warning, not a failure.
        if let Err(e) =
            std::fs::create_dir_all(&self.dir).and_then(|()| std::fs::write(&file, now.to_string()))
        {
            tracing::warn!(pod = %id, file = %file.display(), error = %e, "cannot record a new pod");
        }
    }

    fn forget(&self, id: &str) {
        if let Some(file) = self.file(id) {
            let _ = std::fs::remove_file(file);
        }
    }

    /// The pods created less than `lag` ago; older records are dropped.
    fn within(&self, lag: Duration) -> Vec<InstanceId> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if self.file(&id).is_none() {
                continue;
            }
            let at = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok());
            match at {
                Some(at) if now.saturating_sub(at) < lag.as_secs().max(1) => out.push(id),
                _ => self.forget(&id),
            }
        }
        out.sort();
        out
    }
}

/// Restarts of a pod's container after which it counts as lost: a crash loop.
const RESTART_LOOP: u32 = 3;

/// How long a new pod may be missing from the listing.
const LISTING_LAG: Duration = Duration::from_secs(300);

impl std::fmt::Debug for RunpodProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunpodProvider")
            .field("base", &self.api.base)
            .finish_non_exhaustive()
    }
}

impl RunpodProvider {
    pub fn from_home(home: &Home, pool: Arc<SshPool>) -> std::io::Result<Option<RunpodProvider>> {
        let Some(key) = api_key(home) else {
            return Ok(None);
        };
        let base = cloud::api_url(URL_ENV, DEFAULT_API_URL);
        let factor = cloud::pacing_factor(PACING_ENV);
        RunpodProvider::new(home, pool, base, key, Duration::from_secs_f64(factor)).map(Some)
    }

    /// `gap`: the pacing until a server announces its quota.
    pub fn new(
        home: &Home,
        pool: Arc<SshPool>,
        base: impl Into<String>,
        key: Secret,
        gap: Duration,
    ) -> std::io::Result<RunpodProvider> {
        Ok(RunpodProvider {
            api: Api {
                http: cloud::http_client()?,
                base: base.into().trim_end_matches('/').to_string(),
                key,
                pacer: Pacer::new(BTreeMap::from([(Call::Any, gap)])),
                retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(15), 2.0)
                    .with_max_elapsed(Some(Duration::from_secs(90))),
            },
            pool,
            identity: home.ssh_identity(),
            users: LoginUsers::new(
                home.provider_state("runpod").join("users"),
                DEFAULT_SSH_USER,
            ),
            recent: Recent::new(home.provider_state("runpod").join("recent")),
            self_end_grace: cloud::self_end_grace(GRACE_ENV),
            boot_timeout: super::seconds_env(BOOT_TIMEOUT_ENV, BOOT_TIMEOUT),
            listing_lag: super::seconds_env(LISTING_LAG_ENV, LISTING_LAG),
            starts: std::sync::Mutex::new(BTreeMap::new()),
            pod_env_file: std::env::var(POD_ENV_FILE_ENV)
                .ok()
                .filter(|f| !f.trim().is_empty())
                .unwrap_or_else(|| POD_ENV_FILE.to_string()),
        })
    }

    /// Logs in as `user` where no placement says otherwise.
    pub fn with_default_user(mut self, user: impl Into<String>) -> RunpodProvider {
        self.users = LoginUsers::new(self.users.dir().to_path_buf(), user);
        self
    }

    pub fn with_retry(mut self, policy: Backoff) -> RunpodProvider {
        self.api.retry = policy;
        self
    }

    /// The GPU catalog with availability for `cloud` (`SECURE` | `COMMUNITY`).
    pub async fn gpu_types(&self, cloud: &str) -> ProviderResult<Vec<GpuType>> {
        let v = self
            .api
            .call(
                "list gpu types",
                reqwest::Method::GET,
                &format!("/catalog/gpus?include=AVAILABILITY&product=POD&cloud={cloud}"),
                None,
            )
            .await?;
        Ok(parse_gpus(&v))
    }

    /// The GPU types that fit `resources` and `placement`, priced for the count asked
    /// and the placement's cloud.
    pub async fn offers(
        &self,
        resources: &crate::manifest::Resources,
        placement: &crate::manifest::Placement,
    ) -> ProviderResult<Vec<cloud::CatalogOffer>> {
        let community = placement
            .filters
            .get("cloud")
            .is_some_and(|c| c.eq_ignore_ascii_case("community"));
        let catalog = self
            .gpu_types(if community { "COMMUNITY" } else { "SECURE" })
            .await?;
        let gpu = resources.gpu.as_ref();
        let names: Vec<String> = if placement.instance_types.is_empty() {
            gpu.map(|g| g.names.clone()).unwrap_or_default()
        } else {
            placement.instance_types.clone()
        };
        let count = gpu.map_or(1, |g| g.count.max(1));
        let min_vram = gpu.and_then(|g| g.min_vram_gb).unwrap_or(0) as f64;
        let mut out: Vec<cloud::CatalogOffer> = catalog
            .into_iter()
            .filter(|g| names.is_empty() || names.iter().any(|n| gpu_matches(g, n)))
            .filter(|g| g.memory_gb + 1e-9 >= min_vram)
            .filter_map(|g| {
                let unit = if community {
                    g.community_price
                } else {
                    g.secure_price
                }?;
                Some(cloud::CatalogOffer {
                    available: g.availability != "NONE",
                    vram_gb: Some(g.memory_gb),
                    price_per_hour: unit * count as f64,
                    gpu: if g.name.is_empty() {
                        g.id.clone()
                    } else {
                        g.name.clone()
                    },
                    id: g.id,
                    count,
                    regions: Vec::new(),
                })
            })
            .filter(|o| {
                placement
                    .max_price_per_hour
                    .is_none_or(|max| o.price_per_hour <= max + 1e-9)
            })
            .collect();
        cloud::sort_offers(&mut out);
        Ok(out)
    }

    fn instance(&self, v: &Value) -> Option<Instance> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::trim);
        let name = s("name")?;
        let tag = OwnerTag::parse(name)?;
        let id = s("id")?.to_string();
        let direct = v.get("ssh").and_then(|s| s.get("direct")).and_then(|d| {
            let host = d.get("host")?.as_str()?.trim().to_string();
            let port = u16::try_from(d.get("port")?.as_u64()?).ok()?;
            (!host.is_empty()).then_some((host, port))
        });
        let endpoint = direct.map(|(host, port)| Endpoint::Ssh {
            host,
            port,
            user: self.users.get(name),
            identity_file: Some(self.identity.clone()),
            root: format!("{REMOTE_ROOT}/{name}"),
        });
        let restarts = match s("startedAt").filter(|t| !t.is_empty()) {
            Some(started) => {
                let mut starts = self.starts.lock().unwrap_or_else(|e| e.into_inner());
                let seen = starts.entry(id.clone()).or_insert((started.to_string(), 0));
                if seen.0 != started {
                    *seen = (started.to_string(), seen.1 + 1);
                    tracing::info!(pod = %id, restarts = seen.1, "the pod's container restarted");
                }
                seen.1
            }
            None => 0,
        };
        let state = match s("status").unwrap_or("") {
            // A crash loop: lost for this attempt (the planner deletes it and retries).
            _ if restarts >= RESTART_LOOP => InstanceState::Stopped,
            "RUNNING" if endpoint.is_some() => InstanceState::Running,
            // Stopped or failed: it runs nothing; lost for this attempt.
            "EXITED" | "ERROR" => InstanceState::Stopped,
            "TERMINATED" => InstanceState::Terminating,
            _ => InstanceState::Provisioning,
        };
        let gpu = v.get("gpu").and_then(|g| {
            let id = g.get("id")?.as_str()?;
            let n = g.get("count").and_then(Value::as_u64).unwrap_or(1);
            Some(format!("{n}x {id}"))
        });
        Some(Instance {
            provider: ProviderKind::Runpod,
            id,
            tag,
            state,
            endpoint,
            gpu,
            price_per_hour: Usd::from_dollars(v.get("cost").and_then(Value::as_f64).unwrap_or(0.0)),
            created_at: None,
            host: None,
        })
    }
}

#[async_trait]
impl Provider for RunpodProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Runpod
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // A new pod can be missing from `GET /pods` for a while (looked up by id
            // here too); the planner waits as long.
            listing_lag: self.listing_lag,
            // Counted from the create (billing starts there): a pod that never boots
            // is deleted, not polled forever.
            boot_timeout: self.boot_timeout,
            boot_timeouts: Default::default(),
            pacing: ProviderPacing {
                max_in_flight: 8,
                min_resync: Duration::from_secs(30),
            },
            resync: Duration::from_secs(300),
            // EXITED keeps its disk and machine, billed.
            bills_while_stopped: true,
            ssh_user: Some(DEFAULT_SSH_USER.to_string()),
            fixed_pool: false,
            keep_disk: None,
        }
    }

    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        let count = query.min_count.unwrap_or(1).max(1);
        let catalog = self.gpu_types("SECURE").await?;
        Ok(catalog
            .into_iter()
            .filter(|g| g.availability != "NONE")
            .filter(|g| query.gpus.is_empty() || query.gpus.iter().any(|w| gpu_matches(g, w)))
            .filter_map(|g| {
                Some(Offer {
                    provider: ProviderKind::Runpod,
                    price_per_hour: Usd::from_dollars(g.secure_price? * count as f64),
                    // The id: `query.matches` then finds `RTX 4090` inside it.
                    gpu: Some(g.id.clone()),
                    id: g.id,
                    count,
                    vram_gb: Some(g.memory_gb),
                    cuda: None,
                    disk_gb: None,
                    reliability: None,
                    location: None,
                    extra: Vec::new(),
                })
            })
            .filter(|o| {
                let q = OfferQuery {
                    gpus: Vec::new(),
                    ..query.clone()
                };
                q.matches(o)
            })
            .collect())
    }

    async fn list(&self) -> ProviderResult<Vec<Instance>> {
        let step = "list pods";
        let v = self
            .api
            .call(step, reqwest::Method::GET, "/pods", None)
            .await?;
        let pods = v
            .get("pods")
            .and_then(Value::as_array)
            .ok_or_else(|| err(ErrorKind::Transient, step, "answer without pods"))?;
        let mut out: Vec<Instance> = pods.iter().filter_map(|p| self.instance(p)).collect();
        // Pods no longer listed take their restart counts with them.
        self.starts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| out.iter().any(|i| &i.id == id));
        let mut missing = Vec::new();
        for id in self.recent.within(self.listing_lag) {
            if out.iter().any(|i| i.id == id) {
                // Listed: the listing has caught up with it.
                self.recent.forget(&id);
            } else {
                missing.push(id);
            }
        }
        for id in missing {
            match self
                .api
                .call(step, reqwest::Method::GET, &format!("/pods/{id}"), None)
                .await
            {
                Ok(pod) => {
                    tracing::debug!(pod = %id, "new pod not listed yet; found by id");
                    out.extend(self.instance(&pod));
                }
                // Deleted (while provisioning, say): absent it is.
                Err(e) if e.kind == ErrorKind::NotFound => self.recent.forget(&id),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance> {
        let step = "create pod";
        let tag = req.tag.render();
        if let Some(user) = &req.placement.ssh_user {
            self.users.remember(&tag, user).map_err(|e| {
                err(
                    ErrorKind::Transient,
                    step,
                    format!("{}: {e}", self.users.dir().display()),
                )
            })?;
        }
        // A create retried after being cut off (timeout, crash) finds the first one.
        if let Some(existing) = self
            .list()
            .await?
            .into_iter()
            .find(|i| i.tag == req.tag && i.state != InstanceState::Terminating)
        {
            tracing::info!(instance = %existing.id, %tag, "runpod instance with this tag exists; adopting it");
            return Ok(existing);
        }
        let public = ensure_identity(&self.identity).map_err(|e| {
            err(
                ErrorKind::Permanent,
                step,
                format!("{}: {e}", self.identity.display()),
            )
        })?;
        let cloud = match req.placement.filters.get("cloud").map(|c| c.to_uppercase()) {
            Some(c) if c == "COMMUNITY" => "COMMUNITY",
            _ => "SECURE",
        };
        let catalog = self.gpu_types(cloud).await?;
        let wanted: Vec<String> = if !req.placement.instance_types.is_empty() {
            req.placement.instance_types.clone()
        } else {
            req.resources
                .gpu
                .as_ref()
                .map(|g| g.names.clone())
                .unwrap_or_default()
        };
        let count = req.resources.gpu.as_ref().map_or(1, |g| g.count.max(1));
        let min_vram = req
            .resources
            .gpu
            .as_ref()
            .and_then(|g| g.min_vram_gb)
            .unwrap_or(0) as f64;
        let mut types: Vec<&GpuType> = Vec::new();
        for w in &wanted {
            for g in catalog.iter().filter(|g| gpu_matches(g, w)) {
                if g.memory_gb + 1e-9 >= min_vram && !types.iter().any(|t| t.id == g.id) {
                    types.push(g);
                }
            }
        }
        if wanted.is_empty() {
            // No GPU named: any that fits, cheapest first (RunPod rents GPUs).
            types = catalog
                .iter()
                .filter(|g| g.memory_gb + 1e-9 >= min_vram)
                .collect();
            let price = |g: &GpuType| {
                if cloud == "COMMUNITY" {
                    g.community_price
                } else {
                    g.secure_price
                }
                .unwrap_or(f64::MAX)
            };
            types.sort_by(|a, b| {
                price(a)
                    .partial_cmp(&price(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        }
        let mut tried = Vec::new();
        for g in types {
            if g.availability == "NONE" {
                tried.push(format!("{} (none available)", g.id));
                continue;
            }
            let mut body = json!({
                "name": tag,
                "image": req.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
                "gpu": {"id": g.id, "count": count},
                "cloud": cloud,
                "disk": req.resources.disk_gb.unwrap_or(DEFAULT_DISK_GB).max(1),
                "ports": ["22/tcp"],
                "env": {"PUBLIC_KEY": public},
                "startSsh": true,
            });
            if let Some(cuda) = &req.resources.cuda {
                body["gpu"]["minCudaVersion"] = json!(cuda);
            }
            if !req.placement.regions.is_empty() {
                body["dataCenterIds"] = json!(
                    req.placement
                        .regions
                        .iter()
                        .map(|r| r.to_uppercase())
                        .collect::<Vec<_>>()
                );
            }
            let answer = retry_transient(&self.api.retry, super::cloud::refused, || async {
                let raw = self
                    .api
                    .send(reqwest::Method::POST, "/pods", Some(&body))
                    .await
                    .map_err(|e| ProviderError { step, ..e })?;
                classify(step, &raw)
            })
            .await;
            match answer {
                Ok(pod) => {
                    let id = pod
                        .get("id")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            err(
                                ErrorKind::Transient,
                                step,
                                format!("answer without id: {pod}"),
                            )
                        })?;
                    self.recent.add(&id);
                    let price = if cloud == "COMMUNITY" {
                        g.community_price
                    } else {
                        g.secure_price
                    };
                    return Ok(Instance {
                        provider: ProviderKind::Runpod,
                        id,
                        tag: req.tag.clone(),
                        state: InstanceState::Provisioning,
                        endpoint: None,
                        gpu: Some(format!("{count}x {}", g.id)),
                        price_per_hour: Usd::from_dollars(
                            pod.get("cost")
                                .and_then(Value::as_f64)
                                .or(price.map(|p| p * count as f64))
                                .unwrap_or(0.0),
                        ),
                        created_at: None,
                        host: None,
                    });
                }
                Err(e) if e.kind == ErrorKind::NoCapacity => {
                    tracing::info!(gpu = %g.id, error = %e, "runpod has no such gpu free; trying the next");
                    tried.push(g.id.clone());
                }
                Err(e) => return Err(e),
            }
        }
        Err(err(
            ErrorKind::NoCapacity,
            step,
            if tried.is_empty() {
                format!("no gpu type in the catalog matches {:?}", wanted)
            } else {
                format!("no capacity: {}", tried.join(", "))
            },
        ))
    }

    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()> {
        self.api
            .call(
                "delete pod",
                reqwest::Method::DELETE,
                &format!("/pods/{id}"),
                None,
            )
            .await
            .map(|_| ())
    }

    fn machine(&self, instance: &Instance) -> ProviderResult<Arc<dyn crate::agent::Machine>> {
        let (transport, root) = cloud::ssh_transport(
            &self.pool,
            instance,
            "reach pod",
            "has no direct ssh port yet",
        )?;
        // The pod ends itself with its own key, which RunPod gives every pod; a pod
        // without one (an image that does not export it) is ended by the controller.
        let env_file = crate::agent::sh_quote(&self.pod_env_file.replace("{id}", &instance.id));
        let find_key = format!(
            r#"key=${{RUNPOD_API_KEY:-}}
	if [ -z "$key" ] && [ -r /proc/1/environ ]; then
		key=$(tr '\000' '\n' 2>/dev/null </proc/1/environ | sed -n 's/^RUNPOD_API_KEY=//p' | head -n 1)
	fi
	if [ -z "$key" ] && [ -r {env_file} ]; then
		key=$(sed -n 's/^\(export \)\{{0,1\}}RUNPOD_API_KEY=//p' {env_file} | tr -d '"' | head -n 1)
	fi
	[ -z "$key" ] || printf 'Authorization: Bearer %s\n' "$key" >"$auth""#
        );
        let end = cloud::SelfEnd {
            name: "runpod",
            method: "DELETE",
            url: format!("{}/pods/{}", self.api.base, instance.id),
            body: String::new(),
            // RunPod's errors are problem bodies, also inside HTTP 200.
            refused_in_ok: r#""detail""#,
            grace: self.self_end_grace,
            find_key: Some(find_key),
        };
        Ok(Arc::new(
            cloud::CloudMachine::new(Arc::new(transport), root).ending(end, None),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(status: u16, text: &str) -> Option<ErrorKind> {
        classify(
            "test",
            &Raw {
                status,
                retry_after: None,
                text: text.to_string(),
            },
        )
        .err()
        .map(|e| e.kind)
    }

    #[test]
    fn answers_map_to_canonical_kinds() {
        let p = |status: u16, detail: &str| {
            format!(r#"{{"title":"t","status":{status},"detail":"{detail}"}}"#)
        };
        let table: Vec<(u16, String, Option<ErrorKind>)> = vec![
            (200, r#"{"pods":[]}"#.into(), None),
            (204, String::new(), None),
            (
                400,
                p(
                    400,
                    "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                ),
                Some(ErrorKind::NoCapacity),
            ),
            (400, p(400, "bad gpu id"), Some(ErrorKind::Permanent)),
            (422, p(422, "validation failed"), Some(ErrorKind::Permanent)),
            (
                409,
                p(409, "action not allowed"),
                Some(ErrorKind::Permanent),
            ),
            (
                402,
                p(402, "insufficient balance"),
                Some(ErrorKind::Permanent),
            ),
            (401, "Unauthorized".into(), Some(ErrorKind::Unauthenticated)),
            (404, p(404, "pod not found"), Some(ErrorKind::NotFound)),
            (
                429,
                p(429, "rate limit exceeded for the minute window"),
                Some(ErrorKind::RateLimited { retry_after: None }),
            ),
            (
                502,
                "<html><title>502 Bad Gateway</title></html>".into(),
                Some(ErrorKind::Transient),
            ),
            (200, p(500, "internal"), Some(ErrorKind::Transient)),
        ];
        for (status, text, want) in table {
            assert_eq!(kind(status, &text), want, "{status} {text}");
        }
    }

    #[test]
    fn quota_headers_set_the_gap_and_the_wait() {
        let (gap, wait) = quota(
            Some(r#""minute";q=60;w=60, "hour";q=3000;w=3600"#),
            Some(r#""minute";r=0;t=12, "hour";r=2000;t=100"#),
        );
        assert_eq!(gap, Some(Duration::from_secs(1)));
        assert_eq!(wait, Some(Duration::from_secs(12)));
        let (_, wait) = quota(None, Some(r#""minute";r=5;t=12"#));
        assert_eq!(wait, None);
    }

    #[test]
    fn recent_pods_are_kept_on_disk_within_the_lag_and_only_by_plain_ids() {
        let dir = tempfile::tempdir().unwrap();
        let recent = Recent::new(dir.path().join("recent"));
        assert!(recent.within(Duration::from_secs(300)).is_empty());
        recent.add("7h9k2m4n6p");
        recent.add("../escape");
        recent.add("");
        // Another process (a restarted controller) reads the same folder.
        let again = Recent::new(dir.path().join("recent"));
        assert_eq!(again.within(Duration::from_secs(300)), vec!["7h9k2m4n6p"]);
        assert!(!dir.path().join("escape").exists());
        // Past the lag (or unreadable), a record is dropped.
        std::fs::write(dir.path().join("recent/old1"), "1000").unwrap();
        std::fs::write(dir.path().join("recent/junk1"), "not a time").unwrap();
        assert_eq!(again.within(Duration::from_secs(300)), vec!["7h9k2m4n6p"]);
        assert!(!dir.path().join("recent/old1").exists());
        again.forget("7h9k2m4n6p");
        assert!(recent.within(Duration::from_secs(300)).is_empty());
    }

    #[test]
    fn gpu_names_match_as_users_write_them() {
        let g = GpuType {
            id: "NVIDIA GeForce RTX 4090".into(),
            name: "RTX 4090".into(),
            memory_gb: 24.0,
            secure_price: Some(0.69),
            community_price: Some(0.34),
            availability: "HIGH".into(),
        };
        for w in ["RTX 4090", "rtx_4090", "NVIDIA GeForce RTX 4090", "4090"] {
            assert!(gpu_matches(&g, w), "{w}");
        }
        for w in ["RTX 3090", "RTX 40", "H100"] {
            assert!(!gpu_matches(&g, w), "{w}");
        }
    }
}
