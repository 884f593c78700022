//! What the cloud providers (`vast`, `lambda`, `runpod`) share: the API key from the
//! credential store, the base URL override, asimov's own SSH key per home, request
//! pacing shared by every run of this process, and the short form of an error body.
//! Each provider keeps its own classification of answers; this holds no provider's facts.
//!
//! Must not know about the store or the planner.

use crate::home::Home;
use crate::model::Secret;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// The API key `name`: the credential store first, then this process's environment
/// (a foreground controller).
pub fn api_key(home: &Home, name: &str) -> Option<Secret> {
    let stored = std::fs::read_to_string(home.credentials().join(name))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    stored
        .or_else(|| {
            std::env::var(name)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .map(Secret::new)
}

/// The API base from `env` when set, else `default`; without a trailing `/`.
pub fn api_url(env: &str, default: &str) -> String {
    std::env::var(env)
        .ok()
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// A pacing factor from `env` (`0` disables pacing), else 1.
pub fn pacing_factor(env: &str) -> f64 {
    std::env::var(env)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 0.0)
        .unwrap_or(1.0)
}

/// The first line of an HTML page's `<title>`, or the first 200 characters of a body.
pub fn short_body(text: &str) -> String {
    if let Some(start) = text.find("<title>")
        && let Some(end) = text[start..].find("</title>")
    {
        return text[start + 7..start + end].trim().to_string();
    }
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

/// `Retry-After` in seconds (the only form the clouds send), capped at an hour.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(3600)))
}

/// An HTTP client with asimov's timeouts and user agent, over rustls.
pub fn http_client() -> std::io::Result<reqwest::Client> {
    // reqwest is built without a crypto provider of its own; ring is ours. A second
    // install (another provider did it first) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(request_timeout())
        .user_agent(concat!("asimov/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(std::io::Error::other)
}

/// How long one request may take: 60 s, or `ASIMOV_HTTP_TIMEOUT` seconds (the fault
/// campaign shortens it so that its held answers are real client timeouts).
fn request_timeout() -> Duration {
    std::env::var("ASIMOV_HTTP_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(60), Duration::from_secs_f64)
}

/// Hands out call slots so that calls of one class keep their minimum gap, whatever
/// task makes them: the one place all runs' requests to one cloud queue. A slot is
/// reserved in order; then, because a task may wake late (a loaded machine), the gap is
/// checked again against when the previous call of the class really left.
pub struct Pacer<K: Ord + Copy> {
    gaps: Mutex<BTreeMap<K, Duration>>,
    next: Mutex<BTreeMap<K, tokio::time::Instant>>,
    sent: Mutex<BTreeMap<K, tokio::time::Instant>>,
}

impl<K: Ord + Copy> Pacer<K> {
    pub fn new(gaps: BTreeMap<K, Duration>) -> Pacer<K> {
        Pacer {
            gaps: Mutex::new(gaps),
            next: Mutex::new(BTreeMap::new()),
            sent: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn gap(&self, call: K) -> Duration {
        self.gaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&call)
            .copied()
            .unwrap_or_default()
    }

    /// Replaces the gap of `call` (a server announced its quota).
    pub fn set_gap(&self, call: K, gap: Duration) {
        self.gaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(call, gap);
    }

    /// Waits for the next slot of `call`.
    pub async fn wait(&self, call: K) {
        let gap = self.gap(call);
        if gap.is_zero() {
            return;
        }
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            let slot = next.entry(call).or_insert(now);
            let at = (*slot).max(now);
            *slot = at + gap;
            at
        };
        tokio::time::sleep_until(at).await;
        loop {
            let later = {
                let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
                let now = tokio::time::Instant::now();
                match sent.get(&call) {
                    Some(last) if now < *last + gap => Some(*last + gap),
                    _ => {
                        sent.insert(call, now);
                        None
                    }
                }
            };
            match later {
                Some(t) => tokio::time::sleep_until(t).await,
                None => return,
            }
        }
    }

    /// Pushes every slot of `call` back by `by` (the server said "too many").
    pub fn back_off(&self, call: K, by: Duration) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        let slot = next.entry(call).or_insert(now);
        *slot = (*slot).max(now + by);
    }
}

/// The pair of files of asimov's own SSH key, made on first use; returns the public key.
pub fn ensure_identity(path: &Path) -> std::io::Result<String> {
    let public = path.with_extension("pub");
    if !path.exists() || !public.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            crate::home::set_mode(dir, 0o700)?;
        }
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(&public);
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "asimov", "-f"])
            .arg(path)
            .stdin(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    crate::home::set_mode(path, 0o600)?;
    Ok(std::fs::read_to_string(&public)?.trim().to_string())
}

/// `ssh-ed25519 AAAA...` without the comment, to compare keys.
pub fn key_body(key: &str) -> String {
    key.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// Login users asked for by placements (`ssh_user`), by tag: one file per tag, written
/// before the create, so a controller restarted mid-create adopts with the right user.
pub struct LoginUsers {
    dir: std::path::PathBuf,
    default: String,
    cache: Mutex<BTreeMap<String, String>>,
}

impl LoginUsers {
    pub fn new(dir: std::path::PathBuf, default: impl Into<String>) -> LoginUsers {
        LoginUsers {
            dir,
            default: default.into(),
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records `user` for `tag` (before the create call).
    pub fn remember(&self, tag: &str, user: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join(tag), user)?;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag.to_string(), user.to_string());
        Ok(())
    }

    /// The user for `tag`: the placement's, else the provider's default.
    pub fn get(&self, tag: &str) -> String {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = cache.get(tag) {
            return u.clone();
        }
        let stored = std::fs::read_to_string(self.dir.join(tag))
            .ok()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty());
        match stored {
            Some(u) => {
                cache.insert(tag.to_string(), u.clone());
                u
            }
            None => self.default.clone(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One thing a catalog cloud (Lambda's instance types, RunPod's GPU types) would rent
/// now, in the shape `asimov offers` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogOffer {
    /// The instance-type id (Lambda) or GPU-type id (RunPod): what a placement names.
    pub id: String,
    pub gpu: String,
    pub count: u32,
    /// Per GPU, when the catalog says.
    pub vram_gb: Option<f64>,
    pub price_per_hour: f64,
    /// Where it is available now (Lambda regions with capacity); empty when unknown.
    pub regions: Vec<String>,
    pub available: bool,
}

/// Cheapest first, then by id: the order `asimov offers` shows.
pub fn sort_offers(offers: &mut [CatalogOffer]) {
    offers.sort_by(|a, b| {
        a.price_per_hour
            .partial_cmp(&b.price_per_hour)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.id.cmp(&b.id))
    });
}

/// The SSH transport to a cloud instance's listed endpoint, over the provider's shared
/// pool (one master per instance, named `<provider>-<id>`), and the instance folder on
/// it. `Transient` while the listing gives no SSH endpoint yet (`not_yet` says why).
pub fn ssh_transport(
    pool: &std::sync::Arc<crate::transport::ssh::SshPool>,
    instance: &super::Instance,
    step: &'static str,
    not_yet: &str,
) -> super::ProviderResult<(crate::transport::ssh::SshTransport, String)> {
    let Some(super::Endpoint::Ssh {
        host,
        port,
        user,
        identity_file,
        root,
    }) = &instance.endpoint
    else {
        return Err(super::ProviderError::new(
            instance.provider,
            super::ErrorKind::Transient,
            step,
            format!("{} {not_yet}", instance.id),
        ));
    };
    let transport = pool.transport(crate::transport::ssh::SshTarget {
        machine: format!("{}-{}", instance.provider, instance.id),
        host: host.clone(),
        port: *port,
        user: Some(user.clone()),
        identity_file: identity_file.clone(),
        jump: None,
    });
    Ok((transport, root.clone()))
}

/// Which errors a cloud call may retry in place (through `retry::retry_transient`),
/// with the server's hint: a transient failure or a rate limit.
pub fn transient(e: &super::ProviderError) -> Option<Option<Duration>> {
    match e.kind {
        super::ErrorKind::Transient => Some(None),
        super::ErrorKind::RateLimited { retry_after } => Some(retry_after),
        _ => None,
    }
}

/// Which errors a create may retry in place: only a rate limit, which surely refused
/// the call (a transient failure may have created the instance).
pub fn refused(e: &super::ProviderError) -> Option<Option<Duration>> {
    match e.kind {
        super::ErrorKind::RateLimited { retry_after } => Some(retry_after),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_body_takes_html_titles_and_cuts_long_text() {
        assert_eq!(
            short_body("<html><head><title>502 Bad Gateway</title></head></html>"),
            "502 Bad Gateway"
        );
        let long = "x".repeat(300);
        assert_eq!(short_body(&long).len(), 203);
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_calls_of_one_class() {
        let pacer = Pacer::new(BTreeMap::from([(1u8, Duration::from_secs(10))]));
        let t0 = tokio::time::Instant::now();
        pacer.wait(1).await;
        pacer.wait(1).await;
        pacer.wait(2).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        pacer.back_off(1, Duration::from_secs(30));
        pacer.wait(1).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(40));
    }
}
