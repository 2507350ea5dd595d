//! IP allow and deny lists, globally and per route, on the client's real address: the peer,
//! or behind `trusted_proxies` the address their X-Forwarded-For names (the same address
//! the rate limiter counts). Refused clients get 403 `ip_forbidden`.

use crate::config::{ConfigProblem, IpRestrictionConfig};
use crate::error::{ErrorKind, GatewayError};
use crate::limiter::real_client_ip;
use crate::phase::{Filter, RequestCtx};
use http::request;
use ipnet::{IpNet, Ipv4Net};
use std::net::IpAddr;

/// An IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, what a dual-stack socket reports for an
/// IPv4 client) as the IPv4 address it is, so one list entry covers both spellings.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32")),
            None => net,
        },
        net => net,
    }
}

/// One compiled list.
#[derive(Debug)]
pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpRules {
    /// `at` locates the list in the config (`routes[1].ip_restriction`) for problems.
    pub fn compile(cfg: &IpRestrictionConfig, at: &str) -> Result<IpRules, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut parse = |list: &[String], field: &str| -> Vec<IpNet> {
            list.iter()
                .enumerate()
                .filter_map(|(j, text)| {
                    match text
                        .parse::<IpNet>()
                        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    {
                        Ok(net) => Some(canonical_net(net.trunc())),
                        Err(_) => {
                            problems.push(ConfigProblem::new(
                                format!("{at}.{field}[{j}]"),
                                format!("'{text}' is not an address or CIDR"),
                            ));
                            None
                        }
                    }
                })
                .collect()
        };
        let rules = IpRules {
            allow: parse(&cfg.allow, "allow"),
            deny: parse(&cfg.deny, "deny"),
        };
        if cfg.allow.is_empty() && cfg.deny.is_empty() {
            problems.push(ConfigProblem::new(at, "give 'allow' or 'deny' addresses"));
        }
        if problems.is_empty() {
            Ok(rules)
        } else {
            Err(problems)
        }
    }

    /// Whether `ip` (already canonical) may pass: in `allow` when there is one, never in `deny`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let within = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip));
        (self.allow.is_empty() || within(&self.allow)) && !within(&self.deny)
    }
}

/// The access-phase filter: the global list, then the route's.
pub struct IpRestriction {
    pub global: Option<IpRules>,
    pub trusted: Vec<IpNet>,
}

impl Filter for IpRestriction {
    fn name(&self) -> &'static str {
        "ip-restriction"
    }

    fn access(&self, ctx: &mut RequestCtx, req: &request::Parts) -> Result<(), GatewayError> {
        let route = ctx.route.as_ref().and_then(|r| r.ip_restriction.as_ref());
        if self.global.is_none() && route.is_none() {
            return Ok(());
        }
        let peer = canonical(ctx.client.ip());
        let ip = real_client_ip(peer, &req.headers, &self.trusted).map_or(peer, canonical);
        for rules in self.global.iter().chain(route) {
            if !rules.permits(ip) {
                return Err(GatewayError::new(
                    ErrorKind::IpForbidden,
                    format!("requests from {ip} are not allowed here"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> IpRules {
        let cfg = IpRestrictionConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        };
        IpRules::compile(&cfg, "ip_restriction").unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        canonical(s.parse().unwrap())
    }

    #[test]
    fn allow_lists_admit_only_their_networks_in_both_families() {
        let r = rules(&["10.0.0.0/8", "2001:db8::/32"], &[]);
        assert!(r.permits(ip("10.1.2.3")));
        assert!(r.permits(ip("::ffff:10.1.2.3")));
        assert!(r.permits(ip("2001:db8::7")));
        assert!(!r.permits(ip("11.0.0.1")));
        assert!(!r.permits(ip("2001:db9::1")));
        assert!(!r.permits(ip("::1")));
    }

    #[test]
    fn deny_wins_over_allow_and_mapped_entries_cover_ipv4_clients() {
        let r = rules(&["10.0.0.0/8"], &["10.9.0.0/16"]);
        assert!(r.permits(ip("10.1.0.1")));
        assert!(!r.permits(ip("10.9.0.1")));
        let mapped = rules(&[], &["::ffff:192.0.2.0/120", "::1"]);
        assert!(!mapped.permits(ip("192.0.2.9")));
        assert!(!mapped.permits(ip("::1")));
        assert!(mapped.permits(ip("192.0.3.9")));
        assert!(mapped.permits(ip("127.0.0.1")));
    }

    #[test]
    fn bad_entries_and_empty_lists_are_problems() {
        let cfg = IpRestrictionConfig {
            allow: vec!["10.0.0.0/8".into(), "nope".into()],
            deny: vec![],
        };
        let p = IpRules::compile(&cfg, "routes[0].ip_restriction").unwrap_err();
        assert_eq!(p[0].path, "routes[0].ip_restriction.allow[1]");
        assert!(IpRules::compile(&IpRestrictionConfig::default(), "x").is_err());
    }
}
