//! From desired state to map writes. [`Programmer::plan`] diffs what is programmed against
//! what is desired and returns the writes, ordered so that the datapath never sees a
//! half-programmed service:
//!
//! 1. backends (new ids, changed flags),
//! 2. new Maglev ring regions,
//! 3. frontend flips (new or changed frontends now point at complete rings),
//! 4. removed frontends,
//! 5. backends no longer used by any ring.
//!
//! Ring regions and backend ids freed by a plan are quarantined until the next plan, so a
//! packet that read the old frontend just before the flip never finds its region or backend
//! reused under it. Backend ids are stable while a backend is in use; a reused id gets a new
//! generation, which invalidates conntrack entries of its previous owner. Frontends with the
//! same backend set share one ring. A service that does not fit the maps' capacities fails
//! whole (its previous state stays programmed) and is reported.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{
    BACKEND_F_DRAINING, BACKEND_F_LOCAL, Backend, FRONTEND_F_SNAT_REMOTE, Frontend, FrontendKey,
};
use tracing::warn;

use crate::{
    control::{
        maglev,
        state::{
            BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendSpec, Proto, Scope,
            ServicePortRef,
        },
    },
    datapath::{loader::Capacities, maps::Op},
};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no free backend ids ({needed} needed, {free} free)")]
    BackendsFull { needed: usize, free: usize },
    #[error("the frontends map is full ({needed} more needed, {free} free)")]
    FrontendsFull { needed: usize, free: usize },
    #[error("the ring slab has no room for a {backends}-backend ring")]
    RingsFull { backends: usize },
}

/// The map key of a frontend.
#[must_use]
pub fn frontend_key(f: &FrontendAddr) -> FrontendKey {
    FrontendKey {
        addr_be: u32::from_ne_bytes(f.addr.octets()),
        port_be: f.port.to_be(),
        proto: f.proto.number(),
        scope: f.scope as u8,
    }
}

/// The map value of a backend.
#[must_use]
pub fn backend_value(b: &BackendAddr, generation: u32, local: bool) -> Backend {
    Backend {
        addr_be: u32::from_ne_bytes(b.addr.octets()),
        port_be: b.port.to_be(),
        _pad0: 0,
        generation,
        flags: if local { BACKEND_F_LOCAL } else { 0 },
    }
}

/// Identity bytes of a backend for Maglev: the same on every node.
fn maglev_id(b: BackendAddr) -> String {
    format!("{}:{}/{}", b.addr, b.port, b.proto)
}

#[derive(Clone, Debug)]
struct BackendEntry {
    id: u32,
    generation: u32,
    local: bool,
    /// Live rings containing this backend.
    rings: u32,
}

#[derive(Clone, Debug)]
struct RingEntry {
    offset: u32,
    size: u32,
    /// Frontends using this ring.
    frontends: u32,
}

#[derive(Clone, Debug)]
struct ServiceEntry {
    id: u32,
    /// Programmed frontends of the service.
    frontends: u32,
}

#[derive(Clone, Debug)]
struct Programmed {
    value: Frontend,
    ring: Vec<BackendAddr>,
    service: ServicePortRef,
}

/// Free-list allocator over `[0, capacity)` with quarantine.
#[derive(Clone, Debug)]
struct Slab {
    free: BTreeMap<u32, u32>,
    quarantine: Vec<(u32, u32)>,
}

impl Slab {
    fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            free,
            quarantine: Vec::new(),
        }
    }

    fn largest(&self) -> u32 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// First fit.
    fn alloc(&mut self, size: u32) -> Option<u32> {
        let (&off, &len) = self.free.iter().find(|(_, len)| **len >= size)?;
        self.free.remove(&off);
        if len > size {
            self.free.insert(off + size, len - size);
        }
        Some(off)
    }

    /// Returns a region at once (used to undo an allocation made in the same plan).
    fn release(&mut self, off: u32, size: u32) {
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
struct Ids {
    next: u32,
    limit: u32,
    free: Vec<u32>,
    quarantine: Vec<u32>,
    generations: HashMap<u32, u32>,
    /// Ids a previous layout version's datapath gave its backends (upgrade), by address and
    /// port: a backend at the same place gets its id and generation back.
    inherited: HashMap<(Ipv4Addr, u16), Vec<(u32, u32)>>,
    /// The generation before the first of a fresh id: above every generation a previous
    /// datapath's conntrack entries may name (upgrade), else 0.
    floor: u32,
}

impl Ids {
    fn new(capacity: u32) -> Self {
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
    fn alloc_for(&mut self, addr: BackendAddr) -> Option<(u32, u32)> {
        if let Some(ids) = self.inherited.get_mut(&(addr.addr, addr.port))
            && let Some(inherited) = ids.pop()
        {
            return Some(inherited);
        }
        self.alloc()
    }

    fn available(&self) -> usize {
        self.free.len() + (self.limit.saturating_sub(self.next)) as usize
    }

    /// A fresh id and its new generation.
    fn alloc(&mut self) -> Option<(u32, u32)> {
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

/// Ordered writes for one sync, and the services that could not be programmed.
#[derive(Debug, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub failed: Vec<(ServicePortRef, PlanError)>,
}

/// What is programmed, and the allocators behind it.
#[derive(Clone, Debug)]
pub struct Programmer {
    frontend_capacity: usize,
    backends: HashMap<BackendAddr, BackendEntry>,
    /// Backends no ring holds any more, kept (flagged draining) so established TCP flows keep
    /// them, in the order they started draining; an id is taken back from the oldest when
    /// the pool runs dry, and a backend that returns gets its old id again.
    draining: HashMap<BackendAddr, (u64, BackendEntry)>,
    drain_order: BTreeMap<u64, BackendAddr>,
    drain_seq: u64,
    ids: Ids,
    rings: HashMap<Vec<BackendAddr>, RingEntry>,
    slab: Slab,
    frontends: BTreeMap<FrontendAddr, Programmed>,
    /// Each service port's id and number of programmed frontends.
    service_ids: HashMap<ServicePortRef, ServiceEntry>,
    free_service_ids: Vec<u32>,
    next_service_id: u32,
    /// Bumped whenever a service id is given or freed: [`Programmer::services`] is O(services),
    /// so a caller that keeps its result asks again only when this moved.
    services_generation: u64,
    /// Services that failed in the last plan, with the frontends they wanted: retried by
    /// every plan until they fit.
    failed: BTreeMap<ServicePortRef, Vec<FrontendAddr>>,
    /// Programmed frontends that the last plan's desired state did not have (their service
    /// failed, or they were adopted): removal candidates of the next incremental plan.
    stale: BTreeSet<FrontendAddr>,
    /// Backends whose last ring went during this plan.
    maybe_dead: BTreeSet<BackendAddr>,
    /// Services whose programmed frontend count fell to zero during this plan.
    maybe_unused: BTreeSet<ServicePortRef>,
    /// Adopted frontends belong to no known service yet: the next plan must be a full one.
    needs_full: bool,
}

/// What a plan looks at.
#[derive(Clone, Copy)]
enum Scan<'a> {
    /// Every desired and programmed frontend, every backend and service id.
    All,
    /// The frontends whose desired spec may differ from the previous plan's, plus what that
    /// plan left pending (failed services, stale frontends).
    Changed(&'a BTreeSet<FrontendAddr>),
}

#[derive(Default)]
struct Buckets {
    backends: Vec<Op>,
    rings: Vec<Op>,
    frontends: Vec<Op>,
}

impl Programmer {
    #[must_use]
    pub fn new(caps: &Capacities) -> Self {
        Self {
            frontend_capacity: caps.frontends as usize,
            backends: HashMap::new(),
            draining: HashMap::new(),
            drain_order: BTreeMap::new(),
            drain_seq: 0,
            ids: Ids::new(caps.backends),
            rings: HashMap::new(),
            slab: Slab::new(caps.ring_slots),
            frontends: BTreeMap::new(),
            service_ids: HashMap::new(),
            free_service_ids: Vec::new(),
            next_service_id: 1,
            services_generation: 0,
            failed: BTreeMap::new(),
            stale: BTreeSet::new(),
            maybe_dead: BTreeSet::new(),
            maybe_unused: BTreeSet::new(),
            needs_full: false,
        }
    }

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

    /// Changes whenever [`Programmer::services`] may give another result.
    #[must_use]
    pub fn services_generation(&self) -> u64 {
        self.services_generation
    }

    /// Service ports and the ids the datapath counts them under.
    #[must_use]
    pub fn services(&self) -> Vec<(String, u32)> {
        self.service_ids
            .iter()
            .map(|(s, e)| (s.to_string(), e.id))
            .collect()
    }

    /// Number of programmed frontends.
    #[must_use]
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Number of backends in use.
    #[must_use]
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Ring slots in use.
    #[must_use]
    pub fn ring_slots_used(&self) -> u64 {
        self.rings.values().map(|r| u64::from(r.size)).sum()
    }

    /// The writes that turn what is programmed into `desired`. The programmer assumes they
    /// will all be applied, in order. Looks at every frontend; [`Programmer::plan_changes`]
    /// gives the same writes looking only at what changed.
    pub fn plan(&mut self, desired: &DesiredState) -> Plan {
        self.plan_scan(desired, Scan::All)
    }

    /// [`Programmer::plan`] for a `desired` state that differs from the one of the previous
    /// plan at most at the frontends in `changed`: it gives the same writes, but visits only
    /// those frontends (and those of services that failed before), so its cost follows the
    /// change, not the number of services. The first plan after [`Programmer::adopt`] is a
    /// full one.
    pub fn plan_changes(
        &mut self,
        desired: &DesiredState,
        changed: &BTreeSet<FrontendAddr>,
    ) -> Plan {
        if self.needs_full {
            return self.plan(desired);
        }
        self.plan_scan(desired, Scan::Changed(changed))
    }

    fn plan_scan(&mut self, desired: &DesiredState, scan: Scan<'_>) -> Plan {
        // Whatever the previous plan freed has now been unreachable for a whole sync.
        for (off, size) in std::mem::take(&mut self.slab.quarantine) {
            self.slab.release(off, size);
        }
        let quarantined = std::mem::take(&mut self.ids.quarantine);
        self.ids.free.extend(quarantined);
        self.needs_full = false;

        let by_service = self.services_to_plan(desired, scan);
        let mut plan = Plan::default();
        let mut out = Buckets::default();
        let mut failed = BTreeMap::new();
        for (service, frontends) in &by_service {
            if let Err(e) = self.plan_service(service, frontends, &mut out) {
                warn!(service = %service, error = %e, "service not programmed");
                plan.failed.push(((*service).clone(), e));
                let wanted = frontends.iter().map(|(a, _)| **a).collect();
                failed.insert((*service).clone(), wanted);
            }
        }
        self.failed = failed;
        // Frontends no longer desired; a failed service keeps what it had.
        let candidates: Vec<FrontendAddr> = match scan {
            Scan::All => self.frontends.keys().copied().collect(),
            Scan::Changed(changed) => {
                let stale = std::mem::take(&mut self.stale);
                changed.union(&stale).copied().collect()
            }
        };
        self.stale.clear();
        let mut removals = Vec::new();
        for key in candidates {
            let Some(p) = self.frontends.get(&key) else {
                continue;
            };
            if desired.frontends.contains_key(&key) {
                continue;
            }
            if self.failed.contains_key(&p.service) {
                self.stale.insert(key);
                continue;
            }
            if let Some(p) = self.frontends.remove(&key) {
                removals.push(Op::RemoveFrontend {
                    key: frontend_key(&key),
                });
                self.count_frontend(&p.service, false);
                self.unref_ring(&p.ring);
            }
        }
        // Backends that no live ring uses any more, in address order.
        let maybe_dead = std::mem::take(&mut self.maybe_dead);
        let dead: Vec<BackendAddr> = match scan {
            Scan::All => {
                let mut dead: Vec<BackendAddr> = self
                    .backends
                    .iter()
                    .filter(|(_, b)| b.rings == 0)
                    .map(|(a, _)| *a)
                    .collect();
                dead.sort_unstable();
                dead
            }
            Scan::Changed(_) => maybe_dead
                .into_iter()
                .filter(|a| self.backends.get(a).is_some_and(|b| b.rings == 0))
                .collect(),
        };
        let mut clears = Vec::new();
        for addr in dead {
            if let Some(b) = self.backends.remove(&addr) {
                let mut value = backend_value(&addr, b.generation, b.local);
                value.flags |= BACKEND_F_DRAINING;
                clears.push(Op::SetBackend { id: b.id, value });
                self.drain_seq += 1;
                self.drain_order.insert(self.drain_seq, addr);
                self.draining.insert(addr, (self.drain_seq, b));
            }
        }
        self.release_unused_service_ids(scan);
        plan.ops = out.backends;
        plan.ops.append(&mut out.rings);
        plan.ops.append(&mut out.frontends);
        plan.ops.append(&mut removals);
        plan.ops.append(&mut clears);
        plan
    }

    /// The services a plan visits, each with its desired frontends in address order: all of
    /// them, or those of the changed frontends and those that failed before.
    fn services_to_plan<'d>(
        &self,
        desired: &'d DesiredState,
        scan: Scan<'_>,
    ) -> BTreeMap<&'d ServicePortRef, Vec<(&'d FrontendAddr, &'d FrontendSpec)>> {
        let mut by_service: BTreeMap<&ServicePortRef, Vec<(&FrontendAddr, &FrontendSpec)>> =
            BTreeMap::new();
        let Scan::Changed(changed) = scan else {
            for (addr, spec) in &desired.frontends {
                by_service
                    .entry(&spec.service)
                    .or_default()
                    .push((addr, spec));
            }
            return by_service;
        };
        // Planning is per frontend: a service's unchanged frontends are programmed already
        // and would add no write, no allocation and no capacity need, so the changed ones
        // and those a failed service still wants are all there is to plan.
        let mut addrs: BTreeSet<&FrontendAddr> = changed.iter().collect();
        addrs.extend(self.failed.values().flatten());
        for addr in addrs {
            if let Some((addr, spec)) = desired.frontends.get_key_value(addr) {
                by_service
                    .entry(&spec.service)
                    .or_default()
                    .push((addr, spec));
            }
        }
        by_service
    }

    fn plan_service(
        &mut self,
        service: &ServicePortRef,
        frontends: &[(&FrontendAddr, &FrontendSpec)],
        out: &mut Buckets,
    ) -> Result<(), PlanError> {
        // Capacity first, so a failure leaves nothing half-done.
        self.check_capacity(frontends)?;
        let new_rings = self.allocate_rings(frontends)?;
        let service_id = self.service_id(service);
        self.emit_backends(frontends, out);
        self.emit_rings(new_rings, out);
        self.emit_frontends(service, service_id, frontends, out);
        Ok(())
    }

    fn check_capacity(
        &self,
        frontends: &[(&FrontendAddr, &FrontendSpec)],
    ) -> Result<(), PlanError> {
        let new_frontends = frontends
            .iter()
            .filter(|(a, _)| !self.frontends.contains_key(a))
            .count();
        let free_frontends = self.frontend_capacity.saturating_sub(self.frontends.len());
        if new_frontends > free_frontends {
            return Err(PlanError::FrontendsFull {
                needed: new_frontends,
                free: free_frontends,
            });
        }
        let wanted: BTreeSet<BackendAddr> = frontends
            .iter()
            .flat_map(|(_, s)| s.backends.iter().map(|b| b.addr))
            .filter(|a| !self.backends.contains_key(a))
            .collect();
        let returning = wanted
            .iter()
            .filter(|a| self.draining.contains_key(a))
            .count();
        // Backends of an upgrade's previous datapath get their old ids back (Ids::alloc_for).
        let mut at_place: HashMap<(Ipv4Addr, u16), usize> = HashMap::new();
        for a in wanted.iter().filter(|a| !self.draining.contains_key(a)) {
            *at_place.entry((a.addr, a.port)).or_default() += 1;
        }
        let inherited: usize = at_place
            .iter()
            .map(|(place, n)| (*n).min(self.ids.inherited.get(place).map_or(0, Vec::len)))
            .sum();
        let new_backends = wanted.len() - returning - inherited;
        // Ids of draining backends can be taken back, except those of backends that return.
        let free = self.ids.available() + self.draining.len() - returning;
        if new_backends > free {
            return Err(PlanError::BackendsFull {
                needed: new_backends,
                free,
            });
        }
        Ok(())
    }

    /// Allocates the rings these frontends need that do not exist yet: all of them, or none.
    fn allocate_rings(
        &mut self,
        frontends: &[(&FrontendAddr, &FrontendSpec)],
    ) -> Result<Vec<(Vec<BackendAddr>, u32, u32)>, PlanError> {
        let mut new_rings: Vec<(Vec<BackendAddr>, u32, u32)> = Vec::new();
        for (addr, spec) in frontends {
            let members: Vec<BackendAddr> = spec.backends.iter().map(|b| b.addr).collect();
            if members.is_empty()
                || self.rings.contains_key(&members)
                || new_rings.iter().any(|(m, _, _)| *m == members)
            {
                continue;
            }
            let current = self
                .frontends
                .get(addr)
                .and_then(|p| self.rings.get(&p.ring))
                .map(|r| r.size);
            let region = maglev::table_size(members.len(), current, self.slab.largest())
                .and_then(|m| self.slab.alloc(m).map(|off| (off, m)));
            let Some((off, m)) = region else {
                for (_, off, m) in new_rings {
                    self.slab.release(off, m);
                }
                return Err(PlanError::RingsFull {
                    backends: members.len(),
                });
            };
            new_rings.push((members, off, m));
        }
        Ok(new_rings)
    }

    /// New backends, backends back from draining, and backends whose locality changed.
    /// Returning backends are taken back first, so a new backend never takes the id of one
    /// that returns in the same service (which would end its established flows).
    fn emit_backends(&mut self, frontends: &[(&FrontendAddr, &FrontendSpec)], out: &mut Buckets) {
        let all: BTreeMap<BackendAddr, &BackendSpec> = frontends
            .iter()
            .flat_map(|(_, s)| s.backends.iter().map(|b| (b.addr, b)))
            .collect();
        let mut new = Vec::new();
        for (addr, spec) in all {
            match self.backends.get_mut(&addr) {
                Some(b) if b.local == spec.local => {}
                Some(b) => {
                    b.local = spec.local;
                    out.backends.push(Op::SetBackend {
                        id: b.id,
                        value: backend_value(&addr, b.generation, b.local),
                    });
                }
                None => {
                    let Some((seq, b)) = self.draining.remove(&addr) else {
                        new.push((addr, spec));
                        continue;
                    };
                    // Back from draining: same id and generation, so its established flows
                    // stay valid.
                    self.drain_order.remove(&seq);
                    let value = backend_value(&addr, b.generation, spec.local);
                    out.backends.push(Op::SetBackend { id: b.id, value });
                    self.backends.insert(
                        addr,
                        BackendEntry {
                            local: spec.local,
                            ..b
                        },
                    );
                }
            }
        }
        for (addr, spec) in new {
            // check_capacity made sure ids are available (maybe from draining ones); a backend
            // a previous layout version knew gets its id back.
            let Some((id, generation)) =
                self.ids.alloc_for(addr).or_else(|| self.reclaim_draining())
            else {
                continue;
            };
            let entry = BackendEntry {
                id,
                generation,
                local: spec.local,
                rings: 0,
            };
            self.backends.insert(addr, entry);
            out.backends.push(Op::SetBackend {
                id,
                value: backend_value(&addr, generation, spec.local),
            });
        }
    }

    /// Maglev tables for the newly allocated rings.
    fn emit_rings(&mut self, new_rings: Vec<(Vec<BackendAddr>, u32, u32)>, out: &mut Buckets) {
        for (members, offset, size) in new_rings {
            let ids: Vec<(String, u32)> = members
                .iter()
                .map(|a| (maglev_id(*a), self.backends.get(a).map_or(0, |b| b.id)))
                .collect();
            let input: Vec<(&[u8], u32)> = ids.iter().map(|(n, id)| (n.as_bytes(), *id)).collect();
            out.rings.push(Op::WriteRing {
                offset,
                slots: maglev::populate(&input, size),
            });
            for a in &members {
                if let Some(b) = self.backends.get_mut(a) {
                    b.rings += 1;
                }
            }
            self.rings.insert(
                members,
                RingEntry {
                    offset,
                    size,
                    frontends: 0,
                },
            );
        }
    }

    /// Frontend flips: new or changed frontends now point at complete rings.
    fn emit_frontends(
        &mut self,
        service: &ServicePortRef,
        service_id: u32,
        frontends: &[(&FrontendAddr, &FrontendSpec)],
        out: &mut Buckets,
    ) {
        for (addr, spec) in frontends {
            let members: Vec<BackendAddr> = spec.backends.iter().map(|b| b.addr).collect();
            let (ring_offset, ring_size) = self
                .rings
                .get(&members)
                .map_or((0, 0), |r| (r.offset, r.size));
            let value = Frontend {
                service_id,
                ring_offset,
                ring_size,
                backend_count: members.len() as u32,
                flags: if spec.snat_remote {
                    FRONTEND_F_SNAT_REMOTE
                } else {
                    0
                },
                affinity_timeout_s: spec.affinity_timeout_s,
            };
            if let Some(p) = self.frontends.get(addr)
                && p.value == value
                && p.ring == members
            {
                continue;
            }
            if let Some(r) = self.rings.get_mut(&members) {
                r.frontends += 1;
            }
            out.frontends.push(Op::SetFrontend {
                key: frontend_key(addr),
                value,
            });
            let programmed = Programmed {
                value,
                ring: members,
                service: service.clone(),
            };
            if let Some(old) = self.frontends.insert(**addr, programmed) {
                self.count_frontend(&old.service, false);
                self.unref_ring(&old.ring);
            }
            self.count_frontend(service, true);
        }
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

    /// Takes the id of the backend that has been draining longest, with a new generation
    /// (which invalidates the conntrack entries that still name it).
    fn reclaim_draining(&mut self) -> Option<(u32, u32)> {
        let (&seq, &addr) = self.drain_order.iter().next()?;
        self.drain_order.remove(&seq);
        let (_, b) = self.draining.remove(&addr)?;
        let g = self.ids.generations.entry(b.id).or_insert(0);
        *g = g.wrapping_add(1);
        Some((b.id, *g))
    }

    /// Backends draining now (no ring holds them; their TCP flows continue).
    #[must_use]
    pub fn draining_count(&self) -> usize {
        self.draining.len()
    }

    /// One frontend stopped using `ring`; a ring nobody uses is freed (quarantined).
    fn unref_ring(&mut self, ring: &[BackendAddr]) {
        let Some(r) = self.rings.get_mut(ring) else {
            return;
        };
        r.frontends = r.frontends.saturating_sub(1);
        if r.frontends > 0 {
            return;
        }
        if let Some(r) = self.rings.remove(ring) {
            self.slab.quarantine.push((r.offset, r.size));
            for a in ring {
                if let Some(b) = self.backends.get_mut(a) {
                    b.rings = b.rings.saturating_sub(1);
                    if b.rings == 0 {
                        self.maybe_dead.insert(*a);
                    }
                }
            }
        }
    }

    /// One more (`added`) or one less frontend programmed for `service`.
    fn count_frontend(&mut self, service: &ServicePortRef, added: bool) {
        // Adopted frontends belong to services without an id.
        let Some(entry) = self.service_ids.get_mut(service) else {
            return;
        };
        if added {
            entry.frontends += 1;
        } else {
            entry.frontends = entry.frontends.saturating_sub(1);
            if entry.frontends == 0 {
                self.maybe_unused.insert(service.clone());
            }
        }
    }

    fn service_id(&mut self, service: &ServicePortRef) -> u32 {
        if let Some(entry) = self.service_ids.get(service) {
            return entry.id;
        }
        let id = self.free_service_ids.pop().unwrap_or_else(|| {
            self.next_service_id += 1;
            self.next_service_id - 1
        });
        self.service_ids
            .insert(service.clone(), ServiceEntry { id, frontends: 0 });
        self.services_generation += 1;
        id
    }

    /// Frees the ids of services without programmed frontends, in service order.
    fn release_unused_service_ids(&mut self, scan: Scan<'_>) {
        let maybe_unused = std::mem::take(&mut self.maybe_unused);
        let dead: Vec<ServicePortRef> = match scan {
            Scan::All => {
                let live: BTreeSet<&ServicePortRef> =
                    self.frontends.values().map(|p| &p.service).collect();
                let mut dead: Vec<ServicePortRef> = self
                    .service_ids
                    .keys()
                    .filter(|s| !live.contains(s))
                    .cloned()
                    .collect();
                dead.sort_unstable();
                dead
            }
            Scan::Changed(_) => maybe_unused
                .into_iter()
                .filter(|s| self.service_ids.get(s).is_some_and(|e| e.frontends == 0))
                .collect(),
        };
        for s in dead {
            if let Some(entry) = self.service_ids.remove(&s) {
                self.services_generation += 1;
                self.free_service_ids.push(entry.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::Ipv4Addr,
    };

    use super::{PlanError, Programmer, backend_value, frontend_key};
    use crate::{
        control::state::{
            BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec,
            Proto, Scope, ServicePortRef,
        },
        datapath::{
            loader::Capacities,
            maps::{FakeMaps, LbMaps as _, Op},
        },
    };

    fn caps() -> Capacities {
        Capacities {
            frontends: 1024,
            backends: 4096,
            ring_slots: 1 << 20,
            conntrack: 1024,
            nat_buckets: 1024,
            flow_buckets: 1024,
        }
    }

    fn svc(name: &str) -> ServicePortRef {
        ServicePortRef {
            namespace: "default".into(),
            name: name.into(),
            port_name: "".into(),
        }
    }

    fn fe(ip: [u8; 4], port: u16, scope: Scope) -> FrontendAddr {
        FrontendAddr {
            addr: Ipv4Addr::from(ip),
            port,
            proto: Proto::Tcp,
            scope,
        }
    }

    fn backend(last: u8, local: bool) -> BackendSpec {
        BackendSpec {
            addr: BackendAddr {
                addr: Ipv4Addr::new(10, 244, 1, last),
                port: 8080,
                proto: Proto::Tcp,
            },
            local,
        }
    }

    fn spec(name: &str, backends: Vec<BackendSpec>) -> FrontendSpec {
        FrontendSpec {
            service: svc(name),
            kind: FrontendKind::ClusterIp,
            backends,
            snat_remote: true,
            affinity_timeout_s: 0,
        }
    }

    fn state(entries: Vec<(FrontendAddr, FrontendSpec)>) -> DesiredState {
        DesiredState {
            frontends: entries.into_iter().collect(),
        }
    }

    fn apply(p: &mut Programmer, maps: &mut FakeMaps, d: &DesiredState) -> Vec<Op> {
        let plan = p.plan(d);
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
        for op in &plan.ops {
            maps.apply(op).expect("fake apply");
        }
        plan.ops
    }

    #[test]
    fn tomcat6_programs_backends_ring_then_frontends() {
        let mut p = Programmer::new(&caps());
        let mut maps = FakeMaps::default();
        let backends = vec![backend(5, true), backend(6, false), backend(7, false)];
        let d = state(vec![
            (
                fe([10, 96, 0, 10], 80, Scope::Internal),
                spec("tomcat6", backends.clone()),
            ),
            (
                fe([192, 168, 50, 11], 32510, Scope::External),
                spec("tomcat6", backends),
            ),
        ]);
        let ops = apply(&mut p, &mut maps, &d);
        let kinds: Vec<&str> = ops
            .iter()
            .map(|o| match o {
                Op::SetBackend { .. } => "backend",
                Op::WriteRing { .. } => "ring",
                Op::SetFrontend { .. } => "frontend",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "backend", "backend", "backend", "ring", "frontend", "frontend"
            ]
        );
        // Both frontends share one ring of a prime size ≥ 300.
        let fes: Vec<_> = maps.frontends.values().collect();
        assert_eq!(fes[0].ring_offset, fes[1].ring_offset);
        assert!(fes[0].ring_size >= 300);
        assert_eq!(fes[0].backend_count, 3);
        // The same state again writes nothing.
        assert!(apply(&mut p, &mut maps, &d).is_empty());
    }

    #[test]
    fn backend_ids_are_stable_draining_keeps_them_and_reuse_bumps_generation() {
        // Ids 1 and 2 only.
        let mut p = Programmer::new(&Capacities {
            backends: 3,
            ..caps()
        });
        let mut maps = FakeMaps::default();
        let f = fe([10, 96, 0, 10], 80, Scope::Internal);
        let with = |b: Vec<BackendSpec>| state(vec![(f, spec("a", b))]);
        apply(
            &mut p,
            &mut maps,
            &with(vec![backend(1, false), backend(2, false)]),
        );
        let id_of = |maps: &FakeMaps, last: u8| {
            let want = backend_value(&backend(last, false).addr, 0, false).addr_be;
            maps.backends
                .iter()
                .find(|(_, b)| b.addr_be == want)
                .map(|(id, b)| {
                    (
                        *id,
                        b.generation,
                        b.flags & lb_common::BACKEND_F_DRAINING != 0,
                    )
                })
        };
        let (id1, g1, _) = id_of(&maps, 1).expect("backend 1");
        let (id2, g2, _) = id_of(&maps, 2).expect("backend 2");
        // Removing backend 1 keeps backend 2's id and leaves 1 draining: its established TCP
        // flows keep going.
        apply(&mut p, &mut maps, &with(vec![backend(2, false)]));
        assert_eq!(id_of(&maps, 2), Some((id2, g2, false)));
        assert_eq!(id_of(&maps, 1), Some((id1, g1, true)));
        assert_eq!(p.draining_count(), 1);
        // It comes back (readiness flipped back): same id and generation, not draining.
        apply(
            &mut p,
            &mut maps,
            &with(vec![backend(1, false), backend(2, false)]),
        );
        assert_eq!(id_of(&maps, 1), Some((id1, g1, false)));
        // Drained again, then a new backend needs an id: the draining one's id is taken back
        // with a new generation, which invalidates conntrack entries naming it.
        apply(&mut p, &mut maps, &with(vec![backend(2, false)]));
        apply(
            &mut p,
            &mut maps,
            &with(vec![backend(2, false), backend(3, false)]),
        );
        let (id3, g3, draining) = id_of(&maps, 3).expect("backend 3");
        assert_eq!((id3, draining), (id1, false));
        assert!(g3 > g1, "a reused id keeps its generation");
        assert_eq!(id_of(&maps, 1), None);
    }

    /// An upgrade across layout versions keeps the old datapath's conntrack entries valid
    /// for backends still at the same address, and no old entry names a backend that moved.
    #[test]
    fn an_upgrade_inherits_backend_ids_by_address() {
        // The old datapath: .5 as id 7 (generation 3), .6 as id 2 (generation 1), id 4 .4.
        let f = fe([10, 96, 0, 10], 80, Scope::Internal);
        let seen = |maps: &FakeMaps, last: u8| {
            maps.backends
                .iter()
                .find(|(_, b)| b.addr_be == u32::from_ne_bytes([10, 244, 1, last]))
                .map(|(id, b)| (*id, b.generation))
        };
        let previous = vec![
            (7, backend_value(&backend(5, true).addr, 3, true)),
            (2, backend_value(&backend(6, false).addr, 1, false)),
            (4, backend_value(&backend(4, false).addr, 0, false)),
        ];
        let mut new = Programmer::new(&caps());
        new.inherit_backend_ids(&previous);
        let mut maps = FakeMaps::default();
        let d = state(vec![(
            f,
            spec(
                "a",
                vec![backend(5, true), backend(6, false), backend(8, false)],
            ),
        )]);
        apply(&mut new, &mut maps, &d);
        new.release_inherited();
        assert_eq!(seen(&maps, 5), Some((7, 3)));
        assert_eq!(seen(&maps, 6), Some((2, 1)));
        let (id, generation) = seen(&maps, 8).expect(".8 programmed");
        assert!(![7, 2].contains(&id), "{id}");
        assert!(
            generation > 3 + (1 << 15),
            "{generation}: an old entry could name it"
        );
    }

    /// A backend returning from draining keeps its id even when a new backend of the same
    /// service needs a draining one's id; and it is no id a new backend can count on.
    #[test]
    fn a_returning_backend_keeps_its_id_when_the_pool_is_dry() {
        // Ids 1 and 2 only.
        let caps = Capacities {
            backends: 3,
            ..caps()
        };
        let mut p = Programmer::new(&caps);
        let mut maps = FakeMaps::default();
        let f = fe([10, 96, 0, 10], 80, Scope::Internal);
        let with = |b: Vec<BackendSpec>| state(vec![(f, spec("a", b))]);
        let id_of = |maps: &FakeMaps, last: u8| {
            let want = backend_value(&backend(last, false).addr, 0, false).addr_be;
            maps.backends
                .iter()
                .find(|(_, b)| b.addr_be == want)
                .map(|(id, b)| (*id, b.generation))
        };
        apply(
            &mut p,
            &mut maps,
            &with(vec![backend(2, false), backend(3, false)]),
        );
        // 2 drains first (the oldest), then 3.
        apply(&mut p, &mut maps, &with(vec![backend(3, false)]));
        apply(&mut p, &mut maps, &with(vec![]));
        assert_eq!(p.draining_count(), 2);
        let kept = id_of(&maps, 2).expect("backend 2");

        // 2 returns with a new backend 1 (which sorts first): 1 takes 3's id, not 2's.
        let mut q = p.clone();
        let mut q_maps = maps.clone();
        apply(
            &mut q,
            &mut q_maps,
            &with(vec![backend(1, false), backend(2, false)]),
        );
        assert_eq!(id_of(&q_maps, 2), Some(kept));
        assert_eq!(id_of(&q_maps, 3), None);
        assert!(id_of(&q_maps, 1).is_some());

        // 2 returns with two new backends: only one id is free for them, so the service
        // fails whole instead of writing a ring with a backend that has no id.
        let plan = p.plan(&with(vec![
            backend(1, false),
            backend(2, false),
            backend(4, false),
        ]));
        assert!(
            matches!(
                plan.failed.as_slice(),
                [(_, PlanError::BackendsFull { needed: 2, free: 1 })]
            ),
            "{:?}",
            plan.failed
        );
    }

    /// The generation moves exactly when the list of services (and their ids) may change.
    #[test]
    fn services_generation_moves_with_the_service_list() {
        let mut p = Programmer::new(&caps());
        let mut maps = FakeMaps::default();
        let (f, g) = (
            fe([10, 96, 0, 10], 80, Scope::Internal),
            fe([10, 96, 0, 11], 80, Scope::Internal),
        );
        let one = state(vec![(f, spec("a", vec![backend(1, false)]))]);
        apply(&mut p, &mut maps, &one);
        let first = p.services_generation();
        // Other backends for the same service: same list.
        apply(
            &mut p,
            &mut maps,
            &state(vec![(f, spec("a", vec![backend(2, false)]))]),
        );
        assert_eq!(p.services_generation(), first);
        // A second service, then the first one gone: the list changed each time.
        let both = state(vec![
            (f, spec("a", vec![backend(2, false)])),
            (g, spec("b", vec![backend(2, false)])),
        ]);
        apply(&mut p, &mut maps, &both);
        let second = p.services_generation();
        assert_ne!(second, first);
        apply(
            &mut p,
            &mut maps,
            &state(vec![(g, spec("b", vec![backend(2, false)]))]),
        );
        assert_ne!(p.services_generation(), second);
        assert_eq!(p.services().len(), 1);
    }

    /// A draining backend of the previous datapath stays draining under its id (its TCP flows
    /// continue) and gets the same id back if it returns.
    #[test]
    fn an_upgrade_keeps_draining_backends_draining() {
        let mut p = Programmer::new(&caps());
        let mut gone = backend_value(&backend(7, false).addr, 5, false);
        gone.flags |= lb_common::BACKEND_F_DRAINING;
        let writes = p.inherit_backend_ids(&[
            (3, backend_value(&backend(5, true).addr, 2, true)),
            (4, gone),
        ]);
        assert_eq!(writes, vec![Op::SetBackend { id: 4, value: gone }]);
        let mut maps = FakeMaps::default();
        for op in &writes {
            maps.apply(op).expect("fake apply");
        }
        let f = fe([10, 96, 0, 10], 80, Scope::Internal);
        let ops = apply(
            &mut p,
            &mut maps,
            &state(vec![(
                f,
                spec("a", vec![backend(5, true), backend(6, false)]),
            )]),
        );
        p.release_inherited();
        assert!(
            !ops.iter()
                .any(|op| matches!(op, Op::ClearBackend { id: 4 })),
            "{ops:?}"
        );
        assert_eq!(
            maps.backends.get(&4),
            Some(&gone),
            "the draining backend left the map"
        );
        assert_ne!(
            maps.backends
                .iter()
                .find(|(_, b)| b.addr_be == backend(6, false).addr.addr.to_bits().to_be())
                .map(|(id, _)| *id),
            Some(4),
            "a new backend took the draining one's id"
        );
        // It returns: same id, same generation.
        apply(
            &mut p,
            &mut maps,
            &state(vec![(
                f,
                spec("a", vec![backend(5, true), backend(7, false)]),
            )]),
        );
        assert_eq!(
            maps.backends
                .get(&4)
                .map(|b| (b.generation, b.flags & lb_common::BACKEND_F_DRAINING)),
            Some((5, 0))
        );
    }

    /// Inherited ids are no free ids, but the backends that take them back need none.
    #[test]
    fn an_upgrade_into_a_full_id_pool_fits_the_backends_that_inherit() {
        // Ids 1 and 2 only, both inherited.
        let mut p = Programmer::new(&Capacities {
            backends: 3,
            ..caps()
        });
        p.inherit_backend_ids(&[
            (1, backend_value(&backend(5, true).addr, 4, true)),
            (2, backend_value(&backend(6, false).addr, 9, false)),
        ]);
        let f = fe([10, 96, 0, 10], 80, Scope::Internal);
        let d = state(vec![(
            f,
            spec("a", vec![backend(5, true), backend(6, false)]),
        )]);
        let mut maps = FakeMaps::default();
        apply(&mut p, &mut maps, &d);
        assert_eq!(maps.backends.get(&1).map(|b| b.generation), Some(4));
        assert_eq!(maps.backends.get(&2).map(|b| b.generation), Some(9));
    }

    #[test]
    fn capacity_exhaustion_fails_the_service_whole() {
        let small = Capacities {
            frontends: 3,
            backends: 1024,
            ring_slots: 1 << 16,
            conntrack: 16,
            nat_buckets: 16,
            flow_buckets: 16,
        };
        let mut p = Programmer::new(&small);
        let mut maps = FakeMaps::default();
        let a = vec![
            (
                fe([10, 96, 0, 1], 80, Scope::Internal),
                spec("a", vec![backend(1, false)]),
            ),
            (
                fe([10, 96, 0, 1], 80, Scope::External),
                spec("a", vec![backend(1, false)]),
            ),
        ];
        apply(&mut p, &mut maps, &state(a.clone()));
        let mut both = a;
        both.push((
            fe([10, 96, 0, 2], 80, Scope::Internal),
            spec("b", vec![backend(2, false)]),
        ));
        both.push((
            fe([10, 96, 0, 2], 80, Scope::External),
            spec("b", vec![backend(2, false)]),
        ));
        let plan = p.plan(&state(both));
        assert_eq!(plan.failed.len(), 1);
        assert_eq!(plan.failed[0].0, svc("b"));
        assert!(matches!(
            plan.failed[0].1,
            PlanError::FrontendsFull { needed: 2, free: 1 }
        ));
        for op in &plan.ops {
            maps.apply(op).expect("apply");
        }
        // Nothing of b was written; a is untouched.
        assert_eq!(maps.frontends.len(), 2);
        assert!(
            !maps
                .backends
                .values()
                .any(|b| b.addr_be == backend_value(&backend(2, false).addr, 0, false).addr_be)
        );
    }

    #[test]
    fn ring_slab_exhaustion_fails_whole_and_rolls_back() {
        let small = Capacities {
            frontends: 64,
            backends: 1024,
            ring_slots: 500,
            conntrack: 16,
            nat_buckets: 16,
            flow_buckets: 16,
        };
        let mut p = Programmer::new(&small);
        // Two frontends of one service with different backend sets: 3 backends want 401
        // slots and 4 want 401 too; only one fits.
        let d = state(vec![
            (
                fe([10, 96, 0, 1], 80, Scope::Internal),
                spec(
                    "a",
                    vec![backend(1, false), backend(2, false), backend(3, false)],
                ),
            ),
            (
                fe([10, 96, 0, 1], 80, Scope::External),
                spec(
                    "a",
                    vec![
                        backend(1, false),
                        backend(2, false),
                        backend(3, false),
                        backend(4, false),
                    ],
                ),
            ),
        ]);
        let plan = p.plan(&d);
        // The second ring gets the largest prime that fits after the first: 99 ≥ 4, so the
        // service fits with a smaller table; shrink capacity further to force failure.
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
        let tiny = Capacities {
            frontends: 64,
            backends: 1024,
            ring_slots: 402,
            conntrack: 16,
            nat_buckets: 16,
            flow_buckets: 16,
        };
        let mut p = Programmer::new(&tiny);
        let plan = p.plan(&d);
        assert_eq!(plan.failed.len(), 1);
        assert!(plan.ops.is_empty(), "{:?}", plan.ops);
        assert_eq!(p.ring_slots_used(), 0);
    }

    #[test]
    fn a_restarted_programmer_adopts_ids_rings_and_frontends() {
        let mut maps = FakeMaps::default();
        let mut first = Programmer::new(&caps());
        let backends = vec![backend(5, true), backend(6, false), backend(7, false)];
        let d = state(vec![
            (
                fe([10, 96, 0, 10], 80, Scope::Internal),
                spec("tomcat6", backends.clone()),
            ),
            (
                fe([192, 168, 50, 11], 32510, Scope::External),
                spec("tomcat6", backends),
            ),
            (
                fe([10, 96, 0, 11], 53, Scope::Internal),
                spec("dns", vec![backend(9, false)]),
            ),
        ]);
        apply(&mut first, &mut maps, &d);
        let before = maps.clone();

        let mut second = Programmer::new(&caps());
        let frontends: Vec<_> = maps.frontends.iter().map(|(k, v)| (*k, *v)).collect();
        let backends: Vec<_> = maps.backends.iter().map(|(k, v)| (*k, *v)).collect();
        let rings = maps.rings.clone();
        let adoption = second.adopt(&frontends, &backends, |off, size| {
            (off..off + size)
                .filter_map(|i| rings.get(&i).copied())
                .collect()
        });
        assert_eq!(
            (adoption.frontends, adoption.backends, adoption.rings),
            (3, 4, 2)
        );
        // The same desired state: no backend or ring is rewritten, ids stay.
        let ops = apply(&mut second, &mut maps, &d);
        assert!(
            ops.iter().all(|o| matches!(o, Op::SetFrontend { .. })),
            "adoption rewrote more than frontends: {ops:?}"
        );
        assert_eq!(maps.backends, before.backends);
        assert_eq!(maps.rings, before.rings);
        for (k, v) in &maps.frontends {
            let old = before.frontends[k];
            assert_eq!(
                (v.ring_offset, v.ring_size),
                (old.ring_offset, old.ring_size)
            );
        }
        // A new backend gets an id no live backend has.
        let more = state(vec![(
            fe([10, 96, 0, 11], 53, Scope::Internal),
            spec("dns", vec![backend(9, false), backend(10, false)]),
        )]);
        apply(&mut second, &mut maps, &more);
        let ids: Vec<u32> = maps.backends.keys().copied().collect();
        let mut dedup = ids.clone();
        dedup.dedup();
        assert_eq!(ids, dedup);
        assert!(
            maps.backends
                .values()
                .any(|b| b.addr_be == backend_value(&backend(10, false).addr, 0, false).addr_be)
        );
    }

    /// xorshift64*: deterministic randomness for the property test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn random_state(rng: &mut Rng) -> DesiredState {
        let mut frontends = BTreeMap::new();
        for s in 0..rng.below(6) {
            let name = format!("s{s}");
            let backends: Vec<BackendSpec> = {
                let mut v: Vec<BackendSpec> = (0..rng.below(6))
                    .map(|_| backend(rng.below(12) as u8 + 1, rng.below(2) == 0))
                    .collect();
                v.sort_by_key(|b| b.addr);
                v.dedup_by_key(|b| b.addr);
                v
            };
            for scope in [Scope::Internal, Scope::External] {
                if rng.below(4) > 0 {
                    let mut b = backends.clone();
                    if scope == Scope::External && rng.below(3) == 0 {
                        b.retain(|x| x.local);
                    }
                    frontends.insert(fe([10, 96, 0, s as u8], 80, scope), spec(&name, b));
                }
            }
        }
        DesiredState { frontends }
    }

    /// After every single op, every frontend resolves only to a backend of the old or the new
    /// desired state (or drops, if it has no backend in either); with full plans and with
    /// incremental ones.
    #[test]
    fn every_intermediate_state_resolves_to_old_or_new_backends() {
        for incremental in [false, true] {
            let mut rng = Rng(0x5eed_1234_abcd_ef01);
            let mut p = Programmer::new(&Capacities {
                ring_slots: 20_000,
                ..caps()
            });
            let mut maps = FakeMaps::default();
            let mut old = DesiredState::default();
            for round in 0..300 {
                let new = random_state(&mut rng);
                let plan = if incremental {
                    p.plan_changes(&new, &changed(&old, &new))
                } else {
                    p.plan(&new)
                };
                assert!(plan.failed.is_empty(), "round {round}: {:?}", plan.failed);
                for (i, op) in plan.ops.iter().enumerate() {
                    maps.apply(op).expect("apply");
                    check_resolution(&maps, &old, &new).unwrap_or_else(|e| {
                        panic!("incremental {incremental} round {round} op {i}: {e}")
                    });
                }
                // Final state: exactly the desired frontends.
                let want: Vec<_> = new.frontends.keys().map(frontend_key).collect();
                let have: Vec<_> = maps.frontends.keys().copied().collect();
                let mut want_sorted = want.clone();
                want_sorted.sort();
                assert_eq!(have, want_sorted, "round {round}");
                old = new;
            }
        }
    }

    /// Every frontend of `maps` resolves only to a backend that `old` or `new` gives it, or
    /// drops for want of a ring.
    fn check_resolution(
        maps: &FakeMaps,
        old: &DesiredState,
        new: &DesiredState,
    ) -> Result<(), String> {
        for (key, value) in &maps.frontends {
            let allowed: Vec<u32> = [old, new]
                .iter()
                .filter_map(|d| d.frontends.iter().find(|(a, _)| frontend_key(a) == *key))
                .flat_map(|(_, s)| {
                    s.backends
                        .iter()
                        .map(|b| backend_value(&b.addr, 0, false).addr_be)
                })
                .collect();
            for sport in 0..24u16 {
                match maps.resolve(key, 0x0a00_0001 + u32::from(sport), sport.to_be()) {
                    Some(b) if !allowed.contains(&b.addr_be) => {
                        return Err(format!("frontend {key:?} resolved to a foreign backend"));
                    }
                    None if value.ring_size != 0 => {
                        return Err(format!("frontend {key:?} with a ring resolved to nothing"));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The frontends whose spec differs between two states.
    fn changed(old: &DesiredState, new: &DesiredState) -> BTreeSet<FrontendAddr> {
        old.frontends
            .keys()
            .chain(new.frontends.keys())
            .filter(|a| old.frontends.get(a) != new.frontends.get(a))
            .copied()
            .collect()
    }

    /// Frontends on 8 addresses × 2 ports, each of one of 5 services (frontends move between
    /// services), over 12 backends.
    fn random_mixed_state(rng: &mut Rng) -> DesiredState {
        let mut frontends = BTreeMap::new();
        for host in 0..8u8 {
            for port in [80, 81] {
                for scope in [Scope::Internal, Scope::External] {
                    if rng.below(3) == 0 {
                        continue;
                    }
                    let mut backends: Vec<BackendSpec> = (0..rng.below(5))
                        .map(|_| backend(rng.below(12) as u8 + 1, rng.below(4) == 0))
                        .collect();
                    backends.sort_by_key(|b| b.addr);
                    backends.dedup_by_key(|b| b.addr);
                    let mut spec = spec(&format!("s{}", rng.below(5)), backends);
                    spec.snat_remote = rng.below(2) == 0;
                    frontends.insert(fe([10, 96, 0, host], port, scope), spec);
                }
            }
        }
        DesiredState { frontends }
    }

    /// A programmer restarted on `maps`: what the agent does with pinned maps.
    fn restarted(maps: &FakeMaps, caps: &Capacities) -> Programmer {
        let mut p = Programmer::new(caps);
        let frontends: Vec<_> = maps.frontends.iter().map(|(k, v)| (*k, *v)).collect();
        let backends: Vec<_> = maps.backends.iter().map(|(k, v)| (*k, *v)).collect();
        p.adopt(&frontends, &backends, |off, size| {
            (off..off + size)
                .filter_map(|i| maps.rings.get(&i).copied())
                .collect()
        });
        p
    }

    /// Incremental plans, given only the frontends that changed, write exactly what full plans
    /// write, so the maps end in the same state: with room for everything, with services
    /// failing for want of frontends, backend ids or ring slots, and across restarts that adopt
    /// the maps.
    #[test]
    fn incremental_plans_equal_full_plans() {
        let roomy = Capacities {
            ring_slots: 40_000,
            ..caps()
        };
        let tight = Capacities {
            frontends: 20,
            backends: 10,
            ring_slots: 3000,
            ..caps()
        };
        let mut rng = Rng(0x0dd_ba11_cafe_f00d);
        let mut failures = 0;
        for caps in [roomy, tight] {
            let (mut full, mut full_maps) = (Programmer::new(&caps), FakeMaps::default());
            let (mut inc, mut inc_maps) = (Programmer::new(&caps), FakeMaps::default());
            let mut old = DesiredState::default();
            for round in 0..400 {
                if round % 97 == 96 {
                    full = restarted(&full_maps, &caps);
                    inc = restarted(&inc_maps, &caps);
                }
                let new = random_mixed_state(&mut rng);
                let full_plan = full.plan(&new);
                let plan = inc.plan_changes(&new, &changed(&old, &new));
                assert_eq!(plan.ops, full_plan.ops, "round {round}");
                assert_eq!(plan.failed, full_plan.failed, "round {round}");
                failures += plan.failed.len();
                for op in &full_plan.ops {
                    full_maps.apply(op).expect("apply");
                }
                for op in &plan.ops {
                    inc_maps.apply(op).expect("apply");
                }
                assert_eq!(inc_maps.frontends, full_maps.frontends, "round {round}");
                assert_eq!(inc_maps.backends, full_maps.backends, "round {round}");
                assert_eq!(inc_maps.rings, full_maps.rings, "round {round}");
                assert_eq!(inc.services().len(), full.services().len(), "round {round}");
                old = new;
            }
        }
        assert!(
            failures > 0,
            "the tight capacities never made a service fail"
        );
    }
}
