//! Counters in Redis, shared by every gateway replica. Each operation is one Lua script, so a
//! reservation against several limits is atomic. Keys carry the tenant as a hash tag
//! (`tg:{acme}:...`), so one tenant's counters live on one Redis Cluster slot.
//!
//! Layout per counter `C`: a hash with `seed` (rebuilt from the ledger), `used`, `reserved` and
//! one `r:<request id>` field per hold; and a sorted set `C:holds` of request ids scored by hold
//! expiry, which every reservation sweeps, so holds of a dead gateway release themselves.
//! Per tenant: `tg:{t}:ready` (counters usable), `tg:{t}:epoch` (the rebuild's cut-off) and
//! `tg:{t}:seeding` (the rebuild lock). A flushed or restarted Redis loses `ready` with the
//! counters, so reservations stop until a replica has rebuilt them.
//!
//! `tg:{t}:defs` remembers, per counter definition (a counter key without its window), when a
//! replica first saw it in its policy (`s:<definition>`) and last (`l:<definition>`). A counter
//! whose window was current when its definition appeared (a budget added by a reload or a
//! rolling deploy, one back after it was removed) is seeded on its own: its hash gets `cut`
//! (its own cut-off) and its scope (`a.start`, `a.end`, `a.measure`, `a.key`, `a.model`), its
//! lock is `C:seeding`, and the tenant's `tg:{t}:added` hash lists it (counter -> cut).
//! Reservations on it are refused until it has its `seed`; every settle counts the request in
//! it when it ended at or after `cut` and falls in its scope, also a request that reserved
//! nothing on it (admitted under an older policy): the settle script reads those counters by
//! name, so they must live on the tenant's slot, as every `tg:{t}:` key does. Settles prune the
//! list [`ADDED_MEMORY_MS`] after a counter's cut.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{
    Added, Charge, CounterSeed, Counters, Denied, Facts, Seed, Unavailable, ADDED_MEMORY_MS,
    DEFINITION_ABSENT_MS, SETTLED_MEMORY_MS,
};
/// Counters outlive their window by this much (late settles still land).
const WINDOW_GRACE_MS: i64 = 24 * 3_600_000;

const RESERVE: &str = r#"
local id, now, hold_until, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[2*n+1]) == 0 then return {2} end
local rooms = {}
for i = 1, n do
  local c, z = KEYS[2*i-1], KEYS[2*i]
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, rid in ipairs(expired) do
    local held = tonumber(redis.call('HGET', c, 'r:' .. rid) or '0')
    redis.call('HINCRBY', c, 'reserved', -held)
    redis.call('HDEL', c, 'r:' .. rid)
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
  local base = 4 + (i - 1) * 4
  local limit, amount, hard = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), ARGV[base + 3] == '1'
  local counted = redis.call('HMGET', c, 'seed', 'used', 'reserved', 'cut')
  -- Seeded on its own and not seeded from the ledger yet.
  if counted[4] and not counted[1] then return {3} end
  local room = limit - tonumber(counted[1] or '0') - tonumber(counted[2] or '0') - tonumber(counted[3] or '0')
  if hard and amount > room then return {0, i, room} end
  rooms[i] = room - amount
end
for i = 1, n do
  local c, z = KEYS[2*i-1], KEYS[2*i]
  local base = 4 + (i - 1) * 4
  local amount, expire_at = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 4])
  redis.call('HINCRBY', c, 'reserved', amount)
  redis.call('HINCRBY', c, 'r:' .. id, amount)
  redis.call('ZADD', z, hold_until, id)
  if expire_at > 0 then
    redis.call('PEXPIREAT', c, expire_at)
    redis.call('PEXPIREAT', z, expire_at)
  end
end
local out = {1}
for i = 1, n do out[i + 1] = rooms[i] end
return out
"#;

const SETTLE: &str = r#"
local id, n, ended = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local epoch = redis.call('GET', KEYS[2])
-- Cold, or ended before the rebuild's cut-off: the ledger sum counts this request.
if not epoch or ended < tonumber(epoch) then return {} end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then return {} end
local base = 10
local charged = {}
local totals = {}
for i = 1, n do
  local c, z = KEYS[2*i+2], KEYS[2*i+3]
  charged[c] = true
  local held = redis.call('HGET', c, 'r:' .. id)
  if held then
    redis.call('HINCRBY', c, 'reserved', -tonumber(held))
    redis.call('HDEL', c, 'r:' .. id)
    redis.call('ZREM', z, id)
  end
  local add = ARGV[base + i]
  -- Ended before an added counter's own cut-off: its ledger sum has it.
  local f = redis.call('HMGET', c, 'cut', 'seed')
  if f[1] and ended < tonumber(f[1]) then add = 0 end
  local used = redis.call('HINCRBY', c, 'used', add)
  totals[i] = used + tonumber(f[2] or '0')
  local expire_at = tonumber(ARGV[base + n + i])
  if expire_at > 0 then redis.call('PEXPIREAT', c, expire_at) end
end
-- Counters seeded on their own that this request reserved nothing on (added while it ran).
local created, kid, model = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local forget_before = ended - tonumber(ARGV[10])
local registry = redis.call('HGETALL', KEYS[3])
for j = 1, #registry, 2 do
  local c = registry[j]
  if tonumber(registry[j + 1]) < forget_before then
    redis.call('HDEL', KEYS[3], c)
  elseif not charged[c] then
    local f = redis.call('HMGET', c, 'cut', 'a.start', 'a.end', 'a.measure', 'a.key', 'a.model')
    if not f[1] then
      redis.call('HDEL', KEYS[3], c) -- expired with its window
    elseif ended >= tonumber(f[1]) and created >= tonumber(f[2]) and created < tonumber(f[3])
        and (f[5] == '' or f[5] == kid) and (f[6] == '' or f[6] == model) then
      local add = '1'
      if f[4] == 'c' then add = ARGV[9] elseif f[4] == 't' then add = ARGV[8] end
      redis.call('HINCRBY', c, 'used', add)
    end
  end
end
return totals
"#;

const BEGIN_SEED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[2]) then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'NX')
return tonumber(redis.call('GET', KEYS[2]))
"#;

const FINISH_SEED: &str = r#"
local n = tonumber(ARGV[1])
local epoch = redis.call('GET', KEYS[3])
for i = 1, n do
  local c = KEYS[3 + i]
  -- A counter seeded on its own before (a flush keeps nothing, but a lost `ready` may) is whole now.
  redis.call('HDEL', c, 'cut')
  redis.call('HSET', c, 'seed', ARGV[1 + i])
  local expire_at = tonumber(ARGV[1 + n + i])
  if expire_at > 0 then redis.call('PEXPIREAT', c, expire_at) end
  if epoch then
    local d = ARGV[1 + 2 * n + i]
    redis.call('HSET', KEYS[4 + n], 's:' .. d, epoch, 'l:' .. d, epoch)
  end
end
redis.call('SET', KEYS[1], '1')
redis.call('DEL', KEYS[2])
return 1
"#;

const BEGIN_COUNTER_SEED: &str = r#"
local now = tonumber(ARGV[1])
-- Cold or being rebuilt (perhaps by a replica whose policy lacks this counter): the rebuild
-- comes first, then this counter gets its seed from it or from here.
if redis.call('EXISTS', KEYS[1]) == 0 then return {1} end
local d = ARGV[10]
local seen = redis.call('HMGET', KEYS[5], 's:' .. d, 'l:' .. d)
local since, last = tonumber(seen[1]), tonumber(seen[2])
local f = redis.call('HMGET', KEYS[3], 'seed', 'cut')
if not since or not last or now - last > tonumber(ARGV[11]) then
  if since then
    -- Back after no replica had it: what it counted before misses what was spent meanwhile.
    redis.call('HDEL', KEYS[3], 'seed', 'cut')
    f = {false, false}
  end
  since = now
  redis.call('HSET', KEYS[5], 's:' .. d, now, 'l:' .. d, now)
elseif now - last > tonumber(ARGV[11]) / 10 then
  redis.call('HSET', KEYS[5], 'l:' .. d, now)
end
if f[1] then return {0} end
-- A window that began after its definition appeared: every request in it was charged.
if not f[2] and tonumber(ARGV[4]) >= since then return {0} end
if not redis.call('SET', KEYS[4], ARGV[3], 'NX', 'PX', ARGV[2]) then
  if redis.call('GET', KEYS[4]) ~= ARGV[3] then return {1} end
end
local cut = f[2]
if not cut then
  cut = ARGV[1]
  -- Whatever it counted before the cut-off is in the ledger sum.
  redis.call('HSET', KEYS[3], 'cut', cut, 'used', 0, 'a.start', ARGV[4], 'a.end', ARGV[5],
    'a.measure', ARGV[6], 'a.key', ARGV[7], 'a.model', ARGV[8])
  redis.call('HSET', KEYS[2], KEYS[3], cut)
  local expire_at = tonumber(ARGV[9])
  if expire_at > 0 then redis.call('PEXPIREAT', KEYS[3], expire_at) end
end
return {2, tonumber(cut)}
"#;

const FINISH_COUNTER_SEED: &str = r#"
local cut = redis.call('HGET', KEYS[1], 'cut')
if cut and tonumber(cut) == tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'seed', ARGV[2])
  local expire_at = tonumber(ARGV[3])
  if expire_at > 0 then redis.call('PEXPIREAT', KEYS[1], expire_at) end
end
redis.call('DEL', KEYS[2])
return 1
"#;

/// How long one replica may hold the rebuild lock of a tenant.
const SEED_LOCK_MS: i64 = 60_000;

pub struct RedisCounters {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    last_attempt: Mutex<Option<Instant>>,
    timeout: Duration,
    reserve: Script,
    settle: Script,
    begin_seed: Script,
    finish_seed: Script,
    begin_counter_seed: Script,
    finish_counter_seed: Script,
    /// Identifies this process as the holder of a rebuild lock.
    owner: String,
}

impl RedisCounters {
    /// Does not connect yet: a Redis that is down at start is handled like one that goes down later.
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<RedisCounters> {
        Ok(RedisCounters {
            client: redis::Client::open(url)?,
            connection: tokio::sync::Mutex::new(None),
            last_attempt: Mutex::new(None),
            timeout,
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            begin_seed: Script::new(BEGIN_SEED),
            finish_seed: Script::new(FINISH_SEED),
            begin_counter_seed: Script::new(BEGIN_COUNTER_SEED),
            finish_counter_seed: Script::new(FINISH_COUNTER_SEED),
            owner: format!(
                "{}-{}",
                std::process::id(),
                chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
            ),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, Unavailable> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        {
            // Do not hammer a Redis that is down: one connection attempt per 500 ms.
            let mut last = self.last_attempt.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < Duration::from_millis(500)) {
                return Err(Unavailable("not connected".into()));
            }
            *last = Some(Instant::now());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connection = tokio::time::timeout(
            self.timeout * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| Unavailable("connect timed out".into()))?
        .map_err(|e| Unavailable(e.to_string()))?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Whether Redis answers now.
    pub async fn ping(&self) -> Result<(), Unavailable> {
        let mut connection = self.connection().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok(())
    }
}

fn holds_key(counter: &str) -> String {
    format!("{counter}:holds")
}

/// A per-tenant key (`tg:{tenant}:name`), in the same cluster slot as the tenant's counters.
fn tenant_key(tag: &str, name: &str) -> String {
    format!("tg:{{{tag}}}:{name}")
}

fn expire_at(window_end_ms: i64) -> i64 {
    if window_end_ms == i64::MAX {
        0
    } else {
        window_end_ms.saturating_add(WINDOW_GRACE_MS)
    }
}

#[async_trait]
impl Counters for RedisCounters {
    async fn reserve(
        &self,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        now_ms: i64,
        hold_until_ms: i64,
    ) -> Result<Result<Vec<i64>, Denied>, Unavailable> {
        let mut connection = self.connection().await?;
        let mut invocation = self.reserve.prepare_invoke();
        invocation
            .arg(request_id)
            .arg(now_ms)
            .arg(hold_until_ms)
            .arg(charges.len());
        for charge in charges {
            invocation
                .key(&charge.counter)
                .key(holds_key(&charge.counter));
            invocation
                .arg(charge.limit)
                .arg(super::clamp(charge.amount))
                .arg(u8::from(charge.hard))
                .arg(expire_at(charge.window_end_ms));
        }
        invocation.key(tenant_key(tag, "ready"));
        let reply: Vec<i64> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        match reply.as_slice() {
            [1, rooms @ ..] => Ok(Ok(rooms.to_vec())),
            [2] => Err(Unavailable(
                "counters are being rebuilt from the ledger".into(),
            )),
            [3] => Err(Unavailable(
                "a counter is being seeded from the ledger".into(),
            )),
            [0, index, room] => Ok(Err(Denied {
                index: (*index as usize).saturating_sub(1),
                room: *room,
            })),
            other => Err(Unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    async fn settle(
        &self,
        tag: &str,
        request_id: &str,
        charges: &[Charge],
        ended_ms: i64,
        facts: &Facts,
    ) -> Result<Vec<i64>, Unavailable> {
        let mut connection = self.connection().await?;
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(tenant_key(tag, &format!("settled:{request_id}")))
            .key(tenant_key(tag, "epoch"))
            .key(tenant_key(tag, "added"));
        invocation
            .arg(request_id)
            .arg(charges.len())
            .arg(SETTLED_MEMORY_MS)
            .arg(ended_ms)
            .arg(facts.created_ms)
            .arg(&facts.key)
            .arg(&facts.model)
            .arg(super::clamp(facts.tokens))
            .arg(super::clamp(facts.cost))
            .arg(ADDED_MEMORY_MS);
        for charge in charges {
            invocation
                .key(&charge.counter)
                .key(holds_key(&charge.counter));
        }
        for charge in charges {
            invocation.arg(super::clamp(charge.amount));
        }
        for charge in charges {
            invocation.arg(expire_at(charge.window_end_ms));
        }
        invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))
    }

    async fn first_alert(
        &self,
        tag: &str,
        marker: &str,
        expire_at_ms: i64,
    ) -> Result<bool, Unavailable> {
        let mut connection = self.connection().await?;
        let set: Option<String> = redis::cmd("SET")
            .arg(tenant_key(tag, &format!("alert:{marker}")))
            .arg("1")
            .arg("NX")
            .arg("PXAT")
            .arg(expire_at_ms)
            .query_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok(set.is_some())
    }

    async fn begin_seed(&self, tag: &str, now_ms: i64) -> Result<Option<i64>, Unavailable> {
        let mut connection = self.connection().await?;
        let mut invocation = self.begin_seed.prepare_invoke();
        invocation
            .key(tenant_key(tag, "ready"))
            .key(tenant_key(tag, "epoch"))
            .key(tenant_key(tag, "seeding"));
        invocation.arg(now_ms).arg(SEED_LOCK_MS).arg(&self.owner);
        let epoch: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok((epoch >= 0).then_some(epoch))
    }

    async fn finish_seed(&self, tag: &str, seeds: &[Seed]) -> Result<(), Unavailable> {
        let mut connection = self.connection().await?;
        let mut invocation = self.finish_seed.prepare_invoke();
        invocation
            .key(tenant_key(tag, "ready"))
            .key(tenant_key(tag, "seeding"))
            .key(tenant_key(tag, "epoch"));
        invocation.arg(seeds.len());
        for seed in seeds {
            invocation.key(&seed.counter);
            invocation.arg(super::clamp(seed.amount));
        }
        invocation.key(tenant_key(tag, "defs"));
        for seed in seeds {
            invocation.arg(expire_at(seed.window_end_ms));
        }
        for seed in seeds {
            invocation.arg(&seed.definition);
        }
        let _: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok(())
    }

    async fn begin_counter_seed(
        &self,
        tag: &str,
        added: &Added,
        now_ms: i64,
    ) -> Result<CounterSeed, Unavailable> {
        let mut connection = self.connection().await?;
        let mut invocation = self.begin_counter_seed.prepare_invoke();
        invocation
            .key(tenant_key(tag, "ready"))
            .key(tenant_key(tag, "added"))
            .key(&added.counter)
            .key(format!("{}:seeding", added.counter))
            .key(tenant_key(tag, "defs"));
        invocation
            .arg(now_ms)
            .arg(SEED_LOCK_MS)
            .arg(&self.owner)
            .arg(added.window_start_ms)
            .arg(added.window_end_ms)
            .arg(added.measure.code())
            .arg(added.key.as_deref().unwrap_or(""))
            .arg(added.model.as_deref().unwrap_or(""))
            .arg(expire_at(added.window_end_ms))
            .arg(&added.definition)
            .arg(DEFINITION_ABSENT_MS);
        let reply: Vec<i64> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        match reply.as_slice() {
            [0] => Ok(CounterSeed::Ready),
            [1] => Ok(CounterSeed::Busy),
            [2, cut] => Ok(CounterSeed::Seed(*cut)),
            other => Err(Unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    async fn finish_counter_seed(
        &self,
        _tag: &str,
        counter: &str,
        cut: i64,
        amount: i64,
        window_end_ms: i64,
    ) -> Result<(), Unavailable> {
        let mut connection = self.connection().await?;
        let mut invocation = self.finish_counter_seed.prepare_invoke();
        invocation.key(counter).key(format!("{counter}:seeding"));
        invocation
            .arg(cut)
            .arg(super::clamp(amount))
            .arg(expire_at(window_end_ms));
        let _: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok(())
    }

    async fn read(&self, counter: &str) -> Result<(i64, i64), Unavailable> {
        let mut connection = self.connection().await?;
        let (seed, used, reserved): (Option<i64>, Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(counter)
            .arg("seed")
            .arg("used")
            .arg("reserved")
            .query_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok((
            seed.unwrap_or(0).saturating_add(used.unwrap_or(0)),
            reserved.unwrap_or(0),
        ))
    }
}
