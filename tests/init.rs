//! `asimov init` in fixture projects, through the real binary: requirements.txt,
//! pyproject.toml, no git, a dirty tree, a CUDA tool; the manifest it writes validates
//! and (for one project) runs to the end on the local provider; a re-run shows a diff
//! and overwrites only when confirmed (typed on a pseudo-terminal).

mod support;

use rexpect::process::WaitStatus;
use rexpect::reader::Options;
use rexpect::session::{PtySession, spawn_with_options};
use std::path::Path;
use std::process::Command;
use support::cli::Asimov;

fn git(dir: &Path, args: &[&str]) {
    let ok = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Ada")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .output()
        .expect("git")
        .status
        .success();
    assert!(ok, "git {args:?}");
}

fn head(dir: &Path) -> String {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn machine_python() -> String {
    let out = Command::new("python3").arg("--version").output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let v = text.trim().trim_start_matches("Python ").to_string();
    let mut parts = v.split('.');
    format!("{}.{}", parts.next().unwrap(), parts.next().unwrap())
}

/// `asimov init` in `dir` (a folder of the test's repo), insisting on success.
fn init(a: &Asimov, dir: &Path, args: &[&str], path_prefix: Option<&Path>) -> (String, String) {
    let mut cmd = a.command();
    cmd.arg("init").args(args).current_dir(dir);
    if let Some(bin) = path_prefix {
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("asimov init runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "init failed: {stderr}\n{stdout}");
    (stdout, stderr)
}

#[test]
fn requirements_in_a_clean_git_tree_run_to_the_end() {
    let a = Asimov::new();
    let dir = a.repo.path().join("proj");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("requirements.txt"), "# nothing to install\n").unwrap();
    std::fs::write(
        dir.join("train.py"),
        "import sys\nprint('trained with', sys.version_info[:2])\nprint('ASIMOV_PROGRESS 1/1')\n",
    )
    .unwrap();
    git(&dir, &["init", "-q", "-b", "main"]);
    git(&dir, &["add", "."]);
    git(&dir, &["commit", "-q", "-m", "first"]);
    let (out, err) = init(&a, &dir, &["--yes"], None);
    assert!(out.contains("wrote asimov.yaml"), "{out}");
    assert!(
        err.contains(&format!("git: commit {}\n", &head(&dir)[..12])),
        "{err}"
    );
    let text = std::fs::read_to_string(dir.join("asimov.yaml")).unwrap();
    let py = machine_python();
    for want in [
        "git repository (each run records its commit".to_string(),
        format!("Python {py} (python3 --version)"),
        "  name: proj".to_string(),
        "  source: {workdir: .}".to_string(),
        format!("    - \"python{py} -m venv .venv\""),
        "    - \".venv/bin/pip install -r requirements.txt\"".to_string(),
        "  run: \". .venv/bin/activate && python train.py\"".to_string(),
        "    - {provider: local}".to_string(),
    ] {
        assert!(text.contains(&want), "{want:?} not in\n{text}");
    }
    assert!(!err.contains("uncommitted changes"), "{err}");
    assert!(!text.contains("cuda"), "{text}");

    // Same project, same answers: nothing to change.
    let (again, _) = init(&a, &dir, &["--yes"], None);
    assert!(again.contains("up to date"), "{again}");

    // What it wrote runs: the venv made, requirements installed, the script run in it.
    git(&dir, &["add", "."]);
    git(&dir, &["commit", "-q", "-m", "manifest"]);
    let out = a
        .command()
        .args(["apply", "-f", "asimov.yaml", "--wait"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = a.ok(&["logs", "proj-0"]);
    assert!(log.contains("trained with"), "{log}");
}

#[test]
fn pyproject_without_git_and_a_cuda_tool() {
    let a = Asimov::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pyproject.toml"),
        "[project]\nname = \"x\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("main.py"), "print('hi')\n").unwrap();
    std::fs::write(dir.path().join(".python-version"), "3.10.12\n").unwrap();
    // A stand-in for the NVIDIA tool this machine lacks, printing its real header.
    let bin = tempfile::tempdir().unwrap();
    let smi = bin.path().join("nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\necho '| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2     |'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    init(&a, dir.path(), &["--yes"], Some(bin.path()));
    let text = std::fs::read_to_string(dir.path().join("asimov.yaml")).unwrap();
    for want in [
        "no git repository",
        "Python 3.10 (.python-version)",
        "pyproject.toml",
        "CUDA 12.2 (nvidia-smi)",
        "    - \"python3.10 -m venv .venv\"",
        "    - \".venv/bin/pip install .\"",
        "  run: \". .venv/bin/activate && python main.py\"",
        "  resources: {gpu: {count: 1}, cuda: \"12.2\"}",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    assert!(!text.contains("requirements.txt"), "{text}");
    a.ok(&[
        "apply",
        "--dry-run",
        "-f",
        dir.path().join("asimov.yaml").to_str().unwrap(),
    ]);
}

#[test]
fn a_dirty_tree_is_named_and_a_rerun_shows_a_diff_and_keeps_the_file_under_yes() {
    let a = Asimov::new();
    let dir = a.repo.path();
    std::fs::write(dir.join("train.py"), "print('x')\n").unwrap();
    // train.py is uncommitted: the tree is dirty.
    let (_, err) = init(&a, dir, &["--yes"], None);
    assert!(err.contains("with uncommitted changes"), "{err}");
    let first = std::fs::read_to_string(dir.join("asimov.yaml")).unwrap();
    assert!(!first.contains("pip install"), "{first}");

    std::fs::write(dir.join("requirements.txt"), "\n").unwrap();
    let (out, err) = init(&a, dir, &["--yes"], None);
    assert!(
        err.contains("+    - \".venv/bin/pip install -r requirements.txt\""),
        "{err}"
    );
    assert!(out.contains("kept as it was"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("asimov.yaml")).unwrap(),
        first
    );
}

fn spawn_init(a: &Asimov, dir: &Path) -> PtySession {
    let mut cmd = a.command();
    cmd.arg("init").current_dir(dir).env("TERM", "xterm");
    spawn_with_options(
        cmd,
        Options::new()
            .timeout_ms(Some(30_000))
            .strip_ansi_escape_codes(true),
    )
    .expect("pty")
}

fn keys(p: &mut PtySession, text: &str) {
    p.send(text).unwrap();
    p.flush().unwrap();
}

fn exit_code(p: &PtySession) -> i32 {
    match p.process().wait().unwrap() {
        WaitStatus::Exited(_, code) => code,
        other => panic!("{other:?}"),
    }
}

#[test]
fn on_a_terminal_it_asks_and_overwrites_only_when_confirmed() {
    let a = Asimov::new();
    let dir = a.repo.path();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("train.py"), "print('x')\n").unwrap();

    let mut p = spawn_init(&a, dir);
    p.exp_string("Upload this folder").unwrap();
    keys(&mut p, "y\r");
    p.exp_string("Extra paths").unwrap();
    keys(&mut p, "data\r");
    p.exp_string("Run command").unwrap();
    keys(&mut p, "\r");
    p.exp_string("wrote asimov.yaml").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    let text = std::fs::read_to_string(dir.join("asimov.yaml")).unwrap();
    assert!(text.contains("{from: \"data\", to: \"~/data\"}"), "{text}");
    assert!(text.contains("python train.py"), "{text}");

    // A different run command: the diff, then `n` keeps, `y` overwrites.
    for (answer, kept) in [("n", true), ("y", false)] {
        let mut p = spawn_init(&a, dir);
        p.exp_string("Upload this folder").unwrap();
        keys(&mut p, "y\r");
        p.exp_string("Extra paths").unwrap();
        keys(&mut p, "data\r");
        p.exp_string("Run command").unwrap();
        keys(&mut p, "python train.py --epochs 3\r");
        p.exp_string("+  run: \". .venv/bin/activate && python train.py --epochs 3\"")
            .unwrap();
        p.exp_string("Overwrite asimov.yaml").unwrap();
        keys(&mut p, &format!("{answer}\r"));
        p.exp_eof().unwrap();
        assert_eq!(exit_code(&p), 0);
        let now = std::fs::read_to_string(dir.join("asimov.yaml")).unwrap();
        assert_eq!(now == text, kept, "{now}");
    }

    // Without a terminal and without --yes: it says so and writes nothing.
    std::fs::remove_file(dir.join("asimov.yaml")).unwrap();
    let out = a
        .command()
        .arg("init")
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(!dir.join("asimov.yaml").exists());
}
