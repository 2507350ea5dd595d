//! Choosing a target of an upstream: smooth weighted round robin, least connections, and
//! consistent hashing. State is per worker; counters are atomics so the balancer can be
//! shared by every connection task of the worker.
//!
//! Every balancer takes a `usable` predicate and only returns targets it accepts (targets
//! that are down, open or already tried leave rotation): round robin draws again, least
//! connections leaves them out of the comparison, and the hash ring walks on to the next
//! usable target clockwise, so a key moves only while its own target is out, and every
//! worker moves it to the same place.

use crate::config::{Balance, HashSource};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What the hash balancer keys on, extracted from the request by the caller.
pub type HashKey<'a> = Option<&'a [u8]>;

#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastConn {
        tie_break: AtomicUsize,
    },
    Hash {
        ring: Ring,
        source: HashSource,
        name: Option<String>,
        fallback: RoundRobin,
    },
}

impl Balancer {
    pub fn new(kind: Balance, weights: &[u32], source: Option<(HashSource, Option<String>)>) -> Self {
        match kind {
            Balance::RoundRobin => Balancer::RoundRobin(RoundRobin::new(weights)),
            Balance::LeastConn => Balancer::LeastConn {
                tie_break: AtomicUsize::new(0),
            },
            Balance::Hash => {
                let (source, name) = source.unwrap_or((HashSource::Ip, None));
                Balancer::Hash {
                    ring: Ring::new(weights),
                    source,
                    name,
                    fallback: RoundRobin::new(weights),
                }
            }
        }
    }

    /// Pick a target index among those `usable` accepts; None when it accepts none.
    /// `inflight[i] / weights[i]` drives least-connections; `key` drives hashing (without a
    /// key, hashing falls back to round robin).
    pub fn pick(
        &self,
        weights: &[u32],
        inflight: &dyn Fn(usize) -> usize,
        key: HashKey<'_>,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.next(usable),
            Balancer::LeastConn { tie_break } => least_conn(weights, inflight, tie_break, usable),
            Balancer::Hash { ring, fallback, .. } => match key {
                Some(k) => ring.get(hash64(k), usable),
                None => fallback.next(usable),
            },
        }
    }

    /// Pick a target for a retry, after `last` failed: like [`pick`], but round robin takes
    /// the next usable target after `last` instead of drawing from its shared rotation,
    /// which a retry would shift (the failing target would then get every first attempt).
    ///
    /// [`pick`]: Balancer::pick
    pub fn pick_again(
        &self,
        weights: &[u32],
        inflight: &dyn Fn(usize) -> usize,
        key: HashKey<'_>,
        usable: &dyn Fn(usize) -> bool,
        last: usize,
    ) -> Option<usize> {
        let n = weights.len();
        let after = || (1..=n).map(|off| (last + off) % n).find(|&i| usable(i));
        match self {
            Balancer::RoundRobin(_) => after(),
            Balancer::Hash { .. } if key.is_none() => after(),
            _ => self.pick(weights, inflight, key, usable),
        }
    }

    /// Which request attribute the hash balancer needs, if any.
    pub fn hash_source(&self) -> Option<(HashSource, Option<&str>)> {
        match self {
            Balancer::Hash { source, name, .. } => Some((*source, name.as_deref())),
            _ => None,
        }
    }
}

fn least_conn(
    weights: &[u32],
    inflight: &dyn Fn(usize) -> usize,
    tie_break: &AtomicUsize,
    usable: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let n = weights.len();
    // Rotate the starting point so equal loads spread instead of piling on target 0.
    let start = tie_break.fetch_add(1, Ordering::Relaxed) % n;
    let mut best: Option<(usize, (u64, u64))> = None;
    for off in 0..n {
        let i = (start + off) % n;
        if !usable(i) {
            continue;
        }
        let load = (inflight(i) as u64, weights[i].max(1) as u64);
        // a/b < c/d  <=>  a*d < c*b
        match best {
            Some((_, b)) if load.0 * b.1 >= b.0 * load.1 => {}
            _ => best = Some((i, load)),
        }
    }
    best.map(|(i, _)| i)
}

/// Smooth weighted round robin (the nginx algorithm): with weights 5,1,1 the order is
/// a a b a c a a, not a a a a a b c. Equal weights take a lock-free counter.
#[derive(Debug)]
pub enum RoundRobin {
    Equal {
        n: usize,
        next: AtomicUsize,
    },
    Weighted {
        weights: Vec<i64>,
        current: Mutex<Vec<i64>>,
    },
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        let n = weights.len().max(1);
        if weights.windows(2).all(|w| w[0] == w[1]) {
            return RoundRobin::Equal {
                n,
                next: AtomicUsize::new(0),
            };
        }
        let weights: Vec<i64> = weights.iter().map(|&w| w.max(1) as i64).collect();
        RoundRobin::Weighted {
            current: Mutex::new(vec![0; weights.len()]),
            weights,
        }
    }

    /// The next usable target. Equal weights draw again from the shared counter, so the
    /// targets left share the load evenly (skipping to the neighbour would double its
    /// share); weighted ones run the smooth algorithm over the usable targets only, as nginx
    /// does.
    pub fn next(&self, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        match self {
            RoundRobin::Equal { n, next } => (0..*n)
                .map(|_| next.fetch_add(1, Ordering::Relaxed) % n)
                .find(|&i| usable(i)),
            RoundRobin::Weighted { weights, current, .. } => {
                let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
                let mut best: Option<usize> = None;
                let mut total = 0;
                for (i, w) in weights.iter().enumerate() {
                    if !usable(i) {
                        continue;
                    }
                    cur[i] += w;
                    total += w;
                    match best {
                        Some(b) if cur[i] <= cur[b] => {}
                        _ => best = Some(i),
                    }
                }
                if let Some(b) = best {
                    cur[b] -= total;
                }
                best
            }
        }
    }
}

/// A consistent-hash ring with virtual nodes proportional to weight, so removing a target
/// moves only that target's keys. Hashes are fixed (no random seed) so every worker and
/// every node maps a key to the same target.
#[derive(Debug)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

const POINTS_PER_WEIGHT: u32 = 160;

impl Ring {
    pub fn new(weights: &[u32]) -> Self {
        let mut points = Vec::new();
        for (i, &w) in weights.iter().enumerate() {
            for v in 0..w.max(1) * POINTS_PER_WEIGHT {
                let mut key = [0u8; 8];
                key[..4].copy_from_slice(&(i as u32).to_le_bytes());
                key[4..].copy_from_slice(&v.to_le_bytes());
                points.push((hash64(&key), i));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The first usable target clockwise from `h`.
    pub fn get(&self, h: u64, usable: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        let start = self.points.partition_point(|&(p, _)| p < h);
        let mut refused = usize::MAX; // remember the last refusal: points repeat targets
        for off in 0..n {
            let t = self.points[(start + off) % n].1;
            if t == refused {
                continue;
            }
            if usable(t) {
                return Some(t);
            }
            refused = t;
        }
        None
    }
}

/// FNV-1a followed by a 64-bit finalizer (from SplitMix64) so nearby keys spread over
/// the whole ring.
pub fn hash64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d049bb133111eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &dyn Fn(usize) -> bool = &|_| true;

    fn pick(b: &Balancer, w: &[u32], load: &dyn Fn(usize) -> usize, key: HashKey<'_>) -> usize {
        b.pick(w, load, key, ALL).unwrap()
    }

    fn counts(b: &Balancer, weights: &[u32], n: usize) -> Vec<usize> {
        counts_usable(b, weights, n, ALL)
    }

    fn counts_usable(b: &Balancer, weights: &[u32], n: usize, usable: &dyn Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; weights.len()];
        for _ in 0..n {
            c[b.pick(weights, &|_| 0, None, usable).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_splits_evenly() {
        let w = [1, 1, 1];
        assert_eq!(
            counts(&Balancer::new(Balance::RoundRobin, &w, None), &w, 300),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn weighted_round_robin_is_proportional_and_smooth() {
        let w = [5, 1, 1];
        let b = Balancer::new(Balance::RoundRobin, &w, None);
        let seq: Vec<usize> = (0..7).map(|_| pick(&b, &w, &|_| 0, None)).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&b, &w, 700), vec![500, 100, 100]);
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_relative_to_weight() {
        let w = [1, 1, 1];
        let b = Balancer::new(Balance::LeastConn, &w, None);
        let load = [5usize, 0, 3];
        for _ in 0..10 {
            assert_eq!(pick(&b, &w, &|i| load[i], None), 1);
        }
        let w = [1, 4];
        let load = [1usize, 3]; // 1/1 > 3/4
        assert_eq!(pick(&b, &w, &|i| load[i], None), 1);
    }

    #[test]
    fn least_conn_spreads_ties() {
        let w = [1, 1];
        let b = Balancer::new(Balance::LeastConn, &w, None);
        let c = counts(&b, &w, 100);
        assert_eq!(c, vec![50, 50]);
    }

    #[test]
    fn hash_is_sticky_and_spreads() {
        let w = [1, 1, 1, 1];
        let b = Balancer::new(
            Balance::Hash,
            &w,
            Some((HashSource::Header, Some("x-user".into()))),
        );
        let mut seen = vec![0; 4];
        for u in 0..2000 {
            let key = format!("user-{u}");
            let first = pick(&b, &w, &|_| 0, Some(key.as_bytes()));
            assert_eq!(first, pick(&b, &w, &|_| 0, Some(key.as_bytes())));
            seen[first] += 1;
        }
        assert!(seen.iter().all(|&c| c > 350 && c < 650), "{seen:?}");
    }

    #[test]
    fn hash_ring_moves_only_the_removed_targets_keys() {
        let four = Ring::new(&[1, 1, 1, 1]);
        let three = Ring::new(&[1, 1, 1]);
        let mut moved = 0;
        for u in 0..4000u32 {
            let h = hash64(&u.to_le_bytes());
            let a = four.get(h, ALL).unwrap();
            if a != 3 && three.get(h, ALL).unwrap() != a {
                moved += 1;
            }
        }
        assert_eq!(moved, 0);
    }

    #[test]
    fn round_robin_skips_down_targets_and_spreads_over_the_rest() {
        let w = [1, 1, 1];
        let b = Balancer::new(Balance::RoundRobin, &w, None);
        assert_eq!(counts_usable(&b, &w, 300, &|i| i != 2), vec![150, 150, 0]);
        assert_eq!(b.pick(&w, &|_| 0, None, &|_| false), None);
    }

    #[test]
    fn weighted_round_robin_skips_down_targets_keeping_proportions() {
        let w = [5, 1, 1];
        let b = Balancer::new(Balance::RoundRobin, &w, None);
        assert_eq!(counts_usable(&b, &w, 600, &|i| i != 0), vec![0, 300, 300]);
        assert_eq!(counts_usable(&b, &w, 600, &|i| i != 2), vec![500, 100, 0]);
        assert_eq!(b.pick(&w, &|_| 0, None, &|_| false), None);
    }

    #[test]
    fn a_retry_does_not_shift_the_rotation() {
        let w = [1, 1];
        let b = Balancer::new(Balance::RoundRobin, &w, None);
        let mut first = vec![0; 2];
        for _ in 0..10 {
            let i = pick(&b, &w, &|_| 0, None);
            first[i] += 1;
            if i == 0 {
                // target 0 fails: the retry goes to the next one, outside the rotation
                assert_eq!(b.pick_again(&w, &|_| 0, None, &|j| j != 0, 0), Some(1));
            }
        }
        assert_eq!(first, vec![5, 5]);
    }

    #[test]
    fn least_conn_skips_down_targets() {
        let w = [1, 1, 1];
        let b = Balancer::new(Balance::LeastConn, &w, None);
        let load = [5usize, 0, 3];
        for _ in 0..10 {
            assert_eq!(b.pick(&w, &|i| load[i], None, &|i| i != 1), Some(2));
        }
        assert_eq!(b.pick(&w, &|i| load[i], None, &|_| false), None);
    }

    #[test]
    fn hash_skips_down_targets_deterministically_and_moves_only_their_keys() {
        let w = [1, 1, 1, 1];
        let b = Balancer::new(Balance::Hash, &w, Some((HashSource::Header, Some("x".into()))));
        let all: Vec<usize> = (0..2000u32)
            .map(|u| pick(&b, &w, &|_| 0, Some(&u.to_le_bytes())))
            .collect();
        let without_1 = |i: usize| i != 1;
        let mut moved_to = vec![0; 4];
        for u in 0..2000u32 {
            let key = u.to_le_bytes();
            let now = b.pick(&w, &|_| 0, Some(&key), &without_1).unwrap();
            assert_eq!(now, b.pick(&w, &|_| 0, Some(&key), &without_1).unwrap());
            if all[u as usize] == 1 {
                moved_to[now] += 1;
            } else {
                assert_eq!(now, all[u as usize], "a key of a healthy target moved");
            }
        }
        // the keys of the down target spread over the others, not onto one neighbour
        assert_eq!(moved_to[1], 0);
        assert!(moved_to.iter().filter(|&&c| c > 0).count() == 3, "{moved_to:?}");
        assert_eq!(b.pick(&w, &|_| 0, Some(b"k"), &|_| false), None);
    }
}
