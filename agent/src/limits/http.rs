//! The small plain-HTTP endpoints every Ambit process serves (the agent's readiness, metrics and
//! admin; the waypoint's metrics; the CA's readiness and metrics), within the limits.
//!
//! They listen where any pod can reach them, so each endpoint serves a bounded number of
//! connections (per source address too, [`Limits::http_limiter`]) and none for long: a
//! request's headers must arrive within 2 s of the connection or of the previous response, as
//! in ztunnel (kubelet and Prometheus send theirs at once), and a connection ends after a minute
//! whatever it does, so a client that stops reading a response cannot hold it either.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use super::{Limits, Path, Phase, refuse};
use crate::telemetry::{Metrics, metrics::CONTENT_TYPE};

/// A response of `status` with `body`.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// The metrics endpoint: `GET /metrics` (and `/stats/prometheus`, the path Istio's scrape
/// annotations use for ztunnel) in the Prometheus text format; `None` for another request.
pub fn metrics_route(
    metrics: &Metrics,
    req: &Request<hyper::body::Incoming>,
) -> Option<Response<Full<Bytes>>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics" | "/stats/prometheus") => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response
                .headers_mut()
                .insert("content-type", CONTENT_TYPE.parse().unwrap());
            Some(response)
        }
        _ => None,
    }
}

/// The accept queue of each endpoint. The usual default (128, the standard library's and
/// tokio's) overflows under a flood faster than the loop can reset what is over the limits, and
/// then the kernel drops connections from everyone, kubelet's probes included.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    listen(addr, false)
}

/// Binds `addr` with SO_REUSEPORT, for the node agent's endpoints: its successor binds them
/// beside this one's during a replacement ([`crate::handover`]). Only a process of the same
/// user (root) can join the group.
pub async fn bind_shared(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    listen(addr, true)
}

fn listen(addr: SocketAddr, shared: bool) -> anyhow::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(shared)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().with_context(|| format!("binding {addr}"))
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
    serve(listener, Path::Metrics, limits, move |req| {
        metrics_route(&metrics, req).unwrap_or_else(|| text(StatusCode::NOT_FOUND, "not found\n"))
    })
    .await
}

/// How long a request's headers may take to arrive, from the connection's start or the end of
/// the previous response (hyper times both with this one setting): ztunnel's value.
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest any connection is served.
const HTTP_MAX_AGE: Duration = Duration::from_secs(60);
/// The buffer a request's head must fit in: hyper's smallest, ztunnel's value.
const HTTP_MAX_BUF: usize = 8 * 1024;

/// Answers HTTP/1 requests on `listener` with `handler`, each connection in its own task,
/// within the limits of `path`.
pub async fn serve<H>(
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

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{
        limits::{Limit, LimitSettings},
        proxy::metrics::{ConnectionLabels, ProxyMetrics},
        relay::Transferred,
        telemetry::istio::{Reporter, ResponseFlags},
    };

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
