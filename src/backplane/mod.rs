//! The backplane carries publications between nodes.
//!
//! **Delivery guarantee: at most once, in order per topic per publisher.** A
//! node receives a topic's publications only while it is subscribed to it, so
//! anything published during a Redis outage or before the first local
//! subscriber is not delivered later. Every source (HTTP publish, leader
//! timers, device changes, external `PUBLISH`) goes through the backplane;
//! no node delivers its own publish by a local shortcut, so every node sees
//! the same order per topic.
//!
//! Received messages are handed over as [`Inbound`] on a bounded queue that
//! the hub's dispatcher drains; the backplane never parses payloads.

pub mod memory;
pub mod redis;

use std::time::Instant;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};

/// Capacity of the queue between a backplane and the hub dispatcher. Large,
/// because a short stall of the dispatcher must not push back into Redis.
pub const INBOUND_QUEUE: usize = 65_536;

/// One message received for a topic.
#[derive(Debug)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
    /// When this node received it: the start of the fan-out latency.
    pub received_at: Instant,
}

/// Whether the backplane can currently receive publications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Connected,
    Disconnected { reason: String },
}

impl Status {
    pub fn is_connected(&self) -> bool {
        matches!(self, Status::Connected)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    #[error("backplane unavailable: {0}")]
    Unavailable(String),
    #[error("backplane closed")]
    Closed,
}

/// Publish/subscribe between nodes. Implementations: [`memory::MemoryBackplane`]
/// (one embedded node) and [`redis::RedisBackplane`].
///
/// `subscribe` and `unsubscribe` are called by the hub, one call at a time
/// per topic, on a topic's first local subscriber and after its last one.
/// `subscribe` returns once publications for the topic will be received.
pub trait Backplane: Send + Sync + 'static {
    /// `memory` or `redis`, for health output.
    fn kind(&self) -> &'static str;
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), BackplaneError>>;
    fn subscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>>;
    fn unsubscribe<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<(), BackplaneError>>;
    fn status(&self) -> watch::Receiver<Status>;
    /// Counts the times the backplane may have lost publications: its
    /// subscriptions were (re)established after a connection loss, or its
    /// receiver lagged. History topics are checked for gaps on every change.
    fn losses(&self) -> watch::Receiver<u64>;
}

/// The queue from a backplane to the hub dispatcher.
pub fn inbound_queue() -> (mpsc::Sender<Inbound>, mpsc::Receiver<Inbound>) {
    mpsc::channel(INBOUND_QUEUE)
}
