//! The configuration source's metrics: the generation in force, whether the source reaches its
//! origin, and the configurations accepted and rejected.
use std::sync::Arc;

use prometheus::{IntCounterVec, IntGauge, Opts, core::Collector};
use tokio::sync::watch;

use super::ConfigStatus;
use crate::telemetry::metrics::{ScrapeTime, gauge_value, set_counter};

/// The configuration source's metrics.
pub struct ConfigMetrics {
    status: watch::Receiver<ConfigStatus>,
    generation: IntGauge,
    /// 0 while the configuration source cannot reach its origin (the API server).
    source_up: IntGauge,
    /// `result="ok"` is derived from the generation at scrape time; `result="failed"` is counted
    /// as rejections happen ([`Self::count_rejections`]).
    reloads: IntCounterVec,
}

impl ConfigMetrics {
    /// The metrics of the source publishing `status`.
    pub fn new(status: watch::Receiver<ConfigStatus>) -> prometheus::Result<Self> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "ambit_config_reloads_total",
                "Configurations offered after the first: accepted (result=ok) or rejected, the \
                 previous one staying in force (result=failed)",
            ),
            &["result"],
        )?;
        // Both series exist from the start, so rate() and alerts work before the first event.
        reloads.with_label_values(&["ok"]);
        reloads.with_label_values(&["failed"]);
        Ok(Self {
            status,
            generation: IntGauge::new(
                "ambit_config_generation",
                "Configurations accepted since the agent started (the one in force)",
            )?,
            source_up: IntGauge::new(
                "ambit_config_source_up",
                "1 while the configuration source reaches where its configuration comes from; 0 \
                 while the Kubernetes API server is unreachable (the last state stays in force)",
            )?,
            reloads,
        })
    }

    /// Counts rejected configurations until the source ends: each status published with an
    /// error is one rejection (a source publishes once per event). A rejection and a quick
    /// second one may coalesce into one count if this task lags.
    pub async fn count_rejections(self: Arc<Self>) {
        let mut status = self.status.clone();
        // What is already there was not a reload.
        status.borrow_and_update();
        while status.changed().await.is_ok() {
            let rejected = {
                let status = status.borrow_and_update();
                // An unreachable API server rejects nothing: it has its own gauge.
                status.last_error.is_some() && status.unreachable_since.is_none()
            };
            if rejected {
                self.reloads.with_label_values(&["failed"]).inc();
            }
        }
    }
}

impl ScrapeTime for ConfigMetrics {
    fn parts(&self) -> Vec<&dyn Collector> {
        vec![&self.generation, &self.source_up, &self.reloads]
    }

    fn refresh(&self) {
        let (generation, up) = {
            let status = self.status.borrow();
            (status.generation, status.unreachable_since.is_none())
        };
        self.generation.set(gauge_value(generation));
        self.source_up.set(i64::from(up));
        set_counter(
            &self.reloads.with_label_values(&["ok"]),
            generation.saturating_sub(1),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::{
        Metrics,
        exposition::{parse, value},
    };

    #[tokio::test]
    async fn generations_rejections_and_reachability_are_reported() {
        let metrics = Metrics::new();
        let (tx, rx) = watch::channel(ConfigStatus {
            generation: 1,
            ..Default::default()
        });
        let config = Arc::new(ConfigMetrics::new(rx).unwrap());
        metrics.register_at_scrape(config.clone()).unwrap();
        let task = tokio::spawn(config.count_rejections());
        // The task takes what is there when it starts as the baseline: let it start.
        tokio::task::yield_now().await;
        let get =
            |name: &str, labels: &[(&str, &str)]| value(&parse(&metrics.encode()), name, labels);
        assert_eq!(get("ambit_config_source_up", &[]), Some(1.0));
        for status in [
            (1, Some("bad field"), None),
            (1, None, None),
            (2, None, None),
            (2, Some("unreadable"), None),
            // The API server going away is no rejection, but the gauge says so.
            (
                3,
                Some("API server unreachable"),
                Some("2026-12-04T12:00:00Z"),
            ),
        ] {
            tx.send_replace(ConfigStatus {
                generation: status.0,
                last_error: status.1.map(String::from),
                unreachable_since: status.2.map(String::from),
                ..Default::default()
            });
            // Let the counting task see each publication before the next.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(get("ambit_config_source_up", &[]), Some(0.0));
        assert_eq!(get("ambit_config_generation", &[]), Some(3.0));
        assert_eq!(
            get("ambit_config_reloads_total", &[("result", "ok")]),
            Some(2.0)
        );
        drop(tx);
        task.await.unwrap();
        assert_eq!(
            get("ambit_config_reloads_total", &[("result", "failed")]),
            Some(2.0)
        );
    }
}
