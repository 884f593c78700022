//! Running commands and copying files on an instance: `local` (this machine) and
//! `ssh` (OpenSSH, one multiplexed master connection per machine). Knows nothing of
//! jobs, runs or the store: it moves bytes and runs shell text.

pub mod local;

use async_trait::async_trait;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {machine}")]
    Unreachable {
        machine: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error(
        "host key of {machine} changed: pinned {pinned}, offered {offered}; refusing to connect"
    )]
    HostKeyChanged {
        machine: String,
        pinned: String,
        offered: String,
    },
    #[error("{step} on {machine} failed: {message}")]
    Failed {
        machine: String,
        step: &'static str,
        message: String,
    },
    #[error("{step} on {machine}")]
    Io {
        machine: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The result of a command run to completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

#[async_trait]
pub trait Transport: Send + Sync {
    /// Human name of the machine for messages (`local`, `gpu-box-1`).
    fn machine(&self) -> &str;

    /// Runs `script` with `sh -c` on the machine; secrets must not be in `script`.
    async fn exec(&self, script: &str) -> Result<CommandOutput, TransportError>;

    /// Runs `script`, feeding `stdin` to it (how secrets and small files travel).
    async fn exec_with_stdin(
        &self,
        script: &str,
        stdin: &[u8],
    ) -> Result<CommandOutput, TransportError>;

    /// Copies a local file or folder to `remote` (created, parents included).
    async fn upload(&self, local: &Path, remote: &str) -> Result<(), TransportError>;

    /// Copies the remote file or folder `remote` into the local path `local`.
    async fn download(&self, remote: &str, local: &Path) -> Result<(), TransportError>;
}
