//! The LED board: its state, the commands that change it, the driver that
//! shows it, and where it is persisted.
//!
//! Any node accepts a command and validates it against its cached copy; the
//! leader applies it (locally, or forwarded over the [`bus`]), persists the
//! result fenced by its epoch, drives the hardware, and publishes the
//! changed events on topic `device`. Every node's cache follows that topic
//! like any other subscriber, so reads and the initial state of a new client
//! never wait for Redis.

pub mod bus;
pub mod ddp;
pub mod driver;
pub mod e131;
pub mod frame;
pub mod render;
mod show;
pub mod state;
pub mod store;

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::DriverConfig;
use crate::election::{Election, Leadership};
use crate::hub::{Delivery, Hub, INTERNAL, Publication, Subscriber};
use crate::metrics as m;
use bus::CommandBus;
use driver::DriverHealth;
use state::{Command, DeviceState, EVENTS, TOPIC};
use store::{DeviceStore, StoreError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    /// The command breaks a rule; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// No leader could apply it now.
    #[error("{0}")]
    Unavailable(String),
}

/// A command on its way to the leader.
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Result<DeviceState, CommandError>>,
    /// When its sender stops waiting (`COMMAND_TIMEOUT_MS` after it was
    /// sent). A command is applied before then or never: one answered 503
    /// must not change the board later, over newer commands, when this node
    /// leads again.
    pub deadline: Instant,
}

impl Request {
    /// Whether nobody waits for this command's outcome any more.
    fn abandoned(&self) -> bool {
        self.reply.is_closed() || Instant::now() >= self.deadline
    }
}

/// Cheap-to-clone handle to this node's view of the device.
#[derive(Clone)]
pub struct Device {
    inner: Arc<Inner>,
}

struct Inner {
    /// std RwLock: read by handlers, written by the cache feed; no `.await`
    /// under it.
    cache: RwLock<DeviceState>,
    store: Arc<dyn DeviceStore>,
    bus: Arc<dyn CommandBus>,
    requests_tx: mpsc::Sender<Request>,
    /// Taken by the leader duty for the length of its term.
    requests_rx: tokio::sync::Mutex<mpsc::Receiver<Request>>,
    hub: Hub,
    election: Arc<dyn Election>,
    leadership: watch::Receiver<Leadership>,
    driver: DriverConfig,
    /// Frames per second of the leader's show (`DEVICE_FPS`).
    fps: u32,
    /// Names this node's E1.31 source.
    node_id: String,
    /// Written by the show every frame while this node leads; std Mutex,
    /// never held across `.await`.
    driver_health: Mutex<Option<DriverHealth>>,
    timeout: Duration,
}

/// What a [`Device`] is built from.
pub struct Parts {
    pub apps: Vec<String>,
    pub store: Arc<dyn DeviceStore>,
    pub bus: Arc<dyn CommandBus>,
    pub requests: (mpsc::Sender<Request>, mpsc::Receiver<Request>),
    pub hub: Hub,
    pub election: Arc<dyn Election>,
    pub driver: DriverConfig,
    pub fps: u32,
    pub node_id: String,
    pub timeout: Duration,
}

/// The queue of commands for this node's leader duty.
pub fn request_queue() -> (mpsc::Sender<Request>, mpsc::Receiver<Request>) {
    mpsc::channel(256)
}

impl Device {
    pub fn new(parts: Parts) -> Device {
        Device {
            inner: Arc::new(Inner {
                cache: RwLock::new(DeviceState::initial(&parts.apps)),
                store: parts.store,
                bus: parts.bus,
                requests_tx: parts.requests.0,
                requests_rx: tokio::sync::Mutex::new(parts.requests.1),
                hub: parts.hub,
                leadership: parts.election.watch(),
                election: parts.election,
                driver: parts.driver,
                fps: parts.fps,
                node_id: parts.node_id,
                driver_health: Mutex::new(None),
                timeout: parts.timeout,
            }),
        }
    }

    /// Loads the persisted state into the cache and follows topic `device`.
    /// Retries in the background while Redis is unreachable.
    pub fn spawn_cache(&self, stop: CancellationToken) {
        let device = self.clone();
        tokio::spawn(async move {
            let mut loaded = false;
            let mut subscribed = false;
            while !(loaded && subscribed) {
                if !loaded {
                    match device.inner.store.load().await {
                        Ok(Some(s)) => {
                            device.inner.election.observe_epoch(s.epoch);
                            device.merge_apps_into_cache(s);
                            loaded = true;
                        }
                        Ok(None) => loaded = true,
                        Err(e) => tracing::debug!(cause = %e, "device state not loaded yet"),
                    }
                }
                if !subscribed {
                    let feed: Arc<dyn Subscriber> = Arc::new(CacheFeed(device.clone()));
                    subscribed = device
                        .inner
                        .hub
                        .subscribe(TOPIC, INTERNAL, feed, None, Box::new(|_| {}))
                        .await
                        .is_ok();
                }
                if !(loaded && subscribed) {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        });
    }

    /// Takes a loaded state, keeping this node's configured app list.
    fn merge_apps_into_cache(&self, mut s: DeviceState) {
        let apps = self.inner.cache.read().unwrap().apps.clone();
        for app in &apps {
            s.configs
                .entry(app.clone())
                .or_insert_with(|| state::default_config(app));
        }
        s.apps = apps;
        if !s.apps.contains(&s.current_app) {
            s.current_app = s.apps[0].clone();
        }
        *self.inner.cache.write().unwrap() = s;
    }

    /// This node's cached copy of the state.
    pub fn state(&self) -> DeviceState {
        self.inner.cache.read().unwrap().clone()
    }

    /// The driver's health when this node leads.
    pub fn driver_health(&self) -> Option<DriverHealth> {
        self.inner.driver_health.lock().unwrap().clone()
    }

    /// Validates a REST body for `kind` (switch, config, carousel, settings)
    /// against the cached state.
    pub fn parse(&self, kind: &str, body: &Value) -> Result<Command, CommandError> {
        state::parse_command(kind, body, &self.inner.cache.read().unwrap())
            .map_err(|e| CommandError::Invalid(e.0))
    }

    /// Has the leader apply `command`; returns the new state once persisted.
    pub async fn submit(&self, command: Command) -> Result<DeviceState, CommandError> {
        let start = Instant::now();
        let name = command.name();
        let leading = self.inner.leadership.borrow().leader;
        let result = if leading {
            self.submit_local(command).await
        } else {
            self.inner.bus.forward(command, self.inner.timeout).await
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(CommandError::Invalid(_)) => "invalid",
            Err(CommandError::Unavailable(_)) => "unavailable",
        };
        metrics::histogram!(m::COMMAND_SECONDS, "command" => name, "outcome" => outcome)
            .record(start.elapsed().as_secs_f64());
        if let Ok(state) = &result {
            // Read-your-writes on this node; the published events say the same.
            *self.inner.cache.write().unwrap() = state.clone();
        }
        result
    }

    /// Queues `command` for this node's leader duty.
    pub async fn submit_local(&self, command: Command) -> Result<DeviceState, CommandError> {
        let (tx, rx) = oneshot::channel();
        let no_leader = || {
            CommandError::Unavailable(
                "no leader is available to apply the command; try again".into(),
            )
        };
        // One deadline for the queue and the answer: the caller waits
        // COMMAND_TIMEOUT_MS at most, not twice that.
        let deadline = Instant::now() + self.inner.timeout;
        let request = Request {
            command,
            reply: tx,
            deadline,
        };
        tokio::time::timeout_at(deadline.into(), self.inner.requests_tx.send(request))
            .await
            .map_err(|_| no_leader())?
            .map_err(|_| no_leader())?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(res)) => res,
            _ => Err(CommandError::Unavailable(format!(
                "no leader applied the command within {} ms",
                self.inner.timeout.as_millis()
            ))),
        }
    }

    /// The leader duty: load or re-seed the state, drive the hardware, apply
    /// commands, rotate the carousel. Returns when `token` is cancelled or a
    /// newer leader fences this one out.
    pub async fn lead(&self, epoch: u64, token: CancellationToken) {
        let mut requests = tokio::select! {
            r = self.inner.requests_rx.lock() => r,
            _ = token.cancelled() => return,
        };
        // The saved state, unless this node's copy is of a newer term (a
        // Redis restored from an older snapshot). Not loaded (a timeout),
        // the term waits and asks again instead of saving this node's copy
        // over it: a node that never saw the state holds the defaults.
        let loaded = loop {
            match self.inner.store.load().await {
                Ok(loaded) => break loaded,
                Err(e) => {
                    tracing::warn!(cause = %e, "device state not loaded; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = token.cancelled() => return,
                    }
                }
            }
        };
        let own = self.state();
        let mut state = match loaded {
            Some(s) => {
                self.inner.election.observe_epoch(s.epoch);
                if s.epoch >= own.epoch {
                    self.merge_apps_into_cache(s);
                    self.state()
                } else {
                    tracing::warn!(
                        saved = s.epoch,
                        own = own.epoch,
                        "the saved device state is older than this node's copy; keeping the copy"
                    );
                    own
                }
            }
            None => {
                tracing::info!("no persisted device state; seeding it from this node's copy");
                own
            }
        };
        state.epoch = epoch;
        match self.inner.store.save(&state, epoch).await {
            Err(StoreError::Fenced { .. }) => {
                tracing::warn!(epoch, "a newer leader exists; not leading the device");
                return;
            }
            Err(e) => tracing::warn!(cause = %e, "device state not persisted"),
            Ok(()) => {}
        }
        // The show renders and sends frames for this term; it follows the
        // state through `shown` and ends with the term.
        // (state, how many states this term applied).
        let (shown, states) = watch::channel((state.clone(), 1u64));
        let show_token = token.child_token();
        let show = tokio::spawn(show::run(self.clone(), epoch, states, show_token.clone()));
        self.publish(&state, &EVENTS).await;
        let mut next_rotation = rotation_deadline(&state);

        loop {
            let (command, reply) = tokio::select! {
                _ = token.cancelled() => break,
                req = requests.recv() => match req {
                    Some(r) if r.abandoned() => {
                        let _ = r.reply.send(Err(CommandError::Unavailable(
                            "the command waited too long for the leader; try again".into(),
                        )));
                        continue;
                    }
                    Some(r) => (r.command, Some(r.reply)),
                    None => break,
                },
                _ = sleep_until_opt(next_rotation) => (Command::Rotate, None),
            };
            let res = match state.apply(&command) {
                Err(e) => Err(CommandError::Invalid(e.0)),
                Ok((mut next, changed)) => {
                    next.epoch = epoch;
                    match self.inner.store.save(&next, epoch).await {
                        Ok(()) => {
                            let carousel_changed = next.carousel != state.carousel;
                            state = next;
                            shown.send_modify(|(shown, applied)| {
                                *shown = state.clone();
                                *applied += 1;
                            });
                            self.publish(&state, &changed).await;
                            if carousel_changed || matches!(command, Command::Rotate) {
                                next_rotation = rotation_deadline(&state);
                            }
                            Ok(state.clone())
                        }
                        Err(StoreError::Fenced { .. }) => {
                            tracing::warn!(epoch, "fenced out by a newer leader");
                            if let Some(reply) = reply {
                                let _ = reply.send(Err(CommandError::Unavailable(
                                    "leadership changed; try again".into(),
                                )));
                            }
                            break;
                        }
                        Err(e) => {
                            if matches!(command, Command::Rotate) {
                                next_rotation = Some(Instant::now() + Duration::from_secs(1));
                            }
                            Err(CommandError::Unavailable(format!(
                                "state not persisted: {e}"
                            )))
                        }
                    }
                }
            };
            if let Some(reply) = reply {
                let _ = reply.send(res);
            }
        }
        // What is still queued was sent to this term: nothing here applies
        // it now, and a later term must not (it would land over newer
        // state), so its senders hear at once instead of at their timeout.
        while let Ok(r) = requests.try_recv() {
            let _ = r.reply.send(Err(CommandError::Unavailable(
                "leadership changed; try again".into(),
            )));
        }
        show_token.cancel();
        if let Err(e) = show.await {
            tracing::error!(cause = %e, "the show ended abnormally");
        }
        *self.inner.driver_health.lock().unwrap() = None;
    }

    /// Publishes `events` of `state` on topic `device`, carrying the epoch.
    async fn publish(&self, state: &DeviceState, events: &[&'static str]) {
        for event in events {
            let data = RawValue::from_string(state.event(event).to_string()).expect("JSON");
            if let Err(e) = self
                .inner
                .hub
                .publish_fenced(TOPIC, event, &data, Some(state.epoch))
                .await
            {
                tracing::warn!(event, cause = %e, "device event not published");
            }
        }
    }
}

fn rotation_deadline(state: &DeviceState) -> Option<Instant> {
    let c = &state.carousel;
    if !c.enabled || c.apps.is_empty() {
        return None;
    }
    let secs = c.apps.get(c.current_index).map_or(1, |e| e.duration.max(1));
    Some(Instant::now() + Duration::from_secs(secs as u64))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Keeps a node's cache in step with topic `device`.
struct CacheFeed(Device);

impl Subscriber for CacheFeed {
    /// Only the leader's publications carry an epoch; anything else on topic
    /// `device` is not device state and must not change the cache.
    fn deliver(&self, p: &Publication) -> Delivery {
        let Some(epoch) = p.fence else {
            return Delivery::Queued;
        };
        self.0.inner.election.observe_epoch(epoch);
        if (EVENTS.contains(&&*p.event) || &*p.event == state::APP_CONFIGS)
            && let Ok(data) = serde_json::from_str::<Value>(p.data.get())
        {
            let mut cache = self.0.inner.cache.write().unwrap();
            // A late event of an older term (delayed in a queue while the
            // new leader published) must not undo the newer one.
            if epoch < cache.epoch {
                return Delivery::Queued;
            }
            cache.absorb(&p.event, &data);
            cache.epoch = epoch;
        }
        Delivery::Queued
    }

    /// Lost device events are not repaired by replaying them here: the
    /// cache follows the state the leader persisted, which later events carry.
    fn gap(&self, _topic: &str, _gap: &crate::history::GapRange) -> Delivery {
        Delivery::Queued
    }

    fn transport(&self) -> &'static str {
        "internal"
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::bus::NoBus;
    use crate::device::store::{DeviceStore, MemoryStore};
    use crate::election::memory::MemoryElection;

    fn device() -> (Device, mpsc::Sender<Request>) {
        testing_device(Arc::new(MemoryStore::default()))
    }

    /// A device of the apps `clock` and `stars` on `store`, always the
    /// leader's (an embedded election); and its leader duty's queue.
    pub(crate) fn testing_device(store: Arc<MemoryStore>) -> (Device, mpsc::Sender<Request>) {
        let (hub, _inbound) = crate::hub::testing::hub(&[]);
        let requests = request_queue();
        let tx = requests.0.clone();
        let device = Device::new(Parts {
            apps: vec!["clock".into(), "stars".into()],
            store,
            bus: Arc::new(NoBus),
            requests,
            hub,
            election: Arc::new(MemoryElection::new("n".into())),
            driver: DriverConfig::Simulated,
            fps: 1,
            node_id: "n".into(),
            timeout: Duration::from_secs(2),
        });
        (device, tx)
    }

    fn request(
        command: Command,
        deadline: Instant,
    ) -> (
        Request,
        oneshot::Receiver<Result<DeviceState, CommandError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let request = Request {
            command,
            reply,
            deadline,
        };
        (request, rx)
    }

    /// A Redis restored from an older snapshot holds an older term's
    /// state: the new leader keeps its own newer copy, and saves it.
    #[tokio::test]
    async fn an_older_saved_state_does_not_roll_the_board_back() {
        let store = Arc::new(MemoryStore::default());
        let (device, tx) = testing_device(store.clone());
        let mut old = device.state();
        old.epoch = 2;
        old.settings.brightness = 50;
        store.save(&old, 2).await.unwrap();
        {
            let mut cache = device.inner.cache.write().unwrap();
            cache.epoch = 5;
            cache.settings.brightness = 20;
        }
        let term = tokio::spawn({
            let device = device.clone();
            async move { device.lead(6, CancellationToken::new()).await }
        });
        let (current, rx) = request(
            Command::Switch {
                app: "stars".into(),
            },
            Instant::now() + Duration::from_secs(5),
        );
        tx.send(current).await.unwrap();
        let state = rx.await.unwrap().unwrap();
        assert_eq!((state.settings.brightness, state.epoch), (20, 6));
        assert_eq!(store.load().await.unwrap().unwrap().settings.brightness, 20);
        term.abort();
    }

    /// A command whose sender stopped waiting (answered 503) is never
    /// applied, and what a term leaves queued is answered at its end,
    /// not applied by a later term over newer state.
    #[tokio::test]
    async fn commands_nobody_waits_for_are_never_applied() {
        let (device, tx) = device();
        let stars = || Command::Switch {
            app: "stars".into(),
        };
        let past = Instant::now() - Duration::from_millis(1);
        let later = Instant::now() + Duration::from_secs(5);
        let (expired, expired_rx) = request(stars(), past);
        let (abandoned, abandoned_rx) = request(stars(), later);
        drop(abandoned_rx);
        let (dim, dim_rx) = request(Command::Settings { brightness: 10 }, later);
        tx.send(expired).await.unwrap();
        tx.send(abandoned).await.unwrap();
        tx.send(dim).await.unwrap();
        let token = CancellationToken::new();
        let term = tokio::spawn({
            let (device, token) = (device.clone(), token.clone());
            async move { device.lead(1, token).await }
        });
        let state = dim_rx.await.unwrap().unwrap();
        assert_eq!(state.settings.brightness, 10);
        assert_eq!(state.current_app, "clock", "neither switch was applied");
        assert!(matches!(
            expired_rx.await.unwrap(),
            Err(CommandError::Unavailable(_))
        ));
        // The term ends with a command still queued behind the cancel.
        token.cancel();
        term.await.unwrap();
        let (left, left_rx) = request(stars(), later);
        tx.send(left).await.unwrap();
        let (next, _) = request(Command::Settings { brightness: 20 }, later);
        tx.send(next).await.unwrap();
        let term = tokio::spawn({
            let device = device.clone();
            async move { device.lead(2, CancellationToken::new()).await }
        });
        // The second term applies them: they were sent to it, in time.
        let state = left_rx.await.unwrap().unwrap();
        assert_eq!(state.current_app, "stars");
        term.abort();
    }
}
