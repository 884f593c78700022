//! `asimov init [--yes]`: a job manifest (`asimov.yaml`) for the project in the current
//! folder, with setup matching this machine's environment (no Docker needed): the
//! Python version (`.python-version`, else `python3 --version`), `requirements.txt` or
//! `pyproject.toml`, the CUDA version (`nvcc`, else `nvidia-smi`), the git repository.
//! Asks what to upload and the run command; `--yes` takes the defaults. An existing,
//! different manifest is shown as a diff and overwritten only when confirmed.

use super::{CliResult, fail};
use crate::home::Home;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The file `init` writes, in the project folder.
pub const FILE: &str = "asimov.yaml";
/// A detection tool that does not answer in this time is taken as absent (a broken
/// driver can make `nvidia-smi` hang).
const TOOL_TIMEOUT: Duration = Duration::from_secs(5);

/// What `init` found in the project folder and on this machine.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Project {
    pub name: String,
    /// The git work tree's commit, when the folder is in one.
    pub git_commit: Option<String>,
    pub git_dirty: bool,
    /// `major.minor`, and where it came from.
    pub python: Option<(String, &'static str)>,
    pub requirements: bool,
    pub pyproject: bool,
    /// `major.minor`, and which tool said so.
    pub cuda: Option<(String, &'static str)>,
    /// A likely run command (`python train.py` when there is a train.py, ...).
    pub run_guess: Option<String>,
}

/// What the user chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Choices {
    /// Upload the project folder (respecting .gitignore).
    pub upload_folder: bool,
    /// Extra local paths, each copied to `~/<its name>` on the instance.
    pub extra: Vec<String>,
    pub run: String,
}

/// Runs `program args` and returns its stdout (and stderr) if it exits 0 in time.
fn tool_output(program: &str, args: &[&str], dir: &Path) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut text = String::new();
                if let Some(mut out) = child.stdout.take() {
                    let _ = out.read_to_string(&mut text);
                }
                if let Some(mut err) = child.stderr.take() {
                    let _ = err.read_to_string(&mut text);
                }
                return status.success().then_some(text);
            }
            Ok(None) if started.elapsed() < TOOL_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The first `major.minor` after `marker` in `text`.
fn version_after(text: &str, marker: &str) -> Option<String> {
    let at = text.find(marker)? + marker.len();
    let rest = text[at..].trim_start();
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = digits.split('.').filter(|p| !p.is_empty());
    let (major, minor) = (parts.next()?, parts.next()?);
    Some(format!("{major}.{minor}"))
}

fn job_name_of(dir: &Path) -> String {
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut name = String::new();
    for c in base.chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.is_empty() && !name.ends_with('-') {
            name.push('-');
        }
    }
    name.truncate(40);
    let name = name.trim_matches('-').to_string();
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        format!("job-{name}").trim_end_matches('-').to_string()
    } else {
        name
    }
}

/// Looks at `dir` and this machine.
pub fn detect(dir: &Path) -> Project {
    let git_commit = tool_output("git", &["rev-parse", "HEAD"], dir).map(|s| s.trim().to_string());
    let git_dirty = git_commit.is_some()
        && tool_output(
            "git",
            &["status", "--porcelain", "--", ".", ":!asimov.yaml"],
            dir,
        )
        .is_some_and(|s| !s.trim().is_empty());
    let python = std::fs::read_to_string(dir.join(".python-version"))
        .ok()
        .and_then(|s| version_after(&format!("v {s}"), "v"))
        .map(|v| (v, ".python-version"))
        .or_else(|| {
            tool_output("python3", &["--version"], dir)
                .and_then(|s| version_after(&s, "Python"))
                .map(|v| (v, "python3 --version"))
        });
    let cuda = tool_output("nvcc", &["--version"], dir)
        .and_then(|s| version_after(&s, "release"))
        .map(|v| (v, "nvcc"))
        .or_else(|| {
            tool_output("nvidia-smi", &[], dir)
                .and_then(|s| version_after(&s, "CUDA Version:"))
                .map(|v| (v, "nvidia-smi"))
        });
    let run_guess = ["train.py", "main.py", "run.py"]
        .iter()
        .find(|f| dir.join(f).is_file())
        .map(|f| format!("python {f}"));
    Project {
        name: job_name_of(dir),
        git_commit,
        git_dirty,
        python,
        requirements: dir.join("requirements.txt").is_file(),
        pyproject: dir.join("pyproject.toml").is_file(),
        cuda,
        run_guess,
    }
}

fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The manifest for `project` and `choices`.
pub fn render(p: &Project, c: &Choices, provider: &str) -> String {
    // Only facts that stay put: a commit or a dirty tree in the header would make every
    // re-run show a diff (each run records its commit and diff anyway).
    let mut found = vec![if p.git_commit.is_some() {
        "git repository (each run records its commit and uncommitted diff)".to_string()
    } else {
        "no git repository".to_string()
    }];
    if let Some((v, from)) = &p.python {
        found.push(format!("Python {v} ({from})"));
    }
    if p.requirements {
        found.push("requirements.txt".into());
    } else if p.pyproject {
        found.push("pyproject.toml".into());
    }
    if let Some((v, from)) = &p.cuda {
        found.push(format!("CUDA {v} ({from})"));
    }
    let python = p
        .python
        .as_ref()
        .map_or_else(|| "python3".to_string(), |(v, _)| format!("python{v}"));
    let mut setup = vec![format!("{python} -m venv .venv")];
    if c.upload_folder && p.requirements {
        setup.push(".venv/bin/pip install -r requirements.txt".into());
    } else if c.upload_folder && p.pyproject {
        setup.push(".venv/bin/pip install .".into());
    }
    let mut out = String::new();
    out.push_str("# Written by `asimov init`: ");
    out.push_str(&found.join(", "));
    out.push_str(".\n# Start it with `asimov apply -f asimov.yaml --wait`.\n");
    out.push_str("apiVersion: asimov/v1\nkind: Job\nmetadata:\n");
    out.push_str(&format!("  name: {}\nspec:\n", p.name));
    if c.upload_folder {
        out.push_str("  source: {workdir: .}\n");
    }
    if !c.extra.is_empty() {
        out.push_str("  files:\n");
        for path in &c.extra {
            let name = Path::new(path)
                .file_name()
                .map_or_else(|| path.clone(), |n| n.to_string_lossy().into_owned());
            out.push_str(&format!(
                "    - {{from: {}, to: {}}}\n",
                quoted(path),
                quoted(&format!("~/{name}"))
            ));
        }
    }
    out.push_str("  setup:\n");
    for s in &setup {
        out.push_str(&format!("    - {}\n", quoted(s)));
    }
    out.push_str(&format!(
        "  run: {}\n",
        quoted(&format!(". .venv/bin/activate && {}", c.run))
    ));
    if let Some((v, _)) = &p.cuda {
        out.push_str(&format!(
            "  resources: {{gpu: {{count: 1}}, cuda: {}}}\n",
            quoted(v)
        ));
    }
    out.push_str(&format!("  placement:\n    - {{provider: {provider}}}\n"));
    out
}

pub fn run(home: &Home, yes: bool) -> CliResult {
    let dir = std::env::current_dir()?;
    let terminal = super::prompt::on_terminal();
    if !yes && !terminal {
        return Err(fail(
            "`asimov init` asks on a terminal; pass --yes to take the defaults",
        ));
    }
    let project = detect(&dir);
    match asked(home, &dir, &project, yes) {
        Ok(code) => Ok(code),
        Err(e) => super::prompt::cancelled_or(e),
    }
}

fn asked(home: &Home, dir: &Path, project: &Project, yes: bool) -> CliResult {
    let choices = if yes {
        let Some(run) = project.run_guess.clone() else {
            return Err(fail(
                "no train.py, main.py or run.py here to guess the run command from; \
                 run `asimov init` on a terminal to give it",
            ));
        };
        Choices {
            upload_folder: true,
            extra: Vec::new(),
            run,
        }
    } else {
        ask(dir, project)?
    };
    match &project.git_commit {
        Some(commit) if project.git_dirty => eprintln!(
            "git: commit {} with uncommitted changes (each run records the diff)",
            &commit[..commit.len().min(12)]
        ),
        Some(commit) => eprintln!("git: commit {}", &commit[..commit.len().min(12)]),
        None => eprintln!("git: not a repository (runs record no commit)"),
    }
    let provider = super::prompt::target(home).provider();
    let text = render(project, &choices, provider);
    let path = dir.join(FILE);
    check_valid(home, &path, &text)?;
    match std::fs::read_to_string(&path) {
        Ok(old) if old == text => {
            println!("{FILE} is up to date");
            return Ok(ExitCode::SUCCESS);
        }
        Ok(old) => {
            let diff = similar::TextDiff::from_lines(&old, &text);
            eprint!(
                "{}",
                diff.unified_diff()
                    .header(&format!("{FILE} (now)"), &format!("{FILE} (new)"))
            );
            let overwrite = !yes
                && inquire::Confirm::new(&format!("Overwrite {FILE} with these changes?"))
                    .with_default(false)
                    .prompt()?;
            if !overwrite {
                println!("{FILE} kept as it was");
                return Ok(ExitCode::SUCCESS);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::write(&path, &text)?;
    println!("wrote {FILE}; start it with `asimov apply -f {FILE} --wait`");
    Ok(ExitCode::SUCCESS)
}

/// The manifest must load as asimov will load it, before it is written.
fn check_valid(home: &Home, path: &Path, text: &str) -> Result<(), super::CliError> {
    let ctx = super::desired::secrets_context(home);
    crate::manifest::load_str(path, text, &ctx)?;
    Ok(())
}

fn ask(dir: &Path, project: &Project) -> Result<Choices, super::CliError> {
    let upload_folder = inquire::Confirm::new(&format!(
        "Upload this folder ({}, respecting .gitignore)?",
        dir.display()
    ))
    .with_default(true)
    .prompt()?;
    let base: PathBuf = dir.to_path_buf();
    let extra = inquire::Text::new("Extra paths to upload (comma-separated, empty for none):")
        .with_help_message("each is copied to ~/<its name> on the instance")
        .with_validator(move |s: &str| {
            let missing: Vec<&str> = split_paths(s)
                .filter(|p| !expand(&base, p).exists())
                .collect();
            Ok(if missing.is_empty() {
                inquire::validator::Validation::Valid
            } else {
                inquire::validator::Validation::Invalid(
                    format!("not found: {}", missing.join(", ")).into(),
                )
            })
        })
        .prompt()?;
    let mut run = inquire::Text::new("Run command:")
        .with_help_message("runs in the uploaded folder, in the setup's virtualenv")
        .with_validator(inquire::required!("the run command is required"));
    if let Some(guess) = &project.run_guess {
        run = run.with_default(guess);
    }
    let run = run.prompt()?.trim().to_string();
    Ok(Choices {
        upload_folder,
        extra: split_paths(&extra).map(str::to_string).collect(),
        run,
    })
}

fn split_paths(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

fn expand(base: &Path, p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => {
            std::env::var_os("HOME").map_or_else(|| base.join(p), |h| PathBuf::from(h).join(rest))
        }
        None => base.join(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_tool_output() {
        let nvcc = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.1, V12.1.105\n";
        assert_eq!(version_after(nvcc, "release"), Some("12.1".into()));
        let smi = "| NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2     |";
        assert_eq!(version_after(smi, "CUDA Version:"), Some("12.2".into()));
        assert_eq!(
            version_after("Python 3.11.4\n", "Python"),
            Some("3.11".into())
        );
        assert_eq!(version_after("Python 3\n", "Python"), None);
    }

    #[test]
    fn job_names_come_from_the_folder() {
        assert_eq!(job_name_of(Path::new("/x/My_Project")), "my-project");
        assert_eq!(job_name_of(Path::new("/x/2024 exp")), "job-2024-exp");
        assert_eq!(job_name_of(Path::new("/")), "job");
    }
}
