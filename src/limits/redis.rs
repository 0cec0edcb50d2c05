//! The Redis backend: the same limits as [`super::local`], held in Redis so that every gateway
//! on it shares them. Each admission is one Lua script (atomic; `EVALSHA`, with `EVAL` when
//! Redis does not know the script yet), each release another. Time is Redis's own (`TIME`), so
//! gateways with skewed clocks agree.
//!
//! Keys, per scope (`k:<key id>` or `a:<account id>`), under `limits.key_prefix`:
//! - `<scope>:rq`, `<scope>:tk`: the GCRA arrival time of requests and tokens, in µs, expiring
//!   when it is in the past (nothing is left for an idle scope);
//! - `<scope>:fl`: the requests in flight, a sorted set of request ids scored by the end of
//!   their lease (`limits.in_flight_lease`): a gateway that dies holding places leaks nothing;
//! - `<scope>:sp:<day>`: the UTC day's spend (charges and estimates in flight), seeded from the
//!   ledger the first time a day is seen, expiring an hour after the day ends.
//!
//! One connection manager per gateway, connected in the background at start (a Redis that is
//! down at start is the same as one that goes down later); it reconnects by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{DAY_MS, Exceeded, LimitError, Scoped};
use crate::billing::{Billing, Credits};
use crate::config::LimitsConfig;
use crate::store::now_ms;

const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local estimate = ARGV[2]
local id = ARGV[3]
local lease = tonumber(ARGV[4])
local day_ttl = tonumber(ARGV[5])
local window = 60000000
local plans = {}
for i = 0, n - 1 do
  local a = 5 + i * 6
  local rpm = tonumber(ARGV[a + 1])
  local tpm = tonumber(ARGV[a + 2])
  local cost = tonumber(ARGV[a + 3])
  local conc = tonumber(ARGV[a + 4])
  local cap = tonumber(ARGV[a + 5])
  local seed = ARGV[a + 6]
  local rq, tk, fl, sp = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  local p = {}
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', fl, '-inf', now)
    if redis.call('ZCARD', fl) >= conc then return {1, i, 1000} end
  end
  if rpm > 0 then
    local tat = tonumber(redis.call('GET', rq) or '0')
    if tat < now then tat = now end
    local nxt = tat + math.floor(window / rpm)
    if nxt - now > window then return {2, i, math.ceil((nxt - now - window) / 1000)} end
    p.rq = nxt
  end
  if tpm > 0 then
    local tat = tonumber(redis.call('GET', tk) or '0')
    if tat < now then tat = now end
    local nxt = tat + cost
    if nxt - now > window then return {3, i, math.ceil((nxt - now - window) / 1000)} end
    p.tk = nxt
  end
  if cap >= 0 then
    local spent = redis.call('GET', sp)
    if not spent then
      if seed == '-' then return {-1, i, 0} end
      redis.call('SET', sp, seed, 'PX', day_ttl)
      spent = seed
    end
    if tonumber(spent) + tonumber(estimate) > cap then return {4, i, 0} end
    p.sp = true
  end
  p.conc = conc > 0
  plans[i] = p
end
for i = 0, n - 1 do
  local p = plans[i]
  local rq, tk, fl, sp = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  if p.rq then redis.call('SET', rq, string.format('%.0f', p.rq), 'PX', math.ceil((p.rq - now) / 1000) + 1) end
  if p.tk then redis.call('SET', tk, string.format('%.0f', p.tk), 'PX', math.ceil((p.tk - now) / 1000) + 1) end
  if p.conc then
    redis.call('ZADD', fl, now + lease, id)
    redis.call('PEXPIRE', fl, math.ceil(lease / 1000))
  end
  if p.sp then redis.call('INCRBY', sp, estimate) end
end
return {0, 0, 0}
"#;

const RELEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local id = ARGV[2]
local spend = ARGV[3]
for i = 0, n - 1 do
  local back = tonumber(ARGV[4 + i])
  local tk, fl, sp = KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  redis.call('ZREM', fl, id)
  if back > 0 then
    local tat = tonumber(redis.call('GET', tk) or '0')
    if tat - back <= now then
      redis.call('DEL', tk)
    else
      redis.call('SET', tk, string.format('%.0f', tat - back), 'PX', math.ceil((tat - back - now) / 1000) + 1)
    end
  end
  if redis.call('EXISTS', sp) == 1 then redis.call('INCRBY', sp, spend) end
end
return 0
"#;

/// Redis could not be asked (down, slow, refused the script).
#[derive(Debug)]
pub(super) struct Down(pub String);

#[derive(Clone)]
pub(super) struct RedisLimits {
    conn: Arc<tokio::sync::OnceCell<ConnectionManager>>,
    prefix: Arc<str>,
    lease: Duration,
    admit: Arc<Script>,
    release: Arc<Script>,
    /// When Redis being down was last logged (ms): once per [`LOG_EVERY_MS`].
    last_logged: Arc<AtomicI64>,
}

const LOG_EVERY_MS: i64 = 10_000;

/// One scope's place in Redis.
pub(super) struct Held {
    keys: [String; 4],
    /// µs of tokens per token at the scope's limit (0: no token limit).
    per_token_us: u64,
}

impl RedisLimits {
    /// Tries to connect once (for at most four `limits.redis_timeout`), then again and again in
    /// the background until Redis answers.
    pub(super) async fn new(
        url: &str,
        cfg: &LimitsConfig,
        background: &crate::background::Background,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("limits.redis_url: {e}"))?;
        let conn = Arc::new(tokio::sync::OnceCell::new());
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(cfg.redis_timeout)
            .set_response_timeout(cfg.redis_timeout)
            .set_number_of_retries(1)
            .set_max_delay(1000);
        if let Ok(Ok(m)) = tokio::time::timeout(
            cfg.redis_timeout.saturating_mul(4),
            ConnectionManager::new_with_config(client.clone(), manager_cfg.clone()),
        )
        .await
        {
            let _ = conn.set(m);
        } else {
            tracing::warn!("limits: Redis is not answering at start; connecting in the background");
        }
        let cell = conn.clone();
        let stopping = background.stopping();
        background.spawn(async move {
            if cell.initialized() {
                return;
            }
            tokio::pin!(stopping);
            let mut wait = Duration::from_millis(100);
            loop {
                match ConnectionManager::new_with_config(client.clone(), manager_cfg.clone()).await
                {
                    Ok(m) => {
                        let _ = cell.set(m);
                        tracing::info!("limits: connected to Redis");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "limits: Redis is not answering yet");
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = &mut stopping => return,
                        }
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(Self {
            conn,
            prefix: cfg.key_prefix.clone().into(),
            lease: cfg.in_flight_lease,
            admit: Arc::new(Script::new(ADMIT)),
            release: Arc::new(Script::new(RELEASE)),
            last_logged: Arc::new(AtomicI64::new(i64::MIN)),
        })
    }

    fn manager(&self) -> Result<ConnectionManager, Down> {
        self.conn
            .get()
            .cloned()
            .ok_or_else(|| Down("not connected yet".into()))
    }

    /// Log Redis being down at most once per interval; true if this call logged.
    pub(super) fn log_down(&self, down: &Down, open: bool) {
        let now = now_ms();
        let last = self.last_logged.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= LOG_EVERY_MS
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            if open {
                tracing::error!(error = %down.0, "limits: Redis is down; admitting requests without limits (limits.on_redis_error: open)");
            } else {
                tracing::error!(error = %down.0, "limits: Redis is down; refusing requests with 503 (limits.on_redis_error: closed)");
            }
        }
    }

    pub(super) async fn admit(
        &self,
        billing: &Billing,
        scopes: &[Scoped<'_>],
        request_id: &str,
        tokens: u64,
        estimate: Credits,
        now_ms: i64,
    ) -> Result<Result<Vec<Held>, LimitError>, Down> {
        let mut conn = self.manager()?;
        let today = now_ms.div_euclid(DAY_MS);
        let day_ttl = (today + 1) * DAY_MS - now_ms + 3_600_000;
        let held: Vec<Held> = scopes
            .iter()
            .map(|sc| {
                let base = format!("{}{}", self.prefix, sc.cache_key());
                Held {
                    keys: [
                        format!("{base}:rq"),
                        format!("{base}:tk"),
                        format!("{base}:fl"),
                        format!("{base}:sp:{today}"),
                    ],
                    per_token_us: sc
                        .limits
                        .tokens_per_minute
                        .map_or(0, |l| 60_000_000 / l.max(1)),
                }
            })
            .collect();
        let mut seeds: Vec<Option<i64>> = vec![None; scopes.len()];
        // At most one round per scope to seed its day's spend from the ledger.
        for _ in 0..=scopes.len() {
            let mut inv = self.admit.prepare_invoke();
            for h in &held {
                for k in &h.keys {
                    inv.key(k);
                }
            }
            inv.arg(scopes.len())
                .arg(estimate.0)
                .arg(request_id)
                .arg(u64::try_from(self.lease.as_micros()).unwrap_or(u64::MAX))
                .arg(day_ttl);
            for (i, sc) in scopes.iter().enumerate() {
                let l = sc.limits;
                let cost = if l.tokens_per_minute.is_some() {
                    held[i].per_token_us.saturating_mul(tokens)
                } else {
                    0
                };
                inv.arg(l.requests_per_minute.unwrap_or(0))
                    .arg(l.tokens_per_minute.unwrap_or(0))
                    .arg(cost)
                    .arg(l.concurrent_requests.unwrap_or(0))
                    .arg(l.spend_per_day().map_or(-1, |c| c.0))
                    .arg(seeds[i].map_or_else(|| "-".to_string(), |s| s.to_string()));
            }
            let reply: Vec<i64> = inv
                .invoke_async(&mut conn)
                .await
                .map_err(|e| Down(e.to_string()))?;
            let (code, i, wait_ms) = match reply.as_slice() {
                [c, i, w] => (*c, usize::try_from(*i).unwrap_or(0), *w),
                _ => return Err(Down(format!("unexpected reply {reply:?}"))),
            };
            let Some(sc) = scopes.get(i) else {
                return Err(Down(format!("unexpected scope in reply {reply:?}")));
            };
            let scope = sc.scope;
            let retry_after = Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0).max(1));
            let l = sc.limits;
            let refused = match code {
                0 => return Ok(Ok(held)),
                -1 => {
                    let spent = match sc.spent_since(billing, today * DAY_MS).await {
                        Ok(s) => s,
                        Err(e) => return Ok(Err(e.into())),
                    };
                    seeds[i] = Some(spent.0);
                    continue;
                }
                1 => Exceeded::Concurrency {
                    scope,
                    limit: l.concurrent_requests.unwrap_or(0),
                },
                2 => Exceeded::Requests {
                    scope,
                    limit: l.requests_per_minute.unwrap_or(0),
                    retry_after,
                },
                3 => Exceeded::Tokens {
                    scope,
                    limit: l.tokens_per_minute.unwrap_or(0),
                    requested: tokens,
                    retry_after,
                },
                _ => super::spend_exceeded(
                    scope,
                    l.spend_per_day().unwrap_or_default(),
                    today,
                    now_ms,
                ),
            };
            return Ok(Err(refused.into()));
        }
        Err(Down("the day's spend could not be seeded".into()))
    }

    /// Give the places back (on a task of the background: the request has ended).
    pub(super) async fn release(
        self,
        held: Vec<Held>,
        request_id: String,
        unused_tokens: u64,
        spend_delta: i64,
    ) {
        let Ok(mut conn) = self.manager() else {
            return;
        };
        let mut inv = self.release.prepare_invoke();
        for h in &held {
            for k in &h.keys {
                inv.key(k);
            }
        }
        inv.arg(held.len()).arg(request_id).arg(spend_delta);
        for h in &held {
            inv.arg(h.per_token_us.saturating_mul(unused_tokens));
        }
        if let Err(e) = inv.invoke_async::<i64>(&mut conn).await {
            // The lease and the key TTLs bound what is left behind.
            tracing::debug!(error = %e, "limits: giving places back to Redis failed");
        }
    }
}
