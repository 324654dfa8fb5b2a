//! Distributed tracing at the waypoint: a server span per request and a client span per upstream
//! try, exported over OTLP/gRPC, with the trace context propagated to the endpoint (docs/tracing.md).
//!
//! Why here: the waypoint is the only Ambit proxy that parses HTTP. The node agents carry bytes
//! (L4), so a hop through them only is no span; a waypoint hop is two (Istio ambient's model).
//!
//! - **Context in.** W3C `traceparent`/`tracestate` first (the OpenTelemetry SDK's propagator);
//!   else B3, the single `b3` header or the `x-b3-*` ones (Envoy's Zipkin tracer, Istio's
//!   long-time default, speaks B3): the `b3` submodule, a few lines, as the only Rust B3
//!   propagator is the deprecated Zipkin exporter's.
//! - **Sampling**, Istio's: a request whose context carries a sampling decision keeps it (a
//!   sampled parent is traced whatever the percentage, an unsampled one is not); otherwise
//!   `--tracing-sampling` percent of traces (Istio's default 1%), by trace id, so every span of a
//!   trace decides alike.
//! - **Context out.** Every try is sent with a `traceparent` (and the `tracestate` it came with)
//!   naming its client span as parent, unsampled spans included (their ids are made all the
//!   same), so the application's spans join the trace; a request that came with B3 gets its B3
//!   headers rewritten the same way. Mirrored copies name the server span.
//! - **Export** goes through the SDK's batch processor (its own thread; the tonic exporter's
//!   channel lives on the runtime it was built on) behind a bound of [`MAX_QUEUE`] spans waiting:
//!   past it, spans are dropped and counted (`ambit_waypoint_tracing_spans_total{result="dropped"}`),
//!   never queued without bound, so a slow or absent collector costs memory only up to it. A
//!   client may force sampling with its own `traceparent`, as with Envoy: the bound is what
//!   holds then.
//! - **Off** without `--tracing-otlp-endpoint`: no provider, no span, no header touched.
//!   Propagation headers pass through the waypoint as any other header.
use std::{
    borrow::Cow,
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use http::{HeaderMap, Request, Response, header};
use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator,
    trace::{
        Link, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
        Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_http::HeaderInjector;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{
        BatchConfigBuilder, BatchSpanProcessor, Sampler, SamplingDecision, SamplingResult,
        SdkTracer, SdkTracerProvider, ShouldSample, SpanData, SpanExporter, SpanProcessor,
    },
};
use prometheus::{IntCounterVec, Opts};

use super::{
    metrics::{
        DESTINATION_PRINCIPAL, GRPC_RESPONSE_STATUS, RESPONSE_CODE, RESPONSE_FLAGS, RequestLabels,
        RequestMeasures,
    },
    retry::Failure,
};
use crate::{
    identity::SpiffeId,
    state::{MeshState, Workload},
    telemetry::{istio::CLUSTER_ID, metrics::Metrics},
};

mod b3;

/// Spans finished and not yet handed to the exporter, at most; more are dropped and counted.
/// (The OpenTelemetry SDK's default queue size.)
pub const MAX_QUEUE: usize = 2048;
/// The fewest places in the export queue a caller may hold, however many callers have spans
/// waiting (see [`Queue`]).
const MIN_CALLER_SHARE: usize = 8;
/// The span attribute naming the caller a span was made for: its verified SPIFFE identity
/// (Istio's `source.principal`), on server and client spans alike; what [`Queue`] shares by.
const CALLER_ATTRIBUTE: &str = "source.principal";
/// The largest `tracestate` passed on, in characters, and its most list-members (W3C's
/// bounds: a larger one is dropped whole rather than cut).
const MAX_TRACESTATE_CHARS: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Spans per OTLP export request, at most (the SDK's default).
const MAX_BATCH: usize = 512;
/// How long finished spans wait for a batch to fill before they are sent anyway.
const EXPORT_DELAY: Duration = Duration::from_secs(1);
/// How long one export may take before it fails (and its spans are counted `failed`).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the waypoint waits for its last spans to leave when it stops.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Istio's `maxPathTagLength`: `http.url` (and `user_agent`) are cut to this many bytes.
const MAX_TAG_LENGTH: usize = 256;
/// Istio's default mesh id (`istio.mesh_id`): its trust domain's default.
const MESH_ID: &str = "cluster.local";

/// The headers that carry a trace context in or out: rewritten on every try when tracing is on.
const PROPAGATION_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// `--tracing-otlp-endpoint`: an `http://host:port` URL (no TLS: see docs/tracing.md).
pub fn parse_endpoint(value: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{value:?}: TLS to the collector is not supported; use http:// (a collector on \
                 the node or in the cluster)"
            ));
        }
        _ => return Err(format!("{value:?}: expected http://host:port")),
    }
    if uri.authority().is_none_or(|a| a.port_u16().is_none()) {
        return Err(format!(
            "{value:?}: expected http://host:port (OTLP/gRPC is 4317)"
        ));
    }
    Ok(uri)
}

/// The waypoint's tracer: off, or a provider exporting to a collector.
#[derive(Default)]
pub struct Tracing {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Istio's node id of this waypoint: `router~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    node_id: String,
    /// The waypoint's own canonical service and revision, and namespace (Istio's custom tags).
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
}

impl Tracing {
    /// Tracing off: no span, no header rewritten.
    pub fn off() -> Self {
        Self::default()
    }

    /// The tracer exporting to `endpoint` (`--tracing-otlp-endpoint`) and sampling `percent`%
    /// of new traces (`--tracing-sampling`), for the waypoint workload `me`, its counters registered in
    /// `metrics`; off without an endpoint. Must run inside the Tokio runtime (the exporter's
    /// channel is spawned on it).
    pub fn start(
        endpoint: Option<&http::Uri>,
        percent: f64,
        me: &Workload,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let Some(endpoint) = endpoint else {
            return Ok(Self::off());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.to_string())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .with_context(|| format!("--tracing-otlp-endpoint {endpoint}"))?;
        Self::with_exporter(exporter, percent, me, metrics)
    }

    /// The tracer exporting with `exporter`, sampling `percent`% of new traces.
    fn with_exporter<E: SpanExporter + 'static>(
        exporter: E,
        percent: f64,
        me: &Workload,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let counters = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_tracing_spans_total",
                "Spans of sampled requests, by what became of them: exported, failed (the \
                 collector refused them or could not be reached) or dropped (the export queue \
                 was full).",
            ),
            &["result"],
        )?;
        metrics.register(Box::new(counters.clone()))?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_tracing_spans_dropped_total",
                "Sampled spans dropped before export, by reason: queue_full (2048 already \
                 waiting) or caller_budget (their caller already held its fair share of the \
                 queue).",
            ),
            &["reason"],
        )?;
        metrics.register(Box::new(dropped.clone()))?;
        let queue = Arc::new(Queue::new(dropped));
        let batch = BatchSpanProcessor::builder(CountedExporter {
            inner: exporter,
            queue: queue.clone(),
            counters: counters.clone(),
            failing: AtomicBool::new(false),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUE)
                .with_max_export_batch_size(MAX_BATCH)
                .with_scheduled_delay(EXPORT_DELAY)
                .build(),
        )
        .build();
        let sampler = IstioSampler {
            ratio: Sampler::TraceIdRatioBased(percent / 100.0),
        };
        let ip = me.ips.first().map(ToString::to_string).unwrap_or_default();
        let service_name = format!("{}.{}", me.canonical_service(), me.namespace);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BoundedProcessor {
                inner: batch,
                queue,
                counters,
            })
            .with_sampler(sampler)
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(service_name)
                    .build(),
            )
            .build();
        let tracer = provider.tracer("ambit-waypoint");
        Ok(Self {
            inner: Some(Arc::new(Inner {
                provider,
                tracer,
                node_id: format!(
                    "router~{ip}~{}.{ns}~{ns}.svc.cluster.local",
                    me.name,
                    ns = me.namespace
                ),
                canonical_service: me.canonical_service().to_string(),
                canonical_revision: me.canonical_revision().to_string(),
                namespace: me.namespace.clone(),
            })),
        })
    }

    /// Whether spans are made.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Sends the spans still queued and stops the exporter (blocking: at most
    /// [`SHUTDOWN_TIMEOUT`]; run it off the runtime's workers).
    pub fn shutdown(&self) {
        if let Some(inner) = &self.inner
            && let Err(err) = inner.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            tracing::warn!(%err, "tracing: spans not exported at shutdown");
        }
    }

    /// The server span of `request`, which `source` (verified as `peer`) sent to `dialled`,
    /// child of the context its headers carry; `None` when tracing is off.
    pub fn server_span<B>(
        &self,
        state: &MeshState,
        request: &Request<B>,
        source: SocketAddr,
        peer: &SpiffeId,
        dialled: SocketAddr,
    ) -> Option<ServerSpan> {
        let inner = self.inner.as_ref()?;
        let headers = request.headers();
        let (parent, b3) = extract(headers);
        // Istio's operation name: the service dialled, its port, any path.
        let name = match state.service_by_vip(dialled.ip()) {
            Some(service) => format!("{}:{}/*", service.hostname(), dialled.port()),
            None => format!("{dialled}/*"),
        };
        let header = |name: header::HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| truncate(v).to_string())
        };
        let authority = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| header(header::HOST))
            .unwrap_or_else(|| dialled.to_string());
        // The path only: a query string often carries secrets (tokens in `access_token=`,
        // signatures) and does not go to the collector.
        let path = request.uri().path();
        let mut attributes = vec![
            KeyValue::new("component", "proxy"),
            KeyValue::new("node_id", inner.node_id.clone()),
            KeyValue::new("http.method", request.method().to_string()),
            KeyValue::new(
                "http.url",
                truncate(&format!("http://{authority}{path}")).to_string(),
            ),
            KeyValue::new("http.protocol", format!("{:?}", request.version())),
            KeyValue::new("peer.address", source.ip().to_string()),
            KeyValue::new("downstream_cluster", "-"),
            KeyValue::new(CALLER_ATTRIBUTE, peer.to_string()),
            KeyValue::new("istio.canonical_service", inner.canonical_service.clone()),
            KeyValue::new("istio.canonical_revision", inner.canonical_revision.clone()),
            KeyValue::new("istio.namespace", inner.namespace.clone()),
            KeyValue::new("istio.mesh_id", MESH_ID),
            KeyValue::new("istio.cluster_id", CLUSTER_ID),
        ];
        if let Some(agent) = header(header::USER_AGENT) {
            attributes.push(KeyValue::new("user_agent", agent));
        }
        if let Some(id) = header(header::HeaderName::from_static("x-request-id")) {
            attributes.push(KeyValue::new("guid:x-request-id", id));
        }
        let span = inner
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&inner.tracer, &parent);
        Some(ServerSpan {
            inner: inner.clone(),
            cx: Context::new().with_span(span),
            b3,
            upstream: None,
            caller: peer.to_string(),
        })
    }
}

/// The parent context `headers` carry (W3C first, then B3), and the B3 form they came in.
fn extract(headers: &HeaderMap) -> (Context, Option<b3::Form>) {
    let w3c = TraceContextPropagator::new().extract(&BoundedTraceState(headers));
    let incoming = b3::extract(headers);
    let form = incoming.as_ref().map(|b3| b3.form);
    if w3c.span().span_context().is_valid() {
        return (w3c, form);
    }
    let Some(incoming) = incoming else {
        return (Context::new(), None);
    };
    let decision = IncomingDecision(incoming.sampled);
    let cx = match incoming.ids {
        Some((trace_id, span_id)) => {
            let flags = match incoming.sampled {
                Some(true) => TraceFlags::SAMPLED,
                _ => TraceFlags::default(),
            };
            let remote = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
            Context::new().with_remote_span_context(remote)
        }
        None => Context::new(),
    };
    (cx.with_value(decision), form)
}

/// The request's headers as the W3C propagator reads them, with a `tracestate` beyond W3C's
/// bounds ([`MAX_TRACESTATE_CHARS`], [`MAX_TRACESTATE_MEMBERS`]) dropped whole: the SDK keeps
/// the first 32 members of any size, and a caller's oversized state would ride on every span
/// and every try.
struct BoundedTraceState<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for BoundedTraceState<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key)?.to_str().ok()?;
        if key.eq_ignore_ascii_case("tracestate") {
            let members = value.split(',').filter(|m| !m.trim().is_empty()).count();
            let repeated = self.0.get_all("tracestate").iter().count() > 1;
            if value.len() > MAX_TRACESTATE_CHARS || members > MAX_TRACESTATE_MEMBERS || repeated {
                return None;
            }
        }
        Some(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The sampling decision a B3 context carried (`None`: B3's "deferred", the decision is ours),
/// kept in the parent context for [`IstioSampler`]. (A W3C context always carries one: its
/// sampled flag.)
#[derive(Clone, Copy, Debug)]
struct IncomingDecision(Option<bool>);

/// Istio's sampling: the decision of the parent (the remote caller's, or the server span's for
/// a client span) when there is one; else `--tracing-sampling` percent, by trace id.
#[derive(Clone, Debug)]
struct IstioSampler {
    ratio: Sampler,
}

impl ShouldSample for IstioSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let parent_span = parent
            .map(|cx| cx.span().span_context().clone())
            .filter(SpanContext::is_valid);
        let decided = match parent.and_then(|cx| cx.get::<IncomingDecision>()) {
            Some(IncomingDecision(decision)) => *decision,
            None => parent_span.as_ref().map(SpanContext::is_sampled),
        };
        let sampled = decided.unwrap_or_else(|| {
            let result = self
                .ratio
                .should_sample(None, trace_id, name, kind, attributes, links);
            result.decision == SamplingDecision::RecordAndSample
        });
        SamplingResult {
            decision: if sampled {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: parent_span
                .map(|sc| sc.trace_state().clone())
                .unwrap_or_default(),
        }
    }
}

/// Cuts `value` to [`MAX_TAG_LENGTH`] bytes, on a character boundary.
fn truncate(value: &str) -> &str {
    crate::telemetry::clip(value, MAX_TAG_LENGTH)
}

/// Replaces the trace headers of `headers` by the context `cx` names (its span, child of
/// `parent`): W3C always, and B3 in the form the request came in, if it did.
fn inject(
    cx: &Context,
    parent: Option<&SpanContext>,
    b3: Option<b3::Form>,
    headers: &mut HeaderMap,
) {
    for name in PROPAGATION_HEADERS {
        headers.remove(name);
    }
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    // The SDK writes an empty `tracestate` when there is none: nothing to pass on.
    if headers
        .get("tracestate")
        .is_some_and(|v| v.as_bytes().is_empty())
    {
        headers.remove("tracestate");
    }
    if let Some(form) = b3 {
        b3::inject(cx.span().span_context(), parent, form, headers);
    }
}

/// Where the last try went: Istio's cluster name and the endpoint, for the server span.
struct UpstreamTags {
    cluster: String,
    address: SocketAddr,
}

/// The span of one request at the waypoint: started when its headers arrive, ended when its
/// response stream ends (with the metrics and the access log, [`super::observe`]).
pub struct ServerSpan {
    inner: Arc<Inner>,
    /// Holds the span: the parent of the client spans.
    cx: Context,
    /// The B3 form the request came with, to rewrite its B3 headers the same way.
    b3: Option<b3::Form>,
    upstream: Option<UpstreamTags>,
    /// The caller's verified identity, on the client spans too ([`Queue`] shares by it).
    caller: String,
}

impl ServerSpan {
    /// Sets the trace headers of a request sent on behalf of this one (a mirror) to name this
    /// span as parent.
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(&self.cx, None, self.b3, headers);
    }

    /// Starts the span of try `attempt` (from 1) to `address`, an endpoint whose identity is
    /// `principal`, of the service `hostname` (its port `port`, subset `subset`, empty for none),
    /// and sets `headers` (the try's request's) to name it as parent.
    pub fn client_span(
        &mut self,
        upstream: Upstream<'_>,
        attempt: u32,
        headers: &mut HeaderMap,
    ) -> ClientSpan {
        // Istio's cluster name of the destination (`outbound|<port>|<subset>|<host>`).
        let cluster = format!(
            "outbound|{}|{}|{}",
            upstream.port, upstream.subset, upstream.hostname
        );
        let tracer = &self.inner.tracer;
        let mut attributes = vec![
            KeyValue::new("component", "proxy"),
            KeyValue::new("node_id", self.inner.node_id.clone()),
            KeyValue::new("upstream_cluster", cluster.clone()),
            KeyValue::new("upstream_cluster.name", cluster.clone()),
            KeyValue::new("upstream_address", upstream.address.to_string()),
            KeyValue::new("peer.address", upstream.address.ip().to_string()),
            KeyValue::new("destination.principal", upstream.principal.to_string()),
            KeyValue::new("http.protocol", format!("{:?}", upstream.version)),
            KeyValue::new(CALLER_ATTRIBUTE, self.caller.clone()),
        ];
        if attempt > 1 {
            attributes.push(KeyValue::new("retry.count", i64::from(attempt - 1)));
        }
        let span = tracer
            .span_builder(format!("router {cluster} egress"))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(tracer, &self.cx);
        let cx = self.cx.with_span(span);
        let parent = self.cx.span().span_context().clone();
        inject(&cx, Some(&parent), self.b3, headers);
        self.upstream = Some(UpstreamTags {
            cluster,
            address: upstream.address,
        });
        ClientSpan { cx }
    }

    /// Ends the span with the request's outcome: the metric's labels and measures.
    pub fn finish(self, labels: &RequestLabels, measures: &RequestMeasures) {
        let span = self.cx.span();
        if !span.is_recording() {
            return;
        }
        let [code, flags, grpc_status, destination_principal] = labels.with_values(|values| {
            [
                RESPONSE_CODE,
                RESPONSE_FLAGS,
                GRPC_RESPONSE_STATUS,
                DESTINATION_PRINCIPAL,
            ]
            .map(|label| values[label].to_string())
        });
        let mut attributes = vec![
            KeyValue::new("http.status_code", code.clone()),
            KeyValue::new("response_flags", flags),
            KeyValue::new("request_size", measures.request_bytes.to_string()),
            KeyValue::new("response_size", measures.response_bytes.to_string()),
        ];
        if labels.is_grpc() {
            attributes.push(KeyValue::new("grpc.status_code", grpc_status));
        }
        if let Some(upstream) = &self.upstream {
            attributes.push(KeyValue::new("upstream_cluster", upstream.cluster.clone()));
            attributes.push(KeyValue::new(
                "upstream_cluster.name",
                upstream.cluster.clone(),
            ));
            attributes.push(KeyValue::new(
                "upstream_address",
                upstream.address.to_string(),
            ));
            attributes.push(KeyValue::new(
                "destination.principal",
                destination_principal,
            ));
        }
        let failed = code.parse::<u16>().is_ok_and(|c| c == 0 || c >= 500);
        if failed {
            attributes.push(KeyValue::new("error", "true"));
            span.set_status(Status::error(format!("HTTP {code}")));
        }
        span.set_attributes(attributes);
        span.end();
    }
}

/// Where one try goes, for its span.
pub struct Upstream<'a> {
    /// The endpoint's address and port.
    pub address: SocketAddr,
    /// The endpoint's identity.
    pub principal: &'a SpiffeId,
    /// The destination service's hostname.
    pub hostname: &'a str,
    /// The service port the request was routed to.
    pub port: u16,
    /// The subset routed to (empty for none).
    pub subset: &'a str,
    /// The HTTP version the try is sent in.
    pub version: http::Version,
}

/// The span of one upstream try: ends when the try's response headers arrive, or it fails.
pub struct ClientSpan {
    cx: Context,
}

impl ClientSpan {
    /// Ends the span with the try's result: its status, or why it got none (its flag).
    pub fn finish<B>(self, result: &Result<Response<B>, Failure>) {
        let span = self.cx.span();
        if !span.is_recording() {
            return;
        }
        let (status, flags, error) = match result {
            Ok(response) => (response.status().as_u16(), "-", None),
            Err(Failure::Response(status, _)) => (status.as_u16(), "-", None),
            Err(Failure::Connect(why)) => (0, "UF", Some(Cow::Borrowed(why.as_str()))),
            Err(Failure::RefusedStream(why) | Failure::Reset(why)) => {
                (0, "UR", Some(Cow::Borrowed(why.as_str())))
            }
            Err(Failure::PerTryTimeout) => (0, "UT", Some(Cow::Borrowed("per-try timeout"))),
            Err(Failure::Overflow(why)) => (0, "UO", Some(Cow::Borrowed(why.as_str()))),
            Err(Failure::StreamIdleTimeout) => {
                (0, "SI", Some(Cow::Borrowed("stream idle timeout")))
            }
        };
        let mut attributes = vec![
            KeyValue::new("http.status_code", status.to_string()),
            KeyValue::new("response_flags", flags),
        ];
        if status == 0 || status >= 500 {
            attributes.push(KeyValue::new("error", "true"));
            span.set_status(Status::error(
                error.map_or_else(|| format!("HTTP {status}"), Cow::into_owned),
            ));
        }
        span.set_attributes(attributes);
        span.end();
    }
}

/// The exporter, counting what it sends and releasing the queue's places as batches leave.
/// The first failure after a success is logged as a warning, the next ones at debug level (the
/// counter has them all): a collector that is down does not flood the log.
#[derive(Debug)]
struct CountedExporter<E> {
    inner: E,
    queue: Arc<Queue>,
    counters: IntCounterVec,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for CountedExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let count = batch.len() as u64;
        self.queue.release(&batch);
        let result = self.inner.export(batch).await;
        let outcome = if result.is_ok() { "exported" } else { "failed" };
        self.counters.with_label_values(&[outcome]).inc_by(count);
        match &result {
            Ok(()) => self.failing.store(false, Ordering::Relaxed),
            Err(err) if !self.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(%err, spans = count, "tracing: spans not exported to the collector");
            }
            Err(err) => tracing::debug!(%err, spans = count, "tracing: export failed"),
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The places of the export queue ([`MAX_QUEUE`] spans finished and not yet exported), shared
/// among the callers the spans were made for ([`CALLER_ATTRIBUTE`]).
///
/// A caller may force sampling (a sampled `traceparent` or B3 context is honoured, as Envoy
/// does), so one caller could otherwise fill the queue and starve everyone else's spans. A
/// caller holds at most `MAX_QUEUE / (n + 1)` places, `n` the number of callers with spans
/// waiting, itself included (never fewer than [`MIN_CALLER_SHARE`]): however many callers
/// flood, a share is always left for one that has none waiting. Drops are counted by reason.
#[derive(Debug)]
struct Queue {
    places: std::sync::Mutex<Places>,
    dropped: IntCounterVec,
}

#[derive(Debug, Default)]
struct Places {
    total: usize,
    /// Callers with spans waiting (none at zero: bounded by [`MAX_QUEUE`] entries).
    by_caller: HashMap<String, usize>,
}

/// Why a span was dropped before export (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    QueueFull,
    CallerBudget,
}

impl DropReason {
    fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::CallerBudget => "caller_budget",
        }
    }
}

/// The caller a span was made for (empty if it names none).
fn caller_of(span: &SpanData) -> &str {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == CALLER_ATTRIBUTE)
        .and_then(|kv| match &kv.value {
            opentelemetry::Value::String(s) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

impl Queue {
    fn new(dropped: IntCounterVec) -> Self {
        Self {
            places: std::sync::Mutex::new(Places::default()),
            dropped,
        }
    }

    fn places(&self) -> std::sync::MutexGuard<'_, Places> {
        self.places.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a span of `caller`, or says why there is none.
    fn admit(&self, caller: &str) -> Result<(), DropReason> {
        let mut places = self.places();
        if places.total >= MAX_QUEUE {
            return Err(DropReason::QueueFull);
        }
        let held = places.by_caller.get(caller).copied().unwrap_or(0);
        let callers = places.by_caller.len() + usize::from(held == 0);
        let share = (MAX_QUEUE / (callers + 1)).max(MIN_CALLER_SHARE);
        if held >= share {
            return Err(DropReason::CallerBudget);
        }
        places.total += 1;
        *places.by_caller.entry(caller.to_string()).or_default() += 1;
        Ok(())
    }

    /// Frees the places of `spans`, handed to the exporter.
    fn release(&self, spans: &[SpanData]) {
        let mut places = self.places();
        for span in spans {
            let caller = caller_of(span);
            places.total = places.total.saturating_sub(1);
            if let Some(held) = places.by_caller.get_mut(caller) {
                *held -= 1;
                if *held == 0 {
                    places.by_caller.remove(caller);
                }
            }
        }
    }
}

/// The batch processor behind the bounds of [`Queue`]: past them a span is dropped and counted
/// (the SDK's processor drops too, but only logs the count at shutdown). Its own queue is
/// [`MAX_QUEUE`] too, so it never drops itself.
#[derive(Debug)]
struct BoundedProcessor<P> {
    inner: P,
    queue: Arc<Queue>,
    counters: IntCounterVec,
}

impl<P: SpanProcessor> SpanProcessor for BoundedProcessor<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        match self.queue.admit(caller_of(&span)) {
            Ok(()) => self.inner.on_end(span),
            Err(reason) => {
                self.counters.with_label_values(&["dropped"]).inc();
                self.queue
                    .dropped
                    .with_label_values(&[reason.label()])
                    .inc();
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http::StatusCode;
    use opentelemetry::trace::SpanId;

    use super::*;
    use crate::{
        discovery::parse_mesh,
        telemetry::metrics::exposition::{parse, value},
        waypoint::metrics::RequestFlags,
    };

    const MESH: &str = r#"
workloads:
- {name: wp-0, namespace: shop, node: n0, ips: [10.10.0.2], labels: {app: waypoint}, enrolled: false, netns: {pid: 1}}
- {name: reviews-0, namespace: shop, node: n0, ips: [10.10.0.4], labels: {app: reviews}, netns: {pid: 1}}
services:
- {name: waypoint, namespace: shop, vips: [10.96.0.1], selector: {app: waypoint}, ports: [{port: 15008}]}
- {name: reviews, namespace: shop, vips: [10.96.0.10], selector: {app: reviews}, ports: [{port: 9080, targetPort: 8080}], waypoint: {name: waypoint}}
"#;
    const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CLIENT_SPAN: &str = "00f067aa0ba902b7";

    /// Collects what the batch processor exports.
    #[derive(Clone, Debug, Default)]
    struct Collector(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collector {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    struct Bed {
        state: MeshState,
        tracing: Tracing,
        spans: Collector,
        metrics: Metrics,
    }

    impl Bed {
        fn new(percent: f64) -> Self {
            let state = parse_mesh(std::path::Path::new("mesh.yaml"), MESH.as_bytes()).unwrap();
            let me = state.workloads()[0].clone();
            let metrics = Metrics::new();
            let spans = Collector::default();
            let tracing = Tracing::with_exporter(spans.clone(), percent, &me, &metrics).unwrap();
            Self {
                state,
                tracing,
                spans,
                metrics,
            }
        }

        /// One request with `headers` through the tracer: its server span, one try whose
        /// request headers are returned, answered 200; then every span exported.
        fn request(&self, headers: &[(&str, &str)]) -> HeaderMap {
            let mut request = Request::builder()
                .uri("/reviews/1?access_token=secret")
                .header("host", "reviews:9080")
                .header("user-agent", "curl/8");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request.body(()).unwrap();
            let peer = SpiffeId::new("cluster.local", "shop", "client");
            let mut server = self
                .tracing
                .server_span(
                    &self.state,
                    &request,
                    "10.10.0.9:40000".parse().unwrap(),
                    &peer,
                    "10.96.0.10:9080".parse().unwrap(),
                )
                .expect("tracing is on");
            let mut upstream_headers = request.headers().clone();
            let endpoint = SpiffeId::new("cluster.local", "shop", "reviews");
            let client = server.client_span(
                Upstream {
                    address: "10.10.0.4:8080".parse().unwrap(),
                    principal: &endpoint,
                    hostname: "reviews.shop.svc.cluster.local",
                    port: 9080,
                    subset: "v1",
                    version: http::Version::HTTP_11,
                },
                1,
                &mut upstream_headers,
            );
            let answer = Response::builder().status(StatusCode::OK).body(()).unwrap();
            client.finish(&Ok(answer));
            let labels = RequestLabels::new().with_response(200, RequestFlags::None);
            let measures = RequestMeasures {
                duration: Duration::from_millis(1),
                request_bytes: 0,
                response_bytes: 12,
            };
            server.finish(&labels, &measures);
            self.tracing
                .inner
                .as_ref()
                .unwrap()
                .provider
                .force_flush()
                .unwrap();
            upstream_headers
        }

        fn exported(&self) -> Vec<SpanData> {
            std::mem::take(&mut *self.spans.0.lock().unwrap())
        }
    }

    fn attribute(span: &SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    /// The `traceparent` of `headers`: trace id, parent id, flags.
    fn traceparent(headers: &HeaderMap) -> (String, String, String) {
        let value = headers["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = value.split('-').collect();
        assert_eq!(parts.len(), 4, "{value}");
        (parts[1].into(), parts[2].into(), parts[3].into())
    }

    /// A sampled W3C parent is traced even at 0%: the server span is the caller's span's child,
    /// the client span the server span's, the try names the client span, and the attributes are
    /// Istio's.
    #[test]
    fn a_sampled_caller_is_traced_with_parent_links_and_istio_attributes() {
        let bed = Bed::new(0.0);
        let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
        let sent = bed.request(&[("traceparent", &tp), ("tracestate", "vendor=x")]);
        let spans = bed.exported();
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let server = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server)
            .unwrap();
        let client = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Client)
            .unwrap();
        assert_eq!(server.span_context.trace_id().to_string(), CLIENT_TRACE);
        assert_eq!(client.span_context.trace_id().to_string(), CLIENT_TRACE);
        assert_eq!(server.parent_span_id.to_string(), CLIENT_SPAN);
        assert!(server.parent_span_is_remote);
        assert_eq!(client.parent_span_id, server.span_context.span_id());
        assert_eq!(
            traceparent(&sent),
            (
                CLIENT_TRACE.to_string(),
                client.span_context.span_id().to_string(),
                "01".to_string()
            )
        );
        assert_eq!(sent["tracestate"], "vendor=x");
        assert_eq!(server.name, "reviews.shop.svc.cluster.local:9080/*");
        assert_eq!(
            client.name,
            "router outbound|9080|v1|reviews.shop.svc.cluster.local egress"
        );
        for (key, want) in [
            ("component", "proxy"),
            ("http.status_code", "200"),
            ("response_flags", "-"),
            ("http.method", "GET"),
            ("http.url", "http://reviews:9080/reviews/1"),
            ("peer.address", "10.10.0.9"),
            (
                "source.principal",
                "spiffe://cluster.local/ns/shop/sa/client",
            ),
            (
                "upstream_cluster",
                "outbound|9080|v1|reviews.shop.svc.cluster.local",
            ),
            ("istio.canonical_service", "waypoint"),
            ("istio.namespace", "shop"),
            (
                "node_id",
                "router~10.10.0.2~wp-0.shop~shop.svc.cluster.local",
            ),
            ("user_agent", "curl/8"),
            ("response_size", "12"),
        ] {
            assert_eq!(
                attribute(server, key).as_deref(),
                Some(want),
                "server {key}"
            );
        }
        for (key, want) in [
            ("component", "proxy"),
            ("http.status_code", "200"),
            (
                "upstream_cluster",
                "outbound|9080|v1|reviews.shop.svc.cluster.local",
            ),
            ("upstream_address", "10.10.0.4:8080"),
            ("peer.address", "10.10.0.4"),
            (
                "destination.principal",
                "spiffe://cluster.local/ns/shop/sa/reviews",
            ),
        ] {
            assert_eq!(
                attribute(client, key).as_deref(),
                Some(want),
                "client {key}"
            );
        }
        assert_eq!(attribute(client, "retry.count"), None);
        // The query string (here a token) never reaches the collector.
        for span in &spans {
            assert!(
                span.attributes
                    .iter()
                    .all(|kv| !kv.value.to_string().contains("secret")),
                "{span:#?}"
            );
        }
        let samples = parse(&bed.metrics.encode());
        assert_eq!(
            value(
                &samples,
                "ambit_waypoint_tracing_spans_total",
                &[("result", "exported")]
            ),
            Some(2.0)
        );
    }

    /// A `tracestate` beyond W3C's bounds (512 characters, 32 members) is dropped whole, not
    /// passed on (nor cut); one within them is passed on as it came.
    #[test]
    fn an_oversized_tracestate_is_dropped() {
        let bed = Bed::new(0.0);
        let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
        let members = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}=v"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let long = format!("vendor={}", "x".repeat(MAX_TRACESTATE_CHARS));
        for (what, state) in [("33 members", members(33)), ("over 512 characters", long)] {
            let sent = bed.request(&[("traceparent", &tp), ("tracestate", &state)]);
            assert_eq!(sent.get("tracestate"), None, "{what}");
            assert_eq!(
                traceparent(&sent).0,
                CLIENT_TRACE,
                "{what}: the trace goes on"
            );
            let spans = bed.exported();
            assert!(
                spans
                    .iter()
                    .all(|s| s.span_context.trace_state().header().is_empty()),
                "{what}"
            );
        }
        let sent = bed.request(&[("traceparent", &tp), ("tracestate", &members(32))]);
        assert_eq!(sent["tracestate"], members(32).as_str());
        bed.exported();
    }

    /// An unsampled W3C parent is not traced even at 100%, and a request without a context is
    /// not at 0%; the try still carries a `traceparent` (the caller's trace, or a new one) with
    /// the sampled flag off.
    #[test]
    fn unsampled_requests_export_nothing_but_still_propagate() {
        let bed = Bed::new(100.0);
        let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
        let sent = bed.request(&[("traceparent", &tp)]);
        assert!(bed.exported().is_empty());
        let (trace, parent, flags) = traceparent(&sent);
        assert_eq!((trace.as_str(), flags.as_str()), (CLIENT_TRACE, "00"));
        assert_ne!(parent, CLIENT_SPAN, "the try names the waypoint's span");

        let bed = Bed::new(0.0);
        let sent = bed.request(&[]);
        assert!(bed.exported().is_empty());
        let (trace, _, flags) = traceparent(&sent);
        assert_ne!(trace, "0".repeat(32));
        assert_eq!(flags, "00");
    }

    /// Without a context, 100% samples every new trace, which starts at the waypoint.
    #[test]
    fn a_request_without_context_starts_a_trace_by_the_percentage() {
        let bed = Bed::new(100.0);
        let sent = bed.request(&[]);
        let spans = bed.exported();
        assert_eq!(spans.len(), 2);
        let server = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server)
            .unwrap();
        assert_eq!(server.parent_span_id, SpanId::INVALID);
        assert_eq!(
            traceparent(&sent).0,
            server.span_context.trace_id().to_string()
        );
    }

    /// B3 in both forms is accepted: the server span is the B3 span's child, and the try's B3
    /// headers are rewritten in the same form (the stale parent dropped), beside a
    /// `traceparent`.
    #[test]
    fn b3_contexts_are_accepted_and_rewritten_in_their_form() {
        let bed = Bed::new(0.0);
        let single = format!("{CLIENT_TRACE}-{CLIENT_SPAN}-1-0000000000000001");
        let sent = bed.request(&[("b3", &single)]);
        let spans = bed.exported();
        let server = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server)
            .unwrap();
        let client = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Client)
            .unwrap();
        assert_eq!(server.parent_span_id.to_string(), CLIENT_SPAN);
        assert_eq!(server.span_context.trace_id().to_string(), CLIENT_TRACE);
        assert_eq!(
            sent["b3"],
            format!(
                "{CLIENT_TRACE}-{}-1-{}",
                client.span_context.span_id(),
                server.span_context.span_id()
            )
        );
        assert_eq!(
            traceparent(&sent).1,
            client.span_context.span_id().to_string()
        );

        let sent = bed.request(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", CLIENT_SPAN),
            ("x-b3-parentspanid", "0000000000000002"),
            ("x-b3-sampled", "1"),
        ]);
        let spans = bed.exported();
        let server = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server)
            .unwrap();
        let client = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Client)
            .unwrap();
        assert_eq!(
            server.span_context.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert_eq!(server.parent_span_id.to_string(), CLIENT_SPAN);
        assert_eq!(
            sent["x-b3-spanid"],
            client.span_context.span_id().to_string()
        );
        assert_eq!(
            sent["x-b3-parentspanid"],
            server.span_context.span_id().to_string()
        );
        assert_eq!(sent["x-b3-sampled"], "1");
        assert!(!sent.contains_key("b3"));

        // B3 without a sampling state leaves the decision to the percentage (0 here); B3
        // saying "not sampled" is kept at 100%.
        bed.request(&[("b3", &format!("{CLIENT_TRACE}-{CLIENT_SPAN}"))]);
        assert!(bed.exported().is_empty());
        let bed = Bed::new(100.0);
        bed.request(&[
            ("x-b3-traceid", CLIENT_TRACE),
            ("x-b3-spanid", CLIENT_SPAN),
            ("x-b3-sampled", "0"),
        ]);
        assert!(bed.exported().is_empty());
        bed.request(&[("b3", "0")]);
        assert!(bed.exported().is_empty());
    }

    /// A processor that keeps what it is given.
    #[derive(Debug, Default)]
    struct Keep(Mutex<Vec<SpanData>>);
    impl SpanProcessor for Keep {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    /// The counters of the export path, registered in a registry of their own.
    struct Counted {
        registry: Metrics,
        counters: IntCounterVec,
        queue: Arc<Queue>,
    }

    impl Counted {
        fn new() -> Self {
            let registry = Metrics::new();
            let counters = IntCounterVec::new(
                Opts::new("ambit_waypoint_tracing_spans_total", "spans"),
                &["result"],
            )
            .unwrap();
            registry.register(Box::new(counters.clone())).unwrap();
            let dropped = IntCounterVec::new(
                Opts::new("ambit_waypoint_tracing_spans_dropped_total", "drops"),
                &["reason"],
            )
            .unwrap();
            registry.register(Box::new(dropped.clone())).unwrap();
            Self {
                registry,
                counters,
                queue: Arc::new(Queue::new(dropped)),
            }
        }

        fn processor(&self) -> BoundedProcessor<Keep> {
            BoundedProcessor {
                inner: Keep::default(),
                queue: self.queue.clone(),
                counters: self.counters.clone(),
            }
        }

        fn exporter<E>(&self, inner: E) -> CountedExporter<E> {
            CountedExporter {
                inner,
                queue: self.queue.clone(),
                counters: self.counters.clone(),
                failing: AtomicBool::new(false),
            }
        }

        fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            value(&parse(&self.registry.encode()), name, labels)
        }

        fn dropped(&self, reason: &str) -> Option<f64> {
            self.value(
                "ambit_waypoint_tracing_spans_dropped_total",
                &[("reason", reason)],
            )
        }
    }

    /// A finished span made for `caller`.
    fn span_of(caller: &str) -> SpanData {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("test");
        let span = tracer
            .span_builder("one")
            .with_attributes(vec![KeyValue::new(CALLER_ATTRIBUTE, caller.to_string())])
            .start(&tracer);
        span.exported_data().unwrap()
    }

    /// Past [`MAX_QUEUE`] spans waiting for the exporter, spans are dropped and counted
    /// (`queue_full`); a batch handed to the exporter frees its places.
    #[test]
    fn the_export_queue_is_bounded_and_drops_are_counted() {
        let counted = Counted::new();
        let processor = counted.processor();
        // Many callers, each within its share: the queue's bound is what holds.
        let callers: Vec<String> = (0..MAX_QUEUE / MIN_CALLER_SHARE + 8)
            .map(|i| format!("spiffe://cluster.local/ns/shop/sa/c{i}"))
            .collect();
        let spans: Vec<SpanData> = callers.iter().map(|c| span_of(c)).collect();
        let mut offered = 0;
        'fill: for _ in 0..MIN_CALLER_SHARE {
            for span in &spans {
                processor.on_end(span.clone());
                offered += 1;
                if offered == MAX_QUEUE + 10 {
                    break 'fill;
                }
            }
        }
        assert_eq!(processor.inner.0.lock().unwrap().len(), MAX_QUEUE);
        assert_eq!(counted.dropped("queue_full"), Some(10.0));
        assert_eq!(
            counted.value(
                "ambit_waypoint_tracing_spans_total",
                &[("result", "dropped")]
            ),
            Some(10.0)
        );
        // A batch of 100 leaves: 100 more fit.
        let batch: Vec<SpanData> = processor.inner.0.lock().unwrap()[..100].to_vec();
        futures::executor::block_on(counted.exporter(Collector::default()).export(batch.clone()))
            .unwrap();
        assert_eq!(counted.queue.places().total, MAX_QUEUE - 100);
        for span in batch {
            processor.on_end(span);
        }
        processor.on_end(spans[0].clone());
        assert_eq!(processor.inner.0.lock().unwrap().len(), MAX_QUEUE + 100);
        assert_eq!(counted.dropped("queue_full"), Some(11.0));
    }

    /// One caller forcing sampling cannot fill the queue: it holds at most its share, the
    /// drops are counted `caller_budget`, and another caller's spans still get in; as the
    /// flooder's spans leave, it gets places again.
    #[test]
    fn one_caller_cannot_take_the_whole_export_queue() {
        let counted = Counted::new();
        let processor = counted.processor();
        let flooder = span_of("spiffe://cluster.local/ns/sandbox/sa/flood");
        for _ in 0..MAX_QUEUE {
            processor.on_end(flooder.clone());
        }
        let held = processor.inner.0.lock().unwrap().len();
        assert_eq!(held, MAX_QUEUE / 2, "alone, a caller holds half the queue");
        assert_eq!(
            counted.dropped("caller_budget"),
            Some((MAX_QUEUE - held) as f64)
        );
        // Another caller still gets in, up to its own share.
        let other = span_of("spiffe://cluster.local/ns/shop/sa/client");
        for _ in 0..MAX_QUEUE {
            processor.on_end(other.clone());
        }
        let kept = processor.inner.0.lock().unwrap();
        let of = |caller: &str| kept.iter().filter(|s| caller_of(s) == caller).count();
        assert_eq!(
            of("spiffe://cluster.local/ns/shop/sa/client"),
            MAX_QUEUE / 3
        );
        assert_eq!(
            of("spiffe://cluster.local/ns/sandbox/sa/flood"),
            MAX_QUEUE / 2
        );
        drop(kept);
        assert_eq!(counted.dropped("queue_full"), None);
        // A third caller still has room: two floods leave it a share.
        let third = span_of("spiffe://cluster.local/ns/shop/sa/third");
        processor.on_end(third.clone());
        assert_eq!(
            processor.inner.0.lock().unwrap().len(),
            MAX_QUEUE / 2 + MAX_QUEUE / 3 + 1
        );
        // The flooder's spans leave: it may queue again.
        let before = counted.dropped("caller_budget");
        futures::executor::block_on(
            counted
                .exporter(Collector::default())
                .export(vec![flooder.clone(); MAX_QUEUE / 2]),
        )
        .unwrap();
        processor.on_end(flooder);
        assert_eq!(counted.dropped("caller_budget"), before);
    }

    /// A batch the collector refuses is counted `failed`, one it takes `exported`; either way
    /// its places in the queue are freed.
    #[test]
    fn exports_are_counted_by_result() {
        #[derive(Debug)]
        struct Refuse;
        impl SpanExporter for Refuse {
            async fn export(&self, _: Vec<SpanData>) -> OTelSdkResult {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "collector unreachable".into(),
                ))
            }
        }
        let counted = Counted::new();
        let processor = counted.processor();
        let one = span_of("spiffe://cluster.local/ns/shop/sa/client");
        for _ in 0..7 {
            processor.on_end(one.clone());
        }
        let refusing = counted.exporter(Refuse);
        assert!(futures::executor::block_on(refusing.export(vec![one.clone(); 3])).is_err());
        assert!(refusing.failing.load(Ordering::Relaxed));
        let taking = counted.exporter(Collector::default());
        futures::executor::block_on(taking.export(vec![one; 4])).unwrap();
        let places = counted.queue.places();
        assert_eq!((places.total, places.by_caller.len()), (0, 0));
        drop(places);
        let count =
            |result| counted.value("ambit_waypoint_tracing_spans_total", &[("result", result)]);
        assert_eq!((count("failed"), count("exported")), (Some(3.0), Some(4.0)));
    }

    #[test]
    fn flags_are_checked() {
        assert!(parse_endpoint("http://collector:4317").is_ok());
        assert!(
            parse_endpoint("https://collector:4317")
                .unwrap_err()
                .contains("TLS")
        );
        assert!(parse_endpoint("collector:4317").is_err());
        assert!(
            parse_endpoint("http://collector")
                .unwrap_err()
                .contains("4317")
        );
    }
}
