//! The node registry: each node announces itself (`{prefix}:node:{id}`, with
//! a TTL) every few seconds, so any node can report cluster-wide figures.
//! A node that dies disappears when its key expires.

use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::redis::{Keys, Redis, RedisError};

/// How often a node announces itself, and how long an announcement lives.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
pub const ANNOUNCE_TTL: Duration = Duration::from_secs(10);

/// What a node says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub id: String,
    pub leader: bool,
    pub epoch: u64,
    pub connected_clients: usize,
    pub proxy_connections: usize,
    pub topics: usize,
    pub subscriptions: usize,
    /// Publications queued to this node's subscribers since it started
    /// (`Hub::delivered`); two announcements give a rate. 0 from nodes
    /// older than the field.
    #[serde(default)]
    pub delivered: u64,
    pub version: String,
    /// RFC 3339.
    pub started_at: String,
    pub updated_at: String,
}

pub trait Registry: Send + Sync + 'static {
    fn announce(&self, info: NodeInfo) -> BoxFuture<'_, Result<(), RedisError>>;
    /// Every live node, this one included.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, RedisError>>;
    /// Removes this node's entry (on shutdown).
    fn withdraw(&self, id: &str) -> BoxFuture<'_, ()>;
}

/// Embedded mode: the only node is this one.
#[derive(Default)]
pub struct MemoryRegistry {
    me: Mutex<Option<NodeInfo>>,
}

impl Registry for MemoryRegistry {
    fn announce(&self, info: NodeInfo) -> BoxFuture<'_, Result<(), RedisError>> {
        *self.me.lock().unwrap() = Some(info);
        Box::pin(async { Ok(()) })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, RedisError>> {
        let me = self.me.lock().unwrap().clone();
        Box::pin(async move { Ok(me.into_iter().collect()) })
    }

    fn withdraw(&self, _id: &str) -> BoxFuture<'_, ()> {
        *self.me.lock().unwrap() = None;
        Box::pin(async {})
    }
}

pub struct RedisRegistry {
    redis: Redis,
    keys: Keys,
}

impl RedisRegistry {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self { redis, keys }
    }
}

impl Registry for RedisRegistry {
    fn announce(&self, info: NodeInfo) -> BoxFuture<'_, Result<(), RedisError>> {
        Box::pin(async move {
            let json = serde_json::to_string(&info).expect("node info serializes");
            self.redis
                .set_px(&self.keys.node(&info.id), &json, ANNOUNCE_TTL)
                .await
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, RedisError>> {
        Box::pin(async move {
            let values = self.redis.scan_values(&self.keys.node_pattern()).await?;
            let mut nodes: Vec<NodeInfo> = values
                .iter()
                .filter_map(|v| serde_json::from_str(v).ok())
                .collect();
            nodes.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(nodes)
        })
    }

    fn withdraw(&self, id: &str) -> BoxFuture<'_, ()> {
        let key = self.keys.node(id);
        Box::pin(async move {
            let _ = self.redis.del(&key).await;
        })
    }
}
