//! The services the datapath benchmark loads, as desired state the agent's programmer writes:
//! the measured NodePort service alone, the same service among 10,000 others, and the
//! self-backend frontend of the classic repeat-N figure. Also the frames that hit them.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_userspace::control::state::{
    BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec, Proto, Scope,
    ServicePortRef,
};
use xlb_tests::packet::Frame;

/// This node's address: NodePorts answer on it.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
/// The measured service's NodePort.
pub const NODE_PORT: u16 = 32510;
/// The node's SNAT port ranges (the agent's default).
pub const SNAT_PORTS: &[lb_common::PortRange] = &[
    lb_common::PortRange::new(1024, 29999),
    lb_common::PortRange::new(61000, 65535),
];
/// The SNAT service's NodePort: its backends are pods on another node, so its flows from a
/// NIC are SNATed to the node and sent back out (`XDP_TX`).
pub const SNAT_NODE_PORT: u16 = 32520;
/// Backends of the measured service, all on this node: the NIC program translates and passes
/// to the kernel, no FIB lookup or SNAT involved.
pub const MEASURED_BACKENDS: usize = 10;
/// The classic figure's frontend, whose only backend is itself.
pub const SELF_PORT: u16 = 30999;
/// First ClusterIP; service `i` gets the `i`-th address after it.
const CLUSTER_IP_BASE: u32 = u32::from_be_bytes([10, 96, 0, 1]);
/// First pod address of the filler services' backends.
const POD_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
/// First NodePort of the filler services (the measured one uses `NODE_PORT`).
const FILLER_NODE_PORT_BASE: u16 = 30000;
/// Every `NODE_PORT_EVERY`-th filler service is a NodePort service, the rest ClusterIP only:
/// the NodePort range (30000–32767) has room for fewer than 2,768 per node address.
const NODE_PORT_EVERY: usize = 4;
const TARGET_PORT: u16 = 8080;

/// The established flow's client.
#[must_use]
pub fn client() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 40000)
}

/// The measured service's NodePort frontend.
#[must_use]
pub fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE, NODE_PORT)
}

/// The classic figure's frontend (= its backend).
#[must_use]
pub fn self_frontend() -> SocketAddrV4 {
    SocketAddrV4::new(NODE, SELF_PORT)
}

/// A packet to this node that no frontend matches (SSH).
#[must_use]
pub fn non_service_frame() -> Vec<u8> {
    Frame::tcp(client(), SocketAddrV4::new(NODE, 22)).build()
}

/// The established flow's packet (the same 5-tuple every time).
#[must_use]
pub fn established_frame() -> Vec<u8> {
    Frame::tcp(client(), node_port()).build()
}

/// The `k`-th new flow to the NodePort: every `k` gives another 5-tuple (source addresses in
/// 198.18.0.0/15, the benchmarking range of RFC 2544, and ports 1024–61023).
#[must_use]
pub fn new_flow_frame(k: u32) -> Vec<u8> {
    const PORTS: u32 = 60_000;
    let src = Ipv4Addr::from(u32::from_be_bytes([198, 18, 0, 0]) + k / PORTS);
    let sport = 1024 + (k % PORTS) as u16;
    Frame::tcp(SocketAddrV4::new(src, sport), node_port()).build()
}

/// The SNAT service's NodePort frontend.
#[must_use]
pub fn snat_node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE, SNAT_NODE_PORT)
}

/// The SNATed established flow's packet (the same 5-tuple every time).
#[must_use]
pub fn snat_established_frame() -> Vec<u8> {
    Frame::tcp(client(), snat_node_port()).build()
}

/// The `k`-th new flow to the SNAT service's NodePort (5-tuples as [`new_flow_frame`]'s).
#[must_use]
pub fn snat_new_flow_frame(k: u32) -> Vec<u8> {
    const PORTS: u32 = 60_000;
    let src = Ipv4Addr::from(u32::from_be_bytes([198, 18, 128, 0]) + k / PORTS);
    let sport = 1024 + (k % PORTS) as u16;
    Frame::tcp(SocketAddrV4::new(src, sport), snat_node_port()).build()
}

/// The SNAT service's backends: pods on node 2 (10.244.2.0/24, routed via 192.168.50.12 in
/// the benchmark's node namespace).
#[must_use]
pub fn snat_backends() -> Vec<SocketAddrV4> {
    (0..MEASURED_BACKENDS)
        .map(|j| SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 10 + j as u8), TARGET_PORT))
        .collect()
}

/// The classic figure's packet: translated to itself, so every iteration of a repeat-N run
/// hits the same frontend and conntrack entry again.
#[must_use]
pub fn self_backend_frame() -> Vec<u8> {
    Frame::tcp(client(), self_frontend()).build()
}

/// The measured service's backends: pods on this node.
#[must_use]
pub fn measured_backends() -> Vec<SocketAddrV4> {
    (0..MEASURED_BACKENDS)
        .map(|j| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10 + j as u8), TARGET_PORT))
        .collect()
}

fn service(name: String) -> ServicePortRef {
    ServicePortRef {
        namespace: "bench".into(),
        name: name.into(),
        port_name: "".into(),
    }
}

fn backend(addr: Ipv4Addr, port: u16, local: bool) -> BackendSpec {
    BackendSpec {
        addr: BackendAddr {
            addr,
            port,
            proto: Proto::Tcp,
        },
        local,
    }
}

/// Adds a service's frontends as the model makes them for externalTrafficPolicy=Cluster:
/// `clusterIP:80` and, for NodePort services, `node:nodePort`, each in both scopes.
fn add_service(
    d: &mut DesiredState,
    name: String,
    cluster_ip: Ipv4Addr,
    node_port: Option<u16>,
    mut backends: Vec<BackendSpec>,
) {
    backends.sort();
    backends.dedup();
    let service = service(name);
    let mut frontends = vec![(cluster_ip, 80, FrontendKind::ClusterIp)];
    if let Some(p) = node_port {
        frontends.push((NODE, p, FrontendKind::NodePort));
    }
    for (addr, port, kind) in frontends {
        for scope in [Scope::External, Scope::Internal] {
            d.frontends.insert(
                FrontendAddr {
                    addr,
                    port,
                    proto: Proto::Tcp,
                    scope,
                },
                FrontendSpec {
                    service: service.clone(),
                    kind,
                    backends: backends.clone(),
                    snat_remote: true,
                    affinity_timeout_s: 0,
                },
            );
        }
    }
}

/// The measured service alone: NodePort 32510 with `MEASURED_BACKENDS` pods on this node.
#[must_use]
pub fn one_service() -> DesiredState {
    services(1)
}

/// `count` services (`count` ≥ 1) with `MEASURED_BACKENDS` backends each: the measured one,
/// and fillers whose backends are pods on other nodes. Every 4th filler is a NodePort
/// service, the others ClusterIP only; all backends are distinct. Besides them, the SNAT
/// service (NodePort `SNAT_NODE_PORT`, pods on node 2), whose SNAT cases are measured.
#[must_use]
pub fn services(count: usize) -> DesiredState {
    let mut d = DesiredState::default();
    let measured = measured_backends()
        .into_iter()
        .map(|b| backend(*b.ip(), b.port(), true))
        .collect();
    add_service(
        &mut d,
        "measured".into(),
        Ipv4Addr::from(CLUSTER_IP_BASE),
        Some(NODE_PORT),
        measured,
    );
    let remote = snat_backends()
        .into_iter()
        .map(|b| backend(*b.ip(), b.port(), false))
        .collect();
    add_service(
        &mut d,
        "snat".into(),
        Ipv4Addr::new(10, 96, 255, 253),
        Some(SNAT_NODE_PORT),
        remote,
    );
    for i in 1..count {
        let backends = (0..MEASURED_BACKENDS)
            .map(|j| {
                let addr = POD_BASE + (i * MEASURED_BACKENDS + j) as u32;
                backend(Ipv4Addr::from(addr), TARGET_PORT, false)
            })
            .collect();
        let node_port = i
            .is_multiple_of(NODE_PORT_EVERY)
            .then(|| FILLER_NODE_PORT_BASE + (i / NODE_PORT_EVERY) as u16);
        add_service(
            &mut d,
            format!("filler-{i}"),
            Ipv4Addr::from(CLUSTER_IP_BASE + i as u32),
            node_port,
            backends,
        );
    }
    d
}

/// One NodePort frontend whose only backend is itself (a local "pod" at the node address and
/// the same port).
#[must_use]
pub fn self_backend() -> DesiredState {
    let mut d = DesiredState::default();
    let me = self_frontend();
    add_service(
        &mut d,
        "self".into(),
        Ipv4Addr::new(10, 96, 255, 254),
        Some(me.port()),
        vec![backend(*me.ip(), me.port(), true)],
    );
    d
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use lb_userspace::{
        control::{
            programmer::{Programmer, frontend_key},
            state::{FrontendAddr, Proto, Scope},
        },
        datapath::{
            loader::Capacities,
            maps::{FakeMaps, LbMaps as _},
        },
    };

    use super::{NODE, NODE_PORT, SELF_PORT, self_backend, services};

    #[test]
    fn ten_thousand_services_have_distinct_frontends_and_backends() {
        let d = services(10_000);
        let services: BTreeSet<_> = d.frontends.values().map(|s| &s.service).collect();
        let backends: BTreeSet<_> = d
            .frontends
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.addr))
            .collect();
        assert_eq!(services.len(), 10_001);
        assert_eq!(backends.len(), 100_010);
        // 2,500 NodePort services with 4 frontends, 7,500 ClusterIP ones with 2, and the
        // SNAT service's 4.
        assert_eq!(d.frontends.len(), 25_004);
        assert!(d.frontends.values().all(|s| s.backends.len() == 10));
    }

    #[test]
    fn programs_within_default_capacities_and_reaches_the_local_backends() {
        let d = services(1000);
        let mut p = Programmer::new(&Capacities::default());
        let plan = p.plan(&d);
        assert!(plan.failed.is_empty(), "{:?}", plan.failed);
        let mut maps = FakeMaps::default();
        for op in &plan.ops {
            maps.apply(op).expect("fake apply");
        }
        let key = frontend_key(&FrontendAddr {
            addr: NODE,
            port: NODE_PORT,
            proto: Proto::Tcp,
            scope: Scope::External,
        });
        let b = maps.resolve(&key, 1, 2).expect("a backend");
        assert_eq!(b.flags, lb_common::BACKEND_F_LOCAL);
    }

    #[test]
    fn self_backend_frontend_translates_to_itself() {
        let d = self_backend();
        let mut p = Programmer::new(&Capacities::small());
        let mut maps = FakeMaps::default();
        for op in &p.plan(&d).ops {
            maps.apply(op).expect("fake apply");
        }
        let fe = FrontendAddr {
            addr: NODE,
            port: SELF_PORT,
            proto: Proto::Tcp,
            scope: Scope::External,
        };
        let b = maps.resolve(&frontend_key(&fe), 1, 2).expect("a backend");
        assert_eq!(
            (b.addr_be, b.port_be),
            (u32::from_ne_bytes(NODE.octets()), SELF_PORT.to_be())
        );
    }
}
