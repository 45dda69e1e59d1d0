//! Node-addressed work: what the back end asks of connections wherever
//! they are (the control API), and the cluster-wide bookkeeping webhooks
//! need (topic occupancy, each node's clients, dead nodes).
//!
//! - [`ControlBus`]: a command for a client or a user goes to every node
//!   (`{prefix}:control`); each applies it to its local matches through the
//!   client registry and answers how many it reached on
//!   `{prefix}:control-reply:{asker}`; the asker sums the answers of every
//!   live node. Memory mode: this node only.
//! - [`Ledger`]: per topic, the set of nodes whose clients subscribe to it
//!   (one script answers whether a change was the first-in or last-out
//!   transition: exactly one `topic_occupied` / `topic_vacated` per
//!   transition cluster-wide); per node, its topics and its clients, so
//!   that a dead node's share can be taken back.
//! - [`occupancy`]: turns the hub's local first/last client subscriber into
//!   ledger changes and webhooks.
//! - [`watch`]: the webhook side of client registrations, and the reaper
//!   that reports a dead node's clients and topics.
//!
//! The command set is meant to grow (SSE sessions, compat `enter_room` by
//! sid): a node that does not know a command answers 0 for it.

pub mod memory;
pub mod occupancy;
pub mod redis;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::clients::{Command, Target};
use crate::redis::RedisError;

/// How long the asking node waits for the other nodes' answers.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How many connections a command reached, cluster-wide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reached {
    pub reached: usize,
    /// Connections that were there but did not take it: they had
    /// `PENDING_COMMANDS` waiting (try again).
    pub busy: usize,
    /// Live nodes (by the registry) that did not answer in time.
    pub unanswered: Vec<String>,
    /// The registry could not be read: which nodes are live is not known,
    /// so the answers were awaited for the whole [`ANSWER_TIMEOUT`] and a
    /// node that did not answer is not named.
    pub nodes_unknown: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the command could not be sent to the other nodes: {0}")]
    Unavailable(#[from] RedisError),
}

/// Carries commands to the connections they name, on whichever node.
pub trait ControlBus: Send + Sync + 'static {
    /// Applies `command` to every connection `target` names, on every node
    /// (this one included); answers how many took it.
    fn run(&self, target: Target, command: Command)
    -> BoxFuture<'_, Result<Reached, ControlError>>;
}

/// A command on the control channel: `{"id", "from", "op", "client"|"user",
/// "topic"?, "code"?, "reason"?, "key"?}` (see `docs/protocol.md`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Wire {
    pub id: String,
    pub from: String,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// An SSE stream's secret (ops `sse_*`), besides `client` and `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The answer of one node: `{"id", "node", "reached", "busy"?}` (`busy`
/// absent from nodes before it, and when 0).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    pub id: String,
    pub node: String,
    pub reached: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub busy: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Wire {
    pub fn new(id: String, from: String, target: &Target, command: &Command) -> Self {
        let (client, user) = match target {
            Target::Client(c) => (Some(c.clone()), None),
            Target::User(u) => (None, Some(u.clone())),
        };
        let mut wire = Wire {
            id,
            from,
            op: command.label().to_string(),
            client,
            user,
            topic: None,
            code: None,
            reason: None,
            key: None,
        };
        match command {
            Command::Subscribe { topic } | Command::Unsubscribe { topic } => {
                wire.topic = Some(topic.to_string())
            }
            Command::Disconnect { code, reason } => {
                wire.code = Some(*code);
                wire.reason = Some(reason.to_string());
            }
            // The session is the client and its secret `key`; `user` the
            // one it must belong to.
            Command::SseSubscribe { topic, user, key }
            | Command::SseUnsubscribe { topic, user, key } => {
                wire.topic = Some(topic.to_string());
                wire.user = Some(user.to_string());
                wire.key = Some(key.to_string());
            }
        }
        wire
    }

    /// The target and command, when this node knows the command.
    pub fn decode(&self) -> Option<(Target, Command)> {
        if let Some(sse) = self.op.strip_prefix("sse_") {
            // A node from before the key sends none: it matches no stream.
            let (client, topic, user, key) = (
                self.client.clone()?,
                self.topic.as_deref()?.into(),
                self.user.as_deref()?.into(),
                self.key.as_deref().unwrap_or("").into(),
            );
            let command = match sse {
                "subscribe" => Command::SseSubscribe { topic, user, key },
                "unsubscribe" => Command::SseUnsubscribe { topic, user, key },
                _ => return None,
            };
            return Some((Target::Client(client), command));
        }
        let target = match (&self.client, &self.user) {
            (Some(c), None) => Target::Client(c.clone()),
            (None, Some(u)) => Target::User(u.clone()),
            _ => return None,
        };
        let command = match self.op.as_str() {
            "subscribe" => Command::Subscribe {
                topic: self.topic.as_deref()?.into(),
            },
            "unsubscribe" => Command::Unsubscribe {
                topic: self.topic.as_deref()?.into(),
            },
            "disconnect" => Command::Disconnect {
                code: self.code?,
                reason: self.reason.as_deref().unwrap_or("").into(),
            },
            _ => return None,
        };
        Some((target, command))
    }
}

/// Orders one topic's occupancy transitions: each is higher than the one
/// before it, whichever node reports it (the webhooks' `seq`); the events
/// come from different nodes' queues and may arrive in another order.
/// Microseconds of the Redis clock at the transition, or one more than the
/// topic's previous seq when that is higher.
pub type Seq = u64;

/// One client as a node recorded it: enough for its `client_disconnected`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub user: String,
    pub transport: String,
}

/// What a dead node left: its recorded clients and the topics it held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub clients: Vec<(String, Record)>,
    pub topics: Vec<String>,
}

/// The cluster-wide bookkeeping behind occupancy webhooks and the reaper.
/// Every change is idempotent: repeating one after a lost answer changes
/// nothing (and reports no transition).
pub trait Ledger: Send + Sync + 'static {
    /// Node `node` holds `topic` now. `Some(seq)` when no node held it
    /// before (the topic became occupied): `seq` orders the topic's
    /// transitions ([`Seq`]).
    fn occupy<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Option<Seq>, RedisError>>;
    /// Node `node` no longer holds `topic`. `Some(seq)` when it was the last
    /// one (the topic became vacated).
    fn vacate<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Option<Seq>, RedisError>>;
    /// Records (`Some`) or forgets (`None`) clients of node `node`.
    fn record<'a>(
        &'a self,
        node: &'a str,
        changes: Vec<(Arc<str>, Option<Record>)>,
    ) -> BoxFuture<'a, Result<(), RedisError>>;
    /// Adds `node` to the nodes the reaper watches; true when it was not
    /// among them (first start, or reaped while it was cut off).
    fn track<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<bool, RedisError>>;
    /// The nodes the reaper watches.
    fn tracked(&self) -> BoxFuture<'_, Result<Vec<String>, RedisError>>;
    /// Whether `node` still announces itself in the registry.
    fn alive<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<bool, RedisError>>;
    /// Takes and deletes what `node` recorded and stops watching it, in one
    /// step (two reapers never both get it). Unless `force`, only when the
    /// node's registry entry is gone (`None` otherwise).
    fn claim<'a>(
        &'a self,
        node: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<Option<Leftovers>, RedisError>>;
    /// Whether other nodes share this ledger (Redis): only then can a node
    /// die with clients that someone else must report.
    fn shared(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_travel_as_flat_json_and_unknown_ones_are_not_applied() {
        let wire = Wire::new(
            "1".into(),
            "a".into(),
            &Target::User("u1".into()),
            &Command::Disconnect {
                code: 4500,
                reason: "bye".into(),
            },
        );
        let text = serde_json::to_string(&wire).unwrap();
        assert_eq!(
            text,
            r#"{"id":"1","from":"a","op":"disconnect","user":"u1","code":4500,"reason":"bye"}"#
        );
        let back: Wire = serde_json::from_str(&text).unwrap();
        assert_eq!(
            back.decode(),
            Some((
                Target::User("u1".into()),
                Command::Disconnect {
                    code: 4500,
                    reason: "bye".into()
                }
            ))
        );
        let future: Wire = serde_json::from_str(
            r#"{"id":"2","from":"b","op":"enter_room","client":"x","room":"r"}"#,
        )
        .unwrap();
        assert_eq!(future.decode(), None);
    }
}
