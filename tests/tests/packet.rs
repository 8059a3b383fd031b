//! Packet tests: the datapath's programs run through BPF_PROG_TEST_RUN on crafted frames, and
//! each test checks the returned verdict and the exact bytes that come out, with checksums
//! verified by full recomputation. Maps are programmed by the agent's own programmer.
//!
//! The cluster of these fixtures is the tomcat6 case: Service tomcat6 (NodePort 32510, port 80
//! → 8080, ClusterIP 10.96.0.10) with pods 10.244.1.5 (on this node), 10.244.2.5 and 10.244.3.5
//! (on other nodes); this node is 192.168.50.11; the client is 203.0.113.7.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP, PortRange, Timeouts, Verdict, XDP_META_TO_POD, hash::flow_hash,
};
use lb_userspace::control::state::{
    BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec, Proto, Scope,
    ServicePortRef,
};
use lb_userspace::datapath::loader::HostRouting;
use xlb_tests::{
    harness::{
        Datapath, Outcome,
        action::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_NEXT, XDP_DROP, XDP_PASS, XDP_TX},
    },
    packet::{ETH_HLEN, Frame, parse, verify_checksums},
    privileged,
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
const NODE_PORT: u16 = 32510;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE_POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const REMOTE_POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 5);
const SNAT_PORTS: (u16, u16) = (61000, 61999);

fn client() -> SocketAddrV4 {
    "203.0.113.7:40000".parse().expect("addr")
}
fn node_port() -> SocketAddrV4 {
    SocketAddrV4::new(NODE, NODE_PORT)
}
fn cluster_ip() -> SocketAddrV4 {
    SocketAddrV4::new(CLUSTER_IP, 80)
}
fn pod(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 8080)
}

fn backend(ip: Ipv4Addr, proto: Proto) -> BackendSpec {
    BackendSpec {
        addr: BackendAddr {
            addr: ip,
            port: 8080,
            proto,
        },
        local: ip == LOCAL_POD,
    }
}

/// The tomcat6 Service's frontends (both protocols, both scopes) over `pods`; with
/// `etp_local`, the NodePort's external view keeps only the local pod and does not SNAT.
fn tomcat6(pods: &[Ipv4Addr], etp_local: bool) -> DesiredState {
    let mut d = DesiredState::default();
    for proto in [Proto::Tcp, Proto::Udp] {
        let all: Vec<BackendSpec> = pods.iter().map(|ip| backend(*ip, proto)).collect();
        let service = ServicePortRef {
            namespace: "default".into(),
            name: "tomcat6".into(),
            port_name: proto.to_string().into(),
        };
        for scope in [Scope::External, Scope::Internal] {
            for (addr, port, kind) in [
                (NODE, NODE_PORT, FrontendKind::NodePort),
                (CLUSTER_IP, 80, FrontendKind::ClusterIp),
            ] {
                let local_only =
                    etp_local && kind == FrontendKind::NodePort && scope == Scope::External;
                let backends = if local_only {
                    all.iter().copied().filter(|b| b.local).collect()
                } else {
                    all.clone()
                };
                d.frontends.insert(
                    FrontendAddr {
                        addr,
                        port,
                        proto,
                        scope,
                    },
                    FrontendSpec {
                        service: service.clone(),
                        kind,
                        backends,
                        snat_remote: !local_only,
                        affinity_timeout_s: 0,
                    },
                );
            }
        }
    }
    d
}

fn loaded(pods: &[Ipv4Addr], etp_local: bool) -> Datapath {
    let mut dp = Datapath::load();
    dp.program(&tomcat6(pods, etp_local));
    dp.set_snat(NODE, SNAT_PORTS);
    dp
}

/// The frame `input` with its source and/or destination replaced, checksums recomputed from
/// scratch: what a correct translation must produce, byte for byte.
fn translated(input: &Frame, src: Option<SocketAddrV4>, dst: Option<SocketAddrV4>) -> Vec<u8> {
    let mut f = input.clone();
    if let Some(s) = src {
        f.src = s;
    }
    if let Some(d) = dst {
        f.dst = d;
    }
    f.build()
}

fn assert_valid(out: &Outcome, what: &str) {
    if let Err(e) = verify_checksums(&out.frame) {
        panic!("{what}: {e}");
    }
}

#[test]
fn non_service_packet_passes_byte_for_byte() {
    if !privileged("non_service_packet_passes_byte_for_byte") {
        return;
    }
    let mut dp = loaded(&[LOCAL_POD, REMOTE_POD_A], false);
    let other: SocketAddrV4 = "192.168.50.11:22".parse().expect("addr");
    for frame in [
        Frame::tcp(client(), other).build(),
        Frame::udp(client(), other).build(),
    ] {
        let out = dp.xdp(&frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, frame, "XDP changed a non-service packet");
        let out = dp.tc(&frame);
        assert_eq!(out.action, TC_NEXT);
        assert_eq!(out.frame, frame, "TC changed a non-service packet");
    }
    assert_eq!(dp.count(Verdict::PassNotService), 4);
}

/// Malformed frames, each with the pass verdict it must be counted under.
#[expect(clippy::too_many_lines, reason = "a fixture table: one line per case")]
fn malformed() -> Vec<(&'static str, Vec<u8>, Verdict)> {
    let tcp = Frame::tcp(client(), node_port()).build();
    let udp = Frame::udp(client(), node_port()).build();
    let with = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.to_vec();
        f(&mut v);
        v
    };
    // A header field changed on purpose, with the header checksum made right again, so the
    // frame is refused for that field and not for its checksum.
    let with_ip = |base: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = base.to_vec();
        f(&mut v);
        xlb_tests::fuzz::frame::fix_ip_checksum(&mut v);
        v
    };
    let set_tot_len = |v: &mut Vec<u8>, n: u16| v[16..18].copy_from_slice(&n.to_be_bytes());
    vec![
        (
            "ethernet header only",
            tcp[..14].to_vec(),
            Verdict::PassMalformed,
        ),
        (
            "IPv4 header cut at 10 bytes",
            tcp[..24].to_vec(),
            Verdict::PassMalformed,
        ),
        (
            "IPv4 header cut at 19 bytes",
            tcp[..33].to_vec(),
            Verdict::PassMalformed,
        ),
        (
            "IHL 4",
            with(&tcp, &|v| v[14] = 0x44),
            Verdict::PassMalformed,
        ),
        (
            "IHL 0",
            with(&tcp, &|v| v[14] = 0x40),
            Verdict::PassMalformed,
        ),
        (
            "IP version 6 under the IPv4 ethertype",
            with(&tcp, &|v| v[14] = 0x65),
            Verdict::PassMalformed,
        ),
        (
            "total length beyond the buffer",
            with(&tcp, &|v| set_tot_len(v, 1400)),
            Verdict::PassMalformed,
        ),
        (
            "total length below the header",
            with(&tcp, &|v| set_tot_len(v, 12)),
            Verdict::PassMalformed,
        ),
        (
            "total length 0",
            with(&tcp, &|v| set_tot_len(v, 0)),
            Verdict::PassMalformed,
        ),
        (
            "total length leaves a partial TCP header",
            with(&tcp, &|v| set_tot_len(v, 30)),
            Verdict::PassMalformed,
        ),
        (
            "TCP header cut after the ports",
            tcp[..38].to_vec(),
            Verdict::PassMalformed,
        ),
        (
            "TCP header cut at 2 bytes",
            tcp[..36].to_vec(),
            Verdict::PassMalformed,
        ),
        (
            "UDP header cut at 6 bytes",
            udp[..40].to_vec(),
            Verdict::PassMalformed,
        ),
        (
            "TCP data offset 4",
            with(&tcp, &|v| v[46] = 0x40),
            Verdict::PassMalformed,
        ),
        (
            "IHL 15 with no room for options",
            with(&tcp, &|v| v[14] = 0x4f),
            Verdict::PassMalformed,
        ),
        (
            "IHL 6 but total length 20",
            with(&tcp, &|v| {
                v[14] = 0x46;
                set_tot_len(v, 20);
            }),
            Verdict::PassMalformed,
        ),
        (
            "non-first fragment",
            with_ip(&tcp, &|v| v[20..22].copy_from_slice(&[0x00, 0x10])),
            Verdict::PassFragment,
        ),
        (
            "first fragment (MF)",
            with_ip(&tcp, &|v| v[20..22].copy_from_slice(&[0x20, 0x00])),
            Verdict::PassFragment,
        ),
        (
            "last fragment",
            with_ip(&udp, &|v| v[20..22].copy_from_slice(&[0x00, 0xb9])),
            Verdict::PassFragment,
        ),
        (
            "ICMP",
            with_ip(&tcp, &|v| v[23] = 1),
            Verdict::PassOtherProto,
        ),
        (
            "GRE",
            with_ip(&tcp, &|v| v[23] = 47),
            Verdict::PassOtherProto,
        ),
        (
            "SCTP",
            with_ip(&tcp, &|v| v[23] = 132),
            Verdict::PassOtherProto,
        ),
        (
            "ARP ethertype",
            with(&tcp, &|v| v[12..14].copy_from_slice(&[0x08, 0x06])),
            Verdict::PassOtherProto,
        ),
        (
            "IPv6 ethertype",
            with(&tcp, &|v| v[12..14].copy_from_slice(&[0x86, 0xdd])),
            Verdict::PassOtherProto,
        ),
        (
            "VLAN-tagged",
            with(&tcp, &|v| v[12..14].copy_from_slice(&[0x81, 0x00])),
            Verdict::PassOtherProto,
        ),
    ]
}

#[test]
fn malformed_packets_to_a_frontend_pass_untouched_and_are_counted() {
    if !privileged("malformed_packets_to_a_frontend_pass_untouched_and_are_counted") {
        return;
    }
    let cases = malformed();
    assert!(cases.len() >= 20);
    // The frontend exists: a well-formed packet would be translated.
    let mut dp = loaded(&[LOCAL_POD], false);
    for (what, frame, verdict) in &cases {
        let before = dp.count(*verdict);
        let out = dp.xdp(frame);
        assert_eq!(out.action, XDP_PASS, "XDP verdict for {what}");
        assert_eq!(&out.frame, frame, "XDP changed: {what}");
        assert_eq!(
            dp.count(*verdict),
            before + 1,
            "XDP counted {what} under another reason"
        );
        // The kernel's skb test-run rejects (EINVAL) an IPv4-typed frame too short for an
        // IPv4 header, so those only run through XDP.
        if frame.len() < ETH_HLEN + 20 {
            continue;
        }
        let out = dp.tc(frame);
        assert_eq!(out.action, TC_NEXT, "TC verdict for {what}");
        assert_eq!(&out.frame, frame, "TC changed: {what}");
        assert_eq!(
            dp.count(*verdict),
            before + 2,
            "TC counted {what} under another reason"
        );
    }
    assert_eq!(dp.count(Verdict::NatNew), 0);
    assert!(
        dp.conntrack().is_empty(),
        "a malformed packet created conntrack state"
    );
}

/// New flows from outside to the NodePort with only the local pod as backend: DNAT, exact
/// bytes, valid checksums, handed to the kernel.
#[test]
fn nic_new_flow_to_local_backend_is_dnatted_exactly() {
    if !privileged("nic_new_flow_to_local_backend_is_dnatted_exactly") {
        return;
    }
    let tcp = Frame::tcp(client(), node_port());
    let udp = Frame::udp(client(), node_port());
    let cases: Vec<(&str, Frame)> = vec![
        ("TCP SYN", tcp.clone()),
        ("UDP", udp.clone()),
        (
            "UDP with checksum 0",
            Frame {
                udp_no_checksum: true,
                ..udp
            },
        ),
        (
            "TCP with IP options (NOP NOP NOP EOL)",
            Frame {
                ip_options: vec![1, 1, 1, 0],
                ..tcp.clone()
            },
        ),
        (
            "TCP with 40 bytes of IP options",
            Frame {
                ip_options: vec![1; 40],
                ..tcp.clone()
            },
        ),
        (
            "TCP with a large payload",
            Frame {
                payload: vec![0xa5; 1400],
                ..tcp
            },
        ),
        (
            "TCP to the ClusterIP from outside",
            Frame::tcp(client(), cluster_ip()),
        ),
    ];
    let mut dp = loaded(&[LOCAL_POD], false);
    for (i, (what, input)) in cases.iter().enumerate() {
        let src = SocketAddrV4::new(*client().ip(), 40000 + i as u16);
        let input = Frame {
            src,
            ..input.clone()
        };
        let out = dp.xdp(&input.build());
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(
            out.frame,
            translated(&input, None, Some(pod(LOCAL_POD))),
            "{what}"
        );
        assert_valid(&out, what);
        if input.udp_no_checksum {
            assert_eq!(
                parse(&out.frame).l4_checksum,
                0,
                "{what}: UDP checksum 0 must stay 0"
            );
        }
    }
    assert_eq!(dp.count(Verdict::NatNew), cases.len() as u64);
}

/// With BPF host routing, a frame translated to a pod of this node carries the metadata word
/// that has the NIC's TC program deliver it (in front of exactly the translated frame); a
/// frame left to the kernel (not service traffic) and any frame without the option carry none.
#[test]
fn bpf_host_routing_marks_frames_translated_to_local_pods() {
    if !privileged("bpf_host_routing_marks_frames_translated_to_local_pods") {
        return;
    }
    let input = Frame::tcp(client(), node_port());
    let expected = translated(&input, None, Some(pod(LOCAL_POD)));
    let mut marked = expected.clone();
    marked.splice(0..0, XDP_META_TO_POD.to_ne_bytes());

    let mut dp = Datapath::load_routing(HostRouting::Bpf);
    dp.program(&tomcat6(&[LOCAL_POD], false));
    dp.set_snat(NODE, SNAT_PORTS);
    let out = dp.xdp(&input.build());
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(out.frame, marked, "new flow: mark + translated frame");
    let out = dp.xdp(&input.build());
    assert_eq!(
        out.frame, marked,
        "established flow: mark + translated frame"
    );
    let other = Frame::tcp(client(), SocketAddrV4::new(NODE, 22)).build();
    let out = dp.xdp(&other);
    assert_eq!(out.frame, other, "not service traffic: no mark, untouched");

    let mut dp = loaded(&[LOCAL_POD], false);
    let out = dp.xdp(&input.build());
    assert_eq!(out.frame, expected, "kernel host routing: no mark");
}

/// An established flow keeps its backend when its ring is rewritten, and is re-balanced
/// once its backend is removed.
/// An established flow keeps its backend when its ring is rewritten. When its backend leaves
/// the Service (endpoint gone or not ready), TCP flows keep going to it while it drains, as
/// kube-proxy's conntrack keeps them; UDP flows move to a live backend, as kube-proxy flushes
/// their conntrack entries.
#[test]
fn established_flow_sticks_across_ring_changes() {
    if !privileged("established_flow_sticks_across_ring_changes") {
        return;
    }
    let pods = [LOCAL_POD, REMOTE_POD_A, REMOTE_POD_B];
    let mut dp = loaded(&pods, true);
    // Mid-stream TCP segments (ACK): a SYN would be a new connection.
    let tcp = |sport| {
        let f = Frame::tcp(SocketAddrV4::new(LOCAL_POD, sport), cluster_ip());
        Frame {
            tcp_flags: 0x10,
            ..f
        }
        .build()
    };
    let udp = |sport| Frame::udp(SocketAddrV4::new(LOCAL_POD, sport), cluster_ip()).build();
    // Pod → ClusterIP through TC (no SNAT): note which pod each flow landed on.
    let mut first = std::collections::BTreeMap::new();
    for sport in 30000..30060u16 {
        for (proto, frame) in [("tcp", tcp(sport)), ("udp", udp(sport))] {
            let out = dp.tc(&frame);
            assert_eq!(out.action, TC_NEXT);
            first.insert((proto, sport), *parse(&out.frame).dst.ip());
        }
    }
    assert!(
        pods.iter().all(|p| first.values().any(|d| d == p)),
        "120 flows missed a pod"
    );
    let now = |dp: &mut Datapath, proto: &str, sport| {
        let frame = if proto == "tcp" {
            tcp(sport)
        } else {
            udp(sport)
        };
        *parse(&dp.tc(&frame).frame).dst.ip()
    };
    // Scale up to 5 pods: a new ring; every established flow keeps its pod.
    let (new_a, new_b) = (Ipv4Addr::new(10, 244, 2, 6), Ipv4Addr::new(10, 244, 3, 6));
    dp.program(&tomcat6(
        &[LOCAL_POD, REMOTE_POD_A, REMOTE_POD_B, new_a, new_b],
        true,
    ));
    for (&(proto, sport), &pod_ip) in &first {
        assert_eq!(
            now(&mut dp, proto, sport),
            pod_ip,
            "{proto} flow {sport} moved after scale-up"
        );
    }
    // REMOTE_POD_A leaves: its TCP flows stay while it drains, its UDP flows move; the other
    // flows stay; new flows never reach it.
    dp.program(&tomcat6(&[LOCAL_POD, REMOTE_POD_B, new_a, new_b], true));
    for (&(proto, sport), &pod_ip) in &first {
        let got = now(&mut dp, proto, sport);
        if pod_ip == REMOTE_POD_A && proto == "udp" {
            assert_ne!(
                got, REMOTE_POD_A,
                "UDP flow {sport} still reaches a removed backend"
            );
        } else {
            assert_eq!(
                got, pod_ip,
                "{proto} flow {sport} moved although it should stay"
            );
        }
    }
    for sport in 31000..31100u16 {
        assert_ne!(
            now(&mut dp, "tcp", sport),
            REMOTE_POD_A,
            "a new flow reached a removed backend"
        );
    }
}

#[test]
fn established_flow_outlives_its_frontend_while_its_backend_drains() {
    if !privileged("established_flow_outlives_its_frontend_while_its_backend_drains") {
        return;
    }
    let mut dp = loaded(&[LOCAL_POD], false);
    let input = Frame {
        tcp_flags: 0x10,
        ..Frame::tcp(client(), node_port())
    };
    let expected = translated(&input, None, Some(pod(LOCAL_POD)));
    assert_eq!(dp.xdp(&input.build()).frame, expected);
    // The NodePort frontends go; the ClusterIP ones keep the backend alive.
    let mut cluster_ip_only = tomcat6(&[LOCAL_POD], false);
    cluster_ip_only.frontends.retain(|a, _| a.addr != NODE);
    dp.program(&cluster_ip_only);
    let out = dp.xdp(&input.build());
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(out.frame, expected, "the established flow lost its backend");
    assert_eq!(dp.count(Verdict::NatEstablished), 1);
    let new_flow = Frame::tcp(SocketAddrV4::new(*client().ip(), 40001), node_port()).build();
    let out = dp.xdp(&new_flow);
    assert_eq!(
        (out.action, out.frame),
        (XDP_PASS, new_flow),
        "a new flow to a removed frontend"
    );
    // No service left: the backend drains; the established TCP flow still reaches it (as
    // kube-proxy's conntrack keeps it), a new one is not translated.
    dp.program(&DesiredState::default());
    let out = dp.xdp(&input.build());
    assert_eq!((out.action, out.frame), (XDP_PASS, expected));
    let new_flow = Frame::tcp(SocketAddrV4::new(*client().ip(), 40002), node_port()).build();
    let out = dp.xdp(&new_flow);
    assert_eq!((out.action, out.frame), (XDP_PASS, new_flow));
    assert_eq!(dp.count(Verdict::PassNotService), 2);
}

#[test]
fn thousand_flows_spread_evenly_over_three_backends() {
    if !privileged("thousand_flows_spread_evenly_over_three_backends") {
        return;
    }
    let pods = [LOCAL_POD, REMOTE_POD_A, REMOTE_POD_B];
    let mut dp = loaded(&pods, false);
    let mut counts = [0u32; 3];
    for i in 0..1000u32 {
        let src = SocketAddrV4::new(
            Ipv4Addr::from(0x0a01_0000 + i / 50),
            20000 + (i % 50) as u16 * 7,
        );
        let out = dp.tc(&Frame::tcp(src, cluster_ip()).build());
        let dst = *parse(&out.frame).dst.ip();
        let idx = pods
            .iter()
            .position(|p| *p == dst)
            .expect("translated to a pod");
        counts[idx] += 1;
    }
    // ±15% of an even 333.
    for (p, c) in pods.iter().zip(counts) {
        assert!(
            (283..=383).contains(&c),
            "{p} got {c} of 1000 flows: {counts:?}"
        );
    }
}

/// `sessionAffinity: ClientIP` on the tomcat6 frontends over `pods` (timeout in seconds).
fn with_affinity(pods: &[Ipv4Addr], timeout_s: u32) -> Datapath {
    let mut d = tomcat6(pods, false);
    for spec in d.frontends.values_mut() {
        spec.affinity_timeout_s = timeout_s;
    }
    let mut dp = Datapath::load();
    dp.program(&d);
    dp.set_snat(NODE, SNAT_PORTS);
    dp
}

/// The pod a new TCP connection from `src` to the ClusterIP goes to (TC path).
fn pod_for(dp: &mut Datapath, src: SocketAddrV4) -> Ipv4Addr {
    *parse(&dp.tc(&Frame::tcp(src, cluster_ip()).build()).frame)
        .dst
        .ip()
}

/// `sessionAffinity: ClientIP`: every new connection of a client goes to the backend of its
/// first while other clients still spread; a backend that leaves releases its clients; after
/// the timeout a client is balanced anew. Without affinity one client's connections spread.
#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    if !privileged("session_affinity_keeps_a_client_on_one_backend") {
        return;
    }
    let pods = [LOCAL_POD, REMOTE_POD_A, REMOTE_POD_B];
    let client_a = Ipv4Addr::new(10, 1, 0, 1);
    let mut plain = loaded(&pods, false);
    let spread: std::collections::BTreeSet<Ipv4Addr> = (20000..20050)
        .map(|port| pod_for(&mut plain, SocketAddrV4::new(client_a, port)))
        .collect();
    assert_eq!(spread.len(), 3, "without affinity: {spread:?}");

    let mut dp = with_affinity(&pods, 10_800);
    let first = pod_for(&mut dp, SocketAddrV4::new(client_a, 20000));
    for port in 20001..20050 {
        let p = pod_for(&mut dp, SocketAddrV4::new(client_a, port));
        assert_eq!(
            p, first,
            "connection from port {port} left the client's backend"
        );
    }
    let others: std::collections::BTreeSet<Ipv4Addr> = (0..60)
        .map(|i| {
            pod_for(
                &mut dp,
                SocketAddrV4::new(Ipv4Addr::new(10, 1, 1, i), 20000),
            )
        })
        .collect();
    assert_eq!(others.len(), 3, "other clients: {others:?}");

    // The client's backend leaves (it drains): the client moves, and sticks to its new one.
    let rest: Vec<Ipv4Addr> = pods.iter().copied().filter(|p| *p != first).collect();
    let mut d = tomcat6(&rest, false);
    for spec in d.frontends.values_mut() {
        spec.affinity_timeout_s = 10_800;
    }
    dp.program(&d);
    let moved = pod_for(&mut dp, SocketAddrV4::new(client_a, 21000));
    assert_ne!(moved, first, "a client stayed with a backend that left");
    for port in 21001..21020 {
        assert_eq!(pod_for(&mut dp, SocketAddrV4::new(client_a, port)), moved);
    }

    // Timeout 1 s: once it passed, the client's next connection is balanced anew, to where
    // Maglev sends that connection without affinity.
    let mut dp = with_affinity(&pods, 1);
    let first = pod_for(&mut dp, SocketAddrV4::new(client_a, 20000));
    let port = (20001..20050)
        .find(|&port| pod_for(&mut plain, SocketAddrV4::new(client_a, port)) != first)
        .expect("a connection Maglev sends elsewhere");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(
        pod_for(&mut dp, SocketAddrV4::new(client_a, port)),
        pod_for(&mut plain, SocketAddrV4::new(client_a, port)),
        "the affinity outlived its timeout"
    );
}

#[test]
fn frontend_without_usable_backend_drops_and_counts() {
    if !privileged("frontend_without_usable_backend_drops_and_counts") {
        return;
    }
    // eTP=Local and no pod on this node: the external NodePort view has no backend.
    let mut dp = loaded(&[REMOTE_POD_A, REMOTE_POD_B], true);
    let frame = Frame::tcp(client(), node_port()).build();
    let out = dp.xdp(&frame);
    assert_eq!(out.action, XDP_DROP);
    assert_eq!(
        out.frame, frame,
        "a dropped frame must not be half-rewritten"
    );
    assert_eq!(dp.count(Verdict::DropNoBackend), 1);
    // A Service with no endpoints at all: both hooks drop.
    let mut dp = loaded(&[], false);
    assert_eq!(dp.xdp(&frame).action, XDP_DROP);
    let from_pod = Frame::udp(SocketAddrV4::new(LOCAL_POD, 5353), cluster_ip()).build();
    assert_eq!(dp.tc(&from_pod).action, TC_ACT_SHOT);
    assert_eq!(dp.count(Verdict::DropNoBackend), 2);
    assert!(dp.conntrack().is_empty());
}

/// TC on a pod interface: pod → ClusterIP is DNATted with the kernel's checksum helpers.
#[test]
fn tc_pod_to_cluster_ip_is_dnatted_exactly() {
    if !privileged("tc_pod_to_cluster_ip_is_dnatted_exactly") {
        return;
    }
    let mut dp = loaded(&[REMOTE_POD_A], false);
    let src = SocketAddrV4::new(LOCAL_POD, 43210);
    for (i, input) in [
        Frame::tcp(src, cluster_ip()),
        Frame::udp(src, cluster_ip()),
        Frame {
            udp_no_checksum: true,
            ..Frame::udp(src, cluster_ip())
        },
        Frame {
            ip_options: vec![1, 1, 1, 0],
            ..Frame::tcp(src, cluster_ip())
        },
    ]
    .into_iter()
    .enumerate()
    {
        let input = Frame {
            src: SocketAddrV4::new(LOCAL_POD, 43210 + i as u16),
            ..input
        };
        let out = dp.tc(&input.build());
        assert_eq!(out.action, TC_NEXT);
        assert_eq!(out.frame, translated(&input, None, Some(pod(REMOTE_POD_A))));
        assert_valid(&out, "tc dnat");
    }
}

/// A network namespace playing this node for FIB lookups: NIC eth0 (192.168.50.11/24) with
/// the other nodes' pod CIDRs routed via 192.168.50.12, a default route via 192.168.50.1,
/// and the local pod behind lxc0. Neighbours are static so results are exact.
use xlb_tests::node::{GW_MAC, NODE2_MAC, Node};

/// Runs `test` inside a fresh node namespace, with the indexes of its `eth0` (toward the
/// world) and `lxc0` (toward a pod).
fn on_node(test: impl FnOnce(u32, u32) + Send) {
    let node = Node::new("pkt").expect("node namespace");
    node.ns
        .enter(|| test(ifindex("eth0"), ifindex("lxc0")))
        .expect("enter netns");
}

fn ifindex(name: &str) -> u32 {
    let i = xlb_tests::node::ifindex(name);
    assert!(i != 0, "no interface {name}");
    i
}

fn src_mac(frame: &[u8]) -> [u8; 6] {
    let mut s = [0u8; 6];
    s.copy_from_slice(&frame[6..12]);
    s
}

/// From outside to a remote backend (eTP=Cluster): DNAT + SNAT to the node address and a
/// port of the SNAT range, TTL decremented, MACs from the FIB, sent back out of the NIC.
/// The backend's reply is reverse-translated in XDP and sent to the client.
#[test]
fn nic_snat_to_remote_backend_and_reply() {
    if !privileged("nic_snat_to_remote_backend_and_reply") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = loaded(&[REMOTE_POD_A], false);
        for input in [
            Frame::tcp(client(), node_port()),
            Frame::udp(client(), node_port()),
        ] {
            let out = dp.xdp_on(&input.build(), eth0);
            assert_eq!(out.action, XDP_TX, "same NIC in and out");
            let h = flow_hash(
                u32::from_ne_bytes(client().ip().octets()),
                u32::from_ne_bytes(NODE.octets()),
                client().port().to_be(),
                NODE_PORT.to_be(),
                input.proto,
            );
            let range = u32::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
            let port = SNAT_PORTS.0 + (h % range) as u16;
            let expected = Frame {
                src_mac: src_mac(&out.frame),
                dst_mac: NODE2_MAC,
                ttl: input.ttl - 1,
                ..input.clone()
            };
            let snat = SocketAddrV4::new(NODE, port);
            let expected = translated(&expected, Some(snat), Some(pod(REMOTE_POD_A)));
            assert_eq!(
                out.frame, expected,
                "SNAT+DNAT frame (proto {})",
                input.proto
            );
            assert_valid(&out, "snat");

            // The reply: backend → node:port arrives at the NIC.
            let reply = Frame {
                src_mac: NODE2_MAC,
                src: pod(REMOTE_POD_A),
                dst: snat,
                ..input
            };
            let out = dp.xdp_on(&reply.build(), eth0);
            assert_eq!(out.action, XDP_TX);
            let expected = Frame {
                dst_mac: GW_MAC,
                src_mac: src_mac(&out.frame),
                ttl: reply.ttl - 1,
                ..reply.clone()
            };
            assert_eq!(
                out.frame,
                translated(&expected, Some(node_port()), Some(client()))
            );
            assert_valid(&out, "reply");
        }
        assert_eq!(dp.count(Verdict::SnatTx), 2);
        assert_eq!(dp.count(Verdict::ReverseNat), 2);
        assert_eq!(dp.snat().len(), 2);
    });
}

/// The reply of a local backend leaves through TC: source → NodePort frontend, sent by
/// redirect (the kernel would drop a packet with a local source arriving from a pod).
#[test]
fn tc_reply_of_local_backend_is_reverse_translated() {
    if !privileged("tc_reply_of_local_backend_is_reverse_translated") {
        return;
    }
    on_node(|eth0, lxc0| {
        let mut dp = loaded(&[LOCAL_POD], false);
        for input in [
            Frame::tcp(client(), node_port()),
            Frame::udp(client(), node_port()),
        ] {
            let out = dp.xdp_on(&input.build(), eth0);
            assert_eq!(out.action, XDP_PASS);
            let reply = Frame {
                src: pod(LOCAL_POD),
                dst: client(),
                ..input
            };
            let out = dp.tc_on(&reply.build(), lxc0);
            assert_eq!(out.action, TC_ACT_REDIRECT);
            assert_eq!(out.frame, translated(&reply, Some(node_port()), None));
            assert_valid(&out, "tc reply");
        }
        assert_eq!(dp.count(Verdict::ReverseNat), 2);
    });
}

/// A pod's flow to a remote backend gets its reply at the NIC: XDP restores the ClusterIP as
/// source and hands it to the kernel for the pod.
#[test]
fn nic_reply_of_remote_backend_to_pod_is_reverse_translated() {
    if !privileged("nic_reply_of_remote_backend_to_pod_is_reverse_translated") {
        return;
    }
    let mut dp = loaded(&[REMOTE_POD_B], false);
    let src = SocketAddrV4::new(LOCAL_POD, 51000);
    for input in [Frame::tcp(src, cluster_ip()), Frame::udp(src, cluster_ip())] {
        assert_eq!(dp.tc(&input.build()).action, TC_NEXT);
        let reply = Frame {
            src: pod(REMOTE_POD_B),
            dst: src,
            ..input.clone()
        };
        let out = dp.xdp(&reply.build());
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, translated(&reply, Some(cluster_ip()), None));
        assert_valid(&out, "xdp reply");
        if input.proto == IPPROTO_UDP {
            assert_ne!(parse(&out.frame).l4_checksum, 0);
        }
    }
}

/// A frame whose TTL would expire is left to the kernel untouched.
#[test]
fn expiring_ttl_passes_untouched() {
    if !privileged("expiring_ttl_passes_untouched") {
        return;
    }
    let mut dp = loaded(&[REMOTE_POD_A], false);
    let frame = Frame {
        ttl: 1,
        ..Frame::tcp(client(), node_port())
    }
    .build();
    let out = dp.xdp(&frame);
    assert_eq!((out.action, out.frame), (XDP_PASS, frame));
    assert_eq!(dp.count(Verdict::PassTtl), 1);
}

/// SNAT ports are reused once their flow is over: with a range of two ports, a third flow is
/// dropped while both are in use; after a RST on one of them and its closed timeout (10 s,
/// the clock advanced by the test), the third flow gets that port, and the old flow's
/// conntrack entry is gone.
#[test]
fn snat_ports_of_finished_flows_are_reused() {
    if !privileged("snat_ports_of_finished_flows_are_reused") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = Datapath::load();
        dp.program(&tomcat6(&[REMOTE_POD_A], false));
        dp.set_snat_ranges(
            NODE,
            &[PortRange::new(61000, 61001)],
            Timeouts {
                tcp_syn_s: 3600,
                ..Timeouts::default()
            },
        );
        let flow = |port| Frame::tcp(SocketAddrV4::new(*client().ip(), port), node_port());
        let snat_port = |out: &Outcome| parse(&out.frame).src.port();
        let a = dp.xdp_on(&flow(40001).build(), eth0);
        let b = dp.xdp_on(&flow(40002).build(), eth0);
        assert_eq!((a.action, b.action), (XDP_TX, XDP_TX));
        assert_ne!(snat_port(&a), snat_port(&b));
        assert_eq!(dp.xdp_on(&flow(40003).build(), eth0).action, XDP_DROP);
        assert_eq!(dp.count(Verdict::DropSnatExhausted), 1);
        // Flow a ends: its RST goes out through the established path.
        let mut rst = flow(40001);
        rst.tcp_flags = 0x14; // RST+ACK
        assert_eq!(dp.xdp_on(&rst.build(), eth0).action, XDP_TX);
        // Its port is held for the closed timeout (10 s) after the RST.
        dp.advance_clock(11);
        let c = dp.xdp_on(&flow(40003).build(), eth0);
        assert_eq!(c.action, XDP_TX, "the closed flow's port was not reclaimed");
        assert_eq!(snat_port(&c), snat_port(&a));
        assert_eq!(dp.event(lb_common::Event::SnatPortTakenEarly), 0);
        let a_key_left = dp.conntrack().iter().any(|(k, _)| {
            k.src_be == u32::from_ne_bytes(client().ip().octets()) && k.sport_be == 40001u16.to_be()
        });
        assert!(
            !a_key_left,
            "the reclaimed flow's forward entry is still there"
        );
    });
}

/// A SNATed flow's packets through the NIC, as the client and the remote backend send them.
struct SnatFlows<'a> {
    dp: &'a mut Datapath,
    eth0: u32,
}

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;
const RST: u8 = 0x04;

impl SnatFlows<'_> {
    /// The client's packet from `port` with `flags` (UDP for flags 0): the SNAT port it left
    /// with, or None if the datapath dropped it.
    fn client(&mut self, proto: u8, port: u16, flags: u8) -> Option<u16> {
        let mut f = if proto == IPPROTO_UDP {
            Frame::udp(SocketAddrV4::new(*client().ip(), port), node_port())
        } else {
            Frame::tcp(SocketAddrV4::new(*client().ip(), port), node_port())
        };
        f.tcp_flags = flags;
        let out = self.dp.xdp_on(&f.build(), self.eth0);
        if out.action == XDP_DROP {
            return None;
        }
        assert_eq!(out.action, XDP_TX, "client packet from {port}");
        assert_valid(&out, "client packet");
        let p = parse(&out.frame);
        assert_eq!(p.dst, pod(REMOTE_POD_A), "client packet from {port}");
        assert_eq!(*p.src.ip(), NODE);
        Some(p.src.port())
    }

    /// The backend's packet to SNAT port `nat_port`: the client port it was translated to.
    fn backend(&mut self, proto: u8, nat_port: u16, flags: u8) -> u16 {
        let mut f = if proto == IPPROTO_UDP {
            Frame::udp(pod(REMOTE_POD_A), SocketAddrV4::new(NODE, nat_port))
        } else {
            Frame::tcp(pod(REMOTE_POD_A), SocketAddrV4::new(NODE, nat_port))
        };
        f.src_mac = NODE2_MAC;
        f.tcp_flags = flags;
        let out = self.dp.xdp_on(&f.build(), self.eth0);
        assert_eq!(out.action, XDP_TX, "backend packet to {nat_port}");
        assert_valid(&out, "backend packet");
        let p = parse(&out.frame);
        assert_eq!(p.src, node_port(), "backend packet to {nat_port}");
        assert_eq!(*p.dst.ip(), *client().ip());
        p.dst.port()
    }

    /// A TCP connection from `port`: SYN, SYN-ACK; its SNAT port.
    fn connect(&mut self, port: u16) -> Option<u16> {
        let nat = self.client(IPPROTO_TCP, port, SYN)?;
        assert_eq!(self.backend(IPPROTO_TCP, nat, SYN_ACK), port);
        Some(nat)
    }
}

/// SNAT ports come back only when their flow is over, after the time each close needs
/// (`lb_common::timeout`; the clock advanced by the test): the backend closing first holds
/// the port 65 s (the backend's `TIME_WAIT`), a close the client began or a RST 10 s, an
/// unanswered or quickly answered UDP exchange 30 s, a UDP stream 120 s. Before that a new
/// flow takes a free port instead, and only when none is free does it take a finished TCP
/// flow's port early (counted); a live flow's port is never taken, and an established flow
/// idle for 3 h keeps its port and its backend. (The test points the backend's port cursor
/// at the port in question, so the new flow tries it first.)
#[test]
fn snat_ports_are_reused_only_after_their_flows_time() {
    if !privileged("snat_ports_are_reused_only_after_their_flows_time") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = loaded(&[REMOTE_POD_A], false);
        dp.set_snat_ranges(NODE, &[PortRange::new(61000, 61003)], Timeouts::default());
        let be = u32::from_ne_bytes(REMOTE_POD_A.octets());
        let (id, _) = dp
            .maps
            .backends()
            .into_iter()
            .find(|(_, b)| b.addr_be == be)
            .expect("the remote backend");
        let mut n = SnatFlows { dp: &mut dp, eth0 };
        let tcp = IPPROTO_TCP;
        let point = |n: &mut SnatFlows<'_>, port: u16| {
            // The cursor holds the index of the port to try next (0 means "from the hash").
            n.dp.set_snat_cursor(
                id,
                if port == 61000 {
                    4
                } else {
                    u32::from(port - 61000)
                },
            );
        };
        let early = |n: &SnatFlows<'_>| n.dp.event(lb_common::Event::SnatPortTakenEarly);
        let pa = n.connect(40001).expect("a port");
        let pb = n.connect(40002).expect("a port");
        let pc = n.connect(40003).expect("a port");

        // The backend closes first: it keeps the tuple in TIME_WAIT for 60 s, so the port
        // waits 65 s while another is free, and after that is reused as any.
        n.backend(tcp, pa, FIN_ACK);
        assert_eq!(n.client(tcp, 40001, FIN_ACK), Some(pa));
        n.backend(tcp, pa, ACK);
        point(&mut n, pa);
        n.dp.advance_clock(64);
        let pd = n.connect(40004).expect("the free port");
        assert!(![pa, pb, pc].contains(&pd), "took {pd} of a held flow");
        point(&mut n, pa);
        n.dp.advance_clock(2);
        assert_eq!(
            n.connect(40005),
            Some(pa),
            "the closed flow's port after 65 s"
        );
        assert_eq!(early(&n), 0);
        assert!(
            !n.dp
                .conntrack()
                .iter()
                .any(|(k, _)| k.sport_be == 40001u16.to_be()),
            "the flow whose port was reused is still tracked"
        );
        assert_eq!(
            n.client(tcp, 40006, SYN),
            None,
            "every port holds a live flow"
        );

        // Established flows idle for 3 h keep port and backend; no new flow takes either.
        n.dp.advance_clock(3 * 3600);
        assert_eq!(n.client(tcp, 40002, ACK), Some(pb));
        assert_eq!(n.backend(tcp, pb, ACK), 40002);
        for (port, nat) in [(40003, pc), (40004, pd), (40005, pa)] {
            assert_eq!(n.client(tcp, port, ACK), Some(nat), "idle flow from {port}");
        }
        assert_eq!(
            n.client(tcp, 40006, SYN),
            None,
            "an idle flow's port was taken"
        );

        // The client closes first (the backend holds no TIME_WAIT), or a RST: 10 s. Within
        // them, with no port free, a new flow takes such a port early; after, as any.
        assert_eq!(n.client(tcp, 40003, FIN_ACK), Some(pc));
        n.backend(tcp, pc, FIN_ACK);
        assert_eq!(n.client(tcp, 40003, ACK), Some(pc));
        n.backend(tcp, pd, RST);
        point(&mut n, pc);
        n.dp.advance_clock(9);
        assert_eq!(n.connect(40007), Some(pc), "a finished flow's port, early");
        assert_eq!(early(&n), 1);
        point(&mut n, pd);
        n.dp.advance_clock(2);
        assert_eq!(
            n.connect(40008),
            Some(pd),
            "the reset flow's port after 10 s"
        );
        assert_eq!(early(&n), 1, "taken early although its time was over");

        assert_eq!(n.dp.count(Verdict::DropSnatExhausted), 2);
    });
}

/// UDP ports come back 30 s after an exchange answered at once (as DNS), 120 s after a
/// stream (traffic 2 s and more after its first packet) goes idle; never earlier, even with
/// no port free (a late answer would reach another client).
#[test]
fn snat_ports_of_udp_flows_come_back_after_their_time() {
    if !privileged("snat_ports_of_udp_flows_come_back_after_their_time") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = loaded(&[REMOTE_POD_A], false);
        dp.set_snat_ranges(NODE, &[PortRange::new(61000, 61001)], Timeouts::default());
        let mut n = SnatFlows { dp: &mut dp, eth0 };
        // UDP (never taken early: a late answer would reach another client), two ports.
        n.dp.set_snat_ranges(NODE, &[PortRange::new(61000, 61001)], Timeouts::default());
        let udp = IPPROTO_UDP;
        let exchange = |n: &mut SnatFlows<'_>, port: u16| {
            let nat = n.client(udp, port, 0)?;
            assert_eq!(n.backend(udp, nat, 0), port);
            Some(nat)
        };
        let u1 = exchange(&mut n, 41001).expect("a port for an exchange");
        let u2 = exchange(&mut n, 41002).expect("a port for a stream");
        assert_eq!(n.client(udp, 41003, 0), None, "both UDP ports are live");
        n.dp.advance_clock(3);
        assert_eq!(exchange(&mut n, 41002), Some(u2), "the stream goes on");
        n.dp.advance_clock(28);
        assert_eq!(
            exchange(&mut n, 41003),
            Some(u1),
            "the exchange's port after 30 s"
        );
        n.dp.advance_clock(3);
        assert_eq!(exchange(&mut n, 41003), Some(u1), "a second stream");
        n.dp.advance_clock(66);
        assert_eq!(
            n.client(udp, 41004, 0),
            None,
            "a stream idle 97 s lost its port"
        );
        n.dp.advance_clock(24);
        assert_eq!(
            exchange(&mut n, 41004),
            Some(u2),
            "the stream's port after 120 s"
        );
        assert_eq!(n.dp.count(Verdict::DropSnatExhausted), 2);
    });
}

/// A client that reuses its port for a new connection after the old one closed (a SYN on a
/// closed flow) gets a new flow: balanced anew and SNATed to another port, since the
/// backend may still hold the old tuple in `TIME_WAIT`; the old port stays held meanwhile.
/// A connect that never got through (reset after the backend's ACK) keeps its port.
#[test]
fn a_new_connection_on_a_closed_flows_port_gets_a_new_snat_port() {
    if !privileged("a_new_connection_on_a_closed_flows_port_gets_a_new_snat_port") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = loaded(&[REMOTE_POD_A], false);
        dp.set_snat_ranges(NODE, &[PortRange::new(61000, 61003)], Timeouts::default());
        let mut n = SnatFlows { dp: &mut dp, eth0 };
        let tcp = IPPROTO_TCP;
        let first = n.connect(40001).expect("a port");
        assert_eq!(
            n.client(tcp, 40001, ACK),
            Some(first),
            "established: same port"
        );
        assert_eq!(
            n.client(tcp, 40001, SYN),
            Some(first),
            "a retransmitted SYN: same port"
        );
        n.backend(tcp, first, FIN_ACK);
        assert_eq!(n.client(tcp, 40001, FIN_ACK), Some(first));
        n.backend(tcp, first, ACK);
        let second = n.connect(40001).expect("a port for the new connection");
        assert_ne!(
            second, first,
            "the new connection reused a tuple in TIME_WAIT"
        );
        assert_eq!(n.client(tcp, 40001, ACK), Some(second));
        // The old port is still held for the backend's TIME_WAIT; the new flow's is live.
        assert_eq!(n.dp.snat().len(), 2);
        assert_eq!(n.dp.event(lb_common::Event::FlowRestarted), 1);

        // A connect the backend refuses (its TIME_WAIT answers the SYN with an ACK, which
        // the client resets) is retried on the same port: the reset ended that TIME_WAIT.
        let third = n.client(tcp, 40002, SYN).expect("a port");
        assert_eq!(
            n.backend(tcp, third, ACK),
            40002,
            "the backend's ACK reaches the client"
        );
        assert_eq!(n.client(tcp, 40002, RST), Some(third));
        assert_eq!(
            n.client(tcp, 40002, SYN),
            Some(third),
            "the retry moved to another port"
        );
        assert_eq!(n.backend(tcp, third, SYN_ACK), 40002);
        assert_eq!(n.client(tcp, 40002, ACK), Some(third));
        assert_eq!(n.dp.event(lb_common::Event::FlowRestarted), 1);
    });
}

/// An upgrade from a datapath of layout version 1, whose SNATed flows live in its LRU SNAT
/// map (taken over as the legacy map) with ports of its range: their replies and packets are
/// translated as before. While its programs may still run, new flows take ports of that
/// range and reserve them in its map too (so the old programs translate them and never give
/// them away); once they are gone, new flows take the new ranges and skip the old one while
/// its flows live.
#[test]
fn flows_of_a_version_1_datapath_keep_their_snat_ports_through_the_upgrade() {
    if !privileged("flows_of_a_version_1_datapath_keep_their_snat_ports_through_the_upgrade") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = loaded(&[REMOTE_POD_A], false);
        let legacy = PortRange::new(61000, 61001);
        let mut cfg = lb_userspace::agent::node_config(
            NODE,
            &[PortRange::new(1024, 1025)],
            &[],
            Timeouts::default(),
        );
        cfg.flags = lb_common::CONFIG_F_SNAT_LEGACY | lb_common::CONFIG_F_SNAT_LEGACY_TOO;
        cfg.legacy_ports = legacy;
        dp.set_config(cfg);
        // The old datapath's flow from client port 40001, SNATed to 61000: its conntrack
        // entry in the LRU conntrack map (the table marked, as on adoption), its SNAT entry
        // in its LRU SNAT map.
        let be = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        let (id, b) = dp
            .maps
            .backends()
            .into_iter()
            .find(|(_, b)| b.addr_be == be(REMOTE_POD_A))
            .expect("the remote backend");
        let service_id = dp
            .maps
            .frontends()
            .first()
            .map(|(_, f)| f.service_id)
            .expect("a frontend");
        let key = |src: SocketAddrV4, dst: SocketAddrV4| lb_common::FlowKey {
            src_be: be(*src.ip()),
            dst_be: be(*dst.ip()),
            sport_be: src.port().to_be(),
            dport_be: dst.port().to_be(),
            proto: IPPROTO_TCP,
            ..lb_common::FlowKey::default()
        };
        let old_client = SocketAddrV4::new(*client().ip(), 40001);
        dp.insert_conntrack(&[(
            key(old_client, node_port()),
            lb_common::CtEntry {
                backend_id: id,
                backend_generation: b.generation,
                nat_addr_be: be(NODE),
                service_id,
                nat_port_be: 61000u16.to_be(),
                kind: lb_common::CT_FORWARD,
                _pad: 0,
            },
        )]);
        dp.insert_snat_legacy(&[(
            key(pod(REMOTE_POD_A), SocketAddrV4::new(NODE, 61000)),
            lb_common::SnatEntry {
                client_addr_be: be(*client().ip()),
                frontend_addr_be: be(NODE),
                client_port_be: 40001u16.to_be(),
                frontend_port_be: NODE_PORT.to_be(),
                service_id,
                last_seen_s: lb_userspace::datapath::nattable::now_s(),
                state: lb_common::SNAT_ESTABLISHED,
                _pad: [0; 3],
            },
        )]);
        dp.mark_flow_table_overflowed();
        let mut n = SnatFlows { dp: &mut dp, eth0 };
        let tcp = IPPROTO_TCP;
        let old_flow_works = |n: &mut SnatFlows<'_>| {
            assert_eq!(n.backend(tcp, 61000, ACK), 40001, "the old flow's reply");
            assert_eq!(
                n.client(tcp, 40001, ACK),
                Some(61000),
                "the old flow's packet"
            );
        };
        old_flow_works(&mut n);

        // The old programs may run: new flows take the old range's free port, in both maps.
        assert_eq!(n.connect(40002), Some(61001));
        assert_eq!(n.client(tcp, 40003, SYN), None, "the old range is full");
        assert_eq!(n.dp.snat_legacy().len(), 2);

        // They are gone: new flows take the new ranges and skip the old one.
        cfg.flags = lb_common::CONFIG_F_SNAT_LEGACY;
        n.dp.set_config(cfg);
        let mut excluded =
            lb_userspace::datapath::snat::ExcludedMap::open(&n.dp.ebpf).expect("map");
        excluded
            .write(&lb_userspace::datapath::snat::Exclusions {
                ranges: vec![legacy],
                ..Default::default()
            })
            .expect("exclusions");
        let p = n.connect(40003).expect("a port of the new ranges");
        assert!((1024..=1025).contains(&p), "{p}");
        old_flow_works(&mut n);
        assert_eq!(
            n.backend(tcp, 61001, ACK),
            40002,
            "the flow made during the switch"
        );
    });
}

/// A SNATed flow whose route cannot be used (IP forwarding off on the node: the FIB lookup
/// says so) is dropped and counted under `drop_no_route`, not as a translated flow.
#[test]
fn snat_without_a_usable_route_is_dropped_as_no_route() {
    if !privileged("snat_without_a_usable_route_is_dropped_as_no_route") {
        return;
    }
    on_node(|eth0, _| {
        // This thread is in the test's node namespace: the sysctl is that namespace's.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").expect("forwarding off");
        let mut dp = loaded(&[REMOTE_POD_A], false);
        let input = Frame::tcp(client(), node_port());
        let out = dp.xdp_on(&input.build(), eth0);
        assert_eq!(out.action, XDP_DROP);
        assert_eq!(dp.count(Verdict::DropNoRoute), 1);
        assert_eq!(dp.count(Verdict::NatNew), 0);
        let mut ack = input;
        ack.tcp_flags = 0x10;
        assert_eq!(dp.xdp_on(&ack.build(), eth0).action, XDP_DROP);
        assert_eq!(dp.count(Verdict::DropNoRoute), 2);
        assert_eq!(dp.count(Verdict::NatEstablished), 0);
    });
}

/// A SNATed flow's route is cached per backend for at most a second: after the next hop's
/// MAC changes (a node replaced behind the same address), the flow's packets go to the new
/// MAC within a second, with no agent involved.
#[test]
fn snat_route_follows_a_neighbour_change_within_a_second() {
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
    if !privileged("snat_route_follows_a_neighbour_change_within_a_second") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = loaded(&[REMOTE_POD_A], false);
        let input = Frame::tcp(client(), node_port());
        let out = dp.xdp_on(&input.build(), eth0);
        assert_eq!(out.action, XDP_TX);
        assert_eq!(out.frame[..6], NODE2_MAC);
        // This thread is in the node namespace; `ip` forked from it is too.
        let status = std::process::Command::new("ip")
            .args([
                "neigh",
                "replace",
                "192.168.50.12",
                "lladdr",
                "02:00:00:00:00:22",
            ])
            .args(["nud", "permanent", "dev", "eth0"])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip neigh replace");
        let mut ack = input;
        ack.tcp_flags = 0x10;
        let start = std::time::Instant::now();
        let mut macs = Vec::new();
        while start.elapsed() < std::time::Duration::from_millis(1500) {
            let out = dp.xdp_on(&ack.build(), eth0);
            assert_eq!(out.action, XDP_TX);
            assert_valid(&out, "established");
            macs.push(<[u8; 6]>::try_from(&out.frame[..6]).expect("mac"));
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(macs.last(), Some(&NEW_MAC), "new MAC after 1.5 s");
        // Within the first 1.1 s the new MAC is in use.
        let by_1100ms = macs.iter().take(22).any(|m| *m == NEW_MAC);
        assert!(by_1100ms, "route cache held past a second: {macs:?}");
        assert!(macs.iter().all(|m| *m == NODE2_MAC || *m == NEW_MAC));
    });
}

/// Client ports of `client()` whose flows share one flow-table bucket (the small test table).
fn ports_in_one_bucket(dp: &Datapath, proto: u8, n: usize) -> Vec<u16> {
    let buckets = dp.flow_buckets();
    let bucket = |port: u16| {
        lb_common::hash::flow_bucket(
            u32::from_ne_bytes(client().ip().octets()),
            port.to_be(),
            proto,
        ) & (buckets - 1)
    };
    let target = bucket(40000);
    (40000..u16::MAX)
        .filter(|p| bucket(*p) == target)
        .take(n)
        .collect()
}

/// A flow-table bucket holds three flows; more flows of that bucket go to the LRU conntrack
/// map, and every one of them keeps its backend and gets its replies reverse-translated. A
/// flow idle past its timeout gives its slot to the next new flow instead.
#[test]
fn flows_of_a_full_bucket_overflow_to_conntrack_and_keep_working() {
    if !privileged("flows_of_a_full_bucket_overflow_to_conntrack_and_keep_working") {
        return;
    }
    on_node(|eth0, lxc0| {
        let mut dp = loaded(&[LOCAL_POD], false);
        let ports = ports_in_one_bucket(&dp, IPPROTO_TCP, 5);
        assert_eq!(ports.len(), 5);
        let flow = |port| Frame::tcp(SocketAddrV4::new(*client().ip(), port), node_port());
        for &port in &ports {
            let input = flow(port);
            let out = dp.xdp_on(&input.build(), eth0);
            assert_eq!(out.action, XDP_PASS);
            assert_eq!(
                out.frame,
                translated(&input, None, Some(pod(LOCAL_POD))),
                "new flow from port {port}"
            );
        }
        assert_eq!(dp.count(Verdict::NatNew), 5);
        // 3 flows in the table (forward and reply entries each), 2 in the LRU map.
        assert_eq!(dp.flow_table_entries().len(), 6);
        assert_eq!(dp.overflow_conntrack().len(), 4);
        for &port in &ports {
            let input = flow(port);
            let out = dp.xdp_on(&input.build(), eth0);
            assert_eq!(
                out.frame,
                translated(&input, None, Some(pod(LOCAL_POD))),
                "established flow from port {port}"
            );
            let reply = Frame {
                src: pod(LOCAL_POD),
                dst: input.src,
                ..input
            };
            let out = dp.tc_on(&reply.build(), lxc0);
            assert_eq!(out.action, TC_ACT_REDIRECT, "reply to port {port}");
            assert_eq!(out.frame, translated(&reply, Some(node_port()), None));
            assert_valid(&out, "tc reply");
        }
        assert_eq!(dp.count(Verdict::NatEstablished), 5);
        assert_eq!(dp.count(Verdict::ReverseNat), 5);

        // Unanswered flows give up their slots after the timeout of unanswered UDP flows
        // (1 s here), answered ones only after theirs (an hour): of three UDP flows of one
        // bucket, the one that got a reply keeps its slot, the two others give theirs to new
        // flows, and the flow after those overflows.
        dp.set_snat_ranges(
            NODE,
            &[PortRange::new(SNAT_PORTS.0, SNAT_PORTS.1)],
            Timeouts {
                udp_s: 1,
                udp_stream_s: 3600,
                ..Timeouts::default()
            },
        );
        let udp_ports = ports_in_one_bucket(&dp, IPPROTO_UDP, 6);
        let udp = |port| Frame::udp(SocketAddrV4::new(*client().ip(), port), node_port());
        for &port in &udp_ports[..3] {
            assert_eq!(dp.xdp_on(&udp(port).build(), eth0).action, XDP_PASS);
        }
        let answered = udp(udp_ports[0]);
        let reply = Frame {
            src: pod(LOCAL_POD),
            dst: answered.src,
            ..answered.clone()
        };
        assert_eq!(dp.tc_on(&reply.build(), lxc0).action, TC_ACT_REDIRECT);
        let overflowed = dp.overflow_conntrack().len();
        dp.advance_clock(2);
        for &port in &udp_ports[3..5] {
            let input = udp(port);
            let out = dp.xdp_on(&input.build(), eth0);
            assert_eq!(out.frame, translated(&input, None, Some(pod(LOCAL_POD))));
        }
        assert_eq!(
            dp.overflow_conntrack().len(),
            overflowed,
            "a new flow overflowed although an unanswered flow's slot had expired"
        );
        assert_eq!(dp.xdp_on(&udp(udp_ports[5]).build(), eth0).action, XDP_PASS);
        assert_eq!(
            dp.overflow_conntrack().len(),
            overflowed + 2,
            "the answered flow's slot was given away"
        );
        let out = dp.tc_on(&reply.build(), lxc0);
        assert_eq!(out.frame, translated(&reply, Some(node_port()), None));
    });
}

/// A datapath that starts beside flows of a datapath without the flow table (their entries
/// only in the LRU conntrack map) marks every bucket, and finds those flows and their replies;
/// the agent's sweep later unmarks the buckets that have no flow in the LRU map.
#[test]
fn flows_only_in_conntrack_are_found_once_the_table_is_marked() {
    if !privileged("flows_only_in_conntrack_are_found_once_the_table_is_marked") {
        return;
    }
    on_node(|eth0, lxc0| {
        let mut dp = loaded(&[LOCAL_POD], false);
        let input = Frame::tcp(client(), node_port());
        assert_eq!(dp.xdp_on(&input.build(), eth0).action, XDP_PASS);
        // Move the flow from the table to the LRU map, as an older datapath kept it.
        let entries = dp.flow_table_entries();
        assert_eq!(entries.len(), 2);
        dp.clear_flow_table();
        dp.insert_conntrack(&entries);
        let reply = Frame {
            src: pod(LOCAL_POD),
            dst: client(),
            ..input.clone()
        };
        // Unmarked, the table misses: the reply is not translated.
        assert_eq!(dp.tc_on(&reply.build(), lxc0).frame, reply.build());
        dp.mark_flow_table_overflowed();
        let out = dp.tc_on(&reply.build(), lxc0);
        assert_eq!(out.frame, translated(&reply, Some(node_port()), None));
        let out = dp.xdp_on(&input.build(), eth0);
        assert_eq!(out.frame, translated(&input, None, Some(pod(LOCAL_POD))));
        assert_eq!(dp.count(Verdict::NatEstablished), 1);
        // The agent's sweeps clear every mark but that of the flow's bucket (a bucket must
        // be found idle twice), which keeps working; once the flow has left the LRU map its
        // mark goes too. A bucket a new flow marks between two sweeps keeps its mark.
        let buckets = dp.flow_buckets() as usize;
        let mut sweeper = lb_userspace::datapath::flows::OverflowSweeper::default();
        let sweep = dp.sweep_overflow(&mut sweeper);
        assert_eq!((sweep.marked, sweep.cleared), (buckets, 0));
        let sweep = dp.sweep_overflow(&mut sweeper);
        assert_eq!((sweep.marked, sweep.cleared), (buckets, buckets - 1));
        let out = dp.tc_on(&reply.build(), lxc0);
        assert_eq!(out.frame, translated(&reply, Some(node_port()), None));
        dp.clear_conntrack();
        assert_eq!(dp.sweep_overflow(&mut sweeper).cleared, 0);
        let sweep = dp.sweep_overflow(&mut sweeper);
        assert_eq!((sweep.marked, sweep.cleared), (1, 1));
        assert_eq!(dp.sweep_overflow(&mut sweeper).marked, 0);
    });
}

/// Pods open connections to the ClusterIP from two CPUs at once, every flow landing in one of
/// a few flow-table buckets (so the CPUs take the same buckets' locks, fill them and overflow
/// to the LRU map): every flow is recorded exactly once, with the backend its first packet
/// went to and a reply entry for that backend, and keeps that backend; no packet is dropped
/// for a bucket that stayed locked. (Two writers inside one bucket's critical section, a few
/// dozen instructions, are too rare here for this test to prove the lock itself.)
#[test]
fn concurrent_new_flows_in_shared_buckets_are_each_recorded_once() {
    if !privileged("concurrent_new_flows_in_shared_buckets_are_each_recorded_once") {
        return;
    }
    let mut dp = loaded(&[LOCAL_POD, REMOTE_POD_A, REMOTE_POD_B], false);
    let buckets = dp.flow_buckets();
    let bucket = |c: &SocketAddrV4| {
        lb_common::hash::flow_bucket(
            u32::from_ne_bytes(c.ip().octets()),
            c.port().to_be(),
            IPPROTO_TCP,
        ) & (buckets - 1)
    };
    // 400 pod clients (address, port) whose flows fall into 4 buckets, split between two
    // threads alternately, so both threads write the same buckets at the same time.
    let candidates = (10..250u8).flat_map(|host| {
        (30_000..40_000u16)
            .map(move |port| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, host), port))
    });
    let targets: Vec<u32> = (0..4u16)
        .map(|i| {
            bucket(&SocketAddrV4::new(
                Ipv4Addr::new(10, 244, 1, 10),
                30_000 + i,
            ))
        })
        .collect();
    let clients: Vec<SocketAddrV4> = candidates
        .filter(|c| targets.contains(&bucket(c)))
        .take(400)
        .collect();
    assert_eq!(clients.len(), 400);
    let syn = |c: &SocketAddrV4| Frame::tcp(*c, cluster_ip());
    let lists: Vec<Vec<Vec<u8>>> = (0..2)
        .map(|t| {
            clients
                .iter()
                .skip(t)
                .step_by(2)
                .map(|c| syn(c).build())
                .collect()
        })
        .collect();
    let outs = dp.tc_concurrently(&lists);
    let mut first = std::collections::BTreeMap::new();
    for (t, out) in outs.iter().enumerate() {
        for (c, o) in clients.iter().skip(t).step_by(2).zip(out) {
            assert_eq!(o.action, TC_NEXT, "flow from {c}");
            first.insert(*c, parse(&o.frame).dst);
        }
    }
    assert_eq!(dp.count(Verdict::NatNew), 400);
    let ct = dp.conntrack();
    for (c, backend) in &first {
        let (addr, port) = (u32::from_ne_bytes(c.ip().octets()), c.port().to_be());
        let forward: Vec<_> = ct
            .iter()
            .filter(|(k, e)| {
                e.kind == lb_common::CT_FORWARD && k.src_be == addr && k.sport_be == port
            })
            .collect();
        assert_eq!(forward.len(), 1, "forward entries of {c}");
        let reverse: Vec<_> = ct
            .iter()
            .filter(|(k, e)| {
                e.kind == lb_common::CT_REVERSE && k.dst_be == addr && k.dport_be == port
            })
            .collect();
        assert_eq!(reverse.len(), 1, "reply entries of {c}");
        assert_eq!(
            (reverse[0].0.src_be, u16::from_be(reverse[0].0.sport_be)),
            (u32::from_ne_bytes(backend.ip().octets()), backend.port()),
            "the reply entry of {c} names another backend than its first packet reached"
        );
        let again = dp.tc(&syn(c).build());
        assert_eq!(parse(&again.frame).dst, *backend, "{c} moved");
    }
    assert!(
        !dp.overflow_conntrack().is_empty(),
        "the buckets never overflowed: the test did not exercise the LRU path"
    );
}

/// While an older datapath (without the flow table) may still run on some interface, the
/// agent sets `CONFIG_F_CONNTRACK_TOO`: new flows are recorded in the LRU conntrack map too,
/// where those programs look, with the same backend and reply entry.
#[test]
fn new_flows_also_go_to_conntrack_while_an_older_datapath_may_run() {
    if !privileged("new_flows_also_go_to_conntrack_while_an_older_datapath_may_run") {
        return;
    }
    let mut dp = loaded(&[LOCAL_POD, REMOTE_POD_A, REMOTE_POD_B], false);
    dp.set_config(lb_common::Config {
        flags: lb_common::CONFIG_F_CONNTRACK_TOO,
        ..lb_common::Config::default()
    });
    let src = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 9), 41000);
    let out = dp.tc(&Frame::tcp(src, cluster_ip()).build());
    assert_eq!(out.action, TC_NEXT);
    let mut table = dp.flow_table_entries();
    let mut lru = dp.overflow_conntrack();
    table.sort_by_key(|(k, _)| (k.src_be, k.sport_be));
    lru.sort_by_key(|(k, _)| (k.src_be, k.sport_be));
    assert_eq!(table.len(), 2, "forward and reply entries in the table");
    assert_eq!(lru, table, "the LRU map holds the same entries");
    let backend = parse(&out.frame).dst;
    assert!(lru.iter().any(|(k, e)| e.kind == lb_common::CT_REVERSE
        && k.src_be == u32::from_ne_bytes(backend.ip().octets())));
}

/// An established SNATed flow keeps the source address it was given when the node's SNAT
/// address changes (its SNAT entry, which its replies find, is keyed by that address); new
/// flows take the new one.
#[test]
fn snat_flow_keeps_its_address_when_the_node_address_changes() {
    if !privileged("snat_flow_keeps_its_address_when_the_node_address_changes") {
        return;
    }
    on_node(|eth0, _| {
        let mut dp = loaded(&[REMOTE_POD_A], false);
        let input = Frame::tcp(client(), node_port());
        let first = dp.xdp_on(&input.build(), eth0);
        assert_eq!(first.action, XDP_TX);
        let source = parse(&first.frame).src;
        assert_eq!(*source.ip(), NODE);
        let other = Ipv4Addr::new(192, 168, 50, 99);
        dp.set_snat(other, SNAT_PORTS);
        let mut ack = input.clone();
        ack.tcp_flags = 0x10;
        let next = dp.xdp_on(&ack.build(), eth0);
        assert_eq!(parse(&next.frame).src, source, "the flow's source moved");
        let new = Frame::tcp(SocketAddrV4::new(*client().ip(), 40999), node_port());
        let out = dp.xdp_on(&new.build(), eth0);
        assert_eq!(
            *parse(&out.frame).src.ip(),
            other,
            "a new flow kept the old address"
        );
    });
}

/// Frames the node's kernel would drop (`ip_rcv`: a wrong IPv4 header checksum; `udp_rcv`: a
/// UDP length below 8 or past the IP payload; `tcp_v4_rcv`: a data offset past the segment)
/// pass both programs untouched, counted `pass_malformed`, and take no flow entry. Found by
/// the packet fuzzer (`cargo xtask fuzz`) on the datapath before the checks.
#[test]
fn frames_the_kernel_refuses_pass_untouched_and_take_no_flow() {
    if !privileged("frames_the_kernel_refuses_pass_untouched_and_take_no_flow") {
        return;
    }
    let mut dp = loaded(&[LOCAL_POD, REMOTE_POD_A], false);
    let l4 = ETH_HLEN + 20;
    let refix_ip = |f: &mut Vec<u8>| xlb_tests::fuzz::frame::fix_ip_checksum(f);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for udp in [false, true] {
        let to = |dst| {
            if udp {
                Frame::udp(client(), dst).build()
            } else {
                Frame::tcp(client(), dst).build()
            }
        };
        for dst in [node_port(), cluster_ip()] {
            let mut f = to(dst);
            f[ETH_HLEN + 10] ^= 0x40;
            cases.push(("wrong IPv4 header checksum", f));
            let mut f = to(dst);
            f[ETH_HLEN + 10] = 0;
            f[ETH_HLEN + 11] = 0;
            cases.push(("zero IPv4 header checksum", f));
        }
    }
    let mut f = Frame::udp(client(), node_port()).build();
    f[l4 + 4..l4 + 6].copy_from_slice(&4u16.to_be_bytes());
    cases.push(("UDP length 4", f));
    let mut f = Frame::udp(client(), node_port()).build();
    f[l4 + 4..l4 + 6].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("UDP length past the IP payload", f));
    let mut f = Frame::tcp(client(), node_port()).build();
    f[l4 + 12] = 0xf0 | (f[l4 + 12] & 0x0f);
    cases.push(("TCP data offset 15 in a 36-byte segment", f));
    let mut f = Frame {
        ip_options: vec![1, 1, 1, 0],
        ..Frame::tcp(client(), node_port())
    }
    .build();
    f[ETH_HLEN + 22] ^= 0x01; // inside the options
    cases.push(("options under a stale checksum", f));
    // And what must still translate: options with the checksum right.
    let mut with_options = Frame {
        ip_options: vec![1, 1, 1, 0],
        ..Frame::tcp(client(), node_port())
    }
    .build();
    refix_ip(&mut with_options);
    for (what, frame) in &cases {
        let before = dp.count(Verdict::PassMalformed);
        let out = dp.xdp(frame);
        assert_eq!(out.action, XDP_PASS, "{what}");
        assert_eq!(&out.frame, frame, "{what}: the NIC program changed it");
        let out = dp.tc(frame);
        assert_eq!(out.action, TC_NEXT, "{what}");
        assert_eq!(&out.frame, frame, "{what}: the pod program changed it");
        assert_eq!(dp.count(Verdict::PassMalformed), before + 2, "{what}");
    }
    assert!(
        dp.flow_table_entries().is_empty(),
        "a refused frame took a flow entry"
    );
    let mut local = loaded(&[LOCAL_POD], false);
    let out = local.xdp(&with_options);
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(
        parse(&out.frame).dst,
        pod(LOCAL_POD),
        "a valid frame with options translates"
    );
    assert_valid(&out, "options");
}
