//! `git ls-remote` on the controller: awaited as a child process, never blocking the
//! async workers, and given up after its time limit when the remote hangs.

use std::time::{Duration, Instant};

#[tokio::test(flavor = "current_thread")]
async fn ls_remote_resolves_refs_and_gives_up_on_a_hung_remote() {
    let dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .env("GIT_AUTHOR_NAME", "A")
            .env("GIT_AUTHOR_EMAIL", "a@example.com")
            .env("GIT_COMMITTER_NAME", "A")
            .env("GIT_COMMITTER_EMAIL", "a@example.com")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["commit", "-q", "--allow-empty", "-m", "one"]);
    let head = git(&["rev-parse", "HEAD"]);
    let repo = dir.path().to_str().unwrap();
    let got = asimov::source::resolve_remote_commit(repo, Some("main")).await;
    assert_eq!(got.as_deref(), Some(head.as_str()));
    let full = asimov::source::resolve_remote_commit(repo, Some(&head)).await;
    assert_eq!(full.as_deref(), Some(head.as_str()));

    // An ssh "remote" that never answers. This binary's only test, on a current_thread
    // runtime, with no child running: changing the environment races nothing.
    // SAFETY: no other thread reads the environment now.
    unsafe { std::env::set_var("GIT_SSH_COMMAND", "sleep 20;:") };
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = std::sync::Arc::clone(&ticks);
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let start = Instant::now();
    let commit = asimov::source::resolve_remote_commit_within(
        "ssh://git.example.invalid/repo.git",
        Some("main"),
        Duration::from_secs(1),
    )
    .await;
    let took = start.elapsed();
    ticker.abort();
    assert_eq!(commit, None);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The one worker thread kept running other tasks while git hung.
    assert!(
        ticks.load(std::sync::atomic::Ordering::Relaxed) >= 10,
        "the runtime was blocked"
    );
}
