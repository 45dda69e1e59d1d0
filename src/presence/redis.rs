//! Presence in Redis.
//!
//! Per topic (the topic is the hash tag, so one script touches one slot):
//! - `{prefix}:presence:{<topic>}:<node>`: a hash client id →
//!   `{"user","info"}`, one per node with entries on the topic (a dead
//!   node's share is one key to take);
//! - `{prefix}:presence-nodes:{<topic>}`: the set of those nodes;
//! - `{prefix}:presence-users:{<topic>}`: a hash user → connections, so
//!   `presence_stats` is Σ HLEN over the nodes + one HLEN.
//!
//! Per node (in the node keys' slot): `presence-topics:<node>` (the topics
//! where it has entries), `presence-alive:<node>` (its mark, `PX
//! PRESENCE_TTL_MS`), and the set `presence-hosts` of nodes the reaper
//! watches. Every key disappears with its last entry. Diff messages travel
//! on `{prefix}:presence-diffs` (classic pub/sub: every node gets them).

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Applied, Heard, Op, Stats, Store};
use crate::redis::{COMMAND_TIMEOUT, Keys, LuaScript, Nested, Redis, RedisError};

/// The Lua function `compact(key)`: Redis never turns a hash that grew
/// past `hash-max-listpack-entries` back into a listpack, so after a storm
/// of leaves a small hash would keep the big encoding (about 4× the
/// memory). A hash of at most 64 fields in that encoding is written anew.
macro_rules! compact_lua {
    () => {
        r"
local function compact(k)
  local n = redis.call('HLEN', k)
  if n > 0 and n <= 64 and redis.call('OBJECT', 'ENCODING', k) == 'hashtable' then
    local all = redis.call('HGETALL', k)
    redis.call('DEL', k)
    redis.call('HSET', k, unpack(all))
  end
end
"
    };
}

/// Applies a node's changes on a topic. KEYS: users, nodes, the node's
/// hash. ARGV: node, then per change `op` (`j`/`l`), client, user, entry.
/// Answers {joins, leaves, users added, users removed, node share empty}.
const APPLY: &str = concat!(
    compact_lua!(),
    r"
local joins, leaves, added, removed = {}, {}, {}, {}
for i = 2, #ARGV, 4 do
  local op, c, u, v = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  if op == 'j' then
    if redis.call('HSETNX', KEYS[3], c, v) == 1 then
      joins[#joins+1] = c; joins[#joins+1] = v
      if u ~= '' and redis.call('HINCRBY', KEYS[1], u, 1) == 1 then added[#added+1] = v end
    end
  else
    local old = redis.call('HGET', KEYS[3], c)
    if old then
      redis.call('HDEL', KEYS[3], c)
      leaves[#leaves+1] = c; leaves[#leaves+1] = old
      if u ~= '' and redis.call('HINCRBY', KEYS[1], u, -1) <= 0 then
        redis.call('HDEL', KEYS[1], u); removed[#removed+1] = old
      end
    end
  end
end
local empty = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
else
  redis.call('SREM', KEYS[2], ARGV[1]); empty = 1
end
if #leaves > 0 then compact(KEYS[3]); compact(KEYS[1]) end
return {joins, leaves, added, removed, empty}
"
);

/// Removes a node's whole share of a topic; same keys and answer as APPLY.
const PURGE: &str = concat!(
    compact_lua!(),
    r"
local all = redis.call('HGETALL', KEYS[3])
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
local leaves, removed = {}, {}
for i = 1, #all, 2 do
  local c, v = all[i], all[i+1]
  leaves[#leaves+1] = c; leaves[#leaves+1] = v
  local ok, d = pcall(cjson.decode, v)
  local u = ''
  if ok and type(d) == 'table' and type(d.user) == 'string' then u = d.user end
  if u ~= '' and redis.call('HINCRBY', KEYS[1], u, -1) <= 0 then
    redis.call('HDEL', KEYS[1], u); removed[#removed+1] = v
  end
end
compact(KEYS[1])
return {{}, leaves, {}, removed, 1}
"
);

/// Every entry of a topic. KEYS: nodes. ARGV: the node hashes' name
/// without the node id.
const LIST: &str = r"
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local all = redis.call('HGETALL', ARGV[1] .. n)
  for i = 1, #all do out[#out+1] = all[i] end
end
return out
";

/// {clients, users}: kept counts, O(nodes). KEYS: nodes, users. ARGV: as LIST.
const STATS: &str = r"
local c = 0
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  c = c + redis.call('HLEN', ARGV[1] .. n)
end
return {c, redis.call('HLEN', KEYS[2])}
";

/// Marks a node alive; 1 when the mark was there. KEYS: mark, hosts.
/// ARGV: node, ttl ms.
const HEARTBEAT: &str = r"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return existed
";

/// Watched nodes without a mark. KEYS: hosts. ARGV: me, the marks' name
/// without the node id.
const DEAD: &str = r"
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if n ~= ARGV[1] and redis.call('EXISTS', ARGV[2] .. n) == 0 then out[#out+1] = n end
end
return out
";

/// A gone node's topics; the node stays watched until none is left (each
/// is released once purged), so that a purge cut short (a failure, the
/// reaper's own end, a drain's deadline) is taken up by the next round.
/// Unless forced, only while its mark is gone (nil otherwise); forced (the
/// node's own drain), its mark goes too, so the reaper finishes what the
/// drain could not. KEYS: mark, topics, hosts. ARGV: node, force.
const CLAIM: &str = r"
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return false end
if ARGV[2] == '1' then redis.call('DEL', KEYS[1]) end
local t = redis.call('SMEMBERS', KEYS[2])
if #t == 0 then redis.call('SREM', KEYS[3], ARGV[1]) end
return t
";

pub struct RedisStore {
    redis: Redis,
    keys: Keys,
    apply: LuaScript,
    purge: LuaScript,
    list: LuaScript,
    stats: LuaScript,
    heartbeat: LuaScript,
    dead: LuaScript,
    claim: LuaScript,
}

impl RedisStore {
    /// The store and the receiver of every node's diff messages (`enabled`:
    /// presence is on; otherwise no subscriber connection is opened).
    pub fn start(
        listeners: &crate::redis::Listeners,
        redis: Redis,
        keys: Keys,
        enabled: bool,
        stop: CancellationToken,
    ) -> Result<(RedisStore, mpsc::Receiver<Heard>), RedisError> {
        let (tx, diffs) = mpsc::channel(1024);
        if enabled {
            let channel = keys.presence_diffs();
            let mut rx = listeners.listen_for_gaps("presence changes", vec![channel], stop)?;
            tokio::spawn(async move {
                while let Some((channel, payload)) = rx.recv().await {
                    let heard = if channel == crate::redis::GAP {
                        Heard::Gap
                    } else {
                        Heard::Diff(payload)
                    };
                    if tx.send(heard).await.is_err() {
                        return;
                    }
                }
            });
        }
        Ok((
            RedisStore {
                redis,
                keys,
                apply: LuaScript::new(APPLY),
                purge: LuaScript::new(PURGE),
                list: LuaScript::new(LIST),
                stats: LuaScript::new(STATS),
                heartbeat: LuaScript::new(HEARTBEAT),
                dead: LuaScript::new(DEAD),
                claim: LuaScript::new(CLAIM),
            },
            diffs,
        ))
    }

    fn topic_keys(&self, node: &str, topic: &str) -> Vec<String> {
        vec![
            self.keys.presence_users(topic),
            self.keys.presence_nodes(topic),
            self.keys.presence(topic, node),
        ]
    }
}

fn bad() -> RedisError {
    RedisError::Reply("unexpected presence reply".into())
}

fn texts(n: &Nested) -> Result<Vec<String>, RedisError> {
    n.texts().ok_or_else(bad)
}

fn pairs(flat: Vec<String>) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(c), Some(v)) = (it.next(), it.next()) {
        out.push((c, v));
    }
    out
}

/// Reads APPLY's and PURGE's answer.
fn applied(reply: Nested) -> Result<Applied, RedisError> {
    let Nested::List(parts) = reply else {
        return Err(bad());
    };
    let [joins, leaves, added, removed, empty] = parts.as_slice() else {
        return Err(bad());
    };
    Ok(Applied {
        joins: pairs(texts(joins)?),
        leaves: pairs(texts(leaves)?),
        users_added: texts(added)?,
        users_removed: texts(removed)?,
        empty: matches!(empty, Nested::Text(t) if t == "1"),
    })
}

impl Store for RedisStore {
    fn apply<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
        ops: &'a [Op],
    ) -> BoxFuture<'a, Result<Applied, RedisError>> {
        Box::pin(async move {
            let mut args = Vec::with_capacity(1 + ops.len() * 4);
            args.push(node.to_string());
            for op in ops {
                match op {
                    Op::Join {
                        client,
                        user,
                        value,
                    } => args.extend([
                        "j".to_string(),
                        client.to_string(),
                        user.to_string(),
                        value.to_string(),
                    ]),
                    Op::Leave { client, user } => args.extend([
                        "l".to_string(),
                        client.to_string(),
                        user.to_string(),
                        String::new(),
                    ]),
                }
            }
            let reply: Nested = self
                .redis
                .eval(
                    &self.apply,
                    self.topic_keys(node, topic),
                    args,
                    COMMAND_TIMEOUT,
                )
                .await?;
            applied(reply)
        })
    }

    fn list<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String)>, RedisError>> {
        Box::pin(async move {
            let reply: Nested = self
                .redis
                .eval(
                    &self.list,
                    vec![self.keys.presence_nodes(topic)],
                    vec![self.keys.presence_base(topic)],
                    COMMAND_TIMEOUT,
                )
                .await?;
            Ok(pairs(texts(&reply)?))
        })
    }

    fn stats<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Stats, RedisError>> {
        Box::pin(async move {
            let reply: Nested = self
                .redis
                .eval(
                    &self.stats,
                    vec![
                        self.keys.presence_nodes(topic),
                        self.keys.presence_users(topic),
                    ],
                    vec![self.keys.presence_base(topic)],
                    COMMAND_TIMEOUT,
                )
                .await?;
            let t = texts(&reply)?;
            let n = |i: usize| t.get(i).and_then(|v| v.parse().ok()).ok_or_else(bad);
            Ok(Stats {
                clients: n(0)?,
                users: n(1)?,
            })
        })
    }

    fn hold<'a>(&'a self, node: &'a str, topic: &'a str) -> BoxFuture<'a, Result<(), RedisError>> {
        Box::pin(async move {
            let _: i64 = self
                .redis
                .command(
                    "SADD",
                    vec![self.keys.presence_topics(node), topic.to_string()],
                )
                .await?;
            Ok(())
        })
    }

    fn release<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<(), RedisError>> {
        Box::pin(async move {
            let _: i64 = self
                .redis
                .command(
                    "SREM",
                    vec![self.keys.presence_topics(node), topic.to_string()],
                )
                .await?;
            Ok(())
        })
    }

    fn heartbeat<'a>(
        &'a self,
        node: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, RedisError>> {
        Box::pin(async move {
            let existed: i64 = self
                .redis
                .eval(
                    &self.heartbeat,
                    vec![self.keys.presence_alive(node), self.keys.presence_hosts()],
                    vec![node.to_string(), ttl.as_millis().to_string()],
                    COMMAND_TIMEOUT,
                )
                .await?;
            Ok(existed == 1)
        })
    }

    fn dead<'a>(&'a self, me: &'a str) -> BoxFuture<'a, Result<Vec<String>, RedisError>> {
        Box::pin(async move {
            let reply: Nested = self
                .redis
                .eval(
                    &self.dead,
                    vec![self.keys.presence_hosts()],
                    vec![me.to_string(), self.keys.presence_alive("")],
                    COMMAND_TIMEOUT,
                )
                .await?;
            texts(&reply)
        })
    }

    fn claim<'a>(
        &'a self,
        node: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<Vec<String>, RedisError>> {
        Box::pin(async move {
            let reply: Nested = self
                .redis
                .eval(
                    &self.claim,
                    vec![
                        self.keys.presence_alive(node),
                        self.keys.presence_topics(node),
                        self.keys.presence_hosts(),
                    ],
                    vec![node.to_string(), if force { "1" } else { "0" }.to_string()],
                    COMMAND_TIMEOUT,
                )
                .await?;
            texts(&reply)
        })
    }

    fn purge<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Applied, RedisError>> {
        Box::pin(async move {
            let reply: Nested = self
                .redis
                .eval(
                    &self.purge,
                    self.topic_keys(node, topic),
                    vec![node.to_string()],
                    COMMAND_TIMEOUT,
                )
                .await?;
            applied(reply)
        })
    }

    fn broadcast(&self, message: String) -> BoxFuture<'_, Result<(), RedisError>> {
        Box::pin(async move {
            self.redis
                .publish(&self.keys.presence_diffs(), message.into())
                .await?;
            Ok(())
        })
    }
}
