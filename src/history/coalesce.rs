//! One history read in flight per topic per node: reads that arrive while
//! one runs wait for it to finish and then share the next one.
//!
//! Why: when a node dies, its clients come back to the others all at once
//! and every one of them resubscribes with `since`. Read one by one, a node
//! sends as many `switchboard_history` calls as it has returning
//! subscribers (tens of thousands), mostly for the same few topics and
//! nearly the same offsets; Redis answers them one after the other, the
//! last ones after the command timeout, and those subscriptions are refused
//! `unavailable`. Shared, a node sends at most one read per topic at a
//! time, from the lowest offset its waiters asked for, and hands each
//! waiter exactly what a read of its own would have returned.
//!
//! A waiter only joins a read that starts after it asked (never one already
//! in flight), so its answer is never older than its request: the hub
//! relies on that, because the subscriber's gate was closed before it asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::{History, HistoryError, Position, Range};

/// Wraps a [`History`] whose reads are round trips (Redis): publications and
/// `latest` pass through; [`History::read`]s of one topic are batched.
pub struct Coalesced {
    inner: Arc<dyn History>,
    /// Topics with a read in flight, and the reads waiting for the next one.
    topics: Arc<Mutex<HashMap<Arc<str>, Vec<Waiter>>>>,
}

struct Waiter {
    since: u64,
    limit: usize,
    answer: oneshot::Sender<Result<Range, HistoryError>>,
}

impl Coalesced {
    pub fn new(inner: Arc<dyn History>) -> Self {
        Self {
            inner,
            topics: Arc::default(),
        }
    }
}

impl History for Coalesced {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        envelope: String,
    ) -> BoxFuture<'a, Result<Position, HistoryError>> {
        self.inner.publish(topic, envelope)
    }

    fn read<'a>(
        &'a self,
        topic: &'a str,
        since: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Range, HistoryError>> {
        Box::pin(async move {
            let (answer, answered) = oneshot::channel();
            let waiter = Waiter {
                since,
                limit,
                answer,
            };
            {
                let mut topics = self.topics.lock().unwrap();
                match topics.get_mut(topic) {
                    Some(queue) => queue.push(waiter),
                    None => {
                        // The reader runs in a task of its own: a caller that
                        // gives up must not strand the others.
                        let topic: Arc<str> = Arc::from(topic);
                        topics.insert(topic.clone(), vec![waiter]);
                        tokio::spawn(serve(self.inner.clone(), self.topics.clone(), topic));
                    }
                }
            }
            answered
                .await
                .unwrap_or_else(|_| Err(HistoryError::Unavailable("history read abandoned".into())))
        })
    }

    fn latest<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Range, HistoryError>> {
        self.inner.latest(topic)
    }
}

/// Serves the reads queued on `topic` batch by batch until none is left,
/// then marks the topic as having no read in flight.
async fn serve(
    inner: Arc<dyn History>,
    topics: Arc<Mutex<HashMap<Arc<str>, Vec<Waiter>>>>,
    topic: Arc<str>,
) {
    loop {
        let batch = {
            let mut topics = topics.lock().unwrap();
            let queue = topics
                .get_mut(&topic)
                .map(std::mem::take)
                .unwrap_or_default();
            if queue.is_empty() {
                topics.remove(&topic);
                return;
            }
            queue
        };
        let waiters: Vec<Waiter> = batch
            .into_iter()
            .filter(|w| !w.answer.is_closed())
            .collect();
        let Some((since, limit)) = span(&waiters) else {
            continue;
        };
        let read = inner.read(&topic, since, limit).await;
        for w in waiters {
            let answer = match &read {
                Ok(range) => match share(range, since, limit, w.since, w.limit) {
                    Some(range) => Ok(range),
                    // The shared read stopped short of this waiter's range.
                    None => inner.read(&topic, w.since, w.limit).await,
                },
                Err(e) => Err(e.clone()),
            };
            let _ = w.answer.send(answer);
        }
    }
}

/// The one read that covers every waiter: from the lowest `since`, long
/// enough that each waiter's first `limit` entries are in it (offsets have
/// no holes after the oldest stored one, so at most `since − lowest` entries
/// come before a waiter's own).
fn span(waiters: &[Waiter]) -> Option<(u64, usize)> {
    let since = waiters.iter().map(|w| w.since).min()?;
    let limit = waiters
        .iter()
        .filter(|w| w.limit > 0)
        .map(|w| {
            let before = usize::try_from(w.since - since).unwrap_or(usize::MAX);
            before.saturating_add(w.limit)
        })
        .max()
        .unwrap_or(0);
    Some((since, limit))
}

/// What a read of `(since, limit)` returns, cut from a read of
/// `(read_since, read_limit)`; `None` when that read may have stopped before
/// the end of it.
fn share(
    range: &Range,
    read_since: u64,
    read_limit: usize,
    since: u64,
    limit: usize,
) -> Option<Range> {
    let entries: Vec<_> = range
        .entries
        .iter()
        .filter(|s| s.offset > since)
        .take(limit)
        .cloned()
        .collect();
    let cut_short = read_limit > 0
        && range.entries.len() >= read_limit
        && entries.len() < limit
        && range.entries.last().is_some_and(|s| s.offset < range.top);
    if cut_short || since < read_since {
        return None;
    }
    Some(Range {
        epoch: range.epoch.clone(),
        top: range.top,
        entries,
        floor: range.floor,
        ttl: range.ttl,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::history::Stored;

    /// A history of offsets 1..=top in one epoch whose reads take 20 ms and
    /// are counted.
    struct Slow {
        top: u64,
        oldest: u64,
        reads: AtomicUsize,
    }

    impl History for Slow {
        fn publish<'a>(
            &'a self,
            _: &'a str,
            _: String,
        ) -> BoxFuture<'a, Result<Position, HistoryError>> {
            Box::pin(async { Err(HistoryError::Refused("read only".into())) })
        }

        fn read<'a>(
            &'a self,
            _: &'a str,
            since: u64,
            limit: usize,
        ) -> BoxFuture<'a, Result<Range, HistoryError>> {
            Box::pin(async move {
                self.reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(Range {
                    epoch: Arc::from("e"),
                    top: self.top,
                    entries: (since.max(self.oldest - 1) + 1..=self.top)
                        .take(limit)
                        .map(|offset| Stored {
                            offset,
                            payload: Bytes::from(offset.to_string()),
                        })
                        .collect(),
                    floor: 0,
                    ttl: Duration::from_secs(60),
                })
            })
        }

        fn latest<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Range, HistoryError>> {
            self.read(topic, self.top.saturating_sub(1), 1)
        }
    }

    /// A history of offsets `oldest..=top` and its coalesced wrapper.
    fn histories(top: u64, oldest: u64) -> (Arc<Slow>, Arc<Coalesced>) {
        let slow = Arc::new(Slow {
            top,
            oldest,
            reads: AtomicUsize::new(0),
        });
        let coalesced = Arc::new(Coalesced::new(slow.clone()));
        (slow, coalesced)
    }

    fn offsets(r: &Range) -> Vec<u64> {
        r.entries.iter().map(|s| s.offset).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_readers_share_reads_and_each_gets_its_own_answer() {
        let (slow, coalesced) = histories(100, 41);
        let asks: Vec<(u64, usize)> = (0..200)
            .map(|i| match i % 5 {
                0 => (0, 0),
                1 => (90 + i % 7, 100),
                2 => (10, 100),
                3 => (95, 3),
                _ => (100, 100),
            })
            .collect();
        let tasks: Vec<_> = asks
            .iter()
            .map(|&(since, limit)| {
                let c = coalesced.clone();
                tokio::spawn(async move { c.read("t", since, limit).await.unwrap() })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        // Everyone asked before the reader ran: one read for all of them.
        assert_eq!(slow.reads.load(Ordering::SeqCst), 1);
        assert!(coalesced.topics.lock().unwrap().is_empty());
        for (got, &(since, limit)) in answers.iter().zip(&asks) {
            let want = slow.read("t", since, limit).await.unwrap();
            assert_eq!(offsets(got), offsets(&want), "since {since} limit {limit}");
            assert_eq!((got.top, &*got.epoch), (100, "e"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readers_arriving_during_a_read_share_the_next_one() {
        let (slow, coalesced) = histories(30, 1);
        let c = coalesced.clone();
        let first = tokio::spawn(async move { c.read("t", 5, 100).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let later: Vec<_> = (0..10u64)
            .map(|i| {
                let c = coalesced.clone();
                tokio::spawn(async move { c.read("t", 20 + i, 2).await.unwrap() })
            })
            .collect();
        assert_eq!(offsets(&first.await.unwrap()), (6..=30).collect::<Vec<_>>());
        for (i, task) in later.into_iter().enumerate() {
            let from = 21 + i as u64;
            let want: Vec<u64> = (from..=30).take(2).collect();
            assert_eq!(offsets(&task.await.unwrap()), want);
        }
        assert_eq!(slow.reads.load(Ordering::SeqCst), 2);
        // A reader that gives up strands no one.
        let c = coalesced.clone();
        let abandoned = tokio::spawn(async move { c.read("t", 0, 1).await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        abandoned.abort();
        assert_eq!(
            offsets(&coalesced.read("t", 29, 5).await.unwrap()),
            vec![30]
        );
    }

    #[test]
    fn a_shared_read_cut_short_is_not_handed_on() {
        let range = Range {
            epoch: Arc::from("e"),
            top: 10,
            entries: (1..=4)
                .map(|offset| Stored {
                    offset,
                    payload: Bytes::new(),
                })
                .collect(),
            floor: 0,
            ttl: Duration::from_secs(1),
        };
        assert_eq!(
            share(&range, 0, 4, 2, 2).map(|r| offsets(&r)),
            Some(vec![3, 4])
        );
        assert!(share(&range, 0, 4, 2, 5).is_none());
        assert_eq!(share(&range, 0, 4, 0, 0).map(|r| r.entries.len()), Some(0));
    }
}
