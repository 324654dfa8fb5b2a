//! The limits' metrics: the limits in force, the slots held, what was refused or timed out, and
//! the process's descriptors under the names Prometheus' process collector gives them; read at
//! each scrape.
use std::sync::Arc;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, core::Collector};

use super::Limits;
use crate::telemetry::metrics::{ScrapeTime, gauge_value, set_counter};

/// The connection limits and what they refused ([`crate::limits`]), and the process's
/// descriptors under the names Prometheus' process collector gives them.
pub struct LimitMetrics {
    /// The limits in force (`None`: only the descriptors are reported).
    limits: Option<Arc<Limits>>,
    open_fds: IntGauge,
    max_fds: IntGauge,
    limit: IntGaugeVec,
    in_use: IntGaugeVec,
    over_limit: IntCounterVec,
    timed_out: IntCounterVec,
    accept_errors: IntCounterVec,
    buffer_limit: IntGaugeVec,
    buffer_bytes: IntGauge,
    buffer_reads_shrunk: IntCounterVec,
}

impl LimitMetrics {
    /// The metrics of `limits`.
    pub fn new(limits: Option<Arc<Limits>>) -> prometheus::Result<Self> {
        Ok(Self {
            limits,
            open_fds: IntGauge::new("process_open_fds", "Number of open file descriptors")?,
            max_fds: IntGauge::new(
                "process_max_fds",
                "Maximum number of open file descriptors (the soft RLIMIT_NOFILE)",
            )?,
            limit: IntGaugeVec::new(
                Opts::new(
                    "ambit_connection_limit",
                    "The agent's connection limits: proxied connections in all (total) and per \
                     source address (per_source), HBONE handshakes in progress in all and per \
                     source",
                ),
                &["limit"],
            )?,
            in_use: IntGaugeVec::new(
                Opts::new(
                    "ambit_connection_slots_in_use",
                    "Slots held now: proxied connections and HBONE tunnels (connections), HBONE \
                     connections in their handshake (handshakes)",
                ),
                &["slots"],
            )?,
            over_limit: IntCounterVec::new(
                Opts::new(
                    "ambit_connections_over_limit_total",
                    "Connections (and HBONE tunnels) refused because a limit was reached, by \
                     path and limit",
                ),
                &["path", "limit"],
            )?,
            timed_out: IntCounterVec::new(
                Opts::new(
                    "ambit_connections_timed_out_total",
                    "Connections closed because a phase took too long (TLS handshake, HTTP/2 \
                     preface, HTTP request, connection age), by path and phase",
                ),
                &["path", "phase"],
            )?,
            accept_errors: IntCounterVec::new(
                Opts::new(
                    "ambit_accept_errors_total",
                    "Failed accepts (out of descriptors and the like: the listener backs off), \
                     by path",
                ),
                &["path"],
            )?,
            buffer_limit: IntGaugeVec::new(
                Opts::new(
                    "ambit_relay_buffer_limit_bytes",
                    "Memory the relay's read buffers may hold beyond their smallest size: all \
                     connections together (total) and those of one source address (per_source)",
                ),
                &["limit"],
            )?,
            buffer_bytes: IntGauge::new(
                "ambit_relay_buffer_bytes",
                "Memory the relay's read buffers hold now beyond their smallest size",
            )?,
            buffer_reads_shrunk: IntCounterVec::new(
                Opts::new(
                    "ambit_relay_buffer_reads_shrunk_total",
                    "Relay reads made with a smaller buffer than the connection's transfer \
                     called for, by the limit that had no room (total or per_source)",
                ),
                &["limit"],
            )?,
        })
    }
}

impl ScrapeTime for LimitMetrics {
    fn parts(&self) -> Vec<&dyn Collector> {
        vec![
            &self.open_fds,
            &self.max_fds,
            &self.limit,
            &self.in_use,
            &self.over_limit,
            &self.timed_out,
            &self.accept_errors,
            &self.buffer_limit,
            &self.buffer_bytes,
            &self.buffer_reads_shrunk,
        ]
    }

    fn refresh(&self) {
        let gauge = |n: usize| gauge_value(n);
        if let Ok(open) = super::open_descriptors() {
            self.open_fds.set(i64::try_from(open).unwrap_or(i64::MAX));
        }
        if let Ok(limit) = super::nofile_limit() {
            self.max_fds
                .set(i64::try_from(limit.soft).unwrap_or(i64::MAX));
        }
        let Some(limits) = &self.limits else {
            return;
        };
        let settings = limits.settings();
        for (name, value) in [
            ("total", settings.max_connections),
            ("per_source", settings.max_connections_per_source),
            ("handshakes", settings.max_handshakes),
            ("handshakes_per_source", settings.max_handshakes_per_source),
        ] {
            self.limit.with_label_values(&[name]).set(gauge(value));
        }
        let snapshot = limits.snapshot();
        self.in_use
            .with_label_values(&["connections"])
            .set(gauge(snapshot.connections));
        self.in_use
            .with_label_values(&["handshakes"])
            .set(gauge(snapshot.handshakes));
        for (path, limit, n) in snapshot.over_limit {
            set_counter(
                &self
                    .over_limit
                    .with_label_values(&[path.as_str(), limit.as_str()]),
                n,
            );
        }
        for (path, phase, n) in snapshot.timed_out {
            set_counter(
                &self
                    .timed_out
                    .with_label_values(&[path.as_str(), phase.as_str()]),
                n,
            );
        }
        for (path, n) in snapshot.accept_errors {
            set_counter(&self.accept_errors.with_label_values(&[path.as_str()]), n);
        }
        for (name, value) in [
            ("total", settings.max_relay_buffer_bytes),
            ("per_source", settings.max_relay_buffer_bytes_per_source),
        ] {
            self.buffer_limit
                .with_label_values(&[name])
                .set(gauge(value));
        }
        self.buffer_bytes.set(gauge(snapshot.relay_buffer_bytes));
        for (limit, n) in snapshot.relay_buffers_shrunk {
            set_counter(
                &self
                    .buffer_reads_shrunk
                    .with_label_values(&[limit.as_str()]),
                n,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::{
        Metrics,
        exposition::{parse, value},
    };

    #[test]
    fn limits_and_descriptors_are_read_at_scrape_time() {
        use crate::limits::{LimitSettings, Path, Phase};
        let metrics = Metrics::new();
        let mut settings = LimitSettings::for_descriptors(20_000);
        settings.max_connections_per_source = 1;
        let limits = Arc::new(Limits::new(settings));
        metrics
            .register_at_scrape(Arc::new(LimitMetrics::new(Some(limits.clone())).unwrap()))
            .unwrap();
        let ip = "10.0.0.1".parse().unwrap();
        let held = limits.admit(Path::Inbound, ip).unwrap();
        assert!(limits.admit(Path::Inbound, ip).is_none());
        assert!(limits.admit(Path::HboneTunnel, ip).is_none());
        limits.timed_out(Path::Readiness, Phase::HttpRequest);
        let buffers = limits.buffer_share(ip);
        let grant = buffers.grant(16 * 1024).unwrap();
        buffers.shrunk(crate::limits::Limit::PerSource);
        let samples = parse(&metrics.encode());
        let get = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
        assert_eq!(
            get("ambit_connection_limit", &[("limit", "total")]),
            Some(8_750.0)
        );
        assert_eq!(
            get("ambit_connection_limit", &[("limit", "per_source")]),
            Some(1.0)
        );
        assert_eq!(
            get("ambit_connection_slots_in_use", &[("slots", "connections")]),
            Some(1.0)
        );
        assert_eq!(
            get(
                "ambit_connections_over_limit_total",
                &[("path", "inbound"), ("limit", "per_source")]
            ),
            Some(1.0)
        );
        assert_eq!(
            get(
                "ambit_connections_over_limit_total",
                &[("path", "hbone_tunnel"), ("limit", "per_source")]
            ),
            Some(1.0)
        );
        assert_eq!(
            get(
                "ambit_connections_timed_out_total",
                &[("path", "readiness"), ("phase", "http_request")]
            ),
            Some(1.0)
        );
        assert_eq!(
            get("ambit_relay_buffer_limit_bytes", &[("limit", "total")]),
            Some(64.0 * 1024.0 * 1024.0)
        );
        assert_eq!(
            get("ambit_relay_buffer_limit_bytes", &[("limit", "per_source")]),
            Some(16.0 * 1024.0 * 1024.0)
        );
        assert_eq!(get("ambit_relay_buffer_bytes", &[]), Some(16384.0));
        assert_eq!(
            get(
                "ambit_relay_buffer_reads_shrunk_total",
                &[("limit", "per_source")]
            ),
            Some(1.0)
        );
        drop(grant);
        // The process's own descriptors, as Prometheus' process collector names them.
        let open = get("process_open_fds", &[]).unwrap();
        let max = get("process_max_fds", &[]).unwrap();
        assert!(open >= 3.0 && max >= open, "{open} of {max}");
        drop(held);
        let samples = parse(&metrics.encode());
        assert_eq!(
            value(
                &samples,
                "ambit_connection_slots_in_use",
                &[("slots", "connections")]
            ),
            Some(0.0)
        );
    }
}
