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
//!   connection exchanging small requests reads 1 KiB at a time, a bulk transfer up to 256 KiB
//!   per system call (fewer system calls, fewer wake-ups, larger DATA frames). A buffer is held
//!   only while there is something to read or write, and sizes above the smallest come from
//!   the node's budget, under the connection's source ([`crate::limits::BufferShare`]): a pod
//!   cannot grow the agent's memory by holding many grown connections open.
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

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::limits::{BufferGrant, BufferShare};

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
        consume(chunk, n);
        Poll::Ready(Ok(n))
    }
}

/// Drops the first `n` bytes of `chunk`. Once none are left, `chunk` no longer refers to the
/// buffer it came from: `Bytes::advance` would keep that buffer alive, and a connection that
/// then idles would pin it for as long as it lasts (a tunnel's last DATA frame pinned one of
/// h2's 8 KiB read buffers; docs/perf/README.md, "What a held tunnel pins").
pub(crate) fn consume(chunk: &mut Bytes, n: usize) {
    // `split_to` of the whole leaves an empty `Bytes` that owns nothing.
    drop(chunk.split_to(n));
}

impl Relayable for tokio::net::TcpStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        buf.poll_read_socket(self, cx)
    }
}

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
/// once; a tunnel holds a chunk until it is encrypted), and given back when there is nothing to
/// read: an idle connection holds no buffer. Sizes above the smallest are granted by the node's
/// budget ([`BufferShare`]); when it has no room the read takes the largest size that fits.
pub struct ReadBuffer {
    buf: BytesMut,
    /// The size the bytes moved call for.
    size: usize,
    /// The size granted to the buffer held now (0: none held).
    granted: usize,
    grant: Option<BufferGrant>,
    share: BufferShare,
}

impl std::fmt::Debug for ReadBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBuffer")
            .field("size", &self.size)
            .field("granted", &self.granted)
            .finish_non_exhaustive()
    }
}

impl ReadBuffer {
    /// An empty buffer of the smallest size, growing with what `share` grants.
    pub fn new(share: BufferShare) -> Self {
        Self {
            buf: BytesMut::new(),
            size: SIZES[0].1,
            granted: 0,
            grant: None,
            share,
        }
    }

    /// Reads what `from` has (at most the buffer's current size) and hands it out.
    pub fn poll_read<R: AsyncRead + ?Sized>(
        &mut self,
        from: Pin<&mut R>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Bytes>> {
        self.prepare();
        match tokio_util::io::poll_read_buf(from, cx, &mut self.buf) {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(self.buf.split().freeze())),
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                self.release();
                Poll::Pending
            }
        }
    }

    /// [`ReadBuffer::poll_read`] for a socket: the buffer is taken only once the socket is
    /// readable, and given back while it is not.
    pub fn poll_read_socket(
        &mut self,
        socket: &tokio::net::TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Bytes>> {
        loop {
            if socket.poll_read_ready(cx)?.is_pending() {
                self.release();
                return Poll::Pending;
            }
            self.prepare();
            match socket.try_read_buf(&mut self.buf) {
                Ok(_) => return Poll::Ready(Ok(self.buf.split().freeze())),
                // Readiness was stale: wait for the next.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }

    /// Room for the next read: the size called for, or the largest the budget grants.
    fn prepare(&mut self) {
        if self.granted < self.size {
            // Give back what is held before asking for more, so a source at its share can
            // trade its grant for a larger one.
            self.grant = None;
            let mut refused = None;
            let fits = SIZES
                .iter()
                .rev()
                .map(|(_, size)| *size)
                .filter(|size| *size <= self.size);
            for size in fits {
                if size == SIZES[0].1 {
                    (self.granted, self.grant) = (size, None);
                    break;
                }
                match self.share.grant(size) {
                    Ok(grant) => {
                        (self.granted, self.grant) = (size, Some(grant));
                        break;
                    }
                    Err(limit) => {
                        refused.get_or_insert(limit);
                    }
                }
            }
            if let Some(limit) = refused {
                self.share.shrunk(limit);
            }
        }
        self.buf.reserve(self.granted);
    }

    /// Gives the buffer and its grant back (nothing to read now).
    fn release(&mut self) {
        self.buf = BytesMut::new();
        self.grant = None;
        self.granted = 0;
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
    fn new(buffers: &BufferShare) -> Self {
        Self {
            buf: ReadBuffer::new(buffers.clone()),
            pending: Bytes::new(),
            moved: 0,
            unflushed: false,
            read_done: false,
            done: false,
        }
    }

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
/// telling `meter` of each chunk moved, reading into buffers granted from `buffers`. An error
/// in either direction ends both (the other side would otherwise hang), and the counts then say
/// how far each direction got (the sums of what `meter` was told).
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    meter: &impl Meter,
    buffers: &BufferShare,
) -> (Transferred, io::Result<()>)
where
    C: Relayable,
    U: Relayable,
{
    let (moved, ended) = relay_until(
        client,
        upstream,
        meter,
        buffers,
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
    buffers: &BufferShare,
    stop: impl Future<Output = S>,
) -> (Transferred, Relayed<S>)
where
    C: Relayable,
    U: Relayable,
{
    let mut sent = OneWay::new(buffers);
    let mut received = OneWay::new(buffers);
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
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

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

    /// Hands over one chunk, then has nothing more (an idle tunnel); writes are taken whole.
    struct OneChunk(Option<Bytes>);

    impl AsyncRead for OneChunk {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for OneChunk {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Relayable for OneChunk {
        fn poll_read_chunk(
            &mut self,
            _: &mut Context<'_>,
            _: &mut ReadBuffer,
        ) -> Poll<io::Result<Bytes>> {
            match self.0.take() {
                Some(chunk) => Poll::Ready(Ok(chunk)),
                None => Poll::Pending,
            }
        }
    }

    /// Once a chunk is written on, an idle relay holds nothing of the buffer it came from: a
    /// tunnel's last DATA frame pinned h2's read buffer for as long as the connection idled.
    #[tokio::test]
    async fn an_idle_relay_keeps_no_part_of_the_last_chunk() {
        let buffer = Bytes::from(vec![7u8; 8192]);
        let (sink, mut peer) = duplex(64 * 1024);
        let source = OneChunk(Some(buffer.slice(100..1100)));
        let buffers = BufferShare::unlimited();
        let relayed =
            tokio::spawn(async move { relay(source, sink, &Tally::default(), &buffers).await });
        let mut got = vec![0u8; 1000];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, vec![7u8; 1000]);
        // The relay is still running (both sides open); only the buffer's owner is left.
        let mut unique = buffer.is_unique();
        for _ in 0..100 {
            if unique {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            unique = buffer.is_unique();
        }
        assert!(!relayed.is_finished());
        assert!(unique, "the idle relay still refers to the chunk's buffer");
        relayed.abort();
    }

    /// The meter hears of every chunk as soon as it is passed on, while both sides are still
    /// open, and the totals at the end are what it heard.
    #[tokio::test]
    async fn the_meter_counts_while_the_connection_is_open() {
        let (mut client, client_side) = duplex(1024);
        let (upstream_side, mut upstream) = duplex(1024);
        let tally = Tally::default();
        let buffers = BufferShare::unlimited();
        let relay = relay(client_side, upstream_side, &tally, &buffers);
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
        let buffers = BufferShare::unlimited();
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
            relay(client_side, upstream_side, &tally, &buffers),
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

    /// A connected pair of loopback sockets: (the side a test drives, the side the relay gets).
    async fn socket_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (outside, accepted) = tokio::join!(
            tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (outside.unwrap(), accepted.unwrap().0)
    }

    /// Waits until the budget holds what `done` accepts, or fails after 5 s saying what it held.
    async fn held_until(limits: &crate::limits::Limits, what: &str, done: impl Fn(usize) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let held = limits.snapshot().relay_buffer_bytes;
            if done(held) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: the relays still hold {held} bytes of buffers"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Four bulk transfers of one source whose destinations stop reading: each relay holds a
    /// chunk it cannot write, and together they hold no more than the source's share (the rest
    /// read with the smallest buffer, counted); once the destinations read again every byte
    /// arrives, and connections left open but idle hold no buffer at all.
    #[tokio::test]
    async fn stalled_and_idle_connections_hold_no_more_than_their_share() {
        use crate::limits::{LimitSettings, Limits};
        const FIRST: usize = 11 * 1024 * 1024;
        const TOTAL: usize = 14 * 1024 * 1024;
        let settings = LimitSettings::for_descriptors(20_000)
            .with_relay_buffer_mib(Some(1))
            .unwrap();
        let share = settings.max_relay_buffer_bytes_per_source;
        let limits = Arc::new(Limits::new(settings));
        let buffers = limits.buffer_share("10.0.0.1".parse().unwrap());

        let mut ends = Vec::new();
        for seed in 0..4u8 {
            let (mut client, client_side) = socket_pair().await;
            let (upstream_side, mut upstream) = socket_pair().await;
            // Small socket buffers toward the destination, so that the relay, not the kernel,
            // is left holding what the destination does not read.
            socket2::SockRef::from(&upstream_side)
                .set_send_buffer_size(64 * 1024)
                .unwrap();
            socket2::SockRef::from(&upstream)
                .set_recv_buffer_size(64 * 1024)
                .unwrap();
            let buffers = buffers.clone();
            let relay =
                tokio::spawn(async move { relay(client_side, upstream_side, &(), &buffers).await });
            let data = pattern(TOTAL, seed);
            let writer = tokio::spawn(async move {
                client.write_all(&data).await.unwrap();
                client
            });
            // Enough to grow the relay's buffer to its largest, then nothing for a while.
            let mut got = vec![0u8; FIRST];
            upstream.read_exact(&mut got).await.unwrap();
            ends.push((relay, writer, upstream, got, seed));
        }
        held_until(&limits, "stalled", |held| held > 0).await;
        // Let every relay fill the sockets and stop on a chunk it cannot write.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let snapshot = limits.snapshot();
        assert!(
            snapshot.relay_buffer_bytes <= share,
            "four stalled relays of one source hold {} bytes, over its share of {share}",
            snapshot.relay_buffer_bytes
        );
        assert!(
            matches!(snapshot.relay_buffers_shrunk.as_slice(), [(crate::limits::Limit::PerSource, n)] if *n > 0),
            "no read was shrunk: {:?}",
            snapshot.relay_buffers_shrunk
        );

        let mut open = Vec::new();
        for (relay, writer, mut upstream, mut got, seed) in ends {
            let mut rest = vec![0u8; TOTAL - FIRST];
            upstream.read_exact(&mut rest).await.unwrap();
            got.extend_from_slice(&rest);
            assert!(got == pattern(TOTAL, seed), "transfer {seed} corrupted");
            open.push((relay, writer.await.unwrap(), upstream));
        }
        held_until(&limits, "idle, connections open", |held| held == 0).await;
        for (relay, mut client, mut upstream) in open {
            assert!(
                !relay.is_finished(),
                "a relay ended while both sides were open"
            );
            client.shutdown().await.unwrap();
            upstream.shutdown().await.unwrap();
            let (moved, result) = relay.await.unwrap();
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(moved.sent, TOTAL as u64);
        }
        assert_eq!(limits.snapshot().relay_buffer_bytes, 0);
    }

    /// The read buffer grows with what the connection moved: small first, large for bulk.
    #[test]
    fn read_buffers_grow_with_the_bytes_moved() {
        let mut buf = ReadBuffer::new(BufferShare::unlimited());
        assert_eq!(buf.size, 1024);
        buf.grow(128 * 1024 - 1);
        assert_eq!(buf.size, 1024);
        buf.grow(128 * 1024);
        assert_eq!(buf.size, 16 * 1024 - 64);
        buf.grow(10 * 1024 * 1024);
        assert_eq!(buf.size, 256 * 1024 - 64);
    }
}
