//! Traffic splitting: which upstream a route's request goes to, when a route has more than
//! one. Version rules first (a header or cookie value picks an upstream: "send testers to
//! v2"), then a weighted split (a canary: 5% to v2), random per request or sticky by a
//! hash of the client's address, a header or a cookie.

use crate::balancer::hash64;
use crate::config::{ConfigProblem, HashSource, SplitConfig, VersionRuleConfig};
use crate::headers::next_u64;
use http::{header, HeaderMap, HeaderName};

#[derive(Debug)]
enum Matcher {
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug)]
struct VersionRule {
    on: Matcher,
    value: String,
    upstream: usize,
}

#[derive(Debug)]
pub struct Split {
    versions: Vec<VersionRule>,
    /// Upstream indexes with cumulative weights; empty: no weighted split.
    weighted: Vec<(usize, u64)>,
    total: u64,
    sticky: Option<(HashSource, Option<String>)>,
}

impl Split {
    /// `None` when the route has neither version rules nor a weighted split.
    pub fn compile(
        at: &str,
        route_upstream: usize,
        versions: &[VersionRuleConfig],
        split: Option<&SplitConfig>,
        upstream_index: &dyn Fn(&str) -> Option<usize>,
    ) -> Result<Option<Split>, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let resolve = |name: &str, path: String, problems: &mut Vec<ConfigProblem>| {
            upstream_index(name).unwrap_or_else(|| {
                problems.push(ConfigProblem::new(path, format!("unknown upstream '{name}'")));
                0
            })
        };
        let mut rules = Vec::new();
        for (j, v) in versions.iter().enumerate() {
            let upstream = resolve(&v.upstream, format!("{at}.versions[{j}].upstream"), &mut problems);
            let on = match (&v.header, &v.cookie) {
                (Some(h), None) => match HeaderName::from_bytes(h.as_bytes()) {
                    Ok(h) => Matcher::Header(h),
                    Err(_) => {
                        problems.push(ConfigProblem::new(
                            format!("{at}.versions[{j}].header"),
                            format!("'{h}' is not a valid header name"),
                        ));
                        continue;
                    }
                },
                (None, Some(c)) => Matcher::Cookie(c.clone()),
                _ => {
                    problems.push(ConfigProblem::new(
                        format!("{at}.versions[{j}]"),
                        "give exactly one of 'header' or 'cookie'",
                    ));
                    continue;
                }
            };
            rules.push(VersionRule {
                on,
                value: v.value.clone(),
                upstream,
            });
        }
        let mut weighted = Vec::new();
        let mut total = 0u64;
        if let Some(s) = split {
            for (j, t) in s.targets.iter().enumerate() {
                let upstream = match &t.upstream {
                    Some(name) => resolve(name, format!("{at}.split.targets[{j}].upstream"), &mut problems),
                    None => route_upstream,
                };
                if t.weight > 0 {
                    total += u64::from(t.weight);
                    weighted.push((upstream, total));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        if rules.is_empty() && weighted.is_empty() {
            return Ok(None);
        }
        Ok(Some(Split {
            versions: rules,
            weighted,
            total,
            sticky: split.and_then(|s| s.hash_on.as_ref().map(|h| (h.source, h.name.clone()))),
        }))
    }

    /// The upstream for this request (`default`: the route's own).
    pub fn choose(&self, default: usize, headers: &HeaderMap, client_ip: &[u8]) -> usize {
        for rule in &self.versions {
            let hit = match &rule.on {
                Matcher::Header(h) => headers
                    .get_all(h)
                    .iter()
                    .any(|v| v.as_bytes() == rule.value.as_bytes()),
                Matcher::Cookie(c) => cookie(headers, c).is_some_and(|v| v == rule.value.as_bytes()),
            };
            if hit {
                return rule.upstream;
            }
        }
        if self.total == 0 {
            return default;
        }
        let roll = match &self.sticky {
            None => next_u64(),
            Some((source, name)) => {
                let key: Option<&[u8]> = match source {
                    HashSource::Ip => Some(client_ip),
                    HashSource::Header => name.as_deref().and_then(|n| headers.get(n)).map(|v| v.as_bytes()),
                    HashSource::Cookie => name.as_deref().and_then(|n| cookie(headers, n)),
                };
                key.map_or_else(next_u64, hash64)
            }
        } % self.total;
        self.weighted
            .iter()
            .find(|(_, upto)| roll < *upto)
            .map_or(default, |(u, _)| *u)
    }
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| {
            c.split(';').find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then_some(v.as_bytes())
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HashOn, SplitTarget};

    fn index(name: &str) -> Option<usize> {
        match name {
            "v1" => Some(0),
            "v2" => Some(1),
            _ => None,
        }
    }

    fn split(weights: &[(Option<&str>, u32)], hash_on: Option<HashOn>) -> Split {
        let cfg = SplitConfig {
            targets: weights
                .iter()
                .map(|(u, w)| SplitTarget {
                    upstream: u.map(str::to_string),
                    weight: *w,
                })
                .collect(),
            hash_on,
        };
        let versions = [VersionRuleConfig {
            header: Some("x-version".into()),
            cookie: None,
            value: "beta".into(),
            upstream: "v2".into(),
        }];
        Split::compile("routes[0]", 0, &versions, Some(&cfg), &index)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn weights_split_the_traffic() {
        let s = split(&[(Some("v2"), 10), (None, 90)], None);
        let h = HeaderMap::new();
        let to_v2 = (0..20_000).filter(|_| s.choose(0, &h, b"1.2.3.4") == 1).count();
        assert!((1600..2400).contains(&to_v2), "{to_v2}");
    }

    #[test]
    fn version_rules_win_and_sticky_splits_stick() {
        let s = split(
            &[(Some("v2"), 50), (None, 50)],
            Some(HashOn {
                source: HashSource::Ip,
                name: None,
            }),
        );
        let mut h = HeaderMap::new();
        let first = s.choose(0, &h, b"10.0.0.7");
        assert!((0..50).all(|_| s.choose(0, &h, b"10.0.0.7") == first));
        h.insert("x-version", "beta".parse().unwrap());
        assert_eq!(s.choose(0, &h, b"10.0.0.7"), 1);
    }

    #[test]
    fn unknown_upstreams_are_problems() {
        let cfg = SplitConfig {
            targets: vec![SplitTarget {
                upstream: Some("v3".into()),
                weight: 1,
            }],
            hash_on: None,
        };
        let err = Split::compile("routes[2]", 0, &[], Some(&cfg), &index).unwrap_err();
        assert_eq!(err[0].path, "routes[2].split.targets[0].upstream");
    }
}
