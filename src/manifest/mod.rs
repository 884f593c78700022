//! Manifests: raw serde + schemars types mirroring the YAML (`raw`), the one YAML entry
//! point (`yaml`), validation in two stages into the typed desired state (`schema` checks
//! shape against the generated JSON Schema, `convert` checks meaning), and schema output.
//! Every problem in every file is reported at once with file, line and column.
//! Knows nothing of the store, providers, the controller or the clock; its only I/O is
//! reading the manifest files it is given (and a matrix `file` they name).

mod convert;
mod desired;
pub mod raw;
mod schema;
pub mod yaml;

pub use convert::{MAX_DURATION, is_dns_label, parse_duration};
pub use desired::*;
pub use yaml::to_yaml_string;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Names already known in the user's `$ASIMOV_HOME`, which manifests may refer to
/// without defining them in the files being loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    pub fleets: BTreeSet<String>,
    pub budgets: BTreeSet<String>,
    /// Names of secrets in the credential store (values are never needed here).
    pub secrets: BTreeSet<String>,
}

/// The kinds of manifest objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Job,
    Fleet,
    Budget,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Job, Kind::Fleet, Kind::Budget];

    /// The `kind:` value as written in manifests: `Job`, `Fleet`, `Budget`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Job => "Job",
            Kind::Fleet => "Fleet",
            Kind::Budget => "Budget",
        }
    }

    /// Parses the `kind:` value; exact spelling only.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// File name of the kind's schema in `schemas/`: `job.json`, ...
    pub fn schema_file(self) -> &'static str {
        match self {
            Kind::Job => "job.json",
            Kind::Fleet => "fleet.json",
            Kind::Budget => "budget.json",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One valid manifest document, ready to be stored in `$ASIMOV_HOME/manifests/`.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub kind: Kind,
    pub name: String,
    pub origin: Origin,
    /// The document alone, re-rendered with local paths (`source.workdir`, `files.from`,
    /// matrix `file`, `artifacts.to` when local, `identity_file`) made absolute against
    /// the manifest's folder and `~` expanded, so the stored copy means the same thing
    /// wherever it lives. Loading it again gives the same objects and `spec_hash`.
    pub yaml: String,
}

/// The result of loading manifests: typed objects and their documents, in file order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loaded {
    pub manifests: Manifests,
    pub documents: Vec<Document>,
}

/// One thing wrong with a manifest, with where it is and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is with the file as a whole (it cannot be read).
    pub line: usize,
    /// 1-based; 0 with `line`.
    pub column: usize,
    /// JSON pointer of the offending node inside its document, like
    /// `/spec/placement/0/provider`; empty for the document or file itself.
    pub path: String,
    pub message: String,
}

impl Problem {
    pub(crate) fn at(file: &Path, pos: yaml::Pos, path: &str, message: String) -> Problem {
        Problem {
            file: file.to_path_buf(),
            line: pos.line,
            column: pos.column,
            path: path.to_string(),
            message,
        }
    }

    fn whole_file(file: &Path, message: String) -> Problem {
        Problem {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            path: String::new(),
            message,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// Every problem found while loading, in file order then position order. Displays one
/// problem per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Loads files and folders (every non-hidden `*.yaml` / `*.yml` directly inside, sorted
/// by name; subfolders are not entered).
///
/// Fails with every problem in every file when anything is wrong, including files that
/// cannot be read; nothing is returned partially.
pub fn load_paths(paths: &[PathBuf], ctx: &Context) -> Result<Loaded, Problems> {
    let mut sources = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        if path.is_dir() {
            match manifest_files_in(path) {
                Ok(files) => {
                    for file in files {
                        read_source(&file, &mut sources, &mut problems);
                    }
                }
                Err(e) => problems.push(Problem::whole_file(
                    path,
                    format!("cannot list manifest folder: {e}"),
                )),
            }
        } else {
            read_source(path, &mut sources, &mut problems);
        }
    }
    convert::load_sources(&sources, ctx, problems)
}

/// Loads one file's text; `file` names it in problems and is the base of its relative
/// paths.
pub fn load_str(file: &Path, text: &str, ctx: &Context) -> Result<Loaded, Problems> {
    convert::load_sources(&[(file.to_path_buf(), text.to_string())], ctx, Vec::new())
}

/// The manifest files `load_paths` reads from a folder: every non-hidden `*.yaml` /
/// `*.yml` directly inside, sorted by name.
pub fn manifest_files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        // Editors leave hidden lock and backup files beside the manifests they edit.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        // Anything else named like a manifest (a FIFO, a device) is read, and so
        // reported, rather than silently left out.
        if is_yaml && !hidden && !path.is_dir() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_source(path: &Path, sources: &mut Vec<(PathBuf, String)>, problems: &mut Vec<Problem>) {
    match read_text(path) {
        Ok(text) => sources.push((path.to_path_buf(), text)),
        Err(e) => problems.push(Problem {
            file: path.to_path_buf(),
            line: e.pos.map_or(0, |p| p.line),
            column: e.pos.map_or(0, |p| p.column),
            path: String::new(),
            message: format!("cannot read manifest: {}", e.message),
        }),
    }
}

/// Largest manifest file (and matrix `file`) asimov reads: far above any real manifest,
/// small enough that a wrong path (a disk image, `/dev/zero`) is refused at once.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why a file could not be read as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadError {
    /// Where in the file, when the problem is a place in it (a byte that is not UTF-8).
    pub pos: Option<yaml::Pos>,
    pub message: String,
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`] as UTF-8 text.
///
/// Fails for anything else without blocking or reading on: a FIFO, a device, a socket, a
/// folder, a larger file, text that is not UTF-8.
pub(crate) fn read_text(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let whole = |message: String| ReadError { pos: None, message };
    // Non-blocking, so that opening a FIFO with no writer returns at once; the type is
    // then checked on the opened file itself, so a swap after a check cannot fool it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| whole(e.to_string()))?;
    let meta = file.metadata().map_err(|e| whole(e.to_string()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let found = if kind.is_dir() {
            "a folder"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "something else"
        };
        return Err(whole(format!("expected a regular file, found {found}")));
    }
    let too_large = |size: u64| {
        whole(format!(
            "the file has {size} bytes, more than the {} MiB a manifest may have",
            MAX_FILE_BYTES >> 20
        ))
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(meta.len()));
    }
    // The file may grow after the check: read one byte past the bound to notice.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| whole(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&valid[line_start..])
            .chars()
            .count()
            + 1;
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        ReadError {
            pos: Some(yaml::Pos { line, column }),
            message: "expected UTF-8 text, found a byte that is not UTF-8".to_string(),
        }
    })
}

/// The JSON Schema of a kind, pretty-printed with a final newline: the content of
/// `schemas/<kind>.json`.
pub fn schema_json(kind: Kind) -> String {
    let mut text = serde_json::to_string_pretty(schema::schema_value(kind))
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// Names defined by a set of documents, by kind, for cross-references.
pub(crate) type Defined = BTreeMap<Kind, BTreeSet<String>>;
