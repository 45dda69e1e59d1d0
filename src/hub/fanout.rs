//! The fan-out slices: each hands the dispatcher's items, in its order, to
//! its share of every topic's subscribers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Delivery, GateState, Hub, Item, Subscriber};
use crate::history::Seam;
use crate::metrics as m;

/// One item on its way through the slices; the last slice done with it
/// records the fan-out latency.
pub(super) struct Work {
    pub(super) item: Item,
    pub(super) left: AtomicUsize,
}

/// Items a slice task may have queued before the dispatcher waits for it.
pub(super) const SLICE_QUEUE: usize = 1024;

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
    pub(super) fn inline(&self) -> bool {
        self.slices <= 1 && self.flush_interval.is_zero()
    }
}

impl Hub {
    /// Hands `items` (in order) to the local subscribers of their topics in
    /// fan-out slice `slice`. Runs on that slice's task only (or on the
    /// dispatcher when it fans out itself), which is what keeps each
    /// connection in order. Consecutive items of one topic go to one
    /// subscriber after another, so each connection's writer finds them
    /// queued together.
    pub(super) fn deliver_slice(&self, slice: usize, items: &[&Item]) {
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
    pub(super) fn fanned_out(&self, item: &Item) {
        if let Item::Pub(publication) = item {
            metrics::histogram!(m::FANOUT_SECONDS)
                .record(publication.received_at.elapsed().as_secs_f64());
        }
    }

    /// One fan-out slice: the dispatcher's items, in its order, to the
    /// slice's share of each topic, at most once per flush interval. Ends
    /// with the dispatcher.
    pub(super) async fn serve_slice(self, slice: usize, mut rx: mpsc::Receiver<Arc<Work>>) {
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
}

/// Hands one item to one subscriber, through its seam when it has one.
/// `None` when the seam filtered it out.
pub(super) fn hand(sub: &dyn Subscriber, item: &Item, seam: Option<&mut Seam>) -> Option<Delivery> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::Inbound;
    use crate::hub::ConnId;
    use crate::hub::testing::{self, *};
    use std::time::Instant;

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
