//! Fault injection (Istio's `fault`, Envoy's fault filter): a route may delay a share of its
//! requests (`delay`, flag `DI`) and answer a share itself with an HTTP or gRPC error (`abort`,
//! flag `FI`). The delay comes first, then the abort, as in Envoy; each share is drawn on its
//! own, per request. Aborted requests never reach an upstream.
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::state::routes::resilience::{AbortError, Fault, happens};

/// What the fault injection decided for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer this instead of forwarding.
    pub abort: Option<AbortError>,
}

/// Decides the faults of one request; `draw()` must return a uniform number in
/// `0..1_000_000` (the shares are in parts per million).
pub fn decide(fault: &Fault, mut draw: impl FnMut() -> u32) -> Injected {
    Injected {
        delay: fault
            .delay
            .as_ref()
            .filter(|d| happens(d.per_million, draw()))
            .map(|d| d.fixed_delay),
        abort: fault
            .abort
            .as_ref()
            .filter(|a| happens(a.per_million, draw()))
            .map(|a| a.error),
    }
}

/// The answer to an aborted request: Envoy's, a short text body with the status, or for a
/// gRPC status a trailers-only gRPC answer (HTTP 200 with `grpc-status`).
pub fn abort_reply(error: AbortError) -> Response<Full<Bytes>> {
    let full = |text: &'static str| Full::new(Bytes::from_static(text.as_bytes()));
    match error {
        AbortError::HttpStatus(code) => {
            let mut response = Response::new(full("fault filter abort"));
            *response.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        }
        AbortError::GrpcStatus(code) => {
            let mut response = Response::new(full(""));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::routes::resilience::{FaultAbort, FaultDelay};

    fn fault(delay: u32, abort: u32) -> Fault {
        Fault {
            delay: Some(FaultDelay {
                fixed_delay: Duration::from_millis(5),
                per_million: delay,
            }),
            abort: Some(FaultAbort {
                error: AbortError::HttpStatus(503),
                per_million: abort,
            }),
        }
    }

    #[test]
    fn shares_are_drawn_per_fault_in_parts_per_million() {
        // 25% delay, 10% abort: the draws fall on either side of each threshold.
        let f = fault(250_000, 100_000);
        let mut draws = [249_999, 100_000].into_iter();
        let got = decide(&f, || draws.next().unwrap());
        assert_eq!(got.delay, Some(Duration::from_millis(5)));
        assert_eq!(got.abort, None);
        let mut draws = [250_000, 99_999].into_iter();
        let got = decide(&f, || draws.next().unwrap());
        assert_eq!(got.delay, None);
        assert_eq!(got.abort, Some(AbortError::HttpStatus(503)));
        // 0% never, 100% always.
        for draw in [0, 500_000, 999_999] {
            assert_eq!(decide(&fault(0, 0), || draw), Injected::default());
            let all = decide(&fault(1_000_000, 1_000_000), || draw);
            assert!(all.delay.is_some() && all.abort.is_some());
        }
    }

    #[test]
    fn a_grpc_abort_is_a_trailers_only_grpc_answer() {
        let reply = abort_reply(AbortError::GrpcStatus(14));
        assert_eq!(reply.status(), StatusCode::OK);
        assert_eq!(reply.headers()["grpc-status"], "14");
        assert_eq!(reply.headers()["content-type"], "application/grpc");
        let reply = abort_reply(AbortError::HttpStatus(418));
        assert_eq!(reply.status().as_u16(), 418);
    }
}
