//! Pooled, multiplexed HBONE connections.
//!
//! Connections are shared by tunnels with the same [`PoolKey`]: same source identity and
//! address, same destination HBONE endpoint, same set of acceptable server identities. Each
//! connection carries at most [`PoolConfig::max_streams_per_connection`] tunnels at once; past
//! that a new connection is opened. A connection that has carried no stream for
//! [`PoolConfig::idle_timeout`] is closed (GOAWAY, then TCP close).
//!
//! Sockets are opened by a caller-supplied [`Dialer`], so the agent can create them inside the
//! source pod's network namespace with its mark.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    HboneStream, Http2Config,
    client::{self, HboneError, Http2Client, TunnelRequest},
    slot::{ConnShared, Slot, lock},
    tls,
};
use crate::identity::{SpiffeId, WorkloadCertificate};

/// Opens the TCP connection under a new HBONE connection.
///
/// Implemented for closures `Fn(&PoolKey) -> impl Future<Output = io::Result<TcpStream>>`, e.g.
/// one that calls [`crate::proxy::connect_from`] in the namespace of the pod owning
/// `key.source_ip()`.
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `key.destination()`.
    fn dial(&self, key: &PoolKey) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;
}

impl<F, Fut> Dialer for F
where
    F: Fn(&PoolKey) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<TcpStream>> + Send + 'static,
{
    fn dial(&self, key: &PoolKey) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> {
        Box::pin(self(key))
    }
}

/// Which tunnels may share a connection.
///
/// The source address is part of the key (as in ztunnel): the server sees the connection's TCP
/// source as the client's address for policy, so tunnels of two pods must never share one even
/// when the pods run as the same identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    source: SpiffeId,
    source_ip: IpAddr,
    destination: SocketAddr,
    destination_ids: Vec<SpiffeId>,
}

impl PoolKey {
    /// Tunnels from `source` (running at `source_ip`) to the HBONE endpoint `destination`
    /// (`<pod or waypoint IP>:15008`), whose certificate must carry one of `destination_ids`.
    pub fn new(
        source: SpiffeId,
        source_ip: IpAddr,
        destination: SocketAddr,
        mut destination_ids: Vec<SpiffeId>,
    ) -> Self {
        // The same set in another order must find the same connections.
        destination_ids.sort();
        destination_ids.dedup();
        Self {
            source,
            source_ip,
            destination,
            destination_ids,
        }
    }

    /// The client identity.
    pub fn source(&self) -> &SpiffeId {
        &self.source
    }

    /// The client pod's address.
    pub fn source_ip(&self) -> IpAddr {
        self.source_ip
    }

    /// The HBONE endpoint.
    pub fn destination(&self) -> SocketAddr {
        self.destination
    }

    /// The server identities accepted, sorted.
    pub fn destination_ids(&self) -> &[SpiffeId] {
        &self.destination_ids
    }
}

/// Pool tuning. The defaults are ztunnel's.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Most tunnels one connection carries at once; more open a new connection. Spreading
    /// streams keeps one busy connection from becoming every tunnel's bottleneck (one TCP
    /// congestion window, head-of-line blocking on loss).
    pub max_streams_per_connection: usize,
    /// A connection with no tunnel for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on dialling, both handshakes and the CONNECT response together.
    pub connect_timeout: Duration,
    /// HTTP/2 settings.
    pub http2: Http2Config,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            http2: Http2Config::default(),
        }
    }
}

/// The pool's command-line flags, the same on the node agent and the waypoint (both pool
/// their HBONE connections to peers).
#[derive(Clone, Debug, clap::Args)]
pub struct PoolArgs {
    /// Most tunnels one pooled HBONE connection carries at once; more open another connection
    /// to the same peer (ztunnel's `POOL_MAX_STREAMS_PER_CONNECTION`).
    #[arg(
        long,
        env = "AMBIT_HBONE_MAX_STREAMS_PER_CONNECTION",
        default_value_t = PoolConfig::default().max_streams_per_connection,
        value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..), usize::from),
    )]
    pub hbone_max_streams_per_connection: usize,
}

impl PoolArgs {
    /// The pool's configuration: ztunnel's defaults, with what the flags set.
    pub fn config(&self) -> PoolConfig {
        PoolConfig {
            max_streams_per_connection: self.hbone_max_streams_per_connection,
            ..PoolConfig::default()
        }
    }
}

/// The HBONE connection pool. Cheap to clone; clones share connections.
///
/// Dropping the last clone lets idle connections close; connections carrying tunnels stay up
/// until their last tunnel ends.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    dialer: Box<dyn Dialer>,
    config: PoolConfig,
    entries: Mutex<HashMap<PoolKey, Arc<Entry>>>,
}

/// The connections of one key.
#[derive(Default)]
struct Entry {
    conns: Mutex<Vec<PooledConn>>,
    /// Held while dialling, so a burst of tunnels to a new destination opens one connection
    /// rather than one each; waiters then find room on it.
    dialing: tokio::sync::Mutex<()>,
}

struct PooledConn {
    client: Http2Client,
    shared: Arc<ConnShared>,
}

impl Entry {
    /// A stream on an existing connection with room, dropping connections found dead.
    fn claim(&self) -> Option<(Http2Client, Slot)> {
        let mut conns = lock(&self.conns);
        conns.retain(|conn| !conn.shared.is_closed());
        for conn in conns.iter() {
            let Some(slot) = conn.shared.try_claim() else {
                continue;
            };
            if conn.client.is_usable() {
                return Some((conn.client.clone(), slot));
            }
            // GOAWAY received or closed: the driver will notice too; stop offering it now.
            conn.shared.close();
        }
        None
    }
}

impl Pool {
    /// A pool opening its connections through `dialer`.
    pub fn new(dialer: impl Dialer, config: PoolConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                dialer: Box::new(dialer),
                config,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Opens a tunnel: a CONNECT stream on a pooled connection for `key`, or on a new one
    /// (authenticated with `source`, which must be `key.source()`'s certificate).
    ///
    /// A non-200 answer is [`HboneError::Status`]; the connection stays pooled.
    pub async fn open(
        &self,
        key: &PoolKey,
        source: &WorkloadCertificate,
        request: &TunnelRequest,
    ) -> Result<HboneStream, HboneError> {
        if source.id != key.source {
            return Err(HboneError::SourceMismatch {
                certificate: Box::new(source.id.clone()),
                source_id: Box::new(key.source.clone()),
            });
        }
        let timeout = self.inner.config.connect_timeout;
        tokio::time::timeout(timeout, self.open_inner(key, source, request))
            .await
            .map_err(|_| HboneError::Timeout(timeout))?
    }

    async fn open_inner(
        &self,
        key: &PoolKey,
        source: &WorkloadCertificate,
        request: &TunnelRequest,
    ) -> Result<HboneStream, HboneError> {
        let entry = self.inner.entry(key);
        // A pooled connection can start closing between our check and our request; then the
        // request never reached the server and one more try (on a fresh connection, since the
        // dead one is no longer offered) is safe.
        let mut retried = false;
        loop {
            let (client, slot) = self.checkout(key, &entry, source).await?;
            match client.open(request, Some(slot)).await {
                Err(err) if err.is_retryable() && !retried => {
                    debug!(peer = %key.destination, %err, "pooled HBONE connection unusable, retrying");
                    retried = true;
                }
                result => return result,
            }
        }
    }

    async fn checkout(
        &self,
        key: &PoolKey,
        entry: &Entry,
        source: &WorkloadCertificate,
    ) -> Result<(Http2Client, Slot), HboneError> {
        if let Some(found) = entry.claim() {
            return Ok(found);
        }
        let _dialing = entry.dialing.lock().await;
        // Whoever dialled before us may have left room.
        if let Some(found) = entry.claim() {
            return Ok(found);
        }
        let (conn, slot) = self.establish(key, source).await?;
        let client = conn.client.clone();
        lock(&entry.conns).push(conn);
        Ok((client, slot))
    }

    /// Dials, handshakes, and starts the connection's driver task.
    async fn establish(
        &self,
        key: &PoolKey,
        source: &WorkloadCertificate,
    ) -> Result<(PooledConn, Slot), HboneError> {
        let config = &self.inner.config;
        let tls_config = tls::client_config(source, &key.destination_ids)?;
        let peer = key.destination;
        let tcp = self
            .inner
            .dialer
            .dial(key)
            .await
            .map_err(|source| HboneError::Connect { peer, source })?;
        // Small writes (handshakes, headers, interactive traffic) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let mut tls = client::connect_tls(super::transport(tcp), tls_config, peer).await?;
        super::size_tls_buffers(tls.get_mut().1);
        let max_streams = config.max_streams_per_connection.max(1);
        let (client, connection) = client::handshake(tls, &config.http2, max_streams, peer).await?;
        let (shared, slot) = ConnShared::new(max_streams);
        debug!(%peer, source = %key.source, "HBONE connection established");
        tokio::spawn(drive(
            connection,
            shared.clone(),
            config.clone(),
            Arc::downgrade(&self.inner),
            key.clone(),
        ));
        Ok((PooledConn { client, shared }, slot))
    }

    /// Connections currently pooled and open (for the admin dump and tests).
    pub fn connection_count(&self) -> usize {
        self.inner
            .snapshot()
            .iter()
            .filter(|conn| !conn.is_closed())
            .count()
    }

    /// Tunnels currently open over pooled connections.
    pub fn stream_count(&self) -> usize {
        self.inner.snapshot().iter().map(|conn| conn.active()).sum()
    }
}

impl Inner {
    fn entry(&self, key: &PoolKey) -> Arc<Entry> {
        lock(&self.entries).entry(key.clone()).or_default().clone()
    }

    fn snapshot(&self) -> Vec<Arc<ConnShared>> {
        let entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
        entries
            .iter()
            .flat_map(|entry| {
                lock(&entry.conns)
                    .iter()
                    .map(|c| c.shared.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Forgets a connection that ended; drops the key's entry when nothing else uses it.
    fn remove(&self, key: &PoolKey, shared: &Arc<ConnShared>) {
        let mut entries = lock(&self.entries);
        let Some(entry) = entries.get(key) else {
            return;
        };
        let empty = {
            let mut conns = lock(&entry.conns);
            conns.retain(|conn| !Arc::ptr_eq(&conn.shared, shared));
            conns.is_empty()
        };
        // Another holder of the entry may be dialling into it right now: keep it for them.
        let unused = empty && Arc::strong_count(entry) == 1;
        if unused {
            entries.remove(key);
        }
    }
}

/// Runs one pooled connection until the peer closes it, it fails, stops answering PINGs, or
/// idles out.
async fn drive<IO>(
    mut connection: h2::client::Connection<IO, Bytes>,
    shared: Arc<ConnShared>,
    config: PoolConfig,
    pool: Weak<Inner>,
    key: PoolKey,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let keepalive = config.http2.keepalive(connection.ping_pong());
    tokio::pin!(connection);
    let idled_out = tokio::select! {
        result = &mut connection => {
            if let Err(err) = result {
                debug!(peer = %key.destination, %err, "HBONE connection ended with an error");
            }
            false
        }
        failure = keepalive => {
            // Dropping the connection below resets its tunnels, which are as dead as it is.
            warn!(peer = %key.destination, %failure, "HBONE peer unresponsive, dropping connection");
            false
        }
        () = shared.idle_expired(config.idle_timeout) => true,
    };
    shared.close();
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, &shared);
    }
    if idled_out {
        debug!(peer = %key.destination, "closing idle HBONE connection");
        // The pool no longer holds the connection's last request handle, so h2 sends GOAWAY
        // and completes; the bound covers a peer that never answers.
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    }
}
