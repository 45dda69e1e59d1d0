//! The dispatcher: the one task that takes every publication and every
//! ordering-sensitive step in sequence, keeps each history topic's
//! [`Sequence`], repairs holes from history and opens subscribers' gates.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::fanout::{SLICE_QUEUE, Work, hand};
use super::publication::stored_publication;
use super::{Announce, ConnId, Control, Delivery, GateState, Hub, Item, Outcome, Publication};
use crate::backplane::Inbound;
use crate::history::{self, GapRange, Range, Seam, Sequence, Verdict};
use crate::metrics as m;
use crate::protocol::{self, Since};

/// Publications of a history topic held while its first subscriber's gate
/// opens (a Redis round trip); past this the oldest are dropped and repaired
/// from history like any other hole.
const PENDING_LIMIT: usize = 65_536;

/// Reads a repair makes before it gives up and announces a gap; the pause
/// before attempt *n* + 1 is *n* × [`REPAIR_RETRY_PAUSE`]. The dispatcher
/// waits meanwhile (order first: nothing of the topic may overtake the
/// hole), so this stays short: at the 2 s command timeout, 7 s at most.
const REPAIR_ATTEMPTS: u32 = 3;
const REPAIR_RETRY_PAUSE: Duration = Duration::from_millis(250);

impl Hub {
    /// Runs the dispatcher: every publication from the backplane's queue and
    /// every ordering-sensitive step, one at a time, until the queue closes.
    pub fn spawn_dispatcher(&self, rx: mpsc::Receiver<Inbound>) -> tokio::task::JoinHandle<()> {
        let control = self
            .inner
            .control_rx
            .lock()
            .unwrap()
            .take()
            .expect("one dispatcher per hub");
        let fanout = self.inner.fanout;
        let slices = match fanout.inline() {
            true => Vec::new(),
            false => (0..fanout.slices)
                .map(|slice| {
                    let (tx, rx) = mpsc::channel(SLICE_QUEUE);
                    tokio::spawn(self.clone().serve_slice(slice, rx));
                    tx
                })
                .collect(),
        };
        let dispatcher = Dispatcher {
            hub: self.clone(),
            slices,
            sequences: HashMap::new(),
            pending: HashMap::new(),
        };
        tokio::spawn(dispatcher.run(rx, control))
    }
}

// === dispatcher ===

/// The one task that fans out publications and keeps history order.
struct Dispatcher {
    hub: Hub,
    /// The slice tasks' queues; empty when the hub has one slice, which the
    /// dispatcher then serves itself.
    slices: Vec<mpsc::Sender<Arc<Work>>>,
    /// Last delivered offset per subscribed history topic.
    sequences: HashMap<Arc<str>, Sequence>,
    /// Publications of history topics whose first gate has not opened yet.
    pending: HashMap<Arc<str>, Vec<Arc<Publication>>>,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut control: mpsc::Receiver<Control>,
    ) {
        loop {
            tokio::select! {
                biased;
                c = control.recv() => match c {
                    Some(c) => self.control(c).await,
                    None => return,
                },
                msg = inbound.recv() => match msg {
                    Some(msg) => self.publication(msg).await,
                    None => return,
                },
            }
        }
    }

    /// Hands `item` to every local subscriber of its topic, through the
    /// slices. Waits only when a slice is `SLICE_QUEUE` items behind.
    async fn fan_out(&self, item: Item) {
        if let Item::Pub(p) = &item {
            self.hub.remember(p);
        }
        if self.slices.is_empty() {
            self.hub.deliver_slice(0, &[&item], &mut |_, _| {});
            self.hub.fanned_out(&item);
            return;
        }
        let work = Arc::new(Work {
            item,
            left: AtomicUsize::new(self.slices.len()),
        });
        for slice in &self.slices {
            let _ = slice.send(work.clone()).await;
        }
    }

    /// Parses one backplane message and fans it out. Invalid payloads are
    /// counted and logged (rate limited) and reach no one.
    async fn publication(&mut self, inbound: Inbound) {
        metrics::counter!(m::BACKPLANE_RECEIVED).increment(1);
        let env = match protocol::parse_envelope(&inbound.payload) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!(m::INVALID_PUBLICATIONS).increment(1);
                self.hub.inner.invalid.log(&inbound.topic, &e);
                return;
            }
        };
        let topic: Arc<str> = Arc::from(inbound.topic);
        let p = Arc::new(Publication::from_envelope(topic, env, inbound.received_at));
        if p.offset.is_none() || !self.hub.is_history(&p.topic) {
            // Plain PUBLISH (at most once, no offset) or a topic this node
            // keeps no history for.
            self.fan_out(Item::Pub(p)).await;
            return;
        }
        if !self.sequences.contains_key(&p.topic) {
            if self.hub.holds(&p.topic) {
                let pending = self.pending.entry(p.topic.clone()).or_default();
                if pending.len() >= PENDING_LIMIT {
                    pending.remove(0);
                }
                pending.push(p);
            }
            return;
        }
        self.sequenced(p).await;
    }

    /// Delivers a history publication in order, repairing what came before it.
    async fn sequenced(&mut self, p: Arc<Publication>) {
        let (Some(offset), Some(epoch)) = (p.offset, p.epoch.clone()) else {
            return;
        };
        let Some(seq) = self.sequences.get_mut(&p.topic) else {
            return;
        };
        match seq.advance(&epoch, offset) {
            Verdict::Duplicate => return,
            Verdict::Next => {}
            Verdict::Missing { from, to } => self.fill(&p.topic, &epoch, from, to, None).await,
            Verdict::Reset { previous, to } => {
                self.fill(&p.topic, &epoch, 1, to, Some(previous)).await
            }
        }
        self.fan_out(Item::Pub(p)).await;
    }

    /// Delivers offsets `from..=to` of `epoch` from history, in order, and
    /// announces the ones history no longer has. With `previous`, the topic's
    /// epoch changed: that is announced first, even when nothing is missing.
    async fn fill(
        &mut self,
        topic: &Arc<str>,
        epoch: &Arc<str>,
        from: u64,
        to: u64,
        mut previous: Option<Arc<str>>,
    ) {
        let mut next = from;
        if from <= to {
            let limit = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
            match self.repair_read(topic, from - 1, limit).await {
                Ok(range) if range.epoch == *epoch => {
                    let mut repaired = 0u64;
                    for stored in range.entries.iter().filter(|s| s.offset <= to) {
                        if stored.offset < next {
                            continue;
                        }
                        if stored.offset > next || previous.is_some() {
                            self.gap(topic, epoch, next, stored.offset - 1, previous.take())
                                .await;
                        }
                        if let Some(p) = stored_publication(topic, stored) {
                            self.fan_out(Item::Pub(Arc::new(p))).await;
                            repaired += 1;
                        }
                        next = stored.offset + 1;
                    }
                    if repaired > 0 {
                        metrics::counter!(m::HISTORY_REPAIRS).increment(1);
                        metrics::counter!(m::HISTORY_REPAIRED).increment(repaired);
                        tracing::info!(%topic, from, to, repaired, "repaired a gap from history");
                    }
                }
                Ok(_) => tracing::warn!(%topic, "history epoch changed during a repair"),
                Err(e) => tracing::warn!(%topic, cause = %e, "gap repair failed"),
            }
        }
        if next <= to || previous.is_some() {
            self.gap(topic, epoch, next, to, previous).await;
        }
    }

    /// Reads what a repair needs, trying again after a failure: a read that
    /// timed out says nothing about what history holds (a busy Redis answers
    /// late, typically right when a node fell behind and has holes to fill),
    /// and a gap announced for it would be a loss the history could have
    /// prevented. Past the last attempt the hole becomes a `gap`.
    async fn repair_read(
        &self,
        topic: &str,
        since: u64,
        limit: usize,
    ) -> Result<Range, history::HistoryError> {
        let mut attempt = 0;
        loop {
            match self.hub.inner.history.read(topic, since, limit).await {
                Err(history::HistoryError::Unavailable(cause)) if attempt + 1 < REPAIR_ATTEMPTS => {
                    attempt += 1;
                    tracing::info!(%topic, attempt, %cause, "gap repair read failed; trying again");
                    tokio::time::sleep(REPAIR_RETRY_PAUSE * attempt).await;
                }
                other => return other,
            }
        }
    }

    /// Announces lost offsets to every subscriber of `topic`.
    async fn gap(
        &self,
        topic: &Arc<str>,
        epoch: &Arc<str>,
        from: u64,
        to: u64,
        previous: Option<Arc<str>>,
    ) {
        metrics::counter!(m::HISTORY_GAPS).increment(1);
        tracing::warn!(%topic, from, to, %epoch, reset = previous.is_some(), "announcing a gap that history cannot repair");
        let gap = GapRange {
            from,
            to,
            epoch: epoch.clone(),
            previous_epoch: previous,
        };
        self.fan_out(Item::Gap(topic.clone(), Arc::new(gap))).await;
    }

    async fn control(&mut self, control: Control) {
        match control {
            Control::Open {
                topic,
                id,
                range,
                since,
                announce,
                done,
            } => {
                if !self.sequences.contains_key(&topic) {
                    self.sequences.insert(
                        topic.clone(),
                        Sequence {
                            epoch: range.epoch.clone(),
                            last: range.top,
                        },
                    );
                    for p in self.pending.remove(&topic).unwrap_or_default() {
                        self.sequenced(p).await;
                    }
                }
                let recovered = self.open(&topic, id, &range, since.as_ref(), announce);
                let _ = done.send(recovered);
            }
            Control::Check { topic, range } => {
                let Some(seq) = self.sequences.get(&topic) else {
                    return;
                };
                if history::is_pending(&range.epoch) && history::is_pending(&seq.epoch) {
                    return; // Still no epoch: nothing to compare.
                }
                if history::is_pending(&range.epoch)
                    && let (Some(read), Some(created)) = (
                        history::epoch_time(&range.epoch),
                        history::epoch_time(&seq.epoch),
                    )
                    && created >= read
                {
                    // Read before the topic's first publication, which came
                    // since: nothing lost.
                    return;
                }
                if history::is_pending(&seq.epoch) {
                    // The topic's first epoch, whose publications this node
                    // was subscribed for: from offset 1 on, no reset.
                    self.sequences.insert(
                        topic.clone(),
                        Sequence {
                            epoch: range.epoch.clone(),
                            last: range.top,
                        },
                    );
                    self.fill(&topic, &range.epoch, 1, range.top, None).await;
                    return;
                }
                if seq.epoch == range.epoch {
                    if range.top > seq.last {
                        let from = seq.last + 1;
                        self.sequences.get_mut(&topic).unwrap().last = range.top;
                        self.fill(&topic, &range.epoch, from, range.top, None).await;
                    }
                } else {
                    let previous = seq.epoch.clone();
                    self.sequences.insert(
                        topic.clone(),
                        Sequence {
                            epoch: range.epoch.clone(),
                            last: range.top,
                        },
                    );
                    self.fill(&topic, &range.epoch, 1, range.top, Some(previous))
                        .await;
                }
            }
            Control::Release { topic } => {
                self.sequences.remove(&topic);
                self.pending.remove(&topic);
            }
        }
    }

    /// Opens a member's gate: its announcement, its replay, then what was
    /// held meanwhile through its seam. Returns `recovered`.
    fn open(
        &self,
        topic: &Arc<str>,
        id: ConnId,
        range: &Range,
        since: Option<&Since>,
        announce: Announce,
    ) -> Option<bool> {
        let Some((sub, gate, topic_id)) = self.hub.gated(topic, id) else {
            return None; // Left before its gate opened.
        };
        let replay = since.and_then(|s| history::recover(s.offset, &s.epoch, range));
        let recovered = since.map(|_| replay.is_some());
        if let Some(r) = recovered {
            let result = if r { "recovered" } else { "unrecoverable" };
            metrics::counter!(m::HISTORY_RECOVERIES, "result" => result).increment(1);
        }
        announce(&Outcome {
            position: Some(range.position()),
            recovered,
            topic_id,
        });
        let mut seam = Seam {
            epoch: range.epoch.clone(),
            threshold: range.top,
        };
        let mut replayed = 0u64;
        let replay: Vec<_> = replay
            .unwrap_or_default()
            .iter()
            .filter_map(|stored| stored_publication(topic, stored))
            .collect();
        for p in &replay {
            if !self.hub.excluded(p, id) && sub.deliver_numbered(p, topic_id) == Delivery::Queued {
                replayed += 1;
            }
        }
        if replayed > 0 {
            self.hub
                .inner
                .delivered
                .fetch_add(replayed, Ordering::Relaxed);
            metrics::counter!(m::DELIVERIES, "transport" => sub.transport()).increment(replayed);
        }
        let mut state = gate.state.lock().unwrap();
        if let GateState::Closed(held) = &mut *state {
            for item in std::mem::take(held) {
                hand(&*sub, &item, topic_id, Some(&mut seam));
            }
        }
        *state = GateState::Open(seam);
        recovered
    }
}

/// Logs invalid publisher payloads at most once per second, with a count of
/// the ones not logged, so a broken publisher cannot flood the log.
#[derive(Default)]
pub(super) struct InvalidLog {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl InvalidLog {
    pub(super) fn log(&self, topic: &str, err: &protocol::EnvelopeError) {
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
    use crate::hub::testing::{self, *};
    use std::sync::Mutex;

    #[tokio::test]
    async fn invalid_payloads_reach_no_one_and_a_full_subscriber_does_not_stop_others() {
        let (hub, tx) = {
            let (tx, rx) = crate::backplane::inbound_queue();
            let (hub, _unused) = testing::hub(&[]);
            hub.spawn_dispatcher(rx);
            (hub, tx)
        };
        let slow = Arc::new(Probe::default());
        slow.full.store(true, Ordering::Relaxed);
        let ok = Arc::new(Probe::default());
        hub.subscribe("t", 1, slow.clone(), None, quiet())
            .await
            .unwrap();
        hub.subscribe("t", 2, ok.clone(), None, quiet())
            .await
            .unwrap();
        for payload in [&b"garbage{"[..], br#"{"event":"t"}"#, br#"{"data":1}"#] {
            tx.send(Inbound {
                topic: "t".into(),
                payload: bytes::Bytes::copy_from_slice(payload),
                received_at: Instant::now(),
            })
            .await
            .unwrap();
        }
        settle().await;
        assert_eq!(ok.frames.lock().unwrap().len(), 1);
        assert_eq!(hub.delivered(), 1);
    }

    #[tokio::test]
    async fn history_subscribers_are_announced_first_then_recover_then_go_live() {
        let (hub, rx) = testing::hub(&["h.*"]);
        hub.spawn_dispatcher(rx);
        // A first subscriber keeps the topic subscribed on the backplane.
        let first = Arc::new(Probe::default());
        let told = Arc::new(Mutex::new(None));
        let t = told.clone();
        hub.subscribe(
            "h.x",
            1,
            first.clone(),
            None,
            Box::new(move |o| {
                *t.lock().unwrap() = Some(o.clone());
            }),
        )
        .await
        .unwrap();
        let before = told.lock().unwrap().clone().unwrap();
        assert_eq!(before.position.as_ref().unwrap().offset, 0);
        assert!(
            history::is_pending(&before.position.as_ref().unwrap().epoch),
            "no epoch before the first publication"
        );
        assert_eq!(before.recovered, None);
        let mut epoch = None;
        for i in 1..=5 {
            let p = hub
                .publish("h.x", "h.x", &raw(&i.to_string()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(p.offset, i);
            assert_eq!(p.epoch, *epoch.get_or_insert(p.epoch.clone()));
        }
        settle().await;
        assert_eq!(
            first.offsets(),
            [1, 2, 3, 4, 5],
            "the first epoch is no gap"
        );
        // A position taken before the first publication recovers all of it.
        let pending = before.position.unwrap().epoch.to_string();
        let early = subscribe_recording(&hub, 4, Some((0, &pending))).await;
        assert_eq!(early.frames.lock().unwrap()[0], "subscribed Some(true)");
        assert_eq!(early.offsets(), [1, 2, 3, 4, 5]);
        hub.unsubscribe("h.x", 4).await;
        // A client that saw up to 2 recovers 3..5, then receives live ones.
        let epoch = epoch.unwrap().to_string();
        let late = subscribe_recording(&hub, 2, Some((2, &epoch))).await;
        hub.publish("h.x", "h.x", &raw("6")).await.unwrap();
        settle().await;
        assert_eq!(late.frames.lock().unwrap()[0], "subscribed Some(true)");
        assert_eq!(late.offsets(), [3, 4, 5, 6]);
        // A wrong epoch is not recoverable: nothing replayed, live continues.
        let lost = subscribe_recording(&hub, 3, Some((1, "other"))).await;
        hub.publish("h.x", "h.x", &raw("7")).await.unwrap();
        settle().await;
        assert_eq!(lost.frames.lock().unwrap()[0], "subscribed Some(false)");
        assert_eq!(lost.offsets(), [7]);
        assert_eq!(first.offsets(), [1, 2, 3, 4, 5, 6, 7]);
    }

    #[tokio::test]
    async fn a_hole_in_the_offsets_is_repaired_from_history_before_the_next_one() {
        let (tx, rx) = crate::backplane::inbound_queue();
        let (hub, _unused) = testing::hub(&["*"]);
        hub.spawn_dispatcher(rx);
        let a = Arc::new(Probe::default());
        hub.subscribe("t", 1, a.clone(), None, quiet())
            .await
            .unwrap();
        // Publish 1..4 into history; the "network" delivers only 1 and 4.
        let mut payloads = Vec::new();
        for i in 1..=4 {
            hub.publish("t", "t", &raw(&i.to_string())).await.unwrap();
            let r = hub.history().read("t", i - 1, 1).await.unwrap();
            payloads.push(r.entries[0].payload.clone());
        }
        for i in [0usize, 3] {
            tx.send(Inbound {
                topic: "t".into(),
                payload: payloads[i].clone(),
                received_at: Instant::now(),
            })
            .await
            .unwrap();
        }
        settle().await;
        assert_eq!(a.offsets(), [1, 2, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sliced_history_subscribers_joining_mid_stream_miss_nothing_and_repeat_nothing() {
        let (hub, rx) = testing::sliced(&["h.*"], 2);
        hub.spawn_dispatcher(rx);
        let first = subscribe_recording(&hub, 1, None).await;
        let (all_joined, mut joined_rx) = tokio::sync::watch::channel(false);
        let publisher = {
            let hub = hub.clone();
            tokio::spawn(async move {
                for n in 1..=300u64 {
                    if n == 201 {
                        // The last ones are published after everyone joined.
                        joined_rx.wait_for(|j| *j).await.unwrap();
                    }
                    let p = hub
                        .publish("h.x", "h.x", &raw(&n.to_string()))
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(p.offset, n);
                    if n % 25 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        // Subscribers join while it publishes: half of them with `since`
        // (offset 0 of the topic's epoch: everything), half from now on.
        let epoch = hub.history().read("h.x", 0, 0).await.unwrap().epoch;
        let mut joined = Vec::new();
        for id in 2..=41u64 {
            let since = (id % 2 == 0).then_some((0, &*epoch));
            joined.push(subscribe_recording(&hub, id, since).await);
            tokio::task::yield_now().await;
        }
        all_joined.send(true).unwrap();
        publisher.await.unwrap();
        eventually("every subscriber at offset 300", || {
            first.offsets().last() == Some(&300)
                && joined.iter().all(|p| p.offsets().last() == Some(&300))
        })
        .await;
        assert_eq!(first.offsets(), (1..=300).collect::<Vec<_>>());
        for (i, probe) in joined.iter().enumerate() {
            let offsets = probe.offsets();
            let start = offsets[0];
            assert_eq!(
                offsets,
                (start..=300).collect::<Vec<_>>(),
                "subscriber {i}: consecutive, once each"
            );
            if i % 2 == 0 {
                assert_eq!(start, 1, "subscriber {i} recovered from offset 0");
                assert_eq!(probe.frames.lock().unwrap()[0], "subscribed Some(true)");
            }
        }
    }
}
