//! asimov: a declarative controller for ML training jobs on rented GPUs.
//!
//! Dependencies point one way: cli → reconcile → {provider, transport, store, manifest,
//! agent} → model. See ARCHITECTURE.md.

pub mod agent;
pub mod artifacts;
pub mod cli;
pub mod failpoint;
pub mod home;
pub mod manifest;
pub mod model;
pub mod provider;
pub mod reconcile;
pub mod retry;
pub mod source;
pub mod store;
pub mod transport;
