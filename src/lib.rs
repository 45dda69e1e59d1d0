//! Switchboard: a horizontally scaled realtime broadcast service.
//!
//! # Layout
//! - [`auth`]: client tokens (JWT), topic permissions, endpoint tokens.
//! - [`backend`]: the application back end: connect, subscribe, publish and RPC hooks over HTTP; signed webhooks.
//! - [`clients`]: this node's open connections by client id and user; handles that act on them.
//! - [`compat`]: drop-in ingest of python-socketio, `@socket.io/redis-emitter` and Django Channels emits (leader-consumed, one publication each).
//! - [`control`]: commands for connections on any node (control API); occupancy and dead nodes for webhooks.
//! - [`config`]: every setting (env vars, flags, env file) and its validation.
//! - [`protocol`]: wire types of the native JSON protocol and the publisher envelope.
//! - [`hub`]: topic → local subscribers; the one fan-out of a node, in history order with gap repair.
//! - [`history`]: per-topic offsets and epochs, the atomic append-and-publish, range reads (`memory`, `redis`).
//! - [`backplane`]: publish/subscribe between nodes (`memory`, `redis`).
//! - [`election`]: who leads, with which fencing epoch (`memory`, `redis`), and the fence every act on the device wire passes.
//! - [`leader`]: duties that run only on the leader (device driver, carousel, mock-event timers).
//! - [`device`]: LED board state, command validation, rendering, the live frame stream, drivers (DDP, E1.31), fenced persistence, command forwarding.
//! - [`gateway`]: client transports into the hub (native WebSocket, Socket.IO, Server-Sent Events).
//! - [`proxy`]: `WEBSOCKET_PATH/proxy/{name}` to configured upstream feeds.
//! - [`api`]: HTTP endpoints and the error format.
//! - [`dashboard`]: the live dashboard page at `/` (assets compiled in) and `GET /api/frame`.
//! - [`limits`]: connections per client address and per user, refusals of every limit (metric, rate-limited log).
//! - [`lingering`]: closing accepted connections without a TCP reset (drain until the peer's EOF).
//! - [`metrics`]: metric names, recorder, `/metrics`.
//! - [`registry`]: every live node's announcement, for cluster-wide stats.
//! - [`redis`]: building fred clients; key and channel names.
//! - [`node`]: one node's handles wired together, and its drain.
//! - [`presence`]: who is on a `PRESENCE_TOPICS` topic, cluster-wide (`memory`, `redis`); batched `presence_diff`; dead nodes' entries reaped.

pub mod api;
pub mod auth;
pub mod backend;
pub mod backplane;
pub mod clients;
pub mod compat;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod device;
pub mod election;
pub mod gateway;
pub mod history;
pub mod hub;
pub mod leader;
pub mod limits;
pub mod lingering;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod protocol;
pub mod proxy;
pub mod redis;
pub mod registry;
pub mod waiters;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::timeout::TimeoutLayer;

pub use config::Config;
pub use node::Node;

/// The public router: API, WebSocket endpoints and, unless `ADMIN_PORT` is
/// set, the admin endpoints and `/metrics`.
pub fn app(node: Node) -> Router {
    let config = node.config().clone();
    let open = Router::new()
        .route("/api/health", get(api::health))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/api/state", get(api::state))
        .route("/api/apps", get(api::apps))
        .route("/api/frame", get(dashboard::frame))
        .route("/api/history/{*topic}", get(api::history))
        .route("/api/presence/{*topic}", get(api::presence));
    // Commands and publishing: `API_TOKEN` when configured.
    let commands = Router::new()
        .route("/api/publish", post(api::publish))
        .route("/api/switch", post(api::switch))
        .route("/api/config", post(api::config))
        .route("/api/carousel", post(api::carousel))
        .route("/api/settings", post(api::settings))
        .route("/api/subscribe", post(api::control_subscribe))
        .route("/api/unsubscribe", post(api::control_unsubscribe))
        .route("/api/disconnect", post(api::control_disconnect))
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            api::require_api_token,
        ));
    // SSE streams' own commands: authenticated like the stream, from any node.
    let sse_commands = Router::new()
        .route(
            "/api/sse/{session}/subscribe",
            post(gateway::sse::subscribe),
        )
        .route(
            "/api/sse/{session}/unsubscribe",
            post(gateway::sse::unsubscribe),
        )
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            gateway::check_origin,
        ));
    let mut router = open.merge(commands).merge(sse_commands);
    if config.dashboard_enabled {
        router = router.merge(dashboard::routes());
    }
    if config.admin_port.is_none() {
        router = router.merge(admin_routes(&node));
    }
    // Plain HTTP only: WebSocket and Socket.IO long-polls stay open by design.
    let mut router = router.layer(TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        config.http_request_timeout,
    ));
    if config.websocket_enabled {
        let path = &config.websocket_path;
        let ws = Router::new()
            .route(path, get(gateway::ws::upgrade))
            .route(
                &format!("{path}/{{*topic}}"),
                get(gateway::ws::upgrade_topic),
            )
            .route_layer(middleware::from_fn_with_state(
                node.clone(),
                gateway::check_origin,
            ));
        router = router.merge(ws);
    }
    // Server-Sent Events: long-lived responses, so outside the timeout.
    let sse = Router::new()
        .route("/sse", get(gateway::sse::open))
        .route("/sse/{*topic}", get(gateway::sse::open_topic))
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            gateway::check_origin,
        ));
    router = router.merge(sse);
    let mut router = router
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(config.http_body_limit));
    if config.socketio_enabled {
        router = router.layer(middleware::from_fn_with_state(
            node.clone(),
            gateway::socketio_guard,
        ));
    }
    router
        .layer(cors(&config))
        .layer(middleware::from_fn(track_http))
        .with_state(node)
}

/// The admin router served on `ADMIN_PORT` when it is set.
pub fn admin_app(node: Node) -> Router {
    let timeout = node.config().http_request_timeout;
    admin_routes(&node)
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(middleware::from_fn(track_http))
        .with_state(node)
}

/// `/metrics` stays open (keep it internal with `ADMIN_PORT`); `/admin/*`
/// takes `ADMIN_TOKEN` when configured.
fn admin_routes(node: &Node) -> Router<Node> {
    let admin = Router::new()
        .route("/admin/events/{name}", post(api::trigger_event))
        .route("/admin/websocket/stats", get(api::stats))
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            api::require_admin_token,
        ));
    Router::new()
        .route("/metrics", get(api::metrics))
        .merge(admin)
}

/// Serves `router` on `listener` until `stop`, dropping clients that do not
/// finish sending request headers (a WebSocket handshake included) within
/// `handshake_timeout`: slow or half-open handshakes cannot pile up. A
/// request line plus headers over `max_header_bytes` is answered 431 by
/// hyper. Every connection closes with a [`lingering`] drain, and `serve`
/// returns only when those drains are over.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    handshake_timeout: std::time::Duration,
    max_header_bytes: usize,
    stop: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(max_header_bytes.max(8192));
    builder
        .http2()
        .max_header_list_size(max_header_bytes.try_into().unwrap_or(u32::MAX));
    let lingering = tokio_util::task::TaskTracker::new();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not die.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn({
            let router = router.clone();
            move |req: hyper::Request<hyper::body::Incoming>| {
                let router = router.clone();
                async move {
                    use tower::ServiceExt;
                    let mut req = req.map(axum::body::Body::new);
                    // The client's address, for the connect hook's `remoteAddr`.
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    router.oneshot(req).await
                }
            }
        });
        let (builder, watcher, lingering, router) = (
            builder.clone(),
            graceful.watcher(),
            lingering.clone(),
            router.clone(),
        );
        tokio::spawn(async move {
            // Server-Sent Events streams are served without hyper's
            // per-connection buffers (`gateway::sse_conn`).
            if gateway::sse_conn::wants(&stream, handshake_timeout).await {
                let io = lingering::Lingering::new(stream, lingering);
                gateway::sse_conn::serve(io, peer, router, handshake_timeout, max_header_bytes)
                    .await;
                return;
            }
            let conn = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(lingering::Lingering::new(stream, lingering)),
                    service,
                )
                .into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    graceful.shutdown().await;
    lingering.close();
    lingering.wait().await;
}

fn cors(config: &Config) -> CorsLayer {
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    match &config.cors_allowed_origins {
        config::Origins::Any => layer.allow_origin(Any),
        config::Origins::List(list) => layer.allow_origin(AllowOrigin::list(
            list.iter().filter_map(|o| o.parse().ok()),
        )),
    }
}

/// Counts HTTP requests by matched route (never the raw path: unbounded).
async fn track_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // A fixed set: a client-chosen method string must not make a new series.
    let method = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::OPTIONS => "OPTIONS",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::PATCH => "PATCH",
        _ => "other",
    };
    let start = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    ::metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    ::metrics::histogram!(crate::metrics::HTTP_REQUEST_SECONDS, "route" => route)
        .record(start.elapsed().as_secs_f64());
    res
}
