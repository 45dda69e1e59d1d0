//! The small Redis helper: builds fred clients the one right way (reconnect
//! policy, timeouts, large pub/sub buffer) and names every key and channel.
//!
//! Besides `backplane/redis.rs`, only this module imports fred; the
//! election, the node registry, the device store and the history reach Redis
//! through [`Redis`].

use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

/// How the nodes reach Redis, from the form of `REDIS_URL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `redis://` or `rediss://`: one server.
    Standalone,
    /// `redis-cluster://` or `rediss-cluster://`: a Redis Cluster; topics
    /// travel over sharded pub/sub.
    Cluster,
    /// `redis-sentinel://` or `rediss-sentinel://`: the primary named by
    /// `sentinelServiceName`, followed through failovers.
    Sentinel,
}

/// Checks a `REDIS_URL` the way the nodes will read it; the error says what
/// form was expected.
pub fn check_url(url: &str) -> Result<Mode, String> {
    const FORMS: &str = "expected redis://host:port, rediss://…, \
        redis-cluster://host:port?node=host:port&node=…, or \
        redis-sentinel://host:port?node=host:port&sentinelServiceName=NAME";
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    let mode = match scheme {
        "redis" | "rediss" => Mode::Standalone,
        "redis-cluster" | "rediss-cluster" => Mode::Cluster,
        "redis-sentinel" | "rediss-sentinel" => Mode::Sentinel,
        _ => return Err(FORMS.into()),
    };
    if mode == Mode::Sentinel && !url.contains("sentinelServiceName=") {
        return Err(
            "a redis-sentinel:// URL needs ?sentinelServiceName=NAME (the primary's name)".into(),
        );
    }
    Config::from_url(url).map_err(|e| format!("{FORMS}: {}", e.details()))?;
    Ok(mode)
}

/// Keys and channels under one prefix (`REDIS_PREFIX`, default `switchboard`).
///
/// On a Redis Cluster every key one script touches must live in one slot,
/// and a sharded channel published from a script must share the slot of its
/// keys. So in cluster mode the node's own keys carry the prefix as a hash
/// tag (`{switchboard}:leader`, …) and topic channels the topic
/// (`switchboard:t:{news}`), like the history keys always do. A single
/// server keeps the plain names.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    cluster: bool,
}

impl Keys {
    pub fn new(prefix: &str, mode: Mode) -> Self {
        Self {
            prefix: prefix.to_string(),
            cluster: mode == Mode::Cluster,
        }
    }

    /// Whether topics travel over sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`).
    pub fn sharded(&self) -> bool {
        self.cluster
    }

    /// The start of the node's own key names: `{prefix}` tagged in cluster mode.
    fn own(&self) -> String {
        if self.cluster {
            format!("{{{}}}", self.prefix)
        } else {
            self.prefix.clone()
        }
    }

    /// The channel of a topic: `{prefix}:t:{topic}` (`{prefix}:t:{{topic}}` in
    /// cluster mode) — where publishers `PUBLISH` (`SPUBLISH`).
    pub fn topic(&self, topic: &str) -> String {
        if self.cluster {
            format!("{}:t:{{{topic}}}", self.prefix)
        } else {
            format!("{}:t:{topic}", self.prefix)
        }
    }

    /// The topic a channel carries, if it is a topic channel.
    pub fn topic_of<'c>(&self, channel: &'c str) -> Option<&'c str> {
        let rest = channel
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":t:")?;
        if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(rest)
        }
    }

    pub fn leader(&self) -> String {
        format!("{}:leader", self.own())
    }

    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.own())
    }

    pub fn device(&self) -> String {
        format!("{}:device", self.own())
    }

    pub fn node(&self, id: &str) -> String {
        format!("{}:node:{id}", self.own())
    }

    pub fn node_pattern(&self) -> String {
        format!("{}:node:*", self.own())
    }

    /// The key prefix itself (`REDIS_PREFIX`), passed to the history functions.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Device commands for the leader.
    pub fn commands(&self) -> String {
        format!("{}:cmd", self.prefix)
    }

    /// Replies to device commands forwarded by node `id`.
    pub fn replies(&self, id: &str) -> String {
        format!("{}:reply:{id}", self.prefix)
    }

    /// Control commands for every node (`POST /api/subscribe`, …): classic
    /// pub/sub, which a cluster carries to every node.
    pub fn control(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Answers to the control commands node `id` sent.
    pub fn control_replies(&self, id: &str) -> String {
        format!("{}:control-reply:{id}", self.prefix)
    }

    /// The set of nodes whose clients subscribe to `topic` (webhooks'
    /// occupancy), in the topic's slot on a cluster.
    pub fn occupancy(&self, topic: &str) -> String {
        if self.cluster {
            format!("{}:occupancy:{{{topic}}}", self.prefix)
        } else {
            format!("{}:occupancy:{topic}", self.prefix)
        }
    }

    /// The last seq of `topic`'s occupancy transitions, in the slot of
    /// [`Keys::occupancy`]. Kept 10 s only: one key per topic a client ever
    /// touched would let hostile clients grow Redis without bound (issue 26),
    /// and after 10 s the Redis clock has moved past the last seq anyway.
    pub fn occupancy_seq(&self, topic: &str) -> String {
        if self.cluster {
            format!("{}:occupancy-seq:{{{topic}}}", self.prefix)
        } else {
            format!("{}:occupancy-seq:{topic}", self.prefix)
        }
    }

    /// The topics node `id` has added itself to (its share of occupancy),
    /// so that the reaper can take it back when the node dies.
    pub fn node_topics(&self, id: &str) -> String {
        format!("{}:node-topics:{id}", self.own())
    }

    /// Node `id`'s clients whose `client_connected` webhook may have gone
    /// out: client id → `{"user", "transport"}`.
    pub fn node_clients(&self, id: &str) -> String {
        format!("{}:node-clients:{id}", self.own())
    }

    /// The nodes that keep `node_topics` / `node_clients` entries: the ones
    /// the reaper watches.
    pub fn tracked_nodes(&self) -> String {
        format!("{}:tracked-nodes", self.own())
    }

    /// A Socket.IO session's record for connection state recovery
    /// (`gateway::recovery`), by its `pid`.
    pub fn socketio_session(&self, pid: &str) -> String {
        format!("{}:sio-session:{pid}", self.prefix)
    }

    /// A channel this node publishes probes on and listens to, to prove its
    /// subscriber connection still receives; `tag` places it on a shard.
    pub fn probe(&self, node: &str, tag: u32) -> String {
        if self.cluster {
            format!("{}:probe:{node}:{{p{tag}}}", self.prefix)
        } else {
            format!("{}:probe:{node}", self.prefix)
        }
    }

    /// Where node `node`'s listener of `what` (`Listeners::listen`) proves
    /// its subscription: subscribed in the same `SUBSCRIBE` as its channels,
    /// so a probe that comes back says Redis accepted all of them.
    pub fn listener_probe(&self, node: &str, what: &str) -> String {
        format!(
            "{}:listener-probe:{node}:{}",
            self.prefix,
            what.replace(' ', "-")
        )
    }

    // Presence (`presence::redis`). A topic's keys always carry the topic
    // as hash tag (new names, like the history keys): one script touches
    // one slot; node `id`'s own keys share the node keys' slot.

    /// Node `id`'s present clients on `topic`: client id → `{"user","info"}`.
    pub fn presence(&self, topic: &str, id: &str) -> String {
        format!("{}{id}", self.presence_base(topic))
    }

    /// [`Keys::presence`] without the node id (the scripts append it).
    pub fn presence_base(&self, topic: &str) -> String {
        format!("{}:presence:{{{topic}}}:", self.prefix)
    }

    /// The nodes with present clients on `topic`.
    pub fn presence_nodes(&self, topic: &str) -> String {
        format!("{}:presence-nodes:{{{topic}}}", self.prefix)
    }

    /// `topic`'s users → their number of present connections.
    pub fn presence_users(&self, topic: &str) -> String {
        format!("{}:presence-users:{{{topic}}}", self.prefix)
    }

    /// The topics where node `id` has present clients (for the reaper).
    pub fn presence_topics(&self, id: &str) -> String {
        format!("{}:presence-topics:{id}", self.own())
    }

    /// Node `id`'s sign of life for presence (`PX PRESENCE_TTL_MS`).
    pub fn presence_alive(&self, id: &str) -> String {
        format!("{}:presence-alive:{id}", self.own())
    }

    /// The nodes that keep presence entries: the ones the reaper watches.
    pub fn presence_hosts(&self) -> String {
        format!("{}:presence-hosts", self.own())
    }

    /// Presence changes, batched per node and interval, for every node.
    pub fn presence_diffs(&self) -> String {
        format!("{}:presence-diffs", self.prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: unexpected reply: {0}")]
    Reply(String),
    /// A subscription Redis did not take (fred cannot tell why).
    #[error("redis: subscription refused: {0}")]
    Refused(String),
}

/// The delays between tries against Redis, everywhere a node tries again:
/// fred's reconnect policy, a first connection ([`start_connecting`]) and
/// a listener's subscription ([`Listeners::listen`]).
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The delay after `last` (`None`: the first), doubling up to [`RETRY_MAX`].
fn next_retry(last: Option<Duration>) -> Duration {
    last.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX))
}

/// How long a plain command may take before it counts as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The CA certificate(s) that sign the Redis server's TLS certificate, for
/// `rediss://` URLs (`REDIS_CA_FILE`); set once at start-up.
static CA_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Trusts the PEM certificates in `path` (besides the system roots) for
/// `rediss://` connections made after this call.
pub fn set_ca_file(path: std::path::PathBuf) {
    let _ = CA_FILE.set(path);
}

fn tls_with_ca(path: &std::path::Path) -> Result<fred::types::config::TlsConfig, RedisError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let tls_err = |m: String| RedisError::Reply(format!("REDIS_CA_FILE: {m}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs_or_empty() {
        let _ = roots.add(cert);
    }
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| tls_err(e.to_string()))?;
    let mut n = 0;
    for cert in certs {
        roots
            .add(cert.map_err(|e| tls_err(e.to_string()))?)
            .map_err(|e| tls_err(e.to_string()))?;
        n += 1;
    }
    if n == 0 {
        return Err(tls_err("no PEM certificate in the file".into()));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(fred::types::config::TlsConnector::from(config).into())
}

/// The system roots, when any can be read: the CA file is what matters.
fn rustls_native_certs_or_empty() -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().certs
}

/// Builds a fred config from `url`, with reconnection forever (fred does not
/// reconnect by default) and bounded command and connect timeouts. Start
/// its clients with [`start_connecting`].
///
/// `pubsub_capacity` sizes fred's notification channels: every client has
/// several and each preallocates its capacity, so only the backplane's
/// subscriber, which must absorb bursts, gets a large one.
fn builder(url: &str, pubsub_capacity: usize) -> Result<Builder, RedisError> {
    let mut config = Config::from_url(url)?;
    // `rediss://`, `rediss-cluster://`, `rediss-sentinel://`.
    if url.starts_with("rediss")
        && let Some(path) = CA_FILE.get()
    {
        config.tls = Some(tls_with_ca(path)?);
    }
    let mut builder = Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RETRY_FIRST.as_millis() as u32,
            RETRY_MAX.as_millis() as u32,
            2,
        ))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = if url.contains("-cluster://") { 4 } else { 1 };
            // Without this a half-open connection is never noticed.
            c.unresponsive.max_timeout = Some(Duration::from_secs(3));
            c.unresponsive.interval = Duration::from_millis(500);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = COMMAND_TIMEOUT;
            // fred drops pub/sub messages when this broadcast lags (32 by default).
            p.broadcast_channel_capacity = pubsub_capacity;
        });
    Ok(builder)
}

/// A Lua script, run with EVALSHA (loaded on NOSCRIPT).
pub struct LuaScript(Script);

impl LuaScript {
    pub fn new(lua: &'static str) -> Self {
        Self(Script::from_lua(lua))
    }
}

/// A client for commands (not pub/sub subscriptions).
///
/// Every command fails fast while the connection is down: fred would
/// otherwise keep it queued and send it after Redis returns, long after the
/// caller was told it failed (a publish answered 503 would still be
/// delivered, a device command applied twice).
#[derive(Clone)]
pub struct Redis {
    client: Client,
    options: Options,
    mode: Mode,
}

impl Redis {
    /// Connects in the background: a node starts (not ready) while Redis is down.
    pub fn connect(url: &str) -> Result<Redis, RedisError> {
        let mode = check_url(url).map_err(RedisError::Reply)?;
        let client = builder(url, 32)?.build()?;
        start_connecting(&client, None);
        let options = Options {
            fail_fast: true,
            timeout: Some(COMMAND_TIMEOUT),
            // A cluster answers MOVED/ASK while slots move, and each
            // redirection costs fred an attempt.
            max_attempts: Some(if mode == Mode::Cluster { 4 } else { 1 }),
            ..Default::default()
        };
        Ok(Redis {
            client,
            options,
            mode,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The client with fail-fast options, for every command.
    fn c(&self) -> fred::clients::WithOptions<Client> {
        self.client.with_options(&self.options)
    }

    /// Waits up to `timeout` until the client is connected. Looks at its
    /// state every 10 ms: fred's `wait_for_connect` reads the state and then
    /// waits for the next connection event, so a connection made between
    /// the two is missed (seen: 2 s lost at a start).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.client.is_connected() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        within(COMMAND_TIMEOUT, self.c().ping::<String>(None)).await?;
        Ok(())
    }

    pub async fn publish(&self, channel: &str, payload: bytes::Bytes) -> Result<i64, RedisError> {
        within(COMMAND_TIMEOUT, self.c().publish(channel, payload)).await
    }

    /// `SPUBLISH`: sharded pub/sub, routed to the channel's slot.
    pub async fn spublish(&self, channel: &str, payload: bytes::Bytes) -> Result<i64, RedisError> {
        within(COMMAND_TIMEOUT, self.c().spublish(channel, payload)).await
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, RedisError> {
        within(COMMAND_TIMEOUT, self.c().get(key)).await
    }

    pub async fn set_px(&self, key: &str, value: &str, ttl: Duration) -> Result<(), RedisError> {
        let ms = ttl.as_millis() as i64;
        within(
            COMMAND_TIMEOUT,
            self.c()
                .set::<(), _, _>(key, value, Some(Expiration::PX(ms)), None, false),
        )
        .await
    }

    pub async fn del(&self, key: &str) -> Result<(), RedisError> {
        within(COMMAND_TIMEOUT, self.c().del::<i64, _>(key)).await?;
        Ok(())
    }

    /// Every key matching `pattern` (SCAN, never KEYS) with its value.
    pub async fn scan_values(&self, pattern: &str) -> Result<Vec<String>, RedisError> {
        let mut cursor = "0".to_string();
        let mut keys: Vec<String> = Vec::new();
        loop {
            // In cluster mode every key of `pattern` shares one slot (hash
            // tag): scan the node that owns it.
            let scan = match self.mode {
                Mode::Cluster => fred::cmd!(
                    "SCAN",
                    hash: fred::types::ClusterHash::Custom(fred::util::redis_keyslot(pattern.as_bytes()))
                ),
                _ => fred::cmd!("SCAN"),
            };
            let (next, batch): (String, Vec<String>) = within(
                COMMAND_TIMEOUT,
                self.c().custom(
                    scan,
                    vec![
                        cursor.clone(),
                        "MATCH".into(),
                        pattern.into(),
                        "COUNT".into(),
                        "500".into(),
                    ],
                ),
            )
            .await?;
            keys.extend(batch);
            if next == "0" {
                break;
            }
            cursor = next;
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = within(COMMAND_TIMEOUT, self.c().mget(keys)).await?;
        Ok(values.into_iter().flatten().collect())
    }

    /// Runs a Lua script (EVALSHA, loading it on NOSCRIPT) under `timeout`:
    /// fred's own command timeout did not apply to EVALSHA while Redis was down.
    pub async fn eval<R: FromValue>(
        &self,
        script: &LuaScript,
        keys: Vec<String>,
        args: Vec<String>,
        timeout: Duration,
    ) -> Result<R, RedisError> {
        let mut argv: Vec<String> = Vec::with_capacity(2 + keys.len() + args.len());
        argv.push(script.0.sha1().to_string());
        argv.push(keys.len().to_string());
        argv.extend(keys);
        argv.extend(args);
        let client = self.c();
        // Routed by the first key's slot (the SHA comes first, and fred
        // honours only an explicit slot for custom commands), so a cluster
        // sends it to the slot's owner at once.
        let hash = match argv.get(2) {
            Some(key) => {
                fred::types::ClusterHash::Custom(fred::util::redis_keyslot(key.as_bytes()))
            }
            None => fred::types::ClusterHash::Random,
        };
        match within(
            timeout,
            client.custom(fred::cmd!("EVALSHA", hash: hash.clone()), argv.clone()),
        )
        .await
        {
            Err(RedisError::Redis(e)) if e.details().starts_with("NOSCRIPT") => {
                // EVAL caches the script on the server that runs it (in a
                // cluster, the one that owns the keys).
                argv[0] = script.0.lua().map(|l| l.to_string()).unwrap_or_default();
                within(timeout, client.custom(fred::cmd!("EVAL", hash: hash), argv)).await
            }
            other => other,
        }
    }
}

impl Redis {
    /// Any command whose first argument is its key (routed to the key's
    /// slot on a cluster), under the command timeout.
    pub async fn command<R: FromValue>(
        &self,
        name: &'static str,
        args: Vec<String>,
    ) -> Result<R, RedisError> {
        within(
            COMMAND_TIMEOUT,
            self.c().custom(
                fred::cmd!(name, hash: fred::types::ClusterHash::FirstKey),
                args,
            ),
        )
        .await
    }
}

/// A reply as JSON-like nested lists of strings, for scripts that answer
/// arrays of arrays (`Nested::List`), strings or integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nested {
    Nil,
    Text(String),
    List(Vec<Nested>),
}

impl Nested {
    /// A list of strings (nil: none); `None` for any other shape.
    pub fn texts(&self) -> Option<Vec<String>> {
        match self {
            Nested::List(items) => items
                .iter()
                .map(|i| match i {
                    Nested::Text(t) => Some(t.clone()),
                    _ => None,
                })
                .collect(),
            Nested::Nil => Some(Vec::new()),
            Nested::Text(_) => None,
        }
    }
}

impl FromValue for Nested {
    fn from_value(value: Value) -> Result<Self, fred::error::Error> {
        Ok(match value {
            Value::Null => Nested::Nil,
            Value::Array(items) => Nested::List(
                items
                    .into_iter()
                    .map(Nested::from_value)
                    .collect::<Result<_, _>>()?,
            ),
            Value::Integer(i) => Nested::Text(i.to_string()),
            Value::Boolean(b) => Nested::Text(if b { "1" } else { "0" }.into()),
            other => Nested::Text(other.convert::<String>()?),
        })
    }
}

/// One element of a function's array reply: integers as their decimal text.
fn reply_bytes(v: Value) -> Result<bytes::Bytes, RedisError> {
    match v {
        Value::Integer(i) => Ok(bytes::Bytes::from(i.to_string())),
        Value::String(s) => Ok(s.into_inner()),
        Value::Bytes(b) => Ok(b),
        Value::Null => Ok(bytes::Bytes::new()),
        other => Err(RedisError::Reply(format!("{:?}", other.kind()))),
    }
}

impl Redis {
    /// `FCALL function 1 key args…` under the command timeout; the array
    /// reply as bytes.
    pub async fn fcall(
        &self,
        function: &str,
        key: &str,
        args: &[&str],
    ) -> Result<Vec<bytes::Bytes>, RedisError> {
        let mut argv: Vec<String> = Vec::with_capacity(3 + args.len());
        argv.push(function.to_string());
        argv.push("1".into());
        argv.push(key.to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        let reply: Value =
            within(COMMAND_TIMEOUT, self.c().custom(fred::cmd!("FCALL"), argv)).await?;
        match reply {
            Value::Array(items) => items.into_iter().map(reply_bytes).collect(),
            other => Err(RedisError::Reply(format!("{:?}", other.kind()))),
        }
    }

    /// `FUNCTION LOAD REPLACE code`, on every primary of a cluster
    /// (replicas copy it from their primary).
    pub async fn function_load(&self, code: &str) -> Result<(), RedisError> {
        let args = vec!["LOAD".to_string(), "REPLACE".into(), code.to_string()];
        if self.mode != Mode::Cluster {
            let _: Value = within(
                COMMAND_TIMEOUT,
                self.c().custom(fred::cmd!("FUNCTION"), args),
            )
            .await?;
            return Ok(());
        }
        within(COMMAND_TIMEOUT, self.client.sync_cluster()).await?;
        let primaries = self
            .client
            .cached_cluster_state()
            .map(|s| s.unique_primary_nodes())
            .unwrap_or_default();
        if primaries.is_empty() {
            return Err(RedisError::Reply("the cluster has no primary".into()));
        }
        for server in primaries {
            let _: Value = within(
                COMMAND_TIMEOUT,
                self.client
                    .with_cluster_node(server)
                    .custom(fred::cmd!("FUNCTION"), args.clone()),
            )
            .await?;
        }
        Ok(())
    }

    /// Notified on every (re)connection of this client's connection, from now
    /// on; the first notification is immediate when it is connected already.
    pub fn connections(&self) -> tokio::sync::mpsc::Receiver<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut events = self.client.reconnect_rx();
        if self.client.is_connected() {
            let _ = tx.try_send(());
        }
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // A full channel already holds a pending notification.
                        if tx.is_closed() {
                            return;
                        }
                        let _ = tx.try_send(());
                    }
                    Err(_) => return,
                }
            }
        });
        rx
    }
}

/// Runs a fred future under a hard timeout.
pub async fn within<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(res) => res.map_err(RedisError::from),
        Err(_) => Err(RedisError::Timeout(timeout)),
    }
}

/// What a listener hears: `(channel, payload)`, in Redis's order.
pub type Messages = tokio::sync::mpsc::Receiver<(String, bytes::Bytes)>;

/// The channel of the item that stands for a gap ([`Listeners::listen_for_gaps`]):
/// no channel a node subscribes is empty.
pub const GAP: &str = "";

/// Whether a message is the listener's own (its probe).
enum Own {
    No,
    Yes,
    /// The first probe back after the listener subscribed again: a gap.
    Gap,
}

/// How long a listener's probe may take before it is published again.
const PROBE_AGAIN: Duration = Duration::from_millis(100);

/// The subscriber connections a node must have subscribed before it takes
/// traffic: the control channel's (control API, SSE commands from other
/// nodes), the device commands' and presence's. Each has a connection of
/// its own, so the backplane being ready says nothing about them; a node
/// that reported ready before they were could answer a command with
/// `reached: 0`. `Default`: none, for the embedded backplane.
#[derive(Clone, Default)]
pub struct Listeners {
    /// The URL to listen on, the client that publishes the probes, the
    /// names and the node id; `None` without Redis.
    redis: Option<(String, Redis, Keys, String)>,
    started: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<Listener>>>>,
}

struct Listener {
    /// What it listens to, for `/readyz` and the log.
    what: &'static str,
    /// The number of the current try's probe ([`Keys::listener_probe`]);
    /// raised before every (re)subscribe, so that a probe of an earlier
    /// connection, still on its way, proves nothing.
    tried: std::sync::atomic::AtomicU64,
    /// The highest probe that came back.
    confirmed: tokio::sync::watch::Sender<u64>,
    /// The first probe of the latest subscription made again after one
    /// held (0: none yet): messages were lost before it came back.
    gap_from: std::sync::atomic::AtomicU64,
    client: fred::clients::SubscriberClient,
}

impl Listener {
    fn subscribed(&self) -> bool {
        let tried = self.tried.load(std::sync::atomic::Ordering::Acquire);
        self.client.is_connected() && *self.confirmed.borrow() >= tried
    }
}

impl Listeners {
    /// The listeners of node `node_id` on the Redis at `url` (checked by
    /// [`Redis::connect`]); `redis` publishes their probes.
    pub fn new(url: &str, redis: Redis, keys: Keys, node_id: &str) -> Listeners {
        Listeners {
            redis: Some((url.to_string(), redis, keys, node_id.to_string())),
            started: Default::default(),
        }
    }

    /// What the first listener that is not subscribed listens to, or `None`
    /// when every one is.
    pub fn not_subscribed(&self) -> Option<&'static str> {
        self.started
            .lock()
            .unwrap()
            .iter()
            .find(|l| !l.subscribed())
            .map(|l| l.what)
    }

    /// Listens on a fixed set of channels (`what`: device commands, control
    /// commands, presence changes) on a connection of its own. It counts for
    /// readiness from now on: subscribed once a probe published on its own
    /// probe channel, subscribed in the same `SUBSCRIBE`, came back (fred
    /// resolves a `SUBSCRIBE` when it is written, and Redis refuses one, e.g.
    /// for an ACL, out of band). Subscribes again after every reconnect and,
    /// while the probe does not come back within 2 s, every 100 ms doubling
    /// to 2 s. Messages arrive as `(channel, payload)`.
    pub fn listen(
        &self,
        what: &'static str,
        channels: Vec<String>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Messages, RedisError> {
        self.start_listener(what, channels, stop, false)
    }

    /// [`Listeners::listen`], where a gap in what was heard (messages were
    /// lost: the receiver lagged, or the connection was down and subscribed
    /// again) arrives as an item on channel [`GAP`], in order: after every
    /// message heard before it, before any heard after the listener heard
    /// again. A consumer that keeps state from the messages (presence's
    /// watchers) reads it afresh then.
    pub fn listen_for_gaps(
        &self,
        what: &'static str,
        channels: Vec<String>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Messages, RedisError> {
        self.start_listener(what, channels, stop, true)
    }

    fn start_listener(
        &self,
        what: &'static str,
        mut channels: Vec<String>,
        stop: tokio_util::sync::CancellationToken,
        gaps: bool,
    ) -> Result<Messages, RedisError> {
        let Some((url, redis, keys, node_id)) = &self.redis else {
            let e =
                fred::error::Error::new(fred::error::ErrorKind::Config, "no Redis to listen on");
            return Err(e.into());
        };
        let probe = keys.listener_probe(node_id, what);
        channels.push(probe.clone());
        let client = subscriber(url, 256)?;
        let messages = client.message_rx();
        let mut reconnects = client.reconnect_rx();
        let listener = std::sync::Arc::new(Listener {
            what,
            tried: 1.into(),
            confirmed: tokio::sync::watch::Sender::new(0),
            gap_from: 0.into(),
            client: client.clone(),
        });
        self.started.lock().unwrap().push(listener.clone());
        start_connecting(&client, Some(stop.clone()));
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let stop2 = stop.clone();
        let (redis, probe2) = (redis.clone(), probe.clone());
        let l = listener.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            // Whether a subscription held before: every later one follows
            // a time without one, whose messages are lost.
            let mut held = false;
            // Set while the last try failed: the delay before the next.
            let mut retry: Option<Duration> = None;
            loop {
                tokio::select! {
                    r = reconnects.recv() => match r {
                        // The first connection counts too: this is where we subscribe.
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
                    _ = stop2.cancelled() => return,
                }
                sent += 1;
                l.tried.store(sent, std::sync::atomic::Ordering::Release);
                if held {
                    l.gap_from.store(sent, std::sync::atomic::Ordering::Release);
                }
                let mut confirmed = l.confirmed.subscribe();
                let tried = async {
                    within(COMMAND_TIMEOUT, l.client.subscribe(channels.clone())).await?;
                    // At a start the subscriber may connect before the
                    // commands client, which refuses commands until it has
                    // (fail-fast): the probe waits for it instead.
                    if !redis.wait_connected(COMMAND_TIMEOUT).await {
                        return Err(RedisError::Timeout(COMMAND_TIMEOUT));
                    }
                    // The SUBSCRIBE is only written, and a probe published on
                    // the commands connection can reach Redis before it: the
                    // probe goes again every 100 ms until one comes back.
                    let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
                    loop {
                        redis.publish(&probe2, sent.to_string().into()).await?;
                        let back = confirmed.wait_for(|n| *n >= sent);
                        match tokio::time::timeout(PROBE_AGAIN, back).await {
                            Ok(Ok(_)) => return Ok(()),
                            Err(_) if tokio::time::Instant::now() < deadline => {}
                            _ => return Err(RedisError::Timeout(COMMAND_TIMEOUT)),
                        }
                    }
                };
                match tried.await {
                    Ok(()) => {
                        if retry.take().is_some() {
                            tracing::info!(listener = what, "subscribed");
                        }
                        held = true;
                    }
                    Err(e) => {
                        if retry.is_none() {
                            tracing::warn!(
                                listener = what,
                                cause = %e,
                                "subscribing failed (no probe back): trying again"
                            );
                        }
                        retry = Some(next_retry(retry));
                    }
                }
            }
        });
        let confirm = move |channel: &str, payload: &[u8]| {
            if channel != probe {
                return Own::No;
            }
            let mut gap = false;
            if let Some(n) = std::str::from_utf8(payload)
                .ok()
                .and_then(|p| p.parse::<u64>().ok())
            {
                let from = listener.gap_from.load(std::sync::atomic::Ordering::Acquire);
                listener.confirmed.send_if_modified(|c| {
                    // The first probe back of a subscription made again:
                    // whatever was lost meanwhile is behind it.
                    gap = from != 0 && *c < from && n >= from;
                    let newer = n > *c;
                    *c = (*c).max(n);
                    newer
                });
            }
            if gap { Own::Gap } else { Own::Yes }
        };
        tokio::spawn(forward(messages, tx, stop, what, confirm, gaps));
        Ok(rx)
    }
}

/// Listens on `channels` and `patterns` (`PSUBSCRIBE`) on a connection of
/// its own until `stop`, subscribing again after every reconnect, then
/// closes the connection (a leader term's consumer must leave nothing
/// behind). A subscription Redis refuses (an ACL without these channels) or
/// that times out is tried again, 100 ms doubling to [`RETRY_MAX`] apart,
/// until it holds: a leader deaf to the compat channels until its next
/// reconnect would lose every emit meanwhile. Messages arrive as
/// `(channel, payload)`, in Redis's order; a receiver that lags loses
/// messages, which is counted in the log.
pub fn listen_patterns(
    url: &str,
    channels: Vec<String>,
    patterns: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<tokio::sync::mpsc::Receiver<(String, bytes::Bytes)>, RedisError> {
    // RESP3: a subscribed connection may then ask what it holds
    // (`subscribe_all`).
    let client = builder(url, 4096)?
        .with_config(|c| c.version = fred::types::RespVersion::RESP3)
        .build_subscriber_client()?;
    let messages = client.message_rx();
    let mut reconnects = client.reconnect_rx();
    start_connecting(&client, Some(stop.clone()));
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let c = client.clone();
    let stop2 = stop.clone();
    tokio::spawn(async move {
        // Set while the last try failed: the next one is due after it.
        let mut retry: Option<Duration> = None;
        // Failed tries in a row, and when the last of them was logged: a
        // refusal that lasts (an ACL without the default `asgi` channels)
        // is logged once a minute, not at every try.
        let mut failures = 0u32;
        let mut logged: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = reconnects.recv() => match r {
                    // The first connection counts too: this is where we subscribe.
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
                () = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
                _ = stop2.cancelled() => break,
            }
            match subscribe_all(&c, &channels, &patterns).await {
                Ok(()) => {
                    retry = None;
                    (failures, logged) = (0, None);
                    tracing::info!(?channels, ?patterns, "listening on compat channels");
                }
                Err(e) => {
                    let next = next_retry(retry);
                    retry = Some(next);
                    failures += 1;
                    if logged.is_none_or(|at| at.elapsed() >= COMPAT_WARN_EVERY) {
                        logged = Some(tokio::time::Instant::now());
                        tracing::warn!(
                            cause = %e,
                            ?channels,
                            ?patterns,
                            failures,
                            retry_in_ms = next.as_millis() as u64,
                            "subscribing to compat channels failed (the COMPAT_* settings name them; an empty one turns its source off)"
                        );
                    }
                }
            }
        }
        let _ = within(COMMAND_TIMEOUT, c.quit()).await;
    });
    tokio::spawn(forward(
        messages,
        tx,
        stop,
        "compat channels",
        |_, _| Own::No,
        false,
    ));
    Ok(rx)
}

/// How often a compat subscription that keeps failing is logged again.
const COMPAT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Subscribes `c` to `channels` and `patterns`, and learns whether Redis
/// accepted them. fred counts a `(P)SUBSCRIBE` done once it is written and
/// drops a reply it does not wait for, so a refusal (`NOPERM`, an ACL
/// without these channels) would go unseen. `CLIENT INFO` on the same
/// connection, which Redis answers after the `(P)SUBSCRIBE`, counts what
/// the connection holds (`sub=`, `psub=`); RESP3 lets a subscribed
/// connection ask. No probe is published: the compat channels belong to the
/// Socket.IO servers being migrated from, which would read it.
async fn subscribe_all(
    c: &fred::clients::SubscriberClient,
    channels: &[String],
    patterns: &[String],
) -> Result<(), RedisError> {
    if !channels.is_empty() {
        within(COMMAND_TIMEOUT, c.subscribe(channels.to_vec())).await?;
    }
    if !patterns.is_empty() {
        within(COMMAND_TIMEOUT, c.psubscribe(patterns.to_vec())).await?;
    }
    // In a cluster fred sends (P)SUBSCRIBE to the node of the client's id's
    // slot; the question must take the same connection.
    let client_info = fred::types::CustomCommand::new_static(
        "CLIENT",
        fred::types::ClusterHash::Custom(fred::util::redis_keyslot(c.id().as_bytes())),
        false,
    );
    let info = match within(
        COMMAND_TIMEOUT,
        c.custom::<String, _>(client_info, vec!["INFO"]),
    )
    .await
    {
        Ok(info) => info,
        // A user without `CLIENT INFO` (`@connection`): the subscription
        // cannot be checked, and is taken as it was sent. (A refused
        // subscription's `NOPERM`, which may arrive in the question's
        // place, names channels, not the command.)
        Err(e) if e.to_string().contains("client|info") => {
            tracing::debug!(cause = %e, "cannot check the compat subscriptions");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let held = |field: &str| {
        info.split_ascii_whitespace()
            .find_map(|kv| kv.strip_prefix(field)?.strip_prefix('='))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let (sub, psub) = (held("sub"), held("psub"));
    if sub < channels.len() || psub < patterns.len() {
        return Err(RedisError::Refused(format!(
            "the connection holds {sub} of {} channels and {psub} of {} patterns (does the Redis user's ACL allow them?)",
            channels.len(),
            patterns.len()
        )));
    }
    Ok(())
}

/// Hands a subscriber connection's messages to `tx` as `(channel,
/// payload)` until `stop` or the receiver is gone, but those `own` takes
/// (true: a probe of the connection's own); a lag (those messages are lost)
/// is counted and logged with `what` the connection listens to. With
/// `gaps`, a lag and the `own` probe that ends a resubscription are handed
/// on as a [`GAP`] item.
async fn forward(
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    tx: tokio::sync::mpsc::Sender<(String, bytes::Bytes)>,
    stop: tokio_util::sync::CancellationToken,
    what: &'static str,
    own: impl Fn(&str, &[u8]) -> Own,
    gaps: bool,
) {
    let gap = || (GAP.to_string(), bytes::Bytes::new());
    loop {
        let msg = tokio::select! {
            m = messages.recv() => m,
            _ = stop.cancelled() => return,
        };
        match msg {
            Ok(m) => {
                let payload = m.value.into_bytes().unwrap_or_default();
                let item = match own(&m.channel, &payload) {
                    Own::No => (m.channel.to_string(), payload),
                    Own::Gap if gaps => gap(),
                    Own::Yes | Own::Gap => continue,
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                metrics::counter!(crate::metrics::LISTENER_LAGGED, "listener" => what).increment(n);
                tracing::warn!(listener = what, lost = n, "receiver lagged: messages lost");
                if gaps && tx.send(gap()).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Starts `client`'s connection task and, while its first connection fails,
/// starts it again (after 100 ms, doubling to 2 s) until `stop`.
///
/// fred ends the task when the first connection fails (`fail_fast`, its
/// default), so a node started before its Redis (a pod scheduled first, a
/// compose file without ordering) would never connect. fred's own retry of
/// the first connection (`fail_fast: false`) waits out its reconnect delay
/// before the first attempt even when Redis is there, which slows every
/// start. Once connected, the reconnect policy handles every later drop.
pub fn start_connecting<C>(client: &C, stop: Option<tokio_util::sync::CancellationToken>)
where
    C: ClientLike + Clone + Send + Sync + 'static,
{
    let client = client.clone();
    let stop = stop.unwrap_or_default();
    tokio::spawn(async move {
        let mut delay = None;
        loop {
            // Runs for the client's life once connected; ends at once when
            // the first connection fails.
            let ended = tokio::select! {
                ended = client.connect() => ended,
                _ = stop.cancelled() => return,
            };
            if matches!(ended, Ok(Ok(()))) {
                // `quit`.
                return;
            }
            let next = next_retry(delay);
            delay = Some(next);
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// A dedicated subscriber connection, for `backplane/redis.rs`.
pub fn subscriber(
    url: &str,
    capacity: usize,
) -> Result<fred::clients::SubscriberClient, RedisError> {
    Ok(builder(url, capacity)?.build_subscriber_client()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_100_ms_to_2_s() {
        let mut delays = vec![next_retry(None)];
        for _ in 0..6 {
            delays.push(next_retry(delays.last().copied()));
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn cluster_names_share_slots() {
        let k = Keys::new("sb", Mode::Cluster);
        assert_eq!(k.topic("news"), "sb:t:{news}");
        assert_eq!(k.topic_of("sb:t:{news}"), Some("news"));
        assert_eq!(k.topic_of("sb:probe:x"), None);
        let slot = |key: &str| fred::util::redis_keyslot(key.as_bytes());
        assert_eq!(slot(&k.leader()), slot(&k.epoch()));
        assert_eq!(slot(&k.device()), slot(&k.epoch()));
        assert_eq!(slot(&k.node("a")), slot(&k.epoch()));
        assert_eq!(slot(&k.topic("news")), slot("sb:history:{news}"));
        assert_eq!(
            check_url("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001"),
            Ok(Mode::Cluster)
        );
        assert_eq!(
            check_url("redis-sentinel://127.0.0.1:26379?sentinelServiceName=main"),
            Ok(Mode::Sentinel)
        );
        assert!(check_url("redis-sentinel://127.0.0.1:26379").is_err());
        assert!(check_url("http://x").is_err());
        assert!(check_url("redis-cluster://").is_err());
    }

    #[test]
    fn names() {
        let k = Keys::new("switchboard", Mode::Standalone);
        assert_eq!(k.topic("news"), "switchboard:t:news");
        assert_eq!(k.leader(), "switchboard:leader");
        assert_eq!(k.epoch(), "switchboard:epoch");
        assert_eq!(k.device(), "switchboard:device");
        assert_eq!(k.node("a"), "switchboard:node:a");
        assert_eq!(k.topic_of("switchboard:t:a/b"), Some("a/b"));
        assert_eq!(k.control(), "switchboard:control");
        assert_eq!(k.control_replies("a"), "switchboard:control-reply:a");
        assert_eq!(k.occupancy("news"), "switchboard:occupancy:news");
        assert_eq!(k.node_clients("a"), "switchboard:node-clients:a");
    }

    #[test]
    fn a_dead_nodes_keys_share_one_slot() {
        let k = Keys::new("sb", Mode::Cluster);
        let slot = |key: &str| fred::util::redis_keyslot(key.as_bytes());
        assert_eq!(slot(&k.node_clients("a")), slot(&k.node("a")));
        assert_eq!(slot(&k.node_topics("a")), slot(&k.node("a")));
        assert_eq!(slot(&k.tracked_nodes()), slot(&k.node("a")));
        assert_eq!(slot(&k.occupancy("news")), slot(&k.topic("news")));
        assert_eq!(slot(&k.occupancy_seq("news")), slot(&k.topic("news")));
    }
}
