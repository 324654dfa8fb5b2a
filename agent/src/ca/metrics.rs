//! The CA's metrics, served on its monitoring port (`ambit ca serve --monitoring-addr`): the
//! certificates it signed (by kind of caller) and refused (by reason), how long the API server
//! takes to answer its TokenReviews, and when its signing chain and root expire, so that an
//! operator sees a plug-in intermediate's end coming (Istio's istiod exports the same figures as
//! `citadel_server_*`).
use std::time::{Duration, SystemTime};

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounterVec, Opts, core::Collector};

use crate::telemetry::Metrics;

/// Who a signed certificate was for, as the `caller` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    /// A node's credential (an agent, or a standalone waypoint with its node's token) for one of
    /// the identities placed on that node.
    Node,
    /// A workload's own ServiceAccount token (Kubernetes mode), for its own identity.
    Workload,
}

impl CallerKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Workload => "workload",
        }
    }
}

/// How a TokenReview ended, as the `outcome` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewOutcome {
    /// The API server authenticated the token and the CA accepted whose it is.
    Accepted,
    /// The API server answered, and the token is not accepted (unknown, expired, wrong
    /// audience, not a ServiceAccount, bound to nothing).
    Refused,
    /// No answer: the API server was unreachable, slow or refused the CA.
    Failed,
}

impl ReviewOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// Every `reason` a refusal may carry; each series exists from the start (at zero), so that
/// `rate()` and alerts see a refusal's first occurrence.
pub const REFUSAL_REASONS: &[&str] = &[
    // Any mode.
    "unauthenticated",
    "invalid_request",
    "foreign_trust_domain",
    "not_placed",
    "signing_failed",
    // Kubernetes mode (`KubeAuthError::reason`).
    "not_synced",
    "review_failed",
    "token_rejected",
    "peer_rate_limited",
    "rate_limited",
    "wrong_audience",
    "not_service_account",
    "not_bound",
    "not_own_identity",
    "bound_pod_mismatch",
    "bound_pod_unknown",
    "bound_pod_unscheduled",
];

/// The CA's metrics.
pub struct CaMetrics {
    signed: IntCounterVec,
    refused: IntCounterVec,
    review_duration: HistogramVec,
    chain_expiry: Gauge,
    root_expiry: Gauge,
}

impl std::fmt::Debug for CaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMetrics").finish_non_exhaustive()
    }
}

impl CaMetrics {
    /// The metrics, registered with `registry`.
    pub fn new(registry: &Metrics) -> prometheus::Result<Self> {
        let metrics = Self {
            signed: IntCounterVec::new(
                Opts::new(
                    "ambit_ca_certificates_signed_total",
                    "Workload certificates signed, by caller: node (an agent's credential, for a \
                     pod placed on its node) or workload (a ServiceAccount token, for its own \
                     identity)",
                ),
                &["caller"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "ambit_ca_certificates_refused_total",
                    "Certificate requests refused, by reason",
                ),
                &["reason"],
            )?,
            review_duration: HistogramVec::new(
                HistogramOpts::new(
                    "ambit_ca_token_review_duration_seconds",
                    "Time the API server took to answer a TokenReview (Kubernetes mode; cached \
                     reviews make none), by outcome",
                ),
                &["outcome"],
            )?,
            chain_expiry: Gauge::new(
                "ambit_ca_chain_expiry_timestamp_seconds",
                "When the CA's signing chain (its signing certificate and every certificate up to \
                 the root) first expires, in seconds since the Unix epoch: no certificate is \
                 signed past it",
            )?,
            root_expiry: Gauge::new(
                "ambit_ca_root_expiry_timestamp_seconds",
                "When the root the CA's chain ends in expires, in seconds since the Unix epoch",
            )?,
        };
        for caller in [CallerKind::Node, CallerKind::Workload] {
            metrics.signed.with_label_values(&[caller.as_str()]);
        }
        for reason in REFUSAL_REASONS {
            metrics.refused.with_label_values(&[reason]);
        }
        for outcome in [
            ReviewOutcome::Accepted,
            ReviewOutcome::Refused,
            ReviewOutcome::Failed,
        ] {
            metrics
                .review_duration
                .with_label_values(&[outcome.as_str()]);
        }
        let parts: [Box<dyn Collector>; 5] = [
            Box::new(metrics.signed.clone()),
            Box::new(metrics.refused.clone()),
            Box::new(metrics.review_duration.clone()),
            Box::new(metrics.chain_expiry.clone()),
            Box::new(metrics.root_expiry.clone()),
        ];
        for part in parts {
            registry.register(part)?;
        }
        Ok(metrics)
    }

    /// A certificate was signed for `caller`.
    pub fn signed(&self, caller: CallerKind) {
        self.signed.with_label_values(&[caller.as_str()]).inc();
    }

    /// A request was refused for `reason` (one of [`REFUSAL_REASONS`]).
    pub fn refused(&self, reason: &'static str) {
        debug_assert!(
            REFUSAL_REASONS.contains(&reason),
            "unlisted reason {reason}"
        );
        self.refused.with_label_values(&[reason]).inc();
    }

    /// A TokenReview took `took` and ended with `outcome`.
    pub fn token_review(&self, outcome: ReviewOutcome, took: Duration) {
        self.review_duration
            .with_label_values(&[outcome.as_str()])
            .observe(took.as_secs_f64());
    }

    /// The ends of the signing chain and of its root.
    pub fn set_expiries(&self, chain: SystemTime, root: SystemTime) {
        let epoch = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64().round())
        };
        self.chain_expiry.set(epoch(chain));
        self.root_expiry.set(epoch(root));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::exposition::{parse, value};

    #[test]
    fn every_series_exists_from_the_start_and_counts() {
        let registry = Metrics::new();
        let metrics = CaMetrics::new(&registry).unwrap();
        let samples = parse(&registry.encode());
        for reason in REFUSAL_REASONS {
            assert_eq!(
                value(
                    &samples,
                    "ambit_ca_certificates_refused_total",
                    &[("reason", reason)]
                ),
                Some(0.0),
                "{reason}"
            );
        }
        metrics.signed(CallerKind::Workload);
        metrics.refused("not_own_identity");
        metrics.refused("not_own_identity");
        metrics.token_review(ReviewOutcome::Accepted, Duration::from_millis(30));
        let root = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        metrics.set_expiries(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000),
            root,
        );
        let samples = parse(&registry.encode());
        assert_eq!(
            value(
                &samples,
                "ambit_ca_certificates_signed_total",
                &[("caller", "workload")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &samples,
                "ambit_ca_certificates_signed_total",
                &[("caller", "node")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &samples,
                "ambit_ca_certificates_refused_total",
                &[("reason", "not_own_identity")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &samples,
                "ambit_ca_token_review_duration_seconds_count",
                &[("outcome", "accepted")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &samples,
                "ambit_ca_token_review_duration_seconds_bucket",
                &[("outcome", "accepted"), ("le", "0.05")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&samples, "ambit_ca_root_expiry_timestamp_seconds", &[]),
            Some(2e9)
        );
        assert_eq!(
            value(&samples, "ambit_ca_chain_expiry_timestamp_seconds", &[]),
            Some(1.9e9)
        );
    }
}
