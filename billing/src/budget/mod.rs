//! Budgets and rate limits that hold exactly, across replicas.
//!
//! Every limit a request falls under is a [`Charge`] against a counter (one counter per limit and
//! window). Before forwarding, the gateway *reserves* the request's worst case on all of them at
//! once — all or nothing. Afterwards it *settles* the hold to the real amount, once per request
//! id. A hold whose gateway died expires and is released by the next operation on its counter.
//!
//! [`Counters`] has two implementations with the same semantics: [`RedisCounters`] (one Lua script
//! per operation, shared by every replica) and [`LocalCounters`] (in-process, for a single
//! replica without Redis).

mod local;
mod redis_store;
pub mod window;

use async_trait::async_trait;

pub use chrono_tz::Tz;
pub use local::LocalCounters;
pub use redis_store::RedisCounters;
pub use window::{window, Period, Window};

/// The largest amount a counter takes in one charge or holds in all: 2^53 - 1, the largest
/// integer Redis' Lua (doubles) still represents exactly. A worst case beyond it (a huge
/// `max_tokens` reservation) is charged as this maximum, never as a wrapped sum.
pub const MAX_AMOUNT: i64 = (1 << 53) - 1;

/// `value` as a charge amount: saturated at [`MAX_AMOUNT`].
pub fn amount(value: u64) -> i64 {
    value.min(MAX_AMOUNT as u64) as i64
}

/// `amount` clamped to what a counter takes (`±MAX_AMOUNT`).
pub fn clamp(amount: i64) -> i64 {
    amount.clamp(-MAX_AMOUNT, MAX_AMOUNT)
}

/// One limit a request is charged against.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Charge {
    /// Counter key, window included (e.g. `tg:{acme}:b:usd.monthly.*.*:2026-11`).
    pub counter: String,
    pub limit: i64,
    /// Worst case when reserving; the real amount when settling.
    pub amount: i64,
    /// Hard limits refuse what does not fit; soft ones only count.
    pub hard: bool,
    /// When the counter's window ends (Unix ms; `i64::MAX` for totals).
    pub window_end_ms: i64,
}

/// A reservation refused: which charge lacked room, and how much room it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    pub index: usize,
    pub room: i64,
}

/// The counter store could not be reached; the tenant's failure policy decides what happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "budget counters unavailable: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// A counter's starting value rebuilt from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub counter: String,
    pub amount: i64,
    pub window_end_ms: i64,
}

/// What a request was, for the counters it did not reserve on: a counter that a policy reload
/// added while the request ran counts it at its settle (see [`Counters::begin_counter_seed`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// When the request was admitted (its windows); Unix ms.
    pub created_ms: i64,
    pub key: String,
    /// The model that served (a route's chosen model).
    pub model: String,
    /// Prompt plus completion tokens.
    pub tokens: i64,
    /// Micro-dollars.
    pub cost: i64,
}

/// What a counter added to a running policy counts: requests of its window, narrowed to a key
/// and a model; `measure` is what each adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    pub counter: String,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub key: Option<String>,
    pub model: Option<String>,
    pub measure: Measure,
}

impl Added {
    /// Whether `facts` falls in this counter's scope, and what it adds to it.
    fn amount(&self, facts: &Facts) -> Option<i64> {
        let in_scope = facts.created_ms >= self.window_start_ms
            && facts.created_ms < self.window_end_ms
            && self.key.as_ref().is_none_or(|k| *k == facts.key)
            && self.model.as_ref().is_none_or(|m| *m == facts.model);
        in_scope.then_some(match self.measure {
            Measure::Micros => facts.cost,
            Measure::Tokens => facts.tokens,
            Measure::Requests => 1,
        })
    }
}

/// What a counter measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Micros,
    Tokens,
    Requests,
}

impl Measure {
    fn code(self) -> &'static str {
        match self {
            Measure::Micros => "c",
            Measure::Tokens => "t",
            Measure::Requests => "r",
        }
    }
}

/// The answer of [`Counters::begin_counter_seed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterSeed {
    /// Nothing to do: already seeded (or the tenant's own rebuild will seed it).
    Ready,
    /// Another replica is seeding it: ask again in a moment.
    Busy,
    /// This caller seeds it: sum the ledger's requests that ended before this cut-off and call
    /// [`Counters::finish_counter_seed`].
    Seed(i64),
}

/// Counters for one tenant (`tag`) live together; a tenant whose counters were lost (a cold or
/// flushed Redis) is *rebuilt* from the ledger: [`Counters::begin_seed`] fixes an epoch; settles
/// of requests that end at or after it count in the counters, earlier ones come from the ledger
/// sum that [`Counters::finish_seed`] writes. Until then, reservations are refused as unavailable.
#[async_trait]
pub trait Counters: Send + Sync {
    /// Holds `amount` on every charge for `request_id` until `hold_until_ms`, or on none when a
    /// hard charge lacks room. Calling it again for the same request adds to its hold (a stream
    /// that outgrows its reservation). On success returns each charge's room left.
    async fn reserve(
        &self,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        now_ms: i64,
        hold_until_ms: i64,
    ) -> Result<Result<Vec<i64>, Denied>, Unavailable>;

    /// Releases the request's holds and adds the real amounts (`charges[i].amount`). Idempotent:
    /// a request id is settled at most once. `ended_ms` is when the request ended, the same
    /// instant its ledger row records (`created_ms + latency_ms`). Returns each counter's counted
    /// total after the settle, or nothing when this call changed nothing (already settled, or
    /// left to a ledger rebuild).
    ///
    /// Counters a policy reload added while the request ran (it reserved nothing on them) also
    /// count it, from `facts`, when it ended at or after their cut-off and falls in their scope.
    async fn settle(
        &self,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        ended_ms: i64,
        facts: &Facts,
    ) -> Result<Vec<i64>, Unavailable>;

    /// True exactly once per `marker` (until `expire_at_ms`), across every replica sharing the
    /// store: alerts are sent once per threshold per period.
    async fn first_alert(
        &self,
        tag: &str,
        marker: &str,
        expire_at_ms: i64,
    ) -> Result<bool, Unavailable>;

    /// Counted amount (seed included) and current holds of a counter.
    async fn read(&self, counter: &str) -> Result<(i64, i64), Unavailable>;

    /// `Some(epoch)` when the tenant's counters need rebuilding and this caller is the one to do
    /// it; `None` when they are ready or another replica is rebuilding them.
    async fn begin_seed(&self, tag: &str, now_ms: i64) -> Result<Option<i64>, Unavailable>;

    /// Writes the ledger sums (requests that ended before the epoch) and opens the tenant again.
    async fn finish_seed(&self, tag: &str, seeds: &[Seed]) -> Result<(), Unavailable>;

    /// Starts seeding one counter that a policy reload added to a tenant whose counters are
    /// ready (a new budget, or one whose scope or period changed): from its cut-off on, every
    /// settle of the tenant's requests in its scope counts in it (those admitted under the
    /// older policy too, from their [`Facts`]); requests that ended before the cut-off come
    /// from the ledger sum [`Counters::finish_counter_seed`] writes. Reservations on it are
    /// refused as unavailable until then.
    async fn begin_counter_seed(
        &self,
        tag: &str,
        added: &Added,
        now_ms: i64,
    ) -> Result<CounterSeed, Unavailable>;

    /// Writes the ledger sum of an added counter (requests that ended before `cut`) and opens it.
    async fn finish_counter_seed(
        &self,
        tag: &str,
        counter: &str,
        cut: i64,
        amount: i64,
        window_end_ms: i64,
    ) -> Result<(), Unavailable>;
}

#[cfg(test)]
mod tests;
