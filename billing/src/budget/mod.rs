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

/// How long a settled request id is remembered, so that a repeated settle (a retry whose reply
/// was lost, a replayed abandoned settle) is ignored. A replay must come well within it.
pub const SETTLED_MEMORY_MS: i64 = 24 * 3_600_000;

/// How long a counter seeded on its own (see [`Counters::begin_counter_seed`]) stays in its
/// tenant's registry of such counters after its cut-off: settles of requests that reserved
/// nothing on it (admitted by a replica whose policy lacks it, or replayed up to
/// [`SETTLED_MEMORY_MS`] later) count in it until then. Pruned by the first settle that ended
/// past it, so a rolling deploy whose old replicas still run a day after the cut-off is no
/// longer counted in it.
pub const ADDED_MEMORY_MS: i64 = 2 * SETTLED_MEMORY_MS;

/// A counter definition (a budget or rate limit, whatever its window) that no replica has
/// reported for this long is taken as removed from the policy: if it comes back, its current
/// window is seeded from the ledger again (it missed what was spent while it was away). Every
/// replica reports the definitions of its policy every few hundred milliseconds. A limit removed
/// and restored within this time (by reloads, or a tenant's limits set to none and back) is not
/// reseeded: its counter misses what was spent while it was gone, until its window ends or the
/// tenant is rebuilt.
pub const DEFINITION_ABSENT_MS: i64 = 120_000;

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
    /// The counter's key without its window (see [`Added::definition`]).
    pub definition: String,
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

/// A counter of a tenant's current policy, and what it counts: requests of its window, narrowed
/// to a key and a model; `measure` is what each adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    pub counter: String,
    /// The counter's key without its window: the same for every window of one budget or rate
    /// limit (`tg:{acme}:b:usd.monthly.*.*` for `tg:{acme}:b:usd.monthly.*.*:2026-11`).
    pub definition: String,
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
        in_scope.then_some(self.measure.of(1, facts.tokens, facts.cost))
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
    /// What this measure counts of `requests` requests of `tokens` tokens costing `cost`.
    pub fn of(self, requests: i64, tokens: i64, cost: i64) -> i64 {
        match self {
            Measure::Micros => cost,
            Measure::Tokens => tokens,
            Measure::Requests => requests,
        }
    }

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
    /// Nothing to do: it has its seed, or its window began after its definition appeared.
    Ready,
    /// Not now: the tenant is cold or being rebuilt, or another replica is seeding it. Ask
    /// again in a moment.
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

    /// Makes sure a counter of the tenant's current policy counts everything of its window.
    /// Every replica calls it for every counter of its policy, at start, before a reload's
    /// swap and then every few hundred milliseconds, until it answers [`CounterSeed::Ready`].
    ///
    /// The store remembers when it first saw each [`Added::definition`] (and when last, see
    /// [`DEFINITION_ABSENT_MS`]; a tenant's rebuild registers the definitions it seeded). A
    /// window that began after that was charged by every request in it. The window that was
    /// current then (a budget added by a reload or by a rolling deploy, a changed scope or
    /// period, a definition back after it was removed) is seeded on its own: from its cut-off
    /// on, every settle of the tenant's requests in its scope counts in it (also those that
    /// reserved nothing on it, from their [`Facts`]); requests that ended before the cut-off
    /// come from the ledger sum [`Counters::finish_counter_seed`] writes. Reservations on it are
    /// refused as unavailable until then. A seed whose seeder failed or died is taken over:
    /// by the same caller at once, by another once the seeder's lock expired.
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
