//! Connection tracking: which backend a flow was given, and how to translate its replies.
use lb_common::{CtEntry, FlowKey};

use crate::{maps::CONNTRACK, parse::Flow};

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

/// Forgets a flow's forward entry (its SNAT port was given to another flow).
#[inline(always)]
pub fn remove(k: &FlowKey) {
    let _ = CONNTRACK.remove(k);
}

#[inline(always)]
pub fn insert(k: &FlowKey, e: &CtEntry) -> Result<(), i32> {
    CONNTRACK.insert(k, e, 0)
}
