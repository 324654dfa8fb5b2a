//! Outlier detection (Istio's DestinationRule `trafficPolicy.outlierDetection`, Envoy's
//! consecutive-error ejection): an endpoint that fails `consecutive5xxErrors` times in a row
//! (or `consecutiveGatewayErrors` times with 502, 503, 504 or no answer at all) is ejected from
//! its cluster's load balancing for `baseEjectionTime` times the number of times it has been
//! ejected, then returns. Every balancer picks among the endpoints not ejected
//! ([`Outliers::healthy`]).
//!
//! As Envoy's: failures without an answer (connect failure, reset, timeout) count as gateway
//! errors and as 5xx (Envoy maps local-origin errors to 503/504 when
//! `split_external_local_origin_errors` is off, Istio's default); a non-5xx answer resets both
//! counts, a 5xx that is not a gateway error resets the gateway count; at most
//! `maxEjectionPercent` of the cluster's endpoints are ejected at once, but one always can be;
//! below `minHealthPercent` of endpoints not ejected, the cluster is in panic and ejections are
//! ignored; the ejection multiplier goes down by one for each `interval` an endpoint spends back
//! in the cluster; an ejection lasts at most [`MAX_EJECTION_TIME`] (or `baseEjectionTime`, if
//! longer).
//!
//! Where Ambit differs: an ejected endpoint returns as soon as its time is up, not at the next
//! `interval` sweep after it (nothing here runs between requests); the ejected-endpoints gauge
//! is brought up to date by the requests to the cluster.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tracing::info;

use super::{pool::ClusterId, retry::Failure};
use crate::{
    state::{
        Workload,
        upstream::{MAX_EJECTION_TIME, OutlierDetection},
    },
    telemetry::metrics::Metrics,
};

/// What became of one try, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryResult {
    /// An answer below 500.
    Success,
    /// A 5xx answer; `gateway`: 502, 503, 504, or no answer at all.
    Error {
        /// A gateway error.
        gateway: bool,
    },
}

impl TryResult {
    /// The result of an answer with `status`.
    pub fn of_status(status: u16) -> Self {
        match status {
            502..=504 => TryResult::Error { gateway: true },
            500.. => TryResult::Error { gateway: false },
            _ => TryResult::Success,
        }
    }
}

/// How the client's request stood when a try ended without an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Downstream {
    /// The client's body had been received to its end.
    pub request_complete: bool,
    /// The client's body failed (an aborted upload, more or less than declared).
    pub request_failed: bool,
}

/// What a failed try counts for the endpoint's outlier detection: `None` when the failure was
/// the client's, not the endpoint's. Envoy starts its per-try and route timers only once the
/// client's request is complete, and a client's reset is no upstream result; so a try that
/// ended while the client was still uploading (a trickled upload hitting a timeout, a stalled
/// upload hitting the stream idle timeout) or because the client's body failed is not charged
/// to the endpoint. A pool overflow is no result either.
pub fn failure_result(failure: &Failure, client: Downstream) -> Option<TryResult> {
    if client.request_failed {
        return None;
    }
    match failure {
        Failure::Overflow(_) => None,
        Failure::PerTryTimeout | Failure::StreamIdleTimeout if !client.request_complete => None,
        Failure::Response(status, _) => Some(TryResult::of_status(status.as_u16())),
        _ => Some(TryResult::Error { gateway: true }),
    }
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectionReason {
    /// `consecutive5xxErrors`.
    Consecutive5xx,
    /// `consecutiveGatewayErrors`.
    ConsecutiveGatewayErrors,
}

impl EjectionReason {
    fn as_str(self) -> &'static str {
        match self {
            EjectionReason::Consecutive5xx => "consecutive_5xx",
            EjectionReason::ConsecutiveGatewayErrors => "consecutive_gateway_errors",
        }
    }
}

/// The health of one cluster's endpoints, by endpoint uid.
#[derive(Debug, Default)]
pub struct ClusterHealth {
    hosts: HashMap<String, HostHealth>,
}

#[derive(Debug, Default)]
struct HostHealth {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Ejected until then.
    ejected_until: Option<Instant>,
    /// Times ejected (the ejection time's multiplier), decaying while healthy.
    ejections: u32,
    /// Since when the multiplier last decayed (or the host returned).
    decay_from: Option<Instant>,
}

impl HostHealth {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    /// Returns the host when its time is up; decays the multiplier by one per `interval` spent
    /// back in the cluster.
    fn refresh(&mut self, policy: &OutlierDetection, now: Instant) {
        if let Some(until) = self.ejected_until
            && now >= until
        {
            self.ejected_until = None;
            self.decay_from = Some(until);
        }
        if self.ejected_until.is_none()
            && self.ejections > 0
            && let Some(from) = self.decay_from
            && !policy.interval.is_zero()
        {
            let intervals = (now.saturating_duration_since(from).as_nanos()
                / policy.interval.as_nanos()) as u32;
            if intervals > 0 {
                self.ejections = self.ejections.saturating_sub(intervals);
                self.decay_from = Some(from + policy.interval * intervals);
            }
        }
    }
}

impl ClusterHealth {
    /// Counts `result` for `endpoint`, one of `total` endpoints of the cluster; ejects it when
    /// the policy says so: the reason and for how long.
    pub fn record(
        &mut self,
        policy: &OutlierDetection,
        endpoint: &str,
        total: usize,
        result: TryResult,
        now: Instant,
    ) -> Option<(EjectionReason, Duration)> {
        for host in self.hosts.values_mut() {
            host.refresh(policy, now);
        }
        let ejected_now = self.hosts.values().filter(|h| h.ejected(now)).count();
        let host = self.hosts.entry(endpoint.to_string()).or_default();
        if host.ejected(now) {
            return None;
        }
        let reason = match result {
            TryResult::Success => {
                host.consecutive_5xx = 0;
                host.consecutive_gateway = 0;
                return None;
            }
            TryResult::Error { gateway } => {
                host.consecutive_5xx += 1;
                if gateway {
                    host.consecutive_gateway += 1;
                } else {
                    host.consecutive_gateway = 0;
                }
                let by_5xx =
                    policy.consecutive_5xx > 0 && host.consecutive_5xx >= policy.consecutive_5xx;
                let by_gateway = policy.consecutive_gateway_errors > 0
                    && host.consecutive_gateway >= policy.consecutive_gateway_errors;
                match (by_gateway, by_5xx) {
                    (true, _) => EjectionReason::ConsecutiveGatewayErrors,
                    (false, true) => EjectionReason::Consecutive5xx,
                    (false, false) => return None,
                }
            }
        };
        host.consecutive_5xx = 0;
        host.consecutive_gateway = 0;
        // Envoy: eject while the share stays within the bound, and always one.
        let total = total.max(1);
        let within = (ejected_now + 1) * 100 <= policy.max_ejection_percent as usize * total;
        if !(within || ejected_now == 0) {
            return None;
        }
        host.ejections += 1;
        let cap = MAX_EJECTION_TIME.max(policy.base_ejection_time);
        let time = policy
            .base_ejection_time
            .saturating_mul(host.ejections)
            .min(cap);
        host.ejected_until = Some(now + time);
        host.decay_from = None;
        Some((reason, time))
    }

    /// The endpoints of `endpoints` not ejected (all of them below `minHealthPercent`: panic),
    /// and how many are ejected.
    pub fn healthy(
        &mut self,
        policy: &OutlierDetection,
        endpoints: &[Arc<Workload>],
        now: Instant,
    ) -> (Vec<Arc<Workload>>, usize) {
        if self.hosts.len() > endpoints.len() {
            // Forget endpoints that left the cluster (the map stays bounded by it).
            let current: std::collections::HashSet<String> =
                endpoints.iter().map(|e| e.uid()).collect();
            self.hosts.retain(|uid, _| current.contains(uid));
        }
        for host in self.hosts.values_mut() {
            host.refresh(policy, now);
        }
        let kept: Vec<Arc<Workload>> = endpoints
            .iter()
            .filter(|e| !self.hosts.get(&e.uid()).is_some_and(|h| h.ejected(now)))
            .cloned()
            .collect();
        let ejected = endpoints.len() - kept.len();
        let panic = kept.len() * 100 < policy.min_health_percent as usize * endpoints.len();
        if panic {
            return (endpoints.to_vec(), ejected);
        }
        (kept, ejected)
    }
}

/// The outlier detectors of every cluster of a waypoint, and their metrics.
pub struct Outliers {
    /// One entry per cluster requests went to (bounded by the configuration).
    clusters: Mutex<HashMap<String, ClusterHealth>>,
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
}

impl Outliers {
    /// Creates the detectors and registers their metrics in `metrics`.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let ejections = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_outlier_ejections_total",
                "Endpoints ejected by outlier detection, by destination service, subset and \
                 reason",
            ),
            &["destination_service", "subset", "reason"],
        )?;
        let ejected = IntGaugeVec::new(
            Opts::new(
                "ambit_waypoint_outlier_ejected_endpoints",
                "Endpoints ejected now (as of the last request), by destination service and \
                 subset",
            ),
            &["destination_service", "subset"],
        )?;
        metrics.register(Box::new(ejections.clone()))?;
        metrics.register(Box::new(ejected.clone()))?;
        Ok(Self {
            clusters: Mutex::default(),
            ejections,
            ejected,
        })
    }

    /// The endpoints of `cluster` a balancer may pick.
    pub fn healthy(
        &self,
        cluster: &ClusterId,
        policy: &OutlierDetection,
        endpoints: &[Arc<Workload>],
    ) -> Vec<Arc<Workload>> {
        let (kept, ejected) = self
            .clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cluster.name.clone())
            .or_default()
            .healthy(policy, endpoints, Instant::now());
        self.ejected
            .with_label_values(&[&cluster.service, &cluster.subset])
            .set(ejected as i64);
        kept
    }

    /// Counts a try's `result` for `endpoint`, one of `total` endpoints of `cluster`.
    pub fn record(
        &self,
        cluster: &ClusterId,
        policy: &OutlierDetection,
        endpoint: &str,
        total: usize,
        result: TryResult,
    ) {
        let ejected = self
            .clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cluster.name.clone())
            .or_default()
            .record(policy, endpoint, total, result, Instant::now());
        if let Some((reason, time)) = ejected {
            info!(
                cluster = %cluster.name,
                endpoint,
                reason = reason.as_str(),
                ejected_for = ?time,
                "outlier detection ejected an endpoint"
            );
            self.ejections
                .with_label_values(&[&cluster.service, &cluster.subset, reason.as_str()])
                .inc();
            self.ejected
                .with_label_values(&[&cluster.service, &cluster.subset])
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Client-caused failures are not charged to the endpoint; the endpoint's are.
    #[test]
    fn only_the_endpoints_failures_count() {
        let complete = Downstream {
            request_complete: true,
            request_failed: false,
        };
        let uploading = Downstream {
            request_complete: false,
            request_failed: false,
        };
        let aborted = Downstream {
            request_complete: false,
            request_failed: true,
        };
        let gateway = Some(TryResult::Error { gateway: true });
        let reset = || Failure::Reset("connection reset".into());
        // The endpoint failed a complete request.
        assert_eq!(failure_result(&Failure::PerTryTimeout, complete), gateway);
        assert_eq!(
            failure_result(&Failure::StreamIdleTimeout, complete),
            gateway
        );
        assert_eq!(failure_result(&reset(), complete), gateway);
        assert_eq!(
            failure_result(&Failure::Connect("refused".into()), complete),
            gateway
        );
        // A timer that fired while the client was still uploading: Envoy's would not have run.
        assert_eq!(failure_result(&Failure::PerTryTimeout, uploading), None);
        assert_eq!(failure_result(&Failure::StreamIdleTimeout, uploading), None);
        // The endpoint reset the stream mid-upload: its failure.
        assert_eq!(failure_result(&reset(), uploading), gateway);
        // The client aborted its upload (or sent more or less than it declared).
        assert_eq!(failure_result(&reset(), aborted), None);
        assert_eq!(failure_result(&Failure::PerTryTimeout, aborted), None);
        // Overflow is no result.
        assert_eq!(
            failure_result(&Failure::Overflow("max".into()), complete),
            None
        );
    }

    const ERROR: TryResult = TryResult::Error { gateway: false };
    const GATEWAY: TryResult = TryResult::Error { gateway: true };

    fn policy() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
            min_health_percent: 0,
        }
    }

    fn endpoints(n: usize) -> Vec<Arc<Workload>> {
        (0..n)
            .map(|i| {
                Arc::new(Workload {
                    name: format!("e{i}"),
                    namespace: "shop".into(),
                    service_account: "reviews".into(),
                    node: "n0".into(),
                    ips: vec![],
                    labels: Default::default(),
                    enrolled: true,
                    ready: true,
                    netns: crate::netns::NetnsRef::Cni,
                    controller: None,
                    capture_exclusions: Default::default(),
                })
            })
            .collect()
    }

    fn names(endpoints: &[Arc<Workload>]) -> Vec<String> {
        endpoints.iter().map(|e| e.name.clone()).collect()
    }

    #[test]
    fn consecutive_errors_eject_for_a_time_that_grows_with_each_ejection() {
        let (p, all, t0) = (policy(), endpoints(2), Instant::now());
        let mut health = ClusterHealth::default();
        let e0 = all[0].uid();
        // A success in between resets the count.
        assert_eq!(health.record(&p, &e0, 2, ERROR, t0), None);
        assert_eq!(health.record(&p, &e0, 2, ERROR, t0), None);
        assert_eq!(health.record(&p, &e0, 2, TryResult::Success, t0), None);
        assert_eq!(health.record(&p, &e0, 2, ERROR, t0), None);
        assert_eq!(health.record(&p, &e0, 2, ERROR, t0), None);
        assert_eq!(
            health.record(&p, &e0, 2, ERROR, t0),
            Some((EjectionReason::Consecutive5xx, Duration::from_secs(30)))
        );
        assert_eq!(names(&health.healthy(&p, &all, t0).0), ["e1"]);
        let t1 = t0 + Duration::from_secs(29);
        assert_eq!(names(&health.healthy(&p, &all, t1).0), ["e1"]);
        // Back after its time, ejected again for twice as long.
        let t2 = t0 + Duration::from_secs(30);
        assert_eq!(names(&health.healthy(&p, &all, t2).0), ["e0", "e1"]);
        for _ in 0..2 {
            assert_eq!(health.record(&p, &e0, 2, ERROR, t2), None);
        }
        assert_eq!(
            health.record(&p, &e0, 2, ERROR, t2),
            Some((EjectionReason::Consecutive5xx, Duration::from_secs(60)))
        );
        // Healthy for 2 intervals after returning: the multiplier decays from 2 to 0, so the
        // next ejection is the base time again.
        let t3 = t2 + Duration::from_secs(60) + Duration::from_secs(20);
        assert_eq!(health.healthy(&p, &all, t3).1, 0);
        for _ in 0..2 {
            health.record(&p, &e0, 2, ERROR, t3);
        }
        assert_eq!(
            health.record(&p, &e0, 2, ERROR, t3),
            Some((EjectionReason::Consecutive5xx, Duration::from_secs(30)))
        );
    }

    #[test]
    fn gateway_errors_count_apart_and_a_plain_5xx_resets_them() {
        let p = OutlierDetection {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 2,
            ..policy()
        };
        let (now, mut health) = (Instant::now(), ClusterHealth::default());
        assert_eq!(health.record(&p, "a", 4, GATEWAY, now), None);
        assert_eq!(health.record(&p, "a", 4, ERROR, now), None);
        assert_eq!(health.record(&p, "a", 4, GATEWAY, now), None);
        assert_eq!(
            health.record(&p, "a", 4, GATEWAY, now).map(|(r, _)| r),
            Some(EjectionReason::ConsecutiveGatewayErrors)
        );
        // 5xx detection is off: plain 500s never eject.
        for _ in 0..10 {
            assert_eq!(health.record(&p, "b", 4, ERROR, now), None);
        }
        assert_eq!(TryResult::of_status(503), GATEWAY);
        assert_eq!(TryResult::of_status(500), ERROR);
        assert_eq!(TryResult::of_status(404), TryResult::Success);
    }

    #[test]
    fn max_ejection_percent_holds_but_one_endpoint_always_can_be_ejected() {
        let (now, all) = (Instant::now(), endpoints(4));
        let p = policy();
        let mut health = ClusterHealth::default();
        let eject = |health: &mut ClusterHealth, e: &Arc<Workload>| {
            (0..3)
                .filter_map(|_| health.record(&p, &e.uid(), 4, ERROR, now))
                .count()
        };
        // 50% of 4: two ejected, not a third.
        assert_eq!(eject(&mut health, &all[0]), 1);
        assert_eq!(eject(&mut health, &all[1]), 1);
        assert_eq!(eject(&mut health, &all[2]), 0);
        assert_eq!(names(&health.healthy(&p, &all, now).0), ["e2", "e3"]);
        // 10% of 2 is less than one endpoint: one is ejected anyway, not two.
        let p10 = OutlierDetection {
            max_ejection_percent: 10,
            ..policy()
        };
        let mut small = ClusterHealth::default();
        let two = endpoints(2);
        let ejected: usize = two
            .iter()
            .map(|e| {
                (0..3)
                    .filter_map(|_| small.record(&p10, &e.uid(), 2, ERROR, now))
                    .count()
            })
            .sum();
        assert_eq!(ejected, 1);
    }

    #[test]
    fn below_min_health_percent_ejections_are_ignored() {
        let (now, all) = (Instant::now(), endpoints(2));
        let p = OutlierDetection {
            max_ejection_percent: 100,
            min_health_percent: 60,
            ..policy()
        };
        let mut health = ClusterHealth::default();
        for _ in 0..3 {
            health.record(&p, &all[0].uid(), 2, ERROR, now);
        }
        // One of two left (50% < 60%): panic, both are picked.
        let (kept, ejected) = health.healthy(&p, &all, now);
        assert_eq!((names(&kept), ejected), (vec!["e0".into(), "e1".into()], 1));
        let p = OutlierDetection {
            min_health_percent: 0,
            ..p
        };
        assert_eq!(names(&health.healthy(&p, &all, now).0), ["e1"]);
    }
}
