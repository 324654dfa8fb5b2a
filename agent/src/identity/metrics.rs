//! The certificates' metrics: the time each held certificate has left, and failed calls to the
//! CA, read from the certificate manager at each scrape.
use std::{sync::Arc, time::SystemTime};

use prometheus::{GaugeVec, IntCounter, Opts, core::Collector};

use super::CertificateManager;
use crate::telemetry::metrics::{ScrapeTime, set_counter};

/// The certificates' metrics.
pub struct CertificateMetrics {
    /// Where the figures come from (`None` in tests).
    manager: Option<Arc<CertificateManager>>,
    expiry: GaugeVec,
    ca_errors: IntCounter,
}

impl CertificateMetrics {
    /// The metrics of `manager`'s certificates.
    pub fn new(manager: Option<Arc<CertificateManager>>) -> prometheus::Result<Self> {
        Ok(Self {
            manager,
            expiry: GaugeVec::new(
                Opts::new(
                    "ambit_certificate_expiry_seconds",
                    "Seconds until the certificate held for an identity expires (negative once \
                     expired)",
                ),
                &["identity"],
            )?,
            ca_errors: IntCounter::new(
                "ambit_ca_errors_total",
                "Failed certificate requests to the CA (certificates held stay in use until \
                 expiry)",
            )?,
        })
    }

    /// Copies the failed-call count and each held certificate's end of validity in.
    pub fn record(&self, ca_errors: u64, expiries: &[(String, SystemTime)]) {
        set_counter(&self.ca_errors, ca_errors);
        // Identities whose certificate was dropped are gone: rebuild the series.
        self.expiry.reset();
        let now = SystemTime::now();
        for (identity, not_after) in expiries {
            let remaining = match not_after.duration_since(now) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            };
            self.expiry
                .with_label_values(&[identity.as_str()])
                .set(remaining.round());
        }
    }
}

impl ScrapeTime for CertificateMetrics {
    fn parts(&self) -> Vec<&dyn Collector> {
        vec![&self.expiry, &self.ca_errors]
    }

    fn refresh(&self) {
        if let Some(manager) = &self.manager {
            let expiries: Vec<(String, SystemTime)> = manager
                .expiries()
                .into_iter()
                .map(|(id, not_after)| (id.to_string(), not_after))
                .collect();
            self.record(manager.stats().ca_errors_total, &expiries);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::telemetry::metrics::{
        Metrics,
        exposition::{parse, series, value},
    };

    #[test]
    fn expiry_is_the_time_left_and_goes_with_the_certificate() {
        let metrics = Metrics::new();
        let certs = Arc::new(CertificateMetrics::new(None).unwrap());
        metrics.register_at_scrape(certs.clone()).unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let old = "spiffe://cluster.local/ns/shop/sa/old";
        certs.record(
            1,
            &[
                (
                    id.to_string(),
                    SystemTime::now() + Duration::from_secs(3600),
                ),
                (old.to_string(), SystemTime::now() - Duration::from_secs(60)),
            ],
        );
        let samples = parse(&metrics.encode());
        let left = value(
            &samples,
            "ambit_certificate_expiry_seconds",
            &[("identity", id)],
        )
        .unwrap();
        assert!((3590.0..=3600.0).contains(&left), "{left}");
        let expired = value(
            &samples,
            "ambit_certificate_expiry_seconds",
            &[("identity", old)],
        )
        .unwrap();
        assert!(expired <= -60.0, "{expired}");
        assert_eq!(value(&samples, "ambit_ca_errors_total", &[]), Some(1.0));

        certs.record(1, &[(old.to_string(), SystemTime::now())]);
        let samples = parse(&metrics.encode());
        assert_eq!(
            series(&samples, "ambit_certificate_expiry_seconds").len(),
            1
        );
    }
}
