//! Logging set-up and the per-connection access log.
use std::{net::SocketAddr, time::Duration};

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Output format of log and access-log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber (and the `log` bridge used by aya-log).
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|err| anyhow::anyhow!("invalid log filter {filter:?}: {err}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
    }
    Ok(())
}

/// Which proxy path served a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured on the source pod's outbound listener.
    Outbound,
    /// Captured on the destination pod's inbound plaintext listener.
    InboundPlaintext,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::InboundPlaintext => "inbound",
        }
    }
}

/// One access-log record, emitted when the connection ends.
#[derive(Debug)]
pub struct AccessLog<'a> {
    /// Proxy path.
    pub direction: Direction,
    /// The client's address as the agent saw it.
    pub src: SocketAddr,
    /// The source workload (`namespace/name`), when known.
    pub src_workload: Option<&'a str>,
    /// The address the client dialled.
    pub dst: SocketAddr,
    /// The address the agent connected to (a service's chosen endpoint, or `dst`).
    pub upstream: Option<SocketAddr>,
    /// The destination workload, when known.
    pub dst_workload: Option<&'a str>,
    /// The destination service, when `dst` was a service VIP.
    pub dst_service: Option<&'a str>,
    /// Bytes from client to upstream.
    pub bytes_sent: u64,
    /// Bytes from upstream to client.
    pub bytes_received: u64,
    /// Connection lifetime.
    pub duration: Duration,
    /// `ok`, or what failed.
    pub outcome: Result<(), String>,
}

impl AccessLog<'_> {
    /// Emits the record on the `access` target.
    pub fn emit(&self) {
        let upstream = self.upstream.map(|u| u.to_string());
        let (outcome, error) = match &self.outcome {
            Ok(()) => ("ok", None),
            Err(err) => ("error", Some(err.as_str())),
        };
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src = %self.src,
            src_workload = self.src_workload,
            dst = %self.dst,
            upstream = upstream.as_deref(),
            dst_workload = self.dst_workload,
            dst_service = self.dst_service,
            bytes_sent = self.bytes_sent,
            bytes_received = self.bytes_received,
            duration_ms = self.duration.as_millis() as u64,
            outcome,
            error,
            "connection complete"
        );
    }
}
