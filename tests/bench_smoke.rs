//! `asimov bench` end to end at a small size, through the real binary as BENCHMARKS.md
//! runs it: every figure it can take on this branch is taken from real child processes
//! and a real store. It checks that figures exist and are consistent, never how fast
//! they are.

use std::process::Command;

/// The number after `key` in `line` (`"list 1,"` → 1 for key `"list "`).
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The line after the one containing `marker`.
fn line_after<'a>(text: &'a str, marker: &str) -> &'a str {
    let mut lines = text.lines().skip_while(|l| !l.contains(marker));
    lines.next();
    lines.next().unwrap_or_default()
}

#[test]
fn small_benchmark_takes_its_figures() {
    let out = Command::new(env!("CARGO_BIN_EXE_asimov"))
        .args([
            "bench",
            "--runs",
            "200",
            "--jobs",
            "30",
            "--idle-seconds",
            "1",
        ])
        .env_remove("ASIMOV_HOME")
        .output()
        .expect("asimov bench runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("asimov get runs") && text.contains("reconcile pass"));

    let store = text.lines().find(|l| l.contains("store:")).expect(&text);
    assert_eq!(number_after(store, "store: "), Some(200.0), "{text}");
    assert!(
        number_after(store, "runs, ").is_some_and(|mib| mib > 0.0),
        "{text}"
    );
    for figure in ["table ", "-o json "] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(figure))
            .expect(&text);
        assert!(line.contains("(20 runs)"), "{line}");
        let min = number_after(line, "min ").expect(line);
        let median = number_after(line, "median ").expect(line);
        let p95 = number_after(line, "p95 ").expect(line);
        assert!(min <= median && median <= p95, "{line}");
    }

    let first = line_after(&text, "first pass");
    let steady_line = text
        .lines()
        .find(|l| l.contains("steady pass"))
        .expect(&text);
    let steady = line_after(&text, "steady pass");
    assert_eq!(number_after(first, "list "), Some(1.0), "{text}");
    assert_eq!(number_after(steady, "list "), Some(1.0), "{text}");
    assert_eq!(number_after(steady, "create "), Some(0.0), "{text}");
    assert!(steady_line.contains("(0 ops planned"), "{text}");
    let memory = text
        .lines()
        .find(|l| l.contains("memory: RSS"))
        .expect(&text);
    let before = number_after(memory, "RSS ").expect(memory);
    let after = number_after(memory, "before, ").expect(memory);
    let peak = number_after(memory, "(VmHWM) ").expect(memory);
    assert!(peak >= before.min(after), "{memory}");
    // The idle figure needs the `controller` verb; whichever way it went, it is reported.
    assert!(
        text.contains("CPU") || text.contains("not measured"),
        "{text}"
    );
    println!("{text}");
}

/// How many runs `asimov get runs -o json` lists in `home`.
fn listed_runs(home: &std::path::Path) -> usize {
    let out = Command::new(env!("CARGO_BIN_EXE_asimov"))
        .args(["get", "runs", "-o", "json"])
        .env("ASIMOV_HOME", home)
        .output()
        .expect("asimov get runs runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    runs["items"].as_array().expect("an items list").len()
}

/// `asimov bench --seed-only`, which scripts/bench-compare.sh uses to time `get runs`
/// beside other tools: it seeds the store of $ASIMOV_HOME, and refuses a store that already
/// holds runs without writing to it.
#[test]
fn seed_only_fills_an_empty_store_and_refuses_a_used_one() {
    let home = tempfile::tempdir().expect("temp dir");
    let seed = || {
        Command::new(env!("CARGO_BIN_EXE_asimov"))
            .args(["bench", "--seed-only", "--runs", "120"])
            .env("ASIMOV_HOME", home.path())
            .output()
            .expect("asimov bench --seed-only runs")
    };
    let first = seed();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("seeded 120 runs into"),
        "{}",
        String::from_utf8_lossy(&first.stdout)
    );
    assert_eq!(listed_runs(home.path()), 120);

    let again = seed();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "a used store was seeded again");
    assert!(
        stderr.contains("already holds 120 runs") && stderr.contains("state.db"),
        "{stderr}"
    );
    assert_eq!(listed_runs(home.path()), 120, "the refused seed wrote runs");
}
