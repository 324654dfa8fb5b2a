//! What the waypoint's resilience features share across requests: the retry budgets, the
//! bound on mirrored copies in flight, outlier detection, and their metrics ([`super::retry`],
//! [`super::mirror`]; faults need no shared state).
use super::{
    mirror::Mirrors,
    outlier::Outliers,
    retry::{RetryBudget, RetryMetrics},
};
use crate::telemetry::metrics::Metrics;

/// Shared by every request of a waypoint.
pub struct Resilience {
    /// Retry budgets per destination service.
    pub budget: RetryBudget,
    /// Retry counters.
    pub retries: RetryMetrics,
    /// Mirrored copies in flight and their counters.
    pub mirrors: Mirrors,
    /// Outlier detection of every cluster.
    pub outliers: Outliers,
}

impl Resilience {
    /// Creates the state and registers its metrics in `metrics`.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        Ok(Self {
            budget: RetryBudget::default(),
            retries: RetryMetrics::new(metrics)?,
            mirrors: Mirrors::new(metrics)?,
            outliers: Outliers::new(metrics)?,
        })
    }
}
