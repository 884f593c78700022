//! Synthetic but realistic contents for benchmarks of the store and the commands that
//! read it. Deterministic: the same `n` and `now` always give the same rows.

use super::{AttemptRecord, RunRecord, Store, StoreResult, query, runs};
use crate::model::{Outcome, OwnerTag, Phase, ProviderKind, Timestamp, Usd};
use std::collections::BTreeMap;

/// Runs per synthetic job, like a small hyper-parameter sweep.
const RUNS_PER_JOB: usize = 8;

/// splitmix64: a tiny, well-mixed generator, enough to vary benchmark rows.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const PROVIDERS: [ProviderKind; 5] = [
    ProviderKind::Vast,
    ProviderKind::Lambda,
    ProviderKind::Runpod,
    ProviderKind::Ssh,
    ProviderKind::Local,
];

const GPUS: [(&str, f64); 4] = [
    ("RTX_4090", 0.45),
    ("A100_80GB", 1.79),
    ("H100_SXM", 2.99),
    ("L40S", 0.99),
];

/// A phase with roughly the mix of a busy controller: mostly finished runs.
fn phase(mix: &mut Mix) -> Phase {
    match mix.below(100) {
        0..=49 => Phase::Succeeded,
        50..=59 => Phase::Failed,
        60..=74 => Phase::Running,
        75..=89 => Phase::Pending,
        90..=93 => Phase::Provisioning,
        94..=97 => Phase::Starting,
        _ => Phase::Deleting,
    }
}

fn synthetic(i: usize, now: Timestamp, mix: &mut Mix) -> (RunRecord, Vec<AttemptRecord>) {
    let job = format!("bench-{:05}", i / RUNS_PER_JOB);
    let index = (i % RUNS_PER_JOB) as u32;
    let name = format!("{job}-{index}");
    let phase = phase(mix);
    let created_at = now - 3600 * 24 * 7 + (i as Timestamp) * 7;
    let started = !matches!(phase, Phase::Pending);
    let attempts = if started { 1 + mix.below(3) as u32 } else { 0 };
    let provider = PROVIDERS[mix.below(PROVIDERS.len() as u64) as usize];
    let (gpu, price) = GPUS[mix.below(GPUS.len() as u64) as usize];
    let started_at = started.then(|| created_at + 30 + mix.below(600) as Timestamp);
    let finished_at = match (phase.is_terminal(), started_at) {
        (true, Some(s)) => Some(s + 600 + mix.below(36_000) as Timestamp),
        _ => None,
    };
    let ran_for = match (started_at, finished_at) {
        (Some(s), Some(f)) => f - s,
        (Some(s), None) => now - s,
        _ => 0,
    };
    let cost_usd = Usd::from_dollars(price).per_hour_over(ran_for);
    let total = 10_000 + mix.below(90_000);
    let progress_done = match phase {
        Phase::Succeeded => Some(total),
        Phase::Pending | Phase::Provisioning => None,
        _ => Some(mix.below(total)),
    };
    let commit = format!(
        "{:016x}{:016x}{:08x}",
        mix.next(),
        mix.next(),
        mix.below(1 << 32)
    );
    let mut matrix = BTreeMap::new();
    matrix.insert("lr".to_string(), format!("{}e-4", 1 + mix.below(9)));
    matrix.insert("seed".to_string(), index.to_string());
    let live = started && !phase.is_terminal();
    let instance_id = live.then(|| format!("{}", 1_000_000 + mix.below(9_000_000)));
    let reason = match phase {
        Phase::Pending => "waiting for capacity",
        Phase::Provisioning => "instance requested",
        Phase::Starting => "uploading code",
        Phase::Running => "training",
        Phase::Succeeded => "run command exited 0",
        Phase::Failed => "run command exited 1",
        Phase::Deleting => "job deleted; destroying instance",
        Phase::Stopped => "destroyed by `asimov destroy`",
        Phase::Paused => "paused by `asimov pause`",
    };
    let run = RunRecord {
        name: name.clone(),
        job,
        index,
        seq: 0,
        phase,
        reason: reason.to_string(),
        spec_hash: format!("{:016x}", mix.next()),
        matrix,
        attempt: attempts,
        placement_index: attempts.saturating_sub(1),
        provider: started.then_some(provider),
        instance_id: instance_id.clone(),
        host: (provider == ProviderKind::Ssh && started).then(|| format!("gpu{}", mix.below(8))),
        gpu: started.then(|| gpu.to_string()),
        price_per_hour: started.then(|| Usd::from_dollars(price)),
        cost_usd,
        billing_since: None,
        progress_done,
        progress_total: progress_done.map(|_| total),
        exit_code: match phase {
            Phase::Succeeded => Some(0),
            Phase::Failed => Some(1),
            _ => None,
        },
        repository: Some("git@github.com:example/train.git".to_string()),
        commit: Some(commit),
        commit_message: Some(format!("sweep step {}", i / RUNS_PER_JOB)),
        author: Some("Ada <ada@example.com>".to_string()),
        dirty: mix.below(10) == 0,
        created_at,
        updated_at: finished_at.unwrap_or(now),
        started_at,
        finished_at,
    };
    let attempts = (1..=attempts)
        .map(|attempt| {
            let last = attempt == run.attempt;
            AttemptRecord {
                run: name.clone(),
                attempt,
                tag: OwnerTag::new("bench", &name, attempt).render(),
                provider,
                placement_index: attempt - 1,
                instance_id: if last {
                    instance_id.clone()
                } else {
                    Some(format!("old-{attempt}"))
                },
                host: run.host.clone(),
                intent_at: created_at + attempt as Timestamp * 60,
                released_at: (!last || !live).then_some(run.updated_at),
                outcome: if last {
                    match phase {
                        Phase::Succeeded => Some(Outcome::Succeeded),
                        Phase::Failed => Some(Outcome::Failed { exit_code: Some(1) }),
                        _ => None,
                    }
                } else {
                    Some(Outcome::Preempted)
                },
            }
        })
        .collect();
    (run, attempts)
}

impl Store {
    /// Inserts `n` synthetic runs named `bench-NNNNN-I` (jobs of 8, varied phases,
    /// providers, GPUs, costs and commits), with their attempts and one cost entry per
    /// started run, in one transaction. Writing again with the same `n` and `now`
    /// rewrites the same rows.
    pub(crate) fn seed_runs_for_benchmark(&self, n: usize, now: Timestamp) -> StoreResult<()> {
        const STEP: &str = "seeding benchmark runs";
        let tx = self.write(STEP)?;
        let mut mix = Mix(n as u64 ^ now as u64);
        for i in 0..n {
            let (run, attempts) = synthetic(i, now, &mut mix);
            runs::upsert(&tx, &run).map_err(query(STEP))?;
            for a in &attempts {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO attempts (run, attempt, tag, provider, \
                     placement_index, instance_id, host, intent_at, released_at, outcome) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .and_then(|mut stmt| {
                    stmt.execute((
                        &a.run,
                        a.attempt,
                        &a.tag,
                        a.provider.as_str(),
                        a.placement_index,
                        &a.instance_id,
                        &a.host,
                        a.intent_at,
                        a.released_at,
                        a.outcome.as_ref().map(Outcome::as_text),
                    ))
                })
                .map_err(query(STEP))?;
            }
            if let (Some(from), true) = (run.started_at, run.cost_usd > Usd::ZERO) {
                tx.prepare_cached(
                    "INSERT INTO cost (run, job, attempt, from_at, to_at, usd) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .and_then(|mut stmt| {
                    stmt.execute((
                        &run.name,
                        &run.job,
                        run.attempt,
                        from,
                        run.updated_at,
                        run.cost_usd.dollars(),
                    ))
                })
                .map_err(query(STEP))?;
            }
        }
        tx.commit().map_err(query(STEP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_seed_is_realistic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).unwrap();
        let now = 1_750_000_000;
        store.seed_runs_for_benchmark(10_000, now).unwrap();

        let runs = store.runs().unwrap();
        assert_eq!(runs.len(), 10_000);
        let seqs: Vec<i64> = runs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=10_000).collect::<Vec<i64>>());
        let phases: std::collections::HashSet<Phase> = runs.iter().map(|r| r.phase).collect();
        assert!(phases.len() >= 6, "{phases:?}");
        let providers: std::collections::HashSet<_> =
            runs.iter().filter_map(|r| r.provider).collect();
        assert!(providers.len() >= 4, "{providers:?}");
        let commits: std::collections::HashSet<_> =
            runs.iter().filter_map(|r| r.commit.as_ref()).collect();
        assert!(commits.len() > 9_000);
        let jobs: Vec<String> = runs
            .iter()
            .map(|r| r.job.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert!(store.spent(&jobs, None).unwrap() > Usd::ZERO);
        // Live runs have an unreleased attempt; finished ones do not.
        let live = runs
            .iter()
            .filter(|r| r.attempt > 0 && !r.phase.is_terminal())
            .count();
        assert_eq!(store.unreleased_attempts().unwrap().len(), live);

        // Seeding again rewrites the same rows instead of adding more.
        store.seed_runs_for_benchmark(10_000, now).unwrap();
        assert_eq!(store.runs().unwrap(), runs);
        // Speed is measured by `asimov bench` (BENCHMARKS.md), not asserted here.
    }
}
