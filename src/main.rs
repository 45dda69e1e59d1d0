//! `switchboard`: config → build → serve → drain.

use std::process::ExitCode;

use anyhow::Context;
use switchboard::config::{self, Command, Config, LogFormat};
use switchboard::{Node, admin_app, app};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Exit code for bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let healthcheck = args.first().is_some_and(|a| a == "healthcheck");
    if healthcheck {
        args.remove(0);
    }
    let config = match config::parse_args(args, config::ProcessEnv) {
        Ok(Command::Help) => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(source)) => Config::from_source(&source),
        Err(errors) => Err(errors),
    };
    let config = match config {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("switchboard: configuration error: {e}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if healthcheck {
        return probe(&config);
    }
    init_tracing(&config);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // Two rustls crypto providers are linked (fred's and tokio-tungstenite's
    // dependencies); rustls needs to be told which one to use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Always explicit, so that tokio never reads TOKIO_WORKER_THREADS itself
    // (it panics on a value it cannot parse, an empty one included).
    let workers = config
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(config.rust_log.as_deref().unwrap_or("info"))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Installed before the port is bound: a SIGTERM that arrives as soon as
    // clients can connect must drain them, not kill the process (1006).
    let signals = ShutdownSignals::install().context("installing signal handlers")?;
    let metrics = switchboard::metrics::install().context("installing the metrics recorder")?;
    switchboard::metrics::spawn_upkeep(metrics.clone());
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let admin_addr = config
        .admin_port
        .map(|p| std::net::SocketAddr::new(config.host, p));
    let grace = config.shutdown_grace;
    let readiness_delay = config.shutdown_readiness_delay;

    let node = Node::build(config, Some(metrics)).await?;
    let listener = bind(addr).with_context(|| format!("binding {addr} (PORT)"))?;
    let admin_listener = match admin_addr {
        Some(a) => Some(bind(a).with_context(|| format!("binding {a} (ADMIN_PORT)"))?),
        None => None,
    };
    let local = listener.local_addr()?;
    if let Some(redis) = node.config().redis_url_redacted() {
        tracing::info!(redis = %redis, prefix = %node.config().redis_prefix, "using the Redis backplane");
    }
    tracing::info!(
        node = %node.config().node_id,
        backplane = node.hub().backplane().kind(),
        "listening on http://{local}"
    );

    let stop_accepting = CancellationToken::new();
    let handshake_timeout = node.config().handshake_timeout;
    let max_header_bytes = node.config().http_max_header_bytes;
    let serve = tokio::spawn(switchboard::serve(
        listener,
        app(node.clone()),
        handshake_timeout,
        max_header_bytes,
        stop_accepting.clone(),
    ));
    if let Some(admin) = admin_listener {
        tracing::info!("admin listening on http://{}", admin.local_addr()?);
        tokio::spawn(switchboard::serve(
            admin,
            admin_app(node.clone()),
            handshake_timeout,
            max_header_bytes,
            stop_accepting.clone(),
        ));
    }

    let signal = signals.recv().await;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(signal, "draining");
    // From here `/readyz` answers 503 and new WebSocket / Socket.IO clients
    // are refused with 503, but the port stays open until the clients are
    // drained: probes and in-flight HTTP keep getting answers.
    node.begin_drain();
    tokio::time::sleep(readiness_delay).await;
    node.finish_drain(deadline).await;
    stop_accepting.cancel();
    let _ = tokio::time::timeout_at(deadline, serve).await;
    tracing::info!("stopped");
    Ok(())
}

/// Binds with a listen backlog of 4096: the standard library's 128
/// overflows when thousands of clients reconnect at once (their final ACKs
/// are dropped and they retry a second later).
fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// SIGINT and SIGTERM (Kubernetes sends SIGTERM to start a graceful
/// shutdown), caught from the moment they are installed.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the first of them.
    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// `switchboard healthcheck`: exits 0 when this machine's node answers
/// `GET /healthz` with 200 (for container HEALTHCHECKs without curl).
fn probe(config: &Config) -> ExitCode {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(3);
    let host = if config.host.is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        config.host
    };
    let addr = std::net::SocketAddr::new(host, config.port);
    let result = (|| -> std::io::Result<bool> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("switchboard healthcheck: {addr} answered, but not 200");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("switchboard healthcheck: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
