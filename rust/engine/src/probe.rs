//! Active health checks: an HTTP probe of each target, run once per node.
//!
//! Every worker runs a small task per probed target, but the probe itself happens once per
//! interval for the whole node: the workers share a board in shared memory (a memfd the
//! master creates, like the rate limit table) with one slot per probed target. A slot holds
//! when the next probe is due and the probe results so far; the worker whose task finds the
//! slot due wins a compare-and-swap on it and probes, the others only read the result. No
//! worker is special: if one dies, the next due time is claimed by another.
//!
//! A slot is found by hashing what makes two probes the same (address, path, Host header,
//! thresholds, expected statuses), so two upstreams probing one target the same way share
//! it, and a reload that keeps those keeps the results. A slot nobody has looked at for a
//! while is reused. Without a board (a lone worker) or when the board is full, the worker
//! probes on its own.

use crate::balancer::hash64;
use crate::body::RequestBody;
use crate::config::ActiveHealthConfig;
use crate::health::{StatusSet, TargetHealth};
use crate::pool::SendError;
use crate::server::log_event;
use crate::shm::{monotonic_ns, Mapping};
use crate::upstream::secs;
use crate::upstream_tls::TargetTls;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Slots probed for a key before the board counts as full.
const PROBE: usize = 8;

#[repr(C)]
#[derive(Default)]
pub struct Slot {
    key: AtomicU64,
    /// CLOCK_MONOTONIC ns when the next probe is due.
    due: AtomicU64,
    /// Bit 63: unhealthy; bits 0..16: consecutive successes; 16..32: consecutive failures.
    state: AtomicU64,
    /// After this (CLOCK_MONOTONIC ns) nobody uses the slot any more: it may be reused.
    expires: AtomicU64,
}

pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// The node's shared probe results.
pub struct HealthBoard {
    /// Keeps `slots` mapped.
    _map: Mapping,
    slots: *const Slot,
    n: usize,
}

// SAFETY: every access to the mapped slots goes through atomics.
unsafe impl Send for HealthBoard {}
unsafe impl Sync for HealthBoard {}

impl HealthBoard {
    /// Map `len_bytes` of the shared memory behind `fd` (a memfd the master created).
    pub fn from_fd(fd: RawFd, len_bytes: usize) -> io::Result<HealthBoard> {
        Self::check(len_bytes)?;
        Self::over(Mapping::shared(fd, len_bytes, 0)?, len_bytes)
    }

    /// A board private to this process (a lone worker, tests).
    pub fn anonymous(slots: usize) -> io::Result<HealthBoard> {
        Self::check(slots * SLOT_BYTES)?;
        Self::over(Mapping::anonymous(slots * SLOT_BYTES)?, slots * SLOT_BYTES)
    }

    fn check(len_bytes: usize) -> io::Result<()> {
        let n = len_bytes / SLOT_BYTES;
        if n < PROBE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the health board needs at least {PROBE} slots, got {n}"),
            ));
        }
        Ok(())
    }

    fn over(map: Mapping, len_bytes: usize) -> io::Result<HealthBoard> {
        Ok(HealthBoard {
            slots: map.ptr() as *const Slot,
            _map: map,
            n: len_bytes / SLOT_BYTES,
        })
    }

    fn slot(&self, i: usize) -> &Slot {
        // SAFETY: i < n, inside the mapping, which lives as long as self; zeroed memory is a
        // valid Slot of atomics.
        unsafe { &*self.slots.add(i % self.n) }
    }

    /// The slot of `key`, claiming a free or abandoned one when it has none yet.
    fn find(&self, key: u64, now: u64, keep_until: u64) -> Option<usize> {
        let start = (key as usize) % self.n;
        for off in 0..PROBE {
            if self.slot(start + off).key.load(Ordering::Acquire) == key {
                return Some((start + off) % self.n);
            }
        }
        for off in 0..PROBE {
            let s = self.slot(start + off);
            let k = s.key.load(Ordering::Acquire);
            if k == key {
                return Some((start + off) % self.n); // another worker claimed it meanwhile
            }
            if k != 0 && s.expires.load(Ordering::Acquire) > now {
                continue;
            }
            match s
                .key
                .compare_exchange(k, key, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    s.due.store(0, Ordering::Release);
                    s.state.store(0, Ordering::Release);
                    s.expires.store(keep_until, Ordering::Release);
                    return Some((start + off) % self.n);
                }
                // Another worker claimed it first, for the same target: share it.
                Err(other) if other == key => return Some((start + off) % self.n),
                Err(_) => {}
            }
        }
        None
    }
}

/// Where one target's probe results live: a slot of the board, or this worker's own.
enum Place {
    Board(Arc<HealthBoard>, usize),
    Own(Box<Slot>),
}

impl Place {
    fn slot(&self) -> &Slot {
        match self {
            Place::Board(b, i) => b.slot(*i),
            Place::Own(s) => s,
        }
    }
}

/// A probe's settings, compiled.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    pub path: String,
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub statuses: StatusSet,
}

impl ProbeSettings {
    pub fn from_config(c: &ActiveHealthConfig) -> Self {
        ProbeSettings {
            path: c.path.clone(),
            host: c.host.clone(),
            interval: secs(c.interval).max(Duration::from_millis(10)),
            timeout: secs(c.timeout).max(Duration::from_millis(1)),
            healthy_threshold: c.healthy_threshold.clamp(1, 0xffff),
            unhealthy_threshold: c.unhealthy_threshold.clamp(1, 0xffff),
            statuses: StatusSet::from_ranges(&c.statuses),
        }
    }

    fn key(&self, address: &str) -> u64 {
        let id = format!(
            "{address}\n{}\n{:?}\n{}\n{}\n{:?}",
            self.path, self.host, self.healthy_threshold, self.unhealthy_threshold, self.statuses
        );
        hash64(id.as_bytes()).max(1)
    }
}

const UNHEALTHY: u64 = 1 << 63;

/// Apply one probe result to a slot state; returns the new state.
pub fn next_state(state: u64, ok: bool, s: &ProbeSettings) -> u64 {
    let oks = state & 0xffff;
    let fails = (state >> 16) & 0xffff;
    let (oks, fails) = if ok {
        ((oks + 1).min(0xffff), 0)
    } else {
        (0, (fails + 1).min(0xffff))
    };
    let mut unhealthy = state & UNHEALTHY != 0;
    if !unhealthy && fails >= s.unhealthy_threshold as u64 {
        unhealthy = true;
    } else if unhealthy && oks >= s.healthy_threshold as u64 {
        unhealthy = false;
    }
    (if unhealthy { UNHEALTHY } else { 0 }) | (fails << 16) | oks
}

/// Start the probe task of a target in this worker (once: a reload that keeps the target's
/// health keeps its task). The task ends when the target's health is dropped.
pub fn start(health: &Arc<TargetHealth>, board: Option<&Arc<HealthBoard>>) {
    let Some(cfg) = &health.config.active else {
        return;
    };
    if health.probing.swap(true, Ordering::AcqRel) {
        return;
    }
    let settings = ProbeSettings::from_config(cfg);
    // A target probed over TLS and the same address probed in plain HTTP are two probes.
    let key = match health.tls() {
        None => settings.key(&health.address),
        Some(_) => settings.key(&format!("https://{}", health.address)),
    };
    let keep = keep_for(&settings);
    let now = monotonic_ns();
    let place = board
        .and_then(|b| b.find(key, now, now + keep).map(|i| Place::Board(b.clone(), i)))
        .unwrap_or_else(|| Place::Own(Box::default()));
    tokio::spawn(run(Arc::downgrade(health), settings, place));
}

/// How long a slot stays claimed without anyone looking at it.
fn keep_for(s: &ProbeSettings) -> u64 {
    (3 * s.interval + s.timeout + Duration::from_secs(10)).as_nanos() as u64
}

async fn run(health: Weak<TargetHealth>, settings: ProbeSettings, place: Place) {
    let interval_ns = settings.interval.as_nanos() as u64;
    loop {
        let Some(h) = health.upgrade() else { return };
        let slot = place.slot();
        let now = monotonic_ns();
        slot.expires.store(now + keep_for(&settings), Ordering::Release);
        let due = slot.due.load(Ordering::Acquire);
        if due <= now
            && slot
                .due
                .compare_exchange(due, now + interval_ns, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let result = probe(&h.address, h.tls().as_deref(), &settings).await;
            let ok = matches!(result, Ok(s) if settings.statuses.contains(s));
            let mut old = slot.state.load(Ordering::Acquire);
            let new = loop {
                let new = next_state(old, ok, &settings);
                match slot
                    .state
                    .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => break new,
                    Err(cur) => old = cur,
                }
            };
            if (old ^ new) & UNHEALTHY != 0 {
                let healthy = new & UNHEALTHY == 0;
                log_event(
                    if healthy { "info" } else { "warn" },
                    if healthy { "target_up" } else { "target_down" },
                    serde_json::json!({
                        "upstream": h.upstream, "target": h.address, "reason": "active",
                        "probe": match &result {
                            Ok(status) => format!("status {status}"),
                            Err(e) => e.clone(),
                        },
                    }),
                );
            }
        }
        h.set_active_down(slot.state.load(Ordering::Acquire) & UNHEALTHY != 0);
        drop(h);
        // Wake when the next probe is due (a little after, so the prober's result is in).
        let now = monotonic_ns();
        let due = slot.due.load(Ordering::Acquire);
        let wait = due.saturating_sub(now).clamp(1_000_000, interval_ns) + jitter_ns();
        tokio::time::sleep(Duration::from_nanos(wait)).await;
    }
}

fn jitter_ns() -> u64 {
    crate::headers::next_u64() % 5_000_000
}

/// One probe: a GET on a fresh connection (over TLS with the target's settings); the
/// status, or why there is none.
async fn probe(address: &str, tls: Option<&TargetTls>, s: &ProbeSettings) -> Result<u16, String> {
    let exchange = async {
        let conn = crate::pool::connect(address, tls, s.timeout)
            .await
            .map_err(|e| match e {
                SendError::Connect(e) => format!("connect: {e}"),
                SendError::Tls(e) => format!("tls: {}", crate::upstream_tls::reason(&e)),
                SendError::ConnectTimeout => "connect: timed out".to_string(),
                SendError::Exchange(e) => e.to_string(),
            })?;
        let host = s.host.as_deref().unwrap_or(address);
        let req = Request::builder()
            .method(Method::GET)
            .uri(Uri::try_from(s.path.as_str()).map_err(|e| e.to_string())?)
            .header(
                header::HOST,
                HeaderValue::try_from(host).map_err(|e| e.to_string())?,
            )
            .header(header::USER_AGENT, "ferrogate-health-check")
            .header(header::CONNECTION, "close")
            .body(())
            .map_err(|e| e.to_string())?;
        let (parts, ()) = req.into_parts();
        let mut body = RequestBody::buffered(Bytes::new());
        let (resp, _, _) = conn
            .exchange(&parts, &mut body, None, Some(s.timeout), None)
            .await
            .map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(s.timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {:?}", s.timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ProbeSettings {
        ProbeSettings {
            path: "/health".into(),
            host: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            statuses: StatusSet::from_ranges(&vec![(200, 399)]),
        }
    }

    #[test]
    fn thresholds_give_hysteresis() {
        let s = settings();
        let mut st = 0;
        for ok in [false, false, true, false, false] {
            st = next_state(st, ok, &s);
            assert_eq!(st & UNHEALTHY, 0, "two failures in a row are not enough");
        }
        st = next_state(st, false, &s);
        assert_ne!(st & UNHEALTHY, 0, "three in a row are");
        st = next_state(st, true, &s);
        assert_ne!(st & UNHEALTHY, 0, "one success is not enough to come back");
        st = next_state(st, true, &s);
        assert_eq!(st & UNHEALTHY, 0);
    }

    #[test]
    fn workers_share_one_slot_per_probe_and_free_slots_are_reused() {
        let board = HealthBoard::anonymous(64).unwrap();
        let s = settings();
        let (k1, k2) = (s.key("127.0.0.1:1"), s.key("127.0.0.1:2"));
        let a = board.find(k1, 100, 1000).unwrap();
        assert_eq!(
            board.find(k1, 200, 1000),
            Some(a),
            "the same probe finds the same slot"
        );
        let b = board.find(k2, 200, 1000).unwrap();
        assert_ne!(a, b);
        // After k1's slot expired, another probe hashing nearby may take it.
        let mut other = settings();
        other.path = "/other".into();
        let k3 = (0..10_000)
            .map(|i| {
                other.path = format!("/p{i}");
                other.key("127.0.0.1:1")
            })
            .find(|k| (*k as usize) % 64 == a)
            .unwrap();
        assert_eq!(board.find(k3, 2000, 3000), Some(a));
    }

    #[test]
    fn a_full_neighbourhood_gives_no_slot() {
        let board = HealthBoard::anonymous(PROBE).unwrap();
        for k in 1..=PROBE as u64 {
            assert!(board.find(k, 0, u64::MAX).is_some());
        }
        assert_eq!(board.find(999, 0, u64::MAX), None);
    }
}
