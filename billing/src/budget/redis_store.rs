//! Counters in Redis, shared by every gateway replica. Each operation is one Lua script, so a
//! reservation against several limits is atomic. Keys carry the tenant as a hash tag
//! (`tg:{acme}:...`), so one tenant's counters live on one Redis Cluster slot.
//!
//! Layout per counter `C`: a hash with `used`, `reserved` and one `r:<request id>` field per
//! hold; and a sorted set `C:holds` of request ids scored by hold expiry, which every
//! reservation sweeps, so holds of a dead gateway release themselves.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{Charge, Counters, Denied, Unavailable};

/// How long a settled request id is remembered in Redis.
const SETTLED_MEMORY_MS: i64 = 24 * 3_600_000;
/// Counters outlive their window by this much (late settles still land).
const WINDOW_GRACE_MS: i64 = 24 * 3_600_000;

const RESERVE: &str = r#"
local id, now, hold_until, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
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
  local room = limit - tonumber(redis.call('HGET', c, 'used') or '0') - tonumber(redis.call('HGET', c, 'reserved') or '0')
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
local id, n = ARGV[1], tonumber(ARGV[2])
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then return 0 end
for i = 1, n do
  local c, z = KEYS[2*i], KEYS[2*i+1]
  local held = redis.call('HGET', c, 'r:' .. id)
  if held then
    redis.call('HINCRBY', c, 'reserved', -tonumber(held))
    redis.call('HDEL', c, 'r:' .. id)
    redis.call('ZREM', z, id)
  end
  redis.call('HINCRBY', c, 'used', tonumber(ARGV[3 + i]))
  local expire_at = tonumber(ARGV[3 + n + i])
  if expire_at > 0 then redis.call('PEXPIREAT', c, expire_at) end
end
return 1
"#;

pub struct RedisCounters {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    last_attempt: Mutex<Option<Instant>>,
    timeout: Duration,
    reserve: Script,
    settle: Script,
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
}

fn holds_key(counter: &str) -> String {
    format!("{counter}:holds")
}

/// The `{tag}` of a counter key, for keys that must share its slot.
fn hash_tag(counter: &str) -> &str {
    match (counter.find('{'), counter.find('}')) {
        (Some(a), Some(b)) if b > a => &counter[a..=b],
        _ => "",
    }
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
                .arg(charge.amount)
                .arg(u8::from(charge.hard))
                .arg(expire_at(charge.window_end_ms));
        }
        let reply: Vec<i64> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        match reply.as_slice() {
            [1, rooms @ ..] => Ok(Ok(rooms.to_vec())),
            [0, index, room] => Ok(Err(Denied {
                index: (*index as usize).saturating_sub(1),
                room: *room,
            })),
            other => Err(Unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    async fn settle(
        &self,
        request_id: &str,
        charges: &[Charge],
        _now_ms: i64,
    ) -> Result<(), Unavailable> {
        let mut connection = self.connection().await?;
        let tag = charges.first().map_or("", |c| hash_tag(&c.counter));
        let mut invocation = self.settle.prepare_invoke();
        invocation.key(format!("tg:{tag}:settled:{request_id}"));
        invocation
            .arg(request_id)
            .arg(charges.len())
            .arg(SETTLED_MEMORY_MS);
        for charge in charges {
            invocation
                .key(&charge.counter)
                .key(holds_key(&charge.counter));
        }
        for charge in charges {
            invocation.arg(charge.amount);
        }
        for charge in charges {
            invocation.arg(expire_at(charge.window_end_ms));
        }
        let _: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok(())
    }

    async fn read(&self, counter: &str) -> Result<(i64, i64), Unavailable> {
        let mut connection = self.connection().await?;
        let (used, reserved): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(counter)
            .arg("used")
            .arg("reserved")
            .query_async(&mut connection)
            .await
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok((used.unwrap_or(0), reserved.unwrap_or(0)))
    }
}
