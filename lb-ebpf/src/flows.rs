//! The flow table (see `lb_common::FlowBucket`): conntrack's fast path. Readers never lock:
//! they read a bucket between two reads of its sequence number and read again if a writer
//! was active. Writers take the bucket with a compare-and-swap on that number.
use core::{
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
    sync::atomic::{Ordering, compiler_fence},
};

use lb_common::{
    FLOW_BUCKET_LOCKED, FLOW_BUCKET_OVERFLOW, FLOW_WAYS, FlowBucket, FlowKey, FlowSlot, capacity,
    hash::flow_bucket,
};

use crate::maps::FLOWS;

/// The table's bucket count minus one (a power of two minus one); the agent sets it at load
/// time to match the map's size.
#[unsafe(no_mangle)]
static FLOW_BUCKET_MASK: u32 = capacity::FLOW_BUCKETS - 1;

/// How often a reader reads a bucket again while writers change it (a writer holds a bucket
/// for a few dozen instructions, or for the two LRU inserts of a flow that overflows).
const READ_TRIES: u32 = 64;
/// How often a writer tries to take a bucket that another writer holds.
const LOCK_TRIES: u32 = 32;

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
fn header(b: *mut FlowBucket) -> u64 {
    // SAFETY: `b` points at a bucket of the flow table (a map value).
    unsafe { read_volatile(addr_of!((*b).header)) }
}

/// Reads bucket `b` consistently and returns the first slot `matches` accepts. A bucket that
/// writers keep changing for `READ_TRIES` reads counts as a miss with overflow, so the caller
/// also asks the LRU map (and a new flow then waits for the bucket's lock).
#[inline(always)]
fn probe(b: *mut FlowBucket, matches: impl Fn(&FlowSlot) -> bool) -> Probe {
    for _ in 0..READ_TRIES {
        let before = header(b);
        if before & FLOW_BUCKET_LOCKED != 0 {
            continue;
        }
        compiler_fence(Ordering::SeqCst);
        let mut hit = None;
        for i in 0..FLOW_WAYS {
            // SAFETY: `b` is a map value; `i` is in bounds.
            let slot = unsafe { addr_of_mut!((*b).slots[i]) };
            // SAFETY: as above. Plain loads (a volatile copy of the struct would be made of
            // byte loads); the fences keep them between the two reads of the sequence number,
            // which tell whether they saw one consistent slot.
            let s = unsafe { &*slot };
            if s.client_addr_be != 0 && matches(s) {
                hit = Some((slot, *s));
                break;
            }
        }
        compiler_fence(Ordering::SeqCst);
        let after = header(b);
        if after as u32 == before as u32 {
            return match hit {
                Some((p, s)) => Probe::Hit(p, s),
                None => Probe::Miss {
                    overflow: after & FLOW_BUCKET_OVERFLOW != 0,
                },
            };
        }
    }
    Probe::Miss { overflow: true }
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
    /// Takes bucket `b`, or gives up after `LOCK_TRIES` tries while others hold it.
    #[inline(always)]
    pub fn take(b: *mut FlowBucket) -> Option<Self> {
        for _ in 0..LOCK_TRIES {
            let h = header(b);
            if h & FLOW_BUCKET_LOCKED == 0 && cas(b, h, h + FLOW_BUCKET_LOCKED) {
                return Some(Self {
                    bucket: b,
                    header: h,
                    overflow: false,
                });
            }
        }
        None
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

    /// Frees the slot of `k`'s flow, if the bucket holds it.
    #[inline(always)]
    pub fn remove(&mut self, k: &FlowKey) {
        for s in self.slots().iter_mut() {
            if s.client_addr_be != 0 && is_forward(s, k) {
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
        let seq = u64::from((self.header as u32).wrapping_add(2));
        let overflow = if self.overflow {
            FLOW_BUCKET_OVERFLOW
        } else {
            self.header & FLOW_BUCKET_OVERFLOW
        };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the bucket is ours; one aligned 8-byte store releases it.
        unsafe { write_volatile(addr_of_mut!((*self.bucket).header), seq | overflow) };
    }
}

/// Compare-and-swap of a bucket's header. (With the plain loads and stores around it, the
/// bucket protocol relies on x86-64's ordering of loads with loads and stores with stores,
/// which the compiler fences keep in program order.)
#[inline(always)]
fn cas(b: *mut FlowBucket, old: u64, new: u64) -> bool {
    // SAFETY: the header is an aligned u64 inside a map value.
    let p = unsafe { addr_of_mut!((*b).header) };
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering, atomic_cxchg};
        // SAFETY: as above; BPF_CMPXCHG on map memory.
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
        }
        .1
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        // SAFETY: as above (the host build only type-checks the datapath).
        unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}
