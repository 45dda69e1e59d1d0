//! The Redis backplane: `PUBLISH {prefix}:t:{topic}` on a command connection,
//! and a dedicated subscriber connection that is subscribed to exactly the
//! topics with local subscribers.
//!
//! fred pitfalls handled here (see CRATE-NOTES): reconnection is configured
//! in `crate::redis`; subscriptions are restored by our own reconnect
//! handler, which also gates readiness; messages are moved from fred's
//! broadcast into our own queue at once by a loop that counts lag instead of
//! ending on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use futures_util::future::BoxFuture;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Backplane, BackplaneError, Inbound, Status};
use crate::metrics as m;
use crate::redis::{COMMAND_TIMEOUT, Keys, Redis, RedisError, within};

/// How often the connection health is checked.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

pub struct RedisBackplane {
    keys: Keys,
    publisher: Redis,
    subscriber: SubscriberClient,
    status: watch::Sender<Status>,
    restorations: watch::Sender<u64>,
}

impl RedisBackplane {
    /// Starts the subscriber connection and its tasks; they stop with `stop`.
    pub fn start(
        url: &str,
        keys: Keys,
        publisher: Redis,
        inbound: mpsc::Sender<Inbound>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, RedisError> {
        // fred drops pub/sub messages when this broadcast lags (32 by
        // default); our loop moves each one on at once, so this only has to
        // absorb scheduling hiccups.
        let subscriber = crate::redis::subscriber(url, 8_192)?;
        // Take the receivers before connecting so that no event is missed.
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        subscriber.connect();
        let backplane = Arc::new(Self {
            keys: keys.clone(),
            publisher,
            subscriber,
            status: watch::Sender::new(Status::Disconnected {
                reason: "connecting to Redis".into(),
            }),
            restorations: watch::Sender::new(0),
        });
        tokio::spawn(receive_loop(
            messages,
            keys.topic_prefix(),
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
        tokio::spawn(monitor(backplane.clone(), restored, nudge, stop));
        Ok(backplane)
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
            self.publisher
                .publish(&self.keys.topic(topic), payload)
                .await
                .map(|_| ())
                .map_err(|e| BackplaneError::Unavailable(e.to_string()))
        })
    }

    fn subscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            within(
                COMMAND_TIMEOUT,
                self.subscriber.subscribe(self.keys.topic(topic)),
            )
            .await
            .map_err(|e| BackplaneError::Unavailable(e.to_string()))
        })
    }

    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            within(
                COMMAND_TIMEOUT,
                self.subscriber.unsubscribe(self.keys.topic(topic)),
            )
            .await
            .map_err(|e| BackplaneError::Unavailable(e.to_string()))
        })
    }

    fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    fn restorations(&self) -> watch::Receiver<u64> {
        self.restorations.subscribe()
    }
}

/// Moves every message into the hub's queue at once. Never ends on lag:
/// lost messages are counted and logged.
async fn receive_loop(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    topic_prefix: String,
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
                let Some(topic) = msg.channel.strip_prefix(topic_prefix.as_str()) else {
                    continue;
                };
                let topic = topic.to_string();
                let payload = msg.value.into_bytes().unwrap_or_default();
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
        loop {
            match within(COMMAND_TIMEOUT, backplane.subscriber.resubscribe_all()).await {
                Ok(()) => {
                    let n = backplane.subscriber.tracked_channels().len();
                    tracing::info!(channels = n, "backplane subscriptions restored");
                    restored.store(true, Ordering::Release);
                    backplane.restorations.send_modify(|n| *n += 1);
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
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = nudge.notified() => {}
            _ = stop.cancelled() => return,
        }
        let status = if !backplane.subscriber.is_connected() {
            restored.store(false, Ordering::Release);
            Status::Disconnected {
                reason: "Redis subscriber connection is down".into(),
            }
        } else if !restored.load(Ordering::Acquire) {
            Status::Disconnected {
                reason: "restoring Redis subscriptions".into(),
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
                Status::Connected => tracing::info!("backplane connected"),
                Status::Disconnected { reason } => tracing::warn!(reason, "backplane not ready"),
            }
        }
    }
}
