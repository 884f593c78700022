//! The `Provider` trait, its canonical error kinds, the facts each provider declares
//! (`Capabilities`), and the backends: `local` (the embedded default), `ssh` (hosts of a
//! fleet), the in-process `fake`, and later the clouds. Errors are classified here, once
//! (`ErrorKind::of_transport`, `ErrorKind::of_agent`, and each backend's own API
//! errors); nothing above this layer reads a provider's raw message text, or names a
//! provider, to decide anything. Must not know about the store or the planner.
//!
//! Adding a provider: one file under `src/provider/` implementing [`Provider`], and its
//! line in [`DRIVEN`] and [`registry`].

pub mod cloud;
pub mod fake;
pub mod lambda;
pub mod local;
pub mod runpod;
pub mod ssh;
pub mod vast;

use crate::agent::AgentError;
use crate::home::Home;
use crate::manifest::Fleet;
use crate::model::{
    HostStatus, InstanceId, Offer, OfferQuery, OwnerTag, ProviderKind, Timestamp, Usd,
};
use crate::transport::TransportError;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Canonical classes of provider failure. Retry and failover branch on these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    /// Something with this name or tag exists already (a create that raced a first one):
    /// the next listing shows it, and the planner adopts it.
    AlreadyExists,
    RateLimited {
        retry_after: Option<Duration>,
    },
    NoCapacity,
    /// The credentials are missing, wrong or expired.
    Unauthenticated,
    /// The credentials are good but may not do this (scope, team role).
    PermissionDenied,
    /// An account limit (instances, GPUs, spend) refuses more.
    Quota,
    /// The account has no funds or no payment method.
    PaymentRequired,
    Transient,
    Permanent,
}

impl ErrorKind {
    /// True when the same call may succeed later without a person acting.
    pub fn retryable(&self) -> bool {
        match self {
            ErrorKind::RateLimited { .. } | ErrorKind::NoCapacity | ErrorKind::Transient => true,
            ErrorKind::NotFound
            | ErrorKind::AlreadyExists
            | ErrorKind::Unauthenticated
            | ErrorKind::PermissionDenied
            | ErrorKind::Quota
            | ErrorKind::PaymentRequired
            | ErrorKind::Permanent => false,
        }
    }

    /// True when the provider refused a create for good: nothing was created, and
    /// trying again unchanged will not help.
    pub fn refuses_create(&self) -> bool {
        match self {
            ErrorKind::Unauthenticated
            | ErrorKind::PermissionDenied
            | ErrorKind::Quota
            | ErrorKind::PaymentRequired
            | ErrorKind::Permanent => true,
            ErrorKind::NotFound
            | ErrorKind::AlreadyExists
            | ErrorKind::RateLimited { .. }
            | ErrorKind::NoCapacity
            | ErrorKind::Transient => false,
        }
    }

    /// The kind of a transport failure: a machine that cannot be reached now is
    /// transient; a changed host key or a refused login needs a person.
    pub fn of_transport(e: &TransportError) -> ErrorKind {
        match e {
            TransportError::Unreachable { .. } => ErrorKind::Transient,
            TransportError::HostKeyChanged { .. } => ErrorKind::Unauthenticated,
            TransportError::Failed {
                step: "authenticate",
                ..
            } => ErrorKind::Unauthenticated,
            TransportError::Failed { .. } | TransportError::Io { .. } => ErrorKind::Transient,
        }
    }

    /// The kind of an agent failure: its transport's, permanent when the job itself was
    /// refused, or transient (the agent script failed on a machine that may answer next
    /// time).
    pub fn of_agent(e: &AgentError) -> ErrorKind {
        match e {
            AgentError::Transport { source, .. } => ErrorKind::of_transport(source),
            AgentError::Failed { .. } => ErrorKind::Transient,
            // The machine refused what was asked (an upload over its limit): a person
            // must change the job.
            AgentError::Rejected { .. } => ErrorKind::Permanent,
        }
    }
}

/// How hard a provider's API may be driven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pacing {
    /// Calls in flight at once: API calls (create, destroy) and work on its machines
    /// (agent start, reads, collect) each have this many, apart, so neither waits on the
    /// other.
    pub max_in_flight: usize,
    /// The shortest time between two periodic resyncs of a key using it; the resync
    /// period never goes below it.
    pub min_resync: Duration,
}

/// The facts a provider declares about itself, which the planner and controller read as
/// data (nothing above the provider layer names a provider to decide anything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// How long a freshly created instance may be missing from `list`: until then an
    /// intent that is not listed is neither re-created nor released.
    pub listing_lag: Duration,
    /// How long an instance may stay `Provisioning`: past it the attempt ends
    /// (`Outcome::BootTimeout`) and the instance is destroyed. Where types differ
    /// (`boot_timeouts`), the longest.
    pub boot_timeout: Duration,
    /// Listed instances with a boot timeout of their own: a provider whose types boot
    /// at different speeds (Lambda's, by GPU count) says so per instance, as its last
    /// listing saw them. Read through [`Capabilities::boot_timeout_of`].
    pub boot_timeouts: BTreeMap<InstanceId, Duration>,
    pub pacing: Pacing,
    /// Every key using this provider is re-planned at least this often, even when
    /// nothing changed (an instance billing behind asimov's back, a silent agent).
    pub resync: Duration,
    /// Whether a `Stopped` instance still bills (its price counts against budgets).
    pub bills_while_stopped: bool,
    /// The user its instances' SSH servers log in as (`root`, `ubuntu`); `None` when
    /// each machine says (fleet hosts) or no SSH is involved. A placement's `ssh_user`
    /// overrides it.
    pub ssh_user: Option<String>,
    /// A fixed pool of machines (a fleet): its listing reports hosts ([`Provider::hosts`]),
    /// runs wait in a queue for a free one, and a create finding none goes back to the
    /// queue instead of backing off and failing over.
    pub fixed_pool: bool,
    /// An instance can be stopped with its disk kept and started again later
    /// ([`Provider::stop_keeping_disk`], [`Provider::start_kept`]): how long a start may
    /// take to run again before the instance is given up. `None`: it cannot.
    pub keep_disk: Option<Duration>,
}

impl Default for Capabilities {
    /// A provider that lists what it creates at once, boots within ten minutes and
    /// takes sixteen calls at a time.
    fn default() -> Self {
        Capabilities {
            listing_lag: Duration::ZERO,
            boot_timeout: Duration::from_secs(600),
            boot_timeouts: BTreeMap::new(),
            pacing: Pacing {
                max_in_flight: 16,
                min_resync: Duration::from_secs(30),
            },
            resync: Duration::from_secs(300),
            bills_while_stopped: false,
            ssh_user: None,
            fixed_pool: false,
            keep_disk: None,
        }
    }
}

impl Capabilities {
    /// How long instance `id` may stay `Provisioning`.
    pub fn boot_timeout_of(&self, id: &InstanceId) -> Duration {
        self.boot_timeouts
            .get(id)
            .copied()
            .unwrap_or(self.boot_timeout)
    }

    /// The periodic resync, never faster than the provider's pacing allows.
    pub fn resync_period(&self) -> Duration {
        self.resync.max(self.pacing.min_resync)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{provider}: {step}: {message}")]
pub struct ProviderError {
    pub provider: ProviderKind,
    pub kind: ErrorKind,
    /// What asimov was doing: "list instances", "create instance", ...
    pub step: &'static str,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProviderError {
    pub fn new(
        provider: ProviderKind,
        kind: ErrorKind,
        step: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ProviderError {
            provider,
            kind,
            step,
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

/// The provider's view of an instance's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Asked for, booting, loading an image.
    Provisioning,
    /// Up and reachable for the transport.
    Running,
    /// Stopped, paused, outbid or preempted: exists (may bill storage) but runs nothing.
    Stopped,
    /// Being torn down or gone; still listed by some providers for a while.
    Terminating,
}

/// How the transport reaches an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// This machine; `root` is the instance folder.
    Local { root: PathBuf },
    /// An OpenSSH server; `root` is the instance folder on the remote side.
    Ssh {
        host: String,
        port: u16,
        user: String,
        identity_file: Option<PathBuf>,
        root: String,
    },
}

/// One asimov-tagged instance as a provider lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub provider: ProviderKind,
    pub id: InstanceId,
    pub tag: OwnerTag,
    pub state: InstanceState,
    /// `None` until the provider says how to reach it.
    pub endpoint: Option<Endpoint>,
    pub gpu: Option<String>,
    pub price_per_hour: Usd,
    pub created_at: Option<Timestamp>,
    /// Where a fleet instance lives (ssh host name); `None` elsewhere.
    pub host: Option<String>,
}

/// What the executor asks a provider for. The tag rides on the create call itself, so
/// an op cut off at any `.await` is adopted on restart rather than duplicated.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub tag: OwnerTag,
    pub placement: crate::manifest::Placement,
    pub resources: crate::manifest::Resources,
    pub image: Option<String>,
}

pub type ProviderResult<T> = Result<T, ProviderError>;

/// A backend that rents machines.
///
/// Required: `kind`, `capabilities`, `list`, `create`, `destroy`, `offers`, `machine`.
/// Fixed pools (fleets) also override `set_fleets` and `hosts`.
#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// The facts the planner and controller read about this provider. Cheap; called
    /// every pass.
    fn capabilities(&self) -> Capabilities;

    /// Every instance carrying an asimov tag, whatever controller wrote it. One call per
    /// controller pass serves all runs. Errors are classified (`RateLimited` with its
    /// retry-after reaches the planner).
    async fn list(&self) -> ProviderResult<Vec<Instance>>;

    /// Creates an instance carrying `req.tag`. `NoCapacity` when nothing fits now; a
    /// kind for which [`ErrorKind::refuses_create`] holds when nothing was created and
    /// never will be as asked; any other error leaves it open whether the instance
    /// exists (the next listing tells).
    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance>;

    /// Asks for the instance to be destroyed. `NotFound` means it is already gone.
    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()>;

    /// What could be rented now that matches `query`, in any order: a market's offers,
    /// a cloud's instance types with capacity, a fleet's hosts with free GPUs, this
    /// machine for `local`.
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>>;

    /// The agent on a listed instance: real backends drive the agent script over a
    /// transport built from the endpoint (reusing one connection per machine); the fake
    /// simulates the machine. `Transient` while the instance is not reachable yet.
    fn machine(&self, instance: &Instance) -> ProviderResult<Arc<dyn crate::agent::Machine>>;

    /// Stops instance `id` keeping its disk, for a pause that resumes on the same disk
    /// (where `Capabilities::keep_disk` says it can); what it bills an hour stopped,
    /// when the provider says. `Permanent` where a provider cannot.
    async fn stop_keeping_disk(&self, id: &InstanceId) -> ProviderResult<Option<Usd>> {
        Err(ProviderError::new(
            self.kind(),
            ErrorKind::Permanent,
            "stop instance",
            format!("{} cannot stop {id} and keep its disk", self.kind()),
        ))
    }

    /// Starts instance `id`, stopped by `stop_keeping_disk`, again and waits up to
    /// `Capabilities::keep_disk` for it to run: the instance as listed running then.
    /// `NoCapacity` when it did not run again in time (its GPUs taken), `NotFound` when
    /// it is gone: it will not come back, and the caller rents anew.
    async fn start_kept(&self, id: &InstanceId) -> ProviderResult<Instance> {
        Err(ProviderError::new(
            self.kind(),
            ErrorKind::Permanent,
            "start instance",
            format!("{} cannot start {id} again", self.kind()),
        ))
    }

    /// The fleets of the desired state, before each pass's listing: a fixed pool lists
    /// and places on their hosts. Others ignore it.
    fn set_fleets(&self, _fleets: &[Fleet]) {}

    /// The hosts of a fixed pool as its last `list` (or create, destroy) saw them: the
    /// planner's fleet queues read them. Empty for everything else.
    fn hosts(&self) -> Vec<HostStatus> {
        Vec::new()
    }
}

/// The providers a controller can drive, in registration order.
pub const DRIVEN: &[ProviderKind] = &[
    ProviderKind::Local,
    ProviderKind::Ssh,
    ProviderKind::Vast,
    ProviderKind::Lambda,
    ProviderKind::Runpod,
];

/// The providers a controller drives, and the one pool of SSH connections they share
/// (its owner closes it on every way out, so no master outlives the controller).
pub struct Registry {
    pub providers: BTreeMap<ProviderKind, Arc<dyn Provider>>,
    pub ssh_pool: Arc<crate::transport::ssh::SshPool>,
}

/// Whole seconds from `env`, else `default` (unset or not a number): the providers'
/// tunable waits (listing lags, boot timeouts, claim waits), for tests on a faster
/// clock or a slow image.
pub fn seconds_env(env: &str, default: Duration) -> Duration {
    std::env::var(env)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(default, Duration::from_secs)
}

/// Builds every provider in [`DRIVEN`] for the controller of `home`.
pub fn registry(home: &Home) -> std::io::Result<Registry> {
    let ssh_pool = crate::transport::ssh::SshPool::new(home.clone())?;
    let mut out: BTreeMap<ProviderKind, Arc<dyn Provider>> = BTreeMap::new();
    for kind in DRIVEN {
        let provider: Arc<dyn Provider> = match kind {
            ProviderKind::Local => Arc::new(local::LocalProvider::new(home.clone())),
            ProviderKind::Ssh => Arc::new(ssh::SshProvider::with_pool(Arc::clone(&ssh_pool))),
            // Clouds only with a key: without one their runs wait as Pending.
            ProviderKind::Vast => match vast::VastProvider::from_home(home, Arc::clone(&ssh_pool))?
            {
                Some(v) => Arc::new(v),
                None => continue,
            },
            ProviderKind::Lambda => {
                match lambda::LambdaProvider::from_home(home, Arc::clone(&ssh_pool))? {
                    Some(v) => Arc::new(v),
                    None => continue,
                }
            }
            ProviderKind::Runpod => {
                match runpod::RunpodProvider::from_home(home, Arc::clone(&ssh_pool))? {
                    Some(v) => Arc::new(v),
                    None => continue,
                }
            }
            ProviderKind::Fake => continue,
        };
        out.insert(*kind, provider);
    }
    Ok(Registry {
        providers: out,
        ssh_pool,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_say_whether_to_retry() {
        assert!(ErrorKind::RateLimited { retry_after: None }.retryable());
        assert!(ErrorKind::Transient.retryable());
        assert!(!ErrorKind::PaymentRequired.retryable());
        assert!(ErrorKind::Quota.refuses_create());
        assert!(!ErrorKind::AlreadyExists.refuses_create());
        let e = TransportError::HostKeyChanged {
            machine: "m".into(),
            pinned: "a".into(),
            offered: "b".into(),
        };
        assert_eq!(ErrorKind::of_transport(&e), ErrorKind::Unauthenticated);
    }

    #[test]
    fn resync_respects_pacing() {
        let c = Capabilities {
            resync: Duration::from_secs(1),
            ..Capabilities::default()
        };
        assert_eq!(c.resync_period(), c.pacing.min_resync);
    }
}
