//! Failed admin authentications, counted per client address so that a flood of bad tokens is
//! refused before it reaches the audit log (which would otherwise grow with every guess).
//!
//! A fixed window per source: the first [`LIMIT`] failures in [`WINDOW`] are answered 401 and
//! audited; later ones get 429 and are not audited until the window ends, with one log line when
//! the limit trips. A call with the right token is never refused here. IPv6 sources count per
//! /64 (one host usually holds the whole prefix). The table is bounded: when it is full of live
//! windows, failures from new sources are refused unaudited too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed authentications audited per source and window.
pub const LIMIT: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at once.
const MAX_SOURCES: usize = 10_000;

pub struct AuthFailures {
    limit: u32,
    window: Duration,
    sources: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    start: Instant,
    failures: u32,
}

/// What to do with one failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Answer 401 and audit it.
    Audit,
    /// Answer 429 (retry after this many seconds) and do not audit it.
    Refuse { retry_after: u64 },
}

impl Default for AuthFailures {
    fn default() -> Self {
        AuthFailures::new(LIMIT, WINDOW)
    }
}

impl AuthFailures {
    pub fn new(limit: u32, window: Duration) -> AuthFailures {
        AuthFailures {
            limit,
            window,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a failed authentication from `ip`.
    pub fn fail(&self, ip: IpAddr) -> Verdict {
        let source = source(ip);
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if !sources.contains_key(&source) && sources.len() >= MAX_SOURCES {
            sources.retain(|_, w| now.duration_since(w.start) < self.window);
            if sources.len() >= MAX_SOURCES {
                return Verdict::Refuse {
                    retry_after: self.window.as_secs().max(1),
                };
            }
        }
        let window = sources.entry(source).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now.duration_since(window.start) >= self.window {
            *window = Window {
                start: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
        if window.failures <= self.limit {
            return Verdict::Audit;
        }
        if window.failures == self.limit + 1 {
            tracing::warn!(
                source = %source,
                limit = self.limit,
                window_secs = self.window.as_secs(),
                "admin API: too many failed authentications from this source; refusing them with \
                 429, unaudited, until the window ends"
            );
        }
        let left = self.window.saturating_sub(now.duration_since(window.start));
        Verdict::Refuse {
            retry_after: left.as_secs().max(1),
        }
    }
}

/// The address failures are counted under: the address itself, or an IPv6 address's /64.
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_limit_are_refused_until_the_window_ends() {
        let failures = AuthFailures::new(3, Duration::from_millis(200));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(failures.fail(a), Verdict::Audit);
        }
        assert!(matches!(
            failures.fail(a),
            Verdict::Refuse { retry_after: 1 }
        ));
        assert_eq!(failures.fail(b), Verdict::Audit, "per source");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(failures.fail(a), Verdict::Audit, "a new window");
    }

    #[test]
    fn an_ipv6_prefix_is_one_source() {
        let failures = AuthFailures::new(2, WINDOW);
        for ip in ["2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"] {
            let verdict = failures.fail(ip.parse().unwrap());
            if ip == "2001:db8::ffff:1" {
                assert!(matches!(verdict, Verdict::Refuse { .. }));
            } else {
                assert_eq!(verdict, Verdict::Audit);
            }
        }
        assert_eq!(
            failures.fail("2001:db8:0:1::1".parse().unwrap()),
            Verdict::Audit
        );
        assert_eq!(
            source("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_table_stays_bounded() {
        let failures = AuthFailures::new(1, WINDOW);
        for i in 0..MAX_SOURCES as u32 {
            failures.fail(IpAddr::V4(i.into()));
        }
        assert!(matches!(
            failures.fail("192.0.2.1".parse().unwrap()),
            Verdict::Refuse { .. }
        ));
        assert_eq!(failures.sources.lock().unwrap().len(), MAX_SOURCES);
    }
}
