//! `WEBSOCKET_PATH/proxy/{name}`: pumps frames between a browser and one of
//! the configured upstream WebSocket feeds, so pages reach them through one
//! origin with our Origin rule and limits.
//!
//! Only upstreams named in `WEBSOCKET_PROXY_ROUTES` are reachable: there is
//! no way to name a URL from the client (no open proxy). The upstream is
//! connected *before* the client's upgrade is accepted, so an unknown route
//! is a 404 and an unreachable or slow upstream is a 502 or 504 — a client
//! never sees `proxy_connected` for a feed that is not there.
//!
//! A proxied connection takes the same per-address and per-user seats as a
//! native one: a limit that one endpoint of the port skipped would not
//! bound what one address or user can hold open. It also ends when its
//! token expires (close 3000), like a native one; frames pass through
//! unread, so there is no `refresh`: the client reconnects with a new token.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{self, CloseFrame, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, protocol::WebSocketConfig};

use crate::api::ApiError;
use crate::backend::hooks::transport;
use crate::config::ProxyRoute;
use crate::gateway::admission::{self, Seats};
use crate::gateway::outbox::close;
use crate::metrics as m;
use crate::node::Node;
use crate::protocol;

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `GET WEBSOCKET_PATH/proxy/{name}` (routed by the topic-path handler).
pub async fn upgrade(
    node: Node,
    name: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    remote: Option<SocketAddr>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let config = node.config().clone();
    if !config.proxy.enabled {
        return ApiError::NotFound("the WebSocket proxy is not enabled".into()).into_response();
    }
    let Some(route) = config.proxy.routes.iter().find(|r| r.name == name).cloned() else {
        return ApiError::NotFound(format!(
            "no proxy route named \"{}\"",
            name.chars().take(64).collect::<String>()
        ))
        .into_response();
    };
    // Not an upgrade: refused before the connect hook is asked.
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let id = rand::random::<u64>();
    let client = format!("{id:016x}");
    let (seats, expires_in) = match admit(&node, &route.name, headers, query, remote, &client).await
    {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let upstream = match connect(&route, headers, &config.proxy.forward_headers, &node).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let max = config.max_payload;
    let guard = node.sessions().token();
    ws.read_buffer_size(admission::READ_BUFFER)
        .write_buffer_size(4 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            pump(node, socket, upstream, route, id, expires_in).await;
            drop(guard);
            drop(seats);
        })
}

/// The drain and connection limit, the address's seat, who the client is,
/// then the user's seat: all before the upstream is dialled. Who the client
/// is is decided as on `/ws`: its token, or without one the connect hook
/// (told `transport: "proxy"` and the route) when `PROXY_CONNECT_URL` is
/// set, so a deployment that admits clients through its back end does not
/// leave the proxy open. Public topics admit no one here (upstream feeds are
/// not topics). With the seats, the time the identity has left (`exp` or
/// the hook's `expiresAt`, + leeway; `None`: never).
async fn admit(
    node: &Node,
    route: &str,
    headers: &HeaderMap,
    query: Option<&str>,
    remote: Option<SocketAddr>,
    client: &str,
) -> Result<(Seats, Option<Duration>), ApiError> {
    let mut seats = Seats::admit(node, remote, headers)?;
    let origin = admission::Origin {
        client,
        transport: transport::PROXY,
        remote,
        route: Some(route),
    };
    let identity = admission::identify_request(node, headers, query, origin).await?;
    if identity.anonymous() {
        return Err(ApiError::Unauthorized(
            "the proxy needs a client token".into(),
        ));
    }
    seats.user(node, &identity)?;
    Ok((seats, identity.time_left()))
}

async fn connect(
    route: &ProxyRoute,
    headers: &HeaderMap,
    forward: &[String],
    node: &Node,
) -> Result<Upstream, ApiError> {
    let mut request = route
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ApiError::Internal(format!("proxy route {}: {e}", route.name)))?;
    for name in forward {
        for value in headers.get_all(name.as_str()) {
            if let Ok(header) = tungstenite::http::HeaderName::from_bytes(name.as_bytes()) {
                request.headers_mut().append(header, value.clone());
            }
        }
    }
    let max = node.config().max_payload;
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let timeout = node.config().proxy.connect_timeout;
    match tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true),
    )
    .await
    {
        Ok(Ok((upstream, _))) => Ok(upstream),
        Ok(Err(e)) => {
            tracing::warn!(route = %route.name, cause = %e, "proxy upstream unreachable");
            Err(ApiError::BadGateway(format!(
                "upstream of proxy route \"{}\" is unreachable",
                route.name
            )))
        }
        Err(_) => Err(ApiError::GatewayTimeout(format!(
            "upstream of proxy route \"{}\" did not answer within {} ms",
            route.name,
            timeout.as_millis()
        ))),
    }
}

/// Counts an open proxied connection for as long as it lives.
struct Counted(Node);

impl Counted {
    fn new(node: Node) -> Self {
        node.proxy_counter().fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::PROXY_CONNECTIONS).increment(1.0);
        metrics::counter!(m::CONNECTIONS_OPENED, "transport" => m::transport::PROXY).increment(1);
        Counted(node)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.proxy_counter().fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::PROXY_CONNECTIONS).decrement(1.0);
        metrics::counter!(m::CONNECTIONS_CLOSED, "transport" => m::transport::PROXY, "reason" => m::reason::CLIENT)
            .increment(1);
    }
}

/// Close codes the proxy sends to the client itself.
const HEARTBEAT_TIMEOUT: u16 = 1011;

async fn pump(
    node: Node,
    client: WebSocket,
    upstream: Upstream,
    route: ProxyRoute,
    id: u64,
    expires_in: Option<Duration>,
) {
    let _counted = Counted::new(node.clone());
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = upstream.split();
    let client_id = format!("{id:016x}");
    let hello = serde_json::json!({
        "type": "proxy_connected",
        "clientId": client_id,
        "routeName": route.name,
        "timestamp": protocol::timestamp(),
    });
    if client_tx
        .send(ws::Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    let config = node.config().clone();
    let heartbeat = config.heartbeat_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The client leg's last frame of any kind (a Pong included).
    let mut last_seen = tokio::time::Instant::now();
    let shutdown = node.shutdown_token();
    let shutdown_started = shutdown.cancelled();
    // Armed on shutdown at this connection's point of the drain window, as
    // for native connections, so that clients do not reconnect in one burst.
    let close_at = tokio::time::sleep(Duration::from_secs(86_400 * 365));
    let expiry = tokio::time::sleep(expires_in.unwrap_or(Duration::from_secs(86_400 * 365)));
    tokio::pin!(shutdown_started, close_at, expiry);
    let mut draining = false;
    // What the client is told when the proxy itself ends the connection;
    // `None` when the close came from one of the legs.
    let mut closing: Option<(u16, &'static str)> = None;
    // What the upstream is told when the proxy or the client ends the
    // connection (the client's own Close, passed on); the default is for a
    // close of the proxy's making.
    let mut upstream_close = Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Away,
        reason: "client leg closed".into(),
    });
    let mut upstream_closed = false;
    loop {
        tokio::select! {
            msg = client_rx.next() => {
                last_seen = tokio::time::Instant::now();
                match msg {
                    Some(Ok(ws::Message::Text(t))) => {
                        if !sent(up_tx.send(tungstenite::Message::Text(t.as_str().into()))).await { break; }
                    }
                    Some(Ok(ws::Message::Binary(b))) => {
                        if !sent(up_tx.send(tungstenite::Message::Binary(b))).await { break; }
                    }
                    Some(Ok(ws::Message::Ping(_) | ws::Message::Pong(_))) => {}
                    // The client's close is answered first (below), then
                    // passed on to the upstream with its code.
                    Some(Ok(ws::Message::Close(frame))) => {
                        upstream_close = frame.map(|f| tungstenite::protocol::CloseFrame {
                            code: f.code.into(),
                            reason: f.reason.as_str().into(),
                        });
                        break;
                    }
                    Some(Err(_)) | None => {
                        upstream_close = None;
                        break;
                    }
                }
            },
            msg = up_rx.next() => match msg {
                Some(Ok(tungstenite::Message::Text(t))) => {
                    if !sent(client_tx.send(ws::Message::Text(t.as_str().into()))).await { break; }
                }
                Some(Ok(tungstenite::Message::Binary(b))) => {
                    if !sent(client_tx.send(ws::Message::Binary(b))).await { break; }
                }
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    // The upstream's own close, forwarded as it came.
                    let frame = frame.map(|f| CloseFrame {
                        code: f.code.into(),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = sent(client_tx.send(ws::Message::Close(frame))).await;
                    upstream_closed = true;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(route = %route.name, cause = %e, "proxy upstream failed");
                    closing = Some((1011, "upstream failed"));
                    break;
                }
                None => {
                    closing = Some((1011, "upstream closed the connection"));
                    break;
                }
            },
            _ = ping.tick() => {
                // Two silent intervals: the client is gone (the native rule).
                if last_seen.elapsed() > 2 * heartbeat {
                    closing = Some((HEARTBEAT_TIMEOUT, "heartbeat timeout"));
                    break;
                }
                // Keeps both legs alive through idle timeouts of load balancers.
                let a = sent(client_tx.send(ws::Message::Ping(Default::default()))).await;
                let b = sent(up_tx.send(tungstenite::Message::Ping(Default::default()))).await;
                if !a || !b { break; }
            }
            _ = &mut shutdown_started, if !draining => {
                draining = true;
                let window = config.shutdown_drain.as_millis() as u64;
                let offset = if window == 0 { 0 } else { id % window };
                close_at.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(offset));
            }
            _ = &mut close_at => {
                closing = Some((config.shutdown_close_code, "server shutting down"));
                break;
            }
            _ = &mut expiry, if expires_in.is_some() => {
                closing = Some((close::TOKEN_EXPIRED, "token expired"));
                break;
            }
        }
    }
    // The client leg first: our Close when the proxy ends the connection,
    // then a flush, which also sends tungstenite's answer to a Close the
    // client started (its code echoed). A send after the client's Close is
    // refused by tungstenite, so only the flush can answer it. The client
    // leg drains itself when dropped (`lingering`).
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if let Some((code, reason)) = closing {
            let _ = client_tx
                .send(ws::Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })))
                .await;
        }
        let _ = client_tx.close().await;
    })
    .await;
    // Then the upstream: the client's Close (or ours), a flush, and a
    // bounded wait for its answer: a WebSocket client lets the server close
    // the TCP connection first.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if !upstream_closed {
            let _ = up_tx
                .send(tungstenite::Message::Close(upstream_close))
                .await;
        }
        let _ = up_tx.close().await;
        while let Some(Ok(_)) = up_rx.next().await {}
    })
    .await;
}

/// A write to either leg, bounded by `WRITE_TIMEOUT`: a peer that stops
/// reading must not stall the loop, whose heartbeat, token expiry and drain
/// would then never run (and the seats and upstream be held for good).
async fn sent<E>(send: impl Future<Output = Result<(), E>>) -> bool {
    matches!(
        tokio::time::timeout(crate::gateway::outbox::WRITE_TIMEOUT, send).await,
        Ok(Ok(()))
    )
}
