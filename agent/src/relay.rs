//! The byte relay every proxy uses: copies both ways between two streams (TCP sockets, HBONE
//! tunnels), passes half-closes through, counts what moved, and stops early when asked (an
//! open connection whose authorization was revoked).
//!
//! How the bytes move, and why:
//! - One future polls both directions, as tokio's `copy_bidirectional` does: no split halves
//!   (whose lock every poll takes), and the one task wakes for whichever side is ready.
//! - Bytes move as owned chunks ([`Bytes`], [`Relayable`]). A socket is read into a buffer
//!   whose filled part is handed on as is; an HBONE tunnel hands on the DATA frames h2
//!   received and takes a chunk as a DATA frame without copying it. Between a socket and a
//!   tunnel no byte is copied in user space outside TLS.
//! - Read buffers grow with what the connection moved, as ztunnel's do ([`ReadBuffer`]): a
//!   connection exchanging small requests holds 1 KiB per direction, a bulk transfer reads up
//!   to 256 KiB per system call (fewer system calls, fewer wake-ups, larger DATA frames).
//!
//! What moved is told to a [`Meter`] as it moves, chunk by chunk, so metrics of a long
//! connection grow while it is open, as ztunnel's do. The cost is one call per chunk next to
//! the two system calls that moved it; the proxies' meter is a few relaxed atomic adds
//! ([`crate::proxy::metrics::ConnectionRecorder`]).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes moved by [`relay`], each way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Transferred {
    /// Client to upstream.
    pub sent: u64,
    /// Upstream to client.
    pub received: u64,
}

/// Told of bytes as the relay moves them. Called from the relay's task once per chunk, so it
/// must be cheap and must not block.
pub trait Meter: Sync {
    /// `n` more bytes went from the client to the upstream.
    fn sent(&self, n: u64);
    /// `n` more bytes went from the upstream to the client.
    fn received(&self, n: u64);
}

/// Counts nothing.
impl Meter for () {
    fn sent(&self, _: u64) {}
    fn received(&self, _: u64) {}
}

impl<M: Meter> Meter for Option<M> {
    fn sent(&self, n: u64) {
        if let Some(meter) = self {
            meter.sent(n);
        }
    }
    fn received(&self, n: u64) {
        if let Some(meter) = self {
            meter.received(n);
        }
    }
}

/// A stream the relay copies from and to, chunk by chunk.
///
/// The provided methods suit a byte stream (a socket): read into the relay's [`ReadBuffer`],
/// write with `poll_write`. A stream that already holds its data in chunks (an HBONE tunnel)
/// overrides them to hand over and take chunks without copying.
pub trait Relayable: AsyncRead + AsyncWrite + Unpin {
    /// The next chunk read, empty at the end of the stream; `buf` is the relay's buffer for
    /// this direction, for streams that read into one.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        buf.poll_read(Pin::new(self), cx)
    }

    /// Writes a prefix of `chunk` and removes it from `chunk`; returns its length (0 only if
    /// the stream can take no more, which the relay reports as an error).
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(self).poll_write(cx, chunk))?;
        chunk.advance(n);
        Poll::Ready(Ok(n))
    }
}

impl Relayable for tokio::net::TcpStream {}

impl Relayable for tokio::io::DuplexStream {}

/// Read-buffer sizes and when they apply (ztunnel's): a connection starts small, so the many
/// connections that exchange little hold little, and grows once it has moved enough to be a
/// bulk transfer. The large sizes leave room for an HTTP/2 frame header within TLS records.
const SIZES: [(u64, usize); 3] = [
    (0, 1024),
    (128 * 1024, 16 * 1024 - 64),
    (10 * 1024 * 1024, 16 * 16 * 1024 - 64),
];

/// One direction's read buffer: reads land in it and leave it as [`Bytes`] without a copy.
/// Its memory is reused once the chunks handed out are dropped (a socket write completes at
/// once; a tunnel holds a chunk until it is encrypted).
#[derive(Debug)]
pub struct ReadBuffer {
    buf: BytesMut,
    size: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        Self {
            buf: BytesMut::new(),
            size: SIZES[0].1,
        }
    }
}

impl ReadBuffer {
    /// Reads what `from` has (at most the buffer's current size) and hands it out.
    pub fn poll_read<R: AsyncRead + ?Sized>(
        &mut self,
        from: Pin<&mut R>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Bytes>> {
        self.buf.reserve(self.size);
        ready!(tokio_util::io::poll_read_buf(from, cx, &mut self.buf))?;
        Poll::Ready(Ok(self.buf.split().freeze()))
    }

    /// Sizes the next reads for a connection that has moved `moved` bytes this way.
    fn grow(&mut self, moved: u64) {
        self.size = SIZES
            .iter()
            .rev()
            .find(|(after, _)| moved >= *after)
            .map_or(SIZES[0].1, |(_, size)| *size);
    }
}

/// One direction of a relay.
#[derive(Default)]
struct OneWay {
    buf: ReadBuffer,
    /// Read and not yet (fully) written.
    pending: Bytes,
    moved: u64,
    /// Written since the last flush.
    unflushed: bool,
    /// The source ended; its end is being passed on.
    read_done: bool,
    /// The end was passed on: this direction is over.
    done: bool,
}

impl OneWay {
    /// Moves what `from` has to `to` until `from` has nothing more now (pending) or has ended
    /// and its end was passed on (ready).
    fn poll<R: Relayable, W: Relayable>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        tell: impl Fn(u64),
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.read_done {
                // Half-close: pass the end of this direction on, keep the other one open.
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if self.pending.is_empty() {
                match from.poll_read_chunk(cx, &mut self.buf) {
                    Poll::Ready(Ok(chunk)) if chunk.is_empty() => {
                        self.read_done = true;
                        continue;
                    }
                    Poll::Ready(Ok(chunk)) => self.pending = chunk,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => {
                        // Nothing more to write for now: make sure what was written goes out.
                        if self.unflushed {
                            ready!(Pin::new(&mut *to).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            let n = ready!(to.poll_write_chunk(cx, &mut self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.unflushed = true;
            self.moved += n as u64;
            tell(n as u64);
            if self.pending.is_empty() {
                self.buf.grow(self.moved);
            }
        }
    }
}

/// Copies bytes both ways until both directions have ended, passing half-closes through,
/// telling `meter` of each chunk moved. An error in either direction ends both (the other side
/// would otherwise hang), and the counts then say how far each direction got (the sums of what
/// `meter` was told).
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    meter: &impl Meter,
) -> (Transferred, io::Result<()>)
where
    C: Relayable,
    U: Relayable,
{
    let (moved, ended) = relay_until(
        client,
        upstream,
        meter,
        std::future::pending::<std::convert::Infallible>(),
    )
    .await;
    match ended {
        Relayed::Finished(result) => (moved, result),
        Relayed::Stopped(never) => match never {},
    }
}

/// How [`relay_until`] ended.
#[derive(Debug)]
pub enum Relayed<S> {
    /// Both directions ended (or one failed), as in [`relay`].
    Finished(io::Result<()>),
    /// `stop` resolved first: both sides were dropped mid-relay (a TCP client sees its
    /// connection closed, an HBONE peer its stream reset).
    Stopped(S),
}

/// [`relay`], cut short when `stop` resolves (an open connection whose authorization was
/// revoked). The counts say how far each direction got either way.
pub async fn relay_until<C, U, S>(
    mut client: C,
    mut upstream: U,
    meter: &impl Meter,
    stop: impl Future<Output = S>,
) -> (Transferred, Relayed<S>)
where
    C: Relayable,
    U: Relayable,
{
    let mut sent = OneWay::default();
    let mut received = OneWay::default();
    let ended = {
        let copy = std::future::poll_fn(|cx| {
            let up = sent.poll(cx, &mut client, &mut upstream, |n| meter.sent(n));
            if let Poll::Ready(Err(err)) = up {
                return Poll::Ready(Err(err));
            }
            let down = received.poll(cx, &mut upstream, &mut client, |n| meter.received(n));
            match (up, down) {
                (_, Poll::Ready(Err(err))) => Poll::Ready(Err(err)),
                (Poll::Ready(_), Poll::Ready(_)) => Poll::Ready(Ok(())),
                _ => Poll::Pending,
            }
        });
        tokio::select! {
            result = copy => Relayed::Finished(result),
            stopped = stop => Relayed::Stopped(stopped),
        }
    };
    // Both sides close here, when they are dropped.
    drop((client, upstream));
    let moved = Transferred {
        sent: sent.moved,
        received: received.moved,
    };
    (moved, ended)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[derive(Default)]
    struct Tally {
        sent: AtomicU64,
        received: AtomicU64,
    }

    impl Meter for Tally {
        fn sent(&self, n: u64) {
            self.sent.fetch_add(n, Ordering::Relaxed);
        }
        fn received(&self, n: u64) {
            self.received.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The meter hears of every chunk as soon as it is passed on, while both sides are still
    /// open, and the totals at the end are what it heard.
    #[tokio::test]
    async fn the_meter_counts_while_the_connection_is_open() {
        let (mut client, client_side) = duplex(1024);
        let (upstream_side, mut upstream) = duplex(1024);
        let tally = Tally::default();
        let relay = relay(client_side, upstream_side, &tally);
        tokio::pin!(relay);

        let mut buf = [0u8; 64];
        // Drive the relay while the ends talk; nothing has ended yet.
        let exchange = async {
            client.write_all(b"request").await.unwrap();
            upstream.read_exact(&mut buf[..7]).await.unwrap();
            upstream.write_all(b"a longer response").await.unwrap();
            client.read_exact(&mut buf[..17]).await.unwrap();
        };
        tokio::select! {
            _ = &mut relay => panic!("the relay ended while both sides were open"),
            () = exchange => {}
        }
        assert_eq!(tally.sent.load(Ordering::Relaxed), 7);
        assert_eq!(tally.received.load(Ordering::Relaxed), 17);

        client.shutdown().await.unwrap();
        upstream.shutdown().await.unwrap();
        let (moved, result) = relay.await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!((moved.sent, moved.received), (7, 17));
        assert_eq!(tally.sent.load(Ordering::Relaxed), 7);
        assert_eq!(tally.received.load(Ordering::Relaxed), 17);
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// A transfer long enough to pass every read-buffer size arrives byte for byte, each way,
    /// and each end sees the other's half-close only after all of its data.
    #[tokio::test]
    async fn a_bulk_transfer_arrives_byte_exact_both_ways() {
        let (mut client, client_side) = duplex(64 * 1024);
        let (upstream_side, mut upstream) = duplex(64 * 1024);
        let tally = Tally::default();
        let request = pattern(12 * 1024 * 1024 + 7, 0x5a);
        let response = pattern(3 * 1024 * 1024 + 11, 0xa5);

        let client_io = async {
            client.write_all(&request).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let upstream_io = async {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&response).await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        };
        let ((moved, result), got_response, got_request) = tokio::join!(
            relay(client_side, upstream_side, &tally),
            client_io,
            upstream_io
        );

        assert!(result.is_ok(), "{result:?}");
        assert!(
            got_request == request,
            "request corrupted ({} bytes)",
            got_request.len()
        );
        assert!(
            got_response == response,
            "response corrupted ({} bytes)",
            got_response.len()
        );
        assert_eq!(moved.sent, request.len() as u64);
        assert_eq!(moved.received, response.len() as u64);
        assert_eq!(tally.sent.load(Ordering::Relaxed), moved.sent);
        assert_eq!(tally.received.load(Ordering::Relaxed), moved.received);
    }

    /// The read buffer grows with what the connection moved: small first, large for bulk.
    #[test]
    fn read_buffers_grow_with_the_bytes_moved() {
        let mut buf = ReadBuffer::default();
        assert_eq!(buf.size, 1024);
        buf.grow(128 * 1024 - 1);
        assert_eq!(buf.size, 1024);
        buf.grow(128 * 1024);
        assert_eq!(buf.size, 16 * 1024 - 64);
        buf.grow(10 * 1024 * 1024);
        assert_eq!(buf.size, 256 * 1024 - 64);
    }
}
