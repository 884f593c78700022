//! `asimov login vast|lambda|runpod` through a real pseudo-terminal: the key asked
//! without echo, checked with one authenticated call against the clouds' local test
//! servers, stored 0600 in the credential store as `asimov secret set` does; a refused
//! key is not stored; an unreachable API saves it unchecked; no terminal, a hint.

#[path = "support/lambda_server.rs"]
mod lambda_server;
#[path = "support/runpod_server.rs"]
mod runpod_server;
mod support;
#[path = "support/vast_server.rs"]
mod vast_server;

use rexpect::process::WaitStatus;
use rexpect::reader::Options;
use rexpect::session::{PtySession, spawn_with_options};
use std::os::unix::fs::PermissionsExt;
use support::cli::Asimov;

fn spawn(a: &Asimov, env: &[(&str, String)], args: &[&str]) -> PtySession {
    let mut cmd = a.command();
    cmd.args(args)
        .env_remove("VAST_API_KEY")
        .env_remove("LAMBDA_API_KEY")
        .env_remove("RUNPOD_API_KEY")
        .env("ASIMOV_VAST_PACING", "0")
        .env("ASIMOV_LAMBDA_PACING", "0")
        .env("ASIMOV_RUNPOD_PACING", "0")
        .env("TERM", "xterm")
        .env("COLUMNS", "120")
        .env("LINES", "40");
    for (k, v) in env {
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

/// Types `key` at the question and returns everything the screen showed until exit.
fn login(a: &Asimov, env: &[(&str, String)], cloud: &str, key: &str) -> (i32, String) {
    let mut p = spawn(a, env, &["login", cloud]);
    p.exp_string("API key").unwrap();
    keys(&mut p, &format!("{key}\r"));
    let screen = p.exp_eof().unwrap();
    (exit_code(&p), screen)
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_good_key_is_checked_and_stored_0600_never_shown() {
    let a = Asimov::new();
    let vast = vast_server::VastServer::start(vast_server::Config::default(), vec![]);
    let env = [("ASIMOV_VAST_API_URL", vast.url())];
    let (code, screen) = login(&a, &env, "vast", vast_server::API_KEY);
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("vast accepted the key"), "{screen}");
    assert!(screen.contains("secret/VAST_API_KEY saved"), "{screen}");
    assert!(
        !screen.contains(vast_server::API_KEY),
        "the key was echoed: {screen}"
    );
    let file = a.home().join("credentials/VAST_API_KEY");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        vast_server::API_KEY
    );
    assert_eq!(mode(&file), 0o600);
    // It was checked with the cloud: one authenticated request reached the server.
    assert!(
        vast.requests()
            .iter()
            .any(|r| r.path.contains("/instances")),
        "no check reached the server"
    );
    // Stored exactly as `asimov secret set` stores it: `secret list` names it.
    assert!(a.ok(&["secret", "list"]).contains("VAST_API_KEY"));

    // Lambda and RunPod the same way.
    let lambda = lambda_server::LambdaServer::start(lambda_server::Config::default(), vec![]);
    let env = [("ASIMOV_LAMBDA_API_URL", lambda.url())];
    let (code, screen) = login(&a, &env, "lambda", lambda_server::API_KEY);
    assert_eq!(code, 0, "{screen}");
    let file = a.home().join("credentials/LAMBDA_API_KEY");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        lambda_server::API_KEY
    );
    assert_eq!(mode(&file), 0o600);
    let runpod = runpod_server::RunpodServer::start(runpod_server::Config::default(), vec![]);
    let env = [("ASIMOV_RUNPOD_API_URL", runpod.url())];
    let (code, screen) = login(&a, &env, "runpod", runpod_server::API_KEY);
    assert_eq!(code, 0, "{screen}");
    let file = a.home().join("credentials/RUNPOD_API_KEY");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        runpod_server::API_KEY
    );
}

#[test]
fn a_refused_key_is_not_stored_and_an_unreachable_api_saves_it_unchecked() {
    let a = Asimov::new();
    let vast = vast_server::VastServer::start(vast_server::Config::default(), vec![]);
    let env = [("ASIMOV_VAST_API_URL", vast.url())];
    let (code, screen) = login(&a, &env, "vast", "not-the-key-0000");
    assert_eq!(code, 1, "{screen}");
    assert!(screen.contains("vast refused this key"), "{screen}");
    assert!(screen.contains("nothing was stored"), "{screen}");
    assert!(!screen.contains("not-the-key-0000"), "{screen}");
    assert!(!a.home().join("credentials/VAST_API_KEY").exists());

    // A port nobody listens on: offline, the key is saved with a note.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let env = [("ASIMOV_VAST_API_URL", url)];
    let (code, screen) = login(&a, &env, "vast", "offline-key-1234");
    assert_eq!(code, 0, "{screen}");
    assert!(screen.contains("saving it unchecked"), "{screen}");
    let file = a.home().join("credentials/VAST_API_KEY");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "offline-key-1234");
    assert_eq!(mode(&file), 0o600);
}

#[test]
fn without_a_terminal_login_points_to_secret_set() {
    let a = Asimov::new();
    let out = a
        .command()
        .args(["login", "lambda"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("asimov secret set LAMBDA_API_KEY"), "{err}");
    assert!(!a.home().join("credentials/LAMBDA_API_KEY").exists());
}
