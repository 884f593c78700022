//! A real S3-compatible server for tests: `moto_server` (PyPI's `moto[server]`, in the
//! venv `scripts/install-s3-server.sh` makes), on a free localhost port, its log in a
//! temp dir. Dropping it kills the server. The tests reach it with asimov's own client
//! (`asimov::artifacts::S3Client`) and the agent with curl, as a real bucket would be.

use asimov::artifacts::{S3Client, S3Config, S3Credentials, S3Location, S3Target};
use asimov::model::Secret;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The keys the tests sign with (moto accepts any).
pub const KEY_ID: &str = "AKIATESTASIMOV";
pub const SECRET_KEY: &str = "test/secret+key";

pub struct S3Server {
    _dir: tempfile::TempDir,
    port: u16,
    child: Child,
    runtime: tokio::runtime::Runtime,
}

/// Where the install script puts moto_server.
fn moto_server() -> PathBuf {
    if let Some(venv) = std::env::var_os("ASIMOV_S3_VENV") {
        return PathBuf::from(venv).join("bin/moto_server");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("asimov/s3-venv/bin/moto_server")
}

fn installed() -> bool {
    if moto_server().is_file() {
        return true;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/install-s3-server.sh");
    let ok = Command::new("sh")
        .arg(script)
        .status()
        .is_ok_and(|s| s.success());
    ok && moto_server().is_file()
}

impl S3Server {
    /// Starts a server, installing it first if it is missing; `None` (after a loud
    /// message) only when it cannot be installed.
    pub fn start_or_skip() -> Option<S3Server> {
        if !installed() {
            eprintln!(
                "\n!!!!!!!! SKIPPED: moto_server is not installed and \
                 scripts/install-s3-server.sh could not install it; the S3 tests did not run !!!!!!!!\n"
            );
            return None;
        }
        Some(S3Server::start())
    }

    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().expect("s3 server dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("moto_server starts");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut server = S3Server {
            _dir: dir,
            port,
            child,
            runtime,
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("moto_server exited: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A client of `bucket` on this server.
    pub fn client(&self, bucket: &str) -> S3Client {
        S3Client::new(S3Target {
            config: S3Config::resolve(Some(&self.endpoint()), Some("us-east-1")).expect("config"),
            location: S3Location::parse(&format!("s3://{bucket}")).expect("location"),
            credentials: S3Credentials {
                key_id: Secret::new(KEY_ID),
                secret: Secret::new(SECRET_KEY),
                token: None,
            },
        })
        .expect("client")
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        let client = self.client(bucket);
        self.block_on(client.create_bucket())
            .expect("create bucket");
    }

    /// Every key under `prefix` in `bucket` (empty when the listing fails).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let client = self.client(bucket);
        self.block_on(client.list(prefix))
            .map(|keys| keys.into_iter().map(|(k, _)| k).collect())
            .unwrap_or_default()
    }

    /// An object's content, `None` when it is not there.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let client = self.client(bucket);
        self.block_on(client.get(key)).expect("get object")
    }

    /// The multipart uploads under `prefix` in `bucket` still open (ListMultipartUploads):
    /// (key, upload id).
    pub fn open_uploads(&self, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        let client = self.client(bucket);
        self.block_on(client.open_uploads(prefix))
            .expect("list multipart uploads")
    }

    /// Stops the server's process (SIGSTOP): connections are still accepted by the
    /// kernel but nothing answers, as an endpoint that hangs. [`S3Server::thaw`] ends it.
    pub fn freeze(&self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
