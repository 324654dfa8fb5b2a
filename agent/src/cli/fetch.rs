//! One HTTP GET to a component's endpoint (admin, metrics or readiness), with hyper: at an
//! address (on the node), or on a pod's port through the API server's port-forward (the
//! WebSocket `kubectl port-forward` uses), as `istioctl ztunnel-config` reaches ztunnel.
use std::{fmt, net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The most a response body may hold (a config dump of a large mesh is a few MiB).
const MAX_BODY: usize = 64 << 20;

/// Where an endpoint is.
#[derive(Clone)]
pub enum Endpoint {
    /// An address this machine reaches (the agent's node: `127.0.0.1:15000`).
    Addr(SocketAddr),
    /// A port of a pod, through the API server's port-forward.
    Pod {
        /// The client of the API server.
        client: kube::Client,
        /// The pod's namespace.
        namespace: String,
        /// The pod.
        pod: String,
        /// The port, in the pod's network namespace.
        port: u16,
    },
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self::Addr(addr)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(addr) => write!(f, "{addr}"),
            Self::Pod {
                namespace,
                pod,
                port,
                ..
            } => write!(f, "pod {namespace}/{pod} port {port}"),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `GET <path>` at `addr`: [`get_from`] an address.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    get_from(&Endpoint::Addr(addr), path).await
}

/// `GET <path>` of `endpoint`; the body of a 200 answer, else an error naming the endpoint.
pub async fn get_from(endpoint: &Endpoint, path: &str) -> anyhow::Result<Bytes> {
    tokio::time::timeout(TIMEOUT, get_inner(endpoint, path))
        .await
        .with_context(|| format!("GET {path} of {endpoint}: no answer within {TIMEOUT:?}"))?
}

async fn get_inner(endpoint: &Endpoint, path: &str) -> anyhow::Result<Bytes> {
    match endpoint {
        Endpoint::Addr(addr) => {
            let stream = TcpStream::connect(addr).await.with_context(|| {
                format!(
                    "connecting to {addr} (is the agent running, and is this its admin address?)"
                )
            })?;
            request(stream, &addr.to_string(), endpoint, path).await
        }
        Endpoint::Pod {
            client,
            namespace,
            pod,
            port,
        } => {
            let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
            let mut forwarder = pods.portforward(pod, &[*port]).await.with_context(|| {
                format!(
                    "port-forward to pod {namespace}/{pod} port {port} (the RBAC verb: create \
                     pods/portforward in namespace {namespace})"
                )
            })?;
            let stream = forwarder
                .take_stream(*port)
                .context("the port-forward has no stream for the port")?;
            let error = forwarder.take_error(*port);
            let result = request(stream, "localhost", endpoint, path).await;
            forwarder.abort();
            match (result, error) {
                (Ok(body), _) => Ok(body),
                // The API server (kubelet) says why the port could not be reached.
                (Err(err), Some(error)) => match futures::FutureExt::now_or_never(error) {
                    Some(Some(message)) => Err(err.context(message)),
                    _ => Err(err),
                },
                (Err(err), None) => Err(err),
            }
        }
    }
}

/// One HTTP/1.1 GET over `stream`.
async fn request<S>(stream: S, host: &str, endpoint: &Endpoint, path: &str) -> anyhow::Result<Bytes>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {endpoint}"))?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {path} of {endpoint}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("GET {path} of {endpoint}: reading the body: {e}"))?
        .to_bytes();
    if !status.is_success() {
        bail!(
            "GET {path} of {endpoint}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}
