//! A local HTTP server that behaves like Lambda Cloud's v1 API as `shared/providers.md`
//! (§2) describes it, for the Lambda client's tests. Its instances' `ip` is a real local
//! sshd's loopback address, which listens on port 22 like a Lambda VM's.
//!
//! What it emulates: the `{"data": ...}` envelope and `{"error": {code, message}}`
//! failures with Lambda's code strings; Bearer and Basic auth (401
//! `global/invalid-api-key`); `GET /instance-types` with `regions_with_capacity_available`;
//! `POST /instance-operations/launch` checking its body (region and type known, exactly
//! one existing `ssh_key_names` entry, `name` ≤64) and refusing with 400
//! `instance-operations/launch/insufficient-capacity` where the type has no capacity,
//! even where the listing shows some (a configurable race), naming the regions that do;
//! async boot (`booting` without `ip` → `booting` with `ip` → `active`; the launch key is
//! written into the sshd's `authorized_keys` when the VM is active); terminate
//! (`terminating`, then gone: absent from `GET /instances`, 404
//! `global/object-does-not-exist` on get and terminate); a terminate of an instance
//! already `terminating` answering an unknown error; `ssh-keys` list, add, delete;
//! about one request a second overall and one launch per 10 s (scaled), answered 429;
//! instance quota `global/quota-exceeded`.
//!
//! Faults a test can inject (`LambdaServer::inject`): 429 storms, HTML 5xx pages, errors
//! inside HTTP 200, a launch "success" that launched nothing, a held launch answer (the
//! instance exists, the answer waits). Behind the client's back: terminate, preempt,
//! plant an instance. Records: every instance with billing start and stop, every request.
#![allow(dead_code)]

use crate::support::faults::{Chaos, cut};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub const API_KEY: &str = "lambda-test-key-secret_0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    InstanceTypes,
    Launch,
    Terminate,
    List,
    Get,
    SshKeys,
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// 429 with Lambda's error envelope.
    TooManyRequests,
    /// A proxy's HTML error page with this status.
    Html(u16),
    /// HTTP 200 whose body is an error envelope.
    ErrorInOk,
    /// Launch: 200 `{"data":{"instance_ids":[]}}`, and nothing launched; terminate: 200
    /// `{"data":{"terminated_instances":[]}}`, and nothing terminated.
    EmptySuccess,
    /// Launch: the instance is made, then the answer waits this long.
    HoldAnswer(Duration),
}

#[derive(Debug, Clone)]
struct Injected {
    endpoint: Option<Endpoint>,
    fault: Fault,
    times: u32,
}

/// One instance type the server offers.
#[derive(Debug, Clone)]
pub struct TypeSpec {
    pub name: String,
    pub gpu_description: String,
    pub gpus: u64,
    pub price_cents_per_hour: u64,
    /// Regions listed with capacity.
    pub regions: Vec<String>,
    /// Listed with capacity, yet every launch is refused for capacity (the race).
    pub refuse_launches: bool,
    /// This type's own boot time to `active` (8-GPU types take 20-25 minutes), in
    /// place of the server's `active_after`.
    pub boot: Option<Duration>,
}

pub fn instance_type(name: &str, gpu: &str, gpus: u64, cents: u64, regions: &[&str]) -> TypeSpec {
    TypeSpec {
        name: name.to_string(),
        gpu_description: gpu.to_string(),
        gpus,
        price_cents_per_hour: cents,
        regions: regions.iter().map(|r| r.to_string()).collect(),
        refuse_launches: false,
        boot: None,
    }
}

#[derive(Debug, Clone)]
pub struct SshTarget {
    /// A loopback address whose port 22 (or `port`) is a real sshd.
    pub host: String,
    pub port: u16,
    pub authorized_keys: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub api_key: String,
    /// Further API keys of the account (one made for instances to end themselves), each
    /// revocable on its own: remove it here.
    pub other_keys: Vec<String>,
    /// Minimum gap between any two requests, and between two launches; closer → 429.
    pub request_gap: Duration,
    pub launch_gap: Duration,
    /// From launch to `ip` shown, and to `active`.
    pub ip_after: Duration,
    pub active_after: Duration,
    /// From terminate to gone.
    pub gone_after: Duration,
    /// At most this many live instances (`global/quota-exceeded` beyond).
    pub quota: usize,
    pub ssh: Option<SshTarget>,
    /// Faults at rates (`support/faults.rs`), drawn per request before anything else.
    pub faults: Option<Arc<crate::support::faults::Faults>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            api_key: API_KEY.to_string(),
            other_keys: Vec::new(),
            request_gap: Duration::ZERO,
            launch_gap: Duration::ZERO,
            ip_after: Duration::from_millis(300),
            active_after: Duration::from_millis(900),
            gone_after: Duration::from_millis(500),
            quota: 50,
            ssh: None,
            faults: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct InstanceRecord {
    pub id: String,
    pub name: String,
    pub instance_type: String,
    pub region: String,
    pub ssh_key_name: String,
    pub status: String,
    pub ip: Option<String>,
    pub billing_started: SystemTime,
    pub billing_stopped: Option<SystemTime>,
    /// Absent from the listing, 404 on get.
    pub gone: bool,
    /// Kept as is by the boot timers (preempted, unhealthy).
    frozen: bool,
    created: Instant,
    terminated_at: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub endpoint: Endpoint,
    pub status: u16,
    /// When the rate limits judged it: on arrival for a request the server was slow to
    /// act on, else when it was answered.
    pub at: Instant,
    pub body: Value,
    /// The API key the request carried (empty without a valid one).
    pub key: String,
}

#[derive(Debug, Clone)]
struct Key {
    id: String,
    name: String,
    public_key: String,
}

struct State {
    config: Config,
    types: Vec<TypeSpec>,
    instances: Vec<InstanceRecord>,
    requests: Vec<RequestRecord>,
    faults: VecDeque<Injected>,
    keys: Vec<Key>,
    last_request: Option<Instant>,
    last_launch: Option<Instant>,
    launches_received: u64,
    next: u64,
}

pub struct LambdaServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LambdaServer {
    pub fn start(config: Config, types: Vec<TypeSpec>) -> LambdaServer {
        let state = Arc::new(Mutex::new(State {
            config,
            types,
            instances: Vec::new(),
            requests: Vec::new(),
            faults: VecDeque::new(),
            keys: Vec::new(),
            last_request: None,
            last_launch: None,
            launches_received: 0,
            next: 1,
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind lambda server");
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
        LambdaServer {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/api/v1`, what `ASIMOV_LAMBDA_API_URL` takes.
    pub fn url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn configure(&self, f: impl FnOnce(&mut Config)) {
        f(&mut self.lock().config);
    }

    pub fn set_types(&self, f: impl FnOnce(&mut Vec<TypeSpec>)) {
        f(&mut self.lock().types);
    }

    pub fn inject(&self, endpoint: Option<Endpoint>, fault: Fault, times: u32) {
        self.lock().faults.push_back(Injected {
            endpoint,
            fault,
            times,
        });
    }

    /// Every instance ever launched.
    pub fn instances(&self) -> Vec<InstanceRecord> {
        tick(&self.state);
        self.lock().instances.clone()
    }

    /// Instances still billing.
    pub fn billing(&self) -> Vec<InstanceRecord> {
        self.instances()
            .into_iter()
            .filter(|i| i.billing_stopped.is_none())
            .collect()
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

    pub fn launches_received(&self) -> u64 {
        self.lock().launches_received
    }

    pub fn key_names(&self) -> Vec<String> {
        self.lock().keys.iter().map(|k| k.name.clone()).collect()
    }

    /// An SSH key the user added to the account in the console.
    pub fn add_key(&self, name: &str, public_key: &str) {
        let mut st = self.lock();
        let id = format!("{:032x}", 0x0c3e_0000_u64 + st.next);
        st.next += 1;
        st.keys.push(Key {
            id,
            name: name.to_string(),
            public_key: public_key.trim().to_string(),
        });
    }

    /// Terminated from the console: terminating at once, gone soon after.
    pub fn terminate_behind_back(&self, id: &str) {
        let mut st = self.lock();
        if let Some(i) = st.instances.iter_mut().find(|i| i.id == id) {
            terminate_record(i);
        }
    }

    /// The VM is taken back: `preempted`, billing stops.
    pub fn preempt(&self, id: &str) {
        let mut st = self.lock();
        if let Some(i) = st.instances.iter_mut().find(|i| i.id == id) {
            i.status = "preempted".into();
            i.frozen = true;
            i.billing_stopped.get_or_insert_with(SystemTime::now);
        }
    }

    /// Launches an instance named `name` as someone else would; returns its id.
    pub fn plant(&self, type_name: &str, region: &str, name: &str) -> String {
        let mut st = self.lock();
        launch_record(&mut st, type_name, region, "someone", name)
    }
}

impl Drop for LambdaServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn terminate_record(i: &mut InstanceRecord) {
    if i.terminated_at.is_none() {
        i.status = "terminating".into();
        i.frozen = false;
        i.terminated_at = Some(Instant::now());
        i.billing_stopped.get_or_insert_with(SystemTime::now);
    }
}

fn launch_record(st: &mut State, type_name: &str, region: &str, key: &str, name: &str) -> String {
    let id = format!("{:032x}", 0x0a51_0000_0000_u64 + st.next);
    st.next += 1;
    st.instances.push(InstanceRecord {
        id: id.clone(),
        name: name.to_string(),
        instance_type: type_name.to_string(),
        region: region.to_string(),
        ssh_key_name: key.to_string(),
        status: "booting".into(),
        ip: None,
        billing_started: SystemTime::now(),
        billing_stopped: None,
        gone: false,
        frozen: false,
        created: Instant::now(),
        terminated_at: None,
    });
    id
}

fn tick(state: &Arc<Mutex<State>>) {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = st.config.clone();
    let boots: Vec<(String, Duration)> = st
        .types
        .iter()
        .filter_map(|t| t.boot.map(|b| (t.name.clone(), b)))
        .collect();
    let mut newly_active = Vec::new();
    for i in st.instances.iter_mut().filter(|i| !i.gone) {
        let active_after = boots
            .iter()
            .find(|(n, _)| *n == i.instance_type)
            .map_or(cfg.active_after, |(_, b)| *b);
        if let Some(t) = i.terminated_at {
            if t.elapsed() >= cfg.gone_after {
                i.status = "terminated".into();
                i.gone = true;
            }
            continue;
        }
        if i.frozen {
            continue;
        }
        let age = i.created.elapsed();
        if age >= cfg.ip_after && i.ip.is_none() {
            i.ip = Some(
                cfg.ssh
                    .as_ref()
                    .map_or("192.0.2.10".to_string(), |s| s.host.clone()),
            );
        }
        if age >= active_after && i.status == "booting" {
            i.status = "active".into();
            newly_active.push(i.ssh_key_name.clone());
        }
    }
    let Some(ssh) = cfg.ssh else { return };
    if newly_active.is_empty() {
        return;
    }
    let existing = std::fs::read_to_string(&ssh.authorized_keys).unwrap_or_default();
    let mut text = existing.clone();
    for name in newly_active {
        if let Some(k) = st.keys.iter().find(|k| k.name == name)
            && !text.contains(k.public_key.trim())
        {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(k.public_key.trim());
            text.push('\n');
        }
    }
    if text != existing {
        let _ = std::fs::write(&ssh.authorized_keys, text);
    }
}

fn classify(method: &Method, path: &str) -> Endpoint {
    match (method.as_str(), path) {
        ("GET", "/api/v1/instance-types") => Endpoint::InstanceTypes,
        ("POST", "/api/v1/instance-operations/launch") => Endpoint::Launch,
        ("POST", "/api/v1/instance-operations/terminate") => Endpoint::Terminate,
        ("GET", "/api/v1/instances") => Endpoint::List,
        ("GET", p) if p.starts_with("/api/v1/instances/") => Endpoint::Get,
        (_, p) if p.starts_with("/api/v1/ssh-keys") => Endpoint::SshKeys,
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

fn error(status: u16, code: &str, message: impl Into<String>) -> Response {
    json_response(
        status,
        json!({"error": {"code": code, "message": message.into()}}),
    )
}

fn data(body: Value) -> Response {
    json_response(200, json!({ "data": body }))
}

fn html(status: u16) -> Response {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "text/html")],
        format!(
            "<!DOCTYPE html><html><head><title>{status} {reason}</title></head>\
             <body><h1>{reason}</h1><p>cloudflare</p></body></html>"
        ),
    )
        .into_response()
}

/// The account key the request authenticates with, if any.
fn authorized(st: &State, headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())?;
    std::iter::once(&st.config.api_key)
        .chain(&st.config.other_keys)
        .find(|key| {
            if let Some(b) = v.strip_prefix("Bearer ") {
                return b == key.as_str();
            }
            if let Some(b) = v.strip_prefix("Basic ") {
                return b.trim() == base64(format!("{key}:").as_bytes());
            }
            false
        })
        .cloned()
}

/// Standard base64 with padding (HTTP Basic's encoding).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn instance_json(st: &State, i: &InstanceRecord) -> Value {
    let t = st.types.iter().find(|t| t.name == i.instance_type);
    let mut v = json!({
        "id": i.id,
        "name": i.name,
        "status": i.status,
        "hostname": format!("{}.cloud.lambda.test", &i.id[24..]),
        "region": {"name": i.region, "description": i.region},
        "instance_type": t.map_or(json!({"name": i.instance_type}), type_json),
        "ssh_key_names": [i.ssh_key_name],
        "file_system_names": [],
        "tags": [],
        "actions": {
            "terminate": {"available": i.terminated_at.is_none()},
            "restart": if i.status == "active" { json!({"available": true}) } else {
                json!({"available": false, "reason_code": "vm-has-not-launched"}) },
        },
    });
    if let Some(ip) = &i.ip {
        v["ip"] = json!(ip);
        v["private_ip"] = json!("10.19.0.5");
    }
    v
}

fn type_json(t: &TypeSpec) -> Value {
    json!({
        "name": t.name,
        "description": format!("{}x {}", t.gpus, t.gpu_description),
        "gpu_description": t.gpu_description,
        "price_cents_per_hour": t.price_cents_per_hour,
        "specs": {"vcpus": 26 * t.gpus, "memory_gib": 200 * t.gpus, "storage_gib": 512, "gpus": t.gpus},
    })
}

const REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-east-3",
    "us-west-1",
    "us-west-2",
    "us-west-3",
    "us-south-1",
    "us-south-2",
    "us-south-3",
    "us-midwest-1",
    "us-midwest-2",
    "europe-central-1",
    "asia-northeast-1",
    "asia-northeast-2",
    "asia-south-1",
    "australia-east-1",
    "me-west-1",
];

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
    let chaos = crate::support::faults::draw(&faults, endpoint == Endpoint::Launch);
    match chaos {
        Some(Chaos::Html(status)) => return html(status),
        Some(Chaos::TooMany) => {
            return error(429, "global/too-many-requests", "Too many requests.");
        }
        Some(Chaos::Capacity) => {
            return error(
                400,
                "instance-operations/launch/insufficient-capacity",
                "Not enough capacity to fulfill launch request.",
            );
        }
        Some(Chaos::CutBefore) => return cut(data(json!({}))),
        Some(Chaos::Slow(_)) | Some(Chaos::CutAfter) | None => {}
    }
    // A slow request passes the rate limits on arrival (if its key is valid), then
    // waits before it is acted on.
    let mut refused = None;
    let mut judged = None;
    if let Some(Chaos::Slow(d)) = chaos {
        refused = {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            judged = Some(Instant::now());
            if authorized(&st, &headers).is_some() {
                rate_limit(&mut st, endpoint)
            } else {
                None
            }
        };
        if refused.is_none() {
            tokio::time::sleep(d).await;
        }
    }
    let (response, hold) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        if endpoint == Endpoint::Launch {
            st.launches_received += 1;
        }
        let (response, hold) = match refused {
            Some(r) => (r, None),
            None if matches!(chaos, Some(Chaos::Slow(_))) => {
                if authorized(&st, &headers).is_none() {
                    answer(&mut st, &method, &path, endpoint, &headers, &body_json)
                } else {
                    answer_paced(&mut st, &method, &path, endpoint, &body_json)
                }
            }
            None => answer(&mut st, &method, &path, endpoint, &headers, &body_json),
        };
        let status = response.status().as_u16();
        let key = authorized(&st, &headers).unwrap_or_default();
        st.requests.push(RequestRecord {
            key,
            method: method.to_string(),
            path: path.clone(),
            endpoint,
            status,
            at: judged.unwrap_or_else(Instant::now),
            body: body_json,
        });
        (response, hold)
    };
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
    }
    if chaos == Some(Chaos::CutAfter) {
        return cut(response);
    }
    response
}

fn answer(
    st: &mut State,
    method: &Method,
    path: &str,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &Value,
) -> (Response, Option<Duration>) {
    if authorized(st, headers).is_none() {
        return (
            error(
                401,
                "global/invalid-api-key",
                "API key was invalid, expired, or deleted.",
            ),
            None,
        );
    }
    if let Some(refused) = rate_limit(st, endpoint) {
        return (refused, None);
    }
    answer_paced(st, method, path, endpoint, body)
}

/// Lambda's rate limits, judged when a request arrives (a request the server is slow
/// to act on was let in on its arrival): a refused call does nothing.
fn rate_limit(st: &mut State, endpoint: Endpoint) -> Option<Response> {
    let now = Instant::now();
    let too_soon = st
        .last_request
        .is_some_and(|t| now.duration_since(t) < st.config.request_gap)
        || (endpoint == Endpoint::Launch
            && st
                .last_launch
                .is_some_and(|t| now.duration_since(t) < st.config.launch_gap));
    if too_soon {
        return Some(error(
            429,
            "global/too-many-requests",
            "Too many requests. Slow down.",
        ));
    }
    st.last_request = Some(now);
    if endpoint == Endpoint::Launch {
        st.last_launch = Some(now);
    }
    None
}

/// The answer of a request the rate limits let in.
fn answer_paced(
    st: &mut State,
    method: &Method,
    path: &str,
    endpoint: Endpoint,
    body: &Value,
) -> (Response, Option<Duration>) {
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
                return (
                    error(429, "global/too-many-requests", "Too many requests."),
                    None,
                );
            }
            Fault::Html(status) => return (html(status), None),
            Fault::ErrorInOk => {
                return (
                    error(200, "global/internal-error", "Something went wrong."),
                    None,
                );
            }
            Fault::EmptySuccess if endpoint == Endpoint::Launch => {
                return (data(json!({"instance_ids": []})), None);
            }
            Fault::EmptySuccess if endpoint == Endpoint::Terminate => {
                return (data(json!({"terminated_instances": []})), None);
            }
            Fault::EmptySuccess => {}
            Fault::HoldAnswer(d) => hold = Some(d),
        }
    }
    let response = match (method.as_str(), endpoint) {
        ("GET", Endpoint::InstanceTypes) => {
            let mut m = serde_json::Map::new();
            for t in &st.types {
                m.insert(
                    t.name.clone(),
                    json!({
                        "instance_type": type_json(t),
                        "regions_with_capacity_available": t.regions.iter()
                            .map(|r| json!({"name": r, "description": r})).collect::<Vec<_>>(),
                    }),
                );
            }
            data(Value::Object(m))
        }
        ("POST", Endpoint::Launch) => launch(st, body),
        ("POST", Endpoint::Terminate) => terminate(st, body),
        ("GET", Endpoint::List) => {
            let list: Vec<Value> = st
                .instances
                .iter()
                .filter(|i| !i.gone)
                .map(|i| instance_json(st, i))
                .collect();
            data(json!(list))
        }
        ("GET", Endpoint::Get) => {
            let id = path.trim_start_matches("/api/v1/instances/");
            match st.instances.iter().find(|i| i.id == id && !i.gone) {
                Some(i) => data(instance_json(st, i)),
                None => error(
                    404,
                    "global/object-does-not-exist",
                    "Specified instance does not exist.",
                ),
            }
        }
        ("GET", Endpoint::SshKeys) => data(json!(
            st.keys
                .iter()
                .map(|k| json!({"id": k.id, "name": k.name, "public_key": k.public_key}))
                .collect::<Vec<_>>()
        )),
        ("POST", Endpoint::SshKeys) => {
            let name = body.get("name").and_then(Value::as_str).unwrap_or("");
            let key = body.get("public_key").and_then(Value::as_str).unwrap_or("");
            if name.is_empty() || name.len() > 64 || key.is_empty() {
                error(
                    400,
                    "global/invalid-parameters",
                    "Invalid name or public key.",
                )
            } else if st.keys.iter().any(|k| k.name == name) {
                error(
                    400,
                    "global/duplicate",
                    "An SSH key with this name already exists.",
                )
            } else {
                let id = format!("{:032x}", 0x0c3e_0000_u64 + st.next);
                st.next += 1;
                st.keys.push(Key {
                    id: id.clone(),
                    name: name.to_string(),
                    public_key: key.trim().to_string(),
                });
                data(json!({"id": id, "name": name, "public_key": key}))
            }
        }
        ("DELETE", Endpoint::SshKeys) => {
            let id = path.trim_start_matches("/api/v1/ssh-keys/");
            match st.keys.iter().position(|k| k.id == id) {
                Some(p) => {
                    st.keys.remove(p);
                    data(json!({}))
                }
                None => error(400, "global/invalid-parameters", "Invalid SSH key id."),
            }
        }
        _ => error(404, "global/object-does-not-exist", "Not found."),
    };
    (response, hold)
}

fn launch(st: &mut State, body: &Value) -> Response {
    let allowed = [
        "region_name",
        "instance_type_name",
        "ssh_key_names",
        "file_system_names",
        "file_system_mounts",
        "name",
        "hostname",
        "image",
        "user_data",
        "tags",
        "firewall_rulesets",
        "quantity",
    ];
    let Some(obj) = body.as_object() else {
        return error(
            400,
            "global/invalid-parameters",
            "Body must be a JSON object.",
        );
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return error(
            400,
            "global/invalid-parameters",
            format!("Unknown field {k}."),
        );
    }
    let region = obj.get("region_name").and_then(Value::as_str).unwrap_or("");
    let type_name = obj
        .get("instance_type_name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = obj.get("name").and_then(Value::as_str).unwrap_or("");
    let keys: Vec<&str> = obj
        .get("ssh_key_names")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !REGIONS.contains(&region) {
        return error(
            400,
            "global/object-does-not-exist",
            format!("Region {region:?} does not exist."),
        );
    }
    let Some(t) = st.types.iter().find(|t| t.name == type_name).cloned() else {
        return error(
            400,
            "global/object-does-not-exist",
            format!("Instance type {type_name:?} does not exist."),
        );
    };
    if keys.len() != 1 {
        return error(
            400,
            "global/invalid-parameters",
            "Exactly one SSH key name must be provided.",
        );
    }
    if !st.keys.iter().any(|k| k.name == keys[0]) {
        return error(
            400,
            "global/object-does-not-exist",
            format!("SSH key {:?} does not exist.", keys[0]),
        );
    }
    if name.len() > 64 {
        return error(
            400,
            "global/invalid-parameters",
            "Name must be at most 64 characters.",
        );
    }
    if obj.get("quantity").and_then(Value::as_u64).unwrap_or(1) != 1 {
        return error(400, "global/invalid-parameters", "Quantity must be 1.");
    }
    if !t.regions.iter().any(|r| r == region) || t.refuse_launches {
        let with: Vec<String> = st
            .types
            .iter()
            .filter(|o| !o.refuse_launches && !o.regions.is_empty())
            .map(|o| format!("{} ({})", o.name, o.regions.join(", ")))
            .collect();
        return json_response(
            400,
            json!({"error": {
                "code": "instance-operations/launch/insufficient-capacity",
                "message": "Not enough capacity to fulfill launch request.",
                "suggestion": format!("Capacity is available for: {}", with.join("; ")),
            }}),
        );
    }
    let live = st.instances.iter().filter(|i| !i.gone).count();
    if live >= st.config.quota {
        return error(
            400,
            "global/quota-exceeded",
            "Quota exceeded: too many instances.",
        );
    }
    let id = launch_record(st, type_name, region, keys[0], name);
    data(json!({"instance_ids": [id]}))
}

fn terminate(st: &mut State, body: &Value) -> Response {
    let ids: Vec<String> = body
        .get("instance_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() {
        return error(
            400,
            "global/invalid-parameters",
            "instance_ids is required.",
        );
    }
    for id in &ids {
        match st.instances.iter().find(|i| &i.id == id && !i.gone) {
            None => {
                return error(
                    404,
                    "global/object-does-not-exist",
                    format!("Instance {id} does not exist."),
                );
            }
            // What users of other tools hit: an unknown error, not "already terminating".
            Some(i) if i.terminated_at.is_some() => {
                return error(400, "global/unknown", "An unknown error occurred.");
            }
            Some(_) => {}
        }
    }
    let mut out = Vec::new();
    for id in &ids {
        if let Some(i) = st.instances.iter_mut().find(|i| &i.id == id) {
            terminate_record(i);
        }
    }
    for id in &ids {
        if let Some(i) = st.instances.iter().find(|i| &i.id == id) {
            out.push(instance_json(st, i));
        }
    }
    data(json!({"terminated_instances": out}))
}
