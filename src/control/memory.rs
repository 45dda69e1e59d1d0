//! Embedded mode (no `REDIS_URL`): this node is the cluster. Commands reach
//! its own clients; occupancy is its own; no node can die and leave
//! clients behind.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::{ControlBus, ControlError, Ledger, Leftovers, Reached, Record, Seq};
use crate::clients::{Clients, Command, Target};
use crate::redis::RedisError;

/// Applies commands to this node's clients.
pub struct LocalBus {
    clients: Clients,
}

impl LocalBus {
    pub fn new(clients: Clients) -> Self {
        Self { clients }
    }
}

impl ControlBus for LocalBus {
    fn run(
        &self,
        target: Target,
        command: Command,
    ) -> BoxFuture<'_, Result<Reached, ControlError>> {
        let applied = self.clients.apply(&target, &command);
        Box::pin(async move {
            Ok(Reached {
                reached: applied.reached,
                busy: applied.busy,
                unanswered: Vec::new(),
                nodes_unknown: false,
            })
        })
    }
}

/// Occupancy in this process's memory.
#[derive(Default)]
pub struct MemoryLedger {
    /// std Mutex: no `.await` under it.
    topics: Mutex<HashMap<String, HashSet<String>>>,
    /// The last seq handed out (one counter serves every topic).
    seq: Mutex<Seq>,
}

impl MemoryLedger {
    fn next_seq(&self) -> Seq {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let mut last = self.seq.lock().unwrap();
        *last = now.max(*last + 1);
        *last
    }
}

impl Ledger for MemoryLedger {
    fn occupy<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Option<Seq>, RedisError>> {
        let first = {
            let mut topics = self.topics.lock().unwrap();
            let holders = topics.entry(topic.to_string()).or_default();
            holders.insert(node.to_string()) && holders.len() == 1
        };
        let seq = first.then(|| self.next_seq());
        Box::pin(async move { Ok(seq) })
    }

    fn vacate<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Option<Seq>, RedisError>> {
        let last = {
            let mut topics = self.topics.lock().unwrap();
            let removed = topics.get_mut(topic).is_some_and(|h| h.remove(node));
            let last = removed && topics.get(topic).is_some_and(HashSet::is_empty);
            if last {
                topics.remove(topic);
            }
            last
        };
        let seq = last.then(|| self.next_seq());
        Box::pin(async move { Ok(seq) })
    }

    fn record<'a>(
        &'a self,
        _node: &'a str,
        _changes: Vec<(Arc<str>, Option<Record>)>,
    ) -> BoxFuture<'a, Result<(), RedisError>> {
        Box::pin(async { Ok(()) })
    }

    fn track<'a>(&'a self, _node: &'a str) -> BoxFuture<'a, Result<bool, RedisError>> {
        Box::pin(async { Ok(false) })
    }

    fn tracked(&self) -> BoxFuture<'_, Result<Vec<String>, RedisError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn alive<'a>(&'a self, _node: &'a str) -> BoxFuture<'a, Result<bool, RedisError>> {
        Box::pin(async { Ok(true) })
    }

    fn claim<'a>(
        &'a self,
        _node: &'a str,
        _force: bool,
    ) -> BoxFuture<'a, Result<Option<Leftovers>, RedisError>> {
        Box::pin(async { Ok(None) })
    }

    fn shared(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_transition_each_way_whatever_the_number_of_holders() {
        let l = MemoryLedger::default();
        let first = l.occupy("a", "t").await.unwrap().unwrap();
        assert_eq!(l.occupy("a", "t").await.unwrap(), None);
        assert_eq!(l.occupy("b", "t").await.unwrap(), None);
        assert_eq!(l.vacate("a", "t").await.unwrap(), None);
        assert_eq!(l.vacate("a", "t").await.unwrap(), None);
        let last = l.vacate("b", "t").await.unwrap().unwrap();
        assert!(last > first);
        assert_eq!(l.vacate("b", "t").await.unwrap(), None);
        assert!(l.occupy("b", "t").await.unwrap().unwrap() > last);
    }
}
