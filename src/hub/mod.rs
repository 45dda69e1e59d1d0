//! The hub: topic → local subscribers, and the one fan-out of this node.
//!
//! A publication arrives from the backplane as
//! [`Inbound`](crate::backplane::Inbound), is parsed once into a
//! [`Publication`], and every local subscriber of its topic gets the same
//! pre-serialized frame (a refcount bump, not a copy) on its own bounded
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
//! node's last delivered offset per topic
//! ([`Sequence`](crate::history::Sequence)), fills a hole from history
//! before the publication that revealed it (or announces it as a gap when
//! history no longer has it), and opens a new subscriber's gate:
//! a subscriber of a history topic receives nothing until its `subscribed`
//! answer and any replay have been queued, then what was held meanwhile,
//! through its [`Seam`] (no duplicate, nothing out of order).
//!
//! Files: `mod.rs` the public [`Hub`] (subscribe, unsubscribe, publish) and
//! its shared state; `publication.rs` the [`Publication`] and its frames;
//! `dispatcher.rs` the dispatcher and sequencing; `fanout.rs` the fan-out
//! slices; `pacer.rs` how long a busy slice holds a publication;
//! `pressure.rs` the CPU pressure the pacer weighs its demand by;
//! `checker.rs` the periodic history check.

mod checker;
mod dispatcher;
mod fanout;
mod pacer;
mod pressure;
mod publication;
#[cfg(test)]
pub(crate) mod testing;

pub use fanout::Fanout;
pub use publication::{Publication, Routed, client_conn_id};

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use crate::backplane::{Backplane, BackplaneError};
use crate::config::HistoryConfig;
use crate::history::{GapRange, History, HistoryError, Position, Range, Seam};
use crate::metrics as m;
use crate::protocol::{self, Since};

use dispatcher::InvalidLog;
use publication::stored_publication;

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

/// Stripes of the topic map and of the topic locks.
const STRIPES: usize = 64;

/// One shard of the topic map: its topics and their local subscribers.
type Shard = HashMap<Arc<str>, Members>;

/// One shard of the last publications kept for `request`.
type LastShard = HashMap<Arc<str>, LastPublication>;

/// How many topics keep their last publication for `request` (a share of it
/// per stripe).
const LAST_PUBLICATIONS: usize = 10_000;

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
    /// What the fan-out calls: `topic_id` is the topic's number on this node
    /// ([`Outcome::topic_id`]), for subscribers whose frames name the topic
    /// by it (the native compact form).
    fn deliver_numbered(&self, publication: &Publication, topic_id: u32) -> Delivery {
        let _ = topic_id;
        self.deliver(publication)
    }
    /// Publications `gap.from..=gap.to` of a history topic are lost.
    fn gap(&self, topic: &str, gap: &GapRange) -> Delivery;
    /// The `transport` label of this subscriber's deliveries.
    fn transport(&self) -> &'static str;
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("could not subscribe on the backplane: {0}")]
    Backplane(#[from] BackplaneError),
    #[error("could not read the topic's history: {0}")]
    History(#[from] HistoryError),
    /// `MAX_TOPICS_PER_NODE`: the topic is new to this node and the node
    /// holds as many as it may.
    #[error(
        "this node is at its limit of {0} topics (MAX_TOPICS_PER_NODE): subscribing to a topic it does not hold yet is refused; try again later"
    )]
    TopicLimit(usize),
}

impl HubError {
    /// The protocol's error code for a subscription it refused.
    pub fn code(&self) -> &'static str {
        match self {
            HubError::TopicLimit(_) => "topic_limit",
            HubError::Backplane(_) | HubError::History(_) => "unavailable",
        }
    }
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

impl PublishError {
    /// The protocol's error code for it, whoever published.
    pub fn code(&self) -> &'static str {
        match self {
            PublishError::Unavailable(_) => "unavailable",
            PublishError::Refused(_) => "bad_message",
        }
    }
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
    /// The topic's number on this node, the same for every subscriber and
    /// for as long as the topic has any here: compact frames carry it
    /// instead of the topic's name.
    pub topic_id: u32,
}

/// Called once, before any publication of the topic reaches the new
/// subscriber: the place to queue its `subscribed` answer.
pub type Announce = Box<dyn FnOnce(&Outcome) + Send>;

/// Cheap-to-clone handle to the hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// One local subscriber of a topic. `gate` is set on history topics, and
/// on others until the subscriber's announcement is queued.
struct Member {
    sub: Arc<dyn Subscriber>,
    gate: Option<Arc<Gate>>,
}

/// A topic's local subscribers, split into the hub's fan-out slices by
/// connection id (see the module docs).
struct Members {
    slices: Box<[HashMap<ConnId, Member>]>,
    /// [`Outcome::topic_id`].
    id: u32,
}

impl Members {
    fn new(slices: usize, id: u32) -> Self {
        Self {
            slices: (0..slices.max(1)).map(|_| HashMap::new()).collect(),
            id,
        }
    }

    fn slice(&self, id: ConnId) -> usize {
        (id % self.slices.len() as u64) as usize
    }

    fn get(&self, id: ConnId) -> Option<&Member> {
        self.slices[self.slice(id)].get(&id)
    }

    fn get_mut(&mut self, id: ConnId) -> Option<&mut Member> {
        let i = self.slice(id);
        self.slices[i].get_mut(&id)
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

/// Holds a subscriber's publications until its `subscribed` answer (and on
/// a history topic its replay) is queued; on a history topic it then
/// filters through its seam, on others it is removed. Only the dispatcher
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
    /// The topics this node holds, in [`STRIPES`] shards by topic hash (the
    /// stripes of `topic_locks`). std RwLocks: never held across `.await`,
    /// and never two at once. The fan-out holds a shard's read side while
    /// it queues (non-blocking) to each subscriber of a topic in it.
    ///
    /// Shards because subscribes and unsubscribes run on the readers'
    /// runtime, whose threads have a lower priority: on a busy machine the
    /// kernel preempts one now and then while it holds the write side, for
    /// a scheduler slice. With one map, under the abuse scenario (hostile
    /// clients churning random topics) that held the write side for 1–5 ms
    /// about 65 times a run per node, and stopped every publication's
    /// fan-out on the node meanwhile (waits of up to 8 ms). Sharded, such a
    /// stall holds up the topics of one shard in 64.
    topics: Box<[RwLock<Shard>]>,
    /// Entries in `topics`, lingering empty ones included: what
    /// `MAX_TOPICS_PER_NODE` counts, reserved before an entry is made.
    entries: AtomicUsize,
    /// Striped async locks, one stripe per topic hash: they order the hub
    /// entry change and the backplane (un)subscribe of one topic, so a
    /// last-leave UNSUBSCRIBE can never overtake a first-join SUBSCRIBE.
    /// Only subscribe/unsubscribe take them, never the fan-out.
    topic_locks: Box<[tokio::sync::Mutex<()>]>,
    hasher: RandomState,
    /// Last publication per topic, for `request`. std Mutex, no `.await`.
    /// In [`STRIPES`] shards like `topics`, for the same reason: `request`
    /// reads it on the readers' threads, the dispatcher writes it for every
    /// publication.
    last: Box<[Mutex<LastShard>]>,
    subscriptions: AtomicUsize,
    /// Topics with at least one subscriber, kept as they change: counting
    /// them from the map on every (un)subscribe made topic churn quadratic
    /// (a hostile client's random topics linger a second each).
    occupied: AtomicUsize,
    /// The next [`Outcome::topic_id`].
    topic_ids: AtomicU32,
    delivered: AtomicU64,
    invalid: InvalidLog,
    fanout: Fanout,
    /// Read by every slice's pacer; sampled once [`Hub::spawn_pressure_sampler`] runs.
    pressure: Arc<pressure::Pressure>,
    /// Steps that must run in order with the publications, on the dispatcher.
    control: mpsc::Sender<Control>,
    control_rx: Mutex<Option<mpsc::Receiver<Control>>>,
    observer: OnceLock<Observer>,
    /// `MAX_TOPICS_PER_NODE` (0: unlimited): topics the map may hold,
    /// lingering empty ones included (they hold memory and a backplane
    /// subscription too).
    max_topics: AtomicUsize,
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
        let topic_locks = (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect();
        let (control, control_rx) = mpsc::channel(4096);
        Self {
            inner: Arc::new(Inner {
                backplane,
                history,
                history_config,
                topics: (0..STRIPES).map(|_| RwLock::default()).collect(),
                entries: AtomicUsize::new(0),
                topic_locks,
                hasher: RandomState::new(),
                last: (0..STRIPES).map(|_| Mutex::default()).collect(),
                subscriptions: AtomicUsize::new(0),
                occupied: AtomicUsize::new(0),
                topic_ids: AtomicU32::new(1),
                delivered: AtomicU64::new(0),
                invalid: InvalidLog::default(),
                fanout: Fanout {
                    slices: fanout.slices.max(1),
                    ..fanout
                },
                pressure: pressure::Pressure::new(),
                control,
                control_rx: Mutex::new(Some(control_rx)),
                observer: OnceLock::new(),
                max_topics: AtomicUsize::new(0),
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

    /// Sets `MAX_TOPICS_PER_NODE` (`None`: unlimited).
    pub fn set_max_topics(&self, max: Option<usize>) {
        self.inner
            .max_topics
            .store(max.unwrap_or(0), Ordering::Relaxed);
    }

    /// Sets the observer of client occupancy (once).
    pub fn set_observer(&self, observer: Observer) {
        let _ = self.inner.observer.set(observer);
    }

    /// Whether this node holds `topic`: it has subscribers here, or lingers
    /// after its last one. Subscribing to a topic the node holds costs no
    /// Redis subscription and no new entry.
    pub fn holds(&self, topic: &str) -> bool {
        self.shard(topic).read().unwrap().contains_key(topic)
    }

    /// Whether `topic` has local client subscribers.
    pub fn has_clients(&self, topic: &str) -> bool {
        self.shard(topic)
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
        &self.inner.topic_locks[self.stripe(topic)]
    }

    fn stripe(&self, topic: &str) -> usize {
        self.inner.hasher.hash_one(topic) as usize % STRIPES
    }

    /// The shard of the topic map that holds `topic`.
    fn shard(&self, topic: &str) -> &RwLock<Shard> {
        &self.inner.topics[self.stripe(topic)]
    }

    /// Every topic the node holds (one shard locked at a time).
    fn held_topics(&self) -> Vec<Arc<str>> {
        let mut held = Vec::new();
        for shard in &self.inner.topics {
            held.extend(shard.read().unwrap().keys().cloned());
        }
        held
    }

    /// Whether connection `id` is subscribed to `topic` here.
    fn is_member(&self, topic: &str, id: ConnId) -> bool {
        self.shard(topic)
            .read()
            .unwrap()
            .get(topic)
            .is_some_and(|m| m.contains(id))
    }

    /// Counts a new entry in the topic map unless `MAX_TOPICS_PER_NODE`
    /// (`max`, 0: none) is reached; the node's own subscriptions always
    /// get theirs. Reserved before the entry is made, so subscribes of new
    /// topics in different shards cannot pass the limit together.
    fn reserve_entry(&self, id: ConnId, max: usize) -> bool {
        if id == INTERNAL || max == 0 {
            self.inner.entries.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.inner
            .entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
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
        let topic_id = {
            let _guard = self.topic_lock(topic).lock().await;
            let first = {
                let mut topics = self.shard(topic).write().unwrap();
                // Closed until the announcement is queued: on a topic
                // without history too, whose gate goes once it has opened.
                let member = Member {
                    sub: subscriber,
                    gate: Some(Arc::new(Gate {
                        state: Mutex::new(GateState::Closed(Vec::new())),
                    })),
                };
                let max_topics = self.inner.max_topics.load(Ordering::Relaxed);
                match topics.get_mut(topic) {
                    Some(subs) if subs.contains(id) => Err(subs.id),
                    Some(subs) => {
                        if subs.is_empty() {
                            self.inner.occupied.fetch_add(1, Ordering::Relaxed);
                        }
                        subs.insert(id, member);
                        self.observe(topic, id, subs.clients(), true);
                        Ok((false, subs.id))
                    }
                    None if !self.reserve_entry(id, max_topics) => {
                        let max = max_topics;
                        drop(topics);
                        crate::limits::refused(
                            crate::limits::Limit::TopicsPerNode,
                            &format!("the node holds {max} topics"),
                        );
                        return Err(HubError::TopicLimit(max));
                    }
                    None => {
                        let topic_id = self.inner.topic_ids.fetch_add(1, Ordering::Relaxed);
                        let mut subs = Members::new(self.inner.fanout.slices, topic_id);
                        subs.insert(id, member);
                        self.observe(topic, id, subs.clients(), true);
                        topics.insert(Arc::from(topic), subs);
                        self.inner.occupied.fetch_add(1, Ordering::Relaxed);
                        Ok((true, topic_id))
                    }
                }
            };
            let (first, topic_id) = match first {
                Ok(new) => new,
                Err(topic_id) => {
                    drop(_guard);
                    let position = match history {
                        true => Some(self.inner.history.read(topic, 0, 0).await?.position()),
                        false => None,
                    };
                    announce(&Outcome {
                        position,
                        recovered: None,
                        topic_id,
                    });
                    return Ok(Subscribed::Already);
                }
            };
            if first && let Err(e) = self.inner.backplane.subscribe(topic).await {
                metrics::counter!(m::BACKPLANE_ERRORS, "op" => "subscribe").increment(1);
                let mut topics = self.shard(topic).write().unwrap();
                if let Some(subs) = topics.get_mut(topic)
                    && subs.remove(id).is_some()
                {
                    self.observe(topic, id, subs.clients(), false);
                    if subs.is_empty() {
                        self.inner.occupied.fetch_sub(1, Ordering::Relaxed);
                        topics.remove(topic);
                        self.inner.entries.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                return Err(e.into());
            }
            topic_id
        };
        if id != INTERNAL {
            self.inner.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        self.update_gauges();
        if !history {
            self.open_plain(topic, id, topic_id, announce);
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
            let mut topics = self.shard(topic).write().unwrap();
            let Some(subs) = topics.get_mut(topic) else {
                return false;
            };
            let removed = subs.remove(id).is_some();
            if removed {
                self.observe(topic, id, subs.clients(), false);
            }
            let now_empty = removed && subs.is_empty();
            if now_empty {
                self.inner.occupied.fetch_sub(1, Ordering::Relaxed);
            }
            (removed, now_empty)
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
            let mut topics = self.shard(topic).write().unwrap();
            match topics.get(topic) {
                Some(subs) if subs.is_empty() => {
                    topics.remove(topic);
                    self.inner.entries.fetch_sub(1, Ordering::Relaxed);
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
        self.inner.occupied.load(Ordering::Relaxed)
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
        self.inner.last[self.stripe(topic)]
            .lock()
            .unwrap()
            .get(topic)
            .cloned()
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
        self.publish_routed(topic, event, data, fence, &protocol::Routing::default())
            .await
    }

    /// Like [`Hub::publish_fenced`], with `except` and `rooms` in the
    /// envelope (compat emits): the same one path, so every node's fan-out
    /// (and every replay from history) honours them.
    pub async fn publish_routed(
        &self,
        topic: &str,
        event: &str,
        data: &RawValue,
        fence: Option<u64>,
        routing: &protocol::Routing,
    ) -> Result<Option<Position>, PublishError> {
        let payload = protocol::encode_routed_envelope(event, data, fence, routing);
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

    /// Keeps `publication` as its topic's last one, for `request`.
    fn remember(&self, publication: &Publication) {
        let mut last = self.inner.last[self.stripe(&publication.topic)]
            .lock()
            .unwrap();
        if last.len() >= LAST_PUBLICATIONS / STRIPES
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

    /// Opens the gate of member `id` of a topic without history: its
    /// announcement, then what the fan-out held for it meanwhile, and no
    /// gate from then on (no lock per delivery). Under the shard's write
    /// lock, which the fan-out reads members under, so nothing can be
    /// handed to it in between: a client always has `subscribed` (and a
    /// compact frame's topic id) before the topic's first event.
    fn open_plain(&self, topic: &str, id: ConnId, topic_id: u32, announce: Announce) {
        let mut topics = self.shard(topic).write().unwrap();
        announce(&Outcome {
            position: None,
            recovered: None,
            topic_id,
        });
        let Some(member) = topics.get_mut(topic).and_then(|subs| subs.get_mut(id)) else {
            return; // Left before its gate opened.
        };
        let Some(gate) = member.gate.take() else {
            return;
        };
        let state = std::mem::replace(
            &mut *gate.state.lock().unwrap(),
            GateState::Closed(Vec::new()),
        );
        if let GateState::Closed(held) = state {
            for item in &held {
                fanout::hand(&*member.sub, item, topic_id, None);
            }
        }
    }

    /// The gate of member `id` of `topic`, with its subscriber and the
    /// topic's number.
    fn gated(&self, topic: &str, id: ConnId) -> Option<(Arc<dyn Subscriber>, Arc<Gate>, u32)> {
        let topics = self.shard(topic).read().unwrap();
        let subs = topics.get(topic)?;
        let member = subs.get(id)?;
        Some((member.sub.clone(), member.gate.clone()?, subs.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::testing::{self, *};

    /// On a topic without history too, a subscriber's announcement comes
    /// before any publication: a compact client learns the topic id from it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plain_topic_announces_before_its_first_event() {
        let (hub, rx) = testing::sliced(&[], 2);
        hub.spawn_dispatcher(rx);
        hub.subscribe("plain", 1, Arc::new(Probe::default()), None, quiet())
            .await
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let publisher = tokio::spawn({
            let (hub, stop, published) = (hub.clone(), stop.clone(), published.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = published.fetch_add(1, Ordering::Relaxed) + 1;
                    let data = raw(&format!(r#"{{"n":{n}}}"#));
                    let _ = hub.publish("plain", "plain", &data).await;
                    if n % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
        eventually("publishing", || published.load(Ordering::Relaxed) > 100).await;
        let before = published.load(Ordering::Relaxed);
        let mut probes = Vec::new();
        for id in 2..400 {
            let probe = Arc::new(Probe::default());
            let p = probe.clone();
            let announce: Announce = Box::new(move |_| {
                p.frames.lock().unwrap().push("subscribed".into());
            });
            hub.subscribe("plain", id, probe.clone(), None, announce)
                .await
                .unwrap();
            probes.push(probe);
            if id % 50 == 0 {
                // Publications keep coming between the subscribes.
                let now = published.load(Ordering::Relaxed);
                eventually("publishing", || published.load(Ordering::Relaxed) > now).await;
            }
        }
        let during = published.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        publisher.await.unwrap();
        assert!(during > before, "published meanwhile");
        for probe in &probes {
            let frames = probe.frames.lock().unwrap();
            assert_eq!(
                frames[0],
                "subscribed",
                "{:?}",
                &frames[..frames.len().min(3)]
            );
        }
        assert!(
            probes.iter().any(|p| p.frames.lock().unwrap().len() > 1),
            "subscribers got events"
        );
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
    async fn except_and_rooms_decide_who_gets_an_emit_live_and_on_replay() {
        // One slice, and three (each gathers its share of the exclusions).
        for slices in [1, 3] {
            let (hub, rx) = testing::sliced(&["h.*"], slices);
            hub.spawn_dispatcher(rx);
            // 1: in h.a only; 2: in h.a and h.b; 3: in h.b and h.skip; 4: h.a, skipped by id.
            let probes: Vec<Arc<Probe>> = (0..5).map(|_| Arc::new(Probe::default())).collect();
            for (id, topics) in [
                (1, &["h.a"][..]),
                (2, &["h.a", "h.b"]),
                (3, &["h.b", "h.skip"]),
                (4, &["h.a"]),
            ] {
                for t in topics {
                    hub.subscribe(t, id, probes[id as usize].clone(), None, quiet())
                        .await
                        .unwrap();
                }
            }
            let routing = protocol::Routing {
                except: vec!["h.skip".into(), format!("{:016x}", 4u64)],
                rooms: vec!["h.a".into(), "h.b".into()],
                spread: false,
            };
            for room in ["h.a", "h.b"] {
                hub.publish_routed(room, "e", &raw(r#"{"n":1}"#), None, &routing)
                    .await
                    .unwrap();
            }
            settle().await;
            let got = |id: usize| numbers(&probes[id]);
            assert_eq!(got(1), [1], "h.a");
            assert_eq!(got(2), [1], "in both rooms: once");
            assert!(got(3).is_empty(), "in an excepted room");
            assert!(got(4).is_empty(), "excepted by client id");
            // A late subscriber of h.b that is also in h.a replays neither twice.
            let late = Arc::new(Probe::default());
            hub.subscribe("h.a", 9, late.clone(), None, quiet())
                .await
                .unwrap();
            let since = Some(Since {
                offset: 0,
                epoch: hub
                    .latest("h.b")
                    .await
                    .unwrap()
                    .unwrap()
                    .epoch
                    .unwrap()
                    .to_string(),
            });
            hub.subscribe("h.b", 9, late.clone(), since.clone(), quiet())
                .await
                .unwrap();
            let lone = Arc::new(Probe::default());
            hub.subscribe("h.b", 10, lone.clone(), since, quiet())
                .await
                .unwrap();
            settle().await;
            assert!(
                numbers(&late).is_empty(),
                "h.b's copy is h.a's: {:?}",
                late.frames
            );
            assert_eq!(numbers(&lone), [1], "replayed");
        }
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

    #[tokio::test(start_paused = true)]
    async fn the_topic_count_follows_churn_and_lingering_topics() {
        let (hub, rx) = testing::hub(&[]);
        hub.spawn_dispatcher(rx);
        let a = Arc::new(Probe::default());
        for round in 0..3u64 {
            for t in 0..10u64 {
                for id in 1..=3 {
                    hub.subscribe(&format!("t{t}"), id + round, a.clone(), None, quiet())
                        .await
                        .unwrap();
                }
            }
            assert_eq!(hub.topic_count(), 10);
            for t in 0..10u64 {
                for id in 1..=3 {
                    assert!(hub.unsubscribe(&format!("t{t}"), id + round).await);
                }
                assert_eq!(hub.topic_count(), 9 - t as usize);
            }
            // Empty topics linger, counted as none, and a subscriber
            // coming back within the linger counts them again.
            hub.subscribe("t0", 7, a.clone(), None, quiet())
                .await
                .unwrap();
            assert_eq!(hub.topic_count(), 1);
            assert!(hub.unsubscribe("t0", 7).await);
            tokio::time::sleep(UNSUBSCRIBE_LINGER * 2).await;
            assert_eq!(hub.topic_count(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_topic_limit_counts_lingering_topics_across_shards_and_not_the_nodes_own() {
        let (hub, rx) = testing::hub(&[]);
        hub.spawn_dispatcher(rx);
        hub.set_max_topics(Some(20));
        let a = Arc::new(Probe::default());
        // Twenty topics land in different shards: all of them count.
        for t in 0..20 {
            hub.subscribe(&format!("t{t}"), 1, a.clone(), None, quiet())
                .await
                .unwrap();
        }
        let refused = hub.subscribe("new", 1, a.clone(), None, quiet()).await;
        assert!(
            matches!(refused, Err(HubError::TopicLimit(20))),
            "{refused:?}"
        );
        // A topic the node holds takes more subscribers.
        hub.subscribe("t0", 2, a.clone(), None, quiet())
            .await
            .unwrap();
        // The node's own subscriptions are never refused (and count).
        hub.subscribe("internal", INTERNAL, a.clone(), None, quiet())
            .await
            .unwrap();
        // A lingering topic still counts; once released, its place is free,
        // but the node's own topic holds it.
        let refuse = |r: Result<Subscribed, HubError>| {
            assert!(matches!(r, Err(HubError::TopicLimit(20))), "{r:?}");
        };
        assert!(hub.unsubscribe("t1", 1).await);
        refuse(hub.subscribe("new", 1, a.clone(), None, quiet()).await);
        tokio::time::sleep(UNSUBSCRIBE_LINGER * 2).await;
        refuse(hub.subscribe("new", 1, a.clone(), None, quiet()).await);
        assert!(hub.unsubscribe("internal", INTERNAL).await);
        tokio::time::sleep(UNSUBSCRIBE_LINGER * 2).await;
        hub.subscribe("new", 1, a.clone(), None, quiet())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn the_last_publications_kept_for_request_stay_bounded() {
        let (hub, _rx) = testing::hub(&[]);
        let data: Arc<RawValue> = Arc::from(raw("1"));
        for t in 0..3 * LAST_PUBLICATIONS {
            let topic: Arc<str> = format!("t{t}").into();
            let p = Publication::new(topic, "e".into(), data.clone(), std::time::Instant::now());
            hub.remember(&p);
            assert!(hub.last(&format!("t{t}")).is_some(), "the newest is kept");
        }
        let kept: usize = hub.inner.last.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(
            (LAST_PUBLICATIONS * 9 / 10..=LAST_PUBLICATIONS).contains(&kept),
            "{kept}"
        );
    }

    #[tokio::test]
    async fn the_observer_hears_the_first_and_the_last_client_of_a_topic_only() {
        let (hub, rx) = testing::hub(&[]);
        hub.spawn_dispatcher(rx);
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        hub.set_observer(Arc::new(move |t: &str| {
            h.lock().unwrap().push(t.to_string())
        }));
        let p: Arc<dyn Subscriber> = Arc::new(Probe::default());
        // The node's own subscriber is not a client.
        hub.subscribe("t", INTERNAL, p.clone(), None, quiet())
            .await
            .unwrap();
        assert!(!hub.has_clients("t"));
        hub.subscribe("t", 1, p.clone(), None, quiet())
            .await
            .unwrap();
        hub.subscribe("t", 2, p.clone(), None, quiet())
            .await
            .unwrap();
        hub.subscribe("t", 2, p.clone(), None, quiet())
            .await
            .unwrap();
        assert!(hub.has_clients("t"));
        assert_eq!(*heard.lock().unwrap(), ["t"]);
        hub.unsubscribe("t", 1).await;
        assert_eq!(heard.lock().unwrap().len(), 1);
        hub.unsubscribe("t", 2).await;
        assert!(!hub.has_clients("t"));
        hub.unsubscribe("t", INTERNAL).await;
        assert_eq!(*heard.lock().unwrap(), ["t", "t"]);
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
}
