//! A minimal WebSocket client for the load generator (RFC 6455, client side).
//!
//! Why not tokio-tungstenite: it allocates a buffer per message and hides the
//! read batching. Here one connection owns one read buffer; every complete
//! frame in it is handed to a callback as a borrowed slice, so receiving a
//! publication allocates nothing. Control frames are handled inline: pings
//! are answered with pongs, close frames end the connection.
//!
//! The same connection reads a Server-Sent Events stream ([`connect_sse`]):
//! an HTTP/1.0 request, so the body is the raw stream until EOF (no chunk
//! framing), and every event's `data:` line is handed to the callback.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

/// Read buffer of an idle connection; it doubles when a frame does not fit
/// or a read fills it, up to [`MAX_BUFFER`].
const INITIAL_BUFFER: usize = 4 * 1024;
const MAX_BUFFER: usize = 32 << 20;
/// Upgrade responses are small; anything longer is not a WebSocket server.
const MAX_HEADER: usize = 16 * 1024;

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unprocessed bytes are `buf[pos..len]`.
    pos: usize,
    len: usize,
    /// Frames to send, written by [`Conn::flush`].
    pub out: Out,
    /// A fragmented message being assembled (servers rarely fragment).
    frag: Vec<u8>,
    in_frag: bool,
    /// A Server-Sent Events stream, not WebSocket frames.
    sse: bool,
}

/// Outgoing frames, masked as RFC 6455 requires of clients.
pub struct Out {
    bytes: Vec<u8>,
    key: [u8; 4],
}

/// Why the server ended the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame, with its code if it had one.
    Close(Option<u16>),
    /// A protocol violation by the server.
    Protocol(&'static str),
}

impl Out {
    fn frame(&mut self, opcode: u8, payload: &[u8]) {
        let b = &mut self.bytes;
        b.push(0x80 | opcode);
        let n = payload.len();
        if n < 126 {
            b.push(0x80 | n as u8);
        } else if n <= u16::MAX as usize {
            b.push(0x80 | 126);
            b.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            b.push(0x80 | 127);
            b.extend_from_slice(&(n as u64).to_be_bytes());
        }
        b.extend_from_slice(&self.key);
        let key = self.key;
        b.extend(payload.iter().enumerate().map(|(i, x)| x ^ key[i & 3]));
    }

    pub fn text(&mut self, payload: &[u8]) {
        self.frame(0x1, payload);
    }

    pub fn close(&mut self, code: u16) {
        self.frame(0x8, &code.to_be_bytes());
    }
}

/// Opens a TCP connection (from `source` if given) and performs the
/// WebSocket upgrade for `path`.
pub async fn connect(target: SocketAddr, source: Option<IpAddr>, path: &str) -> io::Result<Conn> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: c3dpdGNoYm9hcmQtYmVuY2g=\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    open(target, source, &request, b"HTTP/1.1 101", false).await
}

/// Opens a Server-Sent Events stream at `path` (HTTP/1.0: the body is not chunked).
pub async fn connect_sse(
    target: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
) -> io::Result<Conn> {
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {target}\r\nAccept: text/event-stream\r\n\r\n");
    open(target, source, &request, b"HTTP/1.", true).await
}

async fn open(
    target: SocketAddr,
    source: Option<IpAddr>,
    request: &str,
    expect: &[u8],
    sse: bool,
) -> io::Result<Conn> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut len = 0;
    let head_end = loop {
        if len == buf.len() {
            if buf.len() >= MAX_HEADER {
                return Err(io::Error::other("upgrade response headers too long"));
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during upgrade",
            ));
        }
        len += n;
        if let Some(i) = find(&buf[..len], b"\r\n\r\n") {
            break i + 4;
        }
    };
    let status_line = buf[..head_end].split(|&b| b == b'\r').next().unwrap_or(&[]);
    let ok = status_line.starts_with(expect) && (!sse || status_line.get(8..12) == Some(b" 200"));
    if !ok {
        return Err(io::Error::other(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(status_line)
        )));
    }
    Ok(Conn {
        stream,
        buf,
        pos: head_end,
        len,
        out: Out {
            bytes: Vec::new(),
            key: rand::random(),
        },
        frag: Vec::new(),
        in_frag: false,
        sse,
    })
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to a source address gets its
/// port at `connect`, unique per (source, destination) pair, instead of at
/// `bind`, unique per source. Without it one 127.0.0.x holds at most the
/// ~28,000 ports of `ip_local_port_range` over all nodes together, and the
/// scale scenario's reconnects could run out. Best effort: on a kernel
/// without it the bind takes a port as before.
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, a c_int option of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Conn {
    /// Reads once. Returns `false` at end of stream.
    pub async fn fill(&mut self) -> io::Result<bool> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            if self.buf.len() >= MAX_BUFFER {
                return Err(io::Error::other("frame larger than the read buffer limit"));
            }
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.read_once().await?;
        self.len += n;
        Ok(n > 0)
    }

    /// One `read(2)` into the free part of the buffer.
    ///
    /// tokio learns that a socket is drained only from a read that fails
    /// with `WouldBlock`, which costs a second syscall per wake-up. A read
    /// that returns less than the space offered has drained the socket, so
    /// it is reported to tokio as `WouldBlock` (clearing the readiness) and
    /// its byte count is kept. tokio clears readiness only if no new event
    /// arrived since it was observed, so data that lands in between still
    /// wakes us.
    async fn read_once(&mut self) -> io::Result<usize> {
        let space = self.buf.len() - self.len;
        loop {
            self.stream.readable().await?;
            let mut got = None;
            let dst = &mut self.buf[self.len..];
            let stream = &self.stream;
            let res = stream.try_io(Interest::READABLE, || {
                let n = stream.try_read(dst)?;
                got = Some(n);
                if n > 0 && n < space {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match res {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(n) = got {
                        return Ok(n);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether unprocessed bytes are buffered (frames from the upgrade read).
    pub fn has_buffered(&self) -> bool {
        self.pos < self.len
    }

    /// Hands every complete text or binary message in the buffer to `on_msg`
    /// (with the outgoing queue, for replies). Returns `Err` when the server
    /// closed the connection or broke the protocol.
    pub fn drain(&mut self, mut on_msg: impl FnMut(&[u8], &mut Out)) -> Result<(), Ended> {
        if self.sse {
            return self.drain_sse(on_msg);
        }
        loop {
            let avail = &self.buf[self.pos..self.len];
            if avail.len() < 2 {
                return Ok(());
            }
            let (b0, b1) = (avail[0], avail[1]);
            let fin = b0 & 0x80 != 0;
            let opcode = b0 & 0x0f;
            let masked = b1 & 0x80 != 0;
            let (mut header, len): (usize, usize) = match b1 & 0x7f {
                126 if avail.len() >= 4 => (4, u16::from_be_bytes([avail[2], avail[3]]) as usize),
                127 if avail.len() >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&avail[2..10]);
                    (10, u64::from_be_bytes(l) as usize)
                }
                126 | 127 => return Ok(()),
                n => (2, n as usize),
            };
            if masked {
                header += 4;
            }
            let total = header.saturating_add(len);
            if avail.len() < total {
                // Make room for the whole frame on the next read.
                if total > self.buf.len() {
                    if total > MAX_BUFFER {
                        return Err(Ended::Protocol("frame too large"));
                    }
                    self.buf.resize(total.next_power_of_two(), 0);
                }
                return Ok(());
            }
            let start = self.pos + header;
            self.pos += total;
            if masked {
                let key = [
                    self.buf[start - 4],
                    self.buf[start - 3],
                    self.buf[start - 2],
                    self.buf[start - 1],
                ];
                for (i, b) in self.buf[start..start + len].iter_mut().enumerate() {
                    *b ^= key[i & 3];
                }
            }
            let payload = &self.buf[start..start + len];
            match opcode {
                0x1 | 0x2 if fin && !self.in_frag => on_msg(payload, &mut self.out),
                0x1 | 0x2 if !self.in_frag => {
                    self.in_frag = true;
                    self.frag.clear();
                    self.frag.extend_from_slice(payload);
                }
                0x0 if self.in_frag => {
                    self.frag.extend_from_slice(payload);
                    if fin {
                        self.in_frag = false;
                        on_msg(&self.frag, &mut self.out);
                    }
                }
                0x8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Err(Ended::Close(code));
                }
                0x9 => self.out.frame(0xA, payload),
                0xA => {}
                _ => return Err(Ended::Protocol("unexpected opcode")),
            }
        }
    }

    /// Every complete SSE event in the buffer: its `data:` line (comments
    /// and `retry:` have none). A partial event waits for the next read.
    fn drain_sse(&mut self, mut on_msg: impl FnMut(&[u8], &mut Out)) -> Result<(), Ended> {
        loop {
            let Some(end) = find(&self.buf[self.pos..self.len], b"\n\n") else {
                return Ok(());
            };
            let block = self.pos..self.pos + end;
            self.pos += end + 2;
            let block = &self.buf[block];
            if let Some(i) = find(block, b"data: ") {
                let data = &block[i + 6..];
                let line = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
                on_msg(&data[..line], &mut self.out);
            }
        }
    }

    /// Writes queued frames.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.out.bytes.is_empty() {
            self.stream.write_all(&self.out.bytes).await?;
            self.out.bytes.clear();
        }
        Ok(())
    }

    /// Sends a close frame and waits (bounded by the caller) until the server
    /// closes, so that TIME_WAIT stays on the server side and the client's
    /// ephemeral ports are free for the next scenario.
    pub async fn close(&mut self) {
        if self.sse {
            // Nothing to say on a stream: closing the socket ends it.
            let _ = self.stream.shutdown().await;
            return;
        }
        self.out.close(1000);
        if self.flush().await.is_err() {
            return;
        }
        loop {
            match self.fill().await {
                Ok(true) => {
                    // Discard whatever is still arriving.
                    self.pos = self.len;
                }
                _ => return,
            }
        }
    }
}

/// Position of `needle` (not empty) in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = hay.get(from..)?.iter().position(|&b| b == first) {
        let at = from + i;
        if hay.get(at + 1..at + needle.len()) == Some(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_finds_the_first_match() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"abcab", b"abd"), None);
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"xx\"ts\":1", b"\"ts\":"), Some(2));
    }

    #[test]
    fn masked_frames_round_trip_through_the_length_forms() {
        for n in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut out = Out {
                bytes: Vec::new(),
                key: [1, 2, 3, 4],
            };
            out.text(&payload);
            let b = &out.bytes;
            assert_eq!(b[0], 0x81);
            assert!(b[1] & 0x80 != 0);
            let (hdr, len) = match b[1] & 0x7f {
                126 => (4, u16::from_be_bytes([b[2], b[3]]) as usize),
                127 => (
                    10,
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                ),
                l => (2, l as usize),
            };
            assert_eq!(len, n);
            let key = &b[hdr..hdr + 4];
            let un: Vec<u8> = b[hdr + 4..]
                .iter()
                .enumerate()
                .map(|(i, x)| x ^ key[i & 3])
                .collect();
            assert_eq!(un, payload);
        }
    }
}
