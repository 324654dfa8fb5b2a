//! Types and constants shared by Ambit's eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding: these values are map keys and values,
//! so their byte layout is the contract between kernel and user space, and padding bytes must be
//! zero for hash-map keys to match.
#![no_std]

/// The agent's outbound capture port (ztunnel's): connects are rewritten to 127.0.0.1/::1 here.
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's inbound plaintext capture port inside each enrolled pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The agent's inbound HBONE (mTLS) port inside each enrolled pod.
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// Map names, as pinned under the agent's bpffs directory.
pub mod maps {
    /// Network namespaces (by cookie) whose outbound TCP is redirected.
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// Original destination by socket cookie (read by the getpeername hooks).
    pub const ORIG_DST_SOCK: &str = "ORIG_DST_SOCK";
    /// Original destination by (netns cookie, local address, local port): read by the agent.
    pub const ORIG_DST_TUPLE: &str = "ORIG_DST_TUPLE";
    /// Inbound plaintext listener socket per pod IP (used by sk_lookup).
    pub const POD_LISTENERS: &str = "POD_LISTENERS";
    /// Destination ports never redirected.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// Destination networks never redirected.
    pub const EXCLUDED_NETS: &str = "EXCLUDED_NETS";
    /// Per-CPU event counters (indexes in [`crate::stats`]).
    pub const STATS: &str = "STATS";
    /// Every map the agent pins, for uninstall and occupancy reports.
    pub const PINNED: [&str; 6] = [
        ENROLLED_NETNS,
        ORIG_DST_SOCK,
        ORIG_DST_TUPLE,
        POD_LISTENERS,
        EXCLUDED_PORTS,
        EXCLUDED_NETS,
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
    /// sock_ops: re-key the original destination by the connection's address; clean up on close.
    pub const SOCK_OPS: &str = "ambit_sock_ops";
    /// sk_lookup: steer inbound TCP to the pod's plaintext listener.
    pub const SK_LOOKUP: &str = "ambit_sk_lookup";
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
    /// Failed map updates (the connection is refused instead of bypassing the mesh).
    pub const MAP_FULL: u32 = 3;
    /// Inbound connections steered to a pod's plaintext listener.
    pub const INBOUND_STEERED: u32 = 4;
    /// Inbound connections dropped because the enrolled pod had no listener (agent down).
    pub const INBOUND_NO_LISTENER: u32 = 5;
    /// Number of counters.
    pub const COUNT: u32 = 6;
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

/// Key of `ORIG_DST_TUPLE`: the client socket's namespace and local address, which the agent
/// sees as the peer of the connection it accepted on its outbound listener.
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

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::TupleKey {}
}
