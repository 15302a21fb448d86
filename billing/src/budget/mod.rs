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

/// One limit a request is charged against.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    async fn settle(
        &self,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        ended_ms: i64,
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
}

#[cfg(test)]
mod tests;
