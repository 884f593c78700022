//! Fuzzing manifest loading under plain `cargo test` (stable Rust, no `cargo fuzz`): a
//! seeded mutation loop over the examples, the malformed fixtures and hostile seeds,
//! bounded by a number of inputs and a time budget. For every input, loading must not
//! panic, must return within a time bound, and the memory it holds at its peak must stay
//! under a bound, measured by the counting global allocator of this test binary.
//!
//! Knobs: `ASIMOV_FUZZ_SEED` (default fixed, so CI is reproducible), `ASIMOV_FUZZ_INPUTS`
//! (default 2000) and `ASIMOV_FUZZ_SECONDS` (default 15). A failing input is written to
//! `target/fuzz-failures/` and named in the failure message.
//!
//! This file holds a single test: the allocator counts every thread of the binary, and a
//! second test running alongside would be counted as well.

use asimov::manifest::yaml::parse_documents;
use asimov::manifest::{Context, load_paths, load_str, to_yaml_string};
use serde_json::{Value, json};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Bytes allocated and not yet freed, and the highest that reached since the last reset.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Past this much live memory the allocator refuses, and the test binary aborts, rather
/// than let a regression take the machine down with it.
const HARD_LIMIT: usize = 1 << 30;

impl Counting {
    /// False when `by` more bytes would cross [`HARD_LIMIT`].
    fn admit(by: usize) -> bool {
        if CURRENT.load(Ordering::Relaxed).saturating_add(by) <= HARD_LIMIT {
            return true;
        }
        const MESSAGE: &[u8] = b"manifest_fuzz: an input took more than 1 GiB; \
            it is target/fuzz-failures/last-input.yaml\n";
        // SAFETY: writing a static buffer to stderr; no allocation here.
        unsafe { libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len()) };
        false
    }

    fn grew(by: usize) {
        let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn shrank(by: usize) {
        CURRENT.fetch_sub(by, Ordering::Relaxed);
    }

    /// Starts a measurement; returns the baseline.
    fn reset() -> usize {
        let now = CURRENT.load(Ordering::Relaxed);
        PEAK.store(now, Ordering::Relaxed);
        now
    }

    fn peak_since(baseline: usize) -> usize {
        PEAK.load(Ordering::Relaxed).saturating_sub(baseline)
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters only
// observe sizes of allocations that succeeded.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Counting::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Counting::admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Counting::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        Counting::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Counting::admit(new_size.saturating_sub(layout.size())) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded; `ptr` came from this allocator with `layout`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Counting::shrank(layout.size());
            Counting::grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most memory one input may hold at once while it is loaded. A manifest file is at most
/// 1 MiB and aliases may add 2 MiB to a document; the rest is the loader's working copies.
const MEMORY_BOUND: usize = 256 << 20;

/// Longest one input may take to load, in an unoptimised test build on a loaded machine.
const TIME_BOUND: Duration = Duration::from_secs(10);

/// xorshift64*: small, seedable, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Pieces of YAML and manifest syntax the mutator splices in: structure, anchors and
/// aliases, tags, odd scalars, huge numbers and durations, a byte-order mark.
const TOKENS: &[&str] = &[
    "\n",
    "\n  ",
    "\n    - ",
    ": ",
    "- ",
    "---\n",
    "...\n",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "? ",
    "|\n  ",
    ">-\n  ",
    "#",
    "&a ",
    "*a",
    "&b [*a, *a, *a, *a, *a, *a, *a, *a]",
    "*b",
    "<<: *a\n",
    "!!str ",
    "!!binary ",
    "!custom ",
    "%YAML 1.2\n",
    "\"",
    "'",
    "\\",
    "~",
    "null",
    "true",
    "0x7fffffffffffffff",
    "99999999999999999999999",
    "-1",
    "1e400",
    ".nan",
    "3000000000000000h",
    "10years",
    "0s",
    "${matrix.",
    "${matrix.config}",
    "}",
    "\u{feff}",
    "\u{0}",
    "\t",
    "\r\n",
    "é",
    "/dev/zero",
    "../../../../etc/passwd",
    "provider: ssh",
    "provider: fake",
    "matrix: {file: runs.txt}",
    "matrix: {a: [1, 2, 3], b: [x, y]}",
    "kind: Fleet",
    "kind: Budget",
    "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: j}\nspec: {run: x}\n",
];

/// Field names of the manifest kinds, so that structured mutations get past unknown-field
/// checks and reach the checks of meaning.
const FIELDS: &[&str] = &[
    "action",
    "address",
    "artifacts",
    "at",
    "budget",
    "checkpoint",
    "config",
    "count",
    "cpus",
    "cuda",
    "disk_gb",
    "env",
    "every",
    "file",
    "files",
    "filters",
    "fleet",
    "from",
    "git",
    "gpu",
    "gpus",
    "hosts",
    "identity_file",
    "image",
    "instance_types",
    "labels",
    "limit_usd",
    "matrix",
    "max_duration",
    "max_price_per_hour",
    "max_restarts",
    "memory_gb",
    "metric",
    "min_vram_gb",
    "mode",
    "name",
    "on",
    "path",
    "paths",
    "patience",
    "period",
    "placement",
    "port",
    "premium_pct",
    "provider",
    "ref",
    "regions",
    "repo",
    "resources",
    "retry",
    "run",
    "schedule",
    "secrets",
    "selector",
    "setup",
    "source",
    "spot",
    "stop_when",
    "to",
    "user",
    "workdir",
];

/// Values a structured mutation puts in place of a node.
fn random_value(rng: &mut Rng, corpus_values: &[Value]) -> Value {
    match rng.below(12) {
        0 => json!(null),
        1 => json!(rng.chance(2)),
        2 => json!([i64::MIN, -1, 0, 1, 65535, 65536, u32::MAX as i64, i64::MAX][rng.below(8)]),
        3 => json!(u64::MAX),
        4 => json!([-0.0, 1e300, -1e300, 0.5][rng.below(4)]),
        5 => json!(
            [
                "",
                "x",
                "10years",
                "10years 1s",
                "0s",
                "1ns",
                "43h",
                "${matrix.config}",
                "${matrix.",
                "s3://",
                "s3://b/p",
                "~",
                "~/x",
                "../../..",
                "/dev/zero",
                "2026-11-23T05:23:00Z",
                "9999-12-31T23:59:59Z",
                "-0001-01-01T00:00:00Z",
                "ssh",
                "vast",
                "fake",
                "local",
                "H100",
                "12.1",
                "1.2.3.4.5",
                ">=0.98",
                "no-capacity",
                "max",
                "stop",
                "block",
                "-",
                "a-",
                "é",
                "\u{feff}",
            ][rng.below(34)]
        ),
        6 => json!("y".repeat(rng.below(100_000))),
        7 => json!(FIELDS[rng.below(FIELDS.len())]),
        8 => Value::Array((0..rng.below(64)).map(|i| json!(i)).collect()),
        9 => {
            let mut map = serde_json::Map::new();
            for _ in 0..rng.below(4) {
                map.insert(FIELDS[rng.below(FIELDS.len())].to_string(), json!("v"));
            }
            Value::Object(map)
        }
        _ => corpus_values[rng.below(corpus_values.len())].clone(),
    }
}

/// Changes one node of a parsed manifest: replaces it, deletes it, adds a known field
/// beside it or repeats a list item. Aims at stage 2 (meaning), which byte mutations
/// seldom reach past the YAML and schema checks.
fn mutate_value(rng: &mut Rng, value: &mut Value, corpus_values: &[Value]) {
    let depth = rng.below(6);
    let node = pick(rng, value, depth);
    match (rng.below(4), &mut *node) {
        (0, Value::Object(map)) if !map.is_empty() => {
            let key = map
                .keys()
                .nth(rng.below(map.len()))
                .cloned()
                .unwrap_or_default();
            map.remove(&key);
        }
        (1, Value::Object(map)) => {
            let key = FIELDS[rng.below(FIELDS.len())].to_string();
            map.insert(key, random_value(rng, corpus_values));
        }
        (2, Value::Array(items)) if !items.is_empty() => {
            let item = items[rng.below(items.len())].clone();
            for _ in 0..rng.below(2000) {
                items.push(item.clone());
            }
        }
        _ => *node = random_value(rng, corpus_values),
    }
}

/// A random node at most `depth` levels below `node`.
fn pick<'a>(rng: &mut Rng, node: &'a mut Value, depth: usize) -> &'a mut Value {
    let children = match &*node {
        Value::Object(map) => map.len(),
        Value::Array(items) => items.len(),
        _ => 0,
    };
    if depth == 0 || children == 0 || rng.chance(4) {
        return node;
    }
    let i = rng.below(children);
    match node {
        Value::Object(map) => {
            let child = map.values_mut().nth(i).expect("index below len");
            pick(rng, child, depth - 1)
        }
        Value::Array(items) => pick(rng, &mut items[i], depth - 1),
        other => other,
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(6) {
        let len = input.len();
        let at = rng.below(len + 1);
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 => input.insert(at, rng.next() as u8),
            2 | 3 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                input.splice(at..at, token.iter().copied());
            }
            4 if len > 0 => {
                let end = (at + 1 + rng.below(64)).min(len);
                input.drain(at.min(end)..end);
            }
            5 if len > 0 => {
                // Repeat a slice: grows lists, mappings and documents.
                let start = rng.below(len);
                let end = (start + 1 + rng.below(256)).min(len);
                let piece: Vec<u8> = input[start..end].to_vec();
                for _ in 0..1 + rng.below(8) {
                    input.splice(at..at, piece.iter().copied());
                }
            }
            6 => {
                // Splice in part of another input.
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = (start + 1 + rng.below(512)).min(other.len());
                    input.splice(at..at, other[start..end].iter().copied());
                }
            }
            7 => {
                // Change the indentation of a line.
                let line = input[..at].iter().rposition(|b| *b == b'\n');
                let start = line.map_or(0, |i| i + 1);
                if rng.chance(2) {
                    input.splice(start..start, b"  ".iter().copied());
                } else if input.get(start) == Some(&b' ') {
                    input.remove(start);
                }
            }
            _ => {
                let end = (at + rng.below(16)).min(len);
                input.truncate(end.max(at.min(len)));
            }
        }
    }
    // Inputs stay around the size of real manifests, plus room for what the mutations
    // repeat; the size bound of files is exercised by its own seeds.
    input.truncate(256 << 10);
}

/// The inputs mutated from: every example and malformed fixture, and hostile seeds.
fn corpus(root: &Path) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    for dir in ["examples", "tests/fixtures/manifests/bad"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("corpus folder") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "txt") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut corpus: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).expect("read corpus file"))
        .collect();
    let job = "apiVersion: asimov/v1\nkind: Job\nmetadata: {name: h}\nspec:\n  run: echo\n";
    // Anchors nested in anchors, each copied again; wide aliases of long strings.
    let mut nested = format!("{job}  env:\n    X: ");
    for i in 0..60 {
        nested.push_str(&format!("&n{i} ["));
    }
    nested.push_str(&"]".repeat(60));
    nested.push('\n');
    corpus.push(nested.into_bytes());
    let long = "x".repeat(64 << 10);
    let mut wide = format!("{job}  env:\n    A: &s \"{long}\"\n    B: [");
    wide.push_str(&"*s, ".repeat(200));
    wide.push_str("*s]\n");
    corpus.push(wide.into_bytes());
    // Just under the alias bound: the most work a refused-or-accepted input may cause.
    let mut near = format!("{job}  setup:\n    - &a \"lol\"\n");
    near.push_str("  env:\n    B: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n");
    for (name, from) in [("C", 'b'), ("D", 'c'), ("E", 'd'), ("F", 'e')] {
        let to = from as u8 + 1;
        near.push_str(&format!(
            "    {name}: &{} [{}]\n",
            to as char,
            vec![format!("*{from}"); 8].join(", ")
        ));
    }
    corpus.push(near.into_bytes());
    // Nesting far past any bound: a recursive parser or walk would overflow its stack.
    let deep = 100_000;
    corpus.push(
        format!(
            "{job}  env:\n    D: {}{}\n",
            "[".repeat(deep),
            "]".repeat(deep)
        )
        .into_bytes(),
    );
    corpus.push(format!("{job}  env:\n    D: {}\n", "{a: ".repeat(deep)).into_bytes());
    // Many documents, many keys, a long flow list.
    corpus.push(format!("{job}---\n").repeat(500).into_bytes());
    let keys: String = (0..5000).map(|i| format!("    K{i}: v\n")).collect();
    corpus.push(format!("{job}  env:\n{keys}").into_bytes());
    let items: Vec<String> = (0..20000).map(|i| i.to_string()).collect();
    corpus.push(format!("{job}  matrix: {{seed: [{}]}}\n", items.join(",")).into_bytes());
    corpus
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn manifest_loading_survives_mutated_input() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seed = env_number("ASIMOV_FUZZ_SEED", 0x0a51_a0f0_2026);
    let inputs = env_number("ASIMOV_FUZZ_INPUTS", 2000);
    let budget = Duration::from_secs(env_number("ASIMOV_FUZZ_SECONDS", 15));
    let ctx = Context {
        fleets: BTreeSet::from(["lab".to_string()]),
        budgets: BTreeSet::from(["team-a".to_string()]),
        secrets: BTreeSet::from(["HF_TOKEN".to_string(), "LAMBDA_TERMINATE_KEY".to_string()]),
    };
    // Relative paths in the inputs (a matrix `runs.txt`) resolve inside the examples.
    let as_if = root.join("examples/fuzz.yaml");
    let corpus = corpus(&root);
    // Documents of the seeds that parse, for structured mutations, and every node in
    // them, as material to put elsewhere.
    let manifests: Vec<Value> = corpus
        .iter()
        .filter_map(|seed| parse_documents(&String::from_utf8_lossy(seed)).ok())
        .flatten()
        .map(|doc| doc.value)
        .filter(Value::is_object)
        .collect();
    // Valid ones are the better base: one change then lands on a check of meaning.
    let valid: Vec<Value> = manifests
        .iter()
        .filter(|doc| {
            let text = to_yaml_string(doc).expect("a JSON value renders as YAML");
            load_str(&as_if, &text, &ctx).is_ok()
        })
        .cloned()
        .collect();
    let mut values = Vec::new();
    let mut stack: Vec<&Value> = manifests.iter().collect();
    while let Some(v) = stack.pop() {
        values.push(v.clone());
        match v {
            Value::Object(map) => stack.extend(map.values()),
            Value::Array(items) => stack.extend(items.iter().take(8)),
            _ => {}
        }
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let on_disk = scratch.path().join("fuzz.yaml");
    let failures = root.join("target/fuzz-failures");
    std::fs::create_dir_all(&failures).expect("create target/fuzz-failures");
    let last_input = failures.join("last-input.yaml");

    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let (mut loaded, mut refused, mut worst_memory, mut worst_time) = (0, 0, 0, Duration::ZERO);
    let mut done = 0;
    while done < inputs && started.elapsed() < budget {
        // The seeds themselves first, then mutations of them.
        let input = match corpus.get(done as usize) {
            Some(seed) => seed.clone(),
            // Every other input is a parsed manifest changed node by node and written
            // back as YAML; the rest are byte mutations of any seed.
            None if rng.chance(2) => {
                let bases = if rng.chance(4) { &manifests } else { &valid };
                let mut doc = bases[rng.below(bases.len())].clone();
                for _ in 0..1 + rng.below(2) {
                    mutate_value(&mut rng, &mut doc, &values);
                }
                to_yaml_string(&doc)
                    .expect("a JSON value renders as YAML")
                    .into_bytes()
            }
            None => {
                let mut input = corpus[rng.below(corpus.len())].clone();
                mutate(&mut rng, &mut input, &corpus);
                input
            }
        };
        // Most inputs go in as text; some as a file, which also exercises reading it
        // (bytes that are not UTF-8, the size bound).
        let through_file = rng.chance(8);
        // Kept before loading, so that an abort (past the hard limit, a stack overflow)
        // still leaves the input behind.
        let _ = std::fs::write(&last_input, &input);
        let baseline = Counting::reset();
        let t0 = Instant::now();
        let outcome = std::panic::catch_unwind(|| {
            if through_file {
                std::fs::write(&on_disk, &input).expect("write input");
                load_paths(std::slice::from_ref(&on_disk), &ctx).is_ok()
            } else {
                let text = String::from_utf8_lossy(&input);
                load_str(&as_if, &text, &ctx).is_ok()
            }
        });
        let elapsed = t0.elapsed();
        let memory = Counting::peak_since(baseline);
        let failure = match outcome {
            Err(_) => Some("loading panicked".to_string()),
            Ok(_) if memory > MEMORY_BOUND => Some(format!(
                "loading held {} MiB at its peak, more than {} MiB",
                memory >> 20,
                MEMORY_BOUND >> 20
            )),
            Ok(_) if elapsed > TIME_BOUND => Some(format!(
                "loading took {elapsed:?}, more than {TIME_BOUND:?}"
            )),
            Ok(ok) => {
                if ok {
                    loaded += 1;
                } else {
                    refused += 1;
                }
                None
            }
        };
        if let Some(failure) = failure {
            let kept = failures.join(format!("{seed:x}-{done}.yaml"));
            let _ = std::fs::write(&kept, &input);
            panic!(
                "{failure}: input {done} of seed {seed:#x} (ASIMOV_FUZZ_SEED), kept in {}",
                kept.display()
            );
        }
        worst_memory = worst_memory.max(memory);
        worst_time = worst_time.max(elapsed);
        done += 1;
    }
    eprintln!(
        "fuzz: {done} inputs in {:?} (seed {seed:#x}): {loaded} loaded, {refused} refused; \
         worst {:.1} MiB, {worst_time:?}",
        started.elapsed(),
        worst_memory as f64 / f64::from(1 << 20)
    );
    assert!(!valid.is_empty(), "no valid manifest among the seeds");
    // The loop must actually have run, and reached past the seeds.
    assert!(
        done > corpus.len() as u64,
        "only {done} inputs in {budget:?}"
    );
    assert!(
        loaded > 0 && refused > 0,
        "{loaded} loaded, {refused} refused"
    );
}
