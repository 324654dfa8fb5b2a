//! HTTP/1.1 upgrades (WebSocket) through the waypoint.
//!
//! An upgrade request is routed like any request; its `Connection: upgrade` and `Upgrade`
//! headers, hop-by-hop and removed from other requests, are kept on it. When the endpoint
//! answers `101 Switching Protocols`, the client gets the 101 and both connections are
//! taken over from hyper ([`hyper::upgrade`]) and spliced: bytes are copied both ways until
//! both ends close, with the shared [`crate::relay`].
//!
//! Only `websocket` is passed, as Istio configures Envoy (`upgradeConfigs: websocket`): other
//! upgrades (`h2c`, ...) are sent on as plain requests without their upgrade headers, so a
//! client cannot switch a tunnel to a protocol whose requests the waypoint would no longer
//! see.
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::{
    limits::BufferShare,
    relay::{Relayable, relay},
};

/// The upgrades passed through.
const PASSED: [&str; 1] = ["websocket"];

/// A downstream request's upgrade, taken before its hop-by-hop headers are removed.
pub struct Upgrade {
    protocol: HeaderValue,
    downstream: OnUpgrade,
    /// The client's share of the relay-buffer budget, for the spliced connection.
    buffers: BufferShare,
}

impl Upgrade {
    /// The upgrade `request` asks for, when it is an HTTP/1.1 request with `Connection:
    /// upgrade` and an `Upgrade` the waypoint passes; once upgraded, its relay reads into
    /// buffers of the client's share, which `buffers` gives (only asked for an upgrade).
    pub fn take<B>(
        request: &mut Request<B>,
        buffers: impl FnOnce() -> BufferShare,
    ) -> Option<Self> {
        if request.version() != Version::HTTP_11 {
            return None;
        }
        let asks = request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
        let protocol = request.headers().get(header::UPGRADE)?.clone();
        let passed = protocol
            .to_str()
            .is_ok_and(|p| PASSED.iter().any(|x| p.trim().eq_ignore_ascii_case(x)));
        if !asks || !passed {
            return None;
        }
        Some(Self {
            protocol,
            downstream: hyper::upgrade::on(request),
            buffers: buffers(),
        })
    }

    /// Puts the upgrade headers back on the request sent upstream.
    pub fn restore(&self, headers: &mut HeaderMap) {
        set_headers(headers, self.protocol.clone());
    }

    /// When `response` (the endpoint's, before its hop-by-hop headers are removed) switches
    /// protocols, starts splicing the two upgraded connections and returns the `Upgrade` value
    /// to put back on the response for the client; else `None` (the client's upgrade is
    /// dropped with this value).
    pub fn on_response<B>(self, response: &mut Response<B>) -> Option<HeaderValue> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return None;
        }
        let protocol = response
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(self.protocol);
        let upstream = hyper::upgrade::on(response);
        let (downstream, buffers) = (self.downstream, self.buffers);
        tokio::spawn(async move {
            let (down, up) = match tokio::try_join!(downstream, upstream) {
                Ok(both) => both,
                Err(err) => {
                    debug!(%err, "an upgrade did not complete");
                    return;
                }
            };
            let (moved, result) = relay(TokioIo::new(down), TokioIo::new(up), &(), &buffers).await;
            debug!(
                sent = moved.sent,
                received = moved.received,
                ?result,
                "upgraded connection ended"
            );
        });
        Some(protocol)
    }
}

/// Sets `Connection: upgrade` and `Upgrade: protocol`.
pub fn set_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Both ends of an upgraded connection are hyper's, read and written as byte streams.
impl Relayable for TokioIo<hyper::upgrade::Upgraded> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, connection: &str, upgrade: &str) -> Request<()> {
        Request::builder()
            .version(version)
            .header(header::CONNECTION, connection)
            .header(header::UPGRADE, upgrade)
            .body(())
            .unwrap()
    }

    /// Whether a request with these headers is taken as an upgrade.
    fn taken(version: Version, connection: &str, upgrade: &str) -> bool {
        let mut request = request(version, connection, upgrade);
        Upgrade::take(&mut request, BufferShare::unlimited).is_some()
    }

    #[test]
    fn only_websocket_upgrades_of_http11_are_taken() {
        assert!(taken(Version::HTTP_11, "Upgrade", "websocket"));
        assert!(taken(Version::HTTP_11, "keep-alive, upgrade", "WebSocket"));
        assert!(!taken(Version::HTTP_11, "upgrade", "h2c"));
        assert!(!taken(Version::HTTP_11, "keep-alive", "websocket"));
        assert!(!taken(Version::HTTP_10, "upgrade", "websocket"));
    }
}
