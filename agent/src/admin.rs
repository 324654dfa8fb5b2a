//! Readiness (`:15021/healthz/ready`), the local admin endpoint (`127.0.0.1:15000`) and the
//! Prometheus metrics endpoint (`:15020/metrics`).
//!
//! Readiness and metrics listen on the node's addresses, where every pod can reach them, so each
//! endpoint serves a bounded number of connections (per source address too, see
//! [`crate::limits`]) and none for long: a request's headers must arrive within 2 s of the
//! connection or of the previous response, as in ztunnel (kubelet and Prometheus send theirs at
//! once), and a connection ends after a minute whatever it does, so a client that stops reading
//! a response cannot hold it either.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, Uri, body::Bytes, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::debug;

use crate::{
    discovery::ConfigStatus,
    enrolment::EnrolmentStatus,
    identity::CertificateManager,
    limits::{Limits, Path, Phase, refuse},
    redirect::Redirector,
    state::MeshState,
    telemetry::{LogControl, Metrics, metrics::CONTENT_TYPE},
};

/// What the endpoints report on.
pub struct AdminState {
    /// The node name.
    pub node: String,
    /// The mesh as this agent holds it: workloads, services, policies, routes.
    pub state: watch::Receiver<Arc<MeshState>>,
    /// Configuration source status.
    pub config: watch::Receiver<ConfigStatus>,
    /// Enrolment status.
    pub enrolment: watch::Receiver<EnrolmentStatus>,
    /// The kernel side.
    pub redirector: Arc<Redirector>,
    /// The log filter, for `/logging`; `None` when the process has no global subscriber.
    pub logging: Option<LogControl>,
    /// The certificates held, for `/certs`; `None` without a CA.
    pub certs: Option<Arc<CertificateManager>>,
    /// The connection limits: what the endpoints admit through, and what `config_dump` shows.
    pub limits: Arc<Limits>,
}

impl AdminState {
    /// Ready once a configuration was loaded and applied to this node, and every enrolled pod's
    /// identity holds a certificate (before that, tunnels to those pods would be refused).
    fn readiness(&self) -> Result<(), String> {
        if self.config.borrow().generation == 0 {
            return Err("no configuration loaded yet".into());
        }
        if !self.enrolment.borrow().reconciled {
            return Err("configuration not applied yet".into());
        }
        if let Some(certs) = &self.certs {
            let stats = certs.stats();
            if stats.pending > 0 {
                return Err(format!(
                    "{} of {} workload identities have no valid certificate yet",
                    stats.pending, stats.wanted
                ));
            }
        }
        Ok(())
    }

    fn config_dump(&self) -> serde_json::Value {
        let enrolment = self.enrolment.borrow().clone();
        let maps: serde_json::Map<String, serde_json::Value> = self
            .redirector
            .map_occupancy()
            .into_iter()
            .map(|(name, n)| (name.to_string(), n.into()))
            .collect();
        let mut dump = json!({
            "node": self.node,
            "config": *self.config.borrow(),
            "enrolled": enrolment.enrolled,
            "enrolmentFailures": enrolment.failed,
            "closed": enrolment.closed,
            "maps": maps,
            // Handshakes in flight per pod namespace cookie (each pod's share of ORIG_DST_TUPLE).
            "pendingConnects": self
                .redirector
                .pending_connects()
                .into_iter()
                .map(|(cookie, n)| (cookie.to_string(), n.into()))
                .collect::<serde_json::Map<String, serde_json::Value>>(),
            "ebpfStats": self.redirector.stats(),
            "certificates": self.certificates(),
            "limits": self.limits(),
        });
        // The mesh beside the node's own state: `workloads`, `services` (with their endpoints
        // and waypoints), `peerAuthentications`, `authorizationPolicies`, `routes`, ...
        let mesh = serde_json::to_value(&**self.state.borrow());
        if let (Some(dump), Ok(serde_json::Value::Object(mesh))) = (dump.as_object_mut(), mesh) {
            dump.extend(mesh);
        }
        dump
    }

    /// The limits in force and what holds them now.
    fn limits(&self) -> serde_json::Value {
        let held = self.limits.snapshot();
        json!({
            "settings": self.limits.settings(),
            "connections": held.connections,
            "handshakes": held.handshakes,
            "openDescriptors": crate::limits::open_descriptors().ok(),
        })
    }

    /// Each identity wanted on this node with its certificate's validity, serial and last
    /// CA error (never key material).
    fn certificates(&self) -> Vec<crate::identity::manager::CertificateStatus> {
        self.certs
            .as_ref()
            .map(|certs| certs.certificates())
            .unwrap_or_default()
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn route(
    state: &AdminState,
    req: &Request<hyper::body::Incoming>,
    admin: bool,
) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz/ready") => match state.readiness() {
            Ok(()) => match &state.config.borrow().unreachable_since {
                // Still serving: taking the node's pods out of the mesh would be worse.
                Some(since) => text(
                    StatusCode::OK,
                    format!(
                        "ready (degraded: the Kubernetes API server has been unreachable since \
                         {since}; serving the last state)\n"
                    ),
                ),
                None => text(StatusCode::OK, "ready\n"),
            },
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        ("GET", path @ ("/config_dump" | "/certs")) if admin => {
            let body = if path == "/certs" {
                json!({ "certificates": state.certificates() })
            } else {
                state.config_dump()
            };
            let mut response = text(StatusCode::OK, format!("{body:#}\n"));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        }
        (_, "/logging") if admin => logging(state.logging.as_ref(), req.method(), req.uri()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /logging` shows the log filter in force; `POST /logging?level=<filter>` replaces it
/// (tracing EnvFilter syntax, percent-encoded as a query value may need, e.g.
/// `level=info,ambit::proxy=debug`); `POST /logging?reset` restores the start-up filter.
/// The change lasts until the agent restarts.
pub fn logging(control: Option<&LogControl>, method: &Method, uri: &Uri) -> Response<Full<Bytes>> {
    let Some(control) = control else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "logging is not controllable in this process\n",
        );
    };
    let changed = match *method {
        Method::GET => return text(StatusCode::OK, format!("{}\n", control.current())),
        Method::POST => {
            let query = uri.query().unwrap_or("");
            let mut params = query.split('&').filter(|p| !p.is_empty());
            match params.find_map(|p| match p.split_once('=') {
                Some(("level", value)) => Some(Some(value)),
                None if p == "reset" => Some(None),
                _ => None,
            }) {
                Some(Some(level)) => match percent_decode(level) {
                    Some(level) => control.set(&level),
                    None => Err(format!(
                        "level {level:?} is not valid percent-encoded UTF-8"
                    )),
                },
                Some(None) => control.reset(),
                None => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "usage: POST /logging?level=<filter> or POST /logging?reset\n",
                    );
                }
            }
        }
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST\n"),
    };
    match changed {
        Ok(now) => {
            tracing::info!(filter = %now, "log filter changed through the admin endpoint");
            text(StatusCode::OK, format!("{now}\n"))
        }
        Err(err) => text(StatusCode::BAD_REQUEST, format!("{err}\n")),
    }
}

/// Decodes `%XX` escapes and `+` (a space, as forms send it); `None` for a malformed escape or
/// bytes that are not UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The metrics endpoint: `GET /metrics` (and `/stats/prometheus`, the path Istio's scrape
/// annotations use for ztunnel) in the Prometheus text format.
fn metrics_route(metrics: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response
                .headers_mut()
                .insert("content-type", CONTENT_TYPE.parse().unwrap());
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The accept queue of each endpoint. The usual default (128, the standard library's and
/// tokio's) overflows under a flood faster than the loop can reset what is over the limits, and
/// then the kernel drops connections from everyone, kubelet's probes included.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().with_context(|| format!("binding {addr}"))
}

/// Serves readiness only (`admin == false`) or the full admin API on `addr`.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>, admin: bool) -> anyhow::Result<()> {
    let listener = bind(addr).await?;
    let path = if admin { Path::Admin } else { Path::Readiness };
    let limits = state.limits.clone();
    serve_http(listener, path, limits, move |req| route(&state, req, admin)).await
}

/// Serves `GET /metrics` on `addr`.
pub async fn serve_metrics_on(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
) -> anyhow::Result<()> {
    serve_metrics(bind(addr).await?, metrics, limits).await
}

/// Serves `GET /metrics` on an already bound listener.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
) -> anyhow::Result<()> {
    serve_http(listener, Path::Metrics, limits, move |req| {
        metrics_route(&metrics, req)
    })
    .await
}

/// How long a request's headers may take to arrive, from the connection's start or the end of
/// the previous response (hyper times both with this one setting): ztunnel's value.
const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest any connection is served.
const HTTP_MAX_AGE: Duration = Duration::from_secs(60);
/// The buffer a request's head must fit in: hyper's smallest, ztunnel's value.
const HTTP_MAX_BUF: usize = 8 * 1024;

/// Answers HTTP/1 requests on `listener` with `handler`, each connection in its own task,
/// within the endpoint's limits.
async fn serve_http<H>(
    listener: TcpListener,
    path: Path,
    limits: Arc<Limits>,
    handler: H,
) -> anyhow::Result<()>
where
    H: Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let limiter = limits.http_limiter();
    limits
        .accept_loop(&listener, path, |stream, peer| {
            let Some(permit) = limits.admit_to(&limiter, path, peer.ip().to_canonical()) else {
                return refuse(stream);
            };
            let (handler, limits) = (handler.clone(), limits.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = handler(&req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HTTP_REQUEST_TIMEOUT)
                    .max_buf_size(HTTP_MAX_BUF)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(HTTP_MAX_AGE, connection).await {
                    Err(_) => limits.timed_out(path, Phase::MaxAge),
                    Ok(Err(err)) if err.is_timeout() => limits.timed_out(path, Phase::HttpRequest),
                    Ok(Err(err)) => debug!(%peer, %err, "HTTP connection failed"),
                    Ok(Ok(())) => {}
                }
                drop(permit);
            });
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Instant};

    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tracing::Level;
    use tracing_subscriber::prelude::*;

    use super::*;
    use crate::{
        limits::{Limit, LimitSettings},
        proxy::metrics::{ConnectionLabels, ProxyMetrics},
        relay::Transferred,
        telemetry::{
            istio::{Reporter, ResponseFlags},
            reloadable_filter,
        },
    };

    async fn body(response: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn logging_shows_and_changes_the_filter() {
        let (layer, control) = reloadable_filter("info").unwrap();
        // A subscriber for this thread only: the global one belongs to the binary.
        let _guard = tracing_subscriber::registry().with(layer).set_default();
        let call =
            |method: Method, uri: &str| logging(Some(&control), &method, &uri.parse().unwrap());

        assert!(!tracing::enabled!(Level::DEBUG));
        assert_eq!(
            body(call(Method::GET, "/logging")).await,
            (StatusCode::OK, "info\n".into())
        );

        let (status, now) = body(call(Method::POST, "/logging?level=debug")).await;
        assert_eq!((status, now.as_str()), (StatusCode::OK, "debug\n"));
        assert!(tracing::enabled!(Level::DEBUG));
        assert!(!tracing::enabled!(Level::TRACE));

        // Directives with a target, percent-encoded as a careful client sends them.
        let (status, now) = body(call(
            Method::POST,
            "/logging?level=warn%2Cambit%3A%3Aproxy%3Dtrace",
        ))
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            now.contains("ambit::proxy=trace") && now.contains("warn"),
            "{now}"
        );
        assert!(!tracing::enabled!(Level::INFO));

        // A bad filter changes nothing.
        let (status, why) = body(call(Method::POST, "/logging?level=[bad")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}");
        assert_eq!(control.current(), now.trim_end());

        let (status, _) = body(call(Method::POST, "/logging")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let (status, now) = body(call(Method::POST, "/logging?reset")).await;
        assert_eq!((status, now.as_str()), (StatusCode::OK, "info\n"));
        assert!(tracing::enabled!(Level::INFO));
        assert!(!tracing::enabled!(Level::DEBUG));

        let (status, _) = body(logging(None, &Method::GET, &"/logging".parse().unwrap())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("a%2Cb%3A%3Ac%3Dd").as_deref(),
            Some("a,b::c=d")
        );
        assert_eq!(
            percent_decode("info,x=debug").as_deref(),
            Some("info,x=debug")
        );
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    /// One HTTP/1.1 request over a plain socket, as a scraper makes it: (status line, headers,
    /// body).
    async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
        get_from("127.0.0.1".parse().unwrap(), addr, path).await
    }

    /// [`get`] from another local address (any of 127/8).
    async fn get_from(source: IpAddr, addr: SocketAddr, path: &str) -> (String, String, String) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap();
        (
            status.to_string(),
            headers.to_ascii_lowercase(),
            body.to_string(),
        )
    }

    #[tokio::test]
    async fn metrics_are_served_over_http() {
        let metrics = Arc::new(Metrics::new());
        let proxy = ProxyMetrics::new(&metrics).unwrap();
        let labels = ConnectionLabels::new(Reporter::Destination);
        proxy.connection_opened(&labels).finish(
            Transferred {
                sent: 3,
                received: 5,
            },
            ResponseFlags::None,
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Arc::new(Limits::new(LimitSettings::for_descriptors(1 << 20)));
        let server = tokio::spawn(serve_metrics(listener, metrics.clone(), limits));

        let (status, headers, body) = get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        assert!(
            body.contains("# TYPE istio_tcp_connections_opened_total counter\n"),
            "{body}"
        );
        assert!(body.contains("reporter=\"destination\""), "{body}");
        assert!(
            body.lines()
                .any(|l| l.starts_with("istio_tcp_sent_bytes_total{") && l.ends_with(" 5")),
            "{body}"
        );
        assert_eq!(get(addr, "/stats/prometheus").await.2, body);
        assert_eq!(get(addr, "/other").await.0, "HTTP/1.1 404 Not Found");
        server.abort();
    }

    /// Reads until the server closes the connection; what it sent, or a panic after 10 s.
    async fn until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("the server never closed the connection");
            match read {
                Ok(0) | Err(_) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[tokio::test]
    async fn silent_idle_and_excess_connections_are_closed_and_others_served() {
        let metrics = Arc::new(Metrics::new());
        let limits = Arc::new(Limits::new(LimitSettings::for_descriptors(1 << 20)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_metrics(listener, metrics, limits.clone()));
        let share = limits.settings().http_max_connections_per_source;

        // One source's share of silent connections, in the order the server accepts them...
        let started = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..share {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // ...then one more from it, refused, while another source is served.
        let mut excess = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(until_closed(&mut excess).await.is_empty());
        let (status, _, _) = get_from("127.0.0.2".parse().unwrap(), addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        // The silent ones are closed by the request timeout, not before.
        for stream in &mut silent {
            assert!(until_closed(stream).await.is_empty());
        }
        assert!(started.elapsed() >= HTTP_REQUEST_TIMEOUT);

        // A keep-alive client is answered, then closed once idle.
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = String::from_utf8(until_closed(&mut kept).await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

        let snapshot = limits.snapshot();
        assert_eq!(
            snapshot.over_limit,
            vec![(Path::Metrics, Limit::PerSource, 1)]
        );
        assert_eq!(
            snapshot.timed_out,
            vec![(Path::Metrics, Phase::HttpRequest, share as u64 + 1)]
        );
        server.abort();
    }
}
