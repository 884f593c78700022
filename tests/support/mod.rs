//! Real servers the integration tests start: OpenSSH servers on free localhost ports.
//! Each test binary uses a different subset, hence the allow.
#![allow(dead_code)]

pub mod cli;
pub mod conformance;
pub mod faults;
pub mod sshd;
