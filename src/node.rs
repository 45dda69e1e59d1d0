//! One node: the handles wired together, built from a [`Config`], and the
//! drain that ends it.
//!
//! Embedded mode (no `REDIS_URL`) and cluster mode differ only in which
//! [`Backplane`] and [`Election`] are built here; everything else runs the
//! same code.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Hooks;
use crate::backend::webhooks::{Event, Webhooks};
use crate::backplane::memory::MemoryBackplane;
use crate::backplane::redis::RedisBackplane;
use crate::backplane::{self, Backplane, Status};
use crate::clients::Clients;
use crate::config::Config;
use crate::control::memory::{LocalBus, MemoryLedger};
use crate::control::redis::{RedisControl, RedisLedger};
use crate::control::watch::{Parts as WatchParts, Watch};
use crate::control::{ControlBus, Ledger};
use crate::device::bus::{CommandBus, NoBus, RedisBus};
use crate::device::store::{DeviceStore, MemoryStore, RedisStore};
use crate::device::{self, Device};
use crate::election::memory::MemoryElection;
use crate::election::redis::RedisElection;
use crate::election::{Election, Leadership};
use crate::gateway::recovery::{self, SessionStore};
use crate::history::History;
use crate::history::coalesce::Coalesced;
use crate::history::memory::MemoryHistory;
use crate::history::redis::RedisHistory;
use crate::hub::{Fanout, Hub};
use crate::leader;
use crate::redis::{Keys, Redis, RedisError};
use crate::registry::{self, MemoryRegistry, NodeInfo, RedisRegistry, Registry};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("REDIS_URL: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Hooks(#[from] crate::backend::hooks::BuildError),
    #[error("could not start the client input runtime: {0}")]
    Ingress(std::io::Error),
}

/// The parts that differ between embedded and cluster mode.
struct Backends {
    backplane: Arc<dyn Backplane>,
    history: Arc<dyn History>,
    election: Arc<dyn Election>,
    registry: Arc<dyn Registry>,
    store: Arc<dyn DeviceStore>,
    bus: Arc<dyn CommandBus>,
    control: Arc<dyn ControlBus>,
    ledger: Arc<dyn Ledger>,
    /// Socket.IO session records (connection state recovery).
    sio_sessions: Arc<dyn SessionStore>,
    /// Presence, and every node's presence diff messages.
    presence: (
        Arc<dyn crate::presence::Store>,
        tokio::sync::mpsc::Receiver<crate::presence::Heard>,
    ),
    /// The subscriber connections besides the backplane's, for `/readyz`.
    listeners: crate::redis::Listeners,
}

/// The only place that looks at `REDIS_URL`: memory implementations for one
/// embedded node, Redis ones for a cluster.
fn backends(
    config: &Config,
    inbound_tx: tokio::sync::mpsc::Sender<backplane::Inbound>,
    requests_tx: tokio::sync::mpsc::Sender<device::Request>,
    clients: &Clients,
    stop: CancellationToken,
) -> Result<Backends, BuildError> {
    let Some(url) = &config.redis_url else {
        let backplane: Arc<dyn Backplane> = Arc::new(MemoryBackplane::new(inbound_tx));
        let (presence, diffs) = crate::presence::memory::MemoryStore::new();
        return Ok(Backends {
            presence: (Arc::new(presence), diffs),
            history: Arc::new(MemoryHistory::new(backplane.clone(), &config.history)),
            backplane,
            election: Arc::new(MemoryElection::new(config.node_id.clone())),
            registry: Arc::new(MemoryRegistry::default()),
            store: Arc::new(MemoryStore::default()),
            bus: Arc::new(NoBus),
            control: Arc::new(LocalBus::new(clients.clone())),
            ledger: Arc::new(MemoryLedger::default()),
            sio_sessions: Arc::new(recovery::MemoryStore::default()),
            listeners: Default::default(),
        });
    };
    if let Some(ca) = &config.redis_ca_file {
        crate::redis::set_ca_file(ca.clone());
    }
    let redis = Redis::connect(url)?;
    let keys = Keys::new(&config.redis_prefix, redis.mode());
    let listeners = crate::redis::Listeners::new(url, redis.clone(), keys.clone(), &config.node_id);
    let election = Arc::new(RedisElection::start(
        redis.clone(),
        keys.clone(),
        &config.node_id,
        config.leader_lease,
    ));
    let bus = RedisBus::start(
        &listeners,
        redis.clone(),
        keys.clone(),
        config.node_id.clone(),
        election.watch(),
        (requests_tx, config.command_timeout),
        stop.clone(),
    )?;
    let registry: Arc<dyn Registry> = Arc::new(RedisRegistry::new(redis.clone(), keys.clone()));
    let control = RedisControl::start(
        &listeners,
        redis.clone(),
        keys.clone(),
        config.node_id.clone(),
        clients.clone(),
        registry.clone(),
        stop.clone(),
    )?;
    let (presence, diffs) = crate::presence::redis::RedisStore::start(
        &listeners,
        redis.clone(),
        keys.clone(),
        config.presence.enabled(),
        stop.clone(),
    )?;
    Ok(Backends {
        presence: (Arc::new(presence), diffs),
        history: Arc::new(Coalesced::new(RedisHistory::start(
            redis.clone(),
            keys.clone(),
            &config.history,
            stop.clone(),
        ))),
        backplane: RedisBackplane::start(
            url,
            keys.clone(),
            &config.node_id,
            redis.clone(),
            config.redis_pubsub_buffer,
            inbound_tx,
            stop,
        )?,
        election,
        registry,
        store: Arc::new(RedisStore::new(redis.clone(), keys.clone())),
        bus,
        control,
        ledger: Arc::new(RedisLedger::new(redis.clone(), keys.clone())),
        sio_sessions: Arc::new(recovery::RedisStore::new(redis, keys)),
        listeners,
    })
}

/// Cheap-to-clone handle to everything a request handler may need.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    hub: Hub,
    election: Arc<dyn Election>,
    registry: Arc<dyn Registry>,
    device: Device,
    leadership: watch::Receiver<Leadership>,
    backplane_status: watch::Receiver<Status>,
    /// Cancelled when client sessions must close (after the readiness delay).
    shutdown: CancellationToken,
    /// Stops background tasks (leader duties, registry) at the very end.
    stop: CancellationToken,
    /// Set at the first signal: `/readyz` turns 503 at once.
    draining: AtomicBool,
    /// Every client session, so the drain can wait for them.
    sessions: TaskTracker,
    connections: AtomicUsize,
    proxy_connections: AtomicUsize,
    /// Connections per client address and per user.
    limits: Arc<crate::limits::Limits>,
    metrics: Option<PrometheusHandle>,
    /// Engine.IO sessions reachable by sid (long-polling, upgrades).
    engineio: crate::gateway::engineio::Sessions,
    /// With `SOCKETIO_STATE_RECOVERY`: the Socket.IO session records.
    socketio_recovery: Option<crate::gateway::recovery::Registry>,
    /// Taken by the drain, which stops the duties before the lease goes.
    leader: std::sync::Mutex<Option<leader::Leader>>,
    /// Calls to the application back end (`PROXY_*`).
    hooks: Hooks,
    started_at: SystemTime,
    started: Instant,
    /// This node's client connections, for the control API and webhooks.
    clients: Clients,
    control: Arc<dyn ControlBus>,
    /// Set when `WEBHOOK_URL` is.
    webhooks: Option<Webhooks>,
    watch: Option<Watch>,
    /// Who is on which `PRESENCE_TOPICS` topic.
    presence: crate::presence::Presence,
    /// WebSocket sessions run there, below the deliveries' priority.
    ingress: crate::gateway::ingress::Ingress,
    /// Not ready until these are subscribed.
    listeners: crate::redis::Listeners,
}

impl Node {
    /// Builds the node for `config`. Spawns the dispatcher and leader duties,
    /// so it must run inside a tokio runtime.
    pub async fn build(
        config: Config,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Node, BuildError> {
        let config = Arc::new(config);
        let hooks = Hooks::new(&config)?;
        let (inbound_tx, inbound_rx) = backplane::inbound_queue();
        let stop = CancellationToken::new();
        let requests = device::request_queue();
        let clients = Clients::default();
        let Backends {
            backplane,
            history,
            election,
            registry,
            store,
            bus,
            control,
            ledger,
            sio_sessions,
            presence,
            listeners,
        } = backends(
            &config,
            inbound_tx,
            requests.0.clone(),
            &clients,
            stop.clone(),
        )?;
        let hub = Hub::new(
            backplane.clone(),
            history,
            config.history.clone(),
            Fanout::per_worker(config.websocket_flush_interval),
        );
        hub.set_max_topics(config.max_topics_per_node);
        hub.spawn_dispatcher(inbound_rx);
        hub.spawn_pressure_sampler();
        hub.spawn_checker(stop.clone());
        let webhooks = config
            .webhooks
            .clone()
            .map(|w| Webhooks::start(w, &config.node_id));
        let watch = webhooks.as_ref().map(|webhooks| {
            Watch::start(WatchParts {
                node: config.node_id.clone(),
                webhooks: webhooks.clone(),
                ledger,
                clients: clients.clone(),
                hub: hub.clone(),
                leadership: election.watch(),
            })
        });
        let presence = crate::presence::Presence::start(
            config.presence.clone(),
            &config.node_id,
            presence.0,
            presence.1,
            webhooks.clone(),
            election.watch(),
        );
        let device = Device::new(device::Parts {
            apps: config.device_apps.clone(),
            store,
            bus,
            requests,
            hub: hub.clone(),
            election: election.clone(),
            driver: config.device_driver.clone(),
            fps: config.device_fps,
            node_id: config.node_id.clone(),
            timeout: config.command_timeout,
        });
        device.spawn_cache(stop.clone());
        let compat = config.redis_url.as_deref().and_then(|url| {
            crate::compat::Compat::new(
                &config.compat,
                url,
                hub.clone(),
                control.clone(),
                config.http_body_limit,
            )
        });
        let leader = leader::spawn(
            leader::Duties {
                hub: hub.clone(),
                mock_events: config.mock_events.clone(),
                device: Some(device.clone()),
                compat,
            },
            election.watch(),
            stop.clone(),
        );
        let socketio_recovery = config
            .socketio_state_recovery
            .then(|| recovery::Registry::start(sio_sessions, config.history.ttl, stop.clone()));
        let limits = crate::limits::Limits::new(&config);
        let ingress = crate::gateway::ingress::Ingress::start(tokio::runtime::Handle::current())
            .map_err(BuildError::Ingress)?;
        let node = Node {
            inner: Arc::new(Inner {
                leadership: election.watch(),
                backplane_status: backplane.status(),
                config,
                hub,
                election,
                registry,
                device,
                shutdown: CancellationToken::new(),
                stop,
                draining: AtomicBool::new(false),
                sessions: TaskTracker::new(),
                connections: AtomicUsize::new(0),
                proxy_connections: AtomicUsize::new(0),
                limits,
                metrics,
                engineio: Default::default(),
                socketio_recovery,
                leader: std::sync::Mutex::new(Some(leader)),
                hooks,
                started_at: SystemTime::now(),
                started: Instant::now(),
                clients,
                control,
                webhooks,
                watch,
                presence,
                ingress,
                listeners,
            }),
        };
        tokio::spawn(announce_loop(node.clone()));
        Ok(node)
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn election(&self) -> &Arc<dyn Election> {
        &self.inner.election
    }

    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The application back end's hooks.
    pub fn hooks(&self) -> &Hooks {
        &self.inner.hooks
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.inner.registry
    }

    /// This node's open client connections.
    pub fn clients(&self) -> &Clients {
        &self.inner.clients
    }

    /// Commands for connections on any node (the control API).
    pub fn control(&self) -> &Arc<dyn ControlBus> {
        &self.inner.control
    }

    /// Who is on which presence topic, cluster-wide.
    pub fn presence(&self) -> &crate::presence::Presence {
        &self.inner.presence
    }

    /// The webhook queue, when `WEBHOOK_URL` is set.
    pub fn webhooks(&self) -> Option<&Webhooks> {
        self.inner.webhooks.as_ref()
    }

    /// A client's publication was accepted: a `client_event` webhook when
    /// the topic matches `WEBHOOK_CLIENT_EVENT_TOPICS`.
    pub fn client_published(
        &self,
        topic: &str,
        event: &str,
        data: &RawValue,
        client: &str,
        user: &str,
    ) {
        if let Some(w) = &self.inner.webhooks
            && w.config().client_event(topic)
        {
            w.emit(Event::client_event(topic, event, data, client, user));
        }
    }

    /// What this node would announce about itself now.
    pub fn info(&self) -> NodeInfo {
        let leadership = self.leadership();
        NodeInfo {
            id: self.inner.config.node_id.clone(),
            leader: leadership.leader,
            epoch: leadership.epoch,
            connected_clients: self.connections(),
            proxy_connections: self.inner.proxy_connections.load(Ordering::Relaxed),
            topics: self.hub().topic_count(),
            subscriptions: self.hub().subscription_count(),
            delivered: self.hub().delivered(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: humantime::format_rfc3339_millis(self.inner.started_at).to_string(),
            updated_at: crate::protocol::timestamp(),
        }
    }

    /// Every live node, with this node's own entry fresh rather than as last
    /// announced.
    pub async fn cluster(&self) -> Result<Vec<NodeInfo>, RedisError> {
        let me = self.info();
        let mut nodes = self.inner.registry.nodes().await?;
        nodes.retain(|n| n.id != me.id);
        nodes.push(me);
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    pub fn leadership(&self) -> Leadership {
        *self.inner.leadership.borrow()
    }

    pub fn backplane_status(&self) -> Status {
        self.inner.backplane_status.borrow().clone()
    }

    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.inner.metrics.as_ref()
    }

    /// Where WebSocket sessions run (see `gateway::ingress`).
    pub fn ingress(&self) -> &crate::gateway::ingress::Ingress {
        &self.inner.ingress
    }

    pub fn sessions(&self) -> &TaskTracker {
        &self.inner.sessions
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Engine.IO sessions reachable by sid.
    /// Connections per client address and per user (`MAX_CONNECTIONS_PER_*`).
    pub fn limits(&self) -> &Arc<crate::limits::Limits> {
        &self.inner.limits
    }

    pub fn engineio(&self) -> &crate::gateway::engineio::Sessions {
        &self.inner.engineio
    }

    /// Socket.IO connection state recovery, when `SOCKETIO_STATE_RECOVERY` is on.
    pub fn socketio_recovery(&self) -> Option<&crate::gateway::recovery::Registry> {
        self.inner.socketio_recovery.as_ref()
    }

    /// Open proxied connections on this node.
    pub fn proxy_counter(&self) -> &AtomicUsize {
        &self.inner.proxy_connections
    }

    pub fn connection_opened(&self) {
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.inner.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Open client connections on this node (native and Socket.IO).
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::Relaxed)
    }

    pub fn started_at(&self) -> SystemTime {
        self.inner.started_at
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.inner.started.elapsed()
    }

    /// The current data of a topic for `request`: the whole device state for
    /// `device`; else the last publication this node delivered on the topic,
    /// else the configured mock data.
    pub fn current_data(&self, topic: &str) -> Option<Arc<RawValue>> {
        if topic == device::state::TOPIC {
            let json = self.inner.device.state().to_json().to_string();
            return Some(Arc::from(RawValue::from_string(json).expect("JSON")));
        }
        if let Some(last) = self.hub().last(topic) {
            return Some(last.data);
        }
        self.mock_event(topic).map(|e| Arc::from(e.data.clone()))
    }

    pub fn mock_event(&self, name: &str) -> Option<&crate::config::MockEvent> {
        self.inner
            .config
            .mock_events
            .iter()
            .find(|e| e.name == name)
    }

    /// Why this node is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.is_draining() {
            return Some("node is shutting down".into());
        }
        if let Status::Disconnected { reason } = self.backplane_status() {
            return Some(format!("backplane disconnected: {reason}"));
        }
        let what = self.inner.listeners.not_subscribed()?;
        Some(format!("not subscribed to {what} yet"))
    }

    /// Step 1 of the drain: stop being ready.
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// The rest of the drain, after the readiness delay: close client
    /// sessions (spread over `SHUTDOWN_DRAIN_MS`), give up the lease, and
    /// wait for the sessions until `deadline`.
    pub async fn finish_drain(&self, deadline: tokio::time::Instant) {
        // Draining is marked before the token is cancelled: a connection's
        // writer reads the flag and polls the token only once it is set.
        self.begin_drain();
        self.inner.shutdown.cancel();
        // The duties end (the last frame on the wire) before the lease is
        // given up, so the next leader never sends while this one still does.
        let leader = self.inner.leader.lock().unwrap().take();
        if let Some(leader) = leader {
            leader.stop(std::time::Duration::from_secs(2)).await;
        }
        self.inner.election.resign().await;
        self.inner.sessions.close();
        if tokio::time::timeout_at(deadline, self.inner.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.connections(),
                "grace period over with sessions still open"
            );
        }
        // Presence: the sessions' leaves written and announced, this
        // node's entries gone.
        self.inner.presence.shutdown(deadline).await;
        // Webhooks: the last disconnections and vacated topics, delivered
        // within what is left of the grace period.
        if let Some(w) = &self.inner.watch {
            w.shutdown(deadline).await;
        }
        self.inner.stop.cancel();
        self.inner
            .registry
            .withdraw(&self.inner.config.node_id)
            .await;
    }
}

/// Announces this node in the registry until the node stops.
async fn announce_loop(node: Node) {
    let stop = node.inner.stop.clone();
    let mut tick = tokio::time::interval(registry::ANNOUNCE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = node.inner.registry.announce(node.info()).await {
            tracing::debug!(cause = %e, "node announcement failed");
        }
    }
}
