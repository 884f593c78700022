//! The `ssh` provider: the hosts of `kind: Fleet` manifests, reached over the pooled
//! OpenSSH transport.
//!
//! An *instance* is a slot on a host: the folder `<remote root>/instances/<tag>` (remote
//! root `~/.asimov-agent` unless configured) holding
//! - `tag`: the rendered owner tag, written last, so a folder without it is no slot;
//! - `host`: the identity of the host that claimed it (see `host_prelude`): hosts whose
//!   users share one `$HOME` (NFS) see each other's slot folders, and each lists, counts,
//!   adopts and destroys only those it claimed;
//! - `gpus`: how many GPUs the slot holds; `gpu_ids`: which ones (`0,1`), for
//!   `CUDA_VISIBLE_DEVICES`; `created`: Unix seconds.
//!
//! The agent may add `agent.sh` (run as `sh agent.sh stop ROOT` on destroy) and `pid`
//! (its process group leader: `list` reports the slot's agent alive while it runs, and
//! destroy signals the group). Instance ids are `<fleet>/<host>/<tag>`.
//!
//! **Capacity.** A host declaring `gpus: N` (N > 0) runs GPU jobs side by side while
//! their GPU counts fit in N, each on its own GPU ids. A job asking for no GPU takes the
//! whole host: it needs a host with no slot at all, and nothing else is placed beside it.
//! A host with `gpus: 0` thus runs one job at a time. The choice is made on the host
//! under a lock (`mkdir`), so two controllers cannot overbook it.
//!
//! **Unreachable hosts.** `list` does not fail because one host is down: the host is
//! marked unreachable (see `host_statuses`) and every slot last seen there is listed
//! with state `Stopped`, so the planner treats it like a preempted instance (retry
//! policy) instead of as gone; destroying it answers `Transient` until the host is back.
//! Slots on a host that was already down when this process started are unknown until it
//! answers. `list` fails (`Transient`) only when every host is unreachable.
//!
//! Must not know about the store, the planner or the agent's file formats beyond the
//! two names above.

use crate::home::Home;
use crate::manifest::{Fleet, Host};
use crate::model::{InstanceId, Offer, OfferQuery, OwnerTag, ProviderKind, Usd};
use crate::provider::{
    Capabilities, CreateRequest, Endpoint, ErrorKind, Instance, InstanceState, Provider,
    ProviderError, ProviderResult,
};
use crate::transport::ssh::{SshJump, SshPool, SshTarget, SshTransport, quote};
use crate::transport::{Transport, TransportError};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a create waits for a host whose claim was cut off (its outcome unknown)
/// before it claims on another host: the claim may have placed the attempt there, and a
/// second claim elsewhere would run it twice. Past this, the host is taken for gone (as a
/// silent run is after `HEARTBEAT_STALE_SECS`) and a duplicate it still holds when it
/// comes back is the planner's to destroy. `ASIMOV_SSH_UNSURE_CLAIM_SECS` overrides it
/// (the tests shorten it).
const UNSURE_CLAIM_WAIT: Duration = Duration::from_secs(120);

fn unsure_claim_wait() -> Duration {
    super::seconds_env("ASIMOV_SSH_UNSURE_CLAIM_SECS", UNSURE_CLAIM_WAIT)
}

/// Where slots live on a host unless the provider is told otherwise.
pub const DEFAULT_REMOTE_ROOT: &str = "~/.asimov-agent";

/// What `host_statuses` says about one host, as of the last `list` (or create/destroy):
/// the one host type, shared with the planner and the store.
pub use crate::model::HostStatus;

/// What `prepare_host` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub fleet: String,
    pub host: String,
    /// What this call changed (`agent folder`, `gpu inventory`); empty when nothing.
    pub changes: Vec<String>,
    pub tmux: bool,
    pub rsync: bool,
    pub gpu_names: Vec<String>,
}

impl HostReport {
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// One slot as a host listed it.
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    tag: String,
    gpus: u32,
    gpu_ids: String,
    created: Option<i64>,
    alive: bool,
}

#[derive(Debug, Clone, Default)]
struct HostView {
    reachable: bool,
    contacted: bool,
    message: Option<String>,
    slots: Vec<Slot>,
    gpu_names: Vec<String>,
    /// Absolute remote root, learnt once the host answered.
    root: Option<String>,
}

#[derive(Default)]
struct State {
    fleets: Vec<Fleet>,
    /// Every host ever configured, so slots on a host removed from the manifests can
    /// still be destroyed.
    known: BTreeMap<(String, String), Host>,
    views: BTreeMap<(String, String), HostView>,
    /// Claims sent whose answer was lost, by tag: (fleet, host, when). Also on disk
    /// ([`UnsureClaims`]): a controller restarted while that host is silent must not
    /// claim elsewhere at once either.
    unsure: BTreeMap<String, (String, String, Instant)>,
}

/// How long a cut-off claim's record is kept when its host never answers again.
const UNSURE_RECORD_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The cut-off claims, one file per tag under `providers/ssh/unsure/` (`fleet`, `host`
/// and the claim's Unix time, a line each), so the wait for a silent host outlives the
/// controller that started it: without them, a controller killed during the wait and
/// restarted while the host is still down claims on the next host at once, and the
/// attempt may run on two hosts until the first answers again.
struct UnsureClaims {
    dir: std::path::PathBuf,
}

impl UnsureClaims {
    /// Tags are asimov's own (`asimov.<home>.<run>.<attempt>`); nothing else names a file.
    fn file(&self, tag: &str) -> Option<std::path::PathBuf> {
        let plain = !tag.is_empty()
            && tag.len() <= 200
            && !tag.starts_with('.')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        plain.then(|| self.dir.join(tag))
    }

    fn record(&self, tag: &str, fleet: &str, host: &str) {
        let Some(file) = self.file(tag) else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let text = format!("{fleet}\n{host}\n{now}\n");
        // Unrecorded, only a restart during the wait loses it: a warning, not a failure.
        if let Err(e) = std::fs::create_dir_all(&self.dir)
            .and_then(|()| crate::home::write_private(&file, text.as_bytes()))
        {
            tracing::warn!(%tag, file = %file.display(), error = %e, "cannot record a cut-off claim");
        }
    }

    fn forget(&self, tag: &str) {
        if let Some(file) = self.file(tag) {
            let _ = std::fs::remove_file(file);
        }
    }

    /// Every recorded claim, its time turned into an `Instant` as old as the record.
    fn load(&self) -> BTreeMap<String, (String, String, Instant)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return BTreeMap::new();
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut out = BTreeMap::new();
        for entry in entries.flatten() {
            let Some(tag) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if self.file(&tag).is_none() {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            let (Some(fleet), Some(host), Some(at)) = (
                lines.next(),
                lines.next(),
                lines.next().and_then(|t| t.trim().parse::<u64>().ok()),
            ) else {
                self.forget(&tag);
                continue;
            };
            let age = Duration::from_secs(now.saturating_sub(at));
            // A host silent for a day is not coming back for this claim; nor does a
            // record for an attempt long over need keeping.
            if age > UNSURE_RECORD_MAX_AGE {
                self.forget(&tag);
                continue;
            }
            let since = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            out.insert(tag, (fleet.to_string(), host.to_string(), since));
        }
        out
    }
}

/// Why a claim has no slot to show.
enum ClaimError {
    /// Nothing ran on the host (no connection, or the claim lock was busy).
    NotRun(TransportError),
    /// The claim was sent and its answer lost: it may have placed the attempt.
    Unsure(TransportError),
}

pub struct SshProvider {
    pool: Arc<SshPool>,
    remote_root: String,
    local_user: String,
    state: Mutex<State>,
    unsure: UnsureClaims,
}

impl std::fmt::Debug for SshProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshProvider")
            .field("remote_root", &self.remote_root)
            .finish_non_exhaustive()
    }
}

fn err(kind: ErrorKind, step: &'static str, message: impl Into<String>) -> ProviderError {
    ProviderError::new(ProviderKind::Ssh, kind, step, message)
}

/// Transport failures in provider terms: a host that cannot be reached now is
/// transient; a changed host key or a refused login needs a person.
fn from_transport(step: &'static str, e: TransportError) -> ProviderError {
    err(ErrorKind::of_transport(&e), step, e.to_string()).with_source(e)
}

/// `~`-relative roots become `"$HOME"/...` so the remote shell expands them.
fn root_word(root: &str) -> String {
    if root == "~" {
        "\"$HOME\"".to_string()
    } else if let Some(rest) = root.strip_prefix("~/") {
        format!("\"$HOME\"/{}", quote(rest))
    } else {
        quote(root)
    }
}

/// Shell text defining `$me`, this host's identity, and `mine DIR`, true when the slot
/// `DIR` was claimed by this host. The identity is the host key the controller pinned
/// (`host_key`) with `/etc/machine-id` and the host name: hosts sharing an NFS home see
/// one folder of slots, and each must list, adopt and destroy only its own. A slot from
/// before slots recorded their host (no `host` file) goes to the first host that looks.
fn host_prelude(host_key: &str) -> String {
    format!(
        r#"me={hk}" $(cat /etc/machine-id 2>/dev/null) $(uname -n 2>/dev/null)"
mine() {{
  [ -f "$1/host" ] || (set -C; printf '%s\n' "$me" > "$1/host") 2>/dev/null
  [ "$(cat "$1/host" 2>/dev/null)" = "$me" ]
}}"#,
        hk = quote(host_key)
    )
}

fn instance_id(fleet: &str, host: &str, tag: &str) -> InstanceId {
    format!("{fleet}/{host}/{tag}")
}

impl SshProvider {
    /// A provider with its own connection pool, keeping pinned keys in `home`.
    pub fn new(home: Home) -> std::io::Result<SshProvider> {
        Ok(SshProvider::with_pool(SshPool::new(home)?))
    }

    /// A provider sharing `pool` (the controller's one pool for all ssh machines).
    pub fn with_pool(pool: Arc<SshPool>) -> SshProvider {
        let local_user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "root".to_string());
        let unsure = UnsureClaims {
            dir: pool.home().provider_state("ssh").join("unsure"),
        };
        let state = State {
            unsure: unsure.load(),
            ..State::default()
        };
        SshProvider {
            pool,
            remote_root: DEFAULT_REMOTE_ROOT.to_string(),
            local_user,
            state: Mutex::new(state),
            unsure,
        }
    }

    /// Puts slots under `root` on every host instead of `~/.asimov-agent`.
    pub fn with_remote_root(mut self, root: impl Into<String>) -> SshProvider {
        self.remote_root = root.into();
        self
    }

    pub fn pool(&self) -> &Arc<SshPool> {
        &self.pool
    }

    /// The fleets as the manifests say now; called by the controller every pass.
    pub fn set_fleets(&self, fleets: Vec<Fleet>) {
        let mut state = self.lock();
        for fleet in &fleets {
            for host in &fleet.hosts {
                state
                    .known
                    .insert((fleet.name.clone(), host.name.clone()), host.clone());
            }
        }
        state.fleets = fleets;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pooled transport to one fleet host.
    pub fn transport(&self, fleet: &str, host: &Host) -> SshTransport {
        self.pool.transport(SshTarget {
            machine: format!("{fleet}/{}", host.name),
            host: host.address.clone(),
            port: host.port,
            user: host.user.clone(),
            identity_file: host.identity_file.clone(),
            jump: host.proxy_jump.as_ref().map(|j| SshJump {
                host: j.address.clone(),
                port: j.port,
                user: j.user.clone(),
                identity_file: j.identity_file.clone(),
            }),
        })
    }

    /// The pooled transport to a listed instance's host.
    pub fn transport_for(&self, instance: &Instance) -> ProviderResult<SshTransport> {
        let (fleet, host, _) = split_id(&instance.id)?;
        let known = self
            .lock()
            .known
            .get(&(fleet.to_string(), host.to_string()))
            .cloned();
        let host = known.ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                "reach instance",
                format!("unknown host {fleet}/{host}"),
            )
        })?;
        Ok(self.transport(fleet, &host))
    }

    /// Every configured host as of the last list, create or destroy.
    pub fn host_statuses(&self) -> Vec<HostStatus> {
        let state = self.lock();
        let mut out = Vec::new();
        for fleet in &state.fleets {
            for host in &fleet.hosts {
                let view = state
                    .views
                    .get(&(fleet.name.clone(), host.name.clone()))
                    .cloned()
                    .unwrap_or_default();
                let free = free_gpus(host, &view.slots);
                let mut status = HostStatus {
                    fleet: fleet.name.clone(),
                    host: host.name.clone(),
                    reachable: view.reachable,
                    busy: false,
                    gpus_total: host.gpus,
                    gpus_free: free,
                    gpu_names: view.gpu_names.clone(),
                    running: view.slots.iter().map(|s| s.tag.clone()).collect(),
                    agents_alive: view
                        .slots
                        .iter()
                        .filter(|s| s.alive)
                        .map(|s| s.tag.clone())
                        .collect(),
                    message: if view.contacted {
                        view.message.clone()
                    } else {
                        Some("not contacted yet".to_string())
                    },
                };
                status.busy = status.is_full();
                out.push(status);
            }
        }
        out
    }

    /// Makes a host ready for jobs, idempotently: the agent folder, and the GPU
    /// inventory (`nvidia-smi`) recorded beside it, per host (`hosts/<id>/gpus.csv`).
    /// Reports whether tmux and rsync are present (it installs nothing). A second call
    /// on an unchanged host changes nothing.
    pub async fn prepare_host(&self, fleet: &str, host: &Host) -> ProviderResult<HostReport> {
        let t = self.transport(fleet, host);
        let script = format!(
            r#"root={root}
{prelude}
changes=""
if [ ! -d "$root/instances" ]; then mkdir -p "$root/instances" && changes="agent folder"; fi
inv=""
if command -v nvidia-smi >/dev/null 2>&1; then
  inv=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true)
fi
# Per host: hosts sharing a home folder would otherwise overwrite each other's.
hid=$(printf '%s' "$me" | cksum | cut -d' ' -f1)
inv_file="$root/hosts/$hid/gpus.csv"
old=$(cat "$inv_file" 2>/dev/null || true)
if [ ! -f "$inv_file" ] || [ "$inv" != "$old" ]; then
  mkdir -p "$root/hosts/$hid"
  printf '%s\n' "$inv" > "$inv_file.part" && mv -f "$inv_file.part" "$inv_file"
  changes="$changes${{changes:+,}}gpu inventory"
fi
command -v tmux >/dev/null 2>&1 && echo "tmux	yes" || echo "tmux	no"
command -v rsync >/dev/null 2>&1 && echo "rsync	yes" || echo "rsync	no"
echo "changes	$changes"
printf '%s\n' "$inv" | sed '/^$/d; s/^/gpu	/'
"#,
            root = root_word(&self.remote_root),
            prelude = host_prelude(
                &t.host_key()
                    .await
                    .map_err(|e| from_transport("prepare host", e))?
            ),
        );
        let out = t
            .exec(&script)
            .await
            .map_err(|e| from_transport("prepare host", e))?;
        if out.status != 0 {
            return Err(err(
                ErrorKind::Transient,
                "prepare host",
                format!(
                    "{fleet}/{}: exit {}: {}",
                    host.name,
                    out.status,
                    out.stderr.trim()
                ),
            ));
        }
        let mut report = HostReport {
            fleet: fleet.to_string(),
            host: host.name.clone(),
            changes: Vec::new(),
            tmux: false,
            rsync: false,
            gpu_names: Vec::new(),
        };
        for line in out.stdout.lines() {
            let Some((key, value)) = line.split_once('\t') else {
                continue;
            };
            match key {
                "tmux" => report.tmux = value == "yes",
                "rsync" => report.rsync = value == "yes",
                "changes" => {
                    report.changes = value
                        .split(',')
                        .filter(|c| !c.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "gpu" => report.gpu_names.push(value.trim().to_string()),
                _ => {}
            }
        }
        let mut state = self.lock();
        let view = state
            .views
            .entry((fleet.to_string(), host.name.clone()))
            .or_default();
        view.gpu_names = report.gpu_names.clone();
        Ok(report)
    }

    /// Lists one host's slots in one exec.
    async fn list_host(&self, fleet: &str, host: &Host) -> Result<HostView, TransportError> {
        let t = self.transport(fleet, host);
        let script = format!(
            r#"root={root}
{prelude}
printf 'root\t%s\n' "$root"
for d in "$root"/instances/*; do
  [ -f "$d/tag" ] || continue
  mine "$d" || continue
  alive=no
  if [ -f "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then alive=yes; fi
  printf 'slot\t%s\t%s\t%s\t%s\t%s\n' "$(cat "$d/tag")" "$(cat "$d/gpus" 2>/dev/null || echo 0)" \
    "$(cat "$d/gpu_ids" 2>/dev/null)" "$(cat "$d/created" 2>/dev/null)" "$alive"
done
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed '/^$/d; s/^/gpu	/'
fi
true
"#,
            root = root_word(&self.remote_root),
            prelude = host_prelude(&t.host_key().await?),
        );
        let out = t.exec(&script).await?;
        if out.status != 0 {
            return Err(TransportError::Failed {
                machine: t.target().machine.clone(),
                step: "list slots",
                message: out.stderr.trim().to_string(),
            });
        }
        Ok(parse_listing(&out.stdout))
    }

    fn instance(&self, fleet: &str, host: &Host, view: &HostView, slot: &Slot) -> Option<Instance> {
        let tag = OwnerTag::parse(&slot.tag)?;
        let root = view
            .root
            .clone()
            .unwrap_or_else(|| self.remote_root.clone());
        let gpu = if slot.gpus == 0 {
            None
        } else {
            let name = view
                .gpu_names
                .first()
                .and_then(|n| n.split(',').next())
                .map(str::trim)
                .unwrap_or("GPU");
            Some(format!("{}x {name}", slot.gpus))
        };
        Some(Instance {
            provider: ProviderKind::Ssh,
            id: instance_id(fleet, &host.name, &slot.tag),
            tag,
            state: if view.reachable {
                InstanceState::Running
            } else {
                InstanceState::Stopped
            },
            endpoint: Some(Endpoint::Ssh {
                host: host.address.clone(),
                port: host.port,
                user: host.user.clone().unwrap_or_else(|| self.local_user.clone()),
                identity_file: host.identity_file.clone(),
                root: format!("{}/instances/{}", root.trim_end_matches('/'), slot.tag),
            }),
            gpu,
            price_per_hour: Usd::ZERO,
            created_at: slot.created,
            host: Some(host.name.clone()),
        })
    }

    /// Tries to take a slot on one host; `Ok(None)` when the host is full.
    /// Records that `host` did not answer, as a listing would.
    fn mark_unreachable(&self, fleet: &str, host: &str, e: &TransportError) {
        let mut state = self.lock();
        let view = state
            .views
            .entry((fleet.to_string(), host.to_string()))
            .or_default();
        view.reachable = false;
        view.contacted = true;
        view.message = Some(e.to_string());
    }

    async fn claim(
        &self,
        fleet: &str,
        host: &Host,
        tag: &str,
        need: u32,
    ) -> Result<Option<Slot>, ClaimError> {
        let t = self.transport(fleet, host);
        // Connecting (the host key) first: a failure there means nothing ran.
        let host_key = t.host_key().await.map_err(ClaimError::NotRun)?;
        let script = format!(
            r#"root={root}; tag={tag}; total={total}; need={need}
{prelude}
d="$root/instances/$tag"
mkdir -p "$root/instances"
# mkdir is atomic: one claimer at a time, whoever runs it.
i=0
while ! mkdir "$root/.claim.lock" 2>/dev/null; do
  i=$((i+1)); if [ $i -gt 100 ]; then echo "claim lock $root/.claim.lock held for 10s" >&2; exit 5; fi
  sleep 0.1
done
trap 'rmdir "$root/.claim.lock"' EXIT
if [ -f "$d/tag" ]; then
  # This attempt already has a slot: here (adopt it), or on another host (not here).
  mine "$d" || exit 4
  printf 'slot\t%s\t%s\t%s\t%s\n' "$tag" "$(cat "$d/gpus")" "$(cat "$d/gpu_ids" 2>/dev/null)" "$(cat "$d/created" 2>/dev/null)"
  exit 0
fi
used=" "; slots=0; whole=no
for x in "$root"/instances/*; do
  [ -f "$x/tag" ] || continue
  mine "$x" || continue
  slots=$((slots+1))
  g=$(cat "$x/gpus" 2>/dev/null || echo 0)
  [ "$g" = 0 ] && whole=yes
  used="$used$(tr ',' ' ' < "$x/gpu_ids" 2>/dev/null) "
done
[ "$whole" = yes ] && exit 3
if [ "$need" -eq 0 ]; then [ "$slots" -eq 0 ] || exit 3; fi
ids=""; n=0; i=0
while [ $i -lt $total ] && [ $n -lt $need ]; do
  case "$used" in *" $i "*) ;; *) ids="$ids${{ids:+,}}$i"; n=$((n+1)) ;; esac
  i=$((i+1))
done
[ $n -lt $need ] && exit 3
now=$(date +%s)
mkdir -p "$d"
rm -f "$d/host"
printf '%s\n' "$me" > "$d/host"
printf '%s\n' "$need" > "$d/gpus"
printf '%s\n' "$ids" > "$d/gpu_ids"
printf '%s\n' "$now" > "$d/created"
printf '%s\n' "$tag" > "$d/tag.part" && mv -f "$d/tag.part" "$d/tag"
printf 'slot\t%s\t%s\t%s\t%s\n' "$tag" "$need" "$ids" "$now"
"#,
            root = root_word(&self.remote_root),
            prelude = host_prelude(&host_key),
            tag = quote(tag),
            total = host.gpus,
        );
        let out = t.exec(&script).await.map_err(ClaimError::Unsure)?;
        let failed = |status: i32| TransportError::Failed {
            machine: t.target().machine.clone(),
            step: "claim slot",
            message: format!("exit {status}: {}", out.stderr.trim()),
        };
        match out.status {
            0 => Ok(parse_listing(&out.stdout).slots.into_iter().next()),
            // Full, or the attempt's slot is another host's.
            3 | 4 => Ok(None),
            // The claim lock stayed busy: the script stopped before it claimed.
            5 => Err(ClaimError::NotRun(failed(5))),
            // Anything else (ssh's 255 for a cut connection among them) may have come
            // after the slot was written.
            status => Err(ClaimError::Unsure(failed(status))),
        }
    }
}

fn split_id(id: &str) -> ProviderResult<(&str, &str, &str)> {
    let mut parts = id.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(f), Some(h), Some(t)) if !f.is_empty() && !h.is_empty() && !t.is_empty() => {
            Ok((f, h, t))
        }
        _ => Err(err(
            ErrorKind::NotFound,
            "parse instance id",
            format!("{id:?} is not <fleet>/<host>/<tag>"),
        )),
    }
}

/// GPUs not held by any slot; 0 while a whole-host slot is there.
fn free_gpus(host: &Host, slots: &[Slot]) -> u32 {
    HostStatus::free_gpus(host.gpus, slots.iter().map(|s| s.gpus))
}

/// Parses `root`, `slot` and `gpu` lines written by the host scripts.
fn parse_listing(text: &str) -> HostView {
    let mut view = HostView {
        reachable: true,
        contacted: true,
        ..HostView::default()
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["root", root] => view.root = Some(root.to_string()),
            ["slot", tag, gpus, ids, created, rest @ ..] => view.slots.push(Slot {
                tag: tag.trim().to_string(),
                gpus: gpus.trim().parse().unwrap_or(0),
                gpu_ids: ids.trim().to_string(),
                created: created.trim().parse().ok(),
                alive: rest.first().is_some_and(|a| *a == "yes"),
            }),
            ["gpu", name] => view.gpu_names.push(name.trim().to_string()),
            _ => {}
        }
    }
    view
}

#[async_trait]
impl Provider for SshProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Ssh
    }

    /// Slots are listed the moment they are claimed and run at once; the hosts are the
    /// user's own (nothing bills), so a slow resync costs nothing but a late notice.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            listing_lag: std::time::Duration::ZERO,
            fixed_pool: true,
            keep_disk: None,
            ..Capabilities::default()
        }
    }

    fn set_fleets(&self, fleets: &[Fleet]) {
        SshProvider::set_fleets(self, fleets.to_vec());
    }

    fn hosts(&self) -> Vec<HostStatus> {
        self.host_statuses()
    }

    /// Each reachable host with room, as one offer of its free GPUs (the fleet's
    /// machines cost nothing to asimov).
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        let offers = self
            .host_statuses()
            .into_iter()
            .filter(|h| h.reachable && !h.busy)
            .map(|h| {
                let mut o = Offer::new(
                    ProviderKind::Ssh,
                    format!("{}/{}", h.fleet, h.host),
                    Usd::ZERO,
                );
                o.gpu = h
                    .gpu_names
                    .first()
                    .and_then(|n| n.split(',').next())
                    .map(|n| n.trim().to_string());
                o.count = h.gpus_free;
                o.location = Some(h.host.clone());
                o
            })
            .filter(|o| query.matches(o))
            .collect();
        Ok(offers)
    }

    async fn list(&self) -> ProviderResult<Vec<Instance>> {
        let fleets = self.lock().fleets.clone();
        let hosts: Vec<(String, Host)> = fleets
            .iter()
            .flat_map(|f| f.hosts.iter().map(|h| (f.name.clone(), h.clone())))
            .collect();
        let results = futures_util::future::join_all(
            hosts
                .iter()
                .map(|(fleet, host)| self.list_host(fleet, host)),
        )
        .await;
        let mut unreachable = 0;
        let mut instances = Vec::new();
        let mut state = self.lock();
        for ((fleet, host), result) in hosts.iter().zip(results) {
            let key = (fleet.clone(), host.name.clone());
            let previous = state.views.remove(&key).unwrap_or_default();
            let view = match result {
                Ok(mut view) => {
                    // Its slots are known again: a cut-off claim there is either among
                    // them (and adopted) or never happened.
                    state.unsure.retain(|tag, (f, h, _)| {
                        let answered = f == fleet && *h == host.name;
                        if answered {
                            self.unsure.forget(tag);
                        }
                        !answered
                    });
                    if view.gpu_names.is_empty() {
                        view.gpu_names = previous.gpu_names;
                    }
                    view
                }
                Err(e) => {
                    unreachable += 1;
                    tracing::warn!(fleet = %fleet, host = %host.name, error = %e, "ssh host not listed");
                    // What it held last time stays listed, as Stopped: not gone.
                    HostView {
                        reachable: false,
                        contacted: true,
                        message: Some(e.to_string()),
                        ..previous
                    }
                }
            };
            instances.extend(
                view.slots
                    .iter()
                    .filter_map(|slot| self.instance(fleet, host, &view, slot)),
            );
            state.views.insert(key, view);
        }
        if !hosts.is_empty() && unreachable == hosts.len() {
            return Err(err(
                ErrorKind::Transient,
                "list instances",
                format!("none of the {} fleet hosts answered", hosts.len()),
            ));
        }
        Ok(instances)
    }

    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance> {
        let step = "create instance";
        let Some(fleet_name) = req.placement.fleet.clone() else {
            return Err(err(
                ErrorKind::Permanent,
                step,
                "ssh placement names no fleet",
            ));
        };
        let tag = req.tag.render();
        let need = req.resources.gpu.as_ref().map(|g| g.count).unwrap_or(0);
        let (fleet, unanswered) = {
            let mut state = self.lock();
            let Some(fleet) = state.fleets.iter().find(|f| f.name == fleet_name).cloned() else {
                return Err(err(
                    ErrorKind::Permanent,
                    step,
                    format!("unknown fleet {fleet_name}"),
                ));
            };
            // Already placed (a create cut off after the host answered): adopt it.
            for host in &fleet.hosts {
                if let Some(view) = state.views.get(&(fleet.name.clone(), host.name.clone()))
                    && let Some(slot) = view.slots.iter().find(|s| s.tag == tag)
                    && let Some(instance) = self.instance(&fleet.name, host, view, slot)
                {
                    return Ok(instance);
                }
            }
            let mut unanswered = None;
            if let Some((_, host, since)) = state.unsure.get(&tag) {
                let waited = since.elapsed();
                let wait = unsure_claim_wait();
                if waited < wait {
                    return Err(err(
                        ErrorKind::Transient,
                        step,
                        format!(
                            "the claim on {host} was cut off and may have placed this run \
                             there; waiting for {host} to answer ({}s of at most {}s) \
                             before claiming elsewhere",
                            waited.as_secs(),
                            wait.as_secs()
                        ),
                    ));
                }
                // Waited long enough: claim elsewhere this time. Should the cut-off
                // claim have placed it there after all, the listing shows two slots
                // for one attempt and the planner destroys the one it does not own.
                unanswered = state.unsure.remove(&tag).map(|(_, host, _)| host);
                self.unsure.forget(&tag);
            }
            (fleet, unanswered)
        };
        if need > 0 && !fleet.hosts.iter().any(|h| h.gpus >= need) {
            return Err(err(
                ErrorKind::Permanent,
                step,
                format!("no host in fleet {fleet_name} has {need} GPUs"),
            ));
        }
        let mut skipped = Vec::new();
        for host in &fleet.hosts {
            if need > host.gpus {
                continue;
            }
            if unanswered.as_ref() == Some(&host.name) {
                skipped.push(format!("{} not answering since a cut-off claim", host.name));
                continue;
            }
            match self.claim(&fleet.name, host, &tag, need).await {
                Ok(Some(slot)) => {
                    // Cached by the master that just ran the claim: no extra round trip.
                    let home = self.transport(&fleet.name, host).remote_home().await.ok();
                    let mut state = self.lock();
                    let view = state
                        .views
                        .entry((fleet.name.clone(), host.name.clone()))
                        .or_default();
                    view.reachable = true;
                    view.contacted = true;
                    view.message = None;
                    if view.root.is_none() {
                        view.root = home.map(|h| resolve_root(&self.remote_root, &h));
                    }
                    view.slots.retain(|s| s.tag != slot.tag);
                    view.slots.push(slot.clone());
                    let view = view.clone();
                    return self
                        .instance(&fleet.name, host, &view, &slot)
                        .ok_or_else(|| {
                            err(
                                ErrorKind::Permanent,
                                step,
                                format!("tag {tag} does not parse"),
                            )
                        });
                }
                Ok(None) => skipped.push(format!("{} busy", host.name)),
                Err(ClaimError::NotRun(e)) => {
                    skipped.push(format!("{} unreachable", host.name));
                    self.mark_unreachable(&fleet.name, &host.name, &e);
                }
                Err(ClaimError::Unsure(e)) => {
                    // Claiming on the next host now could place the attempt twice.
                    self.mark_unreachable(&fleet.name, &host.name, &e);
                    self.unsure.record(&tag, &fleet.name, &host.name);
                    self.lock().unsure.insert(
                        tag.clone(),
                        (fleet.name.clone(), host.name.clone(), Instant::now()),
                    );
                    return Err(err(
                        ErrorKind::Transient,
                        step,
                        format!(
                            "the claim on {} got no answer ({e}); it may have placed this \
                             run there, so no other host is tried until {} answers",
                            host.name, host.name
                        ),
                    ));
                }
            }
        }
        Err(err(
            ErrorKind::NoCapacity,
            step,
            format!(
                "no free slot for {need} GPU(s) in fleet {fleet_name} ({})",
                skipped.join(", ")
            ),
        ))
    }

    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()> {
        let step = "destroy instance";
        let (fleet, host_name, tag) = split_id(id)?;
        let host = self
            .lock()
            .known
            .get(&(fleet.to_string(), host_name.to_string()))
            .cloned()
            .ok_or_else(|| {
                err(
                    ErrorKind::NotFound,
                    step,
                    format!("unknown host {fleet}/{host_name}"),
                )
            })?;
        let t = self.transport(fleet, &host);
        let hk = t.host_key().await.map_err(|e| from_transport(step, e))?;
        let script = format!(
            r#"d={root}/instances/{tag}
{prelude}
[ -d "$d" ] || {{ echo gone; exit 0; }}
# Another host's slot (a shared home): not here, and its pid means nothing here.
mine "$d" || {{ echo gone; exit 0; }}
if [ -f "$d/agent.sh" ]; then sh "$d/agent.sh" stop "$d" >/dev/null 2>&1 || true; fi
if [ -f "$d/pid" ]; then
  p=$(cat "$d/pid")
  kill -TERM -"$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true
fi
rm -rf "$d"
echo removed
"#,
            root = root_word(&self.remote_root),
            prelude = host_prelude(&hk),
            tag = quote(tag),
        );
        let out = t.exec(&script).await.map_err(|e| from_transport(step, e))?;
        if out.status != 0 {
            return Err(err(
                ErrorKind::Transient,
                step,
                format!("{id}: exit {}: {}", out.status, out.stderr.trim()),
            ));
        }
        if let Some(view) = self
            .lock()
            .views
            .get_mut(&(fleet.to_string(), host_name.to_string()))
        {
            view.slots.retain(|s| s.tag != tag);
        }
        if out.stdout.trim() == "gone" {
            return Err(err(
                ErrorKind::NotFound,
                step,
                format!("{id} is already gone"),
            ));
        }
        Ok(())
    }

    fn machine(&self, instance: &Instance) -> ProviderResult<Arc<dyn crate::agent::Machine>> {
        if instance.state != InstanceState::Running {
            return Err(err(
                ErrorKind::Transient,
                "reach instance",
                format!("{} is on a host that does not answer", instance.id),
            ));
        }
        let transport = self.transport_for(instance)?;
        let Some(Endpoint::Ssh { root, .. }) = &instance.endpoint else {
            return Err(err(
                ErrorKind::Permanent,
                "reach instance",
                format!("{} has no ssh endpoint", instance.id),
            ));
        };
        Ok(Arc::new(crate::agent::AgentMachine::new(
            Arc::new(transport),
            root.clone(),
        )))
    }
}

/// `root` with a leading `~` replaced by the remote `home`.
fn resolve_root(root: &str, home: &str) -> String {
    if root == "~" {
        home.to_string()
    } else if let Some(rest) = root.strip_prefix("~/") {
        format!("{}/{rest}", home.trim_end_matches('/'))
    } else {
        root.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_off_claims_are_kept_on_disk_by_plain_tags_until_forgotten_or_a_day_old() {
        let dir = tempfile::tempdir().unwrap();
        let claims = UnsureClaims {
            dir: dir.path().join("unsure"),
        };
        assert!(claims.load().is_empty());
        claims.record("asimov.houw128d.kd-0.1", "lab", "box-1");
        // Not a tag of ours: never a path.
        claims.record("../escape", "lab", "box-1");
        claims.record(".hidden", "lab", "box-1");
        let loaded = claims.load();
        assert_eq!(loaded.len(), 1, "{loaded:?}");
        let (fleet, host, since) = &loaded["asimov.houw128d.kd-0.1"];
        assert_eq!((fleet.as_str(), host.as_str()), ("lab", "box-1"));
        assert!(since.elapsed() < Duration::from_secs(5));
        assert!(!dir.path().join("escape").exists());
        // A record's age survives the reload.
        let old = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - 90;
        std::fs::write(
            claims.dir.join("asimov.h.old-0.1"),
            format!("lab\nbox-2\n{old}\n"),
        )
        .unwrap();
        let stale = old - 2 * 24 * 3600;
        std::fs::write(
            claims.dir.join("asimov.h.stale-0.1"),
            format!("lab\nbox-2\n{stale}\n"),
        )
        .unwrap();
        std::fs::write(claims.dir.join("asimov.h.torn-0.1"), "lab\n").unwrap();
        let loaded = claims.load();
        let aged = loaded["asimov.h.old-0.1"].2.elapsed();
        assert!(aged >= Duration::from_secs(89), "{aged:?}");
        assert_eq!(
            loaded.len(),
            2,
            "the day-old and the torn ones dropped: {loaded:?}"
        );
        assert!(!claims.dir.join("asimov.h.stale-0.1").exists());
        assert!(!claims.dir.join("asimov.h.torn-0.1").exists());
        claims.forget("asimov.houw128d.kd-0.1");
        claims.forget("asimov.h.old-0.1");
        assert!(claims.load().is_empty());
    }

    fn host(gpus: u32) -> Host {
        Host {
            name: "h".into(),
            user: None,
            address: "127.0.0.1".into(),
            port: 22,
            identity_file: None,
            proxy_jump: None,
            gpus,
            labels: Default::default(),
        }
    }

    fn slot(gpus: u32) -> Slot {
        Slot {
            tag: "t".into(),
            gpus,
            gpu_ids: String::new(),
            created: None,
            alive: false,
        }
    }

    #[test]
    fn free_gpus_counts_slots_and_whole_host_jobs() {
        assert_eq!(free_gpus(&host(4), &[]), 4);
        assert_eq!(free_gpus(&host(4), &[slot(1), slot(2)]), 1);
        assert_eq!(free_gpus(&host(4), &[slot(0)]), 0);
    }

    #[test]
    fn listing_lines_parse() {
        let view = parse_listing(
            "root\t/home/u/.asimov-agent\nslot\tasimov.c.r-0.1\t2\t0,1\t1700000000\tyes\ngpu\tA100, 81920 MiB\njunk\n",
        );
        assert_eq!(view.root.as_deref(), Some("/home/u/.asimov-agent"));
        assert_eq!(
            view.slots,
            vec![Slot {
                tag: "asimov.c.r-0.1".into(),
                gpus: 2,
                gpu_ids: "0,1".into(),
                created: Some(1_700_000_000),
                alive: true,
            }]
        );
        assert_eq!(view.gpu_names, vec!["A100, 81920 MiB".to_string()]);
    }

    /// `mine` in a real shell: a slot of another host is not ours; a slot without a
    /// `host` file (from before slots recorded one) is adopted by the first to look.
    #[test]
    fn a_slot_is_mine_only_when_this_host_claimed_it() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs, legacy) = ("ours", "theirs", "legacy");
        for d in [ours, theirs, legacy] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let me = |key: &str| {
            let script = format!("{}\nprintf %s \"$me\"", host_prelude(key));
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .output();
            String::from_utf8(out.unwrap().stdout).unwrap()
        };
        std::fs::write(dir.path().join(ours).join("host"), me("SHA256:a") + "\n").unwrap();
        std::fs::write(dir.path().join(theirs).join("host"), me("SHA256:b") + "\n").unwrap();
        let script = format!(
            "{}\nfor d in {ours} {theirs} {legacy} {legacy}; do mine \"$d\" && echo \"$d\"; done",
            host_prelude("SHA256:a")
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ours\nlegacy\nlegacy\n"
        );
        assert_ne!(
            me("SHA256:a"),
            me("SHA256:b"),
            "the host key tells hosts apart"
        );
    }

    #[test]
    fn ids_split_into_fleet_host_tag() {
        assert_eq!(
            split_id("lab/box/asimov.c.r-0.1").unwrap(),
            ("lab", "box", "asimov.c.r-0.1")
        );
        assert!(split_id("lab/box").is_err());
        assert_eq!(root_word("~/.a b"), "\"$HOME\"/'.a b'");
        assert_eq!(root_word("/srv/x"), "'/srv/x'");
    }
}
