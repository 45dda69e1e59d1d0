//! A hub on the embedded backplane and history, and probes, for unit tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::*;
use crate::backplane::Inbound;
use crate::backplane::inbound_queue;
use crate::backplane::memory::MemoryBackplane;
use crate::history::memory::MemoryHistory;

/// `history` lists the `HISTORY_TOPICS` patterns.
pub(crate) fn hub(history: &[&str]) -> (Hub, mpsc::Receiver<Inbound>) {
    build(history, 1, Duration::ZERO, 100)
}

/// Like [`hub`], fanned out in `slices` parallel slices, keeping 1,000
/// publications per history topic.
pub(crate) fn sliced(history: &[&str], slices: usize) -> (Hub, mpsc::Receiver<Inbound>) {
    build(history, slices, Duration::ZERO, 1000)
}

/// Like [`hub`], one slice handing out at most once per `flush_interval`.
pub(crate) fn flushing(flush_interval: Duration) -> (Hub, mpsc::Receiver<Inbound>) {
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

#[derive(Default)]
pub(crate) struct Probe {
    pub(crate) frames: Mutex<Vec<String>>,
    pub(crate) full: AtomicBool,
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
    pub(crate) fn offsets(&self) -> Vec<u64> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter_map(|f| serde_json::from_str::<serde_json::Value>(f).ok())
            .filter_map(|v| v["offset"].as_u64())
            .collect()
    }
}

pub(crate) fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_string()).unwrap()
}

pub(crate) fn quiet() -> Announce {
    Box::new(|_| {})
}

pub(crate) async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Subscribes a probe to `h.x` that records its `subscribed` answer first.
pub(crate) async fn subscribe_recording(
    hub: &Hub,
    id: ConnId,
    since: Option<(u64, &str)>,
) -> Arc<Probe> {
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

/// Waits (real time) until `done` holds, for tests on a multi-thread runtime.
pub(crate) async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The `n` field of each plain event a probe received, in order.
pub(crate) fn numbers(probe: &Probe) -> Vec<u64> {
    probe
        .frames
        .lock()
        .unwrap()
        .iter()
        .filter_map(|f| serde_json::from_str::<serde_json::Value>(f).ok())
        .filter_map(|v| v["data"]["n"].as_u64())
        .collect()
}
