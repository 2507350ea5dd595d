//! Rate limits that mean the same thing whatever the number of workers: every worker of a
//! node draws from one table in shared memory (created by the master, mapped by each
//! worker), so "10 per second" is 10 per second for the node, never 10 x workers.
//!
//! Each limit is GCRA (the generic cell rate algorithm, a token bucket kept as one number):
//! a key's slot holds its *theoretical arrival time*; a request is allowed when that time,
//! pushed one emission interval further, is within the burst tolerance of now. One
//! compare-and-swap per check, no locks, nothing to refill.
//!
//! The table is open addressing over `(key, tat)` slots with a short probe. A slot whose
//! bucket is full again (tat <= now) holds no information and is reused for a new key, so
//! the table never needs a sweep; if every probed slot is busy the check fails open (and is
//! counted), which only happens when far more keys are active than the table has slots.

use crate::shm::Mapping;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots probed for a key before giving up (a cache line holds four).
const PROBE: usize = 16;

#[repr(C)]
pub(crate) struct Slot {
    key: AtomicU64,
    /// A limit's theoretical arrival time; other users of a table keep their own value here.
    pub(crate) tat: AtomicU64,
}

pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// The node-wide table of buckets.
pub struct SharedTable {
    /// Keeps `slots` mapped.
    _map: Mapping,
    slots: *const Slot,
    mask: usize,
    /// Checks that found no slot and were allowed.
    pub overflows: AtomicU64,
}

// SAFETY: every access to the mapped slots goes through atomics.
unsafe impl Send for SharedTable {}
unsafe impl Sync for SharedTable {}

/// The outcome of one check against one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Requests left right now (after this one, when allowed).
    pub remaining: u64,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
    /// When refused: nanoseconds until one request would be allowed.
    pub retry_after_ns: u64,
}

impl SharedTable {
    /// Map `len_bytes` at `offset` (page-aligned) of the shared memory behind `fd` (a memfd
    /// the master created).
    pub fn from_fd(fd: RawFd, len_bytes: usize, offset: usize) -> io::Result<SharedTable> {
        Self::valid(len_bytes)?;
        Self::over(Mapping::shared(fd, len_bytes, offset)?, len_bytes)
    }

    /// A table private to this process's threads (tests, single-process use).
    pub fn anonymous(slots: usize) -> io::Result<SharedTable> {
        Self::valid(slots * SLOT_BYTES)?;
        Self::over(Mapping::anonymous(slots * SLOT_BYTES)?, slots * SLOT_BYTES)
    }

    fn valid(len_bytes: usize) -> io::Result<()> {
        let slots = len_bytes / SLOT_BYTES;
        if slots < PROBE || !slots.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the rate limit table needs a power-of-two number of slots >= {PROBE}, got {slots}"),
            ));
        }
        Ok(())
    }

    fn over(map: Mapping, len_bytes: usize) -> io::Result<SharedTable> {
        Ok(SharedTable {
            slots: map.ptr() as *const Slot,
            _map: map,
            mask: len_bytes / SLOT_BYTES - 1,
            overflows: AtomicU64::new(0),
        })
    }

    pub fn slots(&self) -> usize {
        self.mask + 1
    }

    fn slot(&self, i: usize) -> &Slot {
        // SAFETY: `i & mask` is within the mapping, which lives as long as `self`.
        unsafe { &*self.slots.add(i & self.mask) }
    }

    /// The value of `key`'s slot, if it has one (nothing is claimed).
    pub(crate) fn peek(&self, key: u64) -> Option<u64> {
        let start = (key as usize).wrapping_mul(0x9E37_79B9) ^ (key >> 32) as usize;
        (0..PROBE)
            .map(|i| self.slot(start + i))
            .find(|s| s.key.load(Ordering::Acquire) == key)
            .map(|s| s.tat.load(Ordering::Acquire))
    }

    /// The slot of `key`, claiming an empty one, or else one whose value `idle` says holds
    /// nothing worth keeping, if the key has none.
    pub(crate) fn find(&self, key: u64, idle: impl Fn(u64) -> bool) -> Option<&Slot> {
        let start = (key as usize).wrapping_mul(0x9E37_79B9) ^ (key >> 32) as usize;
        for i in 0..PROBE {
            let s = self.slot(start + i);
            let k = s.key.load(Ordering::Acquire);
            if k == key {
                return Some(s);
            }
            if k == 0 {
                match s
                    .key
                    .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return Some(s),
                    Err(other) if other == key => return Some(s),
                    Err(_) => continue,
                }
            }
        }
        // No free slot: take over one whose bucket is full again (it remembers nothing).
        for i in 0..PROBE {
            let s = self.slot(start + i);
            let k = s.key.load(Ordering::Acquire);
            if k == key {
                return Some(s);
            }
            if idle(s.tat.load(Ordering::Acquire))
                && s.key
                    .compare_exchange(k, key, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(s);
            }
        }
        None
    }

    /// Count one request for `key` under a limit of one request per `interval_ns`, with
    /// `burst` requests allowed at once. `now` is CLOCK_MONOTONIC in ns (shared by every
    /// process of the machine).
    pub fn check(&self, key: u64, now: u64, interval_ns: u64, burst: u64) -> Verdict {
        let key = key.max(1); // 0 marks an empty slot
        let tolerance = interval_ns.saturating_mul(burst);
        // A bucket that is full again (tat <= now) remembers nothing.
        let Some(slot) = self.find(key, |tat| tat <= now) else {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return Verdict {
                allowed: true,
                remaining: burst.saturating_sub(1),
                reset_ns: interval_ns,
                retry_after_ns: 0,
            };
        };
        let mut tat = slot.tat.load(Ordering::Acquire);
        loop {
            let new_tat = tat.max(now) + interval_ns;
            let ahead = new_tat - now;
            if ahead > tolerance {
                let waited = tat.max(now) - now;
                return Verdict {
                    allowed: false,
                    remaining: 0,
                    reset_ns: waited,
                    retry_after_ns: ahead - tolerance,
                };
            }
            match slot
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Verdict {
                        allowed: true,
                        remaining: (tolerance - ahead) / interval_ns.max(1),
                        reset_ns: ahead,
                        retry_after_ns: 0,
                    }
                }
                Err(current) => tat = current,
            }
        }
    }
}

impl SharedTable {
    /// Count one request for `key` in fixed window `window` (a day, a month) of at most
    /// `limit` requests; returns whether it is allowed and the count after it. A slot
    /// holds `window << 32 | count`; a slot of an older window holds nothing worth keeping.
    pub fn count_window(&self, key: u64, window: u32, limit: u64) -> (bool, u64) {
        let key = key.max(1);
        let current = |v: u64| (v >> 32) as u32 == window;
        let Some(slot) = self.find(key, |v| !current(v)) else {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return (true, 0);
        };
        let mut v = slot.tat.load(Ordering::Acquire);
        loop {
            let used = if current(v) { v & 0xffff_ffff } else { 0 };
            if used >= limit {
                return (false, used);
            }
            let next = (u64::from(window) << 32) | (used + 1).min(0xffff_ffff);
            match slot
                .tat
                .compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return (true, used + 1),
                Err(now) => v = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn allows_the_burst_then_one_per_interval() {
        let t = SharedTable::anonymous(1024).unwrap();
        let now = 1_000 * SEC;
        let interval = SEC / 10; // 10 per second
        let allowed = (0..15).filter(|_| t.check(7, now, interval, 10).allowed).count();
        assert_eq!(allowed, 10);
        let refused = t.check(7, now, interval, 10);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after_ns, interval);
        // 100 ms later exactly one more
        assert!(t.check(7, now + interval, interval, 10).allowed);
        assert!(!t.check(7, now + interval, interval, 10).allowed);
        // other keys are independent
        assert!(t.check(8, now, interval, 10).allowed);
    }

    #[test]
    fn remaining_and_reset_count_down() {
        let t = SharedTable::anonymous(64).unwrap();
        let now = 5 * SEC;
        let first = t.check(1, now, SEC, 3);
        assert_eq!((first.allowed, first.remaining, first.reset_ns), (true, 2, SEC));
        let second = t.check(1, now, SEC, 3);
        assert_eq!((second.remaining, second.reset_ns), (1, 2 * SEC));
        // after a full refill the bucket is as new
        let later = t.check(1, now + 10 * SEC, SEC, 3);
        assert_eq!((later.remaining, later.reset_ns), (2, SEC));
    }

    #[test]
    fn idle_slots_are_reused_and_a_full_table_fails_open() {
        let t = SharedTable::anonymous(PROBE).unwrap();
        let now = 100 * SEC;
        for key in 1..=(PROBE as u64) {
            assert!(t.check(key, now, SEC, 1).allowed);
        }
        // every slot busy (each bucket empty until now + 1 s): a new key fails open
        assert!(t.check(999, now, SEC, 1).allowed);
        assert_eq!(t.overflows.load(Ordering::Relaxed), 1);
        // once buckets are full again their slots take new keys, which count normally
        let later = now + 2 * SEC;
        assert!(t.check(999, later, SEC, 1).allowed);
        assert!(!t.check(999, later, SEC, 1).allowed);
        assert_eq!(t.overflows.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn window_counts_roll_over_with_the_window() {
        let t = SharedTable::anonymous(64).unwrap();
        assert_eq!(t.count_window(5, 100, 2), (true, 1));
        assert_eq!(t.count_window(5, 100, 2), (true, 2));
        assert_eq!(t.count_window(5, 100, 2), (false, 2));
        assert_eq!(t.count_window(5, 101, 2), (true, 1));
    }

    #[test]
    fn threads_sharing_a_table_never_exceed_the_limit() {
        let t = std::sync::Arc::new(SharedTable::anonymous(1024).unwrap());
        let now = 50 * SEC;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || (0..1000).filter(|_| t.check(42, now, SEC, 100).allowed).count())
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 100);
    }
}
