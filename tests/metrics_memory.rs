//! What the controller holds per running run for its `stop_when` rules, measured with a
//! counting allocator over real metrics files read by the real `AgentMachine` over the
//! local transport: a few KiB a run, whatever the job writes (a line of 100 MB, a
//! million distinct metric names). Before, each attempt kept the parsed records of its
//! last 256 KiB: about 2 MiB a run for the files below.
//!
//! One test in its own binary: the allocator counts the whole process.

use asimov::agent::{AgentMachine, Machine};
use asimov::manifest::{MetricMode, StopRule};
use asimov::reconcile::controller::METRICS_TAIL;
use asimov::reconcile::metrics::{MetricsCursor, resumes};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter of
// the bytes live is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as given by the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The bytes `cursors` hold: the live bytes that go when they are dropped.
fn held(cursors: Vec<MetricsCursor>) -> isize {
    let before = LIVE.load(Ordering::SeqCst);
    drop(cursors);
    before - LIVE.load(Ordering::SeqCst)
}

/// One controller pass over `cursor`: from its position, the tail when the file is
/// not the one it read (as `Controller::observe` does).
async fn pass(machine: &AgentMachine, cursor: &mut MetricsCursor, rules: &[StopRule]) {
    let at = cursor.position(rules, METRICS_TAIL);
    let mut read = machine
        .metrics_since(at.offset, at.file, METRICS_TAIL)
        .await
        .expect("read metrics");
    if at.offset > 0 && !resumes(&at, &read) {
        read = machine
            .metrics_since(0, None, METRICS_TAIL)
            .await
            .expect("read the tail");
    }
    cursor.advance(&read, rules, METRICS_TAIL);
}

fn append(path: &std::path::Path, text: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open metrics");
    f.write_all(text).expect("append metrics");
}

#[test]
fn the_rules_state_stays_small_whatever_the_job_writes() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let transport: Arc<dyn asimov::transport::Transport> =
        Arc::new(asimov::transport::local::LocalTransport::new());
    let machine = AgentMachine::new(Arc::clone(&transport), dir.path().display().to_string());
    let file = dir.path().join("metrics.jsonl");
    let rules = [StopRule {
        metric: "val_acc".into(),
        mode: MetricMode::Max,
        patience: Some(50),
        threshold: Some(0.99),
        max_steps: None,
    }];
    runtime.block_on(async {
        // The bench's file: 10,000 evaluations, five fields each; 50 runs reading it.
        let mut text = String::new();
        for i in 0..10_000 {
            let x = i as f64;
            text.push_str(&format!(
                "{{\"step\": {i}, \"epoch\": {}, \"loss\": {:.6}, \"val_acc\": {:.6}, \"lr\": 0.0003}}\n",
                i / 100,
                2.0 / (1.0 + x / 500.0),
                0.9 - 0.4 / (1.0 + x / 800.0)
            ));
        }
        append(&file, text.as_bytes());
        let mut cursors: Vec<MetricsCursor> = (0..50).map(|_| MetricsCursor::default()).collect();
        for c in &mut cursors {
            pass(&machine, c, &rules).await;
        }
        append(&file, b"{\"step\": 10000, \"val_acc\": 0.8}\n");
        for c in &mut cursors {
            pass(&machine, c, &rules).await;
            assert_eq!(
                c.watch().last().and_then(|r| r.get("step").copied()),
                Some(10_000.0)
            );
        }
        let per_run = held(cursors) / 50;
        assert!(per_run < 8 * 1024, "{per_run} bytes a run");

        // A line of 100 MB, written while the passes go on, then a record.
        std::fs::remove_file(&file).expect("remove");
        append(&file, b"{\"step\": 1, \"val_acc\": 0.5}\n{\"step\": 2, \"x\": \"");
        let mut cursor = MetricsCursor::default();
        pass(&machine, &mut cursor, &rules).await;
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            append(&file, &chunk);
            pass(&machine, &mut cursor, &rules).await;
        }
        append(&file, b"\"}\n{\"step\": 3, \"val_acc\": 0.995}\n");
        let mut passes = 0;
        while cursor.watch().last().and_then(|r| r.get("step").copied()) != Some(3.0) {
            pass(&machine, &mut cursor, &rules).await;
            passes += 1;
            assert!(passes <= 2, "stalled at {:?}", cursor.position(&rules, METRICS_TAIL));
        }
        let stop = cursor.watch().evaluate(&rules).expect("the threshold stops the run");
        assert_eq!(stop.why, "val_acc reached 0.99 (0.995 at step 3)");
        let bytes = held(vec![cursor]);
        assert!(bytes < 8 * 1024, "{bytes} bytes after a line of 100 MB");

        // A million distinct metric names, in lines of nearly 256 KiB.
        std::fs::remove_file(&file).expect("remove");
        let mut cursor = MetricsCursor::default();
        let (mut names, mut step) = (0, 0);
        while names < 1_000_000 {
            let mut line = format!("{{\"step\": {step}, \"val_acc\": 0.5");
            while line.len() < METRICS_TAIL - 100 {
                use std::fmt::Write;
                let _ = write!(line, ", \"metric_{names}\": 1");
                names += 1;
            }
            line.push_str("}\n");
            append(&file, line.as_bytes());
            pass(&machine, &mut cursor, &rules).await;
            step += 1;
        }
        assert_eq!(
            cursor.watch().last().and_then(|r| r.get("step").copied()),
            Some(f64::from(step - 1))
        );
        let bytes = held(vec![cursor]);
        assert!(bytes < 16 * 1024, "{bytes} bytes after a million names");
    });
}
