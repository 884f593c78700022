//! `asimov login vast|lambda|runpod`: asks for the cloud's API key without echo, checks
//! it with one cheap authenticated call (the instance listing), and stores it in the
//! credential store (`$ASIMOV_HOME/credentials/<NAME>`, 0600) exactly as
//! `asimov secret set <NAME>` does. The key is never printed. An API that cannot be
//! reached (offline) saves the key unchecked, with a note; a key the cloud refuses is
//! not saved.

use super::args::Cloud;
use super::{CliError, CliResult, fail};
use crate::home::{Home, write_private};
use crate::model::{ProviderKind, Secret};
use crate::provider::lambda::LambdaProvider;
use crate::provider::runpod::RunpodProvider;
use crate::provider::vast::{self, VastProvider};
use crate::provider::{ErrorKind, Provider, cloud, lambda, runpod};
use crate::retry::Backoff;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How long the check may take before the key is saved unchecked.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

fn facts(c: Cloud) -> (ProviderKind, &'static str, &'static str) {
    match c {
        Cloud::Vast => (
            ProviderKind::Vast,
            vast::KEY_NAME,
            "cloud.vast.ai/manage-keys",
        ),
        Cloud::Lambda => (
            ProviderKind::Lambda,
            lambda::KEY_NAME,
            "cloud.lambda.ai/api-keys",
        ),
        Cloud::Runpod => (
            ProviderKind::Runpod,
            runpod::KEY_NAME,
            "console.runpod.io/user/settings",
        ),
    }
}

/// What the cloud said of a key.
enum Check {
    Accepted,
    Refused(String),
    Unchecked(String),
}

/// One authenticated call: the instance listing, which every cloud answers for a good
/// key and refuses (401/403) for a bad one. Retried briefly: a person is waiting.
fn check(home: &Home, kind: ProviderKind, key: &Secret) -> Result<Check, CliError> {
    let pool = crate::transport::ssh::SshPool::new(home.clone())?;
    let retry = Backoff::new(Duration::from_millis(300), Duration::from_secs(2), 2.0)
        .with_max_elapsed(Some(Duration::from_secs(6)));
    let provider: Arc<dyn Provider> = match kind {
        ProviderKind::Vast => Arc::new(
            VastProvider::new(
                home,
                pool,
                vast::api_url(),
                key.clone(),
                vast::Pacing::from_env(),
            )?
            .with_retry(retry),
        ),
        ProviderKind::Lambda => Arc::new(
            LambdaProvider::new(
                home,
                pool,
                cloud::api_url(lambda::URL_ENV, lambda::DEFAULT_API_URL),
                key.clone(),
                lambda::pacing(cloud::pacing_factor(lambda::PACING_ENV)),
            )?
            .with_retry(retry),
        ),
        _ => Arc::new(
            RunpodProvider::new(
                home,
                pool,
                cloud::api_url(runpod::URL_ENV, runpod::DEFAULT_API_URL),
                key.clone(),
                Duration::ZERO,
            )?
            .with_retry(retry),
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer =
        runtime.block_on(async { tokio::time::timeout(CHECK_TIMEOUT, provider.list()).await });
    Ok(match answer {
        Ok(Ok(_)) => Check::Accepted,
        Ok(Err(e)) => match e.kind {
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => {
                Check::Refused(e.to_string())
            }
            _ => Check::Unchecked(e.to_string()),
        },
        Err(_) => Check::Unchecked(format!("no answer within {CHECK_TIMEOUT:?}")),
    })
}

pub fn run(home: &Home, c: Cloud) -> CliResult {
    let (kind, name, console) = facts(c);
    if !super::prompt::on_terminal() {
        return Err(fail(format!(
            "`asimov login {kind}` asks on a terminal; without one, use \
             `asimov secret set {name}` with the key on standard input"
        )));
    }
    let question = if home.credentials().join(name).exists() {
        format!("{kind} API key (replaces the stored one):")
    } else {
        format!("{kind} API key:")
    };
    let help = format!("{console}; typed text is not shown");
    let typed = inquire::Password::new(&question)
        .without_confirmation()
        .with_display_mode(inquire::PasswordDisplayMode::Hidden)
        .with_help_message(&help)
        .with_validator(|t: &str| {
            let t = t.trim();
            Ok(if t.is_empty() {
                inquire::validator::Validation::Invalid("the key is empty".into())
            } else if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                inquire::validator::Validation::Invalid(
                    "a key has no spaces or control characters".into(),
                )
            } else {
                inquire::validator::Validation::Valid
            })
        })
        .prompt();
    let key = match typed {
        Ok(t) => Secret::new(t.trim().to_string()),
        Err(e) => return super::prompt::cancelled_or(Box::new(e)),
    };
    match check(home, kind, &key)? {
        Check::Accepted => eprintln!("{kind} accepted the key."),
        Check::Refused(why) => {
            return Err(fail(format!(
                "{kind} refused this key ({why}); nothing was stored"
            )));
        }
        Check::Unchecked(why) => {
            eprintln!("Could not check the key with {kind} ({why}); saving it unchecked.")
        }
    }
    home.ensure()?;
    let path = home.credentials().join(name);
    write_private(&path, key.expose().as_bytes())?;
    println!("secret/{name} saved");
    eprintln!(
        "Kept in {} (mode 0600); a running controller reads it when restarted.",
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}
