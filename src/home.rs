//! The layout of `$ASIMOV_HOME` (default `~/.asimov`): one place that names every path,
//! so no other module builds one by hand.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$ASIMOV_HOME`, else `~/.asimov`.
    pub fn from_env() -> io::Result<Home> {
        if let Some(dir) = std::env::var_os("ASIMOV_HOME").filter(|v| !v.is_empty()) {
            return Ok(Home::at(PathBuf::from(dir)));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .ok_or_else(|| io::Error::other("neither ASIMOV_HOME nor HOME is set"))?;
        Ok(Home::at(PathBuf::from(home).join(".asimov")))
    }

    pub fn at(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The watched desired state.
    pub fn manifests(&self) -> PathBuf {
        self.root.join("manifests")
    }

    pub fn database(&self) -> PathBuf {
        self.root.join("state.db")
    }

    /// Credentials (API keys, tokens), each a file of mode 0600.
    pub fn credentials(&self) -> PathBuf {
        self.root.join("credentials")
    }

    /// Pinned SSH host keys, one file per machine.
    pub fn known_hosts(&self) -> PathBuf {
        self.root.join("known_hosts")
    }

    /// asimov's own SSH key pair for cloud instances (`id_ed25519`, `.pub`), 0600.
    pub fn ssh_identity(&self) -> PathBuf {
        self.root.join("ssh").join("id_ed25519")
    }

    /// What a provider keeps between controller runs (`vast`, ...).
    pub fn provider_state(&self, provider: &str) -> PathBuf {
        self.root.join("providers").join(provider)
    }

    /// Folders of `local` provider instances.
    pub fn local_instances(&self) -> PathBuf {
        self.root.join("local")
    }

    /// Logs of finished runs, kept after their instance is gone.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn run_log(&self, run: &str) -> PathBuf {
        self.logs().join(format!("{run}.log"))
    }

    /// Checkpoints pulled back from instances, `checkpoints/<run>/<seq>/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Outputs pulled back from instances, `artifacts/<run>/`.
    pub fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    pub fn controller_lock(&self) -> PathBuf {
        self.root.join("controller.lock")
    }

    pub fn controller_pid(&self) -> PathBuf {
        self.root.join("controller.pid")
    }

    /// The manifests folder the running controller watches (written at its start).
    pub fn controller_manifests(&self) -> PathBuf {
        self.root.join("controller.manifests")
    }

    pub fn controller_log(&self) -> PathBuf {
        self.root.join("controller.log")
    }

    /// The `asimov` prompt's last answers, its next defaults.
    pub fn prompt_answers(&self) -> PathBuf {
        self.root.join("prompt.json")
    }

    /// Creates the folders a controller or CLI needs, each 0700, and makes an existing
    /// home private ([`Home::tighten`]); idempotent.
    pub fn ensure(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.manifests(),
            self.logs(),
            self.artifacts(),
            self.credentials(),
            self.known_hosts(),
        ] {
            std::fs::create_dir_all(&dir)?;
            set_mode(&dir, 0o700)?;
        }
        self.tighten();
        Ok(())
    }

    /// Takes group and other permissions off the home, the files and folders at its
    /// top (the store and its `-wal`/`-shm`, `controller.log`, `local/`, ...) and the
    /// kept logs: a home made by an older asimov, or under a lax umask, becomes private.
    /// Best effort (a file of another owner is left as it is); job files inside
    /// `local/` and `artifacts/` are left alone, the folders above them are 0700.
    pub fn tighten(&self) {
        let strip = |path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::symlink_metadata(path)
                && !meta.file_type().is_symlink()
                && meta.permissions().mode() & 0o077 != 0
            {
                let _ = set_mode(path, meta.permissions().mode() & 0o7700);
            }
        };
        strip(&self.root);
        for dir in [self.root.clone(), self.logs()] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                strip(&entry.path());
            }
        }
    }

    /// The identity of this home's controller in ownership tags: random, made once.
    pub fn controller_id(&self) -> io::Result<String> {
        let path = self.root.join("controller-id");
        match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&self.root)?;
        let id = random_id();
        // Write-then-link: two processes racing both end up reading one winner's id.
        let tmp = tempfile::NamedTempFile::new_in(&self.root)?;
        std::fs::write(tmp.path(), &id)?;
        match tmp.persist_noclobber(&path) {
            Ok(_) => Ok(id),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                Ok(std::fs::read_to_string(&path)?.trim().to_string())
            }
            Err(e) => Err(e.error),
        }
    }
}

/// Eight lowercase base-36 characters from the OS's randomness.
fn random_id() -> String {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// The umask the user's shell gave asimov, kept when the CLI tightens its own to 077;
/// `u32::MAX` while unset. Jobs on this machine get it back (see `LocalTransport`).
static USER_UMASK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// Carries the user's umask to the background controller, whose own is already 077.
const USER_UMASK_ENV: &str = "ASIMOV_USER_UMASK";

/// Makes every file this process creates private from now on (umask 077), remembering
/// the user's umask for the jobs it starts (from a parent asimov when there is one).
/// Call before any thread starts.
pub fn private_umask() {
    // SAFETY: umask only swaps the process's file mode mask.
    #[allow(clippy::useless_conversion)] // mode_t is u16 on some Unixes
    let mut user = u32::from(unsafe { libc::umask(0o077) });
    match std::env::var(USER_UMASK_ENV)
        .ok()
        .and_then(|v| u32::from_str_radix(&v, 8).ok())
        .filter(|m| *m <= 0o777)
    {
        Some(inherited) => user = inherited,
        // SAFETY: called first thing in `main`, before any thread exists.
        None => unsafe { std::env::set_var(USER_UMASK_ENV, format!("{user:04o}")) },
    }
    USER_UMASK.store(user, std::sync::atomic::Ordering::Relaxed);
}

/// The user's umask when [`private_umask`] replaced it.
pub fn user_umask() -> Option<libc::mode_t> {
    let mask = USER_UMASK.load(std::sync::atomic::Ordering::Relaxed);
    libc::mode_t::try_from(mask).ok().filter(|m| *m <= 0o777)
}

/// Sets a path's Unix permission bits.
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Writes a file readable only by its owner (mode 0600), atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?; // created 0600
    tmp.write_all(contents)?;
    tmp.persist(path).map_err(|e| e.error)?;
    set_mode(path, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_id_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let a = home.controller_id().unwrap();
        assert_eq!(a.len(), 8);
        assert_eq!(home.controller_id().unwrap(), a);
    }

    #[test]
    fn private_files_are_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_private(&path, b"x").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
