//! Readiness (`:15021/healthz/ready`) and the local admin endpoint (`127.0.0.1:15000`).
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::debug;

use crate::{config::ConfigStatus, inpod::EnrolmentStatus, redirect::Redirector};

/// What the endpoints report on.
pub struct AdminState {
    /// The node name.
    pub node: String,
    /// Configuration source status.
    pub config: watch::Receiver<ConfigStatus>,
    /// Enrolment status.
    pub enrolment: watch::Receiver<EnrolmentStatus>,
    /// The kernel side.
    pub redirector: Arc<Redirector>,
}

impl AdminState {
    /// Ready once a configuration was loaded and applied to this node.
    fn readiness(&self) -> Result<(), String> {
        if self.config.borrow().generation == 0 {
            return Err("no configuration loaded yet".into());
        }
        if !self.enrolment.borrow().reconciled {
            return Err("configuration not applied yet".into());
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
        json!({
            "node": self.node,
            "config": *self.config.borrow(),
            "enrolled": enrolment.enrolled,
            "enrolmentFailures": enrolment.failed,
            "maps": maps,
            "ebpfStats": self.redirector.stats(),
        })
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
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        ("GET", "/config_dump") if admin => {
            let mut response = text(StatusCode::OK, format!("{:#}\n", state.config_dump()));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves readiness only (`admin == false`) or the full admin API on `addr`.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>, admin: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                debug!(%err, "admin accept failed");
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&state, &req, admin);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
