//! Routing decisions for packets the datapath transmits itself (`bpf_fib_lookup`).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_redir_neigh, xdp_action::XDP_ABORTED},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::map,
    maps::{Array, PerCpuArray},
};

use crate::parse::{EthHdr, ptr_at_mut};

const AF_INET: u8 = 2;
#[expect(clippy::cast_possible_wrap, reason = "64 bytes")]
const FIB_PARAMS_LEN: i32 = size_of::<bpf_fib_lookup>() as i32;
pub const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
pub const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// A FIB result: the egress interface and, on success, the MAC addresses to use.
pub struct Route {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

pub enum Lookup {
    /// Route and neighbour known.
    Found(Route),
    /// Route known, neighbour not resolved yet: the kernel must send this one.
    NoNeighbour(u32),
    /// No usable route (unreachable, blackhole, forwarding disabled, ...).
    Fail,
}

/// This CPU's lookup parameters: 64 bytes the BPF stack (512 for all frames of a program)
/// need not hold.
#[map(name = "xlb_fib_params")]
static PARAMS: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Looks up the route for an IPv4 packet from `src_be` to `dst_be` arriving on `ifindex`.
#[inline(always)]
pub fn lookup(
    ctx: *mut c_void,
    ifindex: u32,
    src_be: u32,
    dst_be: u32,
    proto: u8,
    tot_len: u16,
) -> Lookup {
    let Some(p) = PARAMS.get_ptr_mut(0) else {
        return Lookup::Fail;
    };
    // SAFETY: this CPU's entry (a program runs to its end on one CPU); bpf_fib_lookup is
    // plain integers and unions of integers, so all-zero is valid.
    let p = unsafe {
        p.write_bytes(0, 1);
        &mut *p
    };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.ifindex = ifindex;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.__bindgen_anon_3.ipv4_src = src_be;
    p.__bindgen_anon_4.ipv4_dst = dst_be;
    // SAFETY: p is a valid, initialised bpf_fib_lookup in a map value; ctx is the program's.
    let rc = unsafe { fib_lookup(ctx, core::ptr::from_mut(p), FIB_PARAMS_LEN, 0) };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Lookup::Found(Route {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Lookup::NoNeighbour(p.ifindex),
        _ => Lookup::Fail,
    }
}

/// A backend's route as a FIB lookup last gave it (see [`lookup_cached`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedRoute {
    pub ifindex: u32,
    /// Coarse second of the lookup; the entry serves packets of that second only.
    pub stamp_s: u32,
    /// The source and destination the lookup was made for (the SNAT address, the backend:
    /// a backend id reused for another address never gets the old one's route).
    pub src_be: u32,
    pub dst_be: u32,
    /// The largest IPv4 total length the lookup (and its MTU check) passed this second.
    pub max_len: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Per backend id: its route, looked up at most once a second per backend (and again for a
/// packet larger than any checked this second). A FIB lookup is about as dear as the rest
/// of an established SNATed packet's path; a route or neighbour change is followed within a
/// second. A cache of this load only: not pinned.
#[map(name = "xlb_routes")]
static ROUTES: Array<CachedRoute> = Array::with_max_entries(lb_common::capacity::BACKENDS, 0);

/// [`lookup`] for the packets of backend `id`, through its cached route when that is of
/// second `now`, for this source, and has checked a packet at least this long.
#[inline(always)]
pub fn lookup_cached(
    ctx: *mut c_void,
    (id, now): (u32, u32),
    ifindex: u32,
    src_be: u32,
    dst_be: u32,
    proto: u8,
    tot_len: u16,
) -> Lookup {
    let cached = ROUTES.get_ptr_mut(id);
    if let Some(c) = cached {
        // SAFETY: the map's value, copied; a racing writer can at worst make this packet
        // take a fresh lookup or the route of the same second.
        let c = unsafe { *c };
        if c.stamp_s == now
            && c.src_be == src_be
            && c.dst_be == dst_be
            && c.ifindex != 0
            && tot_len <= c.max_len
        {
            return Lookup::Found(Route {
                ifindex: c.ifindex,
                smac: c.smac,
                dmac: c.dmac,
            });
        }
    }
    let found = lookup(ctx, ifindex, src_be, dst_be, proto, tot_len);
    if let (Lookup::Found(r), Some(c)) = (&found, cached) {
        // SAFETY: as above; the whole entry is written.
        unsafe {
            *c = CachedRoute {
                ifindex: r.ifindex,
                stamp_s: now,
                src_be,
                dst_be,
                max_len: tot_len,
                smac: r.smac,
                dmac: r.dmac,
            };
        }
    }
    found
}

/// Writes the route's MAC addresses into the frame's Ethernet header.
#[inline(always)]
pub fn set_macs(data: usize, data_end: usize, r: &Route) -> bool {
    let Some(eth) = ptr_at_mut::<EthHdr>(data, data_end, 0) else {
        return false;
    };
    // SAFETY: bounds-checked above.
    unsafe {
        (*eth).dst = r.dmac;
        (*eth).src = r.smac;
    }
    true
}

/// XDP: transmit on `ifindex` (returns the XDP action).
#[inline(always)]
pub fn xdp_redirect(ifindex: u32) -> u32 {
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) }
        .try_into()
        .unwrap_or(XDP_ABORTED)
}

/// TC: transmit on `ifindex`, letting the kernel fill in the neighbour (returns the TC action).
#[inline(always)]
pub fn tc_redirect_neigh(ifindex: u32) -> i32 {
    // SAFETY: a null params pointer asks the kernel to resolve the next hop itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut::<bpf_redir_neigh>(), 0, 0) as i32 }
}
