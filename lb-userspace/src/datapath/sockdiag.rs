//! Ending the connected UDP sockets that socket-level load balancing pointed at a backend that
//! left. A connected socket keeps the address `connect()` gave it, so without this a node
//! process's UDP socket to a Service would keep sending to a pod that is gone, where kube-proxy
//! flushes the UDP conntrack entries of a removed endpoint and the next datagram goes to a live
//! one. Through `sock_diag` (`SOCK_DIAG_BY_FAMILY` to find them in this network namespace,
//! `SOCK_DESTROY` to end them, which needs `CONFIG_INET_DIAG_DESTROY`): the owner's next call
//! fails with `ECONNABORTED`, and its reconnect is balanced anew. Only sockets our programs
//! translated are ended (their cookie is in the socket reverse-translation map); a socket a
//! process connected to a pod address by itself is left alone.
//!
//! The messages are built and parsed by `netlink-packet-sock-diag` (`SockDiagDestroy` for
//! `SOCK_DESTROY`) and sent through [`super::netlink`]'s request helper. Asks and ends
//! sockets only of this network namespace; never binds, connects or reads them.

use std::{
    collections::{BTreeSet, HashSet},
    io,
    net::{IpAddr, Ipv4Addr},
};

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagDestroy, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use super::netlink::{DUMP, ask};

/// A connected UDP socket of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub cookie: u64,
    pub peer: (Ipv4Addr, u16),
    /// The kernel's identity of the socket, given back to it to end this one.
    id: SocketId,
}

impl UdpSocket {
    fn from_id(id: SocketId) -> Option<Self> {
        let IpAddr::V4(peer) = id.destination_address else {
            return None;
        };
        Some(Self {
            cookie: cookie(id.cookie),
            peer: (peer, id.destination_port),
            id,
        })
    }
}

/// The kernel's socket cookie from `inet_diag_sockid.idiag_cookie` (two host-order words, the
/// low one first).
fn cookie(raw: [u8; 8]) -> u64 {
    let word = |i: usize| {
        u64::from(u32::from_ne_bytes([
            raw[i],
            raw[i + 1],
            raw[i + 2],
            raw[i + 3],
        ]))
    };
    word(0) | (word(4) << 32)
}

/// Ends the connected UDP sockets of this network namespace whose peer is in `left` and that
/// `translated(cookie, peer)` says our programs pointed there. Returns how many it ended.
pub fn end_udp_sockets_to<S: std::hash::BuildHasher>(
    left: &HashSet<(Ipv4Addr, u16), S>,
    translated: impl Fn(u64, (Ipv4Addr, u16)) -> bool,
) -> io::Result<usize> {
    if left.is_empty() {
        return Ok(0);
    }
    let mut ended = 0;
    for s in connected_udp()? {
        if left.contains(&s.peer) && translated(s.cookie, s.peer) && destroy(&s).is_ok() {
            ended += 1;
        }
    }
    Ok(ended)
}

/// The local ports that sockets of this network namespace's processes hold where the kernel
/// would not give them out itself: TCP listeners and every UDP socket (IPv4 and IPv6, whose
/// sockets may be dual-stack).
pub fn bound_ports() -> io::Result<BTreeSet<u16>> {
    let mut ports = BTreeSet::new();
    for family in [AF_INET, AF_INET6] {
        for (protocol, states) in [
            (IPPROTO_TCP, StateFlags::LISTEN),
            (IPPROTO_UDP, StateFlags::all()),
        ] {
            for id in dump(family, protocol, states)? {
                if id.source_port != 0 {
                    ports.insert(id.source_port);
                }
            }
        }
    }
    Ok(ports)
}

/// Connected UDP sockets are in state `TCP_ESTABLISHED`.
fn connected_udp() -> io::Result<Vec<UdpSocket>> {
    Ok(dump(AF_INET, IPPROTO_UDP, StateFlags::ESTABLISHED)?
        .into_iter()
        .filter_map(UdpSocket::from_id)
        .collect())
}

fn request(family: u8, protocol: u8, states: StateFlags, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id,
    })
}

/// The ids of this network namespace's sockets of `family` and `protocol` in `states`.
fn dump(family: u8, protocol: u8, states: StateFlags) -> io::Result<Vec<SocketId>> {
    let any = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let answers = ask(
        NETLINK_SOCK_DIAG,
        request(family, protocol, states, any),
        DUMP,
    )?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            SockDiagMessage::InetResponse(r) => Some(r.header.socket_id),
            _ => None,
        })
        .collect())
}

fn destroy(s: &UdpSocket) -> io::Result<()> {
    let message = request(AF_INET, IPPROTO_UDP, StateFlags::all(), s.id.clone());
    ask(
        NETLINK_SOCK_DIAG,
        SockDiagDestroy::new(message),
        NLM_F_REQUEST | NLM_F_ACK,
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::cookie;

    #[test]
    fn cookie_words_low_first() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x1234_5678u32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x9abc_def0u32.to_ne_bytes());
        assert_eq!(cookie(raw), 0x9abc_def0_1234_5678);
    }

    /// Asked of this namespace's kernel (read only): a UDP socket this test binds is among the
    /// bound ports, and one it connects is among the connected sockets with its peer.
    #[test]
    fn finds_this_process_sockets() {
        let bound = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = bound.local_addr().expect("addr").port();
        assert!(super::bound_ports().expect("dump").contains(&port));
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let peer_port = peer.local_addr().expect("addr").port();
        bound.connect(("127.0.0.1", peer_port)).expect("connect");
        let found = super::connected_udp().expect("dump");
        assert!(
            found
                .iter()
                .any(|s| s.peer == (std::net::Ipv4Addr::LOCALHOST, peer_port)
                    && s.id.source_port == port),
            "{found:?}"
        );
    }
}
