//! Ambit's kernel-side programs.
//!
//! - `cgroup/connect4|6` rewrite TCP connects from sockets in enrolled network namespaces to the
//!   agent's outbound listener on loopback in the same namespace, remembering the original
//!   destination in the socket's own storage (`SOCK_STATE`), which the kernel frees with the
//!   socket: a connect that fails after the hook leaves nothing behind. Connects made by the
//!   agents are recognised by their cgroup, which a pod cannot forge (a socket mark can be set by
//!   any process with CAP_NET_RAW). Connects of a closed pod are refused.
//! - `sock_ops` publishes the destination under the connection's own address when the SYN is
//!   about to leave (`ORIG_DST_TUPLE`), and hands it into the agent's accepted socket's storage
//!   when the agent's side of the handshake completes, removing the entry. The agent reads it
//!   from its socket. So `ORIG_DST_TUPLE` holds only handshakes in flight, at most
//!   `PENDING_CONNECTS_PER_POD` of them per pod, and a socket's close removes only its own entry.
//!   The redirected socket is bound to the pod's own address first (`POD_ADDRS`), so its
//!   `getsockname()` is the pod's address and its real port, as without the mesh.
//! - `cgroup/getpeername4|6` make the application see the address it dialled.
//! - `sk_lookup`, linked to each enrolled pod's network namespace, steers TCP arriving from outside
//!   the pod to the agent's listeners in that namespace (HBONE for 15008, the plaintext listener
//!   for every other port, the proxy's own included), and drops it when there is no listener
//!   (agent down, pod closed): inbound fails closed. Connections from the node's own addresses
//!   (kubelet's probes) reach the application directly, as in Istio ambient.
//! - `sk_skb/stream_verdict` on `SPLICE_SOCKS` splices same-node connections: the agent puts its
//!   two sockets of an authorized connection between two pods of its node (the one it accepted
//!   from the client, the one it opened to the server) in the map, and every chunk either
//!   receives is sent out on the other, counted, without reaching user space.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write in `core::sync::atomic` (no compare-and-swap),
// but the instruction set has an atomic add whose result is unused: the intrinsic reaches it.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// The program entry points that aya's attribute macros generate around each documented
// function carry no docs of their own (a binary: nothing here is a public API).
#![allow(missing_docs)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use ambit_common::{
    HopKey, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, IpKey, OUTBOUND_PORT, OrigDst,
    POD_NET_COOKIE_BITS, PendingConnect, PodAddrs, PodPortKey, SockState, SplicePeer, TupleKey,
    limits, pod_addrs, pod_net_key, pod_state, sock_flags, stats,
};
use aya_ebpf::{
    bindings::{
        BPF_EXIST, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_LOOKUP_F_NO_REUSEPORT,
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
        bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock, sk_action,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        generated::{bpf_bind, bpf_sk_storage_get},
    },
    macros::{btf_map, cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{HashMap, LpmTrie, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

/// libbpf's `LIBBPF_PIN_BY_NAME`: pin the map under the loader's pin directory by its name.
const PIN_BY_NAME: usize = 1;

/// A pinned `BPF_MAP_TYPE_SK_STORAGE` map of `T`, declared the BTF way (socket storage has no
/// legacy definition). The fields are placeholders the loader reads from BTF; never accessed.
#[repr(C)]
pub struct PinnedSkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are null placeholders patched by the loader and never dereferenced.
unsafe impl<T> Sync for PinnedSkStorage<T> {}

impl<T> PinnedSkStorage<T> {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The storage of socket `sk`, created zeroed if `create` and absent.
    ///
    /// # Safety
    /// `sk` must be a socket pointer the verifier accepts for this program type.
    // The value belongs to the socket, not to the map handle borrowed here.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    unsafe fn get(&self, sk: *mut bpf_sock, create: bool) -> Option<&mut T> {
        let flags = if create {
            u64::from(BPF_SK_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        let map = core::ptr::from_ref(self).cast_mut().cast();
        // SAFETY: per the contract above; a null initial value means zero-filled.
        let value = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), flags) };
        // SAFETY: a non-null result points at this socket's value of type T.
        unsafe { value.cast::<T>().as_mut() }
    }
}

#[btf_map]
static SOCK_STATE: PinnedSkStorage<SockState> = PinnedSkStorage::new();

#[map]
static ENROLLED_NETNS: HashMap<u64, u32> = HashMap::pinned(limits::MAX_PODS, 0);
#[map]
static ORIG_DST_TUPLE: HashMap<TupleKey, PendingConnect> =
    HashMap::pinned(limits::MAX_PENDING_CONNECTS, BPF_F_NO_PREALLOC);
#[map]
static PENDING_CONNECTS: HashMap<u64, u64> = HashMap::pinned(limits::MAX_PODS, 0);
#[map]
static POD_LISTENERS: SockHash<IpKey> = SockHash::pinned(limits::MAX_PODS, 0);
#[map]
static HBONE_LISTENERS: SockHash<IpKey> = SockHash::pinned(limits::MAX_PODS, 0);
#[map]
static NODE_ADDRS: HashMap<IpKey, u8> = HashMap::pinned(limits::MAX_NODE_ADDRS, 0);
#[map]
static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(limits::MAX_EXEMPT_CGROUPS, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(limits::MAX_EXCLUSIONS, 0);
#[map]
static EXCLUDED_NETS: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(limits::MAX_EXCLUSIONS, 0);
#[map]
static POD_ADDRS: HashMap<u64, PodAddrs> = HashMap::pinned(limits::MAX_PODS, 0);
// Per-pod capture exclusions: not preallocated (most pods have none).
#[map]
static POD_EXCLUDED_PORTS: HashMap<PodPortKey, u8> =
    HashMap::pinned(limits::MAX_POD_EXCLUSION_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static POD_EXCLUDED_NETS: LpmTrie<[u8; 24], u8> =
    LpmTrie::pinned(limits::MAX_POD_EXCLUSION_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static POD_EXCLUDED_INBOUND: HashMap<OrigDst, u64> =
    HashMap::pinned(limits::MAX_POD_EXCLUSION_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);
// The splice maps are not pinned: they hold the agent's own sockets, which close with it, and
// they die with it, so nothing of a splice outlives the agent that made it.
#[map]
static SPLICE_SOCKS: SockHash<u64> = SockHash::with_max_entries(2 * limits::MAX_SPLICED, 0);
#[map]
static SPLICE_TARGETS: SockHash<u64> = SockHash::with_max_entries(2 * limits::MAX_SPLICED, 0);
// Not preallocated: a preallocated hash map hands a deleted entry to the next insert at once,
// while a verdict on another CPU may still read it; without preallocation the memory is
// reused only once readers are done (an RCU grace period) or, with the kernel's BPF memory
// allocator, for an entry of the same map, which the verdict tells by its own cookie.
// Pinned: during an upgrade the retiring agent still makes hops for the connections it
// serves while its successor's sk_lookup program is already linked, which must see them. An
// entry lives while its connect is in flight (at most the agent's hop timeout).
#[map]
static AGENT_HOPS: HashMap<HopKey, u8> = HashMap::pinned(limits::MAX_AGENT_HOPS, BPF_F_NO_PREALLOC);
#[map]
static SPLICE_PEERS: HashMap<u64, SplicePeer> =
    HashMap::with_max_entries(2 * limits::MAX_SPLICED, BPF_F_NO_PREALLOC);

#[inline(always)]
fn count(index: u32) {
    count_by(index, 1);
}

#[inline(always)]
fn count_by(index: u32, n: u64) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += n };
    }
}

#[inline(always)]
fn ip_from_words(words: [u32; 4]) -> IpKey {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    IpKey { addr }
}

#[inline(always)]
fn words_from_ip(ip: &IpKey) -> [u32; 4] {
    let a = &ip.addr;
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn is_loopback(ip: &IpKey) -> bool {
    if ip.is_v4() {
        ip.addr[12] == 127
    } else {
        ip.addr == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    }
}

/// Whether a connect to `ip:port` from the pod of namespace `netns` is excluded: node-wide
/// (the mesh file's `redirect` section) or by the pod's own exclusions.
#[inline(always)]
fn is_excluded(netns: u64, ip: &IpKey, port: u16) -> bool {
    if EXCLUDED_PORTS.get_ptr(port).is_some() {
        return true;
    }
    if EXCLUDED_NETS.get(Key::new(128, ip.addr)).is_some() {
        return true;
    }
    let key = PodPortKey {
        netns_cookie: netns,
        port,
        _pad: [0; 6],
    };
    if POD_EXCLUDED_PORTS.get_ptr(key).is_some() {
        return true;
    }
    POD_EXCLUDED_NETS
        .get(Key::new(
            POD_NET_COOKIE_BITS + 128,
            pod_net_key(netns, &ip.addr),
        ))
        .is_some()
}

/// What connect4/connect6 do with a connect.
enum Verdict {
    /// Not ours: leave it alone.
    Pass,
    /// From a closed pod: refuse it.
    Refuse,
    /// Rewrite it to the agent.
    Redirect,
}

#[inline(always)]
fn classify(ctx: &SockAddrContext, dst: &IpKey, port: u16) -> Verdict {
    // SAFETY: the verifier guarantees `sock_addr` is valid for this program type.
    let (sock_type, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.type_, sa.protocol)
    };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP || is_loopback(dst) {
        return Verdict::Pass;
    }
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: a hash-map element stays allocated until this program returns (the kernel frees
    // elements after an RCU grace period), and the value is plain data, valid in any bit
    // pattern, read at once; a concurrent update or delete shows the old or the new value.
    let Some(state) = (unsafe { ENROLLED_NETNS.get(netns) }) else {
        return Verdict::Pass;
    };
    // The agent's own connects (made from inside pods' namespaces) are recognised by the
    // calling task's cgroup: a pod cannot put its processes there.
    // SAFETY: helper without arguments, allowed in this program type.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if EXEMPT_CGROUPS.get_ptr(cgroup).is_some() {
        return Verdict::Pass;
    }
    if *state == pod_state::CLOSED {
        count(stats::CLOSED_REFUSED);
        return Verdict::Refuse;
    }
    if is_excluded(netns, dst, port) {
        count(stats::EXCLUDED);
        return Verdict::Pass;
    }
    Verdict::Redirect
}

/// Records the original destination in the socket's own storage. On failure the connect is
/// refused: nothing may bypass the mesh.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: IpKey, port: u16) -> bool {
    // SAFETY: the verifier guarantees `sk` is a valid socket in this program type.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // SAFETY: `sk` comes from the context, as the helper requires.
    let Some(state) = (unsafe { SOCK_STATE.get(sk, true) }) else {
        count(stats::MAP_FULL);
        warn!(ctx, "ambit: no socket storage, refusing connect");
        return false;
    };
    state.orig = OrigDst {
        ip: dst,
        port,
        _pad: [0; 6],
    };
    state.flags = sock_flags::REDIRECTED;
    true
}

/// `struct sockaddr_in`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    /// Network order.
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// `struct sockaddr_in6`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    /// Network order.
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

/// Binds a redirected socket to its pod's own address of the family it dials (`v4`: an IPv4
/// destination, also from a dual-stack IPv6 socket, which gets the IPv4-mapped form), port 0,
/// so the kernel picks the port when it connects, as it would have. The connect then goes from
/// the pod's address to the agent on loopback, and the application's `getsockname()` is what
/// it would be without the mesh: the pod's address and the socket's real port. A socket the
/// application bound itself (the bind fails) or a pod without an address of that family keeps
/// what it has; counted, never refused.
#[inline(always)]
fn bind_to_pod(ctx: &SockAddrContext, v4: bool, v6_socket: bool) {
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: a hash-map element stays allocated until this program returns, and the value is
    // plain data, valid in any bit pattern, copied at once.
    let Some(addrs) = (unsafe { POD_ADDRS.get(netns) }).copied() else {
        count(stats::SOURCE_NOT_BOUND);
        return;
    };
    let rc = if v4 && addrs.flags & pod_addrs::V4 != 0 {
        if v6_socket {
            let [a, b, c, d] = addrs.v4;
            let mut sa = SockaddrIn6 {
                family: AF_INET6 as u16,
                port: 0,
                flowinfo: 0,
                addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
                scope_id: 0,
            };
            // SAFETY: the helper reads `addr_len` bytes of the live local `sa`.
            unsafe {
                bpf_bind(
                    ctx.sock_addr,
                    core::ptr::from_mut(&mut sa).cast(),
                    size_of::<SockaddrIn6>() as i32,
                )
            }
        } else {
            let mut sa = SockaddrIn {
                family: AF_INET as u16,
                port: 0,
                addr: addrs.v4,
                zero: [0; 8],
            };
            // SAFETY: the helper reads `addr_len` bytes of the live local `sa`.
            unsafe {
                bpf_bind(
                    ctx.sock_addr,
                    core::ptr::from_mut(&mut sa).cast(),
                    size_of::<SockaddrIn>() as i32,
                )
            }
        }
    } else if !v4 && v6_socket && addrs.flags & pod_addrs::V6 != 0 {
        let mut sa = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: 0,
            flowinfo: 0,
            addr: addrs.v6,
            scope_id: 0,
        };
        // SAFETY: the helper reads `addr_len` bytes of the live local `sa`.
        unsafe {
            bpf_bind(
                ctx.sock_addr,
                core::ptr::from_mut(&mut sa).cast(),
                size_of::<SockaddrIn6>() as i32,
            )
        }
    } else {
        -1
    };
    if rc != 0 {
        count(stats::SOURCE_NOT_BOUND);
    }
}

/// cgroup/connect4: rewrites an enrolled pod's IPv4 TCP connects to the agent's outbound port.
#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands this program its own `bpf_sock_addr`, valid and not aliased
    // for the program's run; the verifier checks each field access against the program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = IpKey::v4(sa.user_ip4.to_ne_bytes());
    let port = u16::from_be(sa.user_port as u16);
    match classify(&ctx, &dst, port) {
        Verdict::Pass => return ALLOW,
        Verdict::Refuse => return REJECT,
        Verdict::Redirect => {}
    }
    if !remember(&ctx, dst, port) {
        return REJECT;
    }
    bind_to_pod(&ctx, true, false);
    // SAFETY: as above; re-borrowed after the helper call, which does not touch these fields.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(stats::REDIRECTED4);
    ALLOW
}

/// cgroup/connect6: rewrites an enrolled pod's IPv6 TCP connects to the agent's outbound port.
#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands this program its own `bpf_sock_addr`, valid and not aliased
    // for the program's run; the verifier checks each field access against the program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = ip_from_words(sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    match classify(&ctx, &dst, port) {
        Verdict::Pass => return ALLOW,
        Verdict::Refuse => return REJECT,
        Verdict::Redirect => {}
    }
    if !remember(&ctx, dst, port) {
        return REJECT;
    }
    bind_to_pod(&ctx, dst.is_v4(), true);
    // SAFETY: as above; re-borrowed after the helper call, which does not touch these fields.
    let sa = unsafe { &mut *ctx.sock_addr };
    // A dual-stack socket dialling an IPv4-mapped address must stay IPv4.
    let target = if dst.is_v4() {
        IpKey::v4([127, 0, 0, 1])
    } else {
        IpKey {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        }
    };
    sa.user_ip6 = words_from_ip(&target);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(stats::REDIRECTED6);
    ALLOW
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: the verifier guarantees `sk` is a valid socket in this program type.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // SAFETY: `sk` comes from the context, as the helper requires.
    let Some(state) = (unsafe { SOCK_STATE.get(sk, false) }) else {
        return ALLOW;
    };
    if state.flags & sock_flags::REDIRECTED == 0 {
        return ALLOW;
    }
    let orig = state.orig;
    // SAFETY: the kernel hands this program its own `bpf_sock_addr`, valid and not aliased
    // for the program's run; the verifier checks each field access against the program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    if v6 {
        sa.user_ip6 = words_from_ip(&orig.ip);
    } else {
        let a = &orig.ip.addr;
        sa.user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    }
    sa.user_port = u32::from(orig.port.to_be());
    ALLOW
}

/// cgroup/getpeername4: reports a redirected socket's original IPv4 destination as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn ambit_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false)
}

/// cgroup/getpeername6: reports a redirected socket's original IPv6 destination as its peer.
#[cgroup_sock_addr(getpeername6)]
pub fn ambit_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true)
}

/// The sock_ops context fields a callback needs, read up front.
struct Ops {
    local: IpKey,
    remote: IpKey,
    /// Host byte order.
    local_port: u16,
    /// Host byte order.
    remote_port: u16,
    sk: *mut bpf_sock,
}

#[inline(always)]
fn read_ops(ctx: &SockOpsContext) -> Option<Ops> {
    // Read every context field up front with volatile loads at fixed offsets: the verifier
    // rejects context loads through a pointer the compiler offset and carried across branches.
    // SAFETY: the kernel hands this program a valid `bpf_sock_ops` for its run; the reads
    // are at the fixed field offsets the verifier allows for sock_ops.
    let (family, local4, remote4, local6, remote6, local_port, remote_port, sk) = unsafe {
        let ops = ctx.ops;
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            core::ptr::read_volatile(&raw const (*ops).remote_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&raw const (*ops).local_port),
            core::ptr::read_volatile(&raw const (*ops).remote_port),
            core::ptr::read_volatile(&raw const (*ops).__bindgen_anon_2.sk),
        )
    };
    let (local, remote) = match family {
        AF_INET => (
            IpKey::v4(local4.to_ne_bytes()),
            IpKey::v4(remote4.to_ne_bytes()),
        ),
        AF_INET6 => (ip_from_words(local6), ip_from_words(remote6)),
        _ => return None,
    };
    if sk.is_null() {
        return None;
    }
    Some(Ops {
        local,
        remote,
        // sock_ops gives the local port in host order, the remote one in network order in the
        // upper 16 bits on little-endian machines.
        local_port: local_port as u16,
        remote_port: u16::from_be((remote_port >> 16) as u16),
        sk,
    })
}

/// sock_ops: hands the original destination from the client's socket to the agent's.
#[sock_ops]
pub fn ambit_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_accepted(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// The pod's count of entries in `ORIG_DST_TUPLE`, created at zero on first use.
#[inline(always)]
fn pending_counter(netns: u64) -> Option<*mut u64> {
    if PENDING_CONNECTS.get_ptr(netns).is_none() {
        // Racing creators: whichever insert wins, both then use the same slot.
        let _ = PENDING_CONNECTS.insert(netns, 0, u64::from(BPF_NOEXIST));
    }
    PENDING_CONNECTS.get_ptr_mut(netns)
}

/// Adds `delta` (two's complement for a decrement) to a counter atomically.
#[inline(always)]
fn counter_add(counter: *mut u64, delta: u64) {
    // SAFETY: `counter` is a live, 8-aligned map value of u64, only ever changed atomically;
    // the result is unused, which the BPF atomic add instruction requires.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta);
    }
}

#[inline(always)]
fn pending_done(netns: u64) {
    if let Some(counter) = PENDING_CONNECTS.get_ptr_mut(netns) {
        // Never below zero, even if the agent reset the counter meanwhile.
        // SAFETY: a live map value, read once.
        if unsafe { core::ptr::read_volatile(counter) } > 0 {
            counter_add(counter, u64::MAX);
        }
    }
}

/// The client's SYN is about to leave: publish where it was going under its own address.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let Some(ops) = read_ops(ctx) else {
        return;
    };
    // SAFETY: `sk` comes from the context, as the helper requires.
    let Some(state) = (unsafe { SOCK_STATE.get(ops.sk, false) }) else {
        return;
    };
    if state.flags & sock_flags::REDIRECTED == 0 {
        return;
    }
    // Ask for state callbacks first, so the close path runs whatever happens next.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: as above.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let key = TupleKey {
        netns_cookie,
        ip: ops.local,
        port: ops.local_port,
        _pad: [0; 6],
    };
    let value = PendingConnect {
        orig: state.orig,
        socket_cookie,
    };
    // An entry left under the same address (a closing socket whose port this one reuses) is
    // taken over, not counted twice.
    if ORIG_DST_TUPLE
        .insert(key, value, u64::from(BPF_EXIST))
        .is_ok()
    {
        state.flags |= sock_flags::PENDING;
        return;
    }
    let Some(counter) = pending_counter(netns_cookie) else {
        count(stats::MAP_FULL);
        return;
    };
    // SAFETY: a live map value, read once.
    if unsafe { core::ptr::read_volatile(counter) } >= limits::PENDING_CONNECTS_PER_POD {
        // This pod holds its share: its connection will find no destination and be closed by
        // the agent. Other pods are unaffected.
        count(stats::POD_QUOTA);
        return;
    }
    if ORIG_DST_TUPLE
        .insert(key, value, u64::from(BPF_NOEXIST))
        .is_err()
    {
        count(stats::MAP_FULL);
        warn!(ctx, "ambit: ORIG_DST_TUPLE full");
        return;
    }
    counter_add(counter, 1);
    state.flags |= sock_flags::PENDING;
}

/// The agent's side of a redirected connection completed its handshake: move the original
/// destination into the agent's socket, where the agent reads it, and free the entry.
#[inline(always)]
fn on_accepted(ctx: &SockOpsContext) {
    let Some(ops) = read_ops(ctx) else {
        return;
    };
    if ops.local_port != OUTBOUND_PORT || !is_loopback(&ops.local) {
        return;
    }
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let key = TupleKey {
        netns_cookie,
        ip: ops.remote,
        port: ops.remote_port,
        _pad: [0; 6],
    };
    // SAFETY: a hash-map element stays allocated until this program returns (the kernel frees
    // elements after an RCU grace period), and the value is plain data, valid in any bit
    // pattern, read at once; a concurrent update or delete shows the old or the new value.
    let Some(pending) = (unsafe { ORIG_DST_TUPLE.get(key) }) else {
        return;
    };
    let orig = pending.orig;
    // SAFETY: `sk` comes from the context, as the helper requires.
    match unsafe { SOCK_STATE.get(ops.sk, true) } {
        Some(state) => {
            state.orig = orig;
            state.flags = sock_flags::ACCEPTED;
        }
        None => count(stats::MAP_FULL),
    }
    // Whoever deletes the entry (this, or the client's close) releases the pod's count.
    if ORIG_DST_TUPLE.remove(key).is_ok() {
        pending_done(netns_cookie);
    }
}

/// A socket closed: a client whose handshake never reached the agent removes its own entry.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let Some(ops) = read_ops(ctx) else {
        return;
    };
    // SAFETY: `sk` comes from the context, as the helper requires.
    let Some(state) = (unsafe { SOCK_STATE.get(ops.sk, false) }) else {
        return;
    };
    if state.flags & sock_flags::PENDING == 0 {
        return;
    }
    state.flags &= !sock_flags::PENDING;
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: as above.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let key = TupleKey {
        netns_cookie,
        ip: ops.local,
        port: ops.local_port,
        _pad: [0; 6],
    };
    // SAFETY: a hash-map element stays allocated until this program returns (the kernel frees
    // elements after an RCU grace period), and the value is plain data, valid in any bit
    // pattern, read at once; a concurrent update or delete shows the old or the new value.
    let Some(pending) = (unsafe { ORIG_DST_TUPLE.get(key) }) else {
        return;
    };
    // Only our own entry: a newer socket may already use this address and port.
    if pending.socket_cookie == socket_cookie && ORIG_DST_TUPLE.remove(key).is_ok() {
        pending_done(netns_cookie);
    }
}

/// sk_lookup: steers inbound TCP to an enrolled pod's listeners.
#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands this program a valid `bpf_sk_lookup` for its run, read only.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let port = lookup.local_port as u16;
    let (local, remote) = match lookup.family {
        AF_INET => (
            IpKey::v4(lookup.local_ip4.to_ne_bytes()),
            IpKey::v4(lookup.remote_ip4.to_ne_bytes()),
        ),
        AF_INET6 => (
            ip_from_words(lookup.local_ip6),
            ip_from_words(lookup.remote_ip6),
        ),
        _ => return sk_action::SK_PASS,
    };
    // A pod talking to itself is not inbound traffic.
    if local == remote || is_loopback(&remote) || is_loopback(&local) {
        return sk_action::SK_PASS;
    }
    // Nor is the agent's own hop to the application, made inside the pod from the client's
    // address (a transparent socket) over loopback: the agent registers its exact 4-tuple
    // while it connects. (Its ingress interface cannot tell it apart: the kernel reports the
    // device that owns the pod's address for locally delivered packets too.)
    let hop = HopKey {
        local,
        remote,
        local_port: port,
        remote_port: u16::from_be(lookup.remote_port),
        _pad: [0; 4],
    };
    if AGENT_HOPS.get_ptr(hop).is_some() {
        return sk_action::SK_PASS;
    }
    // HBONE goes to the agent's HBONE listener and nowhere else: an application listening on
    // 15008 itself is never reached from outside.
    if port == INBOUND_HBONE_PORT {
        return steer(&ctx, &HBONE_LISTENERS, local);
    }
    // The node's own addresses (kubelet's probes) reach the application directly, as in Istio
    // ambient, except on the proxy's ports, which belong to the agent.
    if port != OUTBOUND_PORT
        && port != INBOUND_PLAINTEXT_PORT
        && NODE_ADDRS.get_ptr(remote).is_some()
    {
        count(stats::INBOUND_FROM_NODE);
        return sk_action::SK_PASS;
    }
    // The pod's own excluded inbound ports reach the application directly, unmeshed (never
    // the proxy's ports: validation refuses them, and they are checked here again). Keyed by
    // the pod's address: sk_lookup cannot read its namespace's cookie.
    if port != OUTBOUND_PORT && port != INBOUND_PLAINTEXT_PORT {
        let key = OrigDst {
            ip: local,
            port,
            _pad: [0; 6],
        };
        if POD_EXCLUDED_INBOUND.get_ptr(key).is_some() {
            count(stats::INBOUND_EXCLUDED);
            return sk_action::SK_PASS;
        }
    }
    // Everything else, the proxy's own plaintext ports included, goes to the plaintext
    // listener, which applies peer authentication and policy (and refuses the proxy's ports).
    steer(&ctx, &POD_LISTENERS, local)
}

#[inline(always)]
fn steer(ctx: &SkLookupContext, listeners: &SockHash<IpKey>, local: IpKey) -> u32 {
    // The very socket registered, never another of its SO_REUSEPORT group: the agent's
    // listeners share the port with a successor's (crate handover), and a root process in the
    // pod could join that group with its own listener and take the steered traffic.
    match listeners.redirect_sk_lookup(ctx, local, u64::from(BPF_SK_LOOKUP_F_NO_REUSEPORT)) {
        Ok(()) => {
            count(stats::INBOUND_STEERED);
            sk_action::SK_PASS
        }
        Err(_) => {
            // This program is linked only to enrolled pods' namespaces: no listener means the
            // agent is gone or the pod is closed, and the application must not be reached
            // around it.
            count(stats::INBOUND_NO_LISTENER);
            sk_action::SK_DROP
        }
    }
}

/// sk_skb/stream_verdict, attached to `SPLICE_SOCKS`: a chunk received on a spliced socket is
/// sent out on its peer (egress redirect), and its length added to the socket's count.
///
/// The agent inserts a connection's two sockets in `SPLICE_TARGETS` first, then in
/// `SPLICE_SOCKS` (where this program starts to see their bytes), so a peer is always a target
/// by the time a chunk is forwarded to it. A chunk whose peer is gone is dropped: the agent
/// closes such a connection. A socket without an entry in `SPLICE_PEERS` never happens while
/// the agent runs; its bytes are passed to the socket's own queue (the agent closes it). A FIN
/// is not forwarded: the agent shuts the peer down once it has sent every byte before it.
///
/// The entry may be deleted (its connection closing) while this runs, and its memory given to
/// another socket's entry: the entry names its own socket, checked before and after the peer
/// is read, and a chunk whose entry names another socket is dropped, never sent to that
/// socket's peer.
#[stream_verdict]
pub fn ambit_splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context's skb is valid for the program's run; the helper is allowed here.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(pair) = SPLICE_PEERS.get_ptr_mut(cookie) else {
        count(stats::SPLICE_UNPAIRED);
        return sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A FIN without data. Sent on the peer, an empty chunk counts as a broken pipe there;
        // the agent passes the half-close on itself, after the bytes before it.
        return sk_action::SK_DROP;
    }
    // SAFETY: map memory stays valid while this program runs (RCU read side); its contents
    // may change under us if the entry is recycled, which the cookie checks catch.
    let (owner, mut peer, still) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*pair).cookie),
            core::ptr::read_volatile(&raw const (*pair).peer),
            core::ptr::read_volatile(&raw const (*pair).cookie),
        )
    };
    if owner != cookie || still != cookie {
        // The entry was deleted and reused for another socket: this connection is closing.
        count(stats::SPLICE_UNPAIRED);
        return sk_action::SK_DROP;
    }
    let verdict = SPLICE_TARGETS.redirect_skb(&ctx, &mut peer, 0);
    if verdict == i64::from(sk_action::SK_PASS) {
        // SAFETY: as above; the count is only ever changed atomically.
        counter_add(unsafe { &raw mut (*pair).bytes }, len);
        count_by(stats::SPLICED_BYTES, len);
    } else {
        count(stats::SPLICE_NO_TARGET);
    }
    verdict as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
