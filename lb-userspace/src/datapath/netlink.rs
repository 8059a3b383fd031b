//! Network interfaces of this namespace: the current list, the addresses they hold, and a
//! stream of rtnetlink link notifications, so the agent attaches to pod interfaces that
//! appear after it started.
use std::{
    ffi::CStr,
    io, mem,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

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

/// Interfaces that exist now: (index, name).
#[must_use]
pub fn links() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// IPv4 addresses held by interfaces now: (interface name, address).
#[must_use]
pub fn addresses() -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list that we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&raw mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                // An AF_INET sockaddr is a sockaddr_in; read it unaligned all the same.
                let sin = a.cast::<libc::sockaddr_in>().read_unaligned();
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                let name = CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned();
                out.push((name, ip));
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
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

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK_NETNSID: u16 = 37;
const RTM_GETLINK: u16 = 18;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// A netlink socket subscribed to link notifications.
pub struct LinkWatcher {
    fd: OwnedFd,
}

impl LinkWatcher {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket/bind calls; the fd is owned right after creation.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_nl = mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = RTMGRP_LINK;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            );
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { fd })
        }
    }

    /// Blocks until notifications arrive and returns them.
    pub fn recv(&self) -> io::Result<Vec<LinkEvent>> {
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: reading into a buffer we own, bounded by its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        Ok(parse_link_messages(&buf[..n]))
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Parses a datagram of netlink messages into link events; malformed parts are skipped.
#[must_use]
pub fn parse_link_messages(buf: &[u8]) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    let mut off = 0;
    while let (Some(len), Some(kind)) = (u32_at(buf, off), u16_at(buf, off + 4)) {
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let msg = &buf[off + NLMSG_HDRLEN..off + len];
        if (kind == RTM_NEWLINK || kind == RTM_DELLINK)
            && let (Some(index), Some(name)) = (u32_at(msg, 4), ifname(msg))
        {
            events.push(if kind == RTM_NEWLINK {
                LinkEvent::New { index, name }
            } else {
                LinkEvent::Removed { index, name }
            });
        }
        off += (len + 3) & !3;
    }
    events
}

/// The payload of attribute `want` of a link message (after its `ifinfomsg`).
fn attribute(msg: &[u8], want: u16) -> Option<&[u8]> {
    let mut off = IFINFOMSG_LEN;
    while let (Some(len), Some(kind)) = (u16_at(msg, off), u16_at(msg, off + 2)) {
        let len = len as usize;
        if len < 4 || off + len > msg.len() {
            return None;
        }
        if kind == want {
            return msg.get(off + 4..off + len);
        }
        off += (len + 3) & !3;
    }
    None
}

fn ifname(msg: &[u8]) -> Option<String> {
    let raw = attribute(msg, IFLA_IFNAME)?;
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8(raw[..end].to_vec()).ok()
}

/// Whether a datagram answering `RTM_GETLINK` describes a link whose peer (veth, netkit) is in
/// another network namespace (it carries `IFLA_LINK_NETNSID`); None if it holds no link.
fn peer_elsewhere_in(buf: &[u8]) -> Option<bool> {
    let (len, kind) = (u32_at(buf, 0)? as usize, u16_at(buf, 4)?);
    if kind != RTM_NEWLINK || len < NLMSG_HDRLEN || len > buf.len() {
        return None;
    }
    Some(attribute(&buf[NLMSG_HDRLEN..len], IFLA_LINK_NETNSID).is_some())
}

/// Whether the peer of link `index` (a veth or netkit device) is in another network namespace,
/// as a pod's is; asked of the kernel with `RTM_GETLINK`. None if it cannot tell.
#[must_use]
pub fn peer_elsewhere(index: u32) -> Option<bool> {
    // SAFETY: a plain socket call; the fd is owned right after creation.
    let fd = unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return None;
        }
        OwnedFd::from_raw_fd(fd)
    };
    // nlmsghdr (len, type, flags = NLM_F_REQUEST, seq, pid), then ifinfomsg with the index.
    let mut req = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&1u16.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&index.to_ne_bytes());
    // SAFETY: sending from and receiving into buffers we own, bounded by their lengths.
    unsafe {
        if libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) < 0 {
            return None;
        }
        let mut buf = vec![0u8; 32 * 1024];
        let n = libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
        peer_elsewhere_in(buf.get(..usize::try_from(n).ok()?)?)
    }
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
}
