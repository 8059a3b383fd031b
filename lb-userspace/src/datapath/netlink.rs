//! Network interfaces of this namespace: the current list, the addresses they hold, and a
//! stream of rtnetlink link notifications, so the agent attaches to pod interfaces that
//! appear after it started. The rtnetlink messages are built and parsed by
//! `netlink-packet-route` and sent over `netlink-sys` sockets (blocking: the link watcher runs
//! on a thread of its own); only the `ETHTOOL_GDRVINFO` ioctl of [`driver`] is by hand (no
//! maintained crate offers it). Reads only: nothing here changes a link or an address.
use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A link notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link was created or changed.
    New { index: u32, name: String },
    /// A link was removed.
    Removed { index: u32, name: String },
    /// Notifications may have been lost (the socket's buffer overran): compare with the links
    /// that exist now.
    Resync,
}

/// The driver of interface `name` (`veth`, `netkit`, ...), from the `ETHTOOL_GDRVINFO`
/// ioctl in this network namespace; `None` if the interface is gone or does not say.
#[must_use]
pub fn driver(name: &str) -> Option<String> {
    // struct ifreq: the name, then (in the union) the pointer to the request.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut u8,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    // struct ethtool_drvinfo: cmd, driver[32], version[32], fw_version[32], bus_info[32],
    // erom_version[32], reserved2[12], then five u32 counts.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: info.as_mut_ptr(),
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .ok()?;
    // SAFETY: SIOCETHTOOL reads the ifreq and writes at most the 196-byte drvinfo it points
    // to; both outlive the call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &raw mut req) };
    if r != 0 {
        return None;
    }
    let driver = &info[4..36];
    let end = driver.iter().position(|&b| b == 0).unwrap_or(driver.len());
    Some(String::from_utf8_lossy(&driver[..end]).into_owned())
}

/// Interfaces that exist now: (index, name); empty if the kernel cannot be asked.
#[must_use]
pub fn links() -> Vec<(u32, String)> {
    let answers = ask(
        NETLINK_ROUTE,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        DUMP,
    );
    answers
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some((l.header.index, link_name(&l)?)),
            _ => None,
        })
        .collect()
}

/// IPv4 addresses held by interfaces now: (interface name, address). The name is the
/// address's label (the interface's name, or an alias such as `eth0:1`), and the address its
/// local one, as `getifaddrs` gives them.
#[must_use]
pub fn addresses() -> Vec<(String, Ipv4Addr)> {
    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet;
    let answers = ask(
        NETLINK_ROUTE,
        RouteNetlinkMessage::GetAddress(request),
        DUMP,
    );
    answers
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.family == AddressFamily::Inet => {
                let (mut local, mut address, mut label) = (None, None, None);
                for attr in &a.attributes {
                    match attr {
                        AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
                        AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
                        AddressAttribute::Label(l) => label = Some(l.clone()),
                        _ => {}
                    }
                }
                Some((label?, local.or(address)?))
            }
            _ => None,
        })
        .collect()
}

/// Shell-style match with `*` (any run) and `?` (one character).
#[must_use]
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// The flags of a dump request.
pub(super) const DUMP: u16 = NLM_F_REQUEST | NLM_F_DUMP;

/// The link notification group, as a bind mask (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;

/// A netlink socket subscribed to link notifications.
pub struct LinkWatcher {
    socket: Socket,
}

impl LinkWatcher {
    pub fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        Ok(Self { socket })
    }

    /// Blocks until notifications arrive and returns them.
    pub fn recv(&self) -> io::Result<Vec<LinkEvent>> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.socket.recv(&mut &mut buf[..], 0)?;
        Ok(parse_link_messages(&buf[..n.min(buf.len())]))
    }
}

/// The netlink messages of a datagram, in order; parsing stops at the first malformed one.
pub(super) fn messages<T: NetlinkDeserializable>(buf: &[u8]) -> Vec<NetlinkMessage<T>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < buf.len() {
        let Ok(m) = NetlinkMessage::<T>::deserialize(&buf[off..]) else {
            break;
        };
        let len = m.header.length as usize;
        if len == 0 {
            break;
        }
        out.push(m);
        off += (len + 3) & !3;
    }
    out
}

/// Parses a datagram of netlink messages into link events; malformed parts are skipped.
#[must_use]
pub fn parse_link_messages(buf: &[u8]) -> Vec<LinkEvent> {
    messages::<RouteNetlinkMessage>(buf)
        .into_iter()
        .filter_map(|m| match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => Some(LinkEvent::New {
                index: l.header.index,
                name: link_name(&l)?,
            }),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                Some(LinkEvent::Removed {
                    index: l.header.index,
                    name: link_name(&l)?,
                })
            }
            _ => None,
        })
        .collect()
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Sends `request` over a fresh socket of netlink `protocol` and collects the answers: every
/// part of a dump (`NLM_F_DUMP` in `flags`), or the one answer (or acknowledgement) of any
/// other request. A netlink error comes back as the OS error it carries.
pub(super) fn ask<T>(protocol: isize, request: T, flags: u16) -> io::Result<Vec<T>>
where
    T: NetlinkSerializable + NetlinkDeserializable + fmt::Debug,
{
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut packet = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(request),
    );
    packet.header.flags = flags;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut out = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0)?;
    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut answers = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let parts = messages::<T>(&buf[..n.min(buf.len())]);
        if parts.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a netlink answer that does not parse",
            ));
        }
        for m in parts {
            match m.payload {
                NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(answers),
                    };
                }
                _ => {}
            }
        }
        if !dump && !answers.is_empty() {
            return Ok(answers);
        }
    }
}

/// Whether a datagram answering `RTM_GETLINK` describes a link whose peer (veth, netkit) is in
/// another network namespace (it carries `IFLA_LINK_NETNSID`); None if it holds no link. The
/// tests' view of what [`peer_elsewhere`] decides from the kernel's answer.
#[cfg(test)]
fn peer_elsewhere_in(buf: &[u8]) -> Option<bool> {
    match messages::<RouteNetlinkMessage>(buf)
        .into_iter()
        .next()?
        .payload
    {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => Some(has_peer_netns(&l)),
        _ => None,
    }
}

fn has_peer_netns(l: &LinkMessage) -> bool {
    l.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)))
}

/// Whether the peer of link `index` (a veth or netkit device) is in another network namespace,
/// as a pod's is; asked of the kernel with `RTM_GETLINK`. None if it cannot tell.
#[must_use]
pub fn peer_elsewhere(index: u32) -> Option<bool> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    let answers = ask(
        NETLINK_ROUTE,
        RouteNetlinkMessage::GetLink(request),
        NLM_F_REQUEST,
    )
    .ok()?;
    answers.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Some(has_peer_netns(&l)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::{LinkEvent, glob_match, parse_link_messages, peer_elsewhere_in};

    #[test]
    fn globs() {
        assert!(glob_match("lxc*", "lxc0a1b"));
        assert!(glob_match("lxc*", "lxc"));
        assert!(!glob_match("lxc*", "eth0"));
        assert!(glob_match("veth?", "veth1"));
        assert!(!glob_match("veth?", "veth12"));
        assert!(glob_match("*", "anything"));
    }

    fn newlink(kind: u16, index: u32, name: &str) -> Vec<u8> {
        newlink_with(kind, index, name, &[])
    }

    /// A link message with the name and, after it, the given (type, payload) attributes.
    fn newlink_with(kind: u16, index: u32, name: &str, extra: &[(u16, &[u8])]) -> Vec<u8> {
        let mut attr = Vec::new();
        let name_len = name.len() + 1;
        attr.extend_from_slice(&((4 + name_len) as u16).to_ne_bytes());
        attr.extend_from_slice(&3u16.to_ne_bytes());
        attr.extend_from_slice(name.as_bytes());
        attr.push(0);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        for (t, payload) in extra {
            attr.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
            attr.extend_from_slice(&t.to_ne_bytes());
            attr.extend_from_slice(payload);
            while attr.len() % 4 != 0 {
                attr.push(0);
            }
        }
        let mut ifi = vec![0u8; 16];
        ifi[4..8].copy_from_slice(&index.to_ne_bytes());
        let len = 16 + ifi.len() + attr.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&ifi);
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn parses_link_notifications_and_skips_garbage() {
        let mut buf = newlink(16, 7, "lxc42");
        buf.extend(newlink(17, 3, "lxc9"));
        assert_eq!(
            parse_link_messages(&buf),
            vec![
                LinkEvent::New {
                    index: 7,
                    name: "lxc42".into()
                },
                LinkEvent::Removed {
                    index: 3,
                    name: "lxc9".into()
                },
            ]
        );
        assert!(parse_link_messages(&buf[..20]).is_empty());
        assert!(parse_link_messages(&[0xff; 7]).is_empty());
    }

    #[test]
    fn tells_a_peer_in_another_namespace() {
        // A pod's veth: its peer's namespace id is attribute 37 (IFLA_LINK_NETNSID).
        let pod = newlink_with(16, 7, "lxc42", &[(37, &5u32.to_ne_bytes())]);
        assert_eq!(peer_elsewhere_in(&pod), Some(true));
        // Both ends here: no such attribute.
        let local = newlink_with(16, 8, "lxc43", &[(13, &1500u32.to_ne_bytes())]);
        assert_eq!(peer_elsewhere_in(&local), Some(false));
        assert_eq!(peer_elsewhere_in(&newlink(17, 8, "lxc43")), None);
        assert_eq!(peer_elsewhere_in(&[0xff; 7]), None);
    }

    /// Asked of this namespace's kernel (read only): its loopback is there, with its address,
    /// and a link's peer is not reported elsewhere when the link has none.
    #[test]
    fn lists_the_loopback_link_and_its_address() {
        let links = super::links();
        let lo = links.iter().find(|(_, name)| name == "lo");
        let Some((index, _)) = lo else {
            panic!("no lo among {links:?}");
        };
        assert!(
            super::addresses().contains(&("lo".to_string(), std::net::Ipv4Addr::LOCALHOST)),
            "{:?}",
            super::addresses()
        );
        assert_eq!(super::peer_elsewhere(*index), Some(false));
        assert_eq!(super::peer_elsewhere(u32::MAX), None);
    }
}
