//! What git says about a job's source, asked on the controller's machine: the files a
//! work tree would keep (what a workdir upload sends), the commit, author and
//! uncommitted diff each run records, and the commit a remote's ref points at.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A job's source as git sees it when the run is launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitInfo {
    /// URL of the `origin` remote (else the first remote); `None` without remotes.
    pub repository: Option<String>,
    pub commit: String,
    /// Subject line of the commit message.
    pub commit_message: String,
    /// `Name <email>` of the commit's author.
    pub author: String,
    /// Uncommitted changes against `HEAD` as a patch `git apply` takes (binary-safe),
    /// new untracked files included; `None` when the tree is clean.
    pub diff: Option<String>,
    /// True when anything differs from `HEAD`, untracked files included.
    pub dirty: bool,
}

fn git(dir: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

fn git_text(dir: &Path, args: &[&str]) -> Option<String> {
    git(dir, args).map(|b| String::from_utf8_lossy(&b).trim_end().to_string())
}

/// The largest untracked file a run's recorded diff holds: 1 MiB. A bigger one (a
/// dataset, a checkpoint) is uploaded with the working folder but only named in the
/// record, so a matrix of runs does not copy it into the store once per run.
pub const MAX_UNTRACKED_IN_DIFF: u64 = 1 << 20;

/// True when `dir` is inside a git work tree.
pub fn is_work_tree(dir: &Path) -> bool {
    git_text(dir, &["rev-parse", "--is-inside-work-tree"]).as_deref() == Some("true")
}

/// The commit, message, author, remote and uncommitted diff of the work tree at `dir`;
/// `None` when `dir` is not in a git work tree or has no commit yet. Untracked files
/// under `exclude` (what asimov writes: its home, local outputs) are left out of the
/// diff and do not make the tree dirty, so no stored secret is ever recorded.
pub fn capture_git(dir: &Path, exclude: &[PathBuf]) -> Option<GitInfo> {
    if !is_work_tree(dir) {
        return None;
    }
    let commit = git_text(dir, &["rev-parse", "--verify", "HEAD"])?;
    let commit_message = git_text(dir, &["log", "-1", "--format=%s", "HEAD"]).unwrap_or_default();
    let author = git_text(dir, &["log", "-1", "--format=%an <%ae>", "HEAD"]).unwrap_or_default();
    let repository = git_text(dir, &["remote", "get-url", "origin"]).or_else(|| {
        let remotes = git_text(dir, &["remote"])?;
        let first = remotes.lines().next()?.to_string();
        git_text(dir, &["remote", "get-url", &first])
    });
    let exclude: Vec<PathBuf> = exclude
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let mut diff = git(dir, &["diff", "--binary", "HEAD"]).unwrap_or_default();
    // Anything staged or changed against HEAD, tracked files only (untracked below).
    let mut dirty = !diff.is_empty()
        || git(dir, &["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|s| !s.is_empty());
    // `git diff` leaves out untracked files; a no-index diff against /dev/null adds each
    // as a new file, so the patch recreates the whole tree on a clone.
    let top = git_text(dir, &["rev-parse", "--show-toplevel"])
        .map(PathBuf::from)
        .and_then(|t| std::fs::canonicalize(t).ok());
    if let (Some(top), Some(untracked)) = (
        top,
        git(
            dir,
            &[
                "ls-files",
                "-z",
                "--others",
                "--exclude-standard",
                "--full-name",
            ],
        ),
    ) {
        for name in untracked.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            if exclude.iter().any(|e| top.join(&name).starts_with(e)) {
                continue;
            }
            dirty = true;
            let size = std::fs::symlink_metadata(top.join(&name)).map_or(0, |m| m.len());
            if size > MAX_UNTRACKED_IN_DIFF {
                // Text outside a patch's hunks, which `git apply` skips.
                diff.extend_from_slice(
                    format!("# asimov: untracked {name} ({size} bytes) is not recorded here\n")
                        .as_bytes(),
                );
                continue;
            }
            // Exit status 1 means "differences found", which is the point here.
            if let Ok(out) = Command::new("git")
                .arg("-C")
                .arg(&top)
                .args(["diff", "--binary", "--no-index", "--", "/dev/null", &name])
                .stdin(std::process::Stdio::null())
                .output()
            {
                diff.extend_from_slice(&out.stdout);
            }
        }
    }
    let diff = String::from_utf8_lossy(&diff).into_owned();
    Some(GitInfo {
        repository,
        commit,
        commit_message,
        author,
        diff: (!diff.trim().is_empty()).then_some(diff),
        dirty,
    })
}

/// Files (relative paths) a workdir upload sends: what git would keep (tracked plus
/// untracked-but-not-ignored) when `dir` is a git work tree, else `None` (send all).
pub fn workdir_files(dir: &Path) -> Option<Vec<PathBuf>> {
    if !is_work_tree(dir) {
        return None;
    }
    let listing = git(
        dir,
        &[
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ],
    )?;
    let mut files: Vec<PathBuf> = listing
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            use std::os::unix::ffi::OsStrExt;
            PathBuf::from(std::ffi::OsStr::from_bytes(n))
        })
        .collect();
    files.sort();
    files.dedup();
    Some(files)
}

/// How long `git ls-remote` may take before the run is recorded without a commit (the
/// clone on the instance then checks out the reference itself).
pub const LS_REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The commit `reference` (default `HEAD`) names in the repository at `repo`, asked of
/// the repository itself (`git ls-remote`), so that every attempt of a run checks out
/// the same code even when the branch moves on. Runs as a child process the async
/// workers only await, and gives up after [`LS_REMOTE_TIMEOUT`] (a hung remote must not
/// stall the controller); `None` when the remote cannot say in time.
pub async fn resolve_remote_commit(repo: &str, reference: Option<&str>) -> Option<String> {
    resolve_remote_commit_within(repo, reference, LS_REMOTE_TIMEOUT).await
}

/// [`resolve_remote_commit`] with its own time limit.
pub async fn resolve_remote_commit_within(
    repo: &str,
    reference: Option<&str>,
    limit: std::time::Duration,
) -> Option<String> {
    let reference = reference.unwrap_or("HEAD");
    if reference.len() == 40 && reference.chars().all(|c| c.is_ascii_hexdigit()) {
        return Some(reference.to_string());
    }
    let child = tokio::process::Command::new("git")
        .args(["ls-remote", "--", repo, reference])
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // On timeout the future is dropped, and git with it.
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out.ok()?,
        Err(_) => {
            tracing::warn!(repo, reference, ?limit, "git ls-remote timed out");
            return None;
        }
    };
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?;
    Some(line.split_whitespace().next()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_ok(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "A")
            .env("GIT_AUTHOR_EMAIL", "a@example.com")
            .env("GIT_COMMITTER_NAME", "A")
            .env("GIT_COMMITTER_EMAIL", "a@example.com")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn the_diff_leaves_out_excluded_folders_and_names_big_untracked_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("train.py"), "lr = 1\n").unwrap();
        git_ok(d, &["init", "-q", "-b", "main"]);
        git_ok(d, &["add", "."]);
        git_ok(d, &["commit", "-q", "-m", "one"]);
        std::fs::create_dir_all(d.join(".asimov/credentials")).unwrap();
        std::fs::write(d.join(".asimov/credentials/TOKEN"), "s3cret").unwrap();
        let clean = capture_git(d, &[d.join(".asimov")]).unwrap();
        assert!(!clean.dirty, "only asimov's own files are new");
        assert_eq!(clean.diff, None);

        std::fs::write(d.join("notes.txt"), "small\n").unwrap();
        std::fs::write(d.join("data.bin"), vec![1u8; 2 << 20]).unwrap();
        let info = capture_git(d, &[d.join(".asimov")]).unwrap();
        let diff = info.diff.unwrap();
        assert!(info.dirty);
        assert!(diff.contains("+small"), "{diff}");
        assert!(!diff.contains("s3cret"), "{diff}");
        assert!(
            diff.contains("# asimov: untracked data.bin (2097152 bytes) is not recorded here"),
            "{diff}"
        );
        assert!(diff.len() < 10_000);
        // Without the exclusion the home's files are in the record: what the test guards.
        let leaky = capture_git(d, &[]).unwrap().diff.unwrap();
        assert!(leaky.contains("s3cret"));
    }
}
