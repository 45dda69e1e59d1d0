//! The embedded backplane of a single node: a publish is looped straight back
//! into this node's inbound queue when the topic has local subscribers.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::{Backplane, BackplaneError, Inbound, Status};

pub struct MemoryBackplane {
    inbound: mpsc::Sender<Inbound>,
    /// Topics the hub asked for. std Mutex: held only for a lookup, never
    /// across `.await`.
    subscribed: Mutex<HashSet<String>>,
    status: watch::Sender<Status>,
}

impl MemoryBackplane {
    pub fn new(inbound: mpsc::Sender<Inbound>) -> Self {
        metrics::gauge!(crate::metrics::BACKPLANE_CONNECTED).set(1.0);
        Self {
            inbound,
            subscribed: Mutex::new(HashSet::new()),
            status: watch::Sender::new(Status::Connected),
        }
    }
}

impl Backplane for MemoryBackplane {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>> {
        Box::pin(async move {
            let wanted = self.subscribed.lock().unwrap().contains(topic);
            if wanted {
                let msg = Inbound {
                    topic: topic.to_string(),
                    payload,
                    received_at: Instant::now(),
                };
                self.inbound
                    .send(msg)
                    .await
                    .map_err(|_| BackplaneError::Closed)?;
            }
            Ok(())
        })
    }

    fn subscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>> {
        self.subscribed.lock().unwrap().insert(topic.to_string());
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>> {
        self.subscribed.lock().unwrap().remove(topic);
        Box::pin(async { Ok(()) })
    }

    fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// In memory nothing is ever lost in transit.
    fn losses(&self) -> watch::Receiver<u64> {
        watch::channel(0).1
    }
}
