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
//!
//! Pure: no I/O (the writes go out through [`crate::datapath::maps`]). Its allocators are in
//! `allocators`, taking over an earlier agent's maps (restart, upgrade) in `adopt`.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use lb_common::{
    BACKEND_F_DRAINING, BACKEND_F_LOCAL, Backend, FRONTEND_F_SNAT_REMOTE, Frontend, FrontendKey,
};

pub use self::adopt::Adoption;
use self::allocators::{Ids, Slab};

use crate::{
    control::{
        maglev,
        state::{
            BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendSpec, ServicePortRef,
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

    /// The service ports that did not fit at the last plan (retried by the next).
    pub fn failed_services(&self) -> impl Iterator<Item = &ServicePortRef> {
        self.failed.keys()
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
                // The caller reports it (once, not at every plan).
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

mod adopt;
mod allocators;
#[cfg(test)]
mod tests;
