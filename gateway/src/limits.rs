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
    amount, window, Added, Charge, CounterSeed, Counters, Facts, LocalCounters, Measure, Period,
    RedisCounters, Seed, Window,
};

use crate::abandoned::{Abandoned, AbandonedSettles};
use tollgate_billing::price::{Price, Usage};
use tollgate_billing::report::usd;
use tollgate_billing::store::Store;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::config::{Alerts, Budget, Metric, OnRedisDown, Policy, Tenant};
use crate::proxy::error::ApiError;

#[derive(Debug, Clone)]
struct Planned {
    charge: Charge,
    measure: Measure,
    /// Per-minute rate limit (rather than a budget).
    rate: bool,
    /// A rate limit's counter key without its minute: an extension charges the minute its
    /// tokens are produced in, which may be a later one than the request's start.
    minute_definition: Option<String>,
    /// Human description, e.g. "monthly USD budget".
    label: String,
}

/// What [`Limits::extend`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// The reservation now covers the extra output.
    Granted,
    /// A hard limit has no room for it.
    Exhausted,
    /// The counters cannot be reached and the tenant's policy is to fail closed.
    Unavailable,
}

/// A hold of an extension on a counter other than its limit's own (a later minute of a rate
/// limit).
#[derive(Debug, Clone)]
struct ExtraHold {
    /// Index in `Admission::planned`.
    planned: usize,
    /// The counter, its window's end and the amount held on it (`amount`).
    charge: Charge,
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
    /// The tenant's time zone (minute windows of extensions).
    time_zone: tollgate_billing::budget::Tz,
    /// Holds of extensions on counters other than `planned`'s (whose `charge.amount` is what is
    /// held on them, extensions included), in the order they were made.
    extra: Vec<ExtraHold>,
    /// The request's key, the model charged and when it was admitted: counters that a policy
    /// reload adds while it runs count it from these at its settle.
    key_id: String,
    model: String,
    admitted_ms: i64,
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
            time_zone: tollgate_billing::budget::Tz::UTC,
            extra: Vec::new(),
            key_id: String::new(),
            model: String::new(),
            admitted_ms: 0,
        }
    }

    /// What the request used, as counters count it (and what counters added by a reload while
    /// it ran need to know of it).
    fn facts(&self, usage: Usage) -> Facts {
        let (tokens, cost) = measured(usage, self.price);
        Facts {
            created_ms: self.admitted_ms,
            key: self.key_id.clone(),
            model: self.model.clone(),
            tokens,
            cost,
        }
    }

    /// Adds an extension's `charge` to the holds of limit `planned`.
    fn hold(&mut self, planned: usize, charge: &Charge) {
        let own = &mut self.planned[planned].charge;
        if own.counter == charge.counter {
            own.amount = own.amount.saturating_add(charge.amount);
        } else if let Some(extra) = self
            .extra
            .iter_mut()
            .find(|e| e.planned == planned && e.charge.counter == charge.counter)
        {
            extra.charge.amount = extra.charge.amount.saturating_add(charge.amount);
        } else {
            self.extra.push(ExtraHold {
                planned,
                charge: charge.clone(),
            });
        }
    }

    /// The settle's charges for real `usage`: one per limit on its own counter first (in
    /// `planned`'s order: the alerts read them), then one per extra hold. A limit whose
    /// extensions held other counters splits its real amount over them in the order they were
    /// reserved, each taking at most what it held and the last the rest, so every hold is
    /// released and the tokens land in the minute that held them.
    fn settle_charges(&self, facts: &Facts) -> Vec<Charge> {
        let mut charges = Vec::with_capacity(self.planned.len() + self.extra.len());
        let mut extra = Vec::with_capacity(self.extra.len());
        for (index, p) in self.planned.iter().enumerate() {
            let mut left = p.measure.of(1, facts.tokens, facts.cost);
            let mut holds: Vec<&Charge> = self
                .extra
                .iter()
                .filter(|e| e.planned == index)
                .map(|e| &e.charge)
                .collect();
            let mut take = |held: i64, last: bool| {
                let amount = if last { left } else { left.min(held.max(0)) };
                left -= amount;
                amount
            };
            charges.push(Charge {
                amount: take(p.charge.amount, holds.is_empty()),
                ..p.charge.clone()
            });
            let last = holds.pop();
            for hold in holds {
                extra.push(Charge {
                    amount: take(hold.amount, false),
                    ..hold.clone()
                });
            }
            if let Some(hold) = last {
                extra.push(Charge {
                    amount: take(hold.amount, true),
                    ..hold.clone()
                });
            }
        }
        charges.extend(extra);
        charges
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

/// A counter this replica is to seed ([`Limits::begin_seeds`]).
struct PendingSeed<'a> {
    counters: &'a dyn Counters,
    tenant: &'a Tenant,
    spec: SeedSpec,
    cut: i64,
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
    /// How long a settle is retried before it is abandoned to `abandoned`.
    settle_retry: Duration,
    /// Settles Redis never took, kept (next to the ledger journal) until it does.
    abandoned: Arc<AbandonedSettles>,
    /// One pass of [`Limits::seed_counters`] at a time in this process.
    seeding: tokio::sync::Mutex<()>,
    /// Set at shutdown: settles still retrying stop and are kept on disk.
    stop_retrying: tokio::sync::watch::Sender<bool>,
}

/// Overrides how long a settle is retried (milliseconds; tests shorten it).
const SETTLE_RETRY_ENV: &str = "TOLLGATE_SETTLE_RETRY_MS";
/// How long a settle is retried by default before it is kept on disk.
const SETTLE_RETRY: Duration = Duration::from_secs(360);
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

/// A counter's key: its definition (the key without its window) and its window.
fn counter_key(definition: &str, window: &Window) -> String {
    format!("{definition}:{}", window.label)
}

/// A budget's counter key without its window.
fn budget_definition(tag: &str, budget: &Budget) -> String {
    format!("tg:{{{tag}}}:b:{}", budget.ident())
}

/// Key of a budget's counter for one window.
fn budget_counter(tag: &str, budget: &Budget, window: &Window) -> String {
    counter_key(&budget_definition(tag, budget), window)
}

/// A per-minute rate counter's (`rpm` or `tpm`) key without its minute, of the tenant
/// (`who` = `*`) or of a key.
fn rate_definition(tag: &str, name: &str, who: &str) -> String {
    format!("tg:{{{tag}}}:{name}:{who}")
}

/// Key of a per-minute rate counter for one minute.
#[cfg(test)]
fn rate_counter(tag: &str, name: &str, who: &str, minute: &Window) -> String {
    counter_key(&rate_definition(tag, name, who), minute)
}

/// What a budget's counter measures.
fn measure(metric: Metric) -> Measure {
    match metric {
        Metric::Usd => Measure::Micros,
        Metric::Tokens => Measure::Tokens,
    }
}

/// A counter of the current windows and the slice of the ledger that rebuilds it.
#[derive(Clone)]
struct SeedSpec {
    counter: String,
    definition: String,
    window: Window,
    key: Option<String>,
    model: Option<String>,
    measure: Measure,
}

impl SeedSpec {
    fn scope(&self) -> Added {
        Added {
            counter: self.counter.clone(),
            definition: self.definition.clone(),
            window_start_ms: self.window.start_ms,
            window_end_ms: self.window.end_ms,
            key: self.key.clone(),
            model: self.model.clone(),
            measure: self.measure,
        }
    }
}

fn seed_specs(tenant: &Tenant, now_ms: i64) -> Vec<SeedSpec> {
    let tag = &tenant.name;
    let mut specs = Vec::new();
    for budget in &tenant.budgets {
        let window = window(budget.period, tenant.time_zone, now_ms);
        let definition = budget_definition(tag, budget);
        specs.push(SeedSpec {
            counter: counter_key(&definition, &window),
            definition,
            window,
            key: budget.key.clone(),
            model: budget.model.clone(),
            measure: measure(budget.metric),
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
                let definition = rate_definition(tag, name, who);
                specs.push(SeedSpec {
                    counter: counter_key(&definition, &minute),
                    definition,
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

/// (tokens, micro-dollars) of `usage` as counter amounts.
fn measured(usage: Usage, price: Price) -> (i64, i64) {
    (amount(usage.tokens()), amount(price.cost_micros(usage)))
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
    let (tokens, cost) = measured(usage, price);
    let tag = &tenant.name;
    let mut planned = Vec::new();
    for budget in &tenant.budgets {
        if budget.key.as_deref().is_some_and(|k| k != key_id)
            || budget.model.as_deref().is_some_and(|m| m != model)
        {
            continue;
        }
        let w = window(budget.period, tenant.time_zone, now_ms);
        let measure = measure(budget.metric);
        let unit = if measure == Measure::Micros {
            "USD"
        } else {
            "token"
        };
        let period = budget.period.name();
        planned.push(Planned {
            charge: Charge {
                counter: budget_counter(tag, budget, &w),
                limit: budget.limit,
                amount: measure.of(1, tokens, cost),
                hard: budget.hard,
                window_end_ms: w.end_ms,
            },
            measure,
            rate: false,
            minute_definition: None,
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
        let mut rate = |name: &str, limit: Option<i64>, measure: Measure| {
            if let Some(limit) = limit {
                let definition = rate_definition(tag, name, who);
                planned.push(Planned {
                    charge: Charge {
                        counter: counter_key(&definition, &minute),
                        limit,
                        amount: measure.of(1, tokens, cost),
                        hard: true,
                        window_end_ms: minute.end_ms,
                    },
                    measure,
                    rate: true,
                    minute_definition: Some(definition),
                    label: format!("{scope} {} limit", name.to_uppercase()),
                });
            }
        };
        rate("rpm", rpm, Measure::Requests);
        rate("tpm", tpm, Measure::Tokens);
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
            settle_retry: std::env::var(SETTLE_RETRY_ENV)
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map_or(SETTLE_RETRY, Duration::from_millis),
            abandoned: Arc::new(AbandonedSettles::new(
                policy.ledger_journal_dir.join(crate::abandoned::FILE),
                crate::abandoned::MAX_BYTES,
            )),
            seeding: tokio::sync::Mutex::new(()),
            stop_retrying: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Rebuilds from now on also wait until this replica's journal has handed the database
    /// every row that ended before their epoch (after a database outage it may hold many).
    pub fn watch_ledger(&self, ledger: tollgate_billing::ledger::LedgerSender) {
        let _ = self.ledger.set(ledger);
    }

    /// Waits until every settle started so far is done (or `timeout` passes); true when none
    /// is left. Past half of it, settles still retrying give up and are kept on disk, replayed
    /// by the next run.
    pub async fn settled(&self, timeout: Duration) -> bool {
        if self.settling.idle(timeout / 2).await {
            return true;
        }
        self.stop_retrying.send_replace(true);
        self.settling.idle(timeout / 2).await
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
        self.await_ledger(Some(&tenant.name), epoch, lag).await;
        let mut seeds = Vec::new();
        for spec in seed_specs(tenant, epoch) {
            let amount = self.ledger_sum(store, tenant, &spec, epoch).await?;
            seeds.push(Seed {
                counter: spec.counter,
                definition: spec.definition,
                amount,
                window_end_ms: spec.window.end_ms,
            });
        }
        counters.finish_seed(&tenant.name, &seeds).await?;
        tracing::info!(tenant = %tenant.name, counters = seeds.len(), "budget counters rebuilt from the ledger");
        Ok(())
    }

    /// Waits until the ledger has every row of the requests that ended before `cut`: `lag` for
    /// other replicas' rows, and this replica's journal for its own. `tenant`: the one waiting,
    /// for the log (`None`: several).
    async fn await_ledger(&self, tenant: Option<&str>, cut: i64, lag: Duration) {
        let after = cut + lag.as_millis() as i64;
        let wait = after - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        if let Some(ledger) = self.ledger.get() {
            // Rows journaled after `cut + lag` belong to requests that ended after the cut
            // (their settles count them); older ones must be in the database before the sum.
            let written = crate::shutdown::wait_until(REBUILD_JOURNAL_WAIT, || {
                ledger
                    .stats()
                    .oldest_pending_ms()
                    .is_none_or(|at| at > after)
            })
            .await;
            if !written {
                let tenant = tenant.unwrap_or("(several)");
                tracing::warn!(%tenant, "rebuilding counters while this replica's journal still holds rows the database has not taken; the counters may be low until the next rebuild");
            }
        }
    }

    /// What the ledger counts in a counter's window for requests that ended before `cut`.
    async fn ledger_sum(
        &self,
        store: &Store,
        tenant: &Tenant,
        spec: &SeedSpec,
        cut: i64,
    ) -> anyhow::Result<i64> {
        let (requests, tokens, cost) = store
            .sum_usage(
                &tenant.name,
                spec.key.as_deref(),
                spec.model.as_deref(),
                spec.window.start_ms,
                spec.window.end_ms,
                cut,
            )
            .await?;
        Ok(spec.measure.of(requests, tokens, cost))
    }

    /// Every counter store: this replica's, and Redis when configured.
    fn stores(&self) -> impl Iterator<Item = &dyn Counters> {
        [
            Some(&self.local as &dyn Counters),
            self.shared.as_ref().map(|r| r as &dyn Counters),
        ]
        .into_iter()
        .flatten()
    }

    /// Asks every store, for every current counter of every limited tenant of `policy`,
    /// whether it needs a seed of its own ([`Counters::begin_counter_seed`]: a counter whose
    /// window was current when its budget or rate limit appeared, by a reload here or a newer
    /// policy on another replica), and returns those this replica is to seed. Quick (one store
    /// call per counter): from its answer on, reservations on such a counter are refused until
    /// it is seeded. A store that is unreachable is skipped (asked again on the next pass).
    async fn begin_seeds<'a>(&'a self, policy: &'a Policy) -> Vec<PendingSeed<'a>> {
        let now = now_ms();
        let specs: Vec<(&Tenant, SeedSpec)> = policy
            .tenants
            .values()
            .filter(|t| t.has_limits())
            .flat_map(|t| seed_specs(t, now).into_iter().map(move |s| (t, s)))
            .collect();
        let mut mine = Vec::new();
        for counters in self.stores() {
            for (tenant, spec) in &specs {
                match counters
                    .begin_counter_seed(&tenant.name, &spec.scope(), now_ms())
                    .await
                {
                    Ok(CounterSeed::Ready | CounterSeed::Busy) => {}
                    Ok(CounterSeed::Seed(cut)) => mine.push(PendingSeed {
                        counters,
                        tenant,
                        spec: spec.clone(),
                        cut,
                    }),
                    Err(e) => {
                        tracing::debug!("cannot check counters for seeds now: {e}");
                        break;
                    }
                }
            }
        }
        mine
    }

    /// Sums the ledger for each counter [`Limits::begin_seeds`] handed this replica and writes
    /// its seed. A failure leaves the counter to the next pass (it keeps its cut-off).
    async fn finish_seeds(&self, pending: Vec<PendingSeed<'_>>, store: &Store, lag: Duration) {
        let Some(last) = pending.iter().map(|p| p.cut).max() else {
            return;
        };
        self.await_ledger(None, last, lag).await;
        for p in pending {
            let spec = &p.spec;
            let seeded = async {
                let amount = self.ledger_sum(store, p.tenant, spec, p.cut).await?;
                p.counters
                    .finish_counter_seed(
                        &p.tenant.name,
                        &spec.counter,
                        p.cut,
                        amount,
                        spec.window.end_ms,
                    )
                    .await?;
                anyhow::Ok(amount)
            };
            match seeded.await {
                Ok(amount) => {
                    tracing::info!(tenant = %p.tenant.name, counter = %spec.counter, amount, "counter seeded from the ledger (a budget or rate limit new to its window)")
                }
                Err(e) => {
                    tracing::warn!(tenant = %p.tenant.name, counter = %spec.counter, "seeding a counter from the ledger failed, retrying shortly (reservations on it are refused meanwhile): {e:#}")
                }
            }
        }
    }

    /// One pass over every counter of `policy` (at start, then every few hundred milliseconds
    /// in the background): seeds from the ledger those that need it and this replica is to
    /// seed (new ones, or ones whose seeder failed or died).
    pub async fn seed_counters(&self, policy: &Policy, store: &Store, lag: Duration) {
        let _pass = self.seeding.lock().await;
        let pending = self.begin_seeds(policy).await;
        self.finish_seeds(pending, store, lag).await;
    }

    /// Before a reload swaps `new` in: fixes the cut-off of every counter it adds to a tenant,
    /// so that reservations on it are refused until [`Limits::seed_counters`] (in the
    /// background) has seeded it from the ledger. The swap does not wait for the seeds.
    pub async fn begin_added(&self, new: &Policy) {
        let _pass = self.seeding.lock().await;
        let pending = self.begin_seeds(new).await;
        if !pending.is_empty() {
            tracing::info!(
                counters = pending.len(),
                "counters new to their window are seeded from the ledger in the background; reservations on them are refused until then"
            );
        }
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
        worst: Usage,
        price: Price,
    ) -> Result<Admission, ApiError> {
        self.admit_at(tenant, key_id, model, request_id, worst, price, now_ms())
            .await
    }

    /// [`Limits::admit`] at `now` (Unix ms).
    #[allow(clippy::too_many_arguments)]
    async fn admit_at(
        &self,
        tenant: &Tenant,
        key_id: &str,
        model: &str,
        request_id: &str,
        worst: Usage,
        price: Price,
        now: i64,
    ) -> Result<Admission, ApiError> {
        if !tenant.has_limits() {
            return Ok(Admission::none(price));
        }
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
                reserved_output: worst.completion,
                price,
                local,
                mirror: !local
                    && self.shared.is_some()
                    && tenant.on_redis_down == OnRedisDown::FailOpen,
                time_zone: tenant.time_zone,
                extra: Vec::new(),
                key_id: key_id.to_string(),
                model: model.to_string(),
                admitted_ms: now,
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

    /// Reserves `extra_output` more output tokens for a request that outgrew its reservation.
    /// Budgets are charged on the windows of the request's start (as the ledger counts it);
    /// rate limits on the minute the tokens are produced in. When Redis is unreachable, a
    /// `fail_open` tenant extends on this replica's counters and a `fail_closed` one gets
    /// [`Extension::Unavailable`].
    pub async fn extend(
        &self,
        admission: &mut Admission,
        request_id: &str,
        extra_output: u64,
    ) -> Extension {
        self.extend_at(admission, request_id, extra_output, now_ms())
            .await
    }

    /// [`Limits::extend`] at `now` (Unix ms).
    async fn extend_at(
        &self,
        admission: &mut Admission,
        request_id: &str,
        extra_output: u64,
        now: i64,
    ) -> Extension {
        if !admission.is_limited() {
            return Extension::Granted;
        }
        let extra = Usage {
            completion: extra_output,
            ..Default::default()
        };
        let cost = amount(admission.price.cost_micros(extra));
        let minute = window(Period::Minute, admission.time_zone, now);
        // (index in `planned`, charge): requests were counted at the start.
        let (indices, charges): (Vec<usize>, Vec<Charge>) = admission
            .planned
            .iter()
            .enumerate()
            .filter_map(|(index, p)| {
                if p.measure == Measure::Requests {
                    return None;
                }
                let mut charge = Charge {
                    amount: p.measure.of(0, amount(extra_output), cost),
                    ..p.charge.clone()
                };
                if let Some(definition) = &p.minute_definition {
                    charge.counter = counter_key(definition, &minute);
                    charge.window_end_ms = minute.end_ms;
                }
                Some((index, charge))
            })
            .unzip();
        let grant = |admission: &mut Admission, rooms: Vec<i64>| {
            for ((index, charge), room) in indices.iter().zip(&charges).zip(rooms) {
                admission.rooms[*index] = room;
                admission.hold(*index, charge);
            }
            admission.reserved_output = admission.reserved_output.saturating_add(extra_output);
            Extension::Granted
        };
        if charges.is_empty() {
            return grant(admission, Vec::new());
        }
        let tag = admission.tag.clone();
        let hold_until = now + self.hold.as_millis() as i64;
        let reserved = match self
            .store(admission.local)
            .reserve(&tag, request_id, &charges, now, hold_until)
            .await
        {
            Ok(reserved) => reserved,
            // Reserved in Redis for a fail_open tenant: the extension goes on this replica's
            // counters, and the settle releases it there (`LocalCounters::mirror`).
            Err(unavailable) if admission.mirror => {
                tracing::warn!(tenant = %tag, "{unavailable}; extending on this replica's counters (fail_open)");
                match self
                    .local
                    .reserve(&tag, request_id, &charges, now, hold_until)
                    .await
                {
                    Ok(reserved) => reserved,
                    Err(_) => return Extension::Unavailable,
                }
            }
            Err(unavailable) => {
                tracing::warn!(tenant = %tag, "cannot extend a reservation: {unavailable}; cutting (fail_closed)");
                return Extension::Unavailable;
            }
        };
        match reserved {
            Ok(rooms) => grant(admission, rooms),
            Err(_) => Extension::Exhausted,
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
                // Without the URL: a hook URL is often itself a credential (Slack and the like).
                Err(e) => tracing::warn!("budget alert webhook failed: {}", e.without_url()),
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
        let facts = admission.facts(usage);
        let charges = admission.settle_charges(&facts);
        if admission.mirror {
            // This replica's own counters keep its spend, for fail_open while Redis is away.
            self.local
                .mirror(&admission.tag, &request_id, &charges, ended_ms, &facts);
        }
        let limits = self.clone();
        // Dropped with the task, run or not: shutdown never waits for a settle that is gone.
        let settling = self.settling.track();
        self.background.spawn(async move {
            let _settling = settling;
            let tag = &admission.tag;
            // The store that reserved settles first (its totals drive the alerts); a request
            // admitted on this replica's counters while Redis was away is also settled in Redis
            // once it is back (the script ignores it if the rebuild's ledger sum has it).
            let settled = match limits
                .settle_retrying(
                    admission.local,
                    tag,
                    &request_id,
                    &charges,
                    ended_ms,
                    &facts,
                )
                .await
            {
                Some(totals) => {
                    limits.alert(&admission, &charges, &totals).await;
                    !(admission.local && limits.shared.is_some())
                        || limits
                            .settle_retrying(false, tag, &request_id, &charges, ended_ms, &facts)
                            .await
                            .is_some()
                }
                None => false,
            };
            if !settled {
                limits
                    .abandon(Abandoned {
                        tag: tag.clone(),
                        request_id,
                        charges,
                        ended_ms,
                        facts,
                    })
                    .await;
            }
        });
    }

    /// Keeps a settle Redis did not take on disk, for [`Limits::replay_abandoned`].
    async fn abandon(&self, entry: Abandoned) {
        let file = self.abandoned.path().display();
        match self.abandoned.keep(&entry).await {
            Ok(true) => {
                tracing::error!(request_id = %entry.request_id, %file, "settle abandoned; kept on disk and replayed when Redis answers again")
            }
            Ok(false) => {
                tracing::error!(request_id = %entry.request_id, %file, dropped_total = self.abandoned.dropped(), "settle abandoned and not kept: the file of abandoned settles is full; the hold expires on its own and the counter misses it until its next rebuild")
            }
            Err(e) => {
                tracing::error!(request_id = %entry.request_id, "settle abandoned and not kept ({e}); the hold expires on its own and the counter misses it until its next rebuild")
            }
        }
    }

    /// Abandoned settles dropped because their file was full (for /metrics).
    pub fn abandoned_settles_dropped(&self) -> u64 {
        self.abandoned.dropped()
    }

    /// Replays, every `every`, the settles that Redis did not take (this run's or an earlier
    /// one's), dropping each once applied.
    pub async fn replay_abandoned(self: Arc<Self>, every: Duration) {
        loop {
            match self.replay_abandoned_once().await {
                Ok(0) => {}
                Ok(applied) => tracing::info!(applied, "abandoned settles applied"),
                Err(e) => tracing::warn!("replaying abandoned settles failed: {e:#}"),
            }
            tokio::time::sleep(every).await;
        }
    }

    /// One pass over the abandoned settles: how many were applied. Stops at the first one
    /// Redis does not take; the file's lock is never held while Redis is asked.
    async fn replay_abandoned_once(&self) -> std::io::Result<usize> {
        let Some(redis) = &self.shared else {
            return Ok(0);
        };
        if !self.abandoned.is_pending() || redis.ping().await.is_err() {
            return Ok(0); // nothing changed, or Redis is still away: the file is not read
        }
        self.abandoned
            .replay(now_ms(), |entry| async move {
                redis
                    .settle(
                        &entry.tag,
                        &entry.request_id,
                        &entry.charges,
                        entry.ended_ms,
                        &entry.facts,
                    )
                    .await
                    .map(drop)
            })
            .await
    }

    /// Settles on one store, retrying with backoff for `settle_retry` (six minutes unless
    /// overridden); the totals, or `None` when it never went through.
    async fn settle_retrying(
        &self,
        local: bool,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        ended_ms: i64,
        facts: &Facts,
    ) -> Option<Vec<i64>> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        let mut stop = self.stop_retrying.subscribe();
        loop {
            match self
                .store(local)
                .settle(tag, request_id, charges, ended_ms, facts)
                .await
            {
                Ok(totals) => return Some(totals),
                Err(e) => tracing::warn!(%request_id, "settle failed, retrying: {e}"),
            }
            if started.elapsed() + pause > self.settle_retry {
                return None;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stop| *stop) => return None,
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
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
            ..Default::default()
        };
        let usage = Usage {
            prompt: 60,
            ..Default::default()
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
    fn a_huge_worst_case_charges_the_maximum_not_a_wrapped_sum() {
        let (policy, name) = tenant(
            "  - { name: t, tpm: 1000, budgets: [{ limit_tokens: 100, period: daily }, { limit_usd: 1, period: daily }] }\n",
        );
        let tenant = &policy.tenants[&name];
        let usage = Usage {
            prompt: 10,
            completion: u64::MAX - 1,
            ..Default::default()
        };
        let price = Price {
            input: 1_000_000,
            cached_input: 1_000_000,
            output: 1_000_000,
            ..Default::default()
        };
        let planned = plan(tenant, "k", "m", 0, usage, price);
        assert_eq!(planned.len(), 3);
        for p in &planned {
            assert_eq!(
                p.charge.amount,
                tollgate_billing::budget::MAX_AMOUNT,
                "{}",
                p.label
            );
        }
    }

    #[tokio::test]
    async fn local_counters_saturate_instead_of_wrapping() {
        let counters = LocalCounters::default();
        let max = tollgate_billing::budget::MAX_AMOUNT;
        let soft = |amount: i64| Charge {
            counter: "tg:{t}:b".into(),
            limit: 10,
            amount,
            hard: false,
            window_end_ms: i64::MAX,
        };
        for id in ["a", "b", "c"] {
            let rooms = counters
                .reserve("t", id, &[soft(i64::MAX)], 0, 1_000)
                .await
                .unwrap()
                .unwrap();
            assert!(
                rooms[0] < 0,
                "a soft charge beyond the limit leaves no room"
            );
        }
        assert_eq!(counters.read("tg:{t}:b").await.unwrap(), (0, 3 * max));
        let hard = Charge {
            hard: true,
            amount: 1,
            ..soft(0)
        };
        assert!(counters
            .reserve("t", "d", &[hard], 0, 1_000)
            .await
            .unwrap()
            .is_err());
    }

    fn policy_with(head: &str, tenants: &str) -> Policy {
        let yaml = format!(
            "{head}backends: [{{ name: b, base_url: \"http://127.0.0.1:1\" }}]\nmodels:\n  - {{ name: m, price: {{ input: 1, output: 1 }}, targets: [{{ backend: b, model: m }}] }}\ntenants:\n{tenants}"
        );
        Policy::from_yaml(&yaml).unwrap()
    }

    fn one_per_token() -> Price {
        Price {
            input: 1_000_000,
            cached_input: 1_000_000,
            output: 1_000_000,
            ..Default::default()
        }
    }

    /// An admission as `admit` makes it after reserving in Redis (the test then takes Redis away).
    fn reserved_in_redis(limits: &Limits, tenant: &Tenant, now: i64, usage: Usage) -> Admission {
        let planned = plan(tenant, "k", "m", now, usage, one_per_token());
        Admission {
            tag: tenant.name.clone(),
            alerts: None,
            rooms: vec![0; planned.len()],
            planned,
            reserved_output: usage.completion,
            price: one_per_token(),
            local: false,
            mirror: limits.shared.is_some() && tenant.on_redis_down == OnRedisDown::FailOpen,
            time_zone: tenant.time_zone,
            extra: Vec::new(),
            key_id: "k".into(),
            model: "m".into(),
            admitted_ms: now,
        }
    }

    #[tokio::test]
    async fn an_extension_without_redis_follows_the_tenants_on_redis_down() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let policy = policy_with(
            &format!("redis_url: redis://127.0.0.1:{dead}\nredis_timeout_ms: 100\n"),
            "  - { name: closed, budgets: [{ limit_tokens: 1000, period: total }] }\n  - { name: open, on_redis_down: fail_open, budgets: [{ limit_tokens: 1000, period: total }] }\n",
        );
        let limits = Arc::new(Limits::new(&policy).unwrap());
        let now = now_ms();
        let usage = Usage {
            prompt: 10,
            completion: 40,
            ..Default::default()
        };

        // fail_closed: the stream is cut for the outage, not for a budget.
        let mut closed = reserved_in_redis(&limits, &policy.tenants["closed"], now, usage);
        assert_eq!(
            limits.extend(&mut closed, "c1", 100).await,
            Extension::Unavailable
        );
        assert_eq!(closed.reserved_output, 40);

        // fail_open: the extension is held on this replica's counters...
        let open = &policy.tenants["open"];
        let mut admission = reserved_in_redis(&limits, open, now, usage);
        assert_eq!(
            limits.extend(&mut admission, "o1", 100).await,
            Extension::Granted
        );
        assert_eq!(admission.reserved_output, 140);
        let counter = admission.planned[0].charge.counter.clone();
        assert_eq!(limits.local.read(&counter).await.unwrap(), (0, 100));
        // ...and they still refuse what does not fit.
        assert_eq!(
            limits.extend(&mut admission, "o1", 2000).await,
            Extension::Exhausted
        );
        // The settle counts the real usage here and releases that hold.
        let used = Usage {
            prompt: 10,
            completion: 120,
            ..Default::default()
        };
        limits.settle(admission, "o1".into(), used, now_ms());
        assert_eq!(limits.local.read(&counter).await.unwrap(), (130, 0));
    }

    #[tokio::test]
    async fn an_extension_charges_the_minute_its_tokens_are_produced_in() {
        let policy = policy_with(
            "",
            "  - { name: t, tpm: 10000, rpm: 10, budgets: [{ limit_tokens: 100000, period: daily }] }\n",
        );
        let tenant = &policy.tenants["t"];
        let limits = Arc::new(Limits::new(&policy).unwrap());
        let start = ms("2026-05-01T10:00:50Z");
        let worst = Usage {
            prompt: 100,
            completion: 40,
            ..Default::default()
        };
        let mut admission = limits
            .admit_at(tenant, "k", "m", "r", worst, one_per_token(), start)
            .await
            .unwrap();
        let minute = |at: i64| {
            rate_counter(
                "t",
                "tpm",
                "*",
                &window(Period::Minute, tenant.time_zone, at),
            )
        };
        let rpm = |at: i64| {
            rate_counter(
                "t",
                "rpm",
                "*",
                &window(Period::Minute, tenant.time_zone, at),
            )
        };
        let daily = admission.planned[0].charge.counter.clone();
        let (first, second) = (minute(start), minute(start + 20_000));
        assert_ne!(first, second);
        // An extension within the first minute adds to its hold; one in the next minute holds
        // that minute's counter (budgets stay on the request's windows).
        assert_eq!(
            limits
                .extend_at(&mut admission, "r", 60, start + 5_000)
                .await,
            Extension::Granted
        );
        assert_eq!(
            limits
                .extend_at(&mut admission, "r", 256, start + 20_000)
                .await,
            Extension::Granted
        );
        let read = |counter: String| {
            let limits = limits.clone();
            async move { limits.local.read(&counter).await.unwrap() }
        };
        assert_eq!(read(first.clone()).await, (0, 200));
        assert_eq!(read(second.clone()).await, (0, 256));
        assert_eq!(read(daily.clone()).await, (0, 456));
        assert_eq!(read(rpm(start)).await, (0, 1));
        assert_eq!(
            read(rpm(start + 20_000)).await,
            (0, 0),
            "requests count once"
        );

        // The real usage fills the holds in the order they were made: every hold is released
        // and the minutes add up to the request's tokens.
        let used = Usage {
            prompt: 100,
            completion: 250,
            ..Default::default()
        };
        limits.settle(admission, "r".into(), used, start + 30_000);
        assert!(limits.settled(Duration::from_secs(5)).await);
        assert_eq!(read(first).await, (200, 0));
        assert_eq!(read(second).await, (150, 0));
        assert_eq!(read(daily).await, (350, 0));
        assert_eq!(read(rpm(start)).await, (1, 0));
    }

    #[test]
    fn charges_follow_key_and_model_scopes() {
        let (policy, name) = tenant(
            "  - name: t\n    rpm: 10\n    key_limits: [{ key: k1, tpm: 50 }]\n    budgets:\n      - { limit_usd: 1, period: daily }\n      - { limit_tokens: 5, period: total, key: k2 }\n      - { limit_tokens: 5, period: total, model: m, mode: soft }\n",
        );
        let tenant = &policy.tenants[&name];
        let usage = Usage {
            prompt: 3,
            completion: 4,
            ..Default::default()
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
