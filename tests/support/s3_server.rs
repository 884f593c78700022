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
    /// The keys requests must be signed with: the constants, or (a verifying server)
    /// the ones its IAM made.
    key_id: String,
    secret_key: String,
    /// Checks signatures: moto then takes no presigned URL (it reads only the
    /// Authorization header), so this helper's own requests go through curl too.
    verifying: bool,
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
        S3Server::spawn(false)
    }

    /// As [`S3Server::start_or_skip`], but the server checks every request's SigV4
    /// signature as S3 does (moto's IAM mode): a request curl or the client signs wrong
    /// is refused with 403 `SignatureDoesNotMatch`. Its keys are made by its IAM
    /// ([`S3Server::key_id`], [`S3Server::secret_key`]), allowed everything.
    pub fn start_verifying_or_skip() -> Option<S3Server> {
        if !installed() {
            eprintln!(
                "\n!!!!!!!! SKIPPED: moto_server is not installed and \
                 scripts/install-s3-server.sh could not install it; the S3 tests did not run !!!!!!!!\n"
            );
            return None;
        }
        Some(S3Server::spawn(true))
    }

    fn spawn(verifying: bool) -> S3Server {
        let dir = tempfile::tempdir().expect("s3 server dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
        let mut command = Command::new(moto_server());
        if verifying {
            // The first three requests (the IAM calls below) go unchecked, every later
            // one is checked.
            command.env("INITIAL_NO_AUTH_ACTION_COUNT", "3");
        }
        let child = command
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
            key_id: KEY_ID.to_string(),
            secret_key: SECRET_KEY.to_string(),
            verifying,
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
        if verifying {
            server.make_keys();
        }
        server
    }

    /// An IAM user with an access key and a policy that allows everything, by the IAM
    /// query API (curl signs for `iam`, which routes the request there).
    fn make_keys(&mut self) {
        let iam = |body: &str| -> String {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "--fail",
                    "--aws-sigv4",
                    "aws:amz:us-east-1:iam",
                    "-u",
                ])
                .arg(format!("{KEY_ID}:{SECRET_KEY}"))
                .arg("--data-binary")
                .arg(format!("Version=2010-05-08&{body}"))
                .arg(format!("{}/", self.endpoint()))
                .output()
                .expect("curl runs");
            assert!(out.status.success(), "IAM {body}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let element = |xml: &str, name: &str| -> String {
            let start = xml.find(&format!("<{name}>")).expect(name) + name.len() + 2;
            let end = start + xml[start..].find('<').expect(name);
            xml[start..end].to_string()
        };
        iam("Action=CreateUser&UserName=asimov");
        let key = iam("Action=CreateAccessKey&UserName=asimov");
        // {"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}
        iam(
            "Action=PutUserPolicy&UserName=asimov&PolicyName=all&PolicyDocument=\
             %7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A\
             %22Allow%22%2C%22Action%22%3A%22*%22%2C%22Resource%22%3A%22*%22%7D%5D%7D",
        );
        self.key_id = element(&key, "AccessKeyId");
        self.secret_key = element(&key, "SecretAccessKey");
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
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
                key_id: Secret::new(&self.key_id),
                secret: Secret::new(&self.secret_key),
                token: None,
            },
        })
        .expect("client")
    }

    /// A request signed by curl as the agent signs (`asimov::artifacts::curl_config`,
    /// without its `fail`): the HTTP status and the body. `query` must be in SigV4's
    /// canonical form (sorted, encoded), which curl before 8.1 signs as given.
    fn curl(&self, method: &str, path: &str, query: &str) -> (u16, Vec<u8>) {
        let config = self._dir.path().join("curl.config");
        let creds = S3Credentials {
            key_id: Secret::new(&self.key_id),
            secret: Secret::new(&self.secret_key),
            token: None,
        };
        let text = asimov::artifacts::curl_config(&creds, "us-east-1")
            .expose()
            .replace("\nfail\n", "\n");
        std::fs::write(&config, text).expect("curl config");
        let body = self._dir.path().join("curl.body");
        let _ = std::fs::remove_file(&body);
        let mut url = format!("{}/{path}", self.endpoint());
        if !query.is_empty() {
            url = format!("{url}?{query}");
        }
        let out = Command::new("curl")
            .arg("-K")
            .arg(&config)
            .args(["-X", method, "-o"])
            .arg(&body)
            .args(["-w", "%{http_code}"])
            .arg(url)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl {method} {path}?{query}: {out:?}"
        );
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("status");
        (status, std::fs::read(&body).unwrap_or_default())
    }

    /// The texts of every `<name>` element of `xml`, in order.
    fn elements(xml: &str, name: &str) -> Vec<String> {
        let open = format!("<{name}>");
        xml.split(&open)
            .skip(1)
            .filter_map(|rest| Some(rest[..rest.find('<')?].to_string()))
            .collect()
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        if self.verifying {
            let (status, body) = self.curl("PUT", bucket, "");
            assert_eq!(
                status,
                200,
                "create bucket: {}",
                String::from_utf8_lossy(&body)
            );
            return;
        }
        let client = self.client(bucket);
        self.block_on(client.create_bucket())
            .expect("create bucket");
    }

    /// Every key under `prefix` in `bucket` (empty when the listing fails).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        if self.verifying {
            let query = format!("list-type=2&prefix={}", encode(prefix));
            let (status, body) = self.curl("GET", bucket, &query);
            assert_eq!(status, 200, "list: {}", String::from_utf8_lossy(&body));
            return S3Server::elements(&String::from_utf8_lossy(&body), "Key");
        }
        let client = self.client(bucket);
        self.block_on(client.list(prefix))
            .map(|keys| keys.into_iter().map(|(k, _)| k).collect())
            .unwrap_or_default()
    }

    /// An object's content, `None` when it is not there.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        if self.verifying {
            let path = format!("{bucket}/{}", encode(key).replace("%2F", "/"));
            let (status, body) = self.curl("GET", &path, "");
            return match status {
                200 => Some(body),
                404 => None,
                _ => panic!("get {key}: {status}: {}", String::from_utf8_lossy(&body)),
            };
        }
        let client = self.client(bucket);
        self.block_on(client.get(key)).expect("get object")
    }

    /// The multipart uploads under `prefix` in `bucket` still open (ListMultipartUploads):
    /// (key, upload id).
    pub fn open_uploads(&self, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        if self.verifying {
            let query = format!("prefix={}&uploads=", encode(prefix));
            let (status, body) = self.curl("GET", bucket, &query);
            let text = String::from_utf8_lossy(&body);
            assert_eq!(status, 200, "list multipart uploads: {text}");
            let blocks: Vec<&str> = text.split("<Upload>").skip(1).collect();
            return blocks
                .iter()
                .map(|b| {
                    let key = S3Server::elements(b, "Key").remove(0);
                    (key, S3Server::elements(b, "UploadId").remove(0))
                })
                .collect();
        }
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

/// Percent-encodes all but SigV4's unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
