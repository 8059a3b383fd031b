//! The programmer's allocators: ring regions of the Maglev slab and backend ids with their
//! generations, each with a quarantine so a freed region or id is not reused by the plan that
//! freed it. Pure bookkeeping: no I/O, no map writes.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use crate::control::state::BackendAddr;

/// Free-list allocator over `[0, capacity)` with quarantine.
#[derive(Clone, Debug)]
pub(super) struct Slab {
    pub(super) free: BTreeMap<u32, u32>,
    pub(super) quarantine: Vec<(u32, u32)>,
}

impl Slab {
    pub(super) fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            free,
            quarantine: Vec::new(),
        }
    }

    pub(super) fn largest(&self) -> u32 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// First fit.
    pub(super) fn alloc(&mut self, size: u32) -> Option<u32> {
        let (&off, &len) = self.free.iter().find(|(_, len)| **len >= size)?;
        self.free.remove(&off);
        if len > size {
            self.free.insert(off + size, len - size);
        }
        Some(off)
    }

    /// Returns a region at once (used to undo an allocation made in the same plan).
    pub(super) fn release(&mut self, off: u32, size: u32) {
        let mut off = off;
        let mut size = size;
        if let Some((&next_off, &next_len)) = self.free.range(off + size..).next()
            && next_off == off + size
        {
            self.free.remove(&next_off);
            size += next_len;
        }
        if let Some((&prev_off, &prev_len)) = self.free.range(..off).next_back()
            && prev_off + prev_len == off
        {
            self.free.remove(&prev_off);
            off = prev_off;
            size += prev_len;
        }
        self.free.insert(off, size);
    }
}

/// Backend ids 1..capacity (0 is "none"), with generations and quarantine.
#[derive(Clone, Debug)]
pub(super) struct Ids {
    pub(super) next: u32,
    pub(super) limit: u32,
    pub(super) free: Vec<u32>,
    pub(super) quarantine: Vec<u32>,
    pub(super) generations: HashMap<u32, u32>,
    /// Ids a previous layout version's datapath gave its backends (upgrade), by address and
    /// port: a backend at the same place gets its id and generation back.
    pub(super) inherited: HashMap<(Ipv4Addr, u16), Vec<(u32, u32)>>,
    /// The generation before the first of a fresh id: above every generation a previous
    /// datapath's conntrack entries may name (upgrade), else 0.
    pub(super) floor: u32,
}

impl Ids {
    pub(super) fn new(capacity: u32) -> Self {
        Self {
            next: 1,
            limit: capacity,
            free: Vec::new(),
            quarantine: Vec::new(),
            generations: HashMap::new(),
            inherited: HashMap::new(),
            floor: 0,
        }
    }

    /// The id for a new backend at `addr`: the one a previous layout version gave it, else a
    /// fresh one.
    pub(super) fn alloc_for(&mut self, addr: BackendAddr) -> Option<(u32, u32)> {
        if let Some(ids) = self.inherited.get_mut(&(addr.addr, addr.port))
            && let Some(inherited) = ids.pop()
        {
            return Some(inherited);
        }
        self.alloc()
    }

    pub(super) fn available(&self) -> usize {
        self.free.len() + (self.limit.saturating_sub(self.next)) as usize
    }

    /// A fresh id and its new generation.
    pub(super) fn alloc(&mut self) -> Option<(u32, u32)> {
        let id = if let Some(id) = self.free.pop() {
            id
        } else if self.next < self.limit {
            self.next += 1;
            self.next - 1
        } else {
            return None;
        };
        let g = self.generations.entry(id).or_insert(self.floor);
        *g = g.wrapping_add(1);
        Some((id, *g))
    }
}
