//! The flow table (see `lb_common::FlowBucket`): conntrack's fast path. Buckets follow the
//! protocol of `seqlock`: readers never lock, writers take a bucket with a compare-and-swap.
use core::ptr::{addr_of, addr_of_mut, read_volatile};

use lb_common::{
    FLOW_BUCKET_OVERFLOW, FLOW_WAYS, FlowBucket, FlowKey, FlowSlot, capacity, hash::flow_bucket,
};

use crate::{maps::FLOWS, seqlock};

/// The table's bucket count minus one (a power of two minus one); the agent sets it at load
/// time to match the map's size.
#[unsafe(no_mangle)]
static FLOW_BUCKET_MASK: u32 = capacity::FLOW_BUCKETS - 1;

/// The bucket of a flow's client side.
#[inline(always)]
pub fn bucket(client_be: u32, client_port_be: u16, proto: u8) -> Option<*mut FlowBucket> {
    // SAFETY: a plain read of a constant the loader may have rewritten.
    let mask = unsafe { read_volatile(addr_of!(FLOW_BUCKET_MASK)) };
    FLOWS.get_ptr_mut(flow_bucket(client_be, client_port_be, proto) & mask)
}

/// What a bucket says about a packet.
pub enum Probe {
    /// The flow's slot (a pointer for refreshing it, and a consistent copy).
    Hit(*mut FlowSlot, FlowSlot),
    /// Not in the bucket; `overflow`: the bucket sent flows to the LRU conntrack map.
    Miss { overflow: bool },
}

#[inline(always)]
fn header(b: *mut FlowBucket) -> *mut u64 {
    // SAFETY: `b` points at a bucket of the flow table (a map value).
    unsafe { addr_of_mut!((*b).header) }
}

/// Reads bucket `b` consistently and returns the first slot `matches` accepts. A bucket that
/// writers keep changing counts as a miss with overflow, so the caller also asks the LRU map
/// (and a new flow then waits for the bucket's lock).
#[inline(always)]
fn probe(b: *mut FlowBucket, matches: impl Fn(&FlowSlot) -> bool) -> Probe {
    let read = seqlock::read(header(b), || {
        for i in 0..FLOW_WAYS {
            // SAFETY: `b` is a map value; `i` is in bounds.
            let slot = unsafe { addr_of_mut!((*b).slots[i]) };
            // SAFETY: as above. Plain loads (a volatile copy of the struct would be made of
            // byte loads); `seqlock::read` fences them between its two reads of the header,
            // which tell whether they saw one consistent slot.
            let s = unsafe { &*slot };
            if s.client_addr_be != 0 && matches(s) {
                return Some((slot, *s));
            }
        }
        None
    });
    match read {
        Some((Some((p, s)), _)) => Probe::Hit(p, s),
        Some((None, h)) => Probe::Miss {
            overflow: h & FLOW_BUCKET_OVERFLOW != 0,
        },
        None => Probe::Miss { overflow: true },
    }
}

/// The slot of a client's packet (`k`: its 5-tuple as it arrives).
#[inline(always)]
pub fn forward(b: *mut FlowBucket, k: &FlowKey) -> Probe {
    probe(b, |s| is_forward(s, k))
}

#[inline(always)]
fn is_forward(s: &FlowSlot, k: &FlowKey) -> bool {
    s.client_addr_be == k.src_be
        && s.client_port_be == k.sport_be
        && s.frontend_addr_be == k.dst_be
        && s.frontend_port_be == k.dport_be
        && s.proto == k.proto
}

/// The slot of a reply (`k`: backend → client) of a flow that was not SNATed.
#[inline(always)]
pub fn reply(b: *mut FlowBucket, k: &FlowKey) -> Probe {
    probe(b, |s| {
        s.client_addr_be == k.dst_be
            && s.client_port_be == k.dport_be
            && s.peer_addr_be == k.src_be
            && s.backend_port_be == k.sport_be
            && s.proto == k.proto
            && s.flags & (lb_common::FLOW_F_SNAT | lb_common::FLOW_F_HAIRPIN) == 0
    })
}

/// A bucket held by this writer; released (and its sequence number moved on) on drop.
pub struct Locked {
    bucket: *mut FlowBucket,
    header: u64,
    overflow: bool,
}

impl Locked {
    /// Takes bucket `b`, or gives up while others hold it.
    #[inline(always)]
    pub fn take(b: *mut FlowBucket) -> Option<Self> {
        seqlock::lock(header(b)).map(|h| Self {
            bucket: b,
            header: h,
            overflow: false,
        })
    }

    /// The index of the slot that `k`'s flow should take: its own slot if it has one (its
    /// backend left), else a free one, else one whose flow `expired` says is over; None if all
    /// hold live flows.
    #[inline(always)]
    pub fn choose(&self, k: &FlowKey, expired: impl Fn(&FlowSlot) -> bool) -> Option<usize> {
        let (mut free, mut stale) = (None, None);
        for i in 0..FLOW_WAYS {
            // SAFETY: the bucket is ours; `i` is in bounds.
            let s = unsafe { &(*self.bucket).slots[i] };
            if s.client_addr_be == 0 {
                if free.is_none() {
                    free = Some(i);
                }
            } else if is_forward(s, k) {
                return Some(i);
            } else if stale.is_none() && expired(s) {
                stale = Some(i);
            }
        }
        free.or(stale)
    }

    /// Writes slot `i`.
    #[inline(always)]
    pub fn write(&mut self, i: usize, slot: FlowSlot) {
        if let Some(s) = self.slots().get_mut(i) {
            *s = slot;
        }
    }

    /// Frees the slot of `k`'s flow if the bucket holds it and `which` accepts it.
    #[inline(always)]
    pub fn remove(&mut self, k: &FlowKey, which: impl Fn(&FlowSlot) -> bool) {
        for s in self.slots().iter_mut() {
            if s.client_addr_be != 0 && is_forward(s, k) && which(s) {
                s.client_addr_be = 0;
            }
        }
    }

    /// Marks the bucket as having sent a flow to the LRU conntrack map.
    #[inline(always)]
    pub fn set_overflow(&mut self) {
        self.overflow = true;
    }

    #[inline(always)]
    fn slots(&mut self) -> &mut [FlowSlot; FLOW_WAYS] {
        // SAFETY: the bucket is ours while `self` lives.
        unsafe { &mut (*self.bucket).slots }
    }
}

impl Drop for Locked {
    #[inline(always)]
    fn drop(&mut self) {
        let overflow = if self.overflow {
            FLOW_BUCKET_OVERFLOW
        } else {
            0
        };
        seqlock::unlock(header(self.bucket), self.header, overflow);
    }
}
