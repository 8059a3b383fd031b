//! BPF host routing (opt-in): frames that the NIC program translated to a backend on this
//! node skip the node's IP forwarding and netfilter and go straight into the pod's network
//! namespace. XDP cannot do that itself (`bpf_redirect_peer` exists only at TC ingress), so
//! the NIC program leaves a metadata word in front of such a frame and the NIC's TC ingress
//! program, which sees the frame next, finds the pod's interface and hands the frame over.
//! Without the word (a driver without XDP metadata, the option off) the kernel forwards the
//! frame as before.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    helpers::{bpf_redirect_peer, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use lb_common::{HostRouting, XDP_META_TO_POD, csum::replace16};

use crate::{
    fib::{self, Lookup},
    maps::POD_IFACES,
    parse::{ETH_HLEN, Ipv4Hdr, ptr_at, ptr_at_mut},
    stats,
};

/// tcx: "no verdict, run the next program" (`TCX_NEXT`, = `TC_ACT_UNSPEC`). Everything this
/// program leaves alone goes on to the other programs and filters on the NIC's ingress, then
/// to the kernel; `TC_ACT_OK` would end the chain there.
const NEXT: i32 = TC_ACT_UNSPEC;

/// Bytes of XDP metadata the NIC program adds: the mark word.
const META_LEN: i32 = 4;

/// 1: BPF host routing is on. The agent sets it at load time (`--host-routing=bpf`).
#[unsafe(no_mangle)]
static HOST_ROUTING_BPF: u32 = 0;

#[inline(always)]
fn enabled() -> bool {
    // SAFETY: a plain read of a constant the loader may have rewritten.
    unsafe { read_volatile(addr_of!(HOST_ROUTING_BPF)) != 0 }
}

/// XDP, after translating a frame to a backend on this node: the action that hands it on.
/// With host routing on, the frame carries the metadata word to the NIC's TC program.
#[inline(always)]
pub fn to_local_pod(ctx: &XdpContext) -> u32 {
    if !enabled() {
        return XDP_PASS;
    }
    // SAFETY: the helper checks the room in front of the frame and fails without it.
    if unsafe { bpf_xdp_adjust_meta(ctx.as_ptr().cast(), -META_LEN) } != 0 {
        return XDP_PASS;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + size_of::<u32>() <= data {
        // SAFETY: meta..data is the metadata area the helper just made, bounds-checked.
        unsafe { (meta as *mut u32).write_unaligned(XDP_META_TO_POD) };
    }
    XDP_PASS
}

/// TC ingress of a NIC: delivers a frame that the NIC program marked for a pod of this node.
/// Anything else (no mark, the route does not lead to a pod interface, TTL about to expire)
/// goes on untouched to the next program on the hook, then the kernel.
#[inline(always)]
pub fn nic_ingress(ctx: &TcContext) -> i32 {
    // SAFETY: reading the program's own context.
    let (meta, ifindex) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).ifindex) };
    let data = ctx.data();
    let Some(word) = ptr_at::<u32>(meta, data, 0) else {
        return NEXT;
    };
    // SAFETY: bounds-checked against the start of the packet.
    if unsafe { word.read_unaligned() } != XDP_META_TO_POD {
        return NEXT;
    }
    let Some(ip) = ptr_at_mut::<Ipv4Hdr>(data, ctx.data_end(), ETH_HLEN) else {
        return NEXT;
    };
    // SAFETY: bounds-checked above.
    let (src, dst, ttl, proto) = unsafe {
        (
            u32::from_ne_bytes((*ip).src),
            u32::from_ne_bytes((*ip).dst),
            (*ip).ttl,
            (*ip).proto,
        )
    };
    // The kernel answers an expiring TTL with ICMP. (The NIC program passes such requests
    // untranslated, but replies to pods are marked whatever their TTL.)
    if ttl <= 1 {
        stats::host_routing(HostRouting::Kernel);
        return NEXT;
    }
    // The pod's MTU is checked as forwarding would (a frame too large for it goes to the
    // kernel, which fragments it or answers "fragmentation needed"); a GRO aggregate is
    // delivered as it is, as the kernel would deliver it.
    // SAFETY: reading the program's own context.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    // SAFETY: bounds-checked above.
    let tot_len = if gso {
        0
    } else {
        u16::from_be_bytes(unsafe { (*ip).tot_len })
    };
    let (out, macs) = match fib::lookup(ctx.as_ptr(), ifindex, src, dst, proto, tot_len) {
        Lookup::Found(r) => (r.ifindex, Some(r)),
        Lookup::NoNeighbour(i) => (i, None),
        Lookup::Fail => (0, None),
    };
    if out == 0 || POD_IFACES.get_ptr(out).is_none() {
        stats::host_routing(HostRouting::Kernel);
        return NEXT;
    }
    // Forwarded as the kernel would: one hop less.
    // SAFETY: bounds-checked above; TC programs may write packet data directly.
    unsafe {
        let old = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
        (*ip).ttl = ttl - 1;
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        let check = u16::from_ne_bytes((*ip).check);
        (*ip).check = replace16(check, old, new).to_ne_bytes();
    }
    // The pod sees the frame as the kernel would have sent it: from its gateway, to itself.
    // (Without a resolved neighbour the addresses stay; the pod's stack accepts the frame
    // either way, as `bpf_redirect_peer` marks it for this host.)
    if let Some(r) = macs {
        let _ = fib::set_macs(ctx.data(), ctx.data_end(), &r);
    }
    stats::host_routing(HostRouting::Redirected);
    // SAFETY: plain helper call; the kernel checks that `out` has a peer.
    unsafe { bpf_redirect_peer(out, 0) as i32 }
}
