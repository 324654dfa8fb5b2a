//! A real OTLP/gRPC trace receiver on the test bed: the collector's `TraceService` (the
//! OpenTelemetry protocol definitions, `opentelemetry-proto`'s generated tonic server) listening
//! in the bed's fabric namespace, where the CA listens and every pod of a node the fabric routes
//! back to reaches it. What exporters send is decoded and kept for the test to read.
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::oneshot;

use crate::Cluster;
use crate::cluster::CA_ADDR;
use crate::util::{self, Netns};

/// One span received, with its resource's `service.name`.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// The `service.name` of the resource that sent it.
    pub service: String,
    /// The span as decoded.
    pub span: Span,
}

impl ReceivedSpan {
    /// The trace id, in hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id, in hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id, in hex (empty for a root span).
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The string form of attribute `key` (strings as they are, numbers and booleans printed).
    pub fn attribute(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(text)
    }

    /// Whether it is a server span (`SPAN_KIND_SERVER`).
    pub fn is_server(&self) -> bool {
        self.span.kind == 2
    }

    /// Whether it is a client span (`SPAN_KIND_CLIENT`).
    pub fn is_client(&self) -> bool {
        self.span.kind == 3
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// The receiver's service: keeps every span of every export request.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .and_then(text)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver in the bed's fabric namespace, stopped on drop.
pub struct OtlpReceiver {
    addr: SocketAddr,
    collector: Collector,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Starts a receiver on a free port of the fabric's address (where the CA listens).
    pub fn start(cluster: &Cluster) -> Result<Self> {
        let netns = Path::new(util::NETNS_DIR).join(cluster.fabric_netns());
        let ip: IpAddr = CA_ADDR.ip();
        // The socket is made inside the fabric namespace and stays there; it is served from a
        // thread of the test's own.
        let listener = Netns::enter_thread(&netns, || std::net::TcpListener::bind((ip, 0)))?
            .context("binding the OTLP receiver")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let collector = Collector::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(collector.clone());
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => return eprintln!("otlp receiver: no runtime: {err}"),
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(err) => return eprintln!("otlp receiver: {err}"),
                    };
                    let incoming = tonic::transport::server::TcpIncoming::from(listener);
                    // Stopped at once, not gracefully: the exporters' connections need not
                    // close first (the runtime's end drops them).
                    tokio::select! {
                        served = tonic::transport::Server::builder()
                            .serve_with_incoming(service, incoming) => {
                            if let Err(err) = served {
                                eprintln!("otlp receiver: {err}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Self {
            addr,
            collector,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The endpoint exporters are given: `http://<fabric address>:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits (`timeout` at most) until the spans received hold `count` of trace `trace_id`,
    /// and returns that trace's spans.
    pub fn wait_trace(
        &self,
        trace_id: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            let trace: Vec<ReceivedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id() == trace_id)
                .collect();
            if trace.len() >= count {
                return Ok(trace);
            }
            if Instant::now() > deadline {
                bail!(
                    "the receiver got {} span(s) of trace {trace_id} in {timeout:?}, not {count}; \
                     all spans: {:#?}",
                    trace.len(),
                    self.spans()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
