//! The Hugging Face token: asked once (without echo) on first need, checked for its
//! shape and, when the hub answers, by a whoami call that fails soft offline; kept as
//! the secret `HF_TOKEN` in the credential store (0600), which jobs name in `secrets:`.
//! `asimov token` is the only way to change it; `--show-source` says where it is kept.

use super::{CliError, CliResult, fail};
use crate::home::{Home, write_private};
use crate::model::Secret;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The secret's name, as jobs' `secrets:` list it and the job sees it.
pub const NAME: &str = "HF_TOKEN";
/// The whoami check must not hold the prompt up when the hub is slow or unreachable.
const WHOAMI_TIMEOUT: Duration = Duration::from_secs(3);

pub fn path(home: &Home) -> PathBuf {
    home.credentials().join(NAME)
}

/// True when a token is stored.
pub fn stored(home: &Home) -> bool {
    std::fs::metadata(path(home)).is_ok_and(|m| m.is_file() && m.len() > 0)
}

/// Why `token` is not a Hugging Face token, or `None` when it has the shape of one
/// (`hf_` then at least 30 letters and digits).
pub fn shape_problem(token: &str) -> Option<&'static str> {
    if !token.starts_with("hf_") {
        return Some("a Hugging Face token starts with hf_ (huggingface.co/settings/tokens)");
    }
    let rest = &token[3..];
    if !rest.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Some("a Hugging Face token holds only letters and digits after hf_");
    }
    if rest.len() < 30 {
        return Some("too short for a Hugging Face token (hf_ and 34 characters)");
    }
    None
}

/// What the hub said of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whoami {
    /// The hub knows it: the account's name.
    User(String),
    /// The hub refused it (401/403).
    Rejected,
    /// The hub could not be asked (offline, timeout, unexpected answer): not a verdict.
    Unknown(String),
}

/// The hub's base URL: `HF_ENDPOINT` like the hub's own clients, else huggingface.co.
fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

/// `GET {HF_ENDPOINT}/api/whoami-v2`, bounded by a short timeout.
pub fn whoami(token: &Secret) -> Whoami {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Whoami::Unknown(e.to_string()),
    };
    let url = format!("{}/api/whoami-v2", endpoint());
    runtime.block_on(async move {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = match reqwest::Client::builder().timeout(WHOAMI_TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => return Whoami::Unknown(e.to_string()),
        };
        let answer = client.get(&url).bearer_auth(token.expose()).send().await;
        let response = match answer {
            Ok(r) => r,
            Err(e) => return Whoami::Unknown(e.without_url().to_string()),
        };
        match response.status().as_u16() {
            401 | 403 => Whoami::Rejected,
            200 => match response.json::<serde_json::Value>().await {
                Ok(v) => match v.get("name").and_then(|n| n.as_str()) {
                    Some(name) => Whoami::User(name.to_string()),
                    None => Whoami::Unknown("whoami answer without a name".into()),
                },
                Err(e) => Whoami::Unknown(e.without_url().to_string()),
            },
            code => Whoami::Unknown(format!("the hub answered {code}")),
        }
    })
}

/// Asks for a token without echo until it has the right shape and the hub (when it
/// answers) accepts it, saves it, and returns the hub's user name when known.
pub fn ask_and_save(home: &Home, question: &str) -> Result<Option<String>, CliError> {
    loop {
        let typed = inquire::Password::new(question)
            .without_confirmation()
            .with_display_mode(inquire::PasswordDisplayMode::Hidden)
            .with_help_message("huggingface.co/settings/tokens; typed text is not shown")
            .with_validator(|t: &str| {
                Ok(match shape_problem(t.trim()) {
                    Some(why) => inquire::validator::Validation::Invalid(why.into()),
                    None => inquire::validator::Validation::Valid,
                })
            })
            .prompt()?;
        let token = Secret::new(typed.trim().to_string());
        let user = match whoami(&token) {
            Whoami::User(name) => {
                eprintln!("Hugging Face: signed in as {name}");
                Some(name)
            }
            Whoami::Rejected => {
                eprintln!("The Hugging Face hub rejected this token; try another.");
                continue;
            }
            Whoami::Unknown(why) => {
                eprintln!("Could not check the token with the hub ({why}); saved unchecked.");
                None
            }
        };
        home.ensure()?;
        write_private(&path(home), token.expose().as_bytes())?;
        eprintln!("Token saved in {} (mode 0600).", path(home).display());
        return Ok(user);
    }
}

/// `asimov token [--show-source]`.
pub fn run(home: &Home, show_source: bool) -> CliResult {
    if show_source {
        if stored(home) {
            println!(
                "{NAME} is kept in {} (mode 0600; jobs get it through `secrets: [{NAME}]`)",
                path(home).display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        return Err(fail(format!(
            "no Hugging Face token is stored (it would be kept in {}); set it with `asimov token`",
            path(home).display()
        )));
    }
    if !super::prompt::on_terminal() {
        return Err(fail(format!(
            "`asimov token` asks on a terminal; without one, use `asimov secret set {NAME}` \
             with the token on standard input"
        )));
    }
    let question = if stored(home) {
        "New Hugging Face token (replaces the stored one):"
    } else {
        "Hugging Face token:"
    };
    match ask_and_save(home, question) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => super::prompt::cancelled_or(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shapes() {
        assert_eq!(shape_problem(&format!("hf_{}", "a1".repeat(17))), None);
        assert!(shape_problem("hf_short").is_some());
        assert!(shape_problem(&format!("xx_{}", "a".repeat(34))).is_some());
        assert!(shape_problem(&format!("hf_{} ", "a".repeat(34))).is_some());
        assert!(shape_problem(&format!("hf_{}-", "a".repeat(34))).is_some());
    }
}
