//! The Redis budget store: counters shared by every EPP replica.
//!
//! Reservation is one Lua script (atomic on the server): check every counter, then charge every
//! counter, or charge nothing. Keys carry the layer, period, unit and window id and expire a
//! minute after their window ends, so nothing needs cleaning. Every call is bounded by a
//! timeout and a lost connection is re-dialled on the next call: a dead Redis costs each
//! request at most the timeout, and the caller decides (fail open or closed). Lua counts in
//! doubles: counters stay exact up to 2^53 (9 million currency units in nano units, the most a
//! money limit may name). Tenant and model names are escaped in keys (`%` and `:` as `%25` and
//! `%3A`), so no two layers share a key; names without either render as they are.

use std::time::Duration;

use redis::{AsyncCommands, Script, aio::MultiplexedConnection};
use tokio::sync::Mutex;

use super::{
    policy::{Charge, Counter, LayerKey},
    store::{BudgetStore, Reservation, StoreError, StoreFuture},
};

/// `name` with `%` and `:` percent-encoded: the key's separator cannot come from a name.
fn escape(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains(['%', ':']) {
        name.replace('%', "%25").replace(':', "%3A").into()
    } else {
        name.into()
    }
}

/// `ARGV` holds `amount, limit, ttl_ms` for each key in turn.
const RESERVE: &str = r"
for i, k in ipairs(KEYS) do
  local used = tonumber(redis.call('GET', k) or '0')
  if used + tonumber(ARGV[3 * i - 2]) > tonumber(ARGV[3 * i - 1]) then
    return {0, i - 1, used}
  end
end
local out = {1}
for i, k in ipairs(KEYS) do
  table.insert(out, redis.call('INCRBY', k, ARGV[3 * i - 2]))
  redis.call('PEXPIRE', k, ARGV[3 * i])
end
return out
";

/// `ARGV[i]` is the change of key `i` (actual minus reserved).
const SETTLE: &str = r"
for i, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then
    local v = redis.call('INCRBY', k, ARGV[i])
    if v < 0 then redis.call('SET', k, 0, 'KEEPTTL') end
  end
end
return 1
";

/// How long a counter outlives its window: a replica whose clock is behind by less than this
/// still finds the counter instead of starting a fresh one.
const GRACE_MS: u64 = 60_000;

/// Budget counters in Redis.
pub struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
    reserve: Script,
    settle: Script,
}

fn err(reason: impl ToString) -> StoreError {
    StoreError {
        reason: reason.to_string(),
    }
}

/// Counters and amounts as Redis integers (which are signed).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl RedisStore {
    /// A store at `url` (`redis://host:port`); calls time out after `timeout`. Connects lazily.
    ///
    /// # Errors
    /// A malformed URL.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            client: redis::Client::open(url).map_err(err)?,
            conn: Mutex::new(None),
            timeout,
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
        })
    }

    /// The Redis key of `counter` in its window.
    fn key(counter: &Counter) -> String {
        let (period, unit, id) = (
            counter.key.period.label(),
            counter.key.unit.label(),
            counter.window.id,
        );
        match &counter.key.layer {
            LayerKey::Tenant { tenant } => {
                format!("epp:budget:t:{}:{period}:{unit}:{id}", escape(tenant))
            }
            LayerKey::Model { tenant, model } => format!(
                "epp:budget:m:{}:{}:{period}:{unit}:{id}",
                escape(tenant),
                escape(model)
            ),
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
    fn reserve<'a>(&'a self, counters: &'a [Counter], charge: Charge) -> StoreFuture<'a, Reservation> {
        Box::pin(async move {
            let keys: Vec<String> = counters.iter().map(Self::key).collect();
            let mut args = Vec::with_capacity(counters.len() * 3);
            for c in counters {
                args.extend([
                    int(charge.of(c.key.unit)),
                    int(c.limit),
                    int(c.window.remaining_ms.saturating_add(GRACE_MS)),
                ]);
            }
            let out: Vec<i64> = self.run(&self.reserve, &keys, &args).await?;
            match out.as_slice() {
                [1, used @ ..] if used.len() == counters.len() => Ok(Reservation::Admitted {
                    used: used.iter().map(|u| (*u).max(0) as u64).collect(),
                }),
                [0, counter, used] => Ok(Reservation::Rejected {
                    counter: (*counter).max(0) as usize,
                    used: (*used).max(0) as u64,
                }),
                other => Err(err(format!("unexpected reserve answer {other:?}"))),
            }
        })
    }

    fn settle<'a>(
        &'a self,
        counters: &'a [Counter],
        reserved: Charge,
        actual: Charge,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let keys: Vec<String> = counters.iter().map(Self::key).collect();
            let deltas: Vec<i64> = counters
                .iter()
                .map(|c| int(actual.of(c.key.unit)).saturating_sub(int(reserved.of(c.key.unit))))
                .collect();
            self.run::<i64>(&self.settle, &keys, &deltas).await.map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::policy::{CounterKey, Period, Unit, Window};

    #[test]
    fn keys_render_the_layer_period_unit_and_window() {
        let key = |layer, period, unit| {
            RedisStore::key(&Counter {
                key: CounterKey { layer, period, unit },
                limit: 1,
                window: Window {
                    id: 42,
                    ends_ms: 1,
                    remaining_ms: 1,
                },
            })
        };
        assert_eq!(
            key(
                LayerKey::tenant("team-a"),
                Period::Fixed { ms: 60_000 },
                Unit::Tokens
            ),
            "epp:budget:t:team-a:60s:tokens:42"
        );
        assert_eq!(
            key(LayerKey::model("team-a", "gpt-4o"), Period::Month, Unit::Spend),
            "epp:budget:m:team-a:gpt-4o:month:spend:42"
        );
        // Tenant `a:b` on model `c` and tenant `a` on model `b:c` are two layers, two keys.
        let (left, right) = (
            key(LayerKey::model("a:b", "c"), Period::Day, Unit::Tokens),
            key(LayerKey::model("a", "b:c"), Period::Day, Unit::Tokens),
        );
        assert_eq!(left, "epp:budget:m:a%3Ab:c:day:tokens:42");
        assert_eq!(right, "epp:budget:m:a:b%3Ac:day:tokens:42");
        assert_eq!(
            key(LayerKey::tenant("100%:x"), Period::Day, Unit::Tokens),
            "epp:budget:t:100%25%3Ax:day:tokens:42"
        );
    }
}
