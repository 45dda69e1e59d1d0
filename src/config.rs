//! Every setting of a node, read once at start-up.
//!
//! Settings come from three layers, highest first: command-line flags
//! (`--port 9000` or `--port=9000` is `PORT`), the process environment, and an
//! optional env file (`--env-file .env.local`). All of them are read through
//! [`Source`], so tests build a [`Config`] from a map and never touch the
//! process environment.
//!
//! Parsing reports **every** bad value at once, each as
//! `NAME=value is not valid: why`; `main` prints them and exits with code 64
//! before any port is bound.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::{Authenticator, KeySource, Pattern, Secret};
use crate::protocol;

/// Every environment variable this crate reads. The names are a contract with
/// the Helm chart, the compose file and existing deployments: never rename one.
pub mod names {
    pub const HOST: &str = "HOST";
    pub const PORT: &str = "PORT";
    pub const ADMIN_PORT: &str = "ADMIN_PORT";
    pub const NODE_ID: &str = "NODE_ID";
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
    pub const RUST_LOG: &str = "RUST_LOG";
    pub const WEBSOCKET_ENABLED: &str = "WEBSOCKET_ENABLED";
    pub const WEBSOCKET_PATH: &str = "WEBSOCKET_PATH";
    pub const WEBSOCKET_MOCK_EVENTS: &str = "WEBSOCKET_MOCK_EVENTS";
    pub const WEBSOCKET_HEARTBEAT_INTERVAL: &str = "WEBSOCKET_HEARTBEAT_INTERVAL";
    pub const WEBSOCKET_MAX_PAYLOAD: &str = "WEBSOCKET_MAX_PAYLOAD";
    pub const WEBSOCKET_MAX_SUBSCRIPTIONS: &str = "WEBSOCKET_MAX_SUBSCRIPTIONS";
    pub const WEBSOCKET_CLIENT_QUEUE_BYTES: &str = "WEBSOCKET_CLIENT_QUEUE_BYTES";
    pub const WEBSOCKET_CLIENT_QUEUE_MESSAGES: &str = "WEBSOCKET_CLIENT_QUEUE_MESSAGES";
    pub const WEBSOCKET_FLUSH_INTERVAL_MS: &str = "WEBSOCKET_FLUSH_INTERVAL_MS";
    pub const CORS_ALLOWED_ORIGINS: &str = "CORS_ALLOWED_ORIGINS";
    pub const ORIGIN_ALLOW_MISSING: &str = "ORIGIN_ALLOW_MISSING";
    pub const REDIS_URL: &str = "REDIS_URL";
    pub const REDIS_PREFIX: &str = "REDIS_PREFIX";
    pub const REDIS_PUBSUB_BUFFER: &str = "REDIS_PUBSUB_BUFFER";
    pub const LEADER_LEASE_MS: &str = "LEADER_LEASE_MS";
    pub const COMMAND_TIMEOUT_MS: &str = "COMMAND_TIMEOUT_MS";
    pub const DEVICE_APPS: &str = "DEVICE_APPS";
    pub const DEVICE_DRIVER: &str = "DEVICE_DRIVER";
    pub const DEVICE_FPS: &str = "DEVICE_FPS";
    pub const SOCKETIO_ENABLED: &str = "SOCKETIO_ENABLED";
    pub const SOCKETIO_PING_INTERVAL: &str = "SOCKETIO_PING_INTERVAL";
    pub const SOCKETIO_PING_TIMEOUT: &str = "SOCKETIO_PING_TIMEOUT";
    pub const SOCKETIO_STATE_RECOVERY: &str = "SOCKETIO_STATE_RECOVERY";
    pub const DASHBOARD_ENABLED: &str = "DASHBOARD_ENABLED";
    pub const SHUTDOWN_GRACE_MS: &str = "SHUTDOWN_GRACE_MS";
    pub const SHUTDOWN_READINESS_DELAY_MS: &str = "SHUTDOWN_READINESS_DELAY_MS";
    pub const SHUTDOWN_DRAIN_MS: &str = "SHUTDOWN_DRAIN_MS";
    pub const SHUTDOWN_CLOSE_CODE: &str = "SHUTDOWN_CLOSE_CODE";
    pub const WEBSOCKET_PROXY_ENABLED: &str = "WEBSOCKET_PROXY_ENABLED";
    pub const WEBSOCKET_PROXY_ROUTES: &str = "WEBSOCKET_PROXY_ROUTES";
    pub const WEBSOCKET_PROXY_FORWARD_HEADERS: &str = "WEBSOCKET_PROXY_FORWARD_HEADERS";
    pub const WEBSOCKET_PROXY_CONNECT_TIMEOUT_MS: &str = "WEBSOCKET_PROXY_CONNECT_TIMEOUT_MS";
    pub const AUTH_JWT_SECRET: &str = "AUTH_JWT_SECRET";
    pub const AUTH_JWT_PUBLIC_KEY_FILE: &str = "AUTH_JWT_PUBLIC_KEY_FILE";
    pub const AUTH_JWT_AUDIENCE: &str = "AUTH_JWT_AUDIENCE";
    pub const AUTH_JWT_ISSUER: &str = "AUTH_JWT_ISSUER";
    pub const AUTH_PUBLIC_TOPICS: &str = "AUTH_PUBLIC_TOPICS";
    pub const AUTH_JWT_LEEWAY_MS: &str = "AUTH_JWT_LEEWAY_MS";
    pub const API_TOKEN: &str = "API_TOKEN";
    pub const ADMIN_TOKEN: &str = "ADMIN_TOKEN";
    pub const WEBHOOK_URL: &str = "WEBHOOK_URL";
    pub const WEBHOOK_SECRET: &str = "WEBHOOK_SECRET";
    pub const WEBHOOK_RETRY_MS: &str = "WEBHOOK_RETRY_MS";
    pub const WEBHOOK_BATCH_MAX: &str = "WEBHOOK_BATCH_MAX";
    pub const WEBHOOK_BATCH_MS: &str = "WEBHOOK_BATCH_MS";
    pub const WEBHOOK_TIMEOUT_MS: &str = "WEBHOOK_TIMEOUT_MS";
    pub const WEBHOOK_QUEUE_SIZE: &str = "WEBHOOK_QUEUE_SIZE";
    pub const WEBHOOK_CLIENT_EVENT_TOPICS: &str = "WEBHOOK_CLIENT_EVENT_TOPICS";
    pub const WEBSOCKET_RATE_LIMIT: &str = "WEBSOCKET_RATE_LIMIT";
    pub const WEBSOCKET_RATE_BURST: &str = "WEBSOCKET_RATE_BURST";
    pub const MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
    pub const HTTP_BODY_LIMIT: &str = "HTTP_BODY_LIMIT";
    pub const HTTP_REQUEST_TIMEOUT_MS: &str = "HTTP_REQUEST_TIMEOUT_MS";
    pub const HTTP_MAX_HEADER_BYTES: &str = "HTTP_MAX_HEADER_BYTES";
    pub const WEBSOCKET_HANDSHAKE_TIMEOUT_MS: &str = "WEBSOCKET_HANDSHAKE_TIMEOUT_MS";
    pub const REDIS_CA_FILE: &str = "REDIS_CA_FILE";
    pub const HISTORY_TOPICS: &str = "HISTORY_TOPICS";
    pub const HISTORY_SIZE: &str = "HISTORY_SIZE";
    pub const HISTORY_TTL_MS: &str = "HISTORY_TTL_MS";
    pub const PROXY_CONNECT_URL: &str = "PROXY_CONNECT_URL";
    pub const PROXY_SUBSCRIBE_URL: &str = "PROXY_SUBSCRIBE_URL";
    pub const PROXY_SUBSCRIBE_TOPICS: &str = "PROXY_SUBSCRIBE_TOPICS";
    pub const PROXY_PUBLISH_URL: &str = "PROXY_PUBLISH_URL";
    pub const PROXY_PUBLISH_TOPICS: &str = "PROXY_PUBLISH_TOPICS";
    pub const PROXY_RPC_URL: &str = "PROXY_RPC_URL";
    pub const PROXY_HEADERS: &str = "PROXY_HEADERS";
    pub const PROXY_TIMEOUT_MS: &str = "PROXY_TIMEOUT_MS";
    pub const PROXY_MAX_INFLIGHT: &str = "PROXY_MAX_INFLIGHT";
    pub const PROXY_SECRET: &str = "PROXY_SECRET";
    pub const TOKIO_WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";
    pub const COMPAT_PYTHON_SOCKETIO: &str = "COMPAT_PYTHON_SOCKETIO";
    pub const COMPAT_SOCKETIO_EMITTER: &str = "COMPAT_SOCKETIO_EMITTER";
    pub const COMPAT_CHANNELS_PREFIX: &str = "COMPAT_CHANNELS_PREFIX";
    pub const PRESENCE_TOPICS: &str = "PRESENCE_TOPICS";
    pub const PRESENCE_TTL_MS: &str = "PRESENCE_TTL_MS";
    pub const PRESENCE_DIFF_INTERVAL_MS: &str = "PRESENCE_DIFF_INTERVAL_MS";
    pub const MAX_CONNECTIONS_PER_ADDRESS: &str = "MAX_CONNECTIONS_PER_ADDRESS";
    pub const MAX_CONNECTIONS_PER_USER: &str = "MAX_CONNECTIONS_PER_USER";
    pub const TRUSTED_PROXIES: &str = "TRUSTED_PROXIES";
    pub const MAX_TOPICS_PER_NODE: &str = "MAX_TOPICS_PER_NODE";
    pub const WEBSOCKET_SUBSCRIBE_RATE_LIMIT: &str = "WEBSOCKET_SUBSCRIBE_RATE_LIMIT";
    pub const WEBSOCKET_SUBSCRIBE_RATE_BURST: &str = "WEBSOCKET_SUBSCRIBE_RATE_BURST";

    /// Every name above, for `--help` and to reject unknown flags.
    pub const ALL: &[&str] = &[
        HOST,
        PORT,
        ADMIN_PORT,
        NODE_ID,
        LOG_FORMAT,
        RUST_LOG,
        WEBSOCKET_ENABLED,
        WEBSOCKET_PATH,
        WEBSOCKET_MOCK_EVENTS,
        WEBSOCKET_HEARTBEAT_INTERVAL,
        WEBSOCKET_MAX_PAYLOAD,
        WEBSOCKET_MAX_SUBSCRIPTIONS,
        WEBSOCKET_CLIENT_QUEUE_BYTES,
        WEBSOCKET_CLIENT_QUEUE_MESSAGES,
        WEBSOCKET_FLUSH_INTERVAL_MS,
        CORS_ALLOWED_ORIGINS,
        ORIGIN_ALLOW_MISSING,
        REDIS_URL,
        REDIS_PREFIX,
        REDIS_PUBSUB_BUFFER,
        LEADER_LEASE_MS,
        COMMAND_TIMEOUT_MS,
        DEVICE_APPS,
        DEVICE_DRIVER,
        DEVICE_FPS,
        SOCKETIO_ENABLED,
        SOCKETIO_PING_INTERVAL,
        SOCKETIO_PING_TIMEOUT,
        SOCKETIO_STATE_RECOVERY,
        DASHBOARD_ENABLED,
        SHUTDOWN_GRACE_MS,
        SHUTDOWN_READINESS_DELAY_MS,
        SHUTDOWN_DRAIN_MS,
        SHUTDOWN_CLOSE_CODE,
        WEBSOCKET_PROXY_ENABLED,
        WEBSOCKET_PROXY_ROUTES,
        WEBSOCKET_PROXY_FORWARD_HEADERS,
        WEBSOCKET_PROXY_CONNECT_TIMEOUT_MS,
        AUTH_JWT_SECRET,
        AUTH_JWT_PUBLIC_KEY_FILE,
        AUTH_JWT_AUDIENCE,
        AUTH_JWT_ISSUER,
        AUTH_PUBLIC_TOPICS,
        AUTH_JWT_LEEWAY_MS,
        API_TOKEN,
        ADMIN_TOKEN,
        WEBHOOK_URL,
        WEBHOOK_SECRET,
        WEBHOOK_RETRY_MS,
        WEBHOOK_BATCH_MAX,
        WEBHOOK_BATCH_MS,
        WEBHOOK_TIMEOUT_MS,
        WEBHOOK_QUEUE_SIZE,
        WEBHOOK_CLIENT_EVENT_TOPICS,
        WEBSOCKET_RATE_LIMIT,
        WEBSOCKET_RATE_BURST,
        MAX_CONNECTIONS,
        HTTP_BODY_LIMIT,
        HTTP_REQUEST_TIMEOUT_MS,
        HTTP_MAX_HEADER_BYTES,
        WEBSOCKET_HANDSHAKE_TIMEOUT_MS,
        REDIS_CA_FILE,
        HISTORY_TOPICS,
        HISTORY_SIZE,
        HISTORY_TTL_MS,
        PROXY_CONNECT_URL,
        PROXY_SUBSCRIBE_URL,
        PROXY_SUBSCRIBE_TOPICS,
        PROXY_PUBLISH_URL,
        PROXY_PUBLISH_TOPICS,
        PROXY_RPC_URL,
        PROXY_HEADERS,
        PROXY_TIMEOUT_MS,
        PROXY_MAX_INFLIGHT,
        PROXY_SECRET,
        TOKIO_WORKER_THREADS,
        COMPAT_PYTHON_SOCKETIO,
        COMPAT_SOCKETIO_EMITTER,
        COMPAT_CHANNELS_PREFIX,
        PRESENCE_TOPICS,
        PRESENCE_TTL_MS,
        PRESENCE_DIFF_INTERVAL_MS,
        MAX_CONNECTIONS_PER_ADDRESS,
        MAX_CONNECTIONS_PER_USER,
        TRUSTED_PROXIES,
        MAX_TOPICS_PER_NODE,
        WEBSOCKET_SUBSCRIBE_RATE_LIMIT,
        WEBSOCKET_SUBSCRIBE_RATE_BURST,
    ];

    /// The hook and webhook URLs: shown without a password when refused,
    /// like `REDIS_URL`.
    pub const HOOK_URLS: &[&str] = &[
        PROXY_CONNECT_URL,
        PROXY_SUBSCRIBE_URL,
        PROXY_PUBLISH_URL,
        PROXY_RPC_URL,
        WEBHOOK_URL,
    ];

    /// Settings whose values must never be printed, not even in an error.
    pub const SECRET: &[&str] = &[
        AUTH_JWT_SECRET,
        API_TOKEN,
        ADMIN_TOKEN,
        WEBHOOK_SECRET,
        PROXY_SECRET,
    ];
}

/// Where setting values come from. Returning `None` means "not set".
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Command-line flags over the process environment over an env file.
pub struct Layered<E> {
    flags: HashMap<String, String>,
    env: E,
    file: HashMap<String, String>,
}

impl<E: Source> Source for Layered<E> {
    fn get(&self, name: &str) -> Option<String> {
        self.flags
            .get(name)
            .cloned()
            .or_else(|| self.env.get(name))
            .or_else(|| self.file.get(name).cloned())
    }
}

/// What the command line asked for.
pub enum Command<E> {
    Run(Layered<E>),
    Help,
}

/// Turns `--port 9000`, `--port=9000`, `--PORT 9000` and `--env-file F` into
/// a [`Layered`] source over `env`.
pub fn parse_args<E: Source>(
    args: impl IntoIterator<Item = String>,
    env: E,
) -> Result<Command<E>, ConfigErrors> {
    let mut flags = HashMap::new();
    let mut env_file: Option<String> = None;
    let mut errors = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(Command::Help);
        }
        let Some(flag) = arg.strip_prefix("--") else {
            errors.push(ConfigError::new(
                "argument",
                &arg,
                "expected a flag such as --port 8080",
            ));
            continue;
        };
        let (key, inline) = match flag.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (flag.to_string(), None),
        };
        let Some(value) = inline.or_else(|| args.next()) else {
            errors.push(ConfigError::new(
                &format!("--{key}"),
                "",
                "the flag needs a value",
            ));
            continue;
        };
        if key == "env-file" {
            env_file = Some(value);
            continue;
        }
        let name = key.replace('-', "_").to_ascii_uppercase();
        if names::ALL.contains(&name.as_str()) {
            flags.insert(name, value);
        } else {
            errors.push(ConfigError::new(
                &format!("--{key}"),
                &value,
                "unknown flag (see --help)",
            ));
        }
    }
    let mut file = HashMap::new();
    if let Some(path) = env_file {
        match dotenvy::from_path_iter(&path) {
            Ok(iter) => {
                for item in iter {
                    match item {
                        Ok((k, v)) => {
                            file.insert(k, v);
                        }
                        Err(e) => {
                            // The line in the error may be a secret: the
                            // setting is found by its name instead, the
                            // first in the file that was not read.
                            let text = std::fs::read_to_string(&path).unwrap_or_default();
                            let name = text
                                .lines()
                                .filter_map(|l| {
                                    l.trim().trim_start_matches("export ").split_once('=')
                                })
                                .map(|(k, _)| k.trim())
                                .find(|k| {
                                    !k.is_empty() && !k.starts_with('#') && !file.contains_key(*k)
                                });
                            errors.push(ConfigError::new(
                                "--env-file",
                                &path,
                                &env_file_error(&e, name),
                            ))
                        }
                    }
                }
            }
            Err(e) => errors.push(ConfigError::new(
                "--env-file",
                &path,
                &env_file_error(&e, None),
            )),
        }
    }
    if errors.is_empty() {
        Ok(Command::Run(Layered { flags, env, file }))
    } else {
        Err(ConfigErrors(errors))
    }
}

/// The `--help` text: every setting with its built-in default.
pub fn help() -> String {
    let mut s = String::from(
        "switchboard: realtime broadcast node\n\n\
         usage: switchboard [--env-file FILE] [--NAME VALUE]...\n\n\
         Every setting is an environment variable; a flag with the same name in\n\
         kebab case (--websocket-path /ws) overrides it. See README.md for meanings.\n\n\
         settings and their defaults (\"(unset)\", \"(empty)\": none given; README.md says what\n\
         the node does then):\n",
    );
    let defaults = defaults();
    for name in names::ALL {
        let default = match defaults.get(*name).map(String::as_str) {
            None => "(unset)".to_string(),
            Some("") => "(empty)".to_string(),
            // On one line (the demo events are a JSON document of several).
            Some(d) => serde_json::from_str::<serde_json::Value>(d)
                .ok()
                .filter(|_| d.contains('\n'))
                .map_or_else(|| d.to_string(), |v| v.to_string()),
        };
        s.push_str(&format!("  {name:<36} {default}\n"));
    }
    s
}

/// The built-in default of every setting that has one, exactly as
/// [`Config::from_source`] applies it when the setting is not given: `""`
/// when there is none or the node derives one at start-up (`NODE_ID`,
/// `SHUTDOWN_DRAIN_MS`, …).
/// Settings without a default (unset unless given) are absent. For `--help`
/// and for the test that compares the documented defaults with these.
pub fn defaults() -> HashMap<String, String> {
    let empty = HashMap::<String, String>::new();
    let mut p = Parser::new(&empty);
    let _ = Config::build(&mut p);
    let mut defaults = p.defaults;
    // Read without a parser: tracing's filter, "info" when unset.
    defaults.insert(names::RUST_LOG.into(), "info".into());
    defaults
}

// === errors ===

/// One bad setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub why: String,
}

impl ConfigError {
    fn new(name: &str, value: &str, why: &str) -> Self {
        let value = if names::SECRET.contains(&name) {
            "<redacted>".to_string()
        } else if name == names::REDIS_URL || names::HOOK_URLS.contains(&name) {
            // A URL may carry passwords; a refused one is shown without them.
            redact_url(value)
        } else {
            value.to_string()
        };
        Self {
            name: name.to_string(),
            value,
            why: why.to_string(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={} is not valid: {}", self.name, self.value, self.why)
    }
}

/// Every bad setting found in one pass.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// === Config ===

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One entry of `WEBSOCKET_MOCK_EVENTS`.
#[derive(Debug, Clone)]
pub struct MockEvent {
    pub name: String,
    /// `None` means on demand only.
    pub interval: Option<Duration>,
    pub data: Box<RawValue>,
}

/// `CORS_ALLOWED_ORIGINS`: `*` or an explicit list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    Any,
    List(Vec<String>),
}

impl Origins {
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// One entry of `WEBSOCKET_PROXY_ROUTES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRoute {
    pub name: String,
    /// `ws://` or `wss://` URL of the upstream.
    pub url: String,
}

/// The WebSocket proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub enabled: bool,
    pub routes: Vec<ProxyRoute>,
    /// Request headers copied to the upstream handshake.
    pub forward_headers: Vec<String>,
    pub connect_timeout: Duration,
}

/// The parsed, validated settings of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub admin_port: Option<u16>,
    pub node_id: String,
    pub log_format: LogFormat,
    pub rust_log: Option<String>,
    pub websocket_enabled: bool,
    pub websocket_path: String,
    pub mock_events: Vec<MockEvent>,
    pub heartbeat_interval: Duration,
    pub max_payload: usize,
    pub max_subscriptions: usize,
    pub client_queue_bytes: usize,
    pub client_queue_messages: usize,
    /// The longest the fan-out may hold a busy topic's publication so that
    /// the next ones reach each connection in the same write (how long, up
    /// to this, follows the load: `hub::pacer`). Zero: never held.
    pub websocket_flush_interval: Duration,
    pub cors_allowed_origins: Origins,
    /// Whether a WebSocket handshake without `Origin` (non-browser clients)
    /// passes an explicit allow-list.
    pub origin_allow_missing: bool,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    /// Publications the Redis client may hold for this node before they are
    /// moved to the hub; past it they are lost, counted, and on history
    /// topics repaired.
    pub redis_pubsub_buffer: usize,
    pub leader_lease: Duration,
    pub command_timeout: Duration,
    pub device_apps: Vec<String>,
    pub device_driver: DriverConfig,
    /// Frames the leader renders and sends per second.
    pub device_fps: u32,
    pub socketio_enabled: bool,
    /// Serve the live dashboard at `/` (and its assets under `/assets/`).
    pub dashboard_enabled: bool,
    pub socketio_ping_interval: Duration,
    pub socketio_ping_timeout: Duration,
    /// Socket.IO connection state recovery for official clients: `pid` in
    /// the CONNECT answer, the session's positions as every history
    /// publication's last argument (`gateway::recovery`).
    pub socketio_state_recovery: bool,
    pub shutdown_grace: Duration,
    pub shutdown_readiness_delay: Duration,
    pub shutdown_drain: Duration,
    pub shutdown_close_code: u16,
    pub proxy: ProxyConfig,
    /// Client token checks (open when no JWT key is configured).
    pub auth: Authenticator,
    pub api_token: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// Signed webhooks to the application back end; `None` without `WEBHOOK_URL`.
    pub webhooks: Option<WebhookConfig>,
    /// Client messages per second per connection; `None` = unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Client connections per node; `None` = unlimited.
    pub max_connections: Option<usize>,
    /// Client connections per client address (IPv6: per /64); `None` = unlimited.
    pub max_connections_per_address: Option<usize>,
    /// Client connections per user (token `sub` or connect hook `user`;
    /// anonymous clients are not counted per user); `None` = unlimited.
    pub max_connections_per_user: Option<usize>,
    /// Peers whose `X-Forwarded-For` names the client's address.
    pub trusted_proxies: Vec<Cidr>,
    /// Distinct topics a node holds subscribers for; `None` = unlimited.
    pub max_topics_per_node: Option<usize>,
    /// Subscribes (and unsubscribes) per second per connection; `None` = unlimited.
    pub subscribe_rate_limit: Option<RateLimit>,
    pub http_body_limit: usize,
    pub http_request_timeout: Duration,
    /// Request line plus headers, in bytes; more is answered 431.
    pub http_max_header_bytes: usize,
    pub handshake_timeout: Duration,
    pub redis_ca_file: Option<PathBuf>,
    /// `TOKIO_WORKER_THREADS`: the runtime's worker threads; `None` = the
    /// CPU count the process may use (cgroup limits included).
    pub worker_threads: Option<usize>,
    /// Which topics keep a history (offsets, recovery, gap repair).
    pub history: HistoryConfig,
    /// The application back end's hooks (`PROXY_*`).
    pub hooks: HooksConfig,
    /// Drop-in sources of publications (`COMPAT_*`, see `compat`).
    pub compat: CompatConfig,
    /// Which topics keep presence, and its timings (`PRESENCE_*`).
    pub presence: PresenceConfig,
    /// Accepted but weak settings, logged at start-up (never with values).
    pub warnings: Vec<String>,
}

/// `DEVICE_DRIVER`: where the leader sends the board's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverConfig {
    /// Keeps the last frame in memory.
    Simulated,
    /// Logs each state change.
    Log,
    /// DDP over UDP (`ddp://host[:port]`).
    Ddp { host: String, port: u16 },
    /// E1.31 (sACN) unicast over UDP (`e131://host[:port][?universe=N]`):
    /// the frame in consecutive universes from `universe`.
    E131 {
        host: String,
        port: u16,
        universe: u16,
    },
}

/// The UDP port DDP displays listen on.
pub const DDP_PORT: u16 = 4048;
/// The UDP port of E1.31 (ACN SDT).
pub const E131_PORT: u16 = 5568;

impl fmt::Display for DriverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            DriverConfig::Simulated => f.write_str("simulated"),
            DriverConfig::Log => f.write_str("log"),
            DriverConfig::Ddp { host: h, port } => write!(f, "ddp://{}:{port}", host(h)),
            DriverConfig::E131 {
                host: h,
                port,
                universe,
            } => write!(f, "e131://{}:{port}?universe={universe}", host(h)),
        }
    }
}

/// `simulated`, `log`, `ddp://host[:port]` or `e131://host[:port][?universe=N]`.
fn parse_driver(v: &str) -> Result<DriverConfig, String> {
    const EXPECTED: &str =
        "expected simulated, log, ddp://host[:port] or e131://host[:port][?universe=N]";
    match v {
        "simulated" => return Ok(DriverConfig::Simulated),
        "log" => return Ok(DriverConfig::Log),
        _ => {}
    }
    let Some((scheme, rest)) = v.split_once("://") else {
        return Err(EXPECTED.into());
    };
    let default_port = match scheme {
        "ddp" => DDP_PORT,
        "e131" => E131_PORT,
        _ => return Err(format!("unknown driver scheme `{scheme}`; {EXPECTED}")),
    };
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains(['/', '@']) {
        return Err(format!("{scheme}:// takes only host[:port]; {EXPECTED}"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (ip, after) = v6
                .split_once(']')
                .ok_or("an IPv6 address needs its closing ]")?;
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("`{ip}` is not an IPv6 address"));
            }
            (ip, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid_name && host.parse::<IpAddr>().is_err() {
        return Err(format!("`{host}` is not a host name or IP address"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port `{p}` must be a number from 1 to 65535"))?,
    };
    let host = host.to_string();
    if scheme == "ddp" {
        if !query.is_empty() {
            return Err(format!("ddp:// takes no options (got `?{query}`)"));
        }
        return Ok(DriverConfig::Ddp { host, port });
    }
    let mut universe = 1u16;
    let last_first = crate::device::e131::MAX_UNIVERSE - (crate::device::e131::UNIVERSES - 1);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("universe", n)) => {
                universe = n
                    .parse::<u16>()
                    .ok()
                    .filter(|u| (1..=last_first).contains(u))
                    .ok_or_else(|| {
                        format!(
                            "universe `{n}` must be a number from 1 to {last_first} (the frame takes {} universes, up to {})",
                            crate::device::e131::UNIVERSES,
                            crate::device::e131::MAX_UNIVERSE
                        )
                    })?;
            }
            _ => return Err(format!("unknown option `{pair}`; e131:// takes universe=N")),
        }
    }
    Ok(DriverConfig::E131 {
        host,
        port,
        universe,
    })
}

/// `COMPAT_*`: the drop-in sources the leader consumes (each off when unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompatConfig {
    /// `COMPAT_PYTHON_SOCKETIO`: python-socketio's channel (its default is `socketio`).
    pub python_socketio: Option<String>,
    /// `COMPAT_SOCKETIO_EMITTER`: `@socket.io/redis-emitter`'s key (its default is `socket.io`).
    pub socketio_emitter: Option<String>,
    /// `COMPAT_CHANNELS_PREFIX`: `channels_redis`'s prefix (its default is `asgi`).
    pub channels_prefix: Option<String>,
}

impl CompatConfig {
    /// Whether any source is on.
    pub fn any(&self) -> bool {
        self.python_socketio.is_some()
            || self.socketio_emitter.is_some()
            || self.channels_prefix.is_some()
    }

    /// Whether a source can emit "to everyone" (the broadcast topic).
    pub fn broadcasts(&self) -> bool {
        self.python_socketio.is_some() || self.socketio_emitter.is_some()
    }
}

/// `HISTORY_TOPICS` / `HISTORY_SIZE` / `HISTORY_TTL_MS`.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Topic patterns (`*` wildcard) whose publications get offsets and are kept.
    pub topics: Vec<Pattern>,
    /// Publications kept per topic.
    pub size: usize,
    /// How long a topic's history lives after its last publication.
    pub ttl: Duration,
}

impl HistoryConfig {
    /// Whether `topic` keeps a history. The live frame stream
    /// (`device.frame`) never does, whatever the patterns say.
    pub fn covers(&self, topic: &str) -> bool {
        topic != crate::device::frame::TOPIC && self.topics.iter().any(|p| p.matches(topic))
    }
}

/// `PRESENCE_TOPICS` / `PRESENCE_TTL_MS` / `PRESENCE_DIFF_INTERVAL_MS`.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Topic patterns (`*` wildcard) whose subscribers are recorded as
    /// present. Empty by default: every join and leave costs Redis writes.
    pub topics: Vec<Pattern>,
    /// How long a node's entries outlive its last sign of life.
    pub ttl: Duration,
    /// How long changes are coalesced before `presence_diff` goes out.
    pub diff_interval: Duration,
}

impl PresenceConfig {
    /// Whether `topic` keeps presence.
    pub fn covers(&self, topic: &str) -> bool {
        self.topics.iter().any(|p| p.matches(topic))
    }

    /// Whether any topic keeps presence (the node runs the presence tasks).
    pub fn enabled(&self) -> bool {
        !self.topics.is_empty()
    }
}

/// `PROXY_*`: HTTP hooks to the application back end (`backend::hooks`).
/// Each hook is off while its URL is unset.
#[derive(Debug, Clone)]
pub struct HooksConfig {
    pub connect_url: Option<String>,
    pub subscribe_url: Option<String>,
    /// Topics the subscribe hook decides on (default `*`).
    pub subscribe_topics: Vec<Pattern>,
    pub publish_url: Option<String>,
    /// Topics the publish hook decides on (default `*`).
    pub publish_topics: Vec<Pattern>,
    pub rpc_url: Option<String>,
    /// Client handshake headers passed to the connect hook.
    pub headers: Vec<String>,
    /// Per call: past it the caller gets `unavailable`.
    pub timeout: Duration,
    /// Calls in flight per node; past it a call is refused at once.
    pub max_inflight: usize,
    /// Signs every call (`X-Switchboard-Signature`, as webhooks are), so
    /// that a back end reachable from elsewhere can tell the node's calls
    /// from anyone's.
    pub secret: Option<Secret>,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            connect_url: None,
            subscribe_url: None,
            subscribe_topics: vec![Pattern::new("*")],
            publish_url: None,
            publish_topics: vec![Pattern::new("*")],
            rpc_url: None,
            headers: Vec::new(),
            timeout: Duration::from_millis(1000),
            max_inflight: 1000,
            secret: None,
        }
    }
}

/// The `WEBHOOK_*` settings (see `docs/backend.md#webhooks`).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: Secret,
    /// How long one batch is retried before its events are dropped.
    pub retry: Duration,
    pub batch_max: usize,
    /// How long the first event of a batch waits for others.
    pub batch_wait: Duration,
    /// One POST's time limit; past it the attempt counts as failed.
    pub timeout: Duration,
    /// Events this node may hold unsent; past it new ones are dropped.
    pub queue_size: usize,
    /// Topics whose client publications become `client_event` webhooks.
    pub client_event_topics: Vec<Pattern>,
}

impl WebhookConfig {
    pub fn client_event(&self, topic: &str) -> bool {
        self.client_event_topics.iter().any(|p| p.matches(topic))
    }
}

/// `WEBSOCKET_RATE_LIMIT` / `WEBSOCKET_RATE_BURST`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// An IP network of `TRUSTED_PROXIES`: an address, or `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn parse_cidrs(v: &str) -> Result<Vec<Cidr>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let bad =
                || format!("{s:?} is not an IP address or network (such as 10.0.0.0/8 or ::1)");
            let (addr, prefix) = match s.split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (s, None),
            };
            let net: IpAddr = addr.parse().map_err(|_| bad())?;
            let max = if net.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            };
            Ok(Cidr { net, prefix })
        })
        .collect()
}

/// The demo events served when `WEBSOCKET_MOCK_EVENTS` is not set.
pub const DEFAULT_MOCK_EVENTS: &str = r#"[
  {"name":"ticker","interval":2000,"data":{"symbol":"DEMO","price":101.25,"change":0.42}},
  {"name":"notifications","interval":5000,"data":{"level":"info","message":"Switchboard demo notification"}}
]"#;

/// Apps of the LED board when `DEVICE_APPS` is not set.
pub const DEFAULT_DEVICE_APPS: &str = "clock,scroll_text,stars";

impl Config {
    /// Reads every setting from `src`, collecting every error.
    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigErrors> {
        Self::build(&mut Parser::new(src))
    }

    fn build(p: &mut Parser<'_>) -> Result<Config, ConfigErrors> {
        let src = p.src;
        let host = p.parse(names::HOST, "0.0.0.0", |v| {
            v.parse::<IpAddr>()
                .map_err(|_| "expected an IP address such as 0.0.0.0 or 127.0.0.1".into())
        });
        let port = p.parse(names::PORT, "8080", |v| {
            v.parse::<u16>()
                .map_err(|_| "expected a port number from 0 to 65535".into())
        });
        let admin_port = p.optional(names::ADMIN_PORT, |v| {
            v.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| "expected a port number from 1 to 65535".into())
        });
        let node_id = p.parse(names::NODE_ID, "", |v| {
            if v.is_empty() {
                return Ok(default_node_id());
            }
            if protocol::valid_topic(v) && v.len() <= 64 {
                Ok(v.to_string())
            } else {
                Err("expected 1 to 64 characters from A-Z a-z 0-9 _ . : / -".into())
            }
        });
        let log_format = p.parse(names::LOG_FORMAT, "text", |v| match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected text or json".into()),
        });
        let rust_log = p.optional(names::RUST_LOG, |v| {
            tracing_subscriber::EnvFilter::try_new(v)
                .map(|_| v.to_string())
                .map_err(|e| format!("expected a log filter such as info or switchboard=debug,tower_http=warn: {e}"))
        });
        let websocket_enabled = p.parse(names::WEBSOCKET_ENABLED, "true", parse_bool);
        let websocket_path = p.parse(names::WEBSOCKET_PATH, "/ws", |v| {
            if websocket_path_ok(v) {
                Ok(v.to_string())
            } else {
                Err("expected a path such as /ws: starts with /, no trailing /, no {}*?# or spaces, no segment starting with :, not one of the node's own paths (/healthz, /readyz, /metrics, /favicon.ico) and not under /api, /admin, /socket.io, /sse or /assets".into())
            }
        });
        let mock_events = p.parse(
            names::WEBSOCKET_MOCK_EVENTS,
            DEFAULT_MOCK_EVENTS,
            parse_mock_events,
        );
        let heartbeat_interval = p.parse(names::WEBSOCKET_HEARTBEAT_INTERVAL, "30000", |v| {
            parse_ms(v, 100, 3_600_000)
        });
        let max_payload = p.parse(names::WEBSOCKET_MAX_PAYLOAD, "10485760", |v| {
            parse_range(v, 64, 1 << 30)
        });
        let max_subscriptions = p.parse(names::WEBSOCKET_MAX_SUBSCRIPTIONS, "1000", |v| {
            parse_range(v, 1, 1_000_000)
        });
        let client_queue_bytes = p.parse(names::WEBSOCKET_CLIENT_QUEUE_BYTES, "1048576", |v| {
            parse_range(v, 1024, 1 << 30)
        });
        let client_queue_messages = p.parse(names::WEBSOCKET_CLIENT_QUEUE_MESSAGES, "16384", |v| {
            parse_range(v, 16, 1 << 20)
        });
        let websocket_flush_interval = p.parse(names::WEBSOCKET_FLUSH_INTERVAL_MS, "20", |v| {
            parse_ms(v, 0, 1000)
        });
        let cors_allowed_origins = p.parse(names::CORS_ALLOWED_ORIGINS, "*", parse_origins);
        let origin_allow_missing = p.parse(names::ORIGIN_ALLOW_MISSING, "true", parse_bool);
        let redis_url = p.optional(names::REDIS_URL, |v| {
            crate::redis::check_url(v).map(|_| v.to_string())
        });
        let redis_pubsub_buffer = p.parse(names::REDIS_PUBSUB_BUFFER, "65536", |v| {
            parse_range(v, 16, 1 << 20)
        });
        let redis_prefix = p.parse(names::REDIS_PREFIX, "switchboard", |v| {
            if !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                Ok(v.to_string())
            } else {
                Err("expected 1 to 64 characters from A-Z a-z 0-9 _ - .".into())
            }
        });
        let leader_lease = p.parse(names::LEADER_LEASE_MS, "5000", |v| {
            parse_ms(v, 500, 600_000)
        });
        let command_timeout = p.parse(names::COMMAND_TIMEOUT_MS, "5000", |v| {
            parse_ms(v, 100, 120_000)
        });
        let device_apps = p.parse(names::DEVICE_APPS, DEFAULT_DEVICE_APPS, |v| {
            let apps: Vec<String> = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if apps.is_empty() {
                return Err(
                    "expected a comma-separated list of apps such as clock,scroll_text,stars"
                        .into(),
                );
            }
            if let Some(bad) = apps.iter().find(|a| !protocol::valid_topic(a)) {
                return Err(format!(
                    "app name `{bad}` must use only A-Z a-z 0-9 _ . : / -"
                ));
            }
            Ok(apps)
        });
        let device_driver = p.parse(names::DEVICE_DRIVER, "simulated", parse_driver);
        let device_fps = p.parse(names::DEVICE_FPS, "20", |v| {
            parse_range(v, 1, 60).map(|n| n as u32)
        });
        let socketio_enabled = p.parse(names::SOCKETIO_ENABLED, "true", parse_bool);
        let dashboard_enabled = p.parse(names::DASHBOARD_ENABLED, "true", parse_bool);
        let socketio_ping_interval = p.parse(names::SOCKETIO_PING_INTERVAL, "25000", |v| {
            parse_ms(v, 100, 3_600_000)
        });
        let socketio_ping_timeout = p.parse(names::SOCKETIO_PING_TIMEOUT, "20000", |v| {
            parse_ms(v, 100, 3_600_000)
        });
        let socketio_state_recovery = p.parse(names::SOCKETIO_STATE_RECOVERY, "false", parse_bool);
        let shutdown_grace = p.parse(names::SHUTDOWN_GRACE_MS, "10000", |v| {
            parse_ms(v, 0, 3_600_000)
        });
        let shutdown_readiness_delay = p.parse(names::SHUTDOWN_READINESS_DELAY_MS, "0", |v| {
            parse_ms(v, 0, 3_600_000)
        });
        let shutdown_drain = p.parse(names::SHUTDOWN_DRAIN_MS, "", |v| {
            if v.is_empty() {
                return Ok(None);
            }
            parse_ms(v, 0, 3_600_000).map(Some)
        });
        let shutdown_close_code = p.parse(names::SHUTDOWN_CLOSE_CODE, "", |v| match v {
            "" => Ok(None),
            "1001" => Ok(Some(1001)),
            "1012" => Ok(Some(1012)),
            _ => Err("expected 1001 (going away) or 1012 (service restart)".into()),
        });
        let proxy_enabled = p.parse(names::WEBSOCKET_PROXY_ENABLED, "false", parse_bool);
        let proxy_routes = p.parse(names::WEBSOCKET_PROXY_ROUTES, "", parse_proxy_routes);
        let proxy_forward = p.parse(
            names::WEBSOCKET_PROXY_FORWARD_HEADERS,
            "Authorization,Cookie",
            |v| {
                let list: Vec<String> = v
                    .split(',')
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .collect();
                match list.iter().find(|h| {
                    !h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                }) {
                    Some(bad) => Err(format!("`{bad}` is not a header name")),
                    None => Ok(list),
                }
            },
        );
        let proxy_timeout = p.parse(names::WEBSOCKET_PROXY_CONNECT_TIMEOUT_MS, "5000", |v| {
            parse_ms(v, 100, 120_000)
        });
        let secret = p.optional(names::AUTH_JWT_SECRET, secret_value);
        let key_file = p.optional(names::AUTH_JWT_PUBLIC_KEY_FILE, |v| {
            std::fs::read(v).map_err(|e| format!("cannot read the file: {e}"))
        });
        let audience = p.optional(names::AUTH_JWT_AUDIENCE, |v| Ok(v.to_string()));
        let issuer = p.optional(names::AUTH_JWT_ISSUER, |v| Ok(v.to_string()));
        let leeway = p.parse(names::AUTH_JWT_LEEWAY_MS, "0", |v| parse_ms(v, 0, 600_000));
        let public_topics = p.parse(names::AUTH_PUBLIC_TOPICS, "", parse_topic_patterns);
        let token = secret_value;
        let api_token = p.optional(names::API_TOKEN, token);
        let admin_token = p.optional(names::ADMIN_TOKEN, token);
        let webhooks = webhook_settings(p);
        let history_topics = p.parse(names::HISTORY_TOPICS, "*", parse_topic_patterns);
        let history_size = p.parse(names::HISTORY_SIZE, "1000", |v| {
            parse_range(v, 1, 1_000_000)
        });
        let history_ttl = p.parse(names::HISTORY_TTL_MS, "600000", |v| {
            parse_ms(v, 1_000, 30 * 86_400_000)
        });
        let presence_topics = p.parse(names::PRESENCE_TOPICS, "", parse_topic_patterns);
        let presence_ttl = p.parse(names::PRESENCE_TTL_MS, "10000", |v| {
            parse_ms(v, 1_000, 600_000)
        });
        let presence_interval = p.parse(names::PRESENCE_DIFF_INTERVAL_MS, "500", |v| {
            parse_ms(v, 50, 60_000)
        });
        let rate = p.parse(names::WEBSOCKET_RATE_LIMIT, "100", |v| {
            parse_range(v, 0, 1_000_000)
        });
        let burst = p.optional(names::WEBSOCKET_RATE_BURST, |v| {
            parse_range(v, 1, 10_000_000)
        });
        let max_connections = p.parse(names::MAX_CONNECTIONS, "0", |v| {
            parse_range(v, 0, 10_000_000)
        });
        // Off by default: behind a load balancer, a corporate NAT or a
        // benchmark's load generator many clients share one address, and a
        // default that caps them together breaks those deployments before
        // anyone sets TRUSTED_PROXIES.
        let max_per_address = p.parse(names::MAX_CONNECTIONS_PER_ADDRESS, "0", |v| {
            parse_range(v, 0, 10_000_000)
        });
        let max_per_user = p.parse(names::MAX_CONNECTIONS_PER_USER, "100", |v| {
            parse_range(v, 0, 10_000_000)
        });
        let trusted_proxies = p.parse(names::TRUSTED_PROXIES, "", parse_cidrs);
        let max_topics = p.parse(names::MAX_TOPICS_PER_NODE, "100000", |v| {
            parse_range(v, 0, 100_000_000)
        });
        let subscribe_rate = p.parse(names::WEBSOCKET_SUBSCRIBE_RATE_LIMIT, "10", |v| {
            parse_range(v, 0, 1_000_000)
        });
        let subscribe_burst = p.parse(names::WEBSOCKET_SUBSCRIBE_RATE_BURST, "100", |v| {
            parse_range(v, 1, 10_000_000)
        });
        let http_body_limit = p.parse(names::HTTP_BODY_LIMIT, "1048576", |v| {
            parse_range(v, 1024, 1 << 30)
        });
        let http_request_timeout = p.parse(names::HTTP_REQUEST_TIMEOUT_MS, "30000", |v| {
            parse_ms(v, 100, 3_600_000)
        });
        // hyper refuses buffers under 8 KiB.
        let http_max_header_bytes = p.parse(names::HTTP_MAX_HEADER_BYTES, "16384", |v| {
            parse_range(v, 8192, 1 << 20)
        });
        let handshake_timeout = p.parse(names::WEBSOCKET_HANDSHAKE_TIMEOUT_MS, "10000", |v| {
            parse_ms(v, 100, 600_000)
        });
        let hook_connect_url = p.optional(names::PROXY_CONNECT_URL, parse_hook_url);
        let hook_subscribe_url = p.optional(names::PROXY_SUBSCRIBE_URL, parse_hook_url);
        let hook_subscribe_topics =
            p.parse(names::PROXY_SUBSCRIBE_TOPICS, "*", parse_topic_patterns);
        let hook_publish_url = p.optional(names::PROXY_PUBLISH_URL, parse_hook_url);
        let hook_publish_topics = p.parse(names::PROXY_PUBLISH_TOPICS, "*", parse_topic_patterns);
        let hook_rpc_url = p.optional(names::PROXY_RPC_URL, parse_hook_url);
        let hook_headers = p.parse(names::PROXY_HEADERS, "", parse_header_names);
        let hook_timeout = p.parse(names::PROXY_TIMEOUT_MS, "1000", |v| parse_ms(v, 10, 60_000));
        let hook_max_inflight = p.parse(names::PROXY_MAX_INFLIGHT, "1000", |v| {
            parse_range(v, 1, 1_000_000)
        });
        let hook_secret = p.optional(names::PROXY_SECRET, secret_value);
        // Read here, not by tokio (which would panic on a bad value): main
        // builds the runtime with it. The hub fans out in one slice per worker.
        let worker_threads = p.optional(names::TOKIO_WORKER_THREADS, |v| {
            parse_range(v, 1, 1024)
                .map_err(|_| "expected a whole number of worker threads from 1 to 1024".to_string())
        });
        let compat_python = p.optional(names::COMPAT_PYTHON_SOCKETIO, parse_compat_name);
        let compat_emitter = p.optional(names::COMPAT_SOCKETIO_EMITTER, parse_compat_name);
        // On by default with Redis (channels_redis's own prefix): a Channels
        // app's group sends then arrive without a setting; empty turns it off.
        let compat_channels_given = p
            .src
            .get(names::COMPAT_CHANNELS_PREFIX)
            .is_some_and(|v| !v.trim().is_empty());
        let compat_channels = p.parse(names::COMPAT_CHANNELS_PREFIX, "asgi", |v| {
            if v.is_empty() {
                Ok(None)
            } else {
                parse_compat_name(v).map(Some)
            }
        });
        let redis_ca_file = p.optional(names::REDIS_CA_FILE, |v| {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let path = PathBuf::from(v);
            let certs = CertificateDer::pem_file_iter(&path)
                .map_err(|e| format!("cannot read the file: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("not a PEM certificate file: {e}"))?;
            if certs.is_empty() {
                return Err("no PEM certificate in the file".into());
            }
            Ok(path)
        });

        if !p.errors.is_empty() {
            return Err(ConfigErrors(std::mem::take(&mut p.errors)));
        }
        let auth = match (secret.unwrap(), key_file.unwrap()) {
            (None, None) => Authenticator::open(),
            (Some(_), Some(_)) => {
                return Err(ConfigErrors(vec![ConfigError::new(
                    names::AUTH_JWT_PUBLIC_KEY_FILE,
                    "(set)",
                    &format!(
                        "set either {} or {}, not both",
                        names::AUTH_JWT_SECRET,
                        names::AUTH_JWT_PUBLIC_KEY_FILE
                    ),
                )]));
            }
            (Some(secret), None) => Authenticator::new(
                KeySource::Secret(&secret),
                audience.as_ref().unwrap().as_deref(),
                issuer.as_ref().unwrap().as_deref(),
                public_topics.clone().unwrap(),
            )
            .expect("HS256 keys always build"),
            (None, Some(pem)) => match Authenticator::new(
                KeySource::PublicKeyPem(&pem),
                audience.as_ref().unwrap().as_deref(),
                issuer.as_ref().unwrap().as_deref(),
                public_topics.clone().unwrap(),
            ) {
                Ok(a) => a,
                Err(why) => {
                    let path = src.get(names::AUTH_JWT_PUBLIC_KEY_FILE).unwrap_or_default();
                    return Err(ConfigErrors(vec![ConfigError::new(
                        names::AUTH_JWT_PUBLIC_KEY_FILE,
                        &path,
                        &why,
                    )]));
                }
            },
        }
        .with_leeway(leeway.unwrap());
        let mut warnings = Vec::new();
        for (name, value) in [
            (names::AUTH_JWT_SECRET, src.get(names::AUTH_JWT_SECRET)),
            (names::API_TOKEN, src.get(names::API_TOKEN)),
            (names::ADMIN_TOKEN, src.get(names::ADMIN_TOKEN)),
            (names::WEBHOOK_SECRET, src.get(names::WEBHOOK_SECRET)),
            (names::PROXY_SECRET, src.get(names::PROXY_SECRET)),
        ] {
            if let Some(v) = value.filter(|v| !v.trim().is_empty())
                && v.trim().len() < 16
            {
                warnings.push(format!(
                    "{name} is shorter than 16 characters: use a long random value in production"
                ));
            }
        }
        // Client identities are only as strong as the endpoints that act
        // for a client: the control API subscribes any connection to any
        // topic without a permission check, and `/api/publish` publishes
        // anywhere.
        let clients_checked = auth.enabled()
            || hook_connect_url.as_ref().is_some_and(Option::is_some)
            || hook_subscribe_url.as_ref().is_some_and(Option::is_some);
        if clients_checked && api_token.as_ref().is_some_and(Option::is_none) {
            warnings.push(format!(
                "{} is not set although clients are authenticated: POST /api/publish, the device commands and the control API (/api/subscribe, /api/unsubscribe, /api/disconnect) are open to anyone who reaches this port, and /api/subscribe bypasses client tokens and the subscribe hook; set it, or keep the port internal",
                names::API_TOKEN
            ));
        }
        let rate = rate.unwrap();
        let rate_limit = (rate > 0).then(|| RateLimit {
            per_second: rate as f64,
            burst: burst.unwrap().map_or(2.0 * rate as f64, |b| b as f64),
        });
        let shutdown_grace = shutdown_grace.unwrap();
        let redis_url = redis_url.unwrap();
        let mut errors = Vec::new();
        // Cross-field rules.
        let shutdown_readiness_delay = shutdown_readiness_delay.unwrap();
        if let Some(Some(drain)) = shutdown_drain
            && shutdown_readiness_delay + drain > shutdown_grace
        {
            errors.push(ConfigError::new(
                names::SHUTDOWN_DRAIN_MS,
                &drain.as_millis().to_string(),
                &format!(
                    "{} + {} must not exceed {}={}",
                    names::SHUTDOWN_READINESS_DELAY_MS,
                    names::SHUTDOWN_DRAIN_MS,
                    names::SHUTDOWN_GRACE_MS,
                    shutdown_grace.as_millis()
                ),
            ));
        }
        if !shutdown_readiness_delay.is_zero() && shutdown_readiness_delay >= shutdown_grace {
            errors.push(ConfigError::new(
                names::SHUTDOWN_READINESS_DELAY_MS,
                &shutdown_readiness_delay.as_millis().to_string(),
                &format!(
                    "must be shorter than {}={}",
                    names::SHUTDOWN_GRACE_MS,
                    shutdown_grace.as_millis()
                ),
            ));
        }
        // A REST command waits COMMAND_TIMEOUT_MS for the leader and then
        // answers 503 (not applied, retry); the request timeout cutting in
        // first would answer an empty 408 while the command may still land.
        if let (Some(command), Some(request)) = (command_timeout, http_request_timeout)
            && command >= request
        {
            errors.push(ConfigError::new(
                names::COMMAND_TIMEOUT_MS,
                &command.as_millis().to_string(),
                &format!(
                    "must be shorter than {}={}",
                    names::HTTP_REQUEST_TIMEOUT_MS,
                    request.as_millis()
                ),
            ));
        }
        if let (Some(port), Some(admin)) = (port, admin_port.flatten())
            && port != 0
            && port == admin
        {
            errors.push(ConfigError::new(
                names::ADMIN_PORT,
                &admin.to_string(),
                &format!("must differ from {}", names::PORT),
            ));
        }
        let compat = CompatConfig {
            python_socketio: compat_python.flatten(),
            socketio_emitter: compat_emitter.flatten(),
            channels_prefix: compat_channels.flatten(),
        };
        let mut compat = compat;
        if redis_url.is_none() && !compat_channels_given {
            // The default prefix means nothing without Redis.
            compat.channels_prefix = None;
        }
        if redis_url.is_none() {
            for (name, value) in [
                (names::COMPAT_PYTHON_SOCKETIO, &compat.python_socketio),
                (names::COMPAT_SOCKETIO_EMITTER, &compat.socketio_emitter),
                (names::COMPAT_CHANNELS_PREFIX, &compat.channels_prefix),
            ] {
                if let Some(v) = value {
                    errors.push(ConfigError::new(
                        name,
                        v,
                        &format!(
                            "needs {}: the emitters publish on Redis, where the leader reads them",
                            names::REDIS_URL
                        ),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        // A bare single node with nobody to take its clients says "going
        // away". In a cluster, or behind a load balancer (which is what a
        // readiness delay is for), the clients should reconnect at once and
        // will reach another node: "service restart".
        let behind_others = redis_url.is_some() || !shutdown_readiness_delay.is_zero();
        let shutdown_close_code =
            shutdown_close_code
                .unwrap()
                .unwrap_or(if behind_others { 1012 } else { 1001 });
        // Spread the closes over a quarter of the grace period by default so
        // that a rolling restart does not make every client reconnect at once;
        // never past the grace period once the readiness delay is over.
        let shutdown_drain = shutdown_drain.unwrap().unwrap_or_else(|| {
            (shutdown_grace / 4)
                .min(Duration::from_secs(2))
                .min(shutdown_grace.saturating_sub(shutdown_readiness_delay))
        });
        Ok(Config {
            host: host.unwrap(),
            port: port.unwrap(),
            admin_port: admin_port.unwrap(),
            node_id: node_id.unwrap(),
            log_format: log_format.unwrap(),
            rust_log: rust_log.unwrap(),
            websocket_enabled: websocket_enabled.unwrap(),
            websocket_path: websocket_path.unwrap(),
            mock_events: mock_events.unwrap(),
            heartbeat_interval: heartbeat_interval.unwrap(),
            max_payload: max_payload.unwrap(),
            max_subscriptions: max_subscriptions.unwrap(),
            client_queue_bytes: client_queue_bytes.unwrap(),
            client_queue_messages: client_queue_messages.unwrap(),
            websocket_flush_interval: websocket_flush_interval.unwrap(),
            cors_allowed_origins: cors_allowed_origins.unwrap(),
            origin_allow_missing: origin_allow_missing.unwrap(),
            redis_url,
            redis_prefix: redis_prefix.unwrap(),
            redis_pubsub_buffer: redis_pubsub_buffer.unwrap(),
            leader_lease: leader_lease.unwrap(),
            command_timeout: command_timeout.unwrap(),
            device_apps: device_apps.unwrap(),
            device_driver: device_driver.unwrap(),
            device_fps: device_fps.unwrap(),
            socketio_enabled: socketio_enabled.unwrap(),
            dashboard_enabled: dashboard_enabled.unwrap(),
            socketio_ping_interval: socketio_ping_interval.unwrap(),
            socketio_ping_timeout: socketio_ping_timeout.unwrap(),
            socketio_state_recovery: socketio_state_recovery.unwrap(),
            shutdown_grace,
            shutdown_readiness_delay,
            shutdown_drain,
            shutdown_close_code,
            proxy: ProxyConfig {
                enabled: proxy_enabled.unwrap(),
                routes: proxy_routes.unwrap(),
                forward_headers: proxy_forward.unwrap(),
                connect_timeout: proxy_timeout.unwrap(),
            },
            auth,
            api_token: api_token.unwrap(),
            admin_token: admin_token.unwrap(),
            webhooks: webhooks.unwrap(),
            rate_limit,
            max_connections: Some(max_connections.unwrap()).filter(|n| *n > 0),
            max_connections_per_address: Some(max_per_address.unwrap()).filter(|n| *n > 0),
            max_connections_per_user: Some(max_per_user.unwrap()).filter(|n| *n > 0),
            trusted_proxies: trusted_proxies.unwrap(),
            max_topics_per_node: Some(max_topics.unwrap()).filter(|n| *n > 0),
            subscribe_rate_limit: Some(subscribe_rate.unwrap())
                .filter(|n| *n > 0)
                .map(|rate| RateLimit {
                    per_second: rate as f64,
                    burst: subscribe_burst.unwrap() as f64,
                }),
            http_body_limit: http_body_limit.unwrap(),
            http_request_timeout: http_request_timeout.unwrap(),
            http_max_header_bytes: http_max_header_bytes.unwrap(),
            handshake_timeout: handshake_timeout.unwrap(),
            redis_ca_file: redis_ca_file.unwrap(),
            worker_threads: worker_threads.unwrap(),
            history: HistoryConfig {
                topics: history_topics.unwrap(),
                size: history_size.unwrap(),
                ttl: history_ttl.unwrap(),
            },
            hooks: HooksConfig {
                connect_url: hook_connect_url.unwrap(),
                subscribe_url: hook_subscribe_url.unwrap(),
                subscribe_topics: hook_subscribe_topics.unwrap(),
                publish_url: hook_publish_url.unwrap(),
                publish_topics: hook_publish_topics.unwrap(),
                rpc_url: hook_rpc_url.unwrap(),
                headers: hook_headers.unwrap(),
                timeout: hook_timeout.unwrap(),
                max_inflight: hook_max_inflight.unwrap(),
                secret: hook_secret.unwrap(),
            },
            compat,
            presence: PresenceConfig {
                topics: presence_topics.unwrap(),
                ttl: presence_ttl.unwrap(),
                diff_interval: presence_interval.unwrap(),
            },
            warnings,
        })
    }

    /// The Redis URL with any password replaced, for logs and health output.
    pub fn redis_url_redacted(&self) -> Option<String> {
        self.redis_url.as_deref().map(redact_url)
    }
}

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url(url: &str) -> String {
    let url = &redact_query(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

/// Replaces `sentinelPassword=…` in a URL's query.
fn redact_query(url: &str) -> String {
    match url.split_once("sentinelPassword=") {
        Some((head, tail)) => {
            let rest = tail.find('&').map_or("", |i| &tail[i..]);
            format!("{head}sentinelPassword=***{rest}")
        }
        None => url.to_string(),
    }
}

/// dotenvy's parse error quotes the line (or its value), which may be a
/// secret (`API_TOKEN=…`): only the setting's `name` (when it could be
/// told) and the position are.
fn env_file_error(e: &dotenvy::Error, name: Option<&str>) -> String {
    const HOW: &str = "quote a value with spaces, and single-quote one with $ (double quotes and bare values substitute $NAME)";
    match (e, name) {
        (dotenvy::Error::LineParse(_, at), Some(name)) => format!(
            "the line of {name} cannot be read (at character {at}; its value is not shown): {HOW}"
        ),
        (dotenvy::Error::LineParse(_, at), None) => {
            format!("a line cannot be read (at character {at}; it is not shown): {HOW}")
        }
        (other, _) => other.to_string(),
    }
}

/// Whether `WEBSOCKET_PATH` can be routed beside the node's own paths:
/// the router is built after start-up has bound its port, and a path
/// that collides with another route (or uses axum's old `:` parameter
/// syntax) makes it panic there.
fn websocket_path_ok(v: &str) -> bool {
    let under = |prefix: &str| v == prefix || v.starts_with(&format!("{prefix}/"));
    v.starts_with('/')
        && v.len() > 1
        && !v.ends_with('/')
        && !v.contains(['{', '}', '*', '?', '#', ' '])
        && !v.split('/').any(|segment| segment.starts_with(':'))
        && !["/healthz", "/readyz", "/metrics", "/favicon.ico"].contains(&v)
        && !v.starts_with("/api")
        && !v.starts_with("/admin")
        && !["/socket.io", "/sse", "/assets"].into_iter().any(under)
}

fn default_node_id() -> String {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "_.-".contains(*c))
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "node".to_string()
    } else {
        host
    };
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

// === value parsers ===

/// The `WEBHOOK_*` settings: `None` inside when `WEBHOOK_URL` is unset; the
/// outer `None` when one of them is bad (the error is recorded).
fn webhook_settings(p: &mut Parser<'_>) -> Option<Option<WebhookConfig>> {
    let url = p.optional(names::WEBHOOK_URL, |v| match reqwest::Url::parse(v) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {
            Ok(v.to_string())
        }
        _ => Err(
            "expected an http:// or https:// URL such as https://app.example.com/webhooks".into(),
        ),
    });
    let secret = p.optional(names::WEBHOOK_SECRET, secret_value);
    let retry = p.parse(names::WEBHOOK_RETRY_MS, "300000", |v| {
        parse_ms(v, 0, 7 * 86_400_000)
    });
    let batch_max = p.parse(names::WEBHOOK_BATCH_MAX, "100", |v| {
        parse_range(v, 1, 10_000)
    });
    let batch_wait = p.parse(names::WEBHOOK_BATCH_MS, "100", |v| parse_ms(v, 0, 60_000));
    let timeout = p.parse(names::WEBHOOK_TIMEOUT_MS, "5000", |v| {
        parse_ms(v, 100, 120_000)
    });
    let queue_size = p.parse(names::WEBHOOK_QUEUE_SIZE, "100000", |v| {
        parse_range(v, 1, 10_000_000)
    });
    let topics = p.parse(names::WEBHOOK_CLIENT_EVENT_TOPICS, "", parse_topic_patterns);
    let (url, secret) = (url?, secret?);
    let Some(url) = url else {
        return Some(None);
    };
    let Some(secret) = secret else {
        p.errors.push(ConfigError::new(
            names::WEBHOOK_SECRET,
            "",
            &format!(
                "required when {} is set: webhooks are signed with it",
                names::WEBHOOK_URL
            ),
        ));
        return None;
    };
    Some(Some(WebhookConfig {
        url,
        secret,
        retry: retry?,
        batch_max: batch_max?,
        batch_wait: batch_wait?,
        timeout: timeout?,
        queue_size: queue_size?,
        client_event_topics: topics?,
    }))
}

struct Parser<'a> {
    src: &'a dyn Source,
    errors: Vec<ConfigError>,
    /// Each setting's default as it was applied, for [`defaults`].
    defaults: HashMap<String, String>,
}

impl<'a> Parser<'a> {
    fn new(src: &'a dyn Source) -> Self {
        Parser {
            src,
            errors: Vec::new(),
            defaults: HashMap::new(),
        }
    }

    /// Parses `name` (or `default` when unset); records an error and returns
    /// `None` when the value is bad.
    fn parse<T>(
        &mut self,
        name: &str,
        default: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        self.defaults.insert(name.to_string(), default.to_string());
        let raw = self.src.get(name);
        let value = raw.as_deref().map(str::trim).unwrap_or(default);
        match f(value) {
            Ok(v) => Some(v),
            Err(why) => {
                self.errors.push(ConfigError::new(name, value, &why));
                None
            }
        }
    }

    /// Like [`Parser::parse`] for settings without a default: unset or empty
    /// is `Some(None)`.
    fn optional<T>(
        &mut self,
        name: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<Option<T>> {
        match self.src.get(name).as_deref().map(str::trim) {
            None | Some("") => Some(None),
            Some(value) => match f(value) {
                Ok(v) => Some(Some(v)),
                Err(why) => {
                    self.errors.push(ConfigError::new(name, value, &why));
                    None
                }
            },
        }
    }
}

/// A token or key: any length is accepted (short ones draw a warning), but
/// not one that could never be sent in an `Authorization` header.
fn secret_value(v: &str) -> Result<Secret, String> {
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(Secret::new(v.to_string()))
}

/// A Redis channel name or channel prefix of a compat source: it goes
/// into `PSUBSCRIBE` patterns, so no glob characters.
fn parse_compat_name(v: &str) -> Result<String, String> {
    if v.len() <= 128
        && v.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"*?[]\\".contains(c))
    {
        Ok(v.to_string())
    } else {
        Err(
            "expected at most 128 characters without spaces or the glob characters * ? [ ] \\"
                .into(),
        )
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A comma-separated list of topic patterns (`*` wildcards); empty entries are ignored.
fn parse_topic_patterns(v: &str) -> Result<Vec<Pattern>, String> {
    let list: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    match list
        .iter()
        .find(|t| !protocol::valid_topic(&t.replace('*', "a")))
    {
        Some(bad) => Err(format!(
            "`{bad}` is not a topic pattern ({} with * wildcards)",
            protocol::TOPIC_PATTERN
        )),
        None => Ok(list.into_iter().map(Pattern::new).collect()),
    }
}

/// A hook URL: `http://` or `https://` with a host.
fn parse_hook_url(v: &str) -> Result<String, String> {
    let uri: axum::http::Uri = v
        .parse()
        .map_err(|_| "expected an http:// or https:// URL".to_string())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(v.to_string()),
        _ => Err("expected an http:// or https:// URL with a host, such as http://app:5000/switchboard/connect".into()),
    }
}

/// A comma-separated list of HTTP header names; empty entries are ignored.
fn parse_header_names(v: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = v
        .split(',')
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    match list.iter().find(|h| {
        !h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        Some(bad) => Err(format!("`{bad}` is not a header name")),
        None => Ok(list),
    }
}

fn parse_range(v: &str, min: usize, max: usize) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

fn parse_ms(v: &str, min: u64, max: u64) -> Result<Duration, String> {
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Duration::from_millis(n)),
        _ => Err(format!("expected milliseconds from {min} to {max}")),
    }
}

fn parse_origins(v: &str) -> Result<Origins, String> {
    if v == "*" {
        return Ok(Origins::Any);
    }
    let list: Vec<String> = v
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if list.is_empty() {
        return Err(
            "expected * or a comma-separated list of origins such as https://app.example.com"
                .into(),
        );
    }
    if let Some(bad) = list.iter().find(|o| {
        !(o.starts_with("http://") || o.starts_with("https://")) || o.contains(['*', ' '])
    }) {
        return Err(format!(
            "origin `{bad}` must be scheme://host[:port], such as https://app.example.com"
        ));
    }
    Ok(Origins::List(list))
}

/// `name:ws://host:port/path,name2:wss://…`
fn parse_proxy_routes(v: &str) -> Result<Vec<ProxyRoute>, String> {
    let mut routes: Vec<ProxyRoute> = Vec::new();
    for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, url)) = entry.split_once(':') else {
            return Err(format!(
                "entry \"{entry}\" must be name:ws://host[:port]/path"
            ));
        };
        let name = name.trim();
        let url = url.trim();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(format!(
                "entry \"{entry}\": route name must be 1 to 64 characters from A-Z a-z 0-9 _ - ."
            ));
        }
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"))
            .ok_or_else(|| format!("entry \"{entry}\": upstream must be a ws:// or wss:// URL"))?;
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host_ok = !host.is_empty()
            && !host.contains(['@', ' '])
            && host.rsplit_once(':').is_none_or(|(h, port)| {
                !h.is_empty()
                    && (h.ends_with(']') || !h.contains(':'))
                    && port.parse::<u16>().is_ok()
            });
        if !host_ok || url.parse::<axum::http::Uri>().is_err() {
            return Err(format!(
                "entry \"{entry}\": upstream URL has no valid host[:port]"
            ));
        }
        if routes.iter().any(|r| r.name == name) {
            return Err(format!(
                "entry \"{entry}\": route name \"{name}\" appears twice"
            ));
        }
        routes.push(ProxyRoute {
            name: name.to_string(),
            url: url.to_string(),
        });
    }
    Ok(routes)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMockEvent {
    name: String,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

fn parse_mock_events(v: &str) -> Result<Vec<MockEvent>, String> {
    // The array is level 1, each entry level 2, its `data` level 3.
    if protocol::json_depth_exceeds(v, protocol::MAX_DATA_DEPTH + 2) {
        return Err(format!("an entry's data: {}", protocol::TOO_DEEP));
    }
    let raw: Vec<RawMockEvent> = serde_json::from_str(v).map_err(|e| {
        format!("expected a JSON array of {{\"name\",\"interval\" (ms),\"data\"}} objects: {e}")
    })?;
    let mut seen = std::collections::HashSet::new();
    let mut events = Vec::with_capacity(raw.len());
    for (i, e) in raw.into_iter().enumerate() {
        if !protocol::valid_topic(&e.name) {
            return Err(format!(
                "entry {i}: name `{}` must match {}",
                e.name,
                protocol::TOPIC_PATTERN
            ));
        }
        if e.name == crate::device::state::TOPIC {
            return Err(format!(
                "entry {i}: \"{}\" is reserved for the device state",
                e.name
            ));
        }
        if !seen.insert(e.name.clone()) {
            return Err(format!("entry {i}: name `{}` appears twice", e.name));
        }
        let interval = match e.interval {
            None | Some(0) => None,
            Some(ms) if ms < 10 => {
                return Err(format!(
                    "entry {i} ({}): interval {ms} ms is below the minimum of 10 ms",
                    e.name
                ));
            }
            Some(ms) => Some(Duration::from_millis(ms)),
        };
        let data = e
            .data
            .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"));
        if protocol::json_depth_exceeds(data.get(), protocol::MAX_DATA_DEPTH) {
            return Err(format!("entry {i} ({}): {}", e.name, protocol::TOO_DEEP));
        }
        events.push(MockEvent {
            name: e.name,
            interval,
            data,
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_source(&map)
    }

    #[test]
    fn compat_sources_need_redis_and_plain_names() {
        let c = config(&[]).unwrap();
        assert!(!c.compat.any());
        let c = config(&[
            ("REDIS_URL", "redis://127.0.0.1:6390"),
            ("COMPAT_PYTHON_SOCKETIO", "socketio"),
            ("COMPAT_CHANNELS_PREFIX", "asgi"),
        ])
        .unwrap();
        assert_eq!(c.compat.python_socketio.as_deref(), Some("socketio"));
        assert_eq!(c.compat.channels_prefix.as_deref(), Some("asgi"));
        assert!(c.compat.broadcasts());
        let err = config(&[("COMPAT_SOCKETIO_EMITTER", "socket.io")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("COMPAT_SOCKETIO_EMITTER=socket.io is not valid: needs REDIS_URL"),
            "{err}"
        );
        let err = config(&[
            ("REDIS_URL", "redis://127.0.0.1:6390"),
            ("COMPAT_SOCKETIO_EMITTER", "io*"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("COMPAT_SOCKETIO_EMITTER=io* is not valid"),
            "{err}"
        );
    }

    /// A path that collides with the node's own routes would make the
    /// router panic after the port is bound: start-up refuses it by name.
    #[test]
    fn a_websocket_path_on_the_nodes_own_routes_is_refused() {
        for bad in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/favicon.ico",
            "/sse",
            "/sse/live",
            "/assets",
            "/assets/app.js",
            "/socket.io",
            "/socket.io/x",
            "/:ws",
            "/ws/:id",
            "/api",
            "/admin/x",
        ] {
            let err = config(&[("WEBSOCKET_PATH", bad)]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("WEBSOCKET_PATH={bad} is not valid")),
                "{err}"
            );
        }
        for good in [
            "/ws",
            "/live",
            "/realtime/ws",
            "/ssev",
            "/healthz2",
            "/v1:ws",
        ] {
            assert_eq!(
                config(&[("WEBSOCKET_PATH", good)]).unwrap().websocket_path,
                good
            );
        }
    }

    /// A bad log filter stops start-up; a line of the env file that cannot
    /// be read is named without its value (it may be a secret).
    #[test]
    fn a_bad_log_filter_or_env_file_line_is_refused_without_its_secret() {
        let err = config(&[("RUST_LOG", "switchboard=loud")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RUST_LOG=switchboard=loud is not valid"),
            "{err}"
        );
        assert_eq!(
            config(&[("RUST_LOG", "switchboard=debug,tower_http=warn")])
                .unwrap()
                .rust_log
                .as_deref(),
            Some("switchboard=debug,tower_http=warn")
        );
        let e = dotenvy::Error::LineParse("abc def".into(), 4);
        let text = env_file_error(&e, Some("API_TOKEN"));
        assert!(
            text.contains("the line of API_TOKEN cannot be read"),
            "{text}"
        );
        assert!(!text.contains("abc"), "{text}");
    }

    /// The default drain window ends within the grace period whatever the
    /// readiness delay (the chart sets 5 s).
    #[test]
    fn the_default_drain_fits_after_the_readiness_delay() {
        let c = config(&[
            ("SHUTDOWN_GRACE_MS", "6000"),
            ("SHUTDOWN_READINESS_DELAY_MS", "5000"),
        ])
        .unwrap();
        assert_eq!(c.shutdown_drain, Duration::from_millis(1000));
        let c = config(&[]).unwrap();
        assert!(c.shutdown_drain <= c.shutdown_grace / 4);
    }

    #[test]
    fn defaults_are_valid() {
        let c = config(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.websocket_path, "/ws");
        assert_eq!(c.mock_events.len(), 2);
        assert_eq!(c.mock_events[0].name, "ticker");
        assert_eq!(c.mock_events[0].interval, Some(Duration::from_secs(2)));
        assert_eq!(c.max_payload, 10 * 1024 * 1024);
        assert_eq!(c.shutdown_close_code, 1001);
        let cluster = config(&[("REDIS_URL", "redis://127.0.0.1:6390")]).unwrap();
        assert_eq!(cluster.shutdown_close_code, 1012);
        let balanced = config(&[("SHUTDOWN_READINESS_DELAY_MS", "1000")]).unwrap();
        assert_eq!(balanced.shutdown_close_code, 1012);
        assert!(c.redis_url.is_none());
        assert!(c.node_id.len() > 7);
    }

    #[test]
    fn a_command_times_out_before_its_request() {
        let err = config(&[("COMMAND_TIMEOUT_MS", "30000")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("COMMAND_TIMEOUT_MS=30000")
                && err.contains("must be shorter than HTTP_REQUEST_TIMEOUT_MS=30000"),
            "{err}"
        );
        let c = config(&[
            ("COMMAND_TIMEOUT_MS", "60000"),
            ("HTTP_REQUEST_TIMEOUT_MS", "90000"),
        ])
        .unwrap();
        assert_eq!(c.command_timeout, Duration::from_secs(60));
    }

    #[test]
    fn worker_threads_are_a_setting_like_any_other() {
        assert_eq!(config(&[]).unwrap().worker_threads, None);
        let c = config(&[("TOKIO_WORKER_THREADS", "4")]).unwrap();
        assert_eq!(c.worker_threads, Some(4));
        for bad in ["0", "1025", "four", "-1"] {
            let err = config(&[("TOKIO_WORKER_THREADS", bad)]).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "TOKIO_WORKER_THREADS={bad} is not valid: expected a whole number of worker threads from 1 to 1024"
                )
            );
        }
        let Ok(Command::Run(flags)) = parse_args(
            ["--tokio-worker-threads".to_string(), "3".to_string()],
            HashMap::new(),
        ) else {
            panic!("the flag is known");
        };
        assert_eq!(Config::from_source(&flags).unwrap().worker_threads, Some(3));
        assert!(help().contains("TOKIO_WORKER_THREADS"));
    }

    #[test]
    fn defaults_are_those_applied() {
        let d = defaults();
        assert_eq!(d["PORT"], "8080");
        assert_eq!(d["WEBSOCKET_PATH"], "/ws");
        assert_eq!(d["RUST_LOG"], "info");
        assert_eq!(d["WEBSOCKET_MOCK_EVENTS"], DEFAULT_MOCK_EVENTS);
        // Computed at start-up, and settings that are unset unless given.
        assert_eq!(d["SHUTDOWN_DRAIN_MS"], "");
        assert!(!d.contains_key("REDIS_URL"));
        assert!(!d.contains_key("TOKIO_WORKER_THREADS"));
        for name in d.keys() {
            assert!(
                names::ALL.contains(&name.as_str()),
                "{name} is not in names::ALL"
            );
        }
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let err = config(&[
            ("PORT", "99999"),
            ("WEBSOCKET_MOCK_EVENTS", "{nope"),
            ("LOG_FORMAT", "xml"),
        ])
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(err.0.len(), 3, "{text}");
        assert!(text.contains("PORT=99999 is not valid"));
        assert!(text.contains("WEBSOCKET_MOCK_EVENTS={nope is not valid"));
        assert!(text.contains("LOG_FORMAT=xml is not valid"));
    }

    #[test]
    fn webhooks_need_a_url_and_a_secret() {
        assert!(config(&[]).unwrap().webhooks.is_none());
        let c = config(&[
            ("WEBHOOK_URL", "http://127.0.0.1:9/hooks"),
            ("WEBHOOK_SECRET", "0123456789abcdef"),
            ("WEBHOOK_CLIENT_EVENT_TOPICS", "chat.*"),
        ])
        .unwrap();
        let w = c.webhooks.unwrap();
        assert_eq!(w.retry, Duration::from_secs(300));
        assert_eq!(w.batch_max, 100);
        assert!(w.client_event("chat.room1") && !w.client_event("news"));
        let err = config(&[("WEBHOOK_URL", "http://127.0.0.1:9/hooks")]).unwrap_err();
        assert!(
            err.to_string().contains(
                "WEBHOOK_SECRET=<redacted> is not valid: required when WEBHOOK_URL is set"
            ),
            "{err}"
        );
        let err = config(&[
            ("WEBHOOK_URL", "ftp://x"),
            ("WEBHOOK_SECRET", "s3cret value"),
            ("WEBHOOK_BATCH_MAX", "0"),
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(
            err.to_string().contains("WEBHOOK_SECRET=<redacted>"),
            "{err}"
        );
    }

    #[test]
    fn dashboard_is_on_by_default_and_a_boolean() {
        assert!(config(&[]).unwrap().dashboard_enabled);
        assert!(
            !config(&[("DASHBOARD_ENABLED", "false")])
                .unwrap()
                .dashboard_enabled
        );
        let err = config(&[("DASHBOARD_ENABLED", "maybe")]).unwrap_err();
        assert_eq!(err.0.len(), 1);
        assert!(err.to_string().contains("DASHBOARD_ENABLED=maybe"), "{err}");
    }

    #[test]
    fn device_driver_and_fps() {
        let c = config(&[]).unwrap();
        assert_eq!(c.device_driver, DriverConfig::Simulated);
        assert_eq!(c.device_fps, 20);
        for (v, want) in [
            ("log", DriverConfig::Log),
            (
                "ddp://127.0.0.1",
                DriverConfig::Ddp {
                    host: "127.0.0.1".into(),
                    port: 4048,
                },
            ),
            (
                "ddp://wled-board.local:4049",
                DriverConfig::Ddp {
                    host: "wled-board.local".into(),
                    port: 4049,
                },
            ),
            (
                "ddp://[::1]:5000",
                DriverConfig::Ddp {
                    host: "::1".into(),
                    port: 5000,
                },
            ),
            (
                "e131://10.0.0.7",
                DriverConfig::E131 {
                    host: "10.0.0.7".into(),
                    port: 5568,
                    universe: 1,
                },
            ),
            (
                "e131://10.0.0.7:6000?universe=200",
                DriverConfig::E131 {
                    host: "10.0.0.7".into(),
                    port: 6000,
                    universe: 200,
                },
            ),
        ] {
            let c = config(&[("DEVICE_DRIVER", v)]).unwrap();
            assert_eq!(c.device_driver, want, "{v}");
            let again = config(&[("DEVICE_DRIVER", &c.device_driver.to_string())]).unwrap();
            assert_eq!(again.device_driver, want, "Display round-trips: {v}");
        }
        for (v, why) in [
            ("hardware", "expected simulated, log"),
            ("http://board", "unknown driver scheme `http`"),
            ("ddp://", "is not a host name"),
            ("ddp://bad_host", "is not a host name"),
            ("ddp://host:0", "port `0`"),
            ("ddp://host:70000", "port `70000`"),
            ("ddp://host/path", "only host[:port]"),
            ("ddp://host?universe=2", "ddp:// takes no options"),
            (
                "e131://host?universe=0",
                "universe `0` must be a number from 1 to 63987",
            ),
            ("e131://host?universe=63999", "universe `63999`"),
            ("e131://host?priority=5", "unknown option `priority=5`"),
            ("ddp://[::1", "closing ]"),
        ] {
            let err = config(&[("DEVICE_DRIVER", v)]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("DEVICE_DRIVER={v} is not valid")) && err.contains(why),
                "{v}: {err}"
            );
        }
        assert_eq!(config(&[("DEVICE_FPS", "60")]).unwrap().device_fps, 60);
        for bad in ["0", "61", "fast"] {
            let err = config(&[("DEVICE_FPS", bad)]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("DEVICE_FPS={bad} is not valid")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_frame_stream_is_never_a_history_topic() {
        let c = config(&[("HISTORY_TOPICS", "*")]).unwrap();
        assert!(c.history.covers("news") && c.history.covers("device"));
        assert!(!c.history.covers("device.frame"));
        let c = config(&[("HISTORY_TOPICS", "device.*")]).unwrap();
        assert!(!c.history.covers("device.frame"));
    }

    #[test]
    fn mock_events_are_validated() {
        let c = config(&[(
            "WEBSOCKET_MOCK_EVENTS",
            r#"[{"name":"a","interval":0,"data":{"x":1}},{"name":"b"}]"#,
        )])
        .unwrap();
        assert!(c.mock_events.iter().all(|e| e.interval.is_none()));
        assert_eq!(c.mock_events[0].data.get(), r#"{"x":1}"#);
        for bad in [
            r#"[{"name":"bad name"}]"#,
            r#"[{"name":"a"},{"name":"a"}]"#,
            r#"[{"name":"a","interval":-1}]"#,
            r#"[{"name":"a","interval":5}]"#,
            r#"[{"nam":"a"}]"#,
            r#"{"name":"a"}"#,
        ] {
            assert!(config(&[("WEBSOCKET_MOCK_EVENTS", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn deep_mock_event_data_stops_start_up() {
        let nested = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        let ok = format!(r#"[{{"name":"a","data":{}}}]"#, nested(64));
        assert!(config(&[("WEBSOCKET_MOCK_EVENTS", &ok)]).is_ok());
        for depth in [65, 5000] {
            let deep = format!(r#"[{{"name":"a","data":{}}}]"#, nested(depth));
            let err = config(&[("WEBSOCKET_MOCK_EVENTS", &deep)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("WEBSOCKET_MOCK_EVENTS="), "{err}");
            assert!(err.contains("nested too deeply"), "{err}");
        }
    }

    #[test]
    fn new_limits_are_validated() {
        let c = config(&[]).unwrap();
        assert_eq!(c.http_max_header_bytes, 16384);
        for (name, bad) in [
            ("HTTP_MAX_HEADER_BYTES", "100"),
            ("HTTP_MAX_HEADER_BYTES", "x"),
            ("AUTH_JWT_LEEWAY_MS", "-1"),
            ("AUTH_JWT_LEEWAY_MS", "600001"),
        ] {
            let err = config(&[(name, bad)]).unwrap_err().to_string();
            assert!(err.contains(&format!("{name}={bad} is not valid")), "{err}");
        }
        assert!(config(&[("AUTH_JWT_LEEWAY_MS", "1500")]).is_ok());
    }

    #[test]
    fn origins() {
        let c = config(&[(
            "CORS_ALLOWED_ORIGINS",
            "https://a.example, http://localhost:3000/",
        )])
        .unwrap();
        assert!(c.cors_allowed_origins.allows("https://a.example"));
        assert!(c.cors_allowed_origins.allows("http://localhost:3000"));
        assert!(!c.cors_allowed_origins.allows("https://evil.example"));
        assert!(config(&[("CORS_ALLOWED_ORIGINS", "a.example")]).is_err());
    }

    #[test]
    fn flags_override_env_and_env_file() {
        let dir = std::env::temp_dir().join(format!("sb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(".env.local");
        std::fs::write(&file, "PORT=7000\nWEBSOCKET_PATH=/live\nHOST=127.0.0.1\n").unwrap();
        let mut env = HashMap::new();
        env.insert("HOST".to_string(), "127.0.0.2".to_string());
        let args = ["--env-file", file.to_str().unwrap(), "--port", "9000"].map(String::from);
        let Command::Run(src) = parse_args(args, env).unwrap() else {
            panic!("expected run")
        };
        let c = Config::from_source(&src).unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.websocket_path, "/live");
        assert_eq!(c.host.to_string(), "127.0.0.2");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_flags_and_missing_env_file_are_errors() {
        let args = ["--nope", "1", "--env-file", "/nonexistent/.env"].map(String::from);
        let Err(err) = parse_args(args, HashMap::new()) else {
            panic!("expected errors")
        };
        assert_eq!(err.0.len(), 2);
        assert!(err.to_string().contains("--nope=1 is not valid"));
    }

    #[test]
    fn proxy_routes() {
        let c = config(&[(
            "WEBSOCKET_PROXY_ROUTES",
            "echo:ws://127.0.0.1:9000/feed, prices:wss://feed.example.com/v1?x=1",
        )])
        .unwrap();
        assert_eq!(c.proxy.routes.len(), 2);
        assert_eq!(c.proxy.routes[1].url, "wss://feed.example.com/v1?x=1");
        assert_eq!(c.proxy.forward_headers, vec!["Authorization", "Cookie"]);
        for bad in [
            "nocolon",
            "a:http://x",
            "a:ws://",
            "a:ws://host:99999/x",
            "bad name:ws://h",
            "a:ws://h,a:ws://g",
        ] {
            let err = config(&[("WEBSOCKET_PROXY_ROUTES", bad)]).unwrap_err();
            assert!(
                err.to_string().contains("WEBSOCKET_PROXY_ROUTES="),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn secrets_are_never_echoed_in_errors() {
        let err =
            config(&[("API_TOKEN", "has space"), ("AUTH_JWT_SECRET", "tab\there")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("API_TOKEN=<redacted> is not valid"), "{text}");
        assert!(
            !text.contains("has space") && !text.contains("there"),
            "{text}"
        );
        let c = config(&[("API_TOKEN", "short")]).unwrap();
        assert_eq!(c.warnings.len(), 1, "short tokens work, with a warning");
        assert!(!c.warnings[0].contains("short\""));
        let c = config(&[("ADMIN_TOKEN", "0123456789abcdef0123")]).unwrap();
        assert!(!format!("{c:?}").contains("0123456789abcdef0123"));
    }

    #[test]
    fn authenticated_clients_with_open_commands_are_warned_about() {
        let secret = ("AUTH_JWT_SECRET", "0123456789abcdef0123456789abcdef");
        let c = config(&[secret]).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].starts_with("API_TOKEN is not set")
                && c.warnings[0].contains("/api/subscribe"),
            "{}",
            c.warnings[0]
        );
        let hook = ("PROXY_CONNECT_URL", "http://127.0.0.1:9/connect");
        assert_eq!(config(&[hook]).unwrap().warnings.len(), 1);
        let token = ("API_TOKEN", "0123456789abcdef0123");
        assert!(config(&[secret, token]).unwrap().warnings.is_empty());
        assert!(
            config(&[]).unwrap().warnings.is_empty(),
            "open by design without client auth"
        );
    }

    proptest::proptest! {
        /// Any value of any setting is parsed or refused with an error that
        /// names it; nothing panics.
        #[test]
        fn config_parsing_never_panics(
            idx in 0..names::ALL.len(),
            value in ".{0,80}",
            idx2 in 0..names::ALL.len(),
            value2 in "[0-9a-z:/,*\\[\\]{}\" -]{0,40}",
        ) {
            let name = names::ALL[idx];
            let name2 = names::ALL[idx2];
            match config(&[(name, value.as_str()), (name2, value2.as_str())]) {
                Ok(_) => {}
                Err(e) => {
                    for err in &e.0 {
                        proptest::prop_assert!(names::ALL.contains(&err.name.as_str()), "{err}");
                    }
                }
            }
        }
    }

    #[test]
    fn redis_password_is_redacted() {
        assert_eq!(
            redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(
            redact_url("redis-sentinel://u:pw@h:1?sentinelServiceName=m&sentinelPassword=s3&x=1"),
            "redis-sentinel://u:***@h:1?sentinelServiceName=m&sentinelPassword=***&x=1"
        );
        let err = config(&[("REDIS_URL", "http://u:s3cret@h:1")]).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn hook_settings() {
        let c = config(&[]).unwrap();
        assert!(c.hooks.connect_url.is_none() && c.hooks.rpc_url.is_none());
        assert_eq!(c.hooks.timeout, Duration::from_millis(1000));
        assert!(c.hooks.subscribe_topics[0].matches("anything"));
        let c = config(&[
            ("PROXY_CONNECT_URL", "http://app:5000/sb/connect"),
            ("PROXY_SUBSCRIBE_TOPICS", "room.*, chat.*"),
            ("PROXY_HEADERS", "Cookie, X-Tenant"),
            ("PROXY_TIMEOUT_MS", "250"),
            ("PROXY_MAX_INFLIGHT", "10"),
        ])
        .unwrap();
        assert_eq!(
            c.hooks.connect_url.as_deref(),
            Some("http://app:5000/sb/connect")
        );
        assert_eq!(c.hooks.subscribe_topics.len(), 2);
        assert_eq!(c.hooks.headers, vec!["Cookie", "X-Tenant"]);
        assert_eq!(c.hooks.max_inflight, 10);
        for (name, bad) in [
            ("PROXY_CONNECT_URL", "ftp://x/y"),
            ("PROXY_RPC_URL", "not a url"),
            ("PROXY_PUBLISH_URL", "/relative"),
            ("PROXY_HEADERS", "Cookie,Bad Header"),
            ("PROXY_TIMEOUT_MS", "0"),
            ("PROXY_MAX_INFLIGHT", "0"),
            ("PROXY_SUBSCRIBE_TOPICS", "bad topic"),
        ] {
            let err = config(&[(name, bad)]).unwrap_err().to_string();
            assert!(err.contains(&format!("{name}={bad} is not valid")), "{err}");
        }
        let err = config(&[("PROXY_RPC_URL", "http://u:s3cret@h:1/x y")])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        // The hooks' signing key: never printed, short ones warned about.
        assert!(config(&[]).unwrap().hooks.secret.is_none());
        let c = config(&[("PROXY_SECRET", "0123456789abcdef")]).unwrap();
        assert_eq!(
            c.hooks.secret.as_ref().map(Secret::expose),
            Some("0123456789abcdef")
        );
        let err = config(&[("PROXY_SECRET", "s3cret value")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("PROXY_SECRET=<redacted>"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let c = config(&[("PROXY_SECRET", "short")]).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.starts_with("PROXY_SECRET is shorter")),
            "{:?}",
            c.warnings
        );
    }
}
