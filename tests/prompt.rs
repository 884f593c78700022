//! `asimov` alone, driven through a real pseudo-terminal like a user at a keyboard: the
//! Hugging Face token asked once (checked against a local hub stand-in through
//! HF_ENDPOINT), six answers typed, the job applied and followed to the end on the local
//! provider; the token only in its 0600 file (not in logs, `ps`, `get -o yaml`); the
//! next prompt remembers the answers and does not ask for the token; Ctrl-C changes
//! nothing; `asimov token` replaces it; without a terminal, the hint to use `apply -f`.

mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use rexpect::process::WaitStatus;
use rexpect::reader::Options;
use rexpect::session::{PtySession, spawn_with_options};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::cli::Asimov;

const TOKEN: &str = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567";
const NEW_TOKEN: &str = "hf_ZyXwVuTsRqPoNmLkJiHgFeDcBa76543210";

/// A hub that knows two tokens: `GET /api/whoami-v2` names their user, else 401.
fn hub_stand_in() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use axum::http::{HeaderMap, StatusCode};
            let app = axum::Router::new().route(
                "/api/whoami-v2",
                axum::routing::get(|headers: HeaderMap| async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    if auth == format!("Bearer {TOKEN}") || auth == format!("Bearer {NEW_TOKEN}") {
                        (StatusCode::OK, r#"{"name":"ada","type":"user"}"#)
                    } else {
                        (
                            StatusCode::UNAUTHORIZED,
                            r#"{"error":"Invalid credentials"}"#,
                        )
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    format!("http://{addr}")
}

/// The template's files for tests: no torch to install; the run checks that HF_TOKEN
/// reached it (by hash, so the token is in no file), takes a `ps` snapshot while the
/// controller, agent and job are all alive, and reports progress.
fn test_template(dir: &Path) -> PathBuf {
    let template = dir.join("template");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(template.join("setup.sh"), "echo setup done\n").unwrap();
    let hash = sha256(TOKEN);
    std::fs::write(
        template.join("run.sh"),
        format!(
            "set -eu\n\
             got=$(printf %s \"$HF_TOKEN\" | sha256sum | cut -d' ' -f1)\n\
             [ \"$got\" = {hash} ] && echo 'token reached the job'\n\
             echo \"model $HF_MODEL dataset $HF_DATASET repo $HF_HUB_REPO\"\n\
             ps -eww -o args\n\
             for i in 1 2 3 4; do echo \"ASIMOV_PROGRESS $i/4\"; sleep 0.2; done\n"
        ),
    )
    .unwrap();
    template
}

fn sha256(s: &str) -> String {
    let out = Command::new("sh")
        .args([
            "-c",
            "printf %s \"$1\" | sha256sum | cut -d' ' -f1",
            "sh",
            s,
        ])
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn spawn(a: &Asimov, hub: &str, template: &Path, args: &[&str]) -> PtySession {
    let mut cmd = a.command();
    cmd.args(args)
        .env("HF_ENDPOINT", hub)
        .env("ASIMOV_FINETUNE_TEMPLATE", template)
        .env("XDG_DATA_HOME", a.repo.path().join("data"))
        .env("TERM", "xterm")
        .env("COLUMNS", "120")
        .env("LINES", "40");
    spawn_with_options(
        cmd,
        Options::new()
            .timeout_ms(Some(60_000))
            .strip_ansi_escape_codes(true),
    )
    .expect("asimov starts in a pty")
}

fn spawn_env(
    a: &Asimov,
    hub: &str,
    template: &Path,
    args: &[&str],
    env: &mut Vec<(&str, String)>,
) -> PtySession {
    let mut cmd = a.command();
    cmd.args(args)
        .env("HF_ENDPOINT", hub)
        .env("ASIMOV_FINETUNE_TEMPLATE", template)
        .env("XDG_DATA_HOME", a.repo.path().join("data"))
        .env("TERM", "xterm")
        .env("COLUMNS", "120")
        .env("LINES", "40")
        .env_remove("VAST_API_KEY");
    for (k, v) in env.drain(..) {
        cmd.env(k, v);
    }
    spawn_with_options(
        cmd,
        Options::new()
            .timeout_ms(Some(60_000))
            .strip_ansi_escape_codes(true),
    )
    .expect("asimov starts in a pty")
}

/// Reads the screen until `needle` shows, looking every millisecond, and returns what was
/// read. rexpect's `exp_string` sleeps 100 ms between looks: too coarse to time when
/// something reached the screen (it made half of an earlier live-offers figure).
fn exp_closely(p: &mut PtySession, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen = String::new();
    loop {
        while let Some(c) = p.try_read() {
            seen.push(c);
            if seen.ends_with(needle) {
                return seen;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{needle:?} not shown in 60 s: {seen}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Types keys (rexpect's `send` buffers until flushed).
fn keys(p: &mut PtySession, text: &str) {
    p.send(text).expect("typing");
    p.flush().expect("typing");
}

fn exit_code(p: &PtySession) -> i32 {
    match p.process().wait().expect("wait") {
        WaitStatus::Exited(_, code) => code,
        other => panic!("asimov did not exit normally: {other:?}"),
    }
}

/// Every file under `root` except the credential store, with its text.
fn files_outside_credentials(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path == root.join("credentials") {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(bytes) = std::fs::read(&path)
            {
                out.push((path, bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn the_prompt_asks_once_applies_follows_and_keeps_the_token_secret() {
    let a = Asimov::new();
    let hub = hub_stand_in();
    let template = test_template(a.repo.path());

    let mut p = spawn(&a, &hub, &template, &[]);
    p.exp_string("Hugging Face token").unwrap();
    keys(&mut p, &format!("{TOKEN}\r"));
    p.exp_string("signed in as ada").unwrap();
    p.exp_string("Model to fine-tune").unwrap();
    keys(&mut p, "sshleifer/tiny-gpt2\r");
    p.exp_string("Dataset:").unwrap();
    keys(&mut p, "ada/tiny-text\r");
    p.exp_string("Dataset subset").unwrap();
    keys(&mut p, "\r");
    // The default repository comes from the hub's user name and the model.
    p.exp_string("Hub repository").unwrap();
    p.exp_string("ada/tiny-gpt2-finetuned").unwrap();
    keys(&mut p, "\r");
    p.exp_string("GPU:").unwrap();
    keys(&mut p, "4090");
    p.exp_string("RTX 4090").unwrap();
    keys(&mut p, "\r");
    p.exp_string("GPU count").unwrap();
    keys(&mut p, "2\r");
    p.exp_string("This job will be created").unwrap();
    p.exp_string("Placement: local").unwrap();
    p.exp_string("Create and start this job?").unwrap();
    keys(&mut p, "y\r");
    p.exp_string("job/ft-tiny-gpt2-finetuned created").unwrap();
    p.exp_string("1 run(s) succeeded").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);

    // The applied manifest holds the answers and the template's fixed image.
    let stored = a.home().join("manifests/job.ft-tiny-gpt2-finetuned.yaml");
    let manifest = std::fs::read_to_string(&stored).expect("the job is in the desired state");
    // (stored normalised: one key per line)
    for want in [
        "HF_MODEL: sshleifer/tiny-gpt2",
        "HF_DATASET: ada/tiny-text",
        "HF_HUB_REPO: ada/tiny-gpt2-finetuned",
        "count: 2",
        "- RTX 4090",
        "image: pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
        "- HF_TOKEN",
        "- provider: local",
    ] {
        assert!(manifest.contains(want), "{want:?} not in\n{manifest}");
    }
    assert!(!manifest.contains("HF_DATASET_SUBSET"), "{manifest}");

    // The token: in its 0600 file, and it reached the job as HF_TOKEN.
    let token_file = a.home().join("credentials/HF_TOKEN");
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), TOKEN);
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let log = a.ok(&["logs", "ft-tiny-gpt2-finetuned-0"]);
    assert!(log.contains("token reached the job"), "{log}");
    assert!(
        log.contains("model sshleifer/tiny-gpt2 dataset ada/tiny-text"),
        "{log}"
    );
    // The `ps` snapshot taken during the run shows processes, and no token.
    assert!(log.contains("asimov"), "no ps output in the log:\n{log}");
    assert!(!log.contains(TOKEN), "the token is in `ps` or the log");
    // While the instance lives, its agent's `spec/secrets` (0600) is the one other place
    // the token may be; `1 run(s) succeeded` can print before the teardown removed it.
    // Once the instance is gone the token is nowhere but the credential store.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut live_secret_file = false;
        for (path, bytes) in files_outside_credentials(a.home()) {
            if !contains(&bytes, TOKEN) {
                continue;
            }
            let is_agent_secrets =
                path.ends_with("spec/secrets") && path.starts_with(a.home().join("local"));
            assert!(is_agent_secrets, "the token is in {}", path.display());
            let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
            assert!(
                matches!(mode, Ok(0o600) | Err(_)),
                "{} is not 0600: {mode:?}",
                path.display()
            );
            live_secret_file = true;
        }
        if !live_secret_file {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the instance's secret file outlived the run by a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for args in [["get", "runs", "-o", "yaml"], ["get", "jobs", "-o", "yaml"]] {
        let out = a.ok(&args);
        assert!(!out.contains(TOKEN), "the token is in `{}`", args.join(" "));
    }
    let folder = a
        .repo
        .path()
        .join("data/asimov/finetune/ft-tiny-gpt2-finetuned");
    assert!(folder.join("job.yaml").is_file() && folder.join("run.sh").is_file());
    let answers = std::fs::read_to_string(a.home().join("prompt.json")).unwrap();
    assert!(answers.contains("sshleifer/tiny-gpt2"), "{answers}");

    // Again: no token question; the last answers are the defaults; Ctrl-C changes nothing.
    let before = std::fs::read_to_string(&stored).unwrap();
    let mut p = spawn(&a, &hub, &template, &[]);
    let screen = p.exp_string("Model to fine-tune").unwrap();
    assert!(
        !screen.contains("token"),
        "asked for the token again: {screen}"
    );
    p.exp_string("sshleifer/tiny-gpt2").unwrap();
    keys(&mut p, "\r");
    p.exp_string("Dataset:").unwrap();
    p.exp_string("ada/tiny-text").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("nothing was changed").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 130);
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), before);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), TOKEN);

    // `asimov token` is the way to change it; `--show-source` names the file only.
    let mut p = spawn(&a, &hub, &template, &["token"]);
    p.exp_string("New Hugging Face token").unwrap();
    keys(&mut p, &format!("{NEW_TOKEN}\r"));
    p.exp_string("Token saved").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), NEW_TOKEN);
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let source = a.ok(&["token", "--show-source"]);
    assert!(
        source.contains(&token_file.display().to_string()),
        "{source}"
    );
    assert!(
        !source.contains(NEW_TOKEN) && !source.contains(TOKEN),
        "{source}"
    );
}

#[test]
fn a_token_the_hub_rejects_is_asked_again() {
    let a = Asimov::new();
    let hub = hub_stand_in();
    let template = test_template(a.repo.path());
    let mut p = spawn(&a, &hub, &template, &["token"]);
    p.exp_string("Hugging Face token").unwrap();
    keys(&mut p, "hf_0000000000000000000000000000000000\r");
    p.exp_string("rejected this token").unwrap();
    p.exp_string("Hugging Face token").unwrap();
    p.send_control('c').unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 130);
    assert!(!a.home().join("credentials/HF_TOKEN").exists());
}

#[test]
fn an_unreachable_hub_saves_the_token_unchecked() {
    let a = Asimov::new();
    // A port nobody listens on: the check fails soft, at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hub = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let template = test_template(a.repo.path());
    let mut p = spawn(&a, &hub, &template, &["token"]);
    p.exp_string("Hugging Face token").unwrap();
    keys(&mut p, &format!("{TOKEN}\r"));
    p.exp_string("saved unchecked").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(
        std::fs::read_to_string(a.home().join("credentials/HF_TOKEN")).unwrap(),
        TOKEN
    );
}

#[test]
fn without_a_terminal_it_says_to_use_apply() {
    let a = Asimov::new();
    let out = a
        .command()
        .stdin(std::process::Stdio::null())
        .output()
        .expect("asimov runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apply -f"), "{err}");
    assert!(!a.home().join("manifests").exists());
}

fn secret_set(a: &Asimov, name: &str, value: &str) {
    use std::io::Write;
    let mut set = a
        .command()
        .args(["secret", "set", name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    assert!(set.wait().unwrap().success());
}

/// One prompt against the Vast test server whose search takes `search_delay`: answers
/// typed as each question shows. Returns (spawn → GPU list with live prices on the
/// screen, the search's own answer time at the server).
fn live_offers_once(
    a: &Asimov,
    hub: &str,
    template: &Path,
    server: &vast_server::VastServer,
) -> (std::time::Duration, std::time::Duration) {
    let searches_before = server.requests().len();
    let mut cmd_env = vec![
        ("ASIMOV_VAST_API_URL", server.url()),
        ("ASIMOV_VAST_PACING", "0".to_string()),
    ];
    let started = std::time::Instant::now();
    let mut p = spawn_env(a, hub, template, &[], &mut cmd_env);
    p.exp_string("Model to fine-tune").unwrap();
    keys(&mut p, "\r");
    p.exp_string("Dataset:").unwrap();
    keys(&mut p, "\r");
    p.exp_string("Dataset subset").unwrap();
    keys(&mut p, "\r");
    p.exp_string("Hub repository").unwrap();
    keys(&mut p, "\r");
    let last_answer = started.elapsed();
    let screen = exp_closely(&mut p, "from $0.19/h per GPU");
    let shown = started.elapsed();
    // The cheapest live GPU comes first, priced per GPU.
    let gpu_question = screen.rfind("GPU:").expect("the GPU question");
    assert!(
        screen[gpu_question..].contains("RTX 3090"),
        "the cheapest live GPU first: {screen}"
    );
    keys(&mut p, "4090");
    p.exp_string("(2 offers)").unwrap();
    keys(&mut p, "\r");
    p.exp_string("GPU count").unwrap();
    keys(&mut p, "\r");
    p.exp_string("Placement: vast; price per hour: from $0.35/h for 1 x RTX 4090")
        .unwrap();
    p.exp_string("Create and start this job?").unwrap();
    keys(&mut p, "n\r");
    p.exp_string("Not applied; nothing was changed.").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    let searches: Vec<_> = server.requests()[searches_before..]
        .iter()
        .filter(|r| r.endpoint == vast_server::Endpoint::Search)
        .cloned()
        .collect();
    assert_eq!(searches.len(), 1, "one search per prompt");
    if std::env::var_os("ASIMOV_BENCH_LIVE_OFFERS").is_some() {
        // What asimov itself adds: from whichever came last, the provider's answer or
        // the user's answer to the question before the GPU one, to the list on screen.
        let ready = (searches[0].at - started).max(last_answer);
        eprintln!(
            "spawn→search arrived {:?}, search answer {:?}, answered→shown {:?}, \
             last answer typed at {:?}, ready→shown {:?}",
            searches[0].arrived - started,
            searches[0].at - searches[0].arrived,
            (started + shown).saturating_duration_since(searches[0].at),
            last_answer,
            shown.saturating_sub(ready)
        );
    }
    (shown, searches[0].at - searches[0].arrived)
}

/// With Vast configured, the GPU question lists the live offers (one line per GPU model,
/// its cheapest price per GPU, cheapest first) and the summary prices the choice. The
/// search starts with the prompt, so by the GPU question only what is left of the
/// provider's answer time is waited for. `ASIMOV_BENCH_LIVE_OFFERS=N` repeats it N
/// times and prints the figures of BENCHMARKS.md.
#[test]
fn live_vast_offers_fill_the_gpu_question() {
    use vast_server::{Config, VastServer, offer};
    let a = Asimov::new();
    let hub = hub_stand_in();
    let template = test_template(a.repo.path());
    let delay = std::time::Duration::from_millis(500);
    let server = VastServer::start(
        Config {
            search_delay: delay,
            ..Config::default()
        },
        vec![
            offer(301, "RTX 4090", 1, 24.0, 0.41),
            offer(302, "RTX 4090", 1, 24.0, 0.35),
            offer(303, "RTX 3090", 1, 24.0, 0.19),
            offer(304, "H100 SXM", 2, 80.0, 4.00),
        ],
    );
    secret_set(&a, "VAST_API_KEY", vast_server::API_KEY);
    secret_set(&a, "HF_TOKEN", TOKEN);
    std::fs::write(
        a.home().join("prompt.json"),
        r#"{"model":"sshleifer/tiny-gpt2","dataset":"ada/tiny-text","hub_repo":"ada/x","gpu":"RTX 4090","gpu_count":1}"#,
    )
    .unwrap();
    let runs: usize = std::env::var("ASIMOV_BENCH_LIVE_OFFERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut overheads = Vec::new();
    for _ in 0..runs {
        let (shown, answer) = live_offers_once(&a, &hub, &template, &server);
        assert!(answer >= delay, "the server's search took {answer:?}");
        overheads.push((shown, answer));
    }
    assert!(server.instances().is_empty(), "declined: nothing rented");
    assert!(
        !a.home().join("manifests").exists()
            || std::fs::read_dir(a.home().join("manifests"))
                .unwrap()
                .next()
                .is_none()
    );
    if runs > 1 {
        let mut extra: Vec<f64> = overheads
            .iter()
            .map(|(shown, answer)| (shown.as_secs_f64() - answer.as_secs_f64()) * 1000.0)
            .collect();
        extra.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let rank =
            |q: f64| extra[((q * extra.len() as f64).ceil() as usize).clamp(1, extra.len()) - 1];
        eprintln!(
            "live offers: spawn to GPU list minus the search's answer time, {runs} runs: \
             min {:.1} ms, median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
            extra[0],
            rank(0.5),
            rank(0.95),
            extra[extra.len() - 1]
        );
    }
}
