//! One HTTP GET to a component's local endpoint (admin or metrics), with hyper.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The most a response body may hold (a config dump of a large mesh is a few MiB).
const MAX_BODY: usize = 64 << 20;

/// `GET http://<addr><path>`; the body of a 200 answer, else an error naming the address.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    tokio::time::timeout(TIMEOUT, get_inner(addr, path))
        .await
        .with_context(|| format!("GET http://{addr}{path}: no answer within {TIMEOUT:?}"))?
}

async fn get_inner(addr: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let stream = TcpStream::connect(addr).await.with_context(|| {
        format!("connecting to {addr} (is the agent running, and is this its admin address?)")
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("GET http://{addr}{path}: reading the body: {e}"))?
        .to_bytes();
    if !status.is_success() {
        bail!(
            "GET http://{addr}{path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}
