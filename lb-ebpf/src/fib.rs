//! Routing decisions for packets the datapath transmits itself (`bpf_fib_lookup`).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_redir_neigh, xdp_action::XDP_ABORTED},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::map,
    maps::PerCpuArray,
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
