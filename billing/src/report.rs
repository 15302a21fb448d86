//! Reports over the rollups: usage grouped by any dimension, the routing report, and the
//! chargeback exports (plain CSV and FOCUS-style). The queries run in [`crate::store`]; this
//! module holds what they mean and how their answers are rendered.

use chrono::{Datelike, NaiveDate, TimeZone};
use serde::Serialize;

use crate::budget::Tz;
use crate::rollup::Sums;

/// Longest range an hourly report may cover: beyond it, ask for days.
pub const MAX_HOURLY_DAYS: i64 = 31;

/// What usage can be grouped by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dimension {
    Tenant,
    Key,
    Model,
    Backend,
    /// `cheap` or `premium` for routed requests; none otherwise.
    Tier,
    /// The tenant's calendar day.
    Day,
    /// The UTC hour.
    Hour,
    /// A tenant tag, e.g. `team`, `project` or `cost_center`.
    Tag(String),
}

impl Dimension {
    pub fn parse(text: &str) -> Result<Dimension, String> {
        Ok(match text {
            "tenant" => Dimension::Tenant,
            "key" => Dimension::Key,
            "model" => Dimension::Model,
            "backend" => Dimension::Backend,
            "tier" => Dimension::Tier,
            "day" => Dimension::Day,
            "hour" => Dimension::Hour,
            _ => match text.strip_prefix("tag:") {
                Some(tag)
                    if !tag.is_empty()
                        && tag
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    Dimension::Tag(tag.to_string())
                }
                _ => {
                    return Err(format!(
                        "cannot group by `{text}`: use tenant, key, model, backend, tier, day, \
                         hour or tag:NAME"
                    ))
                }
            },
        })
    }

    /// The name reports use for the column (the text `parse` accepts).
    pub fn name(&self) -> String {
        match self {
            Dimension::Tenant => "tenant".into(),
            Dimension::Key => "key".into(),
            Dimension::Model => "model".into(),
            Dimension::Backend => "backend".into(),
            Dimension::Tier => "tier".into(),
            Dimension::Day => "day".into(),
            Dimension::Hour => "hour".into(),
            Dimension::Tag(tag) => format!("tag:{tag}"),
        }
    }
}

/// A usage question: a range of days (inclusive, each tenant's own calendar), filters, groups.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub model: Option<String>,
    pub group_by: Vec<Dimension>,
    /// With `hour` grouping the range is cut in UTC hours; this zone says where its days begin
    /// (the tenant's when filtered to one tenant).
    pub hour_zone: Tz,
}

impl UsageQuery {
    pub fn hourly(&self) -> bool {
        self.group_by.contains(&Dimension::Hour)
    }

    /// Checks what the database cannot: order and size of the range.
    pub fn validate(&self) -> Result<(), String> {
        if self.to < self.from {
            return Err("`to` is before `from`".into());
        }
        if self.group_by.contains(&Dimension::Day) && self.hourly() {
            return Err("group by `day` or by `hour`, not both".into());
        }
        let days = (self.to - self.from).num_days() + 1;
        if self.hourly() && days > MAX_HOURLY_DAYS {
            return Err(format!(
                "hourly reports cover at most {MAX_HOURLY_DAYS} days ({days} asked); group by day"
            ));
        }
        Ok(())
    }

    /// `[start, end)` in epoch ms of the range's days in `hour_zone`.
    pub fn hour_range(&self) -> (i64, i64) {
        let start = |date: NaiveDate| day_start(self.hour_zone, date).timestamp_millis();
        let after = self.to.succ_opt().unwrap_or(self.to);
        (start(self.from), start(after))
    }
}

/// One group of a usage report: its dimension values (in `group_by` order) and sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub group: Vec<Option<String>>,
    pub sums: Sums,
    /// The tenant's tags (JSON) on the group's rows, when asked for (chargeback).
    pub tags: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReport {
    pub group_by: Vec<Dimension>,
    pub rows: Vec<UsageRow>,
    pub totals: Sums,
}

impl UsageReport {
    pub fn new(group_by: Vec<Dimension>, rows: Vec<UsageRow>) -> UsageReport {
        let mut totals = Sums::default();
        for row in &rows {
            totals.add(&row.sums);
        }
        UsageReport {
            group_by,
            rows,
            totals,
        }
    }

    /// The report as JSON rows: group columns by name, then the sums.
    pub fn json_rows(&self) -> Vec<serde_json::Value> {
        self.rows
            .iter()
            .map(|row| {
                let mut object = serde_json::Map::new();
                for (dimension, value) in self.group_by.iter().zip(&row.group) {
                    object.insert(dimension.name(), serde_json::json!(value));
                }
                if let serde_json::Value::Object(sums) =
                    serde_json::to_value(row.sums).expect("sums serialise")
                {
                    object.extend(sums);
                }
                serde_json::Value::Object(object)
            })
            .collect()
    }
}

/// Requests and cost per routing tier, and what routing saved against sending every routed
/// request to its premium model.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoutingReport {
    pub tiers: Vec<TierTotals>,
    pub routed_requests: i64,
    pub unrouted_requests: i64,
    pub cost_micros: i64,
    pub premium_equivalent_micros: i64,
    pub savings_micros: i64,
    /// Savings over premium-equivalent cost (0 when nothing was routed).
    pub savings_share: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TierTotals {
    pub tier: String,
    pub requests: i64,
    pub cost_micros: i64,
    pub premium_equivalent_micros: i64,
}

impl RoutingReport {
    /// From a usage report grouped by tier alone.
    pub fn from_tiers(report: &UsageReport) -> RoutingReport {
        let mut routing = RoutingReport {
            tiers: Vec::new(),
            routed_requests: 0,
            unrouted_requests: 0,
            cost_micros: 0,
            premium_equivalent_micros: 0,
            savings_micros: 0,
            savings_share: 0.0,
        };
        for row in &report.rows {
            let Some(tier) = row.group.first().cloned().flatten() else {
                routing.unrouted_requests += row.sums.requests;
                continue;
            };
            routing.routed_requests += row.sums.requests;
            routing.cost_micros += row.sums.cost_micros;
            routing.premium_equivalent_micros += row.sums.premium_equivalent_micros;
            routing.tiers.push(TierTotals {
                tier,
                requests: row.sums.requests,
                cost_micros: row.sums.cost_micros,
                premium_equivalent_micros: row.sums.premium_equivalent_micros,
            });
        }
        routing.savings_micros = routing.premium_equivalent_micros - routing.cost_micros;
        if routing.premium_equivalent_micros > 0 {
            routing.savings_share =
                routing.savings_micros as f64 / routing.premium_equivalent_micros as f64;
        }
        routing
    }
}

/// When a calendar day begins in a zone: local midnight, or the first hour that exists where a
/// daylight-saving change skips midnight.
pub fn day_start(zone: Tz, date: NaiveDate) -> chrono::DateTime<Tz> {
    (0..=3)
        .find_map(|hour| {
            zone.from_local_datetime(&date.and_hms_opt(hour, 0, 0).expect("valid hour"))
                .earliest()
        })
        .unwrap_or_else(|| zone.from_utc_datetime(&date.and_hms_opt(0, 0, 0).expect("midnight")))
}

/// Micro-dollars as a decimal string with six places (`1.234567`), exact.
pub fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// A `YYYYMMDD` number (as stored) as `YYYY-MM-DD`.
pub fn day_text(day: i64) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        day / 10_000,
        day / 100 % 100,
        day % 100
    )
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// A text cell as a spreadsheet must show it: a cell that starts like a formula (`=`, `+`, `-`,
/// `@`, tab or carriage return, OWASP's list) gets a leading `'`, so that a tenant, model or tag
/// name can never run as a formula in whoever opens the export. Numbers are not passed here.
pub fn text_cell(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_string()
    }
}

fn csv_line(fields: &[String]) -> String {
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    line.join(",") + "\r\n"
}

/// The chargeback CSV: one line per tenant × model × day, from a report grouped by
/// `[day, tenant, model]`.
pub fn chargeback_csv(report: &UsageReport) -> String {
    let mut out = csv_line(&[
        "day".into(),
        "tenant".into(),
        "model".into(),
        "requests".into(),
        "prompt_tokens".into(),
        "cached_tokens".into(),
        "completion_tokens".into(),
        "cost_usd".into(),
    ]);
    for row in &report.rows {
        let text = |i: usize| text_cell(row.group[i].as_deref().unwrap_or_default());
        let s = &row.sums;
        out.push_str(&csv_line(&[
            text(0),
            text(1),
            text(2),
            s.requests.to_string(),
            s.prompt_tokens.to_string(),
            s.cached_tokens.to_string(),
            s.completion_tokens.to_string(),
            usd(s.cost_micros),
        ]));
    }
    out
}

/// FOCUS-style columns (FinOps Open Cost and Usage Specification 1.x names; `x_` columns are
/// ours), one line per tenant × model × day, from a report grouped by `[day, tenant, model]`
/// with tags. Charge periods are the tenant's local day, written in UTC as FOCUS requires.
pub fn focus_csv(report: &UsageReport, zone_of: impl Fn(&str) -> Tz) -> String {
    let mut out = csv_line(&FOCUS_COLUMNS.map(str::to_string));
    for row in &report.rows {
        let text = |i: usize| row.group[i].clone().unwrap_or_default();
        let (day, tenant, model) = (text(0), text(1), text(2));
        let Ok(date) = NaiveDate::parse_from_str(&day, "%Y-%m-%d") else {
            continue;
        };
        let zone = zone_of(&tenant);
        let at = |date: NaiveDate| {
            day_start(zone, date)
                .with_timezone(&chrono::Utc)
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        };
        let month = date.with_day0(0).expect("first of month exists");
        let s = &row.sums;
        let cost = usd(s.cost_micros);
        let (model, tenant) = (text_cell(&model), text_cell(&tenant));
        out.push_str(&csv_line(&[
            "tollgate".into(),
            cost.clone(),
            "USD".into(),
            at(month),
            at(month + chrono::Months::new(1)),
            "Usage".into(),
            format!("{} requests to {model}", s.requests),
            "Usage-Based".into(),
            at(date),
            at(date + chrono::Days::new(1)),
            (s.prompt_tokens + s.completion_tokens).to_string(),
            "Tokens".into(),
            cost.clone(),
            cost,
            "Standard".into(),
            "Tollgate".into(),
            model.clone(),
            "AI and Machine Learning".into(),
            model,
            tenant.clone(),
            tenant,
            text_cell(
                row.tags
                    .as_deref()
                    .filter(|t| !t.is_empty())
                    .unwrap_or("{}"),
            ),
            s.requests.to_string(),
            s.prompt_tokens.to_string(),
            s.cached_tokens.to_string(),
            s.completion_tokens.to_string(),
        ]));
    }
    out
}

const FOCUS_COLUMNS: [&str; 26] = [
    "BillingAccountId",
    "BilledCost",
    "BillingCurrency",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargeCategory",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ConsumedQuantity",
    "ConsumedUnit",
    "EffectiveCost",
    "ListCost",
    "PricingCategory",
    "ProviderName",
    "ResourceId",
    "ServiceCategory",
    "ServiceName",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_Requests",
    "x_PromptTokens",
    "x_CachedTokens",
    "x_CompletionTokens",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn row(group: &[&str], cost: i64, tags: Option<&str>) -> UsageRow {
        UsageRow {
            group: group.iter().map(|g| Some(g.to_string())).collect(),
            sums: Sums {
                requests: 2,
                prompt_tokens: 10,
                cached_tokens: 1,
                completion_tokens: 4,
                cost_micros: cost,
                premium_equivalent_micros: 0,
            },
            tags: tags.map(str::to_string),
        }
    }

    #[test]
    fn parses_dimensions() {
        assert_eq!(
            Dimension::parse("tag:cost_center"),
            Ok(Dimension::Tag("cost_center".into()))
        );
        assert!(Dimension::parse("tag:x'y").is_err());
        assert!(Dimension::parse("tag:").is_err());
        assert!(Dimension::parse("week").is_err());
        assert_eq!(Dimension::parse("key").unwrap().name(), "key");
    }

    #[test]
    fn a_day_skipped_at_midnight_starts_at_its_first_hour() {
        // Santiago moved clocks from 00:00 to 01:00 on 2026-09-06.
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let date = NaiveDate::from_ymd_opt(2026, 9, 6).unwrap();
        let start = day_start(santiago, date);
        assert_eq!(start.date_naive(), date);
        assert_eq!(start.format("%H:%M").to_string(), "01:00");
    }

    #[test]
    fn money_and_days_are_exact() {
        assert_eq!(usd(1_234_567), "1.234567");
        assert_eq!(usd(-5), "-0.000005");
        assert_eq!(day_text(20261127), "2026-11-27");
    }

    #[test]
    fn chargeback_lines() {
        let by = vec![Dimension::Day, Dimension::Tenant, Dimension::Model];
        let report = UsageReport::new(
            by,
            vec![
                row(&["2026-11-27", "acme", "gpt-4o"], 1_500_000, None),
                row(
                    &["2026-11-27", "acme, inc", "m"],
                    7,
                    Some(r#"{"team":"a"}"#),
                ),
            ],
        );
        assert_eq!(report.totals.cost_micros, 1_500_007);
        let csv = chargeback_csv(&report);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            lines[0],
            "day,tenant,model,requests,prompt_tokens,cached_tokens,completion_tokens,cost_usd"
        );
        assert_eq!(lines[1], "2026-11-27,acme,gpt-4o,2,10,1,4,1.500000");
        assert_eq!(lines[2], "2026-11-27,\"acme, inc\",m,2,10,1,4,0.000007");

        let paris: Tz = "Europe/Paris".parse().unwrap();
        let focus = focus_csv(&report, |_| paris);
        let lines: Vec<&str> = focus.split("\r\n").collect();
        assert!(lines[0].starts_with("BillingAccountId,BilledCost,"));
        // Paris midnight on the 27th is 23:00 UTC on the 26th.
        assert!(lines[1].contains(",2026-11-26T23:00:00Z,2026-11-27T23:00:00Z,"));
        assert!(lines[1].contains(",2026-10-31T23:00:00Z,2026-11-30T23:00:00Z,"));
        assert!(lines[2].contains(r#","{""team"":""a""}","#), "{}", lines[2]);
    }

    #[test]
    fn text_cells_never_start_a_formula() {
        let by = vec![Dimension::Day, Dimension::Tenant, Dimension::Model];
        let hostile = [
            "=HYPERLINK(\"http://x\",\"y\")",
            "+1+cmd|' /C calc'!A0",
            "-2+3",
            "@SUM(A1)",
            "\tx",
            "\rx",
        ];
        let rows = hostile
            .iter()
            .map(|h| row(&["2026-11-27", *h, *h], -5, Some(*h)))
            .collect();
        let report = UsageReport::new(by, rows);
        for csv in [
            chargeback_csv(&report),
            focus_csv(&report, |_| chrono_tz::UTC),
        ] {
            for line in csv.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
                for field in split_csv(line) {
                    let formula = field.starts_with(['=', '+', '@', '\t', '\r'])
                        || (field.starts_with('-') && field.parse::<f64>().is_err());
                    assert!(!formula, "{field:?} in {line:?}");
                }
            }
            assert!(csv.contains("'=HYPERLINK"), "{csv}");
        }
        // Numbers stay numbers, negative ones included.
        assert!(chargeback_csv(&report).contains(",-0.000005\r\n"));
        assert_eq!(text_cell("acme"), "acme");
        assert_eq!(text_cell("-x"), "'-x");
    }

    /// The fields of one CSV line (RFC 4180 quoting).
    fn split_csv(line: &str) -> Vec<String> {
        let mut fields = vec![String::new()];
        let mut quoted = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' if quoted && chars.peek() == Some(&'"') => {
                    chars.next();
                    fields.last_mut().unwrap().push('"');
                }
                '"' => quoted = !quoted,
                ',' if !quoted => fields.push(String::new()),
                c => fields.last_mut().unwrap().push(c),
            }
        }
        fields
    }

    #[test]
    fn routing_savings() {
        let mut cheap = row(&["cheap"], 100, None);
        cheap.sums.premium_equivalent_micros = 1_000;
        let mut premium = row(&["premium"], 500, None);
        premium.sums.premium_equivalent_micros = 500;
        let mut unrouted = row(&[], 9, None);
        unrouted.group = vec![None];
        let report = UsageReport::new(vec![Dimension::Tier], vec![unrouted, cheap, premium]);
        let routing = RoutingReport::from_tiers(&report);
        assert_eq!(routing.routed_requests, 4);
        assert_eq!(routing.unrouted_requests, 2);
        assert_eq!(routing.savings_micros, 900);
        assert!((routing.savings_share - 0.6).abs() < 1e-9);
    }
}
