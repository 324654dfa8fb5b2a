//! Exponential backoff, the one kind of every retry loop of the crate: the certificate
//! manager's calls to the CA, the Kubernetes watches, and the accept loop of every listener.
//!
//! The n-th delay after a success is `min(initial × 2ⁿ, max)`, scaled by a random factor drawn
//! uniformly from the jitter range when there is one, so that a fleet of agents that lost a
//! server together does not retry together. Each loop keeps the start, cap and jitter it always
//! had (see the callers). Jitter needs no cryptographic strength: fastrand, seeded per thread.
use std::{ops::RangeInclusive, time::Duration};

/// Exponential backoff with optional jitter; see the module docs.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Factors a delay is scaled by (both 1.0: no jitter).
    jitter: (f64, f64),
    failures: u32,
}

impl Backoff {
    /// Delays from `initial`, doubling after each failure up to `max`, without jitter.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: (1.0, 1.0),
            failures: 0,
        }
    }

    /// Scales each delay by a factor drawn uniformly from `factors`, e.g. `0.5..=1.0` (never
    /// more than the cap) or `0.75..=1.25` (spread around the nominal delay).
    pub fn with_jitter(mut self, factors: RangeInclusive<f64>) -> Self {
        let (low, high) = factors.into_inner();
        assert!(
            0.0 <= low && low <= high,
            "jitter factors must be ordered and not negative"
        );
        self.jitter = (low, high);
        self
    }

    /// The delay before the next attempt, after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let nominal = self
            .initial
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let (low, high) = self.jitter;
        if low == high {
            return nominal.mul_f64(low);
        }
        nominal.mul_f64(low + (high - low) * fastrand::f64())
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
        let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[..3], [5, 10, 20].map(Duration::from_millis));
        assert_eq!(delays[7], Duration::from_millis(640));
        assert_eq!(delays[8..], [Duration::from_secs(1); 2]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(5));
        // Many failures neither overflow nor pass the cap.
        let mut long = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        assert!(
            (0..100)
                .map(|_| long.next_delay())
                .all(|d| d <= Duration::from_secs(30))
        );
    }

    #[test]
    fn jitter_stays_in_its_range_and_varies() {
        for (low, high) in [(0.5, 1.0), (0.75, 1.25)] {
            let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30))
                .with_jitter(low..=high);
            let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
            for (n, delay) in delays.iter().enumerate() {
                let nominal = Duration::from_millis(800 * (1 << n)).min(Duration::from_secs(30));
                assert!(
                    *delay >= nominal.mul_f64(low) && *delay <= nominal.mul_f64(high),
                    "{n}: {delay:?} outside {low}..={high} × {nominal:?}"
                );
            }
            // Twenty draws of the same nominal delay are not all equal.
            let draws: std::collections::BTreeSet<Duration> = (0..20)
                .map(|_| {
                    backoff.reset();
                    backoff.next_delay()
                })
                .collect();
            assert!(draws.len() > 1, "no jitter: {draws:?}");
        }
    }
}
