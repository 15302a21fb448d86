//! What each admin call does, apart from HTTP: the admin API's handlers and the CLI's
//! `tenants|keys|budgets|usage|export` commands both call these, so they answer the same.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use serde_json::{json, Value};
use tollgate_billing::budget::Tz;
use tollgate_billing::report::{self, Dimension, RoutingReport, UsageQuery, UsageReport};
use tollgate_billing::store::{KeyRecord, Rotation, Store};

use crate::config::{Metric, Policy, Tenant};
use crate::keys::{self, Created};
use crate::limits::Limits;
use crate::proxy::error::ApiError;

/// Default and longest grace period of a rotation.
const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
const MAX_GRACE: Duration = Duration::from_secs(30 * 86_400);
/// Default report range: this many days, ending today.
const DEFAULT_DAYS: u64 = 30;

fn internal(e: anyhow::Error) -> ApiError {
    tracing::error!("admin call failed: {e:#}");
    ApiError::new(
        500,
        "server_error",
        "internal_error",
        "The admin call failed; the gateway log has the cause.",
    )
}

pub fn not_found(what: &str, name: &str) -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        "not_found",
        format!("No {what} `{name}`."),
    )
}

fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(409, "invalid_request_error", code, message)
}

fn rfc3339(ms: Option<i64>) -> Value {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or(Value::Null, |t| json!(t.to_rfc3339()))
}

// ---- tenants

pub fn tenants(policy: &Policy, only: Option<&str>) -> Result<Value, ApiError> {
    let mut names: Vec<&String> = policy.tenants.keys().collect();
    names.sort();
    let mut data = Vec::new();
    for name in names {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        data.push(tenant_json(&policy.tenants[name]));
    }
    if let Some(name) = only {
        return data.pop().ok_or_else(|| not_found("tenant", name));
    }
    Ok(json!({ "data": data }))
}

fn tenant_json(t: &Tenant) -> Value {
    let tags: Value = t
        .tags_json
        .as_deref()
        .and_then(|tags| serde_json::from_str(tags).ok())
        .unwrap_or_else(|| json!({}));
    let mut models: Option<Vec<&String>> = t.models.as_ref().map(|m| m.iter().collect());
    if let Some(models) = &mut models {
        models.sort();
    }
    let budgets: Vec<Value> = t
        .budgets
        .iter()
        .map(|b| {
            json!({
                "id": b.ident(), "metric": b.metric.name(), "period": b.period.name(),
                "limit": b.limit, "hard": b.hard, "key": b.key, "model": b.model,
            })
        })
        .collect();
    json!({
        "name": t.name,
        "time_zone": t.time_zone.name(),
        "tags": tags,
        "models": models,
        "rpm": t.rpm,
        "tpm": t.tpm,
        "budgets": budgets,
        "alert_thresholds": thresholds(t),
    })
}

/// Alert thresholds in percent; without alerts, the dashboard's default marks.
fn thresholds(t: &Tenant) -> Vec<u32> {
    t.alerts
        .as_ref()
        .map_or_else(|| vec![80, 100], |a| a.thresholds.clone())
}

// ---- keys

pub fn key_json(key: &KeyRecord) -> Value {
    let now = chrono::Utc::now().timestamp_millis();
    json!({
        "id": key.id,
        "tenant": key.tenant,
        "name": key.name,
        "prefix": key.prefix,
        "status": if key.revoked_ms.is_some() { "revoked" } else { "active" },
        "created_at": rfc3339(Some(key.created_ms)),
        "revoked_at": rfc3339(key.revoked_ms),
        "rotated_at": rfc3339(key.rotated_ms),
        // Only while the previous secret still works.
        "previous_expires_at": rfc3339(key.previous_expires_ms.filter(|&e| e > now)),
        "idempotency_key": key.idempotency_key,
    })
}

pub async fn list_keys(store: &Store, tenant: Option<&str>) -> Result<Value, ApiError> {
    let keys = store.keys_changed_since(0).await.map_err(internal)?;
    let mut data: Vec<&KeyRecord> = keys
        .iter()
        .filter(|k| tenant.is_none_or(|t| t == k.tenant))
        .collect();
    data.sort_by(|a, b| (&a.tenant, a.created_ms, &a.id).cmp(&(&b.tenant, b.created_ms, &b.id)));
    Ok(json!({ "data": data.into_iter().map(key_json).collect::<Vec<_>>() }))
}

pub async fn get_key(store: &Store, id: &str) -> Result<Value, ApiError> {
    match store.key(id).await.map_err(internal)? {
        Some(key) => Ok(key_json(&key)),
        None => Err(not_found("key", id)),
    }
}

/// Creates a key. `(true, body)` when a key was made (body has its secret), `(false, body)`
/// when the idempotency key had made it already (no secret).
pub async fn create_key(
    policy: &Policy,
    store: &Store,
    tenant: &str,
    name: Option<&str>,
    idempotency_key: Option<&str>,
) -> Result<(bool, Value), ApiError> {
    if !policy.tenants.contains_key(tenant) {
        return Err(
            ApiError::bad_request(format!("tenant `{tenant}` is not in the policy file"))
                .with_param("tenant"),
        );
    }
    if idempotency_key.is_some_and(|k| k.is_empty() || k.len() > 200) {
        return Err(
            ApiError::bad_request("idempotency_key must be 1 to 200 characters")
                .with_param("idempotency_key"),
        );
    }
    match keys::create_key(store, tenant, name, idempotency_key)
        .await
        .map_err(internal)?
    {
        Created::New(key, secret) => Ok((true, json!({ "key": key_json(&key), "secret": secret }))),
        Created::Existing(key) if key.tenant == tenant && key.name.as_deref() == name => Ok((
            false,
            json!({ "key": key_json(&key), "secret": null, "replayed": true }),
        )),
        Created::Existing(_) => Err(conflict(
            "idempotency_key_reused",
            "This idempotency key created a different key (another tenant or name).",
        )),
    }
}

pub async fn rotate_key(
    store: &Store,
    id: &str,
    grace_seconds: Option<u64>,
    rotation_key: Option<&str>,
) -> Result<Value, ApiError> {
    let grace = grace_seconds.map_or(DEFAULT_GRACE, Duration::from_secs);
    if grace > MAX_GRACE {
        return Err(ApiError::bad_request(format!(
            "grace_seconds may be at most {}",
            MAX_GRACE.as_secs()
        ))
        .with_param("grace_seconds"));
    }
    let (rotation, secret) = keys::rotate_key(store, id, grace, rotation_key)
        .await
        .map_err(internal)?;
    match rotation {
        Rotation::Rotated(key) => Ok(json!({ "key": key_json(&key), "secret": secret })),
        Rotation::Replayed(key) => {
            Ok(json!({ "key": key_json(&key), "secret": null, "replayed": true }))
        }
        Rotation::NotFound => Err(not_found("key", id)),
        Rotation::Revoked => Err(conflict(
            "key_revoked",
            format!("Key `{id}` is revoked; create a new one instead."),
        )),
    }
}

/// Revokes a key; revoking a revoked key changes nothing and succeeds.
pub async fn revoke_key(store: &Store, id: &str) -> Result<Value, ApiError> {
    store.revoke_key(id).await.map_err(internal)?;
    get_key(store, id).await
}

// ---- budgets

pub async fn budgets(
    policy: &Policy,
    limits: &Limits,
    only: Option<&str>,
) -> Result<Value, ApiError> {
    if let Some(name) = only {
        if !policy.tenants.contains_key(name) {
            return Err(not_found("tenant", name));
        }
    }
    let mut names: Vec<&String> = policy.tenants.keys().collect();
    names.sort();
    let mut data = Vec::new();
    for name in names.into_iter().filter(|n| only.is_none_or(|o| o == *n)) {
        let tenant = &policy.tenants[name];
        for budget in &tenant.budgets {
            let mut item = json!({
                "tenant": name,
                "id": budget.ident(),
                "metric": budget.metric.name(),
                "unit": if budget.metric == Metric::Usd { "usd_micros" } else { "tokens" },
                "period": budget.period.name(),
                "hard": budget.hard,
                "key": budget.key,
                "model": budget.model,
                "limit": budget.limit,
                "thresholds": thresholds(tenant),
            });
            let live = match limits.budget_state(tenant, budget).await {
                Ok(state) => json!({
                    "used": state.used,
                    "reserved": state.reserved,
                    "remaining": (budget.limit - state.used - state.reserved).max(0),
                    "utilization": (state.used + state.reserved) as f64 / budget.limit.max(1) as f64,
                    "period_start": rfc3339(Some(state.window.start_ms).filter(|&s| s > 0)),
                    "period_end": rfc3339(Some(state.window.end_ms).filter(|&e| e != i64::MAX)),
                }),
                Err(e) => json!({
                    "used": null, "reserved": null, "remaining": null, "utilization": null,
                    "period_start": null, "period_end": null, "error": e.to_string(),
                }),
            };
            if let (Value::Object(item), Value::Object(live)) = (&mut item, live) {
                item.extend(live);
            }
            data.push(item);
        }
    }
    Ok(json!({ "data": data }))
}

// ---- reports

/// Report parameters as given (query string or CLI flags).
#[derive(Debug, Default)]
pub struct ReportParams {
    pub from: Option<String>,
    pub to: Option<String>,
    pub tenant: Option<String>,
    pub key: Option<String>,
    pub model: Option<String>,
    pub group_by: Option<String>,
    /// Where days begin for hourly reports over several tenants.
    pub tz: Option<String>,
}

impl ReportParams {
    /// From a query string; a parameter that is not one of these (or `also`) is refused, so a
    /// misspelt filter never silently widens a report.
    pub fn from_query(
        query: &HashMap<String, String>,
        also: &[&str],
    ) -> Result<ReportParams, ApiError> {
        const KNOWN: [&str; 7] = ["from", "to", "tenant", "key", "model", "group_by", "tz"];
        if let Some(unknown) = query
            .keys()
            .find(|k| !KNOWN.contains(&k.as_str()) && !also.contains(&k.as_str()))
        {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{unknown}`"
            )));
        }
        let get = |name: &str| query.get(name).filter(|v| !v.is_empty()).cloned();
        Ok(ReportParams {
            from: get("from"),
            to: get("to"),
            tenant: get("tenant"),
            key: get("key"),
            model: get("model"),
            group_by: get("group_by"),
            tz: get("tz"),
        })
    }

    pub fn query(
        &self,
        policy: &Policy,
        group_by: Option<Vec<Dimension>>,
    ) -> Result<UsageQuery, ApiError> {
        let date = |text: &Option<String>, param: &'static str| {
            text.as_deref()
                .map(|t| {
                    NaiveDate::parse_from_str(t, "%Y-%m-%d")
                        .ok()
                        .filter(|d| (2000..=9999).contains(&d.year()))
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "`{param}` must be a date from 2000 to 9999, YYYY-MM-DD"
                            ))
                            .with_param(param)
                        })
                })
                .transpose()
        };
        let tenant = match &self.tenant {
            Some(name) => Some(
                policy
                    .tenants
                    .get(name)
                    .ok_or_else(|| not_found("tenant", name))?,
            ),
            None => None,
        };
        let zone: Tz = match (&self.tz, tenant) {
            (Some(tz), _) => tz.parse().map_err(|_| {
                ApiError::bad_request(format!("`{tz}` is not an IANA time zone")).with_param("tz")
            })?,
            (None, Some(t)) => t.time_zone,
            (None, None) => chrono_tz::UTC,
        };
        // Today where it is latest: without a tenant filter, the default range still holds the
        // day that tenants east of UTC have already begun.
        let now = chrono::Utc::now();
        let today = match (tenant, &self.tz) {
            (None, None) => policy
                .tenants
                .values()
                .map(|t| now.with_timezone(&t.time_zone).date_naive())
                .max()
                .unwrap_or_else(|| now.date_naive()),
            _ => now.with_timezone(&zone).date_naive(),
        };
        let to = date(&self.to, "to")?.unwrap_or(today);
        let from = date(&self.from, "from")?.unwrap_or_else(|| {
            to.checked_sub_days(chrono::Days::new(DEFAULT_DAYS - 1))
                .unwrap_or(to)
        });
        let group_by = match group_by {
            Some(fixed) => fixed,
            None => self
                .group_by
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(|g| {
                    Dimension::parse(g).map_err(|e| ApiError::bad_request(e).with_param("group_by"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let query = UsageQuery {
            from,
            to,
            tenant: self.tenant.clone(),
            key: self.key.clone(),
            model: self.model.clone(),
            group_by,
            hour_zone: zone,
        };
        query.validate().map_err(ApiError::bad_request)?;
        Ok(query)
    }
}

async fn run(store: &Store, query: &UsageQuery, with_tags: bool) -> Result<UsageReport, ApiError> {
    store.usage(query, with_tags).await.map_err(internal)
}

pub async fn usage(
    policy: &Policy,
    store: &Store,
    params: &ReportParams,
) -> Result<Value, ApiError> {
    let query = params.query(policy, None)?;
    let report = run(store, &query, false).await?;
    Ok(json!({
        "from": query.from.to_string(),
        "to": query.to.to_string(),
        "group_by": query.group_by.iter().map(Dimension::name).collect::<Vec<_>>(),
        "data": report.json_rows(),
        "totals": report.totals,
    }))
}

pub async fn routing(
    policy: &Policy,
    store: &Store,
    params: &ReportParams,
) -> Result<Value, ApiError> {
    let query = params.query(policy, Some(vec![Dimension::Tier]))?;
    let report = RoutingReport::from_tiers(&run(store, &query, false).await?);
    let mut body = serde_json::to_value(report).expect("report serialises");
    body["from"] = json!(query.from.to_string());
    body["to"] = json!(query.to.to_string());
    Ok(body)
}

/// Chargeback export: `(file name, CSV)`; `focus` picks the FOCUS-style columns.
pub async fn chargeback(
    policy: &Policy,
    store: &Store,
    params: &ReportParams,
    focus: bool,
) -> Result<(String, String), ApiError> {
    let by = vec![Dimension::Day, Dimension::Tenant, Dimension::Model];
    let query = params.query(policy, Some(by))?;
    let report = run(store, &query, focus).await?;
    let kind = if focus { "focus" } else { "chargeback" };
    let name = format!("tollgate-{kind}-{}-{}.csv", query.from, query.to);
    let csv = if focus {
        report::focus_csv(&report, |tenant| {
            policy
                .tenants
                .get(tenant)
                .map_or(chrono_tz::UTC, |t| t.time_zone)
        })
    } else {
        report::chargeback_csv(&report)
    };
    Ok((name, csv))
}
