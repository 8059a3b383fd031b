//! Socket-level load balancing for the processes of one cgroup — on a node, the host's
//! network namespace: host-network pods, the kubelet, xlb itself. Their packets to a Service
//! never cross a hook of ours (they leave through the NIC's egress, not its ingress), so the
//! socket is translated instead: `connect()` and an unconnected `sendmsg()` to a frontend are
//! pointed at one of its backends before any packet exists, and no packet needs NAT. What the
//! process reads back as its peer (`getpeername()`, the source of a `recvmsg()`) is the
//! frontend again, as it would be through kube-proxy's NAT. What a connected socket's
//! translation remembered is forgotten when the socket is released ([`release`]), so sockets
//! that come and go by the million never push a long-lived socket's entry out of the map.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockContext},
};
use lb_common::{Event, Scope, SockKey, SockRevNat, hash::flow_hash};

use crate::{
    maps::{SOCK_NETNS, SOCK_REVNAT},
    select, stats,
};

/// What to do with a `connect()`/`sendmsg()` destination.
enum Picked {
    /// Not a frontend (or not the host's socket): leave it.
    Leave,
    /// A frontend without a usable backend: fail the call.
    Deny,
    /// Go to this backend (address, port in network order).
    To(u32, u16),
}

/// Points a `connect()`/`sendmsg()` to a frontend (as pods see Services: the internal scope)
/// at a backend chosen by Maglev on the socket's cookie, so every datagram of an unconnected
/// UDP socket goes to the same backend; remembers the frontend for the reverse direction.
/// A frontend without a usable backend fails the call at once (EPERM), as kube-proxy rejects
/// rather than letting it hang.
#[inline(always)]
fn pick(ctx: &SockAddrContext, addr_be: u32, port_be: u16, proto: u8) -> Picked {
    let sa = ctx.sock_addr;
    // Only the host's sockets: a pod's traffic is translated on its interface (TC), where it
    // is counted and its own address is the client's.
    let host = SOCK_NETNS.get(0).copied().unwrap_or(0);
    // SAFETY: the netns cookie helper takes this context.
    if host != 0 && unsafe { bpf_get_netns_cookie(sa.cast()) } != host {
        return Picked::Leave;
    }
    let Some(fe) = select::frontend_at(addr_be, port_be, proto, Scope::Internal as u8) else {
        return Picked::Leave;
    };
    // SAFETY: the socket cookie helper takes this context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let h = flow_hash(cookie as u32, (cookie >> 32) as u32, 0, port_be, proto);
    let picked = if fe.affinity_timeout_s == 0 {
        select::maglev_pick(&fe, h)
    } else {
        // sessionAffinity: ClientIP. The source address is not chosen yet at connect(); every
        // process of the node shares the node's addresses, so the node is one client (0).
        select::affinity_pick(0, &fe, h, Scope::Internal as u8)
    };
    let Some((_, b)) = picked else {
        stats::event(Event::SockNoBackend);
        return Picked::Deny;
    };
    stats::event(Event::SockTranslated);
    let key = SockKey {
        cookie,
        backend_addr_be: b.addr_be,
        backend_port_be: b.port_be,
        proto,
        _pad: 0,
    };
    let rev = SockRevNat {
        frontend_addr_be: addr_be,
        frontend_port_be: port_be,
        _pad: 0,
    };
    // Best effort: without the entry only the peer address read back differs.
    let _ = SOCK_REVNAT.insert(key, rev, 0);
    Picked::To(b.addr_be, b.port_be)
}

/// The frontend a socket asked for, if [`pick`] pointed it at this backend.
#[inline(always)]
fn unpick(ctx: &SockAddrContext, addr_be: u32, port_be: u16, proto: u8) -> Option<(u32, u16)> {
    // SAFETY: the socket cookie helper takes this context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockKey {
        cookie,
        backend_addr_be: addr_be,
        backend_port_be: port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let rev = (unsafe { SOCK_REVNAT.get(key) }).copied()?;
    Some((rev.frontend_addr_be, rev.frontend_port_be))
}

/// `connect4`/`sendmsg4`: false fails the call.
#[inline(always)]
pub fn translate4(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid bpf_sock_addr; these fields are readable
    // (user_port as a whole 4-byte word, holding the port in network order).
    let (addr_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    match pick(ctx, addr_be, port_be, proto) {
        Picked::Leave => true,
        Picked::Deny => false,
        Picked::To(addr_be, port_be) => {
            // SAFETY: user_ip4 and user_port are writable in connect4 and sendmsg4 programs.
            unsafe {
                (*sa).user_ip4 = addr_be;
                (*sa).user_port = u32::from(port_be);
            }
            true
        }
    }
}

/// The IPv4 address (network order, as `user_ip4` holds it) of an IPv4-mapped IPv6 address
/// `::ffff:a.b.c.d`, given as `user_ip6` holds it.
#[inline(always)]
fn mapped_v4(ip6: [u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
        .then_some(ip6[3])
}

/// `connect6`/`sendmsg6` of dual-stack sockets reaching an IPv4 Service through an
/// IPv4-mapped address (Java's default, among others): false fails the call.
#[inline(always)]
pub fn translate6(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate4`; user_ip6 is read word by word.
    let (ip6, port_be, proto) = unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port as u16,
            (*sa).protocol as u8,
        )
    };
    let Some(addr_be) = mapped_v4(ip6) else {
        return true;
    };
    match pick(ctx, addr_be, port_be, proto) {
        Picked::Leave => true,
        Picked::Deny => false,
        Picked::To(addr_be, port_be) => {
            // SAFETY: user_ip6 and user_port are writable in connect6 and sendmsg6 programs.
            unsafe {
                (*sa).user_ip6[3] = addr_be;
                (*sa).user_port = u32::from(port_be);
            }
            true
        }
    }
}

/// `recvmsg4`/`getpeername4`: reports the frontend as the peer of a socket that
/// [`translate4`] pointed at a backend.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate4`; these fields are readable in recvmsg4 and getpeername4.
    let (addr_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    if let Some((addr_be, port_be)) = unpick(ctx, addr_be, port_be, proto) {
        // SAFETY: user_ip4 and user_port are writable in recvmsg4 and getpeername4 programs.
        unsafe {
            (*sa).user_ip4 = addr_be;
            (*sa).user_port = u32::from(port_be);
        }
    }
}

/// `recvmsg6`/`getpeername6`, for IPv4-mapped peers.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate6`.
    let (ip6, port_be, proto) = unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port as u16,
            (*sa).protocol as u8,
        )
    };
    let Some(addr_be) = mapped_v4(ip6) else {
        return;
    };
    if let Some((addr_be, port_be)) = unpick(ctx, addr_be, port_be, proto) {
        // SAFETY: user_ip6 and user_port are writable in recvmsg6 and getpeername6 programs.
        unsafe {
            (*sa).user_ip6[3] = addr_be;
            (*sa).user_port = u32::from(port_be);
        }
    }
}

/// `sock_release`: forgets what [`pick`] remembered for a connected socket (TCP, or UDP after
/// `connect()`) as its last descriptor closes: the socket is connected to the backend it was
/// pointed at, so its cookie and destination are the entry's key. Without this the entries of
/// closed sockets would fill the map until the LRU evicted live sockets' entries with them.
/// An unconnected UDP socket's entries (one per backend its `sendmsg()` calls went to) have no
/// destination to find them by and are left to the LRU.
#[inline(always)]
pub fn release(ctx: &SockContext) {
    let sk = ctx.sock;
    // SAFETY: the kernel hands a sock_release program a valid bpf_sock; these fields are
    // readable in it (dst_port as the 2-byte network-order field it is since Linux 5.19).
    // Volatile: each load stays a load at a constant offset from the context, as the verifier
    // requires (otherwise LLVM may keep `ctx + off` in a register and load through it later).
    let (family, proto, port_be, ip4, ip6) = unsafe {
        use core::ptr::read_volatile as rd;
        (
            rd(&raw const (*sk).family),
            rd(&raw const (*sk).protocol),
            rd(&raw const (*sk).dst_port),
            rd(&raw const (*sk).dst_ip4),
            [
                rd(&raw const (*sk).dst_ip6[0]),
                rd(&raw const (*sk).dst_ip6[1]),
                rd(&raw const (*sk).dst_ip6[2]),
                rd(&raw const (*sk).dst_ip6[3]),
            ],
        )
    };
    let addr_be = match family {
        AF_INET => ip4,
        AF_INET6 => match mapped_v4(ip6) {
            Some(a) => a,
            None => return,
        },
        _ => return,
    };
    if addr_be == 0 || port_be == 0 {
        return;
    }
    // SAFETY: the socket cookie helper takes a sock_release program's socket.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    let key = SockKey {
        cookie,
        backend_addr_be: addr_be,
        backend_port_be: port_be,
        proto: proto as u8,
        _pad: 0,
    };
    // Most released sockets were never translated: nothing to remove.
    let _ = SOCK_REVNAT.remove(key);
}

/// `AF_INET` and `AF_INET6` as `bpf_sock.family` holds them.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
