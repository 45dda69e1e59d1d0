//! Who leads: exactly one node at a time runs the leader duties (device
//! driver, carousel, mock-event timers).
//!
//! An [`Election`] exposes a watchable [`Leadership`]: whether this node
//! holds the lease and the fencing epoch it holds it with. Epochs only rise;
//! state written by a leader carries its epoch so a stale leader's write is
//! refused by the store, not by hope.

pub mod memory;
pub mod redis;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

/// This node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leadership {
    pub leader: bool,
    /// Fencing epoch of the lease this node holds (or last held; 0 = never).
    pub epoch: u64,
}

pub trait Election: Send + Sync + 'static {
    fn watch(&self) -> watch::Receiver<Leadership>;
    /// The id of the node holding the lease, if any is known.
    fn current_leader(&self) -> BoxFuture<'_, Option<String>>;
    /// Gives the lease up (on shutdown) so another node takes over at once.
    fn resign(&self) -> BoxFuture<'_, ()>;
    /// Records an epoch seen elsewhere (persisted device state), so the next
    /// lease this node takes is numbered above it.
    fn observe_epoch(&self, _epoch: u64) {}
}
