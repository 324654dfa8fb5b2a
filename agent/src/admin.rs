//! Readiness (`:15021/healthz/ready`) and liveness (`:15021/healthz/live`), the local admin
//! endpoint (`127.0.0.1:15000`) and the Prometheus metrics endpoint (`:15020/metrics`).
//!
//! Liveness is a heartbeat: a task of the agent's runtime that takes the splice's locks and
//! beats every [`HEARTBEAT`]; the endpoint fails once the last beat is older than
//! [`LIVENESS_STALE`]. A hung agent (a stuck runtime, a lock held for good) then gets
//! restarted by its DaemonSet, which also ends the connections it spliced in the kernel: those
//! carry bytes with no user space in the way, and only a live agent can cut them.
//!
//! Readiness and metrics listen on the node's addresses, where every pod can reach them: they
//! are served by [`crate::limits::http`], within its bounds (connections per source, header
//! and connection timeouts).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, Uri, body::Bytes};
use serde_json::json;
use tokio::sync::watch;

pub use crate::limits::http::{bind, bind_shared, serve_metrics, serve_metrics_on};
use crate::{
    discovery::ConfigStatus,
    enrolment::EnrolmentStatus,
    identity::CertificateManager,
    limits::{
        Limits, Path,
        http::{self, text},
    },
    redirect::Redirector,
    state::MeshState,
    telemetry::LogControl,
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
    /// The runtime's heartbeat, for `/healthz/live`.
    pub liveness: Arc<Liveness>,
    /// Where the agent stands in a replacement: ready only as the node's agent.
    pub role: watch::Receiver<crate::handover::Role>,
}

/// How often the heartbeat beats.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How old the last beat may be before `/healthz/live` fails.
pub const LIVENESS_STALE: Duration = Duration::from_secs(10);

/// The agent's heartbeat: when [`heartbeat`] last beat.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    /// Milliseconds from `started` to the last beat.
    last: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Liveness {
    fn beat(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// How long ago the last beat was.
    fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn check(&self) -> Result<(), String> {
        let age = self.age();
        if age > LIVENESS_STALE {
            return Err(format!(
                "the agent's runtime has not beaten for {}s (more than {}s)",
                age.as_secs(),
                LIVENESS_STALE.as_secs()
            ));
        }
        Ok(())
    }
}

/// Beats every [`HEARTBEAT`] after taking the splice's locks (a lock held for good stops it).
/// Runs until the task is dropped.
pub async fn heartbeat(liveness: Arc<Liveness>, redirector: Arc<Redirector>) {
    let mut ticks = tokio::time::interval(HEARTBEAT);
    loop {
        ticks.tick().await;
        if let Some(splicer) = redirector.splicer() {
            splicer.touch();
        }
        liveness.beat();
    }
}

impl AdminState {
    /// Ready once a configuration was loaded and applied to this node, and every enrolled pod's
    /// identity holds a certificate (before that, tunnels to those pods would be refused).
    fn readiness(&self) -> Result<(), String> {
        if let Some(why) = self.role.borrow().not_ready() {
            return Err(why.into());
        }
        self.can_serve()
    }

    /// Whether the agent can serve the node's pods: configuration loaded and applied, a
    /// certificate for every enrolled identity. Readiness, but for the handover's part.
    pub fn can_serve(&self) -> Result<(), String> {
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
            "splice": self.splice(),
        });
        // The mesh beside the node's own state: `workloads`, `services` (with their endpoints
        // and waypoints), `peerAuthentications`, `authorizationPolicies`, `routes`, ...
        let mesh = serde_json::to_value(&**self.state.borrow());
        if let (Some(dump), Ok(serde_json::Value::Object(mesh))) = (dump.as_object_mut(), mesh) {
            dump.extend(mesh);
        }
        dump
    }

    /// The same-node splice: `ready` (with what it holds), `off` (not wanted) or `unavailable`
    /// (with the kernel's or the self-test's error; the fast path is then off).
    fn splice(&self) -> serde_json::Value {
        use crate::redirect::SpliceState;
        match self.redirector.splice_state() {
            SpliceState::Ready(splicer) => json!({
                "state": "ready",
                "spliced": splicer.spliced(),
                "draining": splicer.stats().draining(),
            }),
            SpliceState::NotWanted => json!({ "state": "off" }),
            SpliceState::Unavailable(why) => json!({ "state": "unavailable", "error": why }),
        }
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

fn route(
    state: &AdminState,
    req: &Request<hyper::body::Incoming>,
    admin: bool,
) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz/live") => match state.liveness.check() {
            Ok(()) => text(StatusCode::OK, "alive\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not alive: {why}\n"),
            ),
        },
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

/// Serves readiness only (`admin == false`) or the full admin API on `addr`.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>, admin: bool) -> anyhow::Result<()> {
    let listener = bind_shared(addr).await?;
    let path = if admin { Path::Admin } else { Path::Readiness };
    let limits = state.limits.clone();
    http::serve(listener, path, limits, move |req| route(&state, req, admin)).await
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;
    use tracing::Level;
    use tracing_subscriber::prelude::*;

    use super::*;
    use crate::telemetry::reloadable_filter;

    async fn body(response: Response<Full<Bytes>>) -> (StatusCode, String) {
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    /// Liveness follows the heartbeat: alive while it beats, not once its last beat is older
    /// than the limit (a stuck runtime or lock).
    #[test]
    fn liveness_fails_once_the_heartbeat_is_stale() {
        let stale = Liveness {
            started: Instant::now() - LIVENESS_STALE - Duration::from_secs(5),
            last: AtomicU64::new(0),
        };
        let why = stale.check().unwrap_err();
        assert!(why.contains("has not beaten for"), "{why}");
        stale.beat();
        assert_eq!(stale.check(), Ok(()));
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
}
