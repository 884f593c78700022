//! What the cloud providers (`vast`, `lambda`, `runpod`) share: the API key from the
//! credential store, the base URL override, asimov's own SSH key per home, request
//! pacing shared by every run of this process, and the short form of an error body.
//! Each provider keeps its own classification of answers; this holds no provider's facts.
//!
//! Must not know about the store or the planner.

use crate::agent::AgentError;
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

/// How long an instance's end hook waits for the controller to collect the run before
/// ending the instance anyway: `env` in seconds, else five minutes.
pub fn self_end_grace(env: &str) -> Duration {
    super::seconds_env(env, Duration::from_secs(300))
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

/// What `nvidia-smi -L` lists on the machine behind `transport` (one exec), or that it
/// has none: a rented instance's GPUs, checked before its job starts.
pub async fn probe_gpus(
    transport: &dyn crate::transport::Transport,
) -> Result<crate::agent::GpuProbe, crate::agent::AgentError> {
    use crate::agent::{AgentError, GpuProbe};
    let step = "check the gpus";
    let out = transport
        .exec(
            "if command -v nvidia-smi >/dev/null 2>&1; then \
             nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true; else echo none; fi",
        )
        .await
        .map_err(|source| AgentError::Transport {
            machine: transport.machine().to_string(),
            step,
            source,
        })?;
    let text = out.stdout.trim();
    if text == "none" {
        return Ok(GpuProbe::NoNvidiaSmi);
    }
    text.parse::<u32>()
        .map(GpuProbe::Shows)
        .map_err(|_| AgentError::Failed {
            machine: transport.machine().to_string(),
            step,
            message: format!("unexpected answer {text:?}"),
        })
}

/// The machine for a cloud instance: the agent at `root` over `transport`, no more.
pub fn agent_machine(
    transport: crate::transport::ssh::SshTransport,
    root: String,
) -> std::sync::Arc<dyn crate::agent::Machine> {
    std::sync::Arc::new(CloudMachine::new(std::sync::Arc::new(transport), root))
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

/// How an instance ends itself through its cloud's API when its run is over: the one
/// mechanism behind every cloud's self-termination. The agent runs `on_end.sh ROOT`
/// detached when the job ends or `max_duration` hits (`agent.sh`); that hook waits until
/// the controller collected the run (`collected`) or `grace` passed without it, then
/// makes this call, retrying until the cloud confirms the instance gone.
///
/// The key is an `Authorization: Bearer ...` line in the 0600 file `.NAME_auth` of the
/// instance folder: handed over by the controller through stdin ([`install_end_hook`]),
/// or written on the machine by `find_key` from where the cloud puts the instance's own
/// key. curl reads the header from that file (`-H @file`), wget from a 0600 `WGETRC`,
/// python from the file: never a command line or an environment.
#[derive(Debug, Clone)]
pub struct SelfEnd {
    /// Names the hook's files: `.NAME_auth`, `.NAME_wgetrc`, `.NAME_answer`.
    pub name: &'static str,
    pub method: &'static str,
    pub url: String,
    /// The JSON body sent (no secret: ids only).
    pub body: String,
    /// An extended regular expression: a 2xx answer whose body matches did not end it.
    pub refused_in_ok: &'static str,
    pub grace: Duration,
    /// Shell run on the machine when no key was handed over: writes the header line to
    /// `"$auth"` (umask 077 is in force) if the machine has a key of its own.
    pub find_key: Option<String>,
}

impl SelfEnd {
    /// The hook `on_end.sh`.
    pub fn script(&self) -> String {
        let q = crate::agent::sh_quote;
        let (name, method, url, data, refused) = (
            self.name,
            q(self.method),
            q(&self.url),
            q(&self.body),
            q(self.refused_in_ok),
        );
        let grace = self.grace.as_secs();
        let find_key = self.find_key.as_deref().unwrap_or(":");
        format!(
            r#"#!/bin/sh
# Written by asimov's {name} provider: ends this instance when its run is over.
umask 077
root=$1
method={method}
url={url}
data={data}
grace={grace}
auth="$root/.{name}_auth"
wgetrc="$root/.{name}_wgetrc"
body="$root/.{name}_answer"
t0=$(date +%s)
while [ ! -e "$root/collected" ] && [ $(($(date +%s) - t0)) -lt "$grace" ]; do sleep 1; done
if [ ! -s "$auth" ]; then
	{find_key}
fi
if [ ! -s "$auth" ]; then
	echo "no key to end this instance with: the controller ends it"
	exit 0
fi
if [ ! -s "$wgetrc" ]; then
	IFS= read -r line <"$auth"
	printf 'header = %s\n' "$line" >"$wgetrc"
fi
call() {{
	: >"$body"
	if command -v curl >/dev/null 2>&1; then
		curl -s -o "$body" -w '%{{http_code}}' -X "$method" -H @"$auth" \
			-H 'Content-Type: application/json' --data "$data" --max-time 30 "$url"
	elif command -v wget >/dev/null 2>&1; then
		WGETRC="$wgetrc" wget -q -S -O "$body" --method="$method" \
			--header='Content-Type: application/json' --body-data="$data" --timeout=30 "$url" 2>&1 |
			awk '/^  HTTP\//{{c=$2}} END{{print c}}'
	else
		for py in python3 python; do
			command -v "$py" >/dev/null 2>&1 || continue
			"$py" - "$url" "$auth" "$body" "$method" "$data" <<'PY'
import sys, urllib.request, urllib.error
name, value = open(sys.argv[2]).read().strip().split(": ", 1)
req = urllib.request.Request(sys.argv[1], data=sys.argv[5].encode(), method=sys.argv[4],
                             headers={{name: value, "Content-Type": "application/json"}})
try:
    r = urllib.request.urlopen(req, timeout=30)
    open(sys.argv[3], "wb").write(r.read())
    print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print(0)
PY
			return
		done
		echo none
	fi
}}
i=0
while [ "$i" -lt 720 ]; do
	code=$(call)
	case "$code" in
	2??) grep -Eq {refused} "$body" 2>/dev/null || {{ echo "ended ($code)"; exit 0; }} ;;
	404 | 410) echo "already gone ($code)"; exit 0 ;;
	# The key of an ended instance stops working; a refused or revoked key never starts to.
	401 | 403) echo "the key was refused ($code): gone, revoked, or not ours to end"; exit 0 ;;
	none) echo "no curl, wget or python: cannot end this instance"; exit 1 ;;
	esac
	echo "{name} answered ${{code:-nothing}}; again in 5s"
	i=$((i + 1))
	sleep 5
done
exit 1
"#
        )
    }
}

/// `root` (`~/...` or absolute) as a shell word that expands `~`.
pub fn root_word(root: &str) -> String {
    match root.strip_prefix("~/") {
        Some(rest) => format!("\"$HOME\"/{}", crate::agent::sh_quote(rest)),
        None => crate::agent::sh_quote(root),
    }
}

async fn run_script(
    transport: &dyn crate::transport::Transport,
    step: &'static str,
    script: &str,
    stdin: &[u8],
) -> Result<(), crate::agent::AgentError> {
    let out = transport
        .exec_with_stdin(script, stdin)
        .await
        .map_err(|source| crate::agent::AgentError::Transport {
            machine: transport.machine().to_string(),
            step,
            source,
        })?;
    if out.status != 0 {
        return Err(crate::agent::AgentError::Failed {
            machine: transport.machine().to_string(),
            step,
            message: out.stderr.trim().to_string(),
        });
    }
    Ok(())
}

/// Puts `end`'s hook, and the key `auth` (a whole `Authorization: ...` line) when one
/// is handed over, into the instance folder `root`, before the agent starts: through
/// stdin, into 0600 files from the first byte.
pub async fn install_end_hook(
    transport: &dyn crate::transport::Transport,
    root: &str,
    end: &SelfEnd,
    auth: Option<&Secret>,
) -> Result<(), crate::agent::AgentError> {
    let root = root_word(root);
    let name = end.name;
    let key = if auth.is_some() {
        format!(
            "IFS= read -r auth && printf '%s\\n' \"$auth\" > \"$root/.{name}_auth\" && \
             printf 'header = %s\\n' \"$auth\" > \"$root/.{name}_wgetrc\" && "
        )
    } else {
        String::new()
    };
    let script = format!(
        "umask 077 && root={root} && mkdir -p \"$root\" && {key}\
         cat > \"$root/on_end.sh.part\" && mv -f \"$root/on_end.sh.part\" \"$root/on_end.sh\""
    );
    let mut stdin = auth
        .map(|a| format!("{}\n", a.expose()).into_bytes())
        .unwrap_or_default();
    stdin.extend_from_slice(end.script().as_bytes());
    run_script(transport, "install self-termination", &script, &stdin).await
}

/// Tells the hook the controller has what it needs: it may end the instance now.
pub async fn mark_collected(
    transport: &dyn crate::transport::Transport,
    root: &str,
) -> Result<(), crate::agent::AgentError> {
    let script = format!(": > {}/collected", root_word(root));
    run_script(transport, "mark collected", &script, b"").await
}

/// What a provider does when an instance refuses asimov's login while the instance
/// itself is fine (images and users replace `authorized_keys`): attach the key again.
#[async_trait::async_trait]
pub trait Reattach: Send + Sync {
    async fn reattach(&self, why: &AgentError) -> Result<(), AgentError>;
}

/// A login refused at authentication (not a network or host failure).
fn login_refused(e: &AgentError) -> bool {
    matches!(
        e,
        AgentError::Transport {
            source: crate::transport::TransportError::Failed {
                step: "authenticate",
                ..
            },
            ..
        }
    )
}

/// The agent on a cloud instance reached over SSH, the one [`Machine`] of every
/// cloud: its GPUs are checked before the job starts (`probe_gpus`); with a
/// [`SelfEnd`] the hook and its key go in before the agent starts and `collect` marks
/// the run collected, so the instance ends itself; with a [`Reattach`] a refused login
/// re-attaches asimov's key and tries once more, so a run is never lost to a replaced
/// `authorized_keys`. Everything else is the agent's.
///
/// [`Machine`]: crate::agent::Machine
pub struct CloudMachine {
    agent: crate::agent::AgentMachine,
    transport: std::sync::Arc<dyn crate::transport::Transport>,
    root: String,
    end: Option<(SelfEnd, Option<Secret>)>,
    reattach: Option<Box<dyn Reattach>>,
}

impl CloudMachine {
    pub fn new(
        transport: std::sync::Arc<dyn crate::transport::Transport>,
        root: String,
    ) -> CloudMachine {
        CloudMachine {
            agent: crate::agent::AgentMachine::new(std::sync::Arc::clone(&transport), root.clone()),
            transport,
            root,
            end: None,
            reattach: None,
        }
    }

    /// The instance ends itself through `end`, authorised by `auth` (a header line)
    /// when the hook does not find its own key.
    pub fn ending(mut self, end: SelfEnd, auth: Option<Secret>) -> CloudMachine {
        self.end = Some((end, auth));
        self
    }

    pub fn reattaching(mut self, reattach: impl Reattach + 'static) -> CloudMachine {
        self.reattach = Some(Box::new(reattach));
        self
    }

    /// Runs one agent call, again once after a re-attach if its login was refused.
    async fn again<T, F, Fut>(&self, call: F) -> Result<T, AgentError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, AgentError>>,
    {
        match (call().await, &self.reattach) {
            (Err(e), Some(r)) if login_refused(&e) => {
                r.reattach(&e).await?;
                call().await
            }
            (result, _) => result,
        }
    }
}

#[async_trait::async_trait]
impl crate::agent::Machine for CloudMachine {
    async fn gpus(&self) -> Result<crate::agent::GpuProbe, AgentError> {
        self.again(|| probe_gpus(self.transport.as_ref())).await
    }

    async fn start(&self, spec: &crate::agent::LaunchSpec) -> Result<(), AgentError> {
        if let Some((end, auth)) = &self.end {
            self.again(|| install_end_hook(&*self.transport, &self.root, end, auth.as_ref()))
                .await?;
        }
        self.agent.start(spec).await
    }

    async fn observe(&self) -> Result<Option<crate::agent::AgentStatus>, AgentError> {
        self.again(|| self.agent.observe()).await
    }

    async fn log_tail(&self, max_bytes: usize) -> Result<String, AgentError> {
        self.again(|| self.agent.log_tail(max_bytes)).await
    }

    async fn collect(&self, log: &Path, outputs: &Path) -> Result<(), AgentError> {
        self.again(|| self.agent.collect(log, outputs)).await?;
        if self.end.is_some() {
            mark_collected(&*self.transport, &self.root).await?;
        }
        Ok(())
    }

    async fn copy_log(&self, to: &Path) -> Result<bool, AgentError> {
        self.again(|| self.agent.copy_log(to)).await
    }

    async fn follow_log(&self) -> Result<crate::transport::ByteStream<'_>, AgentError> {
        self.agent.follow_log().await
    }

    async fn sync_checkpoint(&self, path: &str, into: &Path) -> Result<bool, AgentError> {
        self.again(|| self.agent.sync_checkpoint(path, into)).await
    }

    async fn metrics_tail(&self, max_bytes: usize) -> Result<String, AgentError> {
        self.again(|| self.agent.metrics_tail(max_bytes)).await
    }

    async fn metrics_since(
        &self,
        offset: u64,
        file: Option<u64>,
        max_bytes: usize,
    ) -> Result<crate::agent::MetricsRead, AgentError> {
        self.again(|| self.agent.metrics_since(offset, file, max_bytes))
            .await
    }

    async fn sync_s3(&self, last: bool) -> Result<crate::agent::S3Synced, AgentError> {
        self.again(|| self.agent.sync_s3(last)).await
    }

    async fn interactive(
        &self,
        session: crate::agent::Session,
        run: &str,
    ) -> Result<std::process::Command, AgentError> {
        self.again(|| self.agent.interactive(session, run)).await
    }

    async fn stop(&self) -> Result<(), AgentError> {
        self.again(|| self.agent.stop()).await
    }

    async fn pause(&self) -> Result<(), AgentError> {
        self.again(|| self.agent.pause()).await
    }

    async fn resume(&self, resume_from: Option<&str>) -> Result<(), AgentError> {
        self.again(|| self.agent.resume(resume_from)).await
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

    #[test]
    fn end_hooks_are_valid_sh_and_carry_no_key() {
        let end = SelfEnd {
            name: "lambda",
            method: "POST",
            url: "https://cloud.lambda.ai/api/v1/instance-operations/terminate".into(),
            body: r#"{"instance_ids":["0a51"]}"#.into(),
            refused_in_ok: r#""error""#,
            grace: Duration::from_secs(300),
            find_key: Some("printf 'Authorization: Bearer %s\\n' \"$k\" >\"$auth\"".into()),
        };
        let script = end.script();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("on_end.sh");
        std::fs::write(&path, &script).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-n")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(script.contains(".lambda_auth") && !script.contains("Bearer sk"));
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
