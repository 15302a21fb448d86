//! In-process counters for a single replica (the embedded default, and the fallback of tenants
//! that fail open when Redis is down).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    Added, Charge, CounterSeed, Counters, Denied, Facts, Seed, Unavailable, ADDED_MEMORY_MS,
    DEFINITION_ABSENT_MS, SETTLED_MEMORY_MS,
};

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
    /// Tenants whose rebuild finished.
    ready: std::collections::HashSet<String>,
    /// Tenant -> counters seeded on their own (see [`Counters::begin_counter_seed`]).
    added: HashMap<String, Vec<String>>,
    /// Counter definition -> (when first seen, when last seen).
    definitions: HashMap<String, (i64, i64)>,
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
    /// `seed` was written from the ledger.
    seeded: bool,
    /// Seeded on its own: the cut-off of its seed, and what it counts.
    added: Option<(i64, Added)>,
}

impl Counter {
    fn release_expired(&mut self, now_ms: i64) {
        let reserved = &mut self.reserved;
        self.holds.retain(|_, (amount, until)| {
            let keep = *until > now_ms;
            if !keep {
                *reserved = reserved.saturating_sub(*amount);
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

impl State {
    /// Releases the request's holds and counts `charges`, except on a counter seeded on its own
    /// when the request ended before its cut-off (its ledger sum has it). Each counter's total.
    fn apply(&mut self, request_id: &str, charges: &[Charge], ended_ms: i64) -> Vec<i64> {
        let mut totals = Vec::with_capacity(charges.len());
        for charge in charges {
            let counter = self.counters.entry(charge.counter.clone()).or_default();
            counter.window_end_ms = charge.window_end_ms;
            if let Some((held, _)) = counter.holds.remove(request_id) {
                counter.reserved = counter.reserved.saturating_sub(held);
            }
            if counter
                .added
                .as_ref()
                .is_none_or(|(cut, _)| ended_ms >= *cut)
            {
                counter.used = counter.used.saturating_add(super::clamp(charge.amount));
            }
            totals.push(counter.seed.saturating_add(counter.used));
        }
        totals
    }

    /// Counts a request in the counters seeded on their own that it reserved nothing on
    /// (`charges` does not name them) when it ended after their cut-off and falls in their
    /// scope. Forgets counters swept with their window or past [`ADDED_MEMORY_MS`].
    fn count_added(&mut self, tag: &str, charges: &[Charge], ended_ms: i64, facts: &Facts) {
        let State {
            added, counters, ..
        } = self;
        let Some(added) = added.get_mut(tag) else {
            return;
        };
        added.retain(|name| {
            let Some(counter) = counters.get_mut(name) else {
                return false; // swept with its window
            };
            let Some((cut, scope)) = &counter.added else {
                return false; // seeded again by a tenant rebuild
            };
            if ended_ms > cut.saturating_add(ADDED_MEMORY_MS) {
                return false;
            }
            if !charges.iter().any(|c| c.counter == *name) {
                if let Some(amount) = scope.amount(facts).filter(|_| ended_ms >= *cut) {
                    counter.used = counter.used.saturating_add(super::clamp(amount));
                }
            }
            true
        });
    }
}

impl LocalCounters {
    /// Adds usage that was reserved and settled in another store (Redis) for a request of this
    /// replica, so that these counters keep knowing this replica's spend: they are what
    /// `fail_open` enforces when Redis is away. Called once per request; it also releases the
    /// request's holds here (an extension reserved here while Redis was unreachable).
    pub fn mirror(
        &self,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        ended_ms: i64,
        facts: &Facts,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.sweep(ended_ms);
        state.apply(request_id, charges, ended_ms);
        state.count_added(tag, charges, ended_ms, facts);
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
            if counter.added.is_some() && !counter.seeded {
                return Err(Unavailable(
                    "a counter is being seeded from the ledger".into(),
                ));
            }
            counter.window_end_ms = charge.window_end_ms;
            counter.release_expired(now_ms);
            let amount = super::clamp(charge.amount);
            let room = charge
                .limit
                .saturating_sub(counter.seed)
                .saturating_sub(counter.used)
                .saturating_sub(counter.reserved);
            if charge.hard && amount > room {
                return Ok(Err(Denied { index, room }));
            }
            rooms.push(room.saturating_sub(amount));
        }
        for charge in charges {
            let counter = state
                .counters
                .get_mut(&charge.counter)
                .expect("created above");
            let amount = super::clamp(charge.amount);
            counter.reserved = counter.reserved.saturating_add(amount);
            let hold = counter
                .holds
                .entry(request_id.to_string())
                .or_insert((0, hold_until_ms));
            hold.0 = hold.0.saturating_add(amount);
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
        facts: &Facts,
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
        let totals = state.apply(request_id, charges, ended_ms);
        state.count_added(tag, charges, ended_ms, facts);
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

    async fn finish_seed(&self, tag: &str, seeds: &[Seed]) -> Result<(), Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = state.epochs.get(tag).copied().unwrap_or_default();
        state.ready.insert(tag.to_string());
        for seed in seeds {
            let counter = state.counters.entry(seed.counter.clone()).or_default();
            counter.seed = seed.amount;
            counter.seeded = true;
            counter.added = None;
            counter.window_end_ms = seed.window_end_ms;
            state
                .definitions
                .insert(seed.definition.clone(), (epoch, epoch));
        }
        Ok(())
    }

    async fn begin_counter_seed(
        &self,
        tag: &str,
        added: &Added,
        now_ms: i64,
    ) -> Result<CounterSeed, Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.ready.contains(tag) {
            return Ok(CounterSeed::Busy); // the tenant's own rebuild comes first
        }
        let (since, reseed) = match state.definitions.get(&added.definition).copied() {
            Some((since, seen)) if now_ms - seen <= DEFINITION_ABSENT_MS => (since, false),
            // New, or back after it was removed: what it counted before is stale.
            known => (now_ms, known.is_some()),
        };
        state
            .definitions
            .insert(added.definition.clone(), (since, now_ms));
        let counter = state.counters.entry(added.counter.clone()).or_default();
        if reseed {
            counter.seeded = false;
            counter.added = None;
        }
        if counter.seeded || (counter.added.is_none() && added.window_start_ms >= since) {
            return Ok(CounterSeed::Ready);
        }
        if let Some((cut, _)) = &counter.added {
            return Ok(CounterSeed::Seed(*cut));
        }
        // Whatever it counted before the cut-off is in the ledger sum.
        counter.used = 0;
        counter.window_end_ms = added.window_end_ms;
        counter.added = Some((now_ms, added.clone()));
        let registry = state.added.entry(tag.to_string()).or_default();
        if !registry.contains(&added.counter) {
            registry.push(added.counter.clone());
        }
        Ok(CounterSeed::Seed(now_ms))
    }

    async fn finish_counter_seed(
        &self,
        _tag: &str,
        counter: &str,
        cut: i64,
        amount: i64,
        _window_end_ms: i64,
    ) -> Result<(), Unavailable> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = state.counters.get_mut(counter) {
            if counter.added.as_ref().is_some_and(|(c, _)| *c == cut) {
                counter.seed = amount;
                counter.seeded = true;
            }
        }
        Ok(())
    }

    async fn read(&self, counter: &str) -> Result<(i64, i64), Unavailable> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(state
            .counters
            .get(counter)
            .map_or((0, 0), |c| (c.seed.saturating_add(c.used), c.reserved)))
    }
}
