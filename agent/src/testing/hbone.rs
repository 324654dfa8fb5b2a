//! HBONE servers and applications on 127.0.0.1 for tests: a pod's (or a waypoint's) HBONE
//! server built on the real `hbone::HboneServer` that records what it saw (CONNECT requests,
//! stream reports, refused connections), and an application that echoes what it read. The
//! HBONE tests use them, and the proxy's tests as destination pods and waypoints.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

use crate::{
    hbone::{
        ConnectRequest, ConnectionError, Deny, Destinations, HboneServer, InboundHandler,
        InboundSettings, StreamReport,
        tls::{self, PeerIdentityError},
    },
    identity::{SpiffeId, WorkloadCertificate},
    limits::{LimitSettings, Limits},
    policy::Admission,
};

/// The trust domain of the identities these tests use.
pub const TD: &str = "cluster.local";
/// Where every server here listens.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// What the server side refused a connection for.
#[derive(Debug)]
pub enum Failure {
    /// The client's certificate verified but its identity was refused.
    Identity(PeerIdentityError),
    /// rustls refused the handshake (an unknown issuer, say).
    Rustls(rustls::Error),
    /// Anything else, as text (timeouts, protocol errors).
    Other(String),
}

struct Handler {
    tls: Arc<rustls::ServerConfig>,
    deny: bool,
    /// Where every tunnel goes (a waypoint stand-in); `None`: to the CONNECT's authority.
    forward_to: Option<SocketAddr>,
    /// Connections accepted (one `tls_config` call each).
    accepted: Arc<AtomicUsize>,
    requests: mpsc::UnboundedSender<ConnectRequest>,
    reports: mpsc::UnboundedSender<StreamReport>,
    failures: mpsc::UnboundedSender<Failure>,
}

impl InboundHandler for Handler {
    type Upstream = TcpStream;
    type Meter = ();

    async fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        Some(self.tls.clone())
    }

    async fn authorize(&self, request: &ConnectRequest) -> Result<Admission, Deny> {
        let _ = self.requests.send(request.clone());
        if self.deny {
            Err(Deny::new("test policy says no"))
        } else {
            Ok(Admission::unconditional())
        }
    }

    async fn connect(&self, request: &ConnectRequest) -> io::Result<TcpStream> {
        TcpStream::connect(self.forward_to.unwrap_or(request.destination)).await
    }

    fn report(&self, report: StreamReport) {
        let _ = self.reports.send(report);
    }

    fn connection_failed(&self, _source: SocketAddr, error: &ConnectionError) {
        let failure = match error {
            ConnectionError::Handshake(err) => {
                match (tls::identity_error(err), tls::handshake_error(err)) {
                    (Some(identity), _) => Failure::Identity(identity),
                    (None, Some(rustls)) => Failure::Rustls(rustls.clone()),
                    _ => Failure::Other(err.to_string()),
                }
            }
            other => Failure::Other(other.to_string()),
        };
        let _ = self.failures.send(failure);
    }
}

/// A pod's HBONE server on 127.0.0.1, with what it saw.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The identity it serves as.
    pub id: SpiffeId,
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// The CONNECT requests received, as authorization saw them.
    pub requests: mpsc::UnboundedReceiver<ConnectRequest>,
    /// A report per finished stream.
    pub reports: mpsc::UnboundedReceiver<StreamReport>,
    /// Why connections were refused.
    pub failures: mpsc::UnboundedReceiver<Failure>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pod's server presenting `cert` for destinations on 127.0.0.1; `deny` refuses every
/// stream at authorization.
pub async fn start_server(cert: &WorkloadCertificate, deny: bool) -> Server {
    start_server_with(cert, deny, InboundSettings::new(vec![LOCALHOST])).await
}

/// [`start_server`] with `settings`.
pub async fn start_server_with(
    cert: &WorkloadCertificate,
    deny: bool,
    settings: InboundSettings,
) -> Server {
    start(cert, deny, settings, None).await
}

/// A waypoint's HBONE server: accepts any destination and sends every tunnel to `upstream`.
pub async fn start_waypoint(cert: &WorkloadCertificate, upstream: SocketAddr) -> Server {
    let settings = InboundSettings::with_destinations(Destinations::DecidedByHandler);
    start(cert, false, settings, Some(upstream)).await
}

/// Limits no test here comes near, as on a node with containerd's descriptor limit.
pub fn generous_limits() -> Arc<Limits> {
    Arc::new(Limits::new(LimitSettings::for_descriptors(1 << 20)))
}

async fn start(
    cert: &WorkloadCertificate,
    deny: bool,
    settings: InboundSettings,
    forward_to: Option<SocketAddr>,
) -> Server {
    start_limited(cert, deny, settings, forward_to, generous_limits()).await
}

/// The server of [`start_server_with`], forwarding every stream to `forward_to` if set, under
/// `limits`.
pub async fn start_limited(
    cert: &WorkloadCertificate,
    deny: bool,
    settings: InboundSettings,
    forward_to: Option<SocketAddr>,
    limits: Arc<Limits>,
) -> Server {
    let (requests_tx, requests) = mpsc::unbounded_channel();
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let (failures_tx, failures) = mpsc::unbounded_channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let handler = Handler {
        tls: tls::server_config(cert).unwrap(),
        deny,
        forward_to,
        accepted: accepted.clone(),
        requests: requests_tx,
        reports: reports_tx,
        failures: failures_tx,
    };
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HboneServer::new(handler, settings, limits);
    let task = tokio::spawn(async move { server.serve(listener).await });
    Server {
        addr,
        id: cert.id.clone(),
        accepted,
        requests,
        reports,
        failures,
        task,
    }
}

/// The application: for each connection, reads to EOF, hands over what it read, then answers
/// `reply` and closes. Replying only after EOF proves the client's half-close came through.
pub async fn start_upstream(reply: Vec<u8>) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (tx, reply) = (tx.clone(), reply.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                socket.read_to_end(&mut got).await.unwrap();
                let _ = tx.send(got);
                socket.write_all(&reply).await.unwrap();
                socket.shutdown().await.unwrap();
            });
        }
    });
    (addr, rx)
}

/// The next item of `rx`, failing the test after 10 s.
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("timed out waiting for the server")
        .expect("channel closed")
}
