//! Socket-level load balancing for the processes of one cgroup — on a node, the host's
//! network namespace: host-network pods, the kubelet, xlb itself. Their packets to a Service
//! never cross a hook of ours (they leave through the NIC's egress, not its ingress), so the
//! socket is translated instead: `connect()` and an unconnected `sendmsg()` to a frontend are
//! pointed at one of its backends before any packet exists, and no packet needs NAT. What the
//! process reads back as its peer (`getpeername()`, the source of a `recvmsg()`) is the
//! frontend again, as it would be through kube-proxy's NAT.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use lb_common::{Event, Scope, SockKey, SockRevNat, hash::flow_hash};

use crate::{
    maps::{SOCK_NETNS, SOCK_REVNAT},
    select, stats,
};

/// Points a `connect()`/`sendmsg()` to a frontend (as pods see Services: the internal scope)
/// at a backend chosen by Maglev on the socket's cookie, so every datagram of an unconnected
/// UDP socket goes to the same backend; remembers the frontend for the reverse direction.
/// Anything else is left as it is. Returns false for a frontend without a usable backend:
/// the call then fails at once (EPERM), as kube-proxy rejects rather than letting it hang.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    // Only the host's sockets: a pod's traffic is translated on its interface (TC), where it
    // is counted and its own address is the client's.
    let host = SOCK_NETNS.get(0).copied().unwrap_or(0);
    // SAFETY: the netns cookie helper takes this context.
    if host != 0 && unsafe { bpf_get_netns_cookie(sa.cast()) } != host {
        return true;
    }
    // SAFETY: the kernel hands the program a valid bpf_sock_addr; these fields are readable
    // (user_port as a whole 4-byte word, holding the port in network order).
    let (addr_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let Some(fe) = select::frontend_at(addr_be, port_be, proto, Scope::Internal as u8) else {
        return true;
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
        return false;
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
    // SAFETY: user_ip4 and user_port are writable in connect4 and sendmsg4 programs.
    unsafe {
        (*sa).user_ip4 = b.addr_be;
        (*sa).user_port = u32::from(b.port_be);
    }
    true
}

/// Reports the frontend as the peer of a socket that [`translate`] pointed at a backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate`; these fields are readable in recvmsg4 and getpeername4.
    let (addr_be, port_be, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    // SAFETY: the socket cookie helper takes this context.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = SockKey {
        cookie,
        backend_addr_be: addr_be,
        backend_port_be: port_be,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(rev) = (unsafe { SOCK_REVNAT.get(key) }).copied() else {
        return;
    };
    // SAFETY: user_ip4 and user_port are writable in recvmsg4 and getpeername4 programs.
    unsafe {
        (*sa).user_ip4 = rev.frontend_addr_be;
        (*sa).user_port = u32::from(rev.frontend_port_be);
    }
}
