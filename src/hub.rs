//! The hub: topic → local subscribers, and the one fan-out of this node.
//!
//! A publication arrives from the backplane as [`Inbound`], is parsed once
//! into a [`Publication`], and every local subscriber of its topic gets the
//! same pre-serialized frame (a refcount bump, not a copy) on its own bounded
//! queue. A subscriber whose queue is full applies the slow-consumer policy
//! itself (it closes); the fan-out never waits for anyone.
//!
//! A topic's subscribers are split into slices by connection id, one slice
//! per tokio worker thread, and each slice is fanned out by a task of its
//! own, so a big topic is queued to its subscribers by every core at once.
//! A connection belongs to one slice for good and each slice takes the
//! dispatcher's items in order, so every connection still sees its topics'
//! publications in the order the dispatcher handled them.
//!
//! The hub subscribes to a topic on the backplane when the topic gets its
//! first local subscriber and unsubscribes after its last one leaves.
//!
//! History topics add order and repair. One dispatcher task handles every
//! publication and every ordering-sensitive step in sequence: it keeps the
//! node's last delivered offset per topic ([`Sequence`]), fills a hole from
//! history before the publication that revealed it (or announces it as a
//! gap when history no longer has it), and opens a new subscriber's gate:
//! a subscriber of a history topic receives nothing until its `subscribed`
//! answer and any replay have been queued, then what was held meanwhile,
//! through its [`Seam`] (no duplicate, nothing out of order).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backplane::{Backplane, BackplaneError, Inbound};
use crate::config::HistoryConfig;
use crate::history::{
    self, GapRange, History, HistoryError, Position, Range, Seam, Sequence, Stored, Verdict,
};
use crate::metrics as m;
use crate::protocol::{self, Since};

/// Identifies one connection on this node.
pub type ConnId = u64;

/// The id of the node's own subscribers (the device cache): not counted as
/// client subscriptions. Client ids come from [`new_conn_id`], never 0.
pub const INTERNAL: ConnId = 0;

/// A random connection id, never [`INTERNAL`].
pub fn new_conn_id() -> ConnId {
    rand::random::<u64>().max(1)
}

/// How long a topic stays subscribed on the backplane after its last local
/// subscriber left.
const UNSUBSCRIBE_LINGER: Duration = Duration::from_secs(1);

/// How many topics keep their last publication for `request`.
const LAST_PUBLICATIONS: usize = 10_000;

/// Publications of a history topic held while its first subscriber's gate
/// opens (a Redis round trip); past this the oldest are dropped and repaired
/// from history like any other hole.
const PENDING_LIMIT: usize = 65_536;

/// How long a consistency check waits between reading a topic's top and
/// comparing it with what was delivered, so that publications still in
/// flight on the pub/sub connection are not taken for lost ones.
const CHECK_SETTLE: Duration = Duration::from_millis(500);

/// Outcome of handing a publication to one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The queue was full: the subscriber is being closed (slow consumer).
    Overflow,
    /// The subscriber is already gone.
    Closed,
}

/// Something that receives publications: a native connection, a Socket.IO
/// socket. `deliver` and `gap` must not block: they queue or apply the
/// slow-consumer policy and return.
pub trait Subscriber: Send + Sync {
    fn deliver(&self, publication: &Publication) -> Delivery;
    /// Publications `gap.from..=gap.to` of a history topic are lost.
    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery;
    /// The `transport` label of this subscriber's deliveries.
    fn transport(&self) -> &'static str;
}

/// One publication as every local subscriber sees it.
pub struct Publication {
    pub topic: Arc<str>,
    pub event: Arc<str>,
    pub data: Arc<RawValue>,
    pub received_at: Instant,
    /// Fencing epoch, on device state published by the leader.
    pub fence: Option<u64>,
    /// History topics: the publication's offset …
    pub offset: Option<u64>,
    /// … in this epoch of the topic's history.
    pub epoch: Option<Arc<str>>,
    timestamp: String,
    native: OnceLock<Utf8Bytes>,
    /// The Socket.IO frames (`42[…]`), without and with the position
    /// argument, for sockets of our own websocket transport.
    socketio: [OnceLock<Utf8Bytes>; 2],
}

impl Publication {
    pub fn new(
        topic: Arc<str>,
        event: Arc<str>,
        data: Arc<RawValue>,
        received_at: Instant,
    ) -> Self {
        Self {
            topic,
            event,
            data,
            received_at,
            fence: None,
            offset: None,
            epoch: None,
            timestamp: protocol::timestamp(),
            native: OnceLock::new(),
            socketio: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// A publication from a parsed envelope; the event defaults to the topic.
    fn from_envelope(topic: Arc<str>, env: protocol::ParsedEnvelope, received_at: Instant) -> Self {
        let event: Arc<str> = match env.event {
            Some(e) if *e != *topic => Arc::from(e),
            _ => topic.clone(),
        };
        let mut p = Publication::new(topic, event, env.data, received_at);
        p.fence = env.fence;
        if let Some((offset, epoch)) = env.position {
            p.offset = Some(offset);
            p.epoch = Some(Arc::from(epoch));
        }
        p
    }

    /// The Socket.IO EVENT in an Engine.IO MESSAGE, `42["event",data]`
    /// (with `positions` and an offset: `42["event",data,{"topic","offset"}]`),
    /// serialized on first use and then shared by every such socket.
    pub fn socketio_frame(&self, positions: bool) -> &Utf8Bytes {
        let with = positions && self.offset.is_some();
        self.socketio[usize::from(with)].get_or_init(|| {
            let mut frame = String::with_capacity(self.data.get().len() + self.event.len() + 48);
            frame.push_str("42[");
            frame.push_str(&serde_json::to_string(&*self.event).expect("strings serialize"));
            frame.push(',');
            frame.push_str(self.data.get());
            if let (true, Some(offset)) = (with, self.offset) {
                frame.push_str(",{\"topic\":");
                frame.push_str(&serde_json::to_string(&*self.topic).expect("strings serialize"));
                frame.push_str(&format!(",\"offset\":{offset}}}"));
            }
            frame.push(']');
            frame.into()
        })
    }

    /// The native-protocol `event` frame, serialized on first use and then
    /// shared by every native subscriber.
    pub fn native_frame(&self) -> &Utf8Bytes {
        self.native.get_or_init(|| {
            protocol::event_frame(
                &self.topic,
                &self.event,
                &self.data,
                self.offset,
                &self.timestamp,
            )
            .into()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("could not subscribe on the backplane: {0}")]
    Backplane(#[from] BackplaneError),
    #[error("could not read the topic's history: {0}")]
    History(#[from] HistoryError),
}

/// Why a publication was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Unavailable(String),
    /// Refused by the history function (bad envelope); the text says why.
    #[error("{0}")]
    Refused(String),
}

/// Whether a subscribe call added a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    New,
    Already,
}

/// What a new subscriber is told before anything else on its topic.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// History topics: the topic's top offset and epoch when it subscribed.
    pub position: Option<Position>,
    /// When it asked for `since`: whether everything it missed follows.
    pub recovered: Option<bool>,
}

/// Called once, before any publication of the topic reaches the new
/// subscriber: the place to queue its `subscribed` answer.
pub type Announce = Box<dyn FnOnce(&Outcome) + Send>;

/// Cheap-to-clone handle to the hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// One local subscriber of a topic. `gate` is set on history topics.
struct Member {
    sub: Arc<dyn Subscriber>,
    gate: Option<Arc<Gate>>,
}

/// A topic's local subscribers, split into the hub's fan-out slices by
/// connection id (see the module docs).
struct Members {
    slices: Box<[HashMap<ConnId, Member>]>,
}

impl Members {
    fn new(slices: usize) -> Self {
        Self {
            slices: (0..slices.max(1)).map(|_| HashMap::new()).collect(),
        }
    }

    fn slice(&self, id: ConnId) -> usize {
        (id % self.slices.len() as u64) as usize
    }

    fn get(&self, id: ConnId) -> Option<&Member> {
        self.slices[self.slice(id)].get(&id)
    }

    fn contains(&self, id: ConnId) -> bool {
        self.get(id).is_some()
    }

    fn insert(&mut self, id: ConnId, member: Member) {
        let i = self.slice(id);
        self.slices[i].insert(id, member);
    }

    fn remove(&mut self, id: ConnId) -> Option<Member> {
        let i = self.slice(id);
        self.slices[i].remove(&id)
    }

    fn is_empty(&self) -> bool {
        self.slices.iter().all(HashMap::is_empty)
    }

    /// Subscribers that are client connections (the node's own excluded).
    fn clients(&self) -> usize {
        self.slices.iter().map(HashMap::len).sum::<usize>() - usize::from(self.contains(INTERNAL))
    }
}

/// Told when a topic's local client subscribers go from none to some or
/// back (webhooks' occupancy). Called under the topic's lock, so it must
/// not block; it reads [`Hub::has_clients`] for the state.
pub type Observer = Arc<dyn Fn(&str) + Send + Sync>;

/// One item on its way through the slices; the last slice done with it
/// records the fan-out latency.
struct Work {
    item: Item,
    left: AtomicUsize,
}

/// Items a slice task may have queued before the dispatcher waits for it.
const SLICE_QUEUE: usize = 1024;

/// How a hub fans out.
#[derive(Debug, Clone, Copy)]
pub struct Fanout {
    /// Parallel slices, each served by a task of its own.
    pub slices: usize,
    /// `WEBSOCKET_FLUSH_INTERVAL_MS`: a slice hands publications to its
    /// subscribers at most once per interval, so that a busy topic's
    /// connections get several frames per wake-up and per write. The first
    /// publication after a quiet interval goes at once; zero: every
    /// publication goes at once.
    pub flush_interval: Duration,
}

impl Fanout {
    /// One slice per worker thread of the current tokio runtime
    /// (`TOKIO_WORKER_THREADS`; one outside a runtime).
    pub fn per_worker(flush_interval: Duration) -> Self {
        let slices = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .unwrap_or(1);
        Self {
            slices,
            flush_interval,
        }
    }

    /// Whether the dispatcher can fan out itself: one slice, no batching.
    fn inline(&self) -> bool {
        self.slices <= 1 && self.flush_interval.is_zero()
    }
}

/// Holds a history subscriber's publications until its `subscribed` answer
/// and replay are queued, then filters through its seam. Only the dispatcher
/// task touches it (fan-out and opening), so the lock is never contended.
struct Gate {
    state: Mutex<GateState>,
}

enum GateState {
    Closed(Vec<Item>),
    Open(Seam),
}

/// What the fan-out hands to subscribers.
#[derive(Clone)]
enum Item {
    Pub(Arc<Publication>),
    Gap(Arc<str>, Arc<GapRange>),
}

impl Item {
    fn topic(&self) -> &Arc<str> {
        match self {
            Item::Pub(p) => &p.topic,
            Item::Gap(t, _) => t,
        }
    }
}

struct Inner {
    backplane: Arc<dyn Backplane>,
    history: Arc<dyn History>,
    history_config: HistoryConfig,
    /// std RwLock: never held across `.await`. Fan-out holds the read side
    /// while it queues (non-blocking) to each subscriber.
    topics: RwLock<HashMap<Arc<str>, Members>>,
    /// Striped async locks, one stripe per topic hash: they order the hub
    /// entry change and the backplane (un)subscribe of one topic, so a
    /// last-leave UNSUBSCRIBE can never overtake a first-join SUBSCRIBE.
    /// Only subscribe/unsubscribe take them, never the fan-out.
    topic_locks: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    /// Last publication per topic, for `request`. std Mutex, no `.await`.
    last: Mutex<HashMap<Arc<str>, LastPublication>>,
    subscriptions: AtomicUsize,
    delivered: AtomicU64,
    invalid: InvalidLog,
    fanout: Fanout,
    /// Steps that must run in order with the publications, on the dispatcher.
    control: mpsc::Sender<Control>,
    control_rx: Mutex<Option<mpsc::Receiver<Control>>>,
    observer: OnceLock<Observer>,
}

/// Work for the dispatcher besides publications.
enum Control {
    /// Opens member `id`'s gate on `topic` with what its history read found.
    Open {
        topic: Arc<str>,
        id: ConnId,
        range: Range,
        since: Option<Since>,
        announce: Announce,
        done: oneshot::Sender<Option<bool>>,
    },
    /// Compares the topic's delivered offset with a top read a moment ago.
    Check { topic: Arc<str>, range: Range },
    /// The topic left the hub: forget its sequence.
    Release { topic: Arc<str> },
}

/// The last publication seen on a topic.
#[derive(Clone)]
pub struct LastPublication {
    pub event: Arc<str>,
    pub data: Arc<RawValue>,
}

impl Hub {
    pub fn new(
        backplane: Arc<dyn Backplane>,
        history: Arc<dyn History>,
        history_config: HistoryConfig,
        fanout: Fanout,
    ) -> Self {
        let topic_locks = (0..64).map(|_| tokio::sync::Mutex::new(())).collect();
        let (control, control_rx) = mpsc::channel(4096);
        Self {
            inner: Arc::new(Inner {
                backplane,
                history,
                history_config,
                topics: RwLock::new(HashMap::new()),
                topic_locks,
                hasher: RandomState::new(),
                last: Mutex::new(HashMap::new()),
                subscriptions: AtomicUsize::new(0),
                delivered: AtomicU64::new(0),
                invalid: InvalidLog::default(),
                fanout: Fanout {
                    slices: fanout.slices.max(1),
                    ..fanout
                },
                control,
                control_rx: Mutex::new(Some(control_rx)),
                observer: OnceLock::new(),
            }),
        }
    }

    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.inner.backplane
    }

    pub fn history(&self) -> &Arc<dyn History> {
        &self.inner.history
    }

    /// Whether `topic` keeps a history (`HISTORY_TOPICS`).
    pub fn is_history(&self, topic: &str) -> bool {
        self.inner.history_config.covers(topic)
    }

    /// `HISTORY_SIZE`: the most a read of one topic can return.
    pub fn history_size(&self) -> usize {
        self.inner.history_config.size
    }

    /// Sets the observer of client occupancy (once).
    pub fn set_observer(&self, observer: Observer) {
        let _ = self.inner.observer.set(observer);
    }

    /// Whether `topic` has local client subscribers.
    pub fn has_clients(&self, topic: &str) -> bool {
        self.inner
            .topics
            .read()
            .unwrap()
            .get(topic)
            .is_some_and(|subs| subs.clients() > 0)
    }

    /// Tells the observer when `topic` just got its first or lost its last
    /// client subscriber (`clients`: the count after `id` was added or removed).
    fn observe(&self, topic: &str, id: ConnId, clients: usize, added: bool) {
        if id != INTERNAL
            && clients == usize::from(added)
            && let Some(observer) = self.inner.observer.get()
        {
            observer(topic);
        }
    }

    fn topic_lock(&self, topic: &str) -> &tokio::sync::Mutex<()> {
        let i = self.inner.hasher.hash_one(topic) as usize % self.inner.topic_locks.len();
        &self.inner.topic_locks[i]
    }

    /// Adds `subscriber` to `topic`. `announce` runs before any publication
    /// of the topic reaches it. On a history topic, `since` asks for what it
    /// missed; the call returns once that replay is queued. On a backplane
    /// or history error nothing is left behind.
    pub async fn subscribe(
        &self,
        topic: &str,
        id: ConnId,
        subscriber: Arc<dyn Subscriber>,
        since: Option<Since>,
        announce: Announce,
    ) -> Result<Subscribed, HubError> {
        let history = self.is_history(topic);
        let first = {
            let _guard = self.topic_lock(topic).lock().await;
            let first = {
                let mut topics = self.inner.topics.write().unwrap();
                let member = Member {
                    sub: subscriber,
                    gate: history.then(|| {
                        Arc::new(Gate {
                            state: Mutex::new(GateState::Closed(Vec::new())),
                        })
                    }),
                };
                match topics.get_mut(topic) {
                    Some(subs) if subs.contains(id) => None,
                    Some(subs) => {
                        subs.insert(id, member);
                        self.observe(topic, id, subs.clients(), true);
                        Some(false)
                    }
                    None => {
                        let mut subs = Members::new(self.inner.fanout.slices);
                        subs.insert(id, member);
                        self.observe(topic, id, subs.clients(), true);
                        topics.insert(Arc::from(topic), subs);
                        Some(true)
                    }
                }
            };
            let Some(first) = first else {
                drop(_guard);
                let position = match history {
                    true => Some(self.inner.history.read(topic, 0, 0).await?.position()),
                    false => None,
                };
                announce(&Outcome {
                    position,
                    recovered: None,
                });
                return Ok(Subscribed::Already);
            };
            if first && let Err(e) = self.inner.backplane.subscribe(topic).await {
                metrics::counter!(m::BACKPLANE_ERRORS, "op" => "subscribe").increment(1);
                let mut topics = self.inner.topics.write().unwrap();
                if let Some(subs) = topics.get_mut(topic) {
                    subs.remove(id);
                    self.observe(topic, id, subs.clients(), false);
                    if subs.is_empty() {
                        topics.remove(topic);
                    }
                }
                return Err(e.into());
            }
            first
        };
        let _ = first;
        if id != INTERNAL {
            self.inner.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        self.update_gauges();
        if !history {
            announce(&Outcome {
                position: None,
                recovered: None,
            });
            return Ok(Subscribed::New);
        }
        let read = match &since {
            Some(s) => {
                self.inner
                    .history
                    .read(topic, s.offset, self.history_size())
                    .await
            }
            None => self.inner.history.read(topic, 0, 0).await,
        };
        let range = match read {
            Ok(range) => range,
            Err(e) => {
                self.unsubscribe(topic, id).await;
                return Err(e.into());
            }
        };
        let (done, opened) = oneshot::channel();
        let open = Control::Open {
            topic: Arc::from(topic),
            id,
            range,
            since,
            announce,
            done,
        };
        if self.inner.control.send(open).await.is_err() {
            return Err(HubError::Backplane(BackplaneError::Closed));
        }
        let _ = opened.await;
        Ok(Subscribed::New)
    }

    /// Removes `id` from `topic`; returns whether it was subscribed.
    pub async fn unsubscribe(&self, topic: &str, id: ConnId) -> bool {
        let _guard = self.topic_lock(topic).lock().await;
        let (removed, now_empty) = {
            let mut topics = self.inner.topics.write().unwrap();
            let Some(subs) = topics.get_mut(topic) else {
                return false;
            };
            let removed = subs.remove(id).is_some();
            if removed {
                self.observe(topic, id, subs.clients(), false);
            }
            (removed, removed && subs.is_empty())
        };
        if removed && id != INTERNAL {
            self.inner.subscriptions.fetch_sub(1, Ordering::Relaxed);
            self.update_gauges();
        }
        if now_empty {
            // Keep the (empty) entry and the backplane subscription a moment:
            // a client that reconnects or re-subscribes at once causes no
            // UNSUBSCRIBE/SUBSCRIBE churn on Redis.
            let hub = self.clone();
            let topic = topic.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(UNSUBSCRIBE_LINGER).await;
                hub.release_if_empty(&topic).await;
            });
        }
        removed
    }

    /// Drops an empty topic and its backplane subscription.
    async fn release_if_empty(&self, topic: &str) {
        let _guard = self.topic_lock(topic).lock().await;
        {
            let mut topics = self.inner.topics.write().unwrap();
            match topics.get(topic) {
                Some(subs) if subs.is_empty() => {
                    topics.remove(topic);
                }
                _ => return,
            }
        }
        if self.is_history(topic) {
            // Sent under the topic lock: it reaches the dispatcher before the
            // gate of a later first subscriber.
            let _ = self
                .inner
                .control
                .send(Control::Release {
                    topic: Arc::from(topic),
                })
                .await;
        }
        self.update_gauges();
        if let Err(e) = self.inner.backplane.unsubscribe(topic).await {
            // Harmless: a stray subscription only brings messages nobody here wants.
            metrics::counter!(m::BACKPLANE_ERRORS, "op" => "unsubscribe").increment(1);
            tracing::warn!(topic, cause = %e, "backplane unsubscribe failed");
        }
    }

    fn update_gauges(&self) {
        metrics::gauge!(m::SUBSCRIPTIONS).set(self.subscription_count() as f64);
        metrics::gauge!(m::TOPICS).set(self.topic_count() as f64);
    }

    /// Topics with at least one local subscriber.
    pub fn topic_count(&self) -> usize {
        self.inner
            .topics
            .read()
            .unwrap()
            .values()
            .filter(|subs| !subs.is_empty())
            .count()
    }

    /// Client subscriptions (connection × topic), internal ones excluded.
    pub fn subscription_count(&self) -> usize {
        self.inner.subscriptions.load(Ordering::Relaxed)
    }

    /// Total publications queued to local subscribers since start.
    pub fn delivered(&self) -> u64 {
        self.inner.delivered.load(Ordering::Relaxed)
    }

    /// The last publication this node delivered on `topic`, if any.
    pub fn last(&self, topic: &str) -> Option<LastPublication> {
        self.inner.last.lock().unwrap().get(topic).cloned()
    }

    /// The newest publication of a history topic, from history (right on
    /// every node, subscribed or not).
    pub async fn latest(&self, topic: &str) -> Result<Option<Publication>, HistoryError> {
        let range = self.inner.history.latest(topic).await?;
        Ok(range
            .entries
            .into_iter()
            .next()
            .and_then(|s| stored_publication(topic, &s)))
    }

    /// Publishes through the backplane (never delivered locally by a
    /// shortcut); on a history topic through the history's atomic
    /// append-and-publish, and the publication's position is returned.
    pub async fn publish(
        &self,
        topic: &str,
        event: &str,
        data: &RawValue,
    ) -> Result<Option<Position>, PublishError> {
        self.publish_fenced(topic, event, data, None).await
    }

    /// Like [`Hub::publish`], with the leader's fencing epoch in the envelope.
    pub async fn publish_fenced(
        &self,
        topic: &str,
        event: &str,
        data: &RawValue,
        fence: Option<u64>,
    ) -> Result<Option<Position>, PublishError> {
        let payload = protocol::encode_envelope(event, data, fence);
        let res = if self.is_history(topic) {
            self.inner
                .history
                .publish(topic, payload)
                .await
                .map(Some)
                .map_err(|e| match e {
                    HistoryError::Refused(why) => PublishError::Refused(why),
                    other => PublishError::Unavailable(other.to_string()),
                })
        } else {
            self.inner
                .backplane
                .publish(topic, payload.into())
                .await
                .map(|()| None)
                .map_err(|e| PublishError::Unavailable(e.to_string()))
        };
        match &res {
            Ok(_) => metrics::counter!(m::BACKPLANE_PUBLISHES).increment(1),
            Err(_) => metrics::counter!(m::BACKPLANE_ERRORS, "op" => "publish").increment(1),
        }
        res
    }

    /// Hands `items` (in order) to the local subscribers of their topics in
    /// fan-out slice `slice`. Runs on that slice's task only (or on the
    /// dispatcher when it fans out itself), which is what keeps each
    /// connection in order. Consecutive items of one topic go to one
    /// subscriber after another, so each connection's writer finds them
    /// queued together.
    fn deliver_slice(&self, slice: usize, items: &[&Item]) {
        // Per-transport counts, summed here so the metric is touched once per
        // batch and slice, not once per delivery.
        let mut queued: [(&'static str, u64); 3] = [("", 0); 3];
        let mut rest = items;
        while let Some(first) = rest.first() {
            let topic = first.topic();
            let n = rest.iter().take_while(|i| i.topic() == topic).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let topics = self.inner.topics.read().unwrap();
            let Some(subs) = topics.get(topic) else {
                continue;
            };
            for member in subs.slices[slice].values() {
                for &item in group {
                    let delivery = match &member.gate {
                        None => hand(&*member.sub, item, None),
                        Some(gate) => {
                            let mut state = gate.state.lock().unwrap();
                            match &mut *state {
                                GateState::Closed(held) => {
                                    held.push(item.clone());
                                    continue;
                                }
                                GateState::Open(seam) => hand(&*member.sub, item, Some(seam)),
                            }
                        }
                    };
                    if delivery == Some(Delivery::Queued) && matches!(item, Item::Pub(_)) {
                        let t = member.sub.transport();
                        match queued
                            .iter_mut()
                            .find(|(name, _)| *name == t || name.is_empty())
                        {
                            Some(slot) => *slot = (t, slot.1 + 1),
                            None => queued[2].1 += 1,
                        }
                    }
                }
            }
        }
        for (transport, n) in queued {
            if n > 0 {
                self.inner.delivered.fetch_add(n, Ordering::Relaxed);
                metrics::counter!(m::DELIVERIES, "transport" => transport).increment(n);
            }
        }
    }

    /// Every slice has handed `item` out.
    fn fanned_out(&self, item: &Item) {
        if let Item::Pub(publication) = item {
            metrics::histogram!(m::FANOUT_SECONDS)
                .record(publication.received_at.elapsed().as_secs_f64());
        }
    }

    /// Keeps `publication` as its topic's last one, for `request`.
    fn remember(&self, publication: &Publication) {
        let mut last = self.inner.last.lock().unwrap();
        if last.len() >= LAST_PUBLICATIONS
            && !last.contains_key(&publication.topic)
            && let Some(k) = last.keys().next().cloned()
        {
            last.remove(&k);
        }
        last.insert(
            publication.topic.clone(),
            LastPublication {
                event: publication.event.clone(),
                data: publication.data.clone(),
            },
        );
    }

    /// Runs the dispatcher: every publication from the backplane's queue and
    /// every ordering-sensitive step, one at a time, until the queue closes.
    pub fn spawn_dispatcher(&self, rx: mpsc::Receiver<Inbound>) -> tokio::task::JoinHandle<()> {
        let control = self
            .inner
            .control_rx
            .lock()
            .unwrap()
            .take()
            .expect("one dispatcher per hub");
        let fanout = self.inner.fanout;
        let slices = match fanout.inline() {
            true => Vec::new(),
            false => (0..fanout.slices)
                .map(|slice| {
                    let (tx, rx) = mpsc::channel(SLICE_QUEUE);
                    tokio::spawn(self.clone().serve_slice(slice, rx));
                    tx
                })
                .collect(),
        };
        let dispatcher = Dispatcher {
            hub: self.clone(),
            slices,
            sequences: HashMap::new(),
            pending: HashMap::new(),
        };
        tokio::spawn(dispatcher.run(rx, control))
    }

    /// One fan-out slice: the dispatcher's items, in its order, to the
    /// slice's share of each topic, at most once per flush interval. Ends
    /// with the dispatcher.
    async fn serve_slice(self, slice: usize, mut rx: mpsc::Receiver<Arc<Work>>) {
        let interval = self.inner.fanout.flush_interval;
        let mut batch = Vec::with_capacity(64);
        let mut handed_at: Option<tokio::time::Instant> = None;
        while rx.recv_many(&mut batch, SLICE_QUEUE).await > 0 {
            if !interval.is_zero() {
                if let Some(due) = handed_at.map(|at| at + interval)
                    && tokio::time::Instant::now() < due
                {
                    tokio::time::sleep_until(due).await;
                    while batch.len() < SLICE_QUEUE
                        && let Ok(work) = rx.try_recv()
                    {
                        batch.push(work);
                    }
                }
                handed_at = Some(tokio::time::Instant::now());
            }
            let items: Vec<&Item> = batch.iter().map(|w| &w.item).collect();
            self.deliver_slice(slice, &items);
            drop(items);
            for work in batch.drain(..) {
                if work.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.fanned_out(&work.item);
                }
            }
        }
    }

    /// Keeps history topics honest: after every backplane reconnect, and every
    /// `HISTORY_TTL_MS / 3` (at most a minute), compares each subscribed
    /// history topic's top with what this node delivered and repairs the
    /// difference. The reads also keep the topics' epochs alive while they
    /// have subscribers.
    pub fn spawn_checker(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        let every = (self.inner.history_config.ttl / 3).min(Duration::from_secs(60));
        tokio::spawn(async move {
            let mut losses = hub.inner.backplane.losses();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = losses.changed() => {
                        if changed.is_err() { return; }
                        tracing::info!("backplane subscriptions restored: checking history topics for gaps");
                    }
                    _ = stop.cancelled() => return,
                }
                hub.check_all(&stop).await;
            }
        })
    }

    async fn check_all(&self, stop: &CancellationToken) {
        let mut pending: Vec<Arc<str>> = {
            let topics = self.inner.topics.read().unwrap();
            topics
                .keys()
                .filter(|t| self.is_history(t))
                .cloned()
                .collect()
        };
        // Right after a reconnect the command connection may still be on its
        // way back: retry what could not be read for a while.
        for attempt in 0..20 {
            if pending.is_empty() {
                return;
            }
            if attempt > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(CHECK_SETTLE) => {}
                    _ = stop.cancelled() => return,
                }
            }
            let mut reads = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            for topic in pending {
                match self.inner.history.read(&topic, 0, 0).await {
                    Ok(range) => reads.push((topic, range)),
                    Err(e) => {
                        tracing::debug!(%topic, cause = %e, "history check read failed");
                        failed.push(topic);
                    }
                }
            }
            pending = failed;
            tokio::select! {
                _ = tokio::time::sleep(CHECK_SETTLE) => {}
                _ = stop.cancelled() => return,
            }
            for (topic, range) in reads {
                if self
                    .inner
                    .control
                    .send(Control::Check { topic, range })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        tracing::warn!(
            topics = pending.len(),
            "history check: topics could not be read; next check later"
        );
    }

    /// The gate of member `id` of `topic`, with its subscriber.
    fn gated(&self, topic: &str, id: ConnId) -> Option<(Arc<dyn Subscriber>, Arc<Gate>)> {
        let topics = self.inner.topics.read().unwrap();
        let member = topics.get(topic)?.get(id)?;
        Some((member.sub.clone(), member.gate.clone()?))
    }

    fn has_topic(&self, topic: &str) -> bool {
        self.inner.topics.read().unwrap().contains_key(topic)
    }
}

/// Hands one item to one subscriber, through its seam when it has one.
/// `None` when the seam filtered it out.
fn hand(sub: &dyn Subscriber, item: &Item, seam: Option<&mut Seam>) -> Option<Delivery> {
    match item {
        Item::Pub(p) => {
            if let (Some(seam), Some(offset), Some(epoch)) = (seam, p.offset, &p.epoch)
                && !seam.admit(epoch, offset)
            {
                return None;
            }
            Some(sub.deliver(p))
        }
        Item::Gap(topic, gap) => match seam {
            Some(seam) => seam.admit_gap(gap).map(|g| sub.gap(topic, &g)),
            None => Some(sub.gap(topic, gap)),
        },
    }
}

/// A stored history entry as a publication (`None` if it does not parse,
/// which the history function's own checks rule out).
fn stored_publication(topic: &str, stored: &Stored) -> Option<Publication> {
    let env = protocol::parse_envelope(&stored.payload).ok()?;
    Some(Publication::from_envelope(
        Arc::from(topic),
        env,
        Instant::now(),
    ))
}

// === dispatcher ===

/// The one task that fans out publications and keeps history order.
struct Dispatcher {
    hub: Hub,
    /// The slice tasks' queues; empty when the hub has one slice, which the
    /// dispatcher then serves itself.
    slices: Vec<mpsc::Sender<Arc<Work>>>,
    /// Last delivered offset per subscribed history topic.
    sequences: HashMap<Arc<str>, Sequence>,
    /// Publications of history topics whose first gate has not opened yet.
    pending: HashMap<Arc<str>, Vec<Arc<Publication>>>,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut control: mpsc::Receiver<Control>,
    ) {
        loop {
            tokio::select! {
                biased;
                c = control.recv() => match c {
                    Some(c) => self.control(c).await,
                    None => return,
                },
                msg = inbound.recv() => match msg {
                    Some(msg) => self.publication(msg).await,
                    None => return,
                },
            }
        }
    }

    /// Hands `item` to every local subscriber of its topic, through the
    /// slices. Waits only when a slice is `SLICE_QUEUE` items behind.
    async fn fan_out(&self, item: Item) {
        if let Item::Pub(p) = &item {
            self.hub.remember(p);
        }
        if self.slices.is_empty() {
            self.hub.deliver_slice(0, &[&item]);
            self.hub.fanned_out(&item);
            return;
        }
        let work = Arc::new(Work {
            item,
            left: AtomicUsize::new(self.slices.len()),
        });
        for slice in &self.slices {
            let _ = slice.send(work.clone()).await;
        }
    }

    /// Parses one backplane message and fans it out. Invalid payloads are
    /// counted and logged (rate limited) and reach no one.
    async fn publication(&mut self, inbound: Inbound) {
        metrics::counter!(m::BACKPLANE_RECEIVED).increment(1);
        let env = match protocol::parse_envelope(&inbound.payload) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!(m::INVALID_PUBLICATIONS).increment(1);
                self.hub.inner.invalid.log(&inbound.topic, &e);
                return;
            }
        };
        let topic: Arc<str> = Arc::from(inbound.topic);
        let p = Arc::new(Publication::from_envelope(topic, env, inbound.received_at));
        if p.offset.is_none() || !self.hub.is_history(&p.topic) {
            // Plain PUBLISH (at most once, no offset) or a topic this node
            // keeps no history for.
            self.fan_out(Item::Pub(p)).await;
            return;
        }
        if !self.sequences.contains_key(&p.topic) {
            if self.hub.has_topic(&p.topic) {
                let pending = self.pending.entry(p.topic.clone()).or_default();
                if pending.len() >= PENDING_LIMIT {
                    pending.remove(0);
                }
                pending.push(p);
            }
            return;
        }
        self.sequenced(p).await;
    }

    /// Delivers a history publication in order, repairing what came before it.
    async fn sequenced(&mut self, p: Arc<Publication>) {
        let (Some(offset), Some(epoch)) = (p.offset, p.epoch.clone()) else {
            return;
        };
        let Some(seq) = self.sequences.get_mut(&p.topic) else {
            return;
        };
        match seq.advance(&epoch, offset) {
            Verdict::Duplicate => return,
            Verdict::Next => {}
            Verdict::Missing { from, to } => self.fill(&p.topic, &epoch, from, to, None).await,
            Verdict::Reset { previous, to } => {
                self.fill(&p.topic, &epoch, 1, to, Some(previous)).await
            }
        }
        self.fan_out(Item::Pub(p)).await;
    }

    /// Delivers offsets `from..=to` of `epoch` from history, in order, and
    /// announces the ones history no longer has. With `previous`, the topic's
    /// epoch changed: that is announced first, even when nothing is missing.
    async fn fill(
        &mut self,
        topic: &Arc<str>,
        epoch: &Arc<str>,
        from: u64,
        to: u64,
        mut previous: Option<Arc<str>>,
    ) {
        let mut next = from;
        if from <= to {
            let limit = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
            match self.hub.inner.history.read(topic, from - 1, limit).await {
                Ok(range) if range.epoch == *epoch => {
                    let mut repaired = 0u64;
                    for stored in range.entries.iter().filter(|s| s.offset <= to) {
                        if stored.offset < next {
                            continue;
                        }
                        if stored.offset > next || previous.is_some() {
                            self.gap(topic, epoch, next, stored.offset - 1, previous.take())
                                .await;
                        }
                        if let Some(p) = stored_publication(topic, stored) {
                            self.fan_out(Item::Pub(Arc::new(p))).await;
                            repaired += 1;
                        }
                        next = stored.offset + 1;
                    }
                    if repaired > 0 {
                        metrics::counter!(m::HISTORY_REPAIRS).increment(1);
                        metrics::counter!(m::HISTORY_REPAIRED).increment(repaired);
                        tracing::info!(%topic, from, to, repaired, "repaired a gap from history");
                    }
                }
                Ok(_) => tracing::warn!(%topic, "history epoch changed during a repair"),
                Err(e) => tracing::warn!(%topic, cause = %e, "gap repair failed"),
            }
        }
        if next <= to || previous.is_some() {
            self.gap(topic, epoch, next, to, previous).await;
        }
    }

    /// Announces lost offsets to every subscriber of `topic`.
    async fn gap(
        &self,
        topic: &Arc<str>,
        epoch: &Arc<str>,
        from: u64,
        to: u64,
        previous: Option<Arc<str>>,
    ) {
        metrics::counter!(m::HISTORY_GAPS).increment(1);
        tracing::warn!(%topic, from, to, %epoch, reset = previous.is_some(), "announcing a gap that history cannot repair");
        let gap = GapRange {
            from,
            to,
            epoch: epoch.clone(),
            previous_epoch: previous,
        };
        self.fan_out(Item::Gap(topic.clone(), Arc::new(gap))).await;
    }

    async fn control(&mut self, control: Control) {
        match control {
            Control::Open {
                topic,
                id,
                range,
                since,
                announce,
                done,
            } => {
                if !self.sequences.contains_key(&topic) {
                    self.sequences.insert(
                        topic.clone(),
                        Sequence {
                            epoch: range.epoch.clone(),
                            last: range.top,
                        },
                    );
                    for p in self.pending.remove(&topic).unwrap_or_default() {
                        self.sequenced(p).await;
                    }
                }
                let recovered = self.open(&topic, id, &range, since.as_ref(), announce);
                let _ = done.send(recovered);
            }
            Control::Check { topic, range } => {
                let Some(seq) = self.sequences.get(&topic) else {
                    return;
                };
                if seq.epoch == range.epoch {
                    if range.top > seq.last {
                        let from = seq.last + 1;
                        self.sequences.get_mut(&topic).unwrap().last = range.top;
                        self.fill(&topic, &range.epoch, from, range.top, None).await;
                    }
                } else {
                    let previous = seq.epoch.clone();
                    self.sequences.insert(
                        topic.clone(),
                        Sequence {
                            epoch: range.epoch.clone(),
                            last: range.top,
                        },
                    );
                    self.fill(&topic, &range.epoch, 1, range.top, Some(previous))
                        .await;
                }
            }
            Control::Release { topic } => {
                self.sequences.remove(&topic);
                self.pending.remove(&topic);
            }
        }
    }

    /// Opens a member's gate: its announcement, its replay, then what was
    /// held meanwhile through its seam. Returns `recovered`.
    fn open(
        &self,
        topic: &Arc<str>,
        id: ConnId,
        range: &Range,
        since: Option<&Since>,
        announce: Announce,
    ) -> Option<bool> {
        let Some((sub, gate)) = self.hub.gated(topic, id) else {
            return None; // Left before its gate opened.
        };
        let replay = since.and_then(|s| history::recover(s.offset, &s.epoch, range));
        let recovered = since.map(|_| replay.is_some());
        if let Some(r) = recovered {
            let result = if r { "recovered" } else { "unrecoverable" };
            metrics::counter!(m::HISTORY_RECOVERIES, "result" => result).increment(1);
        }
        announce(&Outcome {
            position: Some(range.position()),
            recovered,
        });
        let mut seam = Seam {
            epoch: range.epoch.clone(),
            threshold: range.top,
        };
        let mut replayed = 0u64;
        for stored in replay.unwrap_or_default() {
            if let Some(p) = stored_publication(topic, stored)
                && sub.deliver(&p) == Delivery::Queued
            {
                replayed += 1;
            }
        }
        if replayed > 0 {
            self.hub
                .inner
                .delivered
                .fetch_add(replayed, Ordering::Relaxed);
            metrics::counter!(m::DELIVERIES, "transport" => sub.transport()).increment(replayed);
        }
        let mut state = gate.state.lock().unwrap();
        if let GateState::Closed(held) = &mut *state {
            for item in std::mem::take(held) {
                hand(&*sub, &item, Some(&mut seam));
            }
        }
        *state = GateState::Open(seam);
        recovered
    }
}

/// Logs invalid publisher payloads at most once per second, with a count of
/// the ones not logged, so a broken publisher cannot flood the log.
#[derive(Default)]
struct InvalidLog {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl InvalidLog {
    fn log(&self, topic: &str, err: &protocol::EnvelopeError) {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1_000;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= Duration::from_secs(1).as_millis() as u64
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(topic, cause = %err, suppressed, "dropped invalid publication");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A hub on the embedded backplane and history, for unit tests elsewhere.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::backplane::inbound_queue;
    use crate::backplane::memory::MemoryBackplane;
    use crate::history::memory::MemoryHistory;

    /// `history` lists the `HISTORY_TOPICS` patterns.
    pub fn hub(history: &[&str]) -> (Hub, mpsc::Receiver<Inbound>) {
        build(history, 1, Duration::ZERO, 100)
    }

    /// Like [`hub`], fanned out in `slices` parallel slices, keeping 1,000
    /// publications per history topic.
    pub fn sliced(history: &[&str], slices: usize) -> (Hub, mpsc::Receiver<Inbound>) {
        build(history, slices, Duration::ZERO, 1000)
    }

    /// Like [`hub`], one slice handing out at most once per `flush_interval`.
    pub fn flushing(flush_interval: Duration) -> (Hub, mpsc::Receiver<Inbound>) {
        build(&[], 1, flush_interval, 100)
    }

    fn build(
        history: &[&str],
        slices: usize,
        flush_interval: Duration,
        size: usize,
    ) -> (Hub, mpsc::Receiver<Inbound>) {
        let (tx, rx) = inbound_queue();
        let backplane: Arc<dyn Backplane> = Arc::new(MemoryBackplane::new(tx));
        let config = HistoryConfig {
            topics: history
                .iter()
                .map(|p| crate::auth::Pattern::new(p))
                .collect(),
            size,
            ttl: Duration::from_secs(60),
        };
        let store = Arc::new(MemoryHistory::new(backplane.clone(), &config));
        let fanout = Fanout {
            slices,
            flush_interval,
        };
        (Hub::new(backplane, store, config, fanout), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[derive(Default)]
    struct Probe {
        frames: Mutex<Vec<String>>,
        full: AtomicBool,
    }

    impl Subscriber for Probe {
        fn deliver(&self, p: &Publication) -> Delivery {
            if self.full.load(Ordering::Relaxed) {
                return Delivery::Overflow;
            }
            self.frames
                .lock()
                .unwrap()
                .push(p.native_frame().to_string());
            Delivery::Queued
        }
        fn gap(&self, topic: &str, g: &GapRange) -> Delivery {
            self.frames
                .lock()
                .unwrap()
                .push(format!("gap {topic} {}..{}", g.from, g.to));
            Delivery::Queued
        }
        fn transport(&self) -> &'static str {
            "test"
        }
    }

    impl Probe {
        fn offsets(&self) -> Vec<u64> {
            self.frames
                .lock()
                .unwrap()
                .iter()
                .filter_map(|f| serde_json::from_str::<serde_json::Value>(f).ok())
                .filter_map(|v| v["offset"].as_u64())
                .collect()
        }
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    fn quiet() -> Announce {
        Box::new(|_| {})
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn publish_reaches_subscribers_of_the_topic_only() {
        let (hub, rx) = testing::hub(&[]);
        hub.spawn_dispatcher(rx);
        let a = Arc::new(Probe::default());
        let b = Arc::new(Probe::default());
        hub.subscribe("news", 1, a.clone(), None, quiet())
            .await
            .unwrap();
        hub.subscribe("other", 2, b.clone(), None, quiet())
            .await
            .unwrap();
        assert_eq!(
            hub.publish("news", "news", &raw(r#"{"n":1}"#))
                .await
                .unwrap(),
            None
        );
        settle().await;
        assert_eq!(a.frames.lock().unwrap().len(), 1);
        assert!(a.frames.lock().unwrap()[0].contains(r#""data":{"n":1}"#));
        assert!(b.frames.lock().unwrap().is_empty());
        assert_eq!(hub.last("news").unwrap().data.get(), r#"{"n":1}"#);
    }

    #[tokio::test]
    async fn subscribe_is_idempotent_and_unsubscribe_cleans_up() {
        let (hub, rx) = testing::hub(&[]);
        hub.spawn_dispatcher(rx);
        let a = Arc::new(Probe::default());
        assert_eq!(
            hub.subscribe("t", 1, a.clone(), None, quiet())
                .await
                .unwrap(),
            Subscribed::New
        );
        assert_eq!(
            hub.subscribe("t", 1, a.clone(), None, quiet())
                .await
                .unwrap(),
            Subscribed::Already
        );
        assert_eq!(hub.subscription_count(), 1);
        assert!(hub.unsubscribe("t", 1).await);
        assert!(!hub.unsubscribe("t", 1).await);
        assert_eq!(hub.topic_count(), 0);
        assert_eq!(hub.subscription_count(), 0);
    }

    /// Counts backplane (un)subscribe calls.
    #[derive(Default)]
    struct CountingBackplane {
        subscribes: AtomicUsize,
        unsubscribes: AtomicUsize,
    }

    impl Backplane for CountingBackplane {
        fn kind(&self) -> &'static str {
            "counting"
        }
        fn publish<'a>(
            &'a self,
            _: &'a str,
            _: bytes::Bytes,
        ) -> futures_util::future::BoxFuture<'a, Result<(), BackplaneError>> {
            Box::pin(async { Ok(()) })
        }
        fn subscribe<'a>(
            &'a self,
            _: &'a str,
        ) -> futures_util::future::BoxFuture<'a, Result<(), BackplaneError>> {
            self.subscribes.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Ok(()) })
        }
        fn unsubscribe<'a>(
            &'a self,
            _: &'a str,
        ) -> futures_util::future::BoxFuture<'a, Result<(), BackplaneError>> {
            self.unsubscribes.fetch_add(1, Ordering::Relaxed);
            Box::pin(async { Ok(()) })
        }
        fn status(&self) -> tokio::sync::watch::Receiver<crate::backplane::Status> {
            tokio::sync::watch::channel(crate::backplane::Status::Connected).1
        }
        fn losses(&self) -> tokio::sync::watch::Receiver<u64> {
            tokio::sync::watch::channel(0).1
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quick_resubscribes_cause_no_backplane_churn() {
        let bp = Arc::new(CountingBackplane::default());
        let config = HistoryConfig {
            topics: vec![],
            size: 1,
            ttl: Duration::from_secs(1),
        };
        let store = Arc::new(crate::history::memory::MemoryHistory::new(
            bp.clone(),
            &config,
        ));
        let hub = Hub::new(
            bp.clone(),
            store,
            config,
            Fanout::per_worker(Duration::ZERO),
        );
        let a: Arc<dyn Subscriber> = Arc::new(Probe::default());
        for _ in 0..5 {
            hub.subscribe("t", 1, a.clone(), None, quiet())
                .await
                .unwrap();
            hub.unsubscribe("t", 1).await;
        }
        assert_eq!(bp.subscribes.load(Ordering::Relaxed), 1);
        assert_eq!(bp.unsubscribes.load(Ordering::Relaxed), 0);
        tokio::time::sleep(UNSUBSCRIBE_LINGER * 2).await;
        assert_eq!(
            bp.unsubscribes.load(Ordering::Relaxed),
            1,
            "released after the linger"
        );
        hub.subscribe("t", 1, a, None, quiet()).await.unwrap();
        assert_eq!(bp.subscribes.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn publishing_to_a_topic_without_subscribers_reaches_no_one() {
        let (hub, mut rx) = testing::hub(&[]);
        hub.publish("nobody", "nobody", &raw("1")).await.unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn invalid_payloads_reach_no_one_and_a_full_subscriber_does_not_stop_others() {
        let (hub, tx) = {
            let (tx, rx) = crate::backplane::inbound_queue();
            let (hub, _unused) = testing::hub(&[]);
            hub.spawn_dispatcher(rx);
            (hub, tx)
        };
        let slow = Arc::new(Probe::default());
        slow.full.store(true, Ordering::Relaxed);
        let ok = Arc::new(Probe::default());
        hub.subscribe("t", 1, slow.clone(), None, quiet())
            .await
            .unwrap();
        hub.subscribe("t", 2, ok.clone(), None, quiet())
            .await
            .unwrap();
        for payload in [&b"garbage{"[..], br#"{"event":"t"}"#, br#"{"data":1}"#] {
            tx.send(Inbound {
                topic: "t".into(),
                payload: bytes::Bytes::copy_from_slice(payload),
                received_at: Instant::now(),
            })
            .await
            .unwrap();
        }
        settle().await;
        assert_eq!(ok.frames.lock().unwrap().len(), 1);
        assert_eq!(hub.delivered(), 1);
    }

    #[test]
    fn native_frame_is_serialized_once_and_shared() {
        let p = Publication::new("a".into(), "a".into(), Arc::from(raw("2")), Instant::now());
        let f1 = p.native_frame().clone();
        let f2 = p.native_frame().clone();
        assert_eq!(f1.as_str().as_ptr(), f2.as_str().as_ptr());
    }

    /// Subscribes a probe to `h.x` that records its `subscribed` answer first.
    async fn subscribe_recording(hub: &Hub, id: ConnId, since: Option<(u64, &str)>) -> Arc<Probe> {
        let probe = Arc::new(Probe::default());
        let p = probe.clone();
        let since = since.map(|(offset, epoch)| Since {
            offset,
            epoch: epoch.to_string(),
        });
        hub.subscribe(
            "h.x",
            id,
            probe.clone(),
            since,
            Box::new(move |o| {
                p.frames
                    .lock()
                    .unwrap()
                    .push(format!("subscribed {:?}", o.recovered));
            }),
        )
        .await
        .unwrap();
        probe
    }

    #[tokio::test]
    async fn history_subscribers_are_announced_first_then_recover_then_go_live() {
        let (hub, rx) = testing::hub(&["h.*"]);
        hub.spawn_dispatcher(rx);
        // A first subscriber keeps the topic subscribed on the backplane.
        let first = Arc::new(Probe::default());
        let told = Arc::new(Mutex::new(None));
        let t = told.clone();
        hub.subscribe(
            "h.x",
            1,
            first.clone(),
            None,
            Box::new(move |o| {
                *t.lock().unwrap() = Some(o.clone());
            }),
        )
        .await
        .unwrap();
        let before = told.lock().unwrap().clone().unwrap();
        assert_eq!(before.position.as_ref().unwrap().offset, 0);
        assert_eq!(before.recovered, None);
        for i in 1..=5 {
            let p = hub
                .publish("h.x", "h.x", &raw(&i.to_string()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(p.offset, i);
            assert_eq!(
                p.epoch,
                before.position.as_ref().unwrap().epoch,
                "announced epoch"
            );
        }
        settle().await;
        assert_eq!(first.offsets(), [1, 2, 3, 4, 5]);
        // A client that saw up to 2 recovers 3..5, then receives live ones.
        let epoch = before.position.unwrap().epoch.to_string();
        let late = subscribe_recording(&hub, 2, Some((2, &epoch))).await;
        hub.publish("h.x", "h.x", &raw("6")).await.unwrap();
        settle().await;
        assert_eq!(late.frames.lock().unwrap()[0], "subscribed Some(true)");
        assert_eq!(late.offsets(), [3, 4, 5, 6]);
        // A wrong epoch is not recoverable: nothing replayed, live continues.
        let lost = subscribe_recording(&hub, 3, Some((1, "other"))).await;
        hub.publish("h.x", "h.x", &raw("7")).await.unwrap();
        settle().await;
        assert_eq!(lost.frames.lock().unwrap()[0], "subscribed Some(false)");
        assert_eq!(lost.offsets(), [7]);
        assert_eq!(first.offsets(), [1, 2, 3, 4, 5, 6, 7]);
    }

    #[tokio::test]
    async fn a_hole_in_the_offsets_is_repaired_from_history_before_the_next_one() {
        let (tx, rx) = crate::backplane::inbound_queue();
        let (hub, _unused) = testing::hub(&["*"]);
        hub.spawn_dispatcher(rx);
        let a = Arc::new(Probe::default());
        hub.subscribe("t", 1, a.clone(), None, quiet())
            .await
            .unwrap();
        // Publish 1..4 into history; the "network" delivers only 1 and 4.
        let mut payloads = Vec::new();
        for i in 1..=4 {
            hub.publish("t", "t", &raw(&i.to_string())).await.unwrap();
            let r = hub.history().read("t", i - 1, 1).await.unwrap();
            payloads.push(r.entries[0].payload.clone());
        }
        for i in [0usize, 3] {
            tx.send(Inbound {
                topic: "t".into(),
                payload: payloads[i].clone(),
                received_at: Instant::now(),
            })
            .await
            .unwrap();
        }
        settle().await;
        assert_eq!(a.offsets(), [1, 2, 3, 4]);
    }

    /// Waits (real time) until `done` holds, for tests on a multi-thread runtime.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The `n` field of each plain event a probe received, in order.
    fn numbers(probe: &Probe) -> Vec<u64> {
        probe
            .frames
            .lock()
            .unwrap()
            .iter()
            .filter_map(|f| serde_json::from_str::<serde_json::Value>(f).ok())
            .filter_map(|v| v["data"]["n"].as_u64())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sliced_fan_out_keeps_each_connection_in_order_across_topics() {
        let (hub, rx) = testing::sliced(&[], 3);
        hub.spawn_dispatcher(rx);
        let probes: Vec<Arc<Probe>> = (0..60).map(|_| Arc::new(Probe::default())).collect();
        for (i, probe) in probes.iter().enumerate() {
            let id = i as ConnId + 1;
            hub.subscribe("a", id, probe.clone(), None, quiet())
                .await
                .unwrap();
            if i % 2 == 0 {
                hub.subscribe("b", id, probe.clone(), None, quiet())
                    .await
                    .unwrap();
            }
        }
        // One publisher alternating two topics: a connection on both sees
        // them in publishing order, whichever slice it is in.
        for n in 0..400u64 {
            let topic = if n % 2 == 0 { "a" } else { "b" };
            hub.publish(topic, topic, &raw(&format!(r#"{{"n":{n}}}"#)))
                .await
                .unwrap();
        }
        eventually("every delivery", || hub.delivered() == 60 * 200 + 30 * 200).await;
        for (i, probe) in probes.iter().enumerate() {
            let expected: Vec<u64> = (0..400).filter(|n| i % 2 == 0 || n % 2 == 0).collect();
            assert_eq!(numbers(probe), expected, "connection {i}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sliced_history_subscribers_joining_mid_stream_miss_nothing_and_repeat_nothing() {
        let (hub, rx) = testing::sliced(&["h.*"], 2);
        hub.spawn_dispatcher(rx);
        let first = subscribe_recording(&hub, 1, None).await;
        let (all_joined, mut joined_rx) = tokio::sync::watch::channel(false);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for n in 1..=300u64 {
                    if n == 201 {
                        // The last ones are published after everyone joined.
                        joined_rx.wait_for(|j| *j).await.unwrap();
                    }
                    let p = hub
                        .publish("h.x", "h.x", &raw(&n.to_string()))
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(p.offset, n);
                    if n % 25 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        // Subscribers join while it publishes: half of them with `since`
        // (offset 0 of the topic's epoch: everything), half from now on.
        let epoch = hub.history().read("h.x", 0, 0).await.unwrap().epoch;
        let mut joined = Vec::new();
        for id in 2..=41u64 {
            let since = (id % 2 == 0).then_some((0, &*epoch));
            joined.push(subscribe_recording(&hub, id, since).await);
            tokio::task::yield_now().await;
        }
        all_joined.send(true).unwrap();
        publisher.await.unwrap();
        eventually("every subscriber at offset 300", || {
            first.offsets().last() == Some(&300)
                && joined.iter().all(|p| p.offsets().last() == Some(&300))
        })
        .await;
        assert_eq!(first.offsets(), (1..=300).collect::<Vec<_>>());
        for (i, probe) in joined.iter().enumerate() {
            let offsets = probe.offsets();
            let start = offsets[0];
            assert_eq!(
                offsets,
                (start..=300).collect::<Vec<_>>(),
                "subscriber {i}: consecutive, once each"
            );
            if i % 2 == 0 {
                assert_eq!(start, 1, "subscriber {i} recovered from offset 0");
                assert_eq!(probe.frames.lock().unwrap()[0], "subscribed Some(true)");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_slice_hands_out_once_per_flush_interval_and_a_quiet_one_at_once() {
        let (tx, rx) = crate::backplane::inbound_queue();
        let (hub, _unused) = testing::flushing(Duration::from_millis(50));
        hub.spawn_dispatcher(rx);
        let a = Arc::new(Probe::default());
        hub.subscribe("t", 1, a.clone(), None, quiet())
            .await
            .unwrap();
        let send = |n: u64| {
            let tx = tx.clone();
            async move {
                tx.send(Inbound {
                    topic: "t".into(),
                    payload: format!(r#"{{"event":"t","data":{{"n":{n}}}}}"#).into(),
                    received_at: Instant::now(),
                })
                .await
                .unwrap();
            }
        };
        // After a quiet moment: at once.
        send(0).await;
        settle().await;
        assert_eq!(numbers(&a), [0]);
        // Within the interval: held until it ends, then together, in order.
        send(1).await;
        send(2).await;
        settle().await;
        assert_eq!(numbers(&a), [0], "held within the interval");
        tokio::time::sleep(Duration::from_millis(51)).await;
        settle().await;
        assert_eq!(numbers(&a), [0, 1, 2]);
        // Quiet again for longer than the interval: at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(3).await;
        settle().await;
        assert_eq!(numbers(&a), [0, 1, 2, 3]);
    }
}
