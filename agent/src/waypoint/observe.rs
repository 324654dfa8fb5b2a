//! Measuring a request while it streams, and recording it once its response stream ends.
//!
//! Istio (Envoy's stats filter) records a request's metrics and access log when the stream is
//! done, not when the response headers leave: the duration covers the whole response, the
//! sizes are the bodies', and a gRPC status sent in the trailers is known only then. A long
//! stream (gRPC server streaming, a large download) is therefore counted when it ends.
//!
//! [`CountedBody`] counts a request body's bytes as the upstream reads them; [`ObservedBody`]
//! wraps the response body the client reads: it counts its bytes, takes `grpc-status` from the
//! trailers, and calls its [`RequestRecord`] exactly once, when the body ends, fails, or is
//! dropped before its end (the client went away: `DC`).
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, Method, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tracing::info;

use super::metrics::{
    DESTINATION_PRINCIPAL, DESTINATION_SERVICE, DESTINATION_WORKLOAD, GRPC_RESPONSE_STATUS,
    RESPONSE_CODE, RESPONSE_FLAGS, RequestFlags, RequestLabels, RequestMeasures, WaypointMetrics,
};
use crate::{identity::SpiffeId, telemetry::clip};

/// The `grpc-status` of `headers` (trailers, or the headers of a trailers-only response).
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A request body whose data bytes are added to a shared count as they are read.
pub struct CountedBody<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> CountedBody<B> {
    /// Counts `inner`'s bytes into `count`.
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B> HttpBody for CountedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The most of a request's path an access-log line carries, in bytes, cut on a character
/// boundary (`path_bytes` then gives the whole length). A client's path can be up to 64 KiB
/// (`http::Uri`'s limit), and the log drops whole lines over 16 KiB rather than queue them: cut,
/// the line and its evidence stay. The cut is of the raw value, and the text format writes
/// values escaped (`{:?}`): a two-byte combining mark becomes `\u{300}` (a path has no control
/// characters: `http::Uri` refuses them), so 2 KiB of path renders in at most 7 KiB.
pub(super) const LOGGED_PATH_MAX: usize = 2 * 1024;
/// The most of a method (a token: ASCII, rendered as is).
pub(super) const LOGGED_METHOD_MAX: usize = 64;
/// The most of an error, a policy's reason or a route's name: an error can quote a client's
/// values (a token's issuer, even control characters of its header, which both formats write
/// as six-byte escapes), so 512 bytes render in at most 3 KiB. With the path's 7 KiB, the
/// request's line stays under 14 KiB, under the log's 16 KiB cap.
pub(super) const LOGGED_TEXT_MAX: usize = 512;

/// `path` as an access-log line carries it, and its whole length when that was cut.
pub(super) fn logged_path(path: &str) -> (&str, Option<usize>) {
    let cut = clip(path, LOGGED_PATH_MAX);
    (cut, (cut.len() < path.len()).then_some(path.len()))
}

/// Everything the metric and the access-log line of one request need, gathered while it was
/// routed and sent; completed by how its response stream ended.
pub struct RequestRecord {
    /// Where the metric goes.
    pub metrics: Arc<WaypointMetrics>,
    /// The labels known when the response headers left.
    pub labels: RequestLabels,
    /// When the request arrived.
    pub started: Instant,
    /// Its body's bytes, as counted by [`CountedBody`].
    pub request_bytes: Arc<AtomicU64>,
    /// The client's address.
    pub source: SocketAddr,
    /// The client's workload (`namespace/name`), when its address names one.
    pub source_workload: Option<String>,
    /// The client's verified identity.
    pub source_principal: SpiffeId,
    /// The VIP and port dialled.
    pub destination: SocketAddr,
    /// The request's method.
    pub method: Method,
    /// The request's path, without the query string.
    pub path: String,
    /// The HTTP version it arrived in.
    pub version: Version,
    /// The route taken (`VirtualService ns/name [route name]`).
    pub route: Option<String>,
    /// The endpoint the request was sent to.
    pub upstream: Option<SocketAddr>,
    /// Tries made upstream (the first and the retries).
    pub attempts: u32,
    /// Why the waypoint answered itself.
    pub error: Option<String>,
    /// The request's span, ended with it ([`super::trace`]).
    pub span: Option<super::trace::ServerSpan>,
}

/// How a response stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    /// Response body bytes sent.
    pub response_bytes: u64,
    /// The `grpc-status` seen (trailers, or headers of a trailers-only response).
    pub grpc_status: Option<u32>,
    /// Set when it did not end normally (`UR`, `DC`).
    pub flags: Option<RequestFlags>,
}

impl RequestRecord {
    /// Records the request: its metrics and its access-log line (target `access`).
    pub fn finish(self, ending: Ending) {
        let mut labels = self.labels.with_grpc_status(ending.grpc_status);
        if let Some(flags) = ending.flags {
            labels = labels.with_flags(flags);
        }
        let measures = RequestMeasures {
            duration: self.started.elapsed(),
            request_bytes: self.request_bytes.load(Ordering::Relaxed),
            response_bytes: ending.response_bytes,
        };
        if let Some(span) = self.span {
            span.finish(&labels, &measures);
        }
        let logged = crate::telemetry::access_logged(labels.failed() || self.error.is_some());
        labels.with_values(|values| {
            self.metrics.request(values, &measures);
            if !logged {
                return;
            }
            let (path, path_bytes) = logged_path(&self.path);
            info!(
                target: crate::telemetry::ACCESS_TARGET,
                reporter = "waypoint",
                src = %self.source,
                src_workload = self.source_workload.as_deref(),
                src_principal = %self.source_principal,
                dst = %self.destination,
                method = clip(self.method.as_str(), LOGGED_METHOD_MAX),
                path,
                path_bytes,
                protocol = ?self.version,
                route = self.route.as_deref().map(|r| clip(r, LOGGED_TEXT_MAX)),
                dst_service = values[DESTINATION_SERVICE],
                dst_workload = values[DESTINATION_WORKLOAD],
                dst_principal = values[DESTINATION_PRINCIPAL],
                upstream = self.upstream.map(|u| u.to_string()),
                response_code = values[RESPONSE_CODE],
                grpc_status = values[GRPC_RESPONSE_STATUS],
                response_flags = values[RESPONSE_FLAGS],
                bytes_received = measures.request_bytes,
                bytes_sent = measures.response_bytes,
                attempts = self.attempts,
                duration_ms = measures.duration.as_millis() as u64,
                error = self.error.as_deref().map(|e| clip(e, LOGGED_TEXT_MAX)),
                "request"
            );
        });
    }
}

/// A response body that records its request when it ends.
pub struct ObservedBody<B: HttpBody> {
    inner: B,
    bytes: u64,
    grpc_status: Option<u32>,
    record: Option<RequestRecord>,
}

impl<B: HttpBody> ObservedBody<B> {
    /// Wraps `inner`, the body of a response whose headers carried `grpc_status` (if any).
    pub fn new(inner: B, grpc_status: Option<u32>, record: RequestRecord) -> Self {
        Self {
            inner,
            bytes: 0,
            grpc_status,
            record: Some(record),
        }
    }

    fn finish(&mut self, flags: Option<RequestFlags>) {
        if let Some(record) = self.record.take() {
            record.finish(Ending {
                response_bytes: self.bytes,
                grpc_status: self.grpc_status,
                flags,
            });
        }
    }
}

impl<B> HttpBody for ObservedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(status) = grpc_status(trailers)
                {
                    this.grpc_status = Some(status);
                }
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Some(RequestFlags::UpstreamReset)),
            Poll::Ready(None) => this.finish(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ObservedBody<B>
where
    B: HttpBody,
{
    fn drop(&mut self) {
        // Dropped unread to its end: the client went away (or the server sent headers only,
        // as for a 101 or a HEAD, whose body is already at its end).
        let flags = (!self.inner.is_end_stream()).then_some(RequestFlags::DownstreamDisconnect);
        self.finish(flags);
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;
    use crate::telemetry::metrics::{
        Metrics,
        exposition::{parse, series},
    };

    fn record(metrics: &Arc<WaypointMetrics>, bytes: &Arc<AtomicU64>) -> RequestRecord {
        RequestRecord {
            metrics: metrics.clone(),
            labels: RequestLabels::new()
                .with_protocol(true)
                .with_response(200, RequestFlags::None),
            started: Instant::now(),
            request_bytes: bytes.clone(),
            source: "10.0.0.1:1000".parse().unwrap(),
            source_workload: None,
            source_principal: SpiffeId::new("cluster.local", "shop", "client"),
            destination: "10.96.0.1:80".parse().unwrap(),
            method: Method::POST,
            path: "/echo.Echo/Say".into(),
            version: Version::HTTP_2,
            route: None,
            upstream: None,
            attempts: 1,
            error: None,
            span: None,
        }
    }

    /// A gRPC response's status comes from its trailers, its size from its data frames, and
    /// it is recorded once, when the body ends; the request body's bytes are counted too.
    #[tokio::test]
    async fn a_streamed_response_is_recorded_at_its_end_with_its_trailer_status() {
        let registry = Metrics::new();
        let metrics = Arc::new(WaypointMetrics::new(&registry).unwrap());
        let request_bytes = Arc::new(AtomicU64::new(0));
        let mut request = CountedBody::new(
            Full::new(Bytes::from_static(b"12345")),
            request_bytes.clone(),
        );
        while request.frame().await.is_some() {}
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"defg"))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut body = ObservedBody::new(
            StreamBody::new(futures::stream::iter(frames)),
            None,
            record(&metrics, &request_bytes),
        );
        body.frame().await.unwrap().unwrap();
        assert!(
            series(&parse(&registry.encode()), "istio_requests_total").is_empty(),
            "recorded before the stream ended"
        );
        while body.frame().await.is_some() {}
        drop(body);
        let samples = parse(&registry.encode());
        let requests = series(&samples, "istio_requests_total");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].1, 1.0);
        assert_eq!(requests[0].0["grpc_response_status"], "5");
        assert_eq!(requests[0].0["response_flags"], "-");
        let sum = |name: &str| series(&samples, name)[0].1;
        assert_eq!(sum("istio_response_bytes_sum"), 7.0);
        assert_eq!(sum("istio_request_bytes_sum"), 5.0);
    }

    /// A response dropped before its end (the client went away) is still recorded, once,
    /// flagged `DC`.
    #[tokio::test]
    async fn a_response_dropped_midway_is_recorded_as_a_downstream_disconnect() {
        let registry = Metrics::new();
        let metrics = Arc::new(WaypointMetrics::new(&registry).unwrap());
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
        ];
        let mut body = ObservedBody::new(
            StreamBody::new(futures::stream::iter(frames)),
            Some(0),
            record(&metrics, &Arc::default()),
        );
        body.frame().await.unwrap().unwrap();
        drop(body);
        let samples = parse(&registry.encode());
        let requests = series(&samples, "istio_requests_total");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].0["response_flags"], "DC");
        assert_eq!(requests[0].0["grpc_response_status"], "0");
    }

    /// The access-log line of a request whose path, method and error are as long and as
    /// expensive to render as a client can make them (combining marks in the path, which the
    /// text format escapes at 3.5 times their bytes; control characters in the error, six times),
    /// with a route name as long as an operator may write: written by the log's own layers and
    /// line cap,
    /// in both formats, it is kept, with each value cut to its most and the path's whole
    /// length beside it.
    #[test]
    fn a_huge_path_is_cut_so_its_access_line_is_kept() {
        use crate::telemetry::{CappedLines, LOG_LINE_MAX, LogFormat, format_layer};
        use crate::testing::log_lines::Lines;
        use tracing_subscriber::prelude::*;

        let registry = Metrics::new();
        let metrics = Arc::new(WaypointMetrics::new(&registry).unwrap());
        // The longest path http::Uri takes (64 KiB), in two-byte combining marks (U+0300,
        // `\u{300}` when escaped) so a cut can also fall inside one.
        let path = format!("/{}", "\u{300}".repeat(32 * 1024 - 1));
        for format in [LogFormat::Text, LogFormat::Json] {
            let lines = Lines::default();
            let subscriber = tracing_subscriber::registry()
                .with(format_layer(format, CappedLines::new(lines.clone())));
            let mut huge = record(&metrics, &Arc::new(AtomicU64::new(0)));
            huge.path = path.clone();
            huge.method = Method::from_bytes(&[b'X'; 1000]).unwrap();
            // Control characters: six-byte escapes in both formats.
            huge.error = Some("\x1f".repeat(64 * 1024));
            huge.route = Some(format!(
                "VirtualService ns/name [{}]",
                "r".repeat(64 * 1024)
            ));
            tracing::subscriber::with_default(subscriber, || {
                // Another test may have met this callsite with no subscriber at the same
                // moment: recompute who is interested now that this one is set.
                tracing::callsite::rebuild_interest_cache();
                huge.finish(Ending {
                    response_bytes: 0,
                    grpc_status: None,
                    flags: None,
                })
            });

            let text = lines.text();
            let line = text
                .lines()
                .next()
                .unwrap_or_else(|| panic!("{format:?}: the access line was dropped"));
            assert!(
                line.len() <= LOG_LINE_MAX,
                "{format:?}: {} bytes",
                line.len()
            );
            // The text format colours a field's name and its `=` apart.
            assert!(
                line.contains("path_bytes") && line.contains(&path.len().to_string()),
                "{format:?}: no path_bytes in {line}"
            );
            if format == LogFormat::Json {
                let fields = serde_json::from_str::<serde_json::Value>(line).unwrap();
                let logged = fields["path"].as_str().unwrap();
                assert!(logged.len() <= LOGGED_PATH_MAX && logged.len() > LOGGED_PATH_MAX - 2);
                assert!(path.starts_with(logged));
                assert_eq!(fields["method"].as_str().unwrap().len(), LOGGED_METHOD_MAX);
                assert!(fields["error"].as_str().unwrap().len() <= LOGGED_TEXT_MAX);
                assert!(fields["route"].as_str().unwrap().len() <= LOGGED_TEXT_MAX);
            }
        }
    }
}
