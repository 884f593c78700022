//! Manifests: raw serde + schemars types mirroring the YAML, the one YAML entry point,
//! validation into typed desired state (every problem at once, with file, line and
//! column), and schema output. Knows nothing of the store, providers or the clock.

mod desired;
pub mod yaml;

pub use desired::*;
