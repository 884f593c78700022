//! Where a run's outputs and checkpoints go besides `$ASIMOV_HOME`: an S3-compatible
//! object store (`artifacts.to: s3://bucket/prefix`). Owns the layout of a run's objects,
//! the endpoint, region and credentials, the controller's own S3 client, and the curl
//! configuration the agent signs its requests with on the instance. Knows nothing of
//! the planner, the store or providers.

pub mod s3;

pub use s3::{
    Generation, S3Client, S3Config, S3Credentials, S3Error, S3Location, S3Target, curl_config,
};
