//! Packet tests: the datapath's programs run through BPF_PROG_TEST_RUN on crafted frames, and
//! the test checks the returned verdict and the exact bytes that come out.

use lb_common::Verdict;
use xlb_tests::{
    harness::{
        Datapath,
        action::{TC_ACT_OK, XDP_PASS},
    },
    packet::{ETH_HLEN, Frame},
    privileged,
};

fn client() -> std::net::SocketAddrV4 {
    "203.0.113.7:40000".parse().expect("addr")
}
fn node_port() -> std::net::SocketAddrV4 {
    "192.168.50.11:32510".parse().expect("addr")
}

#[test]
fn non_service_packet_passes_byte_for_byte() {
    if !privileged("non_service_packet_passes_byte_for_byte") {
        return;
    }
    let mut dp = Datapath::load();
    for frame in [
        Frame::tcp(client(), node_port()).build(),
        Frame::udp(client(), node_port()).build(),
    ] {
        let out = dp.xdp(&frame);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, frame, "XDP changed a non-service packet");
        let out = dp.tc(&frame);
        assert_eq!(out.action, TC_ACT_OK);
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
            with(&tcp, &|v| v[20..22].copy_from_slice(&[0x00, 0x10])),
            Verdict::PassFragment,
        ),
        (
            "first fragment (MF)",
            with(&tcp, &|v| v[20..22].copy_from_slice(&[0x20, 0x00])),
            Verdict::PassFragment,
        ),
        (
            "last fragment",
            with(&udp, &|v| v[20..22].copy_from_slice(&[0x00, 0xb9])),
            Verdict::PassFragment,
        ),
        ("ICMP", with(&tcp, &|v| v[23] = 1), Verdict::PassOtherProto),
        ("GRE", with(&tcp, &|v| v[23] = 47), Verdict::PassOtherProto),
        (
            "SCTP",
            with(&tcp, &|v| v[23] = 132),
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
fn malformed_packets_pass_untouched_and_are_counted() {
    if !privileged("malformed_packets_pass_untouched_and_are_counted") {
        return;
    }
    let cases = malformed();
    assert!(cases.len() >= 20);
    let mut dp = Datapath::load();
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
        assert_eq!(out.action, TC_ACT_OK, "TC verdict for {what}");
        assert_eq!(&out.frame, frame, "TC changed: {what}");
        assert_eq!(
            dp.count(*verdict),
            before + 2,
            "TC counted {what} under another reason"
        );
    }
}
