//! `asimov logs RUN [-f]`: the run's output. A finished run's log is kept in
//! `$ASIMOV_HOME/logs/`; a live one is read from its instance through the transport
//! (a file on this machine, or `tail -F` over the ssh master), and `-f` follows it
//! until the run ends.

use super::{CliError, CliResult, desired, fail};
use crate::home::Home;
use crate::model::ProviderKind;
use crate::provider::{Endpoint, Provider};
use crate::store::RunRecord;
use crate::transport::Transport;
use futures_util::StreamExt;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub fn run(home: &Home, run: &str, follow: bool) -> CliResult {
    let record = load(home, run)?;
    let kept = home.run_log(run);
    if kept.exists() && (record.phase.is_terminal() || !follow) {
        std::io::stdout().write_all(&std::fs::read(&kept)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(live(home, record, follow))
}

fn load(home: &Home, run: &str) -> Result<RunRecord, CliError> {
    let missing = || fail(format!("no run named {run:?}"));
    if !home.database().exists() {
        return Err(missing());
    }
    super::read_store(home)?
        .ok_or_else(missing)?
        .run(run)?
        .ok_or_else(missing)
}

/// The transport and log path of the run's live instance.
async fn locate(home: &Home, record: &RunRecord) -> Result<(Arc<dyn Transport>, String), CliError> {
    let store = super::read_store(home)?.ok_or_else(|| fail("no state database yet"))?;
    let attempt = store
        .attempts(&record.name)?
        .into_iter()
        .rev()
        .find(|a| a.released_at.is_none() && a.instance_id.is_some())
        .ok_or_else(|| {
            fail(format!(
                "run {} has no instance yet: {}",
                record.name, record.reason
            ))
        })?;
    match attempt.provider {
        ProviderKind::Local => {
            let log = home.local_instances().join(&attempt.tag).join("log");
            Ok((
                Arc::new(crate::transport::local::LocalTransport::new()),
                log.display().to_string(),
            ))
        }
        ProviderKind::Ssh => {
            let provider = crate::provider::ssh::SshProvider::new(home.clone())?;
            provider.set_fleets(desired::load_current(home)?.manifests.fleets);
            let instance = provider
                .list()
                .await?
                .into_iter()
                .find(|i| i.tag.render() == attempt.tag)
                .ok_or_else(|| {
                    fail(format!(
                        "the instance of {} is not reachable now",
                        record.name
                    ))
                })?;
            let Some(Endpoint::Ssh { root, .. }) = &instance.endpoint else {
                return Err(fail(format!(
                    "the instance of {} has no ssh endpoint",
                    record.name
                )));
            };
            let transport = provider.transport_for(&instance)?;
            let root = if let Some(rest) = root.strip_prefix("~/") {
                format!("{}/{rest}", transport.remote_home().await?)
            } else {
                root.clone()
            };
            Ok((Arc::new(transport), format!("{root}/log")))
        }
        other => Err(fail(format!(
            "reading logs from {other} instances is not supported yet"
        ))),
    }
}

async fn live(home: &Home, record: RunRecord, follow: bool) -> CliResult {
    let (transport, path) = locate(home, &record).await?;
    let mut out = std::io::stdout();
    if !follow {
        let quoted = format!("'{}'", path.replace('\'', "'\\''"));
        let text = transport
            .exec(&format!("[ -f {quoted} ] && cat {quoted}; true"))
            .await?;
        out.write_all(text.stdout.as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = transport.follow(&path).await?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            chunk = stream.next() => match chunk {
                Some(Ok(bytes)) => {
                    out.write_all(&bytes)?;
                    out.flush()?;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(ExitCode::SUCCESS),
            },
            _ = check.tick() => {
                let now = load(home, &record.name)?;
                if now.phase.is_terminal() || now.attempt != record.attempt {
                    // Let the last lines arrive, then stop.
                    let drain = tokio::time::sleep(Duration::from_millis(700));
                    tokio::pin!(drain);
                    loop {
                        tokio::select! {
                            chunk = stream.next() => match chunk {
                                Some(Ok(bytes)) => out.write_all(&bytes)?,
                                _ => break,
                            },
                            _ = &mut drain => break,
                        }
                    }
                    out.flush()?;
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    }
}
