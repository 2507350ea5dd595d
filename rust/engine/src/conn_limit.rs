//! Open connections per client address (`limits.max_connections_per_ip`), against clients
//! that hold many connections open (slowloris). Counted per worker: a node of N workers
//! lets one address hold up to N times the limit. Peers in `trusted_proxies` are not
//! counted (a load balancer's connections carry many clients).

use crate::ip_restriction::canonical;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct PerIpConnections {
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One counted connection; uncounted when dropped.
pub struct ConnSlot {
    owner: Arc<PerIpConnections>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Whether a new connection may be served.
pub enum Admission {
    /// Not counted (no limit, or a trusted proxy).
    Free,
    Counted(ConnSlot),
    Refused,
}

impl PerIpConnections {
    pub fn admit(self: &Arc<Self>, peer: IpAddr, max: u32, trusted: &[IpNet]) -> Admission {
        let ip = canonical(peer);
        if max == 0 || trusted.iter().any(|n| n.contains(&ip)) {
            return Admission::Free;
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return Admission::Refused;
        }
        *n += 1;
        Admission::Counted(ConnSlot {
            owner: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> u32 {
        self.open.lock().unwrap().get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_count_and_slots_free_on_drop() {
        let c = Arc::new(PerIpConnections::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = c.admit(a, 2, &[]);
        let second = c.admit(mapped, 2, &[]);
        assert!(matches!(first, Admission::Counted(_)));
        assert!(matches!(second, Admission::Counted(_)));
        assert!(matches!(c.admit(a, 2, &[]), Admission::Refused));
        assert!(matches!(c.admit(b, 2, &[]), Admission::Counted(_)));
        drop(first);
        assert_eq!(c.open(a), 1);
        assert!(matches!(c.admit(a, 2, &[]), Admission::Counted(_)));
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        assert!(matches!(c.admit(a, 1, &trusted), Admission::Free));
        assert!(matches!(c.admit(a, 0, &[]), Admission::Free));
        drop(second);
        assert_eq!(c.open(a), 0);
    }
}
