use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::{PlanError, Programmer, backend_value, frontend_key};
use crate::{
    control::state::{
        BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec, Proto,
        Scope, ServicePortRef,
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
fn check_resolution(maps: &FakeMaps, old: &DesiredState, new: &DesiredState) -> Result<(), String> {
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
