//! A local HTTP server that behaves like RunPod's REST v2 pod API as
//! `shared/providers.md` (§3) describes it, for the RunPod client's tests. A pod's
//! direct TCP SSH endpoint is a real local sshd; its proxy endpoint leads nowhere (the
//! real proxy offers no exec or file copy).
//!
//! What it emulates: `POST /v2/pods` with a strict `CreatePodRequest` (unknown fields,
//! both `gpu` and `cpu`, a missing `name`/`image` → 422 with `errors[]`), 201 with
//! `PROVISIONING`, then `STARTING`, then `RUNNING`, with `ssh.direct` and `runtime` only
//! a while after RUNNING (ports appear late); exactly the GPU type asked for, refused
//! with 400 "There are no longer any instances available ..." where it has no stock;
//! `GET /v2/pods` (`{"pods": [...]}`), `GET /v2/pods/{id}` (404 once gone),
//! `DELETE /v2/pods/{id}` (204, then 404), `POST /v2/pods/{id}/action` enforcing the
//! allowed-action table (409 otherwise); `GET /v2/catalog/gpus` with availability;
//! per GPU type the clouds that rent it and the data centers that have it: a create's
//! `cloud` and `dataCenterIds` (RunPod's upper-case ids, else 422) place the pod in the
//! first listed data center with stock, or are refused as no capacity;
//! account ssh keys (GET, PUT replacing the set); the pod's `PUBLIC_KEY` (or, with
//! `startSsh`, the account keys) written into the sshd's `authorized_keys` once running;
//! RFC 9457 problem bodies; a per-minute quota with `RateLimit` and `RateLimit-Policy`
//! on every authenticated answer and 429 + `Retry-After` beyond it; 401 without them.
//!
//! Faults (`RunpodServer::inject`): 429 storms, HTML 5xx pages, a held create answer.
//! Behind the client's back: a pod exits (interruption without warning), is deleted,
//! or is planted. Records: every pod with billing start (create) and stop (delete).
#![allow(dead_code)]

use crate::support::faults::{Chaos, cut};
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub const API_KEY: &str = "rpa_TESTKEY0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Create,
    List,
    Get,
    Delete,
    Action,
    Catalog,
    SshKeys,
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    TooManyRequests,
    Html(u16),
    /// Create: the pod is made, the answer waits this long.
    HoldAnswer(Duration),
    /// Create: the GPU type's stock is gone just before this create.
    NoStock,
    /// HTTP 200 whose body is a problem (an error inside a success).
    ErrorInOk,
    /// Delete: 204, and the pod is not deleted (a "success" that did nothing).
    EmptySuccess,
}

#[derive(Debug, Clone)]
struct Injected {
    endpoint: Option<Endpoint>,
    fault: Fault,
    times: u32,
}

#[derive(Debug, Clone)]
pub struct Gpu {
    pub id: String,
    pub name: String,
    pub memory: u64,
    pub secure_price: f64,
    pub community_price: f64,
    /// Pods that may still be created of this type (per cloud alike).
    pub stock: u32,
    /// The data centers where it has that stock, in the order the scheduler fills them
    /// when a create names none.
    pub data_centers: Vec<String>,
    /// Which clouds rent it (RunPod's catalog `secure` / `community`).
    pub secure: bool,
    pub community: bool,
}

pub fn gpu(id: &str, name: &str, memory: u64, price: f64, stock: u32) -> Gpu {
    Gpu {
        id: id.into(),
        name: name.into(),
        memory,
        secure_price: price,
        community_price: (price * 0.6 * 100.0).round() / 100.0,
        stock,
        data_centers: vec!["US-TX-3".into()],
        secure: true,
        community: true,
    }
}

/// Data center ids RunPod's v2 schema accepts in `dataCenterIds` (an enum there: any
/// other id, a lowercase one included, is a validation error).
pub const DATA_CENTERS: &[&str] = &[
    "AP-JP-1", "CA-MTL-1", "CA-MTL-2", "CA-MTL-3", "EU-CZ-1", "EU-FR-1", "EU-NL-1", "EU-RO-1",
    "EU-SE-1", "EUR-IS-1", "EUR-IS-2", "EUR-NO-1", "OC-AU-1", "US-CA-2", "US-DE-1", "US-GA-1",
    "US-GA-2", "US-IL-1", "US-KS-2", "US-KS-3", "US-NC-1", "US-TX-1", "US-TX-3", "US-TX-4",
    "US-WA-1",
];

#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub authorized_keys: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: String,
    pub starting_after: Duration,
    pub running_after: Duration,
    /// RUNNING without ports until this long after create.
    pub ports_after: Duration,
    /// Requests per minute window (the `RateLimit-Policy` minute quota).
    pub per_minute: u32,
    /// A new pod is missing from `GET /pods` (not from `GET /pods/{id}`) this long.
    pub list_lag: Duration,
    pub ssh: Option<SshTarget>,
    /// Each pod gets a key of its own (`RUNPOD_API_KEY` inside it), good only for its
    /// own pod, written once its ports are up into `<dir>/<pod id>/rp_environment` as
    /// RunPod's images export the container's environment to `/etc/rp_environment`.
    pub pod_env_dir: Option<PathBuf>,
    /// Faults at rates (`support/faults.rs`), drawn per request before anything else.
    pub faults: Option<Arc<crate::support::faults::Faults>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            api_key: API_KEY.into(),
            starting_after: Duration::from_millis(200),
            running_after: Duration::from_millis(600),
            ports_after: Duration::from_millis(1200),
            per_minute: 10_000,
            list_lag: Duration::ZERO,
            ssh: None,
            pod_env_dir: None,
            faults: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PodRecord {
    pub id: String,
    pub name: String,
    pub status: String,
    pub gpu_id: String,
    pub gpu_count: u64,
    pub cloud: String,
    pub data_center: Option<String>,
    pub image: String,
    pub env: Value,
    pub body: Value,
    pub billing_started: SystemTime,
    pub billing_stopped: Option<SystemTime>,
    pub deleted: bool,
    /// Kept as is by the boot timers (exited, error).
    frozen: bool,
    created: Instant,
    keys_written: bool,
    /// The container keeps crashing: RUNNING a moment, then STARTING again.
    looping: bool,
    /// When the container last came up (`startedAt`), and last went down.
    started_at: Option<SystemTime>,
    went_down: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub endpoint: Endpoint,
    pub status: u16,
    pub at: Instant,
    /// `account`, `pod:<id>` (a pod's own key) or empty.
    pub key: String,
    /// The query string, as sent.
    pub query: String,
}

struct State {
    config: Config,
    gpus: Vec<Gpu>,
    pods: Vec<PodRecord>,
    requests: Vec<RequestRecord>,
    faults: VecDeque<Injected>,
    account_keys: Vec<String>,
    window_start: Instant,
    window_used: u32,
    creates_received: u64,
    /// Every create body that reached the server's handler, refused ones included.
    create_bodies: Vec<Value>,
    next: u64,
    proxy_port: u16,
}

pub struct RunpodServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunpodServer {
    pub fn start(config: Config, gpus: Vec<Gpu>) -> RunpodServer {
        // A port nobody listens on: what the ssh proxy is to a client that needs exec.
        let proxy_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or(9, |a| a.port());
        let state = Arc::new(Mutex::new(State {
            config,
            gpus,
            pods: Vec::new(),
            requests: Vec::new(),
            faults: VecDeque::new(),
            account_keys: Vec::new(),
            window_start: Instant::now(),
            window_used: 0,
            creates_received: 0,
            create_bodies: Vec::new(),
            next: 1,
            proxy_port,
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind runpod server");
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
        RunpodServer {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/v2`, what `ASIMOV_RUNPOD_API_URL` takes.
    pub fn url(&self) -> String {
        format!("http://{}/v2", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn configure(&self, f: impl FnOnce(&mut Config)) {
        f(&mut self.lock().config);
    }

    /// Changes the GPU types' stock, data centers and clouds.
    pub fn configure_gpus(&self, f: impl FnOnce(&mut [Gpu])) {
        f(&mut self.lock().gpus);
    }

    pub fn create_bodies(&self) -> Vec<Value> {
        self.lock().create_bodies.clone()
    }

    pub fn inject(&self, endpoint: Option<Endpoint>, fault: Fault, times: u32) {
        self.lock().faults.push_back(Injected {
            endpoint,
            fault,
            times,
        });
    }

    pub fn pods(&self) -> Vec<PodRecord> {
        tick(&self.state);
        self.lock().pods.clone()
    }

    /// Pods not deleted (EXITED ones included: they keep their disk and machine).
    pub fn live(&self) -> Vec<PodRecord> {
        self.pods().into_iter().filter(|p| !p.deleted).collect()
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.lock().requests.clone()
    }

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

    /// The pod stops without warning (an interruption): EXITED, ports gone.
    pub fn exit_pod(&self, id: &str) {
        let mut st = self.lock();
        if let Some(p) = st.pods.iter_mut().find(|p| p.id == id) {
            p.status = "EXITED".into();
            p.frozen = true;
        }
    }

    /// The pod's container crashes and restarts over and over (a bad image or
    /// entrypoint): RUNNING a moment, STARTING, RUNNING with a new `startedAt`, ...
    pub fn restart_loop(&self, id: &str) {
        let mut st = self.lock();
        if let Some(p) = st.pods.iter_mut().find(|p| p.id == id) {
            p.looping = true;
        }
    }

    pub fn delete_behind_back(&self, id: &str) {
        let mut st = self.lock();
        if let Some(p) = st.pods.iter_mut().find(|p| p.id == id) {
            delete_record(p);
        }
    }

    pub fn plant(&self, gpu_id: &str, name: &str) -> String {
        let mut st = self.lock();
        let body = json!({"name": name, "image": "ubuntu:22.04", "gpu": {"id": gpu_id}});
        new_pod(&mut st, &body, gpu_id, 1, "SECURE", "US-TX-3")
    }
}

impl Drop for RunpodServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The key a pod gets of its own.
pub fn pod_key(id: &str) -> String {
    format!("pod-key-{id}-7f3a9c")
}

/// Whose key authenticates the request: `account`, `pod:<id>`, or nobody.
fn who(st: &State, headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))?;
    if bearer == st.config.api_key {
        return Some("account".into());
    }
    // Pods have keys of their own only where the server exports them.
    st.config.pod_env_dir.as_ref()?;
    st.pods
        .iter()
        .find(|p| !p.deleted && bearer == pod_key(&p.id))
        .map(|p| format!("pod:{}", p.id))
}

fn delete_record(p: &mut PodRecord) {
    if !p.deleted {
        p.deleted = true;
        p.status = "TERMINATED".into();
        p.billing_stopped = Some(SystemTime::now());
    }
}

fn pod_id(n: u64) -> String {
    const A: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5bd1_e995;
    (0..10)
        .map(|_| {
            let c = A[(x % A.len() as u64) as usize] as char;
            x /= A.len() as u64;
            c
        })
        .collect()
}

fn new_pod(
    st: &mut State,
    body: &Value,
    gpu_id: &str,
    count: u64,
    cloud: &str,
    data_center: &str,
) -> String {
    let id = pod_id(st.next);
    st.next += 1;
    st.pods.push(PodRecord {
        id: id.clone(),
        name: body
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        status: "PROVISIONING".into(),
        gpu_id: gpu_id.to_string(),
        gpu_count: count,
        cloud: cloud.to_string(),
        data_center: Some(data_center.to_string()),
        image: body
            .get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        env: body.get("env").cloned().unwrap_or(json!({})),
        body: body.clone(),
        billing_started: SystemTime::now(),
        billing_stopped: None,
        deleted: false,
        frozen: false,
        created: Instant::now(),
        keys_written: false,
        looping: false,
        started_at: None,
        went_down: None,
    });
    id
}

fn tick(state: &Arc<Mutex<State>>) {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = st.config.clone();
    let account = st.account_keys.clone();
    let mut keys = Vec::new();
    for p in st.pods.iter_mut().filter(|p| !p.deleted && !p.frozen) {
        let age = p.created.elapsed();
        if p.looping {
            // Up for a second, down for a third of one, again and again.
            match p.went_down {
                Some(at) if at.elapsed() >= Duration::from_millis(300) => {
                    p.status = "RUNNING".into();
                    p.started_at = Some(SystemTime::now());
                    p.went_down = None;
                }
                Some(_) => {}
                None if p
                    .started_at
                    .and_then(|t| t.elapsed().ok())
                    .is_none_or(|e| e >= Duration::from_secs(1)) =>
                {
                    p.status = "STARTING".into();
                    p.went_down = Some(Instant::now());
                }
                None => {}
            }
            continue;
        }
        if age >= cfg.running_after {
            if p.status != "RUNNING" {
                p.started_at = Some(SystemTime::now());
            }
            p.status = "RUNNING".into();
        } else if age >= cfg.starting_after {
            p.status = "STARTING".into();
        }
        if age >= cfg.ports_after && !p.keys_written {
            p.keys_written = true;
            if let Some(dir) = &cfg.pod_env_dir {
                let dir = dir.join(&p.id);
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(
                    dir.join("rp_environment"),
                    format!(
                        "export RUNPOD_POD_ID=\"{id}\"\nexport RUNPOD_API_KEY=\"{key}\"\n",
                        id = p.id,
                        key = pod_key(&p.id)
                    ),
                );
            }
            if let Some(k) = p.env.get("PUBLIC_KEY").and_then(Value::as_str) {
                keys.push(k.to_string());
            }
            if p.body.get("startSsh").and_then(Value::as_bool) == Some(true) {
                keys.extend(account.iter().cloned());
            }
        }
    }
    let Some(ssh) = cfg.ssh else { return };
    if keys.is_empty() {
        return;
    }
    let existing = std::fs::read_to_string(&ssh.authorized_keys).unwrap_or_default();
    let mut text = existing.clone();
    for k in keys {
        if !text.contains(k.trim()) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(k.trim());
            text.push('\n');
        }
    }
    if text != existing {
        let _ = std::fs::write(&ssh.authorized_keys, text);
    }
}

fn classify(method: &Method, path: &str) -> Endpoint {
    match (method.as_str(), path) {
        ("POST", "/v2/pods") => Endpoint::Create,
        ("GET", "/v2/pods") => Endpoint::List,
        ("POST", p) if p.starts_with("/v2/pods/") && p.ends_with("/action") => Endpoint::Action,
        ("GET", p) if p.starts_with("/v2/pods/") => Endpoint::Get,
        ("DELETE", p) if p.starts_with("/v2/pods/") => Endpoint::Delete,
        ("GET", p) if p.starts_with("/v2/catalog/gpus") => Endpoint::Catalog,
        (_, "/v2/account/ssh-keys") => Endpoint::SshKeys,
        _ => Endpoint::Other,
    }
}

fn problem(status: u16, detail: &str, errors: Option<Vec<String>>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({
        "title": code.canonical_reason().unwrap_or("Error"),
        "status": status,
        "detail": detail,
    });
    if let Some(es) = errors {
        body["errors"] = json!(es);
    }
    (
        code,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn html(status: u16) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        [(header::CONTENT_TYPE, "text/html")],
        format!(
            "<html><head><title>{status} | api.runpod.io | Cloudflare</title></head>\
             <body>Bad gateway</body></html>"
        ),
    )
        .into_response()
}

fn actions(status: &str) -> Vec<&'static str> {
    match status {
        "RUNNING" => vec!["stop", "restart", "terminate"],
        "EXITED" | "ERROR" => vec!["start", "terminate"],
        "PROVISIONING" | "STARTING" => vec!["stop", "terminate"],
        _ => vec![],
    }
}

fn pod_json(st: &State, p: &PodRecord) -> Value {
    let price = st.gpus.iter().find(|g| g.id == p.gpu_id).map_or(0.5, |g| {
        if p.cloud == "COMMUNITY" {
            g.community_price
        } else {
            g.secure_price
        }
    }) * p.gpu_count as f64;
    let ports_up = p.status == "RUNNING" && p.created.elapsed() >= st.config.ports_after;
    let direct = match (&st.config.ssh, ports_up) {
        (Some(s), true) => json!({"host": s.host, "port": s.port, "username": "root",
            "command": format!("ssh root@{} -p {}", s.host, s.port)}),
        _ => Value::Null,
    };
    let proxy = if p.status == "RUNNING" {
        json!({"host": "127.0.0.1", "port": st.proxy_port, "username": format!("{}-64410a1b", p.id),
            "command": format!("ssh {}-64410a1b@ssh.runpod.io -i ~/.ssh/id_ed25519", p.id)})
    } else {
        Value::Null
    };
    let runtime = if ports_up {
        let s = st.config.ssh.as_ref();
        json!({"uptime": p.created.elapsed().as_secs(), "gpus": [], "ports": [
            {"private": 22, "public": s.map_or(0, |s| s.port), "type": "tcp",
             "ip": s.map_or("", |s| s.host.as_str())}]})
    } else {
        Value::Null
    };
    json!({
        "id": p.id,
        "name": p.name,
        "status": p.status,
        "actions": actions(&p.status),
        "image": p.image,
        "gpu": {"id": p.gpu_id, "count": p.gpu_count},
        "cloud": p.cloud,
        "dataCenterId": if p.status == "PROVISIONING" { Value::Null } else {
            json!(p.data_center.clone().unwrap_or_else(|| "US-TX-3".into())) },
        "ports": ["22/tcp"],
        "env": p.env,
        "ssh": {"direct": direct, "proxy": proxy},
        "runtime": runtime,
        "cost": if p.status == "EXITED" || p.deleted { 0.0 } else { price },
        "locked": false,
        "startedAt": p.started_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
    })
}

const CREATE_FIELDS: &[&str] = &[
    "name",
    "image",
    "gpu",
    "cpu",
    "cloud",
    "dataCenterIds",
    "disk",
    "mounts",
    "ports",
    "env",
    "args",
    "registry",
    "startSsh",
    "startJupyter",
    "globalNetworking",
    "templateId",
];
const GPU_FIELDS: &[&str] = &["id", "count", "minCudaVersion", "allowedCudaVersions"];

/// Each request is handled to its end in a task of its own: hyper drops a handler whose
/// client hung up, and a real server that was slow to answer still acts (a create held
/// past the client's timeout creates its pod).
async fn handle(
    state: Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    tokio::spawn(handle_to_the_end(state, method, uri, headers, body))
        .await
        .unwrap_or_else(|_| html(500))
}

async fn handle_to_the_end(
    state: Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    let endpoint = classify(&method, &path);
    let body_json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let faults = state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .config
        .faults
        .clone();
    let chaos = crate::support::faults::draw(&faults, endpoint == Endpoint::Create);
    match chaos {
        Some(Chaos::Html(status)) => return html(status),
        Some(Chaos::TooMany) => {
            let mut r = problem(429, "rate limit exceeded for the minute window", None);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Some(Chaos::Capacity) => {
            return problem(
                400,
                "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                None,
            );
        }
        Some(Chaos::CutBefore) => return cut(ok(200, json!({}))),
        Some(Chaos::Slow(d)) => tokio::time::sleep(d).await,
        Some(Chaos::CutAfter) | None => {}
    }
    let (mut response, hold) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if endpoint == Endpoint::Create {
            st.creates_received += 1;
        }
        // Before the answer: a pod's key stops working once its pod is deleted.
        let key = who(&st, &headers).unwrap_or_default();
        let (mut response, hold, authed) =
            answer(&mut st, &method, &uri, endpoint, &headers, &body_json);
        if authed {
            let left = st.config.per_minute.saturating_sub(st.window_used);
            let reset = 60u64.saturating_sub(st.window_start.elapsed().as_secs());
            let h = response.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!(
                "\"minute\";r={left};t={reset}, \"hour\";r=2999;t=3600"
            )) {
                h.insert("ratelimit", v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!(
                "\"minute\";q={};w=60, \"hour\";q=3000;w=3600, \"day\";q=50000;w=86400",
                st.config.per_minute
            )) {
                h.insert("ratelimit-policy", v);
            }
        }
        st.requests.push(RequestRecord {
            key,
            method: method.to_string(),
            path: path.clone(),
            endpoint,
            status: response.status().as_u16(),
            at: Instant::now(),
            query: uri.query().unwrap_or("").to_string(),
        });
        if endpoint == Endpoint::Create {
            st.create_bodies.push(body_json.clone());
        }
        let _ = &mut response;
        (response, hold)
    };
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
    }
    let _ = &mut response;
    if chaos == Some(Chaos::CutAfter) {
        return cut(response);
    }
    response
}

/// The answer, how long to hold it, and whether the caller was authenticated.
fn answer(
    st: &mut State,
    method: &Method,
    uri: &Uri,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &Value,
) -> (Response, Option<Duration>, bool) {
    let path = uri.path().trim_end_matches('/');
    let query = uri.query().unwrap_or("");
    let pod_of = |path: &str| -> String {
        path.trim_start_matches("/v2/pods/")
            .trim_end_matches("/action")
            .to_string()
    };
    match who(st, headers).as_deref() {
        None => {
            return (
                problem(401, "invalid or missing api key", None),
                None,
                false,
            );
        }
        Some("account") => {}
        // A pod's own key reaches that pod only.
        Some(pod) => {
            let own = matches!(
                endpoint,
                Endpoint::Get | Endpoint::Delete | Endpoint::Action
            ) && pod.strip_prefix("pod:") == Some(pod_of(path).as_str());
            if !own {
                return (problem(403, "this key may not do that", None), None, true);
            }
        }
    }
    if st.window_start.elapsed() >= Duration::from_secs(60) {
        st.window_start = Instant::now();
        st.window_used = 0;
    }
    if st.window_used >= st.config.per_minute {
        let reset = 60u64
            .saturating_sub(st.window_start.elapsed().as_secs())
            .max(1);
        let mut r = problem(429, "rate limit exceeded for the minute window", None);
        if let Ok(v) = HeaderValue::from_str(&reset.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return (r, None, true);
    }
    st.window_used += 1;
    let mut hold = None;
    if let Some(pos) = st
        .faults
        .iter()
        .position(|f| f.endpoint.is_none() || f.endpoint == Some(endpoint))
    {
        let f = st.faults[pos].fault.clone();
        st.faults[pos].times -= 1;
        if st.faults[pos].times == 0 {
            st.faults.remove(pos);
        }
        match f {
            Fault::TooManyRequests => {
                let mut r = problem(429, "rate limit exceeded for the minute window", None);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return (r, None, true);
            }
            Fault::Html(s) => return (html(s), None, false),
            Fault::HoldAnswer(d) => hold = Some(d),
            Fault::ErrorInOk => {
                let mut r = problem(500, "internal error", None);
                *r.status_mut() = StatusCode::OK;
                return (r, None, true);
            }
            Fault::EmptySuccess if endpoint == Endpoint::Delete => {
                return (StatusCode::NO_CONTENT.into_response(), None, true);
            }
            Fault::EmptySuccess => {}
            Fault::NoStock => {
                return (
                    problem(
                        400,
                        "There are no longer any instances available with the requested specifications. Please refresh and try again.",
                        None,
                    ),
                    None,
                    true,
                );
            }
        }
    }
    let response = match endpoint {
        Endpoint::Create => create(st, body),
        Endpoint::List => {
            let pods: Vec<Value> = st
                .pods
                .iter()
                .filter(|p| !p.deleted && p.created.elapsed() >= st.config.list_lag)
                .map(|p| pod_json(st, p))
                .collect();
            ok(200, json!({ "pods": pods }))
        }
        Endpoint::Get => {
            let id = pod_of(path);
            match st.pods.iter().find(|p| p.id == id && !p.deleted) {
                Some(p) => ok(200, pod_json(st, p)),
                None => problem(404, &format!("pod {id} not found"), None),
            }
        }
        Endpoint::Delete => {
            let id = pod_of(path);
            match st.pods.iter_mut().find(|p| p.id == id && !p.deleted) {
                Some(p) => {
                    delete_record(p);
                    StatusCode::NO_CONTENT.into_response()
                }
                None => problem(404, &format!("pod {id} not found"), None),
            }
        }
        Endpoint::Action => {
            let id = pod_of(path);
            let action = body.get("action").and_then(Value::as_str).unwrap_or("");
            match st.pods.iter_mut().find(|p| p.id == id && !p.deleted) {
                None => problem(404, &format!("pod {id} not found"), None),
                Some(p) if !actions(&p.status).contains(&action) => problem(
                    409,
                    &format!(
                        "action {action:?} is not allowed while the pod is {}",
                        p.status
                    ),
                    None,
                ),
                Some(p) => match action {
                    "terminate" => {
                        delete_record(p);
                        StatusCode::NO_CONTENT.into_response()
                    }
                    "stop" => {
                        p.status = "EXITED".into();
                        p.frozen = true;
                        let p = p.clone();
                        ok(200, pod_json(st, &p))
                    }
                    _ => {
                        p.status = "PROVISIONING".into();
                        p.frozen = false;
                        p.keys_written = false;
                        p.created = Instant::now();
                        let p = p.clone();
                        ok(200, pod_json(st, &p))
                    }
                },
            }
        }
        Endpoint::Catalog => {
            let gpus: Vec<Value> = st
                .gpus
                .iter()
                .map(|g| {
                    // Availability in the cloud asked for (`cloud=` in the query).
                    let offered = match query_param(query, "cloud").as_deref() {
                        Some("COMMUNITY") => g.community,
                        Some("SECURE") => g.secure,
                        _ => g.secure || g.community,
                    };
                    let availability = match (offered, g.stock) {
                        (false, _) | (_, 0) => "NONE",
                        (_, 1..=2) => "LOW",
                        _ => "HIGH",
                    };
                    let dcs: Vec<Value> = g
                        .data_centers
                        .iter()
                        .map(|d| json!({"id": d, "name": d, "availability": availability}))
                        .collect();
                    json!({
                        "id": g.id, "name": g.name, "manufacturer": "Nvidia", "memory": g.memory,
                        "secure": g.secure, "community": g.community,
                        "price": {"secure": g.secure_price, "community": g.community_price},
                        "availability": availability,
                        "dataCenters": dcs,
                    })
                })
                .collect();
            ok(200, json!({ "gpus": gpus }))
        }
        Endpoint::SshKeys if method == Method::GET => ok(200, json!({"keys": st.account_keys})),
        Endpoint::SshKeys if method == Method::PUT => {
            match body.get("keys").and_then(Value::as_array) {
                Some(ks) => {
                    st.account_keys = ks
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect();
                    ok(200, json!({"keys": st.account_keys}))
                }
                None => problem(
                    422,
                    "validation failed",
                    Some(vec!["keys is required".into()]),
                ),
            }
        }
        _ => problem(404, "not found", None),
    };
    (response, hold, true)
}

/// One parameter of a query string (the ones read here are plain words).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

fn create(st: &mut State, body: &Value) -> Response {
    let Some(obj) = body.as_object() else {
        return problem(
            422,
            "validation failed",
            Some(vec!["body must be an object".into()]),
        );
    };
    let mut errors: Vec<String> = obj
        .keys()
        .filter(|k| !CREATE_FIELDS.contains(&k.as_str()))
        .map(|k| format!("unknown field {k:?}"))
        .collect();
    if let Some(g) = obj.get("gpu").and_then(Value::as_object) {
        errors.extend(
            g.keys()
                .filter(|k| !GPU_FIELDS.contains(&k.as_str()))
                .map(|k| format!("unknown field \"gpu.{k}\"")),
        );
    }
    if obj
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        errors.push("name is required".into());
    }
    if obj.get("image").and_then(Value::as_str).is_none() && obj.get("templateId").is_none() {
        errors.push("image is required unless templateId is given".into());
    }
    match (obj.get("gpu"), obj.get("cpu")) {
        (Some(_), Some(_)) => errors.push("exactly one of gpu or cpu".into()),
        (None, None) => errors.push("one of gpu or cpu is required".into()),
        _ => {}
    }
    let cloud = obj.get("cloud").and_then(Value::as_str).unwrap_or("SECURE");
    if cloud != "SECURE" && cloud != "COMMUNITY" {
        errors.push(format!("cloud must be SECURE or COMMUNITY, not {cloud:?}"));
    }
    let wanted_dcs: Vec<String> = match obj.get("dataCenterIds") {
        None => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|id| match id.as_str() {
                Some(id) if DATA_CENTERS.contains(&id) => Some(id.to_string()),
                _ => {
                    errors.push(format!("dataCenterIds: {id} is not a data center id"));
                    None
                }
            })
            .collect(),
        Some(other) => {
            errors.push(format!("dataCenterIds must be an array, not {other}"));
            Vec::new()
        }
    };
    if !errors.is_empty() {
        return problem(422, "validation failed", Some(errors));
    }
    let gpu_id = obj
        .get("gpu")
        .and_then(|g| g.get("id"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let count = obj
        .get("gpu")
        .and_then(|g| g.get("count"))
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let Some(g) = st.gpus.iter_mut().find(|g| g.id == gpu_id) else {
        return problem(400, &format!("gpu type {gpu_id:?} does not exist"), None);
    };
    // Exactly that GPU type in that cloud, in the first data center of the preference
    // list that has it (any of its own when the list is empty), or none at all.
    let in_cloud = if cloud == "COMMUNITY" {
        g.community
    } else {
        g.secure
    };
    let placed = if wanted_dcs.is_empty() {
        g.data_centers.first().cloned()
    } else {
        wanted_dcs
            .iter()
            .find(|d| g.data_centers.contains(d))
            .cloned()
    };
    let (Some(dc), true, true) = (placed, in_cloud, g.stock > 0) else {
        return problem(
            400,
            "There are no longer any instances available with the requested specifications. Please refresh and try again.",
            None,
        );
    };
    g.stock -= 1;
    let id = new_pod(st, body, &gpu_id, count, cloud, &dc);
    let p = st.pods.iter().find(|p| p.id == id).cloned();
    match p {
        Some(p) => ok(201, pod_json(st, &p)),
        None => problem(500, "internal", None),
    }
}
