//! The waypoint's upstream HTTP connection pool, with Envoy's circuit breakers (Istio's
//! DestinationRule `trafficPolicy.connectionPool`).
//!
//! Each upstream HTTP connection is a hyper client connection (`hyper::client::conn`) inside
//! one HBONE CONNECT stream to an endpoint (opened by `Waypoint::open`, the one way to open an
//! upstream). Connections are kept per [`ConnKey`] (the endpoint, the tunnel's metadata and the
//! HTTP version): an HTTP/1.1 connection carries one request at a time and goes back to the
//! idle list when its response has been read to the end (keep-alive); an HTTP/2 connection
//! multiplexes every request of its key. A connection is closed when it has been unused for
//! `idleTimeout`, or has carried `maxRequestsPerConnection` requests. hyper-util's legacy
//! `Client` was not used because its connector would have to open HBONE streams keyed by more
//! than a URI, and it has no pending-request bound: the pool is small and does what Envoy's does.
//!
//! Limits are per cluster (a destination service, or one subset of it), as Envoy's circuit
//! breakers: `maxConnections` connections open at once over all endpoints, `http2MaxRequests`
//! requests in flight, and `http1MaxPendingRequests` requests waiting for a connection. A
//! request over a limit is not queued: the caller answers 503 with flag `UO` at once. Waiting
//! requests are bounded by that limit; each waits until a connection frees up or its route's
//! timeout expires.
//!
//! A pooled tunnel carries the requests of many clients, so its `forwarded: for=` names the
//! waypoint itself (the clients are the waypoint's downstreams; the endpoint's agent authorizes
//! the waypoint's identity). An HTTP/1.1 connection is closed by ending its tunnel in both
//! directions (END_STREAM, then the endpoint's EOF), not by resetting it.
use std::{
    collections::HashMap,
    error::Error as StdError,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, combinators::UnsyncBoxBody};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
    time::Instant,
};
use tracing::debug;

use super::{idle, retry::Failure};
use crate::{
    hbone::{HboneStream, PoolKey},
    state::upstream::ConnectionPool,
    telemetry::metrics::Metrics,
};

/// The body of every request sent through the pool.
pub type UpstreamBody = UnsyncBoxBody<Bytes, Box<dyn StdError + Send + Sync>>;

/// How long a closing HTTP/1.1 connection waits for the endpoint's end of the tunnel.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Most requests in flight on one upstream HTTP/2 connection; the next opens another (within
/// `maxConnections`), as Envoy's `max_concurrent_streams` (whose default, 2^31 - 1, leaves
/// it to the endpoint) would with a real bound. Not the HBONE pool's
/// `--hbone-max-streams-per-connection` ([`crate::hbone::PoolArgs`]), one layer down: that
/// caps the tunnels of one HBONE connection, each tunnel carrying one of these connections.
const MAX_STREAMS_PER_CONNECTION: usize = 100;

/// The receive window of each upstream HTTP/2 stream: the most of one response buffered while
/// its client does not read it. 256 KiB, not hyper's 2 MiB: every request in flight may hold
/// it, so it is what a waypoint's memory grows by per unread response (until the stream idle
/// timeout), and it still carries over 1 GB/s per stream at a cluster's round trip.
const UPSTREAM_STREAM_WINDOW: u32 = 256 * 1024;

/// The receive window of an upstream HTTP/2 connection: room for every stream's full window, so
/// clients that stop reading their responses hold only their own streams' windows and never
/// stall the others multiplexed with them (with hyper's 5 MiB default, three did). Memory stays
/// bounded by the stream windows of the requests in flight.
const UPSTREAM_CONNECTION_WINDOW: u32 = UPSTREAM_STREAM_WINDOW * MAX_STREAMS_PER_CONNECTION as u32;

/// hyper's HTTP/2 client as the pool configures it for an upstream connection.
fn http2_client() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(UPSTREAM_STREAM_WINDOW)
        .initial_connection_window_size(UPSTREAM_CONNECTION_WINDOW);
    builder
}

/// Which requests may share a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The cluster's name: each cluster has its own connections, as Envoy's.
    pub cluster: String,
    /// The HBONE connection the tunnel rides on (identities, the endpoint's 15008).
    pub hbone: PoolKey,
    /// The endpoint's address and port (the tunnel's `:authority`).
    pub target: SocketAddr,
    /// The service hostname the tunnel names (`forwarded: ;host=`).
    pub service_host: String,
    /// HTTP/2 (multiplexed) or HTTP/1.1.
    pub http2: bool,
}

/// The cluster a request is counted in: its name and metric labels.
#[derive(Clone, Debug)]
pub struct ClusterId {
    /// `namespace/name` or `namespace/name|subset`.
    pub name: String,
    /// The service's hostname (label `destination_service`).
    pub service: String,
    /// The subset's name, or empty (label `subset`).
    pub subset: String,
}

/// Which limit a request overflowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// `http2MaxRequests` (Envoy's `max_requests`).
    Requests,
    /// `http1MaxPendingRequests` (Envoy's `max_pending_requests`), reached because all
    /// `maxConnections` were busy.
    Pending,
}

impl Overflow {
    fn as_str(self) -> &'static str {
        match self {
            Overflow::Requests => "max_requests",
            Overflow::Pending => "max_pending_requests",
        }
    }
}

/// The pool shared by every request of a waypoint.
pub struct HttpPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Connections by key. Entries are removed when their last connection closes.
    hosts: Mutex<HashMap<ConnKey, Host>>,
    /// Limits' counters by cluster name (one entry per cluster requests went to: bounded by
    /// the configuration).
    clusters: Mutex<HashMap<String, Arc<Cluster>>>,
    next_id: AtomicU64,
    metrics: PoolMetrics,
}

#[derive(Default)]
struct Host {
    /// HTTP/1.1 connections ready for a request, most recently used last.
    idle: Vec<(http1::SendRequest<UpstreamBody>, Arc<ConnState>)>,
    /// HTTP/2 connections.
    multiplexed: Vec<(http2::SendRequest<UpstreamBody>, Arc<ConnState>)>,
    /// HTTP/2 connections being opened (requests wait for them rather than open more).
    connecting: usize,
}

/// One cluster's counters, and the signal that one of its connections freed up.
struct Cluster {
    id: ClusterId,
    counts: Mutex<Counts>,
    freed: Notify,
}

#[derive(Default)]
struct Counts {
    connections: u32,
    pending: u32,
    requests: u32,
}

/// What the pool knows of one connection.
struct ConnState {
    id: u64,
    /// Requests started on it.
    requests: AtomicU32,
    /// Requests in flight on it.
    in_use: AtomicUsize,
    /// Since when nothing has been in flight.
    idle_since: Mutex<Instant>,
    /// Taken out of the pool: no new request.
    closing: AtomicBool,
    /// The cluster it counts in.
    cluster: Arc<Cluster>,
}

impl ConnState {
    fn new(id: u64, cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            id,
            requests: AtomicU32::new(0),
            in_use: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            closing: AtomicBool::new(false),
        }
    }

    /// Whether a new request may use it, under `maxRequestsPerConnection` `max` (0: no
    /// limit; the cluster's limit now, which a configuration change may have lowered).
    fn usable(&self, max: u32) -> bool {
        let exhausted = max != 0 && self.requests.load(Ordering::Relaxed) >= max;
        !self.closing.load(Ordering::Relaxed) && !exhausted
    }

    fn start(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_use.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(&self) -> usize {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.in_use.fetch_sub(1, Ordering::Relaxed) - 1
    }

    /// When it will have been idle for `timeout`, if nothing starts before.
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        if self.in_use.load(Ordering::Relaxed) > 0 {
            return Instant::now() + timeout;
        }
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + timeout
    }
}

/// A sender taken from the pool for one request.
enum Sender {
    Http1(http1::SendRequest<UpstreamBody>),
    Http2(http2::SendRequest<UpstreamBody>),
}

/// One request's claim on a connection and on its cluster's request count; given back when
/// the response has been read to its end, or dropped.
struct Lease {
    inner: Arc<Inner>,
    key: ConnKey,
    conn: Arc<ConnState>,
    /// Held in a mutex only so that the response body is `Sync`.
    sender: Mutex<Option<Sender>>,
    /// The response was read to its end: an HTTP/1.1 connection may be reused.
    completed: AtomicBool,
    /// The cluster's `maxRequestsPerConnection`.
    max_per_connection: u32,
    _request: RequestSlot,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let in_use = self.conn.finish();
        let sender = self
            .sender
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match sender {
            Some(Sender::Http1(sender))
                if self.completed.load(Ordering::Relaxed)
                    && self.conn.usable(self.max_per_connection) =>
            {
                let (inner, key, conn) = (self.inner.clone(), self.key.clone(), self.conn.clone());
                if sender.is_ready() {
                    inner.give_back(key, sender, conn);
                } else {
                    // hyper readies the connection once it has seen the response's end.
                    tokio::spawn(async move {
                        let mut sender = sender;
                        if sender.ready().await.is_ok() {
                            inner.give_back(key, sender, conn);
                        }
                    });
                }
            }
            // An HTTP/1.1 connection whose response was not read to its end cannot be reused:
            // dropping its sender closes it.
            Some(Sender::Http1(_)) | None => {}
            Some(Sender::Http2(_)) => {
                if in_use == 0 && !self.conn.usable(self.max_per_connection) {
                    self.inner.forget(&self.key, self.conn.id);
                }
                self.conn.cluster.freed.notify_waiters();
            }
        }
    }
}

/// A cluster's count of requests in flight, held by one request.
struct RequestSlot(Arc<Cluster>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.counts().requests -= 1;
    }
}

/// A cluster's count of open connections, held by one connection's task.
struct ConnectionSlot {
    cluster: Arc<Cluster>,
    metrics: IntGaugeVec,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.cluster.counts().connections -= 1;
        self.metrics.with_label_values(&self.cluster.labels()).dec();
        self.cluster.freed.notify_waiters();
    }
}

/// A request counted as waiting for a connection.
struct PendingSlot {
    cluster: Arc<Cluster>,
    metrics: IntGaugeVec,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.cluster.counts().pending -= 1;
        self.metrics.with_label_values(&self.cluster.labels()).dec();
    }
}

impl Cluster {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn labels(&self) -> [&str; 2] {
        [&self.id.service, &self.id.subset]
    }
}

/// A response body that gives its connection back to the pool when it ends.
pub struct PooledBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.complete(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        // A reader that knows the length may stop here without polling for the end.
        if end && let Some(lease) = &self.lease {
            lease.completed.store(true, Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl PooledBody {
    /// The response was read to its end: the connection goes back to the pool.
    fn complete(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.completed.store(true, Ordering::Relaxed);
        }
    }
}

/// The metrics of the pool (Envoy's `upstream_cx_*` and overflow counters).
struct PoolMetrics {
    connections: IntGaugeVec,
    opened: IntCounterVec,
    pending: IntGaugeVec,
    overflows: IntCounterVec,
}

impl PoolMetrics {
    fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let labels = ["destination_service", "subset"];
        let connections = IntGaugeVec::new(
            Opts::new(
                "ambit_waypoint_upstream_connections",
                "Upstream HTTP connections open, by destination service and subset",
            ),
            &labels,
        )?;
        let opened = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_upstream_connections_total",
                "Upstream HTTP connections opened, by destination service and subset",
            ),
            &labels,
        )?;
        let pending = IntGaugeVec::new(
            Opts::new(
                "ambit_waypoint_upstream_pending_requests",
                "Requests waiting for an upstream connection, by destination service and subset",
            ),
            &labels,
        )?;
        let overflows = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_upstream_overflow_total",
                "Requests answered 503 UO because a connection pool limit was reached, by \
                 destination service, subset and limit",
            ),
            &["destination_service", "subset", "limit"],
        )?;
        metrics.register(Box::new(connections.clone()))?;
        metrics.register(Box::new(opened.clone()))?;
        metrics.register(Box::new(pending.clone()))?;
        metrics.register(Box::new(overflows.clone()))?;
        Ok(Self {
            connections,
            opened,
            pending,
            overflows,
        })
    }
}

/// Where one request goes.
pub struct Target<'a> {
    /// The connections it may use.
    pub key: ConnKey,
    /// The cluster it counts in.
    pub cluster: &'a ClusterId,
    /// The cluster's limits.
    pub limits: &'a ConnectionPool,
    /// How long the request's stream may see no byte in either direction ([`super::idle`]).
    pub stream_idle_timeout: Duration,
}

impl HttpPool {
    /// An empty pool whose metrics are registered in `metrics`.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                hosts: Mutex::default(),
                clusters: Mutex::default(),
                next_id: AtomicU64::new(0),
                metrics: PoolMetrics::new(metrics)?,
            }),
        })
    }

    /// Connections open (every key).
    pub fn connection_count(&self) -> usize {
        self.inner
            .clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|c| c.counts().connections as usize)
            .sum()
    }

    /// Sends `request` on a pooled connection of `target`, opening one with `open()` (a new
    /// tunnel) when none is free and the limits allow. A limit reached answers
    /// [`Failure::Overflow`] at once. Once sent, the request's stream is bounded by the stream
    /// idle timeout ([`super::idle`]).
    ///
    /// `open` makes the tunnel's future only when it is needed, and the connection's set-up is
    /// boxed: a future's state is as large as its largest phase, and the request's task holds
    /// it until the response ends. Inline, the unstarted tunnel and the set-up made this future
    /// 30 KiB and every waypoint request's task 37 KiB; now 2 KiB and 12 KiB (debug build,
    /// `-Zprint-type-sizes`).
    pub async fn send<O, F>(
        &self,
        target: Target<'_>,
        open: O,
        request: Request<UpstreamBody>,
    ) -> Result<Response<idle::ResponseBody<PooledBody>>, Failure>
    where
        O: FnOnce() -> F,
        F: Future<Output = Result<HboneStream, String>>,
    {
        let inner = &self.inner;
        let cluster = inner.cluster(target.cluster);
        let limits = target.limits;
        let request_slot = {
            let mut counts = cluster.counts();
            if counts.requests >= limits.max_requests {
                drop(counts);
                return Err(inner.overflow(&cluster, Overflow::Requests));
            }
            counts.requests += 1;
            RequestSlot(cluster.clone())
        };
        let mut open = Some(open);
        let mut pending: Option<PendingSlot> = None;
        let (sender, conn) = loop {
            let freed = cluster.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so that a connection freed meanwhile wakes us.
            freed.as_mut().enable();
            if let Some(taken) = inner.take(&target.key, limits.max_requests_per_connection) {
                break taken;
            }
            let connecting_h2 = target.key.http2 && inner.h2_connecting(&target.key);
            let slot = if connecting_h2 {
                None
            } else {
                inner.connection_slot(&cluster, limits.max_connections)
            };
            if let Some(slot) = slot {
                drop(pending.take());
                let Some(open) = open.take() else {
                    unreachable!("a request opens at most one connection");
                };
                break Box::pin(inner.connect(&target, &cluster, slot, open())).await?;
            }
            if pending.is_none() {
                pending = Some(inner.pend(&cluster, limits.max_pending_requests)?);
            }
            freed.await;
        };
        drop(pending);
        let stream = idle::StreamIdle::new(target.stream_idle_timeout);
        let request =
            request.map(|body| idle::RequestBody::new(body, stream.clone()).boxed_unsync());
        let lease = Lease {
            inner: inner.clone(),
            key: target.key.clone(),
            conn,
            sender: Mutex::new(None),
            completed: AtomicBool::new(false),
            max_per_connection: limits.max_requests_per_connection,
            _request: request_slot,
        };
        let response = match sender {
            Sender::Http1(mut sender) => {
                let response = sender.send_request(request);
                *lease.sender.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Sender::Http1(sender));
                futures::future::Either::Left(response)
            }
            Sender::Http2(mut sender) => {
                let response = sender.send_request(request);
                *lease.sender.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Sender::Http2(sender));
                futures::future::Either::Right(response)
            }
        };
        // The wait for the response headers (the upload included) is bounded by the stream
        // idle timeout too; the lease, dropped, closes an HTTP/1.1 connection.
        let sent = tokio::select! {
            sent = response => sent,
            () = stream.idle() => return Err(Failure::StreamIdleTimeout),
        };
        let response = sent.map_err(|e| Failure::from_send(&e))?;
        Ok(response.map(|body| {
            let pooled = PooledBody {
                body,
                lease: Some(lease),
            };
            let (body, slot) = idle::ResponseBody::new(pooled, stream.clone());
            tokio::spawn(idle::watchdog(stream, slot));
            body
        }))
    }
}

impl Inner {
    fn cluster(&self, id: &ClusterId) -> Arc<Cluster> {
        self.clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.name.clone())
            .or_insert_with(|| {
                Arc::new(Cluster {
                    id: id.clone(),
                    counts: Mutex::default(),
                    freed: Notify::new(),
                })
            })
            .clone()
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, HashMap<ConnKey, Host>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn overflow(&self, cluster: &Cluster, which: Overflow) -> Failure {
        let [service, subset] = cluster.labels();
        self.metrics
            .overflows
            .with_label_values(&[service, subset, which.as_str()])
            .inc();
        Failure::Overflow(format!(
            "{} of {} reached",
            match which {
                Overflow::Requests => "http2MaxRequests",
                Overflow::Pending => "http1MaxPendingRequests (all maxConnections busy)",
            },
            cluster.id.name
        ))
    }

    /// A free connection of `key`, counted as started.
    fn take(&self, key: &ConnKey, max_per_connection: u32) -> Option<(Sender, Arc<ConnState>)> {
        let mut hosts = self.hosts();
        let host = hosts.get_mut(key)?;
        if key.http2 {
            host.multiplexed.retain(|(s, _)| !s.is_closed());
            let (sender, conn) = host.multiplexed.iter().find(|(_, c)| {
                c.usable(max_per_connection)
                    && c.in_use.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION
            })?;
            conn.start();
            return Some((Sender::Http2(sender.clone()), conn.clone()));
        }
        while let Some((sender, conn)) = host.idle.pop() {
            if sender.is_ready() && conn.usable(max_per_connection) {
                conn.start();
                return Some((Sender::Http1(sender), conn));
            }
        }
        None
    }

    fn h2_connecting(&self, key: &ConnKey) -> bool {
        self.hosts().get(key).is_some_and(|h| h.connecting > 0)
    }

    fn connection_slot(&self, cluster: &Arc<Cluster>, max: u32) -> Option<ConnectionSlot> {
        let mut counts = cluster.counts();
        if counts.connections >= max {
            return None;
        }
        counts.connections += 1;
        drop(counts);
        self.metrics
            .connections
            .with_label_values(&cluster.labels())
            .inc();
        self.metrics
            .opened
            .with_label_values(&cluster.labels())
            .inc();
        Some(ConnectionSlot {
            cluster: cluster.clone(),
            metrics: self.metrics.connections.clone(),
        })
    }

    fn pend(&self, cluster: &Arc<Cluster>, max: u32) -> Result<PendingSlot, Failure> {
        let mut counts = cluster.counts();
        if counts.pending >= max {
            drop(counts);
            return Err(self.overflow(cluster, Overflow::Pending));
        }
        counts.pending += 1;
        drop(counts);
        self.metrics
            .pending
            .with_label_values(&cluster.labels())
            .inc();
        Ok(PendingSlot {
            cluster: cluster.clone(),
            metrics: self.metrics.pending.clone(),
        })
    }

    /// An HTTP/1.1 connection back in the idle list; a request waiting in its cluster may
    /// take it.
    fn give_back(
        &self,
        key: ConnKey,
        sender: http1::SendRequest<UpstreamBody>,
        conn: Arc<ConnState>,
    ) {
        let cluster = conn.cluster.clone();
        self.hosts()
            .entry(key)
            .or_default()
            .idle
            .push((sender, conn));
        cluster.freed.notify_waiters();
    }

    /// Takes connection `id` of `key` out of the pool (dropping the pool's sender).
    fn forget(&self, key: &ConnKey, id: u64) {
        let mut hosts = self.hosts();
        if let Some(host) = hosts.get_mut(key) {
            host.idle.retain(|(_, c)| c.id != id);
            host.multiplexed.retain(|(_, c)| c.id != id);
            if host.idle.is_empty() && host.multiplexed.is_empty() && host.connecting == 0 {
                hosts.remove(key);
            }
        }
    }

    /// Opens a connection for `target` (the tunnel and the HTTP handshake, within
    /// `connectTimeout`), started for the caller's request.
    async fn connect<F>(
        self: &Arc<Self>,
        target: &Target<'_>,
        cluster: &Arc<Cluster>,
        slot: ConnectionSlot,
        open: F,
    ) -> Result<(Sender, Arc<ConnState>), Failure>
    where
        F: Future<Output = Result<HboneStream, String>>,
    {
        let key = &target.key;
        let limits = target.limits;
        // Counted until this returns or is cancelled (the request's timeout).
        let connecting = key.http2.then(|| Connecting::new(self, key, cluster));
        let connected = tokio::time::timeout(limits.connect_timeout, async {
            let stream = open.await.map_err(Failure::Connect)?;
            let handshake = |e: hyper::Error| Failure::Connect(format!("HTTP handshake: {e}"));
            let io = TokioIo::new(stream);
            if key.http2 {
                let (sender, connection) = http2_client().handshake(io).await.map_err(handshake)?;
                Ok((Sender::Http2(sender), Connection::Http2(connection)))
            } else {
                let (sender, connection) = http1::handshake(io).await.map_err(handshake)?;
                Ok((
                    Sender::Http1(sender),
                    Connection::Http1(Box::new(connection)),
                ))
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Connect(format!(
                "connect timeout ({:?}) to {}",
                limits.connect_timeout, key.target
            )))
        });
        let (sender, connection) = match connected {
            Ok(connected) => connected,
            Err(failure) => {
                drop((slot, connecting));
                cluster.freed.notify_waiters();
                return Err(failure);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnState::new(id, cluster.clone()));
        conn.start();
        if let Sender::Http2(sender) = &sender {
            self.hosts()
                .entry(key.clone())
                .or_default()
                .multiplexed
                .push((sender.clone(), conn.clone()));
        }
        // Requests waiting for it now find it.
        drop(connecting);
        tokio::spawn(self.clone().run(
            key.clone(),
            conn.clone(),
            connection,
            slot,
            limits.idle_timeout,
        ));
        Ok((sender, conn))
    }

    /// Drives one connection until it ends; closes it once idle for `idle_timeout`.
    async fn run(
        self: Arc<Self>,
        key: ConnKey,
        conn: Arc<ConnState>,
        connection: Connection,
        slot: ConnectionSlot,
        idle_timeout: Duration,
    ) {
        let driven = async {
            match connection {
                Connection::Http1(c) => (*c).without_shutdown().await.map(|parts| Some(parts.io)),
                Connection::Http2(c) => c.await.map(|()| None),
            }
        };
        tokio::pin!(driven);
        let ended = loop {
            tokio::select! {
                ended = &mut driven => break ended,
                () = tokio::time::sleep_until(conn.idle_deadline(idle_timeout)) => {
                    let idle = conn.in_use.load(Ordering::Relaxed) == 0
                        && conn.idle_deadline(idle_timeout) <= Instant::now();
                    if idle {
                        debug!(target = %key.target, "closing an idle upstream connection");
                        conn.closing.store(true, Ordering::Relaxed);
                        // Without the pool's sender, hyper ends the connection cleanly.
                        self.forget(&key, conn.id);
                        break (&mut driven).await;
                    }
                }
            }
        };
        conn.closing.store(true, Ordering::Relaxed);
        self.forget(&key, conn.id);
        drop(slot);
        match ended {
            Ok(Some(io)) => close_tunnel(io.into_inner()).await,
            Ok(None) => {}
            Err(err) => debug!(target = %key.target, %err, "upstream connection failed"),
        }
    }
}

/// An HTTP/2 connection being opened for a key: requests of that key wait for it rather than
/// open more. Dropped (done or cancelled), the waiters look again.
struct Connecting<'a> {
    inner: &'a Inner,
    key: &'a ConnKey,
    cluster: &'a Cluster,
}

impl<'a> Connecting<'a> {
    fn new(inner: &'a Inner, key: &'a ConnKey, cluster: &'a Cluster) -> Self {
        inner.hosts().entry(key.clone()).or_default().connecting += 1;
        Self {
            inner,
            key,
            cluster,
        }
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut hosts = self.inner.hosts();
        if let Some(host) = hosts.get_mut(self.key) {
            host.connecting -= 1;
            if host.idle.is_empty() && host.multiplexed.is_empty() && host.connecting == 0 {
                hosts.remove(self.key);
            }
        }
        drop(hosts);
        self.cluster.freed.notify_waiters();
    }
}

/// A connection's driving half.
enum Connection {
    Http1(Box<http1::Connection<TokioIo<HboneStream>, UpstreamBody>>),
    Http2(http2::Connection<TokioIo<HboneStream>, UpstreamBody, TokioExecutor>),
}

/// Ends a tunnel in both directions: END_STREAM, then the endpoint's end (bounded), so that
/// neither side sees a reset.
async fn close_tunnel(mut stream: HboneStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let mut buf = [0u8; 1024];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, Empty, StreamBody};

    use super::*;

    /// Size of each response: more than a stream's window.
    const BODY: usize = 3 * 1024 * 1024;

    /// An HTTP/2 server (hyper's) on `io` answering each request with [`BODY`] bytes.
    fn serve_big_bodies(io: tokio::io::DuplexStream) {
        let service = hyper::service::service_fn(|_req| async {
            let chunks = (0..BODY / 16_384)
                .map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![7u8; 16_384]))));
            Ok::<_, Infallible>(Response::new(StreamBody::new(futures::stream::iter(
                chunks,
            ))))
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service),
        );
    }

    #[tokio::test]
    async fn clients_that_stop_reading_do_not_stall_the_connection_they_share() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        serve_big_bodies(server_io);
        let (mut sender, connection) = http2_client()
            .handshake::<_, Empty<Bytes>>(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = || Request::get("http://endpoint/").body(Empty::new()).unwrap();

        // Four responses whose bodies nobody reads: each fills its stream's window.
        let mut unread = Vec::new();
        for _ in 0..4 {
            sender.ready().await.unwrap();
            unread.push(sender.send_request(request()).await.unwrap());
        }
        // Another request on the same connection still gets its whole body. A stall is
        // forever, so the bound only turns one into a failure.
        sender.ready().await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            let response = sender.send_request(request()).await.unwrap();
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len()
        })
        .await
        .expect("the connection stalled behind responses nobody reads");
        assert_eq!(read, BODY);
        drop(unread);
    }
}
