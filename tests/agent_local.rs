//! The agent, the local transport and the `local` provider against real processes and
//! real files, with `/bin/sh` (dash on Debian) running `agent.sh`.

use asimov::agent::{
    AGENT_SCRIPT, AgentMachine, AgentState, AgentStatus, LaunchSource, LaunchSpec, Machine,
};
use asimov::home::Home;
use asimov::model::{OwnerTag, Progress, Secret};
use asimov::provider::local::LocalProvider;
use asimov::provider::{CreateRequest, ErrorKind, InstanceState, Provider};
use asimov::source::capture_git;
use asimov::transport::local::LocalTransport;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn spec(tag: &str, command: &str) -> LaunchSpec {
    let run = OwnerTag::parse(tag).map(|t| t.run).unwrap_or_default();
    LaunchSpec {
        run,
        tag: tag.to_string(),
        setup: Vec::new(),
        command: command.to_string(),
        env: BTreeMap::new(),
        secrets: Vec::new(),
        max_duration: None,
        source: LaunchSource::None,
        files: Vec::new(),
        exclude: Vec::new(),
        s3: None,
        outputs: Vec::new(),
    }
}

fn machine(root: &Path, tmux: bool) -> AgentMachine {
    let m = AgentMachine::new(Arc::new(LocalTransport::new()), root.to_str().unwrap());
    if tmux { m } else { m.without_tmux() }
}

async fn wait_until(
    m: &dyn Machine,
    timeout: Duration,
    done: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let status = m.observe().await.unwrap();
        if let Some(s) = &status
            && done(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "agent did not get there in {timeout:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_finished(m: &dyn Machine, timeout: Duration) -> AgentStatus {
    wait_until(m, timeout, |s| s.state.is_finished()).await
}

/// Pids of processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

async fn wait_no_process(needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !processes_with(needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes with {needle:?} still alive: {:?}",
            processes_with(needle)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills what a test started if it fails halfway: the process groups named by the
/// agent's pid files under each root, and processes whose command line has a needle.
struct Cleanup {
    roots: Vec<PathBuf>,
    needles: Vec<String>,
}

impl Cleanup {
    fn new(roots: &[&Path], needles: &[&str]) -> Self {
        Cleanup {
            roots: roots.iter().map(|r| r.to_path_buf()).collect(),
            needles: needles.iter().map(|n| n.to_string()).collect(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for root in &self.roots {
            for file in ["pid", "run_pid"] {
                if let Ok(pid) = std::fs::read_to_string(root.join(file)) {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{}", pid.trim())])
                        .output();
                }
            }
        }
        for needle in &self.needles {
            for pid in processes_with(needle) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .output();
            }
        }
    }
}

fn tmux_available() -> bool {
    Command::new("sh")
        .args(["-c", "command -v tmux"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Ada Lovelace")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada Lovelace")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            files.extend(all_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn setup_then_run_succeeds_with_log_and_progress() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("asimov.t1.hello-0.1");
    let m = machine(&root, true);
    assert_eq!(m.observe().await.unwrap(), None);
    let mut s = spec(
        "asimov.t1.hello-0.1",
        "echo \"run in $(pwd) as $ASIMOV_RUN on $ASIMOV_INSTANCE with $GREETING\"\n\
         echo 'ASIMOV_PROGRESS 3/4'\necho to-stderr >&2",
    );
    s.setup = vec![
        "echo setting up".into(),
        "echo second > made-by-setup".into(),
    ];
    s.env
        .insert("GREETING".into(), "it's \"quoted\" $HOME".into());
    m.start(&s).await.unwrap();
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(status.state, AgentState::Succeeded);
    assert_eq!(status.exit_code, Some(0));
    assert_eq!(
        status.progress,
        Some(Progress {
            done: 3,
            total: Some(4)
        })
    );
    let (started, finished) = (status.started_at.unwrap(), status.finished_at.unwrap());
    assert!(started <= finished);
    assert!(status.heartbeat.unwrap() >= started);

    let log = std::fs::read_to_string(root.join("log")).unwrap();
    let setup_at = log.find("+ echo setting up\nsetting up\n").expect(&log);
    let run_at = log
        .find(&format!(
            "run in {}/work as hello-0 on asimov.t1.hello-0.1 with it's \"quoted\" $HOME",
            root.display()
        ))
        .expect(&log);
    assert!(setup_at < run_at, "{log}");
    assert!(log.contains("to-stderr"), "{log}");
    assert!(root.join("work/made-by-setup").exists());
    assert_eq!(m.log_tail(1 << 20).await.unwrap(), log);
    if tmux_available() {
        let launcher = std::fs::read_to_string(root.join("launcher")).unwrap();
        assert!(launcher.starts_with("tmux"), "{launcher}");
    }
}

#[tokio::test]
async fn failing_run_and_failing_setup_report_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("asimov.t2.fail-0.1");
    let m = machine(&root, false);
    m.start(&spec("asimov.t2.fail-0.1", "echo about to fail; exit 7"))
        .await
        .unwrap();
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(status.state, AgentState::Failed);
    assert_eq!(status.exit_code, Some(7));
    assert_eq!(
        std::fs::read_to_string(root.join("launcher"))
            .unwrap()
            .trim(),
        "setsid"
    );

    let root = dir.path().join("asimov.t2.fail-1.1");
    let m = machine(&root, false);
    let mut s = spec("asimov.t2.fail-1.1", "echo run-must-not-happen");
    s.setup = vec!["echo one".into(), "exit 5".into(), "echo never".into()];
    m.start(&s).await.unwrap();
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(status.state, AgentState::Failed);
    assert_eq!(status.exit_code, Some(5));
    let log = m.log_tail(4096).await.unwrap();
    assert!(log.contains("one\n") && !log.contains("\nnever") && !log.contains("run-must"));
}

#[tokio::test]
async fn max_duration_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("asimov.t3.slow-0.1");
    let _cleanup = Cleanup::new(&[&root], &["sleep 3130"]);
    let m = machine(&root, false);
    // A grandchild sleep, in the background, must die with its parent.
    let mut s = spec("asimov.t3.slow-0.1", "sh -c 'sleep 31301' & sleep 31302");
    s.max_duration = Some(Duration::from_secs(2));
    m.start(&s).await.unwrap();
    wait_until(&m, Duration::from_secs(10), |s| {
        s.state == AgentState::Running
    })
    .await;
    assert!(!processes_with("sleep 31301").is_empty());
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(status.state, AgentState::TimedOut);
    assert_eq!(status.exit_code, Some(124));
    let elapsed = status.finished_at.unwrap() - status.started_at.unwrap();
    assert!((2..10).contains(&elapsed), "took {elapsed}s");
    wait_no_process("sleep 3130", Duration::from_secs(10)).await;
}

/// An agent whose supervisor dies before the job starts (seen with a full disk: the
/// supervisor could not write its files) leaves its state at setup forever; the status
/// says the supervisor is dead and since when its state has not changed, so the
/// controller can end the attempt instead of waiting on it.
#[tokio::test]
async fn a_supervisor_killed_during_setup_is_reported_dead() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("asimov.t9.dies-0.1");
    let _cleanup = Cleanup::new(&[&root], &["sleep 3197"]);
    let m = machine(&root, false);
    let mut s = spec("asimov.t9.dies-0.1", "echo never");
    s.setup = vec!["sleep 31977".into()];
    m.start(&s).await.unwrap();
    let alive = wait_until(&m, Duration::from_secs(10), |s| {
        s.state == AgentState::Setup
    })
    .await;
    assert_eq!(alive.dead_for, None, "its supervisor lives: {alive:?}");
    let pid = std::fs::read_to_string(root.join("pid")).unwrap();
    let killed = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", pid.trim())])
        .status()
        .unwrap();
    assert!(killed.success());
    let dead = wait_until(&m, Duration::from_secs(10), |s| s.dead_for.is_some()).await;
    assert_eq!(dead.state, AgentState::Setup, "{dead:?}");
    assert!(
        dead.dead_for.is_some_and(|d| (0..60).contains(&d)),
        "{dead:?}"
    );
    // The setup it started lives on in its own group: the cleanup ends it.
}

#[tokio::test]
async fn start_twice_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("asimov.t4.once-0.1");
    let m = machine(&root, false);
    let s = spec("asimov.t4.once-0.1", "echo ran >> ../count; sleep 1");
    m.start(&s).await.unwrap();
    let first = wait_until(&m, Duration::from_secs(10), |s| s.started_at.is_some()).await;
    m.start(&s).await.unwrap();
    // A third start after the end changes nothing either.
    let done = wait_finished(&m, Duration::from_secs(20)).await;
    m.start(&s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        std::fs::read_to_string(root.join("count")).unwrap(),
        "ran\n"
    );
    let last = m.observe().await.unwrap().unwrap();
    assert_eq!(last.started_at, first.started_at);
    assert_eq!(last, done);
    assert_eq!(done.state, AgentState::Succeeded);
}

#[tokio::test]
async fn stop_kills_the_run_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for (i, tmux) in [(0, false), (1, true)] {
        let tag = format!("asimov.t5.stop-{i}.1");
        let root = dir.path().join(&tag);
        let m = machine(&root, tmux);
        let _cleanup = Cleanup::new(&[&root], &["sleep 3150"]);
        // The job ignores TERM like a stuck trainer: stop must still end it.
        let needle = format!("sleep 3150{i}");
        let s = spec(&tag, &format!("trap '' TERM; sh -c '{needle}' & {needle}"));
        m.start(&s).await.unwrap();
        wait_until(&m, Duration::from_secs(10), |s| {
            s.state == AgentState::Running
        })
        .await;
        m.stop().await.unwrap();
        let status = m.observe().await.unwrap().unwrap();
        assert_eq!(status.state, AgentState::Stopped);
        assert!(status.finished_at.is_some());
        wait_no_process(&needle, Duration::from_secs(5)).await;
        m.stop().await.unwrap();
        assert_eq!(m.observe().await.unwrap().unwrap(), status);
    }
    // Stopping where nothing was started is fine too.
    machine(&dir.path().join("nothing"), false)
        .stop()
        .await
        .unwrap();
}

#[tokio::test]
async fn secrets_reach_the_job_but_no_command_line_or_script() {
    let dir = tempfile::tempdir().unwrap();
    let tag = "asimov.t6.secret-0.1";
    let root = dir.path().join(tag);
    let _cleanup = Cleanup::new(&[&root], &["sleep 31601"]);
    let m = machine(&root, false);
    let value = format!("hf_{}_s3cr3t'quote", std::process::id());
    let mut s = spec(
        tag,
        "printf '%s' \"$HF_TOKEN\" > seen; sh -c 'sleep 31601'; echo done",
    );
    s.secrets = vec![("HF_TOKEN".into(), Secret::new(value.clone()))];
    m.start(&s).await.unwrap();
    wait_until(&m, Duration::from_secs(10), |_| {
        root.join("work/seen").exists()
    })
    .await;

    assert!(
        processes_with(&value).is_empty(),
        "secret in a command line"
    );
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains("s3cr3t"));
    assert!(!AGENT_SCRIPT.contains("s3cr3t"));
    let secrets_file = root.join("spec/secrets");
    for file in all_files(&root) {
        if file == secrets_file || file == root.join("work/seen") {
            continue;
        }
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("s3cr3t"),
            "secret in {}",
            file.display()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secrets_file)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read_to_string(root.join("work/seen")).unwrap(),
        value
    );
    m.stop().await.unwrap();
    wait_no_process("sleep 31601", Duration::from_secs(5)).await;
}

#[tokio::test]
async fn tqdm_bars_in_the_log_are_progress() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("asimov.t7.bar-0.1");
    let m = machine(&root, false);
    let s = spec(
        "asimov.t7.bar-0.1",
        "printf ' 10%%|█         | 10/100 [00:01<00:09]\\r 20%%|██        | 20/100 [00:02<00:08, 9.9it/s]\\r' >&2",
    );
    m.start(&s).await.unwrap();
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(status.state, AgentState::Succeeded);
    assert_eq!(
        status.progress,
        Some(Progress {
            done: 20,
            total: Some(100)
        })
    );
}

#[tokio::test]
async fn workdir_upload_respects_gitignore_and_outputs_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("project");
    std::fs::create_dir_all(src.join("data")).unwrap();
    std::fs::create_dir_all(src.join("pkg")).unwrap();
    git(&src, &["init", "-q"]);
    std::fs::write(src.join(".gitignore"), "data/\n*.log\n").unwrap();
    std::fs::write(src.join("train.py"), "print('hi')\n").unwrap();
    std::fs::write(src.join("pkg/mod.py"), "x = 1\n").unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "first"]);
    std::fs::write(src.join("untracked.py"), "y = 2\n").unwrap();
    std::fs::write(src.join("data/big.bin"), "ignored").unwrap();
    std::fs::write(src.join("debug.log"), "ignored").unwrap();
    let extra = dir.path().join("extra.cfg");
    std::fs::write(&extra, "lr=0.1\n").unwrap();
    let abs_dest = dir.path().join("elsewhere/cfg/extra.cfg");

    let tag = "asimov.t8.upload-0.1";
    let root = dir.path().join(tag);
    let m = machine(&root, false);
    let mut s = spec(
        tag,
        "find . -type f ! -path './.git/*' | sort > ../listing; mkdir -p results; \
         echo 0.93 > results/acc.txt; mkdir -p /tmp/ignored-by-test; cat configs/extra.cfg",
    );
    s.source = LaunchSource::Workdir(src.clone());
    s.files = vec![
        (extra.clone(), "configs/extra.cfg".into()),
        (extra.clone(), abs_dest.to_str().unwrap().into()),
    ];
    s.outputs = vec![
        "results".into(),
        abs_dest.to_str().unwrap().into(),
        "missing".into(),
    ];
    m.start(&s).await.unwrap();
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(
        status.state,
        AgentState::Succeeded,
        "{}",
        m.log_tail(4096).await.unwrap()
    );
    let listing = std::fs::read_to_string(root.join("listing")).unwrap();
    assert_eq!(
        listing,
        "./.gitignore\n./configs/extra.cfg\n./pkg/mod.py\n./train.py\n./untracked.py\n"
    );
    assert_eq!(std::fs::read_to_string(&abs_dest).unwrap(), "lr=0.1\n");

    let log = dir.path().join("collected/run.log");
    let outputs = dir.path().join("collected/outputs");
    m.collect(&log, &outputs).await.unwrap();
    assert!(std::fs::read_to_string(&log).unwrap().contains("lr=0.1"));
    assert_eq!(
        std::fs::read_to_string(outputs.join("results/acc.txt")).unwrap(),
        "0.93\n"
    );
    assert_eq!(
        std::fs::read_to_string(outputs.join("extra.cfg")).unwrap(),
        "lr=0.1\n"
    );
    assert!(!outputs.join("missing").exists());

    // A folder that is not a git work tree is sent whole.
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(plain.join("data")).unwrap();
    std::fs::write(plain.join("data/big.bin"), "kept").unwrap();
    std::fs::write(plain.join(".gitignore"), "data/\n").unwrap();
    let tag = "asimov.t8.upload-1.1";
    let root = dir.path().join(tag);
    let m = machine(&root, false);
    let mut s = spec(tag, "cat data/big.bin");
    s.source = LaunchSource::Workdir(plain);
    m.start(&s).await.unwrap();
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(status.state, AgentState::Succeeded);
    assert!(m.log_tail(100).await.unwrap().contains("kept"));
}

#[tokio::test]
async fn git_source_is_cloned_at_the_commit_with_the_diff_applied() {
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    git(&origin, &["init", "-q", "-b", "main"]);
    std::fs::write(origin.join("train.py"), "lr = 1\n").unwrap();
    git(&origin, &["add", "."]);
    git(
        &origin,
        &["commit", "-q", "-m", "first version\n\nlong body"],
    );
    let checkout = dir.path().join("checkout");
    let out = Command::new("git")
        .args(["clone", "-q"])
        .arg(&origin)
        .arg(&checkout)
        .output()
        .unwrap();
    assert!(out.status.success());
    // The origin moves on; the run must use the checkout's commit, not the tip.
    std::fs::write(origin.join("train.py"), "lr = 2\n").unwrap();
    git(&origin, &["commit", "-q", "-am", "second"]);

    let clean = capture_git(&checkout, &[]).unwrap();
    assert!(!clean.dirty);
    assert_eq!(clean.diff, None);
    std::fs::write(checkout.join("train.py"), "lr = 3\n").unwrap();
    std::fs::write(checkout.join("new.py"), "fresh\n").unwrap();
    let info = capture_git(&checkout, &[]).unwrap();
    assert_eq!(info.commit, git(&checkout, &["rev-parse", "HEAD"]));
    assert_eq!(info.commit_message, "first version");
    assert_eq!(info.author, "Ada Lovelace <ada@example.com>");
    assert_eq!(info.repository.as_deref(), origin.to_str());
    assert!(info.dirty);
    assert!(capture_git(dir.path(), &[]).is_none());

    let tag = "asimov.t9.git-0.1";
    let root = dir.path().join(tag);
    let m = machine(&root, false);
    let mut s = spec(tag, "cat train.py new.py");
    s.source = LaunchSource::Git {
        repo: info.repository.clone().unwrap(),
        reference: Some("main".into()),
        commit: Some(info.commit.clone()),
        diff: info.diff.clone(),
    };
    m.start(&s).await.unwrap();
    let status = wait_finished(&m, Duration::from_secs(20)).await;
    assert_eq!(status.state, AgentState::Succeeded);
    assert_eq!(m.log_tail(100).await.unwrap(), "lr = 3\nfresh\n");
}

fn request(tag: &OwnerTag) -> CreateRequest {
    CreateRequest {
        tag: tag.clone(),
        placement: asimov::manifest::Placement::local(),
        resources: Default::default(),
        image: None,
    }
}

#[tokio::test]
async fn local_provider_creates_lists_and_destroys_without_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path().join("home"));
    let provider = LocalProvider::new(home.clone()).without_tmux();
    assert!(provider.list().await.unwrap().is_empty());
    let tag = OwnerTag::new("c10", "train-0", 1);
    let a = provider.create(&request(&tag)).await.unwrap();
    let _cleanup = Cleanup::new(&[&home.local_instances().join(&a.id)], &["sleep 3170"]);
    let again = provider.create(&request(&tag)).await.unwrap();
    assert_eq!(a, again);
    assert_eq!(a.id, tag.render());
    assert_eq!(a.state, InstanceState::Running);
    assert_eq!(a.price_per_hour, asimov::model::Usd::ZERO);
    // Folders that are not asimov tags are someone else's.
    std::fs::create_dir_all(home.local_instances().join("not-a-tag")).unwrap();
    assert_eq!(provider.list().await.unwrap(), vec![a.clone()]);

    let m = provider.machine(&a).unwrap();
    m.start(&spec(&tag.render(), "sh -c 'sleep 31701' & sleep 31702"))
        .await
        .unwrap();
    wait_until(&*m, Duration::from_secs(10), |s| {
        s.state == AgentState::Running
    })
    .await;
    assert!(!processes_with("sleep 31701").is_empty());
    assert!(!processes_with("sleep 31702").is_empty());
    provider.destroy(&a.id).await.unwrap();
    assert!(processes_with("sleep 3170").is_empty());
    assert!(!home.local_instances().join(&a.id).exists());
    assert!(provider.list().await.unwrap().is_empty());
    let gone = provider.destroy(&a.id).await.unwrap_err();
    assert_eq!(gone.kind, ErrorKind::NotFound);
}

#[tokio::test]
async fn local_provider_lists_running_instances_whose_folder_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path().join("home"));
    // With tmux where present: the scan must find processes whatever launched them.
    let provider = LocalProvider::new(home.clone());
    let other = LocalProvider::new(Home::at(dir.path().join("other-home")));
    let tag = OwnerTag::new("c11", "orphan-0", 2);
    let a = provider.create(&request(&tag)).await.unwrap();
    let _cleanup = Cleanup::new(&[&home.local_instances().join(&a.id)], &["sleep 31801"]);
    let m = provider.machine(&a).unwrap();
    // The job ignores TERM: destroy must escalate to KILL.
    m.start(&spec(&tag.render(), "trap '' TERM; sleep 31801"))
        .await
        .unwrap();
    wait_until(&*m, Duration::from_secs(10), |s| {
        s.state == AgentState::Running
    })
    .await;
    std::fs::remove_dir_all(home.local_instances().join(&a.id)).unwrap();

    let listed = provider.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, a.id);
    assert_eq!(listed[0].tag, tag);
    assert_eq!(listed[0].state, InstanceState::Stopped);
    // Another home's provider does not claim it.
    assert!(other.list().await.unwrap().is_empty());

    provider.destroy(&a.id).await.unwrap();
    assert!(processes_with("sleep 31801").is_empty());
    assert!(provider.list().await.unwrap().is_empty());
    assert_eq!(
        provider.destroy(&a.id).await.unwrap_err().kind,
        ErrorKind::NotFound
    );
}

/// The agent under busybox's `sh`, `setsid`, `sleep`, `date`..., as on minimal images:
/// `scripts/install-test-deps.sh` installs busybox; run by hand without it, this test is
/// skipped with a note.
#[test]
fn agent_runs_under_busybox() {
    let Ok(busybox) = which("busybox") else {
        eprintln!("busybox not installed; skipping");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for applet in [
        "sh", "setsid", "date", "tail", "sleep", "mv", "cat", "sed", "tr", "mkdir",
    ] {
        std::os::unix::fs::symlink(&busybox, bin.join(applet)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let root = dir.path().join("asimov.t12.bb-0.1");
    let _cleanup = Cleanup::new(&[&root], &["sleep 31901"]);
    std::fs::create_dir_all(root.join("spec")).unwrap();
    std::fs::write(root.join("agent.sh"), AGENT_SCRIPT).unwrap();
    std::fs::write(root.join("spec/tag"), "asimov.t12.bb-0.1\n").unwrap();
    std::fs::write(root.join("spec/max_duration"), "2").unwrap();
    std::fs::write(root.join("spec/setup.sh"), "echo 'ASIMOV_PROGRESS 1/3'\n").unwrap();
    std::fs::write(
        root.join("spec/run.sh"),
        "sh -c 'sleep 31901' & sleep 31901\n",
    )
    .unwrap();
    let agent = |command: &str| {
        let out = Command::new("sh")
            .arg(root.join("agent.sh"))
            .arg(command)
            .arg(&root)
            .env("PATH", &path)
            .env("ASIMOV_NO_TMUX", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{command}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    agent("start");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (status, _) = asimov::agent::parse_status(&agent("status")).unwrap();
        if status.state.is_finished() {
            break status;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status.state, AgentState::TimedOut);
    assert_eq!(status.exit_code, Some(124));
    assert_eq!(
        status.progress,
        Some(Progress {
            done: 1,
            total: Some(3)
        })
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_with("sleep 31901").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job outlived its max_duration"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn which(program: &str) -> Result<PathBuf, ()> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map_err(|_| ())?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !path.is_empty() {
        Ok(PathBuf::from(path))
    } else {
        Err(())
    }
}
