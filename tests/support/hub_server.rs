//! A local stand-in for the Hugging Face Hub, as much of it as `huggingface_hub` uses to
//! push a model (`HF_ENDPOINT` points the client at it): `POST /api/repos/create`,
//! `POST /api/validate-yaml`, `POST /api/models/{ns}/{name}/preupload/{rev}` (every file
//! `uploadMode: regular`, so its bytes ride in the commit) and
//! `POST /api/models/{ns}/{name}/commit/{rev}` (an NDJSON body: a header line, then one
//! line per file with its content in base64). Requests need `Authorization: Bearer
//! <token>` with the token it was started with (401 otherwise, as the hub answers).
//!
//! Every request is recorded (method and path), and every commit with its files
//! decoded, so a test can check what was pushed and that nothing was downloaded.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One commit as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Commit {
    /// `ns/name`.
    pub repo: String,
    pub revision: String,
    pub summary: String,
    /// Path in the repository → content.
    pub files: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct CreatedRepo {
    pub repo: String,
    pub private: bool,
}

#[derive(Default)]
struct Records {
    requests: Vec<String>,
    repos: Vec<CreatedRepo>,
    commits: Vec<Commit>,
}

struct Hub {
    token: String,
    url: String,
    records: Mutex<Records>,
}

pub struct HubServer {
    hub: Arc<Hub>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HubServer {
    /// Starts the stand-in on a free localhost port, accepting `token`.
    pub fn start(token: &str) -> HubServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind hub stand-in");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("hub address");
        let hub = Arc::new(Hub {
            token: token.to_string(),
            url: format!("http://{addr}"),
            records: Mutex::new(Records::default()),
        });
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/api/repos/create", post(create_repo))
            .route("/api/validate-yaml", post(validate_yaml))
            .route("/api/models/{ns}/{name}/preupload/{rev}", post(preupload))
            .route("/api/models/{ns}/{name}/commit/{rev}", post(commit))
            .fallback(unknown)
            .layer(axum::middleware::from_fn_with_state(hub.clone(), record))
            .with_state(hub.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop.await;
                    })
                    .await;
            });
        });
        HubServer {
            hub,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The endpoint, for `HF_ENDPOINT`.
    pub fn url(&self) -> &str {
        &self.hub.url
    }

    /// `METHOD /path` of every request, in order.
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    pub fn repos(&self) -> Vec<CreatedRepo> {
        self.lock().repos.clone()
    }

    pub fn commits(&self) -> Vec<Commit> {
        self.lock().commits.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.hub.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn record(
    State(hub): State<Arc<Hub>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let line = format!("{} {}", request.method(), request.uri().path());
    hub.records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .requests
        .push(line);
    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", hub.token).as_str());
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            [("x-error-code", "RepoNotFound")],
            Json(json!({"error": "Invalid credentials in Authorization header"})),
        )
            .into_response();
    }
    next.run(request).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn create_repo(State(hub): State<Arc<Hub>>, Json(body): Json<Value>) -> Response {
    let Some(name) = body.get("name").and_then(Value::as_str) else {
        return error(StatusCode::BAD_REQUEST, "name is required");
    };
    // Older clients send `organization` apart; newer ones `ns/name` in `name`.
    let repo = match body.get("organization").and_then(Value::as_str) {
        Some(org) if !name.contains('/') => format!("{org}/{name}"),
        _ => name.to_string(),
    };
    if body.get("type").and_then(Value::as_str).unwrap_or("model") != "model" {
        return error(StatusCode::BAD_REQUEST, "only model repositories here");
    }
    // `visibility` from huggingface_hub 1.x on, `private` before.
    let private = body.get("visibility").and_then(Value::as_str) == Some("private")
        || body.get("private").and_then(Value::as_bool) == Some(true);
    let mut records = hub.records.lock().unwrap_or_else(|e| e.into_inner());
    let exists = records.repos.iter().any(|r| r.repo == repo);
    let url = format!("{}/{repo}", hub.url);
    if exists {
        // What the hub answers for an existing repo; `exist_ok=True` accepts it.
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": "You already created this model repo", "url": url})),
        )
            .into_response();
    }
    records.repos.push(CreatedRepo {
        repo: repo.clone(),
        private,
    });
    Json(json!({"url": url, "name": repo, "id": repo})).into_response()
}

async fn validate_yaml(Json(body): Json<Value>) -> Response {
    if body.get("content").and_then(Value::as_str).is_none() {
        return error(StatusCode::BAD_REQUEST, "content is required");
    }
    Json(json!({"errors": [], "warnings": []})).into_response()
}

fn known_repo(hub: &Hub, repo: &str) -> bool {
    let records = hub.records.lock().unwrap_or_else(|e| e.into_inner());
    records.repos.iter().any(|r| r.repo == repo)
}

async fn preupload(
    State(hub): State<Arc<Hub>>,
    Path((ns, name, _rev)): Path<(String, String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let repo = format!("{ns}/{name}");
    if !known_repo(&hub, &repo) {
        return error(
            StatusCode::NOT_FOUND,
            format!("repository {repo} not found"),
        );
    }
    let Some(files) = body.get("files").and_then(Value::as_array) else {
        return error(StatusCode::BAD_REQUEST, "files is required");
    };
    let modes: Vec<Value> = files
        .iter()
        .filter_map(|f| f.get("path").and_then(Value::as_str))
        .map(|path| json!({"path": path, "uploadMode": "regular", "shouldIgnore": false}))
        .collect();
    Json(json!({"files": modes, "commitOid": null})).into_response()
}

async fn commit(
    State(hub): State<Arc<Hub>>,
    Path((ns, name, rev)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let repo = format!("{ns}/{name}");
    if !known_repo(&hub, &repo) {
        return error(
            StatusCode::NOT_FOUND,
            format!("repository {repo} not found"),
        );
    }
    // The client sends the NDJSON plain; a compressed body would be a change to learn of.
    if headers.contains_key("content-encoding") {
        return error(
            StatusCode::BAD_REQUEST,
            "compressed commit bodies are not served",
        );
    }
    let body = body.to_vec();
    let text = match String::from_utf8(body) {
        Ok(t) => t,
        Err(_) => return error(StatusCode::BAD_REQUEST, "the body is not UTF-8"),
    };
    let mut summary = None;
    let mut files = BTreeMap::new();
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let Ok(item) = serde_json::from_str::<Value>(line) else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("line {} is not JSON", n + 1),
            );
        };
        let value = &item["value"];
        match item["key"].as_str() {
            Some("header") => summary = value["summary"].as_str().map(str::to_string),
            Some("file") => {
                let (Some(path), Some(content)) =
                    (value["path"].as_str(), value["content"].as_str())
                else {
                    return error(StatusCode::BAD_REQUEST, "a file needs path and content");
                };
                if value["encoding"].as_str() != Some("base64") {
                    return error(StatusCode::BAD_REQUEST, "only base64 files here");
                }
                let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(content) else {
                    return error(StatusCode::BAD_REQUEST, format!("{path}: bad base64"));
                };
                files.insert(path.to_string(), bytes);
            }
            // Every file was offered `regular`: an LFS pointer means the client ignored it.
            Some(other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unexpected commit item {other}"),
                );
            }
            None => return error(StatusCode::BAD_REQUEST, "an item without a key"),
        }
    }
    let Some(summary) = summary else {
        return error(StatusCode::BAD_REQUEST, "the commit has no header");
    };
    let mut records = hub.records.lock().unwrap_or_else(|e| e.into_inner());
    let oid = format!("{:040x}", records.commits.len() + 1);
    records.commits.push(Commit {
        repo: repo.clone(),
        revision: rev,
        summary,
        files,
    });
    Json(json!({
        "success": true,
        "commitOid": oid,
        "commitUrl": format!("{}/{repo}/commit/{oid}", hub.url),
        "pullRequestUrl": null,
    }))
    .into_response()
}

async fn unknown(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("the hub stand-in does not serve {method} {}", uri.path()),
    )
}
