//! Real servers the integration tests start: OpenSSH servers on free localhost ports,
//! a local S3-compatible server.
//! Each test binary uses a different subset, hence the allow.
#![allow(dead_code)]

pub mod cli;
pub mod conformance;
pub mod faults;
pub mod hub_server;
pub mod s3_server;
pub mod sshd;
