//! Types and constants shared by Ambit's eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding: these values are map keys and values,
//! so their byte layout is the contract between kernel and user space, and padding bytes must be
//! zero for hash-map keys to match. Each type's size is asserted at compile time, so a change
//! that would silently break that contract does not build.
#![no_std]

/// The agent's outbound capture port (ztunnel's): connects are rewritten to 127.0.0.1/::1 here.
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's inbound plaintext capture port inside each enrolled pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The agent's inbound HBONE (mTLS) port inside each enrolled pod.
pub const INBOUND_HBONE_PORT: u16 = 15008;
/// The agent's listeners in every enrolled pod: a connection to one of these ports is never
/// an application's, so the proxy refuses to forward to them (no loops through the agent).
pub const POD_PROXY_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT];

/// Map sizes. Only `ORIG_DST_TUPLE` grows with traffic, and only for connects whose handshake
/// with the agent has not completed yet; [`limits::PENDING_CONNECTS_PER_POD`] bounds what one
/// pod can hold of it, so one pod cannot exhaust it for the others.
pub mod limits {
    /// Enrolled (or closed) pod network namespaces per node.
    pub const MAX_PODS: u32 = 16_384;
    /// Redirected connects between `TCP_CONNECT_CB` and the agent's side of the handshake.
    pub const MAX_PENDING_CONNECTS: u32 = 262_144;
    /// Of those, how many one pod may hold at once; beyond it, that pod's further connects
    /// find no original destination and are closed by the agent (other pods are unaffected).
    pub const PENDING_CONNECTS_PER_POD: u64 = 4_096;
    /// Node addresses whose connections reach pods directly (kubelet's probes).
    pub const MAX_NODE_ADDRS: u32 = 256;
    /// cgroups whose sockets are exempt from redirection (the agents running on the node).
    pub const MAX_EXEMPT_CGROUPS: u32 = 16;
    /// Excluded destination ports and networks.
    pub const MAX_EXCLUSIONS: u32 = 1_024;
    /// Entries of each list of one pod's own capture exclusions (its outbound ports, its
    /// outbound networks, its inbound ports): validation refuses longer lists, so one pod holds
    /// at most this many entries of each per-pod exclusion map (times its addresses for the
    /// inbound one).
    pub const MAX_POD_EXCLUSIONS: usize = 32;
    /// Entries of each per-pod exclusion map for the whole node. A pod whose entries find the
    /// map full gets none (all its traffic captured) and the failure is reported.
    pub const MAX_POD_EXCLUSION_ENTRIES: u32 = 65_536;
    /// Same-node connections spliced in the kernel at once (each is two sockets, one entry of
    /// each in `SPLICE_SOCKS`, `SPLICE_TARGETS` and `SPLICE_PEERS`). The agent hands out these
    /// slots, a quarter at most to one source pod; a connection that finds none is relayed in
    /// user space instead, never refused.
    pub const MAX_SPLICED: u32 = 16_384;
    /// The agent's connects to applications in flight (`AGENT_HOPS`): a connect that finds
    /// the map full fails (the connection is refused, never let past the agent).
    pub const MAX_AGENT_HOPS: u32 = 65_536;
}

/// Values of `ENROLLED_NETNS`: what the programs do with a pod namespace's traffic.
pub mod pod_state {
    /// Meshed: outbound TCP is redirected to the agent, inbound steered to its listeners.
    pub const MESHED: u32 = 1;
    /// Closed: the pod should be meshed but its enrolment could not complete. Outbound TCP to
    /// anything but loopback is refused; inbound finds no listener and is dropped. Never open.
    pub const CLOSED: u32 = 2;
}

/// Map names, as pinned under the agent's bpffs directory.
pub mod maps {
    /// Network namespaces (by cookie) of enrolled pods, with their [`crate::pod_state`].
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// Per-socket storage ([`crate::SockState`]): the original destination of a redirected
    /// client socket (read by the getpeername hooks), and of the agent's accepted socket (read
    /// by the agent). Freed with the socket, so no failed connect leaves anything behind.
    pub const SOCK_STATE: &str = "SOCK_STATE";
    /// Original destination by (netns cookie, client address, client port), from the client's
    /// `TCP_CONNECT_CB` until the agent's side of the handshake takes it into its socket.
    pub const ORIG_DST_TUPLE: &str = "ORIG_DST_TUPLE";
    /// Entries each pod holds in `ORIG_DST_TUPLE`, by netns cookie.
    pub const PENDING_CONNECTS: &str = "PENDING_CONNECTS";
    /// Inbound plaintext listener socket per pod IP (used by sk_lookup).
    pub const POD_LISTENERS: &str = "POD_LISTENERS";
    /// Inbound HBONE listener socket per pod IP (used by sk_lookup).
    pub const HBONE_LISTENERS: &str = "HBONE_LISTENERS";
    /// The node's own addresses: connections from them reach pods directly (probes).
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// cgroup ids whose connects are never redirected: the agents'.
    pub const EXEMPT_CGROUPS: &str = "EXEMPT_CGROUPS";
    /// Destination ports never redirected.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// Destination networks never redirected.
    pub const EXCLUDED_NETS: &str = "EXCLUDED_NETS";
    /// One pod's own excluded destination ports, by ([`crate::PodPortKey`]: netns cookie,
    /// port).
    pub const POD_EXCLUDED_PORTS: &str = "POD_EXCLUDED_PORTS";
    /// One pod's own excluded destination networks: an LPM trie whose key is the netns cookie
    /// followed by the network ([`crate::pod_net_key`]).
    pub const POD_EXCLUDED_NETS: &str = "POD_EXCLUDED_NETS";
    /// One pod's own inbound ports that reach its application directly, by
    /// ([`crate::OrigDst`]-shaped: the pod's address, port), valued with the pod's netns cookie
    /// (sk_lookup has no netns cookie helper; the agent removes a pod's entries by the value).
    pub const POD_EXCLUDED_INBOUND: &str = "POD_EXCLUDED_INBOUND";
    /// Per-CPU event counters (indexes in [`crate::stats`]).
    pub const STATS: &str = "STATS";
    /// The agent's sockets of spliced same-node connections whose received bytes the splice
    /// verdict program forwards (by socket cookie). The program is attached to this map, so a
    /// socket's bytes go through it from the moment it is inserted here. Not pinned: the
    /// entries are the agent's own sockets, which die with it.
    pub const SPLICE_SOCKS: &str = "SPLICE_SOCKS";
    /// The same sockets as redirect targets (by socket cookie), with no program attached: a
    /// socket is a target before its peer's bytes can be forwarded to it. Not pinned.
    pub const SPLICE_TARGETS: &str = "SPLICE_TARGETS";
    /// Per spliced socket (by cookie): its peer's cookie and the bytes forwarded to it
    /// ([`crate::SplicePeer`]). Not pinned.
    pub const SPLICE_PEERS: &str = "SPLICE_PEERS";
    /// Each enrolled pod's own addresses by netns cookie ([`crate::PodAddrs`]): a redirected
    /// socket is bound to the pod's address of its family, so its `getsockname()` is what it
    /// would be without the mesh.
    pub const POD_ADDRS: &str = "POD_ADDRS";
    /// The agent's own hops to applications in flight, by 4-tuple ([`crate::HopKey`]): from a
    /// client's address (a transparent socket) to an enrolled pod's application, inside the
    /// pod. sk_lookup lets exactly these through instead of steering them back to the agent.
    /// An entry lives from just before the agent's connect until it completes. Not pinned: it
    /// holds only the running agent's connects.
    pub const AGENT_HOPS: &str = "AGENT_HOPS";
    /// Every map the agent pins, for uninstall.
    pub const PINNED: [&str; 14] = [
        ENROLLED_NETNS,
        SOCK_STATE,
        ORIG_DST_TUPLE,
        PENDING_CONNECTS,
        POD_LISTENERS,
        HBONE_LISTENERS,
        NODE_ADDRS,
        EXEMPT_CGROUPS,
        EXCLUDED_PORTS,
        EXCLUDED_NETS,
        POD_ADDRS,
        POD_EXCLUDED_PORTS,
        POD_EXCLUDED_NETS,
        POD_EXCLUDED_INBOUND,
    ];
}

/// Program names (the Rust function names in the eBPF object).
pub mod programs {
    /// cgroup/connect4: rewrite IPv4 connects.
    pub const CONNECT4: &str = "ambit_connect4";
    /// cgroup/connect6: rewrite IPv6 connects.
    pub const CONNECT6: &str = "ambit_connect6";
    /// cgroup/getpeername4: report the original IPv4 destination.
    pub const GETPEERNAME4: &str = "ambit_getpeername4";
    /// cgroup/getpeername6: report the original IPv6 destination.
    pub const GETPEERNAME6: &str = "ambit_getpeername6";
    /// sock_ops: hand the original destination from the client's socket to the agent's.
    pub const SOCK_OPS: &str = "ambit_sock_ops";
    /// sk_lookup: steer inbound TCP to the pod's listeners.
    pub const SK_LOOKUP: &str = "ambit_sk_lookup";
    /// sk_skb/stream_verdict on `SPLICE_SOCKS`: forward a spliced socket's bytes to its peer.
    pub const SPLICE_VERDICT: &str = "ambit_splice_verdict";
    /// The cgroup-attached programs, in attach order.
    pub const CGROUP: [&str; 5] = [SOCK_OPS, CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6];
}

/// Indexes into the STATS per-CPU array.
pub mod stats {
    /// IPv4 connects rewritten to the agent.
    pub const REDIRECTED4: u32 = 0;
    /// IPv6 connects rewritten to the agent.
    pub const REDIRECTED6: u32 = 1;
    /// Connects from enrolled namespaces left alone by an exclusion (port or network).
    pub const EXCLUDED: u32 = 2;
    /// Failed map or socket-storage updates (the connection is refused or closed, never let
    /// past the mesh).
    pub const MAP_FULL: u32 = 3;
    /// Inbound connections steered to a pod's listener.
    pub const INBOUND_STEERED: u32 = 4;
    /// Inbound connections dropped because the enrolled pod had no listener (agent down, pod
    /// closed).
    pub const INBOUND_NO_LISTENER: u32 = 5;
    /// Connects of a pod beyond its [`crate::limits::PENDING_CONNECTS_PER_POD`].
    pub const POD_QUOTA: u32 = 6;
    /// Outbound connects refused because the pod is closed.
    pub const CLOSED_REFUSED: u32 = 7;
    /// Inbound connections from the node's own addresses let through to the application.
    pub const INBOUND_FROM_NODE: u32 = 8;
    /// Bytes the splice verdict forwarded from one spliced socket to its peer (a sum of
    /// lengths, not a count of events).
    pub const SPLICED_BYTES: u32 = 9;
    /// Chunks the splice verdict could not forward because the peer socket was gone (dropped:
    /// the agent is closing that connection).
    pub const SPLICE_NO_TARGET: u32 = 10;
    /// Chunks that reached a socket of `SPLICE_SOCKS` without a peer in `SPLICE_PEERS` (passed
    /// to the agent, which closes such a connection), or whose entry was recycled for another
    /// socket while the verdict read it (dropped).
    pub const SPLICE_UNPAIRED: u32 = 11;
    /// Redirected connects whose socket could not be bound to its pod's address (the
    /// application bound it itself, or the pod has no address of that family): it keeps the
    /// loopback address (or the application's).
    pub const SOURCE_NOT_BOUND: u32 = 12;
    /// Inbound connections to a pod's excluded inbound port let through to the application.
    pub const INBOUND_EXCLUDED: u32 = 13;
    /// Number of counters.
    pub const COUNT: u32 = 14;
}

/// Bits of [`SockState::flags`].
pub mod sock_flags {
    /// The socket was redirected: `orig` is where its application connected.
    pub const REDIRECTED: u32 = 1;
    /// The socket put an entry in `ORIG_DST_TUPLE` (and counted it against its pod).
    pub const PENDING: u32 = 2;
    /// The socket is the agent's side of a redirected connection: `orig` was handed over.
    pub const ACCEPTED: u32 = 4;
}

/// An IP address as 16 bytes in network order; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`),
/// so one key type serves both families and a dual-stack socket's v4 peer matches a v4 socket's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    /// Address bytes, network order.
    pub addr: [u8; 16],
}

impl IpKey {
    /// The IPv4-mapped form of an IPv4 address given as its four network-order bytes.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    /// True if this is an IPv4-mapped address.
    pub fn is_v4(&self) -> bool {
        self.addr[..10] == [0; 10] && self.addr[10] == 0xff && self.addr[11] == 0xff
    }
}

/// Where a redirected connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Destination address (IPv4-mapped for IPv4).
    pub ip: IpKey,
    /// Destination port, host byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 6],
}

/// Key of `ORIG_DST_TUPLE`: the client socket's namespace and local address, which the agent's
/// side of the connection sees as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TupleKey {
    /// Network-namespace cookie of the client socket.
    pub netns_cookie: u64,
    /// Client's local address (IPv4-mapped for IPv4).
    pub ip: IpKey,
    /// Client's local port, host byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 6],
}

/// Key of `POD_EXCLUDED_PORTS`: a pod's namespace and a destination port it excludes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodPortKey {
    /// Network-namespace cookie of the pod.
    pub netns_cookie: u64,
    /// The port, host byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 6],
}

/// Bits of a [`pod_net_key`] before the address: the netns cookie.
pub const POD_NET_COOKIE_BITS: u32 = 64;

/// The data of a `POD_EXCLUDED_NETS` key: the pod's netns cookie (native order: only ever
/// matched whole) followed by the address (IPv4-mapped for IPv4). Its prefix length is
/// [`POD_NET_COOKIE_BITS`] plus the address's, so a lookup matches only that pod's networks.
#[inline(always)]
pub const fn pod_net_key(netns_cookie: u64, addr: &[u8; 16]) -> [u8; 24] {
    let c = netns_cookie.to_ne_bytes();
    let mut key = [0u8; 24];
    let mut i = 0;
    while i < 8 {
        key[i] = c[i];
        i += 1;
    }
    while i < 24 {
        key[i] = addr[i - 8];
        i += 1;
    }
    key
}

/// Value of `ORIG_DST_TUPLE`: the original destination and the socket that wrote it, so that
/// a socket's close removes only its own entry, never that of a newer socket that reuses its
/// address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingConnect {
    /// Where the client connected.
    pub orig: OrigDst,
    /// Socket cookie of the client socket.
    pub socket_cookie: u64,
}

/// Value of `SPLICE_PEERS`: where a spliced socket's bytes go, and how many went.
///
/// `cookie` repeats the entry's own key: the kernel may hand a deleted entry's memory to a new
/// one while a verdict still holds a pointer to it, and the verdict drops a chunk whose entry
/// no longer names its socket (socket cookies are never reused, so a recycled entry always
/// names another one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SplicePeer {
    /// Socket cookie of the socket this entry belongs to (its key in `SPLICE_PEERS`).
    pub cookie: u64,
    /// Socket cookie of the peer socket (its key in `SPLICE_TARGETS`).
    pub peer: u64,
    /// Bytes forwarded to the peer so far, added atomically by the verdict program.
    pub bytes: u64,
}

/// Key of `AGENT_HOPS`: one connection as sk_lookup sees it arriving at the application.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct HopKey {
    /// The application's address (the pod's; IPv4-mapped for IPv4).
    pub local: IpKey,
    /// The client's address the agent's socket uses (IPv4-mapped for IPv4).
    pub remote: IpKey,
    /// The application's port, host byte order.
    pub local_port: u16,
    /// The agent's socket's port, host byte order.
    pub remote_port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 4],
}

/// Value of `POD_ADDRS`: a pod's own IPv4 and IPv6 address (the first of each), which its
/// redirected sockets are bound to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodAddrs {
    /// The IPv4 address, network order (valid with [`pod_addrs::V4`]).
    pub v4: [u8; 4],
    /// [`pod_addrs`] bits: which addresses are set.
    pub flags: u32,
    /// The IPv6 address, network order (valid with [`pod_addrs::V6`]).
    pub v6: [u8; 16],
}

/// Bits of [`PodAddrs::flags`].
pub mod pod_addrs {
    /// `v4` is the pod's IPv4 address.
    pub const V4: u32 = 1;
    /// `v6` is the pod's IPv6 address.
    pub const V6: u32 = 2;
}

/// Per-socket storage (`SOCK_STATE`), owned by the socket and freed with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockState {
    /// The original destination.
    pub orig: OrigDst,
    /// [`sock_flags`].
    pub flags: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

// The layout contract, checked where both sides are compiled: sizes, alignments, and the
// offset of every field, so that no implicit padding (whose bytes are not guaranteed zero, and
// would make equal hash-map keys differ) can appear.
const _: () = {
    use core::mem::{align_of, offset_of, size_of};

    assert!(size_of::<IpKey>() == 16);
    assert!(align_of::<IpKey>() == 1);

    assert!(size_of::<OrigDst>() == 24);
    assert!(align_of::<OrigDst>() == 2);
    assert!(offset_of!(OrigDst, ip) == 0);
    assert!(offset_of!(OrigDst, port) == 16);
    assert!(offset_of!(OrigDst, _pad) == 18);

    assert!(size_of::<TupleKey>() == 32);
    assert!(align_of::<TupleKey>() == 8);
    assert!(offset_of!(TupleKey, netns_cookie) == 0);
    assert!(offset_of!(TupleKey, ip) == 8);
    assert!(offset_of!(TupleKey, port) == 24);
    assert!(offset_of!(TupleKey, _pad) == 26);

    assert!(size_of::<PodPortKey>() == 16);
    assert!(align_of::<PodPortKey>() == 8);
    assert!(offset_of!(PodPortKey, netns_cookie) == 0);
    assert!(offset_of!(PodPortKey, port) == 8);
    assert!(offset_of!(PodPortKey, _pad) == 10);

    assert!(size_of::<PendingConnect>() == 32);
    assert!(align_of::<PendingConnect>() == 8);
    assert!(offset_of!(PendingConnect, orig) == 0);
    assert!(offset_of!(PendingConnect, socket_cookie) == 24);

    assert!(size_of::<SplicePeer>() == 24);
    assert!(align_of::<SplicePeer>() == 8);
    assert!(offset_of!(SplicePeer, cookie) == 0);
    assert!(offset_of!(SplicePeer, peer) == 8);
    assert!(offset_of!(SplicePeer, bytes) == 16);

    assert!(size_of::<HopKey>() == 40);
    assert!(align_of::<HopKey>() == 2);
    assert!(offset_of!(HopKey, local) == 0);
    assert!(offset_of!(HopKey, remote) == 16);
    assert!(offset_of!(HopKey, local_port) == 32);
    assert!(offset_of!(HopKey, remote_port) == 34);
    assert!(offset_of!(HopKey, _pad) == 36);

    assert!(size_of::<PodAddrs>() == 24);
    assert!(align_of::<PodAddrs>() == 4);
    assert!(offset_of!(PodAddrs, v4) == 0);
    assert!(offset_of!(PodAddrs, flags) == 4);
    assert!(offset_of!(PodAddrs, v6) == 8);

    assert!(size_of::<SockState>() == 32);
    assert!(align_of::<SockState>() == 4);
    assert!(offset_of!(SockState, orig) == 0);
    assert!(offset_of!(SockState, flags) == 24);
    assert!(offset_of!(SockState, _pad) == 28);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, made only of integers and byte arrays, with every padding byte an
    // explicit field (the layout assertions above check it): no byte is uninitialised and every
    // bit pattern is a valid value, as aya's byte copies to and from the maps require.
    unsafe impl aya::Pod for super::IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingConnect {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SplicePeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodAddrs {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HopKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodPortKey {}
}
