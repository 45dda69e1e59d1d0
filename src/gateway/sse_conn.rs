//! HTTP/1 connections that ask for `GET /sse…`, served without hyper.
//!
//! hyper keeps a 8 KiB read buffer and a 8 KiB header buffer for as long
//! as an HTTP/1 connection lives; a WebSocket gives them back at the
//! upgrade, an SSE response never does: that alone was more than twice a
//! native connection's memory. So the accept loop peeks at a new
//! connection (`lib::serve`) and hands `GET /sse…` here: the request head is
//! read and parsed (`httparse`, the same limits as hyper's), the request
//! goes through the same router and middleware (Origin, CORS, metrics), and
//! the response is written by this task: the head, then the body's frames
//! as chunks (close-delimited for an HTTP/1.0 client). One request per
//! connection (`Connection: close`): `EventSource` opens a new one to
//! reconnect anyway. Everything else stays with hyper.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

use crate::gateway::outbox::WRITE_TIMEOUT;
use crate::lingering::Lingering;

/// What the first bytes of a connection must be for it to come here.
const PREFIX: &[u8] = b"GET /sse";
/// Headers a request may have (hyper's default is 100).
const MAX_HEADERS: usize = 100;

/// Whether `stream` starts with `GET /sse` (waits for the first bytes, at
/// most `within`; a connection that says nothing in time goes to hyper,
/// which applies its own timeout).
pub async fn wants(stream: &TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; PREFIX.len()];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || !PREFIX.starts_with(&buf[..n]) {
            return false;
        }
        if n == PREFIX.len() {
            return true;
        }
        // Part of the request line so far: wait a little for the rest.
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
    }
}

/// Serves one `GET /sse…` request on `io` and closes the connection.
pub async fn serve(
    mut io: Lingering,
    peer: SocketAddr,
    router: Router,
    head_timeout: Duration,
    max_head: usize,
) {
    let head = match tokio::time::timeout(head_timeout, read_head(&mut io, max_head)).await {
        Ok(Ok(head)) => head,
        Ok(Err(status)) => return reply(&mut io, status).await,
        Err(_) => return,
    };
    let (request, http10) = match parse(&head) {
        Some(parsed) => parsed,
        None => return reply(&mut io, StatusCode::BAD_REQUEST).await,
    };
    drop(head);
    let mut request = request;
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let response = match router.oneshot(request).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let exact = body.size_hint().exact();
    let mut head = format!("HTTP/1.{} {}\r\n", if http10 { 0 } else { 1 }, parts.status);
    for (name, value) in &parts.headers {
        if name == axum::http::header::CONTENT_LENGTH
            || name == axum::http::header::TRANSFER_ENCODING
            || name == axum::http::header::CONNECTION
        {
            continue;
        }
        head.push_str(name.as_str());
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value.as_bytes()));
        head.push_str("\r\n");
    }
    head.push_str(&format!(
        "date: {}\r\nconnection: close\r\n",
        httpdate(std::time::SystemTime::now())
    ));
    let chunked = exact.is_none() && !http10;
    match exact {
        Some(len) => head.push_str(&format!("content-length: {len}\r\n\r\n")),
        None if chunked => head.push_str("transfer-encoding: chunked\r\n\r\n"),
        None => head.push_str("\r\n"),
    }
    if write(&mut io, head.as_bytes()).await.is_err() {
        return;
    }
    drop(head);
    pump(&mut io, body, chunked).await;
    let _ = tokio::time::timeout(WRITE_TIMEOUT, io.shutdown()).await;
}

/// Writes the body's frames until it ends or the client goes away (EOF or
/// an error on the socket, which is read meanwhile for nothing else).
async fn pump(io: &mut Lingering, mut body: Body, chunked: bool) {
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    let ok = if chunked {
                        let size = format!("{:x}\r\n", data.len());
                        write(io, size.as_bytes()).await.is_ok()
                            && write(io, &data).await.is_ok()
                            && write(io, b"\r\n").await.is_ok()
                    } else {
                        write(io, &data).await.is_ok()
                    };
                    if !ok {
                        return;
                    }
                }
                Some(Err(_)) => return,
                None => break,
            },
            read = io.read(&mut sink) => match read {
                // More from the client (a pipelined request): not served here.
                Ok(n) if n > 0 => {}
                _ => return,
            },
        }
    }
    if chunked {
        let _ = write(io, b"0\r\n\r\n").await;
    }
}

async fn write(io: &mut Lingering, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// A short answer without a body, then the close (a head that was too
/// long, or that did not parse).
async fn reply(io: &mut Lingering, status: StatusCode) {
    let text = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = write(io, text.as_bytes()).await;
    let _ = tokio::time::timeout(WRITE_TIMEOUT, io.shutdown()).await;
}

/// Reads until the end of the request head (`\r\n\r\n`); 431 past `max`.
async fn read_head(io: &mut Lingering, max: usize) -> Result<Vec<u8>, StatusCode> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|_| StatusCode::BAD_REQUEST)?;
        if n == 0 {
            return Err(StatusCode::BAD_REQUEST);
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(from + i + 4);
            return Ok(buf);
        }
        if buf.len() > max {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
    }
}

/// The request (no body) and whether it is HTTP/1.0.
fn parse(head: &[u8]) -> Option<(Request<Body>, bool)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let http10 = req.version == Some(0);
    let mut builder = Request::builder()
        .method(req.method?)
        .uri(req.path?)
        .version(if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        });
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder.body(Body::empty()).ok().map(|r| (r, http10))
}

/// An HTTP date (RFC 9110 IMF-fixdate).
fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ts = jiff::Timestamp::from_second(secs as i64).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    ts.strftime("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_into_requests() {
        let (req, http10) =
            parse(b"GET /sse/a?topic=b HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1\r\n\r\n").unwrap();
        assert!(!http10);
        assert_eq!(req.uri().path(), "/sse/a");
        assert_eq!(req.uri().query(), Some("topic=b"));
        assert_eq!(req.headers()["last-event-id"], "1");
        assert!(parse(b"GET /sse HTTP/1.0\r\n\r\n").unwrap().1);
        assert!(parse(b"GARBAGE\r\n\r\n").is_none());
        assert!(httpdate(std::time::UNIX_EPOCH).starts_with("Thu, 01 Jan 1970 00:00:00 GMT"));
    }
}
