//! The desired state as the CLI keeps it: one file per object in
//! `$ASIMOV_HOME/manifests/` (`job.NAME.yaml`, `fleet.NAME.yaml`, `budget.NAME.yaml`),
//! written atomically, and the names manifests may refer to (`manifest::Context`).

use crate::home::Home;
use crate::manifest::{self, Context, Document, Kind, Loaded, Problems};
use std::path::{Path, PathBuf};

/// The stored file of one object.
pub fn object_file(home: &Home, kind: Kind, name: &str) -> PathBuf {
    home.manifests()
        .join(format!("{}.{name}.yaml", kind.as_str().to_lowercase()))
}

/// Everything in the manifests folder, validated; empty when the folder does not exist.
pub fn load_current(home: &Home) -> Result<Loaded, Problems> {
    load_folder(&home.manifests(), &secrets_context(home))
}

pub fn load_folder(dir: &Path, ctx: &Context) -> Result<Loaded, Problems> {
    if !dir.is_dir() {
        return Ok(Loaded::default());
    }
    manifest::load_paths(&[dir.to_path_buf()], ctx)
}

/// Names of the secrets in the credential store.
pub fn secrets_context(home: &Home) -> Context {
    let mut ctx = Context::default();
    if let Ok(entries) = std::fs::read_dir(home.credentials()) {
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str()
                && !name.starts_with('.')
            {
                ctx.secrets.insert(name.to_string());
            }
        }
    }
    ctx
}

/// What new manifests may refer to: stored fleets and budgets, and secrets.
pub fn context(home: &Home, current: &Loaded) -> Context {
    let mut ctx = secrets_context(home);
    ctx.fleets = current
        .manifests
        .fleets
        .iter()
        .map(|f| f.name.clone())
        .collect();
    ctx.budgets = current
        .manifests
        .budgets
        .iter()
        .map(|b| b.name.clone())
        .collect();
    ctx
}

/// How applying a document changes the stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
        }
    }
}

pub fn change_of(home: &Home, doc: &Document) -> Change {
    match std::fs::read_to_string(object_file(home, doc.kind, &doc.name)) {
        Ok(text) if text == doc.yaml => Change::Unchanged,
        Ok(_) => Change::Configured,
        Err(_) => Change::Created,
    }
}

/// Writes one document atomically (temp file, then rename), so the controller's watcher
/// never reads half a file.
pub fn write(home: &Home, doc: &Document) -> std::io::Result<()> {
    use std::io::Write;
    let dir = home.manifests();
    std::fs::create_dir_all(&dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".apply-")
        .tempfile_in(&dir)?;
    tmp.write_all(doc.yaml.as_bytes())?;
    tmp.persist(object_file(home, doc.kind, &doc.name))
        .map_err(|e| e.error)?;
    Ok(())
}

/// Removes an object's stored file; false when there was none.
pub fn remove(home: &Home, kind: Kind, name: &str) -> std::io::Result<bool> {
    match std::fs::remove_file(object_file(home, kind, name)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
