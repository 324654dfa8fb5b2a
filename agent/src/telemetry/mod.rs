//! Logging set-up (with a filter that can be changed at run time), the per-connection access
//! log (optionally sampled), the Prometheus [`metrics`] plumbing and [`istio`]'s standard
//! labels. Plumbing only: each subsystem owns its metrics.
pub mod istio;
mod json_lines;
mod log_thread;
pub mod metrics;

use std::{
    net::SocketAddr,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::Context as _;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::{EnvFilter, Registry, fmt, prelude::*, reload};

pub use self::metrics::Metrics;

/// The longest prefix of `value` of at most `max` bytes that ends on a character boundary: how
/// a value from a client (a request path, a header) is cut to fit a log line, a span tag or an
/// Event's note.
pub fn clip(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Output format of log and access-log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How the process logs: the global options of every `ambit` command.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// Line format.
    pub format: LogFormat,
    /// The filter (EnvFilter syntax).
    pub filter: String,
    /// The share of successful connections' access-log lines kept ([`AccessLog::emit`]).
    pub access_log_sampling: Sampling,
}

/// Longer lines are dropped (and counted) rather than queued, so no one line takes more than a
/// small part of the log thread's queue ([`log_thread::QUEUE_BYTES`]): a line can carry values
/// a client chose (a request path can be 64 KiB; the waypoint cuts what it logs to fit,
/// `waypoint::observe`). Most access-log lines are under 2 KiB.
pub(crate) const LOG_LINE_MAX: usize = 16 * 1024;

/// Keeps the log thread; dropping it writes out what is queued (within a second). Hold it until
/// the process ends.
pub struct LogGuard {
    _thread: log_thread::LogThread,
}

/// Lines dropped for being longer than [`LOG_LINE_MAX`].
static LOG_OVERSIZE: AtomicU64 = AtomicU64::new(0);
/// The global subscriber's writer, once [`init_logging`] has run: it counts what its queue
/// dropped.
static LOG_WRITER: OnceLock<log_thread::LogWriter> = OnceLock::new();

/// The target of access-log lines (the proxies' per connection, the waypoint's per request):
/// what operators filter on, and what the log thread gives a share of its queue to.
pub const ACCESS_TARGET: &str = "access";

/// Log lines dropped: the log thread's queue was full (stderr's reader fell behind) or stderr
/// refused them, or the line was longer than 16 KiB (`LOG_LINE_MAX`).
pub fn log_lines_dropped() -> u64 {
    let queue = LOG_WRITER.get().map_or(0, log_thread::LogWriter::dropped);
    queue + LOG_OVERSIZE.load(Ordering::Relaxed)
}

/// The log's writers: whole lines (the formatter writes each line in one call) of at most
/// [`LOG_LINE_MAX`] bytes go on to the writer `M` makes for them; longer ones are dropped and
/// counted.
pub(crate) struct CappedLines<M> {
    inner: M,
}

impl<M> CappedLines<M> {
    /// Lines for the writers `inner` makes, capped.
    pub(crate) fn new(inner: M) -> Self {
        Self { inner }
    }
}

/// One line's writer, capped at [`LOG_LINE_MAX`].
pub(crate) struct CappedLine<W> {
    inner: W,
}

/// The layer that formats lines as `format` says and writes them to `writer`: the global
/// subscriber's ([`init_logging`]), and tests' that must see lines exactly as it writes them.
pub(crate) fn format_layer<S, W>(
    format: LogFormat,
    writer: W,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => fmt::layer().with_writer(writer).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .event_format(json_lines::JsonLines::default())
            .with_writer(writer)
            .boxed(),
    }
}

impl<W: std::io::Write> std::io::Write for CappedLine<W> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if line.len() > LOG_LINE_MAX {
            LOG_OVERSIZE.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        self.inner.write(line)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<'a, M: fmt::MakeWriter<'a>> fmt::MakeWriter<'a> for CappedLines<M> {
    type Writer = CappedLine<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        CappedLine {
            inner: self.inner.make_writer(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        CappedLine {
            inner: self.inner.make_writer_for(meta),
        }
    }
}

/// Installs the global tracing subscriber (and the `log` bridge used by aya-log).
///
/// Lines are formatted where they happen and written to stderr by a thread of their own
/// (`telemetry::log_thread`, as ztunnel writes its log off its workers), which takes what is
/// queued in one write: the proxy's workers never make a system call to log a connection, and
/// a reader of stderr that falls behind (a stalled container log pipe) never blocks them. When the
/// queue is full new lines are dropped and counted ([`log_lines_dropped`],
/// `ambit_log_lines_dropped_total`), rather than stalling traffic.
///
/// The filter sits behind a reload layer so that the admin endpoint can change it at run time
/// through [`log_control`]; this stays the only place a global subscriber is built.
pub fn init_logging(settings: &LogSettings) -> anyhow::Result<LogGuard> {
    let (filter_layer, control) = reloadable_filter(&settings.filter)?;
    let (thread, writer) = log_thread::LogThread::spawn(
        "ambit-log",
        std::io::stderr(),
        log_thread::QUEUE_BYTES,
        log_thread::ACCESS_GATHER,
    )
    .context("cannot start the log thread")?;
    let _ = LOG_WRITER.set(writer.clone());
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(format_layer(settings.format, CappedLines::new(writer)))
        .try_init()?;
    let _ = ACCESS_LOG_SAMPLING.set(settings.access_log_sampling);
    // Only the global subscriber's filter also governs the `log` crate's records.
    let _ = LOG_CONTROL.set(LogControl {
        global: true,
        ..control
    });
    Ok(LogGuard { _thread: thread })
}

/// The filter of the global subscriber, once [`init_logging`] has run.
static LOG_CONTROL: OnceLock<LogControl> = OnceLock::new();

/// The handle on the global subscriber's filter; `None` when [`init_logging`] was not called
/// (library use, unit tests).
pub fn log_control() -> Option<LogControl> {
    LOG_CONTROL.get().cloned()
}

/// A log filter layer that can be replaced at run time, and its control.
///
/// [`init_logging`] uses it for the global subscriber; tests use it to build a local one.
pub fn reloadable_filter(
    filter: &str,
) -> anyhow::Result<(reload::Layer<EnvFilter, Registry>, LogControl)> {
    let parsed = parse_filter(filter).map_err(|err| anyhow::anyhow!(err))?;
    let (layer, handle) = reload::Layer::new(parsed);
    Ok((
        layer,
        LogControl {
            handle,
            initial: filter.to_string(),
            global: false,
        },
    ))
}

fn parse_filter(filter: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(filter).map_err(|err| format!("invalid log filter {filter:?}: {err}"))
}

/// Reads and replaces a subscriber's log filter at run time (the admin endpoint's `/logging`).
#[derive(Clone, Debug)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter given at start-up, restored by [`LogControl::reset`].
    initial: String,
    /// Whether this is the global subscriber, whose level also caps the `log` crate.
    global: bool,
}

impl LogControl {
    /// The filter in force, in EnvFilter syntax.
    pub fn current(&self) -> String {
        self.handle
            .with_current(|filter| filter.to_string())
            .unwrap_or_else(|_| "unknown (subscriber gone)".into())
    }

    /// Replaces the filter with `filter` (EnvFilter syntax, e.g. `info,ambit::proxy=debug`) and
    /// returns the filter now in force. An invalid filter changes nothing.
    pub fn set(&self, filter: &str) -> Result<String, String> {
        let parsed = parse_filter(filter)?;
        self.handle
            .reload(parsed)
            .map_err(|err| format!("cannot change the log filter: {err}"))?;
        if self.global {
            // `log` records (aya-log) are cut by `log::max_level()` before they reach tracing;
            // the bridge set it once at start-up, so it must follow the new filter.
            log::set_max_level(as_log_level(LevelFilter::current()));
        }
        Ok(self.current())
    }

    /// Restores the filter given at start-up.
    pub fn reset(&self) -> Result<String, String> {
        self.set(&self.initial)
    }
}

fn as_log_level(level: LevelFilter) -> log::LevelFilter {
    match level.into_level() {
        None => log::LevelFilter::Off,
        Some(tracing::Level::ERROR) => log::LevelFilter::Error,
        Some(tracing::Level::WARN) => log::LevelFilter::Warn,
        Some(tracing::Level::INFO) => log::LevelFilter::Info,
        Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
        Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
    }
}

/// Which proxy path served a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured on the source pod's outbound listener.
    Outbound,
    /// Arrived through an HBONE tunnel on the destination pod's 15008.
    Inbound,
    /// Captured on the destination pod's inbound plaintext listener (15006).
    InboundPlaintext,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// One access-log record, filled in as the connection goes and emitted when it ends.
#[derive(Debug)]
pub struct AccessLog {
    /// Proxy path.
    pub direction: Direction,
    /// The client's address as the agent saw it.
    pub src: SocketAddr,
    /// The source workload (`namespace/name`), when known.
    pub src_workload: Option<String>,
    /// The source's verified identity (HBONE inbound) or its own (outbound).
    pub src_principal: Option<String>,
    /// The address the client dialled.
    pub dst: SocketAddr,
    /// The address the agent connected to (a service's chosen endpoint, a tunnel, or `dst`).
    pub upstream: Option<SocketAddr>,
    /// The destination workload, when known.
    pub dst_workload: Option<String>,
    /// The destination service, when `dst` was a service VIP.
    pub dst_service: Option<String>,
    /// The destination's identity, when the connection was mutual TLS.
    pub dst_principal: Option<String>,
    /// Whether both identities were proven: the connection crossed the network in an HBONE
    /// mTLS tunnel, or stayed on the node through the fast path (see `fast_path`).
    pub mtls: bool,
    /// How the same-node fast path carried it, when it did: `splice` (in the kernel) or
    /// `relay` (in the agent, when the splice was not possible).
    pub fast_path: Option<&'static str>,
    /// Bytes from client to upstream.
    pub bytes_sent: u64,
    /// Bytes from upstream to client.
    pub bytes_received: u64,
    /// When the connection was accepted.
    pub started: std::time::Instant,
    /// `ok`, or what failed or refused it.
    pub outcome: Result<(), String>,
}

impl AccessLog {
    /// A record for a connection accepted now.
    pub fn new(direction: Direction, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            direction,
            src,
            src_workload: None,
            src_principal: None,
            dst,
            upstream: None,
            dst_workload: None,
            dst_service: None,
            dst_principal: None,
            mtls: false,
            fast_path: None,
            bytes_sent: 0,
            bytes_received: 0,
            started: std::time::Instant::now(),
            outcome: Ok(()),
        }
    }

    /// Emits the record on the `access` target: always for a connection that failed or was
    /// refused, for a successful one only if the process's [`Sampling`] picks it.
    pub fn emit(&self) {
        if !access_logged(self.outcome.is_err()) {
            return;
        }
        let upstream = self.upstream.map(|u| u.to_string());
        let (outcome, error) = match &self.outcome {
            Ok(()) => ("ok", None),
            Err(err) => ("error", Some(err.as_str())),
        };
        tracing::info!(
            target: ACCESS_TARGET,
            direction = self.direction.as_str(),
            src = %self.src,
            src_workload = self.src_workload.as_deref(),
            src_principal = self.src_principal.as_deref(),
            dst = %self.dst,
            upstream = upstream.as_deref(),
            dst_workload = self.dst_workload.as_deref(),
            dst_service = self.dst_service.as_deref(),
            dst_principal = self.dst_principal.as_deref(),
            security = if self.mtls { "mtls" } else { "plaintext" },
            fast_path = self.fast_path,
            bytes_sent = self.bytes_sent,
            bytes_received = self.bytes_received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome,
            error,
            "connection complete"
        );
    }
}

/// The access-log sampling of the process, set once by [`init_logging`].
static ACCESS_LOG_SAMPLING: OnceLock<Sampling> = OnceLock::new();

/// The access-log sampling in force: every line unless [`init_logging`] said otherwise.
fn access_log_sampling() -> Sampling {
    ACCESS_LOG_SAMPLING.get().copied().unwrap_or_default()
}

/// Whether a connection's or a request's access-log line is written: always when it `failed`,
/// else if the process's [`Sampling`] picks it.
pub fn access_logged(failed: bool) -> bool {
    failed || access_log_sampling().pick()
}

/// Parses a percentage, 0 to 100, with or without a `%` (`1`, `0.5`, `25%`): every sampling
/// flag's syntax (`--access-log-sampling`, the waypoint's `--tracing-sampling`), as Istio gives
/// its sampling rates.
pub fn parse_percentage(value: &str) -> Result<f64, String> {
    let text = value.trim();
    let number = text.strip_suffix('%').unwrap_or(text).trim();
    let percent: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("{text} is not a percentage between 0 and 100"));
    }
    Ok(percent)
}

/// Which share of successful connections get an access-log line, as Envoy's access-log
/// `runtime_filter` samples (`percent_sampled`). Failed and refused connections are always
/// logged, and metrics count every connection whatever the sampling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// The share kept, in `[0, 1]` as a multiple of 2^-32 (exact for 0 and 1).
    threshold: u64,
}

impl Default for Sampling {
    /// Every line.
    fn default() -> Self {
        Self { threshold: 1 << 32 }
    }
}

impl Sampling {
    /// Keeps `percent` % of the lines (`1`: one in a hundred, `100`: all, `0`: none).
    pub fn new(percent: f64) -> Result<Self, String> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(format!("{percent} is not a percentage between 0 and 100"));
        }
        Ok(Self {
            threshold: (percent / 100.0 * (1u64 << 32) as f64).round() as u64,
        })
    }

    /// Parses the command line's percentage ([`parse_percentage`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::new(parse_percentage(text)?)
    }

    /// Whether this line is kept: a random draw (fastrand's thread-local generator), as
    /// Envoy's independent randomness; all lines with the default.
    pub fn pick(self) -> bool {
        self.threshold >= 1 << 32
            || (self.threshold > 0 && fastrand::u64(..1 << 32) < self.threshold)
    }

    /// The percentage kept.
    pub fn percent(self) -> f64 {
        self.threshold as f64 * 100.0 / (1u64 << 32) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines up to the cap go through whole; a longer one (a client's huge request path) is
    /// dropped and counted, so no one line takes a large part of the log queue.
    #[test]
    fn lines_longer_than_the_cap_are_dropped_and_counted() {
        use std::io::Write;
        let mut log = CappedLine { inner: Vec::new() };
        let before = log_lines_dropped();
        let line = vec![b'a'; LOG_LINE_MAX];
        log.write_all(&line).unwrap();
        log.write_all(&vec![b'b'; LOG_LINE_MAX + 1]).unwrap();
        assert_eq!(log.inner, line);
        assert_eq!(log_lines_dropped(), before + 1);
    }

    #[test]
    fn clip_cuts_on_a_character_boundary() {
        assert_eq!(clip("short", 16), "short");
        assert_eq!(clip("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it moves before it.
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("aé", 3), "aé");
        assert_eq!(clip("é", 0), "");
    }

    #[test]
    fn sampling_parses_percentages_and_names_bad_values() {
        assert_eq!(Sampling::parse("100").unwrap(), Sampling::default());
        assert_eq!(Sampling::parse("100%").unwrap(), Sampling::default());
        assert_eq!(Sampling::parse("25").unwrap().percent(), 25.0);
        assert_eq!(Sampling::parse(" 25 %").unwrap().percent(), 25.0);
        assert_eq!(Sampling::parse("0").unwrap().percent(), 0.0);
        assert_eq!(parse_percentage("0.5").unwrap(), 0.5);
        assert_eq!(
            Sampling::parse("101").unwrap_err(),
            "101 is not a percentage between 0 and 100"
        );
        assert_eq!(
            Sampling::parse("-1%").unwrap_err(),
            "-1% is not a percentage between 0 and 100"
        );
        assert_eq!(
            Sampling::parse("half").unwrap_err(),
            "\"half\" is not a number"
        );
    }

    #[test]
    fn sampling_keeps_its_share_of_lines() {
        let count = |s: Sampling| (0..10_000).filter(|_| s.pick()).count();
        assert_eq!(count(Sampling::default()), 10_000);
        assert_eq!(count(Sampling::new(0.0).unwrap()), 0);
        // Binomial(10000, 0.1): the standard deviation is 30, the bounds 10 of them away.
        let kept = count(Sampling::new(10.0).unwrap());
        assert!((700..=1300).contains(&kept), "{kept} of 10000 kept at 10%");
    }
}
