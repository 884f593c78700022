//! Named crash points for the crash-safety tests. When `ASIMOV_FAILPOINT` names a point
//! (optionally `name@N`: on its N-th hit), the process kills itself with SIGKILL right
//! there: no destructor, no flush, exactly what a power cut or an OOM kill does. Unset,
//! a failpoint is one environment lookup, done once.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

struct Armed {
    name: String,
    on_hit: u32,
    hits: AtomicU32,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("ASIMOV_FAILPOINT").ok()?;
            let (name, on_hit) = match spec.split_once('@') {
                Some((n, k)) => (n.to_string(), k.parse().ok()?),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                on_hit,
                hits: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Dies by SIGKILL if `name` is the armed failpoint and this is the chosen hit.
pub fn hit(name: &str) {
    let Some(armed) = armed() else { return };
    if armed.name != name {
        return;
    }
    if armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.on_hit {
        tracing::warn!(failpoint = name, "failpoint reached: killing this process");
        // SAFETY: sending a signal to ourselves; nothing is shared.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// How long to wait at `name` when `ASIMOV_DELAYPOINT=name:MILLIS` names it (zero
/// otherwise): tests widen a race window with it, so the race is met every time rather
/// than once in a hundred runs.
pub fn delay(name: &str) -> std::time::Duration {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let spec = std::env::var("ASIMOV_DELAYPOINT").ok()?;
        let (n, ms) = spec.rsplit_once(':')?;
        Some((n.to_string(), ms.parse().ok()?))
    });
    match armed {
        Some((n, ms)) if n == name => {
            // Tests wait for this line to act inside the window.
            tracing::info!(point = name, "delay point reached");
            std::time::Duration::from_millis(*ms)
        }
        _ => std::time::Duration::ZERO,
    }
}
