//! A run's checkpoints as kept at home: `$ASIMOV_HOME/checkpoints/<run>/`.
//!
//! A sync goes into `staging/` (the transport's rsync only sends what changed since the
//! last sync, whose files it starts from), and only a sync that finished becomes a
//! checkpoint: `staging/` is hard-linked into `.new-<seq>/`, which is renamed to
//! `<seq>/` (a rename is atomic). A folder named by a number is therefore complete; a
//! sync cut off at any point leaves at most a stale `staging/` or `.new-*`, never a
//! half-written checkpoint that a restore could pick. The newest [`KEEP`] are kept.
//!
//! Hard links are safe because nothing writes into a file of `staging/` in place: rsync
//! writes a new file and renames it over the old one, tar and the local copy unlink the
//! old file first.

use std::io;
use std::path::{Path, PathBuf};

/// How many complete checkpoints of a run are kept (the newest), at home and in S3.
pub const KEEP: usize = 2;

/// The file in a run's folder naming what its teardown syncs.
const TEARDOWN: &str = "teardown.json";

/// What the final sync before a run's teardown brings out, written when an attempt
/// starts: a job deleted while it runs is gone from the desired state, yet its last
/// sync must still know where its checkpoint and outputs go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Teardown {
    /// Outputs and checkpoints go to S3 (the agent's final sync).
    pub s3: bool,
    /// The checkpoint folder on the instance, brought home when not to S3.
    pub checkpoint: Option<String>,
    /// The run's outputs folder at home; `None` when it declares no outputs kept here.
    pub outputs: Option<PathBuf>,
}

/// The checkpoint folders of one run.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    /// `root` is `$ASIMOV_HOME/checkpoints/<run>`.
    pub fn new(root: PathBuf) -> Self {
        CheckpointDir { root }
    }

    /// Where the next sync writes.
    pub fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// The newest complete checkpoint: its number and folder.
    pub fn latest(&self) -> io::Result<Option<(u64, PathBuf)>> {
        Ok(self.complete()?.pop())
    }

    /// Every complete checkpoint, oldest first.
    fn complete(&self) -> io::Result<Vec<(u64, PathBuf)>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(seq) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if entry.file_type()?.is_dir() {
                found.push((seq, entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Makes `staging/` ready for a sync: created, private.
    pub fn prepare(&self) -> io::Result<PathBuf> {
        let staging = self.staging();
        std::fs::create_dir_all(&staging)?;
        for dir in [&self.root, &staging] {
            crate::home::set_mode(dir, 0o700)?;
        }
        Ok(staging)
    }

    /// Turns what `staging/` holds into the next complete checkpoint; returns its number.
    /// Older checkpoints past [`KEEP`] are removed.
    pub fn commit(&self) -> io::Result<u64> {
        let seq = self.latest()?.map_or(1, |(n, _)| n + 1);
        let tmp = self.root.join(format!(".new-{seq}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        link_tree(&self.staging(), &tmp)?;
        std::fs::rename(&tmp, self.root.join(seq.to_string()))?;
        let complete = self.complete()?;
        for (_, old) in complete.iter().take(complete.len().saturating_sub(KEEP)) {
            std::fs::remove_dir_all(old)?;
        }
        Ok(seq)
    }

    /// Moves the newest complete checkpoint to `to` (replacing what is there), for a
    /// run about to be forgotten: the last state of a deleted job stays the user's.
    /// Returns its number, `None` when there is none.
    pub fn keep_latest(&self, to: &Path) -> io::Result<Option<u64>> {
        let Some((seq, folder)) = self.latest()? else {
            return Ok(None);
        };
        if let Ok(meta) = std::fs::symlink_metadata(to) {
            if meta.is_dir() {
                std::fs::remove_dir_all(to)?;
            } else {
                std::fs::remove_file(to)?;
            }
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Across file systems (an outputs folder elsewhere) a rename fails: copy.
        if std::fs::rename(&folder, to).is_err() {
            link_tree(&folder, to)?;
        }
        Ok(Some(seq))
    }

    /// What the run's teardown syncs, as recorded when its attempt started.
    pub fn teardown(&self) -> Option<Teardown> {
        let text = std::fs::read(self.root.join(TEARDOWN)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Records what the run's teardown syncs (0600, atomically).
    pub fn record_teardown(&self, teardown: &Teardown) -> io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        crate::home::set_mode(&self.root, 0o700)?;
        let text = serde_json::to_vec(teardown).map_err(io::Error::other)?;
        crate::home::write_private(&self.root.join(TEARDOWN), &text)
    }

    /// Removes every checkpoint of the run.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Copies the tree `from` to `to`, hard-linking files (copying where links fail).
fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        return std::os::unix::fs::symlink(std::fs::read_link(from)?, to);
    }
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        std::fs::set_permissions(to, meta.permissions())?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_committed_syncs_count_and_old_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let cp = CheckpointDir::new(dir.path().join("run-0"));
        assert_eq!(cp.latest().unwrap(), None);
        let staging = cp.prepare().unwrap();
        std::fs::write(staging.join("step"), "3").unwrap();
        // A sync cut off before its commit leaves no checkpoint.
        assert_eq!(cp.latest().unwrap(), None);
        assert_eq!(cp.commit().unwrap(), 1);
        // The next sync replaces the file (as rsync does: a new file renamed over it).
        std::fs::write(staging.join(".tmp"), "6").unwrap();
        std::fs::rename(staging.join(".tmp"), staging.join("step")).unwrap();
        // A stale half-made commit from a crash is neither picked nor in the way.
        std::fs::create_dir_all(dir.path().join("run-0/.new-2")).unwrap();
        assert_eq!(cp.latest().unwrap().unwrap().0, 1);
        assert_eq!(cp.commit().unwrap(), 2);
        assert_eq!(cp.commit().unwrap(), 3);
        let (seq, path) = cp.latest().unwrap().unwrap();
        assert_eq!(seq, 3);
        assert_eq!(std::fs::read_to_string(path.join("step")).unwrap(), "6");
        assert!(!dir.path().join("run-0/1").exists(), "kept only {KEEP}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("run-0/2/step")).unwrap(),
            "6"
        );
        cp.remove().unwrap();
        assert!(!dir.path().join("run-0").exists());
    }
}

/// What went wrong bringing a checkpoint home.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sync checkpoint")]
    Agent(#[source] crate::agent::AgentError),
    #[error("keep checkpoint in {}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record checkpoint")]
    Store(#[source] crate::store::StoreError),
}

impl SyncError {
    /// True when no retry can help (the machine keeps no files).
    pub fn is_permanent(&self) -> bool {
        matches!(self, SyncError::Agent(e) if e.is_permanent())
    }
}

/// Syncs the checkpoint folder `path` of `run`'s attempt into its staging folder at home
/// and, once that finished, makes it the run's newest complete checkpoint and records it.
/// Returns its number, `None` when the job has written no checkpoint yet.
#[allow(clippy::too_many_arguments)]
pub async fn sync(
    home: &crate::home::Home,
    store: &std::sync::Mutex<crate::store::Store>,
    machine: &dyn crate::agent::Machine,
    run: &str,
    attempt: u32,
    path: &str,
    last: bool,
    now: crate::model::Timestamp,
) -> Result<Option<u64>, SyncError> {
    let dir = CheckpointDir::new(home.checkpoints().join(run));
    let local = |source| SyncError::Local {
        path: dir.staging(),
        source,
    };
    let staging = dir.prepare().map_err(local)?;
    if !machine
        .sync_checkpoint(path, &staging)
        .await
        .map_err(SyncError::Agent)?
    {
        return Ok(None);
    }
    let committed = dir.clone();
    let seq = tokio::task::spawn_blocking(move || committed.commit())
        .await
        .map_err(|e| local(io::Error::other(e)))?
        .map_err(local)?;
    let record = crate::store::CheckpointSync {
        run: run.to_string(),
        attempt,
        seq,
        at: now,
        last,
    };
    store
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add_checkpoint_sync(&record)
        .map_err(SyncError::Store)?;
    Ok(Some(seq))
}
