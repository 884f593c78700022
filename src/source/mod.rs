//! A job's source as the controller's machine sees it: what git says about a work tree
//! or a remote (`git`), and which files of a working folder an upload sends (`upload`:
//! never `$ASIMOV_HOME` or anything else asimov writes, and never more than a
//! documented size). Runs on the controller, never on an instance; knows nothing of
//! transports, providers or the store.

mod git;
mod upload;

pub use git::{
    GitInfo, LS_REMOTE_TIMEOUT, capture_git, is_work_tree, resolve_remote_commit,
    resolve_remote_commit_within, workdir_files,
};
pub use upload::{
    DEFAULT_MAX_UPLOAD, MAX_UPLOAD_ENV, Selection, SelectionError, human, max_upload, select_upload,
};
