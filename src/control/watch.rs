//! The webhook side of client registrations, and the reaper.
//!
//! Every client registration becomes a `client_connected`, its end a
//! `client_disconnected`, on this node's one ordered webhook queue (so one
//! client's pair is never reordered, whatever else reconnects meanwhile).
//! Each client is also recorded in the ledger, before the batch that
//! announces it is sent: a node killed after a `client_connected` went out
//! always leaves the record from which the reaper sends its
//! `client_disconnected`.
//!
//! The reaper runs on the leader every [`REAP_EVERY`]: a tracked node whose
//! registry entry (`{prefix}:node:{id}`, TTL [`ANNOUNCE_TTL`]) is gone is
//! dead; its clients get `client_disconnected` with reason `node_lost`, its
//! topics are vacated (with `topic_vacated` where it was the last holder),
//! and its records are deleted, all claimed in one step so two reapers
//! never report a node twice. A dead node is so reported within
//! `ANNOUNCE_TTL + REAP_EVERY` (12 s) of its last announcement, plus the
//! webhook delivery. A node that finds itself reaped while alive (cut off
//! from Redis longer than the TTL) announces its clients and topics again.
//! A node starting under an id with leftovers reports and cleans them first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::occupancy::Occupancy;
use super::{Ledger, Leftovers, Record};
use crate::backend::webhooks::{Bookkeeping, Event, Webhooks};
use crate::clients::{ClientInfo, Clients, Listener};
use crate::election::Leadership;
use crate::hub::Hub;
use crate::metrics as m;
use crate::registry::ANNOUNCE_TTL;

/// How often the reaper looks for dead nodes (and a node checks that it is
/// still tracked).
pub const REAP_EVERY: Duration = Duration::from_secs(2);
/// How long a batch waits for the node's start-up cleanup before it is
/// sent without its records written.
const READY_WAIT: Duration = Duration::from_secs(2);

/// Cheap-to-clone handle to the webhook bookkeeping of one node.
#[derive(Clone)]
pub struct Watch {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    webhooks: Webhooks,
    ledger: Arc<dyn Ledger>,
    clients: Clients,
    occupancy: Occupancy,
    /// Record changes not yet written: a connected client's record
    /// (`Some`), written before the batch that announces it, or the deletion
    /// (`None`) of one whose `client_disconnected` was dropped by a full
    /// queue or whose deletion failed. A record is otherwise deleted only
    /// after its client's `client_disconnected` was sent
    /// (`Bookkeeping::after_send`). Bounded: a record only for a
    /// `client_connected` that was queued, a deletion only for a record
    /// written. std Mutex, never held across `.await`.
    records: Mutex<HashMap<Arc<str>, Option<Record>>>,
    ready: watch::Receiver<bool>,
    /// Stops the reaper before the drain deletes this node's keys.
    reaper: CancellationToken,
}

/// What [`Watch::start`] wires together.
pub struct Parts {
    pub node: String,
    pub webhooks: Webhooks,
    pub ledger: Arc<dyn Ledger>,
    pub clients: Clients,
    pub hub: Hub,
    pub leadership: watch::Receiver<Leadership>,
}

impl Watch {
    /// Starts the occupancy worker and the reaper, and hooks into the
    /// client registry, the hub and the webhook sender.
    pub fn start(parts: Parts) -> Watch {
        let (ready_tx, ready) = watch::channel(!parts.ledger.shared());
        let occupancy = Occupancy::start(
            &parts.node,
            parts.hub.clone(),
            parts.ledger.clone(),
            parts.webhooks.clone(),
            ready.clone(),
        );
        let w = Watch {
            inner: Arc::new(Inner {
                node: parts.node,
                webhooks: parts.webhooks.clone(),
                ledger: parts.ledger,
                clients: parts.clients.clone(),
                occupancy: occupancy.clone(),
                records: Mutex::new(HashMap::new()),
                ready,
                reaper: CancellationToken::new(),
            }),
        };
        parts.clients.set_listener(Arc::new(w.clone()));
        parts.webhooks.set_bookkeeping(Arc::new(w.clone()));
        parts
            .hub
            .set_observer(Arc::new(move |topic: &str| occupancy.touch(topic)));
        if w.inner.ledger.shared() {
            tokio::spawn(w.clone().reap_loop(ready_tx, parts.leadership));
        }
        w
    }

    pub fn occupancy(&self) -> &Occupancy {
        &self.inner.occupancy
    }

    /// Writes the pending client records (before a batch goes out).
    async fn write_records(&self) {
        let mut ready = self.inner.ready.clone();
        let _ = tokio::time::timeout(READY_WAIT, ready.wait_for(|r| *r)).await;
        let pending: Vec<(Arc<str>, Option<Record>)> =
            self.inner.records.lock().unwrap().drain().collect();
        if pending.is_empty() {
            return;
        }
        let changes = pending.clone();
        if let Err(e) = self.inner.ledger.record(&self.inner.node, changes).await {
            tracing::warn!(cause = %e, "client records not written; the reaper may miss them if this node dies now");
            let mut records = self.inner.records.lock().unwrap();
            for (id, record) in pending {
                // A newer change made meanwhile wins.
                records.entry(id).or_insert(record);
            }
        }
    }

    /// Reports what a dead node (or this node's earlier life) left: its
    /// clients' `client_disconnected` (`node_lost`), then its topics,
    /// vacated in the ledger, with `topic_vacated` where it was the last
    /// holder.
    async fn report(&self, dead: &str, left: Leftovers) {
        tracing::info!(
            node = dead,
            clients = left.clients.len(),
            topics = left.topics.len(),
            "reporting a dead node's clients and topics"
        );
        for (client, record) in &left.clients {
            self.inner.webhooks.emit(Event::client_disconnected(
                client,
                &record.user,
                dead,
                crate::backend::webhooks::NODE_LOST,
            ));
        }
        for topic in &left.topics {
            let mut tries = 0;
            loop {
                match self.inner.ledger.vacate(dead, topic).await {
                    Ok(Some(seq)) => {
                        self.inner.webhooks.emit(Event::topic_vacated(topic, seq));
                    }
                    Ok(None) => {}
                    Err(e) if tries < 5 => {
                        tries += 1;
                        tracing::warn!(topic, cause = %e, "vacating a dead node's topic failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(topic, cause = %e, "a dead node's topic stays occupied");
                    }
                }
                break;
            }
        }
    }

    /// Start-up cleanup, then every [`REAP_EVERY`]: stay tracked (heal if
    /// reaped), and on the leader report dead nodes.
    async fn reap_loop(self, ready: watch::Sender<bool>, leadership: watch::Receiver<Leadership>) {
        let stop = self.inner.reaper.clone();
        let me = self.inner.node.clone();
        // Leftovers of an earlier process with this id, and tracking: only
        // once the registry knows this node, so no reaper takes the new
        // life for dead.
        loop {
            let res = async {
                if !self.inner.ledger.alive(&me).await? {
                    return Ok(false);
                }
                if let Some(left) = self.inner.ledger.claim(&me, true).await?
                    && (!left.clients.is_empty() || !left.topics.is_empty())
                {
                    self.report(&me, left).await;
                }
                self.inner.ledger.track(&me).await?;
                Ok::<_, crate::redis::RedisError>(true)
            }
            .await;
            match res {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::debug!(cause = %e, "webhook start-up cleanup: retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.cancelled() => return,
            }
        }
        let _ = ready.send(true);
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            match self.inner.ledger.track(&me).await {
                Ok(true) => self.heal(),
                Ok(false) => {}
                Err(e) => tracing::debug!(cause = %e, "tracking check failed"),
            }
            if leadership.borrow().leader {
                self.reap(&me).await;
            }
        }
    }

    /// On the leader: reports every tracked node whose registry entry is gone.
    async fn reap(&self, me: &str) {
        let tracked = match self.inner.ledger.tracked().await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(cause = %e, "reaper: tracked nodes unreadable");
                return;
            }
        };
        for node in tracked.iter().filter(|n| *n != me) {
            if !matches!(self.inner.ledger.alive(node).await, Ok(false)) {
                continue;
            }
            match self.inner.ledger.claim(node, false).await {
                Ok(Some(left)) => self.report(node, left).await,
                Ok(None) => {}
                Err(e) => tracing::warn!(node, cause = %e, "reaper: claiming a dead node failed"),
            }
        }
    }

    /// This node was reaped while alive: its clients were reported
    /// disconnected and its topics vacated. Announce them again.
    fn heal(&self) {
        let clients = self.inner.clients.all();
        tracing::warn!(
            clients = clients.len(),
            "this node was taken for dead (cut off from Redis longer than the registry TTL): announcing its clients and topics again"
        );
        for client in &clients {
            self.connected(client);
        }
        self.inner.occupancy.reassert();
    }

    /// The drain, once the sessions are over (or the grace period is):
    /// every client still registered is reported, every topic released,
    /// the queue sent until `deadline`, and then, only when all of it was
    /// delivered, this node's records deleted. Deleted first, a receiver
    /// that was down for the drain would never hear of those clients'
    /// disconnections; kept, another node's reaper reports them once this
    /// node has left the registry (a receiver may then hear some twice).
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        self.inner.reaper.cancel();
        self.inner.clients.end_all(m::reason::SHUTDOWN);
        self.inner.occupancy.settle(deadline).await;
        self.inner.occupancy.release_all().await;
        let abandoned = self.inner.webhooks.flush(deadline).await;
        if !self.inner.ledger.shared() {
            return;
        }
        if abandoned > 0 {
            tracing::warn!(
                abandoned,
                "this node's webhook records are kept: another node's reaper reports its clients as disconnected"
            );
            return;
        }
        if let Err(e) = self.inner.ledger.claim(&self.inner.node, true).await {
            tracing::warn!(cause = %e, "this node's webhook records were not deleted; the reaper will report them");
        }
    }
}

impl Listener for Watch {
    /// The record is kept for a `client_connected` that was queued: one
    /// the full queue dropped announces nobody the reaper would have to
    /// report.
    fn connected(&self, client: &ClientInfo) {
        // Under the lock: the batch that sends the event cannot write the
        // records before this one is among them.
        let mut records = self.inner.records.lock().unwrap();
        let queued = self
            .inner
            .webhooks
            .emit(Event::client_connected(client, &self.inner.node));
        if queued && self.inner.ledger.shared() {
            records.insert(
                client.id.clone(),
                Some(Record {
                    user: client.user.to_string(),
                    transport: client.transport.to_string(),
                }),
            );
        }
    }

    /// The client's record goes after its `client_disconnected` was sent
    /// (or given up): until then the reaper, or a drained node that kept
    /// its records, can still report it. When the full queue drops the
    /// event, the record goes with the next batch instead: nothing would
    /// ever delete it.
    fn disconnected(&self, client: &ClientInfo, reason: &'static str) {
        let event = Event::client_disconnected(&client.id, &client.user, &self.inner.node, reason);
        if !self.inner.ledger.shared() {
            self.inner.webhooks.emit(event);
            return;
        }
        let mut records = self.inner.records.lock().unwrap();
        if !self
            .inner
            .webhooks
            .emit(event.forgetting(client.id.clone()))
        {
            match records.get(&client.id) {
                // Never written: nothing to delete.
                Some(Some(_)) => {
                    records.remove(&client.id);
                }
                _ => {
                    records.insert(client.id.clone(), None);
                }
            }
        }
    }
}

impl Bookkeeping for Watch {
    fn before_send(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.write_records())
    }

    fn after_send(&self, forget: Vec<Arc<str>>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            {
                // A record put back after a failed write must not be
                // written now that its client is reported gone.
                let mut records = self.inner.records.lock().unwrap();
                for id in &forget {
                    records.remove(id);
                }
            }
            let changes: Vec<_> = forget.iter().map(|id| (id.clone(), None)).collect();
            if let Err(e) = self.inner.ledger.record(&self.inner.node, changes).await {
                tracing::debug!(cause = %e, "client records not deleted; tried again with the next batch");
                let mut records = self.inner.records.lock().unwrap();
                for id in forget {
                    records.entry(id).or_insert(None);
                }
            }
        })
    }
}

/// The documented bound on reporting a dead node: its registry entry
/// expires at most [`ANNOUNCE_TTL`] after its last announcement, and the
/// reaper looks every [`REAP_EVERY`].
pub const DEAD_NODE_BOUND: Duration =
    Duration::from_secs(ANNOUNCE_TTL.as_secs() + REAP_EVERY.as_secs());
