//! `asimov secret set|rm|list`: the credential store, one file of mode 0600 per secret
//! in `$ASIMOV_HOME/credentials/`. Values come from standard input, so they never sit in
//! shell history or a process's command line.

use super::args::SecretAction;
use super::{CliResult, fail};
use crate::home::{Home, write_private};
use std::io::Read;
use std::process::ExitCode;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !name.starts_with('-')
}

pub fn run(home: &Home, action: SecretAction) -> CliResult {
    home.ensure()?;
    match action {
        SecretAction::Set { name } => {
            if !valid_name(&name) {
                return Err(fail(format!(
                    "bad secret name {name:?}: expected an environment variable name (letters, digits and `_`), like HF_TOKEN"
                )));
            }
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("Enter the value of {name}, then press Ctrl-D:");
            }
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value)?;
            let value = value.trim_end_matches(['\n', '\r']);
            if value.is_empty() {
                return Err(fail(format!("no value given for {name} on standard input")));
            }
            write_private(&home.credentials().join(&name), value.as_bytes())?;
            println!("secret/{name} saved");
        }
        SecretAction::Rm { name } => {
            if !valid_name(&name) {
                return Err(fail(format!("bad secret name {name:?}")));
            }
            match std::fs::remove_file(home.credentials().join(&name)) {
                Ok(()) => println!("secret/{name} removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(fail(format!("no secret named {name:?}")));
                }
                Err(e) => return Err(e.into()),
            }
        }
        SecretAction::List => {
            let names = super::desired::secrets_context(home).secrets;
            if names.is_empty() {
                println!("No secrets.");
            }
            for name in names {
                println!("{name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
