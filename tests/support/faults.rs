//! Faults at configurable rates, shared by the cloud test servers (`vast_server.rs`,
//! `lambda_server.rs`, `runpod_server.rs`) for issue 12's fault campaign. A server holds
//! an `Arc<Faults>` in its `Config` (`faults`) and asks `draw` once per request, before
//! its own handling; it answers a drawn fault in its own API's shape (its HTML page, its
//! 429, its "no capacity" error) or, for `Slow` and `Cut*`, delays or cuts its real
//! answer. Faults are drawn from a seeded generator (the order of requests is not
//! replayed, so a seed replays the rates, not the exact requests hit) and counted, so a
//! campaign prints how many of each it injected.
//!
//! The server's own records are untouched: a request answered by an injected fault
//! never reaches the server's handler (except `CutAfter` and `Slow`, which do), so its
//! pacing checks and 429 counts stay those of the client's real behaviour.
#![allow(dead_code)]

use axum::body::{Body, Bytes};
use axum::response::Response;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chaos {
    /// A proxy's HTML error page with this status (500, 502, 503 or 504).
    Html(u16),
    /// The server's own 429.
    TooMany,
    /// The request waits this long before the server handles it; longer than the
    /// client's timeout, the client gives up while the server still acts (each server
    /// handles its requests in tasks of their own for that: hyper drops the handler of a
    /// client that hung up, a real API finishes what it was asked).
    Slow(Duration),
    /// A create only: the server's own "no capacity" answer.
    Capacity,
    /// The connection is cut after the status line, before the server acts.
    CutBefore,
    /// The server acts (a create creates), then the connection is cut after the status
    /// line: the client never learns the answer.
    CutAfter,
}

impl Chaos {
    fn name(self) -> &'static str {
        match self {
            Chaos::Html(_) => "html 5xx",
            Chaos::TooMany => "429",
            Chaos::Slow(_) => "timeout",
            Chaos::Capacity => "capacity",
            Chaos::CutBefore => "cut before",
            Chaos::CutAfter => "cut after",
        }
    }
}

/// Probability of each fault per request (their sum at most 1; the campaign keeps it at
/// most 0.3). `capacity` applies to creates only.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    pub html: f64,
    pub too_many: f64,
    pub slow: f64,
    pub capacity: f64,
    pub cut_before: f64,
    pub cut_after: f64,
    /// How long a `Slow` request waits.
    pub slow_for: Duration,
    /// Faults are drawn for creates only (a test aiming at one create's fate).
    pub creates_only: bool,
}

impl Rates {
    /// `total` spread evenly over the six kinds.
    pub fn even(total: f64, slow_for: Duration) -> Rates {
        let each = total / 6.0;
        Rates {
            html: each,
            too_many: each,
            slow: each,
            capacity: each,
            cut_before: each,
            cut_after: each,
            slow_for,
            creates_only: false,
        }
    }

    pub fn total(&self) -> f64 {
        self.html + self.too_many + self.slow + self.capacity + self.cut_before + self.cut_after
    }
}

struct State {
    rates: Rates,
    rng: u64,
    drawn: BTreeMap<&'static str, u64>,
    requests: u64,
}

/// The faults of one server.
pub struct Faults {
    state: Mutex<State>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("rates", &self.lock().rates)
            .finish()
    }
}

impl Faults {
    pub fn new(seed: u64, rates: Rates) -> Arc<Faults> {
        Arc::new(Faults {
            state: Mutex::new(State {
                rates,
                rng: seed,
                drawn: BTreeMap::new(),
                requests: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New rates from now on (the campaign turns faults off to let things settle).
    pub fn set(&self, rates: Rates) {
        self.lock().rates = rates;
    }

    /// The fault for this request, if one is drawn.
    pub fn draw(&self, create: bool) -> Option<Chaos> {
        let mut st = self.lock();
        if st.rates.total() <= 0.0 || (st.rates.creates_only && !create) {
            return None;
        }
        // Only requests while faults are on count: the rate printed is the rate hit.
        st.requests += 1;
        // SplitMix64, as the campaign's own generator.
        st.rng = st.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = st.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let mut u = (z >> 11) as f64 / (1u64 << 53) as f64;
        let r = st.rates.clone();
        let status = [500, 502, 503, 504][(z % 4) as usize];
        let kinds = [
            (r.html, Chaos::Html(status)),
            (r.too_many, Chaos::TooMany),
            (r.slow, Chaos::Slow(r.slow_for)),
            (r.capacity, Chaos::Capacity),
            (r.cut_before, Chaos::CutBefore),
            (r.cut_after, Chaos::CutAfter),
        ];
        for (rate, chaos) in kinds {
            if u < rate {
                if chaos == Chaos::Capacity && !create {
                    return None;
                }
                *st.drawn.entry(chaos.name()).or_default() += 1;
                return Some(chaos);
            }
            u -= rate;
        }
        None
    }

    /// Faults injected so far, by kind, and the requests seen while faults were on.
    pub fn counts(&self) -> (BTreeMap<&'static str, u64>, u64) {
        let st = self.lock();
        (st.drawn.clone(), st.requests)
    }
}

/// The faults of a server's config, drawn for one request.
pub fn draw(faults: &Option<Arc<Faults>>, create: bool) -> Option<Chaos> {
    faults.as_ref().and_then(|f| f.draw(create))
}

/// `response` with its status and headers, whose body fails at once: the server closes
/// the connection mid-answer, as a dropped connection or a proxy reset does.
pub fn cut(response: Response) -> Response {
    let (parts, _) = response.into_parts();
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection cut by the fault campaign",
        ))
    });
    Response::from_parts(parts, Body::from_stream(failing))
}
