//! In-pod policy routing for the transparent inbound hop: what lets the application see the
//! real client's address.
//!
//! The agent connects to an enrolled pod's application from inside the pod, from the client's
//! address (a transparent socket, `IP_TRANSPARENT`), over loopback: the application accepts a
//! connection from the client, as it would without the mesh. Its answers (the SYN-ACK first)
//! would follow the pod's routes to that address, out of `eth0`, and never reach the agent. So
//! the agent marks its socket ([`MARK`]), the pod accepts with `tcp_fwmark_accept=1` (an
//! accepted socket takes the mark of the SYN that opened it, which crosses loopback intact),
//! and one rule per family sends marked packets to a table whose only route delivers
//! everything locally ([`TABLE`]: `local default dev lo`). ztunnel does the same in pod mode
//! with iptables' connmark; Ambit needs no iptables. Nothing else in the pod changes: no other
//! agent socket carries the mark (a pod process with CAP_NET_RAW can set it, which affects only
//! the pod's own traffic, and the agent's listeners carry [`LISTENER_MARK`] so that it cannot
//! pose as another client toward them), and packets from outside arrive unmarked (a mark does
//! not cross namespaces).
//!
//! Installed by enrolment before the pod's listeners are registered; a failure closes the pod
//! as any other enrolment failure does. Un-enrolment leaves it: the pod's open connections
//! through the agent (which un-enrolment spares) still need it for their answers, and it is
//! inert without the agent's marked sockets. Re-enrolment finds it in place (installing is
//! idempotent); it goes with the pod's namespace.
use std::{fs, io, net::IpAddr};

use anyhow::{Context as _, anyhow};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::Netns;

/// The mark of the agent's sockets to applications, and so of the connections they accept
/// (ztunnel's in-pod mark, 1337).
pub const MARK: u32 = 0x539;
/// The mark of the agent's listeners in pods, and so of the connections they accept: any
/// mark but [`MARK`] and 0. With `tcp_fwmark_accept` set, a listener without a mark of its own
/// would give an accepted connection the SYN's mark, and a pod process able to set [`MARK`]
/// and `IP_TRANSPARENT` (CAP_NET_RAW is enough) could then pose as any client toward the
/// agent: its forged SYN's answer would be routed back to it by table [`TABLE`]. Marked so, the
/// answer leaves by the pod's interface for the forged address and the handshake never
/// completes.
pub const LISTENER_MARK: u32 = 0x53a;
/// The in-pod routing table of marked packets (ztunnel's in-pod table).
pub const TABLE: u32 = 100;
/// The rule's priority: before the main table's (32766), as ztunnel's.
pub const PRIORITY: u32 = 32764;

/// The loopback interface's index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// The sysctl that makes accepted sockets take the SYN's mark (one for both families).
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// Installs the rules, routes and sysctl in `netns` (idempotent).
pub fn install(netns: &Netns, ips: &[IpAddr]) -> anyhow::Result<()> {
    let v6 = ips.iter().any(|ip| ip.to_canonical().is_ipv6());
    netns.run(|| -> anyhow::Result<()> {
        // Per namespace: /proc/sys/net resolves against the opening thread's namespace.
        fs::write(FWMARK_ACCEPT, "1").with_context(|| format!("setting {FWMARK_ACCEPT}"))?;
        let socket = open()?;
        for family in families(v6) {
            send(&socket, new_route(family), NLM_F_CREATE | NLM_F_REPLACE).with_context(|| {
                format!("adding `local default dev lo table {TABLE}` ({family:?})")
            })?;
            match send(&socket, new_rule(family), NLM_F_CREATE | NLM_F_EXCL) {
                Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
                other => other.with_context(|| {
                    format!("adding rule `fwmark {MARK:#x} lookup {TABLE}` ({family:?})")
                })?,
            }
        }
        Ok(())
    })?
}

fn families(v6: bool) -> Vec<AddressFamily> {
    if v6 {
        vec![AddressFamily::Inet, AddressFamily::Inet6]
    } else {
        vec![AddressFamily::Inet]
    }
}

/// `fwmark MARK lookup TABLE priority PRIORITY`.
fn rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.action = RuleAction::ToTable;
    rule.header.table = TABLE as u8;
    rule.attributes = vec![
        RuleAttribute::Table(TABLE),
        RuleAttribute::FwMark(MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Priority(PRIORITY),
    ];
    rule
}

fn new_rule(family: AddressFamily) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewRule(rule(family))
}

/// `local default dev lo table TABLE`.
fn route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.table = TABLE as u8;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![
        RouteAttribute::Table(TABLE),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    route
}

fn new_route(family: AddressFamily) -> RouteNetlinkMessage {
    RouteNetlinkMessage::NewRoute(route(family))
}

/// A route netlink socket of the current thread's namespace.
fn open() -> anyhow::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a route netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the netlink socket")?;
    Ok(socket)
}

/// Sends one request and waits for its acknowledgement: the kernel's error, if any.
fn send(socket: &Socket, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut reply = Vec::with_capacity(8192);
    socket.recv(&mut reply, 0)?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|err| io::Error::other(anyhow!("undecodable netlink answer: {err}")))?;
    match answer.payload {
        NetlinkPayload::Error(error) => match error.code {
            None => Ok(()),
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
        },
        other => Err(io::Error::other(format!(
            "unexpected netlink answer: {other:?}"
        ))),
    }
}
