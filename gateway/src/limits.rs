//! Enforcing budgets and rate limits on the request path.
//!
//! [`Limits::admit`] turns the tenant's policy into [`Charge`]s for this request (its worst case:
//! counted prompt plus the output cap, at the model's price), reserves them all at once, and
//! answers 429 when a hard limit lacks room. [`Admission`] then travels with the request: a
//! stream that outgrows it asks [`Limits::extend`], and the end of the request [`Limits::settle`]s
//! it to what was really used.

use std::sync::Arc;
use std::time::Duration;

use tollgate_billing::budget::{
    window, Charge, Counters, LocalCounters, Period, RedisCounters, Seed, Window,
};
use tollgate_billing::price::{Price, Usage};
use tollgate_billing::report::usd;
use tollgate_billing::store::Store;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::config::{Alerts, Budget, Metric, OnRedisDown, Policy, Tenant};
use crate::proxy::error::ApiError;

/// What a counter measures, for headers and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Measure {
    Micros,
    Tokens,
    Requests,
}

#[derive(Debug, Clone)]
struct Planned {
    charge: Charge,
    measure: Measure,
    /// Per-minute rate limit (rather than a budget).
    rate: bool,
    /// Human description, e.g. "monthly USD budget".
    label: String,
}

/// A request's reservation.
pub struct Admission {
    /// The tenant: the counters' hash tag.
    tag: String,
    alerts: Option<Arc<Alerts>>,
    planned: Vec<Planned>,
    /// Room left on each charge after the reservation.
    rooms: Vec<i64>,
    /// Output tokens covered by the reservation so far.
    pub reserved_output: u64,
    price: Price,
    /// Fell back to this replica's counters because Redis was down.
    local: bool,
    /// Reserved in Redis for a `fail_open` tenant: its settle is also mirrored in this
    /// replica's counters, which enforce its limits if Redis goes away.
    mirror: bool,
}

impl Admission {
    fn none(price: Price) -> Admission {
        Admission {
            tag: String::new(),
            alerts: None,
            planned: Vec::new(),
            rooms: Vec::new(),
            reserved_output: u64::MAX,
            price,
            local: false,
            mirror: false,
        }
    }

    /// Whether anything was reserved (a request under no limit has nothing to settle).
    pub fn is_limited(&self) -> bool {
        !self.planned.is_empty()
    }

    /// `x-ratelimit-*` and `x-tollgate-budget-remaining` headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        let tightest = |measure: Measure, rate: bool| {
            self.planned
                .iter()
                .zip(&self.rooms)
                .filter(|(p, _)| p.measure == measure && p.rate == rate)
                .min_by_key(|(_, room)| **room)
                .map(|(p, room)| (p.charge.limit, (*room).max(0), p.charge.window_end_ms))
        };
        let now = now_ms();
        let rate_headers = [
            (
                Measure::Requests,
                [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
            ),
            (
                Measure::Tokens,
                [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            ),
        ];
        for (measure, [limit_name, remaining_name, reset_name]) in rate_headers {
            if let Some((limit, room, end)) = tightest(measure, true) {
                headers.push((limit_name, limit.to_string()));
                headers.push((remaining_name, room.to_string()));
                headers.push((reset_name, format!("{}s", seconds_until(end, now))));
            }
        }
        if let Some((_, room, _)) = tightest(Measure::Micros, false) {
            headers.push(("x-tollgate-budget-remaining", usd(room)));
        }
        headers
    }
}

/// A budget in its current window: what was counted and what in-flight requests hold.
pub struct BudgetState {
    pub window: Window,
    pub used: i64,
    pub reserved: i64,
}

pub struct Limits {
    shared: Option<RedisCounters>,
    local: LocalCounters,
    hold: Duration,
    http: reqwest::Client,
    /// The background runtime: settles run there, so they outlive the data plane's runtime at
    /// shutdown.
    background: tokio::runtime::Handle,
    /// Settles not finished yet (shutdown waits for them).
    settling: crate::shutdown::Tracker,
    /// This replica's ledger: a rebuild waits for the rows its journal still holds.
    ledger: std::sync::OnceLock<tollgate_billing::ledger::LedgerSender>,
}

/// Longest wait of a counter rebuild for this replica's journal to reach the database.
const REBUILD_JOURNAL_WAIT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn seconds_until(end_ms: i64, now: i64) -> i64 {
    if end_ms == i64::MAX {
        return 0;
    }
    ((end_ms - now).max(0) + 999) / 1000
}

/// Key of a budget's counter for one window.
fn budget_counter(tag: &str, budget: &Budget, window: &Window) -> String {
    format!("tg:{{{tag}}}:b:{}:{}", budget.ident(), window.label)
}

/// Key of a per-minute rate counter (`rpm` or `tpm`) of the tenant (`who` = `*`) or of a key.
fn rate_counter(tag: &str, name: &str, who: &str, minute: &Window) -> String {
    format!("tg:{{{tag}}}:{name}:{who}:{}", minute.label)
}

/// A counter of the current windows and the slice of the ledger that rebuilds it.
struct SeedSpec {
    counter: String,
    window: Window,
    key: Option<String>,
    model: Option<String>,
    measure: Measure,
}

fn seed_specs(tenant: &Tenant, now_ms: i64) -> Vec<SeedSpec> {
    let tag = &tenant.name;
    let mut specs = Vec::new();
    for budget in &tenant.budgets {
        let window = window(budget.period, tenant.time_zone, now_ms);
        let measure = match budget.metric {
            Metric::Usd => Measure::Micros,
            Metric::Tokens => Measure::Tokens,
        };
        let counter = budget_counter(tag, budget, &window);
        specs.push(SeedSpec {
            counter,
            window,
            key: budget.key.clone(),
            model: budget.model.clone(),
            measure,
        });
    }
    let minute = window(Period::Minute, tenant.time_zone, now_ms);
    let mut rates = vec![("*", None, tenant.rpm, tenant.tpm)];
    rates.extend(
        tenant
            .key_limits
            .iter()
            .map(|(key, (rpm, tpm))| (key.as_str(), Some(key.clone()), *rpm, *tpm)),
    );
    for (who, key, rpm, tpm) in rates {
        for (name, limit, measure) in [
            ("rpm", rpm, Measure::Requests),
            ("tpm", tpm, Measure::Tokens),
        ] {
            if limit.is_some() {
                let counter = rate_counter(tag, name, who, &minute);
                specs.push(SeedSpec {
                    counter,
                    window: minute.clone(),
                    key: key.clone(),
                    model: None,
                    measure,
                });
            }
        }
    }
    specs
}

/// The charges a request makes, at `now_ms`: one per applicable budget and rate limit.
fn plan(
    tenant: &Tenant,
    key_id: &str,
    model: &str,
    now_ms: i64,
    usage: Usage,
    price: Price,
) -> Vec<Planned> {
    let tokens = (usage.prompt + usage.completion).min(i64::MAX as u64) as i64;
    let cost = price.cost_micros(usage).min(i64::MAX as u64) as i64;
    let tag = &tenant.name;
    let mut planned = Vec::new();
    for budget in &tenant.budgets {
        if budget.key.as_deref().is_some_and(|k| k != key_id)
            || budget.model.as_deref().is_some_and(|m| m != model)
        {
            continue;
        }
        let w = window(budget.period, tenant.time_zone, now_ms);
        let (measure, amount, unit) = match budget.metric {
            Metric::Usd => (Measure::Micros, cost, "USD"),
            Metric::Tokens => (Measure::Tokens, tokens, "token"),
        };
        let period = budget.period.name();
        planned.push(Planned {
            charge: Charge {
                counter: budget_counter(tag, budget, &w),
                limit: budget.limit,
                amount,
                hard: budget.hard,
                window_end_ms: w.end_ms,
            },
            measure,
            rate: false,
            label: format!("{period} {unit} budget"),
        });
    }
    let minute = window(Period::Minute, tenant.time_zone, now_ms);
    let key_limits = tenant.key_limits.get(key_id).copied().unwrap_or_default();
    let rates = [
        ("tenant", "*", tenant.rpm, tenant.tpm),
        ("key", key_id, key_limits.0, key_limits.1),
    ];
    for (scope, who, rpm, tpm) in rates {
        let mut rate = |name: &str, limit: Option<i64>, amount: i64, measure: Measure| {
            if let Some(limit) = limit {
                planned.push(Planned {
                    charge: Charge {
                        counter: rate_counter(tag, name, who, &minute),
                        limit,
                        amount,
                        hard: true,
                        window_end_ms: minute.end_ms,
                    },
                    measure,
                    rate: true,
                    label: format!("{scope} {} limit", name.to_uppercase()),
                });
            }
        };
        rate("rpm", rpm, 1, Measure::Requests);
        rate("tpm", tpm, tokens, Measure::Tokens);
    }
    planned
}

impl Limits {
    pub fn new(policy: &Policy) -> anyhow::Result<Limits> {
        let shared = match &policy.redis_url {
            Some(url) => Some(RedisCounters::new(url, policy.redis_timeout)?),
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Limits {
            shared,
            local: LocalCounters::default(),
            hold: policy.reservation_ttl,
            http,
            background: tokio::runtime::Handle::current(),
            settling: Default::default(),
            ledger: std::sync::OnceLock::new(),
        })
    }

    /// Rebuilds from now on also wait until this replica's journal has handed the database
    /// every row that ended before their epoch (after a database outage it may hold many).
    pub fn watch_ledger(&self, ledger: tollgate_billing::ledger::LedgerSender) {
        let _ = self.ledger.set(ledger);
    }

    /// Waits until every settle started so far is done (or `timeout` passes); true when none
    /// is left.
    pub async fn settled(&self, timeout: Duration) -> bool {
        self.settling.idle(timeout).await
    }

    /// The live state of one of a tenant's budgets.
    pub async fn budget_state(
        &self,
        tenant: &Tenant,
        budget: &Budget,
    ) -> Result<BudgetState, tollgate_billing::budget::Unavailable> {
        let window = window(budget.period, tenant.time_zone, now_ms());
        let (used, reserved) = self
            .store(false)
            .read(&budget_counter(&tenant.name, budget, &window))
            .await?;
        Ok(BudgetState {
            window,
            used,
            reserved,
        })
    }

    /// How much of its tightest USD budget (not limited to one model) a tenant's key has used or
    /// holds, as a fraction; `None` without such budgets or when the counters cannot be read.
    pub async fn budget_utilization(&self, tenant: &Tenant, key_id: &str) -> Option<f32> {
        let now = now_ms();
        let mut tightest: Option<f32> = None;
        for budget in &tenant.budgets {
            if budget.metric != Metric::Usd
                || budget.model.is_some()
                || budget.key.as_deref().is_some_and(|k| k != key_id)
            {
                continue;
            }
            let w = window(budget.period, tenant.time_zone, now);
            let (used, held) = self
                .store(false)
                .read(&budget_counter(&tenant.name, budget, &w))
                .await
                .ok()?;
            let share = (used + held) as f32 / budget.limit.max(1) as f32;
            tightest = Some(tightest.map_or(share, |t: f32| t.max(share)));
        }
        tightest
    }

    /// Rebuilds from the ledger the counters of every tenant whose counters need it (a cold or
    /// flushed Redis; at start, this replica's own counters). `lag`: how long a finished
    /// request's ledger row may take to reach the database.
    pub async fn rebuild(&self, policy: &Policy, store: &Store, lag: Duration, local: bool) {
        for tenant in policy.tenants.values().filter(|t| t.has_limits()) {
            if let Err(e) = self
                .rebuild_tenant(self.store(local), tenant, store, lag)
                .await
            {
                tracing::warn!(tenant = %tenant.name, "rebuilding budget counters failed: {e:#}");
            }
        }
    }

    async fn rebuild_tenant(
        &self,
        counters: &dyn Counters,
        tenant: &Tenant,
        store: &Store,
        lag: Duration,
    ) -> anyhow::Result<()> {
        let Some(epoch) = counters.begin_seed(&tenant.name, now_ms()).await? else {
            return Ok(());
        };
        // Requests that ended before the epoch must all be in the ledger before it is summed.
        let wait = epoch + lag.as_millis() as i64 - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        if let Some(ledger) = self.ledger.get() {
            // Rows journaled after `epoch + lag` belong to requests that ended after the epoch
            // (their settles count them); older ones must be in the database before the sum.
            let cut = epoch + lag.as_millis() as i64;
            let written = crate::shutdown::wait_until(REBUILD_JOURNAL_WAIT, || {
                ledger.stats().oldest_pending_ms().is_none_or(|at| at > cut)
            })
            .await;
            if !written {
                tracing::warn!(tenant = %tenant.name, "rebuilding counters while this replica's journal still holds rows the database has not taken; the counters may be low until the next rebuild");
            }
        }
        let mut seeds = Vec::new();
        for spec in seed_specs(tenant, epoch) {
            let (requests, tokens, cost) = store
                .sum_usage(
                    &tenant.name,
                    spec.key.as_deref(),
                    spec.model.as_deref(),
                    spec.window.start_ms,
                    spec.window.end_ms,
                    epoch,
                )
                .await?;
            let amount = match spec.measure {
                Measure::Micros => cost,
                Measure::Tokens => tokens,
                Measure::Requests => requests,
            };
            seeds.push(Seed {
                counter: spec.counter,
                amount,
                window_end_ms: spec.window.end_ms,
            });
        }
        counters.finish_seed(&tenant.name, &seeds).await?;
        tracing::info!(tenant = %tenant.name, counters = seeds.len(), "budget counters rebuilt from the ledger");
        Ok(())
    }

    fn store(&self, local: bool) -> &dyn Counters {
        match (&self.shared, local) {
            (Some(redis), false) => redis,
            _ => &self.local,
        }
    }

    /// Reserves the worst case of a request, or says why it may not proceed.
    #[allow(clippy::too_many_arguments)]
    pub async fn admit(
        &self,
        tenant: &Tenant,
        key_id: &str,
        model: &str,
        request_id: &str,
        prompt_tokens: u64,
        output_tokens: u64,
        price: Price,
    ) -> Result<Admission, ApiError> {
        if !tenant.has_limits() {
            return Ok(Admission::none(price));
        }
        let now = now_ms();
        let worst = Usage {
            prompt: prompt_tokens,
            cached: 0,
            completion: output_tokens,
        };
        let planned = plan(tenant, key_id, model, now, worst, price);
        if planned.is_empty() {
            return Ok(Admission::none(price));
        }
        let charges: Vec<Charge> = planned.iter().map(|p| p.charge.clone()).collect();
        let hold_until = now + self.hold.as_millis() as i64;
        let mut local = false;
        let result = match self
            .store(false)
            .reserve(&tenant.name, request_id, &charges, now, hold_until)
            .await
        {
            Ok(result) => result,
            Err(unavailable) => match tenant.on_redis_down {
                OnRedisDown::FailClosed => {
                    tracing::warn!(tenant = %tenant.name, "{unavailable}; refusing (fail_closed)");
                    return Err(ApiError::limits_unavailable());
                }
                OnRedisDown::FailOpen => {
                    tracing::warn!(tenant = %tenant.name, "{unavailable}; using this replica's counters (fail_open)");
                    local = true;
                    self.local
                        .reserve(&tenant.name, request_id, &charges, now, hold_until)
                        .await
                        .map_err(|_| ApiError::limits_unavailable())?
                }
            },
        };
        match result {
            Ok(rooms) => Ok(Admission {
                tag: tenant.name.clone(),
                alerts: tenant.alerts.clone(),
                planned,
                rooms,
                reserved_output: output_tokens,
                price,
                local,
                mirror: !local
                    && self.shared.is_some()
                    && tenant.on_redis_down == OnRedisDown::FailOpen,
            }),
            Err(denied) => {
                let p = &planned[denied.index];
                let retry_after = seconds_until(p.charge.window_end_ms, now);
                let room = denied.room.max(0);
                let (needed, left) = match p.measure {
                    Measure::Micros => (
                        format!("${}", usd(p.charge.amount)),
                        format!("${}", usd(room)),
                    ),
                    Measure::Tokens => (
                        format!("{} tokens", p.charge.amount),
                        format!("{room} tokens"),
                    ),
                    Measure::Requests => ("1 request".to_string(), format!("{room} requests")),
                };
                let message = format!(
                    "The {} of tenant `{}` has {left} left; this request may need up to {needed}.",
                    p.label, tenant.name
                );
                Err(if p.rate {
                    ApiError::rate_limited(message, p.measure == Measure::Requests, retry_after)
                } else {
                    ApiError::budget_exceeded(message, retry_after)
                })
            }
        }
    }

    /// Reserves `extra_output` more output tokens for a request that outgrew its reservation,
    /// on the same counters (windows stay those of the request's start).
    pub async fn extend(
        &self,
        admission: &mut Admission,
        request_id: &str,
        extra_output: u64,
    ) -> bool {
        if !admission.is_limited() {
            return true;
        }
        let extra = Usage {
            prompt: 0,
            cached: 0,
            completion: extra_output,
        };
        let cost = admission.price.cost_micros(extra).min(i64::MAX as u64) as i64;
        let charges: Vec<Charge> = admission
            .planned
            .iter()
            .map(|p| Charge {
                amount: match p.measure {
                    Measure::Micros => cost,
                    Measure::Tokens => extra_output.min(i64::MAX as u64) as i64,
                    Measure::Requests => 0,
                },
                ..p.charge.clone()
            })
            .collect();
        let tag = admission.tag.clone();
        let now = now_ms();
        let hold_until = now + self.hold.as_millis() as i64;
        match self
            .store(admission.local)
            .reserve(&tag, request_id, &charges, now, hold_until)
            .await
        {
            Ok(Ok(rooms)) => {
                admission.rooms = rooms;
                admission.reserved_output = admission.reserved_output.saturating_add(extra_output);
                true
            }
            Ok(Err(_)) => false,
            Err(unavailable) => {
                tracing::warn!("cannot extend a reservation: {unavailable}");
                false
            }
        }
    }

    /// Sends each budget threshold that the settle just reached, once per budget period across
    /// all replicas (the store keeps the markers).
    async fn alert(&self, admission: &Admission, charges: &[Charge], totals: &[i64]) {
        let Some(alerts) = &admission.alerts else {
            return;
        };
        for ((planned, charge), total) in admission.planned.iter().zip(charges).zip(totals) {
            if planned.rate || charge.limit <= 0 {
                continue;
            }
            let percent = (i128::from(*total) * 100 / i128::from(charge.limit)) as i64;
            for threshold in alerts
                .thresholds
                .iter()
                .filter(|t| percent >= i64::from(**t))
            {
                let marker = format!("{}:alert:{threshold}", charge.counter);
                let expire_at = if charge.window_end_ms == i64::MAX {
                    i64::MAX / 2
                } else {
                    charge.window_end_ms + 86_400_000
                };
                match self
                    .store(admission.local)
                    .first_alert(&admission.tag, &marker, expire_at)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!("cannot record a budget alert: {e}");
                        continue;
                    }
                }
                let window = charge.counter.rsplit(':').next().unwrap_or_default();
                let unit = if planned.measure == Measure::Micros {
                    "usd_micros"
                } else {
                    "tokens"
                };
                let body = json!({
                    "type": "budget.threshold",
                    "tenant": admission.tag,
                    "budget": planned.label,
                    "mode": if charge.hard { "hard" } else { "soft" },
                    "window": window,
                    "threshold_percent": threshold,
                    "used": total,
                    "limit": charge.limit,
                    "unit": unit,
                    "sent_at": chrono::Utc::now().to_rfc3339(),
                });
                self.send_alert(alerts, body.to_string()).await;
            }
        }
    }

    /// POSTs an alert signed with HMAC-SHA256 (`x-tollgate-signature: sha256=<hex>`), retrying
    /// a few times.
    async fn send_alert(&self, alerts: &Alerts, body: String) {
        let Some(secret) = &alerts.secret else {
            tracing::error!("budget alert not sent: no signing secret configured");
            return;
        };
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(body.as_bytes());
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        for attempt in 0..3u32 {
            let sent = self
                .http
                .post(&alerts.webhook_url)
                .header("content-type", "application/json")
                .header("x-tollgate-signature", &signature)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => tracing::warn!(status = %r.status(), "budget alert webhook refused"),
                Err(e) => tracing::warn!("budget alert webhook failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt))).await;
        }
        tracing::error!("budget alert dropped after retries");
    }

    /// Replaces the reservation by the real usage. Runs in the background and retries while the
    /// store is unreachable (settle is idempotent per request id).
    pub fn settle(
        self: &Arc<Self>,
        admission: Admission,
        request_id: String,
        usage: Usage,
        ended_ms: i64,
    ) {
        if !admission.is_limited() {
            return;
        }
        let tokens = (usage.prompt + usage.completion).min(i64::MAX as u64) as i64;
        let cost = admission.price.cost_micros(usage).min(i64::MAX as u64) as i64;
        let charges: Vec<Charge> = admission
            .planned
            .iter()
            .map(|p| Charge {
                amount: match p.measure {
                    Measure::Micros => cost,
                    Measure::Tokens => tokens,
                    Measure::Requests => 1,
                },
                ..p.charge.clone()
            })
            .collect();
        if admission.mirror {
            // This replica's own counters keep its spend, for fail_open while Redis is away.
            self.local.mirror(&charges, now_ms());
        }
        let limits = self.clone();
        // Dropped with the task, run or not: shutdown never waits for a settle that is gone.
        let settling = self.settling.track();
        self.background.spawn(async move {
            let _settling = settling;
            let tag = &admission.tag;
            // The store that reserved settles first (its totals drive the alerts).
            let Some(totals) = limits
                .settle_retrying(admission.local, tag, &request_id, &charges, ended_ms)
                .await
            else {
                tracing::error!(%request_id, "settle abandoned; the hold expires on its own");
                return;
            };
            limits.alert(&admission, &charges, &totals).await;
            // A request admitted on this replica's counters while Redis was away is also
            // settled in Redis once it is back: the script ignores it if the rebuild's ledger
            // sum has it.
            if admission.local
                && limits.shared.is_some()
                && limits
                    .settle_retrying(false, tag, &request_id, &charges, ended_ms)
                    .await
                    .is_none()
            {
                tracing::error!(%request_id, "settle in Redis of a request served while it was away abandoned; the counter misses it until its next rebuild");
            }
        });
    }

    /// Settles on one store, retrying with backoff (about six minutes in all); the totals, or
    /// `None` when it never went through.
    async fn settle_retrying(
        &self,
        local: bool,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        ended_ms: i64,
    ) -> Option<Vec<i64>> {
        let mut pause = Duration::from_millis(100);
        for _ in 0..20 {
            match self
                .store(local)
                .settle(tag, request_id, charges, ended_ms)
                .await
            {
                Ok(totals) => return Some(totals),
                Err(e) => tracing::warn!(%request_id, "settle failed, retrying: {e}"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(yaml_tenant: &str) -> (Policy, String) {
        let yaml = format!(
            "backends: [{{ name: b, base_url: \"http://127.0.0.1:1\" }}]\nmodels:\n  - {{ name: m, price: {{ input: 1, output: 1 }}, targets: [{{ backend: b, model: m }}] }}\ntenants:\n{yaml_tenant}"
        );
        (Policy::from_yaml(&yaml).unwrap(), "t".to_string())
    }

    fn ms(rfc3339: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[tokio::test]
    async fn a_monthly_budget_resets_at_the_tenants_local_midnight() {
        let (policy, name) =
            tenant("  - { name: t, time_zone: Asia/Tokyo, budgets: [{ limit_tokens: 100, period: monthly }] }\n");
        let tenant = &policy.tenants[&name];
        let counters = LocalCounters::default();
        let price = Price {
            input: 1_000_000,
            cached_input: 1_000_000,
            output: 1_000_000,
        };
        let usage = Usage {
            prompt: 60,
            cached: 0,
            completion: 0,
        };
        let reserve = |now: i64, id: &'static str| {
            let charges: Vec<Charge> = plan(tenant, "k", "m", now, usage, price)
                .into_iter()
                .map(|p| p.charge)
                .collect();
            let counters = &counters;
            async move {
                counters
                    .reserve("t", id, &charges, now, now + 3_600_000)
                    .await
                    .unwrap()
                    .is_ok()
            }
        };
        // 23:58 and 23:59 in Tokyo on Nov 30: the second request does not fit November's budget.
        assert!(reserve(ms("2026-11-30T14:58:00Z"), "a").await);
        assert!(!reserve(ms("2026-11-30T14:59:00Z"), "b").await);
        // One minute later it is December in Tokyo (still November in UTC): a fresh budget.
        assert!(reserve(ms("2026-11-30T15:00:00Z"), "c").await);
        assert!(!reserve(ms("2026-11-30T15:01:00Z"), "d").await);
    }

    #[test]
    fn charges_follow_key_and_model_scopes() {
        let (policy, name) = tenant(
            "  - name: t\n    rpm: 10\n    key_limits: [{ key: k1, tpm: 50 }]\n    budgets:\n      - { limit_usd: 1, period: daily }\n      - { limit_tokens: 5, period: total, key: k2 }\n      - { limit_tokens: 5, period: total, model: m, mode: soft }\n",
        );
        let tenant = &policy.tenants[&name];
        let usage = Usage {
            prompt: 3,
            cached: 0,
            completion: 4,
        };
        let labels = |key: &str| -> Vec<String> {
            plan(tenant, key, "m", 0, usage, Price::default())
                .into_iter()
                .map(|p| p.label)
                .collect()
        };
        assert_eq!(
            labels("k1"),
            [
                "daily USD budget",
                "total token budget",
                "tenant RPM limit",
                "key TPM limit"
            ]
        );
        assert_eq!(
            labels("k2"),
            [
                "daily USD budget",
                "total token budget",
                "total token budget",
                "tenant RPM limit"
            ]
        );
        let soft = plan(tenant, "k1", "m", 0, usage, Price::default());
        assert!(!soft[1].charge.hard);
        assert_eq!(soft[1].charge.amount, 7);
    }
}
