//! Reconcile: the pure planner (`plan`), pure budget arithmetic (`budget`), the executor
//! that applies one idempotent op at a time (`execute`), and the controller loop with its
//! per-key queue, requeue timers, error policy and graceful shutdown (`controller`).
//!
//! `plan` and `budget` must not know tokio, the clock, the file system or any network:
//! everything they decide on is passed in (a test greps their sources to keep it so).
//! Only `execute` and `controller` touch providers and the store.

pub mod budget;
pub mod checkpoint;
pub mod controller;
pub mod execute;
pub mod metrics;
pub mod plan;
pub mod preview;
pub mod stop;

pub use plan::{
    AgentObservation, Desired, History, ListResult, Observed, Op, Plan, QueueKey, StatusUpdate,
    plan,
};
