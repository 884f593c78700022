//! S3 for `artifacts.to: s3://bucket/prefix`.
//!
//! # Layout of a run's objects, under `s3://bucket/prefix/<run>/`
//!
//! - outputs at the name `collect` gives them at home (`/tmp/output` → `output/...`, a
//!   relative path as it is), overwritten in place by each sync;
//! - checkpoints under `_checkpoints/`: a sync uploads the files that changed into
//!   `_checkpoints/objects/<gen>/<path>` and then, last, the manifest
//!   `_checkpoints/manifests/<gen>`: one line `<gen>\t<path>` per file of that
//!   checkpoint, naming the generation whose folder holds its bytes. A checkpoint is
//!   complete exactly when its manifest exists, and no object of a complete checkpoint
//!   is ever written again, so a restore never sees a half-written one.
//!
//! A generation is `<seq:08>-a<attempt>`: the seq counts on across attempts (a new
//! attempt starts after the newest complete one), the attempt keeps two instances of
//! one run from ever writing the same objects.
//!
//! After each sync that made a checkpoint the controller keeps the newest
//! `reconcile::checkpoint::KEEP` (2) complete ones and the one the current attempt
//! resumed from, and removes the rest: their manifests first, then every object that
//! no kept manifest names ([`S3Client::prune_checkpoints`]).
//!
//! # Clients
//!
//! The controller uses `rusty-s3` (the signing and the XML of S3, no I/O of its own)
//! over the `reqwest` client asimov already has: a small, well-kept crate that adds no
//! second HTTP stack or runtime (the AWS SDK for Rust would bring its own, and its
//! build time, for the four calls asimov makes). On the instance the agent uses curl's
//! own SigV4 signing (`--aws-sigv4`, curl 7.75 and later), its credentials in a 0600
//! config file read with `-K` (`curl_config`): nothing to install, and no secret on a
//! command line or in an environment.

use crate::model::Secret;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::path::Path;
use std::time::Duration;

/// Overrides the endpoint (a local S3-compatible server, R2, MinIO...).
pub const ENDPOINT_ENV: &str = "ASIMOV_S3_ENDPOINT_URL";
/// Overrides the region (default `us-east-1`).
pub const REGION_ENV: &str = "ASIMOV_S3_REGION";
/// The secrets the keys are read from (`asimov secret set AWS_ACCESS_KEY_ID`).
pub const KEY_ID: &str = "AWS_ACCESS_KEY_ID";
pub const SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// Optional: temporary credentials' token.
pub const SESSION_TOKEN: &str = "AWS_SESSION_TOKEN";
/// The region when neither a field nor `ASIMOV_S3_REGION` names one.
pub const DEFAULT_REGION: &str = "us-east-1";
/// How long one request of the controller's client may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a signed URL of the controller's client is valid (it is used at once).
const SIGNED_FOR: Duration = Duration::from_secs(600);
/// Where a run's checkpoints live under its prefix.
pub const CHECKPOINTS: &str = "_checkpoints";

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("not an s3://bucket/prefix url: {0:?}")]
    BadUrl(String),
    #[error("bad S3 endpoint {endpoint:?}: {message}")]
    BadEndpoint { endpoint: String, message: String },
    #[error("missing secret {0} (set it with `asimov secret set {0}`)")]
    MissingCredential(&'static str),
    #[error("read secret {name}")]
    ReadCredential {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("s3 {step}")]
    Http {
        step: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("s3 {step}: HTTP {status}: {body}")]
    Status {
        step: &'static str,
        status: u16,
        body: String,
    },
    #[error("s3 {step}: unreadable answer: {message}")]
    Parse { step: &'static str, message: String },
}

impl S3Error {
    /// True when trying again cannot help until the user changes something.
    pub fn is_permanent(&self) -> bool {
        match self {
            S3Error::BadUrl(_)
            | S3Error::BadEndpoint { .. }
            | S3Error::MissingCredential(_)
            | S3Error::ReadCredential { .. } => true,
            S3Error::Status { status, .. } => matches!(status, 400 | 401 | 403 | 404),
            S3Error::Http { .. } | S3Error::Parse { .. } => false,
        }
    }
}

/// `s3://bucket/prefix`: the bucket and the key prefix (no slash at either end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

impl S3Location {
    pub fn parse(url: &str) -> Result<Self, S3Error> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| S3Error::BadUrl(url.to_string()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(S3Error::BadUrl(url.to_string()));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// The key prefix of a run's objects: `prefix/<run>`.
    pub fn run_prefix(&self, run: &str) -> String {
        if self.prefix.is_empty() {
            run.to_string()
        } else {
            format!("{}/{run}", self.prefix)
        }
    }
}

/// Where the object store is and how requests are signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub endpoint: url::Url,
    pub region: String,
}

impl S3Config {
    /// The endpoint and region: the job's fields first, then `ASIMOV_S3_ENDPOINT_URL`
    /// and `ASIMOV_S3_REGION`, then AWS's regional endpoint.
    pub fn resolve(endpoint: Option<&str>, region: Option<&str>) -> Result<Self, S3Error> {
        let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        let region = region
            .map(str::to_string)
            .or_else(|| env(REGION_ENV))
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| env(ENDPOINT_ENV))
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let url = url::Url::parse(&endpoint).map_err(|e| S3Error::BadEndpoint {
            endpoint: endpoint.clone(),
            message: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(S3Error::BadEndpoint {
                endpoint,
                message: "expected http(s)://host[:port]".into(),
            });
        }
        Ok(S3Config {
            endpoint: url,
            region,
        })
    }
}

/// The keys requests are signed with.
#[derive(Debug, Clone)]
pub struct S3Credentials {
    pub key_id: Secret,
    pub secret: Secret,
    pub token: Option<Secret>,
}

impl S3Credentials {
    /// Reads the keys from the credential store `dir` (0600 files named after them),
    /// or, where a file is missing, from this process's environment (a foreground
    /// controller, as for providers' API keys).
    pub fn read(dir: &Path) -> Result<Self, S3Error> {
        let read = |name: &'static str| -> Result<Option<Secret>, S3Error> {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(v) => Ok(Some(Secret::new(v.trim_end_matches('\n')))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(std::env::var(name)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(Secret::new)),
                Err(source) => Err(S3Error::ReadCredential { name, source }),
            }
        };
        Ok(S3Credentials {
            key_id: read(KEY_ID)?.ok_or(S3Error::MissingCredential(KEY_ID))?,
            secret: read(SECRET_KEY)?.ok_or(S3Error::MissingCredential(SECRET_KEY))?,
            token: read(SESSION_TOKEN)?,
        })
    }

    fn rusty(&self) -> Credentials {
        match &self.token {
            Some(t) => {
                Credentials::new_with_token(self.key_id.expose(), self.secret.expose(), t.expose())
            }
            None => Credentials::new(self.key_id.expose(), self.secret.expose()),
        }
    }
}

/// A curl config file (`curl -K`) that signs every request with `creds` for S3 in
/// `region`, fails on HTTP errors, and retries what is worth retrying. Its content is
/// secret: written only to 0600 files.
pub fn curl_config(creds: &S3Credentials, region: &str) -> Secret {
    // curl's config syntax: a double-quoted value takes backslash escapes.
    let quote = |s: &str| {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    };
    let mut text = format!(
        "user = {}\naws-sigv4 = {}\n",
        quote(&format!(
            "{}:{}",
            creds.key_id.expose(),
            creds.secret.expose()
        )),
        quote(&format!("aws:amz:{region}:s3"))
    );
    if let Some(token) = &creds.token {
        text.push_str(&format!(
            "header = {}\n",
            quote(&format!("x-amz-security-token: {}", token.expose()))
        ));
    }
    // S3 wants the payload hash header; an unsigned payload lets curl stream files.
    // No header is ever removed with an empty `Name:` (as `Expect:` was, to save the
    // 100-continue round trip): curl (7.88) still lists a removed header in the signed
    // ones, and S3 refuses the signature. A transfer stalled for a minute (an endpoint
    // that hangs) is abandoned and retried, never waited on.
    text.push_str(
        "header = \"x-amz-content-sha256: UNSIGNED-PAYLOAD\"\n\
         fail\nsilent\nshow-error\n\
         retry = 4\nretry-connrefused\nconnect-timeout = 30\n\
         speed-limit = 1\nspeed-time = 60\n",
    );
    Secret::new(text)
}

/// What [`S3Client::prune_checkpoints`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub checkpoints: usize,
    pub objects: usize,
}

/// One checkpoint's name in the store: `<seq:08>-a<attempt>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Generation {
    pub seq: u64,
    pub attempt: u32,
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08}-a{}", self.seq, self.attempt)
    }
}

impl std::str::FromStr for Generation {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (seq, attempt) = s.split_once("-a").ok_or(())?;
        Ok(Generation {
            seq: seq.parse().map_err(|_| ())?,
            attempt: attempt.parse().map_err(|_| ())?,
        })
    }
}

/// A bucket, where it is, and the keys to it: what both the controller's client and
/// the agent's curl need.
#[derive(Debug, Clone)]
pub struct S3Target {
    pub config: S3Config,
    pub location: S3Location,
    pub credentials: S3Credentials,
}

impl S3Target {
    fn bucket(&self) -> Result<Bucket, S3Error> {
        // Path style works with every S3-compatible server and with AWS (given the
        // regional endpoint); virtual hosts need DNS a local server does not have.
        Bucket::new(
            self.config.endpoint.clone(),
            UrlStyle::Path,
            self.location.bucket.clone(),
            self.config.region.clone(),
        )
        .map_err(|e| S3Error::BadEndpoint {
            endpoint: self.config.endpoint.to_string(),
            message: e.to_string(),
        })
    }

    /// The URL of a run's objects (`.../bucket/prefix/<run>`), for the agent's curl.
    pub fn run_url(&self, run: &str) -> Result<String, S3Error> {
        let bucket = self.bucket()?;
        Ok(bucket
            .object_url(&self.location.run_prefix(run))
            .to_string())
    }
}

/// The controller's own S3 client (listing, reading and writing a few objects).
pub struct S3Client {
    target: S3Target,
    bucket: Bucket,
    creds: Credentials,
    http: reqwest::Client,
    /// Objects larger than this go up in parts.
    put_limit: u64,
    part_size: u64,
}

/// The largest object S3 takes in one PUT (5 GiB): past it, uploads go in parts.
pub const SINGLE_PUT_LIMIT: u64 = 5 << 30;

/// The part size of the controller's multipart uploads.
pub const PART_SIZE: u64 = 64 << 20;

/// The most parts S3 takes in one multipart upload.
const MAX_PARTS: u64 = 10_000;

impl S3Client {
    pub fn new(target: S3Target) -> Result<Self, S3Error> {
        let bucket = target.bucket()?;
        let creds = target.credentials.rusty();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|source| S3Error::Http {
                step: "build client",
                source,
            })?;
        Ok(S3Client {
            target,
            bucket,
            creds,
            http,
            put_limit: SINGLE_PUT_LIMIT,
            part_size: PART_SIZE,
        })
    }

    pub fn target(&self) -> &S3Target {
        &self.target
    }

    async fn send(
        &self,
        step: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<reqwest::Response>, S3Error> {
        let response = request
            .send()
            .await
            .map_err(|source| S3Error::Http { step, source })?;
        let status = response.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        if !response.status().is_success() {
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return Err(S3Error::Status { step, status, body });
        }
        Ok(Some(response))
    }

    /// Creates the bucket (for tests and first use; an existing one of ours is fine).
    pub async fn create_bucket(&self) -> Result<(), S3Error> {
        let url = self.bucket.create_bucket(&self.creds).sign(SIGNED_FOR);
        // An empty body still needs its length said (S3 answers 411 otherwise).
        let request = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, "0");
        match self.send("create bucket", request).await {
            Err(S3Error::Status { status: 409, .. }) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every key under `prefix`, with its size, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, S3Error> {
        const STEP: &str = "list objects";
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.creds));
            action.with_prefix(prefix);
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let Some(response) = self.send(STEP, self.http.get(url)).await? else {
                return Err(S3Error::Status {
                    step: STEP,
                    status: 404,
                    body: format!("no bucket {}", self.target.location.bucket),
                });
            };
            let text = response
                .text()
                .await
                .map_err(|source| S3Error::Http { step: STEP, source })?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| {
                S3Error::Parse {
                    step: STEP,
                    message: e.to_string(),
                }
            })?;
            keys.extend(
                page.contents
                    .into_iter()
                    .map(|c| (c.key, c.size.unwrap_or(0))),
            );
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(keys)
    }

    /// An object's bytes; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        const STEP: &str = "get object";
        let url = self
            .bucket
            .get_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        let Some(response) = self.send(STEP, self.http.get(url)).await? else {
            return Ok(None);
        };
        let bytes = response
            .bytes()
            .await
            .map_err(|source| S3Error::Http { step: STEP, source })?;
        Ok(Some(bytes.to_vec()))
    }

    /// Sets the size past which [`S3Client::put`] uploads in parts, and the part size
    /// (tests use small ones; S3 itself wants parts of at least 5 MiB but the last).
    pub fn with_multipart(mut self, put_limit: u64, part_size: u64) -> Self {
        self.put_limit = put_limit;
        self.part_size = part_size.max(1);
        self
    }

    /// Writes an object: in one PUT up to S3's single-PUT limit, in parts past it.
    pub async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), S3Error> {
        if body.len() as u64 > self.put_limit {
            return self.put_multipart(key, &body).await;
        }
        let url = self
            .bucket
            .put_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        self.send("put object", self.http.put(url).body(body))
            .await
            .map(|_| ())
    }

    /// CreateMultipartUpload, UploadPart for each part (of `part_size`, larger when
    /// S3's 10,000 parts would not hold the object), CompleteMultipartUpload; an upload
    /// that fails on the way is aborted, so that no part is left billing storage.
    async fn put_multipart(&self, key: &str, body: &[u8]) -> Result<(), S3Error> {
        const STEP: &str = "multipart upload";
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        let created = self.send(STEP, self.http.post(url)).await?;
        let text = match created {
            Some(r) => r
                .text()
                .await
                .map_err(|source| S3Error::Http { step: STEP, source })?,
            None => {
                return Err(S3Error::Status {
                    step: STEP,
                    status: 404,
                    body: format!("no bucket {}", self.target.location.bucket),
                });
            }
        };
        let upload =
            rusty_s3::actions::CreateMultipartUpload::parse_response(&text).map_err(|e| {
                S3Error::Parse {
                    step: STEP,
                    message: e.to_string(),
                }
            })?;
        let upload_id = upload.upload_id();
        let sent = self.upload_parts(key, upload_id, body).await;
        if sent.is_err() {
            let url = self
                .bucket
                .abort_multipart_upload(Some(&self.creds), key, upload_id)
                .sign(SIGNED_FOR);
            if let Err(e) = self
                .send("abort multipart upload", self.http.delete(url))
                .await
            {
                tracing::warn!(key, error = %e, "cannot abort a failed multipart upload");
            }
        }
        sent
    }

    async fn upload_parts(&self, key: &str, upload_id: &str, body: &[u8]) -> Result<(), S3Error> {
        const STEP: &str = "upload part";
        let part_size = self
            .part_size
            .max((body.len() as u64).div_ceil(MAX_PARTS))
            .max(1);
        let mut etags = Vec::new();
        for (i, chunk) in body.chunks(part_size as usize).enumerate() {
            let number = u16::try_from(i + 1).map_err(|_| S3Error::Parse {
                step: STEP,
                message: format!("more than {MAX_PARTS} parts"),
            })?;
            let url = self
                .bucket
                .upload_part(Some(&self.creds), key, number, upload_id)
                .sign(SIGNED_FOR);
            let response = self
                .send(STEP, self.http.put(url).body(chunk.to_vec()))
                .await?
                .ok_or_else(|| S3Error::Status {
                    step: STEP,
                    status: 404,
                    body: format!("no upload {upload_id}"),
                })?;
            let etag = response
                .headers()
                .get(reqwest::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| S3Error::Parse {
                    step: STEP,
                    message: format!("no ETag for part {number}"),
                })?;
            etags.push(etag.to_string());
        }
        const COMPLETE: &str = "complete multipart upload";
        let action = self.bucket.complete_multipart_upload(
            Some(&self.creds),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let response = self
            .send(COMPLETE, self.http.post(url).body(action.body()))
            .await?
            .ok_or_else(|| S3Error::Status {
                step: COMPLETE,
                status: 404,
                body: format!("no upload {upload_id}"),
            })?;
        let text = response.text().await.map_err(|source| S3Error::Http {
            step: COMPLETE,
            source,
        })?;
        // S3 may answer 200 with an error inside: only a parsed result is success.
        rusty_s3::actions::CompleteMultipartUploadResponse::parse(&text).map_err(|e| {
            S3Error::Parse {
                step: COMPLETE,
                message: format!("{e}: {}", text.chars().take(300).collect::<String>()),
            }
        })?;
        Ok(())
    }

    /// The multipart uploads under `prefix` that are still open (created, neither
    /// completed nor aborted: their parts bill storage), as (key, upload id), at most
    /// the first 1,000 (one page of ListMultipartUploads). rusty-s3 has no action for
    /// it: a bucket GET signed as ListObjectsV2 is, with its query swapped, the same
    /// request.
    pub async fn open_uploads(&self, prefix: &str) -> Result<Vec<(String, String)>, S3Error> {
        const STEP: &str = "list multipart uploads";
        let mut action = self.bucket.list_objects_v2(Some(&self.creds));
        let query = action.query_mut();
        query.remove("list-type");
        query.remove("encoding-type");
        query.insert("uploads", "");
        query.insert("prefix", prefix.to_string());
        let url = action.sign(SIGNED_FOR);
        let Some(response) = self.send(STEP, self.http.get(url)).await? else {
            return Err(S3Error::Status {
                step: STEP,
                status: 404,
                body: format!("no bucket {}", self.target.location.bucket),
            });
        };
        let text = response
            .text()
            .await
            .map_err(|source| S3Error::Http { step: STEP, source })?;
        let element = |block: &str, name: &str| -> Option<String> {
            let start = block.find(&format!("<{name}>"))? + name.len() + 2;
            let end = start + block[start..].find(&format!("</{name}>"))?;
            Some(block[start..end].to_string())
        };
        Ok(text
            .split("<Upload>")
            .skip(1)
            .filter_map(|block| Some((element(block, "Key")?, element(block, "UploadId")?)))
            .collect())
    }

    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let url = self
            .bucket
            .delete_object(Some(&self.creds), key)
            .sign(SIGNED_FOR);
        self.send("delete object", self.http.delete(url))
            .await
            .map(|_| ())
    }

    /// The newest complete checkpoint of `run` (the newest manifest), if any.
    pub async fn latest_checkpoint(&self, run: &str) -> Result<Option<Generation>, S3Error> {
        let prefix = format!(
            "{}/{CHECKPOINTS}/manifests/",
            self.target.location.run_prefix(run)
        );
        Ok(self
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|(key, _)| key.strip_prefix(&prefix)?.parse::<Generation>().ok())
            .max())
    }

    /// The files of a complete checkpoint: (generation holding the bytes, path).
    pub async fn checkpoint_files(
        &self,
        run: &str,
        generation: Generation,
    ) -> Result<Option<Vec<(String, String)>>, S3Error> {
        let key = format!(
            "{}/{CHECKPOINTS}/manifests/{generation}",
            self.target.location.run_prefix(run)
        );
        let Some(bytes) = self.get(&key).await? else {
            return Ok(None);
        };
        Ok(Some(
            String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|l| l.split_once('\t'))
                .map(|(g, p)| (g.to_string(), p.to_string()))
                .collect(),
        ))
    }

    /// Removes the checkpoints of `run` older than its newest `keep` complete ones
    /// (never fewer than one kept, never one whose seq is in `protect`: a checkpoint an
    /// attempt restores from), and every object no kept checkpoint names. Manifests go
    /// first, so no checkpoint is ever complete with an object missing; objects of a
    /// generation newer than the newest complete one (a sync under way) are never
    /// touched, and neither are the objects older generations hold for a kept one.
    pub async fn prune_checkpoints(
        &self,
        run: &str,
        keep: usize,
        protect: &[u64],
    ) -> Result<Pruned, S3Error> {
        let base = format!("{}/{CHECKPOINTS}", self.target.location.run_prefix(run));
        let manifests_at = format!("{base}/manifests/");
        let objects_at = format!("{base}/objects/");
        let listed = self.list(&format!("{base}/")).await?;
        let mut complete: Vec<Generation> = listed
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&manifests_at)?.parse().ok())
            .collect();
        complete.sort();
        let Some(&newest) = complete.last() else {
            return Ok(Pruned::default());
        };
        let first_kept = complete.len().saturating_sub(keep.max(1));
        let (old, kept) = complete.split_at(first_kept);
        let (gone, protected): (Vec<Generation>, Vec<Generation>) =
            old.iter().partition(|g| !protect.contains(&g.seq));
        if gone.is_empty() {
            return Ok(Pruned::default());
        }
        // Every object a kept checkpoint names stays, in whichever generation it is.
        let mut named = std::collections::BTreeSet::new();
        for g in kept.iter().chain(&protected) {
            let files = self
                .checkpoint_files(run, *g)
                .await?
                .ok_or_else(|| S3Error::Parse {
                    step: "prune checkpoints",
                    message: format!("manifest {g} vanished while pruning"),
                })?;
            named.extend(
                files
                    .into_iter()
                    .map(|(holder, path)| format!("{objects_at}{holder}/{path}")),
            );
        }
        let mut pruned = Pruned::default();
        for g in &gone {
            self.delete(&format!("{manifests_at}{g}")).await?;
            pruned.checkpoints += 1;
        }
        for (key, _) in &listed {
            let Some(rest) = key.strip_prefix(&objects_at) else {
                continue;
            };
            let Some(generation) = rest
                .split_once('/')
                .and_then(|(g, _)| g.parse::<Generation>().ok())
            else {
                continue;
            };
            if generation <= newest && !named.contains(key) {
                self.delete(key).await?;
                pruned.objects += 1;
            }
        }
        Ok(pruned)
    }

    /// The key of one file of a checkpoint.
    pub fn checkpoint_object(&self, run: &str, generation: &str, path: &str) -> String {
        format!(
            "{}/{CHECKPOINTS}/objects/{generation}/{path}",
            self.target.location.run_prefix(run)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_generations() {
        let l = S3Location::parse("s3://bucket/runs/a/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("bucket", "runs/a"));
        assert_eq!(l.run_prefix("job-0"), "runs/a/job-0");
        let l = S3Location::parse("s3://bucket").unwrap();
        assert_eq!(l.run_prefix("job-0"), "job-0");
        assert!(S3Location::parse("s3:///x").is_err());
        assert!(S3Location::parse("gs://b/x").is_err());
        let g = Generation { seq: 7, attempt: 2 };
        assert_eq!(g.to_string(), "00000007-a2");
        assert_eq!("00000007-a2".parse::<Generation>(), Ok(g));
        assert!("x".parse::<Generation>().is_err());
        // Ordered by seq first: a later attempt's first checkpoint is newer.
        assert!(Generation { seq: 8, attempt: 1 } > g);
    }

    #[test]
    fn curl_config_quotes_and_keeps_the_secret_out_of_debug() {
        let creds = S3Credentials {
            key_id: Secret::new("AKID"),
            secret: Secret::new("se\"cr\\et"),
            token: None,
        };
        let text = curl_config(&creds, "eu-west-1");
        assert!(
            text.expose().contains(r#"user = "AKID:se\"cr\\et""#),
            "{}",
            text.expose()
        );
        assert!(
            text.expose()
                .contains(r#"aws-sigv4 = "aws:amz:eu-west-1:s3""#)
        );
        let debug = format!("{creds:?}");
        assert!(
            !debug.contains("AKID") && !debug.contains("se\"cr"),
            "{debug}"
        );
    }
}
