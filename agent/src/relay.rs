//! The byte relay every proxy uses: copies both ways between two streams (TCP sockets, HBONE
//! tunnels), passes half-closes through, counts what moved, and stops early when asked (an
//! open connection whose authorization was revoked).
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

async fn copy_one_way<R, W>(mut from: R, mut to: W, moved: &mut u64) -> io::Result<()>
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
    }
}

/// Copies bytes both ways until both directions have ended, passing half-closes through.
/// An error in either direction ends both (the other side would otherwise hang), and the
/// counts then say how far each direction got.
pub async fn relay<C, U>(client: C, upstream: U) -> (Transferred, io::Result<()>)
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let (moved, ended) = relay_until(
        client,
        upstream,
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
                copy_one_way(client_read, upstream_write, &mut moved.sent),
                copy_one_way(upstream_read, client_write, &mut moved.received),
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
