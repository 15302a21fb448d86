//! Calendar windows: which day, week, month (in a tenant's time zone) or minute a moment falls
//! in, and when that window ends. Counters are keyed by window, so a period resets simply by
//! moving to a new key at the tenant's local midnight.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Minute,
    Daily,
    Weekly,
    Monthly,
    Total,
}

impl Period {
    /// The name policy files and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Total => "total",
        }
    }
}

/// A window: its label (part of the counter key) and its bounds in Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub label: String,
    pub start_ms: i64,
    /// `i64::MAX` for `Total`.
    pub end_ms: i64,
}

/// The window of `period` that contains `now_ms`, with calendar periods taken in `tz`.
pub fn window(period: Period, tz: Tz, now_ms: i64) -> Window {
    let now = DateTime::<Utc>::from_timestamp_millis(now_ms).unwrap_or_default();
    let local = now.with_timezone(&tz).date_naive();
    let (label, start, end) = match period {
        Period::Minute => {
            let start = now_ms - now_ms.rem_euclid(60_000);
            return Window {
                label: format!("m{}", start / 60_000),
                start_ms: start,
                end_ms: start + 60_000,
            };
        }
        Period::Total => {
            return Window {
                label: "total".into(),
                start_ms: i64::MIN,
                end_ms: i64::MAX,
            }
        }
        Period::Daily => (
            local.format("%Y-%m-%d").to_string(),
            local,
            local + Duration::days(1),
        ),
        Period::Weekly => {
            let monday = local - Duration::days(i64::from(local.weekday().num_days_from_monday()));
            let week = monday.iso_week();
            (
                format!("{}-W{:02}", week.year(), week.week()),
                monday,
                monday + Duration::days(7),
            )
        }
        Period::Monthly => {
            let first =
                NaiveDate::from_ymd_opt(local.year(), local.month(), 1).expect("first of month");
            let next = if local.month() == 12 {
                NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)
            }
            .expect("first of next month");
            (local.format("%Y-%m").to_string(), first, next)
        }
    };
    Window {
        label,
        start_ms: local_midnight_ms(tz, start),
        end_ms: local_midnight_ms(tz, end),
    }
}

/// The first instant of `date` in `tz` (midnight, or the first valid time after a DST gap).
fn local_midnight_ms(tz: Tz, date: NaiveDate) -> i64 {
    let mut time = date.and_hms_opt(0, 0, 0).expect("midnight");
    for _ in 0..4 {
        if let Some(t) = tz.from_local_datetime(&time).earliest() {
            return t.timestamp_millis();
        }
        time += Duration::hours(1);
    }
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight"))
        .timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn monthly_resets_at_the_tenants_local_midnight() {
        let tokyo: Tz = "Asia/Tokyo".parse().unwrap();
        // 14:59:59 UTC on Nov 30 is 23:59:59 in Tokyo: still November there.
        let before = window(Period::Monthly, tokyo, ms("2026-11-30T14:59:59Z"));
        let after = window(Period::Monthly, tokyo, ms("2026-11-30T15:00:00Z"));
        assert_eq!(before.label, "2026-11");
        assert_eq!(after.label, "2026-12");
        assert_eq!(before.end_ms, ms("2026-11-30T15:00:00Z"));
        assert_eq!(after.start_ms, before.end_ms);
        // In UTC the same instant is still November.
        assert_eq!(
            window(Period::Monthly, Tz::UTC, ms("2026-11-30T15:00:00Z")).label,
            "2026-11"
        );
        assert_eq!(
            window(Period::Monthly, Tz::UTC, ms("2026-12-31T23:00:00Z")).end_ms,
            ms("2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn daily_weekly_minute_total() {
        let ny: Tz = "America/New_York".parse().unwrap();
        let w = window(Period::Daily, ny, ms("2026-03-08T12:00:00Z"));
        assert_eq!(w.label, "2026-03-08");
        // DST starts that day: the local day is 23 hours long.
        assert_eq!(w.end_ms - w.start_ms, 23 * 3_600_000);
        let week = window(Period::Weekly, Tz::UTC, ms("2026-11-27T10:00:00Z"));
        assert_eq!(week.label, "2026-W48");
        assert_eq!(week.start_ms, ms("2026-11-23T00:00:00Z"));
        let minute = window(Period::Minute, Tz::UTC, ms("2026-11-27T10:00:59.999Z"));
        assert_eq!(minute.end_ms, ms("2026-11-27T10:01:00Z"));
        assert_eq!(window(Period::Total, ny, 0).end_ms, i64::MAX);
    }
}
