//! Taking over what an earlier agent programmed: [`Programmer::adopt`] rebuilds the
//! bookkeeping from pinned maps after a restart, [`Programmer::inherit_backend_ids`] carries
//! backend ids and generations across an upgrade that changed the maps' layout. Reads the
//! old maps' contents it is given; writes nothing itself (it returns the writes).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{BACKEND_F_DRAINING, BACKEND_F_LOCAL, Backend, Frontend, FrontendKey};

use super::{BackendEntry, Programmed, Programmer, RingEntry};
use crate::{
    control::state::{BackendAddr, FrontendAddr, Proto, Scope, ServicePortRef},
    datapath::maps::Op,
};

/// What [`Programmer::adopt`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adoption {
    pub frontends: usize,
    pub backends: usize,
    pub rings: usize,
}

fn proto_of(n: u8) -> Option<Proto> {
    match n {
        lb_common::IPPROTO_TCP => Some(Proto::Tcp),
        lb_common::IPPROTO_UDP => Some(Proto::Udp),
        _ => None,
    }
}

impl Programmer {
    /// Rebuilds the bookkeeping from maps that a previous agent programmed (pinned maps found
    /// at start), so backend ids (and their generations, which conntrack entries remember),
    /// ring regions and frontends are reused and the first sync writes only differences.
    /// `ring(offset, size)` reads a ring region. Frontends keep their values; their services
    /// are unknown until the first sync names them (which rewrites only their service id).
    pub fn adopt(
        &mut self,
        frontends: &[(FrontendKey, Frontend)],
        backends: &[(u32, Backend)],
        ring: impl Fn(u32, u32) -> Vec<u32>,
    ) -> Adoption {
        let by_id: HashMap<u32, &Backend> = backends
            .iter()
            .filter(|(_, b)| b.addr_be != 0)
            .map(|(id, b)| (*id, b))
            .collect();
        let mut used_regions: BTreeMap<u32, u32> = BTreeMap::new();
        let mut adoption = Adoption::default();
        for (key, value) in frontends {
            let Some(proto) = proto_of(key.proto) else {
                continue;
            };
            let addr = FrontendAddr {
                addr: Ipv4Addr::from(key.addr_be.to_ne_bytes()),
                port: u16::from_be(key.port_be),
                proto,
                scope: if key.scope == Scope::Internal as u8 {
                    Scope::Internal
                } else {
                    Scope::External
                },
            };
            let mut members: Vec<BackendAddr> = Vec::new();
            if value.ring_size > 0 {
                let mut ids: Vec<u32> = ring(value.ring_offset, value.ring_size);
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    let Some(b) = by_id.get(&id) else { continue };
                    let baddr = BackendAddr {
                        addr: Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                        port: u16::from_be(b.port_be),
                        proto,
                    };
                    members.push(baddr);
                    self.backends.entry(baddr).or_insert(BackendEntry {
                        id,
                        generation: b.generation,
                        local: b.flags & BACKEND_F_LOCAL != 0,
                        rings: 0,
                    });
                    self.ids.generations.insert(id, b.generation);
                    self.ids.next = self.ids.next.max(id + 1);
                }
                members.sort();
                used_regions.insert(value.ring_offset, value.ring_size);
                let ring_entry = self.rings.entry(members.clone()).or_insert_with(|| {
                    adoption.rings += 1;
                    RingEntry {
                        offset: value.ring_offset,
                        size: value.ring_size,
                        frontends: 0,
                    }
                });
                ring_entry.frontends += 1;
            }
            self.next_service_id = self.next_service_id.max(value.service_id + 1);
            let service = ServicePortRef {
                namespace: "".into(),
                name: format!("(adopted service {})", value.service_id).into(),
                port_name: "".into(),
            };
            self.stale.insert(addr);
            self.frontends.insert(
                addr,
                Programmed {
                    value: *value,
                    ring: members,
                    service,
                },
            );
            adoption.frontends += 1;
        }
        // Ring membership counts per backend, ids nobody uses become free.
        for members in self.rings.keys() {
            for a in members {
                if let Some(b) = self.backends.get_mut(a) {
                    b.rings += 1;
                }
            }
        }
        let live: BTreeSet<u32> = self.backends.values().map(|b| b.id).collect();
        self.ids.free = (1..self.ids.next).filter(|id| !live.contains(id)).collect();
        for (id, b) in &by_id {
            self.ids.generations.entry(*id).or_insert(b.generation);
        }
        adoption.backends = self.backends.len();
        // The slab: everything not in an adopted region is free.
        let capacity: u32 = self.slab.free.values().sum();
        let mut free = BTreeMap::new();
        let mut cursor = 0u32;
        for (&off, &size) in &used_regions {
            if off > cursor {
                free.insert(cursor, off - cursor);
            }
            cursor = cursor.max(off + size);
        }
        if capacity > cursor {
            free.insert(cursor, capacity - cursor);
        }
        self.slab.free = free;
        self.needs_full = true;
        adoption
    }

    /// Before the first sync of an upgrade across layout versions, whose flow maps were taken
    /// over: `old` is the previous version's backends map. Backends at the same address and
    /// port get their old id and generation back, so the conntrack entries the old programs
    /// made keep naming the right backend; an id that now goes to another backend gets a newer
    /// generation, which invalidates the old entries naming it. Draining backends (their
    /// established TCP flows continue) stay draining under their ids: the returned writes put
    /// them into this version's backends map. Call [`Programmer::release_inherited`] after the
    /// first sync.
    pub fn inherit_backend_ids(&mut self, old: &[(u32, Backend)]) -> Vec<Op> {
        let mut writes = Vec::new();
        let ids = &mut self.ids;
        // Entries of backends removed before the upgrade are zeroed: their last generation is
        // unknown, so fresh ids start well above every generation still visible.
        let highest = old.iter().map(|(_, b)| b.generation).max().unwrap_or(0);
        ids.floor = highest.saturating_add(1 << 16);
        for (id, b) in old {
            if *id == 0 || *id >= ids.limit || b.addr_be == 0 {
                continue;
            }
            ids.generations.insert(*id, ids.floor);
            ids.next = ids.next.max(id + 1);
            let place = (
                Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                u16::from_be(b.port_be),
            );
            if b.flags & BACKEND_F_DRAINING != 0 {
                // Draining matters for TCP (UDP flows move on anyway).
                let addr = BackendAddr {
                    addr: place.0,
                    port: place.1,
                    proto: Proto::Tcp,
                };
                self.drain_seq += 1;
                self.drain_order.insert(self.drain_seq, addr);
                let entry = BackendEntry {
                    id: *id,
                    generation: b.generation,
                    local: b.flags & BACKEND_F_LOCAL != 0,
                    rings: 0,
                };
                self.draining.insert(addr, (self.drain_seq, entry));
                writes.push(Op::SetBackend { id: *id, value: *b });
                continue;
            }
            ids.inherited
                .entry(place)
                .or_default()
                .push((*id, b.generation));
        }
        let reserved: BTreeSet<u32> = ids
            .inherited
            .values()
            .flatten()
            .map(|(id, _)| *id)
            .chain(self.draining.values().map(|(_, b)| b.id))
            .collect();
        ids.free = (1..ids.next)
            .rev()
            .filter(|id| !reserved.contains(id))
            .collect();
        writes
    }

    /// Frees the inherited ids no backend claimed (their backends left during the upgrade).
    pub fn release_inherited(&mut self) {
        let in_use: BTreeSet<u32> = self
            .backends
            .values()
            .chain(self.draining.values().map(|(_, b)| b))
            .map(|b| b.id)
            .collect();
        let ids = &mut self.ids;
        for (id, _) in ids.inherited.drain().flat_map(|(_, v)| v) {
            if !in_use.contains(&id) && !ids.free.contains(&id) {
                ids.free.push(id);
            }
        }
    }
}
