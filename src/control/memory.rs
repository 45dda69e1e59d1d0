//! Embedded mode (no `REDIS_URL`): this node is the cluster. Commands reach
//! its own clients; occupancy is its own; no node can die and leave
//! clients behind.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::{ControlBus, ControlError, Ledger, Leftovers, Reached, Record};
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
        let reached = self.clients.apply(&target, &command);
        Box::pin(async move {
            Ok(Reached {
                reached,
                unanswered: Vec::new(),
            })
        })
    }
}

/// Occupancy in this process's memory.
#[derive(Default)]
pub struct MemoryLedger {
    /// std Mutex: no `.await` under it.
    topics: Mutex<HashMap<String, HashSet<String>>>,
}

impl Ledger for MemoryLedger {
    fn occupy<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<bool, RedisError>> {
        let mut topics = self.topics.lock().unwrap();
        let holders = topics.entry(topic.to_string()).or_default();
        let first = holders.insert(node.to_string()) && holders.len() == 1;
        Box::pin(async move { Ok(first) })
    }

    fn vacate<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<bool, RedisError>> {
        let mut topics = self.topics.lock().unwrap();
        let removed = topics.get_mut(topic).is_some_and(|h| h.remove(node));
        let last = removed && topics.get(topic).is_some_and(HashSet::is_empty);
        if last {
            topics.remove(topic);
        }
        Box::pin(async move { Ok(last) })
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
        assert!(l.occupy("a", "t").await.unwrap());
        assert!(!l.occupy("a", "t").await.unwrap());
        assert!(!l.occupy("b", "t").await.unwrap());
        assert!(!l.vacate("a", "t").await.unwrap());
        assert!(!l.vacate("a", "t").await.unwrap());
        assert!(l.vacate("b", "t").await.unwrap());
        assert!(!l.vacate("b", "t").await.unwrap());
    }
}
