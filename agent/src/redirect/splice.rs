//! The same-node splice: the kernel forwards the bytes of a connection between two pods of this
//! node from one of the agent's sockets to the other, so they never reach the agent's user
//! space.
//!
//! A connection between two enrolled pods of one node reaches the agent as two TCP connections
//! it holds one end of each: the client's, redirected to the pod's outbound listener, and the
//! one the agent opens inside the server's pod to the application (as the inbound path does).
//! Once the proxy has authorized it exactly as the inbound path would, [`Splicer::splice`] puts
//! the two sockets in a sockhash to which an `sk_skb/stream_verdict` program is attached: every
//! chunk received on either is sent out on the other (`bpf_sk_redirect_hash`, egress) and its
//! length added to a per-socket count. The agent's user space only watches for the ends.
//!
//! Why the agent's own sockets, not the pods': the agent holds their descriptors, so only
//! connections it authorized ever enter the maps, it can close them at any time (a policy
//! change), and they close with it. (Merbridge and Cilium put the applications' sockets in the
//! map from `sock_ops` and redirect `sk_msg` from one to the other; that skips even the loopback
//! TCP legs, but every captured socket enters the map before any decision is made, and bytes a
//! client sends before its connection is authorized could not be ordered with the ones sent
//! after.)
//!
//! What makes it exact:
//!
//! - **No byte is lost or reordered when the splice starts.** The agent never reads either
//!   socket before the splice, so every byte received so far waits in its socket's receive
//!   queue. Both sockets are first made redirect *targets* (`SPLICE_TARGETS`, no program), then
//!   put where the verdict sees their bytes (`SPLICE_SOCKS`), so a chunk is never forwarded to a
//!   socket that is not a target yet. Bytes queued before the verdict took over are pushed
//!   through it by one `recv` on each socket: the kernel's sockmap receive path runs the verdict
//!   over its receive queue, in order, before it looks at anything else (tcp_bpf's
//!   `tcp_bpf_recvmsg_parser`, Linux 6.4 and later).
//! - **Half-closes pass through in order.** A FIN is not forwarded by the verdict. The agent
//!   learns of it from its own epoll, asked only for `EPOLLRDHUP` and errors (data arrival wakes
//!   nothing in user space), and shuts down writing on the peer socket only once that socket
//!   has taken every byte the verdict forwarded to it (its bytes acknowledged plus still queued,
//!   from `TCP_INFO` and `SIOCOUTQ`, against the verdict's count): the forwarding itself runs
//!   in a kernel worker after the verdict, so an earlier shutdown could overtake it.
//! - **Counted while flowing.** The verdict adds each chunk's length to the socket's entry in
//!   `SPLICE_PEERS`; the agent reads both counts every second into the connection's meter, as
//!   the user-space relay tells its meter of every chunk.
//!
//! Fail closed: the maps are not pinned and hold only the agent's sockets. If the agent dies,
//! the kernel closes its descriptors, which takes the sockets out of the maps and ends both TCP
//! connections; the maps go with the process. Nothing of a splice can carry bytes without the
//! agent, and the pods' connects meet the pinned redirection as before (refused until an agent
//! returns). The watcher of the spliced sockets' ends is the only way the agent learns that a
//! spliced connection ended: if it ever stops, the process aborts (every spliced socket closes)
//! rather than leave connections it can no longer cut.
//!
//! Only when it works: the agent loads the program only when the fast path is on, and splices
//! only after [`Splicer::self_test`] passed on a loopback pair of its own (bytes written before
//! the splice arrive at the peer, none reach user space). A kernel that refuses the program or
//! fails the test leaves the fast path off (HBONE, as across nodes), with a warning and
//! `ambit_splice_enabled` 0.
//!
//! Bounds: at most [`limits::MAX_SPLICED`] connections at once (`--max-spliced-connections`),
//! of which one source pod holds at most a quarter (slots handed out by a [`Limiter`] before
//! anything enters a map, so the maps are never full). A connection that gets no slot, or
//! whose sockets the kernel will not take (one already half-closed), is handed back to be
//! relayed in user space: never refused. A half-closed direction whose peer does not take its
//! bytes (an application that never reads) is checked with a backoff (from
//! [`DRAIN_POLL_MIN`] doubling to [`DRAIN_POLL_MAX`], back to the start when it makes
//! progress), and one source pod has at most [`DRAIN_QUICK_PER_POD`] such connections checked
//! quickly: its others are checked every [`DRAIN_POLL_MAX`] from the start. So a pod holding
//! thousands of stalled connections costs the agent about one check per connection per second.
use std::{
    collections::HashMap as StdHashMap,
    io::{self, Read as _, Write as _},
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ambit_common::{SplicePeer, limits, maps, programs};
use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use nix::{
    errno::Errno,
    sys::{
        epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags},
        socket::{MsgFlags, recv},
    },
};
use tokio::{io::unix::AsyncFd, net::TcpStream, sync::Notify};
use tracing::{debug, error};

use crate::{
    limits::{Exceeded, Limiter, Permit},
    relay::{Meter, Relayed, Transferred},
};

/// How often a spliced connection's counts are read into its meter.
const METER_INTERVAL: Duration = Duration::from_secs(1);
/// The first wait of a half-closed direction between checks that its peer took every
/// forwarded byte, once [`DRAIN_YIELDS`] quicker checks did not find it so; each wait doubles
/// up to [`DRAIN_POLL_MAX`], and the next one is this again once the peer took some bytes.
pub const DRAIN_POLL_MIN: Duration = Duration::from_millis(1);
/// The longest wait between two checks of a half-closed direction (and the only one of a pod's
/// connections beyond its [`DRAIN_QUICK_PER_POD`]).
pub const DRAIN_POLL_MAX: Duration = Duration::from_secs(1);
/// Checks made right away, yielding to the runtime in between, before the direction waits
/// [`DRAIN_POLL_MIN`]: the kernel's worker usually sends the last forwarded bytes within
/// microseconds, and a timer would add a millisecond to every connection's close.
pub const DRAIN_YIELDS: u32 = 16;
/// Half-closed connections of one source pod checked quickly (yields, then the backoff from
/// [`DRAIN_POLL_MIN`]); the pod's others wait [`DRAIN_POLL_MAX`] between checks.
pub const DRAIN_QUICK_PER_POD: usize = 64;
/// Half-closed connections of the whole node checked quickly.
const DRAIN_QUICK_TOTAL: usize = 1024;
/// How long forwarded bytes may stay neither sent nor queued on the peer socket before the
/// connection is given up (the kernel dropped them: the peer socket was closing).
const DRAIN_STALL: Duration = Duration::from_secs(10);

/// Why a connection is relayed in user space instead of spliced; its sockets come back as they
/// were.
#[derive(Debug)]
pub struct Declined {
    /// The metric label: `pod_share`, `full`, `off`, `not_established` or `kernel`.
    pub reason: &'static str,
    /// What happened, for the log.
    pub detail: String,
    /// The client's socket, untouched.
    pub client: TcpStream,
    /// The upstream socket, untouched.
    pub upstream: TcpStream,
}

/// Why [`Splicer::splice`] did not splice.
#[derive(Debug)]
pub enum SpliceFailed<S> {
    /// Nothing was spliced: relay the sockets in user space.
    Declined(Declined),
    /// The splice was half made when the kernel refused the rest (a socket closed at that
    /// instant): the connection cannot continue and is closed (reset).
    Broken(io::Error),
    /// The connection's admission was revoked while it was being spliced: closed (reset).
    Revoked(S),
}

/// What the splice's user space did, for metrics.
#[derive(Debug, Default)]
pub struct SpliceStats {
    /// Checks of half-closed directions (whether the peer took every forwarded byte) and
    /// retries of half-closes the kernel had not completed.
    drain_checks: AtomicU64,
    /// Spliced connections with a half-closed direction waiting for its peer.
    draining: AtomicUsize,
}

impl SpliceStats {
    /// Checks of half-closed directions so far.
    pub fn drain_checks(&self) -> u64 {
        self.drain_checks.load(Ordering::Relaxed)
    }

    /// Connections waiting for a peer to take a half-closed direction's bytes now.
    pub fn draining(&self) -> usize {
        self.draining.load(Ordering::Relaxed)
    }

    fn checked(&self) {
        self.drain_checks.fetch_add(1, Ordering::Relaxed);
    }
}

/// The kernel side of the same-node fast path: the splice maps and program, the slots, and the
/// watcher of the spliced sockets' ends.
pub struct Splicer {
    socks: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, SplicePeer>>,
    slots: Limiter<IpAddr>,
    /// Half-closed connections checked quickly, per source pod.
    quick_drains: Limiter<IpAddr>,
    /// `--max-spliced-connections`: 0 splices nothing.
    max: usize,
    hangups: Arc<Hangups>,
    stats: Arc<SpliceStats>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Splicer {
    /// Takes the splice maps of the loaded object, loads the verdict program and attaches it to
    /// `SPLICE_SOCKS`, and starts the watcher of spliced sockets' ends (needs a tokio runtime).
    /// At most `max` connections are spliced at once (no more than the maps hold), a quarter of
    /// them for one source pod.
    pub fn load(ebpf: &mut Ebpf, max: usize) -> anyhow::Result<Self> {
        let max = max.min(limits::MAX_SPLICED as usize);
        let socks: SockHash<MapData, u64> = super::map(ebpf, maps::SPLICE_SOCKS)?;
        let targets = super::map(ebpf, maps::SPLICE_TARGETS)?;
        let peers = super::map(ebpf, maps::SPLICE_PEERS)?;
        let verdict: &mut SkSkb = ebpf
            .program_mut(programs::SPLICE_VERDICT)
            .ok_or_else(|| anyhow!("eBPF object has no program {}", programs::SPLICE_VERDICT))?
            .try_into()?;
        verdict
            .load()
            .with_context(|| format!("kernel refused program {}", programs::SPLICE_VERDICT))?;
        verdict
            .attach(socks.fd())
            .with_context(|| format!("attaching {} to its map", programs::SPLICE_VERDICT))?;
        let stats = Arc::new(SpliceStats::default());
        let hangups = Hangups::start().context("creating the splice's epoll instance")?;
        Ok(Self {
            socks: Mutex::new(socks),
            targets: Mutex::new(targets),
            peers: Mutex::new(peers),
            slots: Limiter::new(max, (max / 4).max(1)),
            quick_drains: Limiter::new(DRAIN_QUICK_TOTAL, DRAIN_QUICK_PER_POD),
            max,
            hangups,
            stats,
        })
    }

    /// Connections spliced now.
    pub fn spliced(&self) -> usize {
        self.slots.in_use()
    }

    /// What the splice's user space did.
    pub fn stats(&self) -> &SpliceStats {
        &self.stats
    }

    /// Takes and releases every lock the splice uses: a liveness check that blocks if one is
    /// held for good.
    pub fn touch(&self) {
        drop(lock(&self.socks));
        drop(lock(&self.targets));
        drop(lock(&self.peers));
        drop(lock(&self.hangups.legs));
    }

    /// Checks that this kernel splices as [`Self::splice`] needs, on a loopback pair in the
    /// agent's own namespace: bytes written before the splice reach the peer once it is made
    /// (the kernel runs the verdict over a socket's queued bytes when it is nudged), bytes
    /// written after it flow both ways, and none reach the agent's user space. Blocks for at
    /// most a few seconds.
    pub fn self_test(self: &Arc<Self>) -> anyhow::Result<()> {
        const WAIT: Duration = Duration::from_secs(5);
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding a loopback listener")?;
        let addr = listener.local_addr()?;
        // The pod's client and the agent's socket accepted from it; the agent's upstream
        // socket and the application's accepted one.
        let mut client = std::net::TcpStream::connect(addr).context("connecting on loopback")?;
        let (client_leg, _) = listener.accept()?;
        let upstream = std::net::TcpStream::connect(addr).context("connecting on loopback")?;
        let (mut app, _) = listener.accept()?;
        for socket in [&client, &app] {
            socket.set_read_timeout(Some(WAIT))?;
        }
        let before = b"written before the splice";
        client.write_all(before)?;
        // Queued in the agent's socket before the splice takes it.
        let mut queued = [nix::poll::PollFd::new(
            client_leg.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let waited = nix::poll::poll(&mut queued, nix::poll::PollTimeout::from(5000u16))?;
        anyhow::ensure!(waited == 1, "loopback bytes did not arrive within {WAIT:?}");
        for socket in [&client_leg, &upstream] {
            socket.set_nonblocking(true)?;
        }
        let spliced = self
            .splice(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                TcpStream::from_std(client_leg)?,
                TcpStream::from_std(upstream)?,
                || None::<std::convert::Infallible>,
            )
            .map_err(|failed| match failed {
                SpliceFailed::Declined(declined) => {
                    anyhow!("the splice was declined: {}", declined.detail)
                }
                SpliceFailed::Broken(err) => anyhow!("the splice broke: {err}"),
                SpliceFailed::Revoked(never) => match never {},
            })?;
        let mut got = vec![0u8; before.len()];
        app.read_exact(&mut got).with_context(|| {
            format!(
                "bytes written before the splice did not reach the peer within {WAIT:?} (the \
                 kernel does not run the verdict over queued bytes: Linux 6.4 or later is \
                 needed)"
            )
        })?;
        anyhow::ensure!(
            got == before,
            "bytes written before the splice arrived altered"
        );
        client.write_all(b"after")?;
        let mut got = [0u8; 5];
        app.read_exact(&mut got)
            .context("bytes written after the splice did not reach the peer")?;
        app.write_all(b"back")?;
        let mut back = [0u8; 4];
        client
            .read_exact(&mut back)
            .context("bytes written back did not reach the client")?;
        anyhow::ensure!(
            &got == b"after" && &back == b"back",
            "spliced bytes arrived altered"
        );
        for leg in &spliced.legs {
            if !matches!(leg.nudge(), Nudge::Open) {
                anyhow::bail!("bytes of the spliced pair reached the agent's user space");
            }
        }
        let moved = spliced.moved();
        anyhow::ensure!(
            moved.sent == (before.len() + 5) as u64 && moved.received == 4,
            "the verdict counted {moved:?}, expected {} bytes one way and 4 back",
            before.len() + 5
        );
        Ok(())
    }

    /// Splices `client` (accepted from a pod of `source`) and `upstream` (opened to the
    /// destination pod's application): from now on the kernel forwards their bytes. Neither
    /// may have been read from. Hands them back untouched when it cannot. `revoked` is asked
    /// right before the first byte can flow and again once the bytes queued before have been
    /// pushed through: a revocation then closes both sockets with a reset.
    pub fn splice<S>(
        self: &Arc<Self>,
        source: IpAddr,
        client: TcpStream,
        upstream: TcpStream,
        mut revoked: impl FnMut() -> Option<S>,
    ) -> Result<Spliced, SpliceFailed<S>> {
        let decline = |reason, detail: String, client, upstream| {
            Err(SpliceFailed::Declined(Declined {
                reason,
                detail,
                client,
                upstream,
            }))
        };
        let slot = match self.slots.try_acquire(source) {
            Ok(slot) => slot,
            Err(_) if self.max == 0 => {
                let why = "--max-spliced-connections is 0".to_string();
                return decline("off", why, client, upstream);
            }
            Err(exceeded) => {
                let reason = match exceeded {
                    Exceeded::PerKey(_) => "pod_share",
                    Exceeded::Total(_) => "full",
                };
                return decline(reason, exceeded.to_string(), client, upstream);
            }
        };
        // The kernel takes only established sockets into a sockmap; one whose peer already
        // half-closed is relayed in user space (its FIN is in the queue, the rest is short).
        let probe = |socket: &TcpStream| -> io::Result<Option<(u64, u64, u64)>> {
            let info = tcp_info(socket)?;
            if info.tcpi_state != TCP_ESTABLISHED {
                return Ok(None);
            }
            let cookie = socket2::SockRef::from(socket).cookie()?;
            // Nothing was ever written to it (the agent does not write, and an established
            // socket's SYN is acknowledged): its send queue is empty.
            Ok(Some((
                cookie,
                info.tcpi_bytes_acked,
                info.tcpi_bytes_received,
            )))
        };
        let (c, u) = match (probe(&client), probe(&upstream)) {
            (Ok(Some(c)), Ok(Some(u))) => (c, u),
            (Ok(_), Ok(_)) => {
                return decline(
                    "not_established",
                    "a socket is no longer established".into(),
                    client,
                    upstream,
                );
            }
            (Err(err), _) | (_, Err(err)) => {
                return decline("kernel", err.to_string(), client, upstream);
            }
        };
        let (client_cookie, upstream_cookie) = (c.0, u.0);
        if let Err(err) = self.pair(client_cookie, &client, upstream_cookie, &upstream) {
            self.unpair_all(client_cookie, upstream_cookie);
            return decline("kernel", format!("{err:#}"), client, upstream);
        }
        // A decision taken back while the upstream connection was made: no byte flows.
        if let Some(stopped) = revoked() {
            self.unpair_all(client_cookie, upstream_cookie);
            reset(&client);
            reset(&upstream);
            return Err(SpliceFailed::Revoked(stopped));
        }
        // From here the client's bytes are forwarded: there is no going back.
        if let Err(err) = lock(&self.socks).insert(client_cookie, client.as_raw_fd(), 0) {
            self.unpair_all(client_cookie, upstream_cookie);
            return decline("kernel", err.to_string(), client, upstream);
        }
        if let Err(err) = lock(&self.socks).insert(upstream_cookie, upstream.as_raw_fd(), 0) {
            self.unpair(client_cookie, upstream_cookie);
            reset(&client);
            reset(&upstream);
            return Err(SpliceFailed::Broken(io::Error::other(format!(
                "splicing the upstream socket: {err}"
            ))));
        }
        let legs = (|| -> io::Result<[Leg; 2]> {
            Ok([
                Leg::new(&self.hangups, client.into_std()?, client_cookie, c.1)?,
                Leg::new(&self.hangups, upstream.into_std()?, upstream_cookie, u.1)?,
            ])
        })();
        let legs = match legs {
            Ok(legs) => legs,
            Err(err) => {
                self.unpair(client_cookie, upstream_cookie);
                return Err(SpliceFailed::Broken(err));
            }
        };
        let spliced = Spliced {
            splicer: self.clone(),
            legs,
            source,
            _slot: slot,
        };
        debug!(
            client = client_cookie,
            upstream = upstream_cookie,
            client_bytes_waiting = c.2,
            upstream_bytes_waiting = u.2,
            "spliced"
        );
        // Bytes that arrived before the verdict took over are pushed through it now.
        for leg in &spliced.legs {
            let broken = match leg.nudge() {
                Nudge::Open | Nudge::Ended => continue,
                Nudge::Unexpected => {
                    io::Error::other("bytes of a spliced connection reached the agent")
                }
                Nudge::Failed(err) => err,
            };
            spliced.reset();
            return Err(SpliceFailed::Broken(broken));
        }
        if let Some(stopped) = revoked() {
            spliced.reset();
            return Err(SpliceFailed::Revoked(stopped));
        }
        Ok(spliced)
    }

    /// Records each socket's peer, then makes both redirect targets.
    fn pair(
        &self,
        client_cookie: u64,
        client: &TcpStream,
        upstream_cookie: u64,
        upstream: &TcpStream,
    ) -> anyhow::Result<()> {
        let mut peers = lock(&self.peers);
        for (cookie, peer) in [
            (client_cookie, upstream_cookie),
            (upstream_cookie, client_cookie),
        ] {
            let entry = SplicePeer {
                cookie,
                peer,
                bytes: 0,
            };
            peers
                .insert(cookie, entry, 0)
                .with_context(|| format!("adding socket {cookie} to {}", maps::SPLICE_PEERS))?;
        }
        drop(peers);
        let mut targets = lock(&self.targets);
        for (cookie, socket) in [(client_cookie, client), (upstream_cookie, upstream)] {
            targets
                .insert(cookie, socket.as_raw_fd(), 0)
                .with_context(|| format!("adding socket {cookie} to {}", maps::SPLICE_TARGETS))?;
        }
        Ok(())
    }

    /// Forgets a pair whose sockets are about to close: the verdict stops seeing their bytes,
    /// then their counts go (a closing socket leaves the sockhashes by itself; taking it out of
    /// `SPLICE_SOCKS` first means no chunk finds it without a peer meanwhile).
    fn unpair(&self, client_cookie: u64, upstream_cookie: u64) {
        for cookie in [client_cookie, upstream_cookie] {
            let _ = lock(&self.socks).remove(&cookie);
        }
        for cookie in [client_cookie, upstream_cookie] {
            let _ = lock(&self.peers).remove(&cookie);
        }
    }

    /// Forgets a pair that is not spliced after all (its sockets go back to the caller): out of
    /// every map, so they are plain sockets again.
    fn unpair_all(&self, client_cookie: u64, upstream_cookie: u64) {
        self.unpair(client_cookie, upstream_cookie);
        for cookie in [client_cookie, upstream_cookie] {
            let _ = lock(&self.targets).remove(&cookie);
        }
    }

    /// Bytes the verdict forwarded from the socket `cookie` to its peer.
    fn forwarded(&self, cookie: u64) -> u64 {
        lock(&self.peers)
            .get(&cookie, 0)
            .map_or(0, |pair| pair.bytes)
    }
}

/// Makes closing `socket` send a reset instead of a FIN (`SO_LINGER` on, zero): a connection
/// cut by policy or by an error must not look complete to an application reading to its end.
fn reset(socket: &impl AsFd) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// One of a spliced connection's two sockets.
struct Leg {
    socket: std::net::TcpStream,
    cookie: u64,
    /// Bytes acknowledged plus queued on the socket when it was spliced (the SYN's sequence
    /// number counts): what it sends from then on is all forwarded.
    written_before: u64,
    events: Arc<LegEvents>,
    hangups: Arc<Hangups>,
}

impl Leg {
    fn new(
        hangups: &Arc<Hangups>,
        socket: std::net::TcpStream,
        cookie: u64,
        written_before: u64,
    ) -> io::Result<Self> {
        let events = hangups.watch(&socket, cookie)?;
        Ok(Self {
            socket,
            cookie,
            written_before,
            events,
            hangups: hangups.clone(),
        })
    }

    /// Pushes bytes queued before the verdict took over through it (a receive on a sockmap
    /// socket runs the verdict over the receive queue first). What it finds says whether the
    /// peer half-closed already, which the watcher is told of.
    fn nudge(&self) -> Nudge {
        let mut byte = [0u8; 1];
        match recv(self.socket.as_raw_fd(), &mut byte, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => {
                self.events.raise(EpollFlags::EPOLLRDHUP);
                Nudge::Ended
            }
            Ok(_) => Nudge::Unexpected,
            Err(Errno::EAGAIN) => Nudge::Open,
            Err(errno) => Nudge::Failed(io::Error::from(errno)),
        }
    }

    /// Bytes forwarded to this socket that it has taken: acknowledged by its peer or queued.
    fn written(&self) -> io::Result<(u64, u64)> {
        let info = tcp_info(&self.socket)?;
        let queued = queued(&self.socket)?;
        let written = (info.tcpi_bytes_acked + queued).saturating_sub(self.written_before);
        Ok((written, queued))
    }
}

impl Drop for Leg {
    fn drop(&mut self) {
        self.hangups.unwatch(self.cookie);
    }
}

/// What [`Leg::nudge`] found.
enum Nudge {
    /// Nothing to read: the verdict took everything.
    Open,
    /// The peer half-closed.
    Ended,
    /// Bytes reached user space: the verdict passed them (its socket has no pair).
    Unexpected,
    /// The socket failed.
    Failed(io::Error),
}

/// Where one direction of a spliced connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// Bytes arrive and are forwarded.
    Open,
    /// The sender half-closed; the FIN is passed on once the peer socket took `forwarded`
    /// bytes. `progress` is when it last took some (or the half-close arrived).
    Draining {
        forwarded: u64,
        taken: u64,
        progress: Instant,
    },
    /// The FIN was passed on.
    Done,
}

/// A connection spliced in the kernel. Dropping it closes both sockets.
pub struct Spliced {
    splicer: Arc<Splicer>,
    /// The client's socket, then the upstream one.
    legs: [Leg; 2],
    /// The source pod, whose share of quick drains a half-closed direction takes.
    source: IpAddr,
    _slot: Permit<IpAddr>,
}

/// How often a spliced connection with a half-closed direction checks its peer (see the
/// module's bounds). Counted in [`SpliceStats::draining`] while it lives.
struct DrainPace {
    stats: Arc<SpliceStats>,
    /// Quick checks left, each after a yield.
    quick: u32,
    /// The wait after the quick checks, doubled at each check.
    delay: Duration,
    /// When the next check is due: `None` right after a yield. A deadline, not a wait
    /// restarted by every other event of the connection (the meter's ticks).
    due: Option<tokio::time::Instant>,
    /// The source pod's share of quick drains, when it had one left.
    fast: Option<Permit<IpAddr>>,
}

impl DrainPace {
    fn start(splicer: &Splicer, source: IpAddr) -> Self {
        splicer.stats.draining.fetch_add(1, Ordering::Relaxed);
        let fast = splicer.quick_drains.try_acquire(source).ok();
        let (quick, delay) = if fast.is_some() {
            (DRAIN_YIELDS, DRAIN_POLL_MIN)
        } else {
            (0, DRAIN_POLL_MAX)
        };
        let mut pace = Self {
            stats: splicer.stats.clone(),
            quick,
            delay,
            due: None,
            fast,
        };
        pace.schedule();
        pace
    }

    /// Sets when the next check is due, after one was made (or at the start).
    fn schedule(&mut self) {
        if self.quick > 0 {
            self.quick -= 1;
            self.due = None;
            return;
        }
        self.due = Some(tokio::time::Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(DRAIN_POLL_MAX);
    }

    /// The peer took bytes: check again soon.
    fn progressed(&mut self) {
        if self.fast.is_some() {
            self.delay = DRAIN_POLL_MIN;
        }
    }
}

impl Drop for DrainPace {
    fn drop(&mut self) {
        self.stats.draining.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Spliced {
    /// Closes both sockets with a reset when dropped (a cut, not an end).
    fn reset(&self) {
        for leg in &self.legs {
            reset(&leg.socket);
        }
    }

    /// Bytes forwarded so far: client to upstream, and back.
    pub fn moved(&self) -> Transferred {
        Transferred {
            sent: self.splicer.forwarded(self.legs[0].cookie),
            received: self.splicer.forwarded(self.legs[1].cookie),
        }
    }

    /// Watches the connection until both directions have ended (passing each half-close on
    /// in order) or one fails, telling `meter` of the bytes forwarded every second; cut short
    /// when `stop` resolves. The sockets are closed when it returns, as the user-space relay's
    /// are ([`crate::relay::relay_until`], whose results it gives).
    pub async fn relay_until<S>(
        self,
        meter: &impl Meter,
        stop: impl Future<Output = S>,
    ) -> (Transferred, Relayed<S>) {
        tokio::pin!(stop);
        let mut told = Transferred::default();
        let mut flows = [Flow::Open; 2];
        let mut pace: Option<DrainPace> = None;
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + METER_INTERVAL, METER_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ended = loop {
            if flows == [Flow::Done; 2] {
                break Relayed::Finished(Ok(()));
            }
            let draining = flows.iter().any(|f| matches!(f, Flow::Draining { .. }));
            if !draining {
                pace = None;
            } else if pace.is_none() {
                pace = Some(DrainPace::start(&self.splicer, self.source));
            }
            let due = pace.as_ref().map(|pace| pace.due);
            let poll = async {
                match due {
                    None => std::future::pending().await,
                    Some(None) => {
                        // The worker that sends the last bytes is likely queued on this CPU.
                        std::thread::yield_now();
                        tokio::task::yield_now().await
                    }
                    Some(Some(at)) => tokio::time::sleep_until(at).await,
                }
            };
            let step = tokio::select! {
                biased;
                stopped = &mut stop => break Relayed::Stopped(stopped),
                () = self.legs[0].events.notify.notified() => self.on_event(0, &mut flows),
                () = self.legs[1].events.notify.notified() => self.on_event(1, &mut flows),
                () = poll => {
                    self.drain(&mut flows).map(|progressed| {
                        if let Some(pace) = &mut pace {
                            if progressed {
                                pace.progressed();
                            }
                            pace.schedule();
                        }
                    })
                }
                _ = ticker.tick() => {
                    self.tell(meter, &mut told);
                    Ok(())
                }
            };
            if let Err(err) = step {
                break Relayed::Finished(Err(err));
            }
        };
        if !matches!(ended, Relayed::Finished(Ok(()))) {
            // Cut by policy or by an error: the applications see a reset, not an end.
            self.reset();
        }
        self.tell(meter, &mut told);
        (self.moved(), ended)
    }

    fn tell(&self, meter: &impl Meter, told: &mut Transferred) {
        let now = self.moved();
        meter.sent(now.sent.saturating_sub(told.sent));
        meter.received(now.received.saturating_sub(told.received));
        *told = Transferred {
            sent: now.sent.max(told.sent),
            received: now.received.max(told.received),
        };
    }

    /// Something happened on socket `i`: an error ends the connection; a half-close starts
    /// draining the direction from it.
    fn on_event(&self, i: usize, flows: &mut [Flow; 2]) -> io::Result<()> {
        let leg = &self.legs[i];
        let events = leg.events.take();
        if events.contains(EpollFlags::EPOLLERR) {
            let err = leg
                .socket
                .take_error()?
                .unwrap_or_else(|| io::Error::other("socket error"));
            return Err(err);
        }
        if flows[i] == Flow::Open && events.contains(EpollFlags::EPOLLRDHUP) {
            match leg.nudge() {
                // Every byte before the FIN went through the verdict: its count is final.
                Nudge::Ended => {
                    let forwarded = self.splicer.forwarded(leg.cookie);
                    debug!(socket = leg.cookie, forwarded, "spliced socket half-closed");
                    flows[i] = Flow::Draining {
                        forwarded,
                        taken: 0,
                        progress: Instant::now(),
                    };
                    leg.events.take();
                    leg.events.retries.store(0, Ordering::Relaxed);
                    return self.drain(flows).map(drop);
                }
                // Not through yet (the kernel was short of memory): try again shortly.
                Nudge::Open => leg.events.raise_later(events, &self.splicer.stats),
                Nudge::Unexpected => {
                    return Err(io::Error::other(
                        "bytes of a spliced connection reached the agent",
                    ));
                }
                Nudge::Failed(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Passes each half-close on once the peer socket took every byte forwarded before it.
    /// Whether a peer took bytes since the last check.
    fn drain(&self, flows: &mut [Flow; 2]) -> io::Result<bool> {
        let mut progressed = false;
        for (flow, to) in flows.iter_mut().zip(self.legs.iter().rev()) {
            let Flow::Draining {
                forwarded,
                taken: before,
                progress,
            } = *flow
            else {
                continue;
            };
            self.splicer.stats.checked();
            let (taken, queued) = to.written()?;
            if taken >= forwarded {
                to.socket.shutdown(std::net::Shutdown::Write)?;
                *flow = Flow::Done;
                progressed = true;
            } else if taken > before {
                *flow = Flow::Draining {
                    forwarded,
                    taken,
                    progress: Instant::now(),
                };
                progressed = true;
            } else if queued == 0 && progress.elapsed() > DRAIN_STALL {
                // Nothing waits on the peer's window, yet the bytes did not arrive: the kernel
                // dropped them.
                return Err(io::Error::other(format!(
                    "{taken} of {forwarded} forwarded bytes reached the peer socket"
                )));
            }
        }
        Ok(progressed)
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        // The sockets close right after (dropping the legs), which also takes them out of the
        // sockhashes.
        self.splicer
            .unpair(self.legs[0].cookie, self.legs[1].cookie);
    }
}

/// `tcpi_state` of an established connection (include/net/tcp_states.h).
const TCP_ESTABLISHED: u8 = 1;

/// `TCP_INFO` of a socket.
fn tcp_info(socket: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: neither nix nor socket2 wraps TCP_INFO. `info` is writable for `len` bytes, the
    // kernel writes at most that many, and `len` is a valid socklen_t it updates.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all integers, zero-filled, then (partly) written by the kernel: every bit
    // pattern is a valid tcp_info.
    Ok(unsafe { info.assume_init() })
}

nix::ioctl_read_bad!(
    /// `ioctl(SIOCOUTQ)` (the same number as TIOCOUTQ).
    outq,
    libc::TIOCOUTQ,
    libc::c_int
);

/// Bytes written to a TCP socket and not yet acknowledged (`SIOCOUTQ`).
fn queued(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut bytes: libc::c_int = 0;
    // SAFETY: SIOCOUTQ on a TCP socket writes one int to the pointer given, a valid local.
    unsafe { outq(socket.as_raw_fd(), &raw mut bytes) }.map_err(io::Error::from)?;
    Ok(u64::try_from(bytes).unwrap_or(0))
}

/// What happened to one spliced socket since it was last looked at.
#[derive(Default)]
struct LegEvents {
    events: AtomicU32,
    notify: Notify,
    /// Half-closes retried since the last completed one: the next retry waits
    /// [`DRAIN_POLL_MIN`] doubled this many times, at most [`DRAIN_POLL_MAX`].
    retries: AtomicU32,
}

impl LegEvents {
    fn raise(&self, events: EpollFlags) {
        self.events.fetch_or(events.bits() as u32, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// Raises `events` again in a moment (a half-close the kernel could not complete yet),
    /// later at each retry.
    fn raise_later(self: &Arc<Self>, events: EpollFlags, stats: &SpliceStats) {
        stats.checked();
        let retries = self.retries.fetch_add(1, Ordering::Relaxed).min(10);
        let wait = (DRAIN_POLL_MIN * 2u32.pow(retries)).min(DRAIN_POLL_MAX);
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            this.raise(events);
        });
    }

    fn take(&self) -> EpollFlags {
        EpollFlags::from_bits_truncate(self.events.swap(0, Ordering::AcqRel) as i32)
    }
}

/// An epoll instance of its own for the spliced sockets, asked only for half-closes and errors:
/// the bytes that flow through them wake nothing in user space (tokio's reactor would be
/// woken by each chunk the kernel forwards).
struct Hangups {
    epoll: AsyncFd<EpollFd>,
    legs: Mutex<StdHashMap<u64, Arc<LegEvents>>>,
}

struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.0.as_raw_fd()
    }
}

impl Hangups {
    /// Starts the watcher. It never ends while the agent runs: if it does (its epoll failed, a
    /// bug panicked it), no spliced connection would see its end or could be cut, so the
    /// process aborts and the kernel closes every spliced socket (fail closed).
    fn start() -> io::Result<Arc<Self>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        // SAFETY: `EpollFd` owns the epoll descriptor, which stays open and unreplaced for as
        // long as the AsyncFd (which owns it) lives.
        let epoll = unsafe {
            AsyncFd::register_with_interest(EpollFd(epoll), tokio::io::Interest::READABLE)?
        };
        let hangups = Arc::new(Self {
            epoll,
            legs: Mutex::default(),
        });
        let watcher = tokio::spawn(hangups.clone().run());
        tokio::spawn(async move {
            let ended = watcher.await;
            if ended
                .as_ref()
                .is_err_and(tokio::task::JoinError::is_cancelled)
            {
                // The runtime is shutting down: so is the agent.
                return;
            }
            error!(
                ?ended,
                "the splice's watcher of spliced sockets ended: aborting, so that the kernel \
                 closes every spliced connection"
            );
            std::process::abort();
        });
        Ok(hangups)
    }

    fn watch(&self, socket: &impl AsFd, token: u64) -> io::Result<Arc<LegEvents>> {
        let events = Arc::new(LegEvents::default());
        lock(&self.legs).insert(token, events.clone());
        let interest = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        if let Err(errno) = self
            .epoll
            .get_ref()
            .0
            .add(socket, EpollEvent::new(interest, token))
        {
            lock(&self.legs).remove(&token);
            return Err(errno.into());
        }
        Ok(events)
    }

    /// Forgets a socket about to close (closing it takes it out of the epoll instance: the
    /// agent holds its only descriptor).
    fn unwatch(&self, token: u64) {
        lock(&self.legs).remove(&token);
    }

    async fn run(self: Arc<Self>) {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let mut ready = match self.epoll.readable().await {
                Ok(ready) => ready,
                Err(err) => {
                    error!(%err, "the splice's epoll failed: spliced connections see no ends");
                    return;
                }
            };
            let waited = ready.try_io(|epoll| match epoll.get_ref().0.wait(&mut events, 0u8) {
                Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
                Ok(n) => Ok(n),
                Err(Errno::EINTR) => Ok(0),
                Err(errno) => Err(errno.into()),
            });
            let n = match waited {
                Ok(Ok(n)) => n,
                Ok(Err(err)) => {
                    error!(%err, "the splice's epoll failed: spliced connections see no ends");
                    return;
                }
                Err(_would_block) => continue,
            };
            let legs = lock(&self.legs);
            for event in &events[..n] {
                if let Some(leg) = legs.get(&event.data()) {
                    leg.raise(event.events());
                }
            }
        }
    }
}
