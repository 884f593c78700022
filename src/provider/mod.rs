//! The `Provider` trait, its canonical error kinds, and the backends: `local` (the
//! embedded default), `ssh` (hosts of a fleet), the in-process `fake`, and later the
//! clouds. Errors are classified here, once; nothing above this layer reads a provider's
//! raw message text to decide anything. Must not know about the store or the planner.

pub mod cloud;
pub mod fake;
pub mod lambda;
pub mod local;
pub mod runpod;
pub mod ssh;
pub mod vast;

use crate::model::{InstanceId, OwnerTag, ProviderKind, Timestamp};
use async_trait::async_trait;
use std::path::PathBuf;
use std::time::Duration;

/// Canonical classes of provider failure. Retry and failover branch on these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    RateLimited { retry_after: Option<Duration> },
    NoCapacity,
    Unauthenticated,
    Transient,
    Permanent,
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
    pub price_per_hour: f64,
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

#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// Every instance carrying an asimov tag, whatever controller wrote it. One call per
    /// controller pass serves all runs.
    async fn list(&self) -> ProviderResult<Vec<Instance>>;

    /// Creates an instance carrying `req.tag`. `NoCapacity` when nothing fits now.
    async fn create(&self, req: &CreateRequest) -> ProviderResult<Instance>;

    /// Asks for the instance to be destroyed. `NotFound` means it is already gone.
    async fn destroy(&self, id: &InstanceId) -> ProviderResult<()>;

    /// The agent on a listed instance: real backends drive the agent script over a
    /// transport built from the endpoint (reusing one connection per machine); the fake
    /// simulates the machine. `Transient` while the instance is not reachable yet.
    fn machine(
        &self,
        instance: &Instance,
    ) -> ProviderResult<std::sync::Arc<dyn crate::agent::Machine>>;
}
