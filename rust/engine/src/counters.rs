//! Counters for plugins that mean the same for every worker of a node: GCRA rate buckets
//! with fractional costs, and integer budgets per window (a day, a month), in shared
//! memory like the gateway's own rate limits (`ratelimit.rs`).
//!
//! The master's memfd holds, after the rate limit and quota tables, a region for these
//! ([`REGION_BYTES`]): a rate table, then a budget table, each [`SLOTS`] slots. A worker maps
//! it when the memfd is that large ([`install_from_fd`]); otherwise (no master, tests) the
//! process counts alone in private tables made on first use.
//!
//! Keys are hashed in a namespace of their own, so a plugin's key never lands on a slot of
//! the gateway's limits.

use crate::limiter::{hash_parts, hash_str};
use crate::ratelimit::SharedTable;
use crate::shm::monotonic_ns;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

/// Slots of each table (a power of two).
pub const SLOTS: usize = 1 << 15;
/// Bytes of the region after the rate limit and quota tables: the two tables.
pub const REGION_BYTES: usize = 2 * SLOTS * crate::ratelimit::SLOT_BYTES;

struct Tables {
    rate: SharedTable,
    budget: SharedTable,
}

static TABLES: OnceLock<Tables> = OnceLock::new();

fn tables() -> &'static Tables {
    TABLES.get_or_init(|| Tables {
        rate: SharedTable::anonymous(SLOTS).expect("cannot allocate the counter tables"),
        budget: SharedTable::anonymous(SLOTS).expect("cannot allocate the counter tables"),
    })
}

/// Map the node's counter region at `offset` (page-aligned) of the memfd `fd`, if the memfd
/// reaches that far; returns whether it did. Called once by a worker, before any plugin runs.
pub fn install_from_fd(fd: RawFd, offset: usize) -> std::io::Result<bool> {
    // SAFETY: fstat fills the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Touching a page past the end of a memfd is SIGBUS: map only a region that exists.
    if (st.st_size as u64) < (offset + REGION_BYTES) as u64 {
        return Ok(false);
    }
    let half = REGION_BYTES / 2;
    let tables = Tables {
        rate: SharedTable::from_fd(fd, half, offset)?,
        budget: SharedTable::from_fd(fd, half, offset + half)?,
    };
    Ok(TABLES.set(tables).is_ok())
}

fn rate_key(key: &str) -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    hash_parts(*SEED.get_or_init(|| hash_str("plugin-rate")), &[key.as_bytes()])
}

fn budget_key(key: &str) -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    hash_parts(*SEED.get_or_init(|| hash_str("plugin-budget")), &[key.as_bytes()])
}

/// Nanoseconds of one unit at `per_second` (at least 1).
fn interval_ns(per_second: f64) -> f64 {
    if per_second > 0.0 && per_second.is_finite() {
        (1e9 / per_second).max(1.0)
    } else {
        f64::from(u32::MAX) * 1e9
    }
}

/// Take `cost` units from the bucket of `key` (`per_second` refill, `burst` capacity):
/// 0.0 when allowed (and charged), else the seconds until it would be (nothing charged).
pub fn rate_take(key: &str, per_second: f64, burst: f64, cost: f64) -> f64 {
    take(
        &tables().rate,
        rate_key(key),
        monotonic_ns(),
        per_second,
        burst,
        cost,
    )
}

/// Charge (`delta` > 0) or refund (`delta` < 0) units without a check.
pub fn rate_adjust(key: &str, per_second: f64, delta: f64) {
    adjust(&tables().rate, rate_key(key), monotonic_ns(), per_second, delta)
}

fn take(table: &SharedTable, key: u64, now: u64, per_second: f64, burst: f64, cost: f64) -> f64 {
    let interval = interval_ns(per_second);
    let tolerance = (interval * burst.max(0.0)) as u64;
    let cost_ns = (interval * cost.max(0.0)) as u64;
    // A bucket that is full again (tat <= now) remembers nothing.
    let Some(slot) = table.find(key.max(1), |tat| tat <= now) else {
        table.overflows.fetch_add(1, Ordering::Relaxed);
        return 0.0;
    };
    let mut tat = slot.tat.load(Ordering::Acquire);
    loop {
        let new_tat = tat.max(now).saturating_add(cost_ns);
        let ahead = new_tat - now;
        if ahead > tolerance {
            return (ahead - tolerance) as f64 / 1e9;
        }
        match slot
            .tat
            .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return 0.0,
            Err(current) => tat = current,
        }
    }
}

fn adjust(table: &SharedTable, key: u64, now: u64, per_second: f64, delta: f64) {
    let interval = interval_ns(per_second);
    let amount = (interval * delta.abs()) as u64;
    let Some(slot) = table.find(key.max(1), |tat| tat <= now) else {
        table.overflows.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut tat = slot.tat.load(Ordering::Acquire);
    loop {
        let base = tat.max(now);
        // A refund never fills the bucket past full (now).
        let new_tat = if delta >= 0.0 {
            base.saturating_add(amount)
        } else {
            base.saturating_sub(amount).max(now)
        };
        match slot
            .tat
            .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return,
            Err(current) => tat = current,
        }
    }
}

/// A budget slot holds the window's low 16 bits over a 48-bit total: plenty for
/// micro-dollars (2.8e14), and a window number repeats only after 65536 periods.
const USED_BITS: u32 = 48;
const USED_MASK: u64 = (1 << USED_BITS) - 1;

fn window_tag(window: i64) -> u64 {
    (window as u64) & 0xffff
}

fn used_in(v: u64, window: i64) -> u64 {
    if v >> USED_BITS == window_tag(window) {
        v & USED_MASK
    } else {
        0
    }
}

fn budget_slot<'t>(table: &'t SharedTable, key: &str, window: i64) -> Option<&'t crate::ratelimit::Slot> {
    let tag = window_tag(window);
    // A slot of another window, or one that never counted anything, holds nothing to keep.
    let slot = table.find(budget_key(key).max(1), |v| {
        v >> USED_BITS != tag || v & USED_MASK == 0
    });
    if slot.is_none() {
        table.overflows.fetch_add(1, Ordering::Relaxed);
    }
    slot
}

/// Add `amount` to `key`'s total in `window` if it stays within `limit`: the new total,
/// else -1 (nothing added).
pub fn budget_reserve(key: &str, window: i64, amount: u64, limit: u64) -> i64 {
    let Some(slot) = budget_slot(&tables().budget, key, window) else {
        return 0; // fails open, like the gateway's limits
    };
    let mut v = slot.tat.load(Ordering::Acquire);
    loop {
        let used = used_in(v, window);
        let total = used.saturating_add(amount);
        if total > limit || total > USED_MASK {
            return -1;
        }
        let next = window_tag(window) << USED_BITS | total;
        match slot
            .tat
            .compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return total as i64,
            Err(now) => v = now,
        }
    }
}

/// Add `delta` (which may be negative) to `key`'s total in `window`, never below 0;
/// returns the new total.
pub fn budget_adjust(key: &str, window: i64, delta: i64) -> i64 {
    let Some(slot) = budget_slot(&tables().budget, key, window) else {
        return 0;
    };
    let mut v = slot.tat.load(Ordering::Acquire);
    loop {
        let used = used_in(v, window);
        let total = if delta >= 0 {
            used.saturating_add(delta as u64).min(USED_MASK)
        } else {
            used.saturating_sub(delta.unsigned_abs())
        };
        let next = window_tag(window) << USED_BITS | total;
        match slot
            .tat
            .compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return total as i64,
            Err(now) => v = now,
        }
    }
}

/// `key`'s total in `window`.
pub fn budget_used(key: &str, window: i64) -> i64 {
    let table = &tables().budget;
    let key = budget_key(key).max(1);
    table.peek(key).map_or(0, |v| used_in(v, window) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn costs_draw_from_the_burst_and_refunds_give_back() {
        let t = SharedTable::anonymous(1024).unwrap();
        let now = 100 * SEC;
        // 10 per second, burst 10: a cost of 6 then 4 fit, the next unit waits 0.1 s
        assert_eq!(take(&t, 1, now, 10.0, 10.0, 6.0), 0.0);
        assert_eq!(take(&t, 1, now, 10.0, 10.0, 4.0), 0.0);
        let wait = take(&t, 1, now, 10.0, 10.0, 1.0);
        assert!((wait - 0.1).abs() < 1e-6, "{wait}");
        // a refund of 3 lets 3 more through; a charge takes them again
        adjust(&t, 1, now, 10.0, -3.0);
        assert_eq!(take(&t, 1, now, 10.0, 10.0, 3.0), 0.0);
        adjust(&t, 1, now, 10.0, 2.0);
        let wait = take(&t, 1, now, 10.0, 10.0, 1.0);
        assert!((wait - 0.3).abs() < 1e-6, "{wait}");
        // a cost above the burst is never allowed, and refused costs are not charged
        assert!(take(&t, 2, now, 10.0, 10.0, 11.0) > 0.0);
        assert_eq!(take(&t, 2, now, 10.0, 10.0, 10.0), 0.0);
    }

    #[test]
    fn budgets_reserve_within_the_limit_and_start_over_in_a_new_window() {
        assert_eq!(budget_reserve("team-a", 20_000, 700, 1_000), 700);
        assert_eq!(budget_reserve("team-a", 20_000, 400, 1_000), -1);
        assert_eq!(budget_used("team-a", 20_000), 700);
        assert_eq!(budget_adjust("team-a", 20_000, -200), 500);
        assert_eq!(budget_reserve("team-a", 20_000, 500, 1_000), 1_000);
        assert_eq!(budget_adjust("team-a", 20_000, -5_000), 0);
        // the next day starts from nothing; amounts above 32 bits are kept whole
        assert_eq!(budget_used("team-a", 20_001), 0);
        assert_eq!(
            budget_reserve("team-a", 20_001, 5_000_000_000, 1 << 40),
            5_000_000_000
        );
        assert_eq!(budget_used("team-a", 20_000), 0);
        assert_eq!(budget_used("team-b", 20_001), 0);
    }

    #[test]
    fn parallel_reservations_never_exceed_the_limit() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..1000)
                        .filter(|_| budget_reserve("race", 7, 3, 300) >= 0)
                        .count()
                })
            })
            .collect();
        let granted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(granted, 100);
        assert_eq!(budget_used("race", 7), 300);
    }
}
