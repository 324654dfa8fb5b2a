//! The node proxy: per-pod listeners and the byte relay between client and upstream.
//!
//! Outbound and inbound paths share one shape: accept, work out where the connection was going,
//! open an [`Upstream`] from inside the right pod's namespace, relay, log. The upstream is where
//! HBONE will slot in: a plain TCP connection today, an HTTP/2 CONNECT stream over mTLS next.
pub mod hbone;
pub mod inbound;
pub mod outbound;

use std::{io, net::SocketAddr, sync::Arc};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{netns::Netns, redirect::Redirector, state::Workload};

/// What every accept loop needs.
pub struct ProxyContext {
    /// The kernel side (original destinations).
    pub redirector: Arc<Redirector>,
    /// The current mesh state.
    pub state: tokio::sync::watch::Receiver<Arc<crate::state::MeshState>>,
    /// Mark for the agent's own sockets, exempting them from redirection.
    pub mark: u32,
    /// Where connections are counted (opened, closed, bytes).
    pub metrics: Arc<crate::telemetry::Metrics>,
}

/// An enrolled pod as the proxy sees it: its workload and its network namespace.
pub struct PodContext {
    /// The workload.
    pub workload: Arc<Workload>,
    /// Its network namespace.
    pub netns: Arc<Netns>,
}

/// Opens a TCP connection to `dst` from inside `netns`, marked so the eBPF programs leave it
/// alone, optionally from a given local address.
pub async fn connect_from(
    netns: &Netns,
    dst: SocketAddr,
    bind: Option<SocketAddr>,
    mark: u32,
) -> io::Result<TcpStream> {
    let socket = netns.run(|| -> io::Result<socket2::Socket> {
        let domain = socket2::Domain::for_address(dst);
        let socket =
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.set_mark(mark)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        if let Some(bind) = bind {
            socket.bind(&bind.into())?;
        }
        Ok(socket)
    })??;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket.connect(dst).await
}

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
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let mut moved = Transferred::default();
    let result = tokio::try_join!(
        copy_one_way(client_read, upstream_write, &mut moved.sent),
        copy_one_way(upstream_read, client_write, &mut moved.received),
    )
    .map(|_| ());
    (moved, result)
}
