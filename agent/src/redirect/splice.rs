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
//! returns).
//!
//! Bounds: at most [`limits::MAX_SPLICED`] connections at once (`--max-spliced-connections`),
//! of which one source pod holds at most a quarter (slots handed out by a [`Limiter`] before
//! anything enters a map, so the maps are never full). A connection that gets no slot, or whose sockets the
//! kernel will not take (one already half-closed), is handed back to be relayed in user space:
//! never refused.
use std::{
    collections::HashMap as StdHashMap,
    io,
    mem::MaybeUninit,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
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
use tracing::{debug, warn};

use crate::{
    limits::{Exceeded, Limiter, Permit},
    relay::{Meter, Relayed, Transferred},
};

/// How often a spliced connection's counts are read into its meter.
const METER_INTERVAL: Duration = Duration::from_secs(1);
/// How often a half-closed direction checks that its peer took every forwarded byte, once
/// [`DRAIN_YIELDS`] quicker checks did not find it so.
const DRAIN_POLL: Duration = Duration::from_millis(1);
/// Checks made right away, yielding to the runtime in between, before the direction waits
/// [`DRAIN_POLL`] between checks: the kernel's worker usually sends the last forwarded bytes
/// within microseconds, and a timer would add a millisecond to every connection's close.
const DRAIN_YIELDS: u32 = 16;
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
pub enum SpliceFailed {
    /// Nothing was spliced: relay the sockets in user space.
    Declined(Declined),
    /// The splice was half made when the kernel refused the rest (a socket closed at that
    /// instant): the connection cannot continue and is closed.
    Broken(io::Error),
}

/// The kernel side of the same-node fast path: the splice maps and program, the slots, and the
/// watcher of the spliced sockets' ends.
pub struct Splicer {
    socks: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, SplicePeer>>,
    slots: Limiter<IpAddr>,
    /// `--max-spliced-connections`: 0 splices nothing.
    max: usize,
    hangups: Arc<Hangups>,
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
        let hangups = Hangups::start().context("creating the splice's epoll instance")?;
        Ok(Self {
            socks: Mutex::new(socks),
            targets: Mutex::new(targets),
            peers: Mutex::new(peers),
            slots: Limiter::new(max, (max / 4).max(1)),
            max,
            hangups,
        })
    }

    /// Connections spliced now.
    pub fn spliced(&self) -> usize {
        self.slots.in_use()
    }

    /// Splices `client` (accepted from a pod of `source`) and `upstream` (opened to the
    /// destination pod's application): from now on the kernel forwards their bytes. Neither
    /// may have been read from. Hands them back untouched when it cannot.
    pub fn splice(
        self: &Arc<Self>,
        source: IpAddr,
        client: TcpStream,
        upstream: TcpStream,
    ) -> Result<Spliced, SpliceFailed> {
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
        // From here the client's bytes are forwarded: there is no going back.
        if let Err(err) = lock(&self.socks).insert(client_cookie, client.as_raw_fd(), 0) {
            self.unpair_all(client_cookie, upstream_cookie);
            return decline("kernel", err.to_string(), client, upstream);
        }
        if let Err(err) = lock(&self.socks).insert(upstream_cookie, upstream.as_raw_fd(), 0) {
            self.unpair(client_cookie, upstream_cookie);
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
            match leg.nudge() {
                Nudge::Open | Nudge::Ended => {}
                Nudge::Unexpected => {
                    return Err(SpliceFailed::Broken(io::Error::other(
                        "bytes of a spliced connection reached the agent",
                    )));
                }
                Nudge::Failed(err) => return Err(SpliceFailed::Broken(err)),
            }
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
            peers
                .insert(cookie, SplicePeer { peer, bytes: 0 }, 0)
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
    _slot: Permit<IpAddr>,
}

impl Spliced {
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
        let mut checks = 0u32;
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + METER_INTERVAL, METER_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ended = loop {
            if flows == [Flow::Done; 2] {
                break Relayed::Finished(Ok(()));
            }
            let draining = flows.iter().any(|f| matches!(f, Flow::Draining { .. }));
            if !draining {
                checks = 0;
            }
            let quick = checks < DRAIN_YIELDS;
            let poll = async {
                match (draining, quick) {
                    (false, _) => std::future::pending().await,
                    (true, true) => {
                        // The worker that sends the last bytes is likely queued on this CPU.
                        std::thread::yield_now();
                        tokio::task::yield_now().await
                    }
                    (true, false) => tokio::time::sleep(DRAIN_POLL).await,
                }
            };
            let step = tokio::select! {
                biased;
                stopped = &mut stop => break Relayed::Stopped(stopped),
                () = self.legs[0].events.notify.notified() => self.on_event(0, &mut flows),
                () = self.legs[1].events.notify.notified() => self.on_event(1, &mut flows),
                () = poll => {
                    checks += 1;
                    self.drain(&mut flows)
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
                    return self.drain(flows);
                }
                // Not through yet (the kernel was short of memory): try again shortly.
                Nudge::Open => leg.events.raise_later(events),
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
    fn drain(&self, flows: &mut [Flow; 2]) -> io::Result<()> {
        for (flow, to) in flows.iter_mut().zip(self.legs.iter().rev()) {
            let Flow::Draining {
                forwarded,
                taken: before,
                progress,
            } = *flow
            else {
                continue;
            };
            let (taken, queued) = to.written()?;
            if taken >= forwarded {
                to.socket.shutdown(std::net::Shutdown::Write)?;
                *flow = Flow::Done;
            } else if taken > before {
                *flow = Flow::Draining {
                    forwarded,
                    taken,
                    progress: Instant::now(),
                };
            } else if queued == 0 && progress.elapsed() > DRAIN_STALL {
                // Nothing waits on the peer's window, yet the bytes did not arrive: the kernel
                // dropped them.
                return Err(io::Error::other(format!(
                    "{taken} of {forwarded} forwarded bytes reached the peer socket"
                )));
            }
        }
        Ok(())
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
}

impl LegEvents {
    fn raise(&self, events: EpollFlags) {
        self.events.fetch_or(events.bits() as u32, Ordering::AcqRel);
        self.notify.notify_one();
    }

    /// Raises `events` again in a moment (a half-close the kernel could not complete yet).
    fn raise_later(self: &Arc<Self>, events: EpollFlags) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DRAIN_POLL).await;
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
        tokio::spawn(hangups.clone().run());
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
                    warn!(%err, "the splice's epoll failed: spliced connections see no ends");
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
                    warn!(%err, "the splice's epoll failed: spliced connections see no ends");
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
