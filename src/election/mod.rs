//! Who leads: exactly one node at a time runs the leader duties (device
//! driver, carousel, mock-event timers).
//!
//! An [`Election`] exposes a watchable [`Leadership`]: whether this node
//! holds the lease and the fencing epoch it holds it with. Epochs only rise;
//! state written by a leader carries its epoch so a stale leader's write is
//! refused by the store, not by hope.

pub mod memory;
pub mod redis;

use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;

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
    /// The gate every act on the outside world (a frame on the wire) passes.
    fn fence(&self) -> Fence;
}

// === Fence ===

/// This node's right to act as leader, checked at the moment of acting.
///
/// The leadership watch tells tasks to start and stop, but a task learns of
/// a change only when it next looks, and may be halfway through a send.
/// The fence closes that window: [`Fence::run`] does its work only while
/// the term is open and before its deadline (the election's local deadline,
/// `sent_at + ttl − margin`, which passes before Redis can expire the lease
/// elsewhere), and holds the lock while it works, so that once
/// [`Fence::close`] returns no work of the old term runs any more. The
/// election closes the fence before it releases the lease or announces the
/// step-down.
#[derive(Clone, Default)]
pub struct Fence {
    /// std Mutex: held only around non-blocking work (UDP sends of one
    /// frame), never across `.await`.
    term: Arc<Mutex<Option<Term>>>,
}

#[derive(Clone, Copy)]
struct Term {
    epoch: u64,
    /// `None`: no deadline (the embedded node leads until it stops).
    until: Option<Instant>,
}

impl Fence {
    /// Runs `work` if the term of `epoch` is open and its deadline has not
    /// passed; `None` (and `work` not run) otherwise.
    pub fn run<T>(&self, epoch: u64, work: impl FnOnce() -> T) -> Option<T> {
        let term = self.term.lock().unwrap_or_else(|e| e.into_inner());
        match *term {
            Some(t) if t.epoch == epoch && t.until.is_none_or(|u| Instant::now() < u) => {
                Some(work())
            }
            _ => None,
        }
    }

    /// Whether the term of `epoch` is open now.
    pub fn holds(&self, epoch: u64) -> bool {
        self.run(epoch, || ()).is_some()
    }

    /// Opens (or extends) the term of `epoch` until `until`.
    pub fn open(&self, epoch: u64, until: Option<Instant>) {
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = Some(Term { epoch, until });
    }

    /// Ends the term; waits for work in progress to finish.
    pub fn close(&self) {
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn fence_runs_work_only_within_the_term() {
        let fence = Fence::default();
        assert_eq!(fence.run(1, || 1), None, "closed until opened");
        fence.open(1, Some(Instant::now() + Duration::from_millis(100)));
        assert_eq!(fence.run(1, || 2), Some(2));
        assert_eq!(fence.run(2, || 3), None, "another epoch");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            !fence.holds(1),
            "the deadline passed, whatever the watch says"
        );
        fence.open(1, Some(Instant::now() + Duration::from_millis(100)));
        assert!(fence.holds(1), "extended by a renew");
        fence.close();
        assert!(!fence.holds(1));
        fence.open(3, None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(fence.holds(3), "no deadline");
    }

    #[test]
    fn close_waits_for_work_in_progress() {
        let fence = Fence::default();
        fence.open(1, None);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let f = fence.clone();
        let worker = std::thread::spawn(move || {
            f.run(1, || {
                started_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(200));
                std::time::Instant::now()
            })
        });
        started_rx.recv().unwrap();
        fence.close();
        let closed = std::time::Instant::now();
        let finished = worker.join().unwrap().unwrap();
        assert!(
            finished <= closed,
            "close returned while the work still ran"
        );
        assert!(!fence.holds(1));
    }
}
