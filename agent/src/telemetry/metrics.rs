//! The metrics plumbing: one registry, the text exposition, and scrape-time collection.
//!
//! Each subsystem owns its metrics (`proxy::metrics`, `redirect::metrics`, `enrolment::metrics`,
//! `discovery::metrics`, `identity::metrics`, `limits::metrics`, `cni`): it defines them, registers
//! them here and records into them, and this module knows none of them. Values another part
//! already keeps (eBPF counters, a status channel, a limiter's counts) are copied in by a
//! [`ScrapeTime`] collector right before each scrape, never polled, so a scrape always sees the
//! current figures and an idle agent does no work for metrics.
use std::sync::{Arc, Mutex};

use prometheus::{
    IntCounter, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// The content type of the text exposition format, which every Prometheus version parses.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Metrics whose values live elsewhere: [`Self::refresh`] copies them in right before each
/// scrape. Scrapes are serialised, so a refresh that resets and re-adds never interleaves with
/// another.
pub trait ScrapeTime: Send + Sync + 'static {
    /// The metrics served.
    fn parts(&self) -> Vec<&dyn Collector>;
    /// Copies the current values in.
    fn refresh(&self);
}

/// Registers a [`ScrapeTime`] source: the registry wants a box it owns.
struct AtScrape<T> {
    source: Arc<T>,
    serialise: Mutex<()>,
}

impl<T: ScrapeTime> Collector for AtScrape<T> {
    fn desc(&self) -> Vec<&Desc> {
        self.source
            .parts()
            .into_iter()
            .flat_map(|part| part.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.serialise.lock().unwrap();
        self.source.refresh();
        self.source
            .parts()
            .into_iter()
            .flat_map(|part| part.collect())
            .collect()
    }
}

/// Sets a counter to a total kept elsewhere.
pub fn set_counter(counter: &IntCounter, total: u64) {
    counter.reset();
    counter.inc_by(total);
}

/// A count as a gauge value (saturating).
pub fn gauge_value(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// The log writer's count of dropped lines ([`super::log_lines_dropped`]).
struct LogMetrics {
    dropped: IntCounter,
}

impl ScrapeTime for LogMetrics {
    fn parts(&self) -> Vec<&dyn Collector> {
        vec![&self.dropped]
    }

    fn refresh(&self) {
        set_counter(&self.dropped, super::log_lines_dropped());
    }
}

/// The registry every part of a process registers its metrics with.
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry holding only the log writer's count of dropped lines (every process logs).
    pub fn new() -> Self {
        let metrics = Self {
            registry: Registry::new(),
        };
        let log = LogMetrics {
            dropped: IntCounter::new(
                "ambit_log_lines_dropped_total",
                "Log and access-log lines dropped because the log writer's queue was full \
                 (the reader of stderr fell behind)",
            )
            .expect("a valid metric"),
        };
        metrics
            .register_at_scrape(Arc::new(log))
            .expect("a fresh registry takes it");
        metrics
    }

    /// Adds a subsystem's metrics to what `/metrics` serves.
    pub fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// Adds metrics refreshed right before each scrape.
    pub fn register_at_scrape<T: ScrapeTime>(&self, source: Arc<T>) -> prometheus::Result<()> {
        self.register(Box::new(AtScrape {
            source,
            serialise: Mutex::new(()),
        }))
    }

    /// The current metric families (refreshing the scrape-time ones).
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// The current metrics in the Prometheus text exposition format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.gather())
            .unwrap_or_else(|err| {
                // Only malformed families fail, which valid definitions cannot produce.
                tracing::error!(%err, "encoding metrics");
                String::new()
            })
    }
}

/// Reading an exposition back, for the subsystems' tests.
#[cfg(test)]
pub mod exposition {
    use std::collections::BTreeMap;

    /// Samples by (name, labels).
    pub type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

    /// Parses the text exposition into `(name, labels) -> value`, checking the structure a
    /// Prometheus text parser relies on: `# HELP` and `# TYPE` before a family's samples, names
    /// and label names of the allowed characters, quoted label values, numeric values.
    pub fn parse(text: &str) -> Samples {
        let valid_name = |s: &str| {
            !s.is_empty()
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut typed = std::collections::BTreeSet::new();
        let mut histograms = std::collections::BTreeSet::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(valid_name(name), "bad name in {line:?}");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "{line:?}"
                );
                if kind == "histogram" {
                    histograms.insert(name.to_string());
                }
                assert!(
                    typed.insert(name.to_string()),
                    "family typed twice: {line:?}"
                );
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let mut labels = BTreeMap::new();
                    let mut rest = rest.strip_suffix('}').unwrap();
                    while !rest.is_empty() {
                        let (key, after) = rest.split_once("=\"").unwrap();
                        assert!(valid_name(key), "bad label name in {line:?}");
                        // Values here hold no quotes or backslashes, so the next quote ends it.
                        let (value, after) = after.split_once('"').unwrap();
                        labels.insert(key.to_string(), value.to_string());
                        rest = after.strip_prefix(',').unwrap_or(after);
                    }
                    (name, labels)
                }
            };
            // A histogram's samples are `<family>_bucket` (with `le`), `_sum` and `_count`.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|family| histograms.contains(*family))
                })
                .unwrap_or(name);
            assert!(typed.contains(family), "sample before its # TYPE: {line:?}");
            if family != name && name.ends_with("_bucket") {
                assert!(labels.contains_key("le"), "bucket without le: {line:?}");
            }
            samples.insert((name.to_string(), labels), value);
        }
        samples
    }

    /// Every series of `name`, with its labels.
    pub fn series<'a>(
        samples: &'a Samples,
        name: &str,
    ) -> Vec<(&'a BTreeMap<String, String>, f64)> {
        samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, labels), value)| (labels, *value))
            .collect()
    }

    /// The value of the series `name` with exactly `labels`.
    pub fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        samples.get(&(name.to_string(), labels)).copied()
    }

    /// Checks `text` with Prometheus' own parser and linter when `promtool` is installed (the
    /// test bed installs Prometheus); says so and passes otherwise.
    pub fn promtool_check(text: &str) {
        promtool_check_allowing(text, &[]);
    }

    /// [`promtool_check`], accepting the linter's problems listed in `allowed` (exactly as
    /// promtool prints them): names that must stay as another system spells them, e.g. Istio's
    /// `istio_request_duration_milliseconds`. A parse error always fails.
    pub fn promtool_check_allowing(text: &str, allowed: &[&str]) {
        use std::io::Write as _;
        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("promtool not installed: skipping");
            return;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        // Exit code 3: only lint problems, one a line.
        let only_allowed_lints = output.status.code() == Some(3)
            && stdout
                .lines()
                .chain(stderr.lines())
                .filter(|l| !l.trim().is_empty())
                .all(|l| allowed.contains(&l.trim()));
        assert!(
            output.status.success() || only_allowed_lints,
            "promtool: {stdout}{stderr}\n{text}"
        );
    }
}
