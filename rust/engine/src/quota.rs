//! Quotas (requests per calendar day or month, UTC) and plans (a consumer's limits and
//! quotas). Quotas count node-wide in a second shared table (one counter per consumer,
//! quota and window), or cluster-wide in Redis like cluster rate limits.

use crate::cluster_limits::ClusterLimits;
use crate::config::{ConfigProblem, PlanConfig, QuotaConfig, QuotaPeriod};
use crate::error::{ErrorKind, GatewayError};
use crate::limiter::{Limit, RateInfo};
use crate::ratelimit::SharedTable;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds added to the wall clock for quota windows: `FERROGATE_CLOCK_OFFSET`, read once.
/// It lets a test (or a rehearsal) see a day or month roll over without waiting for one.
fn clock_offset() -> f64 {
    static OFFSET: OnceLock<f64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var("FERROGATE_CLOCK_OFFSET")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .unwrap_or(0.0)
    })
}

/// Unix seconds as quotas see them.
pub fn wall_secs() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    (now + clock_offset()).floor() as i64
}

/// The window number of `period` at `now` (Unix seconds), and the seconds until it ends.
pub fn window_of(period: QuotaPeriod, now: i64) -> (u32, u64) {
    let day = now.div_euclid(86_400);
    match period {
        QuotaPeriod::Day => (day as u32, (86_400 - now.rem_euclid(86_400)) as u64),
        QuotaPeriod::Month => {
            let (y, m, _) = civil_from_days(day);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let next = days_from_civil(ny, nm, 1) * 86_400;
            ((y * 12 + m as i64 - 1) as u32, (next - now) as u64)
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's method).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(Debug)]
pub struct Quota {
    id: u64,
    limit: u64,
    period: QuotaPeriod,
    cluster: bool,
}

/// A compiled plan: limits keyed by consumer (unless they say otherwise) and quotas.
#[derive(Debug, Default)]
pub struct Plan {
    pub limits: Vec<Limit>,
    pub quotas: Vec<Quota>,
}

impl Plan {
    pub fn compile(name: &str, cfg: &PlanConfig) -> Result<Plan, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut limits = Vec::new();
        for (j, l) in cfg.rate_limits.iter().enumerate() {
            match Limit::compile(l, &format!("plans.{name}.rate_limits[{j}]")) {
                Ok(l) => limits.push(l),
                Err(p) => problems.push(p),
            }
        }
        let quotas = cfg.quotas.iter().map(Quota::compile).collect();
        if problems.is_empty() {
            Ok(Plan { limits, quotas })
        } else {
            Err(problems)
        }
    }
}

impl Quota {
    fn compile(cfg: &QuotaConfig) -> Quota {
        Quota {
            id: crate::limiter::hash_str(&cfg.id),
            limit: cfg.limit,
            period: cfg.period,
            cluster: cfg.cluster,
        }
    }

    fn name(&self) -> &'static str {
        match self.period {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }
}

/// Count the request against a consumer's quotas; the first one used up refuses it.
pub async fn check_quotas(
    table: &SharedTable,
    cluster: Option<&ClusterLimits>,
    quotas: &[Quota],
    consumer: &str,
    shown: &mut Option<RateInfo>,
) -> Result<(), GatewayError> {
    let now = wall_secs();
    for q in quotas {
        let key = crate::limiter::hash_parts(q.id, &[consumer.as_bytes()]);
        let (window, reset_secs) = window_of(q.period, now);
        let (allowed, remaining) = match (q.cluster, cluster) {
            (true, Some(c)) => {
                let ttl = match q.period {
                    QuotaPeriod::Day => 86_400,
                    QuotaPeriod::Month => 31 * 86_400,
                };
                let v = c
                    .check_window(key, q.limit, u64::from(window), reset_secs, ttl)
                    .await?;
                (v.allowed, v.remaining)
            }
            _ => {
                let (allowed, used) = table.count_window(key, window, q.limit);
                (allowed, q.limit.saturating_sub(used))
            }
        };
        let info = RateInfo {
            limit: q.limit,
            remaining,
            reset_secs,
            retry_after_secs: if allowed { 0 } else { reset_secs },
        };
        if !allowed {
            *shown = Some(info);
            return Err(GatewayError::new(
                ErrorKind::RateLimited,
                format!(
                    "quota exceeded: {} requests per {} for consumer '{consumer}'; it renews in {reset_secs}s",
                    q.limit,
                    q.name()
                ),
            ));
        }
        if crate::limiter::leaves_fewer(shown, &info) {
            *shown = Some(info);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_months_roll_over_at_utc_midnight() {
        // 2026-11-30T23:59:58Z
        let t = days_from_civil(2026, 11, 30) * 86_400 + 86_398;
        let (day, left) = window_of(QuotaPeriod::Day, t);
        assert_eq!(left, 2);
        assert_eq!(window_of(QuotaPeriod::Day, t + 2).0, day + 1);
        let (month, left) = window_of(QuotaPeriod::Month, t);
        assert_eq!(left, 2);
        assert_eq!(window_of(QuotaPeriod::Month, t + 2).0, month + 1);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        // December rolls into January of the next year
        let dec = days_from_civil(2026, 12, 31) * 86_400;
        assert_eq!(window_of(QuotaPeriod::Month, dec).1, 86_400);
    }

    #[test]
    fn a_quota_refuses_once_used_up_and_renews_with_the_window() {
        let table = SharedTable::anonymous(64).unwrap();
        let q = [Quota {
            id: 1,
            limit: 2,
            period: QuotaPeriod::Day,
            cluster: false,
        }];
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut shown = None;
        let run = |shown: &mut Option<RateInfo>| rt.block_on(check_quotas(&table, None, &q, "alice", shown));
        assert!(run(&mut shown).is_ok());
        assert!(run(&mut shown).is_ok());
        let refused = run(&mut shown).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        assert!(refused
            .message
            .contains("2 requests per day for consumer 'alice'"));
        assert_eq!(shown.unwrap().remaining, 0);
    }
}
