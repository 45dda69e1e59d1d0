//! `peer-socketioxide`: what Switchboard's Socket.IO gateway is compared
//! with in `scripts/bench` — plain socketioxide 0.18 with the
//! `socketioxide-redis` adapter (fred driver), as a socketioxide user would
//! build the same service.
//!
//! - Socket.IO (EIO=4) at `/socket.io/` on `HOST:PORT` (`PORT=0`: any free
//!   port; the bound address is printed as `listening on http://ADDR` once
//!   everything is in place, and `GET /readyz` answers 200).
//! - A socket's `subscribe` event (`421["subscribe","topic"]`) joins the
//!   room named by the topic and is acknowledged with `{"ok":true,"topic":…}`,
//!   like Switchboard does.
//! - With `PEER_INGEST=1` the instance subscribes to the publisher channels
//!   of the Switchboard contract (`PSUBSCRIBE {REDIS_PREFIX}:t:*`, envelope
//!   `{"event":…,"data":…}`) and broadcasts each publication with
//!   `io.to(topic).emit(event, data)`: the Redis adapter delivers it to the
//!   local sockets and, through Redis (`SPUBLISH`), to every other instance.
//!   Exactly one instance of a deployment ingests; with two ingesting
//!   instances every publication would be delivered twice.
//! - With `PEER_INGEST=local` every instance subscribes to the publisher
//!   channels and broadcasts each publication to its own sockets only
//!   (`io.local().to(topic).emit(…)`): the shape Switchboard has (each node
//!   takes every publication from Redis and delivers locally), without the
//!   adapter's hop. Every instance of a deployment runs it this way.
//! - With `PEER_NODELAY=1` every accepted connection gets `TCP_NODELAY`, as
//!   Switchboard's do. By default the peer keeps `axum::serve`'s sockets
//!   as they come (Nagle's algorithm on), as a socketioxide user's server
//!   has them: its small writes then wait in the kernel for the client's
//!   ACK, and their transmission is done by the client's ACK processing
//!   (docs/benchmarks.md, "The peer and Nagle's algorithm").
//!
//! Buffers are raised so that nothing is dropped under the benchmark's
//! bursts: the adapter's `stream_buffer` and engine.io's `max_buffer_size`
//! are [`BUFFER`], and both fred clients' pub/sub broadcast channels too.
//! Everything else keeps socketioxide's defaults.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::RespVersion;
use serde::Deserialize;
use serde_json::value::RawValue;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::handler::ConnectHandler;
use socketioxide_redis::{FredAdapter, RedisAdapterConfig, RedisAdapterCtr};

/// Queue sizes (adapter stream, engine.io per-socket buffer, fred pub/sub
/// channels).
const BUFFER: usize = 65_536;

/// The publisher envelope of the Switchboard contract.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    event: Option<&'a str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// A switch: on when the variable is `1`, `true` or `yes`.
fn flag(name: &str) -> bool {
    matches!(env(name, "0").as_str(), "1" | "true" | "yes")
}

/// A fred client with reconnection, RESP3 (the adapter needs it) and a large
/// pub/sub channel (fred's default of 32 drops messages under load).
fn subscriber(url: &str) -> anyhow::Result<SubscriberClient> {
    let mut config = Config::from_url(url).context("REDIS_URL")?;
    config.version = RespVersion::RESP3;
    Ok(Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .with_performance_config(|p| p.broadcast_channel_capacity = BUFFER)
        .build_subscriber_client()?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = env("HOST", "127.0.0.1");
    let port = env("PORT", "3000");
    let url = env("REDIS_URL", "redis://127.0.0.1:6379");
    let prefix = env("REDIS_PREFIX", "switchboard");
    let local = env("PEER_INGEST", "0") == "local";
    let ingest = local || flag("PEER_INGEST");

    // Not `init`ed here: the adapter's fred driver does that itself, and a
    // second `init` of a connected client (fred resets its router task and
    // connects again) now and then waited forever for the connect
    // notification, so that a peer under load never started.
    let adapter_client = subscriber(&url)?;
    let adapter = RedisAdapterCtr::new_with_fred_config(
        adapter_client,
        RedisAdapterConfig::new()
            .with_prefix(format!("{prefix}-peer"))
            .with_stream_buffer(BUFFER),
    )
    .await
    .context("starting the Redis adapter")?;
    let (layer, io) = SocketIo::builder()
        .max_buffer_size(BUFFER)
        .with_adapter::<FredAdapter<_>>(adapter)
        .build_layer();
    io.ns("/", on_connect.with(register))
        .await
        .map_err(|e| anyhow::anyhow!("adapter init: {e}"))?;

    if ingest {
        let client = subscriber(&url)?;
        client.init().await.context("connecting to Redis")?;
        let messages = client.message_rx();
        let channel_prefix = format!("{prefix}:t:");
        client.psubscribe(format!("{channel_prefix}*")).await?;
        tokio::spawn(forward(io.clone(), messages, channel_prefix, client, local));
    }

    let ready = Arc::new(AtomicBool::new(true));
    let app = Router::new()
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::Relaxed) {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind(format!("{host}:{port}"))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr: SocketAddr = listener.local_addr()?;
    eprintln!("peer-socketioxide: ingest={ingest} local={local} listening on http://{addr}");
    let nodelay = flag("PEER_NODELAY");
    let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
        if nodelay {
            let _ = tcp.set_nodelay(true);
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}

/// Publications → rooms, in order. Each emit awaits the adapter (local
/// delivery, then one `SPUBLISH` to the other instances), or with `local`
/// delivers to this instance's sockets only.
async fn forward<A: Adapter>(
    io: SocketIo<A>,
    mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
    channel_prefix: String,
    _client: SubscriberClient,
    local: bool,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let msg = match messages.recv().await {
            Ok(m) => m,
            Err(RecvError::Lagged(n)) => {
                eprintln!("peer-socketioxide: lagged, {n} publications lost");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(topic) = msg.channel.strip_prefix(channel_prefix.as_str()) else {
            continue;
        };
        let Some(payload) = msg.value.as_bytes() else {
            continue;
        };
        let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) else {
            eprintln!("peer-socketioxide: a publication on {topic} is not an envelope");
            continue;
        };
        let event = envelope.event.unwrap_or(topic).to_string();
        let to = match local {
            true => io.local().to(topic.to_string()),
            false => io.to(topic.to_string()),
        };
        if let Err(e) = to.emit(&event, envelope.data).await {
            eprintln!("peer-socketioxide: broadcast failed: {e}");
        }
    }
}

/// Connect middleware: registers the handlers before the CONNECT ack, so an
/// immediate `subscribe` is never missed (see CRATE-NOTES, connect race).
async fn register<A: Adapter>(socket: SocketRef<A>) -> Result<(), std::convert::Infallible> {
    socket.on("subscribe", on_subscribe::<A>);
    Ok(())
}

async fn on_connect<A: Adapter>(_socket: SocketRef<A>) {}

async fn on_subscribe<A: Adapter>(
    socket: SocketRef<A>,
    Data(topic): Data<String>,
    ack: AckSender<A>,
) {
    socket.join(topic.clone());
    let _ = ack.send(&serde_json::json!({"ok": true, "topic": topic}));
}
