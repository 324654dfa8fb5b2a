//! The byte relay every proxy uses: copies both ways between two streams (TCP sockets, HBONE
//! tunnels), passes half-closes through, counts what moved, and stops early when asked (an
//! open connection whose authorization was revoked).
//!
//! What moved is told to a [`Meter`] as it moves, chunk by chunk (each read, at most 64 KiB),
//! so metrics of a long connection grow while it is open, as ztunnel's do. The cost is one call
//! per chunk next to the two system calls that moved it; the proxies' meter is a few relaxed
//! atomic adds ([`crate::proxy::metrics::ConnectionRecorder`]).
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

async fn copy_one_way<R, W>(
    mut from: R,
    mut to: W,
    moved: &mut u64,
    tell: impl Fn(u64),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the end of this direction on, keep the other one open.
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        *moved += n as u64;
        tell(n as u64);
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
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
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
    client: C,
    upstream: U,
    meter: &impl Meter,
    stop: impl Future<Output = S>,
) -> (Transferred, Relayed<S>)
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let mut moved = Transferred::default();
    let ended = {
        let copy = async {
            tokio::try_join!(
                copy_one_way(client_read, upstream_write, &mut moved.sent, |n| meter
                    .sent(n)),
                copy_one_way(upstream_read, client_write, &mut moved.received, |n| {
                    meter.received(n)
                }),
            )
            .map(|_| ())
        };
        // Both futures are dropped at the end of this block, with the halves they own: the
        // sockets close and `moved` is free to read.
        tokio::select! {
            result = copy => Relayed::Finished(result),
            stopped = stop => Relayed::Stopped(stopped),
        }
    };
    (moved, ended)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::duplex;

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
}
