//! Request mirroring (Istio's `mirror`/`mirrors`, Envoy's request mirror policies): a copy of
//! a share of a route's requests goes to another destination, fire and forget. The client sees
//! only the primary's answer; the copy is sent after it, from its own task, and its answer is
//! read and dropped, so a slow, failing or silent mirror never slows or fails the primary.
//!
//! Copies in flight are bounded per mirror service ([`MAX_MIRRORS_IN_FLIGHT`]) and each is
//! bounded in time (the route's timeout, else [`MIRROR_TIMEOUT`]): a mirror that never answers
//! holds at most that many tasks and connections, a copy over the bound is dropped and
//! counted, and one silent mirror does not starve another. Only a request
//! whose whole body was kept ([`super::retry::REPLAY_LIMIT`]) can be copied; the copy's `Host`
//! (`:authority`) carries Envoy's `-shadow` suffix.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::{IntCounterVec, Opts};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics::Metrics;

/// Copies in flight at most, per mirror service.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 64;

/// How long a copy may take when its route has no timeout.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// What became of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorResult {
    /// The mirror answered (whatever its status).
    Answered,
    /// The mirror could not be reached, failed, or did not answer in time.
    Failed,
    /// Not sent: too many copies in flight.
    DroppedOverflow,
    /// Not sent: the request's body was not kept whole.
    DroppedBody,
}

impl MirrorResult {
    fn as_str(self) -> &'static str {
        match self {
            MirrorResult::Answered => "answered",
            MirrorResult::Failed => "failed",
            MirrorResult::DroppedOverflow => "dropped_overflow",
            MirrorResult::DroppedBody => "dropped_body",
        }
    }
}

/// The bound on copies in flight, and their metric.
pub struct Mirrors {
    /// Per mirror service (one entry per service the routes mirror to: bounded by the
    /// configuration).
    in_flight: Mutex<HashMap<String, Arc<Semaphore>>>,
    requests: IntCounterVec,
}

impl Mirrors {
    /// Creates the metric family and registers it in `metrics`.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_mirror_requests_total",
                "Mirrored copies of requests, by mirror service and what became of them",
            ),
            &["destination_service", "result"],
        )?;
        metrics.register(Box::new(requests.clone()))?;
        Ok(Self {
            in_flight: Mutex::default(),
            requests,
        })
    }

    /// A place for one more copy to `service`, if there is one.
    pub fn try_start(&self, service: &str) -> Option<OwnedSemaphorePermit> {
        let semaphore = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)))
            .clone();
        semaphore.try_acquire_owned().ok()
    }

    /// Counts a copy to `service` (its hostname).
    pub fn count(&self, service: &str, result: MirrorResult) {
        self.requests
            .with_label_values(&[service, result.as_str()])
            .inc();
    }
}

/// The `Host` of a copy: Envoy's `-shadow` suffix on the host, before any port
/// (`reviews:9080` becomes `reviews-shadow:9080`).
pub fn shadow_host(host: &str) -> String {
    let with_port = host.rsplit_once(':').filter(|(name, port)| {
        // `name:port` or `[v6]:port`; a bare IPv6 address has colons but no port.
        let bracketed = name.starts_with('[') && name.ends_with(']');
        !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && (bracketed || (!name.is_empty() && !name.contains(':')))
    });
    match with_port {
        Some((name, port)) => format!("{name}-shadow:{port}"),
        None => format!("{host}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_host_is_suffixed_before_the_port() {
        assert_eq!(shadow_host("reviews"), "reviews-shadow");
        assert_eq!(shadow_host("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_host("10.96.0.30:9080"), "10.96.0.30-shadow:9080");
    }

    #[test]
    fn copies_in_flight_are_bounded() {
        let mirrors = Mirrors::new(&Metrics::new()).unwrap();
        let held: Vec<_> = (0..MAX_MIRRORS_IN_FLIGHT)
            .map(|_| mirrors.try_start("silent").unwrap())
            .collect();
        assert!(mirrors.try_start("silent").is_none());
        // Another mirror is not starved by a silent one.
        assert!(mirrors.try_start("shadow").is_some());
        drop(held);
        assert!(mirrors.try_start("silent").is_some());
    }
}
