//! The views over maps in memory: programmed by the agent's own programmer (so the rings are
//! real Maglev rings), plus hand-made conntrack entries and counters.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_F_LOCAL, Backend, CT_FORWARD, CT_REVERSE, Config, Counter,
    CtEntry, FRONTEND_F_SNAT_REMOTE, FlowKey, Frontend, FrontendKey, IPPROTO_TCP, IPPROTO_UDP,
    Scope, Verdict, hash::flow_hash,
};

use super::{
    AddrFilter, CtFilter, ExplainQuery, InspectError, MapSource, Outcome, ParseError, Target,
    backends, conntrack, datapath_now_s, explain, render, services, stats,
};
use crate::{
    control::{
        programmer::{Programmer, frontend_key},
        state::{
            BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec,
            Proto, ServicePortRef,
        },
    },
    datapath::{
        loader::Capacities,
        maps::{FakeMaps, LbMaps as _, Op},
    },
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
const NODE_PORT: u16 = 32510;
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE_A: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const REMOTE_B: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 5);

/// Maps in memory with the datapath's conntrack and counters next to them.
#[derive(Default)]
struct Fake {
    maps: FakeMaps,
    ct: HashMap<FlowKey, CtEntry>,
    stats: Vec<(Verdict, Counter)>,
    affinity: HashMap<AffinityKey, AffinityEntry>,
}

impl MapSource for Fake {
    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError> {
        Ok(self.maps.frontends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, InspectError> {
        Ok(self.maps.frontends.get(key).copied())
    }
    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError> {
        // An array: every id in range reads, cleared ones as zeroes.
        Ok(Some(
            self.maps.backends.get(&id).copied().unwrap_or_default(),
        ))
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, InspectError> {
        Ok(self.maps.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn ring(&self, offset: u32, len: u32) -> Result<Vec<u32>, InspectError> {
        Ok((offset..offset + len)
            .map(|s| self.maps.rings.get(&s).copied().unwrap_or(0))
            .collect())
    }
    fn conntrack_entry(&self, key: &FlowKey) -> Result<Option<CtEntry>, InspectError> {
        Ok(self.ct.get(key).copied())
    }
    fn conntrack(
        &self,
        visit: &mut dyn FnMut(&FlowKey, &CtEntry) -> bool,
    ) -> Result<(), InspectError> {
        for (k, v) in &self.ct {
            if !visit(k, v) {
                break;
            }
        }
        Ok(())
    }
    fn stats(&self) -> Result<Vec<(Verdict, Counter)>, InspectError> {
        Ok(self.stats.clone())
    }
    fn config(&self) -> Result<Option<Config>, InspectError> {
        Ok(Some(self.maps.config))
    }
    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>, InspectError> {
        Ok(self.affinity.get(key).copied())
    }
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn node_port(scope: Scope) -> FrontendAddr {
    FrontendAddr {
        addr: NODE,
        port: NODE_PORT,
        proto: Proto::Tcp,
        scope,
    }
}

/// The tomcat6 NodePort (TCP) in both scopes over `pods`; with `etp_local` its external view
/// keeps only the local pod, without SNAT. SNAT: the node, ports 61000-61999.
fn tomcat6(pods: &[Ipv4Addr], etp_local: bool) -> Fake {
    let all: Vec<BackendSpec> = pods
        .iter()
        .map(|ip| BackendSpec {
            addr: BackendAddr {
                addr: *ip,
                port: 8080,
                proto: Proto::Tcp,
            },
            local: *ip == LOCAL_POD,
        })
        .collect();
    let mut d = DesiredState::default();
    for scope in [Scope::External, Scope::Internal] {
        let local_only = etp_local && scope == Scope::External;
        d.frontends.insert(
            node_port(scope),
            FrontendSpec {
                service: ServicePortRef {
                    namespace: "default".into(),
                    name: "tomcat6".into(),
                    port_name: "".into(),
                },
                kind: FrontendKind::NodePort,
                backends: all
                    .iter()
                    .copied()
                    .filter(|b| !local_only || b.local)
                    .collect(),
                snat_remote: !local_only,
                affinity_timeout_s: 0,
            },
        );
    }
    let mut fake = Fake::default();
    let plan = Programmer::new(&Capacities::small()).plan(&d);
    assert!(plan.failed.is_empty());
    for op in &plan.ops {
        fake.maps.apply(op).expect("fake maps");
    }
    fake.maps
        .apply(&Op::SetConfig(Config {
            snat_addr_be: be(NODE),
            snat_ranges: [
                lb_common::PortRange::new(61000, 61999),
                lb_common::PortRange::default(),
                lb_common::PortRange::default(),
                lb_common::PortRange::default(),
            ],
            snat_range_count: 1,
            snat_port_count: 1000,
            ..Config::default()
        }))
        .expect("config");
    fake
}

fn target() -> Target {
    Target {
        addr: NODE,
        port: NODE_PORT,
        proto: IPPROTO_TCP,
    }
}

fn query(from: SocketAddrV4, scope: Scope) -> ExplainQuery {
    ExplainQuery {
        target: target(),
        from: Some(from),
        scope: Some(scope),
    }
}

fn flow_key(src: SocketAddrV4, dst: SocketAddrV4) -> FlowKey {
    FlowKey {
        src_be: be(*src.ip()),
        dst_be: be(*dst.ip()),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: IPPROTO_TCP,
        _pad0: 0,
        _pad1: 0,
    }
}

#[test]
fn service_list_shows_each_frontend_with_its_ring_members() {
    let fake = tomcat6(&[LOCAL_POD, REMOTE_A, REMOTE_B], true);
    let v = services(&fake).expect("services");
    assert_eq!(v.len(), 2);
    let ext = v.iter().find(|s| s.scope == "external").expect("external");
    let int = v.iter().find(|s| s.scope == "internal").expect("internal");
    assert_eq!(ext.frontend(), "192.168.50.11:32510/TCP");
    assert_eq!(ext.flags, ["eTP=Local"]);
    assert!(!ext.snat_remote);
    let only: Vec<Ipv4Addr> = ext
        .backends
        .iter()
        .filter_map(|m| m.backend.as_ref().map(|b| b.addr))
        .collect();
    assert_eq!(only, [LOCAL_POD]);
    assert_eq!(int.flags, ["SNAT"]);
    assert_eq!(int.backends.len(), 3);
    assert_eq!(
        int.backends.iter().map(|m| m.slots).sum::<u32>(),
        int.ring_size,
        "every slot of the ring belongs to a listed backend"
    );
    assert_eq!(int.service_id, ext.service_id);
    let locals: Vec<bool> = int
        .backends
        .iter()
        .map(|m| m.backend.as_ref().expect("live").local)
        .collect();
    assert_eq!(locals.iter().filter(|l| **l).count(), 1);
}

/// A tiny hand-made datapath state whose table can be compared whole.
fn small() -> Fake {
    let mut fake = Fake::default();
    let key = FrontendKey {
        addr_be: be(Ipv4Addr::new(10, 96, 0, 10)),
        port_be: 80u16.to_be(),
        proto: IPPROTO_UDP,
        scope: Scope::Internal as u8,
    };
    fake.maps.frontends.insert(
        key,
        Frontend {
            service_id: 4,
            ring_offset: 16,
            ring_size: 5,
            backend_count: 2,
            flags: FRONTEND_F_SNAT_REMOTE,
            affinity_timeout_s: 0,
        },
    );
    let external = FrontendKey {
        scope: Scope::External as u8,
        ..key
    };
    fake.maps.frontends.insert(
        external,
        Frontend {
            service_id: 4,
            ..Frontend::default()
        },
    );
    for (id, ip, flags) in [(1, LOCAL_POD, BACKEND_F_LOCAL), (2, REMOTE_A, 0)] {
        fake.maps.backends.insert(
            id,
            Backend {
                addr_be: be(ip),
                port_be: 53u16.to_be(),
                _pad0: 0,
                generation: 3,
                flags,
            },
        );
    }
    for (i, id) in [1, 2, 1, 2, 2].into_iter().enumerate() {
        fake.maps.rings.insert(16 + i as u32, id);
    }
    fake
}

#[test]
fn service_table_lists_backends_under_their_frontend() {
    let text = render::services_table(&services(&small()).expect("services"));
    assert_eq!(
        text,
        "\
ID  FRONTEND           SCOPE     FLAGS      RING   BACKENDS
4   10.96.0.10:80/UDP  external  eTP=Local  empty  (none: traffic is dropped)
4   10.96.0.10:80/UDP  internal  SNAT       5@16   1 => 10.244.1.5:53 (local, gen 3, 2 slots)
                                                   2 => 10.244.2.5:53 (remote, gen 3, 3 slots)
"
    );
}

#[test]
fn service_json_has_frontend_and_backends() {
    let json = render::json(&services(&small()).expect("services")).expect("json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let int = &v[1];
    assert_eq!(int["addr"], "10.96.0.10");
    assert_eq!(int["port"], 80);
    assert_eq!(int["proto"], "UDP");
    assert_eq!(int["scope"], "internal");
    assert_eq!(int["snat_remote"], true);
    assert_eq!(int["ring_size"], 5);
    assert_eq!(int["backends"][1]["slots"], 3);
    assert_eq!(int["backends"][1]["backend"]["addr"], "10.244.2.5");
    assert_eq!(int["backends"][1]["backend"]["local"], false);
    assert_eq!(v[0]["backends"].as_array().map(Vec::len), Some(0));
}

#[test]
fn backend_list_skips_cleared_ids() {
    let mut fake = small();
    fake.maps.backends.insert(9, Backend::default());
    let v = backends(&fake).expect("backends");
    assert_eq!(v.iter().map(|b| b.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        render::backends_table(&v),
        "\
ID  ADDRESS        LOCALITY  GENERATION
1   10.244.1.5:53  local     3
2   10.244.2.5:53  remote    3
"
    );
}

/// For many clients, explain's Maglev pick is the one the in-memory datapath lookup makes
/// (`FakeMaps::resolve`, which the packet tests check against the real datapath).
#[test]
fn explain_picks_the_backend_maglev_picks() {
    let fake = tomcat6(&[LOCAL_POD, REMOTE_A, REMOTE_B], false);
    let key = frontend_key(&node_port(Scope::External));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..300u16 {
        let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, (i % 7) as u8), 30000 + i);
        let e = explain(&fake, &query(client, Scope::External)).expect("explain");
        let pick = e.scopes[0].pick.as_ref().expect("a pick");
        let want = fake
            .maps
            .resolve(&key, be(*client.ip()), client.port().to_be())
            .expect("resolves");
        let got = pick.backend.as_ref().expect("a backend");
        assert_eq!(
            (got.addr, got.port),
            (want.addr_be.to_ne_bytes().into(), 8080)
        );
        assert_eq!(pick.outcome, Outcome::NewFlow);
        assert_eq!(pick.verdict, Some("nat_new"));
        let m = pick.maglev.expect("maglev");
        let hash = flow_hash(
            be(*client.ip()),
            be(NODE),
            client.port().to_be(),
            NODE_PORT.to_be(),
            IPPROTO_TCP,
        );
        assert_eq!(m.hash, hash);
        // Remote backends from a NIC are SNATed; the first port tried follows the hash.
        match (got.local, pick.snat.clone()) {
            (true, None) => {}
            (false, Some(s)) => {
                assert_eq!(s.addr, NODE);
                assert_eq!(s.first_port, Some(61000 + (hash % 1000) as u16));
            }
            other => panic!("unexpected SNAT for {client}: {other:?}"),
        }
        seen.insert(got.addr);
    }
    assert_eq!(seen.len(), 3, "300 clients reach all 3 backends");
}

/// Under `sessionAffinity: ClientIP`, a client with a live affinity entry is placed by its
/// first connection's hash, whatever its port; one without is placed by its own.
#[test]
fn explain_follows_a_live_session_affinity() {
    let mut fake = tomcat6(&[LOCAL_POD, REMOTE_A, REMOTE_B], false);
    let key = frontend_key(&node_port(Scope::External));
    let fe = fake.maps.frontends.get_mut(&key).expect("frontend");
    fe.affinity_timeout_s = 3600;
    let service_id = fe.service_id;
    let sticky = Ipv4Addr::new(203, 0, 113, 9);
    let first = flow_hash(
        be(sticky),
        be(NODE),
        40000u16.to_be(),
        NODE_PORT.to_be(),
        IPPROTO_TCP,
    );
    fake.affinity.insert(
        AffinityKey {
            client_addr_be: be(sticky),
            service_id,
            scope: Scope::External as u8,
            _pad0: 0,
            _pad1: 0,
        },
        AffinityEntry {
            hash: first,
            last_seen_s: datapath_now_s(),
        },
    );
    for port in 40001..40021 {
        let e = explain(
            &fake,
            &query(SocketAddrV4::new(sticky, port), Scope::External),
        )
        .expect("explain");
        let pick = e.scopes[0].pick.as_ref().expect("a pick");
        assert_eq!(pick.maglev.expect("maglev").hash, first, "port {port}");
        assert!(
            pick.reason.contains("this client opened a connection"),
            "{}",
            pick.reason
        );
    }
    let other = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40001);
    let e = explain(&fake, &query(other, Scope::External)).expect("explain");
    let pick = e.scopes[0].pick.as_ref().expect("a pick");
    let own = flow_hash(
        be(*other.ip()),
        be(NODE),
        40001u16.to_be(),
        NODE_PORT.to_be(),
        IPPROTO_TCP,
    );
    assert_eq!(pick.maglev.expect("maglev").hash, own);
    assert!(pick.reason.contains("no live affinity"), "{}", pick.reason);
}

#[test]
fn explain_prefers_conntrack_while_its_backend_lives() {
    let mut fake = tomcat6(&[LOCAL_POD, REMOTE_A, REMOTE_B], false);
    let client: SocketAddrV4 = "203.0.113.7:40000".parse().expect("addr");
    let fe = SocketAddrV4::new(NODE, NODE_PORT);
    let fresh = explain(&fake, &query(client, Scope::External)).expect("explain");
    let maglev = fresh.scopes[0].pick.clone().expect("pick");
    let maglev_backend = maglev.backend.expect("backend");
    // Pin the flow to another backend, as a flow that began before a ring change.
    let other = fake
        .maps
        .backends
        .iter()
        .find(|(id, _)| **id != maglev_backend.id)
        .map(|(id, b)| (*id, *b))
        .expect("another backend");
    let entry = CtEntry {
        backend_id: other.0,
        backend_generation: other.1.generation,
        nat_addr_be: be(NODE),
        service_id: 1,
        nat_port_be: 61234u16.to_be(),
        kind: CT_FORWARD,
        _pad: 0,
    };
    fake.ct.insert(flow_key(client, fe), entry);
    let e = explain(&fake, &query(client, Scope::External)).expect("explain");
    let pick = e.scopes[0].pick.as_ref().expect("pick");
    assert_eq!(pick.outcome, Outcome::Established);
    assert_eq!(pick.backend.as_ref().expect("backend").id, other.0);
    assert_eq!(pick.snat.as_ref().expect("snat").port, Some(61234));
    assert!(pick.reason.contains("conntrack"), "{}", pick.reason);
    // A reused id (another generation): the entry is stale, Maglev decides again.
    fake.ct.insert(
        flow_key(client, fe),
        CtEntry {
            backend_generation: other.1.generation + 1,
            ..entry
        },
    );
    let e = explain(&fake, &query(client, Scope::External)).expect("explain");
    let pick = e.scopes[0].pick.as_ref().expect("pick");
    assert_eq!(pick.outcome, Outcome::NewFlow);
    assert_eq!(pick.backend.as_ref(), Some(&maglev_backend));
    assert!(pick.reason.contains("gone or reused"), "{}", pick.reason);
    // The reply direction of a tracked flow.
    let reply = flow_key(SocketAddrV4::new(LOCAL_POD, 8080), client);
    fake.ct.insert(
        reply,
        CtEntry {
            kind: CT_REVERSE,
            nat_addr_be: be(NODE),
            nat_port_be: NODE_PORT.to_be(),
            ..entry
        },
    );
    let q = ExplainQuery {
        target: Target {
            addr: *client.ip(),
            port: client.port(),
            proto: IPPROTO_TCP,
        },
        from: Some(SocketAddrV4::new(LOCAL_POD, 8080)),
        scope: Some(Scope::Internal),
    };
    let pick = explain(&fake, &q).expect("explain").scopes[0]
        .pick
        .clone()
        .expect("pick");
    assert_eq!(pick.outcome, Outcome::Reply);
    assert!(
        pick.reason.contains("192.168.50.11:32510"),
        "{}",
        pick.reason
    );
}

#[test]
fn explain_says_why_in_words() {
    // eTP=Local with no local pod: an empty external ring.
    let fake = tomcat6(&[REMOTE_A, REMOTE_B], true);
    let client: SocketAddrV4 = "203.0.113.7:40000".parse().expect("addr");
    let e = explain(
        &fake,
        &ExplainQuery {
            target: target(),
            from: Some(client),
            scope: None,
        },
    )
    .expect("explain");
    assert_eq!(e.scopes.len(), 2, "both scopes when none is asked");
    let ext = &e.scopes[0];
    assert_eq!(ext.scope, "external");
    let notes = ext.notes.join("\n");
    assert!(notes.contains("ring is empty"), "{notes}");
    assert!(notes.contains("dropped (drop_no_backend)"), "{notes}");
    assert!(notes.contains("externalTrafficPolicy=Local"), "{notes}");
    assert!(notes.contains("client's address is kept"), "{notes}");
    let pick = ext.pick.as_ref().expect("pick");
    assert_eq!(pick.outcome, Outcome::Dropped);
    assert_eq!(pick.verdict, Some("drop_no_backend"));
    // Pods still reach the remote backends.
    let int = &e.scopes[1];
    assert_eq!(
        int.pick.as_ref().expect("pick").outcome,
        Outcome::NewFlow,
        "{int:?}"
    );
    // A port with no frontend.
    let mut q = query(client, Scope::External);
    q.target.port = 9;
    let e = explain(&fake, &q).expect("explain");
    assert!(e.scopes[0].frontend.is_none());
    assert_eq!(
        e.scopes[0].pick.as_ref().expect("pick").outcome,
        Outcome::NotService
    );
    let text = render::explanation_text(&e);
    assert!(text.contains("frontend  none"), "{text}");
    assert!(
        text.contains("→ passed untouched (pass_not_service)"),
        "{text}"
    );
}

#[test]
fn explain_without_snat_config_drops_remote_flows_from_a_nic() {
    let mut fake = tomcat6(&[REMOTE_A], false);
    fake.maps.config = Config::default();
    let client: SocketAddrV4 = "203.0.113.7:40000".parse().expect("addr");
    let e = explain(&fake, &query(client, Scope::External)).expect("explain");
    let pick = e.scopes[0].pick.as_ref().expect("pick");
    assert_eq!(pick.outcome, Outcome::Dropped);
    assert_eq!(pick.verdict, Some("drop_snat_exhausted"));
    assert!(e.scopes[0].notes.join(" ").contains("no SNAT address"));
}

#[test]
fn explain_hairpin_from_a_pod_to_itself() {
    let fake = tomcat6(&[LOCAL_POD], false);
    let pod = SocketAddrV4::new(LOCAL_POD, 33000);
    let e = explain(&fake, &query(pod, Scope::Internal)).expect("explain");
    let s = e.scopes[0]
        .pick
        .as_ref()
        .expect("pick")
        .snat
        .clone()
        .expect("snat");
    assert_eq!(s.addr, Ipv4Addr::new(169, 254, 42, 1));
    assert_eq!(s.port, Some(33000));
}

fn ct_fixture() -> Fake {
    let mut fake = tomcat6(&[LOCAL_POD, REMOTE_A], false);
    let fe = SocketAddrV4::new(NODE, NODE_PORT);
    let (local_id, local) = fake
        .maps
        .backends
        .iter()
        .find(|(_, b)| b.flags & BACKEND_F_LOCAL != 0)
        .map(|(id, b)| (*id, *b))
        .expect("local backend");
    for port in [40000, 40001, 40002] {
        let client = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), port);
        let forward = CtEntry {
            backend_id: local_id,
            backend_generation: local.generation,
            nat_addr_be: 0,
            service_id: 1,
            nat_port_be: 0,
            kind: CT_FORWARD,
            _pad: 0,
        };
        fake.ct.insert(flow_key(client, fe), forward);
        fake.ct.insert(
            flow_key(SocketAddrV4::new(LOCAL_POD, 8080), client),
            CtEntry {
                kind: CT_REVERSE,
                nat_addr_be: be(NODE),
                nat_port_be: NODE_PORT.to_be(),
                ..forward
            },
        );
    }
    fake
}

#[test]
fn conntrack_list_filters_and_limits() {
    let fake = ct_fixture();
    let all = |f: CtFilter| conntrack(&fake, &f).expect("conntrack");
    let (v, truncated) = all(CtFilter::default());
    assert_eq!((v.len(), truncated), (6, false));
    let client: AddrFilter = "203.0.113.7:40001".parse().expect("filter");
    let (v, _) = all(CtFilter {
        src: Some(client),
        ..CtFilter::default()
    });
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].kind, "forward");
    assert_eq!(v[0].backend, Some(SocketAddrV4::new(LOCAL_POD, 8080)));
    let (v, _) = all(CtFilter {
        dst: Some("203.0.113.7".parse().expect("filter")),
        ..CtFilter::default()
    });
    assert!(v.len() == 3 && v.iter().all(|e| e.kind == "reverse"));
    assert_eq!(v[0].reply_source, Some(SocketAddrV4::new(NODE, NODE_PORT)));
    let (v, _) = all(CtFilter {
        backend: Some(LOCAL_POD.to_string().parse().expect("filter")),
        ..CtFilter::default()
    });
    assert_eq!(v.len(), 6);
    let (v, _) = all(CtFilter {
        backend: Some(REMOTE_A.to_string().parse().expect("filter")),
        ..CtFilter::default()
    });
    assert!(v.is_empty());
    let (v, truncated) = all(CtFilter {
        limit: 2,
        ..CtFilter::default()
    });
    assert_eq!((v.len(), truncated), (2, true));
    let (_, truncated) = all(CtFilter {
        limit: 6,
        ..CtFilter::default()
    });
    assert!(!truncated, "exactly the limit is not truncation");
}

#[test]
fn conntrack_table_shows_kind_tuple_backend_and_nat() {
    let fake = ct_fixture();
    let (v, _) = conntrack(
        &fake,
        &CtFilter {
            src: Some("203.0.113.7:40000".parse().expect("filter")),
            ..CtFilter::default()
        },
    )
    .expect("conntrack");
    let (r, _) = conntrack(
        &fake,
        &CtFilter {
            dst: Some("203.0.113.7:40000".parse().expect("filter")),
            ..CtFilter::default()
        },
    )
    .expect("conntrack");
    let mut v = v;
    v.extend(r);
    let text = render::conntrack_table(&v);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "KIND",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "BACKEND",
            "SERVICE",
            "NAT"
        ]
    );
    assert!(
        lines[1].starts_with("forward  TCP    203.0.113.7:40000  192.168.50.11:32510"),
        "{text}"
    );
    assert!(lines[1].ends_with("  -"), "{text}");
    assert!(
        lines[2].ends_with("reply src 192.168.50.11:32510"),
        "{text}"
    );
}

#[test]
fn stats_are_listed_in_verdict_order() {
    let fake = Fake {
        stats: vec![
            (
                Verdict::NatNew,
                Counter {
                    packets: 3,
                    bytes: 180,
                },
            ),
            (Verdict::PassNotService, Counter::default()),
        ],
        ..Fake::default()
    };
    let v = stats(&fake).expect("stats");
    assert_eq!(v[0].verdict, "pass_not_service");
    assert_eq!(
        (v[1].verdict, v[1].packets, v[1].bytes),
        ("nat_new", 3, 180)
    );
    assert_eq!(
        render::stats_table(&v),
        "VERDICT           PACKETS  BYTES\npass_not_service  0        0\nnat_new           3        180\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&render::json(&v).expect("json")).expect("valid");
    assert_eq!(json[1]["verdict"], "nat_new");
    assert_eq!(json[1]["packets"], 3);
}

#[test]
fn targets_and_filters_parse() {
    let t: Target = "192.168.50.11:32510/udp".parse().expect("target");
    assert_eq!((t.addr, t.port, t.proto), (NODE, 32510, IPPROTO_UDP));
    assert_eq!(t.to_string(), "192.168.50.11:32510/UDP");
    let t: Target = "10.96.0.10:80".parse().expect("TCP by default");
    assert_eq!(t.proto, IPPROTO_TCP);
    assert_eq!(
        "10.96.0.10:80/sctp".parse::<Target>(),
        Err(ParseError::Proto("sctp".into()))
    );
    assert!(matches!(
        "10.96.0.10/tcp".parse::<Target>(),
        Err(ParseError::Endpoint(_))
    ));
    let f: AddrFilter = "10.0.0.1".parse().expect("filter");
    assert_eq!(f.port, None);
    let f: AddrFilter = "10.0.0.1:80".parse().expect("filter");
    assert_eq!(f.port, Some(80));
    assert!("pod-a".parse::<AddrFilter>().is_err());
}
