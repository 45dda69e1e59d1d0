//! The hub: topic → local subscribers, and the one fan-out of this node.
//!
//! A publication arrives from the backplane as [`Inbound`], is parsed once
//! into a [`Publication`], and every local subscriber of its topic gets the
//! same pre-serialized frame (a refcount bump, not a copy) on its own bounded
//! queue. A subscriber whose queue is full applies the slow-consumer policy
//! itself (it closes); the fan-out never waits for anyone.
//!
//! The hub subscribes to a topic on the backplane when the topic gets its
//! first local subscriber and unsubscribes after its last one leaves.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::backplane::{Backplane, BackplaneError, Inbound};
use crate::metrics as m;
use crate::protocol;

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
/// socket. `deliver` must not block: it queues or applies the slow-consumer
/// policy and returns.
pub trait Subscriber: Send + Sync {
    fn deliver(&self, publication: &Publication) -> Delivery;
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
    pub epoch: Option<u64>,
    timestamp: String,
    native: OnceLock<Utf8Bytes>,
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
            epoch: None,
            timestamp: protocol::timestamp(),
            native: OnceLock::new(),
        }
    }

    /// The native-protocol `event` frame, serialized on first use and then
    /// shared by every native subscriber.
    pub fn native_frame(&self) -> &Utf8Bytes {
        self.native.get_or_init(|| {
            protocol::event_frame(&self.topic, &self.event, &self.data, &self.timestamp).into()
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("could not subscribe on the backplane: {0}")]
    Backplane(#[from] BackplaneError),
}

/// Whether a subscribe call added a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    New,
    Already,
}

/// Cheap-to-clone handle to the hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

type Subscribers = HashMap<ConnId, Arc<dyn Subscriber>>;

struct Inner {
    backplane: Arc<dyn Backplane>,
    /// std RwLock: never held across `.await`. Fan-out holds the read side
    /// while it queues (non-blocking) to each subscriber.
    topics: RwLock<HashMap<Arc<str>, Subscribers>>,
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
}

/// The last publication seen on a topic.
#[derive(Clone)]
pub struct LastPublication {
    pub event: Arc<str>,
    pub data: Arc<RawValue>,
}

impl Hub {
    pub fn new(backplane: Arc<dyn Backplane>) -> Self {
        let topic_locks = (0..64).map(|_| tokio::sync::Mutex::new(())).collect();
        Self {
            inner: Arc::new(Inner {
                backplane,
                topics: RwLock::new(HashMap::new()),
                topic_locks,
                hasher: RandomState::new(),
                last: Mutex::new(HashMap::new()),
                subscriptions: AtomicUsize::new(0),
                delivered: AtomicU64::new(0),
                invalid: InvalidLog::default(),
            }),
        }
    }

    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.inner.backplane
    }

    fn topic_lock(&self, topic: &str) -> &tokio::sync::Mutex<()> {
        let i = self.inner.hasher.hash_one(topic) as usize % self.inner.topic_locks.len();
        &self.inner.topic_locks[i]
    }

    /// Adds `subscriber` to `topic`. Returns once publications on the topic
    /// will reach it; on a backplane error nothing is left behind.
    pub async fn subscribe(
        &self,
        topic: &str,
        id: ConnId,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<Subscribed, HubError> {
        let _guard = self.topic_lock(topic).lock().await;
        let first = {
            let mut topics = self.inner.topics.write().unwrap();
            match topics.get_mut(topic) {
                Some(subs) => {
                    if subs.contains_key(&id) {
                        return Ok(Subscribed::Already);
                    }
                    subs.insert(id, subscriber);
                    false
                }
                None => {
                    topics.insert(Arc::from(topic), HashMap::from([(id, subscriber)]));
                    true
                }
            }
        };
        if first && let Err(e) = self.inner.backplane.subscribe(topic).await {
            metrics::counter!(m::BACKPLANE_ERRORS, "op" => "subscribe").increment(1);
            let mut topics = self.inner.topics.write().unwrap();
            if let Some(subs) = topics.get_mut(topic) {
                subs.remove(&id);
                if subs.is_empty() {
                    topics.remove(topic);
                }
            }
            return Err(e.into());
        }
        if id != INTERNAL {
            self.inner.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        self.update_gauges();
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
            let removed = subs.remove(&id).is_some();
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

    /// Publishes through the backplane (never delivered locally by a shortcut).
    pub async fn publish(
        &self,
        topic: &str,
        event: &str,
        data: &RawValue,
    ) -> Result<(), BackplaneError> {
        self.publish_fenced(topic, event, data, None).await
    }

    /// Like [`Hub::publish`], with the leader's fencing epoch in the envelope.
    pub async fn publish_fenced(
        &self,
        topic: &str,
        event: &str,
        data: &RawValue,
        epoch: Option<u64>,
    ) -> Result<(), BackplaneError> {
        let payload = protocol::encode_envelope(event, data, epoch);
        let res = self.inner.backplane.publish(topic, payload.into()).await;
        match &res {
            Ok(()) => metrics::counter!(m::BACKPLANE_PUBLISHES).increment(1),
            Err(_) => metrics::counter!(m::BACKPLANE_ERRORS, "op" => "publish").increment(1),
        }
        res
    }

    /// Parses one backplane message and fans it out. Invalid payloads are
    /// counted and logged (rate limited) and reach no one.
    pub fn dispatch(&self, inbound: Inbound) {
        metrics::counter!(m::BACKPLANE_RECEIVED).increment(1);
        let env = match protocol::parse_envelope(&inbound.payload) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!(m::INVALID_PUBLICATIONS).increment(1);
                self.inner.invalid.log(&inbound.topic, &e);
                return;
            }
        };
        let topic: Arc<str> = Arc::from(inbound.topic);
        let event: Arc<str> = match env.event {
            Some(e) if *e != *topic => Arc::from(e),
            _ => topic.clone(),
        };
        let mut publication = Publication::new(topic, event, env.data, inbound.received_at);
        publication.epoch = env.epoch;
        self.fan_out(&publication);
    }

    /// Hands `publication` to every local subscriber of its topic.
    pub fn fan_out(&self, publication: &Publication) {
        // Per-transport counts, summed here so the metric is touched once per
        // publication, not once per delivery.
        let mut queued: [(&'static str, u64); 3] = [("", 0); 3];
        {
            let topics = self.inner.topics.read().unwrap();
            let Some(subs) = topics.get(&publication.topic) else {
                return;
            };
            for sub in subs.values() {
                if sub.deliver(publication) == Delivery::Queued {
                    let t = sub.transport();
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
        for (transport, n) in queued {
            if n > 0 {
                self.inner.delivered.fetch_add(n, Ordering::Relaxed);
                metrics::counter!(m::DELIVERIES, "transport" => transport).increment(n);
            }
        }
        metrics::histogram!(m::FANOUT_SECONDS)
            .record(publication.received_at.elapsed().as_secs_f64());
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

    /// Drains the backplane's inbound queue until it closes.
    pub fn spawn_dispatcher(&self, mut rx: mpsc::Receiver<Inbound>) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            while let Some(inbound) = rx.recv().await {
                hub.dispatch(inbound);
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::inbound_queue;
    use crate::backplane::memory::MemoryBackplane;
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
        fn transport(&self) -> &'static str {
            "test"
        }
    }

    fn hub() -> (Hub, mpsc::Receiver<Inbound>) {
        let (tx, rx) = inbound_queue();
        (Hub::new(Arc::new(MemoryBackplane::new(tx))), rx)
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[tokio::test]
    async fn publish_reaches_subscribers_of_the_topic_only() {
        let (hub, mut rx) = hub();
        let a = Arc::new(Probe::default());
        let b = Arc::new(Probe::default());
        hub.subscribe("news", 1, a.clone()).await.unwrap();
        hub.subscribe("other", 2, b.clone()).await.unwrap();
        hub.publish("news", "news", &raw(r#"{"n":1}"#))
            .await
            .unwrap();
        hub.dispatch(rx.recv().await.unwrap());
        assert_eq!(a.frames.lock().unwrap().len(), 1);
        assert!(a.frames.lock().unwrap()[0].contains(r#""data":{"n":1}"#));
        assert!(b.frames.lock().unwrap().is_empty());
        assert_eq!(hub.last("news").unwrap().data.get(), r#"{"n":1}"#);
    }

    #[tokio::test]
    async fn subscribe_is_idempotent_and_unsubscribe_cleans_up() {
        let (hub, _rx) = hub();
        let a = Arc::new(Probe::default());
        assert_eq!(
            hub.subscribe("t", 1, a.clone()).await.unwrap(),
            Subscribed::New
        );
        assert_eq!(
            hub.subscribe("t", 1, a.clone()).await.unwrap(),
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
    }

    #[tokio::test(start_paused = true)]
    async fn quick_resubscribes_cause_no_backplane_churn() {
        let bp = Arc::new(CountingBackplane::default());
        let hub = Hub::new(bp.clone());
        let a: Arc<dyn Subscriber> = Arc::new(Probe::default());
        for _ in 0..5 {
            hub.subscribe("t", 1, a.clone()).await.unwrap();
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
        hub.subscribe("t", 1, a).await.unwrap();
        assert_eq!(bp.subscribes.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn publishing_to_a_topic_without_subscribers_reaches_no_one() {
        let (hub, mut rx) = hub();
        hub.publish("nobody", "nobody", &raw("1")).await.unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn invalid_payloads_reach_no_one_and_a_full_subscriber_does_not_stop_others() {
        let (hub, _rx) = hub();
        let slow = Arc::new(Probe::default());
        slow.full.store(true, Ordering::Relaxed);
        let ok = Arc::new(Probe::default());
        hub.subscribe("t", 1, slow.clone()).await.unwrap();
        hub.subscribe("t", 2, ok.clone()).await.unwrap();
        for payload in [&b"garbage{"[..], br#"{"event":"t"}"#, br#"{"data":1}"#] {
            hub.dispatch(Inbound {
                topic: "t".into(),
                payload: bytes::Bytes::copy_from_slice(payload),
                received_at: Instant::now(),
            });
        }
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
}
