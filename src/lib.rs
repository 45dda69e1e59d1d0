//! Switchboard: a horizontally scaled realtime broadcast service.
//!
//! # Layout
//! - [`config`]: every setting (env vars, flags, env file) and its validation.
//! - [`protocol`]: wire types of the native JSON protocol and the publisher envelope.
//! - [`hub`]: topic → local subscribers; the one fan-out of a node.
//! - [`backplane`]: publish/subscribe between nodes (`memory`, `redis`).
//! - [`election`]: who leads, with which fencing epoch (`memory`, `redis`).
//! - [`leader`]: duties that run only on the leader (device driver, carousel, mock-event timers).
//! - [`device`]: LED board state, command validation, drivers, fenced persistence, command forwarding.
//! - [`gateway`]: client transports into the hub (native WebSocket, Socket.IO).
//! - [`proxy`]: `WEBSOCKET_PATH/proxy/{name}` to configured upstream feeds.
//! - [`api`]: HTTP endpoints and the error format.
//! - [`metrics`]: metric names, recorder, `/metrics`.
//! - [`registry`]: every live node's announcement, for cluster-wide stats.
//! - [`redis`]: building fred clients; key and channel names.
//! - [`node`]: one node's handles wired together, and its drain.

pub mod api;
pub mod backplane;
pub mod config;
pub mod device;
pub mod election;
pub mod gateway;
pub mod hub;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod proxy;
pub mod redis;
pub mod registry;

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

pub use config::Config;
pub use node::Node;

/// The public router: API, WebSocket endpoints and, unless `ADMIN_PORT` is
/// set, the admin endpoints and `/metrics`.
pub fn app(node: Node) -> Router {
    let config = node.config().clone();
    let mut router = Router::new()
        .route("/api/health", get(api::health))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/api/publish", post(api::publish))
        .route("/api/switch", post(api::switch))
        .route("/api/config", post(api::config))
        .route("/api/carousel", post(api::carousel))
        .route("/api/settings", post(api::settings))
        .route("/api/state", get(api::state))
        .route("/api/apps", get(api::apps))
        .layer(axum::extract::DefaultBodyLimit::max(config.max_payload));
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
    if config.admin_port.is_none() {
        router = router.merge(admin_routes());
    }
    let mut router = router.fallback(api::not_found);
    if config.socketio_enabled {
        let (layer, io) = gateway::socketio::layer(&node);
        node.set_socketio(io);
        router = router.layer(layer).layer(middleware::from_fn_with_state(
            node.clone(),
            gateway::check_socketio_origin,
        ));
    }
    router
        .layer(cors(&config))
        .layer(middleware::from_fn(track_http))
        .with_state(node)
}

/// The admin router served on `ADMIN_PORT` when it is set.
pub fn admin_app(node: Node) -> Router {
    admin_routes()
        .fallback(api::not_found)
        .layer(middleware::from_fn(track_http))
        .with_state(node)
}

fn admin_routes() -> Router<Node> {
    Router::new()
        .route("/metrics", get(api::metrics))
        .route("/admin/events/{name}", post(api::trigger_event))
        .route("/admin/websocket/stats", get(api::stats))
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
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    ::metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    ::metrics::histogram!(crate::metrics::HTTP_REQUEST_SECONDS, "route" => route)
        .record(start.elapsed().as_secs_f64());
    res
}
