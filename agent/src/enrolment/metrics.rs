//! Enrolment's metrics: pods enrolled, failing and closed, read from the enrolment status at
//! each scrape.
use prometheus::{IntGauge, core::Collector};
use tokio::sync::watch;

use super::EnrolmentStatus;
use crate::telemetry::metrics::{ScrapeTime, gauge_value};

/// Enrolment's metrics.
pub struct EnrolmentMetrics {
    status: watch::Receiver<EnrolmentStatus>,
    enrolled_pods: IntGauge,
    enrolment_failed_pods: IntGauge,
    closed_pods: IntGauge,
}

impl EnrolmentMetrics {
    /// The metrics of the reconciler publishing `status`.
    pub fn new(status: watch::Receiver<EnrolmentStatus>) -> prometheus::Result<Self> {
        Ok(Self {
            status,
            enrolled_pods: IntGauge::new(
                "ambit_enrolled_pods",
                "Pods of this node whose traffic the agent currently redirects",
            )?,
            enrolment_failed_pods: IntGauge::new(
                "ambit_enrolment_failed_pods",
                "Pods that should be enrolled but are not (retried; see config_dump for why)",
            )?,
            closed_pods: IntGauge::new(
                "ambit_closed_pods",
                "Pods whose enrolment failed with their namespace present: their inbound is \
                 dropped and their outbound refused until it succeeds (see config_dump)",
            )?,
        })
    }
}

impl ScrapeTime for EnrolmentMetrics {
    fn parts(&self) -> Vec<&dyn Collector> {
        vec![
            &self.enrolled_pods,
            &self.enrolment_failed_pods,
            &self.closed_pods,
        ]
    }

    fn refresh(&self) {
        let status = self.status.borrow();
        self.enrolled_pods.set(gauge_value(status.enrolled.len()));
        self.enrolment_failed_pods
            .set(gauge_value(status.failed.len()));
        self.closed_pods.set(gauge_value(status.closed.len()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        enrolment::EnrolledPodInfo,
        telemetry::metrics::{
            Metrics,
            exposition::{parse, value},
        },
    };

    #[test]
    fn pods_are_counted_from_the_status_at_each_scrape() {
        let metrics = Metrics::new();
        let (tx, rx) = watch::channel(EnrolmentStatus::default());
        metrics
            .register_at_scrape(Arc::new(EnrolmentMetrics::new(rx).unwrap()))
            .unwrap();
        // Changes after registering show at the next scrape: nothing is polled.
        tx.send_modify(|status| {
            status.enrolled.push(EnrolledPodInfo {
                uid: "shop/web-0".into(),
                netns_cookie: 1,
                ips: vec![],
            });
            status.failed.insert("shop/web-1".into(), "no netns".into());
            status
                .failed
                .insert("shop/web-2".into(), "closed: port taken".into());
            status.closed.insert("shop/web-2".into());
        });
        let samples = parse(&metrics.encode());
        assert_eq!(value(&samples, "ambit_enrolled_pods", &[]), Some(1.0));
        assert_eq!(
            value(&samples, "ambit_enrolment_failed_pods", &[]),
            Some(2.0)
        );
        assert_eq!(value(&samples, "ambit_closed_pods", &[]), Some(1.0));
    }
}
