//! The `local` transport: commands run with `sh -c` on this machine, files are copied
//! with the file system. Used by the `local` provider.

use super::{ByteStream, CommandOutput, Transport, TransportError};
use async_trait::async_trait;
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const MACHINE: &str = "local";

/// Runs commands and copies files on this machine.
#[derive(Debug, Clone, Default)]
pub struct LocalTransport;

impl LocalTransport {
    pub fn new() -> Self {
        LocalTransport
    }
}

/// `sh -c script`, with the user's umask when the CLI made its own private: the agent
/// keeps its own files private itself, the job gets what the user's shell would give.
///
/// The umask is set by the shell itself rather than in a `pre_exec` hook: a hook makes
/// the standard library fork (copying the controller's page tables) instead of
/// `posix_spawn`, and with 1,000 running runs the controller spent most of its time in
/// the kernel forking itself for each status read (issue 10's metrics figure).
fn shell(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(with_user_umask(script));
    cmd
}

fn with_user_umask(script: &str) -> String {
    match crate::home::user_umask() {
        Some(mask) => format!("umask {mask:04o}\n{script}"),
        None => script.to_string(),
    }
}

fn io_error(step: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io {
        machine: MACHINE.to_string(),
        step,
        source,
    }
}

fn to_output(output: std::process::Output) -> CommandOutput {
    use std::os::unix::process::ExitStatusExt;
    let status = output
        .status
        .code()
        .or_else(|| output.status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    CommandOutput {
        status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[async_trait]
impl Transport for LocalTransport {
    fn machine(&self) -> &str {
        MACHINE
    }

    async fn exec(&self, script: &str) -> Result<CommandOutput, TransportError> {
        let output = shell(script)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io_error("run command"))?;
        Ok(to_output(output))
    }

    async fn exec_with_stdin(
        &self,
        script: &str,
        stdin: &[u8],
    ) -> Result<CommandOutput, TransportError> {
        let mut child = shell(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_error("run command"))?;
        let mut input = child.stdin.take();
        // Feed stdin while output is drained, so a large input cannot deadlock on a full
        // pipe; a script that stops reading early is not an error.
        let feed = async {
            if let Some(pipe) = input.as_mut() {
                let _ = pipe.write_all(stdin).await;
                let _ = pipe.shutdown().await;
            }
            drop(input);
        };
        let (_, output) = tokio::join!(feed, child.wait_with_output());
        Ok(to_output(output.map_err(io_error("run command"))?))
    }

    async fn interactive(&self, script: &str) -> Result<std::process::Command, TransportError> {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(with_user_umask(script));
        Ok(cmd)
    }

    async fn upload(&self, local: &Path, remote: &str) -> Result<(), TransportError> {
        let (from, to) = (local.to_path_buf(), Path::new(remote).to_path_buf());
        tokio::task::spawn_blocking(move || copy_tree(&from, &to))
            .await
            .map_err(|e| io_error("upload")(std::io::Error::other(e)))?
            .map_err(io_error("upload"))
    }

    async fn download(&self, remote: &str, local: &Path) -> Result<(), TransportError> {
        let (from, to) = (Path::new(remote).to_path_buf(), local.to_path_buf());
        tokio::task::spawn_blocking(move || copy_tree(&from, &to))
            .await
            .map_err(|e| io_error("download")(std::io::Error::other(e)))?
            .map_err(io_error("download"))
    }

    /// Reads the file itself, byte for byte, in chunks of at most [`FOLLOW_CHUNK`]:
    /// memory stays bounded and a log that is not UTF-8 arrives intact. A file that
    /// shrinks (the agent's log cap rewrote it) is read again from its start, as
    /// `tail -F` does.
    async fn follow<'a>(&'a self, remote_file: &str) -> Result<ByteStream<'a>, TransportError> {
        let path = Path::new(remote_file).to_path_buf();
        let stream = futures_util::stream::unfold((path, 0u64), |(path, mut offset)| async move {
            loop {
                match read_from(&path, &mut offset).await {
                    Ok(Some(bytes)) => return Some((Ok(bytes), (path, offset))),
                    Ok(None) => tokio::time::sleep(FOLLOW_POLL).await,
                    Err(e) => return Some((Err(io_error("follow")(e)), (path, offset))),
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

/// The most `follow` reads in one go.
const FOLLOW_CHUNK: usize = 256 * 1024;

/// How often `follow` looks for new bytes at the end of the file.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// The next bytes of `path` from `offset` (moved past them), `None` when there are none
/// yet; a missing file is not an error (it is waited for).
async fn read_from(path: &Path, offset: &mut u64) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata().await?.len();
    if len < *offset {
        *offset = 0;
    }
    if len == *offset {
        return Ok(None);
    }
    file.seek(std::io::SeekFrom::Start(*offset)).await?;
    let mut buf = vec![0u8; FOLLOW_CHUNK.min((len - *offset) as usize)];
    let n = file.read(&mut buf).await?;
    buf.truncate(n);
    *offset += n as u64;
    Ok((n > 0).then_some(buf))
}

/// Copies `from` (file, symlink or folder) so that `to` becomes its copy; parents of
/// `to` are created, and a folder's contents are merged into an existing `to`.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from)?;
        if std::fs::symlink_metadata(to).is_ok() {
            std::fs::remove_file(to)?;
        }
        std::os::unix::fs::symlink(target, to)
    } else if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(to, meta.permissions())?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        // A new file, never a write into the old one: what was there may be hard-linked
        // elsewhere (a kept checkpoint). std::fs::copy keeps the permission bits.
        if std::fs::symlink_metadata(to).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(to)?;
        }
        std::fs::copy(from, to).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exec_reports_status_and_output() {
        let t = LocalTransport::new();
        let out = t.exec("echo out; echo err >&2; exit 3").await.unwrap();
        assert_eq!(out.status, 3);
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        let big = vec![b'x'; 1 << 20];
        let out = t.exec_with_stdin("wc -c", &big).await.unwrap();
        assert_eq!(out.stdout.trim(), (1 << 20).to_string());
    }

    #[tokio::test]
    async fn follow_streams_raw_bytes_and_rereads_a_shrunk_file() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let t = LocalTransport::new();
        let mut stream = t.follow(log.to_str().unwrap()).await.unwrap();
        let first = vec![0xffu8; FOLLOW_CHUNK + 10]; // not UTF-8, more than one chunk
        std::fs::write(&log, &first).unwrap();
        let mut got = Vec::new();
        while got.len() < first.len() {
            got.extend(stream.next().await.unwrap().unwrap());
        }
        assert_eq!(got, first);
        std::fs::write(&log, b"kept tail\n").unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), b"kept tail\n");
    }

    #[tokio::test]
    async fn upload_and_download_copy_trees() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f.txt"), "hello").unwrap();
        std::os::unix::fs::symlink("b/f.txt", src.join("a/link")).unwrap();
        let t = LocalTransport::new();
        let remote = dir.path().join("x/y/dst");
        t.upload(&src, remote.to_str().unwrap()).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(remote.join("a/b/f.txt")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_to_string(remote.join("a/link")).unwrap(),
            "hello"
        );
        let back = dir.path().join("back/f.txt");
        t.download(remote.join("a/b/f.txt").to_str().unwrap(), &back)
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(back).unwrap(), "hello");
    }
}
