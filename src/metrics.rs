//! Metric names (the only place they are spelled), the recorder and `/metrics`.
//!
//! Labels only ever carry values from small fixed sets (transport, close
//! reason, route template, status code, command): never a topic or a client id.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "switchboard_connections";
pub const CONNECTIONS_OPENED: &str = "switchboard_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "switchboard_connections_closed_total";
pub const CLIENT_MESSAGES: &str = "switchboard_client_messages_total";
pub const DELIVERIES: &str = "switchboard_deliveries_total";
pub const SLOW_CONSUMER_DISCONNECTS: &str = "switchboard_slow_consumer_disconnects_total";
pub const SUBSCRIPTIONS: &str = "switchboard_subscriptions";
pub const TOPICS: &str = "switchboard_topics";
pub const BACKPLANE_PUBLISHES: &str = "switchboard_backplane_publishes_total";
pub const BACKPLANE_RECEIVED: &str = "switchboard_backplane_received_total";
pub const BACKPLANE_ERRORS: &str = "switchboard_backplane_errors_total";
pub const BACKPLANE_LAGGED: &str = "switchboard_backplane_lagged_messages_total";
/// Messages lost by one of the other Redis listeners (compat channels,
/// control and device commands, presence changes), by `listener`.
pub const LISTENER_LAGGED: &str = "switchboard_listener_lagged_messages_total";
/// Probes of the node's own subscriptions that did not come back in time.
pub const BACKPLANE_PROBE_FAILURES: &str = "switchboard_backplane_probe_failures_total";
pub const BACKPLANE_CONNECTED: &str = "switchboard_backplane_connected";
pub const INVALID_PUBLICATIONS: &str = "switchboard_invalid_publications_total";
pub const LEADER: &str = "switchboard_leader";
pub const LEADER_EPOCH: &str = "switchboard_leader_epoch";
pub const FANOUT_SECONDS: &str = "switchboard_fanout_seconds";
/// The CPU pressure the fan-out's pacers weigh their demand by.
pub const CPU_PRESSURE: &str = "switchboard_fanout_cpu_pressure";
pub const COMMAND_SECONDS: &str = "switchboard_command_seconds";
pub const HTTP_REQUESTS: &str = "switchboard_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "switchboard_http_request_duration_seconds";
pub const PROXY_CONNECTIONS: &str = "switchboard_proxy_connections";
/// Gaps this node filled from history (one per repair).
pub const HISTORY_REPAIRS: &str = "switchboard_history_repairs_total";
/// Publications delivered by those repairs.
pub const HISTORY_REPAIRED: &str = "switchboard_history_repaired_publications_total";
/// Holes history could not fill, announced to subscribers as `gap`.
pub const HISTORY_GAPS: &str = "switchboard_history_gaps_total";
/// Client recoveries on subscribe, by `result` (`recovered`, `unrecoverable`).
pub const HISTORY_RECOVERIES: &str = "switchboard_history_recoveries_total";
/// Socket.IO sockets that came back with a `pid` (connection state
/// recovery), by `result` ([`recovery`]).
pub const SOCKETIO_RECOVERIES: &str = "switchboard_socketio_recoveries_total";
/// Writes of Socket.IO session records that failed (Redis unreachable, or
/// the session taken over by a newer connection).
pub const SOCKETIO_RECOVERY_WRITE_ERRORS: &str = "switchboard_socketio_recovery_write_errors_total";
/// Webhook events, by `type` and `outcome` ([`webhook`]).
pub const WEBHOOK_EVENTS: &str = "switchboard_webhook_events_total";
/// Webhook events waiting in this node's queue (the batch in flight included).
pub const WEBHOOK_QUEUE: &str = "switchboard_webhook_queue";
/// Messages of the drop-in sources the leader consumed, by `source`
/// (`python-socketio`, `socketio-emitter`, `channels`) and `outcome`
/// (`published`, `applied`, `refused`, `malformed`, `invalid`, `failed`).
pub const COMPAT_MESSAGES: &str = "switchboard_compat_messages_total";
/// Control commands this node applied (`POST /api/subscribe` etc.), by `command`.
pub const CONTROL_COMMANDS: &str = "switchboard_control_commands_total";
/// Presence entries written or removed, by `change` (`join`, `leave`, `reaped`).
pub const PRESENCE_CHANGES: &str = "switchboard_presence_changes_total";
/// Presence store calls that failed (retried).
pub const PRESENCE_ERRORS: &str = "switchboard_presence_errors_total";
/// `presence_diff` frames queued to this node's watchers.
pub const PRESENCE_DIFFS: &str = "switchboard_presence_diffs_total";

/// Refusals by a limit (`MAX_CONNECTIONS_PER_ADDRESS`, …), label `limit`.
pub const LIMIT_REFUSALS: &str = "switchboard_limit_refusals_total";

/// `limit` label values of [`LIMIT_REFUSALS`].
pub mod limit {
    /// `MAX_CONNECTIONS`.
    pub const CONNECTIONS_PER_NODE: &str = "connections_per_node";
    /// `MAX_CONNECTIONS_PER_ADDRESS`.
    pub const CONNECTIONS_PER_ADDRESS: &str = "connections_per_address";
    /// `MAX_CONNECTIONS_PER_USER`.
    pub const CONNECTIONS_PER_USER: &str = "connections_per_user";
    /// `MAX_TOPICS_PER_NODE`.
    pub const TOPICS_PER_NODE: &str = "topics_per_node";
    /// `WEBSOCKET_SUBSCRIBE_RATE_LIMIT`.
    pub const SUBSCRIBE_RATE: &str = "subscribe_rate";
    /// `WEBSOCKET_MAX_SUBSCRIPTIONS`.
    pub const SUBSCRIPTIONS_PER_CONNECTION: &str = "subscriptions_per_connection";
    /// `WEBSOCKET_RATE_LIMIT` (the connection is closed, 1008).
    pub const MESSAGE_RATE: &str = "message_rate";
}

/// Label values of [`SOCKETIO_RECOVERIES`].
pub mod recovery {
    /// Same `pid`: every subscription back, every missed publication replayed.
    pub const RECOVERED: &str = "recovered";
    /// The session's subscriptions are back, but some topic lost
    /// publications (a `gap` event each) or is no longer allowed: new `pid`.
    pub const GAP: &str = "gap";
    /// No record for the `pid` (expired, unknown, another user): a new session.
    pub const EXPIRED: &str = "expired";
}

/// Label values of the webhook metrics.
pub mod webhook {
    /// Delivered: the receiver answered 2xx.
    pub const SENT: &str = "sent";
    /// Retried for `WEBHOOK_RETRY_MS` without a 2xx, then dropped.
    pub const EXPIRED: &str = "expired";
    /// Not queued: the queue held `WEBHOOK_QUEUE_SIZE` events.
    pub const OVERFLOW: &str = "overflow";
    /// Not sent: the node stopped with the event still queued.
    pub const ABANDONED: &str = "abandoned";
}

/// Frames the leader's driver put on the wire, by `driver`.
pub const DRIVER_FRAMES: &str = "switchboard_driver_frames_total";
/// Frames the leader's driver could not send, by `driver`.
pub const DRIVER_ERRORS: &str = "switchboard_driver_errors_total";
/// 1 while this node leads and its driver fails to send frames.
pub const DRIVER_FAILING: &str = "switchboard_driver_failing";
/// Frames published on the live stream (`device.frame`).
pub const DEVICE_FRAMES_PUBLISHED: &str = "switchboard_device_frames_published_total";
/// Stream frames replaced by a newer one before they could be published.
pub const DEVICE_FRAMES_SKIPPED: &str = "switchboard_device_frames_skipped_total";

/// Calls to the application back end's hooks, by `hook` and `outcome`.
pub const PROXY_REQUESTS: &str = "switchboard_proxy_requests_total";
/// Time from sending a hook call to having its answer (or giving up), by `hook`.
pub const PROXY_DURATION: &str = "switchboard_proxy_duration_seconds";

/// `hook` label values of [`PROXY_REQUESTS`] and [`PROXY_DURATION`].
pub mod hook {
    pub const CONNECT: &str = "connect";
    pub const SUBSCRIBE: &str = "subscribe";
    pub const PUBLISH: &str = "publish";
    pub const RPC: &str = "rpc";
}

/// `outcome` label values of [`PROXY_REQUESTS`].
pub mod hook_outcome {
    /// The back end answered `result`.
    pub const OK: &str = "ok";
    /// The back end answered `error`.
    pub const ERROR: &str = "error";
    /// The back end answered `disconnect`.
    pub const DISCONNECT: &str = "disconnect";
    /// No answer within `PROXY_TIMEOUT_MS`.
    pub const TIMEOUT: &str = "timeout";
    /// The back end could not be reached (connection refused, DNS, TLS).
    pub const UNREACHABLE: &str = "unreachable";
    /// A status other than 2xx.
    pub const BAD_STATUS: &str = "bad_status";
    /// Not JSON, or not one of `result`/`error`/`disconnect`.
    pub const BAD_ANSWER: &str = "bad_answer";
    /// Refused before sending: `PROXY_MAX_INFLIGHT` calls already in flight.
    pub const OVERLOADED: &str = "overloaded";
}

/// Transport label values.
pub mod transport {
    pub const WS: &str = "ws";
    pub const SOCKETIO: &str = "socketio";
    pub const PROXY: &str = "proxy";
    pub const SSE: &str = "sse";
}

/// Close-reason label values (`reason` on [`super::CONNECTIONS_CLOSED`]).
pub mod reason {
    pub const CLIENT: &str = "client";
    pub const SHUTDOWN: &str = "shutdown";
    pub const SLOW_CONSUMER: &str = "slow_consumer";
    pub const HEARTBEAT: &str = "heartbeat_timeout";
    pub const TOO_BIG: &str = "message_too_big";
    pub const POLICY: &str = "policy";
    pub const TOKEN_EXPIRED: &str = "token_expired";
    /// Closed by the server for a reason not listed here.
    pub const SERVER: &str = "server";
    /// Closed by the back end (`POST /api/disconnect`).
    pub const BACKEND: &str = "backend";
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Installs the global recorder. Call once per process; later calls fail.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Spawns the periodic upkeep the exporter needs (it drains histogram
/// buffers); `install_recorder` does not start it.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(CONNECTIONS, "Open client connections, by transport.");
    describe_counter!(
        LIMIT_REFUSALS,
        "Connections, subscriptions and subscribes refused by a limit, and connections closed by the message rate limit, by limit."
    );
    describe_counter!(
        CONNECTIONS_OPENED,
        "Client connections accepted, by transport."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Client connections closed, by transport and reason."
    );
    describe_counter!(
        CLIENT_MESSAGES,
        "Messages received from clients, by transport and type."
    );
    describe_counter!(
        DELIVERIES,
        "Publications queued to client connections, by transport."
    );
    describe_counter!(
        SLOW_CONSUMER_DISCONNECTS,
        "Connections closed because their queue was full."
    );
    describe_gauge!(SUBSCRIPTIONS, "Local subscriptions (connection x topic).");
    describe_counter!(
        SOCKETIO_RECOVERIES,
        "Socket.IO sockets that came back with a pid, by result."
    );
    describe_counter!(
        SOCKETIO_RECOVERY_WRITE_ERRORS,
        "Socket.IO session record writes that failed."
    );
    describe_gauge!(TOPICS, "Topics with at least one local subscriber.");
    describe_counter!(BACKPLANE_PUBLISHES, "Publications sent to the backplane.");
    describe_counter!(
        BACKPLANE_RECEIVED,
        "Publications received from the backplane."
    );
    describe_counter!(
        BACKPLANE_ERRORS,
        "Failed backplane operations, by operation."
    );
    describe_counter!(
        BACKPLANE_LAGGED,
        "Backplane messages lost because the receiver lagged."
    );
    describe_counter!(
        LISTENER_LAGGED,
        "Messages of the other Redis listeners lost because the receiver lagged, by listener."
    );
    describe_gauge!(
        BACKPLANE_CONNECTED,
        "1 while the backplane subscriber connection is up."
    );
    describe_counter!(
        INVALID_PUBLICATIONS,
        "Publisher payloads rejected as invalid."
    );
    describe_gauge!(LEADER, "1 while this node holds the leader lease.");
    describe_gauge!(
        LEADER_EPOCH,
        "Fencing epoch of this node's current or last lease."
    );
    describe_histogram!(
        FANOUT_SECONDS,
        "Backplane receive to queued on every local subscriber."
    );
    describe_gauge!(
        CPU_PRESSURE,
        "Share of time runnable threads waited for a CPU (PSI), as the fan-out batches by it."
    );
    describe_histogram!(
        COMMAND_SECONDS,
        "Device command latency, by command and outcome."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests, by matched route, method and status."
    );
    describe_histogram!(
        HTTP_REQUEST_SECONDS,
        "HTTP request latency, by matched route."
    );
    describe_gauge!(PROXY_CONNECTIONS, "Open proxied WebSocket connections.");
    describe_counter!(
        BACKPLANE_PROBE_FAILURES,
        "Self-probes of a backplane subscription that did not come back in time (a deaf subscription, resubscribed)."
    );
    describe_counter!(
        HISTORY_REPAIRS,
        "Gaps in a history topic this node filled from history before delivering on."
    );
    describe_counter!(
        HISTORY_REPAIRED,
        "Publications delivered by gap repairs from history."
    );
    describe_counter!(
        HISTORY_GAPS,
        "Holes history could not fill, announced to subscribers as gap."
    );
    describe_counter!(
        PROXY_REQUESTS,
        "Calls to the application back end's hooks, by hook and outcome."
    );
    describe_histogram!(
        PROXY_DURATION,
        "Duration of calls to the application back end's hooks, by hook."
    );
    describe_counter!(
        WEBHOOK_EVENTS,
        "Webhook events, by type and outcome (sent, expired, overflow, abandoned)."
    );
    describe_gauge!(
        WEBHOOK_QUEUE,
        "Webhook events waiting to be sent by this node."
    );
    describe_counter!(
        CONTROL_COMMANDS,
        "Control API commands applied by this node, by command."
    );
    describe_counter!(
        COMPAT_MESSAGES,
        "Messages of python-socketio, @socket.io/redis-emitter and Channels publishers consumed by the leader, by source and outcome."
    );
    describe_counter!(
        HISTORY_RECOVERIES,
        "Client recoveries on subscribe with since, by result."
    );
    describe_counter!(
        DRIVER_FRAMES,
        "Frames the leader's device driver put on the wire, by driver."
    );
    describe_counter!(
        DRIVER_ERRORS,
        "Frames the leader's device driver could not send, by driver."
    );
    describe_gauge!(
        DRIVER_FAILING,
        "1 while this node leads and its device driver fails to send frames."
    );
    describe_counter!(
        DEVICE_FRAMES_PUBLISHED,
        "Frames the leader published on the live stream (topic device.frame)."
    );
    describe_counter!(
        DEVICE_FRAMES_SKIPPED,
        "Live-stream frames replaced by a newer frame before the backplane took them."
    );
    describe_counter!(
        PRESENCE_CHANGES,
        "Presence entries this node wrote or removed, by change (join, leave, reaped: a dead node's)."
    );
    describe_counter!(
        PRESENCE_ERRORS,
        "Presence store calls that failed (retried after a pause)."
    );
    describe_counter!(
        PRESENCE_DIFFS,
        "presence_diff frames queued to this node's watchers."
    );
}
