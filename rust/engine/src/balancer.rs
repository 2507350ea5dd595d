//! Choosing a target of an upstream: smooth weighted round robin, least connections, and
//! consistent hashing. State is per worker; counters are atomics so the balancer can be
//! shared by every connection task of the worker.

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

    /// Pick a target index. `inflight[i] / weights[i]` drives least-connections; `key`
    /// drives hashing (without a key, hashing falls back to round robin).
    pub fn pick(&self, weights: &[u32], inflight: &dyn Fn(usize) -> usize, key: HashKey<'_>) -> usize {
        match self {
            Balancer::RoundRobin(rr) => rr.next(),
            Balancer::LeastConn { tie_break } => least_conn(weights, inflight, tie_break),
            Balancer::Hash { ring, fallback, .. } => match key {
                Some(k) => ring.get(hash64(k)),
                None => fallback.next(),
            },
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

fn least_conn(weights: &[u32], inflight: &dyn Fn(usize) -> usize, tie_break: &AtomicUsize) -> usize {
    let n = weights.len();
    // Rotate the starting point so equal loads spread instead of piling on target 0.
    let start = tie_break.fetch_add(1, Ordering::Relaxed) % n;
    let mut best = start;
    let mut best_load = (inflight(start) as u64, weights[start].max(1) as u64);
    for off in 1..n {
        let i = (start + off) % n;
        let load = (inflight(i) as u64, weights[i].max(1) as u64);
        // a/b < c/d  <=>  a*d < c*b
        if load.0 * best_load.1 < best_load.0 * load.1 {
            best = i;
            best_load = load;
        }
    }
    best
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
        total: i64,
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
            total: weights.iter().sum(),
            current: Mutex::new(vec![0; weights.len()]),
            weights,
        }
    }

    pub fn next(&self) -> usize {
        match self {
            RoundRobin::Equal { n, next } => next.fetch_add(1, Ordering::Relaxed) % n,
            RoundRobin::Weighted {
                weights,
                total,
                current,
            } => {
                let mut cur = current.lock().unwrap_or_else(|e| e.into_inner());
                let mut best = 0;
                for (i, w) in weights.iter().enumerate() {
                    cur[i] += w;
                    if cur[i] > cur[best] {
                        best = i;
                    }
                }
                cur[best] -= total;
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

    pub fn get(&self, h: u64) -> usize {
        let idx = self.points.partition_point(|&(p, _)| p < h);
        self.points[if idx == self.points.len() { 0 } else { idx }].1
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

    fn counts(b: &Balancer, weights: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; weights.len()];
        for _ in 0..n {
            c[b.pick(weights, &|_| 0, None)] += 1;
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
        let seq: Vec<usize> = (0..7).map(|_| b.pick(&w, &|_| 0, None)).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&b, &w, 700), vec![500, 100, 100]);
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_relative_to_weight() {
        let w = [1, 1, 1];
        let b = Balancer::new(Balance::LeastConn, &w, None);
        let load = [5usize, 0, 3];
        for _ in 0..10 {
            assert_eq!(b.pick(&w, &|i| load[i], None), 1);
        }
        let w = [1, 4];
        let load = [1usize, 3]; // 1/1 > 3/4
        assert_eq!(b.pick(&w, &|i| load[i], None), 1);
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
            let first = b.pick(&w, &|_| 0, Some(key.as_bytes()));
            assert_eq!(first, b.pick(&w, &|_| 0, Some(key.as_bytes())));
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
            let a = four.get(h);
            if a != 3 && three.get(h) != a {
                moved += 1;
            }
        }
        assert_eq!(moved, 0);
    }
}
