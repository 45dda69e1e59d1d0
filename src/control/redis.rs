//! The control bus and the ledger on Redis.
//!
//! Control: commands on `{prefix}:control` (classic pub/sub: a cluster
//! carries it to every node), answers on `{prefix}:control-reply:{asker}`.
//! Ledger: `{prefix}:occupancy:{topic}` (a set of node ids, in the topic's
//! slot) and `{prefix}:occupancy-seq:{topic}` (its last transition's seq),
//! `{prefix}:node-topics:{id}`, `{prefix}:node-clients:{id}` (a hash
//! client id → `{"user","transport"}`) and `{prefix}:tracked-nodes`, all
//! spelled by [`Keys`]; the node's keys share one slot on a cluster, so the
//! reaper's claim is one script.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    ANSWER_TIMEOUT, Answer, ControlBus, ControlError, Ledger, Leftovers, Reached, Record, Seq, Wire,
};
use crate::clients::{Clients, Command, Target};
use crate::redis::{Keys, LuaScript, Nested, Redis, RedisError};
use crate::registry::Registry;
use crate::waiters::Waiters;

/// Answers one command may collect before later ones are dropped (far more
/// than the nodes of any cluster).
const ANSWERS: usize = 1024;

pub struct RedisControl {
    redis: Redis,
    keys: Keys,
    node_id: String,
    clients: Clients,
    registry: Arc<dyn Registry>,
    pending: Waiters<mpsc::Sender<Answer>>,
}

impl RedisControl {
    /// Listens for other nodes' commands (applied to this node's clients)
    /// and for the answers to this node's own.
    pub fn start(
        listeners: &crate::redis::Listeners,
        redis: Redis,
        keys: Keys,
        node_id: String,
        clients: Clients,
        registry: Arc<dyn Registry>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, RedisError> {
        let control = keys.control();
        let replies = keys.control_replies(&node_id);
        let channels = vec![control.clone(), replies];
        let mut rx = listeners.listen("control commands", channels, stop)?;
        let bus = Arc::new(RedisControl {
            redis,
            keys,
            node_id,
            clients,
            registry,
            pending: Waiters::default(),
        });
        let b = bus.clone();
        tokio::spawn(async move {
            while let Some((channel, payload)) = rx.recv().await {
                if channel == control {
                    b.serve(&payload);
                } else if let Ok(answer) = serde_json::from_slice::<Answer>(&payload) {
                    let waiter = b.pending.get(&answer.id);
                    if let Some(tx) = waiter {
                        let _ = tx.try_send(answer);
                    }
                }
            }
        });
        Ok(bus)
    }

    /// Applies another node's command to this node's clients and answers.
    fn serve(&self, payload: &[u8]) {
        let wire = match serde_json::from_slice::<Wire>(payload) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(cause = %e, "unreadable control command ignored");
                return;
            }
        };
        if wire.from == self.node_id {
            return;
        }
        let applied = match wire.decode() {
            Some((target, command)) => self.clients.apply(&target, &command),
            None => {
                tracing::debug!(op = wire.op, "control command not known here: reached 0");
                Default::default()
            }
        };
        let answer = Answer {
            id: wire.id,
            node: self.node_id.clone(),
            reached: applied.reached,
            busy: applied.busy,
        };
        let json = serde_json::to_string(&answer).expect("answers serialize");
        let (redis, channel) = (self.redis.clone(), self.keys.control_replies(&wire.from));
        tokio::spawn(async move {
            if let Err(e) = redis.publish(&channel, json.into()).await {
                tracing::warn!(cause = %e, "control answer not published");
            }
        });
    }
}

impl ControlBus for RedisControl {
    fn run(
        &self,
        target: Target,
        command: Command,
    ) -> BoxFuture<'_, Result<Reached, ControlError>> {
        Box::pin(async move {
            // Without the list of live nodes the command still goes out, and
            // the answers are awaited until the deadline: stopping at once
            // would report a connection on another node as not found.
            let (mut expected, nodes_unknown): (HashSet<String>, bool) = match tokio::time::timeout(
                Duration::from_secs(1),
                self.registry.nodes(),
            )
            .await
            {
                Ok(Ok(nodes)) => (nodes.into_iter().map(|n| n.id).collect(), false),
                Ok(Err(e)) => {
                    tracing::warn!(cause = %e, "live nodes not listed; control answers awaited for the whole timeout");
                    (HashSet::new(), true)
                }
                Err(_) => {
                    tracing::warn!(
                        "live nodes not listed within 1 s; control answers awaited for the whole timeout"
                    );
                    (HashSet::new(), true)
                }
            };
            expected.remove(&self.node_id);
            let id = format!("{:016x}", rand::random::<u64>());
            let (tx, mut rx) = mpsc::channel(ANSWERS);
            let waiting = self.pending.wait(id.clone(), tx);
            let wire = Wire::new(id, self.node_id.clone(), &target, &command);
            let json = serde_json::to_string(&wire).expect("commands serialize");
            self.redis
                .publish(&self.keys.control(), json.into())
                .await?;
            let applied = self.clients.apply(&target, &command);
            let (mut reached, mut busy) = (applied.reached, applied.busy);
            // A client id names one connection: once found, stop asking.
            let one = matches!(target, Target::Client(_));
            let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
            let done = |found: usize, expected: &HashSet<String>| {
                (expected.is_empty() && !nodes_unknown) || (one && found > 0)
            };
            while !done(reached + busy, &expected) {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(answer)) => {
                        expected.remove(&answer.node);
                        reached += answer.reached;
                        busy += answer.busy;
                    }
                    _ => break,
                }
            }
            drop(waiting);
            let mut unanswered: Vec<String> = if one && reached + busy > 0 {
                Vec::new()
            } else {
                expected.into_iter().collect()
            };
            unanswered.sort();
            Ok(Reached {
                reached,
                busy,
                unanswered,
                nodes_unknown: nodes_unknown && !(one && reached + busy > 0),
            })
        })
    }
}

// === ledger ===

/// The Lua function `next_seq(key)`: the next seq of a topic's transitions
/// (kept in `key` for 10 s): the Redis clock in microseconds, or one more
/// than the last seq when that is higher (a clock step back never
/// reorders). A macro, so that `concat!` can put it in front of the scripts.
macro_rules! next_seq_lua {
    () => {
        r"
local function next_seq(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('GET', key) or '0')
  local seq = math.max(now, last + 1)
  redis.call('SET', key, string.format('%.0f', seq), 'PX', 10000)
  return seq
end
"
    };
}

/// Adds a node to a topic's holders (KEYS[1]); the transition's seq when it
/// is the first holder, else 0.
const OCCUPY: &str = concat!(
    next_seq_lua!(),
    r"
local added = redis.call('SADD', KEYS[1], ARGV[1])
if added == 1 and redis.call('SCARD', KEYS[1]) == 1 then return next_seq(KEYS[2]) end
return 0
"
);

/// Removes a node from a topic's holders; the transition's seq when it was
/// the last, else 0.
const VACATE: &str = concat!(
    next_seq_lua!(),
    r"
local removed = redis.call('SREM', KEYS[1], ARGV[1])
if removed == 1 and redis.call('EXISTS', KEYS[1]) == 0 then return next_seq(KEYS[2]) end
return 0
"
);

/// Takes a node's clients and topics and stops tracking it, in one step;
/// unless forced, only when its registry entry has expired.
/// KEYS: registry entry, clients hash, topics set, tracked set. ARGV: id, force.
const CLAIM: &str = r"
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return false end
local clients = redis.call('HGETALL', KEYS[2])
local topics = redis.call('SMEMBERS', KEYS[3])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return {clients, topics}
";

/// Fields per HSET/HDEL: keeps one command's size reasonable.
const RECORD_CHUNK: usize = 500;

pub struct RedisLedger {
    redis: Redis,
    keys: Keys,
    occupy: LuaScript,
    vacate: LuaScript,
    claim: LuaScript,
}

impl RedisLedger {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            occupy: LuaScript::new(OCCUPY),
            vacate: LuaScript::new(VACATE),
            claim: LuaScript::new(CLAIM),
        }
    }

    /// Runs the occupy or vacate script for `topic`; the seq of the
    /// transition it made, if it made one.
    async fn transition(
        &self,
        script: &LuaScript,
        topic: &str,
        node: &str,
    ) -> Result<Option<Seq>, RedisError> {
        let seq: i64 = self
            .redis
            .eval(
                script,
                vec![self.keys.occupancy(topic), self.keys.occupancy_seq(topic)],
                vec![node.to_string()],
                crate::redis::COMMAND_TIMEOUT,
            )
            .await?;
        Ok((seq > 0).then_some(seq as Seq))
    }
}

impl Ledger for RedisLedger {
    fn occupy<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Option<Seq>, RedisError>> {
        Box::pin(async move {
            // The node's own list first: a crash between the two leaves an
            // entry the reaper's vacate finds harmless, never a holder it
            // cannot find.
            let _: i64 = self
                .redis
                .command("SADD", vec![self.keys.node_topics(node), topic.to_string()])
                .await?;
            self.transition(&self.occupy, topic, node).await
        })
    }

    fn vacate<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Option<Seq>, RedisError>> {
        Box::pin(async move {
            let last = self.transition(&self.vacate, topic, node).await?;
            let _: i64 = self
                .redis
                .command("SREM", vec![self.keys.node_topics(node), topic.to_string()])
                .await?;
            Ok(last)
        })
    }

    fn record<'a>(
        &'a self,
        node: &'a str,
        changes: Vec<(Arc<str>, Option<Record>)>,
    ) -> BoxFuture<'a, Result<(), RedisError>> {
        Box::pin(async move {
            let key = self.keys.node_clients(node);
            let mut set = Vec::new();
            let mut gone = Vec::new();
            for (id, record) in changes {
                match record {
                    Some(r) => {
                        set.push(id.to_string());
                        set.push(serde_json::to_string(&r).expect("records serialize"));
                    }
                    None => gone.push(id.to_string()),
                }
            }
            for chunk in set.chunks(RECORD_CHUNK * 2) {
                let mut args = vec![key.clone()];
                args.extend_from_slice(chunk);
                let _: i64 = self.redis.command("HSET", args).await?;
            }
            for chunk in gone.chunks(RECORD_CHUNK) {
                let mut args = vec![key.clone()];
                args.extend_from_slice(chunk);
                let _: i64 = self.redis.command("HDEL", args).await?;
            }
            Ok(())
        })
    }

    fn track<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<bool, RedisError>> {
        Box::pin(async move {
            let added: i64 = self
                .redis
                .command("SADD", vec![self.keys.tracked_nodes(), node.to_string()])
                .await?;
            Ok(added == 1)
        })
    }

    fn tracked(&self) -> BoxFuture<'_, Result<Vec<String>, RedisError>> {
        Box::pin(async move {
            self.redis
                .command("SMEMBERS", vec![self.keys.tracked_nodes()])
                .await
        })
    }

    fn alive<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<bool, RedisError>> {
        Box::pin(async move {
            let n: i64 = self
                .redis
                .command("EXISTS", vec![self.keys.node(node)])
                .await?;
            Ok(n == 1)
        })
    }

    fn claim<'a>(
        &'a self,
        node: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<Option<Leftovers>, RedisError>> {
        Box::pin(async move {
            let keys = vec![
                self.keys.node(node),
                self.keys.node_clients(node),
                self.keys.node_topics(node),
                self.keys.tracked_nodes(),
            ];
            let args = vec![node.to_string(), if force { "1" } else { "0" }.to_string()];
            let reply: Nested = self
                .redis
                .eval(&self.claim, keys, args, crate::redis::COMMAND_TIMEOUT)
                .await?;
            leftovers(reply)
        })
    }

    fn shared(&self) -> bool {
        true
    }
}

/// Reads the claim script's reply: nil, or `{{id, record, …}, {topic, …}}`.
fn leftovers(reply: Nested) -> Result<Option<Leftovers>, RedisError> {
    let bad = || RedisError::Reply("unexpected claim reply".into());
    let parts = match reply {
        Nested::Nil => return Ok(None),
        Nested::List(parts) if parts.len() == 2 => parts,
        _ => return Err(bad()),
    };
    let texts = |n: &Nested| n.texts().ok_or_else(bad);
    let flat = texts(&parts[0])?;
    let mut clients = Vec::with_capacity(flat.len() / 2);
    for pair in flat.chunks(2) {
        if let [id, json] = pair {
            let record = serde_json::from_str(json).unwrap_or(Record {
                user: String::new(),
                transport: String::new(),
            });
            clients.push((id.clone(), record));
        }
    }
    Ok(Some(Leftovers {
        clients,
        topics: texts(&parts[1])?,
    }))
}
