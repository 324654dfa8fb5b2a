//! Protocol detection inside a tunnel: HTTP (served, routed, measured) or anything else
//! (forwarded as opaque TCP, [`super::tcp`]).
//!
//! The rule, read from the first bytes the client sends:
//!
//! - **HTTP** when they begin like an HTTP method, after any empty lines (CR and LF, which
//!   RFC 9112 §2.2 lets a server skip before a request line, and which HTTP servers behind the
//!   waypoint do skip): token characters (RFC 9110 `tchar`) then a space, or [`SNIFF_BYTES`]
//!   bytes of line ends and token characters (a method that long is still a method: hyper
//!   decides, not a pass-through). This holds for every HTTP/1.x request line and for the
//!   HTTP/2 connection preface (`PRI * HTTP/2.0`), so hyper's server takes both.
//! - **Opaque TCP** otherwise: a byte that cannot be part of a method before the first space (a
//!   TLS ClientHello's `0x16`, a PostgreSQL length, Redis's `*1\r\n`), or a space first; and
//!   when the client sends nothing within the detection timeout, which is how server-first
//!   protocols (MySQL, SMTP, ...) look: they are forwarded once it expires.
//!
//! Anything that starts like a request line is HTTP and stays HTTP: if hyper then cannot parse
//! it, the client gets an HTTP error, never an opaque pass-through around the routes. What the
//! rule cannot tell apart is a client-first protocol whose first word looks like a method
//! (Redis's inline `PING`), which is taken for HTTP and fails; and an HTTP client that opens a
//! connection and stays silent past the timeout, whose requests then pass as opaque TCP to the
//! service dialled (not routed, not counted as requests). The detection reads at most
//! [`SNIFF_BYTES`] bytes and waits at most the timeout; the bytes read are replayed to
//! whichever side takes the connection ([`Rewind`]).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::relay::{ReadBuffer, Relayable};

/// The most bytes read to decide.
pub const SNIFF_BYTES: usize = 24;

/// What a tunnel carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x or HTTP/2 with prior knowledge.
    Http,
    /// Anything else: bytes forwarded as they are.
    Opaque,
}

/// The protocol `prefix` (the first bytes of a tunnel) shows, or `None` while it needs more.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    // Empty lines first are HTTP's (else `\r\nGET / HTTP/1.1` would pass around the routes and
    // policies as opaque bytes to a server that skips them).
    let start = prefix
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(prefix.len());
    if start >= SNIFF_BYTES {
        return Some(Protocol::Http);
    }
    for (i, &byte) in prefix.iter().enumerate().skip(start) {
        if byte == b' ' {
            return Some(if i > start {
                Protocol::Http
            } else {
                Protocol::Opaque
            });
        }
        if !is_tchar(byte) {
            return Some(Protocol::Opaque);
        }
        if i + 1 >= SNIFF_BYTES {
            return Some(Protocol::Http);
        }
    }
    None
}

/// Whether an HTTP `prefix` is the start of the HTTP/2 connection preface (`PRI *
/// HTTP/2.0`): no HTTP/1.x method is `PRI` (RFC 9113 §3.4 chose it so).
pub fn is_http2(prefix: &[u8]) -> bool {
    prefix.starts_with(b"PRI ")
}

/// RFC 9110 §5.6.2 `tchar`: the characters of a method.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Reads the first bytes of `io` until [`classify`] decides, the client closes its side, or
/// `timeout` passes (then: opaque, as a server-first protocol). Returns the protocol and the
/// bytes read, which the caller replays with [`Rewind`].
pub async fn sniff<S>(io: &mut S, timeout: Duration) -> io::Result<(Protocol, Bytes)>
where
    S: AsyncRead + Unpin,
{
    let mut prefix = Vec::with_capacity(SNIFF_BYTES);
    let read = async {
        let mut buf = [0u8; SNIFF_BYTES];
        loop {
            let want = SNIFF_BYTES - prefix.len();
            let n = io.read(&mut buf[..want]).await?;
            if n == 0 {
                // Closed before deciding: hand what came to the opaque path, which ends too.
                return Ok(Protocol::Opaque);
            }
            prefix.extend_from_slice(&buf[..n]);
            if let Some(protocol) = classify(&prefix) {
                return Ok::<_, io::Error>(protocol);
            }
        }
    };
    let protocol = match tokio::time::timeout(timeout, read).await {
        Ok(protocol) => protocol?,
        Err(_elapsed) => Protocol::Opaque,
    };
    Ok((protocol, Bytes::from(prefix)))
}

/// `inner` with `prefix` read again first: the bytes the detection consumed.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// Replays `prefix`, then reads from `inner`; writes go to `inner`.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            crate::relay::consume(&mut self.prefix, n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// The prefix goes to the relay as one chunk, then the inner stream's own chunks.
impl<S: Relayable> Relayable for Rewind<S> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        if self.prefix.has_remaining() {
            return Poll::Ready(Ok(std::mem::take(&mut self.prefix)));
        }
        self.inner.poll_read_chunk(cx, buf)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write_chunk(cx, chunk)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn request_lines_and_the_http2_preface_are_http_the_rest_opaque() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /x HTTP/1.0\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"M-SEARCH * HTTP/1.1",
            b"PROPFIND ",
            // A method too long to be a known one is still taken for HTTP (hyper answers it),
            // or a made-up method could carry a request around the routes.
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            // Empty lines before the request line (skipped by the servers behind).
            b"\r\nGET /x HTTP/1.1\r\n",
            b"\n\r\n\nDELETE ",
            b"\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n",
        ] {
            assert_eq!(classify(http), Some(Protocol::Http), "{http:?}");
            assert_eq!(is_http2(http), http.starts_with(b"PRI *"), "{http:?}");
        }
        for opaque in [
            &b"\x16\x03\x01\x02\x00\x01"[..],    // TLS ClientHello
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"*1\r\n$4\r\nPING\r\n",             // Redis RESP
            b" GET / HTTP/1.1",                  // no method before the space
        ] {
            assert_eq!(classify(opaque), Some(Protocol::Opaque), "{opaque:?}");
        }
        // Undecided until a space or a non-token byte.
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI"), None);
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"\r\nGE"), None);
        assert_eq!(classify(b"\r\n\x16\x03"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed_and_silence_is_opaque() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (protocol, prefix) = sniff(&mut server, Duration::from_secs(30)).await.unwrap();
        assert_eq!(protocol, Protocol::Http);
        let mut rewound = Rewind::new(prefix, server);
        let mut all = vec![0u8; 18];
        rewound.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"GET / HTTP/1.1\r\n\r\n");

        // A server-first protocol: the client says nothing.
        let (_client, mut server) = tokio::io::duplex(1024);
        let (protocol, prefix) = sniff(&mut server, Duration::from_millis(50)).await.unwrap();
        assert_eq!((protocol, prefix.len()), (Protocol::Opaque, 0));
    }
}
