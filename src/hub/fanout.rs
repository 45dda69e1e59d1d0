//! The fan-out slices: each hands the dispatcher's items, in its order, to
//! its share of every topic's subscribers.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::pacer::{Held, Pacer};
use super::{ConnId, Delivery, GateState, Hub, Item, Publication, Subscriber};
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
    /// `WEBSOCKET_FLUSH_INTERVAL_MS`: the longest a busy slice may hold a
    /// publication so that its topic's next ones reach each connection in
    /// the same write ([`Pacer`] decides how long, from the load); zero:
    /// every publication goes at once.
    pub max_hold: Duration,
}

impl Fanout {
    /// One slice per worker thread of the current tokio runtime
    /// (`TOKIO_WORKER_THREADS`; one outside a runtime).
    pub fn per_worker(max_hold: Duration) -> Self {
        let slices = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .unwrap_or(1);
        Self { slices, max_hold }
    }

    /// Whether the dispatcher can fan out itself: one slice, no batching.
    pub(super) fn inline(&self) -> bool {
        self.slices <= 1 && self.max_hold.is_zero()
    }
}

impl Hub {
    /// Lets the pacers follow the machine's CPU pressure (see
    /// [`super::pressure`]); until then they work from their demand alone,
    /// which the hub's tests rely on for the same pacing on a busy machine.
    /// `None` without batching or where the system reports no pressure.
    pub fn spawn_pressure_sampler(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.inner.fanout.max_hold.is_zero() {
            return None;
        }
        self.inner.pressure.spawn_sampler()
    }

    /// Hands `items` (in order) to the local subscribers of their topics in
    /// fan-out slice `slice`. Runs on that slice's task only (or on the
    /// dispatcher when it fans out itself), which is what keeps each
    /// connection in order. Consecutive items of one topic go to one
    /// subscriber after another, so each connection's writer finds them
    /// queued together.
    /// `handed` learns each topic's subscriber count in this slice.
    pub(super) fn deliver_slice(
        &self,
        slice: usize,
        items: &[&Item],
        handed: &mut dyn FnMut(&str, usize),
    ) {
        // Per-transport counts, summed here so the metric is touched once per
        // batch and slice, not once per delivery: a slot for each transport
        // (`ws`, `socketio`, `sse`, `internal`) and one to spare.
        let mut queued: [(&'static str, u64); 5] = [("", 0); 5];
        let mut rest = items;
        while let Some(first) = rest.first() {
            let topic = first.topic();
            let n = rest.iter().take_while(|i| i.topic() == topic).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            // Taken before the topic's shard: one shard locked at a time.
            let exclusions: Vec<Option<HashSet<ConnId>>> = match group.iter().any(|i| routed(i)) {
                true => group.iter().map(|i| self.exclusions(i, slice)).collect(),
                false => Vec::new(),
            };
            let topics = self.shard(topic).read().unwrap();
            let Some(subs) = topics.get(topic) else {
                continue;
            };
            handed(topic, subs.slices[slice].len());
            for (&id, member) in &subs.slices[slice] {
                for (i, &item) in group.iter().enumerate() {
                    if exclusions
                        .get(i)
                        .and_then(Option::as_ref)
                        .is_some_and(|ids| ids.contains(&id))
                    {
                        continue;
                    }
                    let delivery = match &member.gate {
                        None => hand(&*member.sub, item, subs.id, None),
                        Some(gate) => {
                            let mut state = gate.state.lock().unwrap();
                            match &mut *state {
                                GateState::Closed(held) => {
                                    held.push(item.clone());
                                    continue;
                                }
                                GateState::Open(seam) => {
                                    hand(&*member.sub, item, subs.id, Some(seam))
                                }
                            }
                        }
                    };
                    if delivery == Some(Delivery::Queued) && matches!(item, Item::Pub(_)) {
                        let t = member.sub.transport();
                        // Never full: there are fewer transports than slots.
                        if let Some(slot) = queued
                            .iter_mut()
                            .find(|(name, _)| *name == t || name.is_empty())
                        {
                            *slot = (t, slot.1 + 1);
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
    /// slice's share of each topic, held as long as its [`Pacer`] allows so
    /// that a busy topic's publications reach each connection together.
    /// Ends with the dispatcher.
    pub(super) async fn serve_slice(self, slice: usize, mut rx: mpsc::Receiver<Arc<Work>>) {
        let mut pacer = Pacer::new(
            self.inner.fanout.max_hold,
            self.inner.pressure.clone(),
            Instant::now(),
        );
        let mut held = Held::default();
        let mut batch: Vec<Arc<Work>> = Vec::with_capacity(64);
        loop {
            let before = batch.len();
            let received = match held.due() {
                _ if batch.len() >= SLICE_QUEUE => 0,
                None => match rx.recv_many(&mut batch, SLICE_QUEUE).await {
                    0 => return,
                    n => n,
                },
                Some(due) => tokio::select! {
                    biased;
                    n = rx.recv_many(&mut batch, SLICE_QUEUE - before) => match n {
                        0 => 0, // Closed: hand out what is held, then end.
                        n => n,
                    },
                    () = tokio::time::sleep_until(due) => 0,
                },
            };
            let now = Instant::now();
            for work in &batch[before..before + received] {
                held.add(work.item.topic(), pacer.arrive(&work.item, now));
            }
            if !held.ready(now) && batch.len() < SLICE_QUEUE && received > 0 {
                continue;
            }
            let items: Vec<&Item> = batch.iter().map(|w| &w.item).collect();
            self.deliver_slice(slice, &items, &mut |topic, n| pacer.handed(topic, n));
            drop(items);
            held.clear();
            for work in batch.drain(..) {
                if work.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.fanned_out(&work.item);
                }
            }
            if received == 0 && rx.is_closed() && rx.is_empty() {
                return;
            }
        }
    }
}

impl Hub {
    /// Whether connection `id` must not get `p` (its routing: `except`, or an
    /// earlier room of the same emit that `id` subscribes to on this node).
    pub(super) fn excluded(&self, p: &Publication, id: ConnId) -> bool {
        let Some(r) = &p.routing else {
            return false;
        };
        r.except_ids.contains(&id)
            || r.except_topics
                .iter()
                .chain(&r.earlier_rooms)
                .any(|t| self.is_member(t, id))
    }

    /// The connections of fan-out slice `slice` that must not get `item`
    /// ([`Hub::excluded`] for all of them at once), `None` when it has no
    /// routing. Every topic splits its members by the same rule (connection
    /// id modulo the hub's slices), so only that slice of each is needed.
    fn exclusions(&self, item: &Item, slice: usize) -> Option<HashSet<ConnId>> {
        let Item::Pub(p) = item else {
            return None;
        };
        let r = p.routing.as_ref()?;
        let mut ids: HashSet<ConnId> = r.except_ids.iter().copied().collect();
        for t in r.except_topics.iter().chain(&r.earlier_rooms) {
            if let Some(m) = self.shard(t).read().unwrap().get(&**t) {
                ids.extend(m.slices[slice].keys().copied());
            }
        }
        Some(ids)
    }
}

fn routed(item: &Item) -> bool {
    matches!(item, Item::Pub(p) if p.routing.is_some())
}

/// Hands one item to one subscriber, through its seam when it has one.
/// `None` when the seam filtered it out.
pub(super) fn hand(
    sub: &dyn Subscriber,
    item: &Item,
    topic_id: u32,
    seam: Option<&mut Seam>,
) -> Option<Delivery> {
    match item {
        Item::Pub(p) => {
            if let (Some(seam), Some(offset), Some(epoch)) = (seam, p.offset, &p.epoch)
                && !seam.admit(epoch, offset)
            {
                return None;
            }
            Some(sub.deliver_numbered(p, topic_id))
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

    /// Sends `{"n":n}` on `topic` straight into the hub's inbound queue.
    async fn send(tx: &mpsc::Sender<Inbound>, topic: &str, n: u64) {
        tx.send(Inbound {
            topic: topic.into(),
            payload: format!(r#"{{"event":"{topic}","data":{{"n":{n}}}}}"#).into(),
            received_at: Instant::now(),
        })
        .await
        .unwrap();
    }

    async fn subscribe_probes(
        hub: &Hub,
        topic: &str,
        ids: std::ops::Range<ConnId>,
    ) -> Vec<Arc<Probe>> {
        let mut probes = Vec::new();
        for id in ids {
            let probe = Arc::new(Probe::default());
            hub.subscribe(topic, id, probe.clone(), None, quiet())
                .await
                .unwrap();
            probes.push(probe);
        }
        probes
    }

    /// Publishes `count` events on `topic` every 5 ms (paused time) and
    /// returns, after each, how many the first probe had received.
    async fn every_5ms(
        tx: &mpsc::Sender<Inbound>,
        topic: &str,
        first: u64,
        count: u64,
        probe: &Probe,
    ) -> Vec<usize> {
        let mut seen = Vec::new();
        for n in first..first + count {
            send(tx, topic, n).await;
            settle().await;
            seen.push(numbers(probe).len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn a_lightly_loaded_slice_hands_every_publication_out_at_once() {
        let (tx, rx) = crate::backplane::inbound_queue();
        let (hub, _unused) = testing::pacing(Duration::from_millis(20));
        hub.spawn_dispatcher(rx);
        // 20 subscribers × 200/s: 4,000 writes/s, far under the budget.
        let probes = subscribe_probes(&hub, "t", 1..21).await;
        let seen = every_5ms(&tx, "t", 0, 400, &probes[0]).await;
        assert_eq!(seen, (1..=400).collect::<Vec<_>>(), "each at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_slice_hands_out_in_pairs_and_a_quiet_topic_still_at_once() {
        let (tx, rx) = crate::backplane::inbound_queue();
        let (hub, _unused) = testing::pacing(Duration::from_millis(20));
        hub.spawn_dispatcher(rx);
        // 200 subscribers × 200/s: 40,000 writes/s, above the budget.
        let hot = subscribe_probes(&hub, "hot", 1..201).await;
        let cold = subscribe_probes(&hub, "cold", 1000..1001).await;
        // The first ones go at once, until the slice has measured its load.
        let warm_up = every_5ms(&tx, "hot", 0, 200, &hot[0]).await;
        assert_eq!(warm_up[..10], (1..=10).collect::<Vec<_>>());
        // Then pairs: every other publication waits for the next one, and
        // none waits longer.
        let seen = every_5ms(&tx, "hot", 200, 200, &hot[0]).await;
        for (i, &n) in seen.iter().enumerate() {
            let published = 201 + i;
            assert!(
                n == published || n == published - 1,
                "after {published}: {n}"
            );
            if i > 0 {
                assert!(n == seen[i - 1] || n == seen[i - 1] + 2, "{seen:?}");
            }
        }
        let hand_outs = seen.windows(2).filter(|w| w[1] != w[0]).count();
        assert!(
            (95..=105).contains(&hand_outs),
            "{hand_outs} hand-outs for 200"
        );
        // A quiet topic's event goes at once, and takes what was held along.
        send(&tx, "cold", 0).await;
        settle().await;
        assert_eq!(numbers(&cold[0]), [0]);
        assert_eq!(numbers(&hot[0]), (0..400).collect::<Vec<_>>());
        // Everyone got everything, in order.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for probe in &hot {
            assert_eq!(numbers(probe), (0..400).collect::<Vec<_>>());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ceiling_hands_every_publication_out_at_once_under_load() {
        let (tx, rx) = crate::backplane::inbound_queue();
        let (hub, _unused) = testing::pacing(Duration::ZERO);
        hub.spawn_dispatcher(rx);
        let probes = subscribe_probes(&hub, "t", 1..201).await;
        let seen = every_5ms(&tx, "t", 0, 400, &probes[0]).await;
        assert_eq!(seen, (1..=400).collect::<Vec<_>>());
    }
}
