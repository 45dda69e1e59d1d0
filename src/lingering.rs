//! Lingering close of accepted connections (RFC 6455 §7.1.1, nginx's
//! `lingering_close`).
//!
//! Closing a TCP socket whose receive buffer still holds unread bytes makes
//! the kernel answer with a reset, and a reset makes the peer's kernel
//! throw away what the peer had received but not yet read: a client that
//! was still sending when the server closed loses the `error` frame and the
//! Close frame that explained why, and sees 1006. So every accepted
//! connection is wrapped in [`Lingering`]: when it is dropped before the
//! peer ended its side, the socket is half-closed (FIN after everything
//! written) and read and discarded until the peer's EOF, for at most
//! [`LINGER_TIME`] and [`LINGER_MAX_BYTES`], and only then closed. A
//! WebSocket peer answers our Close frame and then sees our FIN, so this
//! ends within a round trip; whatever the frame parser's state (it works
//! after an oversize frame too, where frames can no longer be parsed).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

/// How long a closed connection is drained at most.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// How many bytes a closed connection may still send before it is dropped.
pub const LINGER_MAX_BYTES: usize = 16 << 20;

/// An accepted TCP connection that drains itself when dropped.
pub struct Lingering {
    stream: Option<TcpStream>,
    /// The peer ended its side or the connection failed: nothing to drain.
    finished: bool,
    /// Where the draining tasks run, so the process waits for them on exit.
    tracker: TaskTracker,
}

impl Lingering {
    pub fn new(stream: TcpStream, tracker: TaskTracker) -> Self {
        Lingering {
            stream: Some(stream),
            finished: false,
            tracker,
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("present until dropped"))
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = this.stream().poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.finished = true;
            }
            Poll::Ready(Err(_)) => this.finished = true,
            _ => {}
        }
        res
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = this.stream().poll_write(cx, buf);
        if let Poll::Ready(Err(_)) = &res {
            this.finished = true;
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = this.stream().poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(_)) = &res {
            this.finished = true;
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.finished {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tracker.spawn_on(linger(stream), &runtime);
        }
    }
}

/// Half-closes `stream`, then reads and discards until EOF or a bound.
async fn linger(mut stream: TcpStream) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let _ = stream.shutdown().await;
        let mut buf = vec![0u8; 16 * 1024];
        let mut left = LINGER_MAX_BYTES;
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if n >= left => break,
                Ok(n) => left -= n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The server closes while the client is still sending: the client
    /// still reads everything the server wrote, then EOF (no reset).
    #[tokio::test]
    async fn a_closed_connection_keeps_what_it_wrote() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tracker = TaskTracker::new();
        let t = tracker.clone();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = Lingering::new(s, t);
            s.write_all(b"goodbye").await.unwrap();
            // dropped with the client's bytes unread
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&[7u8; 64 * 1024]).await.unwrap();
        server.await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = client.write_all(&[7u8; 1024]).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match client.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reset instead of a clean close: {e}"),
            }
        }
        assert_eq!(got, b"goodbye");
        drop(client);
        tracker.close();
        tokio::time::timeout(Duration::from_secs(3), tracker.wait())
            .await
            .unwrap();
    }
}
