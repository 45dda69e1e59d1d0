//! Socket.IO connection state recovery (CSR) for the official clients, with
//! `SOCKETIO_STATE_RECOVERY=true`.
//!
//! socket.io-client (4.6+) keeps the `pid` of the CONNECT answer and the
//! last string argument of every event it handles (`_lastOffset`), and
//! sends both back in the CONNECT of its next connection; an answer with the
//! same `pid` tells it the session was restored (`socket.recovered`).
//!
//! One string has to say where the socket stands in *every* topic it is
//! subscribed to, exactly: positions written next to the socket, lazily,
//! would lag what it received (duplicates after a recovery) or run ahead of
//! it (losses). So the string itself carries them, the **positions token**:
//!
//! - the session's **record** (`{prefix}:sio-session:{pid}`, JSON) numbers
//!   its topics in **slots** (topic, epoch, the offset the subscription
//!   started at, the record revision that assigned the slot); it is written
//!   only when the topics change (subscribe, unsubscribe, a topic's epoch
//!   reset), never per delivery, and kept `HISTORY_TTL_MS` after the socket
//!   is gone (renewed while it lives);
//! - the token is the record revision and, per slot, the offset of the last
//!   publication of that topic queued to the socket, all in base 36:
//!   `"7.1l..xc"` (slot 1 has received nothing since it started). Every
//!   history publication and every `gap` ends with the token as it stands
//!   after it, built and queued under one lock, so the client's last token
//!   names exactly what it received, whichever node dies when.
//!
//! A token names only revisions already stored: a slot assigned by a write
//! still under way is left out (its offset counts as the slot's start), so
//! a token never refers to a record that does not exist. A slot's value in a
//! token older than the slot's assignment is ignored for the same reason.
//!
//! Cost per delivery to such a socket: the shared frame without its `]`
//! (serialized once per publication), the token encoded (a few base-36
//! numbers, one per topic of the session) and one copy of the frame with
//! `,"<token>"]` appended. Publications without an offset whose data is not
//! a string keep the one shared frame: the client keeps only *string* last
//! arguments, and for string data the current token is appended so that
//! `_lastOffset` is never a piece of data.
//!
//! On a CONNECT with `{pid, offset}` ([`Recovery::connect`]) any node reads
//! the record, checks that the same user connects, and checks per topic that
//! history still holds everything after the token's position. All there: the
//! same `pid`, every subscription back and every missed publication replayed
//! through the hub (once, in order, then live). Otherwise a new `pid`
//! (`recovered` false), the subscriptions still back, the recoverable topics
//! replayed and a `gap` event for each one that is not. No record: a new,
//! empty session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::gateway::outbox::Outbox;
use crate::gateway::sio::{self, Peer, Session};
use crate::history::{GapRange, Position, push_base36};
use crate::hub::{Announce, Delivery, Outcome, Publication, Subscriber};
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::Since;
use crate::redis::{Keys, LuaScript, Redis};

// === the store ===

#[derive(Debug, thiserror::Error)]
#[error("session record unavailable: {0}")]
pub struct StoreError(String);

/// Where session records live: Redis for a cluster, memory for one node.
pub trait SessionStore: Send + Sync + 'static {
    /// The record of `pid`, if it is still there.
    fn get<'a>(&'a self, pid: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>>;
    /// Stores `record` (JSON with its owner in `o`) for `ttl`, unless another
    /// owner holds the record (`take`: in any case). False: not written.
    fn put<'a>(
        &'a self,
        pid: &'a str,
        owner: &'a str,
        record: String,
        ttl: Duration,
        take: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Gives the records of `pids` `ttl` more to live.
    fn touch<'a>(
        &'a self,
        pids: &'a [Arc<str>],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Deletes `pid`'s record when `owner` holds it.
    fn delete<'a>(&'a self, pid: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// Records of one embedded node.
#[derive(Default)]
pub struct MemoryStore {
    /// std Mutex: no `.await` under it.
    records: Mutex<Records>,
}

/// pid → (owner, record, expiry), and when to sweep out the expired ones:
/// each write could leave one behind for good (sockets that never come
/// back), so a write that finds the map at twice its size after the last
/// sweep (1024 at least) sweeps it: amortized O(1) per write, and the map
/// holds at most about twice the records that are live.
#[derive(Default)]
struct Records {
    map: HashMap<String, (String, String, Instant)>,
    sweep_at: usize,
}

impl Records {
    fn sweep_if_due(&mut self, now: Instant) {
        if self.map.len() >= self.sweep_at.max(1024) {
            self.map.retain(|_, (_, _, expiry)| *expiry > now);
            self.sweep_at = 2 * self.map.len();
        }
    }
}

impl SessionStore for MemoryStore {
    fn get<'a>(&'a self, pid: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        let records = self.records.lock().unwrap();
        let now = Instant::now();
        let found = records
            .map
            .get(pid)
            .filter(|(_, _, expiry)| *expiry > now)
            .map(|(_, r, _)| r.clone());
        Box::pin(async move { Ok(found) })
    }

    fn put<'a>(
        &'a self,
        pid: &'a str,
        owner: &'a str,
        record: String,
        ttl: Duration,
        take: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut records = self.records.lock().unwrap();
        let now = Instant::now();
        let held = records
            .map
            .get(pid)
            .is_some_and(|(o, _, expiry)| *expiry > now && o != owner);
        let written = take || !held;
        if written {
            records
                .map
                .insert(pid.into(), (owner.into(), record, now + ttl));
            records.sweep_if_due(now);
        }
        Box::pin(async move { Ok(written) })
    }

    fn touch<'a>(
        &'a self,
        pids: &'a [Arc<str>],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut records = self.records.lock().unwrap();
        let expiry = Instant::now() + ttl;
        for pid in pids {
            if let Some(r) = records.map.get_mut(&**pid) {
                r.2 = expiry;
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn delete<'a>(&'a self, pid: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut records = self.records.lock().unwrap();
        if records.map.get(pid).is_some_and(|(o, _, _)| o == owner) {
            records.map.remove(pid);
        }
        Box::pin(async { Ok(()) })
    }
}

/// `SET` unless another connection owns the record (it took the session
/// over: a node that still thinks it holds the socket must not overwrite
/// the newer record). KEYS[1] record; ARGV: record, owner, ttl ms, "1" to
/// take over.
const PUT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and ARGV[4] ~= '1' then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and rec.o ~= ARGV[2] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"#;

/// `DEL` when ARGV[1] owns the record.
const DELETE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if ok and type(rec) == 'table' and rec.o ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"#;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Records in Redis, one string key per session.
pub struct RedisStore {
    redis: Redis,
    keys: Keys,
    put: LuaScript,
    delete: LuaScript,
}

impl RedisStore {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            put: LuaScript::new(PUT),
            delete: LuaScript::new(DELETE),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl SessionStore for RedisStore {
    fn get<'a>(&'a self, pid: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            self.redis
                .get(&self.keys.socketio_session(pid))
                .await
                .map_err(unavailable)
        })
    }

    fn put<'a>(
        &'a self,
        pid: &'a str,
        owner: &'a str,
        record: String,
        ttl: Duration,
        take: bool,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let written: i64 = self
                .redis
                .eval(
                    &self.put,
                    vec![self.keys.socketio_session(pid)],
                    vec![
                        record,
                        owner.to_string(),
                        ttl.as_millis().to_string(),
                        if take { "1" } else { "0" }.to_string(),
                    ],
                    SCRIPT_TIMEOUT,
                )
                .await
                .map_err(unavailable)?;
            Ok(written == 1)
        })
    }

    fn touch<'a>(
        &'a self,
        pids: &'a [Arc<str>],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let ms = ttl.as_millis().to_string();
            // Sent at once: fred pipelines them on its connection.
            let calls = pids.iter().map(|pid| {
                self.redis
                    .command::<i64>("PEXPIRE", vec![self.keys.socketio_session(pid), ms.clone()])
            });
            for result in futures_util::future::join_all(calls).await {
                result.map_err(unavailable)?;
            }
            Ok(())
        })
    }

    fn delete<'a>(&'a self, pid: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.redis
                .eval::<i64>(
                    &self.delete,
                    vec![self.keys.socketio_session(pid)],
                    vec![owner.to_string()],
                    SCRIPT_TIMEOUT,
                )
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }
}

// === the node's sessions ===

/// The node's side of recovery: the store, and the records of its live
/// sockets, renewed so that they outlive the socket by `HISTORY_TTL_MS`.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    store: Arc<dyn SessionStore>,
    /// `HISTORY_TTL_MS`: how long a record outlives its socket.
    ttl: Duration,
    /// How often the live records are renewed.
    renew: Duration,
    /// The pids of this node's sockets, with how many hold each: a client
    /// that comes back before its old socket is noticed gone holds the same
    /// pid twice for a moment, and the old one's end must not stop the
    /// renewal of the new one's record. std Mutex, no `.await` under it.
    live: Mutex<HashMap<Arc<str>, usize>>,
}

/// How many records one renewal round sends at once.
const RENEW_CHUNK: usize = 512;

impl Registry {
    /// Starts renewing live records every min(`ttl`/3, 60 s) until `stop`.
    pub fn start(store: Arc<dyn SessionStore>, ttl: Duration, stop: CancellationToken) -> Self {
        let renew = (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let registry = Registry {
            inner: Arc::new(RegistryInner {
                store,
                ttl,
                renew,
                live: Mutex::new(HashMap::new()),
            }),
        };
        let r = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(renew);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => r.renew().await,
                    _ = stop.cancelled() => return,
                }
            }
        });
        registry
    }

    /// A live record's lifetime: it must last until the next renewal and
    /// then `ttl` after the socket is gone.
    fn record_ttl(&self) -> Duration {
        self.inner.ttl + self.inner.renew
    }

    async fn renew(&self) {
        let pids: Vec<Arc<str>> = self.inner.live.lock().unwrap().keys().cloned().collect();
        for chunk in pids.chunks(RENEW_CHUNK) {
            if let Err(e) = self.inner.store.touch(chunk, self.record_ttl()).await {
                tracing::warn!(cause = %e, "could not renew Socket.IO session records");
                return;
            }
        }
    }
}

// === the record and the token ===

/// The stored form of a session (JSON, short names: it is written on every
/// subscribe and unsubscribe).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The revision tokens name.
    rev: u64,
    /// The connection that writes it (takeovers: [`SessionStore::put`]).
    o: String,
    /// The user; a different one cannot take the session over.
    u: String,
    s: Vec<Option<RecordSlot>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordSlot {
    /// Topic.
    t: String,
    /// A history topic (with positions).
    #[serde(default)]
    h: bool,
    /// Subscribed with the object form (a `{topic, offset}` argument).
    #[serde(default)]
    p: bool,
    /// Epoch and offset the subscription started at.
    #[serde(default)]
    e: String,
    #[serde(default)]
    b: u64,
    /// The revision that assigned the slot.
    r: u64,
    /// The socket's identity allowed the topic itself when it subscribed
    /// (not the subscribe hook or the back end): a returning identity that
    /// no longer names a topic the hook covers loses it, as on a `refresh`.
    #[serde(default)]
    i: bool,
    /// Subscribed with `presence: true` (`presence_diff` events).
    #[serde(default)]
    w: bool,
}

/// Marks a slot whose assignment is not stored yet.
const PENDING: u64 = u64::MAX;

/// The longest token a client may send back.
const MAX_TOKEN: usize = 16 * 1024;

/// One topic of the session.
#[derive(Debug, Clone)]
struct Slot {
    topic: Arc<str>,
    history: bool,
    positions: bool,
    epoch: Arc<str>,
    /// Where the subscription started (its offset when nothing was received).
    base: u64,
    /// The revision that assigned it, [`PENDING`] until stored.
    assigned: u64,
    /// The last offset queued to the socket.
    offset: Option<u64>,
    /// [`RecordSlot::i`].
    by_identity: bool,
    /// [`RecordSlot::w`].
    presence: bool,
}

/// The session's topics and where the socket stands in each.
#[derive(Debug, Default)]
struct Ledger {
    /// The newest stored revision: what tokens name.
    rev: u64,
    /// The newest revision a write was started for.
    written: u64,
    slots: Vec<Option<Slot>>,
}

impl Ledger {
    /// The slot of `topic`, and where its subscription starts.
    fn find(&self, topic: &str) -> Option<(usize, Option<Since>)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            let s = s.as_ref().filter(|s| *s.topic == *topic)?;
            let since = s.history.then(|| Since {
                offset: s.base,
                epoch: s.epoch.to_string(),
            });
            Some((i, since))
        })
    }

    fn alloc(&mut self, slot: Slot) -> usize {
        match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// The token: the revision, then per slot its last offset where the
    /// slot's assignment is stored (else empty), trailing empties dropped.
    fn token(&self) -> String {
        let values = self.slots.iter().map(|s| {
            s.as_ref()
                .filter(|s| s.assigned <= self.rev)
                .and_then(|s| s.offset)
        });
        encode(self.rev, values)
    }

    /// Publication `offset` of `epoch` was queued on slot `i`. True when the
    /// slot moved to another epoch (its record must be written again).
    fn delivered(&mut self, i: usize, epoch: &Arc<str>, offset: u64) -> bool {
        let Some(Some(s)) = self.slots.get_mut(i) else {
            return false;
        };
        if !s.history {
            return false;
        }
        if s.epoch == *epoch {
            s.offset = Some(offset);
            return false;
        }
        if crate::history::is_pending(&s.epoch) && !crate::history::is_pending(epoch) {
            // The topic's first epoch: the slot's offsets continue into it
            // (the record's pending epoch stands for it until the next
            // write, `Range::continues`), so no reassignment.
            s.epoch = epoch.clone();
            s.offset = Some(offset);
            return false;
        }
        // The hub announces an epoch change as a gap first; should a
        // publication ever come without it, the slot restarts before it.
        s.epoch = epoch.clone();
        s.base = offset.saturating_sub(1);
        s.offset = Some(offset);
        s.assigned = PENDING;
        true
    }

    /// Slot `i` was told that `gap` is lost. True when it moved to another epoch.
    fn gapped(&mut self, i: usize, gap: &GapRange) -> bool {
        let Some(Some(s)) = self.slots.get_mut(i) else {
            return false;
        };
        if !s.history {
            return false;
        }
        if crate::history::is_pending(&s.epoch) && !crate::history::is_pending(&gap.epoch) {
            // Lost offsets of the topic's first epoch: a plain gap of it.
            s.epoch = gap.epoch.clone();
        }
        if s.epoch == gap.epoch {
            s.offset = Some(s.offset.unwrap_or(s.base).max(gap.to));
            return false;
        }
        // Reassigned: an older token's value for this slot is void, and
        // what it falls back to is the start of the lost range, so a client
        // that never saw this gap is told again rather than skipping it.
        s.epoch = gap.epoch.clone();
        s.base = gap.from.saturating_sub(1);
        s.offset = Some(gap.to);
        s.assigned = PENDING;
        true
    }

    fn record(&self, rev: u64, owner: &str, user: &str) -> Record {
        Record {
            rev,
            o: owner.into(),
            u: user.into(),
            s: self
                .slots
                .iter()
                .map(|s| {
                    s.as_ref().map(|s| RecordSlot {
                        t: s.topic.to_string(),
                        h: s.history,
                        p: s.positions,
                        e: s.epoch.to_string(),
                        b: s.base,
                        r: s.assigned,
                        i: s.by_identity,
                        w: s.presence,
                    })
                })
                .collect(),
        }
    }
}

fn parse36(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 13 {
        return None;
    }
    let mut n: u64 = 0;
    for c in s.bytes() {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'z' => c - b'a' + 10,
            _ => return None,
        };
        n = n.checked_mul(36)?.checked_add(u64::from(d))?;
    }
    Some(n)
}

fn encode(rev: u64, values: impl Iterator<Item = Option<u64>>) -> String {
    let mut token = String::with_capacity(32);
    push_base36(&mut token, rev);
    let mut empties = 0;
    for value in values {
        match value {
            None => empties += 1,
            Some(v) => {
                for _ in 0..=empties {
                    token.push('.');
                }
                empties = 0;
                push_base36(&mut token, v);
            }
        }
    }
    token
}

/// A token as the client sent it back: the revision and per slot a value.
fn decode(token: &str) -> Option<(u64, Vec<Option<u64>>)> {
    if token.len() > MAX_TOKEN {
        return None;
    }
    let mut parts = token.split('.');
    let rev = parse36(parts.next()?)?;
    let values = parts
        .map(|p| match p {
            "" => Some(None),
            p => parse36(p).map(Some),
        })
        .collect::<Option<Vec<_>>>()?;
    Some((rev, values))
}

/// `42["event",<data>` of a Socket.IO event.
fn event_open(event: &str, data: &Value) -> String {
    let mut frame = String::from("42[");
    frame.push_str(&serde_json::to_string(event).expect("strings serialize"));
    frame.push(',');
    frame.push_str(&data.to_string());
    frame
}

/// `open` with the token as last argument: `open,"<token>"]`.
fn with_token(open: &str, token: &str) -> Utf8Bytes {
    let mut frame = String::with_capacity(open.len() + token.len() + 4);
    frame.push_str(open);
    frame.push_str(",\"");
    frame.push_str(token);
    frame.push_str("\"]");
    frame.into()
}

/// A new `pid`: 128 random bits, the key to the session's subscriptions.
fn new_pid() -> Arc<str> {
    format!("{:032x}", rand::random::<u128>()).into()
}

// === one socket ===

/// One socket's recovery state: its `pid`, its topics and positions.
pub struct Recovery {
    pid: Arc<str>,
    /// This connection, as the record's writer.
    owner: Box<str>,
    user: Box<str>,
    registry: Registry,
    outbox: Arc<Outbox>,
    /// std Mutex, never held across `.await`: each delivery updates the
    /// ledger and queues its frame under it, so tokens reach the queue in
    /// the order they were made.
    ledger: Mutex<Ledger>,
    /// Orders record writes; each writes the whole ledger at a new revision.
    writes: tokio::sync::Mutex<()>,
}

/// What a returning socket gets back ([`Recovery::connect`]).
#[derive(Debug, Default)]
pub struct Plan {
    /// The same `pid`: everything it missed follows.
    pub recovered: bool,
    restores: Vec<Restore>,
    /// Topics it may no longer read.
    revoked: Vec<Arc<str>>,
    /// Topics past `WEBSOCKET_MAX_SUBSCRIPTIONS` (a record written under
    /// a larger limit, by another node or before a configuration change).
    over_limit: Vec<Arc<str>>,
}

#[derive(Debug)]
struct Restore {
    slot: usize,
    topic: Arc<str>,
    positions: bool,
    /// Its `presence_diff` watcher comes back too.
    presence: bool,
    /// History topics: where the socket stands.
    since: Option<Since>,
    /// False when the token could not be read: nothing is replayed and the
    /// whole range since the slot's start is announced as a gap.
    trusted: bool,
}

impl Recovery {
    fn new(registry: &Registry, pid: Arc<str>, user: &str, outbox: Arc<Outbox>) -> Arc<Self> {
        *registry
            .inner
            .live
            .lock()
            .unwrap()
            .entry(pid.clone())
            .or_default() += 1;
        Arc::new(Recovery {
            pid,
            owner: format!("{:016x}", rand::random::<u64>()).into(),
            user: user.into(),
            registry: registry.clone(),
            outbox,
            ledger: Mutex::new(Ledger::default()),
            writes: tokio::sync::Mutex::new(()),
        })
    }

    /// The `pid` of the CONNECT answer.
    pub fn pid(&self) -> &str {
        &self.pid
    }

    /// The recovery of socket `s`, admitted a moment ago, whose frames go
    /// to `outbox`. Without `resume` (`{pid, offset}` of its CONNECT) a new
    /// session; with it the session it had, as far as it can be restored.
    /// Its record is stored (under the `pid` to answer) before this returns.
    pub async fn connect(
        registry: &Registry,
        node: &Node,
        s: &Session,
        outbox: Arc<Outbox>,
        resume: Option<(String, Option<String>)>,
    ) -> (Arc<Recovery>, Plan) {
        let user = s.user();
        let Some((pid, token)) = resume else {
            return (
                Recovery::new(registry, new_pid(), &user, outbox),
                Plan::default(),
            );
        };
        let record = match registry.inner.store.get(&pid).await {
            Ok(found) => found.and_then(|json| serde_json::from_str::<Record>(&json).ok()),
            Err(e) => {
                tracing::warn!(cause = %e, "could not read a Socket.IO session record");
                None
            }
        };
        let Some(record) = record.filter(|r| r.u == user) else {
            metrics::counter!(m::SOCKETIO_RECOVERIES, "result" => m::recovery::EXPIRED)
                .increment(1);
            return (
                Recovery::new(registry, new_pid(), &user, outbox),
                Plan::default(),
            );
        };
        let (token_rev, values, trusted) = match token.as_deref().map(decode) {
            None => (0, Vec::new(), true),
            Some(Some((rev, values))) if rev <= record.rev => (rev, values, true),
            Some(_) => (0, Vec::new(), false),
        };
        let mut plan = Plan {
            recovered: trusted,
            ..Plan::default()
        };
        // Tokens name the stored revision until this connection's own is
        // stored: should that write fail, they still read right against the
        // record as it is (a recovered pid's; a new pid has no record until
        // a write succeeds, and a reconnect with it meanwhile starts empty).
        let mut ledger = Ledger {
            rev: record.rev,
            written: record.rev,
            slots: Vec::with_capacity(record.s.len()),
        };
        let hub = node.hub();
        // The limit holds for what comes back as for what is asked: the
        // device state, subscribed after the restores, keeps its place.
        let room = node
            .config()
            .max_subscriptions
            .saturating_sub(usize::from(s.may_subscribe(crate::device::state::TOPIC)));
        for (i, stored) in record.s.into_iter().enumerate() {
            let Some(stored) = stored else {
                ledger.slots.push(None);
                continue;
            };
            let topic: Arc<str> = stored.t.into();
            if !s.may_restore(node.hooks(), &topic, stored.i) {
                plan.recovered = false;
                plan.revoked.push(topic);
                ledger.slots.push(None);
                continue;
            }
            if plan.restores.len() >= room {
                plan.recovered = false;
                plan.over_limit.push(topic);
                ledger.slots.push(None);
                continue;
            }
            let value = values
                .get(i)
                .copied()
                .flatten()
                .filter(|_| stored.r <= token_rev);
            let epoch: Arc<str> = stored.e.into();
            let since = stored.h.then(|| Since {
                offset: value.unwrap_or(stored.b),
                epoch: epoch.to_string(),
            });
            if let Some(since) = &since {
                // History is contiguous up to its top: when the first
                // publication after the position is there, all of them are.
                let whole = match hub.history().read(&topic, since.offset, 1).await {
                    Ok(range) => {
                        range.continues(&since.epoch)
                            && since.offset <= range.top
                            && (since.offset == range.top
                                || range
                                    .entries
                                    .first()
                                    .is_some_and(|e| e.offset == since.offset + 1))
                    }
                    Err(_) => false,
                };
                plan.recovered &= whole;
            }
            plan.restores.push(Restore {
                slot: i,
                topic: topic.clone(),
                positions: stored.p,
                presence: stored.w,
                since,
                trusted,
            });
            ledger.slots.push(Some(Slot {
                topic,
                history: stored.h,
                positions: stored.p,
                epoch,
                base: stored.b,
                assigned: stored.r,
                offset: if trusted { value } else { None },
                by_identity: stored.i,
                presence: stored.w,
            }));
        }
        let result = if plan.recovered {
            m::recovery::RECOVERED
        } else {
            m::recovery::GAP
        };
        metrics::counter!(m::SOCKETIO_RECOVERIES, "result" => result).increment(1);
        let answer = if plan.recovered {
            Arc::from(pid.as_str())
        } else {
            new_pid()
        };
        let r = Recovery::new(registry, answer, &user, outbox);
        *r.ledger.lock().unwrap() = ledger;
        // Taken over: from now on the record is this connection's, whatever
        // the node that held the socket before still believes.
        if let Err(e) = r.write(true).await {
            tracing::warn!(cause = %e, "could not store a recovered Socket.IO session");
        }
        // A recovery that failed leaves the old record to its TTL: should
        // this CONNECT answer never reach the client (the connection lost
        // again before it), the client comes back with the old `pid` and
        // gets the same `gap` events again instead of an empty session
        // that announces nothing.
        (r, plan)
    }

    /// After the CONNECT answer: the session's subscriptions again, each
    /// history topic from where the socket stands (replayed by the hub,
    /// once, in order, before anything live), and a `gap` event for a topic
    /// whose missed publications history no longer holds.
    pub async fn restore(
        self: &Arc<Self>,
        peer: &Arc<dyn Peer>,
        s: &Session,
        node: &Node,
        plan: Plan,
    ) {
        for restore in plan.restores {
            let sub = self.subscriber(Some(restore.slot), restore.positions);
            let announce = self.restored(restore.slot, &restore, sub.clone());
            let since = restore.since.clone().filter(|_| restore.trusted);
            let watcher = restore.presence.then(|| sio::watcher(peer));
            if let Err(e) =
                sio::attach(s, node, &restore.topic, sub, since, announce, watcher).await
            {
                sio::emit_error(&**peer, Some(&restore.topic), &e);
                self.leave(&restore.topic).await;
            }
        }
        for topic in plan.revoked {
            peer.emit(
                "unsubscribed",
                &json!({"topic": &*topic, "reason": "permission revoked"}),
            );
        }
        let limit = node.config().max_subscriptions;
        for topic in plan.over_limit {
            crate::limits::refused(
                crate::limits::Limit::SubscriptionsPerConnection,
                "a recovered Socket.IO session held more than WEBSOCKET_MAX_SUBSCRIPTIONS topics",
            );
            let refusal = sio::Refusal::new(
                "subscription_limit",
                format!("subscription limit of {limit} topics per connection reached"),
            );
            sio::emit_error(&**peer, Some(&topic), &refusal);
        }
    }

    /// The announcement of a restored subscription: what could not be
    /// replayed becomes a `gap` event, before anything live.
    fn restored(
        self: &Arc<Self>,
        slot: usize,
        restore: &Restore,
        sub: Arc<CsrSubscriber>,
    ) -> Announce {
        let me = self.clone();
        let topic = restore.topic.clone();
        let since = restore.since.clone();
        let lost_anyway = !restore.trusted;
        Box::new(move |o: &Outcome| {
            let (Some(p), Some(since)) = (&o.position, since) else {
                return;
            };
            if !(lost_anyway || o.recovered == Some(false)) {
                return;
            }
            // A record written before the topic's first publication names
            // a pending epoch: the first epoch continues it.
            let same = *p.epoch == *since.epoch
                || crate::history::continues_into(&since.epoch, &p.epoch, 0, me.registry.inner.ttl);
            match GapRange::missed(&since.epoch, since.offset, &p.epoch, p.offset, same) {
                Some(gap) => {
                    sub.gap(&topic, &gap);
                }
                None => me.restart(slot, p),
            }
        })
    }

    /// The socket's subscribe asked for `presence_diff` events on `topic`,
    /// or for none: the record follows, so that a recovery brings the
    /// watcher back as it was.
    pub async fn watch(self: &Arc<Self>, topic: &str, presence: bool) {
        let changed = {
            let mut l = self.ledger.lock().unwrap();
            let mut changed = false;
            for s in l.slots.iter_mut().flatten() {
                if *s.topic == *topic && s.presence != presence {
                    s.presence = presence;
                    changed = true;
                }
            }
            changed
        };
        if changed && let Err(e) = self.write(false).await {
            tracing::debug!(cause = %e, topic, "a session record's presence flag not written");
        }
    }

    /// Before a new subscription reaches the hub: its slot, stored in the
    /// record, and the subscriber that keeps its position. A history topic
    /// is subscribed from the position the record names (the client's
    /// `since`, else the topic's top read now), so the record's start and
    /// what the socket receives agree exactly.
    #[allow(clippy::too_many_arguments)]
    pub async fn prepare(
        self: &Arc<Self>,
        node: &Node,
        topic: &str,
        positions: bool,
        since: Option<Since>,
        announce: Announce,
        by_identity: bool,
        presence: bool,
    ) -> Result<(Arc<dyn Subscriber>, Option<Since>, Announce), sio::Refusal> {
        let hub = node.hub();
        // Subscribed twice at once (a client's subscribe and the back end's):
        // one slot, from where the record says it starts.
        if let Some((slot, since)) = self.ledger.lock().unwrap().find(topic) {
            let subscriber: Arc<dyn Subscriber> = self.subscriber(Some(slot), positions);
            return Ok((subscriber, since, announce));
        }
        let history = hub.is_history(topic);
        let refused = |e: &dyn std::fmt::Display| {
            sio::Refusal::new(
                "unavailable",
                format!("could not subscribe to \"{topic}\": {e}"),
            )
        };
        let (since, implicit) = match (history, since) {
            (false, _) => (None, false),
            (true, Some(since)) => (Some(since), false),
            (true, None) => {
                let top = hub
                    .history()
                    .read(topic, 0, 0)
                    .await
                    .map_err(|e| refused(&e))?;
                let since = Since {
                    offset: top.top,
                    epoch: top.epoch.to_string(),
                };
                (Some(since), true)
            }
        };
        let slot = {
            let mut l = self.ledger.lock().unwrap();
            // The other one may have taken its slot while this one read
            // the top: one slot still, from where that one starts.
            if let Some((slot, since)) = l.find(topic) {
                drop(l);
                let subscriber: Arc<dyn Subscriber> = self.subscriber(Some(slot), positions);
                return Ok((subscriber, since, announce));
            }
            l.alloc(Slot {
                topic: topic.into(),
                history,
                positions,
                epoch: since.as_ref().map_or("", |s| s.epoch.as_str()).into(),
                base: since.as_ref().map_or(0, |s| s.offset),
                assigned: PENDING,
                offset: None,
                by_identity,
                presence,
            })
        };
        if let Err(e) = self.write(false).await {
            // Refused: the slot goes, or a retry would find it "existing"
            // and subscribe from its start, and a recovery would restore a
            // topic the client was told it could not have.
            if let Some(s) = self.ledger.lock().unwrap().slots.get_mut(slot) {
                *s = None;
            }
            return Err(refused(&e));
        }
        let me = self.clone();
        let start = since.clone();
        let announce: Announce = Box::new(move |o: &Outcome| {
            let mut o = o.clone();
            if o.recovered == Some(false)
                && let Some(p) = &o.position
            {
                // Not from the record's start (history moved meanwhile):
                // from the topic's top, as the ack says.
                me.restart(slot, p);
            }
            if implicit {
                // The client asked for no position: it starts where the
                // record does, and everything after follows.
                if o.recovered == Some(true)
                    && let (Some(p), Some(start)) = (&mut o.position, &start)
                {
                    p.offset = start.offset;
                }
                o.recovered = None;
            }
            announce(&o)
        });
        let subscriber: Arc<dyn Subscriber> = self.subscriber(Some(slot), positions);
        Ok((subscriber, since, announce))
    }

    /// The socket left `topic`: its slot is freed in the record.
    pub async fn leave(&self, topic: &str) {
        let freed = {
            let mut l = self.ledger.lock().unwrap();
            match l
                .slots
                .iter()
                .position(|s| s.as_ref().is_some_and(|s| *s.topic == *topic))
            {
                Some(i) => {
                    l.slots[i] = None;
                    true
                }
                None => false,
            }
        };
        if freed && let Err(e) = self.write(false).await {
            tracing::warn!(topic, cause = %e, "could not record an unsubscribe");
        }
    }

    /// Slot `slot` starts again at `position` (stored later).
    fn restart(self: &Arc<Self>, slot: usize, position: &Position) {
        {
            let mut l = self.ledger.lock().unwrap();
            let Some(Some(s)) = l.slots.get_mut(slot) else {
                return;
            };
            s.epoch = position.epoch.clone();
            s.base = position.offset;
            s.offset = None;
            s.assigned = PENDING;
        }
        self.write_later();
    }

    /// Writes the ledger as the next revision; tokens name it once stored.
    /// `take`: in any case (a recovery takes the session over).
    async fn write(&self, take: bool) -> Result<(), String> {
        let _order = self.writes.lock().await;
        let (rev, record) = {
            let mut l = self.ledger.lock().unwrap();
            let rev = l.written + 1;
            for s in l.slots.iter_mut().flatten() {
                if s.assigned == PENDING {
                    s.assigned = rev;
                }
            }
            l.written = rev;
            let record = l.record(rev, &self.owner, &self.user);
            (
                rev,
                serde_json::to_string(&record).expect("records serialize"),
            )
        };
        let ttl = self.registry.record_ttl();
        let stored = self
            .registry
            .inner
            .store
            .put(&self.pid, &self.owner, record, ttl, take)
            .await;
        match stored {
            Ok(true) => {
                let mut l = self.ledger.lock().unwrap();
                l.rev = l.rev.max(rev);
                Ok(())
            }
            Ok(false) => {
                metrics::counter!(m::SOCKETIO_RECOVERY_WRITE_ERRORS).increment(1);
                Err("the session was taken over by a newer connection".into())
            }
            Err(e) => {
                metrics::counter!(m::SOCKETIO_RECOVERY_WRITE_ERRORS).increment(1);
                Err(e.to_string())
            }
        }
    }

    /// [`Recovery::write`] from where nothing may wait (a delivery): in a
    /// task, retried a few times. Until it is stored, tokens leave the
    /// changed slot out, which a recovery reads as "from the slot's start".
    fn write_later(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            for attempt in 0..4u32 {
                match me.write(false).await {
                    Ok(()) => return,
                    Err(e) if attempt == 3 => {
                        tracing::warn!(cause = %e, "could not store a Socket.IO session record")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(250 << attempt)).await,
                }
            }
        });
    }

    /// A hub subscriber for this socket (of slot `slot`, or of no slot:
    /// topic `device`, or a subscription made without one).
    pub fn subscriber(
        self: &Arc<Self>,
        slot: Option<usize>,
        positions: bool,
    ) -> Arc<CsrSubscriber> {
        Arc::new(CsrSubscriber {
            recovery: self.clone(),
            slot,
            positions,
        })
    }

    /// Queues event `event` with one string argument, followed by the
    /// token: the client keeps the last string argument of any event.
    pub fn emit_string(&self, event: &str, data: &Value) -> Delivery {
        let open = event_open(event, data);
        let l = self.ledger.lock().unwrap();
        self.outbox.push(with_token(&open, &l.token()))
    }

    /// The socket is gone. `keep`: it may come back (transport closed,
    /// heartbeat, slow consumer, node shutdown), so the record stays
    /// `HISTORY_TTL_MS`; else (a namespace disconnect by the client or the
    /// server) the session is over and its record is deleted.
    pub async fn end(&self, keep: bool) {
        {
            let mut live = self.registry.inner.live.lock().unwrap();
            if let Some(n) = live.get_mut(&self.pid) {
                *n -= 1;
                if *n == 0 {
                    live.remove(&self.pid);
                }
            }
        }
        let store = &self.registry.inner.store;
        let done = if keep {
            store
                .touch(std::slice::from_ref(&self.pid), self.registry.inner.ttl)
                .await
        } else {
            store.delete(&self.pid, &self.owner).await
        };
        if let Err(e) = done {
            tracing::debug!(cause = %e, "could not update a Socket.IO session record at its end");
        }
    }
}

// === delivering ===

/// One socket with recovery as a hub subscriber of one topic: history
/// publications and gaps end with the session's token.
pub struct CsrSubscriber {
    recovery: Arc<Recovery>,
    slot: Option<usize>,
    positions: bool,
}

impl Subscriber for CsrSubscriber {
    fn deliver(&self, p: &Publication) -> Delivery {
        let r = &self.recovery;
        // The client keeps the last string argument of any event as its
        // offset: data that is a string, or a drop-in emit's arguments
        // (`spread`, whose last one may be), must be followed by the token.
        if p.offset.is_none() && !p.spread && !p.data.get().starts_with('"') {
            // Nothing to record and no string to mistake for a token: the
            // one frame every such socket shares.
            return r.outbox.push(p.socketio_frame(self.positions).clone());
        }
        let open = p.socketio_open_frame(self.positions);
        let mut l = r.ledger.lock().unwrap();
        let moved = match (self.slot, p.offset, &p.epoch) {
            (Some(i), Some(offset), Some(epoch)) => l.delivered(i, epoch, offset),
            _ => false,
        };
        let delivery = r.outbox.push(with_token(open, &l.token()));
        drop(l);
        if moved {
            r.write_later();
        }
        delivery
    }

    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery {
        let r = &self.recovery;
        let mut body =
            json!({"topic": topic, "from": gap.from, "to": gap.to, "epoch": &*gap.epoch});
        if let Some(previous) = &gap.previous_epoch {
            body["previousEpoch"] = json!(&**previous);
        }
        let open = event_open("gap", &body);
        let mut l = r.ledger.lock().unwrap();
        let moved = self.slot.is_some_and(|i| l.gapped(i, gap));
        let delivery = r.outbox.push(with_token(&open, &l.token()));
        drop(l);
        if moved {
            r.write_later();
        }
        delivery
    }

    fn transport(&self) -> &'static str {
        m::transport::SOCKETIO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(topic: &str, epoch: &str, base: u64, assigned: u64) -> Slot {
        Slot {
            topic: topic.into(),
            history: true,
            positions: false,
            epoch: epoch.into(),
            base,
            assigned,
            offset: None,
            by_identity: false,
            presence: false,
        }
    }

    #[test]
    fn tokens_are_short_and_read_back() {
        assert_eq!(encode(0, std::iter::empty()), "0");
        assert_eq!(
            encode(7, [Some(57), None, Some(1200)].into_iter()),
            "7.1l..xc"
        );
        assert_eq!(encode(7, [None, None].into_iter()), "7");
        assert_eq!(
            decode("7.1l..xc"),
            Some((7, vec![Some(57), None, Some(1200)]))
        );
        assert_eq!(decode("3w5e11264sgsf"), Some((u64::MAX, vec![])));
        assert_eq!(decode("x."), Some((33, vec![None])));
        for bad in ["", "7.A", "7.-1", "3w5e11264sgsg", "7. 1", ".1"] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_positions_survive_the_token(rev in any::<u64>(), values in proptest::collection::vec(proptest::option::of(any::<u64>()), 0..40)) {
            let (r, mut back) = decode(&encode(rev, values.iter().copied())).unwrap();
            prop_assert_eq!(r, rev);
            back.resize(values.len(), None);
            prop_assert_eq!(back, values);
        }

        #[test]
        fn tokens_of_any_client_input_never_panic(s in "\\PC{0,64}") {
            let _ = decode(&s);
        }
    }

    #[test]
    fn a_token_names_only_stored_slots() {
        let mut l = Ledger {
            rev: 2,
            written: 2,
            ..Ledger::default()
        };
        let a = l.alloc(slot("a", "e", 10, 1));
        let b = l.alloc(slot("b", "e", 0, PENDING));
        assert!(!l.delivered(a, &"e".into(), 11));
        assert!(!l.delivered(b, &"e".into(), 1));
        assert_eq!(l.token(), "2.b", "b is not stored yet");
        l.slots[b].as_mut().unwrap().assigned = 3;
        l.rev = 3;
        assert_eq!(l.token(), "3.b.1");
        // A freed slot is reused; its old value is not carried over.
        l.slots[a] = None;
        assert_eq!(l.token(), "3..1");
        assert_eq!(l.alloc(slot("c", "e", 4, PENDING)), a);
    }

    #[test]
    fn an_epoch_change_reassigns_the_slot_from_the_start_of_the_loss() {
        let mut l = Ledger {
            rev: 1,
            written: 1,
            ..Ledger::default()
        };
        let a = l.alloc(slot("a", "old", 0, 1));
        l.delivered(a, &"old".into(), 5);
        let same = GapRange {
            from: 6,
            to: 9,
            epoch: "old".into(),
            previous_epoch: None,
        };
        assert!(!l.gapped(a, &same));
        assert_eq!(l.token(), "1.9");
        let reset = GapRange {
            from: 1,
            to: 2,
            epoch: "new".into(),
            previous_epoch: Some("old".into()),
        };
        assert!(l.gapped(a, &reset));
        let s = l.slots[a].as_ref().unwrap();
        assert_eq!(
            (&*s.epoch, s.base, s.offset, s.assigned),
            ("new", 0, Some(2), PENDING)
        );
        assert_eq!(l.token(), "1", "left out until stored");
    }
}

#[cfg(test)]
mod delivery_tests {
    use super::*;
    use serde_json::value::RawValue;
    use std::collections::VecDeque;

    fn socket(registry: &Registry) -> Arc<Recovery> {
        let config = crate::config::Config::from_source(&HashMap::new()).unwrap();
        let outbox = Arc::new(Outbox::new(&config, m::transport::SOCKETIO));
        Recovery::new(registry, new_pid(), "", outbox)
    }

    fn publication(data: &str, offset: Option<u64>) -> Publication {
        let data: Arc<RawValue> = Arc::from(RawValue::from_string(data.into()).unwrap());
        let mut p = Publication::new("t".into(), "t".into(), data, Instant::now());
        p.offset = offset;
        p.epoch = offset.map(|_| "e".into());
        p
    }

    fn frames(r: &Recovery) -> Vec<String> {
        let mut batch = VecDeque::new();
        r.outbox.take(&mut batch);
        batch.iter().map(|f| f.to_string()).collect()
    }

    #[tokio::test]
    async fn sockets_with_recovery_share_the_serialized_frame_and_add_only_their_token() {
        let registry = Registry::start(
            Arc::new(MemoryStore::default()),
            Duration::from_secs(60),
            CancellationToken::new(),
        );
        let (a, b) = (socket(&registry), socket(&registry));
        // a: one topic before `t`; b: `t` only.
        a.ledger.lock().unwrap().alloc(slot_at("other", 1));
        let sa = a.ledger.lock().unwrap().alloc(slot_at("t", 1));
        let sb = b.ledger.lock().unwrap().alloc(slot_at("t", 1));
        for r in [&a, &b] {
            r.write(false).await.unwrap();
        }
        let p = publication(r#"{"n":1}"#, Some(5));
        a.subscriber(Some(sa), false).deliver(&p);
        b.subscriber(Some(sb), false).deliver(&p);
        assert_eq!(frames(&a), [r#"42["t",{"n":1},"1..5"]"#]);
        assert_eq!(frames(&b), [r#"42["t",{"n":1},"1.5"]"#]);
        // Serialized once: both frames were copied from this one string.
        let open = p.socketio_open_frame(false);
        assert_eq!(open, r#"42["t",{"n":1}"#);
        assert_eq!(open.as_ptr(), p.socketio_open_frame(false).as_ptr());
        // Without an offset and with data that is not a string: the one
        // frame of every socket, nothing appended.
        let plain = publication(r#"{"n":2}"#, None);
        a.subscriber(None, false).deliver(&plain);
        b.subscriber(None, false).deliver(&plain);
        let mut fa = VecDeque::new();
        let mut fb = VecDeque::new();
        a.outbox.take(&mut fa);
        b.outbox.take(&mut fb);
        assert_eq!(fa[0].as_str(), r#"42["t",{"n":2}]"#);
        assert_eq!(fa[0].as_str().as_ptr(), fb[0].as_str().as_ptr());
        // A string as last argument would become the client's offset: the
        // token follows it.
        a.subscriber(None, false)
            .deliver(&publication(r#""hi""#, None));
        assert_eq!(frames(&a), [r#"42["t","hi","1..5"]"#]);
    }

    fn slot_at(topic: &str, assigned: u64) -> Slot {
        Slot {
            topic: topic.into(),
            history: true,
            positions: false,
            epoch: "e".into(),
            base: 0,
            assigned,
            offset: None,
            by_identity: false,
            presence: false,
        }
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;

    /// Sockets that never come back must not leave their records in an
    /// embedded node's memory for good.
    #[tokio::test]
    async fn expired_records_are_swept_by_later_writes() {
        let store = MemoryStore::default();
        for i in 0..10_000 {
            let pid = format!("p{i}");
            assert!(
                store
                    .put(&pid, "o", "{}".into(), Duration::ZERO, false)
                    .await
                    .unwrap()
            );
        }
        let held = store.records.lock().unwrap().map.len();
        assert!(held <= 1024, "{held} expired records held");
        // A live one is read back; an expired one is not.
        store
            .put(
                "live",
                "o",
                "{\"a\":1}".into(),
                Duration::from_secs(60),
                false,
            )
            .await
            .unwrap();
        assert_eq!(
            store.get("live").await.unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(store.get("p9999").await.unwrap(), None);
    }
}
