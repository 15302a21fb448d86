//! In-process counters for a single replica (the embedded default, and the fallback of tenants
//! that fail open when Redis is down).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Charge, Counters, Denied, Seed, Unavailable};

/// How long a settled request id is remembered, so a repeated settle is ignored.
const SETTLED_MEMORY_MS: i64 = 24 * 3_600_000;

#[derive(Default)]
pub struct LocalCounters {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    counters: HashMap<String, Counter>,
    /// Request id -> when to forget it.
    settled: HashMap<String, i64>,
    /// Tenant -> epoch of its rebuild from the ledger.
    epochs: HashMap<String, i64>,
    operations: u64,
}

#[derive(Default)]
struct Counter {
    /// Rebuilt from the ledger.
    seed: i64,
    used: i64,
    reserved: i64,
    /// Request id -> (amount held, hold expiry).
    holds: HashMap<String, (i64, i64)>,
    window_end_ms: i64,
}

impl Counter {
    fn release_expired(&mut self, now_ms: i64) {
        let reserved = &mut self.reserved;
        self.holds.retain(|_, (amount, until)| {
            let keep = *until > now_ms;
            if !keep {
                *reserved -= *amount;
            }
            keep
        });
    }
}

impl State {
    /// Drops counters of windows that ended and forgotten settle markers, now and then.
    fn sweep(&mut self, now_ms: i64) {
        self.operations += 1;
        if !self.operations.is_multiple_of(1024) {
            return;
        }
        self.counters
            .retain(|_, c| c.window_end_ms > now_ms || !c.holds.is_empty());
        self.settled.retain(|_, forget_at| *forget_at > now_ms);
    }
}

impl LocalCounters {
    /// Adds usage that was reserved and settled in another store (Redis) for a request of this
    /// replica, so that these counters keep knowing this replica's spend: they are what
    /// `fail_open` enforces when Redis is away. Called once per request; no hold involved.
    pub fn mirror(&self, charges: &[Charge], now_ms: i64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.sweep(now_ms);
        for charge in charges {
            let counter = state.counters.entry(charge.counter.clone()).or_default();
            counter.window_end_ms = charge.window_end_ms;
            counter.used += charge.amount;
        }
    }
}

#[async_trait]
impl Counters for LocalCounters {
    async fn reserve(
        &self,
        _tag: &str,
        request_id: &str,
        charges: &[Charge],
        now_ms: i64,
        hold_until_ms: i64,
    ) -> Result<Result<Vec<i64>, Denied>, Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.sweep(now_ms);
        let mut rooms = Vec::with_capacity(charges.len());
        for (index, charge) in charges.iter().enumerate() {
            let counter = state.counters.entry(charge.counter.clone()).or_default();
            counter.window_end_ms = charge.window_end_ms;
            counter.release_expired(now_ms);
            let room = charge.limit - counter.seed - counter.used - counter.reserved;
            if charge.hard && charge.amount > room {
                return Ok(Err(Denied { index, room }));
            }
            rooms.push(room - charge.amount);
        }
        for charge in charges {
            let counter = state
                .counters
                .get_mut(&charge.counter)
                .expect("created above");
            counter.reserved += charge.amount;
            let hold = counter
                .holds
                .entry(request_id.to_string())
                .or_insert((0, hold_until_ms));
            hold.0 += charge.amount;
            hold.1 = hold_until_ms;
        }
        Ok(Ok(rooms))
    }

    async fn settle(
        &self,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        ended_ms: i64,
    ) -> Result<Vec<i64>, Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.epochs.get(tag).is_some_and(|epoch| ended_ms < *epoch) {
            return Ok(Vec::new()); // counted by the ledger rebuild
        }
        let forget_at = ended_ms + SETTLED_MEMORY_MS;
        if state
            .settled
            .insert(request_id.to_string(), forget_at)
            .is_some()
        {
            return Ok(Vec::new());
        }
        let mut totals = Vec::with_capacity(charges.len());
        for charge in charges {
            let counter = state.counters.entry(charge.counter.clone()).or_default();
            counter.window_end_ms = charge.window_end_ms;
            if let Some((held, _)) = counter.holds.remove(request_id) {
                counter.reserved -= held;
            }
            counter.used += charge.amount;
            totals.push(counter.seed + counter.used);
        }
        Ok(totals)
    }

    async fn first_alert(
        &self,
        _tag: &str,
        marker: &str,
        expire_at_ms: i64,
    ) -> Result<bool, Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Markers share the settled-id memory: same shape (id -> when to forget).
        Ok(state
            .settled
            .insert(format!("alert:{marker}"), expire_at_ms)
            .is_none())
    }

    async fn begin_seed(&self, tag: &str, now_ms: i64) -> Result<Option<i64>, Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match state.epochs.get(tag) {
            Some(_) => None,
            None => {
                state.epochs.insert(tag.to_string(), now_ms);
                Some(now_ms)
            }
        })
    }

    async fn finish_seed(&self, _tag: &str, seeds: &[Seed]) -> Result<(), Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for seed in seeds {
            let counter = state.counters.entry(seed.counter.clone()).or_default();
            counter.seed = seed.amount;
            counter.window_end_ms = seed.window_end_ms;
        }
        Ok(())
    }

    async fn read(&self, counter: &str) -> Result<(i64, i64), Unavailable> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(state
            .counters
            .get(counter)
            .map_or((0, 0), |c| (c.seed + c.used, c.reserved)))
    }
}
