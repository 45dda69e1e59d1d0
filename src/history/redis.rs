//! History in Redis: one function library, `switchboard`, that every node
//! loads with `FUNCTION LOAD REPLACE` at start and after every reconnect
//! (functions vanish with a Redis that restarted empty), so that any process
//! in any language publishes with history in one call:
//!
//! `FCALL switchboard_publish 1 <topic> '<envelope json>' [prefix]` → `[offset, epoch]`
//!
//! Keys per topic carry the topic as a hash tag, so both live in one Redis
//! Cluster slot, the one a cluster-aware client routes `<topic>` to:
//! `{prefix}:history:{<topic>}` (a stream; entry ID = offset) and
//! `{prefix}:history-meta:{<topic>}` (a hash: `e` epoch, `s` top offset).
//! Only `switchboard_publish` creates them: `switchboard_history` on a topic
//! without them answers a pending epoch and writes nothing.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{History, HistoryError, Position, Range, Stored};
use crate::config::HistoryConfig;
use crate::redis::{Keys, Redis, RedisError};

/// The library, with `__SIZE__`, `__TTL__`, `__MAX_DEPTH__`, `__PATTERNS__`
/// and `__SHARDED__` filled in from the loading node's settings.
const LIBRARY: &str = r#"#!lua name=switchboard
-- Switchboard history functions, library version 2 (src/history/redis.rs).
-- Version 2: reads create no key (a topic without an epoch is read as the
-- pending epoch '~<ms base 36>'); epochs are '<ms base 36>.<random>'.
-- Every node loads this
-- library with FUNCTION LOAD REPLACE at start and after each reconnect; the
-- settings below are the loading node's HISTORY_SIZE, HISTORY_TTL_MS and
-- HISTORY_TOPICS, so all nodes of a deployment must share them.
local SIZE = __SIZE__
local TTL = __TTL__
local MAX_DEPTH = __MAX_DEPTH__
local PATTERNS = { __PATTERNS__ }
-- On a Redis Cluster publications go out with SPUBLISH on a channel that
-- carries the topic as a hash tag, in the slot of the topic's keys.
local SHARDED = __SHARDED__

local function fail(msg)
  return redis.error_reply('ERR ' .. msg)
end

local function valid_name(s)
  return type(s) == 'string' and #s >= 1 and #s <= 128 and not string.find(s, '[^%w_%.:/%-]')
end

local function is_history(topic)
  -- The live frame stream never keeps history, whatever the patterns say.
  if topic == '__NO_HISTORY__' then return false end
  for _, p in ipairs(PATTERNS) do
    if string.find(topic, p) then return true end
  end
  return false
end

local function depth_ok(v, d)
  if type(v) ~= 'table' then return true end
  if d > MAX_DEPTH then return false end
  for _, x in pairs(v) do
    if not depth_ok(x, d + 1) then return false end
  end
  return true
end

local function names(topic, prefix)
  local tag = '{' .. topic .. '}'
  local channel = prefix .. ':t:' .. topic
  if SHARDED then channel = prefix .. ':t:' .. tag end
  return prefix .. ':history:' .. tag, prefix .. ':history-meta:' .. tag, channel
end

local function b36(n)
  local chars = '0123456789abcdefghijklmnopqrstuvwxyz'
  local s = ''
  repeat
    local d = n % 36
    s = string.sub(chars, d + 1, d + 1) .. s
    n = math.floor(n / 36)
  until n == 0
  return s
end

-- Milliseconds since the Unix epoch, by the server clock (the clock of
-- the topic's shard: pending epochs and epochs are compared by it).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A new epoch: its creation time (so a Redis that restarted empty never
-- hands out an earlier epoch again, and a pending position can be compared
-- with it), a dot and a random part.
local function new_epoch()
  local r = ''
  for _ = 1, 4 do r = r .. b36(math.random(0, 35)) end
  return b36(now_ms()) .. '.' .. r
end

local function meta_of(meta)
  local m = redis.call('HMGET', meta, 'e', 's')
  if m[1] then return m[1], tonumber(m[2]) end
  local e = new_epoch()
  redis.call('HSET', meta, 'e', e, 's', 0)
  return e, 0
end

local function publish(keys, args)
  local topic, envelope, prefix = keys[1], args[1], args[2] or 'switchboard'
  if not valid_name(topic) then
    return fail('invalid topic name: must match ^[A-Za-z0-9_.:/-]{1,128}$')
  end
  if not is_history(topic) then
    local plain = 'PUBLISH ' .. prefix .. ':t:' .. topic
    if SHARDED then plain = 'SPUBLISH ' .. prefix .. ':t:{' .. topic .. '}' end
    return fail("topic '" .. topic .. "' is not a history topic (HISTORY_TOPICS); publish with " .. plain)
  end
  if type(envelope) ~= 'string' then
    return fail('usage: FCALL switchboard_publish 1 <topic> <envelope json> [prefix]')
  end
  local ok, env = pcall(cjson.decode, envelope)
  if not ok then
    if string.find(tostring(env), 'nested', 1, true) then
      return fail('data is nested deeper than ' .. MAX_DEPTH .. ' levels')
    end
    return fail('envelope is not valid JSON: ' .. tostring(env))
  end
  if type(env) ~= 'table' or not string.find(envelope, '^%s*{') or env.data == nil then
    return fail('envelope must be a JSON object with a "data" field')
  end
  if env.event ~= nil and not valid_name(env.event) then
    return fail('invalid event name: must match ^[A-Za-z0-9_.:/-]{1,128}$')
  end
  if env.offset ~= nil or env.epoch ~= nil then
    return fail('"offset" and "epoch" are assigned by switchboard_publish: leave them out')
  end
  if env.v ~= nil and env.v ~= 1 then
    return fail('unsupported envelope version: this library understands version 1')
  end
  if not depth_ok(env.data, 1) then
    return fail('data is nested deeper than ' .. MAX_DEPTH .. ' levels')
  end
  local stream, meta, channel = names(topic, prefix)
  local epoch = meta_of(meta)
  local offset = redis.call('HINCRBY', meta, 's', 1)
  local id = string.format('%d-0', offset)
  if offset == 1 then redis.call('DEL', stream) end
  local body = (string.gsub(envelope, '^%s*{', '', 1))
  local payload = string.format('{"offset":%d,"epoch":"%s",', offset, epoch) .. body
  if not pcall(redis.call, 'XADD', stream, 'MAXLEN', SIZE, id, 'p', payload) then
    -- A stream left from an older epoch: it is history no longer.
    redis.call('DEL', stream)
    redis.call('XADD', stream, 'MAXLEN', SIZE, id, 'p', payload)
  end
  redis.call('PEXPIRE', stream, TTL)
  redis.call('PEXPIRE', meta, TTL)
  if SHARDED then
    redis.call('SPUBLISH', channel, payload)
  else
    redis.call('PUBLISH', channel, payload)
  end
  return {offset, epoch}
end

-- switchboard_history 1 <topic> <since|latest> <limit> [prefix]
-- → {epoch, top, id, payload, id, payload, …}
local function history(keys, args)
  local topic, since, limit, prefix = keys[1], args[1], tonumber(args[2]) or 0, args[3] or 'switchboard'
  local stream, meta = names(topic, prefix)
  local m = redis.call('HMGET', meta, 'e', 's')
  if not m[1] then
    -- No epoch (never published, or expired): a read writes nothing.
    return {'~' .. b36(now_ms()), 0}
  end
  local epoch, top = m[1], tonumber(m[2])
  redis.call('PEXPIRE', meta, TTL)
  local out = {epoch, top}
  local entries = {}
  if since == 'latest' then
    entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  elseif limit > 0 then
    local from = tonumber(since) or 0
    if from < top then
      -- Offsets have no holes: at most top - from entries follow. A
      -- shared read's limit can be far larger (a waiter's `since` far ahead
      -- of another's), and a COUNT Lua prints as a float is refused.
      local count = math.min(limit, top - from)
      entries = redis.call('XRANGE', stream, string.format('%d', from + 1), '+', 'COUNT', count)
    end
  end
  for _, e in ipairs(entries) do
    table.insert(out, e[1])
    table.insert(out, e[2][2])
  end
  return out
end

redis.register_function('switchboard_publish', publish)
redis.register_function('switchboard_history', history)
"#;

/// The library text for `config`; `sharded` on a Redis Cluster.
pub fn library(config: &HistoryConfig, sharded: bool) -> String {
    let patterns: Vec<String> = config
        .topics
        .iter()
        .map(|p| {
            // Topic patterns hold only `A-Za-z0-9_.:/-` and `*`.
            let lua: String = p
                .as_str()
                .chars()
                .map(|c| match c {
                    '*' => ".*".to_string(),
                    '.' | '-' => format!("%{c}"),
                    c => c.to_string(),
                })
                .collect();
            format!("'^{lua}$'")
        })
        .collect();
    LIBRARY
        .replace("__SIZE__", &config.size.to_string())
        .replace("__TTL__", &config.ttl.as_millis().to_string())
        .replace("__MAX_DEPTH__", &super::MAX_DEPTH.to_string())
        .replace("__PATTERNS__", &patterns.join(", "))
        .replace("__NO_HISTORY__", crate::device::frame::TOPIC)
        .replace("__SHARDED__", if sharded { "true" } else { "false" })
}

pub struct RedisHistory {
    redis: Redis,
    keys: Keys,
    library: String,
    ttl: std::time::Duration,
}

impl RedisHistory {
    /// Loads the library now and after every reconnect until `stop`.
    pub fn start(
        redis: Redis,
        keys: Keys,
        config: &HistoryConfig,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let history = Arc::new(Self {
            library: library(config, keys.sharded()),
            ttl: config.ttl,
            redis,
            keys,
        });
        let h = history.clone();
        let mut connections = h.redis.connections();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    c = connections.recv() => if c.is_none() { return },
                    _ = stop.cancelled() => return,
                }
                // Retry until loaded: without the library every history
                // publish fails.
                while let Err(e) = h.load().await {
                    tracing::warn!(cause = %e, "loading the history functions failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        });
        history
    }

    async fn load(&self) -> Result<(), RedisError> {
        self.redis.function_load(&self.library).await?;
        tracing::debug!("history functions loaded");
        Ok(())
    }

    /// Calls a function of the library, loading it once if Redis lost it.
    async fn call(
        &self,
        function: &str,
        topic: &str,
        args: &[&str],
    ) -> Result<Vec<Bytes>, HistoryError> {
        let res = match self.redis.fcall(function, topic, args).await {
            Err(RedisError::Redis(e)) if e.details().contains("Function not found") => {
                self.load().await.map_err(unavailable)?;
                self.redis.fcall(function, topic, args).await
            }
            other => other,
        };
        res.map_err(|e| match e {
            // An error the function raised itself: the caller's input.
            RedisError::Redis(e) if e.details().starts_with("ERR ") => {
                HistoryError::Refused(e.details().trim_start_matches("ERR ").to_string())
            }
            other => unavailable(other),
        })
    }

    async fn range(&self, topic: &str, since: &str, limit: usize) -> Result<Range, HistoryError> {
        let limit = limit.to_string();
        let reply = self
            .call(
                "switchboard_history",
                topic,
                &[since, &limit, self.keys.prefix()],
            )
            .await?;
        parse_range(reply, self.ttl)
            .ok_or_else(|| HistoryError::Unavailable("unexpected history reply".into()))
    }
}

fn unavailable(e: RedisError) -> HistoryError {
    HistoryError::Unavailable(e.to_string())
}

fn number(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// `{epoch, top, id, payload, …}` with ids `N-0`.
fn parse_range(reply: Vec<Bytes>, ttl: std::time::Duration) -> Option<Range> {
    let mut it = reply.into_iter();
    let epoch = String::from_utf8(it.next()?.to_vec()).ok()?;
    let top = number(&it.next()?)?;
    let mut entries = Vec::new();
    while let Some(id) = it.next() {
        let payload = it.next()?;
        let offset = number(id.split(|b| *b == b'-').next()?)?;
        entries.push(Stored { offset, payload });
    }
    Some(Range {
        epoch: Arc::from(epoch),
        top,
        entries,
        // A Redis that lost its data says nothing about it to a read.
        floor: 0,
        ttl,
    })
}

impl History for RedisHistory {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        envelope: String,
    ) -> BoxFuture<'a, Result<Position, HistoryError>> {
        Box::pin(async move {
            let reply = self
                .call(
                    "switchboard_publish",
                    topic,
                    &[&envelope, self.keys.prefix()],
                )
                .await?;
            match &reply[..] {
                [offset, epoch] => Ok(Position {
                    offset: number(offset)
                        .ok_or_else(|| HistoryError::Unavailable("unexpected offset".into()))?,
                    epoch: Arc::from(String::from_utf8_lossy(epoch).as_ref()),
                }),
                _ => Err(HistoryError::Unavailable("unexpected publish reply".into())),
            }
        })
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Range, HistoryError>> {
        Box::pin(async move { self.range(topic, &since.to_string(), limit).await })
    }

    fn latest<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Range, HistoryError>> {
        Box::pin(async move { self.range(topic, "latest", 1).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Pattern;

    #[test]
    fn library_carries_the_settings() {
        let config = HistoryConfig {
            topics: vec![Pattern::new("*"), Pattern::new("news.a-b*")],
            size: 10,
            ttl: std::time::Duration::from_secs(5),
        };
        let lib = library(&config, false);
        assert!(lib.contains("local SHARDED = false\n"));
        assert!(lib.contains("local SIZE = 10\n"));
        assert!(lib.contains("local TTL = 5000\n"));
        assert!(lib.contains("local PATTERNS = { '^.*$', '^news%.a%-b.*$' }"));
    }

    #[test]
    fn range_replies() {
        let ttl = std::time::Duration::from_secs(1);
        let r = parse_range(
            vec!["ep".into(), "7".into(), "6-0".into(), "{}".into()],
            ttl,
        )
        .unwrap();
        assert_eq!((&*r.epoch, r.top, r.entries[0].offset), ("ep", 7, 6));
        assert!(parse_range(vec!["ep".into()], ttl).is_none());
    }
}
