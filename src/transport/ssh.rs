//! The OpenSSH transport: one multiplexed master connection per machine (the `openssh`
//! crate, native mux), reused by every command, upload, download and follow; host keys
//! trusted on first use and pinned per machine in `$ASIMOV_HOME/known_hosts/<machine>`.
//!
//! Never prompts: `BatchMode=yes`, a connect timeout, `StrictHostKeyChecking=yes` once a
//! key is pinned (`accept-new` into the machine's own file before that). The user's
//! `~/.ssh/config` and the system known hosts are not read: a fleet manifest says
//! everything needed to reach a host, and a pin must come from asimov's own file.
//!
//! A target behind a bastion (`SshJump`) is reached as OpenSSH's `ProxyJump` does, with
//! `ssh -W` through the bastion as the master's `ProxyCommand`; the bastion has its own
//! identity file and its own pinned key (`known_hosts/<machine>.jump`).

use super::{ByteStream, CommandOutput, Transport, TransportError};
use crate::home::Home;
use async_trait::async_trait;
use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How to reach one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// Name for messages and for the pinned key file (`gpu-box-1`, `fleet-a.host-1`).
    pub machine: String,
    pub host: String,
    pub port: u16,
    /// `None` uses the local user name, as `ssh` does.
    pub user: Option<String>,
    /// `None` lets `ssh` try its default keys and agent.
    pub identity_file: Option<PathBuf>,
    /// The bastion to go through, if any.
    pub jump: Option<SshJump>,
}

/// A bastion in front of a target (`ProxyJump user@host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshJump {
    pub host: String,
    pub port: u16,
    /// `None` uses the local user name, as `ssh` does.
    pub user: Option<String>,
    /// `None` lets `ssh` try its default keys and agent.
    pub identity_file: Option<PathBuf>,
}

/// How long a master with no command running stays up. A pool closes its masters when
/// it is closed or dropped; this bounds how long one outlives a process killed without
/// the chance to (SIGKILL), while a busy controller keeps reusing its masters.
const MASTER_IDLE: Duration = Duration::from_secs(15 * 60);

/// Names every pool's control folder (under the system temp dir).
const CONTROL_DIR_PREFIX: &str = "asimov-ssh-";

/// Knobs of a pool; the defaults suit real hosts.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// `ConnectTimeout` of the master connection.
    pub connect_timeout: Duration,
    /// `ServerAliveInterval`; with `ServerAliveCountMax 3` a silent host is declared
    /// dead after three missed answers.
    pub server_alive_interval: Duration,
    /// Use rsync when both ends have it. `false` (or `ASIMOV_SSH_NO_RSYNC=1`) forces
    /// the tar stream.
    pub use_rsync: bool,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            connect_timeout: Duration::from_secs(10),
            server_alive_interval: Duration::from_secs(5),
            use_rsync: std::env::var_os("ASIMOV_SSH_NO_RSYNC").is_none_or(|v| v.is_empty()),
        }
    }
}

/// The master connections of all machines, keyed by machine name. Cheap to share
/// (`Arc`); every `SshTransport` made from it reuses its machine's master.
pub struct SshPool {
    home: Home,
    options: SshOptions,
    /// Holds the control sockets and the ssh config file; short path under the system
    /// temp dir because a unix socket path is limited to ~100 bytes.
    control_dir: tempfile::TempDir,
    config_file: PathBuf,
    /// What `config_file` holds; a target with a bastion gets it plus the bastion's
    /// block in a file of its own.
    config: String,
    local_rsync: bool,
    entries: std::sync::Mutex<HashMap<String, Arc<Entry>>>,
}

struct Entry {
    target: SshTarget,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

/// A live master and what was learnt about the remote side when it was opened.
#[derive(Clone)]
struct Conn {
    session: Arc<Session>,
    /// `$HOME` of the remote user: `~/x` paths are resolved against it locally, so that
    /// rsync and quoted shell words agree on where they point.
    remote_home: String,
    remote_rsync: bool,
    /// Fingerprints of the pinned host key (sorted, comma-separated).
    host_key: String,
}

impl std::fmt::Debug for SshPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPool")
            .field("home", &self.home)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl SshPool {
    /// A pool with default options. Fails only when the temp dir cannot be made.
    pub fn new(home: Home) -> std::io::Result<Arc<SshPool>> {
        SshPool::with_options(home, SshOptions::default())
    }

    /// The asimov home this pool keeps its keys and pins in.
    pub fn home(&self) -> &Home {
        &self.home
    }

    pub fn with_options(home: Home, options: SshOptions) -> std::io::Result<Arc<SshPool>> {
        let control_dir = tempfile::Builder::new()
            .prefix(CONTROL_DIR_PREFIX)
            .tempdir()?;
        let config_file = control_dir.path().join("config");
        let alive = options.server_alive_interval.as_secs().max(1);
        // Options the openssh crate has no setter for. `-F` also keeps the user's own
        // config (and its surprises) out of asimov's connections.
        let config = format!(
            "Host *\n  BatchMode yes\n  GlobalKnownHostsFile /dev/null\n  HashKnownHosts no\n  \
             CheckHostIP no\n  PasswordAuthentication no\n  KbdInteractiveAuthentication no\n  \
             ServerAliveInterval {alive}\n  ServerAliveCountMax 3\n  LogLevel ERROR\n"
        );
        std::fs::write(&config_file, &config)?;
        let local_rsync = std::process::Command::new("rsync")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        Ok(Arc::new(SshPool {
            home,
            options,
            control_dir,
            config_file,
            config,
            local_rsync,
            entries: std::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// The transport to `target`, sharing the machine's master connection with every
    /// other transport made for the same machine name. A changed address replaces it.
    pub fn transport(self: &Arc<Self>, target: SshTarget) -> SshTransport {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = match entries.get(&target.machine) {
            Some(entry) if entry.target == target => entry.clone(),
            _ => {
                let entry = Arc::new(Entry {
                    target: target.clone(),
                    conn: tokio::sync::Mutex::new(None),
                });
                entries.insert(target.machine.clone(), entry.clone());
                entry
            }
        };
        SshTransport {
            pool: self.clone(),
            entry,
        }
    }

    /// Where the pinned host key of `machine` lives.
    pub fn known_hosts_file(&self, machine: &str) -> PathBuf {
        self.home.known_hosts().join(file_name(machine))
    }

    /// Ends every master connection of this pool (`ssh -O exit`), waiting for each; the
    /// next command on any machine opens a new one. The controller calls it on every
    /// way it stops; dropping the pool does the same without waiting for the answers.
    pub async fn close_all(&self) {
        let entries: Vec<Arc<Entry>> = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.values().cloned().collect()
        };
        for entry in entries {
            let Some(conn) = entry.conn.lock().await.take() else {
                continue;
            };
            let exit = tokio::process::Command::from(self.exit_master(&conn.session))
                .kill_on_drop(true)
                .status();
            // The master answers over a local socket; never let a stop hang on one.
            let status = tokio::time::timeout(Duration::from_secs(5), exit).await;
            if !status.is_ok_and(|s| s.is_ok_and(|s| s.success())) {
                tracing::warn!(machine = %entry.target.machine, "ssh master did not confirm exit");
            }
        }
    }

    /// Makes this pool the controller's: the masters a previous controller of this home
    /// left (it was killed without the chance to close them) are ended first, then this
    /// pool's control folder is recorded for the next controller. Call it only while
    /// holding the controller lock, so no live controller's masters are touched.
    pub async fn replace_previous_controller(&self) -> std::io::Result<()> {
        let dir = self.home.known_hosts();
        std::fs::create_dir_all(&dir)?;
        let record = dir.join(".controller-masters");
        if let Ok(previous) = std::fs::read_to_string(&record) {
            let previous = PathBuf::from(previous.trim());
            // Only ever a folder this module made, whatever the record says.
            let ours = previous
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(CONTROL_DIR_PREFIX));
            if ours && previous != self.control_dir.path() && previous.is_dir() {
                for entry in std::fs::read_dir(&previous)?.flatten() {
                    let socket = entry.path().join("master");
                    if !socket.exists() {
                        continue;
                    }
                    let exit = tokio::process::Command::from(self.exit_master_at(&socket))
                        .kill_on_drop(true)
                        .status();
                    let _ = tokio::time::timeout(Duration::from_secs(5), exit).await;
                    tracing::info!(socket = %socket.display(), "ended a master left by a previous controller");
                }
                let _ = std::fs::remove_dir_all(&previous);
            }
        }
        crate::home::write_private(
            &record,
            self.control_dir.path().to_string_lossy().as_bytes(),
        )
    }

    /// `ssh -O exit` through `session`'s control socket: the master ends at once, with
    /// any command still running on it.
    fn exit_master(&self, session: &Session) -> std::process::Command {
        self.exit_master_at(session.control_socket())
    }

    fn exit_master_at(&self, socket: &Path) -> std::process::Command {
        let mut cmd = std::process::Command::new("ssh");
        cmd.arg("-F")
            .arg(&self.config_file)
            .arg("-S")
            .arg(socket)
            .args(["-O", "exit", "asimov-master"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd
    }

    /// Closes the master connection of `machine`, if any; the next command reopens it.
    pub async fn disconnect(&self, machine: &str) {
        let entry = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.get(machine).cloned()
        };
        if let Some(entry) = entry
            && let Some(conn) = entry.conn.lock().await.take()
            && let Ok(session) = Arc::try_unwrap(conn.session)
        {
            let _ = session.close().await;
        }
    }
}

impl Drop for SshPool {
    fn drop(&mut self) {
        // Before `control_dir` is removed with the sockets in it: a master whose socket
        // is gone can no longer be told to exit, and ControlPersist would keep it.
        let entries: Vec<Arc<Entry>> = self
            .entries
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for entry in entries {
            let Ok(mut conn) = entry.conn.try_lock() else {
                continue;
            };
            if let Some(conn) = conn.take()
                && let Ok(mut child) = self.exit_master(&conn.session).spawn()
            {
                // Short: the master answers over a local socket.
                let _ = child.wait();
            }
        }
    }
}

/// The files of a target's bastion, for one connection attempt.
struct JumpFiles {
    config_file: PathBuf,
    known_hosts: PathBuf,
    pinned: bool,
    /// What the bastion's `ssh -W` wrote to stderr.
    log: PathBuf,
    host: String,
    port: u16,
}

/// A machine reached over the pool's master connection for it.
#[derive(Clone)]
pub struct SshTransport {
    pool: Arc<SshPool>,
    entry: Arc<Entry>,
}

impl std::fmt::Debug for SshTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTransport")
            .field("target", &self.entry.target)
            .finish()
    }
}

impl SshTransport {
    pub fn target(&self) -> &SshTarget {
        &self.entry.target
    }

    /// The control socket of the live master, opening it if needed (for tests and for
    /// tools that want to ride the same connection).
    pub async fn control_socket(&self) -> Result<PathBuf, TransportError> {
        Ok(self.conn().await?.session.control_socket().to_path_buf())
    }

    /// The remote user's `$HOME`.
    pub async fn remote_home(&self) -> Result<String, TransportError> {
        Ok(self.conn().await?.remote_home)
    }

    /// The fingerprints of the host key this machine proved it holds (`SHA256:...`,
    /// sorted, comma-separated): what tells two hosts apart from this side even when
    /// they share a home folder, a machine id and a host name.
    pub async fn host_key(&self) -> Result<String, TransportError> {
        Ok(self.conn().await?.host_key)
    }

    /// Whether transfers to this machine use rsync (else a tar stream).
    pub async fn uses_rsync(&self) -> Result<bool, TransportError> {
        let conn = self.conn().await?;
        Ok(self.pool.options.use_rsync && self.pool.local_rsync && conn.remote_rsync)
    }

    fn name(&self) -> &str {
        &self.entry.target.machine
    }

    /// The live master, reopened when the previous one died.
    async fn conn(&self) -> Result<Conn, TransportError> {
        let mut slot = self.entry.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.session.check().await.is_ok() {
                return Ok(conn.clone());
            }
            tracing::debug!(machine = self.name(), "ssh master died; reconnecting");
            *slot = None;
        }
        let session = Arc::new(self.connect().await?);
        let probe = run_on(
            &session,
            "printf '%s\\n' \"$HOME\"; command -v rsync >/dev/null 2>&1 && echo rsync; true",
            None,
        )
        .await
        .map_err(|e| self.classify_exec(e, "probe remote side"))?;
        let mut lines = probe.stdout.lines();
        let remote_home = lines.next().unwrap_or("").trim().to_string();
        if remote_home.is_empty() {
            return Err(self.failed("probe remote side", "remote $HOME is empty"));
        }
        let mut keys: Vec<String> =
            fingerprints_of_file(&self.pool.known_hosts_file(&self.entry.target.machine))
                .await
                .into_iter()
                .map(|f| f.hash)
                .collect();
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Err(self.failed("read pinned host key", "no key in the pinned file"));
        }
        let conn = Conn {
            session,
            remote_home,
            remote_rsync: lines.any(|l| l.trim() == "rsync"),
            host_key: keys.join(","),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<Session, TransportError> {
        let target = &self.entry.target;
        let known_hosts = self.pool.known_hosts_file(&target.machine);
        let dir = self.pool.home.known_hosts();
        std::fs::create_dir_all(&dir).map_err(|e| self.io("create known_hosts folder", e))?;
        let _ = crate::home::set_mode(&dir, 0o700);
        let pinned = std::fs::metadata(&known_hosts)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let jump = match &target.jump {
            Some(jump) => Some(self.write_jump_config(jump)?),
            None => None,
        };
        let mut builder = SessionBuilder::default();
        builder
            // Trust on first use into the machine's own file; strict ever after.
            .known_hosts_check(if pinned {
                KnownHosts::Strict
            } else {
                KnownHosts::Add
            })
            .user_known_hosts_file(&known_hosts)
            .config_file(
                jump.as_ref()
                    .map_or(&self.pool.config_file, |j| &j.config_file),
            )
            .control_directory(self.pool.control_dir.path())
            .connect_timeout(self.pool.options.connect_timeout)
            .control_persist(openssh::ControlPersist::IdleFor(
                std::num::NonZeroUsize::new(MASTER_IDLE.as_secs() as usize)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            ))
            .server_alive_interval(self.pool.options.server_alive_interval)
            .port(target.port);
        if let Some(user) = &target.user {
            builder.user(user.clone());
        }
        if let Some(key) = &target.identity_file {
            builder.keyfile(key);
        }
        match builder.connect_mux(&target.host).await {
            Ok(session) => {
                if !pinned {
                    let _ = crate::home::set_mode(&known_hosts, 0o600);
                    tracing::info!(machine = self.name(), "pinned host key on first use");
                }
                if let Some(jump) = &jump
                    && !jump.pinned
                {
                    let _ = crate::home::set_mode(&jump.known_hosts, 0o600);
                    tracing::info!(machine = self.name(), "pinned jump host key on first use");
                }
                Ok(session)
            }
            Err(e) => match &jump {
                Some(j) => match self.classify_jump(j).await {
                    Some(error) => Err(error),
                    None => Err(self.classify_connect(e, &known_hosts).await),
                },
                None => Err(self.classify_connect(e, &known_hosts).await),
            },
        }
    }

    /// The config for a target behind a bastion: the pool's, preceded by a block for
    /// the bastion (alias `asimov-jump`) and a `ProxyCommand` running `ssh -W` through
    /// it, as `ProxyJump` expands to, with the bastion's own key, pin and error log.
    fn write_jump_config(&self, jump: &SshJump) -> Result<JumpFiles, TransportError> {
        let machine = &self.entry.target.machine;
        let known_hosts = self.pool.known_hosts_file(&format!("{machine}.jump"));
        let pinned = std::fs::metadata(&known_hosts)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let dir = self.pool.control_dir.path();
        let config_file = dir.join(format!("{}.config", file_name(machine)));
        let log = dir.join(format!("{}.jump.log", file_name(machine)));
        let _ = std::fs::remove_file(&log);
        let mut block = format!(
            "Host asimov-jump\n  HostName {}\n  Port {}\n  ProxyCommand none\n  \
             UserKnownHostsFile {}\n  StrictHostKeyChecking {}\n  ConnectTimeout {}\n",
            config_word(&jump.host),
            jump.port,
            config_word(&known_hosts.to_string_lossy()),
            if pinned { "yes" } else { "accept-new" },
            self.pool.options.connect_timeout.as_secs().max(1),
        );
        if let Some(user) = &jump.user {
            block.push_str(&format!("  User {}\n", config_word(user)));
        }
        if let Some(key) = &jump.identity_file {
            block.push_str(&format!(
                "  IdentityFile {}\n  IdentitiesOnly yes\n",
                config_word(&key.to_string_lossy())
            ));
        }
        // `%` is a token in a ProxyCommand; the paths' own `%` are doubled.
        let escape = |p: &Path| quote(&p.to_string_lossy()).replace('%', "%%");
        let text = format!(
            "{block}\nHost *\n  ProxyCommand ssh -F {} -W '[%h]:%p' asimov-jump 2>>{}\n{}",
            escape(&config_file),
            escape(&log),
            self.pool.config.trim_start_matches("Host *\n"),
        );
        std::fs::write(&config_file, text).map_err(|e| self.io("write ssh config", e))?;
        Ok(JumpFiles {
            config_file,
            known_hosts,
            pinned,
            log,
            host: jump.host.clone(),
            port: jump.port,
        })
    }

    /// A connection that failed at the bastion, from what its `ssh -W` wrote; `None`
    /// when the bastion part went well (the failure is the target's).
    async fn classify_jump(&self, jump: &JumpFiles) -> Option<TransportError> {
        let text = std::fs::read_to_string(&jump.log).unwrap_or_default();
        let lower = text.to_lowercase();
        let name = format!("{} (jump host {}:{})", self.name(), jump.host, jump.port);
        if lower.contains("host key verification failed")
            || lower.contains("identification has changed")
            || lower.contains("host key for")
        {
            let pinned = fingerprints_of_file(&jump.known_hosts).await;
            let offered = self.offered_fingerprints(&jump.host, jump.port).await;
            return Some(TransportError::HostKeyChanged {
                machine: name,
                pinned: describe_fingerprints(&pinned),
                offered: describe_fingerprints(&offered),
            });
        }
        if lower.contains("permission denied") {
            return Some(TransportError::Failed {
                machine: name,
                step: "authenticate",
                message: text.trim().to_string(),
            });
        }
        if lower.contains("connect to host") || lower.contains("could not resolve") {
            return Some(TransportError::Unreachable {
                machine: name,
                source: Some(text.trim().to_string().into()),
            });
        }
        None
    }

    async fn classify_connect(&self, e: openssh::Error, known_hosts: &Path) -> TransportError {
        let text = error_text(&e);
        let lower = text.to_lowercase();
        if lower.contains("host key verification failed")
            || lower.contains("identification has changed")
            || lower.contains("host key for")
        {
            let pinned = fingerprints_of_file(known_hosts).await;
            let target = &self.entry.target;
            let offered = self.offered_fingerprints(&target.host, target.port).await;
            return TransportError::HostKeyChanged {
                machine: self.name().to_string(),
                pinned: describe_fingerprints(&pinned),
                offered: describe_fingerprints(&offered),
            };
        }
        if lower.contains("permission denied") {
            return self.failed("authenticate", text.trim());
        }
        TransportError::Unreachable {
            machine: self.name().to_string(),
            source: Some(Box::new(e)),
        }
    }

    /// The keys the host offers now, fetched without authenticating.
    async fn offered_fingerprints(&self, host: &str, port: u16) -> Vec<Fingerprint> {
        let timeout = self
            .pool
            .options
            .connect_timeout
            .as_secs()
            .max(1)
            .to_string();
        let scan = tokio::process::Command::new("ssh-keyscan")
            .args(["-T", &timeout, "-p", &port.to_string(), host])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .await;
        let Ok(scan) = scan else { return Vec::new() };
        let Ok(mut file) = tempfile::NamedTempFile::new() else {
            return Vec::new();
        };
        if std::io::Write::write_all(&mut file, &scan.stdout).is_err() {
            return Vec::new();
        }
        fingerprints_of_file(file.path()).await
    }

    fn failed(&self, step: &'static str, message: impl Into<String>) -> TransportError {
        TransportError::Failed {
            machine: self.name().to_string(),
            step,
            message: message.into(),
        }
    }

    fn io(&self, step: &'static str, source: std::io::Error) -> TransportError {
        TransportError::Io {
            machine: self.name().to_string(),
            step,
            source,
        }
    }

    /// A failure while a command ran on an open master: a severed connection means the
    /// machine went away; anything else is a local fault.
    fn classify_exec(&self, e: openssh::Error, step: &'static str) -> TransportError {
        match e {
            openssh::Error::Disconnected
            | openssh::Error::RemoteProcessTerminated
            | openssh::Error::SshMux(_) => TransportError::Unreachable {
                machine: self.name().to_string(),
                source: Some(Box::new(e)),
            },
            other => self.failed(step, error_text(&other)),
        }
    }

    /// Forgets the master when a command found it dead, so the next call reconnects.
    async fn forget_if_dead(&self) {
        let mut slot = self.entry.conn.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.session.check().await.is_err()
        {
            *slot = None;
        }
    }

    /// After a command failed on the master: a dead master is forgotten, and so is one
    /// that still answers its control socket although the connection failed the
    /// command (severed, or the multiplexer refused it). Such a master would pass every
    /// check and fail every command, so the host looked unreachable for minutes while
    /// its sshd answered (seen in the fault campaign). It is ended, and the next command
    /// opens a fresh one.
    async fn forget_after(&self, e: &openssh::Error) {
        let mut slot = self.entry.conn.lock().await;
        let Some(conn) = slot.as_ref() else {
            return;
        };
        if conn.session.check().await.is_err() {
            *slot = None;
            return;
        }
        // A refusal by the multiplexer may be a limit (sshd's MaxSessions) while other
        // commands run on it: those are not cut for it; an idle master is replaced.
        let idle = Arc::strong_count(&conn.session) == 1;
        let wedged = match e {
            openssh::Error::Disconnected => true,
            openssh::Error::SshMux(_) => idle,
            _ => false,
        };
        if !wedged {
            return;
        }
        if let Some(conn) = slot.take() {
            tracing::debug!(machine = self.name(), error = %e, "ssh master failed a command while alive; replacing it");
            let exit = tokio::process::Command::from(self.pool.exit_master(&conn.session))
                .kill_on_drop(true)
                .status();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), exit).await;
                drop(conn);
            });
        }
    }

    async fn run(
        &self,
        script: &str,
        stdin: Option<&[u8]>,
        step: &'static str,
    ) -> Result<CommandOutput, TransportError> {
        let conn = self.conn().await?;
        match run_on(&conn.session, script, stdin).await {
            Ok(out) => Ok(out),
            Err(e) => {
                drop(conn);
                self.forget_after(&e).await;
                Err(self.classify_exec(e, step))
            }
        }
    }

    /// Runs `script`, checks it exited 0, and names `step` when it did not.
    async fn run_ok(&self, script: &str, step: &'static str) -> Result<String, TransportError> {
        let out = self.run(script, None, step).await?;
        if out.status != 0 {
            return Err(self.failed(step, format!("exit {}: {}", out.status, out.stderr.trim())));
        }
        Ok(out.stdout)
    }

    /// The ssh command line rsync uses: through the master's control socket, never a
    /// second login, never a prompt.
    fn rsync_shell(&self, conn: &Conn) -> String {
        format!(
            "ssh -F {} -S {} -o ControlMaster=no -o BatchMode=yes",
            self.pool.config_file.display(),
            conn.session.control_socket().display()
        )
    }

    async fn rsync(
        &self,
        conn: &Conn,
        from: &str,
        to: &str,
        step: &'static str,
    ) -> Result<(), TransportError> {
        let out = tokio::process::Command::new("rsync")
            .args(["-a", "--protect-args", "-e"])
            .arg(self.rsync_shell(conn))
            .arg(from)
            .arg(to)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| self.io(step, e))?;
        // 24: source files vanished while they were copied. The folder is a live job's
        // (a checkpoint or outputs synced while it runs): a temporary file renamed
        // away mid-copy is no failure, everything else was transferred.
        const VANISHED: i32 = 24;
        if !out.status.success() && out.status.code() != Some(VANISHED) {
            self.forget_if_dead().await;
            if conn.session.check().await.is_err() {
                return Err(TransportError::Unreachable {
                    machine: self.name().to_string(),
                    source: None,
                });
            }
            return Err(self.failed(
                step,
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    /// `host:path` for rsync; the host part is ignored by the master but must parse.
    fn rsync_remote(&self, path: &str) -> String {
        let host = &self.entry.target.host;
        if host.contains(':') {
            format!("[{host}]:{path}")
        } else {
            format!("{host}:{path}")
        }
    }

    async fn upload_tar(
        &self,
        conn: &Conn,
        local: &Path,
        remote: &str,
    ) -> Result<(), TransportError> {
        let step = "upload";
        if local.is_dir() {
            let mut tar = std::process::Command::new("tar")
                .arg("-C")
                .arg(local)
                .args(["-cf", "-", "."])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| self.io("start local tar", e))?;
            let Some(tar_out) = tar.stdout.take() else {
                return Err(self.failed(step, "local tar has no stdout"));
            };
            let script = format!("mkdir -p {r} && tar -C {r} -xf -", r = quote(remote));
            let remote_result =
                run_piped(&conn.session, &script, Stdio::from(tar_out), Stdio::piped()).await;
            let tar_status = tokio::task::spawn_blocking(move || tar.wait_with_output())
                .await
                .map_err(|e| self.failed(step, e.to_string()))?
                .map_err(|e| self.io("wait for local tar", e))?;
            let out = self.check_remote(remote_result, step).await?;
            if !tar_status.status.success() {
                return Err(self.failed(
                    step,
                    format!(
                        "local tar: {}",
                        String::from_utf8_lossy(&tar_status.stderr).trim()
                    ),
                ));
            }
            if out.status != 0 {
                return Err(self.failed(step, format!("remote tar: {}", out.stderr.trim())));
            }
            Ok(())
        } else {
            let file = std::fs::File::open(local).map_err(|e| self.io("open file to upload", e))?;
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                file.metadata()
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or(0o644)
            };
            // Written beside the target then renamed: a reader never sees half a file.
            let script = format!(
                "mkdir -p {dir} && cat > {tmp} && chmod {mode:o} {tmp} && mv -f {tmp} {r}",
                dir = quote(&parent_of(remote)),
                tmp = quote(&format!("{remote}.asimov-part")),
                r = quote(remote),
            );
            let result = run_piped(&conn.session, &script, Stdio::from(file), Stdio::piped()).await;
            let out = self.check_remote(result, step).await?;
            if out.status != 0 {
                return Err(self.failed(step, out.stderr.trim().to_string()));
            }
            Ok(())
        }
    }

    async fn download_tar(
        &self,
        conn: &Conn,
        remote: &str,
        local: &Path,
        is_dir: bool,
    ) -> Result<(), TransportError> {
        let step = "download";
        if is_dir {
            std::fs::create_dir_all(local).map_err(|e| self.io("create download folder", e))?;
            let mut tar = std::process::Command::new("tar")
                .arg("-C")
                .arg(local)
                .args(["-xf", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| self.io("start local tar", e))?;
            let Some(tar_in) = tar.stdin.take() else {
                return Err(self.failed(step, "local tar has no stdin"));
            };
            let script = format!("tar -C {} -cf - .", quote(remote));
            let result =
                run_piped(&conn.session, &script, Stdio::null(), Stdio::from(tar_in)).await;
            let tar_status = tokio::task::spawn_blocking(move || tar.wait_with_output())
                .await
                .map_err(|e| self.failed(step, e.to_string()))?
                .map_err(|e| self.io("wait for local tar", e))?;
            let out = self.check_remote(result, step).await?;
            if out.status != 0 {
                return Err(self.failed(step, format!("remote tar: {}", out.stderr.trim())));
            }
            if !tar_status.status.success() {
                return Err(self.failed(
                    step,
                    format!(
                        "local tar: {}",
                        String::from_utf8_lossy(&tar_status.stderr).trim()
                    ),
                ));
            }
            Ok(())
        } else {
            if let Some(parent) = local.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| self.io("create download folder", e))?;
            }
            let part = local.with_extension("asimov-part");
            let file = std::fs::File::create(&part).map_err(|e| self.io("create local file", e))?;
            let result = run_piped(
                &conn.session,
                &format!("cat {}", quote(remote)),
                Stdio::null(),
                Stdio::from(file),
            )
            .await;
            let out = self.check_remote(result, step).await?;
            if out.status != 0 {
                let _ = std::fs::remove_file(&part);
                return Err(self.failed(step, out.stderr.trim().to_string()));
            }
            std::fs::rename(&part, local).map_err(|e| self.io("move downloaded file", e))?;
            Ok(())
        }
    }

    async fn check_remote(
        &self,
        result: Result<CommandOutput, openssh::Error>,
        step: &'static str,
    ) -> Result<CommandOutput, TransportError> {
        match result {
            Ok(out) => Ok(out),
            Err(e) => {
                self.forget_if_dead().await;
                Err(self.classify_exec(e, step))
            }
        }
    }

    /// `~` and `~/x` resolved against the remote `$HOME`; other paths unchanged.
    fn resolve(&self, conn: &Conn, path: &str) -> String {
        if path == "~" {
            conn.remote_home.clone()
        } else if let Some(rest) = path.strip_prefix("~/") {
            format!("{}/{rest}", conn.remote_home.trim_end_matches('/'))
        } else {
            path.to_string()
        }
    }

    /// A live stream of `remote_file`'s content from its start, following growth and
    /// rotation (`tail -F`). Dropping the stream ends the remote `tail`.
    pub async fn follow_file(
        &self,
        remote_file: &str,
    ) -> Result<ByteStream<'static>, TransportError> {
        let conn = self.conn().await?;
        let path = self.resolve(&conn, remote_file);
        // The remote tail is killed when our end of stdin closes, i.e. when the stream
        // is dropped; otherwise a quiet file would keep it alive for ever.
        let script = format!(
            "tail -c +1 -F {} 2>/dev/null & t=$!; cat >/dev/null; kill $t 2>/dev/null",
            quote(&path)
        );
        let mut child = Session::to_command(conn.session.clone(), "sh")
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .await
            .map_err(|e| self.classify_exec(e, "follow"))?;
        let stdin = child.stdin().take();
        let Some(stdout) = child.stdout().take() else {
            return Err(self.failed("follow", "no stdout from remote tail"));
        };
        let machine = self.name().to_string();
        let state = Some((stdout, stdin, child));
        let stream = futures_util::stream::unfold(state, move |state| {
            let machine = machine.clone();
            async move {
                let (mut stdout, stdin, child) = state?;
                let mut buf = vec![0u8; 16 * 1024];
                match stdout.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(buf), Some((stdout, stdin, child))))
                    }
                    // One error, then the stream ends (dropping stdin ends the tail).
                    Err(source) => Some((
                        Err(TransportError::Io {
                            machine,
                            step: "follow",
                            source,
                        }),
                        None,
                    )),
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

#[async_trait]
impl Transport for SshTransport {
    fn machine(&self) -> &str {
        self.name()
    }

    /// `ssh -tt` through the live master's control socket: the pinned host key and the
    /// key that opened the master, never a second login, never a prompt.
    async fn interactive(&self, script: &str) -> Result<std::process::Command, TransportError> {
        let conn = self.conn().await?;
        let mut cmd = std::process::Command::new("ssh");
        cmd.arg("-F")
            .arg(&self.pool.config_file)
            .arg("-S")
            .arg(conn.session.control_socket())
            .args(["-o", "ControlMaster=no", "-tt", "asimov-master"])
            .arg(script);
        Ok(cmd)
    }

    async fn exec(&self, script: &str) -> Result<CommandOutput, TransportError> {
        self.run(script, None, "exec").await
    }

    async fn exec_with_stdin(
        &self,
        script: &str,
        stdin: &[u8],
    ) -> Result<CommandOutput, TransportError> {
        self.run(script, Some(stdin), "exec").await
    }

    async fn upload(&self, local: &Path, remote: &str) -> Result<(), TransportError> {
        let meta = std::fs::metadata(local).map_err(|e| self.io("read file to upload", e))?;
        let conn = self.conn().await?;
        let remote = self.resolve(&conn, remote);
        if self.pool.options.use_rsync && self.pool.local_rsync && conn.remote_rsync {
            let from = if meta.is_dir() {
                self.run_ok(&format!("mkdir -p {}", quote(&remote)), "upload")
                    .await?;
                format!("{}/", local.display())
            } else {
                self.run_ok(
                    &format!("mkdir -p {}", quote(&parent_of(&remote))),
                    "upload",
                )
                .await?;
                local.display().to_string()
            };
            let to = if meta.is_dir() {
                format!("{}/", remote.trim_end_matches('/'))
            } else {
                remote.clone()
            };
            self.rsync(&conn, &from, &self.rsync_remote(&to), "upload")
                .await
        } else {
            self.upload_tar(&conn, local, &remote).await
        }
    }

    async fn download(&self, remote: &str, local: &Path) -> Result<(), TransportError> {
        let conn = self.conn().await?;
        let remote = self.resolve(&conn, remote);
        let kind = self
            .run_ok(
                &format!(
                    "if [ -d {r} ]; then echo dir; elif [ -e {r} ]; then echo file; else echo missing; fi",
                    r = quote(&remote)
                ),
                "download",
            )
            .await?;
        let is_dir = match kind.trim() {
            "dir" => true,
            "file" => false,
            _ => return Err(self.failed("download", format!("{remote}: no such file or folder"))),
        };
        if self.pool.options.use_rsync && self.pool.local_rsync && conn.remote_rsync {
            if is_dir {
                std::fs::create_dir_all(local).map_err(|e| self.io("create download folder", e))?;
                let from = self.rsync_remote(&format!("{}/", remote.trim_end_matches('/')));
                self.rsync(&conn, &from, &format!("{}/", local.display()), "download")
                    .await
            } else {
                if let Some(parent) = local.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| self.io("create download folder", e))?;
                }
                let from = self.rsync_remote(&remote);
                self.rsync(&conn, &from, &local.display().to_string(), "download")
                    .await
            }
        } else {
            self.download_tar(&conn, &remote, local, is_dir).await
        }
    }

    async fn follow<'a>(&'a self, remote_file: &str) -> Result<ByteStream<'a>, TransportError> {
        self.follow_file(remote_file).await
    }
}

/// Runs `sh -c script` on the master, with optional stdin bytes, collecting output.
async fn run_on(
    session: &Arc<Session>,
    script: &str,
    stdin: Option<&[u8]>,
) -> Result<CommandOutput, openssh::Error> {
    let mut cmd = Session::to_command(session.clone(), "sh");
    cmd.arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match stdin {
        None => {
            cmd.stdin(Stdio::null());
            let out = cmd.output().await?;
            Ok(to_output(out))
        }
        Some(bytes) => {
            cmd.stdin(Stdio::piped());
            let mut child = cmd.spawn().await?;
            let input = child.stdin().take();
            // Written while the output is read, so a chatty command cannot deadlock us.
            let write = async move {
                if let Some(mut input) = input {
                    // A command that exits without reading all of stdin is not an error.
                    let _ = input.write_all(bytes).await;
                    let _ = input.shutdown().await;
                }
            };
            let (_, out) = tokio::join!(write, child.wait_with_output());
            Ok(to_output(out?))
        }
    }
}

/// Runs `sh -c script` with its stdin and stdout connected straight to local files or
/// pipes (uploads feed stdin, downloads take stdout); stderr is captured.
async fn run_piped(
    session: &Arc<Session>,
    script: &str,
    stdin: Stdio,
    stdout: Stdio,
) -> Result<CommandOutput, openssh::Error> {
    let out = Session::to_command(session.clone(), "sh")
        .arg("-c")
        .arg(script)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .await?;
    Ok(to_output(out))
}

fn to_output(out: std::process::Output) -> CommandOutput {
    use std::os::unix::process::ExitStatusExt;
    let status = match (out.status.code(), out.status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    };
    CommandOutput {
        status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An error and its causes on one line, for messages and for classification.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One key's fingerprint as `ssh-keygen -l` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    /// `SHA256:...`
    hash: String,
    /// `ED25519`, `RSA`, ...
    kind: String,
}

/// Fingerprints of every key in a known_hosts-format file; empty when unreadable.
async fn fingerprints_of_file(path: &Path) -> Vec<Fingerprint> {
    let out = tokio::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .await;
    let Ok(out) = out else { return Vec::new() };
    parse_fingerprints(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `256 SHA256:abc [host]:port (ED25519)` lines.
fn parse_fingerprints(text: &str) -> Vec<Fingerprint> {
    text.lines()
        .filter_map(|line| {
            let hash = line.split_whitespace().find(|w| w.starts_with("SHA256:"))?;
            let kind = line
                .rsplit_once('(')
                .and_then(|(_, k)| k.strip_suffix(')'))
                .unwrap_or("?");
            Some(Fingerprint {
                hash: hash.to_string(),
                kind: kind.to_string(),
            })
        })
        .collect()
}

fn describe_fingerprints(fps: &[Fingerprint]) -> String {
    if fps.is_empty() {
        return "(unknown)".to_string();
    }
    fps.iter()
        .map(|f| format!("{} ({})", f.hash, f.kind))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A machine name made safe as a file name (`fleet/host` → `fleet_host`).
fn file_name(machine: &str) -> String {
    machine
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        // Never `.` or `..`, nor a hidden file.
        .replacen('.', "_", usize::from(machine.starts_with('.')))
}

/// `s` as one ssh_config argument: double-quoted (for spaces), `%` doubled (tokens).
fn config_word(s: &str) -> String {
    format!("\"{}\"", s.replace('%', "%%"))
}

/// Quotes `s` as one POSIX shell word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn parent_of(path: &str) -> String {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) => "/".to_string(),
        Some((parent, _)) => parent.to_string(),
        None => ".".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_from_ssh_keygen_output() {
        let text = "256 SHA256:AbC+/1 [127.0.0.1]:2222 (ED25519)\n3072 SHA256:XyZ host (RSA)\n";
        assert_eq!(
            parse_fingerprints(text),
            vec![
                Fingerprint {
                    hash: "SHA256:AbC+/1".into(),
                    kind: "ED25519".into()
                },
                Fingerprint {
                    hash: "SHA256:XyZ".into(),
                    kind: "RSA".into()
                },
            ]
        );
    }

    #[test]
    fn machine_names_become_safe_file_names() {
        assert_eq!(file_name("lab/gpu-1"), "lab_gpu-1");
        assert_eq!(file_name("../x"), "_._x");
        assert_eq!(file_name(".."), "_.");
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a'b"), "'a'\\''b'");
        assert_eq!(parent_of("/a/b/c"), "/a/b");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("a"), ".");
    }
}
