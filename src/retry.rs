//! Backoff and retry of transient failures: the one module that knows the `backoff`
//! crate, so swapping it is a one-file change. Knows nothing of providers or of which
//! errors are transient; callers say so through a classifier.
//!
//! Two uses: `Backoff::delay` gives the pure planner the wait after n failures (without
//! jitter it is deterministic; `reconcile::plan::backoff_delay`), and `retry_transient`
//! retries one call in place, within the policy's elapsed-time budget, honouring a
//! server's retry-after hint: meant for the cloud providers' HTTP clients (a 429 inside
//! one list call), not yet used by the local and ssh backends, whose failures the
//! controller's requeue already retries.

use backoff::backoff::Backoff as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An exponential backoff policy: the n-th consecutive failure waits
/// `initial * multiplier^(n-1)`, capped at `max`, then spread by ±`jitter` (a fraction).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    max_elapsed: Option<Duration>,
}

/// Randomization used by `Backoff::new` and the `backoff` crate's default.
const DEFAULT_JITTER: f64 = 0.5;

/// Default budget of one `retry_transient` call (the `backoff` crate's default).
const DEFAULT_MAX_ELAPSED: Duration = Duration::from_secs(15 * 60);

impl Backoff {
    /// A policy with ±50% jitter and a 15 minute retry budget. A multiplier below 1
    /// (or NaN) is taken as 1, and a `max` below `initial` as `initial`, so delays never
    /// shrink.
    pub fn new(initial: Duration, max: Duration, multiplier: f64) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            multiplier: if multiplier >= 1.0 { multiplier } else { 1.0 },
            jitter: DEFAULT_JITTER,
            max_elapsed: Some(DEFAULT_MAX_ELAPSED),
        }
    }

    /// The same policy with delays spread by ±`factor` of their value (clamped to 0..=1).
    pub fn with_jitter(self, factor: f64) -> Backoff {
        let jitter = if factor.is_nan() {
            0.0
        } else {
            factor.clamp(0.0, 1.0)
        };
        Backoff { jitter, ..self }
    }

    /// The same policy with no randomness: `delay` becomes a pure function, for the
    /// planner and for tests.
    pub fn without_jitter(self) -> Backoff {
        self.with_jitter(0.0)
    }

    /// The same policy with another budget for `retry_transient` (`None`: retry forever).
    pub fn with_max_elapsed(self, max_elapsed: Option<Duration>) -> Backoff {
        Backoff {
            max_elapsed,
            ..self
        }
    }

    pub fn initial(&self) -> Duration {
        self.initial
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The spread of each delay, as a fraction of it.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// How long `retry_transient` keeps trying before it returns the last error.
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// How long to wait after `failures` consecutive failures (zero after none). Without
    /// jitter the result is deterministic; with it, the capped delay is spread by
    /// ±jitter, so it may exceed `max` by that fraction.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        // Past ~1000 doublings the f64 is infinite anyway; the cap handles it.
        let exponent = (failures - 1).min(1024) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = if secs.is_finite() && secs < self.max.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max
        };
        if self.jitter == 0.0 {
            return capped;
        }
        // The crate draws the random spread around its current interval; pointing that
        // interval at our capped delay keeps all randomness in the crate.
        let mut one_step = self.exponential();
        one_step.current_interval = capped;
        one_step.max_elapsed_time = None;
        one_step.next_backoff().unwrap_or(capped)
    }

    /// The crate's state machine for this policy, timed by tokio's clock so paused-time
    /// tests see the elapsed budget run out.
    fn exponential(&self) -> backoff::exponential::ExponentialBackoff<TokioClock> {
        let mut eb = backoff::exponential::ExponentialBackoff {
            current_interval: self.initial,
            initial_interval: self.initial,
            randomization_factor: self.jitter,
            multiplier: self.multiplier,
            max_interval: self.max,
            start_time: TokioClock.now_instant(),
            max_elapsed_time: self.max_elapsed,
            clock: TokioClock,
        };
        eb.reset();
        eb
    }
}

impl Default for Backoff {
    /// The `backoff` crate's defaults: 500 ms, ×1.5, at most 60 s, ±50%, 15 minutes.
    fn default() -> Backoff {
        Backoff::from(backoff::ExponentialBackoff::default())
    }
}

impl From<backoff::ExponentialBackoff> for Backoff {
    /// Takes the settings (not the progress) of a `backoff` crate policy.
    fn from(eb: backoff::ExponentialBackoff) -> Backoff {
        Backoff::new(eb.initial_interval, eb.max_interval, eb.multiplier)
            .with_jitter(eb.randomization_factor)
            .with_max_elapsed(eb.max_elapsed_time)
    }
}

/// tokio's clock: the real time in production, the paused one in tests.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl TokioClock {
    fn now_instant(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

impl backoff::Clock for TokioClock {
    fn now(&self) -> std::time::Instant {
        self.now_instant()
    }
}

/// The policy's schedule, lengthened to a server's retry-after hint when that is longer.
/// The hint is handed over by the operation wrapper through `hint` just before the crate
/// asks for the next delay.
struct Hinted {
    schedule: backoff::exponential::ExponentialBackoff<TokioClock>,
    hint: Arc<Mutex<Option<Duration>>>,
}

impl backoff::backoff::Backoff for Hinted {
    fn reset(&mut self) {
        self.schedule.reset();
    }

    fn next_backoff(&mut self) -> Option<Duration> {
        let hint = match self.hint.lock() {
            Ok(mut hint) => hint.take(),
            // Only a panic while holding this tiny lock poisons it; the hint is then lost,
            // not the retry.
            Err(poisoned) => poisoned.into_inner().take(),
        };
        // `None` here means the elapsed budget is spent.
        let planned = self.schedule.next_backoff()?;
        let wait = match hint {
            Some(hint) if hint > planned => hint,
            _ => planned,
        };
        // A hint longer than what is left of the budget ends the retry: the caller's own
        // requeue (which sees the error) is the better place to wait that long.
        match self.schedule.max_elapsed_time {
            Some(budget) if self.schedule.get_elapsed_time() + wait > budget => None,
            _ => Some(wait),
        }
    }
}

/// Runs `op` until it succeeds, fails permanently, or the policy's elapsed-time budget is
/// spent, and returns its last result.
///
/// `is_transient` classifies an error: `None` for permanent (returned at once),
/// `Some(None)` for transient, `Some(Some(d))` for transient with a retry-after hint `d`,
/// which replaces the policy's delay when longer.
pub async fn retry_transient<T, E, F, Fut>(
    policy: &Backoff,
    is_transient: impl Fn(&E) -> Option<Option<Duration>>,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let hint = Arc::new(Mutex::new(None));
    let schedule = Hinted {
        schedule: policy.exponential(),
        hint: Arc::clone(&hint),
    };
    let is_transient = &is_transient;
    backoff::future::retry(schedule, || {
        let attempt = op();
        let hint = Arc::clone(&hint);
        async move {
            attempt.await.map_err(|err| match is_transient(&err) {
                None => backoff::Error::permanent(err),
                Some(retry_after) => {
                    match hint.lock() {
                        Ok(mut slot) => *slot = retry_after,
                        Err(poisoned) => *poisoned.into_inner() = retry_after,
                    }
                    backoff::Error::transient(err)
                }
            })
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[derive(Debug, PartialEq)]
    enum Fault {
        Flaky,
        RateLimited(Duration),
        Broken,
    }

    fn classify(f: &Fault) -> Option<Option<Duration>> {
        match f {
            Fault::Flaky => Some(None),
            Fault::RateLimited(d) => Some(Some(*d)),
            Fault::Broken => None,
        }
    }

    #[test]
    fn delays_grow_and_cap() {
        let policy = Backoff::new(secs(1), secs(10), 2.0).without_jitter();
        let delays: Vec<u64> = (0..8).map(|n| policy.delay(n).as_secs()).collect();
        assert_eq!(delays, vec![0, 1, 2, 4, 8, 10, 10, 10]);
        assert_eq!(policy.delay(u32::MAX), secs(10));
        let gentle = Backoff::new(Duration::from_millis(100), secs(60), 1.5).without_jitter();
        assert_eq!(gentle.delay(3), Duration::from_millis(225));
    }

    #[test]
    fn jitter_spreads_within_its_bounds() {
        let policy = Backoff::new(secs(1), secs(10), 2.0).with_jitter(0.5);
        for failures in 1..=6 {
            let base = policy.without_jitter().delay(failures).as_secs_f64();
            let samples: Vec<f64> = (0..200)
                .map(|_| policy.delay(failures).as_secs_f64())
                .collect();
            for s in &samples {
                assert!(
                    *s >= base * 0.5 - 1e-9 && *s <= base * 1.5 + 1e-6,
                    "{s} outside ±50% of {base}"
                );
            }
            let lowest = samples.iter().cloned().fold(f64::MAX, f64::min);
            let highest = samples.iter().cloned().fold(0.0, f64::max);
            assert!(highest - lowest > base * 0.2, "no spread around {base}");
        }
    }

    #[test]
    fn policy_takes_the_crate_settings_and_sanitises_its_own() {
        let eb = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(secs(2))
            .with_max_interval(secs(30))
            .with_multiplier(3.0)
            .with_randomization_factor(0.25)
            .with_max_elapsed_time(Some(secs(120)))
            .build();
        let policy = Backoff::from(eb);
        assert_eq!(
            (
                policy.initial(),
                policy.max(),
                policy.multiplier(),
                policy.jitter(),
                policy.max_elapsed()
            ),
            (secs(2), secs(30), 3.0, 0.25, Some(secs(120)))
        );
        let odd = Backoff::new(secs(5), secs(1), 0.5).with_jitter(7.0);
        assert_eq!(
            (odd.max(), odd.multiplier(), odd.jitter()),
            (secs(5), 1.0, 1.0)
        );
    }

    #[test]
    fn the_retry_future_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let policy = Backoff::default();
        let future = retry_transient(&policy, classify, || async { Ok::<_, Fault>(()) });
        assert_send(&future);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_on_schedule() {
        let policy = Backoff::new(secs(1), secs(10), 2.0).without_jitter();
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let result = retry_transient(&policy, classify, || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(Fault::Flaky),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(result, Ok(2));
        assert_eq!(started.elapsed(), secs(1 + 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_stops_the_retry() {
        let policy = Backoff::new(secs(1), secs(10), 2.0).without_jitter();
        let calls = AtomicU32::new(0);
        let result: Result<(), Fault> = retry_transient(&policy, classify, || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(Fault::Flaky),
                _ => Err(Fault::Broken),
            }
        })
        .await;
        assert_eq!(result, Err(Fault::Broken));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_longer_retry_after_hint_is_honoured_and_a_shorter_one_is_not() {
        let policy = Backoff::new(secs(1), secs(10), 2.0).without_jitter();
        for (hint, expected_wait) in [(secs(30), secs(30)), (Duration::from_millis(100), secs(1))] {
            let calls = AtomicU32::new(0);
            let started = tokio::time::Instant::now();
            let result = retry_transient(&policy, classify, || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(Fault::RateLimited(hint)),
                    _ => Ok("done"),
                }
            })
            .await;
            assert_eq!(result, Ok("done"));
            assert_eq!(started.elapsed(), expected_wait, "hint {hint:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_elapsed_budget_ends_the_retry() {
        let policy = Backoff::new(secs(1), secs(10), 2.0)
            .without_jitter()
            .with_max_elapsed(Some(secs(10)));
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let result: Result<(), Fault> = retry_transient(&policy, classify, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Fault::Flaky)
        })
        .await;
        assert_eq!(result, Err(Fault::Flaky));
        // Waits of 1, 2 and 4 s fit in 10 s; the next 8 s would not.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(started.elapsed(), secs(7));

        // A hint beyond the budget returns the error at once for the caller to requeue.
        let calls = AtomicU32::new(0);
        let result: Result<(), Fault> = retry_transient(&policy, classify, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Fault::RateLimited(secs(60)))
        })
        .await;
        assert_eq!(result, Err(Fault::RateLimited(secs(60))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
