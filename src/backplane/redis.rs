//! The Redis backplane: `PUBLISH {prefix}:t:{topic}` on a command connection,
//! and a dedicated subscriber connection that is subscribed to exactly the
//! topics with local subscribers. On a Redis Cluster topics travel over
//! sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE` on `{prefix}:t:{{topic}}`), so a
//! topic only loads the shard that owns its slot.
//!
//! A subscription can go deaf while its connection looks fine: Redis drops
//! sharded subscriptions of a slot that moved (it sends `sunsubscribe`,
//! which fred discards), and a failover can leave a connection to a node
//! that no longer serves. So the node probes itself: every second it
//! publishes on a probe channel of its own on every shard and expects it
//! back; a probe that does not return within [`PROBE_DEADLINE`] marks the
//! node not ready, is counted, and everything is subscribed again. In
//! cluster mode the slot layout is also compared every second, and a change
//! resubscribes at once. Each restoration lets the hub repair gaps.
//!
//! fred pitfalls handled here (see CRATE-NOTES): reconnection is configured
//! in `crate::redis`; subscriptions are restored by our own reconnect
//! handler, which also gates readiness; messages are moved from fred's
//! broadcast into our own queue at once by a loop that counts lag instead of
//! ending on it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, ClusterInterface, EventInterface, PubsubInterface};
use futures_util::future::BoxFuture;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Backplane, BackplaneError, Inbound, Status};
use crate::metrics as m;
use crate::redis::{COMMAND_TIMEOUT, Keys, Redis, RedisError, within};

/// How often the connection health is checked.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a starting node may take to reach Redis before its log warns.
const STARTUP_GRACE: Duration = Duration::from_secs(5);
/// How often the node probes its own subscriptions.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a probe may take to come back before the subscription counts
/// as deaf.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

pub struct RedisBackplane {
    keys: Keys,
    node_id: String,
    publisher: Redis,
    subscriber: SubscriberClient,
    status: watch::Sender<Status>,
    losses: watch::Sender<u64>,
    /// Probe channel → its last probe sent and last one received.
    probes: Mutex<HashMap<String, Probe>>,
    /// Set while a deaf subscription is being restored: the node is not ready.
    deaf: AtomicBool,
    /// The hub's (un)subscribes, for [`apply_changes`]. Unbounded because
    /// every sender waits for its answer: at most one change per topic is
    /// queued (the hub's topic lock), so the queue is bounded by the topics.
    changes: mpsc::UnboundedSender<Change>,
}

/// A subscribe or unsubscribe of one channel, waiting for the next batch.
struct Change {
    channel: String,
    subscribe: bool,
    done: oneshot::Sender<Result<(), String>>,
}

/// The most channels one batched `SUBSCRIBE`/`UNSUBSCRIBE` names.
const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Probe {
    sent: u64,
    sent_at: Instant,
    received: u64,
}

impl RedisBackplane {
    /// Starts the subscriber connection and its tasks; they stop with `stop`.
    pub fn start(
        url: &str,
        keys: Keys,
        node_id: &str,
        publisher: Redis,
        buffer: usize,
        inbound: mpsc::Sender<Inbound>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, RedisError> {
        // fred drops pub/sub messages when this broadcast lags (32 by
        // default); our loop moves each one on at once, so this only has to
        // absorb scheduling hiccups (`REDIS_PUBSUB_BUFFER`).
        let subscriber = crate::redis::subscriber(url, buffer)?;
        // Take the receivers before connecting so that no event is missed.
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        crate::redis::start_connecting(&subscriber, Some(stop.clone()));
        let (changes, changes_rx) = mpsc::unbounded_channel();
        if !keys.sharded() {
            tokio::spawn(apply_changes(subscriber.clone(), changes_rx, stop.clone()));
        }
        // 0 from the start: a node that never reaches Redis must show the
        // series (the backplane-down alerts compare it with 0), not lack it.
        metrics::gauge!(m::BACKPLANE_CONNECTED).set(0.0);
        let backplane = Arc::new(Self {
            keys,
            node_id: node_id.to_string(),
            publisher,
            subscriber,
            status: watch::Sender::new(Status::Disconnected {
                reason: "connecting to Redis".into(),
            }),
            losses: watch::Sender::new(0),
            probes: Mutex::new(HashMap::new()),
            deaf: AtomicBool::new(false),
            changes,
        });
        tokio::spawn(receive_loop(
            backplane.clone(),
            messages,
            inbound,
            stop.clone(),
        ));
        let restored = Arc::new(AtomicBool::new(false));
        let nudge = Arc::new(Notify::new());
        tokio::spawn(restore_on_reconnect(
            backplane.clone(),
            reconnects,
            restored.clone(),
            nudge.clone(),
            stop.clone(),
        ));
        tokio::spawn(monitor(
            backplane.clone(),
            restored.clone(),
            nudge,
            stop.clone(),
        ));
        tokio::spawn(probe_loop(backplane.clone(), restored, stop));
        Ok(backplane)
    }

    async fn subscribe_channel(&self, channel: String) -> Result<(), RedisError> {
        if self.keys.sharded() {
            within(COMMAND_TIMEOUT, self.subscriber.ssubscribe(channel)).await
        } else {
            within(COMMAND_TIMEOUT, self.subscriber.subscribe(channel)).await
        }
    }

    async fn unsubscribe_channel(&self, channel: String) -> Result<(), RedisError> {
        if self.keys.sharded() {
            within(COMMAND_TIMEOUT, self.subscriber.sunsubscribe(channel)).await
        } else {
            within(COMMAND_TIMEOUT, self.subscriber.unsubscribe(channel)).await
        }
    }

    /// The hub's subscribe (`subscribe`: true) or unsubscribe of `topic`.
    /// On one Redis it joins the next batch ([`apply_changes`]); a sharded
    /// subscription is sent alone, as fred never pipelines `SSUBSCRIBE`
    /// (it must follow the slot's redirections).
    async fn change(&self, topic: &str, subscribe: bool) -> Result<(), BackplaneError> {
        let channel = self.keys.topic(topic);
        if self.keys.sharded() {
            let done = match subscribe {
                true => self.subscribe_channel(channel).await,
                false => self.unsubscribe_channel(channel).await,
            };
            return done.map_err(|e| BackplaneError::Unavailable(e.to_string()));
        }
        let (done, answer) = oneshot::channel();
        let change = Change {
            channel,
            subscribe,
            done,
        };
        if self.changes.send(change).is_err() {
            return Err(BackplaneError::Closed);
        }
        match answer.await {
            Ok(result) => result.map_err(BackplaneError::Unavailable),
            Err(_) => Err(BackplaneError::Closed),
        }
    }

    /// Subscribes again to every channel, routed by the current slot layout
    /// (a slot that moved is served by its new owner), and tells the hub to
    /// repair what was missed.
    async fn resubscribe(&self) -> Result<(), RedisError> {
        if self.keys.sharded() {
            within(COMMAND_TIMEOUT, self.subscriber.sync_cluster()).await?;
        }
        self.resubscribe_tracked().await?;
        self.losses.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Subscribes again to every channel fred tracks. fred's own
    /// `resubscribe_all` sends an empty `PSUBSCRIBE`, which a cluster refuses.
    async fn resubscribe_tracked(&self) -> Result<(), RedisError> {
        let channels: Vec<String> = self
            .subscriber
            .tracked_channels()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        if !channels.is_empty() {
            within(COMMAND_TIMEOUT, self.subscriber.subscribe(channels)).await?;
        }
        let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
        for c in self.subscriber.tracked_shard_channels() {
            by_slot
                .entry(fred::util::redis_keyslot(c.as_bytes()))
                .or_default()
                .push(c.to_string());
        }
        for channels in by_slot.into_values() {
            within(COMMAND_TIMEOUT, self.subscriber.ssubscribe(channels)).await?;
        }
        Ok(())
    }

    /// Records a probe that came back; true when `channel` is one of ours.
    fn probe_returned(&self, channel: &str, payload: &[u8]) -> bool {
        let mut probes = self.probes.lock().unwrap();
        let Some(probe) = probes.get_mut(channel) else {
            return false;
        };
        if let Some(n) = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.parse().ok())
        {
            probe.received = probe.received.max(n);
        }
        true
    }

    /// The probe channels for the current layout: one for a single server,
    /// one per primary in a cluster (a tag whose slot that primary serves).
    fn probe_channels(&self) -> Vec<String> {
        if !self.keys.sharded() {
            return vec![self.keys.probe(&self.node_id, 0)];
        }
        let Some(state) = self.subscriber.cached_cluster_state() else {
            return Vec::new();
        };
        let mut channels = Vec::new();
        for primary in state.unique_primary_nodes() {
            let owns = |slot: u16| {
                state
                    .slots()
                    .iter()
                    .any(|r| r.primary == primary && (r.start..=r.end).contains(&slot))
            };
            if let Some(tag) = (0..100_000u32).find(|t| {
                owns(fred::util::redis_keyslot(
                    self.keys.probe(&self.node_id, *t).as_bytes(),
                ))
            }) {
                channels.push(self.keys.probe(&self.node_id, tag));
            }
        }
        channels
    }

    /// The slot layout as comparable data: (start, end, primary) per range.
    fn layout(&self) -> Vec<(u16, u16, String)> {
        let Some(state) = self.subscriber.cached_cluster_state() else {
            return Vec::new();
        };
        let mut layout: Vec<_> = state
            .slots()
            .iter()
            .map(|r| (r.start, r.end, r.primary.to_string()))
            .collect();
        layout.sort();
        layout
    }
}

impl Backplane for RedisBackplane {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            let channel = self.keys.topic(topic);
            let sent = if self.keys.sharded() {
                self.publisher.spublish(&channel, payload).await
            } else {
                self.publisher.publish(&channel, payload).await
            };
            sent.map(|_| ())
                .map_err(|e| BackplaneError::Unavailable(e.to_string()))
        })
    }

    fn subscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(self.change(topic, true))
    }

    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(self.change(topic, false))
    }

    fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    fn losses(&self) -> watch::Receiver<u64> {
        self.losses.subscribe()
    }
}

/// Sends the hub's (un)subscribes in batches: everything queued while the
/// previous batch was on its way goes in one `SUBSCRIBE` and one
/// `UNSUBSCRIBE`. fred sends pub/sub commands one at a time, each waiting
/// for its answer, on the connection that also brings the messages; one
/// command per topic made a churn of short-lived topics (a reconnect storm,
/// a hostile client) queue on Redis round trips and cost a command's
/// overhead each. A lone change still goes at once. A channel named twice
/// in one batch (subscribe, then unsubscribe) splits it, so the order holds.
async fn apply_changes(
    subscriber: SubscriberClient,
    mut changes: mpsc::UnboundedReceiver<Change>,
    stop: CancellationToken,
) {
    let mut queued = Vec::new();
    let mut named = HashSet::new();
    loop {
        let n = tokio::select! {
            n = changes.recv_many(&mut queued, MAX_BATCH) => n,
            _ = stop.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        let mut batch = Vec::with_capacity(queued.len());
        for change in queued.drain(..) {
            if !named.insert(change.channel.clone()) {
                send_batch(&subscriber, std::mem::take(&mut batch)).await;
                named.clear();
                named.insert(change.channel.clone());
            }
            batch.push(change);
        }
        send_batch(&subscriber, batch).await;
        named.clear();
    }
}

/// One `SUBSCRIBE` for the batch's subscribes and one `UNSUBSCRIBE` for its
/// unsubscribes, under way together (no channel is in both), so a batch
/// waits at most one command timeout while Redis is away; every change
/// hears its command's outcome.
async fn send_batch(subscriber: &SubscriberClient, batch: Vec<Change>) {
    let (subscribes, unsubscribes): (Vec<Change>, Vec<Change>) =
        batch.into_iter().partition(|c| c.subscribe);
    let send = |subscribe: bool, changes: Vec<Change>| async move {
        if changes.is_empty() {
            return;
        }
        let channels: Vec<String> = changes.iter().map(|c| c.channel.clone()).collect();
        let sent = match subscribe {
            true => within(COMMAND_TIMEOUT, subscriber.subscribe(channels)).await,
            false => within(COMMAND_TIMEOUT, subscriber.unsubscribe(channels)).await,
        };
        let outcome = sent.map_err(|e| e.to_string());
        for change in changes {
            let _ = change.done.send(outcome.clone());
        }
    };
    tokio::join!(send(true, subscribes), send(false, unsubscribes));
}

/// Moves every message into the hub's queue at once. Never ends on lag:
/// lost messages are counted and logged.
async fn receive_loop(
    backplane: Arc<RedisBackplane>,
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    inbound: mpsc::Sender<Inbound>,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            msg = messages.recv() => msg,
            _ = stop.cancelled() => return,
        };
        match msg {
            Ok(msg) => {
                let received_at = Instant::now();
                let payload = msg.value.into_bytes().unwrap_or_default();
                let Some(topic) = backplane.keys.topic_of(&msg.channel) else {
                    backplane.probe_returned(&msg.channel, &payload);
                    continue;
                };
                let topic = topic.to_string();
                let item = Inbound {
                    topic,
                    payload,
                    received_at,
                };
                if inbound.send(item).await.is_err() {
                    return;
                }
            }
            Err(RecvError::Lagged(n)) => {
                metrics::counter!(m::BACKPLANE_LAGGED).increment(n);
                tracing::warn!(lost = n, "backplane receiver lagged; messages lost");
                // History topics repair what was lost, the tail included.
                backplane.losses.send_modify(|l| *l += 1);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// After every reconnect, subscribes again to every tracked channel; only
/// then may the node report ready again.
async fn restore_on_reconnect(
    backplane: Arc<RedisBackplane>,
    mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    restored: Arc<AtomicBool>,
    nudge: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            e = reconnects.recv() => e,
            _ = stop.cancelled() => return,
        };
        match event {
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
        // Not ready from this (re)connection until its subscriptions are
        // back. Set here, by the event, not by a poll of the connection
        // state: a poll that sees a short drop after the restore (a
        // cluster client reconnecting to one node) would leave the node
        // "restoring" for good.
        restored.store(false, Ordering::Release);
        nudge.notify_one();
        loop {
            match backplane.resubscribe_tracked().await {
                Ok(()) => {
                    let n = backplane.subscriber.tracked_channels().len();
                    tracing::info!(channels = n, "backplane subscriptions restored");
                    restored.store(true, Ordering::Release);
                    backplane.losses.send_modify(|n| *n += 1);
                    nudge.notify_one();
                    break;
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "restoring backplane subscriptions failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }
}

/// Keeps [`Status`] true: connected only when the subscriber connection is
/// up, its subscriptions are restored, and Redis answers a PING.
async fn monitor(
    backplane: Arc<RedisBackplane>,
    restored: Arc<AtomicBool>,
    nudge: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Before the first connection the states a start passes through (the
    // connection not up yet, the subscriptions being restored) are no
    // warning; one that lasts past STARTUP_GRACE is.
    let started = Instant::now();
    let mut connected_once = false;
    let mut warned_at_start = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = nudge.notified() => {}
            _ = stop.cancelled() => return,
        }
        let status = if !backplane.subscriber.is_connected() {
            Status::Disconnected {
                reason: if connected_once {
                    "Redis subscriber connection is down"
                } else {
                    "connecting to Redis"
                }
                .into(),
            }
        } else if !restored.load(Ordering::Acquire) {
            Status::Disconnected {
                reason: "restoring Redis subscriptions".into(),
            }
        } else if backplane.deaf.load(Ordering::Acquire) {
            Status::Disconnected {
                reason: "a backplane subscription stopped receiving; subscribing again".into(),
            }
        } else {
            match tokio::time::timeout(Duration::from_secs(1), backplane.publisher.ping()).await {
                Ok(Ok(())) => Status::Connected,
                Ok(Err(e)) => Status::Disconnected {
                    reason: format!("Redis does not answer: {e}"),
                },
                Err(_) => Status::Disconnected {
                    reason: "Redis does not answer PING within 1s".into(),
                },
            }
        };
        let changed = backplane.status.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            *current = status.clone();
            true
        });
        if changed {
            metrics::gauge!(m::BACKPLANE_CONNECTED).set(if status.is_connected() {
                1.0
            } else {
                0.0
            });
            match &status {
                Status::Connected => {
                    connected_once = true;
                    tracing::info!("backplane connected");
                }
                Status::Disconnected { reason } if connected_once => {
                    tracing::warn!(reason, "backplane not ready")
                }
                Status::Disconnected { reason } => tracing::info!(reason, "backplane connecting"),
            }
        }
        if !connected_once && !warned_at_start && started.elapsed() >= STARTUP_GRACE {
            warned_at_start = true;
            if let Status::Disconnected { reason } = &status {
                tracing::warn!(reason, "backplane not ready");
            }
        }
    }
}

/// Probes the node's own subscriptions every [`PROBE_INTERVAL`] (see the
/// module docs) and, in cluster mode, follows the slot layout.
async fn probe_loop(
    backplane: Arc<RedisBackplane>,
    restored: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut layout = Vec::new();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if !backplane.subscriber.is_connected() || !restored.load(Ordering::Acquire) {
            // Reconnecting: `restore_on_reconnect` resubscribes; probes
            // restart from scratch afterwards.
            backplane.probes.lock().unwrap().clear();
            continue;
        }
        if backplane.keys.sharded() {
            if within(COMMAND_TIMEOUT, backplane.subscriber.sync_cluster())
                .await
                .is_err()
            {
                continue;
            }
            let now = backplane.layout();
            if !layout.is_empty() && now != layout {
                tracing::info!("cluster slot layout changed: subscribing again on the new owners");
                if let Err(e) = backplane.resubscribe().await {
                    tracing::warn!(cause = %e, "resubscribing after a layout change failed");
                    continue;
                }
            }
            layout = now;
        }
        // Keep exactly the probe channels of the current layout subscribed.
        let wanted = backplane.probe_channels();
        let (new, stale): (Vec<String>, Vec<String>) = {
            let probes = backplane.probes.lock().unwrap();
            (
                wanted
                    .iter()
                    .filter(|c| !probes.contains_key(*c))
                    .cloned()
                    .collect(),
                probes
                    .keys()
                    .filter(|c| !wanted.contains(c))
                    .cloned()
                    .collect(),
            )
        };
        for channel in stale {
            backplane.probes.lock().unwrap().remove(&channel);
            let _ = backplane.unsubscribe_channel(channel).await;
        }
        for channel in new {
            if backplane.subscribe_channel(channel.clone()).await.is_ok() {
                backplane.probes.lock().unwrap().insert(
                    channel,
                    Probe {
                        sent: 0,
                        sent_at: Instant::now(),
                        received: 0,
                    },
                );
            }
        }
        // A probe that did not come back in time: deaf.
        let late: Vec<String> = backplane
            .probes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.received < p.sent && p.sent_at.elapsed() > PROBE_DEADLINE)
            .map(|(c, _)| c.clone())
            .collect();
        if !late.is_empty() {
            metrics::counter!(m::BACKPLANE_PROBE_FAILURES).increment(late.len() as u64);
            tracing::warn!(channels = ?late, "backplane probe did not come back: subscribing again");
            backplane.deaf.store(true, Ordering::Release);
            if let Err(e) = backplane.resubscribe().await {
                tracing::warn!(cause = %e, "resubscribing a deaf backplane failed; retrying");
            }
            backplane.probes.lock().unwrap().clear();
            continue;
        }
        // Hearing again needs every probe channel subscribed (a channel
        // whose subscribe failed is not tracked: an empty or partial set
        // would pass for all probes back) and a probe back on each since
        // (a channel added again starts at 0 sent, 0 received). Only a
        // node that went deaf waits for that; the others are not deaf.
        let hears = {
            let probes = backplane.probes.lock().unwrap();
            wanted.iter().all(|c| probes.contains_key(c))
                && probes.values().all(|p| p.sent > 0 && p.received == p.sent)
        };
        if hears {
            backplane.deaf.store(false, Ordering::Release);
        }
        // Send the next round; a probe still in flight keeps its send time.
        seq += 1;
        let channels: Vec<String> = backplane
            .probes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.received == p.sent)
            .map(|(c, _)| c.clone())
            .collect();
        for channel in channels {
            let payload = Bytes::from(seq.to_string());
            let sent = if backplane.keys.sharded() {
                backplane.publisher.spublish(&channel, payload).await
            } else {
                backplane.publisher.publish(&channel, payload).await
            };
            if sent.is_ok()
                && let Some(p) = backplane.probes.lock().unwrap().get_mut(&channel)
            {
                p.sent = seq;
                p.sent_at = Instant::now();
            }
        }
    }
}
