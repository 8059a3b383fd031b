//! The agent's side of the flow table (`lb_common::FlowBucket`): counting its flows for the
//! metrics, reading them for `xlb conntrack` and `xlb explain` (as the conntrack entries they
//! stand for), and marking every bucket as overflowed when this datapath takes over from one
//! that kept its flows only in the LRU conntrack map.
use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use crate::datapath::mapmem::BucketArray;
use aya::maps::{Map, MapData};
use lb_common::{
    CT_FORWARD, CT_REVERSE, CtEntry, FLOW_BUCKET_LOCKED, FLOW_BUCKET_OVERFLOW, FLOW_F_HAIRPIN,
    FLOW_F_SNAT, FlowBucket, FlowKey, FlowSlot, hash::flow_bucket,
};

pub use crate::datapath::mapmem::BucketError as FlowsError;

/// The LRU conntrack map, as the agent reads it.
pub type CtMap = aya::maps::HashMap<MapData, FlowKey, CtEntry>;

/// A second handle on the LRU conntrack map of a loaded datapath.
pub fn open_conntrack(ebpf: &aya::Ebpf) -> Result<CtMap, FlowsError> {
    let err = |e: &dyn std::fmt::Display| FlowsError::Map(io::Error::other(e.to_string()));
    let Some(Map::LruHashMap(data)) = ebpf.map(lb_common::map_names::CONNTRACK) else {
        return Err(err(&"the datapath has no LRU conntrack map"));
    };
    let id = data.info().map_err(|e| err(&e))?.id();
    let data = MapData::from_id(id).map_err(|e| err(&e))?;
    CtMap::try_from(Map::LruHashMap(data)).map_err(|e| err(&e))
}

/// What one [`OverflowSweeper::sweep`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Buckets marked before the sweep.
    pub marked: usize,
    /// Marks cleared.
    pub cleared: usize,
}

/// Clears the overflow marks of buckets none of whose flows is in the LRU conntrack map any
/// more, so their misses stop asking it: after an upgrade from a datapath without the table
/// (which marks every bucket) as the old entries go, and after bursts of full buckets.
///
/// A mark is cleared only if two sweeps in a row found the bucket marked with the same header
/// and no flow of it in the LRU map, with a compare-and-swap against that header. The
/// datapath marks a bucket (changing its header) before it writes the flow's LRU entries, so
/// entries a sweep's walk could miss belong to a header that changed, or were written by the
/// time of the next sweep's walk.
#[derive(Debug, Default)]
pub struct OverflowSweeper {
    /// Buckets the last sweep found marked, unchanged and without LRU flows.
    candidates: std::collections::HashMap<u32, u64>,
}

impl OverflowSweeper {
    /// One sweep of `table` against the LRU conntrack map `ct`.
    pub fn sweep(&mut self, table: &FlowTable, ct: &CtMap) -> Result<Sweep, FlowsError> {
        let marked = table.marked()?;
        let in_lru = table.in_lru(ct)?;
        let idle: Vec<(u32, u64)> = marked
            .iter()
            .copied()
            .filter(|(i, h)| {
                h & FLOW_BUCKET_LOCKED == 0 && in_lru[*i as usize / 64] & (1 << (i % 64)) == 0
            })
            .collect();
        let clear: Vec<(u32, u64)> = idle
            .iter()
            .copied()
            .filter(|(i, h)| self.candidates.get(i) == Some(h))
            .collect();
        let cleared = table.clear_marks(&clear)?;
        // The next sweep's candidates: this one's idle buckets it did not try to clear (a
        // failed try means the header changed: the bucket starts over).
        self.candidates = idle.into_iter().collect();
        for (i, _) in &clear {
            self.candidates.remove(i);
        }
        Ok(Sweep {
            marked: marked.len(),
            cleared,
        })
    }
}

/// The flow table of a loaded or pinned datapath.
pub struct FlowTable {
    table: BucketArray<FlowBucket>,
    buckets: u32,
}

impl FlowTable {
    pub fn new(map: MapData) -> Result<Self, FlowsError> {
        let table = BucketArray::new(map)?;
        Ok(Self {
            buckets: table.buckets(),
            table,
        })
    }

    fn read_bucket(&self, index: u32) -> Result<FlowBucket, FlowsError> {
        self.table.read(index)
    }

    /// A second handle on the flow table of a loaded datapath.
    pub fn open(ebpf: &aya::Ebpf) -> Result<Self, FlowsError> {
        let table = BucketArray::open(ebpf, lb_common::map_names::FLOWS)?;
        Ok(Self {
            buckets: table.buckets(),
            table,
        })
    }

    /// Every flow, as the conntrack entries it stands for (see [`entries`]).
    pub fn all_entries(&self) -> Result<Vec<(FlowKey, CtEntry)>, FlowsError> {
        let mut out = Vec::new();
        self.visit(|_, b| {
            for s in b.slots.iter().filter(|s| s.client_addr_be != 0) {
                out.extend(entries(s));
            }
            true
        })?;
        Ok(out)
    }

    /// Buckets in the table.
    #[must_use]
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Slots in the table (flows it can hold).
    #[must_use]
    pub fn capacity(&self) -> u64 {
        u64::from(self.buckets) * lb_common::FLOW_WAYS as u64
    }

    /// Calls `visit` with every bucket, in index order, until it returns false.
    pub fn visit(&self, visit: impl FnMut(u32, &FlowBucket) -> bool) -> Result<(), FlowsError> {
        self.table.visit(visit)
    }

    /// Slots holding a flow, counting at most `limit`.
    pub fn used(&self, limit: u64) -> Result<u64, FlowsError> {
        let mut n = 0;
        self.visit(|_, b| {
            n += b.slots.iter().filter(|s| s.client_addr_be != 0).count() as u64;
            n < limit
        })?;
        Ok(n.min(limit))
    }

    /// Marks every bucket as overflowed, so the datapath also looks flows up in the LRU
    /// conntrack map: done when this datapath starts with a conntrack map that a datapath
    /// without the flow table filled (and may still be filling). Returns the buckets marked.
    pub fn mark_all_overflowed(&self) -> Result<u32, FlowsError> {
        self.table.for_each_mut(|_, b| {
            // SAFETY: an aligned u64 header inside the mapped bucket; the datapath changes
            // headers only with atomic compare-and-swap and stores of the lock holder, which
            // keep bits they do not own, so an atomic OR is safe against both.
            let header = unsafe { AtomicU64::from_ptr(&raw mut (*b).header) };
            header.fetch_or(FLOW_BUCKET_OVERFLOW, Ordering::SeqCst);
        })?;
        Ok(self.buckets)
    }

    /// Marked buckets (index, header), in index order.
    fn marked(&self) -> Result<Vec<(u32, u64)>, FlowsError> {
        let mut marked = Vec::new();
        self.visit(|i, b| {
            if b.header & FLOW_BUCKET_OVERFLOW != 0 {
                marked.push((i, b.header));
            }
            true
        })?;
        Ok(marked)
    }

    /// Buckets (a bit per bucket) that flows in the LRU conntrack map `ct` belong to.
    fn in_lru(&self, ct: &CtMap) -> Result<Vec<u64>, FlowsError> {
        let mask = self.buckets - 1;
        let mut in_use = vec![0u64; (self.buckets as usize).div_ceil(64)];
        for item in ct {
            let (k, e) = item.map_err(|e| FlowsError::Map(io::Error::other(e)))?;
            let (addr, port) = if e.kind == CT_REVERSE {
                (k.dst_be, k.dport_be)
            } else {
                (k.src_be, k.sport_be)
            };
            let i = flow_bucket(addr, port, k.proto) & mask;
            in_use[i as usize / 64] |= 1 << (i % 64);
        }
        Ok(in_use)
    }

    /// Clears the marks of `clear` (bucket, the header it must still have; in index order),
    /// a window of buckets at a time; returns how many it cleared.
    fn clear_marks(&self, clear: &[(u32, u64)]) -> Result<usize, FlowsError> {
        let mut cleared = 0;
        let mut rest = clear;
        while let Some(&(first, _)) = rest.first() {
            let per = BucketArray::<FlowBucket>::window_buckets();
            let start = first / per * per;
            let count = per.min(self.buckets - start);
            let window = self.table.window(start, count, true)?;
            let n = rest.iter().take_while(|(i, _)| *i < start + count).count();
            for &(i, header) in &rest[..n] {
                // SAFETY: the window maps buckets start..start + count, `i` among them. The
                // header is an aligned u64 that the datapath changes only by taking the
                // bucket (compare-and-swap) and releasing it (the holder's store), so a
                // compare-and-swap against an unlocked value cannot interleave with a holder.
                let h = unsafe { AtomicU64::from_ptr(&raw mut (*window.bucket(i - start)).header) };
                let unmarked = header & !FLOW_BUCKET_OVERFLOW;
                if h.compare_exchange(header, unmarked, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    cleared += 1;
                }
            }
            rest = &rest[n..];
        }
        Ok(cleared)
    }

    /// The bucket a flow's client side hashes to.
    pub fn bucket_of(
        &self,
        client_be: u32,
        client_port_be: u16,
        proto: u8,
    ) -> Result<FlowBucket, FlowsError> {
        let index = flow_bucket(client_be, client_port_be, proto) & (self.buckets - 1);
        self.read_bucket(index)
    }

    /// The conntrack entry the flow table holds for a packet's 5-tuple, as
    /// `lb-ebpf/src/select.rs` finds it: a client's packet in its source's bucket, a reply in
    /// its destination's.
    pub fn entry(&self, key: &FlowKey) -> Result<Option<CtEntry>, FlowsError> {
        let b = self.bucket_of(key.src_be, key.sport_be, key.proto)?;
        if let Some(s) = b
            .slots
            .iter()
            .find(|s| s.client_addr_be != 0 && is_forward(s, key))
        {
            return Ok(Some(forward_entry(s)));
        }
        let b = self.bucket_of(key.dst_be, key.dport_be, key.proto)?;
        Ok(b.slots
            .iter()
            .filter(|s| s.client_addr_be != 0 && s.flags & (FLOW_F_SNAT | FLOW_F_HAIRPIN) == 0)
            .find(|s| reply_key(s) == *key)
            .map(reverse_entry))
    }
}

fn is_forward(s: &FlowSlot, k: &FlowKey) -> bool {
    forward_key(s) == *k
}

/// The 5-tuple of a flow's client packets.
#[must_use]
pub fn forward_key(s: &FlowSlot) -> FlowKey {
    FlowKey {
        src_be: s.client_addr_be,
        dst_be: s.frontend_addr_be,
        sport_be: s.client_port_be,
        dport_be: s.frontend_port_be,
        proto: s.proto,
        ..FlowKey::default()
    }
}

/// The 5-tuple of a flow's replies as they leave its backend (flows not SNATed).
#[must_use]
pub fn reply_key(s: &FlowSlot) -> FlowKey {
    FlowKey {
        src_be: s.peer_addr_be,
        dst_be: s.client_addr_be,
        sport_be: s.backend_port_be,
        dport_be: s.client_port_be,
        proto: s.proto,
        ..FlowKey::default()
    }
}

fn forward_entry(s: &FlowSlot) -> CtEntry {
    let nat_addr_be = if s.flags & (FLOW_F_SNAT | FLOW_F_HAIRPIN) == 0 {
        0
    } else {
        s.peer_addr_be
    };
    CtEntry {
        backend_id: s.backend_id,
        backend_generation: s.backend_generation,
        nat_addr_be,
        service_id: s.service_id,
        nat_port_be: if nat_addr_be == 0 { 0 } else { s.nat_port_be },
        kind: CT_FORWARD,
        _pad: 0,
    }
}

fn reverse_entry(s: &FlowSlot) -> CtEntry {
    CtEntry {
        backend_id: s.backend_id,
        backend_generation: s.backend_generation,
        nat_addr_be: s.frontend_addr_be,
        service_id: s.service_id,
        nat_port_be: s.frontend_port_be,
        kind: CT_REVERSE,
        _pad: 0,
    }
}

/// The conntrack entries a flow-table slot stands for: its forward entry, and for a flow that
/// is not SNATed the reverse entry of its replies (SNATed flows' replies are in the SNAT map).
#[must_use]
pub fn entries(s: &FlowSlot) -> Vec<(FlowKey, CtEntry)> {
    let mut out = vec![(forward_key(s), forward_entry(s))];
    if s.flags & (FLOW_F_SNAT | FLOW_F_HAIRPIN) == 0 {
        out.push((reply_key(s), reverse_entry(s)));
    }
    out
}
