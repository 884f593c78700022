//! `asimov bench`: measures asimov's own speed and prints the figures BENCHMARKS.md
//! records. Three figures, each taken the way a user would feel it:
//!
//! 1. `asimov get runs` (table and `-o json`) over a store seeded with many runs: the
//!    wall time of the whole process, binary start to exit.
//! 2. One reconcile pass over many jobs on the in-process FakeProvider with a real SQLite
//!    store: wall time, provider calls per operation, and memory.
//! 3. The CPU use and wake-ups of an idle `asimov controller` process.
//! 4. The controller's cost of reading the metrics of many running runs (`stop_when`):
//!    the tail of each run's metrics file through the real agent machine over the local
//!    transport, parsed and judged by the rules, then recorded in one store write.
//!
//! This is a benchmark, not a test: it asserts nothing about speed, it reports. It owns
//! its temp dirs and the child processes it starts, and must not know how the CLI prints.

use super::args::BenchFigure;
use crate::home::Home;
use crate::manifest::{Job, JobSpec, Manifests, Placement, RetryOn, RetryPolicy};
use crate::model::ProviderKind;
use crate::provider::Provider;
use crate::provider::fake::{Calls, FakeConfig, FakeProvider};
use crate::reconcile::controller::{Controller, ControllerError, MemorySource};
use crate::reconcile::execute::Executor;
use crate::store::{Store, StoreError};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Process runs discarded before measuring (page cache, dynamic loader, SQLite file).
pub const WARMUP_RUNS: usize = 3;
/// Process runs measured for each `get runs` figure.
pub const MEASURED_RUNS: usize = 20;
/// Target for `asimov get runs` wall time (p95).
pub const GET_RUNS_TARGET: Duration = Duration::from_millis(50);
/// Latency the FakeProvider adds to every call in the reconcile figure: about one
/// round trip to a cloud API in the same region, so concurrency matters.
pub const FAKE_LATENCY: Duration = Duration::from_millis(20);
/// Passes allowed for 1,000 jobs to reach the steady state before giving up.
const MAX_PASSES: usize = 20;
/// How long the idle controller runs before sampling starts (start-up pass, watcher).
const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// Target for an idle controller's CPU use.
pub const IDLE_CPU_TARGET_PERCENT: f64 = 0.1;

/// What to measure, from `asimov bench --runs N --jobs N --idle-seconds N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchOptions {
    /// Runs seeded into the store for the `get runs` figure.
    pub runs: usize,
    /// Jobs (one run each) for the reconcile-pass figure.
    pub jobs: usize,
    /// Seconds over which the idle controller's CPU use is sampled.
    pub idle_seconds: u64,
    /// The figures to take; every figure when empty.
    pub only: Vec<BenchFigure>,
    /// The asimov binary to run as a child (`std::env::current_exe()` from the CLI).
    pub binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark: creating a temp dir")]
    TempDir(#[source] std::io::Error),
    #[error("benchmark: reading metrics: {0}")]
    Metrics(String),
    #[error("benchmark: preparing {}", path.display())]
    Home {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("benchmark: {step}")]
    Store {
        step: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("benchmark: starting {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("benchmark: `asimov {args}` failed ({status}): {stderr}")]
    ChildFailed {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("benchmark: `asimov {args}` printed unexpected output: {message}")]
    BadOutput { args: String, message: String },
    #[error(
        "benchmark: {} already holds {runs} runs; --seed-only seeds only an empty store \
         (point ASIMOV_HOME at a new folder)",
        path.display()
    )]
    StoreNotEmpty { path: PathBuf, runs: u64 },
    #[error("benchmark: building the tokio runtime")]
    Runtime(#[source] std::io::Error),
    #[error("benchmark: reconcile pass {pass}")]
    Pass {
        pass: usize,
        #[source]
        source: ControllerError,
    },
    #[error("benchmark: reconcile pass {pass} failed {count} ops, first: {first}")]
    OpsFailed {
        pass: usize,
        count: usize,
        first: String,
    },
    #[error("benchmark: {jobs} jobs did not reach the steady state in {passes} passes")]
    NotSteady { jobs: usize, passes: usize },
    #[error("benchmark: reading {path}")]
    Proc {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("benchmark: cannot parse {path}: {message}")]
    ProcParse { path: String, message: String },
}

/// min / median / p95 of some wall times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub samples: usize,
    pub min: Duration,
    pub median: Duration,
    pub p95: Duration,
}

impl Spread {
    /// `None` for no samples.
    pub fn of(samples: &[Duration]) -> Option<Spread> {
        let mut sorted = samples.to_vec();
        sorted.sort();
        Some(Spread {
            samples: sorted.len(),
            min: *sorted.first()?,
            median: percentile(&sorted, 50.0)?,
            p95: percentile(&sorted, 95.0)?,
        })
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p`% of
/// the samples at or below it. No interpolation, so every figure is a time that was
/// actually measured.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Figure 1: `asimov get runs` as a whole process.
#[derive(Debug, Clone)]
pub struct GetRunsFigures {
    pub runs: usize,
    /// Bytes of the seeded SQLite file (with its WAL).
    pub database_bytes: u64,
    pub table: Spread,
    pub json: Spread,
}

/// Wall time and provider calls of one reconcile pass.
#[derive(Debug, Clone)]
pub struct PassFigures {
    pub wall: Duration,
    pub calls: Calls,
    /// Ops the planner asked for in this pass.
    pub planned: usize,
    pub applied: usize,
}

/// Figure 2: reconcile passes over many jobs on the FakeProvider.
#[derive(Debug, Clone)]
pub struct ReconcileFigures {
    pub jobs: usize,
    pub latency: Duration,
    pub worker_threads: usize,
    pub first: PassFigures,
    /// Passes (including the first) until a pass planned nothing.
    pub passes_to_steady: usize,
    /// One more pass once every run is running and nothing is planned.
    pub steady: PassFigures,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// VmHWM after the passes.
    pub peak_kib: u64,
    /// Whether the peak was reset just before the passes (`/proc/self/clear_refs`); when
    /// false, the peak also covers everything this process did before.
    pub peak_reset: bool,
}

/// Figure 3: an idle `asimov controller` process.
#[derive(Debug, Clone)]
pub struct IdleFigures {
    pub sampled: Duration,
    pub cpu_percent: f64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
    pub threads: usize,
    pub rss_kib: u64,
}

impl IdleFigures {
    /// Voluntary context switches per second: how often the process woke up.
    pub fn wakeups_per_second(&self) -> f64 {
        per_second(self.voluntary_switches, self.sampled)
    }
}

fn per_second(count: u64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        count as f64 / over.as_secs_f64()
    }
}

/// Everything `asimov bench` measured; `None` for a figure not asked for (`--only`). A
/// figure that could not be taken keeps its error, so one broken figure does not hide
/// the others.
#[derive(Debug)]
pub struct BenchReport {
    pub get_runs: Option<Result<GetRunsFigures, BenchError>>,
    pub reconcile: Option<Result<ReconcileFigures, BenchError>>,
    pub idle: Option<Result<IdleFigures, BenchError>>,
    /// The controller's way: each pass reads what was written since the last one.
    pub metrics: Option<Result<MetricsFigures, BenchError>>,
    /// The way before it, for comparison: the whole tail re-read every pass.
    pub metrics_full_tail: Option<Result<MetricsFigures, BenchError>>,
}

impl BenchReport {
    /// True when every figure asked for was taken.
    pub fn complete(&self) -> bool {
        self.get_runs.as_ref().is_none_or(Result::is_ok)
            && self.reconcile.as_ref().is_none_or(Result::is_ok)
            && self.idle.as_ref().is_none_or(Result::is_ok)
            && self.metrics.as_ref().is_none_or(Result::is_ok)
            && self.metrics_full_tail.as_ref().is_none_or(Result::is_ok)
    }
}

/// Takes the figures asked for. Each figure uses its own temp `$ASIMOV_HOME`, removed
/// afterwards.
pub fn run(opts: BenchOptions) -> Result<BenchReport, BenchError> {
    let wanted = |f: BenchFigure| opts.only.is_empty() || opts.only.contains(&f);
    // The reconcile figure runs first so that its memory peak is not the seeding's.
    let reconcile = wanted(BenchFigure::Reconcile).then(|| reconcile_figures(opts.jobs));
    let get_runs = wanted(BenchFigure::GetRuns).then(|| get_runs_figures(&opts.binary, opts.runs));
    let idle = wanted(BenchFigure::Idle)
        .then(|| idle_figures(&opts.binary, Duration::from_secs(opts.idle_seconds)));
    let metrics = wanted(BenchFigure::Metrics).then(|| metrics_figures(opts.jobs, true));
    let metrics_full_tail = wanted(BenchFigure::Metrics).then(|| metrics_figures(opts.jobs, false));
    Ok(BenchReport {
        get_runs,
        reconcile,
        idle,
        metrics,
        metrics_full_tail,
    })
}

/// `asimov bench --seed-only`: seeds `home`'s store with `runs` of the synthetic runs the
/// `get runs` figure lists, so that a script (scripts/bench-compare.sh) can time commands
/// against the same store. Returns the database's path. An existing store that holds any
/// run is refused before anything is written: synthetic runs must never mix with real
/// ones.
pub fn seed_home(home: &Home, runs: usize) -> Result<PathBuf, BenchError> {
    let path = home.database();
    let store = Store::open(&path).map_err(|source| BenchError::Store {
        step: "opening the store",
        source,
    })?;
    let held = store
        .count_runs(crate::store::Listing::All)
        .map_err(|source| BenchError::Store {
            step: "counting the runs already stored",
            source,
        })?;
    if held > 0 {
        return Err(BenchError::StoreNotEmpty { path, runs: held });
    }
    store
        .seed_runs_for_benchmark(runs, now())
        .map_err(|source| BenchError::Store {
            step: "seeding runs",
            source,
        })?;
    Ok(path)
}

fn temp_home() -> Result<(tempfile::TempDir, Home), BenchError> {
    let dir = tempfile::Builder::new()
        .prefix("asimov-bench-")
        .tempdir()
        .map_err(BenchError::TempDir)?;
    let home = Home::at(dir.path());
    home.ensure().map_err(|source| BenchError::Home {
        path: dir.path().to_path_buf(),
        source,
    })?;
    Ok((dir, home))
}

fn now() -> crate::model::Timestamp {
    chrono::Utc::now().timestamp()
}

// ---------------------------------------------------------------------------------------
// Figure 1: get runs

fn get_runs_figures(binary: &Path, runs: usize) -> Result<GetRunsFigures, BenchError> {
    let (_dir, home) = temp_home()?;
    {
        let store = Store::open(&home.database()).map_err(|source| BenchError::Store {
            step: "opening the store",
            source,
        })?;
        store
            .seed_runs_for_benchmark(runs, now())
            .map_err(|source| BenchError::Store {
                step: "seeding runs",
                source,
            })?;
    }
    let database_bytes = ["state.db", "state.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(home.root().join(f)).ok())
        .map(|m| m.len())
        .sum();
    // Check once that the command really lists every seeded run, so the timing is of
    // the real work and not of a fast failure.
    let listed = count_json_items(binary, &home)?;
    if listed != runs {
        return Err(BenchError::BadOutput {
            args: "get runs -o json".into(),
            message: format!("listed {listed} runs, {runs} were seeded"),
        });
    }
    let table = time_process(binary, &home, &["get", "runs"])?;
    let json = time_process(binary, &home, &["get", "runs", "-o", "json"])?;
    Ok(GetRunsFigures {
        runs,
        database_bytes,
        table,
        json,
    })
}

fn asimov(binary: &Path, home: &Home, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env("ASIMOV_HOME", home.root())
        .env_remove("ASIMOV_LOG")
        .stdin(Stdio::null());
    cmd
}

fn count_json_items(binary: &Path, home: &Home) -> Result<usize, BenchError> {
    let args = ["get", "runs", "-o", "json"];
    let out = asimov(binary, home, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| BenchError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    check(&args, &out.status, &out.stderr)?;
    let bad = |message: String| BenchError::BadOutput {
        args: args.join(" "),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| bad(e.to_string()))?;
    value
        .get("items")
        .and_then(|i| i.as_array())
        .map(|i| i.len())
        .ok_or_else(|| bad("no \"items\" array".into()))
}

fn check(
    args: &[&str],
    status: &std::process::ExitStatus,
    stderr: &[u8],
) -> Result<(), BenchError> {
    if status.success() {
        return Ok(());
    }
    Err(BenchError::ChildFailed {
        args: args.join(" "),
        status: status.to_string(),
        stderr: String::from_utf8_lossy(stderr).trim().to_string(),
    })
}

/// Wall time of the whole child process, spawn to exit, stdout to /dev/null.
fn time_process(binary: &Path, home: &Home, args: &[&str]) -> Result<Spread, BenchError> {
    let mut samples = Vec::with_capacity(MEASURED_RUNS);
    for i in 0..WARMUP_RUNS + MEASURED_RUNS {
        let started = Instant::now();
        let out = asimov(binary, home, args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| BenchError::Spawn {
                binary: binary.to_path_buf(),
                source,
            })?;
        let took = started.elapsed();
        check(args, &out.status, &out.stderr)?;
        if i >= WARMUP_RUNS {
            samples.push(took);
        }
    }
    Spread::of(&samples).ok_or_else(|| BenchError::BadOutput {
        args: args.join(" "),
        message: "no samples".into(),
    })
}

// ---------------------------------------------------------------------------------------
// Figure 2: reconcile pass

/// A job of one run on the fake provider that runs far longer than the benchmark.
fn bench_job(i: usize) -> Job {
    let spec = JobSpec {
        placement: vec![Placement {
            provider: ProviderKind::Fake,
            ..Placement::local()
        }],
        retry: RetryPolicy {
            on: vec![RetryOn::NoCapacity, RetryOn::Preemption, RetryOn::Error],
            ..RetryPolicy::default()
        },
        ..JobSpec::with_run("python train.py")
    };
    Job::from_spec(&format!("bench-{i:05}"), spec, 1, "bench")
}

fn calls_delta(after: Calls, before: Calls) -> Calls {
    Calls {
        list: after.list - before.list,
        create: after.create - before.create,
        destroy: after.destroy - before.destroy,
        start: after.start - before.start,
        observe: after.observe - before.observe,
        collect: after.collect - before.collect,
    }
}

fn reconcile_figures(jobs: usize) -> Result<ReconcileFigures, BenchError> {
    let worker_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    let (_dir, home) = temp_home()?;
    let store = Store::open(&home.database()).map_err(|source| BenchError::Store {
        step: "opening the store",
        source,
    })?;
    let store = Arc::new(Mutex::new(store));
    let config = FakeConfig {
        latency: FAKE_LATENCY,
        // Reachable at once and never finishing: the steady state is "all running".
        boot_time: Duration::ZERO,
        job_duration: Duration::from_secs(24 * 3600),
        ..FakeConfig::default()
    };
    let fake = Arc::new(FakeProvider::new(config));
    let providers: BTreeMap<ProviderKind, Arc<dyn Provider>> =
        BTreeMap::from([(ProviderKind::Fake, Arc::clone(&fake) as Arc<dyn Provider>)]);
    let executor = Arc::new(Executor::new(providers, store, home.clone()));
    let source = Arc::new(MemorySource::new(Manifests {
        jobs: (0..jobs).map(bench_job).collect(),
        ..Manifests::default()
    }));
    let controller = Controller::new(executor, source as _, "bench");

    let peak_reset = reset_peak_rss();
    let rss_before_kib = self_status()?.rss_kib;
    let pass = |n: usize| -> Result<PassFigures, BenchError> {
        let before = fake.calls();
        let started = Instant::now();
        let report = runtime
            .block_on(controller.run_once())
            .map_err(|source| BenchError::Pass { pass: n, source })?;
        let wall = started.elapsed();
        if let Some((op, err)) = report.failed.first() {
            return Err(BenchError::OpsFailed {
                pass: n,
                count: report.failed.len(),
                first: format!("{op}: {err}"),
            });
        }
        Ok(PassFigures {
            wall,
            calls: calls_delta(fake.calls(), before),
            planned: report.planned.len(),
            applied: report.applied,
        })
    };
    let first = pass(1)?;
    let mut passes_to_steady = 1;
    let mut last = first.clone();
    while last.planned > 0 {
        passes_to_steady += 1;
        if passes_to_steady > MAX_PASSES {
            return Err(BenchError::NotSteady {
                jobs,
                passes: MAX_PASSES,
            });
        }
        last = pass(passes_to_steady)?;
    }
    let steady = pass(passes_to_steady + 1)?;
    let status = self_status()?;
    Ok(ReconcileFigures {
        jobs,
        latency: FAKE_LATENCY,
        worker_threads,
        first,
        passes_to_steady,
        steady,
        rss_before_kib,
        rss_after_kib: status.rss_kib,
        peak_kib: status.peak_kib,
        peak_reset,
    })
}

/// Resets VmHWM to the current RSS (Linux 4.0+); false where that is not allowed.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Memory figures of `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcStatus {
    pub rss_kib: u64,
    pub peak_kib: u64,
    pub threads: u64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

/// Parses the fields asimov uses from a `/proc/<pid>/status` or
/// `/proc/<pid>/task/<tid>/status` text; missing fields are zero (a task file has no
/// VmRSS line on some kernels).
pub fn parse_status(text: &str) -> ProcStatus {
    let mut s = ProcStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match key {
            "VmRSS" => s.rss_kib = number,
            "VmHWM" => s.peak_kib = number,
            "Threads" => s.threads = number,
            "voluntary_ctxt_switches" => s.voluntary_switches = number,
            "nonvoluntary_ctxt_switches" => s.involuntary_switches = number,
            _ => {}
        }
    }
    s
}

fn read_proc(path: &str) -> Result<String, BenchError> {
    std::fs::read_to_string(path).map_err(|source| BenchError::Proc {
        path: path.to_string(),
        source,
    })
}

fn self_status() -> Result<ProcStatus, BenchError> {
    Ok(parse_status(&read_proc("/proc/self/status")?))
}

// ---------------------------------------------------------------------------------------
// Figure 3: idle controller

/// utime + stime in clock ticks from a `/proc/<pid>/stat` line. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its LAST `)`.
pub fn parse_stat_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// One reading of a child process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    ticks: u64,
    voluntary: u64,
    involuntary: u64,
    threads: usize,
    rss_kib: u64,
}

fn sample(pid: u32) -> Result<Sample, BenchError> {
    let at = Instant::now();
    let stat_path = format!("/proc/{pid}/stat");
    let ticks =
        parse_stat_cpu_ticks(&read_proc(&stat_path)?).ok_or_else(|| BenchError::ProcParse {
            path: stat_path.clone(),
            message: "no utime and stime".into(),
        })?;
    let rss_kib = parse_status(&read_proc(&format!("/proc/{pid}/status"))?).rss_kib;
    // Context switches are per thread; the process line only counts the main thread.
    let task_dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&task_dir).map_err(|source| BenchError::Proc {
        path: task_dir.clone(),
        source,
    })?;
    let (mut voluntary, mut involuntary, mut threads) = (0, 0, 0);
    for task in tasks.flatten() {
        // A thread may end between listing and reading: skip it.
        if let Ok(text) = std::fs::read_to_string(task.path().join("status")) {
            let s = parse_status(&text);
            voluntary += s.voluntary_switches;
            involuntary += s.involuntary_switches;
            threads += 1;
        }
    }
    Ok(Sample {
        at,
        ticks,
        voluntary,
        involuntary,
        threads,
        rss_kib,
    })
}

/// Kills the child when dropped, so no error path leaves a controller behind.
struct ChildGuard(Child);

impl ChildGuard {
    /// SIGTERM (a clean shutdown), then SIGKILL if it is still there after 5 s.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) with a pid of a child we own and have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn idle_figures(binary: &Path, over: Duration) -> Result<IdleFigures, BenchError> {
    let (dir, home) = temp_home()?;
    let manifests = dir.path().join("empty-manifests");
    std::fs::create_dir_all(&manifests).map_err(|source| BenchError::Home {
        path: manifests.clone(),
        source,
    })?;
    let stderr_path = dir.path().join("controller.stderr");
    let stderr = std::fs::File::create(&stderr_path).map_err(|source| BenchError::Home {
        path: stderr_path.clone(),
        source,
    })?;
    let manifests_arg = manifests.to_string_lossy().into_owned();
    let args = ["controller", "--manifests", manifests_arg.as_str()];
    let child = asimov(binary, &home, &args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|source| BenchError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let mut child = ChildGuard(child);
    let exited = |child: &mut ChildGuard| -> Result<(), BenchError> {
        match child.0.try_wait() {
            Ok(Some(status)) => Err(BenchError::ChildFailed {
                args: args.join(" "),
                status: status.to_string(),
                stderr: std::fs::read_to_string(&stderr_path)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            }),
            _ => Ok(()),
        }
    };
    std::thread::sleep(IDLE_SETTLE);
    exited(&mut child)?;
    let pid = child.0.id();
    let a = sample(pid)?;
    std::thread::sleep(over);
    let b = sample(pid)?;
    // A controller that died during the window would make the figures meaningless.
    exited(&mut child)?;
    child.stop();
    let sampled = b.at - a.at;
    let ticks_per_second = clock_ticks_per_second();
    let cpu_seconds = b.ticks.saturating_sub(a.ticks) as f64 / ticks_per_second;
    Ok(IdleFigures {
        sampled,
        cpu_percent: cpu_percent(cpu_seconds, sampled),
        voluntary_switches: b.voluntary.saturating_sub(a.voluntary),
        involuntary_switches: b.involuntary.saturating_sub(a.involuntary),
        threads: b.threads,
        rss_kib: b.rss_kib,
    })
}

fn cpu_percent(cpu_seconds: f64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        100.0 * cpu_seconds / over.as_secs_f64()
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // 100 is the value on every Linux asimov runs on, should sysconf fail.
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

// ---------------------------------------------------------------------------------------
// Display

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn calls(c: &Calls) -> String {
    format!(
        "list {}, create {}, destroy {}, start {}, observe {}, collect {}",
        c.list, c.create, c.destroy, c.start, c.observe, c.collect
    )
}

/// `error: a: b: c` on one line.
fn not_measured(f: &mut fmt::Formatter<'_>, err: &BenchError) -> fmt::Result {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    writeln!(f, "  not measured: {text}")
}

fn verdict(ok: bool) -> &'static str {
    if ok { "meets target" } else { "MISSES target" }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "min {}, median {}, p95 {} ({} runs)",
            ms(self.min),
            ms(self.median),
            ms(self.p95),
            self.samples
        )
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sections = Sections::default();
        if let Some(get_runs) = &self.get_runs {
            sections.start(f, "asimov get runs (whole process, wall time)")?;
            match get_runs {
                Ok(g) => {
                    writeln!(
                        f,
                        "  store: {} runs, {:.1} MiB; {WARMUP_RUNS} warm-up runs discarded",
                        g.runs,
                        g.database_bytes as f64 / (1024.0 * 1024.0)
                    )?;
                    for (label, s) in [("table", &g.table), ("-o json", &g.json)] {
                        writeln!(
                            f,
                            "  {label:<8} {s}; target p95 < {}: {}",
                            ms(GET_RUNS_TARGET),
                            verdict(s.p95 < GET_RUNS_TARGET)
                        )?;
                    }
                }
                Err(e) => not_measured(f, e)?,
            }
        }
        if let Some(reconcile) = &self.reconcile {
            sections.start(f, "reconcile pass (FakeProvider, real SQLite store)")?;
            match reconcile {
                Ok(r) => {
                    writeln!(
                        f,
                        "  {} jobs of one run; fake latency {} per call; {} tokio worker threads",
                        r.jobs,
                        ms(r.latency),
                        r.worker_threads
                    )?;
                    for (label, p) in [("first pass", &r.first), ("steady pass", &r.steady)] {
                        writeln!(
                            f,
                            "  {label:<12} {} ({} ops planned, {} applied)",
                            ms(p.wall),
                            p.planned,
                            p.applied
                        )?;
                        writeln!(
                            f,
                            "  {:<12} provider calls: {}; target 1 list per pass: {}",
                            "",
                            calls(&p.calls),
                            verdict(p.calls.list == 1)
                        )?;
                    }
                    writeln!(f, "  steady state after {} passes", r.passes_to_steady)?;
                    writeln!(
                        f,
                        "  memory: RSS {} before, {} after, peak (VmHWM) {}{}",
                        mib(r.rss_before_kib),
                        mib(r.rss_after_kib),
                        mib(r.peak_kib),
                        if r.peak_reset {
                            ""
                        } else {
                            " (peak not reset: covers the whole process)"
                        }
                    )?;
                }
                Err(e) => not_measured(f, e)?,
            }
        }
        if let Some(idle) = &self.idle {
            sections.start(f, "idle controller (asimov controller, empty manifests)")?;
            match idle {
                Ok(i) => {
                    writeln!(
                        f,
                        "  over {:.1} s: CPU {:.3} %; target < {IDLE_CPU_TARGET_PERCENT} %: {}",
                        i.sampled.as_secs_f64(),
                        i.cpu_percent,
                        verdict(i.cpu_percent < IDLE_CPU_TARGET_PERCENT)
                    )?;
                    writeln!(
                        f,
                        "  wake-ups {:.2}/s ({} voluntary, {} involuntary context switches \
                     over {} threads); RSS {}",
                        i.wakeups_per_second(),
                        i.voluntary_switches,
                        i.involuntary_switches,
                        i.threads,
                        mib(i.rss_kib)
                    )?;
                }
                Err(e) => not_measured(f, e)?,
            }
        }
        if self.metrics.is_some() || self.metrics_full_tail.is_some() {
            sections.start(
                f,
                "reading metrics of running runs (stop_when; local transport, real store)",
            )?;
        }
        for (how, figures) in [
            (
                "read from each attempt's offset (the controller)",
                &self.metrics,
            ),
            ("the whole tail re-read (before)", &self.metrics_full_tail),
        ] {
            let Some(figures) = figures else { continue };
            writeln!(f, "  {how}:")?;
            match figures {
                Ok(m) => {
                    writeln!(
                        f,
                        "  {} runs; metrics files of {} lines ({} KiB), {} KiB ({} lines) read a run per pass",
                        m.runs,
                        m.file_lines,
                        m.file_bytes / 1024,
                        m.tail_bytes / 1024,
                        m.tail_lines
                    )?;
                    writeln!(
                        f,
                        "  one pass (read, parse, rules, record): {}; {} measured passes after 1 warm-up",
                        m.wall, m.wall.samples
                    )?;
                    writeln!(
                        f,
                        "  CPU per pass: controller {}, its children (sh, tail) {}; {:.1} MiB read",
                        ms(m.cpu_self),
                        ms(m.cpu_children),
                        (m.tail_bytes * m.runs as u64) as f64 / (1024.0 * 1024.0)
                    )?;
                    writeln!(
                        f,
                        "  of which parse + rules {} (median), the store write {} (median)",
                        ms(m.parse.median),
                        ms(m.record.median)
                    )?;
                    writeln!(
                        f,
                        "  memory: RSS {} before, {} after (the cursors held), peak (VmHWM) {}{}",
                        mib(m.rss_before_kib),
                        mib(m.rss_after_kib),
                        mib(m.peak_kib),
                        if m.peak_reset {
                            ""
                        } else {
                            " (peak not reset: covers the whole process)"
                        }
                    )?;
                }
                Err(e) => not_measured(f, e)?,
            }
        }
        Ok(())
    }
}

/// The report's sections, a blank line between two.
#[derive(Default)]
struct Sections {
    started: bool,
}

impl Sections {
    fn start(&mut self, f: &mut fmt::Formatter<'_>, title: &str) -> fmt::Result {
        if std::mem::replace(&mut self.started, true) {
            writeln!(f)?;
        }
        writeln!(f, "{title}")
    }
}

// ---------------------------------------------------------------------------------------
// Figure 4: reading metrics

/// Lines in each run's metrics file: a job that logged 10,000 evaluations.
const METRICS_LINES: usize = 10_000;
/// Passes measured (after one warm-up).
const METRICS_PASSES: usize = 5;
/// Runs whose metrics are read at the same time (the controller's default concurrency).
const METRICS_CONCURRENCY: usize = 16;

#[derive(Debug, Clone)]
pub struct MetricsFigures {
    pub runs: usize,
    pub file_lines: usize,
    pub file_bytes: u64,
    pub tail_bytes: u64,
    pub tail_lines: usize,
    pub wall: Spread,
    /// Median CPU time per pass of this process, and of the processes it started.
    pub cpu_self: Duration,
    pub cpu_children: Duration,
    pub parse: Spread,
    pub record: Spread,
    /// RSS when this way started (its file and store made), after its passes (the
    /// cursors still held), and its peak (VmHWM).
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub peak_kib: u64,
    /// Whether the peak was reset when this way started; when false, it also covers
    /// what the process did before.
    pub peak_reset: bool,
}

/// User + system CPU time of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`).
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `incremental`: each run's file read from its cursor, as the controller does; else
/// its whole tail every pass. Before every pass the file (one, hard-linked into every
/// run's folder) gets one new line, as when each job wrote one since the last pass.
fn metrics_figures(runs: usize, incremental: bool) -> Result<MetricsFigures, BenchError> {
    use crate::agent::{AgentMachine, Machine};
    use crate::manifest::{MetricMode, StopRule};
    use crate::reconcile::stop;
    use crate::transport::local::LocalTransport;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    let (dir, home) = temp_home()?;
    let local = |source: std::io::Error| BenchError::Home {
        path: dir.path().to_path_buf(),
        source,
    };
    // One metrics file, hard-linked into every run's folder: the reads are the same as
    // with a file each, without writing runs × its size to the disk.
    let mut text = String::new();
    for i in 0..METRICS_LINES {
        let x = i as f64;
        text.push_str(&format!(
            "{{\"step\": {i}, \"epoch\": {}, \"loss\": {:.6}, \"val_acc\": {:.6}, \"lr\": 0.0003}}\n",
            i / 100,
            2.0 / (1.0 + x / 500.0),
            0.9 - 0.4 / (1.0 + x / 800.0)
        ));
    }
    let file = dir.path().join("metrics.jsonl");
    std::fs::write(&file, &text).map_err(local)?;
    let mut roots = Vec::with_capacity(runs);
    for r in 0..runs {
        let root = dir.path().join(format!("run-{r:05}"));
        std::fs::create_dir_all(&root).map_err(local)?;
        std::fs::hard_link(&file, root.join("metrics.jsonl")).map_err(local)?;
        roots.push(root.display().to_string());
    }
    let store = Store::open(&home.database()).map_err(|source| BenchError::Store {
        step: "opening the store",
        source,
    })?;
    let mut seed = Vec::with_capacity(runs);
    for r in 0..runs {
        seed.push(crate::store::RunRecord::new_pending(
            &format!("run-{r:05}"),
            "bench",
            r as u32,
            "h",
            &BTreeMap::new(),
            "",
            now(),
        ));
    }
    store.put_runs(&seed).map_err(|source| BenchError::Store {
        step: "seeding runs",
        source,
    })?;
    let rules = vec![StopRule {
        metric: "val_acc".into(),
        mode: MetricMode::Max,
        patience: Some(50),
        threshold: None,
        max_steps: None,
    }];
    let transport: Arc<dyn crate::transport::Transport> = Arc::new(LocalTransport::new());
    use crate::reconcile::controller::METRICS_TAIL;
    use crate::reconcile::metrics::{MetricsCursor, Position};
    let mut cursors: Vec<MetricsCursor> = (0..runs).map(|_| MetricsCursor::default()).collect();
    // The memory peak of this way alone (the process's before it is not counted).
    let peak_reset = reset_peak_rss();
    let rss_before_kib = self_status()?.rss_kib;
    // One pass: every run's file read (16 at a time) and each read judged as it comes,
    // as the controller does, so that no pass holds every run's read at once.
    let pass_once = |cursors: &mut [MetricsCursor]| -> Result<PassRead, BenchError> {
        let at: Vec<Position> = cursors
            .iter()
            .map(|c| c.position(&rules, METRICS_TAIL))
            .collect();
        runtime.block_on(async {
            let limit = Arc::new(tokio::sync::Semaphore::new(METRICS_CONCURRENCY));
            let mut set = tokio::task::JoinSet::new();
            for (i, (root, at)) in roots.iter().zip(at).enumerate() {
                let machine = AgentMachine::new(Arc::clone(&transport), root.clone());
                let limit = Arc::clone(&limit);
                set.spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    let read = if incremental {
                        machine
                            .metrics_since(at.offset, at.file, METRICS_TAIL)
                            .await
                    } else {
                        machine.metrics_tail(METRICS_TAIL).await.map(|text| {
                            crate::agent::MetricsRead {
                                file: None,
                                start: 0,
                                text,
                            }
                        })
                    };
                    (i, read)
                });
            }
            let mut out = PassRead::default();
            while let Some(joined) = set.join_next().await {
                let Ok((r, read)) = joined else { continue };
                let read = read.map_err(|e| BenchError::Metrics(e.to_string()))?;
                let judged_at = Instant::now();
                let (line, value) = if incremental {
                    let cursor = &mut cursors[r];
                    cursor.advance(&read, &rules, METRICS_TAIL);
                    let watch = cursor.watch();
                    std::hint::black_box(watch.evaluate(&rules));
                    let last = watch.last();
                    (
                        last.map_or_else(String::new, |l| format!("{l:?}")),
                        last.and_then(|l| l.get("val_acc").copied()),
                    )
                } else {
                    let records = stop::parse_metrics(&read.text);
                    std::hint::black_box(stop::evaluate(&rules, &records));
                    let last = records.last();
                    (
                        last.map_or_else(String::new, |l| format!("{l:?}")),
                        last.and_then(|l| l.get("val_acc").copied()),
                    )
                };
                out.judged += judged_at.elapsed();
                out.empty |= read.text.is_empty();
                if r == 0 {
                    out.first_bytes = read.text.len() as u64;
                    out.first_lines = read.text.lines().count();
                }
                out.changed.push((
                    format!("run-{r:05}"),
                    crate::store::RunMetrics {
                        attempt: 1,
                        line,
                        metric: Some("val_acc".into()),
                        value,
                        at: now(),
                    },
                ));
            }
            Ok(out)
        })
    };
    let (mut walls, mut parses, mut records) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_self, mut cpu_children) = (Vec::new(), Vec::new());
    let (mut tail_bytes, mut tail_lines) = (0u64, 0usize);
    for pass in 0..=METRICS_PASSES {
        let (self_before, children_before) =
            (cpu_time(libc::RUSAGE_SELF), cpu_time(libc::RUSAGE_CHILDREN));
        // One more line, as each job wrote one since the last pass.
        {
            use std::io::Write;
            let i = METRICS_LINES + pass;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&file)
                .map_err(local)?;
            writeln!(
                f,
                "{{\"step\": {i}, \"epoch\": {}, \"loss\": 0.5, \"val_acc\": 0.8, \"lr\": 0.0003}}",
                i / 100
            )
            .map_err(local)?;
        }
        let started = Instant::now();
        let PassRead {
            mut changed,
            judged,
            empty,
            first_bytes,
            first_lines,
        } = pass_once(&mut cursors)?;
        // Every run's line changed, as when each job wrote a line since the last pass.
        for (_, m) in &mut changed {
            m.line.push_str(&format!(" pass={pass}"));
        }
        let write_at = Instant::now();
        store
            .put_metrics(&changed)
            .map_err(|source| BenchError::Store {
                step: "recording metrics",
                source,
            })?;
        let written = write_at.elapsed();
        let wall = started.elapsed();
        if empty {
            return Err(BenchError::Metrics("a metrics read came back empty".into()));
        }
        tail_bytes = first_bytes;
        tail_lines = first_lines;
        if pass == 0 {
            continue;
        }
        walls.push(wall);
        parses.push(judged);
        records.push(written);
        cpu_self.push(cpu_time(libc::RUSAGE_SELF).saturating_sub(self_before));
        cpu_children.push(cpu_time(libc::RUSAGE_CHILDREN).saturating_sub(children_before));
    }
    let status = self_status()?;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let spread =
        |v: &[Duration]| Spread::of(v).ok_or_else(|| BenchError::Metrics("no pass".into()));
    Ok(MetricsFigures {
        runs,
        file_lines: METRICS_LINES,
        file_bytes: text.len() as u64,
        tail_bytes,
        tail_lines,
        wall: spread(&walls)?,
        cpu_self: median(cpu_self),
        cpu_children: median(cpu_children),
        parse: spread(&parses)?,
        record: spread(&records)?,
        rss_before_kib,
        rss_after_kib: status.rss_kib,
        peak_kib: status.peak_kib,
        peak_reset,
    })
}

/// What one pass of metrics reads gave.
#[derive(Default)]
struct PassRead {
    changed: Vec<(String, crate::store::RunMetrics)>,
    /// Time spent on what was read: parse, rules, the latest line.
    judged: Duration,
    /// A read came back empty.
    empty: bool,
    /// The first run's read.
    first_bytes: u64,
    first_lines: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted = ms_list(&(1..=20).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 50.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&sorted, 95.0), Some(Duration::from_millis(19)));
        assert_eq!(percentile(&sorted, 100.0), Some(Duration::from_millis(20)));
        assert_eq!(percentile(&sorted, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
        let one = ms_list(&[7]);
        assert_eq!(percentile(&one, 95.0), Some(Duration::from_millis(7)));
    }

    #[test]
    fn spread_sorts_its_samples() {
        let s = Spread::of(&ms_list(&[30, 10, 50, 20, 40])).expect("samples");
        assert_eq!(s.samples, 5);
        assert_eq!(s.min, Duration::from_millis(10));
        assert_eq!(s.median, Duration::from_millis(30));
        assert_eq!(s.p95, Duration::from_millis(50));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        // Fields 14 and 15 (utime, stime) are 1234 and 56; the name holds ") 9 9".
        let line = "4242 (asi mov) 9 9) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    1234 56 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(line), Some(1290));
        assert_eq!(parse_stat_cpu_ticks("4242 (asimov) S 1"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_status_fields() {
        let text = "Name:\tasimov\nState:\tS (sleeping)\nVmHWM:\t   20480 kB\n\
                    VmRSS:\t   10240 kB\nThreads:\t3\nvoluntary_ctxt_switches:\t17\n\
                    nonvoluntary_ctxt_switches:\t4\n";
        let s = parse_status(text);
        assert_eq!(
            s,
            ProcStatus {
                rss_kib: 10240,
                peak_kib: 20480,
                threads: 3,
                voluntary_switches: 17,
                involuntary_switches: 4,
            }
        );
    }

    #[test]
    fn reads_this_process() {
        let me = self_status().expect("own status");
        assert!(me.rss_kib > 0 && me.peak_kib >= me.rss_kib, "{me:?}");
        let stat = read_proc("/proc/self/stat").expect("own stat");
        assert!(parse_stat_cpu_ticks(&stat).is_some(), "{stat}");
        let s = sample(std::process::id()).expect("sample");
        assert!(s.threads >= 1 && s.voluntary + s.involuntary > 0, "{s:?}");
    }

    /// A stand-in "controller" that sleeps: the sampling must see it idle, and it must be
    /// gone afterwards.
    #[test]
    fn samples_an_idle_child_then_stops_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("fake-asimov");
        // exec keeps the pid, so the sampled process is the sleeping one.
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$ASIMOV_HOME\" > \"$0.home\"\necho $$ > \"$0.pid\"\nexec sleep 60\n",
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let idle = idle_figures(&script, Duration::from_secs(1)).expect("idle figures");
        assert!(idle.sampled >= Duration::from_secs(1), "{idle:?}");
        assert!(idle.cpu_percent < 50.0, "{idle:?}");
        assert_eq!(idle.threads, 1, "{idle:?}");
        let home = std::fs::read_to_string(dir.path().join("fake-asimov.home")).expect("home");
        assert!(home.contains("asimov-bench-"), "{home}");
        // The temp home is removed and the child stopped and reaped.
        assert!(!Path::new(home.trim()).exists(), "{home}");
        let pid = std::fs::read_to_string(dir.path().join("fake-asimov.pid")).expect("pid");
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "child {pid} still there"
        );
    }

    #[test]
    fn a_child_that_exits_is_reported_with_its_stderr() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("broken-asimov");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'error: not built yet' >&2\nexit 1\n",
        )
        .expect("script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        match idle_figures(&script, Duration::from_secs(1)) {
            Err(BenchError::ChildFailed { stderr, .. }) => {
                assert_eq!(stderr, "error: not built yet")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cpu_percent_of_a_window() {
        assert!((cpu_percent(0.5, Duration::from_secs(10)) - 5.0).abs() < 1e-9);
        assert_eq!(cpu_percent(1.0, Duration::ZERO), 0.0);
        assert!((per_second(30, Duration::from_secs(10)) - 3.0).abs() < 1e-9);
    }
}
