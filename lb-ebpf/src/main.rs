//! xlb's datapath: XDP on node NICs and TC on pod interfaces. Entry points and the per-hook
//! flow live here; parsing, selection, conntrack, rewriting and routing live in the modules.
//! Every outcome is a typed `Verdict` counted per CPU; nothing is logged per packet.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `atomic_cxchg`: the flow table's bucket lock (BPF_CMPXCHG); core's atomic types have no
// compare-and-swap on this target.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![expect(
    clippy::needless_pass_by_value,
    reason = "entry points take their context by value"
)]

mod conntrack;
mod fib;
mod flows;
mod maps;
mod nat;
mod parse;
mod routing;
mod select;
mod seqlock;
mod snat;
mod sock;
mod stats;

use aya_ebpf::macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use lb_common::{PROG_INDEX_NIC_NEW, PROG_INDEX_POD_NEW, Scope, Verdict};

use crate::{
    fib::Lookup,
    maps::{NIC_PROGRAMS, POD_PROGRAMS},
    parse::Flow,
    select::{Forward, Hook, Reverse, Tracked},
};

/// Node NICs: service traffic entering the node, and replies of SNATed flows. A packet that
/// starts a flow to a frontend goes on to `xlb_nic_new` (a tail call).
#[xdp]
pub fn xlb_nic(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (verdict, action) = nic(&ctx);
    stats::count(verdict, bytes);
    action
}

#[inline(always)]
fn nic(ctx: &XdpContext) -> (Verdict, u32) {
    let f = match parse::ipv4_flow(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data()) {
        Ok(f) => f,
        Err(v) => return (v, xdp_action::XDP_PASS),
    };
    let key = conntrack::flow_key(&f);
    let cfg = select::config();
    let to_node = select::is_node_addr(cfg, f.dst_be);
    // Replies of SNATed flows first: they are half of those flows' packets, and the SNAT
    // table finds them with one bucket read (no frontend takes their ports).
    if select::may_be_snat_reply(&f, to_node, cfg)
        && let Some(rev) = select::snat_reply(&f, &key, cfg)
    {
        return nic_reply(ctx, &f, rev);
    }
    match select::tracked(&key, f.tcp_flags, !to_node, cfg) {
        Tracked::Forward(fwd) => {
            if f.ttl <= 1 {
                return (Verdict::PassTtl, xdp_action::XDP_PASS);
            }
            nic_forward(ctx, &f, &fwd)
        }
        Tracked::Reply(rev) => nic_reply(ctx, &f, rev),
        Tracked::Untracked => {
            if select::frontend(&f, Scope::External as u8).is_none() {
                return (Verdict::PassNotService, xdp_action::XDP_PASS);
            }
            if f.ttl <= 1 {
                // Let the kernel answer with ICMP time exceeded.
                return (Verdict::PassTtl, xdp_action::XDP_PASS);
            }
            // The new-flow program counts the packet itself; this one only if it never ran.
            // SAFETY: a tail call with the program's own context.
            unsafe { NIC_PROGRAMS.tail_call(ctx, PROG_INDEX_NIC_NEW) };
            (Verdict::DropNoProgram, xdp_action::XDP_DROP)
        }
    }
}

/// A packet that `xlb_nic` found to start a flow to a frontend (a tail call): a backend is
/// picked and recorded, and the packet sent on.
#[xdp]
pub fn xlb_nic_new(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (verdict, action) = nic_new(&ctx);
    stats::count(verdict, bytes);
    action
}

#[inline(always)]
fn nic_new(ctx: &XdpContext) -> (Verdict, u32) {
    let f = match parse::ipv4_flow(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data()) {
        Ok(f) => f,
        Err(v) => return (v, xdp_action::XDP_PASS),
    };
    // Looked up again rather than handed over: this may be a newer agent's program than the
    // caller (see `PROG_INDEX_NIC_NEW`).
    let Some(fe) = select::frontend(&f, Scope::External as u8) else {
        return (Verdict::PassNotService, xdp_action::XDP_PASS);
    };
    let key = conntrack::flow_key(&f);
    match select::new_flow(&f, &key, &fe, Hook::Nic, select::config()) {
        Ok(fwd) => nic_forward(ctx, &f, &fwd),
        Err(v) => (v, xdp_action::XDP_DROP),
    }
}

/// A client's packet of a flow at the NIC, to its backend: DNAT to a local backend (the
/// kernel delivers it, or BPF host routing does), or DNAT and SNAT to a remote one, sent from
/// XDP.
#[inline(always)]
fn nic_forward(ctx: &XdpContext, f: &Flow, fwd: &Forward) -> (Verdict, u32) {
    stats::count_service(fwd.service_id, (ctx.data_end() - ctx.data()) as u64);
    let dst = Some((fwd.backend.addr_be, fwd.backend.port_be));
    match fwd.snat() {
        None => {
            if nat::xdp_rewrite(ctx.data(), ctx.data_end(), f, None, dst, false) {
                (fwd.verdict, routing::to_local_pod(ctx))
            } else {
                (Verdict::PassMalformed, xdp_action::XDP_PASS)
            }
        }
        Some(src) => {
            let (v, action) =
                nic_transmit(ctx, f, Some(src), dst, Some((fwd.backend_id, fwd.now_s)));
            // Sent (`snat_tx`), or handed to the kernel to resolve the neighbour: the flow's
            // own verdict; a drop keeps its reason.
            let v = match v {
                Verdict::NatNew => fwd.verdict,
                v => v,
            };
            (v, action)
        }
    }
}

/// A reply of a translated flow at the NIC.
#[inline(always)]
fn nic_reply(ctx: &XdpContext, f: &Flow, rev: Reverse) -> (Verdict, u32) {
    let Reverse {
        src,
        dst,
        service_id,
    } = rev;
    stats::count_service(service_id, (ctx.data_end() - ctx.data()) as u64);
    if dst.is_none() {
        // Reply to a client on this node (a pod): the kernel delivers it (or BPF host routing).
        if nat::xdp_rewrite(ctx.data(), ctx.data_end(), f, Some(src), None, false) {
            return (Verdict::ReverseNat, routing::to_local_pod(ctx));
        }
        return (Verdict::PassMalformed, xdp_action::XDP_PASS);
    }
    let (v, action) = nic_transmit(ctx, f, Some(src), dst, None);
    let v = match v {
        Verdict::SnatTx | Verdict::NatNew => Verdict::ReverseNat,
        v => v,
    };
    (v, action)
}

/// Rewrites a frame that this node must send on (SNATed flows and their replies; with
/// `backend` (its id and the packet's second), a packet to that backend, routed through its cached route) and transmits it
/// from XDP. Without a resolved neighbour the translated frame goes to the kernel, which
/// resolves it and forwards (the agent enables `accept_local` on NICs for this).
#[inline(always)]
fn nic_transmit(
    ctx: &XdpContext,
    f: &Flow,
    src: Option<nat::Endpoint>,
    dst: Option<nat::Endpoint>,
    backend: Option<(u32, u32)>,
) -> (Verdict, u32) {
    let new_src = src.map_or(f.src_be, |s| s.0);
    let new_dst = dst.map_or(f.dst_be, |d| d.0);
    let ingress = ctx.ingress_ifindex() as u32;
    let (p, len) = (ctx.as_ptr(), f.tot_len);
    // Packets to a backend: its cached route (see `fib::lookup_cached`).
    let found = match backend {
        Some(b) => fib::lookup_cached(p, b, ingress, new_src, new_dst, f.proto, len),
        None => fib::lookup(p, ingress, new_src, new_dst, f.proto, len),
    };
    match found {
        Lookup::Found(route) => {
            let (data, end) = (ctx.data(), ctx.data_end());
            if !nat::xdp_rewrite(data, end, f, src, dst, true) || !fib::set_macs(data, end, &route)
            {
                return (Verdict::PassMalformed, xdp_action::XDP_PASS);
            }
            let action = if route.ifindex == ingress {
                xdp_action::XDP_TX
            } else {
                fib::xdp_redirect(route.ifindex)
            };
            (Verdict::SnatTx, action)
        }
        Lookup::NoNeighbour(_) => {
            if nat::xdp_rewrite(ctx.data(), ctx.data_end(), f, src, dst, false) {
                (Verdict::NatNew, xdp_action::XDP_PASS)
            } else {
                (Verdict::PassMalformed, xdp_action::XDP_PASS)
            }
        }
        Lookup::Fail => (Verdict::DropNoRoute, xdp_action::XDP_DROP),
    }
}

/// The benchmark floor; never attached. It returns `XDP_PASS` without reading the packet or
/// any map, so running it through `BPF_PROG_TEST_RUN` exactly as `xlb_nic` is run measures
/// what the test-run method itself costs per packet. `cargo xtask bench datapath` reports the
/// datapath's figures as ratios to it.
#[xdp]
pub fn xlb_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// NIC TC ingress, attached only with BPF host routing: frames that `xlb_nic` translated to a
/// pod of this node go straight into the pod (see `routing`).
#[classifier]
pub fn xlb_nic_ingress(ctx: TcContext) -> i32 {
    routing::nic_ingress(&ctx)
}

/// Pod interfaces (TC ingress = what the pod sends): pod → service, and replies of local
/// backends.
#[classifier]
pub fn xlb_pod(ctx: TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let (verdict, action) = pod(&ctx);
    stats::count(verdict, bytes);
    action
}

/// What the pod program returns for a packet it passes on, translated or not: tcx's "next"
/// (`TCX_NEXT`, = `TC_ACT_UNSPEC`), so the programs and filters attached after it on the pod's
/// interface (a CNI's policy, say) still see the packet; `TC_ACT_OK` would end the chain.
const TC_NEXT: i32 = TC_ACT_UNSPEC;

/// Bytes that must be in the linear part of the skb for parsing: Ethernet, the largest IPv4
/// header, TCP without options.
const PARSE_LEN: u32 = 14 + 60 + 20;

/// The packet of `ctx`, parsed (its headers pulled into the linear area first).
#[inline(always)]
fn pod_flow(ctx: &TcContext) -> Result<Flow, Verdict> {
    let len = ctx.len();
    if ((ctx.data_end() - ctx.data()) as u32) < PARSE_LEN.min(len) {
        // Headers outside the linear area cannot be parsed; a failed pull leaves the packet
        // as it was and parsing then treats it as malformed.
        let _ = ctx.pull_data(PARSE_LEN.min(len));
    }
    parse::ipv4_flow(ctx.data(), ctx.data_end(), len as usize)
}

#[inline(always)]
fn pod(ctx: &TcContext) -> (Verdict, i32) {
    let f = match pod_flow(ctx) {
        Ok(f) => f,
        Err(v) => return (v, TC_NEXT),
    };
    let key = conntrack::flow_key(&f);
    let cfg = select::config();
    match select::tracked(&key, f.tcp_flags, true, cfg) {
        Tracked::Forward(fwd) => pod_forward(ctx, &f, &fwd),
        Tracked::Reply(rev) => pod_reply(ctx, &f, rev),
        Tracked::Untracked => {
            if select::frontend(&f, Scope::Internal as u8).is_none() {
                if select::may_be_snat_reply(&f, false, cfg)
                    && let Some(rev) = select::snat_reply(&f, &key, cfg)
                {
                    return pod_reply(ctx, &f, rev);
                }
                return (Verdict::PassNotService, TC_NEXT);
            }
            // The new-flow program counts the packet itself; this one only if it never ran.
            // SAFETY: a tail call with the program's own context.
            unsafe { POD_PROGRAMS.tail_call(ctx, PROG_INDEX_POD_NEW) };
            (Verdict::DropNoProgram, TC_ACT_SHOT)
        }
    }
}

/// A packet that `xlb_pod` found to start a flow to a frontend (a tail call): a backend is
/// picked and recorded, and the packet sent on.
#[classifier]
pub fn xlb_pod_new(ctx: TcContext) -> i32 {
    let bytes = u64::from(ctx.len());
    let (verdict, action) = pod_new(&ctx);
    stats::count(verdict, bytes);
    action
}

#[inline(always)]
fn pod_new(ctx: &TcContext) -> (Verdict, i32) {
    let f = match pod_flow(ctx) {
        Ok(f) => f,
        Err(v) => return (v, TC_NEXT),
    };
    let Some(fe) = select::frontend(&f, Scope::Internal as u8) else {
        return (Verdict::PassNotService, TC_NEXT);
    };
    let key = conntrack::flow_key(&f);
    match select::new_flow(&f, &key, &fe, Hook::Pod, select::config()) {
        Ok(fwd) => pod_forward(ctx, &f, &fwd),
        Err(v) => (v, TC_ACT_SHOT),
    }
}

/// A pod's packet of a flow, to its backend: DNAT, and for a pod reaching itself SNAT to the
/// hairpin address and back out of the interface it came from.
#[inline(always)]
fn pod_forward(ctx: &TcContext, f: &Flow, fwd: &Forward) -> (Verdict, i32) {
    stats::count_service(fwd.service_id, u64::from(ctx.len()));
    let dst = (fwd.backend.addr_be, fwd.backend.port_be);
    if nat::tc_rewrite(ctx, f, fwd.snat(), Some(dst)).is_err() {
        return (Verdict::DropRewrite, TC_ACT_SHOT);
    }
    if let Some(src) = fwd.snat() {
        return (fwd.verdict, tc_send(ctx, f, src.0, dst.0));
    }
    (fwd.verdict, TC_NEXT)
}

/// A reply of a translated flow leaving a pod.
#[inline(always)]
fn pod_reply(ctx: &TcContext, f: &Flow, rev: Reverse) -> (Verdict, i32) {
    let Reverse {
        src,
        dst,
        service_id,
    } = rev;
    stats::count_service(service_id, u64::from(ctx.len()));
    if nat::tc_rewrite(ctx, f, Some(src), dst).is_err() {
        return (Verdict::DropRewrite, TC_ACT_SHOT);
    }
    let new_dst = dst.map_or(f.dst_be, |d| d.0);
    (Verdict::ReverseNat, tc_send(ctx, f, src.0, new_dst))
}

/// Routes a rewritten packet from a pod interface and sends it ourselves: its new source may
/// be one of the node's addresses (a NodePort) or a Service address, which the kernel would
/// drop as martian arriving from a pod. Without a route it goes to the kernel as it is.
#[inline(always)]
fn tc_send(ctx: &TcContext, f: &Flow, src_be: u32, dst_be: u32) -> i32 {
    // SAFETY: reading the skb's ifindex from the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // No length: the lookup must not fail a GSO packet for the egress MTU; the kernel
    // segments it on the way out.
    match fib::lookup(ctx.as_ptr(), ifindex, src_be, dst_be, f.proto, 0) {
        Lookup::Found(r) => fib::tc_redirect_neigh(r.ifindex),
        Lookup::NoNeighbour(ifindex) => fib::tc_redirect_neigh(ifindex),
        Lookup::Fail => TC_NEXT,
    }
}

/// Socket-level load balancing (see `sock`): `connect()` of TCP and UDP sockets.
#[cgroup_sock_addr(connect4)]
pub fn xlb_connect4(ctx: SockAddrContext) -> i32 {
    verdict(sock::translate4(&ctx))
}

/// Socket-level load balancing: `sendmsg()` with an address (unconnected UDP).
#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(sock::translate4(&ctx))
}

/// Socket-level load balancing: the source of a received datagram reads as the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx);
    SOCK_ALLOW
}

/// Socket-level load balancing: `getpeername()` reads the frontend.
#[cgroup_sock_addr(getpeername4)]
pub fn xlb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx);
    SOCK_ALLOW
}

/// Socket-level load balancing of dual-stack sockets to IPv4-mapped addresses: `connect()`.
#[cgroup_sock_addr(connect6)]
pub fn xlb_connect6(ctx: SockAddrContext) -> i32 {
    verdict(sock::translate6(&ctx))
}

/// Dual-stack sockets: `sendmsg()` with an IPv4-mapped address.
#[cgroup_sock_addr(sendmsg6)]
pub fn xlb_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(sock::translate6(&ctx))
}

/// Dual-stack sockets: the source of a received datagram reads as the frontend.
#[cgroup_sock_addr(recvmsg6)]
pub fn xlb_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx);
    SOCK_ALLOW
}

/// Dual-stack sockets: `getpeername()` reads the frontend.
#[cgroup_sock_addr(getpeername6)]
pub fn xlb_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx);
    SOCK_ALLOW
}

/// Socket-level load balancing: a socket's translation is forgotten as it closes.
#[cgroup_sock(sock_release)]
pub fn xlb_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx);
    SOCK_ALLOW
}

#[inline(always)]
fn verdict(allow: bool) -> i32 {
    if allow { SOCK_ALLOW } else { SOCK_DENY }
}

/// A cgroup socket-address program's "go on with the call".
const SOCK_ALLOW: i32 = 1;
/// A cgroup socket-address program's "fail the call" (EPERM).
const SOCK_DENY: i32 = 0;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
