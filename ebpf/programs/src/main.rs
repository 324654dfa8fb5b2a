//! Ambit's kernel-side programs.
//!
//! - `cgroup/connect4|6` rewrite TCP connects from sockets in enrolled network namespaces to the
//!   agent's outbound listener on loopback in the same namespace, remembering the original
//!   destination by socket cookie.
//! - `sock_ops` re-keys that destination by the connection's own address when the SYN is about to
//!   leave (so the agent can look it up from the peer address of the socket it accepts, without
//!   racing), and removes both entries when the socket closes, so the maps track live sockets only.
//! - `cgroup/getpeername4|6` make the application see the address it dialled.
//! - `sk_lookup`, linked to each enrolled pod's network namespace, steers TCP arriving from outside
//!   the pod to the agent's inbound listener in that namespace, and drops it when the listener is
//!   gone (agent down): inbound fails closed.
#![no_std]
#![no_main]

use ambit_common::{
    INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, IpKey, OUTBOUND_PORT, OrigDst, TupleKey, stats,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, sk_action,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LpmTrie, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

/// Socket mark of the agent's own sockets; set by the loader.
#[unsafe(no_mangle)]
static AGENT_MARK: u32 = 0x539;

#[map]
static ENROLLED_NETNS: HashMap<u64, u32> = HashMap::pinned(16_384, 0);
#[map]
static ORIG_DST_SOCK: HashMap<u64, OrigDst> = HashMap::pinned(65_536, 0);
#[map]
static ORIG_DST_TUPLE: HashMap<TupleKey, OrigDst> = HashMap::pinned(65_536, 0);
#[map]
static POD_LISTENERS: SockHash<IpKey> = SockHash::pinned(16_384, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(1_024, 0);
#[map]
static EXCLUDED_NETS: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(1_024, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn agent_mark() -> u32 {
    // SAFETY: read of a loader-initialised global; volatile so the compiler keeps the load.
    unsafe { core::ptr::read_volatile(&AGENT_MARK) }
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

#[inline(always)]
fn is_excluded(ip: &IpKey, port: u16) -> bool {
    if EXCLUDED_PORTS.get_ptr(port).is_some() {
        return true;
    }
    EXCLUDED_NETS.get(Key::new(128, ip.addr)).is_some()
}

/// The shared decision of connect4/connect6: `Some(dst)` when this connect must go to the agent.
#[inline(always)]
fn should_redirect(ctx: &SockAddrContext, dst: IpKey, port: u16) -> bool {
    // SAFETY: the verifier guarantees `sock_addr` and its `sk` are valid for this program type.
    let (sock_type, protocol, mark) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.type_, sa.protocol, (*sa.__bindgen_anon_1.sk).mark)
    };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP || mark == agent_mark() {
        return false;
    }
    if is_loopback(&dst) {
        return false;
    }
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if ENROLLED_NETNS.get_ptr(netns).is_none() {
        return false;
    }
    if is_excluded(&dst, port) {
        count(stats::EXCLUDED);
        return false;
    }
    true
}

/// Records the original destination under the socket's cookie. On failure the connect is
/// rejected: a full map must never turn into traffic that silently bypasses the mesh.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: IpKey, port: u16) -> bool {
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let value = OrigDst {
        ip: dst,
        port,
        _pad: [0; 6],
    };
    if ORIG_DST_SOCK.insert(cookie, value, 0).is_err() {
        count(stats::MAP_FULL);
        warn!(ctx, "ambit: ORIG_DST_SOCK full, refusing connect");
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context for this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = IpKey::v4(sa.user_ip4.to_ne_bytes());
    let port = u16::from_be(sa.user_port as u16);
    if !should_redirect(&ctx, dst, port) {
        return ALLOW;
    }
    if !remember(&ctx, dst, port) {
        return REJECT;
    }
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(stats::REDIRECTED4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context for this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = ip_from_words(sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    if !should_redirect(&ctx, dst, port) {
        return ALLOW;
    }
    if !remember(&ctx, dst, port) {
        return REJECT;
    }
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
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: map value is plain data.
    let Some(orig) = (unsafe { ORIG_DST_SOCK.get(cookie) }) else {
        return ALLOW;
    };
    // SAFETY: valid context for this program type.
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

#[cgroup_sock_addr(getpeername4)]
pub fn ambit_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ambit_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true)
}

#[inline(always)]
fn local_tuple(ctx: &SockOpsContext) -> Option<TupleKey> {
    // Read every context field up front with volatile loads at fixed offsets: the verifier
    // rejects context loads through a pointer the compiler offset and carried across branches.
    // SAFETY: valid context for this program type.
    let (family, ip4, ip6, port) = unsafe {
        let ops = ctx.ops;
        (
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    let ip = match family {
        AF_INET => IpKey::v4(ip4.to_ne_bytes()),
        AF_INET6 => ip_from_words(ip6),
        _ => return None,
    };
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    Some(TupleKey {
        netns_cookie,
        ip,
        port: port as u16,
        _pad: [0; 6],
    })
}

#[sock_ops]
pub fn ambit_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: map value is plain data.
    let Some(orig) = (unsafe { ORIG_DST_SOCK.get(cookie) }) else {
        return;
    };
    let orig = *orig;
    let Some(key) = local_tuple(ctx) else {
        return;
    };
    // Ask for state callbacks first, so the close path cleans both maps whatever happens next.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if ORIG_DST_TUPLE.insert(key, orig, 0).is_err() {
        count(stats::MAP_FULL);
        warn!(ctx, "ambit: ORIG_DST_TUPLE full");
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: valid context pointer for a helper allowed in this program type.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if ORIG_DST_SOCK.remove(cookie).is_err() {
        return;
    }
    if let Some(key) = local_tuple(ctx) {
        let _ = ORIG_DST_TUPLE.remove(key);
    }
}

#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: valid context for this program type.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let port = lookup.local_port as u16;
    if port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == INBOUND_HBONE_PORT {
        return sk_action::SK_PASS;
    }
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
    // A pod talking to itself, and the agent's own hop from the listener to the application
    // (made from the pod's address to the pod's address), are not inbound traffic.
    if local == remote || is_loopback(&remote) || is_loopback(&local) {
        return sk_action::SK_PASS;
    }
    match POD_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            count(stats::INBOUND_STEERED);
            sk_action::SK_PASS
        }
        Err(_) => {
            // This program is linked only to enrolled pods' namespaces: no listener means the
            // agent is gone, and the application must not be reached around it.
            count(stats::INBOUND_NO_LISTENER);
            sk_action::SK_DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
