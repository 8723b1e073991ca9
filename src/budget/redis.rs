//! The Redis budget store: counters shared by every EPP replica.
//!
//! Reservation is one Lua script (atomic on the server): check every layer, then charge every
//! layer, or charge nothing. Keys carry the window id and expire after two windows, so nothing
//! needs cleaning. Every call is bounded by a timeout and a lost connection is re-dialled on the
//! next call: a dead Redis costs each request at most the timeout, and the caller decides (fail
//! open or closed).

use std::time::Duration;

use redis::{AsyncCommands, Script, aio::MultiplexedConnection};
use tokio::sync::Mutex;

use super::{
    policy::{Layer, LayerKey, Window},
    store::{BudgetStore, Reservation, StoreError, StoreFuture},
};

const RESERVE: &str = r"
local amount = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', k) or '0')
  if used + amount > tonumber(ARGV[i + 2]) then
    return {0, i - 1, used}
  end
end
local out = {1}
for i, k in ipairs(KEYS) do
  local used = redis.call('INCRBY', k, amount)
  redis.call('PEXPIRE', k, ARGV[2])
  table.insert(out, tonumber(ARGV[i + 2]) - used)
end
return out
";

const SETTLE: &str = r"
local delta = tonumber(ARGV[1])
for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then
    local v = redis.call('INCRBY', k, delta)
    if v < 0 then redis.call('SET', k, 0, 'KEEPTTL') end
  end
end
return 1
";

/// Budget counters in Redis.
pub struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
    ttl_ms: u64,
    reserve: Script,
    settle: Script,
}

fn err(reason: impl ToString) -> StoreError {
    StoreError {
        reason: reason.to_string(),
    }
}

impl RedisStore {
    /// A store at `url` (`redis://host:port`), for windows of `window`; calls time out after
    /// `timeout`. Connects lazily.
    ///
    /// # Errors
    /// A malformed URL.
    pub fn new(url: &str, window: Duration, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            client: redis::Client::open(url).map_err(err)?,
            conn: Mutex::new(None),
            timeout,
            ttl_ms: u64::try_from(window.as_millis().saturating_mul(2))
                .unwrap_or(u64::MAX)
                .max(1000),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
        })
    }

    /// The Redis key of `layer`'s counter in `window` (the text format of earlier releases).
    fn key(layer: &Layer, window: Window) -> String {
        match &layer.key {
            LayerKey::Tenant { tenant } => format!("epp:budget:t:{tenant}:{}", window.id),
            LayerKey::Model { tenant, model } => format!("epp:budget:m:{tenant}:{model}:{}", window.id),
        }
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
            .await
            .map_err(|_| err("connect timed out"))?
            .map_err(err)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn forget_connection(&self) {
        *self.conn.lock().await = None;
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[i64],
    ) -> Result<T, StoreError> {
        let mut conn = self.connection().await?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        let result = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.forget_connection().await;
                Err(err(e))
            }
            Err(_) => {
                self.forget_connection().await;
                Err(err("call timed out"))
            }
        }
    }

    /// Round-trip check (used by tests and startup logs).
    ///
    /// # Errors
    /// When Redis does not answer.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.connection().await?;
        let r: Result<String, _> = tokio::time::timeout(self.timeout, c.ping())
            .await
            .map_err(|_| err("ping timed out"))?;
        r.map(|_| ()).map_err(err)
    }
}

impl BudgetStore for RedisStore {
    fn reserve<'a>(
        &'a self,
        layers: &'a [Layer],
        amount: u64,
        window: Window,
    ) -> StoreFuture<'a, Reservation> {
        Box::pin(async move {
            let keys: Vec<String> = layers.iter().map(|l| Self::key(l, window)).collect();
            let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let mut args = vec![int(amount), int(self.ttl_ms)];
            args.extend(layers.iter().map(|l| int(l.limit)));
            let out: Vec<i64> = self.run(&self.reserve, &keys, &args).await?;
            match out.as_slice() {
                [1, remaining @ ..] => Ok(Reservation::Admitted {
                    remaining: remaining.iter().map(|r| (*r).max(0) as u64).collect(),
                }),
                [0, layer, used] => Ok(Reservation::Rejected {
                    layer: (*layer).max(0) as usize,
                    used: (*used).max(0) as u64,
                }),
                other => Err(err(format!("unexpected reserve answer {other:?}"))),
            }
        })
    }

    fn settle<'a>(
        &'a self,
        layers: &'a [Layer],
        window: Window,
        reserved: u64,
        actual: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let keys: Vec<String> = layers.iter().map(|l| Self::key(l, window)).collect();
            let delta =
                i64::try_from(actual).unwrap_or(i64::MAX) - i64::try_from(reserved).unwrap_or(i64::MAX);
            self.run::<i64>(&self.settle, &keys, &[delta]).await.map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_render_the_layer_and_the_window() {
        let window = Window {
            id: 42,
            remaining_ms: 1,
        };
        let key = |key| RedisStore::key(&Layer { key, limit: 1 }, window);
        assert_eq!(key(LayerKey::tenant("team-a")), "epp:budget:t:team-a:42");
        assert_eq!(
            key(LayerKey::model("team-a", "gpt-4o")),
            "epp:budget:m:team-a:gpt-4o:42"
        );
    }
}
