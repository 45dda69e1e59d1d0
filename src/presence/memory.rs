//! Presence of an embedded node (no `REDIS_URL`): the same model as the
//! Redis store, in one map; diff messages loop back to this node.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Applied, Heard, Op, Stats, Store};
use crate::redis::RedisError;

#[derive(Default)]
struct Topic {
    /// client id → (node, user, entry).
    members: HashMap<String, (String, String, String)>,
    /// user → connections (anonymous ones are not users).
    users: HashMap<String, u64>,
}

pub struct MemoryStore {
    /// std Mutex: map updates only, never held across `.await`.
    topics: Mutex<HashMap<String, Topic>>,
    held: Mutex<HashMap<String, HashSet<String>>>,
    diffs: mpsc::Sender<Heard>,
}

impl MemoryStore {
    /// The store and the receiver of its diff messages.
    pub fn new() -> (MemoryStore, mpsc::Receiver<Heard>) {
        let (tx, rx) = mpsc::channel(1024);
        (
            MemoryStore {
                topics: Mutex::new(HashMap::new()),
                held: Mutex::new(HashMap::new()),
                diffs: tx,
            },
            rx,
        )
    }
}

fn remove(t: &mut Topic, client: &str, out: &mut Applied) -> bool {
    let Some((_, user, value)) = t.members.remove(client) else {
        return false;
    };
    if !user.is_empty()
        && let Some(n) = t.users.get_mut(&user)
    {
        *n -= 1;
        if *n == 0 {
            t.users.remove(&user);
            out.users_removed.push(value.clone());
        }
    }
    out.leaves.push((client.to_string(), value));
    true
}

impl Store for MemoryStore {
    fn apply<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
        ops: &'a [Op],
    ) -> BoxFuture<'a, Result<Applied, RedisError>> {
        let mut out = Applied::default();
        let mut topics = self.topics.lock().unwrap();
        let t = topics.entry(topic.to_string()).or_default();
        for op in ops {
            match op {
                Op::Join {
                    client,
                    user,
                    value,
                } => {
                    if t.members.contains_key(&**client) {
                        continue;
                    }
                    t.members.insert(
                        client.to_string(),
                        (node.to_string(), user.to_string(), value.to_string()),
                    );
                    out.joins.push((client.to_string(), value.to_string()));
                    if !user.is_empty() {
                        let n = t.users.entry(user.to_string()).or_default();
                        *n += 1;
                        if *n == 1 {
                            out.users_added.push(value.to_string());
                        }
                    }
                }
                Op::Leave { client, .. } => {
                    remove(t, client, &mut out);
                }
            }
        }
        out.empty = !t.members.values().any(|(n, _, _)| n == node);
        if t.members.is_empty() {
            topics.remove(topic);
        }
        Box::pin(async move { Ok(out) })
    }

    fn list<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String)>, RedisError>> {
        let list = self
            .topics
            .lock()
            .unwrap()
            .get(topic)
            .map(|t| {
                t.members
                    .iter()
                    .map(|(c, (_, _, v))| (c.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(list) })
    }

    fn stats<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Stats, RedisError>> {
        let stats = self
            .topics
            .lock()
            .unwrap()
            .get(topic)
            .map(|t| Stats {
                clients: t.members.len() as u64,
                users: t.users.len() as u64,
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(stats) })
    }

    fn hold<'a>(&'a self, node: &'a str, topic: &'a str) -> BoxFuture<'a, Result<(), RedisError>> {
        self.held
            .lock()
            .unwrap()
            .entry(node.to_string())
            .or_default()
            .insert(topic.to_string());
        Box::pin(async { Ok(()) })
    }

    fn release<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<(), RedisError>> {
        if let Some(t) = self.held.lock().unwrap().get_mut(node) {
            t.remove(topic);
        }
        Box::pin(async { Ok(()) })
    }

    fn heartbeat<'a>(
        &'a self,
        _node: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, RedisError>> {
        Box::pin(async { Ok(true) })
    }

    fn dead<'a>(&'a self, _me: &'a str) -> BoxFuture<'a, Result<Vec<String>, RedisError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn claim<'a>(
        &'a self,
        node: &'a str,
        _force: bool,
    ) -> BoxFuture<'a, Result<Vec<String>, RedisError>> {
        let topics = self
            .held
            .lock()
            .unwrap()
            .remove(node)
            .map(|t| t.into_iter().collect())
            .unwrap_or_default();
        Box::pin(async move { Ok(topics) })
    }

    fn purge<'a>(
        &'a self,
        node: &'a str,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Applied, RedisError>> {
        let mut out = Applied {
            empty: true,
            ..Default::default()
        };
        let mut topics = self.topics.lock().unwrap();
        if let Some(t) = topics.get_mut(topic) {
            let mine: Vec<String> = t
                .members
                .iter()
                .filter(|(_, (n, _, _))| n == node)
                .map(|(c, _)| c.clone())
                .collect();
            for c in mine {
                remove(t, &c, &mut out);
            }
            if t.members.is_empty() {
                topics.remove(topic);
            }
        }
        Box::pin(async move { Ok(out) })
    }

    fn broadcast(&self, message: String) -> BoxFuture<'_, Result<(), RedisError>> {
        Box::pin(async move {
            // The receiver lives as long as the node; a full queue waits.
            let _ = self.diffs.send(Heard::Diff(message.into())).await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn join(c: &str, u: &str) -> Op {
        Op::Join {
            client: c.into(),
            user: u.into(),
            value: Arc::from(super::super::entry(u, None)),
        }
    }

    fn leave(c: &str, u: &str) -> Op {
        Op::Leave {
            client: c.into(),
            user: u.into(),
        }
    }

    #[tokio::test]
    async fn users_come_with_their_first_tab_and_go_with_their_last() {
        let (s, _rx) = MemoryStore::new();
        let a = s
            .apply("n", "t", &[join("a", "u1"), join("b", "u1"), join("c", "")])
            .await
            .unwrap();
        assert_eq!(a.joins.len(), 3);
        assert_eq!(a.users_added.len(), 1);
        assert_eq!(
            s.stats("t").await.unwrap(),
            Stats {
                clients: 3,
                users: 1
            }
        );
        let again = s.apply("n", "t", &[join("a", "u1")]).await.unwrap();
        assert!(again.joins.is_empty());
        let l = s.apply("n", "t", &[leave("a", "u1")]).await.unwrap();
        assert!(l.users_removed.is_empty());
        let l = s
            .apply("n", "t", &[leave("b", "u1"), leave("c", "")])
            .await
            .unwrap();
        assert_eq!(l.users_removed.len(), 1);
        assert!(l.empty);
        assert!(s.topics.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_purge_removes_one_nodes_entries_only() {
        let (s, _rx) = MemoryStore::new();
        s.apply("n1", "t", &[join("a", "u1")]).await.unwrap();
        s.apply("n2", "t", &[join("b", "u1"), join("c", "u2")])
            .await
            .unwrap();
        let p = s.purge("n2", "t").await.unwrap();
        assert_eq!(p.leaves.len(), 2);
        assert_eq!(p.users_removed.len(), 1);
        assert_eq!(
            s.stats("t").await.unwrap(),
            Stats {
                clients: 1,
                users: 1
            }
        );
    }
}
