//! The CNI server's metrics: the plugin's requests by command and outcome.
use ambit_cni::protocol::{Outcome, Request};
use prometheus::{IntCounterVec, Opts};

/// The server's counters (`ambit_cni_requests_total`).
#[derive(Clone)]
pub struct CniMetrics {
    requests: IntCounterVec,
}

impl CniMetrics {
    /// The counters, registered with `metrics`.
    pub fn new(metrics: &crate::telemetry::Metrics) -> anyhow::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "ambit_cni_requests_total",
                "Requests of the CNI plugin (ambit-cni) by command and outcome: ok, notMeshed, \
                 failed (the sandbox is refused), retry (the pod was not known in time)",
            ),
            &["command", "outcome"],
        )?;
        metrics.register(Box::new(requests.clone()))?;
        Ok(Self { requests })
    }

    pub(super) fn count(&self, request: &Request, outcome: Outcome) {
        let command = match request {
            Request::Add(_) => "ADD",
            Request::Del(_) => "DEL",
            Request::Check(_) => "CHECK",
        };
        let outcome = match outcome {
            Outcome::Ok => "ok",
            Outcome::NotMeshed => "notMeshed",
            Outcome::Failed => "failed",
            Outcome::Retry => "retry",
        };
        self.requests.with_label_values(&[command, outcome]).inc();
    }
}
