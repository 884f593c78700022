//! Running commands and copying files on an instance: `local` (this machine) and
//! `ssh` (OpenSSH, one multiplexed master connection per machine). Knows nothing of
//! jobs, runs or the store: it moves bytes and runs shell text.

pub mod local;
pub mod ssh;

use async_trait::async_trait;
use std::path::Path;
use std::pin::Pin;

/// A live stream of a remote file's bytes (`logs -f`); ends when the connection does.
pub type ByteStream<'a> =
    Pin<Box<dyn futures_core::Stream<Item = Result<Vec<u8>, TransportError>> + Send + 'a>>;

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

    /// A command that runs `script` on the machine with the caller's terminal as its
    /// own (`asimov ssh`, `asimov attach`): the caller spawns it with inherited stdio
    /// and waits. Over ssh it rides the machine's master connection (its pinned host
    /// key and its key), with a pseudo-terminal on the far side.
    async fn interactive(&self, _script: &str) -> Result<std::process::Command, TransportError> {
        Err(TransportError::Failed {
            machine: self.machine().to_string(),
            step: "open an interactive session",
            message: "this transport has no terminal sessions".into(),
        })
    }

    /// The content of `remote_file` from its start, then every byte appended to it, live
    /// (`logs -f`). A missing file is waited for. The default polls with `exec` every
    /// half second; the ssh transport overrides it with a `tail -F` over its master.
    async fn follow<'a>(&'a self, remote_file: &str) -> Result<ByteStream<'a>, TransportError> {
        let path = format!("'{}'", remote_file.replace('\'', "'\\''"));
        // Offsets count bytes of the text as received; a log that is not UTF-8 may be
        // re-read in part. Good enough for the fallback; ssh streams raw bytes.
        let stream =
            futures_util::stream::unfold((self, path, 0usize), |(t, path, offset)| async move {
                loop {
                    let script = format!("[ -f {path} ] && tail -c +{} {path}; true", offset + 1);
                    match t.exec(&script).await {
                        Err(e) => return Some((Err(e), (t, path, offset))),
                        Ok(out) if !out.stdout.is_empty() => {
                            let next = offset + out.stdout.len();
                            return Some((Ok(out.stdout.into_bytes()), (t, path, next)));
                        }
                        Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
                    }
                }
            });
        Ok(Box::pin(stream))
    }
}
