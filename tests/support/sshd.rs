//! A real OpenSSH server (`/usr/sbin/sshd`) for tests, standing in for one remote host.
//!
//! Each `Sshd` lives in its own temp dir: config, a freshly generated ed25519 host key,
//! a generated client key in its `authorized_keys`, its log, and a `home/` folder that
//! becomes `$HOME` of every session, so two servers on one machine behave as two hosts
//! with separate state even though they log in the same user. `start_sharing_home` gives
//! two servers one `$HOME`, as an NFS home does on a cluster; what stays per server is
//! what is per host there: the host key and the tmux socket folder (`TMUX_TMPDIR`, a
//! host's own `/tmp`). Both servers see this machine's `/etc/machine-id` and hostname.
//! It runs as the current user (root here, hence `PermitRootLogin prohibit-password`,
//! `StrictModes no`, `UsePAM no`). Dropping it kills the server and its sessions.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    dir: tempfile::TempDir,
    host: String,
    /// `$HOME` of its sessions: `dir/home`, or a folder shared with another server.
    home: PathBuf,
    log_level: &'static str,
    port: u16,
    user: String,
    child: Option<Child>,
}

impl Sshd {
    /// Starts a server, installing OpenSSH with `scripts/install-test-deps.sh` first if
    /// it is missing. `None` (after a loud message) only when it cannot be installed.
    pub fn start_or_skip() -> Option<Sshd> {
        if !ensure_installed() {
            eprintln!(
                "\n!!!!!!!! SKIPPED: {SSHD} is not installed and scripts/install-test-deps.sh \
                 could not install it; the ssh tests did not run !!!!!!!!\n"
            );
            return None;
        }
        Some(Sshd::start())
    }

    /// Starts a server on a free localhost port; panics when it does not come up.
    pub fn start() -> Sshd {
        Sshd::start_with(None, "VERBOSE")
    }

    /// Starts a server that logs at `DEBUG1`, which names every forwarded connection
    /// (`server_request_direct_tcpip: ... target 127.0.0.1 port N`): a bastion whose log proves a jump.
    pub fn start_bastion() -> Sshd {
        Sshd::start_with(None, "DEBUG1")
    }

    /// Starts a server whose sessions see `home` as `$HOME` (the caller keeps the folder;
    /// give the same one to several servers for hosts sharing an NFS home).
    pub fn start_sharing_home(home: &Path) -> Sshd {
        Sshd::start_with(Some(home.to_path_buf()), "VERBOSE")
    }

    /// Starts a server on port 22 of a fresh loopback address (127.x.y.z), as a cloud
    /// VM's sshd listens, when this process may bind port 22 (root); else on a free
    /// port of 127.0.0.1. Callers read `host()` and `port()` either way.
    pub fn start_on_port_22() -> Sshd {
        for _ in 0..50 {
            let n = random_u32();
            let host = format!(
                "127.{}.{}.{}",
                (n >> 16) % 250 + 1,
                (n >> 8) % 250 + 1,
                n % 250 + 2
            );
            if TcpListener::bind((host.as_str(), 22)).is_ok() {
                return Sshd::start_at(None, "VERBOSE", &host, 22);
            }
        }
        Sshd::start()
    }

    fn start_with(home: Option<PathBuf>, log_level: &'static str) -> Sshd {
        Sshd::start_at(home, log_level, "127.0.0.1", free_port())
    }

    fn start_at(home: Option<PathBuf>, log_level: &'static str, host: &str, port: u16) -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("asimov-sshd-")
            .tempdir()
            .expect("temp dir for sshd");
        let user = current_user();
        let home = home.unwrap_or_else(|| dir.path().join("home"));
        std::fs::create_dir_all(&home).expect("sshd home");
        std::fs::create_dir_all(dir.path().join("tmux")).expect("sshd tmux dir");
        keygen(&dir.path().join("ssh_host_ed25519_key"));
        keygen(&dir.path().join("client_key"));
        let public = std::fs::read(dir.path().join("client_key.pub")).expect("client key");
        std::fs::write(dir.path().join("authorized_keys"), public).expect("authorized_keys");
        // Privilege separation needs this folder when sshd starts as root.
        if is_root() {
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let mut sshd = Sshd {
            dir,
            host: host.to_string(),
            home,
            log_level,
            port,
            user,
            child: None,
        };
        sshd.write_config();
        sshd.spawn();
        sshd
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The private key whose public half is authorized.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// Puts an executable `name` with `script` (sh) first on this host's `PATH`, e.g. an
    /// `nvidia-smi` that reports this host's GPUs.
    pub fn install_command(&self, name: &str, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("sshd bin folder");
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write command");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// `$HOME` of every session on this server: this "host"'s own state.
    pub fn home(&self) -> PathBuf {
        self.home.clone()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's log (`sshd -e`), appended across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// How many SSH connections have authenticated so far: one per master connection.
    pub fn logins(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// `SHA256:...` of the current host key.
    pub fn host_key_fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.dir.path().join("ssh_host_ed25519_key.pub"))
            .output()
            .expect("ssh-keygen -lf");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .nth(1)
            .expect("fingerprint in ssh-keygen output")
            .to_string()
    }

    /// A fleet host entry pointing at this server.
    pub fn fleet_host(&self, name: &str, gpus: u32) -> asimov::manifest::Host {
        asimov::manifest::Host {
            name: name.to_string(),
            user: Some(self.user.clone()),
            address: self.host().to_string(),
            port: self.port,
            identity_file: Some(self.client_key()),
            proxy_jump: None,
            gpus,
            labels: Default::default(),
        }
    }

    /// Kills the server and every session it forked; returns once the port is closed.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            // Sessions are forked children that call setsid(), so a process group kill
            // would miss them; walk the process tree instead.
            for p in descendants(pid) {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((self.host.as_str(), self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "sshd port {} stays open",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port with the same keys.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Replaces the host key (as a reinstalled machine would) and restarts the server.
    pub fn regenerate_host_key(&mut self) {
        let key = self.dir.path().join("ssh_host_ed25519_key");
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(key.with_extension("pub"));
        keygen(&key);
        let was_running = self.is_running();
        self.stop();
        if was_running {
            self.spawn();
        }
    }

    fn write_config(&self) {
        let d = self.dir.path().display();
        let config = format!(
            "Port {port}\n\
             ListenAddress {host}\n\
             HostKey {d}/ssh_host_ed25519_key\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             UsePAM no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PrintMotd no\n\
             LogLevel {log_level}\n\
             Subsystem sftp internal-sftp\n\
             SetEnv HOME={home} TMUX_TMPDIR={d}/tmux \
             PATH={d}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
            port = self.port,
            host = self.host,
            home = self.home.display(),
            log_level = self.log_level,
        );
        std::fs::write(self.dir.path().join("sshd_config"), config).expect("sshd_config");
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sshd.log"))
            .expect("sshd log");
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sshd");
        self.child = Some(child);
        // Ready when the server sends its banner.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect((self.host.as_str(), self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"SSH-" {
                    return;
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("sshd exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not come up on port {}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            for p in descendants(pid) {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = child.wait();
        }
        // Jobs started over ssh detach (tmux, setsid) and outlive their session; they
        // carry this "host"'s HOME, which is how a failed test's leftovers are found.
        for p in processes_with_env(&format!("HOME={}", self.home().display())) {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

/// Pids of processes whose environment holds exactly `entry` (`KEY=value`).
pub fn processes_with_env(entry: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|kv| kv == entry.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// True when sshd is present, after trying the project's install script once.
fn ensure_installed() -> bool {
    if Path::new(SSHD).exists() {
        return true;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-test-deps.sh");
    let _ = Command::new("sh").arg(script).status();
    Path::new(SSHD).exists()
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "asimov-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen failed for {}", path.display());
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    u32::from_le_bytes(bytes)
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every process below `root` in the process tree, read from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The command name is in parentheses and may hold spaces; fields follow it.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        for (child, parent) in &parents {
            if *parent == p && !found.contains(child) {
                found.push(*child);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}
