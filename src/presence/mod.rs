//! Presence: who is subscribed to a topic, cluster-wide.
//!
//! A connection subscribed to a topic that matches `PRESENCE_TOPICS` is
//! present there under its client id, with its `user` and `info`. The
//! gateways report each subscription's start ([`Presence::joined`]) and end
//! ([`Presence::left`]); everything else happens here, off the connections'
//! tasks:
//!
//! - **The writer** applies the changes to the [`Store`] (Redis, or memory
//!   on an embedded node), one call per topic for all the changes waiting,
//!   and learns which were effective and which made a user's first
//!   connection join or last one leave (→ `member_added` /
//!   `member_removed` webhooks, once per user, not per tab).
//! - **The ticker**, every `PRESENCE_DIFF_INTERVAL_MS`, sends this node's
//!   effective changes of the interval to every node (one message per node
//!   and interval, coalesced: a join and a leave of one client cancel),
//!   and hands each watched topic's coalesced changes to its watchers as
//!   one `presence_diff`. A storm of N joins so costs each watcher one
//!   frame per interval, not N.
//! - **Liveness and the reaper.** A node marks itself alive for
//!   `PRESENCE_TTL_MS` every third of it; the leader looks for nodes whose
//!   mark expired every [`reap_every`] and removes their entries, announcing
//!   the leaves. A dead node's clients so disappear within
//!   `PRESENCE_TTL_MS` + [`reap_every`] of its last mark.
//!
//! Reads (`presence`, `presence_stats`) go to the store directly: stats are
//! kept counts (O(nodes), never O(members)).

pub mod memory;
pub mod redis;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backend::webhooks::kind::{MEMBER_ADDED, MEMBER_REMOVED};
use crate::backend::webhooks::{Event, Webhooks};
use crate::config::PresenceConfig;
use crate::election::Leadership;
use crate::metrics as m;
use crate::redis::RedisError;

/// Changes per store call (and entries per diff message).
const CHUNK: usize = 500;
/// Topics written at once.
const PARALLEL: usize = 32;
/// How long a resync waits for one topic's list.
const RESYNC_READ: Duration = Duration::from_secs(5);
/// Pause after a failed store call before the changes are tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How often the leader looks for dead nodes: at most every second, and at
/// least four times per TTL.
pub fn reap_every(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(1))
}

/// One change for the store, in the order the node saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `value` is the entry as stored and shown: `{"user": …, "info": …}`.
    Join {
        client: Arc<str>,
        user: Arc<str>,
        value: Arc<str>,
    },
    Leave {
        client: Arc<str>,
        user: Arc<str>,
    },
}

/// What a store call changed: the effective joins and leaves (client id,
/// entry), and the entries whose user came (first connection) or went (last
/// one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub joins: Vec<(String, String)>,
    pub leaves: Vec<(String, String)>,
    pub users_added: Vec<String>,
    pub users_removed: Vec<String>,
    /// The node has no entry left on the topic.
    pub empty: bool,
}

/// `presence_stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub clients: u64,
    pub users: u64,
}

/// Where presence lives: Redis for a cluster, memory for an embedded node.
/// Anonymous connections (user `""`) count as clients, not as users.
pub trait Store: Send + Sync + 'static {
    /// Applies node `node`'s changes on `topic`, in order.
    fn apply<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
        ops: &'a [Op],
    ) -> BoxFuture<'a, Result<Applied, RedisError>>;
    /// Every entry of `topic`: (client id, `{"user","info"}`).
    fn list<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String)>, RedisError>>;
    fn stats<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Stats, RedisError>>;
    /// Records that `node` has entries on `topic` (before its first join
    /// there), so that the reaper finds them.
    fn hold<'a>(&'a self, node: &'a str, topic: &'a str) -> BoxFuture<'a, Result<(), RedisError>>;
    /// `node` has no entry left on `topic`.
    fn release<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<(), RedisError>>;
    /// Marks `node` alive for `ttl`; false when its mark was gone (first
    /// start, or cut off longer than the TTL: it may have been reaped).
    fn heartbeat<'a>(
        &'a self,
        node: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, RedisError>>;
    /// Nodes other than `me` whose mark expired.
    fn dead<'a>(&'a self, me: &'a str) -> BoxFuture<'a, Result<Vec<String>, RedisError>>;
    /// Node `node`'s topics with entries left; none left, it stops
    /// watching the node. Unless `force`, only while its mark is gone.
    /// Two reapers may both get a topic: purging is idempotent (the second
    /// finds no entry and announces nothing).
    fn claim<'a>(
        &'a self,
        node: &'a str,
        force: bool,
    ) -> BoxFuture<'a, Result<Vec<String>, RedisError>>;
    /// Removes every entry node `node` has on `topic`.
    fn purge<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Applied, RedisError>>;
    /// Sends one diff message to every node (this one included).
    fn broadcast(&self, message: String) -> BoxFuture<'_, Result<(), RedisError>>;
}

/// Hears one topic's `presence_diff` (a subscriber with `presence: true`).
pub trait Watcher: Send + Sync {
    fn diff(&self, diff: &Diff);
}

/// What a node hears of the other nodes' changes.
pub enum Heard {
    /// A diff message ([`Wire`]).
    Diff(bytes::Bytes),
    /// Diff messages were lost (the listener lagged, or its connection was
    /// down): the watchers' lists may be wrong until read again.
    Gap,
}

/// One coalesced change of a topic, built once for every watcher.
pub struct Diff {
    /// The native frame `{"type":"presence_diff","event",…}`.
    pub native: Utf8Bytes,
    /// The Socket.IO `presence_diff` argument `{"topic","joins","leaves"}`.
    pub object: serde_json::Value,
}

/// Joins and leaves of one topic, coalesced: a client that joins and
/// leaves (or leaves and joins again) within one batch is in neither list.
///
/// Such a client's last state is kept in `churn` (`null`: gone), which
/// watchers never see: a node that read the whole list in the middle of the
/// pair (a resync) saw it in between, and needs its end.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Batch {
    #[serde(default)]
    pub joins: BTreeMap<String, Box<RawValue>>,
    #[serde(default)]
    pub leaves: BTreeMap<String, Box<RawValue>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub churn: BTreeMap<String, Option<Box<RawValue>>>,
}

impl Batch {
    pub fn join(&mut self, client: String, value: Box<RawValue>) {
        if self.leaves.remove(&client).is_some() {
            self.churn.insert(client, Some(value));
        } else {
            self.churn.remove(&client);
            self.joins.insert(client, value);
        }
    }

    pub fn leave(&mut self, client: String, value: Box<RawValue>) {
        if self.joins.remove(&client).is_some() {
            self.churn.insert(client, None);
        } else {
            self.churn.remove(&client);
            self.leaves.insert(client, value);
        }
    }

    pub fn merge(&mut self, other: Batch) {
        // A pair that cancelled in `other` changes no list here; only the
        // client's last state moves on.
        for (c, last) in other.churn {
            match last {
                Some(v) => match self.joins.get_mut(&c) {
                    Some(joined) => *joined = v,
                    None => {
                        self.churn.insert(c, Some(v));
                    }
                },
                None => {
                    self.joins.remove(&c);
                    if !self.leaves.contains_key(&c) {
                        self.churn.insert(c, None);
                    }
                }
            }
        }
        // Leaves first: a batch's joins are never older than its own leaves
        // of the same client (coalescing kept at most one of the two).
        for (c, v) in other.leaves {
            self.leave(c, v);
        }
        for (c, v) in other.joins {
            self.join(c, v);
        }
    }

    /// No join or leave for watchers (`churn` aside).
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// Nothing at all to tell the other nodes.
    fn is_void(&self) -> bool {
        self.is_empty() && self.churn.is_empty()
    }

    fn len(&self) -> usize {
        self.joins.len() + self.leaves.len() + self.churn.len()
    }

    /// This batch in pieces of at most `max` entries. A client is in one
    /// list of one batch only, so the pieces, merged in any order, are
    /// the batch: a topic with 100,000 changes in one interval goes out in
    /// messages of a bounded size, not as one of many megabytes (a pub/sub
    /// message that large can overrun Redis's output buffer for a node).
    fn split(self, max: usize) -> Vec<Batch> {
        if self.len() <= max {
            return vec![self];
        }
        let mut pieces = vec![Batch::default()];
        let room = |pieces: &mut Vec<Batch>| {
            if pieces.last().is_some_and(|p| p.len() >= max) {
                pieces.push(Batch::default());
            }
            pieces.len() - 1
        };
        for (c, v) in self.churn {
            let i = room(&mut pieces);
            pieces[i].churn.insert(c, v);
        }
        for (c, v) in self.leaves {
            let i = room(&mut pieces);
            pieces[i].leaves.insert(c, v);
        }
        for (c, v) in self.joins {
            let i = room(&mut pieces);
            pieces[i].joins.insert(c, v);
        }
        pieces
    }

    /// `list` (client → entry) with this batch's changes applied in order:
    /// the cancelled pairs' last states, then the leaves, then the joins.
    fn apply_to(self, list: &mut BTreeMap<String, Box<RawValue>>) {
        for (c, last) in self.churn {
            match last {
                Some(v) => {
                    list.insert(c, v);
                }
                None => {
                    list.remove(&c);
                }
            }
        }
        for c in self.leaves.into_keys() {
            list.remove(&c);
        }
        list.extend(self.joins);
    }
}

/// The changes `w` heard, as one `presence_diff` to each of its watchers
/// (none when they change no list).
fn flush(topic: &str, w: &mut Watched) {
    let batch = std::mem::take(&mut w.batch);
    if batch.is_empty() {
        return;
    }
    let diff = diff(topic, &batch);
    metrics::counter!(m::PRESENCE_DIFFS).increment(w.watchers.len() as u64);
    for watcher in w.watchers.values() {
        watcher.diff(&diff);
    }
}

/// A diff message between nodes: `{"node", "topics": {topic: {joins,
/// leaves}}, "reset"?: [topic, …]}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Wire {
    pub node: String,
    pub topics: HashMap<String, Batch>,
    /// Topics whose watchers every node owes their whole list: a gone
    /// node's, once its entries were removed. Its last interval's changes
    /// were written to the store but never sent (a `kill -9` before its
    /// tick): a leave so lost would stay a ghost in every watcher's list,
    /// and no diff could ever take it out. Absent from older nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reset: Vec<String>,
}

/// The stored entry of a connection: `{"user": …, "info": …}`.
pub fn entry(user: &str, info: Option<&RawValue>) -> String {
    #[derive(Serialize)]
    struct Entry<'a> {
        user: &'a str,
        info: Option<&'a RawValue>,
    }
    serde_json::to_string(&Entry { user, info }).expect("entries serialize")
}

/// `{"<client>": <entry>, …}` from a store's list; entries that are not
/// JSON (not written by a node) are left out.
pub fn clients_json(entries: &[(String, String)]) -> String {
    let map: BTreeMap<&str, &RawValue> = entries
        .iter()
        .filter_map(|(c, v)| {
            let raw: &RawValue = serde_json::from_str(v).ok()?;
            Some((c.as_str(), raw))
        })
        .collect();
    serde_json::to_string(&map).expect("entries serialize")
}

fn raw(value: &str) -> Option<Box<RawValue>> {
    RawValue::from_string(value.to_string()).ok()
}

/// Why presence cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("\"{0}\" keeps no presence (PRESENCE_TOPICS)")]
    NotKept(String),
    #[error("presence unavailable: {0}")]
    Unavailable(#[from] RedisError),
}

impl PresenceError {
    /// The `code` of the native `error` frame.
    pub fn code(&self) -> &'static str {
        match self {
            PresenceError::NotKept(_) => "no_presence",
            PresenceError::Unavailable(_) => "unavailable",
        }
    }
}

/// This node's connections present on one topic, by client id.
type Members = HashMap<Arc<str>, Member>;

/// A connection present on one topic.
struct Member {
    user: Arc<str>,
    value: Arc<str>,
}

/// Cheap-to-clone handle to this node's presence.
#[derive(Clone)]
pub struct Presence {
    inner: Arc<Inner>,
}

struct Inner {
    config: PresenceConfig,
    node: String,
    store: Arc<dyn Store>,
    webhooks: Option<Webhooks>,
    /// std Mutexes below: held for map updates only, never across `.await`.
    /// This node's present connections: topic → client id → member (to
    /// leave by id, and to write them again after being reaped).
    local: Mutex<HashMap<Arc<str>, Members>>,
    /// Changes not yet written, per topic in order.
    pending: Mutex<HashMap<Arc<str>, Vec<Op>>>,
    wake: Notify,
    /// Set while the writer works on changes it took from `pending`.
    busy: AtomicBool,
    /// Topics this node told the store it holds.
    held: Mutex<HashSet<Arc<str>>>,
    /// Held topics this node's last member left: released (taken out of
    /// the node's topics) only once the diff with those leaves was sent, so
    /// that a node killed before sending it is still the reaper's for them.
    releasable: Mutex<HashSet<Arc<str>>>,
    /// Effective changes written since the last tick, for the other nodes.
    outgoing: Mutex<HashMap<String, Batch>>,
    /// Gone nodes' topics, removed since the last tick: sent as
    /// [`Wire::reset`].
    resets: Mutex<HashSet<String>>,
    /// Watched topics: their watchers by client id, and the changes heard
    /// since the last tick.
    watched: Mutex<HashMap<String, Watched>>,
    /// Watched topics whose watchers are owed their whole list (diff
    /// messages were lost), and the resyncer's wake-up.
    owed: Mutex<HashSet<String>>,
    resync: Notify,
    stop: CancellationToken,
}

#[derive(Default)]
struct Watched {
    watchers: HashMap<Arc<str>, Arc<dyn Watcher>>,
    batch: Batch,
    /// Its list is being read for a reset: the ticker leaves its batch to
    /// be folded into it.
    resyncing: bool,
}

impl Presence {
    /// Starts the writer, the ticker (with the diff receiver) and liveness
    /// with the reaper. `diffs`: every node's diff messages, as the store
    /// receives them.
    pub fn start(
        config: PresenceConfig,
        node: &str,
        store: Arc<dyn Store>,
        diffs: mpsc::Receiver<Heard>,
        webhooks: Option<Webhooks>,
        leadership: watch::Receiver<Leadership>,
    ) -> Presence {
        let p = Presence {
            inner: Arc::new(Inner {
                config,
                node: node.to_string(),
                store,
                webhooks,
                local: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                busy: AtomicBool::new(false),
                held: Mutex::new(HashSet::new()),
                releasable: Mutex::new(HashSet::new()),
                outgoing: Mutex::new(HashMap::new()),
                resets: Mutex::new(HashSet::new()),
                watched: Mutex::new(HashMap::new()),
                owed: Mutex::new(HashSet::new()),
                resync: Notify::new(),
                stop: CancellationToken::new(),
            }),
        };
        if p.inner.config.enabled() {
            let (ready_tx, ready) = watch::channel(false);
            tokio::spawn(p.clone().liveness(leadership, ready_tx));
            tokio::spawn(p.clone().writer(ready));
            tokio::spawn(p.clone().ticker());
            tokio::spawn(p.clone().receiver(diffs));
            tokio::spawn(p.clone().resyncer());
        }
        p
    }

    /// Whether `topic` keeps presence.
    pub fn covers(&self, topic: &str) -> bool {
        self.inner.config.covers(topic)
    }

    /// A connection's subscription to `topic` started (or was asked for
    /// again). `watcher`: it wants `presence_diff`; `None` leaves watching
    /// as it was (a server-side subscribe of a topic the client watches
    /// must not end its diffs: [`Presence::unwatch`] does that).
    pub fn joined(
        &self,
        topic: &str,
        client: &str,
        user: &str,
        info: Option<&RawValue>,
        watcher: Option<Arc<dyn Watcher>>,
    ) {
        if !self.covers(topic) {
            return;
        }
        let client: Arc<str> = client.into();
        if let Some(w) = watcher {
            self.inner
                .watched
                .lock()
                .unwrap()
                .entry(topic.to_string())
                .or_default()
                .watchers
                .insert(client.clone(), w);
        }
        let topic: Arc<str> = topic.into();
        let value: Arc<str> = entry(user, info).into();
        let user: Arc<str> = user.into();
        {
            let mut local = self.inner.local.lock().unwrap();
            let members = local.entry(topic.clone()).or_default();
            if members.contains_key(&client) {
                return;
            }
            members.insert(
                client.clone(),
                Member {
                    user: user.clone(),
                    value: value.clone(),
                },
            );
        }
        self.queue(
            topic,
            Op::Join {
                client,
                user,
                value,
            },
        );
    }

    /// The client subscribed to `topic` again without asking for
    /// `presence_diff`: it gets none from now on (it stays present).
    pub fn unwatch(&self, topic: &str, client: &str) {
        unwatch(&mut self.inner.watched.lock().unwrap(), topic, client);
    }

    /// A connection's subscription to `topic` ended (unsubscribe, close,
    /// permission revoked).
    pub fn left(&self, topic: &str, client: &str) {
        if !self.covers(topic) {
            return;
        }
        unwatch(&mut self.inner.watched.lock().unwrap(), topic, client);
        let member = {
            let mut local = self.inner.local.lock().unwrap();
            let Some(members) = local.get_mut(topic) else {
                return;
            };
            let member = members.remove(client);
            if members.is_empty() {
                local.remove(topic);
            }
            member
        };
        if let Some(member) = member {
            self.queue(
                topic.into(),
                Op::Leave {
                    client: client.into(),
                    user: member.user,
                },
            );
        }
    }

    fn queue(&self, topic: Arc<str>, op: Op) {
        let first = {
            let mut pending = self.inner.pending.lock().unwrap();
            let first = pending.is_empty();
            pending.entry(topic).or_default().push(op);
            first
        };
        if first {
            self.inner.wake.notify_one();
        }
    }

    /// Everyone present on `topic`: (client id, entry).
    pub async fn list(&self, topic: &str) -> Result<Vec<(String, String)>, PresenceError> {
        if !self.covers(topic) {
            return Err(PresenceError::NotKept(topic.to_string()));
        }
        Ok(self.inner.store.list(topic).await?)
    }

    pub async fn stats(&self, topic: &str) -> Result<Stats, PresenceError> {
        if !self.covers(topic) {
            return Err(PresenceError::NotKept(topic.to_string()));
        }
        Ok(self.inner.store.stats(topic).await?)
    }

    // === the writer ===

    async fn writer(self, mut ready: watch::Receiver<bool>) {
        // This node's leftovers from an earlier life go first.
        let _ = ready.wait_for(|r| *r).await;
        loop {
            let wake = self.inner.wake.notified();
            let batch: Vec<(Arc<str>, Vec<Op>)> = {
                let mut pending = self.inner.pending.lock().unwrap();
                self.inner
                    .busy
                    .store(!pending.is_empty(), Ordering::Release);
                pending.drain().collect()
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = wake => {}
                    _ = self.inner.stop.cancelled() => return,
                }
                continue;
            }
            let mut failed = false;
            for chunk in batch.chunks(PARALLEL) {
                let results = futures_util::future::join_all(
                    chunk.iter().map(|(topic, ops)| self.write(topic, ops)),
                )
                .await;
                for ((topic, ops), written) in chunk.iter().zip(results) {
                    if let Err(done) = written {
                        failed = true;
                        // What was not written goes back in front of what
                        // came meanwhile, order kept (what was is not
                        // written twice: its webhooks went out once).
                        let mut pending = self.inner.pending.lock().unwrap();
                        let later = pending.remove(topic).unwrap_or_default();
                        let mut all = ops[done..].to_vec();
                        all.extend(later);
                        pending.insert(topic.clone(), all);
                    }
                }
            }
            self.inner.busy.store(false, Ordering::Release);
            if failed {
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }

    /// Writes one topic's changes; when the store failed, how many of
    /// `ops` were written before it did.
    async fn write(&self, topic: &Arc<str>, ops: &[Op]) -> Result<(), usize> {
        let held = self.inner.held.lock().unwrap().contains(topic);
        let has_join = ops.iter().any(|o| matches!(o, Op::Join { .. }));
        if !held && has_join {
            if let Err(e) = self.inner.store.hold(&self.inner.node, topic).await {
                self.failed(topic, e);
                return Err(0);
            }
            self.inner.held.lock().unwrap().insert(topic.clone());
        }
        let mut empty = false;
        for (i, chunk) in ops.chunks(CHUNK).enumerate() {
            match self.inner.store.apply(&self.inner.node, topic, chunk).await {
                Ok(applied) => {
                    empty = applied.empty;
                    self.record(topic, applied, "join", "leave");
                }
                Err(e) => {
                    self.failed(topic, e);
                    return Err(i * CHUNK);
                }
            }
        }
        let gone = !self.inner.local.lock().unwrap().contains_key(topic);
        let held = self.inner.held.lock().unwrap().contains(topic);
        if empty && gone && held {
            self.inner.releasable.lock().unwrap().insert(topic.clone());
        }
        Ok(())
    }

    /// Releases `topics` whose leaves went out, unless a member came back.
    async fn release(&self, topics: HashSet<Arc<str>>) {
        for topic in topics {
            let gone = !self.inner.local.lock().unwrap().contains_key(&topic);
            if !gone || !self.inner.held.lock().unwrap().contains(&topic) {
                continue;
            }
            if let Err(e) = self.inner.store.release(&self.inner.node, &topic).await {
                tracing::debug!(topic = &*topic, cause = %e, "presence topic not released");
                self.inner.releasable.lock().unwrap().insert(topic);
            } else {
                self.inner.held.lock().unwrap().remove(&topic);
            }
        }
    }

    /// Counts and logs a failed write.
    fn failed(&self, topic: &str, e: RedisError) {
        metrics::counter!(m::PRESENCE_ERRORS).increment(1);
        tracing::warn!(topic, cause = %e, "presence not written; retrying");
    }

    /// Effective changes go to the other nodes at the next tick; users
    /// that came or went to the webhooks.
    fn record(&self, topic: &str, applied: Applied, join: &'static str, leave: &'static str) {
        metrics::counter!(m::PRESENCE_CHANGES, "change" => join)
            .increment(applied.joins.len() as u64);
        metrics::counter!(m::PRESENCE_CHANGES, "change" => leave)
            .increment(applied.leaves.len() as u64);
        if !applied.joins.is_empty() || !applied.leaves.is_empty() {
            let mut outgoing = self.inner.outgoing.lock().unwrap();
            let batch = outgoing.entry(topic.to_string()).or_default();
            for (c, v) in applied.joins {
                if let Some(v) = raw(&v) {
                    batch.join(c, v);
                }
            }
            for (c, v) in applied.leaves {
                if let Some(v) = raw(&v) {
                    batch.leave(c, v);
                }
            }
        }
        if let Some(w) = &self.inner.webhooks {
            for v in applied.users_added {
                w.emit(member_event(MEMBER_ADDED, topic, &v));
            }
            for v in applied.users_removed {
                w.emit(member_event(MEMBER_REMOVED, topic, &v));
            }
        }
    }

    // === the ticker and the receiver ===

    async fn ticker(self) {
        let mut tick = tokio::time::interval(self.inner.config.diff_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.stop.cancelled() => return,
            }
            self.send_outgoing().await;
            self.deliver();
        }
    }

    /// Sends the watchers of every owed topic its whole list, in rounds
    /// one diff interval apart until none is owed (a topic whose read
    /// failed stays owed; Redis may be back by the next round).
    async fn resyncer(self) {
        loop {
            tokio::select! {
                _ = self.inner.resync.notified() => {}
                _ = self.inner.stop.cancelled() => return,
            }
            loop {
                let owed: Vec<String> = self.inner.owed.lock().unwrap().drain().collect();
                if owed.is_empty() {
                    break;
                }
                let failed = self.resync(owed).await;
                if failed.is_empty() {
                    continue;
                }
                metrics::counter!(m::PRESENCE_ERRORS).increment(1);
                tracing::warn!(
                    topics = failed.len(),
                    "presence lists not read after lost changes; reading them again"
                );
                self.inner.owed.lock().unwrap().extend(failed);
                tokio::select! {
                    _ = tokio::time::sleep(self.inner.config.diff_interval) => {}
                    _ = self.inner.stop.cancelled() => return,
                }
            }
        }
    }

    /// Each of `topics`' whole list, to its watchers as a `presence_diff`
    /// with `reset`; returns the topics whose list could not be read.
    ///
    /// Why the watchers' lists end up right: a node writes a change to the
    /// store before it sends it, so the list read after the gap holds every
    /// change heard before the read, the lost ones included. Changes heard
    /// before the read are dropped (delivered after the list, a join whose
    /// leave the gap swallowed would bring a ghost back); those heard
    /// during it are folded into the list; those heard after it follow as
    /// diffs. Some of the last two are older than the read, but each
    /// client's changes come in order, so applying them on top ends at the
    /// client's last state.
    async fn resync(&self, topics: Vec<String>) -> Vec<String> {
        use futures_util::StreamExt;
        futures_util::stream::iter(topics)
            .map(|topic| async move {
                {
                    let mut watched = self.inner.watched.lock().unwrap();
                    let w = watched.get_mut(&topic)?;
                    w.batch = Batch::default();
                    w.resyncing = true;
                }
                let entries =
                    tokio::time::timeout(RESYNC_READ, self.inner.store.list(&topic)).await;
                let mut watched = self.inner.watched.lock().unwrap();
                let w = watched.get_mut(&topic)?;
                w.resyncing = false;
                let entries = match entries {
                    Ok(Ok(e)) => e,
                    Ok(Err(e)) => {
                        tracing::debug!(topic, cause = %e, "presence list for a resync failed");
                        return Some(topic);
                    }
                    Err(_) => return Some(topic),
                };
                let mut all = Batch::default();
                for (client, value) in entries {
                    if let Some(v) = raw(&value) {
                        all.joins.insert(client, v);
                    }
                }
                std::mem::take(&mut w.batch).apply_to(&mut all.joins);
                // Sent under the lock: a diff the ticker takes after it
                // cannot reach a watcher before it.
                let diff = reset(&topic, &all);
                metrics::counter!(m::PRESENCE_DIFFS).increment(w.watchers.len() as u64);
                for watcher in w.watchers.values() {
                    watcher.diff(&diff);
                }
                None
            })
            .buffer_unordered(PARALLEL)
            .filter_map(|failed| async move { failed })
            .collect()
            .await
    }

    /// This node's changes of the interval, to every node, in messages of
    /// at most [`CHUNK`] entries.
    async fn send_outgoing(&self) {
        let outgoing: HashMap<String, Batch> =
            std::mem::take(&mut *self.inner.outgoing.lock().unwrap());
        // Their leaves are in `outgoing`: written before they were marked.
        let releasable = std::mem::take(&mut *self.inner.releasable.lock().unwrap());
        let mut sent = true;
        let mut message = Wire {
            node: self.inner.node.clone(),
            topics: HashMap::new(),
            reset: Vec::new(),
        };
        let mut size = 0;
        for (topic, batch) in outgoing.into_iter().filter(|(_, b)| !b.is_void()) {
            for piece in batch.split(CHUNK) {
                // A topic is in a message once: its next piece goes in the
                // next message.
                if message.topics.contains_key(&topic) {
                    sent &= self.send(&mut message).await;
                    size = 0;
                }
                size += piece.len();
                message.topics.insert(topic.clone(), piece);
                if size >= CHUNK {
                    sent &= self.send(&mut message).await;
                    size = 0;
                }
            }
        }
        if !message.topics.is_empty() {
            sent &= self.send(&mut message).await;
        }
        // After the leaves of the removal: the lists read then hold them.
        let resets: Vec<String> = self.inner.resets.lock().unwrap().drain().collect();
        for chunk in resets.chunks(CHUNK) {
            message.reset = chunk.to_vec();
            sent &= self.send(&mut message).await;
        }
        if sent {
            self.release(releasable).await;
        } else {
            self.inner.releasable.lock().unwrap().extend(releasable);
        }
    }

    /// Sends `message` (emptied); when Redis did not take it, its changes
    /// go back in front of the next interval's, so watchers see them late
    /// rather than never.
    async fn send(&self, message: &mut Wire) -> bool {
        let json = serde_json::to_string(&*message).expect("diffs serialize");
        let result = self.inner.store.broadcast(json).await;
        if let Err(e) = &result {
            metrics::counter!(m::PRESENCE_ERRORS).increment(1);
            tracing::warn!(cause = %e, "presence changes not sent to the other nodes; sent again with the next ones");
            let mut outgoing = self.inner.outgoing.lock().unwrap();
            for (topic, mut batch) in message.topics.drain() {
                if let Some(newer) = outgoing.remove(&topic) {
                    batch.merge(newer);
                }
                outgoing.insert(topic, batch);
            }
            self.inner
                .resets
                .lock()
                .unwrap()
                .extend(message.reset.drain(..));
        }
        message.topics.clear();
        message.reset.clear();
        result.is_ok()
    }

    /// The watchers of `topics` are owed their whole list: the resyncer
    /// sends it.
    fn owe(&self, topics: Vec<String>) {
        self.inner.owed.lock().unwrap().extend(topics);
        self.inner.resync.notify_one();
    }

    /// Takes every node's diff messages into the watched topics' batches.
    async fn receiver(self, mut diffs: mpsc::Receiver<Heard>) {
        while let Some(heard) = diffs.recv().await {
            let payload = match heard {
                Heard::Diff(p) => p,
                Heard::Gap => {
                    let topics: Vec<String> =
                        self.inner.watched.lock().unwrap().keys().cloned().collect();
                    tracing::info!(
                        topics = topics.len(),
                        "presence changes were lost: watchers get whole lists"
                    );
                    self.owe(topics);
                    continue;
                }
            };
            let wire: Wire = match serde_json::from_slice(&payload) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(cause = %e, "unreadable presence diff ignored");
                    continue;
                }
            };
            let owed: Vec<String> = {
                let mut watched = self.inner.watched.lock().unwrap();
                for (topic, batch) in wire.topics {
                    if let Some(w) = watched.get_mut(&topic) {
                        w.batch.merge(batch);
                    }
                }
                let mut owed = Vec::new();
                for topic in wire.reset {
                    if let Some(w) = watched.get_mut(&topic) {
                        // What was heard before it (the removal's leaves
                        // among it) lost nothing: it goes out now, as its
                        // interval would have sent it, and the list read
                        // next follows it.
                        if !w.resyncing {
                            flush(&topic, w);
                        }
                        owed.push(topic);
                    }
                }
                owed
            };
            if !owed.is_empty() {
                self.owe(owed);
            }
        }
    }

    /// One `presence_diff` per watched topic that changed, to its watchers.
    /// Queued under the watched lock (a watcher only queues the frame): a
    /// resync that starts meanwhile cannot send its list before a diff taken
    /// here, which is older than its read.
    fn deliver(&self) {
        let mut watched = self.inner.watched.lock().unwrap();
        for (topic, w) in watched.iter_mut().filter(|(_, w)| !w.resyncing) {
            flush(topic, w);
        }
    }

    // === liveness and the reaper ===

    async fn liveness(self, leadership: watch::Receiver<Leadership>, ready: watch::Sender<bool>) {
        let ttl = self.inner.config.ttl;
        let me = self.inner.node.clone();
        // Leftovers of an earlier process with this id: removed (and their
        // leaves announced) before this life writes anything.
        loop {
            match self.take_over(&me, true).await {
                Ok(()) => break,
                Err(e) => tracing::debug!(cause = %e, "presence start-up cleanup: retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = self.inner.stop.cancelled() => return,
            }
        }
        let _ = ready.send(true);
        let every = reap_every(ttl);
        // The leader's reaper runs beside the mark: a long purge (a dead
        // node with many topics, a slow Redis) must not hold up this
        // node's own renewal.
        tokio::spawn(self.clone().reaper(leadership, every));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_mark: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.stop.cancelled() => return,
            }
            let due = last_mark.is_none_or(|t| t.elapsed() >= ttl / 3);
            if due {
                match self.inner.store.heartbeat(&me, ttl).await {
                    Ok(alive) => {
                        if !alive && last_mark.is_some() {
                            self.reassert(every);
                        }
                        last_mark = Some(tokio::time::Instant::now());
                    }
                    Err(e) => tracing::debug!(cause = %e, "presence mark not renewed"),
                }
            }
        }
    }

    /// While this node leads, every `every`: [`Presence::reap`].
    async fn reaper(self, leadership: watch::Receiver<Leadership>, every: Duration) {
        let me = self.inner.node.clone();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.stop.cancelled() => return,
            }
            if leadership.borrow().leader {
                self.reap(&me).await;
            }
        }
    }

    /// On the leader: removes the entries of every node whose mark expired.
    async fn reap(&self, me: &str) {
        let dead = match self.inner.store.dead(me).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(cause = %e, "presence reaper: nodes unreadable");
                return;
            }
        };
        for node in dead {
            if let Err(e) = self.take_over(&node, false).await {
                tracing::warn!(node, cause = %e, "presence reaper: a dead node's entries stay for now");
            }
        }
    }

    /// Removes what node `node` left and announces the leaves.
    async fn take_over(&self, node: &str, force: bool) -> Result<(), RedisError> {
        let topics = self.inner.store.claim(node, force).await?;
        if !topics.is_empty() {
            tracing::info!(
                node,
                topics = topics.len(),
                "removing a gone node's presence"
            );
        }
        let mut done = true;
        // The leader's reaper tries each topic once a round (the next round
        // takes up what failed; retrying here would hold up its own
        // heartbeat); a node's own drain, which has no next round, retries.
        let retries = if force { 5 } else { 0 };
        for topic in &topics {
            let mut tries = 0;
            loop {
                match self.inner.store.purge(node, topic).await {
                    Ok(applied) => {
                        self.record(topic, applied, "join", "reaped");
                        self.inner.resets.lock().unwrap().insert(topic.to_string());
                        // Released only once purged: what is left is
                        // purged by the next round.
                        done &= self.inner.store.release(node, topic).await.is_ok();
                        break;
                    }
                    Err(e) if tries < retries => {
                        tries += 1;
                        tracing::warn!(topic, cause = %e, "purging a gone node's presence failed; retrying");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                    Err(e) => {
                        tracing::warn!(topic, cause = %e, "a gone node's presence stays until the reaper's next round");
                        done = false;
                        break;
                    }
                }
            }
        }
        if done && !topics.is_empty() {
            // Nothing left: the node is no longer watched.
            self.inner.store.claim(node, force).await?;
        }
        Ok(())
    }

    /// This node's mark had expired: the reaper may have removed its
    /// entries. After one reaper round (so its purge is over), every local
    /// member is written again (joins of present entries change nothing).
    fn reassert(&self, after: Duration) {
        let p = self.clone();
        tracing::warn!(
            "this node's presence mark had expired (cut off from Redis longer than PRESENCE_TTL_MS): writing its entries again"
        );
        tokio::spawn(async move {
            tokio::time::sleep(after * 2).await;
            p.inner.held.lock().unwrap().clear();
            // Queued under `local`: a leave taken meanwhile is queued
            // after these joins, never before one (which would leave its
            // entry behind).
            let local = p.inner.local.lock().unwrap();
            for (topic, members) in local.iter() {
                for (c, mem) in members {
                    p.queue(
                        topic.clone(),
                        Op::Join {
                            client: c.clone(),
                            user: mem.user.clone(),
                            value: mem.value.clone(),
                        },
                    );
                }
            }
        });
    }

    /// The drain, once the sessions are over: their leaves written and
    /// sent, then whatever this node still has removed, until `deadline`.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        if !self.inner.config.enabled() {
            return;
        }
        while tokio::time::Instant::now() < deadline {
            let idle = self.inner.pending.lock().unwrap().is_empty()
                && !self.inner.busy.load(Ordering::Acquire);
            if idle {
                break;
            }
            self.inner.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let me = self.inner.node.clone();
        let _ = tokio::time::timeout_at(deadline, async {
            if let Err(e) = self.take_over(&me, true).await {
                tracing::warn!(cause = %e, "this node's presence was not removed; the reaper will");
            }
            self.send_outgoing().await;
        })
        .await;
        self.inner.stop.cancel();
    }
}

fn unwatch(watched: &mut HashMap<String, Watched>, topic: &str, client: &str) {
    if let Some(w) = watched.get_mut(topic) {
        w.watchers.remove(client);
        if w.watchers.is_empty() {
            watched.remove(topic);
        }
    }
}

/// The frames of one topic's coalesced change.
pub fn diff(topic: &str, batch: &Batch) -> Diff {
    frames(topic, batch, false)
}

/// The frames that replace a watcher's list of `topic` with `all`'s joins.
fn reset(topic: &str, all: &Batch) -> Diff {
    frames(topic, all, true)
}

fn frames(topic: &str, batch: &Batch, reset: bool) -> Diff {
    #[derive(Serialize)]
    struct Native<'a> {
        #[serde(rename = "type")]
        ty: &'static str,
        event: &'a str,
        joins: &'a BTreeMap<String, Box<RawValue>>,
        leaves: &'a BTreeMap<String, Box<RawValue>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
    }
    let native = serde_json::to_string(&Native {
        ty: "presence_diff",
        event: topic,
        joins: &batch.joins,
        leaves: &batch.leaves,
        reset,
    })
    .expect("diffs serialize");
    let mut object = serde_json::json!({
        "topic": topic,
        "joins": &batch.joins,
        "leaves": &batch.leaves,
    });
    if reset {
        object["reset"] = true.into();
    }
    Diff {
        native: native.into(),
        object,
    }
}

/// `{"type", "topic", "user", "info"}` from a stored entry.
fn member_event(kind: &'static str, topic: &str, value: &str) -> Event {
    let mut fields = match serde_json::from_str::<serde_json::Value>(value) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => serde_json::Map::new(),
    };
    fields.entry("info").or_insert(serde_json::Value::Null);
    fields
        .entry("user")
        .or_insert(serde_json::Value::String(String::new()));
    fields.insert("topic".into(), topic.into());
    Event::new(kind, fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn a_join_and_a_leave_of_one_client_cancel_in_either_order() {
        let mut b = Batch::default();
        b.join("a".into(), v("1"));
        b.leave("a".into(), v("1"));
        assert!(b.is_empty());
        b.leave("b".into(), v("2"));
        b.join("b".into(), v("2"));
        assert!(b.is_empty());
        b.join("c".into(), v("3"));
        let mut other = Batch::default();
        other.leave("c".into(), v("3"));
        other.join("d".into(), v("4"));
        b.merge(other);
        assert_eq!(b.joins.keys().collect::<Vec<_>>(), ["d"]);
        assert!(b.leaves.is_empty());
    }

    /// A pair that cancels keeps the client's last state for a node that
    /// read the whole list in between, and merges keep it in order.
    #[test]
    fn a_cancelled_pair_keeps_its_last_state() {
        let mut b = Batch::default();
        b.join("x".into(), v("1"));
        b.leave("x".into(), v("1"));
        assert!(b.is_empty());
        assert!(!b.is_void());
        let wire: Batch = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let mut list: BTreeMap<String, Box<RawValue>> = BTreeMap::new();
        list.insert("x".into(), v("1"));
        list.insert("y".into(), v("2"));
        let mut heard = Batch::default();
        heard.merge(wire);
        // y left and came back with another entry.
        let mut other = Batch::default();
        other.leave("y".into(), v("2"));
        other.join("y".into(), v("3"));
        heard.merge(other);
        assert!(heard.is_empty(), "watchers see nothing: {heard:?}");
        heard.apply_to(&mut list);
        assert_eq!(list.keys().collect::<Vec<_>>(), ["y"]);
        assert_eq!(list["y"].get(), "3");
        // An ordinary batch has no churn on the wire.
        let mut plain = Batch::default();
        plain.join("z".into(), v("4"));
        assert!(!serde_json::to_string(&plain).unwrap().contains("churn"));
    }

    /// A large batch goes out in bounded pieces that, merged, are the batch.
    #[test]
    fn a_large_batch_splits_into_pieces_that_merge_back() {
        let mut b = Batch::default();
        for i in 0..1_200 {
            b.join(format!("j{i}"), v("1"));
        }
        for i in 0..300 {
            b.leave(format!("l{i}"), v("2"));
        }
        b.join("x".into(), v("3"));
        b.leave("x".into(), v("3"));
        let whole = serde_json::to_value(&b).unwrap();
        let pieces = b.split(500);
        assert_eq!(pieces.len(), 4);
        assert!(pieces.iter().all(|p| p.len() <= 500));
        let mut merged = Batch::default();
        for p in pieces.into_iter().rev() {
            merged.merge(p);
        }
        assert_eq!(serde_json::to_value(&merged).unwrap(), whole);
    }

    #[test]
    fn frames_carry_the_topic_and_both_lists() {
        let mut b = Batch::default();
        b.join("c1".into(), v(r#"{"user":"u","info":null}"#));
        let d = diff("room", &b);
        assert_eq!(
            d.native.as_str(),
            r#"{"type":"presence_diff","event":"room","joins":{"c1":{"user":"u","info":null}},"leaves":{}}"#
        );
        assert_eq!(d.object["joins"]["c1"]["user"], "u");
        assert_eq!(d.object["topic"], "room");
    }

    #[test]
    fn a_reset_says_so_and_a_diff_does_not() {
        let mut b = Batch::default();
        b.join("c1".into(), v(r#"{"user":"u","info":null}"#));
        let d = reset("room", &b);
        assert_eq!(
            d.native.as_str(),
            r#"{"type":"presence_diff","event":"room","joins":{"c1":{"user":"u","info":null}},"leaves":{},"reset":true}"#
        );
        assert_eq!(d.object["reset"], true);
        assert!(diff("room", &b).object.get("reset").is_none());
    }

    struct Frames(Mutex<Vec<serde_json::Value>>);

    impl Watcher for Frames {
        fn diff(&self, diff: &Diff) {
            self.0
                .lock()
                .unwrap()
                .push(serde_json::from_str(diff.native.as_str()).unwrap());
        }
    }

    /// A change another node wrote, whose diff message this node never
    /// heard, reaches the watchers once the gap is known.
    #[tokio::test]
    async fn after_lost_diff_messages_watchers_get_the_whole_list() {
        let (store, mut own) = memory::MemoryStore::new();
        let store = Arc::new(store);
        let (heard, diffs) = mpsc::channel(8);
        // This node's own diff messages come back to it; another node's
        // write below sends none, as if its message were lost.
        let echo = heard.clone();
        tokio::spawn(async move {
            while let Some(h) = own.recv().await {
                let _ = echo.send(h).await;
            }
        });
        let config = PresenceConfig {
            topics: vec![crate::auth::Pattern::new("room.*")],
            ttl: Duration::from_secs(5),
            diff_interval: Duration::from_millis(20),
        };
        let (_lead, leadership) = watch::channel(Leadership::default());
        let p = Presence::start(config, "n1", store.clone(), diffs, None, leadership);
        let frames = Arc::new(Frames(Mutex::new(Vec::new())));
        p.joined("room.1", "a", "ua", None, Some(frames.clone()));
        let other = Op::Join {
            client: "b".into(),
            user: "ub".into(),
            value: entry("ub", None).into(),
        };
        store.apply("n2", "room.1", &[other]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let has = |f: &dyn Fn(&serde_json::Value) -> bool| frames.0.lock().unwrap().iter().any(f);
        while !has(&|d| d["joins"].get("a").is_some()) {
            assert!(tokio::time::Instant::now() < deadline, "own join not seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !has(&|d| d["joins"].get("b").is_some()),
            "b's diff was never sent"
        );
        heard.send(Heard::Gap).await.unwrap();
        while !has(&|d| d["reset"] == true) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reset after the gap"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        {
            let seen = frames.0.lock().unwrap();
            let reset = seen.iter().find(|d| d["reset"] == true).unwrap();
            let mut ids: Vec<&String> = reset["joins"].as_object().unwrap().keys().collect();
            ids.sort();
            assert_eq!(ids, ["a", "b"], "{reset}");
            assert_eq!(reset["joins"]["b"]["user"], "ub");
            assert_eq!(reset["leaves"], serde_json::json!({}));
        }
        // A join heard just before a gap that swallowed its leave: the list
        // read after the gap has no such client, and the join must not
        // come after it and bring it back.
        let mut batch = Batch::default();
        batch.join("c".into(), v(&entry("uc", None)));
        let wire = Wire {
            node: "n2".into(),
            topics: HashMap::from([("room.1".to_string(), batch)]),
            reset: Vec::new(),
        };
        let wire = serde_json::to_vec(&wire).unwrap();
        heard.send(Heard::Diff(wire.into())).await.unwrap();
        heard.send(Heard::Gap).await.unwrap();
        let resets = || {
            frames
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|d| d["reset"] == true)
                .count()
        };
        while resets() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no second reset");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let frames = frames.0.lock().unwrap();
        let second = frames.iter().rposition(|d| d["reset"] == true).unwrap();
        let mut ids: Vec<&String> = frames[second]["joins"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"], "{}", frames[second]);
        assert!(
            frames[second..]
                .iter()
                .all(|d| d["joins"].get("c").is_none()),
            "a join older than the list came after it: {:?}",
            &frames[second..]
        );
    }

    #[test]
    fn entries_and_member_events() {
        let info = v(r#"{"name":"Ann"}"#);
        let e = entry("u1", Some(&info));
        assert_eq!(e, r#"{"user":"u1","info":{"name":"Ann"}}"#);
        let ev: serde_json::Value =
            serde_json::from_str(member_event(MEMBER_ADDED, "t", &e).json()).unwrap();
        assert_eq!(
            ev,
            serde_json::json!({"type":"member_added","topic":"t","user":"u1","info":{"name":"Ann"}})
        );
        assert_eq!(
            clients_json(&[("c".into(), e.clone()), ("bad".into(), "{".into())]),
            format!(r#"{{"c":{e}}}"#)
        );
    }
}
