//! Drivers: where the leader's frames go. Only the leader holds one.
//!
//! The leader's show loop (`show.rs`) renders a frame every 1/`DEVICE_FPS`
//! s and hands it to [`Driver::show`] inside the election's fence, so a
//! driver never has to ask whether it may send. `show` must not block: the
//! network drivers send UDP on a non-blocking socket and resolve host names
//! in the background ([`Driver::prepare`], outside the fence).
//!
//! To add a driver: implement [`Driver`] (or an [`Encoder`] for another UDP
//! protocol), add its form to `DEVICE_DRIVER` in `config.rs` and a branch in
//! [`make`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ddp::Ddp;
use super::e131::E131;
use super::frame::Frame;
use super::state::DeviceState;
use crate::config::DriverConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// What `/api/health` and `/api/state` show about the leader's driver.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriverHealth {
    pub driver: &'static str,
    /// Where frames go (`ddp://10.0.0.7:4048`); absent for in-process drivers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// No frame failed for the last [`HEALTH_WINDOW`] (or 2.5 frame
    /// periods, if longer).
    pub ok: bool,
    /// The last failure, while not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// State changes applied this term.
    pub applied: u64,
    /// Frames put on the wire this term.
    pub frames: u64,
    /// Frames that could not be sent this term.
    pub errors: u64,
    /// Pixels lit in the last frame (simulated driver only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lit_pixels: Option<usize>,
}

/// How long after its last failure a driver counts as failing.
pub const HEALTH_WINDOW: Duration = Duration::from_secs(2);

pub trait Driver: Send {
    /// `simulated`, `log`, `ddp`, `e131` (the `driver` metric label).
    fn kind(&self) -> &'static str;
    /// Where frames go, for health output and logs.
    fn target(&self) -> Option<String> {
        None
    }
    /// The state changed.
    fn apply(&mut self, _state: &DeviceState) {}
    /// Between frames, outside the fence: resolve a host, open a socket.
    /// Never blocks.
    fn prepare(&mut self) {}
    /// Puts `frame` on the wire: `Ok(true)` sent, `Ok(false)` nothing to
    /// send to yet (a host name being resolved). Runs inside the fence:
    /// non-blocking work only.
    fn show(&mut self, frame: &Frame) -> Result<bool, DriverError>;
    /// The term ends by choice (shutdown, handover) while the fence still
    /// holds: last words, such as E1.31's stream termination.
    fn finish(&mut self) {}
    /// Pixels lit in the last frame, for drivers that keep it.
    fn lit_pixels(&self) -> Option<usize> {
        None
    }
}

/// Builds the driver `DEVICE_DRIVER` names; `node` names this node's E1.31
/// source.
pub fn make(config: &DriverConfig, node: &str) -> Box<dyn Driver> {
    match config {
        DriverConfig::Simulated => Box::new(SimulatedDriver::default()),
        DriverConfig::Log => Box::new(LogDriver),
        DriverConfig::Ddp { host, port } => Box::new(UdpDriver::new(
            host,
            *port,
            config.to_string(),
            Ddp::default(),
        )),
        DriverConfig::E131 {
            host,
            port,
            universe,
        } => Box::new(UdpDriver::new(
            host,
            *port,
            config.to_string(),
            E131::new(node, *universe),
        )),
    }
}

// === simulated and log ===

/// Keeps the last frame in memory.
#[derive(Default)]
pub struct SimulatedDriver {
    frame: Frame,
    /// Lit pixels of `frame`, counted when it changes.
    lit: usize,
}

impl SimulatedDriver {
    pub fn frame(&self) -> &Frame {
        &self.frame
    }
}

impl Driver for SimulatedDriver {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn show(&mut self, frame: &Frame) -> Result<bool, DriverError> {
        if self.frame != *frame {
            self.frame.clone_from(frame);
            self.lit = frame.lit();
        }
        Ok(true)
    }

    fn lit_pixels(&self) -> Option<usize> {
        Some(self.lit)
    }
}

/// Logs each applied state; frames go nowhere.
pub struct LogDriver;

impl Driver for LogDriver {
    fn kind(&self) -> &'static str {
        "log"
    }

    fn apply(&mut self, state: &DeviceState) {
        tracing::info!(
            app = %state.current_app,
            brightness = state.settings.brightness,
            carousel = state.carousel.enabled,
            "device state applied"
        );
    }

    fn show(&mut self, _frame: &Frame) -> Result<bool, DriverError> {
        Ok(true)
    }
}

// === UDP protocols ===

/// A protocol that turns RGB frames into UDP payloads.
pub trait Encoder: Send + 'static {
    fn scheme(&self) -> &'static str;
    /// Sends `rgb` (`WIDTH × HEIGHT × 3` bytes) as packets through `send`,
    /// stopping at the first error.
    fn frame(
        &mut self,
        rgb: &[u8],
        send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()>;
    /// Last packets of a stream that ends by choice.
    fn finish(
        &mut self,
        _rgb: &[u8],
        _send: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        Ok(())
    }
}

/// How long a host name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry delays after a failed resolution: from 1 s, doubling, up to 30 s.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A socket whose sends have failed this long is dropped and the host
/// resolved again (its address may have changed).
const REOPEN_AFTER: Duration = Duration::from_secs(10);

/// Sends frames over UDP with an [`Encoder`] from a connected socket, so the
/// kernel reports an unreachable display (ICMP) as an error on a later send.
pub struct UdpDriver<E: Encoder> {
    host: String,
    port: u16,
    target: String,
    encoder: E,
    link: Link,
    retry: Duration,
    /// When the last frame went out (or the socket was opened).
    last_ok: Instant,
    last_rgb: Vec<u8>,
}

enum Link {
    /// Resolve (again) at this instant.
    Idle(Instant),
    Resolving(JoinHandle<Result<SocketAddr, String>>),
    Ready(UdpSocket),
    /// Resolution or socket setup failed; retried at the instant.
    Failed(String, Instant),
}

impl<E: Encoder> UdpDriver<E> {
    pub fn new(host: &str, port: u16, target: String, encoder: E) -> Self {
        UdpDriver {
            host: host.to_string(),
            port,
            target,
            encoder,
            link: Link::Idle(Instant::now()),
            retry: RETRY_FIRST,
            last_ok: Instant::now(),
            last_rgb: Vec::new(),
        }
    }

    fn open(addr: SocketAddr) -> io::Result<UdpSocket> {
        let any: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = UdpSocket::bind((any, 0))?;
        socket.set_nonblocking(true)?;
        socket.connect(addr)?;
        Ok(socket)
    }

    fn fail(&mut self, error: String) {
        self.link = Link::Failed(error, Instant::now() + self.retry);
        self.retry = (self.retry * 2).min(RETRY_MAX);
    }

    fn send_all(socket: &UdpSocket, encoder: &mut E, rgb: &[u8], finish: bool) -> io::Result<()> {
        // An ICMP error for an earlier packet (port unreachable) is pending here.
        if let Some(e) = socket.take_error()? {
            return Err(e);
        }
        let mut send = |p: &[u8]| socket.send(p).map(|_| ());
        if finish {
            encoder.finish(rgb, &mut send)
        } else {
            encoder.frame(rgb, &mut send)
        }
    }
}

impl<E: Encoder> Driver for UdpDriver<E> {
    fn kind(&self) -> &'static str {
        self.encoder.scheme()
    }

    fn target(&self) -> Option<String> {
        Some(self.target.clone())
    }

    fn prepare(&mut self) {
        let now = Instant::now();
        match &mut self.link {
            Link::Idle(at) | Link::Failed(_, at) if *at <= now => {
                if let Ok(ip) = self.host.parse::<IpAddr>() {
                    let addr = SocketAddr::new(ip, self.port);
                    match Self::open(addr) {
                        Ok(socket) => {
                            self.link = Link::Ready(socket);
                            self.retry = RETRY_FIRST;
                            self.last_ok = now;
                        }
                        Err(e) => self.fail(format!("cannot open a UDP socket to {addr}: {e}")),
                    }
                } else {
                    let (host, port) = (self.host.clone(), self.port);
                    self.link = Link::Resolving(tokio::spawn(async move {
                        match tokio::time::timeout(
                            RESOLVE_TIMEOUT,
                            tokio::net::lookup_host((host.as_str(), port)),
                        )
                        .await
                        {
                            Ok(Ok(mut addrs)) => addrs
                                .next()
                                .ok_or_else(|| format!("host {host} has no address")),
                            Ok(Err(e)) => Err(format!("cannot resolve host {host}: {e}")),
                            Err(_) => Err(format!(
                                "cannot resolve host {host}: no answer within {} s",
                                RESOLVE_TIMEOUT.as_secs()
                            )),
                        }
                    }));
                }
            }
            Link::Resolving(task) if task.is_finished() => {
                let result = match task.now_or_never() {
                    Some(Ok(r)) => r,
                    Some(Err(e)) => Err(format!("host resolution failed: {e}")),
                    None => return,
                };
                match result.and_then(|addr| {
                    Self::open(addr).map_err(|e| format!("cannot open a UDP socket to {addr}: {e}"))
                }) {
                    Ok(socket) => {
                        self.link = Link::Ready(socket);
                        self.retry = RETRY_FIRST;
                        self.last_ok = now;
                    }
                    Err(e) => self.fail(e),
                }
            }
            Link::Ready(_) if now.duration_since(self.last_ok) > REOPEN_AFTER => {
                // Failing for a while: resolve and open again.
                self.link = Link::Idle(now);
            }
            _ => {}
        }
    }

    fn show(&mut self, frame: &Frame) -> Result<bool, DriverError> {
        self.last_rgb.clear();
        self.last_rgb.extend_from_slice(frame.rgb());
        match &self.link {
            Link::Ready(socket) => {
                match Self::send_all(socket, &mut self.encoder, &self.last_rgb, false) {
                    Ok(()) => {
                        self.last_ok = Instant::now();
                        Ok(true)
                    }
                    Err(e) => Err(DriverError(format!(
                        "sending to {} failed: {e}",
                        self.target
                    ))),
                }
            }
            Link::Failed(e, _) => Err(DriverError(e.clone())),
            Link::Idle(_) | Link::Resolving(_) => Ok(false),
        }
    }

    fn finish(&mut self) {
        if let Link::Ready(socket) = &self.link
            && !self.last_rgb.is_empty()
            && let Err(e) = Self::send_all(socket, &mut self.encoder, &self.last_rgb, true)
        {
            tracing::debug!(cause = %e, "last packets of the stream not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `prepare` until the driver can send (or failed).
    async fn ready<E: Encoder>(d: &mut UdpDriver<E>) {
        for _ in 0..200 {
            d.prepare();
            if matches!(d.link, Link::Ready(_) | Link::Failed(..)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("driver never got ready");
    }

    #[tokio::test]
    async fn udp_driver_sends_and_reports_an_unreachable_display() {
        // A port nobody listens on: the kernel answers port unreachable.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut d = UdpDriver::new(
            "127.0.0.1",
            port,
            format!("ddp://127.0.0.1:{port}"),
            Ddp::default(),
        );
        assert_eq!(
            d.show(&Frame::black()),
            Ok(false),
            "no socket before prepare"
        );
        ready(&mut d).await;
        let mut failed = None;
        for _ in 0..20 {
            if let Err(e) = d.show(&Frame::black()) {
                failed = Some(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let e = failed.expect("the refused packets are reported");
        assert!(
            e.0.contains(&format!("sending to ddp://127.0.0.1:{port} failed")),
            "{e}"
        );
        assert!(e.0.to_lowercase().contains("refused"), "{e}");

        // The display appears on that port: frames arrive, no more errors.
        let display = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
        display
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let _ = d.show(&Frame::black()); // a last pending error may surface once
        assert_eq!(d.show(&Frame::black()), Ok(true));
        let mut buf = [0u8; 2000];
        let (n, from) = display.recv_from(&mut buf).unwrap();
        assert!(n > 10);
        assert_eq!(from.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
    }

    #[tokio::test]
    async fn unresolvable_hosts_are_errors_and_retried() {
        let mut d = UdpDriver::new(
            "no-such-host.invalid",
            4048,
            "ddp://no-such-host.invalid:4048".into(),
            Ddp::default(),
        );
        ready(&mut d).await;
        let e = d.show(&Frame::black()).unwrap_err();
        assert!(e.0.contains("no-such-host.invalid"), "{e}");
        let Link::Failed(_, at) = d.link else {
            panic!("not failed")
        };
        assert!(at > Instant::now(), "retried later, not in a loop");
        assert_eq!(d.retry, RETRY_FIRST * 2, "backing off");
    }
}
