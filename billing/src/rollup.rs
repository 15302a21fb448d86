//! Hourly and daily sums of the ledger, which reports read instead of the raw rows.
//!
//! The ledger writer adds each batch's sums to the rollup tables in the same transaction as
//! the rows themselves, and only for rows that were new, so a rollup can never disagree with
//! the ledger (a retried batch adds nothing twice). Hours are UTC hours; days are the tenant's
//! calendar days in its time zone at the time of the request. A routed request counts under the
//! model that served it (the route's choice), which is the model its price came from.

use std::collections::BTreeMap;

use chrono::TimeZone;
use serde::Serialize;

use crate::ledger::LedgerRow;

/// A rollup table: its name, time bucket, and whether it keeps the key and backend dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub bucket: &'static str,
    pub by_key_and_backend: bool,
}

pub const HOURLY: Table = Table {
    name: "usage_hourly",
    bucket: "hour_ms",
    by_key_and_backend: true,
};
pub const DAILY: Table = Table {
    name: "usage_daily",
    bucket: "day",
    by_key_and_backend: true,
};
/// Days by tenant, model and tier only: far fewer cells, for the common reports.
pub const DAILY_BY_MODEL: Table = Table {
    name: "usage_daily_model",
    bucket: "day",
    by_key_and_backend: false,
};

impl Table {
    /// The key columns after the bucket.
    pub fn dimension_columns(&self) -> &'static str {
        if self.by_key_and_backend {
            "tenant, key_id, model, backend, tier, tags"
        } else {
            "tenant, model, tier, tags"
        }
    }

    /// `ON CONFLICT` clause that adds a cell's sums to an existing cell.
    pub fn upsert_clause(&self) -> String {
        let adds: Vec<String> = SUM_COLUMNS
            .iter()
            .map(|c| format!("{c} = {}.{c} + excluded.{c}", self.name))
            .collect();
        format!(
            " ON CONFLICT ({}, {}) DO UPDATE SET {}",
            self.bucket,
            self.dimension_columns(),
            adds.join(", ")
        )
    }
}

/// The summed columns of both rollup tables, in [`Sums::values`] order.
pub const SUM_COLUMNS: [&str; 6] = [
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "cost_micros",
    "premium_equivalent_micros",
];

const HOUR_MS: i64 = 3_600_000;

/// One rollup cell: a time bucket and the dimensions reports group by. Missing dimensions are
/// empty strings so that they can be part of the table's key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    /// `hour_ms` (UTC hour start, epoch ms) or `day` (`YYYYMMDD` in the tenant's time zone).
    pub bucket: i64,
    pub tenant: String,
    pub key_id: String,
    pub model: String,
    pub backend: String,
    pub tier: String,
    pub tags: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sums {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub cost_micros: i64,
    /// What routed requests would have cost on their route's premium model (0 when not routed).
    pub premium_equivalent_micros: i64,
}

impl Sums {
    pub fn of(row: &LedgerRow) -> Sums {
        Sums {
            requests: 1,
            prompt_tokens: row.prompt_tokens,
            cached_tokens: row.cached_tokens,
            completion_tokens: row.completion_tokens,
            cost_micros: row.cost_micros,
            premium_equivalent_micros: row
                .routing
                .as_ref()
                .map_or(0, |r| r.premium_equivalent_micros),
        }
    }

    pub fn values(&self) -> [i64; 6] {
        [
            self.requests,
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
            self.cost_micros,
            self.premium_equivalent_micros,
        ]
    }

    pub fn from_values(v: [i64; 6]) -> Sums {
        Sums {
            requests: v[0],
            prompt_tokens: v[1],
            cached_tokens: v[2],
            completion_tokens: v[3],
            cost_micros: v[4],
            premium_equivalent_micros: v[5],
        }
    }

    pub fn add(&mut self, other: &Sums) {
        let mut values = self.values();
        for (v, o) in values.iter_mut().zip(other.values()) {
            *v += o;
        }
        *self = Sums::from_values(values);
    }
}

/// The rollup cells of a set of ledger rows. Cells are kept sorted so that every writer updates
/// them in the same order: concurrent replicas wait on each other instead of deadlocking.
#[derive(Debug, Default)]
pub struct Rollup {
    hourly: BTreeMap<CellKey, Sums>,
    daily: BTreeMap<CellKey, Sums>,
    daily_by_model: BTreeMap<CellKey, Sums>,
}

impl Rollup {
    pub fn of<'a>(rows: impl Iterator<Item = &'a LedgerRow>) -> Rollup {
        let mut rollup = Rollup::default();
        for row in rows {
            let sums = Sums::of(row);
            let mut key = CellKey {
                bucket: row.created_ms.div_euclid(HOUR_MS) * HOUR_MS,
                tenant: row.tenant.clone(),
                key_id: row.key_id.clone(),
                model: cell_model(row),
                backend: row.backend.clone().unwrap_or_default(),
                tier: row
                    .routing
                    .as_ref()
                    .map(|r| r.tier.clone())
                    .unwrap_or_default(),
                tags: row.tags.clone().unwrap_or_default(),
            };
            rollup.hourly.entry(key.clone()).or_default().add(&sums);
            key.bucket = local_day(row.created_ms, row.time_zone.as_deref());
            rollup.daily.entry(key.clone()).or_default().add(&sums);
            key.key_id.clear();
            key.backend.clear();
            rollup.daily_by_model.entry(key).or_default().add(&sums);
        }
        rollup
    }

    /// Each table with its cells, in key order.
    pub fn tables(&self) -> [(Table, Vec<(&CellKey, &Sums)>); 3] {
        [
            (HOURLY, self.hourly.iter().collect()),
            (DAILY, self.daily.iter().collect()),
            (DAILY_BY_MODEL, self.daily_by_model.iter().collect()),
        ]
    }
}

/// Longest model name a cell keeps: a rollup key must fit an index entry.
const MAX_MODEL_BYTES: usize = 200;

/// The model cell of every request refused because its model matched nothing. The ledger keeps
/// the name the client sent; the rollups do not, or each made-up name would be a new group in
/// every report, without bound.
pub const UNKNOWN_MODEL: &str = "(unknown model)";

/// The model a row counts under: the model that served (a route's chosen model, not the
/// route's public name), or [`UNKNOWN_MODEL`] for a request refused with `model_not_found` (the
/// gateway's only 404 answered before any backend is tried).
fn cell_model(row: &LedgerRow) -> String {
    if row.status == 404 && row.backend.is_none() && row.routing.is_none() {
        return UNKNOWN_MODEL.to_string();
    }
    bounded(row.routing.as_ref().map_or(&row.model, |r| &r.routed_model))
}

fn bounded(model: &str) -> String {
    let mut end = model.len().min(MAX_MODEL_BYTES);
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    model[..end].to_string()
}

/// The calendar day (`YYYYMMDD`) of an instant in a time zone; UTC when the zone is missing or
/// unknown (rows written before zones were recorded).
pub fn local_day(created_ms: i64, time_zone: Option<&str>) -> i64 {
    let tz: chrono_tz::Tz = time_zone
        .and_then(|name| name.parse().ok())
        .unwrap_or(chrono_tz::UTC);
    let date = tz
        .timestamp_millis_opt(created_ms)
        .single()
        .map(|t| t.date_naive())
        .unwrap_or_default();
    day_number(date)
}

/// `YYYYMMDD` as a number: ordered like the dates, readable in SQL.
pub fn day_number(date: chrono::NaiveDate) -> i64 {
    use chrono::Datelike;
    i64::from(date.year()) * 10_000 + i64::from(date.month()) * 100 + i64::from(date.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, created_ms: i64, tz: Option<&str>, cost: i64) -> LedgerRow {
        crate::ledger::test_row(id, created_ms, tz, cost)
    }

    #[test]
    fn days_follow_the_tenant_time_zone() {
        // 2026-11-27 23:30 UTC is already the 28th in Paris and still the 27th in New York.
        let t = 1_795_822_200_000;
        assert_eq!(local_day(t, None), 20261127);
        assert_eq!(local_day(t, Some("Europe/Paris")), 20261128);
        assert_eq!(local_day(t, Some("America/New_York")), 20261127);
        assert_eq!(local_day(t, Some("Not/AZone")), 20261127);
    }

    #[test]
    fn sums_cells() {
        let rows = [
            row("a", 1_795_822_200_000, Some("Europe/Paris"), 100),
            row("b", 1_795_822_300_000, Some("Europe/Paris"), 50),
            row("c", 1_795_825_800_000, Some("Europe/Paris"), 7),
        ];
        let rollup = Rollup::of(rows.iter());
        let [(_, hourly), (_, daily), (_, by_model)] = rollup.tables();
        assert_eq!(hourly.len(), 2, "two UTC hours");
        assert_eq!(hourly[0].1.cost_micros, 150);
        assert_eq!(hourly[0].1.requests, 2);
        assert_eq!(daily.len(), 1, "one Paris day");
        assert_eq!(daily[0].0.bucket, 20261128);
        assert_eq!(daily[0].1.cost_micros, 157);
        assert_eq!(daily[0].1.prompt_tokens, 30);
        assert_eq!(by_model.len(), 1);
        assert_eq!(by_model[0].0.key_id, "");
        assert_eq!(by_model[0].1, daily[0].1);
    }

    #[test]
    fn made_up_model_names_share_one_cell() {
        let mut rows = Vec::new();
        for i in 0..50 {
            let mut refused = row(&format!("r{i}"), 1_795_822_200_000, None, 0);
            refused.model = format!("made-up-{i}");
            refused.status = 404;
            refused.backend = None;
            refused.upstream_model = None;
            rows.push(refused);
        }
        // An upstream 404 names a real model that a backend answered for: it keeps its name.
        let mut upstream = row("u", 1_795_822_200_000, None, 0);
        upstream.status = 404;
        rows.push(upstream);
        let rollup = Rollup::of(rows.iter());
        for (table, cells) in rollup.tables() {
            let models: Vec<&str> = cells.iter().map(|(k, _)| k.model.as_str()).collect();
            assert_eq!(models.len(), 2, "{}: {models:?}", table.name);
            let unknown = cells
                .iter()
                .find(|(k, _)| k.model == UNKNOWN_MODEL)
                .expect("one unknown-model cell");
            assert_eq!(unknown.1.requests, 50);
        }
    }

    #[test]
    fn a_hostile_model_name_is_cut_to_fit_an_index() {
        let mut long = row("x", 0, None, 1);
        long.model = "é".repeat(4000);
        let rollup = Rollup::of([long].iter());
        let [(_, hourly), ..] = rollup.tables();
        assert_eq!(hourly[0].0.model.len(), MAX_MODEL_BYTES);
    }
}
