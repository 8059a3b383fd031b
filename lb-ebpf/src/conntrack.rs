//! Connection tracking: which backend a flow was given, and how to translate its replies.
use lb_common::{CtEntry, FlowKey, SnatEntry};

use crate::{
    maps::{CONNTRACK, SNAT},
    parse::Flow,
};

#[inline(always)]
pub fn key(src_be: u32, dst_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_be,
        dst_be,
        sport_be,
        dport_be,
        proto,
        _pad0: 0,
        _pad1: 0,
    }
}

#[inline(always)]
pub fn flow_key(f: &Flow) -> FlowKey {
    key(f.src_be, f.dst_be, f.sport_be, f.dport_be, f.proto)
}

/// The conntrack entry of a packet's 5-tuple, forward or reverse, if any. One lookup serves
/// both directions: a tuple is either a client's (forward) or a backend's reply (reverse).
#[inline(always)]
pub fn lookup(k: &FlowKey) -> Option<CtEntry> {
    // SAFETY: the value is copied out at once; LRU entries are plain data.
    unsafe { CONNTRACK.get(k) }.copied()
}

/// The SNAT entry of a reply tuple, for reading and refreshing in place.
#[inline(always)]
pub fn snat_entry(k: &FlowKey) -> Option<*mut SnatEntry> {
    SNAT.get_ptr_mut(k)
}

/// Forgets a flow's forward entry (its SNAT port was reclaimed by another flow).
#[inline(always)]
pub fn remove(k: &FlowKey) {
    let _ = CONNTRACK.remove(k);
}

#[inline(always)]
pub fn insert(k: &FlowKey, e: &CtEntry) -> Result<(), i32> {
    CONNTRACK.insert(k, e, 0)
}

/// Reserves the reply tuple `k` for a SNATed flow; fails if it is taken.
#[inline(always)]
pub fn reserve_snat(k: &FlowKey, e: &SnatEntry) -> Result<(), i32> {
    const BPF_NOEXIST: u64 = 1;
    SNAT.insert(k, e, BPF_NOEXIST)
}

/// Records (or refreshes) the SNAT entry of a reply tuple that is ours by construction.
#[inline(always)]
pub fn put_snat(k: &FlowKey, e: &SnatEntry) -> Result<(), i32> {
    SNAT.insert(k, e, 0)
}
