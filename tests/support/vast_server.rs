//! A local HTTP server that behaves like the Vast.ai API as `shared/providers.md` (§1)
//! describes it, for the Vast client's tests. Its instances' SSH endpoints point at a
//! real local sshd, so a job placed on it really runs over SSH.
//!
//! What it emulates: offer search (`POST /api/v0/bundles/`, `PUT /api/v0/search/asks/`)
//! with Vast's `{field: {op: value}}` filters, units (MB, GB) and GPU names with spaces;
//! create (`PUT /api/v0/asks/{id}/`) with `label`, the per-instance key and a bid
//! (`price`): a bid under `min_bid` creates a stopped instance and answers an error that
//! carries `new_contract`; offers taken once rented (404 `no_such_ask`, 410 with
//! `cancel_unavail`); async boot (`actual_status` null → `loading` → `running`, `ports`
//! null until running, `ssh_host`/`ssh_port` early); the current listing
//! (`GET /api/v1/instances/`, 25 a page, `next_token`, `select_filters`) and the legacy
//! one answering 410; show (`{"instances": null}` once destroyed); destroy (a second is
//! 404 `no_such_instance`); state and label changes; account SSH keys and keys attached
//! to an instance (written into the sshd's `authorized_keys` when an instance runs);
//! stop and start (`PUT state`): a stopped instance bills its storage only
//! (`stopped_periods`) and its GPUs go back to the market, so a start after someone
//! rented them is accepted and stays stopped, "scheduling";
//! per-endpoint minimum gaps (per caller: the account key, each instance's key) answered
//! by 429 with a plain-text body and no Retry-After;
//! 401 `auth_error`.
//!
//! Faults a test can inject (`VastServer::inject`): 429 and nginx HTML 5xx storms,
//! errors inside HTTP 200, a create that fails yet creates, capacity errors on listed
//! offers, offers taken between search and buy, destroys answering 5xx, a held create
//! answer (the request is recorded, the answer waits), `created` with "OCI runtime
//! create failed", outbid (→ stopped, disk still billing), destroyed behind the client's
//! back. The server keeps records of every instance ever created, with when it started
//! and stopped billing, and of every request, so tests assert against them.
#![allow(dead_code)]

use crate::support::faults::{Chaos, cut};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The API key the server accepts unless told otherwise.
pub const API_KEY: &str = "vast-test-key-0123456789";

/// Endpoint classes, each with its own rate limit (Vast limits per endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Search,
    Create,
    List,
    Show,
    Destroy,
    Manage,
    SshKeys,
    Other,
}

/// One injected fault: answers the next `times` requests to `endpoint` (any endpoint
/// when `None`) instead of the real handler.
#[derive(Debug, Clone)]
pub struct Injected {
    pub endpoint: Option<Endpoint>,
    pub fault: Fault,
    pub times: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// 429 with the plain-text body Vast often sends, no Retry-After.
    TooManyRequests,
    /// 429 `{"detail": ...}`, the JSON variant.
    TooManyRequestsJson,
    /// An nginx HTML error page with this status (502, 503, 504, 500).
    NginxHtml(u16),
    /// HTTP 200 with `{"success": false, "error": code, "msg": ...}`.
    ErrorInOk(&'static str),
    /// Create: the instance IS created (stopped, billing disk), but the answer is an
    /// error (HTTP 400 with `new_contract` in the body).
    CreateFailsYetCreates,
    /// Create: the request is recorded and the instance made, then the answer is held
    /// for this long (a client killed meanwhile never sees it).
    HoldAnswer(Duration),
    /// Create: the offer is taken by someone else just before this buy (404
    /// `no_such_ask`), and it disappears from later searches.
    OfferTaken,
    /// Create: the offer was bought twice in parallel and this buyer lost: the create
    /// succeeds, but the instance ends `exited` once it would have run.
    BoughtTwiceLost,
}

/// How the server behaves; tests change it with `VastServer::configure`.
#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: String,
    /// Minimum gap between two calls to one endpoint class; closer calls get a 429.
    pub gaps: BTreeMap<Endpoint, Duration>,
    /// From create to `loading`, and from create to `running`.
    pub loading_after: Duration,
    pub running_after: Duration,
    /// Once running: how long `ports` stays null (running without SSH ports), then how
    /// long the mapped port refuses connections (sshd not answering yet).
    pub ports_after: Duration,
    pub sshd_after: Duration,
    /// Until then every destroy (by any key) answers an nginx 503 page.
    pub destroy_failing_until: Option<Instant>,
    /// Offers (by id) that are listed but whose create always answers no capacity.
    pub capacity_error_offers: Vec<u64>,
    /// Offers (by id) whose instances boot into `created` + an OCI error.
    pub oci_failure_offers: Vec<u64>,
    /// Where instances' SSH lands.
    pub ssh: Option<SshTarget>,
    /// How long an offer search takes to answer (a real market's search takes a while).
    pub search_delay: Duration,
    /// Faults at rates (`support/faults.rs`), drawn per request before anything else.
    pub faults: Option<Arc<crate::support::faults::Faults>>,
}

/// The real sshd instances point at.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    /// The sshd's `AuthorizedKeysFile`: registered keys are added there when an
    /// instance starts running (as Vast injects account keys into new instances).
    pub authorized_keys: PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            api_key: API_KEY.to_string(),
            gaps: BTreeMap::new(),
            loading_after: Duration::from_millis(300),
            running_after: Duration::from_millis(1200),
            ports_after: Duration::ZERO,
            sshd_after: Duration::ZERO,
            destroy_failing_until: None,
            capacity_error_offers: Vec::new(),
            oci_failure_offers: Vec::new(),
            ssh: None,
            search_delay: Duration::ZERO,
            faults: None,
        }
    }
}

impl Config {
    /// The per-endpoint thresholds Vast documents (create 4.5, destroy 3, show 2,
    /// manage 1; taken as seconds), multiplied by `scale`.
    pub fn documented_gaps(scale: f64) -> BTreeMap<Endpoint, Duration> {
        [
            (Endpoint::Create, 4.5),
            (Endpoint::Destroy, 3.0),
            (Endpoint::Show, 2.0),
            (Endpoint::Manage, 1.0),
            (Endpoint::List, 1.0),
            (Endpoint::Search, 1.0),
        ]
        .into_iter()
        .map(|(e, s)| (e, Duration::from_secs_f64(s * scale)))
        .collect()
    }
}

/// What the server remembers of one instance, for tests to assert on.
#[derive(Debug, Clone)]
pub struct InstanceRecord {
    pub id: u64,
    pub offer_id: u64,
    pub label: String,
    pub image: String,
    pub disk: f64,
    /// The bid, for interruptible instances.
    pub bid: Option<f64>,
    pub dph_total: f64,
    pub gpu_name: String,
    pub num_gpus: u64,
    pub instance_api_key: String,
    pub onstart: Option<String>,
    pub env: Value,
    /// Billing starts at create (disk bills from the start) and stops at destroy.
    pub billing_started: SystemTime,
    pub billing_stopped: Option<SystemTime>,
    /// When `actual_status` first said running (ports and SSH there).
    pub running_at: Option<SystemTime>,
    pub destroyed: bool,
    /// Held by asimov? The raw status fields as the API shows them.
    pub actual_status: Option<String>,
    pub intended_status: String,
    pub cur_state: String,
    pub next_state: String,
    pub status_msg: Option<String>,
    /// Set when the instance must not move on by the boot timer (stopped, outbid, OCI).
    pub frozen_status: bool,
    /// Lost a parallel buy: `exited` instead of `running`.
    pub loser: bool,
    /// What its disk bills an hour (`storage_cost` × `disk` / 720): all it bills while
    /// stopped.
    pub storage_per_hour: f64,
    /// When it was stopped (`PUT state: stopped`) and started or destroyed again: the
    /// stretches it billed storage only.
    pub stopped_periods: Vec<(SystemTime, Option<SystemTime>)>,
    /// Booted again from here (create, or a start that got its GPUs back).
    created: Instant,
    keys: Vec<String>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub endpoint: Endpoint,
    pub status: u16,
    /// When the request arrived (before any lock), and when it was answered.
    pub arrived: Instant,
    pub at: Instant,
    /// Which key authorised it: "account", "instance:<id>", or "none".
    pub auth: String,
}

#[derive(Debug, Clone)]
struct AccountKey {
    id: u64,
    key: String,
}

struct State {
    config: Config,
    offers: Vec<Value>,
    /// Offers already rented or taken: gone from searches, creates answer 404.
    taken: Vec<u64>,
    instances: Vec<InstanceRecord>,
    requests: Vec<RequestRecord>,
    faults: VecDeque<Injected>,
    /// Last accepted call per (endpoint, identity): Vast limits each caller apart.
    last_call: BTreeMap<(Endpoint, String), Instant>,
    account_keys: Vec<AccountKey>,
    next_id: u64,
    /// Create requests that arrived (recorded before any answer, held or not).
    creates_received: u64,
}

/// A running server. Dropping it stops it.
pub struct VastServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VastServer {
    /// Starts on a free localhost port with these offers (JSON objects in Vast's shape;
    /// see `offer`).
    pub fn start(config: Config, offers: Vec<Value>) -> VastServer {
        let state = Arc::new(Mutex::new(State {
            config,
            offers,
            taken: Vec::new(),
            instances: Vec::new(),
            requests: Vec::new(),
            faults: VecDeque::new(),
            last_call: BTreeMap::new(),
            account_keys: Vec::new(),
            next_id: 7_000_001,
            creates_received: 0,
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind vast server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("server runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let ticker = Arc::clone(&shared);
                tokio::spawn(async move {
                    loop {
                        tick(&ticker);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
                let app = axum::Router::new().fallback(
                    move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                        let state = Arc::clone(&shared);
                        async move { handle(state, method, uri, headers, body).await }
                    },
                );
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        VastServer {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, what `ASIMOV_VAST_API_URL` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn configure(&self, f: impl FnOnce(&mut Config)) {
        f(&mut self.lock().config);
    }

    pub fn inject(&self, endpoint: Option<Endpoint>, fault: Fault, times: u32) {
        self.lock().faults.push_back(Injected {
            endpoint,
            fault,
            times,
        });
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Every instance ever created, destroyed ones included.
    pub fn instances(&self) -> Vec<InstanceRecord> {
        tick(&self.state);
        self.lock().instances.clone()
    }

    /// Instances not destroyed yet.
    pub fn live_instances(&self) -> Vec<InstanceRecord> {
        self.instances()
            .into_iter()
            .filter(|i| !i.destroyed)
            .collect()
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

    /// Requests answered 429.
    pub fn rate_limited(&self) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.status == 429)
            .count()
    }

    pub fn creates_received(&self) -> u64 {
        self.lock().creates_received
    }

    /// Registered account keys (public key text).
    pub fn account_keys(&self) -> Vec<String> {
        self.lock()
            .account_keys
            .iter()
            .map(|k| k.key.clone())
            .collect()
    }

    /// Someone else rents this offer: it leaves the searches; buying it answers 404.
    pub fn take_offer(&self, offer_id: u64) {
        self.lock().taken.push(offer_id);
    }

    /// A higher bid takes the GPUs: the instance stops, its disk still bills.
    pub fn outbid(&self, id: u64) {
        let mut st = self.lock();
        if let Some(i) = st.instances.iter_mut().find(|i| i.id == id) {
            i.actual_status = Some("stopped".into());
            i.intended_status = "stopped".into();
            i.cur_state = "stopped".into();
            i.next_state = "stopped".into();
            i.status_msg = Some("outbid: instance stopped".into());
            i.frozen_status = true;
        }
    }

    /// Rents `offer_id` with `label` as someone else (another controller, the console)
    /// would; returns the instance id.
    pub fn plant(&self, offer_id: u64, label: &str) -> u64 {
        let mut st = self.lock();
        let body = json!({"image": "ubuntu:22.04", "disk": 10, "label": label});
        let _ = create(&mut st, offer_id, &body, false);
        st.instances.last().map_or(0, |i| i.id)
    }

    /// The instance vanishes without the client asking (destroyed from the console).
    pub fn destroy_behind_back(&self, id: u64) {
        let mut st = self.lock();
        if let Some(i) = st.instances.iter_mut().find(|i| i.id == id) {
            destroy_record(i);
        }
    }
}

impl Drop for VastServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An offer in Vast's shape. `gpu_ram_gb` is per GPU; the API reports MB.
pub fn offer(id: u64, gpu_name: &str, num_gpus: u64, gpu_ram_gb: f64, dph_total: f64) -> Value {
    json!({
        "id": id,
        "ask_contract_id": id,
        "bundle_id": id,
        "machine_id": 1000 + id,
        "host_id": 500 + id,
        "num_gpus": num_gpus,
        "gpu_name": gpu_name,
        "gpu_ram": gpu_ram_gb * 1000.0,
        "gpu_total_ram": gpu_ram_gb * 1000.0 * num_gpus as f64,
        "cpu_cores": 32,
        "cpu_cores_effective": 8.0,
        "cpu_ram": 128000.0,
        "disk_space": 200.0,
        "dph_base": dph_total * 0.9,
        "dph_total": dph_total,
        "min_bid": dph_total * 0.5,
        "storage_cost": 0.15,
        "inet_up": 500.0,
        "inet_down": 900.0,
        "inet_up_cost": 0.01,
        "inet_down_cost": 0.01,
        "reliability": 0.995,
        "reliability2": 0.995,
        "verification": "verified",
        "verified": true,
        "external": false,
        "rentable": true,
        "rented": false,
        "direct_port_count": 16,
        "cuda_max_good": 12.4,
        "driver_version": "550.54.14",
        "compute_cap": 890,
        "public_ipaddr": "127.0.0.1",
        "static_ip": false,
        "geolocation": "Atlantis, AT",
        "duration": 2_592_000.0,
        "dlperf": 50.0 * num_gpus as f64,
        "dlperf_per_dphtotal": 50.0 * num_gpus as f64 / dph_total,
        "score": 100.0,
        "is_bid": false,
        "hosting_type": 1,
    })
}

fn now_epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl InstanceRecord {
    /// Seconds it billed storage only (stopped), up to now for a stretch still open.
    pub fn stopped_secs(&self) -> f64 {
        let now = SystemTime::now();
        self.stopped_periods
            .iter()
            .map(|(from, to)| {
                to.unwrap_or(now)
                    .duration_since(*from)
                    .map_or(0.0, |d| d.as_secs_f64())
            })
            .sum()
    }

    fn close_stopped_period(&mut self) {
        if let Some((_, to @ None)) = self.stopped_periods.last_mut() {
            *to = Some(SystemTime::now());
        }
    }
}

fn destroy_record(i: &mut InstanceRecord) {
    if !i.destroyed {
        i.close_stopped_period();
        i.destroyed = true;
        i.billing_stopped = Some(SystemTime::now());
        i.cur_state = "unloaded".into();
        i.next_state = "unloaded".into();
    }
}

/// Moves booting instances on by their timers, and puts registered keys into the
/// sshd once an instance runs.
fn tick(state: &Arc<Mutex<State>>) {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let loading = st.config.loading_after;
    let running = st.config.running_after;
    let oci = st.config.oci_failure_offers.clone();
    let mut newly_running = Vec::new();
    for i in st
        .instances
        .iter_mut()
        .filter(|i| !i.destroyed && !i.frozen_status)
    {
        let age = i.created.elapsed();
        if oci.contains(&i.offer_id) {
            if age >= loading {
                i.actual_status = Some("created".into());
                i.status_msg = Some(
                    "Error response from daemon: failed to create task for container: \
                     OCI runtime create failed: runc create failed: unable to start container process"
                        .into(),
                );
                i.frozen_status = true;
            }
            continue;
        }
        if age >= running && i.loser {
            i.actual_status = Some("exited".into());
            i.status_msg =
                Some("container exited: the machine's GPUs are in use by another contract".into());
            i.frozen_status = true;
            continue;
        }
        if age >= running {
            if i.actual_status.as_deref() != Some("running") {
                i.actual_status = Some("running".into());
                i.status_msg = Some("success, running".into());
                i.running_at = Some(SystemTime::now());
                newly_running.push(i.keys.clone());
            }
        } else if age >= loading {
            i.actual_status = Some("loading".into());
            i.status_msg = Some("Pulling image".into());
        }
    }
    if newly_running.is_empty() {
        return;
    }
    let Some(ssh) = st.config.ssh.clone() else {
        return;
    };
    let existing = std::fs::read_to_string(&ssh.authorized_keys).unwrap_or_default();
    let mut text = existing.clone();
    for keys in newly_running {
        for key in keys {
            if !existing.lines().any(|l| l.trim() == key.trim()) && !text.contains(key.trim()) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(key.trim());
                text.push('\n');
            }
        }
    }
    if text != existing {
        let _ = std::fs::write(&ssh.authorized_keys, text);
    }
}

fn classify(method: &Method, path: &str) -> Endpoint {
    let p = path.trim_end_matches('/');
    match (method.as_str(), p) {
        ("POST", "/api/v0/bundles")
        | ("PUT", "/api/v0/search/asks")
        | ("GET", "/api/v0/bundles") => Endpoint::Search,
        ("PUT", p) if p.starts_with("/api/v0/asks/") => Endpoint::Create,
        ("GET", "/api/v1/instances") | ("GET", "/api/v0/instances") => Endpoint::List,
        ("GET", p) if p.starts_with("/api/v0/instances/") => Endpoint::Show,
        ("DELETE", p) if p.starts_with("/api/v0/instances/") && !p.contains("/ssh/") => {
            Endpoint::Destroy
        }
        (_, p) if p.starts_with("/api/v0/ssh") => Endpoint::SshKeys,
        (_, p) if p.starts_with("/api/v0/instances/") => Endpoint::Manage,
        _ => Endpoint::Other,
    }
}

fn json_response(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn text_response(status: u16, content_type: &'static str, body: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, content_type)],
        body,
    )
        .into_response()
}

fn nginx_page(status: u16) -> Response {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    text_response(
        status,
        "text/html",
        format!(
            "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n\
             <center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx/1.18.0 (Ubuntu)</center>\r\n\
             </body>\r\n</html>\r\n"
        ),
    )
}

fn error(status: u16, code: &str, msg: impl Into<String>) -> Response {
    json_response(
        status,
        json!({"success": false, "error": code, "msg": msg.into()}),
    )
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who is calling: the account key, an instance's own key, or nobody (bad key).
enum Caller {
    Account,
    Instance(u64),
    Nobody,
    /// A key nobody has (any more): its first characters, as its identity.
    Invalid(String),
}

fn caller(st: &State, headers: &HeaderMap, uri: &Uri) -> Caller {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let query_key = uri.query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("api_key=").map(str::to_string))
    });
    let Some(key) = bearer.or(query_key) else {
        return Caller::Nobody;
    };
    if key == st.config.api_key {
        return Caller::Account;
    }
    match st
        .instances
        .iter()
        .find(|i| !i.destroyed && i.instance_api_key == key)
    {
        Some(i) => Caller::Instance(i.id),
        None => Caller::Invalid(key.chars().take(8).collect()),
    }
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    let q = uri.query()?;
    for kv in q.split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == name {
            return Some(percent_decode(v));
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Each request is handled to its end in a task of its own: hyper drops a handler whose
/// client hung up, and a real server that was slow to answer still acts (a create held
/// past the client's timeout creates its instance).
async fn handle(
    state: Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Its arrival is when hyper hands it over, not when its task first runs.
    let arrived = Instant::now();
    tokio::spawn(handle_to_the_end(
        state, method, uri, headers, body, arrived,
    ))
    .await
    .unwrap_or_else(|_| nginx_page(500))
}

async fn handle_to_the_end(
    state: Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    arrived: Instant,
) -> Response {
    tick(&state);
    let path = uri.path().to_string();
    let endpoint = classify(&method, &path);
    let faults = state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .config
        .faults
        .clone();
    let chaos = crate::support::faults::draw(&faults, endpoint == Endpoint::Create);
    match chaos {
        Some(Chaos::Html(status)) => return nginx_page(status),
        Some(Chaos::TooMany) => {
            return text_response(429, "text/plain", "API requests too frequent".into());
        }
        Some(Chaos::Capacity) => {
            return error(
                410,
                "no_such_ask",
                "error 410/3907: no_such_ask Instance type is no longer available.",
            );
        }
        Some(Chaos::CutBefore) => return cut(json_response(200, json!({}))),
        Some(Chaos::Slow(_)) | Some(Chaos::CutAfter) | None => {}
    }
    // A slow request passes the rate limit on arrival, then waits before it is acted on.
    let mut refused = None;
    if let Some(Chaos::Slow(d)) = chaos {
        refused = {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            let who = caller(&st, &headers, &uri);
            rate_limit(&mut st, endpoint, &who)
        };
        if refused.is_none() {
            tokio::time::sleep(d).await;
        }
    }
    let (response, hold, auth) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let who = caller(&st, &headers, &uri);
        let auth = match who {
            Caller::Account => "account".to_string(),
            Caller::Instance(id) => format!("instance:{id}"),
            Caller::Nobody => "none".to_string(),
            Caller::Invalid(_) => "invalid".to_string(),
        };
        if endpoint == Endpoint::Create {
            st.creates_received += 1;
        }
        let (response, mut hold) = match refused {
            Some(r) => (r, None),
            None if matches!(chaos, Some(Chaos::Slow(_))) => {
                answer_paced(&mut st, &method, &uri, &path, endpoint, who, &body)
            }
            None => answer(&mut st, &method, &uri, &path, endpoint, who, &body),
        };
        if endpoint == Endpoint::Search && !st.config.search_delay.is_zero() {
            hold = Some(hold.unwrap_or_default() + st.config.search_delay);
        }
        (response, hold, auth)
    };
    if let Some(hold) = hold {
        tokio::time::sleep(hold).await;
    }
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    st.requests.push(RequestRecord {
        method: method.to_string(),
        path,
        endpoint,
        status: response.status().as_u16(),
        arrived,
        at: Instant::now(),
        auth,
    });
    if chaos == Some(Chaos::CutAfter) {
        return cut(response);
    }
    response
}

/// The fault to apply to this request, if one is queued for its endpoint.
fn take_fault(st: &mut State, endpoint: Endpoint) -> Option<Fault> {
    let pos = st
        .faults
        .iter()
        .position(|f| f.endpoint.is_none_or(|e| e == endpoint))?;
    let f = &mut st.faults[pos];
    let fault = f.fault.clone();
    f.times = f.times.saturating_sub(1);
    if f.times == 0 {
        st.faults.remove(pos);
    }
    Some(fault)
}

fn answer(
    st: &mut State,
    method: &Method,
    uri: &Uri,
    path: &str,
    endpoint: Endpoint,
    who: Caller,
    body: &Bytes,
) -> (Response, Option<Duration>) {
    if let Some(refused) = rate_limit(st, endpoint, &who) {
        return (refused, None);
    }
    answer_paced(st, method, uri, path, endpoint, who, body)
}

/// Vast's front: a minimum gap per endpoint and caller, judged when a request arrives
/// (a request the server is slow to act on was let in on its arrival).
fn rate_limit(st: &mut State, endpoint: Endpoint, who: &Caller) -> Option<Response> {
    if let Some(gap) = st.config.gaps.get(&endpoint).copied()
        && !gap.is_zero()
    {
        let now = Instant::now();
        let identity = match who {
            Caller::Instance(id) => format!("instance:{id}"),
            Caller::Account => "account".to_string(),
            Caller::Invalid(key) => format!("invalid:{key}"),
            Caller::Nobody => "anonymous".to_string(),
        };
        let key = (endpoint, identity);
        if let Some(last) = st.last_call.get(&key)
            && now.duration_since(*last) < gap
        {
            return Some(text_response(
                429,
                "text/plain",
                format!(
                    "API requests too frequent: endpoint threshold={}",
                    gap.as_secs_f64()
                ),
            ));
        }
        st.last_call.insert(key, now);
    }
    None
}

fn answer_paced(
    st: &mut State,
    method: &Method,
    uri: &Uri,
    path: &str,
    endpoint: Endpoint,
    who: Caller,
    body: &Bytes,
) -> (Response, Option<Duration>) {
    if endpoint == Endpoint::Destroy
        && st
            .config
            .destroy_failing_until
            .is_some_and(|t| Instant::now() < t)
    {
        return (nginx_page(503), None);
    }
    let mut hold = None;
    let mut fails_yet_creates = false;
    let mut taken_now = false;
    let mut loser = false;
    if let Some(fault) = take_fault(st, endpoint) {
        match fault {
            Fault::TooManyRequests => {
                return (
                    text_response(429, "text/plain", "API requests too frequent".into()),
                    None,
                );
            }
            Fault::TooManyRequestsJson => {
                return (
                    json_response(
                        429,
                        json!({"detail": "API requests too frequent endpoint threshold=4.5"}),
                    ),
                    None,
                );
            }
            Fault::NginxHtml(status) => return (nginx_page(status), None),
            Fault::ErrorInOk(code) => {
                return (error(200, code, format!("error 200: {code}")), None);
            }
            Fault::CreateFailsYetCreates => fails_yet_creates = true,
            Fault::HoldAnswer(d) => hold = Some(d),
            Fault::OfferTaken => taken_now = true,
            Fault::BoughtTwiceLost => loser = true,
        }
    }
    let value: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return (error(400, "invalid_args", format!("bad json: {e}")), None),
        }
    };
    let p = path.trim_end_matches('/');
    let segments: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
    if endpoint == Endpoint::Search {
        let q = if method == Method::PUT {
            value.get("q").cloned().unwrap_or(Value::Null)
        } else if method == Method::GET {
            query_param(uri, "q")
                .and_then(|q| serde_json::from_str(&q).ok())
                .unwrap_or(Value::Null)
        } else {
            value
        };
        return (search(st, &q), None);
    }
    // Everything else needs a key.
    let account = match who {
        Caller::Account => true,
        Caller::Instance(_) => false,
        Caller::Nobody | Caller::Invalid(_) => {
            return (error(401, "auth_error", "Invalid user key"), None);
        }
    };
    let own_instance = match who {
        Caller::Instance(id) => Some(id),
        _ => None,
    };
    match (method.as_str(), segments.as_slice()) {
        ("PUT", ["api", "v0", "asks", id]) if account => {
            let Ok(offer_id) = id.parse::<u64>() else {
                return (error(400, "invalid_args", "bad offer id"), None);
            };
            if taken_now {
                st.taken.push(offer_id);
            }
            let response = create(st, offer_id, &value, fails_yet_creates);
            if loser && let Some(i) = st.instances.last_mut() {
                i.loser = true;
            }
            (response, hold)
        }
        ("GET", ["api", "v0", "instances"]) => (
            error(
                410,
                "gone",
                "This endpoint is deprecated; use GET /api/v1/instances/",
            ),
            None,
        ),
        ("GET", ["api", "v1", "instances"]) if account => (list(st, uri), None),
        ("GET", ["api", "v0", "instances", id]) if account => {
            let id: u64 = id.parse().unwrap_or(0);
            let found = st.instances.iter().find(|i| i.id == id && !i.destroyed);
            (
                json_response(
                    200,
                    json!({"instances": found.map(|i| instance_json(&st.config, i))}),
                ),
                None,
            )
        }
        ("DELETE", ["api", "v0", "instances", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if !account && own_instance != Some(id) {
                return (error(401, "auth_error", "Invalid user key"), None);
            }
            match st.instances.iter_mut().find(|i| i.id == id && !i.destroyed) {
                Some(i) => {
                    destroy_record(i);
                    (json_response(200, json!({"success": true})), None)
                }
                None => (
                    error(404, "no_such_instance", format!("Instance {id} not found.")),
                    None,
                ),
            }
        }
        ("PUT", ["api", "v0", "instances", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if !account && own_instance != Some(id) {
                return (error(401, "auth_error", "Invalid user key"), None);
            }
            let Some(i) = st.instances.iter_mut().find(|i| i.id == id && !i.destroyed) else {
                return (
                    error(404, "no_such_instance", format!("Instance {id} not found.")),
                    None,
                );
            };
            if let Some(label) = value.get("label").and_then(Value::as_str) {
                i.label = label.to_string();
                return (
                    json_response(
                        200,
                        json!({"success": true, "msg": format!("label for {id} set to '{label}'")}),
                    ),
                    None,
                );
            }
            let offer_id = i.offer_id;
            match value.get("state").and_then(Value::as_str) {
                Some("stopped") => {
                    let was_running = i.cur_state != "stopped";
                    i.actual_status = Some("stopped".into());
                    i.intended_status = "stopped".into();
                    i.cur_state = "stopped".into();
                    i.next_state = "stopped".into();
                    i.status_msg = Some("stopped by user".into());
                    i.frozen_status = true;
                    if was_running {
                        // The disk stays and bills; the GPUs go back to the market.
                        i.stopped_periods.push((SystemTime::now(), None));
                        st.taken.retain(|t| *t != offer_id);
                    }
                    (json_response(200, json!({"success": true})), None)
                }
                Some("running") if i.cur_state == "stopped" => {
                    i.intended_status = "running".into();
                    i.next_state = "running".into();
                    if st.taken.contains(&offer_id) {
                        // Rented by someone else meanwhile: accepted, and it waits for
                        // the GPUs ("scheduling"), billing storage, maybe for ever.
                        i.status_msg = Some("scheduling: waiting for the machine's GPUs".into());
                        return (json_response(200, json!({"success": true})), None);
                    }
                    i.cur_state = "running".into();
                    i.actual_status = Some("loading".into());
                    i.status_msg = Some("starting container".into());
                    i.frozen_status = false;
                    i.created = Instant::now();
                    i.running_at = None;
                    i.close_stopped_period();
                    st.taken.push(offer_id);
                    (json_response(200, json!({"success": true})), None)
                }
                // Already running (or asked to): nothing changes.
                Some("running") => (json_response(200, json!({"success": true})), None),
                _ => (error(400, "invalid_args", "nothing to change"), None),
            }
        }
        ("POST", ["api", "v0", "instances", id, "ssh"]) if account => {
            let id: u64 = id.parse().unwrap_or(0);
            let key = value
                .get("ssh_key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim()
                .to_string();
            let ssh = st.config.ssh.clone();
            let Some(i) = st.instances.iter_mut().find(|i| i.id == id && !i.destroyed) else {
                return (
                    error(404, "no_such_instance", format!("Instance {id} not found.")),
                    None,
                );
            };
            i.keys.push(key.clone());
            // Attached to a running instance: it takes effect at once.
            if i.actual_status.as_deref() == Some("running")
                && let Some(ssh) = ssh
            {
                let mut text = std::fs::read_to_string(&ssh.authorized_keys).unwrap_or_default();
                if !text.contains(&key) {
                    if !text.is_empty() && !text.ends_with('\n') {
                        text.push('\n');
                    }
                    text.push_str(&key);
                    text.push('\n');
                    let _ = std::fs::write(&ssh.authorized_keys, text);
                }
            }
            (
                json_response(200, json!({"success": true, "msg": "ssh key attached"})),
                None,
            )
        }
        ("GET", ["api", "v0", "ssh"]) if account => {
            let keys: Vec<Value> = st
                .account_keys
                .iter()
                .map(|k| json!({"id": k.id, "public_key": k.key, "created_at": "2026-11-30T10:00:00"}))
                .collect();
            (json_response(200, Value::Array(keys)), None)
        }
        ("POST", ["api", "v0", "ssh"]) if account => {
            let key = value
                .get("ssh_key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim()
                .to_string();
            if !key.starts_with("ssh-") {
                return (error(400, "invalid_args", "not an ssh public key"), None);
            }
            let id = st.account_keys.len() as u64 + 1;
            st.account_keys.push(AccountKey {
                id,
                key: key.clone(),
            });
            (
                json_response(
                    200,
                    json!({"success": true, "key": {"id": id, "public_key": key}}),
                ),
                None,
            )
        }
        ("DELETE", ["api", "v0", "ssh", id]) if account => {
            let id: u64 = id.parse().unwrap_or(0);
            let before = st.account_keys.len();
            st.account_keys.retain(|k| k.id != id);
            if st.account_keys.len() == before {
                (error(404, "not_found", "no such key"), None)
            } else {
                (json_response(200, json!({"success": true})), None)
            }
        }
        ("GET", ["api", "v0", "users", "current"]) if account => (
            json_response(
                200,
                json!({"id": 42, "username": "tester", "credit": 100.0}),
            ),
            None,
        ),
        _ if !account => (error(401, "auth_error", "Invalid user key"), None),
        _ => (
            error(404, "not_found", format!("no route {method} {path}")),
            None,
        ),
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

fn values_equal(field: &str, have: &Value, want: &Value) -> bool {
    if field == "geolocation"
        && let (Some(h), Some(w)) = (have.as_str(), want.as_str())
    {
        return h.rsplit(", ").next() == Some(w) || h == w;
    }
    match (have, want) {
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::Bool(a), Value::String(s)) => s == &a.to_string(),
        (Value::String(a), Value::String(b)) => a == b,
        _ => match (number(have), number(want)) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-9,
            _ => have == want,
        },
    }
}

fn matches(field: &str, have: &Value, op: &str, want: &Value) -> bool {
    let cmp = |f: fn(f64, f64) -> bool| match (number(have), number(want)) {
        (Some(a), Some(b)) => f(a, b),
        _ => false,
    };
    match op {
        "eq" => values_equal(field, have, want),
        "neq" => !values_equal(field, have, want),
        "gt" => cmp(|a, b| a > b),
        "gte" => cmp(|a, b| a >= b),
        "lt" => cmp(|a, b| a < b),
        "lte" => cmp(|a, b| a <= b),
        "in" => want
            .as_array()
            .is_some_and(|l| l.iter().any(|w| values_equal(field, have, w))),
        "notin" | "nin" => want
            .as_array()
            .is_some_and(|l| !l.iter().any(|w| values_equal(field, have, w))),
        _ => false,
    }
}

const CONTROLS: [&str; 5] = [
    "order",
    "type",
    "limit",
    "allocated_storage",
    "disable_bundling",
];

fn search(st: &State, q: &Value) -> Response {
    let Some(q) = q.as_object() else {
        return error(400, "invalid_args", "query must be a JSON object");
    };
    let bid = q.get("type").and_then(Value::as_str) == Some("bid");
    let mut out: Vec<Value> = Vec::new();
    'offers: for offer in &st.offers {
        let id = offer["id"].as_u64().unwrap_or(0);
        if st.taken.contains(&id) {
            continue;
        }
        for (field, cond) in q {
            if CONTROLS.contains(&field.as_str()) {
                continue;
            }
            let Some(cond) = cond.as_object() else {
                return error(
                    400,
                    "invalid_args",
                    format!("filter {field} is not {{op: value}}"),
                );
            };
            let have = offer.get(field.as_str()).unwrap_or(&Value::Null);
            for (op, want) in cond {
                if !matches(field, have, op, want) {
                    continue 'offers;
                }
            }
        }
        let mut o = offer.clone();
        if bid {
            o["is_bid"] = json!(true);
        }
        out.push(o);
    }
    if let Some(order) = q.get("order").and_then(Value::as_array) {
        for pair in order.iter().rev() {
            let field = pair
                .get(0)
                .and_then(Value::as_str)
                .unwrap_or("score")
                .to_string();
            let desc = pair.get(1).and_then(Value::as_str) == Some("desc");
            out.sort_by(|a, b| {
                let x = number(&a[&field]).unwrap_or(0.0);
                let y = number(&b[&field]).unwrap_or(0.0);
                let o = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
                if desc { o.reverse() } else { o }
            });
        }
    }
    if let Some(limit) = q.get("limit").and_then(number) {
        out.truncate(limit.max(0.0) as usize);
    }
    json_response(200, json!({"offers": out}))
}

fn create(st: &mut State, offer_id: u64, body: &Value, fails_yet_creates: bool) -> Response {
    let cancel_unavail = body
        .get("cancel_unavail")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let Some(offer) = st
        .offers
        .iter()
        .find(|o| o["id"].as_u64() == Some(offer_id))
        .cloned()
    else {
        return error(
            404,
            "invalid_args",
            format!("error 404/3603: no_such_ask Instance type by id {offer_id} is not available."),
        );
    };
    if st.taken.contains(&offer_id) || st.config.capacity_error_offers.contains(&offer_id) {
        return if cancel_unavail {
            error(
                410,
                "no_such_ask",
                format!(
                    "error 410/3907: no_such_ask Instance type by id {offer_id} is no longer available."
                ),
            )
        } else {
            error(
                404,
                "invalid_args",
                format!(
                    "error 404/3603: no_such_ask Instance type by id {offer_id} is not available."
                ),
            )
        };
    }
    let Some(image) = body.get("image").and_then(Value::as_str) else {
        return error(400, "invalid_args", "error 400/3467: image is required");
    };
    let label = body
        .get("label")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if label.len() > 256 {
        return error(400, "label_too_long", "label is longer than 256 characters");
    }
    let disk = body.get("disk").and_then(number).unwrap_or(10.0);
    if disk < 8.0 {
        return error(
            400,
            "invalid_args",
            "error 400/3467: disk must be at least 8 GB",
        );
    }
    let bid = body.get("price").and_then(number);
    if let Some(b) = bid
        && !(0.001..=128.0).contains(&b)
    {
        return error(400, "invalid_price", format!("price {b} out of range"));
    }
    let min_bid = offer["min_bid"].as_f64().unwrap_or(0.0);
    let too_low = bid.is_some_and(|b| b < min_bid);
    let id = st.next_id;
    st.next_id += 1;
    let key = random_hex(32);
    let storage_per_hour = offer["storage_cost"].as_f64().unwrap_or(0.0) * disk / (30.0 * 24.0);
    let dph_total = match bid {
        Some(b) => b + storage_per_hour,
        None => offer["dph_total"].as_f64().unwrap_or(0.0),
    };
    let stopped = too_low || fails_yet_creates;
    let keys: Vec<String> = st.account_keys.iter().map(|k| k.key.clone()).collect();
    st.instances.push(InstanceRecord {
        id,
        offer_id,
        label,
        image: image.to_string(),
        disk,
        bid,
        dph_total,
        gpu_name: offer["gpu_name"].as_str().unwrap_or("").to_string(),
        num_gpus: offer["num_gpus"].as_u64().unwrap_or(0),
        instance_api_key: key.clone(),
        onstart: body
            .get("onstart")
            .and_then(Value::as_str)
            .map(str::to_string),
        env: body.get("env").cloned().unwrap_or(Value::Null),
        billing_started: SystemTime::now(),
        billing_stopped: None,
        running_at: None,
        destroyed: false,
        actual_status: if stopped {
            Some("stopped".into())
        } else {
            None
        },
        intended_status: if stopped {
            "stopped".into()
        } else {
            "running".into()
        },
        cur_state: if stopped {
            "stopped".into()
        } else {
            "running".into()
        },
        next_state: if stopped {
            "stopped".into()
        } else {
            "running".into()
        },
        status_msg: None,
        frozen_status: stopped,
        loser: false,
        storage_per_hour,
        stopped_periods: Vec::new(),
        created: Instant::now(),
        keys,
    });
    // The GPUs are now rented: the ask leaves the market.
    st.taken.push(offer_id);
    if too_low {
        return json_response(
            400,
            json!({"success": false, "error": "invalid_price",
                   "msg": format!("error 400/3467: bid {} is below the minimum {min_bid}", bid.unwrap_or(0.0)),
                   "new_contract": id}),
        );
    }
    if fails_yet_creates {
        return json_response(
            400,
            json!({"success": false, "error": "invalid_args",
                   "msg": "error 400/1234: could not start the instance", "new_contract": id}),
        );
    }
    json_response(
        200,
        json!({"success": true, "new_contract": id, "instance_api_key": key}),
    )
}

/// A local port where the host's port mapping answers but no sshd is behind it yet:
/// every connection is closed at once (held open by one thread for the whole process,
/// so no other server can take the port).
fn closed_port() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            return 1;
        };
        let port = listener.local_addr().map_or(1, |a| a.port());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        port
    })
}

fn instance_json(config: &Config, i: &InstanceRecord) -> Value {
    let running = i.actual_status.as_deref() == Some("running");
    let ssh = config.ssh.as_ref();
    let up_for = i
        .running_at
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default();
    let ports = match (running, ssh) {
        (true, Some(_)) if up_for < config.ports_after => Value::Null,
        (true, Some(s)) => {
            // Mapped, but nothing answers there yet: a port closed on the host.
            let port = if up_for < config.ports_after + config.sshd_after {
                closed_port()
            } else {
                s.port
            };
            json!({
                "22/tcp": [{"HostIp": "0.0.0.0", "HostPort": port.to_string()}],
                "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41235"}],
            })
        }
        _ => Value::Null,
    };
    let start = now_epoch(i.billing_started);
    json!({
        "id": i.id,
        "machine_id": 1000 + i.offer_id,
        "host_id": 500 + i.offer_id,
        "actual_status": i.actual_status,
        "intended_status": i.intended_status,
        "cur_state": i.cur_state,
        "next_state": i.next_state,
        "status_msg": i.status_msg,
        "label": i.label,
        "image_uuid": i.image,
        "image_runtype": "ssh_direc ssh_proxy",
        "onstart": i.onstart,
        "extra_env": [],
        "num_gpus": i.num_gpus,
        "gpu_name": i.gpu_name,
        "gpu_util": 0.0,
        "dph_total": i.dph_total,
        "dph_base": i.dph_total * 0.9,
        "is_bid": i.bid.is_some(),
        "min_bid": i.bid,
        "disk_space": i.disk,
        // $/GB/month, as the offer priced the disk.
        "storage_cost": if i.disk > 0.0 { i.storage_per_hour * 30.0 * 24.0 / i.disk } else { 0.0 },
        "start_date": start,
        // The proxy route exists from the start (sshN.vast.ai in reality); it is not
        // where the job should go before the container runs.
        "ssh_host": "ssh7.vast.example",
        "ssh_port": 27000 + (i.id % 1000),
        "ssh_idx": "7",
        // Stray whitespace, as the real API has: clients must trim.
        "public_ipaddr": ssh.map(|s| format!("{} ", s.host)),
        "local_ipaddrs": "172.17.0.2 \n",
        "direct_port_start": 41230,
        "direct_port_end": 41240,
        "ports": ports,
        "geolocation": "Atlantis, AT",
        "reliability2": 0.995,
        "verification": "verified",
        "cuda_max_good": 12.4,
        "driver_version": "550.54.14",
    })
}

fn list(st: &State, uri: &Uri) -> Response {
    let limit = query_param(uri, "limit")
        .and_then(|l| serde_json::from_str::<Value>(&l).ok())
        .and_then(|v| number(&v))
        .map(|l| l as i64)
        .unwrap_or(25);
    let limit = if limit <= 0 { 5 } else { limit.min(25) } as usize;
    let after: u64 = query_param(uri, "after_token")
        .map(|t| t.trim_matches('"').to_string())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let filters = query_param(uri, "select_filters")
        .and_then(|f| serde_json::from_str::<Value>(&f).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let mut all: Vec<Value> = st
        .instances
        .iter()
        .filter(|i| !i.destroyed)
        .map(|i| instance_json(&st.config, i))
        .filter(|v| {
            filters.iter().all(|(field, cond)| {
                let have = v.get(field.as_str()).unwrap_or(&Value::Null);
                cond.as_object()
                    .is_some_and(|c| c.iter().all(|(op, want)| matches(field, have, op, want)))
            })
        })
        .collect();
    all.sort_by_key(|v| v["id"].as_u64().unwrap_or(0));
    let total = all.len();
    let page: Vec<Value> = all
        .into_iter()
        .filter(|v| v["id"].as_u64().unwrap_or(0) > after)
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    let page: Vec<Value> = page.into_iter().take(limit).collect();
    let next = if more {
        page.last()
            .map(|v| json!(v["id"].as_u64().unwrap_or(0).to_string()))
    } else {
        None
    };
    json_response(
        200,
        json!({
            "success": true,
            "instances": page,
            "next_token": next,
            "total_instances": total,
            "instances_found": total,
            "label_counts": {},
        }),
    )
}
