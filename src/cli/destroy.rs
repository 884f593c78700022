//! `asimov destroy [RUN] [--yes]`.

use super::{CliResult, fail};
use crate::home::Home;

pub fn run(_home: &Home, _run: Option<&str>, _yes: bool) -> CliResult {
    Err(fail("not built yet"))
}
