//! `AgentMachine`: the `Machine` operations over any `Transport`, driving `agent.sh` in
//! one instance folder.

use super::parse::parse_status;
use super::{AGENT_SCRIPT, AgentError, AgentStatus, LaunchSource, LaunchSpec, Machine};
use crate::transport::{CommandOutput, Transport};
use async_trait::async_trait;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::OnceCell;

/// The agent in the instance folder `root` of the machine `transport` reaches.
///
/// Layout under `root`: `agent.sh`, `spec/` (what to run), `work/` (the job's working
/// folder and current directory) and the state files the agent writes (see `agent.sh`).
pub struct AgentMachine {
    transport: Arc<dyn Transport>,
    root: String,
    home: OnceCell<String>,
    no_tmux: bool,
    /// The root came with the instance and goes with it (a local instance's folder):
    /// its absence means the instance is gone, never "not started yet".
    root_is_instance: bool,
}

/// Quotes `s` for `sh` as one word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

impl AgentMachine {
    /// `root` is the instance folder on the machine (absolute, or starting with `~/`).
    pub fn new(transport: Arc<dyn Transport>, root: impl Into<String>) -> Self {
        AgentMachine {
            transport,
            root: root.into(),
            home: OnceCell::new(),
            no_tmux: false,
            root_is_instance: false,
        }
    }

    /// The root is the instance itself (made by its create, removed by its destroy):
    /// a status read that finds no root fails instead of answering "not started", so a
    /// folder removed after the listing saw it is not started again.
    pub fn root_is_instance(mut self) -> Self {
        self.root_is_instance = true;
        self
    }

    /// Launches the agent with `setsid` even where tmux exists (`ASIMOV_NO_TMUX=1`).
    pub fn without_tmux(mut self) -> Self {
        self.no_tmux = true;
        self
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    fn fail(&self, step: &'static str, message: impl Into<String>) -> AgentError {
        AgentError::Failed {
            machine: self.transport.machine().to_string(),
            step,
            message: message.into(),
        }
    }

    async fn run(&self, step: &'static str, script: &str) -> Result<CommandOutput, AgentError> {
        self.transport
            .exec(script)
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step,
                source,
            })
    }

    /// Runs `script` and fails the step unless it exits 0.
    async fn run_ok(&self, step: &'static str, script: &str) -> Result<String, AgentError> {
        let out = self.run(step, script).await?;
        if out.status != 0 {
            return Err(self.fail(step, failure_text(&out)));
        }
        Ok(out.stdout)
    }

    async fn run_with_stdin(
        &self,
        step: &'static str,
        script: &str,
        stdin: &[u8],
    ) -> Result<(), AgentError> {
        let out = self
            .transport
            .exec_with_stdin(script, stdin)
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step,
                source,
            })?;
        if out.status != 0 {
            return Err(self.fail(step, failure_text(&out)));
        }
        Ok(())
    }

    /// The machine's `$HOME`, asked once.
    async fn home(&self) -> Result<&str, AgentError> {
        self.home
            .get_or_try_init(|| async {
                let home = self
                    .run_ok("read home folder", "printf %s \"$HOME\"")
                    .await?;
                if home.is_empty() {
                    return Err(self.fail("read home folder", "HOME is not set"));
                }
                Ok(home)
            })
            .await
            .map(String::as_str)
    }

    /// A path on the machine with a leading `~` made absolute; relative paths are taken
    /// from the job's working folder.
    async fn resolve(&self, path: &str) -> Result<String, AgentError> {
        if path == "~" {
            return Ok(self.home().await?.to_string());
        }
        if let Some(rest) = path.strip_prefix("~/") {
            return Ok(format!("{}/{rest}", self.home().await?));
        }
        if path.starts_with('/') {
            return Ok(path.to_string());
        }
        Ok(format!("{}/work/{path}", self.root_path().await?))
    }

    async fn root_path(&self) -> Result<String, AgentError> {
        if self.root == "~" || self.root.starts_with("~/") {
            let home = self.home().await?;
            return Ok(format!("{home}{}", &self.root[1..]));
        }
        Ok(self.root.clone())
    }

    async fn upload_source(
        &self,
        root: &str,
        source: &LaunchSource,
        exclude: &[std::path::PathBuf],
    ) -> Result<(), AgentError> {
        let work = format!("{root}/work");
        let qwork = sh_quote(&work);
        // `start` left `work/` empty (a half-done earlier upload is gone with it).
        match source {
            LaunchSource::None => {}
            LaunchSource::Workdir(dir) => self.upload_workdir(dir, exclude, &work).await?,
            LaunchSource::Git {
                repo,
                reference,
                commit,
                diff,
            } => {
                let mut script = format!("git clone -q {} {qwork}", sh_quote(repo));
                if let Some(target) = commit.as_ref().or(reference.as_ref()) {
                    script.push_str(&format!(
                        " && cd {qwork} && git -c advice.detachedHead=false checkout -q {}",
                        sh_quote(target)
                    ));
                }
                self.run_ok("clone source", &script).await?;
                if let Some(diff) = diff.as_ref().filter(|d| !d.trim().is_empty()) {
                    self.run_with_stdin(
                        "apply uncommitted diff",
                        &format!("cd {qwork} && git apply --whitespace=nowarn -"),
                        diff.as_bytes(),
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn upload_workdir(
        &self,
        dir: &Path,
        exclude: &[std::path::PathBuf],
        work: &str,
    ) -> Result<(), AgentError> {
        let step = "upload working folder";
        let limit = crate::source::max_upload().map_err(|e| AgentError::Rejected {
            step,
            message: e.to_string(),
        })?;
        let (from, skip) = (dir.to_path_buf(), exclude.to_vec());
        let selection =
            tokio::task::spawn_blocking(move || crate::source::select_upload(&from, &skip, limit))
                .await
                .map_err(|e| self.fail(step, e.to_string()))?
                .map_err(|e| match e {
                    crate::source::SelectionError::Read { .. } => self.fail(step, e.to_string()),
                    _ => AgentError::Rejected {
                        step,
                        message: e.to_string(),
                    },
                })?;
        tracing::info!(
            machine = self.transport.machine(),
            dir = %dir.display(),
            files = selection.files.len(),
            size = %crate::source::human(selection.bytes),
            excluded = ?selection.excluded,
            "uploading working folder"
        );
        // Stage the selection in a temporary folder (hard links where possible), then
        // send that folder in one upload.
        let stage =
            tempfile::tempdir().map_err(|e| self.fail("stage working folder", e.to_string()))?;
        let staged = stage.path().join("work");
        let dir = dir.to_path_buf();
        let target = staged.clone();
        tokio::task::spawn_blocking(move || stage_files(&dir, &selection.files, &target))
            .await
            .map_err(|e| self.fail("stage working folder", e.to_string()))?
            .map_err(|e| self.fail("stage working folder", e.to_string()))?;
        self.transport
            .upload(&staged, work)
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step,
                source,
            })
    }

    async fn copy_files(&self, files: &[(std::path::PathBuf, String)]) -> Result<(), AgentError> {
        for (local, dest) in files {
            let dest = self.resolve(dest).await?;
            if let Some((parent, _)) = dest.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
                self.run_ok(
                    "create file folder",
                    &format!("mkdir -p {}", sh_quote(parent)),
                )
                .await?;
            }
            self.transport
                .upload(local, &dest)
                .await
                .map_err(|source| AgentError::Transport {
                    machine: self.transport.machine().to_string(),
                    step: "copy files",
                    source,
                })?;
        }
        Ok(())
    }

    fn agent(&self, root: &str, command: &str) -> String {
        let q = sh_quote(root);
        let script = sh_quote(&format!("{root}/agent.sh"));
        let env = if self.no_tmux && matches!(command, "start" | "resume") {
            "ASIMOV_NO_TMUX=1 "
        } else {
            ""
        };
        format!("if [ -f {script} ]; then {env}sh {script} {command} {q}; fi")
    }
}

fn failure_text(out: &CommandOutput) -> String {
    let text = if out.stderr.trim().is_empty() {
        out.stdout.trim()
    } else {
        out.stderr.trim()
    };
    format!("exit status {}: {}", out.status, text)
}

/// Copies (hard-links where it can) `files` under `from` into `to`, skipping files git
/// lists that are gone from the folder (deleted, not yet committed).
fn stage_files(from: &Path, files: &[std::path::PathBuf], to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for rel in files {
        let src = from.join(rel);
        let Ok(meta) = std::fs::symlink_metadata(&src) else {
            continue;
        };
        let dst = to.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if meta.is_file() && std::fs::hard_link(&src, &dst).is_ok() {
            continue;
        }
        crate::transport::local::copy_tree(&src, &dst)?;
    }
    Ok(())
}

/// `export NAME='value'` lines, sourced by the agent with `.`.
fn export_lines<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<String, String> {
    let mut text = String::new();
    for (name, value) in pairs {
        if !valid_env_name(name) {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        text.push_str(&format!("export {name}={}\n", sh_quote(value)));
    }
    Ok(text)
}

/// What the start script prints when the agent had already started on this instance.
const STARTED: &str = "asimov-agent-already-started";

/// The run's `spec/` folder and `agent.sh` as one tar archive, secrets first, every
/// file private (0600: tar run by root keeps the archive's modes whatever the umask).
fn spec_archive(spec: &LaunchSpec, env: &str, secrets: &str) -> std::io::Result<Vec<u8>> {
    let max = spec
        .max_duration
        .map(|d| d.as_secs().max(1).to_string())
        .unwrap_or_default();
    let outputs: String = spec.outputs.iter().map(|o| format!("{o}\n")).collect();
    let mut entries: Vec<(&str, String, u32)> = vec![
        ("spec/secrets", secrets.to_string(), 0o600),
        ("spec/tag", format!("{}\n", spec.tag), 0o600),
        ("spec/run", format!("{}\n", spec.run), 0o600),
        ("spec/env", env.to_string(), 0o600),
        ("spec/setup.sh", setup_script(&spec.setup), 0o600),
        ("spec/run.sh", format!("{}\n", spec.command), 0o600),
        ("spec/max_duration", max, 0o600),
        ("spec/outputs", outputs, 0o600),
        ("agent.sh", AGENT_SCRIPT.to_string(), 0o600),
    ];
    if let Some(s3) = &spec.s3 {
        // The keys first of the S3 files, 0600 as every file here.
        entries.insert(
            1,
            ("spec/s3.curl", s3.curl_config.expose().to_string(), 0o600),
        );
        entries.push(("spec/s3", s3_settings(s3), 0o600));
        let outputs: String = s3
            .outputs
            .iter()
            .map(|(path, name)| format!("{path}\t{name}\n"))
            .collect();
        entries.push(("spec/s3_outputs", outputs, 0o600));
    }
    let mut archive = tar::Builder::new(Vec::new());
    for (path, data, mode) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        archive.append_data(&mut header, path, data.as_bytes())?;
    }
    archive.into_inner()
}

/// `spec/s3`, sourced by the agent: where the run's objects go and which checkpoint
/// to restore (no secret: the keys are in `spec/s3.curl`).
fn s3_settings(s3: &super::S3Launch) -> String {
    let mut text = format!(
        "S3_BASE={}\nS3_NEXT={}\nS3_ATTEMPT={}\n",
        sh_quote(&s3.url),
        s3.next_seq,
        s3.attempt
    );
    if let Some(path) = &s3.checkpoint {
        text.push_str(&format!("S3_CHECKPOINT={}\n", sh_quote(path)));
    }
    if let Some(generation) = &s3.restore {
        text.push_str(&format!("S3_RESTORE={}\n", sh_quote(generation)));
    }
    text
}

/// What `agent.sh sync` printed: `key=value` lines.
fn parse_synced(text: &str) -> Result<super::S3Synced, String> {
    let mut synced = super::S3Synced::default();
    let mut result = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "result" => result = Some(value.to_string()),
            "checkpoint" if !value.is_empty() && value != "-" => {
                synced.checkpoint = Some(value.to_string())
            }
            "files" => synced.files = value.parse().unwrap_or(0),
            "bytes" => synced.bytes = value.parse().unwrap_or(0),
            "error" => synced.failed = Some(value.to_string()),
            _ => {}
        }
    }
    match result.as_deref() {
        Some("done") => {
            synced.failed = None;
            Ok(synced)
        }
        Some("failed") => {
            synced.failed.get_or_insert_with(|| "unknown error".into());
            Ok(synced)
        }
        _ => Err(format!("no result in the agent's answer: {}", text.trim())),
    }
}

fn setup_script(commands: &[String]) -> String {
    if commands.is_empty() {
        return String::new();
    }
    let mut text = String::from("set -e\n");
    for command in commands {
        // Echo the command as written (not expanded: no secret reaches the log).
        text.push_str(&format!(
            "printf '%s\\n' {}\n",
            sh_quote(&format!("+ {command}"))
        ));
        text.push_str(command);
        text.push('\n');
    }
    text
}

#[async_trait]
impl Machine for AgentMachine {
    /// A plain SSH host or the local machine: its GPUs are what the user says they are
    /// (the clouds' machines probe `nvidia-smi` around this agent).
    async fn gpus(&self) -> Result<crate::agent::GpuProbe, AgentError> {
        Ok(crate::agent::GpuProbe::Unchecked)
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<(), AgentError> {
        let root = self.root_path().await?;
        let env = export_lines(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|m| self.fail("write environment", m))?;
        let secrets = export_lines(spec.secrets.iter().map(|(k, v)| (k.as_str(), v.expose())))
            .map_err(|m| self.fail("write secrets", m))?;
        let archive = spec_archive(spec, &env, &secrets)
            .map_err(|e| self.fail("pack run spec", e.to_string()))?;
        // One command, whatever the link's round trip: unless the agent already started,
        // replace spec/ and work/ with the archive's spec and agent (secrets travel on
        // stdin, 0600 from their first byte: umask 077, and so mode 0600 in the archive).
        let q = sh_quote(&root);
        let script = format!(
            "if [ -e {q}/status ]; then echo {STARTED}; exit 0; fi\n\
             mkdir -p {q} && rm -rf {q}/spec {q}/work {q}/sync && mkdir -p {q}/work && \
             umask 077 && tar -x -f - -C {q}"
        );
        let out = self
            .transport
            .exec_with_stdin(&script, &archive)
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step: "write run spec",
                source,
            })?;
        if out.status != 0 {
            return Err(self.fail("write run spec", failure_text(&out)));
        }
        if out.stdout.trim() == STARTED {
            return Ok(());
        }
        self.upload_source(&root, &spec.source, &spec.exclude)
            .await?;
        self.copy_files(&spec.files).await?;
        self.run_ok("start agent", &self.agent(&root, "start"))
            .await?;
        Ok(())
    }

    async fn observe(&self) -> Result<Option<AgentStatus>, AgentError> {
        let root = self.root_path().await?;
        let mut script = self.agent(&root, "status");
        if self.root_is_instance {
            script = format!(
                "if [ -d {0} ]; then {script}; else echo 'instance folder {0} is gone' >&2; exit 3; fi",
                sh_quote(&root)
            );
        }
        let text = self.run_ok("read agent status", &script).await?;
        Ok(parse_status(&text).map(|(status, _)| status))
    }

    async fn log_tail(&self, max_bytes: usize) -> Result<String, AgentError> {
        let root = self.root_path().await?;
        let log = sh_quote(&format!("{root}/log"));
        self.run_ok(
            "read log",
            &format!("if [ -f {log} ]; then tail -c {max_bytes} {log}; fi"),
        )
        .await
    }

    async fn collect(&self, log: &Path, outputs: &Path) -> Result<(), AgentError> {
        let root = self.root_path().await?;
        let transfer_err = |source| AgentError::Transport {
            machine: self.transport.machine().to_string(),
            step: "collect outputs",
            source,
        };
        let remote_log = format!("{root}/log");
        if self
            .run("find log", &format!("test -f {}", sh_quote(&remote_log)))
            .await?
            .status
            == 0
        {
            self.transport
                .download(&remote_log, log)
                .await
                .map_err(transfer_err)?;
            // An agent older than the cap, or a log that grew within its last second.
            let kept = log.to_path_buf();
            tokio::task::spawn_blocking(move || {
                cap_log_file(&kept, super::LOG_CAP, super::LOG_KEEP)
            })
            .await
            .map_err(|e| self.fail("cap log", e.to_string()))?
            .map_err(|e| self.fail("cap log", e.to_string()))?;
        }
        let listed = self
            .run_ok(
                "read outputs",
                &format!(
                    "if [ -f {0} ]; then cat {0}; fi",
                    sh_quote(&format!("{root}/spec/outputs"))
                ),
            )
            .await?;
        for output in listed.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let remote = self.resolve(output).await?;
            let exists = self
                .run("find output", &format!("test -e {}", sh_quote(&remote)))
                .await?;
            if exists.status != 0 {
                tracing::warn!(output, "output not found on the instance; skipped");
                continue;
            }
            let local = outputs.join(output_name(output));
            if let Ok(meta) = std::fs::symlink_metadata(&local) {
                let removed = if meta.is_dir() {
                    std::fs::remove_dir_all(&local)
                } else {
                    std::fs::remove_file(&local)
                };
                removed.map_err(|e| self.fail("collect outputs", e.to_string()))?;
            }
            self.transport
                .download(&remote, &local)
                .await
                .map_err(transfer_err)?;
        }
        Ok(())
    }

    async fn copy_log(&self, to: &Path) -> Result<bool, AgentError> {
        let root = self.root_path().await?;
        let remote_log = format!("{root}/log");
        let found = self
            .run("find log", &format!("test -f {}", sh_quote(&remote_log)))
            .await?;
        if found.status != 0 {
            return Ok(false);
        }
        self.transport
            .download(&remote_log, to)
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step: "read log",
                source,
            })?;
        Ok(true)
    }

    async fn follow_log(&self) -> Result<crate::transport::ByteStream<'_>, AgentError> {
        let root = self.root_path().await?;
        self.transport
            .follow(&format!("{root}/log"))
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step: "follow log",
                source,
            })
    }

    async fn metrics_tail(&self, max_bytes: usize) -> Result<String, AgentError> {
        let root = self.root_path().await?;
        let file = sh_quote(&format!("{root}/metrics.jsonl"));
        self.run_ok(
            "read metrics",
            &format!("if [ -f {file} ]; then tail -c {max_bytes} {file}; fi"),
        )
        .await
    }

    async fn metrics_since(
        &self,
        offset: u64,
        file: Option<u64>,
        max_bytes: usize,
    ) -> Result<super::MetricsRead, AgentError> {
        let root = self.root_path().await?;
        let path = sh_quote(&format!("{root}/metrics.jsonl"));
        let file_id = file.map_or_else(|| "-".to_string(), |f| f.to_string());
        // One exec: the inode and size (`ls -i`), then where the text starts and the
        // text: from the newline before `offset` when the file is the same and long
        // enough, else its tail.
        let script = format!(
            "f={path}; [ -f \"$f\" ] || exit 0; set -- $(ls -ilnd \"$f\"); i=$1; size=$6; \
             if [ {offset} -gt 0 ] && [ \"$i\" = {file_id} ] && [ \"$size\" -ge {offset} ]; then \
             start=$(({offset} - 1)); else start=$((size > {max_bytes} ? size - {max_bytes} : 0)); fi; \
             echo \"$i $start\"; tail -c +$((start + 1)) \"$f\" | head -c {max_bytes}"
        );
        let out = self.run_ok("read metrics", &script).await?;
        let Some((head, text)) = out.split_once('\n') else {
            return Ok(super::MetricsRead::default());
        };
        let mut fields = head.split_whitespace().map(|f| f.parse::<u64>().ok());
        let (Some(Some(inode)), Some(Some(start))) = (fields.next(), fields.next()) else {
            return Err(self.fail("read metrics", format!("unexpected answer {head:?}")));
        };
        Ok(super::MetricsRead {
            file: Some(inode),
            start,
            text: text.to_string(),
        })
    }

    async fn sync_checkpoint(&self, path: &str, into: &Path) -> Result<bool, AgentError> {
        let remote = self.resolve(path).await?;
        let found = self
            .run("find checkpoint", &format!("test -d {}", sh_quote(&remote)))
            .await?;
        if found.status != 0 {
            return Ok(false);
        }
        self.transport
            .download(&remote, into)
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step: "sync checkpoint",
                source,
            })?;
        Ok(true)
    }

    async fn sync_s3(&self, last: bool) -> Result<super::S3Synced, AgentError> {
        let root = self.root_path().await?;
        let what = if last { "final" } else { "checkpoint" };
        let text = self
            .run_ok("sync to s3", &self.agent(&root, &format!("sync-{what}")))
            .await?;
        parse_synced(&text).map_err(|m| self.fail("sync to s3", m))
    }

    async fn interactive(
        &self,
        session: super::Session,
        run: &str,
    ) -> Result<std::process::Command, AgentError> {
        let root = self.root_path().await?;
        let script = interactive_script(session, &root, run);
        self.transport
            .interactive(&script)
            .await
            .map_err(|source| AgentError::Transport {
                machine: self.transport.machine().to_string(),
                step: "open an interactive session",
                source,
            })
    }

    async fn stop(&self) -> Result<(), AgentError> {
        let root = self.root_path().await?;
        self.run_ok("stop agent", &self.agent(&root, "stop"))
            .await?;
        Ok(())
    }

    async fn pause(&self) -> Result<(), AgentError> {
        let root = self.root_path().await?;
        self.run_ok("pause agent", &self.agent(&root, "pause"))
            .await?;
        Ok(())
    }

    async fn resume(&self, resume_from: Option<&str>) -> Result<(), AgentError> {
        let root = self.root_path().await?;
        // The path is the job's own (not a secret); the agent adds it to spec/env.
        let write = resume_from.map_or_else(String::new, |p| {
            format!(
                "printf '%s' {} >{}/resume_from && ",
                sh_quote(p),
                sh_quote(&root)
            )
        });
        let script = format!("{write}{}", self.agent(&root, "resume"));
        self.run_ok("resume agent", &script).await?;
        Ok(())
    }
}

/// The shell text of an interactive session in the instance folder `root` (see
/// [`super::Session`]). Exit codes of its own: 3 when the run has already ended.
fn interactive_script(session: super::Session, root: &str, run: &str) -> String {
    let q_root = sh_quote(root);
    let q_run = sh_quote(run);
    let ended = format!(
        "case $(cat {q_root}/status 2>/dev/null) in succeeded|failed|timeout|stopped) \
         printf 'asimov: %s has ended (%s); its log: asimov logs %s\\n' {q_run} \
         \"$(cat {q_root}/status)\" {q_run} >&2; exit 3;; esac; "
    );
    match session {
        // The job's non-secret env (spec/env) and its ASIMOV_* names, in its working
        // folder: what a user needs to look around or rerun a step by hand.
        super::Session::Shell => format!(
            "cd {q_root}/work 2>/dev/null || cd {q_root} || exit 1; \
             if [ -f {q_root}/spec/env ]; then . {q_root}/spec/env; fi; \
             ASIMOV_RUN={q_run}; ASIMOV_ROOT={q_root}; export ASIMOV_RUN ASIMOV_ROOT; \
             printf 'asimov: a shell on the machine of %s, in %s (exit leaves; the run goes on)\\n' \
             {q_run} \"$PWD\" >&2; \
             exec \"${{SHELL:-/bin/sh}}\" -l"
        ),
        // Read-only: keys typed into the pane would reach the supervisor's terminal (a
        // Ctrl-C there would end the agent's watch over the job); detaching needs none.
        super::Session::Attach => format!(
            "{ended}launcher=$(cat {q_root}/launcher 2>/dev/null); \
             case $launcher in 'tmux '*) session=${{launcher#tmux }}; \
             if tmux has-session -t \"=$session\" 2>/dev/null; then \
             printf 'asimov: attaching to the tmux session of %s, read-only (Ctrl-b d detaches; the run goes on)\\n' {q_run} >&2; \
             exec tmux attach-session -r -t \"=$session\"; fi;; esac; \
             printf 'asimov: %s runs without tmux on its machine; following its log (Ctrl-C leaves; the run goes on)\\n' {q_run} >&2; \
             exec tail -n +1 -f {q_root}/log"
        ),
    }
}

/// Cuts the file at `path` back to its last `keep` bytes, behind a line that says so,
/// when it is longer than `cap`; streams, never holding the file in memory.
pub fn cap_log_file(path: &Path, cap: u64, keep: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let len = std::fs::metadata(path)?.len();
    if len <= cap {
        return Ok(());
    }
    let mut from = std::fs::File::open(path)?;
    from.seek(SeekFrom::Start(len - keep.min(len)))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    writeln!(
        tmp,
        "[asimov: the log passed {cap} bytes; older output was dropped]"
    )?;
    std::io::copy(&mut from, &mut tmp)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Where an output lands in the outputs folder: a relative path keeps its path, an
/// absolute or `~` path its last component (`/tmp/output` → `output`).
pub fn output_name(output: &str) -> std::path::PathBuf {
    let trimmed = output.trim_end_matches('/');
    let relative = !(trimmed.starts_with('/') || trimmed.starts_with('~'));
    let clean: std::path::PathBuf = Path::new(trimmed)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect();
    if relative {
        clean
    } else {
        clean
            .file_name()
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "output".into())
    }
}
