//! `asimov bench` end to end at a small size: every figure it can take on this branch is
//! taken from real child processes and a real store. It checks that figures exist and
//! are consistent, never how fast they are.

use asimov::bench::{BenchOptions, MEASURED_RUNS, run};

#[test]
fn small_benchmark_takes_its_figures() {
    let report = run(BenchOptions {
        runs: 200,
        jobs: 30,
        idle_seconds: 1,
        binary: env!("CARGO_BIN_EXE_asimov").into(),
    })
    .expect("bench");
    let text = report.to_string();
    let g = report.get_runs.as_ref().expect("get runs figure");
    assert_eq!(g.runs, 200);
    assert!(g.database_bytes > 0);
    for s in [&g.table, &g.json] {
        assert_eq!(s.samples, MEASURED_RUNS);
        assert!(s.min <= s.median && s.median <= s.p95, "{s:?}");
    }
    let r = report.reconcile.as_ref().expect("reconcile figure");
    assert_eq!(r.first.calls.list, 1, "{text}");
    assert_eq!(r.steady.calls.list, 1, "{text}");
    assert_eq!(r.steady.calls.create, 0, "{text}");
    assert_eq!(r.steady.planned, 0, "{text}");
    assert!(
        r.peak_kib >= r.rss_after_kib.min(r.rss_before_kib),
        "{text}"
    );
    assert!(text.contains("asimov get runs") && text.contains("reconcile pass"));
    // The idle figure needs the `controller` verb; whichever way it went, it is reported.
    assert!(
        text.contains("CPU") || text.contains("not measured"),
        "{text}"
    );
    println!("{text}");
}
