//! Callers waiting for answers by id over pub/sub (forwarded device
//! commands, control commands). An entry lives exactly as long as its
//! caller waits: a caller's future dropped mid-way (an HTTP client that
//! hung up) removes it too, so ids cannot pile up.

use std::collections::HashMap;
use std::sync::Mutex;

pub struct Waiters<V> {
    /// std Mutex: inserts, looks and removes only, never across `.await`.
    map: Mutex<HashMap<String, V>>,
}

impl<V> Default for Waiters<V> {
    fn default() -> Self {
        Waiters {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<V> Waiters<V> {
    /// Registers `answer` for `id` until the returned ticket is dropped.
    pub fn wait(&self, id: String, answer: V) -> Ticket<'_, V> {
        self.map.lock().unwrap().insert(id.clone(), answer);
        Ticket { waiters: self, id }
    }

    /// Takes the waiter of `id`: for a single answer.
    pub fn take(&self, id: &str) -> Option<V> {
        self.map.lock().unwrap().remove(id)
    }

    /// Whether nobody waits.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.map.lock().unwrap().is_empty()
    }
}

impl<V: Clone> Waiters<V> {
    /// The waiter of `id`, left in place: for several answers.
    pub fn get(&self, id: &str) -> Option<V> {
        self.map.lock().unwrap().get(id).cloned()
    }
}

/// One caller's place in [`Waiters`].
pub struct Ticket<'a, V> {
    waiters: &'a Waiters<V>,
    id: String,
}

impl<V> Drop for Ticket<'_, V> {
    fn drop(&mut self) {
        self.waiters.map.lock().unwrap().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_ticket_leaves_nothing_behind() {
        let waiters = Waiters::default();
        let ticket = waiters.wait("a".into(), 1);
        assert_eq!(waiters.get("a"), Some(1));
        drop(ticket);
        assert!(waiters.is_empty());
        // A waiter cancelled while its future was pending.
        let fut = async {
            let _ticket = waiters.wait("b".into(), 2);
            std::future::pending::<()>().await;
        };
        drop(fut);
        let mut fut = Box::pin(async {
            let _ticket = waiters.wait("c".into(), 3);
            std::future::pending::<()>().await;
        });
        let waker = std::task::Waker::noop();
        let _ = fut
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker));
        assert_eq!(waiters.get("c"), Some(3));
        drop(fut);
        assert!(waiters.is_empty());
    }
}
