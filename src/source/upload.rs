//! The files of a working folder one upload sends, and their size, checked before a
//! byte moves.

use super::git::workdir_files;
use std::path::{Path, PathBuf};

/// What a workdir upload may send at most unless [`MAX_UPLOAD_ENV`] says otherwise:
/// 5 GiB. A working folder is code and small data; anything bigger is far more often a
/// mistake (a dataset or a home folder swept in) than intent.
pub const DEFAULT_MAX_UPLOAD: u64 = 5 << 30;

/// Overrides [`DEFAULT_MAX_UPLOAD`]: a size such as `20GiB`, `500MB` or a byte count.
pub const MAX_UPLOAD_ENV: &str = "ASIMOV_MAX_UPLOAD";

/// The files to send, as paths relative to the working folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub files: Vec<PathBuf>,
    /// Total size of the regular files among them.
    pub bytes: u64,
    /// Paths left out because asimov writes them (its home, a local outputs folder).
    pub excluded: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    #[error(
        "working folder {} is over the upload limit of {} (counted {} in {files} file(s) \
         before stopping; largest {} at {}): keep large files out with .gitignore, or \
         raise the limit with {MAX_UPLOAD_ENV}",
        dir.display(), human(*limit), human(*seen), largest.display(), human(*largest_bytes)
    )]
    TooLarge {
        dir: PathBuf,
        limit: u64,
        seen: u64,
        files: usize,
        /// The biggest file counted, relative to `dir`: usually the culprit.
        largest: PathBuf,
        largest_bytes: u64,
    },
    #[error(
        "working folder {} is inside {}, which asimov writes and never uploads",
        dir.display(), excluded.display()
    )]
    InsideExcluded { dir: PathBuf, excluded: PathBuf },
    #[error("cannot read working folder {}", dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{MAX_UPLOAD_ENV}={value:?} is not a size (e.g. 20GiB, 500MB, 1000000)")]
    BadLimit { value: String },
}

/// The upload limit: [`MAX_UPLOAD_ENV`] when set, else [`DEFAULT_MAX_UPLOAD`].
pub fn max_upload() -> Result<u64, SelectionError> {
    match std::env::var(MAX_UPLOAD_ENV) {
        Ok(value) if !value.trim().is_empty() => {
            parse_size(&value).ok_or(SelectionError::BadLimit { value })
        }
        _ => Ok(DEFAULT_MAX_UPLOAD),
    }
}

/// `123`, `10KB`, `1.5GiB`, `500M`: decimal (`KB`, `MB`, `GB`, `TB`) and binary (`K`,
/// `KiB`, ...) units.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// A size for people: `1.2 GiB`, `340.0 KiB`, `12 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The files of `dir` an upload sends: what git would keep when `dir` is a git work
/// tree, else everything (symbolic links as links, never followed); never anything
/// under `exclude`. Fails, before anything is sent, once the files add up to more than
/// `limit` bytes; bounded time, since counting stops there.
pub fn select_upload(
    dir: &Path,
    exclude: &[PathBuf],
    limit: u64,
) -> Result<Selection, SelectionError> {
    let read = |source| SelectionError::Read {
        dir: dir.to_path_buf(),
        source,
    };
    let base = std::fs::canonicalize(dir).map_err(read)?;
    // Canonical forms, so `~/x/../.asimov` or a symlinked path still matches.
    let exclude: Vec<PathBuf> = exclude
        .iter()
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    if let Some(outer) = exclude.iter().find(|e| base.starts_with(e)) {
        return Err(SelectionError::InsideExcluded {
            dir: dir.to_path_buf(),
            excluded: outer.clone(),
        });
    }
    let excluded_here: Vec<PathBuf> = exclude
        .iter()
        .filter_map(|e| e.strip_prefix(&base).ok().map(Path::to_path_buf))
        .collect();
    let is_excluded = |rel: &Path| excluded_here.iter().any(|e| rel.starts_with(e));
    let mut selection = Selection {
        files: Vec::new(),
        bytes: 0,
        excluded: excluded_here.clone(),
    };
    let mut largest = (PathBuf::new(), 0u64);
    let mut add = |rel: PathBuf, meta: &std::fs::Metadata| {
        if meta.is_file() {
            selection.bytes += meta.len();
            if meta.len() >= largest.1 {
                largest = (rel.clone(), meta.len());
            }
        }
        selection.files.push(rel);
        if selection.bytes > limit {
            return Err(SelectionError::TooLarge {
                dir: dir.to_path_buf(),
                limit,
                seen: selection.bytes,
                files: selection.files.len(),
                largest: largest.0.clone(),
                largest_bytes: largest.1,
            });
        }
        Ok(())
    };
    match workdir_files(&base) {
        Some(listed) => {
            for rel in listed {
                if is_excluded(&rel) {
                    continue;
                }
                // Listed by git but deleted from the folder: nothing to send.
                if let Ok(meta) = std::fs::symlink_metadata(base.join(&rel)) {
                    add(rel, &meta)?;
                }
            }
        }
        None => {
            let mut pending = vec![PathBuf::new()];
            while let Some(rel) = pending.pop() {
                let mut empty = true;
                for entry in std::fs::read_dir(base.join(&rel)).map_err(read)? {
                    let entry = entry.map_err(read)?;
                    empty = false;
                    let child = rel.join(entry.file_name());
                    if is_excluded(&child) {
                        continue;
                    }
                    let meta = entry.metadata().map_err(read)?; // does not follow links
                    if meta.is_dir() {
                        pending.push(child);
                    } else {
                        add(child, &meta)?;
                    }
                }
                // An empty folder is sent as itself (the root needs no entry).
                if empty && !rel.as_os_str().is_empty() {
                    let meta = std::fs::symlink_metadata(base.join(&rel)).map_err(read)?;
                    add(rel, &meta)?;
                }
            }
            selection.files.sort();
        }
    }
    Ok(selection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_unit_systems() {
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("2KB"), Some(2000));
        assert_eq!(parse_size("1.5 GiB"), Some(3 << 29));
        assert_eq!(parse_size("500M"), Some(500 << 20));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn a_plain_folder_sends_all_but_the_excluded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("src/empty")).unwrap();
        std::fs::write(d.join("src/a.py"), "abc").unwrap();
        std::fs::create_dir_all(d.join(".asimov/local/x")).unwrap();
        std::fs::write(d.join(".asimov/state.db"), "secret").unwrap();
        std::os::unix::fs::symlink(d.join(".asimov"), d.join("link")).unwrap();
        let s = select_upload(d, &[d.join(".asimov")], 1 << 20).unwrap();
        let names: Vec<_> = s.files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(names, ["link", "src/a.py", "src/empty"]);
        assert_eq!(s.bytes, 3);
        assert_eq!(s.excluded, [PathBuf::from(".asimov")]);
        std::fs::write(d.join("src/big.bin"), [0u8; 100]).unwrap();
        let err = select_upload(d, &[], 50).unwrap_err().to_string();
        assert!(err.contains(MAX_UPLOAD_ENV), "{err}");
        assert!(err.contains("largest src/big.bin at 100 B"), "{err}");
        let err = select_upload(&d.join(".asimov/local"), &[d.join(".asimov")], 1).unwrap_err();
        assert!(
            matches!(err, SelectionError::InsideExcluded { .. }),
            "{err}"
        );
    }
}
