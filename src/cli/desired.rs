//! The desired state as the CLI keeps it: one file per object in
//! `$ASIMOV_HOME/manifests/` (`job.NAME.yaml`, `fleet.NAME.yaml`, `budget.NAME.yaml`),
//! written atomically, and the names manifests may refer to (`manifest::Context`).
//! Also the two views of a watched folder: the controller's (`load_tolerant`: one broken
//! file keeps only its own objects at their last good state) and the readers'
//! (`view`: what the controller recorded in the store, so `get`, `describe` and `delete`
//! show what is actually reconciled, wherever its folder is).

use crate::home::Home;
use crate::manifest::{self, Context, Document, Kind, Loaded, Problem, Problems};
use crate::store::{DesiredFolder, DesiredProblem, DesiredRecord, Store};
use std::collections::BTreeSet;
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

/// A watched folder as the controller takes it: what is in force, and what is wrong with
/// the files whose objects are kept at their last good state.
#[derive(Debug, Clone, Default)]
pub struct FolderState {
    pub loaded: Loaded,
    pub problems: Vec<Problem>,
}

/// How many broken files are each tried again alone (a file may fail only because it
/// names a fleet of a broken file); beyond this they simply stay at their last good state.
const RESCUE_LIMIT: usize = 20;

/// Loads `dir` so that one broken file stalls only its own objects: the files that
/// validate are in force, and the objects a broken file defined in `last_good` stay as
/// they were. Fails only when the folder cannot be listed.
pub fn load_tolerant(
    dir: &Path,
    ctx: &Context,
    last_good: &Loaded,
) -> Result<FolderState, Problems> {
    if !dir.is_dir() {
        return Ok(FolderState::default());
    }
    let first = match manifest::load_paths(&[dir.to_path_buf()], ctx) {
        Ok(loaded) => {
            return Ok(FolderState {
                loaded,
                problems: Vec::new(),
            });
        }
        Err(problems) => problems,
    };
    let files = manifest::manifest_files_in(dir).map_err(|e| {
        Problems(vec![Problem {
            file: dir.to_path_buf(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot list manifest folder: {e}"),
        }])
    })?;
    let mut problems = first.0;
    let mut broken: BTreeSet<PathBuf> = problems
        .iter()
        .map(|p| p.file.clone())
        .filter(|f| files.contains(f))
        .collect();
    if broken.is_empty() {
        // The problems name no file of the folder (a matrix file it refers to, say):
        // nothing can be singled out, so every file keeps its last good state.
        broken = files.iter().cloned().collect();
    }
    // What the kept objects define stays referable by the files that validate.
    let mut ctx = ctx.clone();
    for doc in last_good
        .documents
        .iter()
        .filter(|d| broken.contains(&d.origin.file))
    {
        match doc.kind {
            Kind::Fleet => ctx.fleets.insert(doc.name.clone()),
            Kind::Budget => ctx.budgets.insert(doc.name.clone()),
            Kind::Job => false,
        };
    }
    let mut loaded = Loaded::default();
    loop {
        let good: Vec<PathBuf> = files
            .iter()
            .filter(|f| !broken.contains(*f))
            .cloned()
            .collect();
        if good.is_empty() {
            break;
        }
        match manifest::load_paths(&good, &ctx) {
            Ok(l) => {
                loaded = l;
                break;
            }
            Err(more) => {
                let new: Vec<PathBuf> = more
                    .0
                    .iter()
                    .map(|p| p.file.clone())
                    .filter(|f| good.contains(f))
                    .collect();
                problems.extend(more.0);
                if new.is_empty() {
                    broken.extend(good);
                    break;
                }
                broken.extend(new);
            }
        }
    }
    // A file may have failed only for want of a name another broken file defines.
    let candidates: Vec<PathBuf> = broken.iter().take(RESCUE_LIMIT).cloned().collect();
    for file in candidates {
        let mut with: Vec<PathBuf> = files
            .iter()
            .filter(|f| !broken.contains(*f))
            .cloned()
            .collect();
        with.push(file.clone());
        if let Ok(l) = manifest::load_paths(&with, &ctx) {
            loaded = l;
            broken.remove(&file);
            problems.retain(|p| p.file != file);
        }
    }
    problems.retain(|p| broken.contains(&p.file) || !files.contains(&p.file));
    // The same problem may come from several rounds.
    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert((p.file.clone(), p.line, p.column, p.message.clone())));
    keep_last_good(&mut loaded, last_good, &broken);
    Ok(FolderState { loaded, problems })
}

/// Adds to `loaded` the objects `last_good` had from the `broken` files, unless a file
/// that validates now defines them.
fn keep_last_good(loaded: &mut Loaded, last_good: &Loaded, broken: &BTreeSet<PathBuf>) {
    let defined: BTreeSet<(Kind, String)> = loaded
        .documents
        .iter()
        .map(|d| (d.kind, d.name.clone()))
        .collect();
    for doc in &last_good.documents {
        if !broken.contains(&doc.origin.file) || defined.contains(&(doc.kind, doc.name.clone())) {
            continue;
        }
        let m = &last_good.manifests;
        let kept = match doc.kind {
            Kind::Job => m
                .jobs
                .iter()
                .find(|j| j.name == doc.name)
                .map(|j| loaded.manifests.jobs.push(j.clone())),
            Kind::Fleet => m
                .fleets
                .iter()
                .find(|f| f.name == doc.name)
                .map(|f| loaded.manifests.fleets.push(f.clone())),
            Kind::Budget => m
                .budgets
                .iter()
                .find(|b| b.name == doc.name)
                .map(|b| loaded.manifests.budgets.push(b.clone())),
        };
        if kept.is_some() {
            loaded.documents.push(doc.clone());
        }
    }
}

/// Rebuilds the typed objects of a recorded desired state from their documents. Each
/// document was valid when recorded; one that no longer loads (a secret it names was
/// removed since, say) is left out and its problem returned.
pub fn loaded_from_record(home: &Home, record: &DesiredRecord) -> (Loaded, Vec<Problem>) {
    let mut ctx = secrets_context(home);
    for o in &record.objects {
        match Kind::parse(&o.kind) {
            Some(Kind::Fleet) => ctx.fleets.insert(o.name.clone()),
            Some(Kind::Budget) => ctx.budgets.insert(o.name.clone()),
            _ => false,
        };
    }
    let mut loaded = Loaded::default();
    let mut problems = Vec::new();
    // One load per file (its documents joined), not one per object: thousands of jobs.
    let mut by_file: std::collections::BTreeMap<&Path, Vec<&crate::store::DesiredObject>> =
        Default::default();
    for o in &record.objects {
        by_file.entry(o.file.as_path()).or_default().push(o);
    }
    for (file, objects) in by_file {
        let text = objects
            .iter()
            .map(|o| o.yaml.as_str())
            .collect::<Vec<_>>()
            .join("\n---\n");
        let parts = match manifest::load_str(file, &text, &ctx) {
            Ok(l) => vec![l],
            Err(_) => objects
                .iter()
                .filter_map(|o| match manifest::load_str(file, &o.yaml, &ctx) {
                    Ok(l) => Some(l),
                    Err(p) => {
                        problems.extend(p.0);
                        None
                    }
                })
                .collect(),
        };
        for part in parts {
            merge(&mut loaded, part);
        }
    }
    // Positions as recorded, not as in the joined text.
    let line_of = |kind: Kind, name: &str| {
        record
            .objects
            .iter()
            .find(|o| o.kind == kind.as_str() && o.name == name)
            .map_or(1, |o| o.line)
    };
    for d in &mut loaded.documents {
        d.origin.line = line_of(d.kind, &d.name);
    }
    for j in &mut loaded.manifests.jobs {
        j.origin.line = line_of(Kind::Job, &j.name);
    }
    (loaded, problems)
}

fn merge(into: &mut Loaded, part: Loaded) {
    into.manifests.jobs.extend(part.manifests.jobs);
    into.manifests.fleets.extend(part.manifests.fleets);
    into.manifests.budgets.extend(part.manifests.budgets);
    into.documents.extend(part.documents);
}

/// The desired state as the readers show it: what the controller recorded, or (before
/// any controller recorded anything) the home's manifests folder itself.
#[derive(Debug, Default)]
pub struct View {
    /// `None`: no controller has recorded a desired state in this home yet.
    pub source: Option<DesiredFolder>,
    pub loaded: Loaded,
    /// Files of the watched folder that do not validate (their objects keep their last
    /// good state), with since when.
    pub problems: Vec<DesiredProblem>,
}

impl View {
    /// The problem of the file an object came from, if that file is broken.
    pub fn problem_of(&self, file: &Path) -> Option<&DesiredProblem> {
        self.problems.iter().find(|p| p.file == file)
    }

    /// The folder the controller watches (the home's when none recorded one).
    pub fn folder(&self, home: &Home) -> PathBuf {
        self.source
            .as_ref()
            .map_or_else(|| home.manifests(), |s| s.folder.clone())
    }
}

/// The readers' view (see [`View`]).
pub fn view(home: &Home, store: Option<&Store>) -> Result<View, super::CliError> {
    if let Some(store) = store
        && let Some(record) = store.desired()?
    {
        let (loaded, unreadable) = loaded_from_record(home, &record);
        let mut problems = record.problems;
        let now = super::now();
        problems.extend(unreadable.into_iter().map(|p| DesiredProblem {
            file: p.file,
            line: p.line,
            column: p.column,
            message: format!("recorded object no longer loads: {}", p.message),
            since: now,
        }));
        return Ok(View {
            source: Some(record.source),
            loaded,
            problems,
        });
    }
    let state = load_tolerant(
        &home.manifests(),
        &secrets_context(home),
        &Loaded::default(),
    )?;
    let now = super::now();
    Ok(View {
        source: None,
        loaded: state.loaded,
        problems: state
            .problems
            .into_iter()
            .map(|p| DesiredProblem {
                file: p.file,
                line: p.line,
                column: p.column,
                message: p.message,
                since: now,
            })
            .collect(),
    })
}

/// `file:line:column: message (since …)`, for warnings.
pub fn describe_problem(p: &DesiredProblem, now: crate::model::Timestamp) -> String {
    let at = if p.line == 0 {
        p.file.display().to_string()
    } else {
        format!("{}:{}:{}", p.file.display(), p.line, p.column)
    };
    format!(
        "{at}: {} (since {}, {} ago)",
        p.message,
        super::render::rfc3339(p.since),
        super::render::age(now - p.since)
    )
}

/// Warns (stderr) about the watched folder's broken files: their objects keep their last
/// good state until they are fixed.
pub fn warn_problems(view: &View) {
    if view.problems.is_empty() {
        return;
    }
    let now = super::now();
    let files: BTreeSet<&Path> = view.problems.iter().map(|p| p.file.as_path()).collect();
    eprintln!(
        "warning: {} file(s) in {} do not validate; what they defined keeps its last good state:",
        files.len(),
        view.folder_display()
    );
    for p in &view.problems {
        eprintln!("  {}", describe_problem(p, now));
    }
}

impl View {
    fn folder_display(&self) -> String {
        self.source.as_ref().map_or_else(
            || "the manifests folder".into(),
            |s| s.folder.display().to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  hosts:\n    - {name: box, address: 10.0.0.11, gpus: 1}\n";
    const BROKEN: &str = "apiVersion: asimov/v1\nkind: Fleet\nmetadata: {name: lab\nspec: [\n";

    fn job(name: &str, fleet: bool) -> String {
        let placement = if fleet {
            "\n  placement:\n    - {provider: ssh, fleet: lab}"
        } else {
            ""
        };
        format!(
            "apiVersion: asimov/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  run: echo hi{placement}\n"
        )
    }

    fn names(l: &Loaded) -> Vec<String> {
        let mut n: Vec<String> = l
            .documents
            .iter()
            .map(|d| format!("{}/{}", d.kind, d.name))
            .collect();
        n.sort();
        n
    }

    #[test]
    fn a_broken_file_keeps_its_objects_and_the_others_load() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::default();
        std::fs::write(dir.path().join("fleet.yaml"), FLEET).unwrap();
        std::fs::write(dir.path().join("a.yaml"), job("a", true)).unwrap();
        let good = load_tolerant(dir.path(), &ctx, &Loaded::default()).unwrap();
        assert!(good.problems.is_empty());
        assert_eq!(names(&good.loaded), ["Fleet/lab", "Job/a"]);

        // The fleet's file breaks; a job that names the fleet and a new job still load.
        std::fs::write(dir.path().join("fleet.yaml"), BROKEN).unwrap();
        std::fs::write(dir.path().join("b.yaml"), job("b", false)).unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            job("a", true).replace("hi", "edited"),
        )
        .unwrap();
        let state = load_tolerant(dir.path(), &ctx, &good.loaded).unwrap();
        assert_eq!(names(&state.loaded), ["Fleet/lab", "Job/a", "Job/b"]);
        let a = state
            .loaded
            .manifests
            .jobs
            .iter()
            .find(|j| j.name == "a")
            .unwrap();
        assert!(
            a.runs[0].command.contains("edited"),
            "the edit to a applies"
        );
        assert!(!state.problems.is_empty());
        assert!(
            state
                .problems
                .iter()
                .all(|p| p.file.ends_with("fleet.yaml") && p.line > 0),
            "{:?}",
            state.problems
        );

        // Without a last good state, the broken file's objects are simply not there.
        let fresh = load_tolerant(dir.path(), &ctx, &Loaded::default()).unwrap();
        assert_eq!(names(&fresh.loaded), ["Job/b"]);
    }
}
