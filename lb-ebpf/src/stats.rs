//! Per-CPU verdict counters.
use lb_common::{Event, HostRouting, Verdict};

use crate::maps::{EVENTS, HOST_ROUTING, SERVICE_STATS, STATS};

#[inline(always)]
pub fn count(verdict: Verdict, bytes: u64) {
    if let Some(c) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a translated packet for its service (0: none known).
#[inline(always)]
pub fn count_service(service_id: u32, bytes: u64) {
    if service_id == 0 {
        return;
    }
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a datapath event.
#[inline(always)]
pub fn event(e: Event) {
    if let Some(c) = EVENTS.get_ptr_mut(e as u32) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Counts a BPF host-routing outcome.
#[inline(always)]
pub fn host_routing(h: HostRouting) {
    if let Some(c) = HOST_ROUTING.get_ptr_mut(h as u32) {
        // SAFETY: per-CPU slot, this program is the only writer on this CPU.
        unsafe { *c += 1 };
    }
}
