//! The bucket protocol of the flow table and the SNAT table: a bucket's 64-bit header holds
//! a sequence number in its low 32 bits that a writer makes odd (with a compare-and-swap:
//! the bucket's lock) while it writes and even again after; readers take no lock, and read
//! again when the number was odd or changed. Bits above 32 are the table's own flags.
//!
//! With the plain loads and stores around it, the protocol relies on x86-64's ordering of
//! loads with loads and stores with stores, which the compiler fences keep in program order
//! (other architectures would need acquire/release accesses).
use core::{
    ptr::{read_volatile, write_volatile},
    sync::atomic::{Ordering, compiler_fence},
};

use lb_common::FLOW_BUCKET_LOCKED;

/// How often a reader reads a bucket again while writers change it (a writer holds a bucket
/// for a few dozen instructions).
pub const READ_TRIES: u32 = 16;
/// How often a writer tries to take a bucket that another writer holds.
const LOCK_TRIES: u32 = 32;

/// The header's current value.
#[inline(always)]
pub fn load(h: *mut u64) -> u64 {
    // SAFETY: `h` points at a bucket header inside a map value.
    unsafe { read_volatile(h) }
}

/// Whether a header value says a writer holds the bucket.
#[inline(always)]
pub fn locked(v: u64) -> bool {
    v & FLOW_BUCKET_LOCKED != 0
}

/// Reads with `read` between two reads of the header: the result if no writer was active
/// meanwhile, with the header value seen; None if writers kept changing it.
#[inline(always)]
pub fn read<T>(h: *mut u64, read: impl Fn() -> T) -> Option<(T, u64)> {
    for _ in 0..READ_TRIES {
        let before = load(h);
        if locked(before) {
            continue;
        }
        compiler_fence(Ordering::SeqCst);
        let out = read();
        compiler_fence(Ordering::SeqCst);
        let after = load(h);
        if after as u32 == before as u32 {
            return Some((out, after));
        }
    }
    None
}

/// Takes the bucket whose header is `h`, or gives up after `LOCK_TRIES` tries while others
/// hold it; returns the header value it replaced.
#[inline(always)]
pub fn lock(h: *mut u64) -> Option<u64> {
    for _ in 0..LOCK_TRIES {
        let v = load(h);
        if !locked(v) && cas(h, v, v + FLOW_BUCKET_LOCKED) {
            return Some(v);
        }
    }
    None
}

/// Takes the bucket whose header is `h` if no writer holds it now (one try: for callers
/// that have somewhere else to go, such as the next SNAT port).
#[inline(always)]
pub fn try_lock(h: *mut u64) -> Option<u64> {
    let v = load(h);
    (!locked(v) && cas(h, v, v + FLOW_BUCKET_LOCKED)).then_some(v)
}

/// Releases a bucket taken when its header was `taken`, moving its sequence number on and
/// setting the flag bits `set`.
#[inline(always)]
pub fn unlock(h: *mut u64, taken: u64, set: u64) {
    let seq = u64::from((taken as u32).wrapping_add(2));
    let flags = (taken & !u64::from(u32::MAX)) | set;
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the bucket is ours; one aligned 8-byte store releases it.
    unsafe { write_volatile(h, seq | flags) };
}

/// Compare-and-swap of a bucket's header.
#[inline(always)]
pub fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering, atomic_cxchg};
        // SAFETY: an aligned u64 inside a map value; BPF_CMPXCHG on map memory.
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
