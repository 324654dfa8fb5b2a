//! HBONE: TCP connections carried as HTTP/2 CONNECT streams over mutual TLS 1.3, on port 15008.
//!
//! The wire is Istio ambient's (ztunnel's), so Ambit and ztunnel nodes interoperate; the exact
//! format is in `docs/hbone.md`. Both the node proxy and the waypoint use this module:
//!
//! - [`tls`] builds the rustls configurations from a [`WorkloadCertificate`]: the client checks
//!   the server's SPIFFE identity against an allowed set, the server requires a client
//!   certificate from its own trust domain and exposes the verified peer identity.
//! - [`pool`] opens CONNECT streams ([`HboneStream`]) over pooled, multiplexed HTTP/2
//!   connections, dialled through a caller-supplied [`Dialer`] (so sockets are created inside
//!   the source pod's network namespace).
//! - [`server`] terminates HBONE for one pod: checks the authority, asks an
//!   [`InboundHandler`] to authorize and to connect to the application, relays.
//! - [`client`] is the single-connection layer under the pool (also usable on its own, e.g. for
//!   a tunnel inside a tunnel).
//! - [`headers`] builds and parses the request headers (`baggage`, `forwarded`, `traceparent`).
//!
//! [`WorkloadCertificate`]: crate::identity::WorkloadCertificate
use std::time::Duration;

pub mod client;
pub mod headers;
pub mod pool;
pub mod server;
mod slot;
mod stream;
pub mod tls;

#[cfg(test)]
pub(crate) mod tests;

pub use client::{HboneError, Http2Client, TunnelRequest};
pub use pool::{Dialer, Pool, PoolArgs, PoolConfig, PoolKey};
pub use server::{
    ConnectRequest, ConnectionError, Deny, Destinations, HboneServer, InboundHandler,
    InboundSettings, StreamError, StreamReport,
};
pub use stream::HboneStream;

/// The port every mesh workload accepts HBONE on (ztunnel's); the eBPF programs steer it too.
pub const HBONE_PORT: u16 = ambit_common::INBOUND_HBONE_PORT;

/// HTTP/2 flow-control and framing settings, the same on both ends.
///
/// The defaults are ztunnel's. HTTP/2's own defaults (64 KiB windows, 16 KiB frames) cap a
/// single stream at roughly one window per round trip, far below what a pod-to-pod TCP
/// connection can do; large windows let one tunnelled connection run at link speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http2Config {
    /// Receive window of each stream (`SETTINGS_INITIAL_WINDOW_SIZE`), in bytes.
    pub stream_window: u32,
    /// Receive window of the whole connection, in bytes. Larger than one stream's (4x) so one
    /// stream whose reader stalls cannot starve the others multiplexed beside it.
    pub connection_window: u32,
    /// Largest DATA frame we accept (`SETTINGS_MAX_FRAME_SIZE`), in bytes; HTTP/2 allows
    /// 16 KiB to 16 MiB - 1 (h2 panics outside that range).
    pub max_frame_size: u32,
    /// How often to PING the peer; `None` disables keepalive. A peer that vanished without a
    /// FIN or RST (node down, network cut) is otherwise only noticed when a write times out,
    /// and a pooled connection to it would take every new tunnel into a black hole.
    pub keepalive_interval: Option<Duration>,
    /// How long a PING may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

impl Http2Config {
    /// Completes when the peer stops answering PINGs (never, with keepalive disabled). The
    /// connection must be polled alongside, or no PING goes out and no PONG comes in.
    pub(crate) async fn keepalive(&self, ping_pong: Option<h2::PingPong>) -> String {
        let (Some(interval), Some(mut ping_pong)) = (self.keepalive_interval, ping_pong) else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(interval).await;
            let ping = ping_pong.ping(h2::Ping::opaque());
            match tokio::time::timeout(self.keepalive_timeout, ping).await {
                Ok(Ok(_pong)) => {}
                Ok(Err(err)) => return format!("PING failed: {err}"),
                Err(_) => return format!("no PONG within {:?}", self.keepalive_timeout),
            }
        }
    }
}

/// Largest header block either side accepts: CONNECT requests carry a handful of short headers.
const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// The socket under an HBONE connection's TLS, as both ends wrap it ([`transport`]).
pub(crate) type Transport = tokio::io::BufReader<tokio::net::TcpStream>;

/// Bytes read from an HBONE socket per system call, at most.
const TRANSPORT_READ_BUFFER: usize = 64 * 1024;

/// Wraps an HBONE connection's socket in a read buffer before TLS.
///
/// rustls asks its transport for at most 4 KiB at a time (`read_tls`), so a bare socket would
/// cost four or five `recv` calls per 16 KiB TLS record, a busy tunnel hundreds of thousands a
/// second. Through this buffer one `recv` takes up to 64 KiB and rustls's reads are copies from
/// it. Writes pass straight through (rustls writes whole records, vectored).
pub(crate) fn transport(tcp: tokio::net::TcpStream) -> Transport {
    tokio::io::BufReader::with_capacity(TRANSPORT_READ_BUFFER, tcp)
}

/// Plaintext rustls encrypts ahead of the socket, at most (its default is 64 KiB).
const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Lets rustls take a whole large DATA frame at once: it encrypts up to its buffer limit per
/// write and then writes the records out in one vectored call, so a larger limit means fewer
/// system calls per frame. Memory stays bounded by the limit.
pub(crate) fn size_tls_buffers<D>(conn: &mut rustls::ConnectionCommon<D>) {
    conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
}
