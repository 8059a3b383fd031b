//! Per-CPU verdict counters.
use lb_common::Verdict;

use crate::maps::STATS;

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
