//! The agent's multipart upload of a file over the single-PUT limit, through a real
//! S3-compatible server (moto_server) with the agent's own curl, under the system's sh
//! and under busybox. The limit and the part size are lowered (`ASIMOV_S3_PUT_MAX`,
//! `ASIMOV_S3_PART_SIZE`) so that a file of a few MiB takes the path a file over 5 GiB
//! takes. Between the agent and the server sits a TCP proxy that can cut or hold the
//! requests of one part: a cut part is tried again, an upload that cannot finish is
//! aborted, and an upload a killed syncer left open is aborted by the next sync, so that
//! no part is ever left billing storage (checked with ListMultipartUploads).

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::s3_server::S3Server;

const BUCKET: &str = "asimov-mp";
const MIB: usize = 1 << 20;
/// S3's (and moto's) smallest part but the last.
const PART: usize = 5 * MIB;
/// Three parts: two whole, one short.
const BIG: usize = 2 * PART + 123_457;

/// What the proxy does with the requests of part 2.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part2 {
    Pass,
    /// Cut the connection in the middle of the part, the first time only.
    CutOnce,
    /// Cut it every time.
    CutAlways,
    /// Hold it without an answer until the proxy is released.
    Hold,
}

struct Proxy {
    port: u16,
    mode: Arc<Mutex<Part2>>,
    /// Every request line seen, in order.
    seen: Arc<Mutex<Vec<String>>>,
    cuts: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    release: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16, mode: Part2) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let port = listener.local_addr().expect("addr").port();
        let proxy = Proxy {
            port,
            mode: Arc::new(Mutex::new(mode)),
            seen: Arc::default(),
            cuts: Arc::default(),
            held: Arc::default(),
            release: Arc::default(),
        };
        let (mode, seen, cuts, held, release) = (
            proxy.mode.clone(),
            proxy.seen.clone(),
            proxy.cuts.clone(),
            proxy.held.clone(),
            proxy.release.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let (mode, seen, cuts, held, release) = (
                    mode.clone(),
                    seen.clone(),
                    cuts.clone(),
                    held.clone(),
                    release.clone(),
                );
                std::thread::spawn(move || {
                    serve(client, upstream, &mode, &seen, &cuts, &held, &release)
                });
            }
        });
        proxy
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, mode: Part2) {
        *self.mode.lock().unwrap() = mode;
    }

    fn count(&self, needle: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.release.store(true, Ordering::SeqCst);
    }
}

fn serve(
    mut client: TcpStream,
    upstream: u16,
    mode: &Mutex<Part2>,
    seen: &Mutex<Vec<String>>,
    cuts: &AtomicUsize,
    held: &AtomicUsize,
    release: &AtomicBool,
) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
    // The request head (and whatever of the body came with it).
    let mut head = Vec::new();
    let mut buf = [0u8; 16384];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    seen.lock().unwrap().push(line.clone());
    if line.contains("partNumber=2&") {
        let now = *mode.lock().unwrap();
        let cut = match now {
            Part2::CutAlways => true,
            Part2::CutOnce => {
                *mode.lock().unwrap() = Part2::Pass;
                true
            }
            Part2::Hold => {
                held.fetch_add(1, Ordering::SeqCst);
                let start = Instant::now();
                while !release.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(300)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            Part2::Pass => false,
        };
        if cut {
            // Some of the part arrives, then the connection is gone.
            let _ = client.read(&mut buf);
            cuts.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    if server.write_all(&head).is_err() {
        return;
    }
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = up.join();
}

/// Bytes that differ part to part and within a part (a misplaced part shows).
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The shells the agent is tested under: the system's sh, and busybox where installed
/// (a folder of its applets first on PATH, as on a minimal image).
fn shells(dir: &Path) -> Vec<(&'static str, String)> {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut shells = vec![("sh", path.clone())];
    let busybox = std::process::Command::new("sh")
        .args(["-c", "command -v busybox"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match busybox {
        Some(busybox) => {
            let bin = dir.join("busybox-bin");
            std::fs::create_dir_all(&bin).unwrap();
            for applet in [
                "sh", "setsid", "date", "tail", "head", "sleep", "mv", "cat", "sed", "tr", "mkdir",
                "od", "awk", "find", "cmp", "readlink", "ln", "grep", "wc", "rm", "sort", "dd",
            ] {
                std::os::unix::fs::symlink(&busybox, bin.join(applet)).unwrap();
            }
            shells.push(("busybox", format!("{}:{path}", bin.display())));
        }
        None => eprintln!("busybox not installed: only the system sh tested"),
    }
    shells
}

/// An instance folder whose S3 target is `endpoint` (the proxy), with a checkpoint
/// folder and one output file.
fn instance(root: &Path, s3: &S3Server, endpoint: &str, run: &str, ckpt: &Path, output: &Path) {
    std::fs::create_dir_all(root.join("spec")).unwrap();
    std::fs::write(root.join("agent.sh"), asimov::agent::AGENT_SCRIPT).unwrap();
    std::fs::write(
        root.join("spec/s3"),
        format!(
            "S3_BASE='{endpoint}/{BUCKET}/{run}'\nS3_NEXT=1\nS3_ATTEMPT=1\nS3_CHECKPOINT='{}'\n",
            ckpt.display()
        ),
    )
    .unwrap();
    std::fs::write(
        root.join("spec/s3_outputs"),
        format!("{}\tmodel.bin\n", output.display()),
    )
    .unwrap();
    let creds = asimov::artifacts::S3Credentials {
        key_id: asimov::model::Secret::new(s3.key_id()),
        secret: asimov::model::Secret::new(s3.secret_key()),
        token: None,
    };
    std::fs::write(
        root.join("spec/s3.curl"),
        asimov::artifacts::curl_config(&creds, "us-east-1").expose(),
    )
    .unwrap();
}

fn agent(root: &Path, path: &str, command: &str, tries: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg(root.join("agent.sh"))
        .arg(command)
        .arg(root)
        .env("PATH", path)
        .env("ASIMOV_NO_TMUX", "1")
        .env("ASIMOV_S3_PUT_MAX", (PART + MIB).to_string())
        .env("ASIMOV_S3_PART_SIZE", PART.to_string())
        .env("ASIMOV_S3_PART_TRIES", tries)
        .env("ASIMOV_SYNC_TRIES", "1");
    cmd
}

fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_default()
        .to_string()
}

struct Case {
    dir: tempfile::TempDir,
    root: PathBuf,
    ckpt_file: Vec<u8>,
    output: Vec<u8>,
}

fn case(name: &str, s3: &S3Server, endpoint: &str, run: &str) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(format!("{name}-instance"));
    let ckpt = dir.path().join("ckpt");
    std::fs::create_dir_all(ckpt.join("sub")).unwrap();
    let ckpt_file = content(BIG, 1);
    std::fs::write(ckpt.join("sub/weights.bin"), &ckpt_file).unwrap();
    std::fs::write(ckpt.join("small.txt"), "small").unwrap();
    let output = content(BIG + 17, 2);
    let out = dir.path().join("model.bin");
    std::fs::write(&out, &output).unwrap();
    instance(&root, s3, endpoint, run, &ckpt, &out);
    Case {
        dir,
        root,
        ckpt_file,
        output,
    }
}

/// A final sync of a checkpoint and an output, each over the lowered limit: both arrive
/// whole and byte-identical, in three parts each, the part cut in the middle was sent
/// again, and no upload is left open.
#[test]
fn agent_uploads_big_files_in_parts_and_retries_a_cut_part() {
    let Some(s3) = S3Server::start_verifying_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let scratch = tempfile::tempdir().unwrap();
    for (name, path) in shells(scratch.path()) {
        let proxy = Proxy::start(s3.port(), Part2::CutOnce);
        let run = format!("whole-{name}");
        let c = case(name, &s3, &proxy.endpoint(), &run);
        let out = agent(&c.root, &path, "sync-final", "5").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let error = std::fs::read_to_string(c.root.join("sync/error")).unwrap_or_default();
        assert!(out.status.success(), "{name}: {out:?} {error}");
        assert_eq!(field(&stdout, "result"), "done", "{name}: {stdout} {error}");
        assert_eq!(field(&stdout, "files"), "3", "{name}: {stdout}");
        assert_eq!(
            field(&stdout, "bytes"),
            (2 * BIG + 17 + 5).to_string(),
            "{name}: {stdout}"
        );
        let object = s3
            .get(
                BUCKET,
                &format!("{run}/_checkpoints/objects/00000001-a1/sub/weights.bin"),
            )
            .expect("the checkpoint file arrived");
        assert!(object == c.ckpt_file, "{name}: checkpoint file differs");
        let object = s3
            .get(BUCKET, &format!("{run}/model.bin"))
            .expect("the output arrived");
        assert!(object == c.output, "{name}: output differs");
        assert!(
            s3.get(BUCKET, &format!("{run}/_checkpoints/manifests/00000001-a1"))
                .is_some(),
            "{name}: the checkpoint is complete"
        );
        assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "{name}");
        // Two files of three parts each; part 2 of the first once more after its cut.
        assert_eq!(proxy.count("uploads= "), 2, "{name}");
        assert_eq!(proxy.count("partNumber=1&"), 2, "{name}");
        assert_eq!(proxy.count("partNumber=2&"), 3, "{name}");
        assert_eq!(proxy.count("partNumber=3&"), 2, "{name}");
        assert_eq!(proxy.count("partNumber=4&"), 0, "{name}");
        assert!(
            s3.open_uploads(BUCKET, &run).is_empty(),
            "{name}: no upload left open"
        );
        assert!(!c.root.join("sync/mp.open").exists(), "{name}");
        drop(c.dir);
    }
}

/// A part that fails every try: the upload is aborted (no part left billing), the sync
/// fails saying which step, and nothing of the file is in the bucket.
#[test]
fn agent_aborts_a_multipart_upload_that_cannot_finish() {
    let Some(s3) = S3Server::start_verifying_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let scratch = tempfile::tempdir().unwrap();
    for (name, path) in shells(scratch.path()) {
        let proxy = Proxy::start(s3.port(), Part2::CutAlways);
        let run = format!("fails-{name}");
        let c = case(name, &s3, &proxy.endpoint(), &run);
        let out = agent(&c.root, &path, "sync-final", "2").output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(field(&stdout, "result"), "failed", "{name}: {stdout}");
        assert_eq!(proxy.cuts.load(Ordering::SeqCst), 2, "{name}: tried twice");
        assert_eq!(proxy.count("DELETE "), 1, "{name}: aborted");
        assert!(
            s3.open_uploads(BUCKET, &run).is_empty(),
            "{name}: no upload left open"
        );
        let keys = s3.keys(BUCKET, &format!("{run}/"));
        assert!(
            !keys
                .iter()
                .any(|k| k.ends_with("weights.bin") || k.contains("manifests")),
            "{name}: nothing of it in the bucket, no checkpoint: {keys:?}"
        );
        assert!(
            field(&stdout, "error").contains("part 2 of 3 of ")
                && field(&stdout, "error").contains("weights.bin failed 2 times"),
            "{name}: says what failed: {stdout}"
        );
        assert!(!c.root.join("sync/mp.open").exists(), "{name}");
        drop(c.dir);
    }
}

/// A syncer killed in the middle of an upload leaves it open; the next sync aborts it
/// before anything else and then sends the file whole.
#[test]
fn agent_aborts_the_upload_a_killed_syncer_left_open() {
    let Some(s3) = S3Server::start_verifying_or_skip() else {
        return;
    };
    s3.create_bucket(BUCKET);
    let scratch = tempfile::tempdir().unwrap();
    for (name, path) in shells(scratch.path()) {
        let proxy = Proxy::start(s3.port(), Part2::Hold);
        let run = format!("killed-{name}");
        let c = case(name, &s3, &proxy.endpoint(), &run);
        let mut cmd = agent(&c.root, &path, "sync-checkpoint", "5");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while proxy.held.load(Ordering::SeqCst) == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{name}: part 2 never came"
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name}: the syncer ended before part 2: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: signalling the process group of our own child.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        assert_eq!(
            s3.open_uploads(BUCKET, &run).len(),
            1,
            "{name}: the killed syncer's upload is open"
        );
        assert!(c.root.join("sync/mp.open").exists(), "{name}");

        proxy.set(Part2::Pass);
        let out = agent(&c.root, &path, "sync-checkpoint", "5")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {out:?}");
        assert_eq!(
            field(&stdout, "checkpoint"),
            "00000001-a1",
            "{name}: {stdout}"
        );
        assert!(
            s3.open_uploads(BUCKET, &run).is_empty(),
            "{name}: the old upload was aborted"
        );
        assert_eq!(proxy.count("DELETE "), 1, "{name}");
        let object = s3
            .get(
                BUCKET,
                &format!("{run}/_checkpoints/objects/00000001-a1/sub/weights.bin"),
            )
            .expect("the checkpoint file arrived");
        assert!(object == c.ckpt_file, "{name}: checkpoint file differs");
        drop(c.dir);
    }
}
