//! This node's open client connections, by client id and by user, whatever
//! transport carries them (native WebSocket, Socket.IO, Server-Sent Events).
//!
//! A session registers once it is admitted and ends its [`Registration`]
//! with a reason when it closes. Through the [`Handle`] it registered, the
//! node can act on a connection from outside the connection's own task:
//! subscribe it to a topic, unsubscribe it, disconnect it (the control API,
//! and later compat `enter_room`). A [`Listener`] hears every registration
//! and its end: that is where `client_connected` / `client_disconnected`
//! webhooks come from.
//!
//! The client id is the one string reported everywhere (webhooks, control
//! API, hooks): native `format!("{conn_id:016x}")` as in the `connected`
//! frame, Socket.IO the socket's `sid`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::metrics as m;

/// The `transport` of a client in webhooks and hooks.
pub mod transport {
    pub const WEBSOCKET: &str = "websocket";
    pub const SOCKETIO: &str = "socketio";
    pub const SSE: &str = "sse";
}

/// What the registry knows about one connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: Arc<str>,
    /// The identity's user (`sub`), `""` when anonymous.
    pub user: Arc<str>,
    /// The identity's `info` (connect hook or JWT claim), for presence and
    /// webhooks.
    pub info: Option<Arc<serde_json::value::RawValue>>,
    /// One of [`transport`].
    pub transport: &'static str,
    /// An SSE stream's secret: its `session` is the client id followed by
    /// it, and `POST /api/sse/{session}/…` must name both. The client id
    /// alone is public (presence lists it), and every anonymous client has
    /// the same user, so neither can stand for the stream's own client.
    pub sse_key: Option<Arc<str>>,
}

/// Which connections a command is for: one client, or every connection of
/// a user. On the wire (control bus, REST) `{"client": "…"}` or `{"user": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Client(String),
    User(String),
}

/// What the node asks of one connection from outside its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A server-side subscription: no permission check (the back end
    /// decided), the subscription limit still applies. The client is told
    /// with `subscribed` (native frame / Socket.IO event).
    Subscribe { topic: Arc<str> },
    /// Ends a subscription with `unsubscribed` `reason: "server"` (nothing
    /// when the connection was not subscribed).
    Unsubscribe { topic: Arc<str> },
    /// Closes the connection with `code` (4000–4999) and `reason`.
    Disconnect { code: u16, reason: Arc<str> },
    /// `POST /api/sse/{session}/subscribe`: the stream's own client asks
    /// (its permission was checked where the request landed). Reaches only
    /// an SSE stream of the same `user` and secret `key`
    /// ([`ClientInfo::sse_key`]), so nobody else's request can act on it or
    /// tell a live session from an ended one.
    SseSubscribe {
        topic: Arc<str>,
        user: Arc<str>,
        key: Arc<str>,
    },
    /// `POST /api/sse/{session}/unsubscribe`, as [`Command::SseSubscribe`].
    SseUnsubscribe {
        topic: Arc<str>,
        user: Arc<str>,
        key: Arc<str>,
    },
}

impl Command {
    /// The `command` label of [`m::CONTROL_COMMANDS`].
    pub fn label(&self) -> &'static str {
        match self {
            Command::Subscribe { .. } => "subscribe",
            Command::Unsubscribe { .. } => "unsubscribe",
            Command::Disconnect { .. } => "disconnect",
            Command::SseSubscribe { .. } => "sse_subscribe",
            Command::SseUnsubscribe { .. } => "sse_unsubscribe",
        }
    }

    /// The user and secret an SSE session command is limited to.
    fn sse_owner(&self) -> Option<(&str, &str)> {
        match self {
            Command::SseSubscribe { user, key, .. } | Command::SseUnsubscribe { user, key, .. } => {
                Some((user, key))
            }
            _ => None,
        }
    }
}

/// What became of a command handed to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    Taken,
    /// [`PENDING_COMMANDS`] are still waiting: not taken, but the
    /// connection is there (a caller may try again).
    Busy,
    /// Gone, or closing after a `disconnect`.
    Gone,
}

/// How the registry reaches one connection. Implemented by each transport.
pub trait Handle: Send + Sync {
    /// Hands `command` to the connection without waiting.
    fn send(&self, command: Command) -> Handed;
}

/// What a command did on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Connections that took it.
    pub reached: usize,
    /// Connections that were there but had [`PENDING_COMMANDS`] waiting.
    pub busy: usize,
}

/// Hears every registration and its end, in each connection's order.
pub trait Listener: Send + Sync {
    fn connected(&self, client: &ClientInfo);
    fn disconnected(&self, client: &ClientInfo, reason: &'static str);
}

/// Commands a native connection may have pending before new ones are
/// refused (it applies them between its own messages).
pub const PENDING_COMMANDS: usize = 16;

/// Cheap-to-clone handle to the registry.
#[derive(Clone, Default)]
pub struct Clients {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// std Mutex: held for map updates only, never across `.await` and never
    /// while calling a handle or the listener.
    state: Mutex<State>,
    listener: OnceLock<Arc<dyn Listener>>,
}

#[derive(Default)]
struct State {
    by_id: HashMap<Arc<str>, Entry>,
    /// A set, not a list: one user may have very many connections (every
    /// anonymous one is user `""`), and each must leave in O(1).
    by_user: HashMap<Arc<str>, HashSet<Arc<str>>>,
}

struct Entry {
    info: ClientInfo,
    handle: Arc<dyn Handle>,
}

impl Clients {
    /// Sets the listener (once, before the first connection).
    pub fn set_listener(&self, listener: Arc<dyn Listener>) {
        let _ = self.inner.listener.set(listener);
    }

    /// Adds an admitted connection. Keep the [`Registration`] for the
    /// connection's life and end it with the reason it closed.
    pub fn register(&self, info: ClientInfo, handle: Arc<dyn Handle>) -> Registration {
        {
            let mut state = self.inner.state.lock().unwrap();
            state
                .by_user
                .entry(info.user.clone())
                .or_default()
                .insert(info.id.clone());
            state.by_id.insert(
                info.id.clone(),
                Entry {
                    info: info.clone(),
                    handle,
                },
            );
        }
        if let Some(l) = self.inner.listener.get() {
            l.connected(&info);
        }
        Registration {
            clients: self.clone(),
            id: Some(info.id),
        }
    }

    /// Removes a connection; false when it was not registered (any more).
    fn unregister(&self, id: &str, reason: &'static str) -> bool {
        let info = {
            let mut state = self.inner.state.lock().unwrap();
            let Some(entry) = state.by_id.remove(id) else {
                return false;
            };
            if let Some(ids) = state.by_user.get_mut(&entry.info.user) {
                ids.remove(id);
                if ids.is_empty() {
                    state.by_user.remove(&entry.info.user);
                }
            }
            entry.info
        };
        if let Some(l) = self.inner.listener.get() {
            l.disconnected(&info, reason);
        }
        true
    }

    /// Hands `command` to every local connection `target` names.
    pub fn apply(&self, target: &Target, command: &Command) -> Applied {
        let handles: Vec<Arc<dyn Handle>> = {
            let state = self.inner.state.lock().unwrap();
            match target {
                Target::Client(id) => state
                    .by_id
                    .get(id.as_str())
                    .filter(|e| {
                        command.sse_owner().is_none_or(|(user, key)| {
                            e.info.transport == transport::SSE
                                && *e.info.user == *user
                                && e.info.sse_key.as_deref() == Some(key)
                        })
                    })
                    .map(|e| e.handle.clone())
                    .into_iter()
                    .collect(),
                Target::User(user) => state
                    .by_user
                    .get(user.as_str())
                    .into_iter()
                    .flatten()
                    .filter_map(|id| state.by_id.get(id).map(|e| e.handle.clone()))
                    .collect(),
            }
        };
        let mut applied = Applied::default();
        for handle in handles {
            match handle.send(command.clone()) {
                Handed::Taken => applied.reached += 1,
                Handed::Busy => applied.busy += 1,
                Handed::Gone => {}
            }
        }
        metrics::counter!(m::CONTROL_COMMANDS, "command" => command.label())
            .increment(applied.reached as u64);
        applied
    }

    /// One connection's record.
    pub fn get(&self, id: &str) -> Option<ClientInfo> {
        let state = self.inner.state.lock().unwrap();
        state.by_id.get(id).map(|e| e.info.clone())
    }

    /// The local connections of `user`.
    pub fn of_user(&self, user: &str) -> Vec<ClientInfo> {
        let state = self.inner.state.lock().unwrap();
        state
            .by_user
            .get(user)
            .into_iter()
            .flatten()
            .filter_map(|id| state.by_id.get(id).map(|e| e.info.clone()))
            .collect()
    }

    /// Every local connection.
    pub fn all(&self) -> Vec<ClientInfo> {
        let state = self.inner.state.lock().unwrap();
        state.by_id.values().map(|e| e.info.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.inner.state.lock().unwrap().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every registration still open with `reason` (the drain's last
    /// step: sessions that outlived the grace period still get their end
    /// reported). Their own later `end` finds nothing to do.
    pub fn end_all(&self, reason: &'static str) -> usize {
        let ids: Vec<Arc<str>> = {
            let state = self.inner.state.lock().unwrap();
            state.by_id.keys().cloned().collect()
        };
        ids.iter().filter(|id| self.unregister(id, reason)).count()
    }
}

/// A connection's place in the registry, held by its session.
#[must_use = "end the registration with the reason the connection closed"]
pub struct Registration {
    clients: Clients,
    id: Option<Arc<str>>,
}

impl Registration {
    /// The connection closed for `reason` (a [`m::reason`] value).
    pub fn end(mut self, reason: &'static str) {
        if let Some(id) = self.id.take() {
            self.clients.unregister(&id, reason);
        }
    }

    pub fn id(&self) -> Option<&Arc<str>> {
        self.id.as_ref()
    }
}

impl Drop for Registration {
    /// A session that ends without saying why (a panic, a dropped task)
    /// still leaves the registry.
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.clients.unregister(&id, m::reason::SERVER);
        }
    }
}

/// A native connection's handle: commands go to its reader loop, which
/// owns the session's state, through a small queue it selects on.
///
/// Not a tokio channel: a bounded `mpsc` allocates a block of slots when it
/// is made, for every connection; this queue allocates nothing until a
/// command arrives (most connections never get one).
#[derive(Default)]
pub struct Mailbox {
    /// std Mutex: a push or a pop, never held across `.await`.
    queue: Mutex<std::collections::VecDeque<Command>>,
    notify: tokio::sync::Notify,
    /// Set once a disconnect was taken: the connection is on its way out
    /// and takes no more commands (a second disconnect would count it as
    /// reached again while it closes).
    leaving: std::sync::atomic::AtomicBool,
}

impl Mailbox {
    /// The next command; cancel-safe (a command is taken only when this
    /// returns it).
    pub async fn recv(&self) -> Command {
        loop {
            if let Some(c) = self.queue.lock().unwrap().pop_front() {
                return c;
            }
            self.notify.notified().await;
        }
    }

    /// The connection stopped taking commands (it is closing): later ones
    /// are not counted as reached, and those still waiting are dropped.
    pub fn close(&self) {
        let mut q = self.queue.lock().unwrap();
        self.leaving
            .store(true, std::sync::atomic::Ordering::Release);
        q.clear();
    }
}

impl Handle for Mailbox {
    fn send(&self, command: Command) -> Handed {
        {
            let mut q = self.queue.lock().unwrap();
            if self.leaving.load(std::sync::atomic::Ordering::Acquire) {
                return Handed::Gone;
            }
            if q.len() >= PENDING_COMMANDS {
                return Handed::Busy;
            }
            if matches!(command, Command::Disconnect { .. }) {
                self.leaving
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            q.push_back(command);
        }
        self.notify.notify_one();
        Handed::Taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Listener for Log {
        fn connected(&self, c: &ClientInfo) {
            self.0.lock().unwrap().push(format!("+{}", c.id));
        }
        fn disconnected(&self, c: &ClientInfo, reason: &'static str) {
            self.0.lock().unwrap().push(format!("-{} {reason}", c.id));
        }
    }

    fn info(id: &str, user: &str) -> ClientInfo {
        ClientInfo {
            id: id.into(),
            user: user.into(),
            info: None,
            transport: transport::WEBSOCKET,
            sse_key: None,
        }
    }

    #[tokio::test]
    async fn commands_reach_a_client_or_every_connection_of_a_user() {
        let clients = Clients::default();
        let log = Arc::new(Log::default());
        clients.set_listener(log.clone());
        let (m1, m2, m3) = (
            Arc::new(Mailbox::default()),
            Arc::new(Mailbox::default()),
            Arc::new(Mailbox::default()),
        );
        let a = clients.register(info("a", "u1"), m1.clone());
        let b = clients.register(info("b", "u1"), m2.clone());
        let c = clients.register(info("c", "u2"), m3.clone());
        let sub = Command::Subscribe {
            topic: "news".into(),
        };
        assert_eq!(clients.apply(&Target::User("u1".into()), &sub).reached, 2);
        assert_eq!(m1.recv().await, sub);
        assert_eq!(m2.recv().await, sub);
        assert!(m3.queue.lock().unwrap().is_empty());
        assert_eq!(clients.apply(&Target::Client("c".into()), &sub).reached, 1);
        assert_eq!(clients.apply(&Target::Client("zz".into()), &sub).reached, 0);
        assert_eq!(clients.of_user("u1").len(), 2);
        b.end(m::reason::CLIENT);
        assert_eq!(clients.apply(&Target::User("u1".into()), &sub).reached, 1);
        drop(c);
        assert_eq!(clients.end_all(m::reason::SHUTDOWN), 1);
        a.end(m::reason::CLIENT);
        assert!(clients.is_empty());
        assert_eq!(
            *log.0.lock().unwrap(),
            ["+a", "+b", "+c", "-b client", "-c server", "-a shutdown"]
        );
    }

    #[tokio::test]
    async fn a_connection_with_too_many_pending_commands_is_not_reached() {
        let clients = Clients::default();
        let _r = clients.register(info("a", ""), Arc::new(Mailbox::default()));
        let cmd = Command::Unsubscribe { topic: "t".into() };
        let target = Target::Client("a".into());
        for _ in 0..PENDING_COMMANDS {
            assert_eq!(clients.apply(&target, &cmd).reached, 1);
        }
        assert_eq!(
            clients.apply(&target, &cmd),
            Applied {
                reached: 0,
                busy: 1
            }
        );
    }

    #[test]
    fn targets_read_as_client_or_user() {
        let t: Target = serde_json::from_str(r#"{"user":"u1"}"#).unwrap();
        assert_eq!(t, Target::User("u1".into()));
        assert_eq!(
            serde_json::to_string(&Target::Client("a".into())).unwrap(),
            r#"{"client":"a"}"#
        );
    }
}
