//! Cluster-wide topic occupancy for webhooks: the hub says when a topic's
//! local client subscribers may have changed (first one in, last one out);
//! a single worker brings the ledger in line with the hub and sends
//! `topic_occupied` / `topic_vacated` when the ledger says the change was
//! the cluster's transition.
//!
//! The worker keeps no queue of changes, only the set of topics to look at
//! again (bounded by the topics this node has): it compares what the hub
//! has now with what this node last told the ledger. A join and leave in
//! quick succession may so cancel out and send nothing, which is right: the
//! cluster never saw the topic empty. A failed ledger call leaves the topic
//! to look at again after a pause.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::Ledger;
use crate::backend::webhooks::{Event, Webhooks};
use crate::hub::Hub;

/// Ledger calls run at most this many at a time.
const PARALLEL: usize = 32;
/// Pause after a failed ledger call before the topic is looked at again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Cheap-to-clone handle to the occupancy worker.
#[derive(Clone)]
pub struct Occupancy {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    hub: Hub,
    ledger: Arc<dyn Ledger>,
    webhooks: Webhooks,
    /// Topics to look at again. std Mutex, never held across `.await`.
    dirty: Mutex<HashSet<Arc<str>>>,
    /// Topics this node has told the ledger it holds.
    held: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
    /// Set while the worker is between taking `dirty` and finishing it.
    busy: std::sync::atomic::AtomicBool,
    settled: Notify,
}

impl Occupancy {
    /// Starts the worker; it touches the ledger only once `ready` is true
    /// (the node's leftovers from an earlier life are cleaned first).
    pub fn start(
        node: &str,
        hub: Hub,
        ledger: Arc<dyn Ledger>,
        webhooks: Webhooks,
        ready: watch::Receiver<bool>,
    ) -> Occupancy {
        let occupancy = Occupancy {
            inner: Arc::new(Inner {
                node: node.to_string(),
                hub,
                ledger,
                webhooks,
                dirty: Mutex::new(HashSet::new()),
                held: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                busy: std::sync::atomic::AtomicBool::new(false),
                settled: Notify::new(),
            }),
        };
        tokio::spawn(occupancy.clone().run(ready));
        occupancy
    }

    /// The hub's observer: `topic`'s local client subscribers changed from
    /// none to some or back. Never blocks.
    pub fn touch(&self, topic: &str) {
        let first = {
            let mut dirty = self.inner.dirty.lock().unwrap();
            let first = dirty.is_empty();
            dirty.insert(Arc::from(topic));
            first
        };
        if first {
            self.inner.wake.notify_one();
        }
    }

    async fn run(self, mut ready: watch::Receiver<bool>) {
        let _ = ready.wait_for(|r| *r).await;
        loop {
            let wake = self.inner.wake.notified();
            let topics: Vec<Arc<str>> = {
                let mut dirty = self.inner.dirty.lock().unwrap();
                self.inner
                    .busy
                    .store(!dirty.is_empty(), std::sync::atomic::Ordering::Release);
                dirty.drain().collect()
            };
            if topics.is_empty() {
                self.inner.settled.notify_waiters();
                wake.await;
                continue;
            }
            let mut failed = false;
            for chunk in topics.chunks(PARALLEL) {
                let results =
                    futures_util::future::join_all(chunk.iter().map(|t| self.sync(t))).await;
                failed |= results.iter().any(|ok| !ok);
            }
            self.inner
                .busy
                .store(false, std::sync::atomic::Ordering::Release);
            if failed {
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }

    /// Brings the ledger in line with the hub for `topic`; false when the
    /// ledger call failed (the topic is looked at again).
    async fn sync(&self, topic: &Arc<str>) -> bool {
        let want = self.inner.hub.has_clients(topic);
        let has = self.inner.held.lock().unwrap().contains(topic);
        let res = match (want, has) {
            (true, false) => self
                .inner
                .ledger
                .occupy(&self.inner.node, topic)
                .await
                .map(|first| {
                    self.inner.held.lock().unwrap().insert(topic.clone());
                    if let Some(seq) = first {
                        self.inner.webhooks.emit(Event::topic_occupied(topic, seq));
                    }
                }),
            (false, true) => self.vacate(topic).await,
            _ => Ok(()),
        };
        match res {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic = &**topic, cause = %e, "occupancy not recorded; retrying");
                self.inner.dirty.lock().unwrap().insert(topic.clone());
                false
            }
        }
    }

    async fn vacate(&self, topic: &Arc<str>) -> Result<(), crate::redis::RedisError> {
        let last = self.inner.ledger.vacate(&self.inner.node, topic).await?;
        self.inner.held.lock().unwrap().remove(topic);
        if let Some(seq) = last {
            self.inner.webhooks.emit(Event::topic_vacated(topic, seq));
        }
        Ok(())
    }

    /// Waits until every change the hub reported is in the ledger (or
    /// `deadline` passes).
    pub async fn settle(&self, deadline: tokio::time::Instant) {
        loop {
            let settled = self.inner.settled.notified();
            let idle = self.inner.dirty.lock().unwrap().is_empty()
                && !self.inner.busy.load(std::sync::atomic::Ordering::Acquire);
            if idle {
                return;
            }
            self.inner.wake.notify_one();
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return;
            }
        }
    }

    /// The drain's last step: this node gives up every topic it still holds.
    pub async fn release_all(&self) {
        let held: Vec<Arc<str>> = self.inner.held.lock().unwrap().iter().cloned().collect();
        for topic in held {
            if let Err(e) = self.vacate(&topic).await {
                tracing::warn!(topic = &*topic, cause = %e, "occupancy not released");
            }
        }
    }

    /// After this node was reaped while alive (cut off from Redis longer
    /// than the registry TTL): every topic it holds is added again, and
    /// the transitions that causes are reported.
    pub fn reassert(&self) {
        let held: Vec<Arc<str>> = self.inner.held.lock().unwrap().drain().collect();
        for topic in held {
            self.touch(&topic);
        }
    }
}
