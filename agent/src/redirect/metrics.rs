//! The datapath's metrics: the eBPF programs' event counters and the pinned maps' occupancy,
//! read from the kernel at each scrape.
use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, core::Collector};

use super::{RedirectStats, Redirector};
use crate::telemetry::metrics::{ScrapeTime, gauge_value, set_counter};

/// The datapath's metrics.
pub struct RedirectMetrics {
    /// Where the figures come from (`None` in tests: loading eBPF needs privileges).
    redirector: Option<Arc<Redirector>>,
    redirected: IntCounterVec,
    excluded: IntCounter,
    map_full: IntCounter,
    pod_quota: IntCounter,
    closed_refused: IntCounter,
    inbound_steered: IntCounter,
    inbound_no_listener: IntCounter,
    inbound_from_node: IntCounter,
    spliced_bytes: IntCounter,
    splice_no_target: IntCounter,
    splice_unpaired: IntCounter,
    source_not_bound: IntCounter,
    inbound_excluded: IntCounter,
    spliced: IntGauge,
    splice_enabled: IntGauge,
    splice_draining: IntGauge,
    splice_drain_checks: IntCounter,
    map_entries: IntGaugeVec,
}

/// The splice's figures at a scrape.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpliceFigures {
    /// The splice is loaded and passed its self-test.
    pub enabled: bool,
    /// Connections spliced now.
    pub spliced: usize,
    /// Spliced connections waiting for a peer to take a half-closed direction's bytes.
    pub draining: usize,
    /// Checks of such directions so far.
    pub drain_checks: u64,
}

impl RedirectMetrics {
    /// The metrics of `redirector`'s programs and maps.
    pub fn new(redirector: Option<Arc<Redirector>>) -> prometheus::Result<Self> {
        Ok(Self {
            redirector,
            redirected: IntCounterVec::new(
                Opts::new(
                    "ambit_redirected_connections_total",
                    "Outbound connects rewritten to the agent by the eBPF programs, by family",
                ),
                &["family"],
            )?,
            excluded: IntCounter::new(
                "ambit_redirect_excluded_total",
                "Outbound connects of enrolled pods left alone by a port or network exclusion",
            )?,
            map_full: IntCounter::new(
                "ambit_redirect_map_full_total",
                "Outbound connects refused or closed because an eBPF map or a socket's storage \
                 could not take their original destination",
            )?,
            pod_quota: IntCounter::new(
                "ambit_redirect_pod_quota_total",
                "Outbound connects beyond their pod's share of handshakes in flight (closed)",
            )?,
            closed_refused: IntCounter::new(
                "ambit_redirect_closed_refused_total",
                "Outbound connects of closed pods refused by the eBPF programs",
            )?,
            inbound_steered: IntCounter::new(
                "ambit_inbound_steered_total",
                "Inbound connections steered to a pod's listener by sk_lookup",
            )?,
            inbound_no_listener: IntCounter::new(
                "ambit_inbound_no_listener_total",
                "Inbound connections dropped because the pod's listener was gone (agent down, \
                 pod closed)",
            )?,
            inbound_from_node: IntCounter::new(
                "ambit_inbound_from_node_total",
                "Inbound connections from the node's own addresses (kubelet's probes) let \
                 through to the application",
            )?,
            spliced_bytes: IntCounter::new(
                "ambit_spliced_bytes_total",
                "Bytes of same-node connections the kernel forwarded between the agent's spliced \
                 sockets (they never reached the agent's user space)",
            )?,
            splice_no_target: IntCounter::new(
                "ambit_splice_no_target_total",
                "Chunks of spliced connections dropped because the peer socket was gone (the \
                 connection was closing)",
            )?,
            splice_unpaired: IntCounter::new(
                "ambit_splice_unpaired_total",
                "Chunks that reached a spliced socket without a peer (passed to the agent, which \
                 closes the connection); never expected",
            )?,
            source_not_bound: IntCounter::new(
                "ambit_redirect_source_not_bound_total",
                "Redirected connects whose socket could not be bound to its pod's address (the \
                 application had bound it, or the pod has no address of that family): its \
                 getsockname() shows loopback or the application's address",
            )?,
            inbound_excluded: IntCounter::new(
                "ambit_inbound_excluded_total",
                "Inbound connections to a pod's excluded inbound port (its \
                 excludeInboundPorts) let through to the application, unmeshed",
            )?,
            spliced: IntGauge::new(
                "ambit_spliced_connections",
                "Same-node connections spliced in the kernel now",
            )?,
            splice_enabled: IntGauge::new(
                "ambit_splice_enabled",
                "1 when the same-node splice is loaded and passed its self-test; 0 when it is \
                 not wanted (the default) or the kernel cannot run it (then the agent relays \
                 same-node connections)",
            )?,
            splice_draining: IntGauge::new(
                "ambit_splice_draining_connections",
                "Spliced connections with a half-closed direction whose peer has not taken \
                 every forwarded byte yet",
            )?,
            splice_drain_checks: IntCounter::new(
                "ambit_splice_drain_checks_total",
                "Checks of half-closed spliced directions (backed off from 1 ms to 1 s each)",
            )?,
            map_entries: IntGaugeVec::new(
                Opts::new("ambit_ebpf_map_entries", "Entries in each pinned eBPF map"),
                &["map"],
            )?,
        })
    }

    /// Copies the programs' counters, the maps' occupancy and the spliced connections in.
    pub fn record(&self, stats: RedirectStats, occupancy: &[(&str, usize)], splice: SpliceFigures) {
        set_counter(
            &self.redirected.with_label_values(&["ipv4"]),
            stats.redirected_v4,
        );
        set_counter(
            &self.redirected.with_label_values(&["ipv6"]),
            stats.redirected_v6,
        );
        set_counter(&self.excluded, stats.excluded);
        set_counter(&self.map_full, stats.map_full);
        set_counter(&self.pod_quota, stats.pod_quota);
        set_counter(&self.closed_refused, stats.closed_refused);
        set_counter(&self.inbound_steered, stats.inbound_steered);
        set_counter(&self.inbound_no_listener, stats.inbound_no_listener);
        set_counter(&self.inbound_from_node, stats.inbound_from_node);
        set_counter(&self.spliced_bytes, stats.spliced_bytes);
        set_counter(&self.splice_no_target, stats.splice_no_target);
        set_counter(&self.splice_unpaired, stats.splice_unpaired);
        set_counter(&self.source_not_bound, stats.source_not_bound);
        set_counter(&self.inbound_excluded, stats.inbound_excluded);
        self.spliced.set(gauge_value(splice.spliced));
        self.splice_enabled.set(i64::from(splice.enabled));
        self.splice_draining.set(gauge_value(splice.draining));
        set_counter(&self.splice_drain_checks, splice.drain_checks);
        for (map, entries) in occupancy {
            self.map_entries
                .with_label_values(&[map])
                .set(gauge_value(*entries));
        }
    }
}

impl ScrapeTime for RedirectMetrics {
    fn parts(&self) -> Vec<&dyn Collector> {
        vec![
            &self.redirected,
            &self.excluded,
            &self.map_full,
            &self.pod_quota,
            &self.closed_refused,
            &self.inbound_steered,
            &self.inbound_no_listener,
            &self.inbound_from_node,
            &self.spliced_bytes,
            &self.splice_no_target,
            &self.splice_unpaired,
            &self.source_not_bound,
            &self.inbound_excluded,
            &self.spliced,
            &self.splice_enabled,
            &self.splice_draining,
            &self.splice_drain_checks,
            &self.map_entries,
        ]
    }

    fn refresh(&self) {
        if let Some(redirector) = &self.redirector {
            let splice = redirector
                .splicer()
                .map(|splicer| SpliceFigures {
                    enabled: true,
                    spliced: splicer.spliced(),
                    draining: splicer.stats().draining(),
                    drain_checks: splicer.stats().drain_checks(),
                })
                .unwrap_or_default();
            self.record(redirector.stats(), &redirector.map_occupancy(), splice);
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
    fn counters_and_occupancy_are_what_the_kernel_says_at_each_scrape() {
        let metrics = Metrics::new();
        let datapath = Arc::new(RedirectMetrics::new(None).unwrap());
        metrics.register_at_scrape(datapath.clone()).unwrap();
        let stats = RedirectStats {
            redirected_v4: 5,
            redirected_v6: 2,
            excluded: 1,
            map_full: 0,
            inbound_steered: 4,
            inbound_no_listener: 3,
            pod_quota: 6,
            closed_refused: 8,
            inbound_from_node: 9,
            spliced_bytes: 1 << 30,
            splice_no_target: 10,
            splice_unpaired: 11,
            source_not_bound: 13,
            inbound_excluded: 14,
        };
        let splice = SpliceFigures {
            enabled: true,
            spliced: 12,
            draining: 3,
            drain_checks: 40,
        };
        datapath.record(
            stats,
            &[("ENROLLED_NETNS", 2), ("ORIG_DST_TUPLE", 7)],
            splice,
        );
        let samples = parse(&metrics.encode());
        let get = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
        for (name, want) in [
            ("ambit_redirect_pod_quota_total", 6.0),
            ("ambit_redirect_closed_refused_total", 8.0),
            ("ambit_inbound_from_node_total", 9.0),
            ("ambit_redirect_excluded_total", 1.0),
            ("ambit_redirect_map_full_total", 0.0),
            ("ambit_inbound_steered_total", 4.0),
            ("ambit_inbound_no_listener_total", 3.0),
            ("ambit_spliced_bytes_total", f64::from(1u32 << 30)),
            ("ambit_splice_no_target_total", 10.0),
            ("ambit_splice_unpaired_total", 11.0),
            ("ambit_redirect_source_not_bound_total", 13.0),
            ("ambit_inbound_excluded_total", 14.0),
            ("ambit_spliced_connections", 12.0),
            ("ambit_splice_enabled", 1.0),
            ("ambit_splice_draining_connections", 3.0),
            ("ambit_splice_drain_checks_total", 40.0),
        ] {
            assert_eq!(get(name, &[]), Some(want), "{name}");
        }
        assert_eq!(
            get("ambit_redirected_connections_total", &[("family", "ipv4")]),
            Some(5.0)
        );
        assert_eq!(
            get("ambit_redirected_connections_total", &[("family", "ipv6")]),
            Some(2.0)
        );
        assert_eq!(
            get("ambit_ebpf_map_entries", &[("map", "ORIG_DST_TUPLE")]),
            Some(7.0)
        );
        // Totals kept by the kernel are copied, not added up, scrape after scrape.
        datapath.record(stats, &[], splice);
        let again = parse(&metrics.encode());
        assert_eq!(
            value(
                &again,
                "ambit_redirected_connections_total",
                &[("family", "ipv4")]
            ),
            Some(5.0)
        );
    }
}
