//! Bounds on what any one peer can take from the node agent.
//!
//! One agent serves every pod of its node: whatever it runs out of, every pod on the node loses.
//! Descriptors come first (one per socket, capped by RLIMIT_NOFILE), and a hostile pod can open
//! sockets to the agent as fast as the kernel lets it. So:
//!
//! - At start the agent raises its soft RLIMIT_NOFILE to the hard limit ([`raise_nofile_limit`])
//!   and derives its budget from what it got ([`LimitSettings::for_descriptors`]): a reserve for
//!   its own files (pod listeners and namespaces, eBPF objects, API and CA clients, the HTTP
//!   endpoints), the rest for proxied connections, counted in *connections* of two descriptors
//!   each (the accepted socket and the upstream one).
//! - Every proxied connection holds a slot of that budget, and no source address may hold more
//!   than its share ([`Limits::admit`]): an inbound connection's source is its peer (a pod, a
//!   node, an unmeshed client); an outbound connection's is the pod it comes from. Inbound HBONE
//!   counts its TLS connection and each of its tunnels.
//! - Nothing unauthenticated holds anything for long: an HBONE connection also holds a handshake
//!   slot (of a few per source and a thousand at most) until its TLS handshake and HTTP/2 preface
//!   are done, each under a timeout; the plain-HTTP endpoints (readiness, metrics, admin) have
//!   their own small caps per source and a header-read/idle timeout.
//! - A connection over a limit is accepted and closed at once (reset), as Envoy's overload
//!   manager rejects connections past its global limit, rather than left in the kernel's backlog
//!   where it would crowd out everyone else's and where its source cannot be known. Refusals are
//!   counted by path and limit and logged at most every 10 s.
//! - Every accept loop is [`accept_loop`]: resource errors (EMFILE) back off instead of spinning.
//! - Memory for the relay's read buffers beyond the smallest comes from a node-wide budget with a
//!   share per source ([`BufferShare`]), and an idle connection holds none.
//!
//! The defaults and the metrics are in docs/operations.md ("Limits").
mod accept;
mod buffers;
pub mod http;
mod limiter;
pub mod metrics;
mod nofile;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

pub use accept::{Gated, Listener, accept_loop};
pub use buffers::{BufferGrant, BufferShare};
pub use limiter::{Exceeded, Limiter, Permit};
pub use nofile::{NofileLimit, nofile_limit, open_descriptors, raise_nofile_limit};

/// A slot held by one connection (or tunnel) of one source address.
pub type ConnectionPermit = Permit<IpAddr>;

/// Where a connection arrived: the listener, or the HBONE tunnels inside a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A pod's outbound listener (15001).
    Outbound,
    /// A pod's inbound plaintext listener (15006).
    Inbound,
    /// A pod's HBONE listener (15008).
    Hbone,
    /// A tunnel (CONNECT stream) inside an HBONE connection.
    HboneTunnel,
    /// The readiness endpoint (15021).
    Readiness,
    /// The metrics endpoint (15020).
    Metrics,
    /// The admin endpoint (15000).
    Admin,
}

impl Path {
    const ALL: [Path; 7] = [
        Path::Outbound,
        Path::Inbound,
        Path::Hbone,
        Path::HboneTunnel,
        Path::Readiness,
        Path::Metrics,
        Path::Admin,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Outbound => "outbound",
            Path::Inbound => "inbound",
            Path::Hbone => "hbone",
            Path::HboneTunnel => "hbone_tunnel",
            Path::Readiness => "readiness",
            Path::Metrics => "metrics",
            Path::Admin => "admin",
        }
    }
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Every slot of the path's budget is taken.
    Total,
    /// The source holds its share.
    PerSource,
    /// Every handshake slot is taken.
    Handshakes,
    /// The source has its share of handshakes in progress.
    HandshakesPerSource,
}

/// A connection or byte limiter's refusal, as the proxied connections' limits name it.
impl From<Exceeded> for Limit {
    fn from(exceeded: Exceeded) -> Self {
        match exceeded {
            Exceeded::Total(_) => Limit::Total,
            Exceeded::PerKey(_) => Limit::PerSource,
        }
    }
}

impl Limit {
    const ALL: [Limit; 4] = [
        Limit::Total,
        Limit::PerSource,
        Limit::Handshakes,
        Limit::HandshakesPerSource,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Total => "total",
            Limit::PerSource => "per_source",
            Limit::Handshakes => "handshakes",
            Limit::HandshakesPerSource => "handshakes_per_source",
        }
    }
}

/// What a connection did not finish in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The TLS handshake.
    TlsHandshake,
    /// The client's HTTP/2 preface.
    Http2Preface,
    /// An HTTP/1 request's headers (also the idle time between requests).
    HttpRequest,
    /// The whole connection, past its maximum age.
    MaxAge,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::TlsHandshake,
        Phase::Http2Preface,
        Phase::HttpRequest,
        Phase::MaxAge,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::TlsHandshake => "tls_handshake",
            Phase::Http2Preface => "http2_preface",
            Phase::HttpRequest => "http_request",
            Phase::MaxAge => "max_age",
        }
    }
}

/// The agent's limits: derived from the descriptor limit, two of them adjustable by flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitSettings {
    /// The soft RLIMIT_NOFILE in force.
    pub descriptors: u64,
    /// Descriptors kept for the agent's own files.
    pub reserved: u64,
    /// Proxied connections (two descriptors each) the agent holds at once, all sources
    /// together (`--max-connections`).
    pub max_connections: usize,
    /// Proxied connections one source address may hold (`--max-connections-per-source`).
    pub max_connections_per_source: usize,
    /// HBONE connections in their TLS handshake or HTTP/2 preface at once.
    pub max_handshakes: usize,
    /// HBONE connections of one source address in their handshake at once.
    pub max_handshakes_per_source: usize,
    /// Connections each plain-HTTP endpoint (readiness, metrics, admin) serves at once.
    pub http_max_connections: usize,
    /// Connections one source address may hold to each plain-HTTP endpoint.
    pub http_max_connections_per_source: usize,
    /// Bytes of relay read buffers beyond the smallest size held at once, all connections
    /// together (`--max-relay-buffer-mib`).
    pub max_relay_buffer_bytes: usize,
    /// Of those, what the connections of one source address may hold (a quarter).
    pub max_relay_buffer_bytes_per_source: usize,
}

/// Handshakes in progress at once, all sources together: two cores sign about that many
/// ECDSA handshakes in a second, so more would only queue behind each other.
const MAX_HANDSHAKES: usize = 1024;
/// Handshakes in progress for one source: a client dials each destination once at a time (its
/// pool coalesces dials), and a node runs ~110 pods, so this lets one source dial every pod of
/// the node at the same moment.
const MAX_HANDSHAKES_PER_SOURCE: usize = 128;
/// Kubelet's probes and a Prometheus or two are all the plain-HTTP endpoints ever serve.
const HTTP_MAX_CONNECTIONS: usize = 128;
const HTTP_MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// The relay's read-buffer budget: 256 bulk transfers reading 256 KiB at a time, 64 of them
/// from one source; past it connections read with smaller buffers, slower but never refused.
const MAX_RELAY_BUFFER_MIB: usize = 64;
const MIB: usize = 1024 * 1024;

/// Limits that cannot be honoured, naming the flag and the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A limit of zero would refuse everything.
    #[error("{flag} must be at least 1")]
    Zero {
        /// The flag.
        flag: &'static str,
    },
    /// More connections than the descriptor limit allows.
    #[error(
        "--max-connections {asked} needs {needed} descriptors (two per connection, plus {reserved} \
         for the agent's own files), but RLIMIT_NOFILE allows {descriptors}: raise the hard limit \
         (LimitNOFILE in systemd, ulimits of the container runtime) or ask for at most {most}"
    )]
    TooManyConnections {
        /// The value asked for.
        asked: usize,
        /// Descriptors it needs.
        needed: u64,
        /// The reserve.
        reserved: u64,
        /// The limit in force.
        descriptors: u64,
        /// The most the limit allows.
        most: usize,
    },
    /// A source's share larger than the whole.
    #[error("--max-connections-per-source {per_source} exceeds --max-connections {total}")]
    ShareAboveTotal {
        /// The share asked for.
        per_source: usize,
        /// The whole.
        total: usize,
    },
}

impl LimitSettings {
    /// The defaults for a process allowed `descriptors` open files: an eighth (at least 512, at
    /// most 16384, never more than half) kept for the agent's own files, the rest for proxied
    /// connections, a quarter of them for any one source.
    pub fn for_descriptors(descriptors: u64) -> Self {
        let reserved = (descriptors / 8).clamp(512, 16384).min(descriptors / 2);
        let max_connections = usize::try_from((descriptors - reserved) / 2)
            .unwrap_or(usize::MAX)
            .max(1);
        Self::derive(descriptors, reserved, max_connections, None)
    }

    fn derive(
        descriptors: u64,
        reserved: u64,
        max_connections: usize,
        per_source: Option<usize>,
    ) -> Self {
        let max_handshakes = (max_connections / 8).clamp(1, MAX_HANDSHAKES);
        Self {
            descriptors,
            reserved,
            max_connections,
            max_connections_per_source: per_source.unwrap_or((max_connections / 4).max(1)),
            max_handshakes,
            max_handshakes_per_source: MAX_HANDSHAKES_PER_SOURCE.min(max_handshakes),
            http_max_connections: HTTP_MAX_CONNECTIONS,
            http_max_connections_per_source: HTTP_MAX_CONNECTIONS_PER_SOURCE,
            max_relay_buffer_bytes: MAX_RELAY_BUFFER_MIB * MIB,
            max_relay_buffer_bytes_per_source: MAX_RELAY_BUFFER_MIB * MIB / 4,
        }
    }

    /// These settings with `--max-relay-buffer-mib` applied (unset: 64 MiB), a quarter of it
    /// for any one source.
    pub fn with_relay_buffer_mib(self, mib: Option<usize>) -> Result<Self, LimitsError> {
        let Some(mib) = mib else {
            return Ok(self);
        };
        if mib == 0 {
            return Err(LimitsError::Zero {
                flag: "--max-relay-buffer-mib",
            });
        }
        let bytes = mib.saturating_mul(MIB);
        Ok(Self {
            max_relay_buffer_bytes: bytes,
            max_relay_buffer_bytes_per_source: bytes / 4,
            ..self
        })
    }

    /// These settings with `--max-connections` and `--max-connections-per-source` applied (a
    /// share left unset is a quarter of the whole).
    pub fn with_flags(
        self,
        max_connections: Option<usize>,
        per_source: Option<usize>,
    ) -> Result<Self, LimitsError> {
        if max_connections == Some(0) {
            return Err(LimitsError::Zero {
                flag: "--max-connections",
            });
        }
        if per_source == Some(0) {
            return Err(LimitsError::Zero {
                flag: "--max-connections-per-source",
            });
        }
        let total = match max_connections {
            Some(asked) if asked > self.max_connections => {
                return Err(LimitsError::TooManyConnections {
                    asked,
                    needed: (asked as u64).saturating_mul(2) + self.reserved,
                    reserved: self.reserved,
                    descriptors: self.descriptors,
                    most: self.max_connections,
                });
            }
            Some(asked) => asked,
            None => self.max_connections,
        };
        if let Some(share) = per_source
            && share > total
        {
            return Err(LimitsError::ShareAboveTotal {
                per_source: share,
                total,
            });
        }
        Ok(Self::derive(
            self.descriptors,
            self.reserved,
            total,
            per_source,
        ))
    }
}

/// Logs something at most once per period, saying how often it happened in between.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// One more occurrence: `Some(occurrences not logged since the last time)` when it is time
    /// to log.
    pub(crate) fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// How often refusals are logged, per path.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Counters kept since start, read by the metrics at scrape time.
struct Counters {
    over_limit: [[AtomicU64; Limit::ALL.len()]; Path::ALL.len()],
    timed_out: [[AtomicU64; Phase::ALL.len()]; Path::ALL.len()],
    accept_errors: [AtomicU64; Path::ALL.len()],
    /// Relay reads made with a smaller buffer than asked, by limit.
    buffers_shrunk: [AtomicU64; Limit::ALL.len()],
}

impl Counters {
    fn new() -> Self {
        Self {
            over_limit: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            timed_out: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            accept_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            buffers_shrunk: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn index<T: PartialEq>(all: &[T], item: T) -> usize {
    all.iter().position(|x| *x == item).expect("listed in ALL")
}

/// What the limits hold and have refused, for the metrics and the config dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitsSnapshot {
    /// Connection slots in use.
    pub connections: usize,
    /// Handshake slots in use.
    pub handshakes: usize,
    /// Connections refused, by path and limit (only those that happened).
    pub over_limit: Vec<(Path, Limit, u64)>,
    /// Connections closed for taking too long, by path and phase (only those that happened).
    pub timed_out: Vec<(Path, Phase, u64)>,
    /// Failed accepts, by path (only those that happened).
    pub accept_errors: Vec<(Path, u64)>,
    /// Bytes of relay read buffers held (beyond the smallest size).
    pub relay_buffer_bytes: usize,
    /// Relay reads made with a smaller buffer than asked, by the limit that stood in the way
    /// (only those that happened).
    pub relay_buffers_shrunk: Vec<(Limit, u64)>,
}

/// The agent's limits and what holds them. Shared by every listener.
pub struct Limits {
    settings: LimitSettings,
    connections: Limiter<IpAddr>,
    handshakes: Limiter<IpAddr>,
    /// The relay's read-buffer budget, in bytes.
    buffers: Limiter<IpAddr>,
    counters: Counters,
    refusal_logs: Mutex<[Throttle; Path::ALL.len()]>,
}

impl Limits {
    /// Limits with `settings`, nothing held yet.
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            connections: Limiter::new(
                settings.max_connections,
                settings.max_connections_per_source,
            ),
            handshakes: Limiter::new(settings.max_handshakes, settings.max_handshakes_per_source),
            buffers: Limiter::new(
                settings.max_relay_buffer_bytes,
                settings.max_relay_buffer_bytes_per_source,
            ),
            settings,
            counters: Counters::new(),
            refusal_logs: Mutex::new(std::array::from_fn(|_| Throttle::new(REFUSAL_LOG_EVERY))),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// A slot for a proxied connection (or HBONE tunnel) from `source` arriving on `path`, or
    /// `None` when the budget or the source's share is used up; the refusal is counted and
    /// logged (at most every 10 s per path). Drop the connection to refuse it.
    pub fn admit(&self, path: Path, source: IpAddr) -> Option<ConnectionPermit> {
        self.connections
            .try_acquire(source)
            .map_err(|exceeded| self.refused(path, exceeded.into(), source, exceeded))
            .ok()
    }

    /// For a new HBONE connection from `source`: its connection slot and a handshake slot, to be
    /// dropped once its TLS handshake and HTTP/2 preface are done.
    pub fn admit_hbone(&self, source: IpAddr) -> Option<(ConnectionPermit, ConnectionPermit)> {
        let handshake = self
            .handshakes
            .try_acquire(source)
            .map_err(|exceeded| {
                let limit = match exceeded {
                    Exceeded::Total(_) => Limit::Handshakes,
                    Exceeded::PerKey(_) => Limit::HandshakesPerSource,
                };
                self.refused(Path::Hbone, limit, source, exceeded);
            })
            .ok()?;
        let connection = self.admit(Path::Hbone, source)?;
        Some((connection, handshake))
    }

    /// A fresh limiter for one plain-HTTP endpoint, to admit through with [`Limits::admit_to`].
    pub fn http_limiter(&self) -> Limiter<IpAddr> {
        Limiter::new(
            self.settings.http_max_connections,
            self.settings.http_max_connections_per_source,
        )
    }

    /// Like [`Limits::admit`], through another `limiter` (an HTTP endpoint's).
    pub fn admit_to(
        &self,
        limiter: &Limiter<IpAddr>,
        path: Path,
        source: IpAddr,
    ) -> Option<ConnectionPermit> {
        limiter
            .try_acquire(source)
            .map_err(|exceeded| self.refused(path, exceeded.into(), source, exceeded))
            .ok()
    }

    fn refused(&self, path: Path, limit: Limit, source: IpAddr, exceeded: Exceeded) {
        self.counters.over_limit[index(&Path::ALL, path)][index(&Limit::ALL, limit)]
            .fetch_add(1, Ordering::Relaxed);
        let log = self.refusal_logs.lock().unwrap_or_else(|p| p.into_inner())
            [index(&Path::ALL, path)]
        .tick();
        if let Some(suppressed) = log {
            warn!(
                path = path.as_str(),
                limit = limit.as_str(),
                %source,
                refused_since_last_warning = suppressed,
                "connection refused: {exceeded}"
            );
        }
    }

    /// Counts a connection closed because `phase` took too long.
    pub fn timed_out(&self, path: Path, phase: Phase) {
        self.counters.timed_out[index(&Path::ALL, path)][index(&Phase::ALL, phase)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// [`accept_loop`] for one of the agent's listeners, counting failed accepts under `path`.
    pub async fn accept_loop(
        &self,
        listener: &TcpListener,
        path: Path,
        on_accept: impl FnMut(TcpStream, SocketAddr),
    ) {
        let errors = &self.counters.accept_errors[index(&Path::ALL, path)];
        accept_loop(
            listener,
            path.as_str(),
            |_| {
                errors.fetch_add(1, Ordering::Relaxed);
            },
            on_accept,
        )
        .await
    }

    /// What is held and what was refused so far.
    pub fn snapshot(&self) -> LimitsSnapshot {
        let mut snapshot = LimitsSnapshot {
            connections: self.connections.in_use(),
            handshakes: self.handshakes.in_use(),
            relay_buffer_bytes: self.buffers.in_use(),
            ..Default::default()
        };
        for (l, limit) in Limit::ALL.into_iter().enumerate() {
            let n = self.counters.buffers_shrunk[l].load(Ordering::Relaxed);
            if n > 0 {
                snapshot.relay_buffers_shrunk.push((limit, n));
            }
        }
        for (p, path) in Path::ALL.into_iter().enumerate() {
            for (l, limit) in Limit::ALL.into_iter().enumerate() {
                let n = self.counters.over_limit[p][l].load(Ordering::Relaxed);
                if n > 0 {
                    snapshot.over_limit.push((path, limit, n));
                }
            }
            for (f, phase) in Phase::ALL.into_iter().enumerate() {
                let n = self.counters.timed_out[p][f].load(Ordering::Relaxed);
                if n > 0 {
                    snapshot.timed_out.push((path, phase, n));
                }
            }
            let n = self.counters.accept_errors[p].load(Ordering::Relaxed);
            if n > 0 {
                snapshot.accept_errors.push((path, n));
            }
        }
        snapshot
    }
}

/// Refuses an accepted connection: closed with a reset, so neither side keeps any state for
/// it (no FIN-WAIT or TIME-WAIT on ours).
pub fn refuse(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn defaults_follow_the_descriptor_limit() {
        // This machine's hard limit: 2,500 kept, 8,750 connections, a quarter per source.
        let s = LimitSettings::for_descriptors(20_000);
        assert_eq!((s.reserved, s.max_connections), (2_500, 8_750));
        assert_eq!(s.max_connections_per_source, 2_187);
        assert_eq!(
            (s.max_handshakes, s.max_handshakes_per_source),
            (1_024, 128)
        );
        // containerd's default: the reserve stops growing, the budget does not.
        let s = LimitSettings::for_descriptors(1 << 20);
        assert_eq!(s.reserved, 16_384);
        assert_eq!(s.max_connections, ((1 << 20) - 16_384) / 2);
        // A process left at 1024: half kept, the handshakes scaled down with the budget.
        let s = LimitSettings::for_descriptors(1024);
        assert_eq!((s.reserved, s.max_connections), (512, 256));
        assert_eq!((s.max_handshakes, s.max_handshakes_per_source), (32, 32));
        // Never zero, whatever the limit.
        let s = LimitSettings::for_descriptors(3);
        assert!(s.max_connections >= 1 && s.max_handshakes >= 1);
        assert!(s.max_connections_per_source >= 1 && s.max_handshakes_per_source >= 1);
    }

    #[test]
    fn flags_adjust_within_what_the_limit_allows_and_name_the_problem() {
        let base = LimitSettings::for_descriptors(20_000);
        let s = base.clone().with_flags(Some(4_000), None).unwrap();
        assert_eq!(
            (s.max_connections, s.max_connections_per_source),
            (4_000, 1_000)
        );
        assert_eq!(s.max_handshakes, 500);
        let s = base.clone().with_flags(None, Some(8_750)).unwrap();
        assert_eq!(
            (s.max_connections, s.max_connections_per_source),
            (8_750, 8_750)
        );

        let err = base.clone().with_flags(Some(9_000), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("--max-connections 9000 needs 20500 descriptors")
                && err.to_string().contains("RLIMIT_NOFILE allows 20000")
                && err.to_string().contains("at most 8750"),
            "{err}"
        );
        let err = base.clone().with_flags(Some(100), Some(101)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--max-connections-per-source 101 exceeds --max-connections 100"
        );
        let err = base.clone().with_flags(None, Some(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--max-connections-per-source must be at least 1"
        );
        assert!(base.with_flags(Some(0), None).is_err());
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn settings(
        max: usize,
        per_source: usize,
        handshakes: usize,
        per_source_hs: usize,
    ) -> LimitSettings {
        LimitSettings {
            descriptors: 1000,
            reserved: 100,
            max_connections: max,
            max_connections_per_source: per_source,
            max_handshakes: handshakes,
            max_handshakes_per_source: per_source_hs,
            http_max_connections: 2,
            http_max_connections_per_source: 1,
            max_relay_buffer_bytes: MIB,
            max_relay_buffer_bytes_per_source: MIB / 4,
        }
    }

    #[test]
    fn refusals_are_counted_by_path_and_limit() {
        let limits = Limits::new(settings(3, 2, 10, 1));
        let a = limits.admit(Path::Outbound, ip(1)).unwrap();
        let _b = limits.admit(Path::Inbound, ip(1)).unwrap();
        assert!(
            limits.admit(Path::HboneTunnel, ip(1)).is_none(),
            "over its share"
        );
        let _c = limits.admit(Path::Inbound, ip(2)).unwrap();
        assert!(
            limits.admit(Path::Inbound, ip(3)).is_none(),
            "budget used up"
        );
        drop(a);
        let _d = limits.admit(Path::Inbound, ip(3)).unwrap();
        let snapshot = limits.snapshot();
        assert_eq!(snapshot.connections, 3);
        assert_eq!(
            snapshot.over_limit,
            vec![
                (Path::Inbound, Limit::Total, 1),
                (Path::HboneTunnel, Limit::PerSource, 1)
            ]
        );
    }

    #[test]
    fn an_hbone_connection_holds_a_handshake_slot_until_it_lets_go() {
        let limits = Limits::new(settings(10, 10, 2, 1));
        let (conn, handshake) = limits.admit_hbone(ip(1)).unwrap();
        assert!(
            limits.admit_hbone(ip(1)).is_none(),
            "one handshake per source"
        );
        let (_conn2, handshake2) = limits.admit_hbone(ip(2)).unwrap();
        assert!(
            limits.admit_hbone(ip(3)).is_none(),
            "two handshakes at most"
        );
        assert_eq!(limits.snapshot().connections, 2);
        drop(handshake);
        drop(handshake2);
        // Handshakes done, the connection stays counted; the next source may handshake.
        let _third = limits.admit_hbone(ip(3)).unwrap();
        assert_eq!(limits.snapshot().connections, 3);
        assert_eq!(limits.snapshot().handshakes, 1);
        drop(conn);
        assert_eq!(
            limits.snapshot().over_limit,
            vec![
                (Path::Hbone, Limit::Handshakes, 1),
                (Path::Hbone, Limit::HandshakesPerSource, 1)
            ]
        );
    }

    #[test]
    fn http_endpoints_have_their_own_caps() {
        let limits = Limits::new(settings(1, 1, 1, 1));
        let _proxied = limits.admit(Path::Outbound, ip(1)).unwrap();
        let readiness = limits.http_limiter();
        let _a = limits.admit_to(&readiness, Path::Readiness, ip(1)).unwrap();
        assert!(
            limits
                .admit_to(&readiness, Path::Readiness, ip(1))
                .is_none()
        );
        let _b = limits.admit_to(&readiness, Path::Readiness, ip(2)).unwrap();
        assert!(
            limits
                .admit_to(&readiness, Path::Readiness, ip(3))
                .is_none()
        );
        // Another endpoint's limiter is separate.
        let metrics = limits.http_limiter();
        assert!(limits.admit_to(&metrics, Path::Metrics, ip(1)).is_some());
        assert_eq!(
            limits.snapshot().over_limit,
            vec![
                (Path::Readiness, Limit::Total, 1),
                (Path::Readiness, Limit::PerSource, 1)
            ]
        );
    }

    #[test]
    fn throttle_logs_once_per_period_with_the_count_between() {
        let mut throttle = Throttle::new(Duration::from_secs(3600));
        assert_eq!(throttle.tick(), Some(0));
        assert_eq!(throttle.tick(), None);
        assert_eq!(throttle.tick(), None);
        throttle.last = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(throttle.tick(), Some(2));
        let mut never_quiet = Throttle::new(Duration::ZERO);
        assert_eq!((never_quiet.tick(), never_quiet.tick()), (Some(0), Some(0)));
    }
}
