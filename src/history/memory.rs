//! History of one embedded node: a bounded ring per topic, in memory.
//!
//! Same semantics as Redis: offsets without holes, an epoch per topic that
//! is new whenever the topic's history is lost (here: a new process, or the
//! topic idle past `HISTORY_TTL_MS`), data kept `HISTORY_TTL_MS` after the
//! last publication, the epoch kept alive while the topic is read, and a
//! read of a topic without an epoch stores nothing (a pending epoch).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{History, HistoryError, Position, Range, Stored};
use crate::backplane::Backplane;
use crate::config::HistoryConfig;

pub struct MemoryHistory {
    backplane: Arc<dyn Backplane>,
    size: usize,
    ttl: Duration,
    /// When this history began (ms since the Unix epoch): a pending position
    /// from before was handed out by another process, whose epochs are lost.
    started: u64,
    /// Held by a publisher from taking its offset until the backplane has
    /// its publication, so offsets reach the hub in order. That send waits
    /// while the hub's inbound queue is full; only publishers wait here.
    order: tokio::sync::Mutex<()>,
    /// The rings; std Mutex, never held across `.await`. Reads take only
    /// this one: the hub's own reads (a subscribe, a gap repair) must not
    /// wait for a publisher that waits for the hub to drain its queue.
    topics: std::sync::Mutex<Topics>,
}

#[derive(Default)]
struct Topics {
    map: HashMap<String, Ring>,
    swept: Option<Instant>,
}

struct Ring {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<Stored>,
    /// When the stored publications expire (`HISTORY_TTL_MS` after the last one).
    data_until: Instant,
    /// When the epoch and top expire (extended by reads too).
    meta_until: Instant,
}

impl MemoryHistory {
    pub fn new(backplane: Arc<dyn Backplane>, config: &HistoryConfig) -> Self {
        Self {
            backplane,
            size: config.size,
            ttl: config.ttl,
            started: super::now_ms(),
            order: tokio::sync::Mutex::new(()),
            topics: std::sync::Mutex::new(Topics::default()),
        }
    }
}

impl Topics {
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(60))
        {
            self.map.retain(|_, r| r.meta_until > now);
            self.swept = Some(now);
        }
    }

    /// The topic's ring, new (with a new epoch) when it never existed or
    /// expired: what a publication writes to.
    fn ring(&mut self, topic: &str, now: Instant, ttl: Duration) -> &mut Ring {
        self.sweep(now);
        let fresh = || Ring {
            epoch: super::new_epoch(super::now_ms()),
            top: 0,
            entries: VecDeque::new(),
            data_until: now + ttl,
            meta_until: now + ttl,
        };
        let ring = self.map.entry(topic.to_string()).or_insert_with(fresh);
        if ring.meta_until <= now {
            *ring = fresh();
        }
        if ring.data_until <= now {
            ring.entries.clear();
        }
        ring.meta_until = ring.meta_until.max(now + ttl);
        ring
    }

    /// The topic's live ring for a read (its epoch kept alive), `None`
    /// when it has no epoch: a read creates nothing.
    fn existing(&mut self, topic: &str, now: Instant, ttl: Duration) -> Option<&mut Ring> {
        self.sweep(now);
        let ring = self.map.get_mut(topic).filter(|r| r.meta_until > now)?;
        if ring.data_until <= now {
            ring.entries.clear();
        }
        ring.meta_until = ring.meta_until.max(now + ttl);
        Some(ring)
    }
}

impl MemoryHistory {
    /// A range of `ring`, or the pending one of a topic without an epoch.
    fn range(&self, ring: Option<&mut Ring>, entries: impl FnOnce(&Ring) -> Vec<Stored>) -> Range {
        let (epoch, top, entries) = match ring {
            Some(r) => (r.epoch.clone(), r.top, entries(r)),
            None => (super::pending_epoch(super::now_ms()), 0, Vec::new()),
        };
        Range {
            epoch,
            top,
            entries,
            floor: self.started,
            ttl: self.ttl,
        }
    }
}

impl History for MemoryHistory {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        envelope: String,
    ) -> BoxFuture<'a, Result<Position, HistoryError>> {
        Box::pin(async move {
            let _order = self.order.lock().await;
            let (payload, position) = {
                let mut topics = self.topics.lock().unwrap();
                let now = Instant::now();
                let ring = topics.ring(topic, now, self.ttl);
                let offset = ring.top + 1;
                let payload = Bytes::from(super::stamp(&envelope, offset, &ring.epoch));
                let position = Position {
                    offset,
                    epoch: ring.epoch.clone(),
                };
                ring.top = offset;
                ring.data_until = now + self.ttl;
                if ring.entries.len() >= self.size {
                    ring.entries.pop_front();
                }
                ring.entries.push_back(Stored {
                    offset,
                    payload: payload.clone(),
                });
                (payload, position)
            };
            self.backplane
                .publish(topic, payload)
                .await
                .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
            Ok(position)
        })
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Range, HistoryError>> {
        Box::pin(async move {
            let mut topics = self.topics.lock().unwrap();
            let ring = topics.existing(topic, Instant::now(), self.ttl);
            Ok(self.range(ring, |r| {
                r.entries
                    .iter()
                    .filter(|e| e.offset > since)
                    .take(limit)
                    .cloned()
                    .collect()
            }))
        })
    }

    fn latest<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Range, HistoryError>> {
        Box::pin(async move {
            let mut topics = self.topics.lock().unwrap();
            let ring = topics.existing(topic, Instant::now(), self.ttl);
            Ok(self.range(ring, |r| r.entries.back().cloned().into_iter().collect()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::inbound_queue;
    use crate::backplane::memory::MemoryBackplane;

    fn history(
        size: usize,
    ) -> (
        MemoryHistory,
        tokio::sync::mpsc::Receiver<crate::backplane::Inbound>,
    ) {
        let (tx, rx) = inbound_queue();
        let bp = Arc::new(MemoryBackplane::new(tx));
        let config = HistoryConfig {
            topics: vec![],
            size,
            ttl: Duration::from_secs(60),
        };
        (MemoryHistory::new(bp, &config), rx)
    }

    #[tokio::test]
    async fn offsets_count_up_and_the_ring_is_bounded() {
        let (h, _rx) = history(3);
        let pending = h.read("t", 0, 10).await.unwrap();
        assert_eq!(pending.top, 0);
        assert!(super::super::is_pending(&pending.epoch));
        assert!(
            h.topics.lock().unwrap().map.is_empty(),
            "a read stores nothing"
        );
        let mut first = None;
        for i in 1..=5u64 {
            let p = h.publish("t", format!(r#"{{"data":{i}}}"#)).await.unwrap();
            assert_eq!(p.offset, i);
            assert_eq!(p.epoch, *first.get_or_insert(p.epoch.clone()));
        }
        let first = h.read("t", 0, 0).await.unwrap();
        assert!(
            first.continues(&pending.epoch),
            "the read before the first publication"
        );
        let r = h.read("t", 0, 10).await.unwrap();
        assert_eq!(r.top, 5);
        assert_eq!(
            r.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert!(super::super::recover(1, &first.epoch, &r).is_none());
        assert_eq!(super::super::recover(2, &first.epoch, &r).unwrap().len(), 3);
        let latest = h.latest("t").await.unwrap();
        assert_eq!(latest.entries[0].offset, 5);
        assert!(
            std::str::from_utf8(&latest.entries[0].payload)
                .unwrap()
                .contains(r#""data":5"#)
        );
        assert_ne!(h.read("other", 0, 1).await.unwrap().epoch, first.epoch);
    }

    /// The hub reads history (a subscribe, a gap repair) on the task that
    /// drains its inbound queue: a publisher waiting for room in that queue
    /// must not hold what the read needs.
    #[tokio::test]
    async fn a_publisher_waiting_for_a_full_queue_does_not_block_reads() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let bp = Arc::new(MemoryBackplane::new(tx));
        bp.subscribe("t").await.unwrap();
        let config = HistoryConfig {
            topics: vec![],
            size: 10,
            ttl: Duration::from_secs(60),
        };
        let h = Arc::new(MemoryHistory::new(bp, &config));
        for i in 1..=2 {
            h.publish("t", format!(r#"{{"data":{i}}}"#)).await.unwrap();
        }
        let blocked = tokio::spawn({
            let h = h.clone();
            async move { h.publish("t", r#"{"data":3}"#.into()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "the queue is full");
        let read = tokio::time::timeout(Duration::from_secs(2), h.read("t", 0, 10))
            .await
            .expect("a read does not wait for a publisher")
            .unwrap();
        assert_eq!(read.top, 3);
        let latest = tokio::time::timeout(Duration::from_secs(2), h.latest("t"))
            .await
            .expect("nor does latest")
            .unwrap();
        assert_eq!(latest.entries[0].offset, 3);
        for _ in 0..3 {
            rx.recv().await.unwrap();
        }
        assert_eq!(blocked.await.unwrap().unwrap().offset, 3);
    }
}
