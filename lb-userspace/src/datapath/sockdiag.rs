//! Ending the connected UDP sockets that socket-level load balancing pointed at a backend that
//! left. A connected socket keeps the address `connect()` gave it, so without this a node
//! process's UDP socket to a Service would keep sending to a pod that is gone, where kube-proxy
//! flushes the UDP conntrack entries of a removed endpoint and the next datagram goes to a live
//! one. Through `sock_diag` (`SOCK_DIAG_BY_FAMILY` to find them in this network namespace,
//! `SOCK_DESTROY` to end them, which needs `CONFIG_INET_DIAG_DESTROY`): the owner's next call
//! fails with `ECONNABORTED`, and its reconnect is balanced anew. Only sockets our programs
//! translated are ended (their cookie is in the socket reverse-translation map); a socket a
//! process connected to a pod address by itself is left alone.
use std::{
    collections::HashSet,
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// Connected UDP sockets are in state `TCP_ESTABLISHED` (1).
const STATE_ESTABLISHED: u32 = 1 << 1;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct inet_diag_sockid` (ports and addresses in network order).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport_be: u16,
    dport_be: u16,
    src_be: [u32; 4],
    dst_be: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

const _: () = assert!(size_of::<NlMsgHdr>() == 16);
const _: () = assert!(size_of::<SockId>() == 48);
const _: () = assert!(size_of::<DiagReq>() == 56);
const _: () = assert!(size_of::<DiagMsg>() == 72);

/// A connected UDP socket of this network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub cookie: u64,
    pub peer: (Ipv4Addr, u16),
    id: [u8; size_of::<SockId>()],
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
    let nl = Netlink::open()?;
    let mut ended = 0;
    for s in nl.connected_udp()? {
        if left.contains(&s.peer) && translated(s.cookie, s.peer) && nl.destroy(&s).is_ok() {
            ended += 1;
        }
    }
    Ok(ended)
}

/// `TCP_LISTEN` (10) as a state bit.
const STATE_LISTEN: u32 = 1 << 10;

/// The local ports that sockets of this network namespace's processes hold where the kernel
/// would not give them out itself: TCP listeners and every UDP socket (IPv4 and IPv6, whose
/// sockets may be dual-stack).
pub fn bound_ports() -> io::Result<std::collections::BTreeSet<u16>> {
    let nl = Netlink::open()?;
    let mut ports = std::collections::BTreeSet::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for (protocol, states) in [
            (libc::IPPROTO_TCP as u8, STATE_LISTEN),
            (libc::IPPROTO_UDP as u8, u32::MAX),
        ] {
            for id in nl.dump(family, protocol, states)? {
                let port = u16::from_be(id.sport_be);
                if port != 0 {
                    ports.insert(port);
                }
            }
        }
    }
    Ok(ports)
}

struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn send(&self, kind: u16, flags: u16, req: &DiagReq) -> io::Result<()> {
        let hdr = NlMsgHdr {
            len: (size_of::<NlMsgHdr>() + size_of::<DiagReq>()) as u32,
            kind,
            flags,
            seq: 1,
            pid: 0,
        };
        let mut buf = Vec::with_capacity(hdr.len as usize);
        buf.extend_from_slice(as_bytes(&hdr));
        buf.extend_from_slice(as_bytes(req));
        // SAFETY: send(2) reads `buf.len()` bytes of a live buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one datagram of replies.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv(2) writes at most `buf.len()` bytes into a live buffer.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn connected_udp(&self) -> io::Result<Vec<UdpSocket>> {
        let sockets = self.dump(
            libc::AF_INET as u8,
            libc::IPPROTO_UDP as u8,
            STATE_ESTABLISHED,
        )?;
        sockets
            .into_iter()
            .map(|id| {
                Ok(UdpSocket {
                    cookie: u64::from(id.cookie[0]) | (u64::from(id.cookie[1]) << 32),
                    peer: (
                        Ipv4Addr::from(id.dst_be[0].to_ne_bytes()),
                        u16::from_be(id.dport_be),
                    ),
                    id: as_bytes(&id).try_into().map_err(|_| truncated())?,
                })
            })
            .collect()
    }

    /// The ids of this network namespace's sockets of `family` and `protocol` in `states`
    /// (a bit per TCP state).
    fn dump(&self, family: u8, protocol: u8, states: u32) -> io::Result<Vec<SockId>> {
        let req = DiagReq {
            family,
            protocol,
            states,
            ..DiagReq::default()
        };
        self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            let mut at = 0;
            while at + size_of::<NlMsgHdr>() <= n {
                let hdr: NlMsgHdr = read(&buf[at..n]).ok_or_else(truncated)?;
                let len = hdr.len as usize;
                if len < size_of::<NlMsgHdr>() || at + len > n {
                    return Err(truncated());
                }
                match hdr.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => return Err(nl_error(&buf[at + 16..at + len])),
                    SOCK_DIAG_BY_FAMILY => {
                        let msg: DiagMsg = read(&buf[at + size_of::<NlMsgHdr>()..at + len])
                            .ok_or_else(truncated)?;
                        out.push(msg.id);
                    }
                    _ => {}
                }
                at += len.next_multiple_of(4);
            }
        }
    }

    fn destroy(&self, s: &UdpSocket) -> io::Result<()> {
        let id: SockId = read(&s.id).ok_or_else(truncated)?;
        let req = DiagReq {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_UDP as u8,
            states: u32::MAX,
            id,
            ..DiagReq::default()
        };
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
        let mut buf = [0u8; 512];
        let n = self.recv(&mut buf)?;
        let hdr: NlMsgHdr = read(&buf[..n]).ok_or_else(truncated)?;
        if hdr.kind == NLMSG_ERROR {
            let err = nl_error(&buf[16..n]);
            if err.raw_os_error() != Some(0) {
                return Err(err);
            }
        }
        Ok(())
    }
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "truncated sock_diag message")
}

/// The errno of an `NLMSG_ERROR` payload (0 = an acknowledgement).
fn nl_error(payload: &[u8]) -> io::Error {
    let errno = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map_or(libc::EIO, |b| -i32::from_ne_bytes(b));
    io::Error::from_raw_os_error(errno)
}

/// The bytes of a plain-data value.
fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is one of this module's #[repr(C)] integer structs without padding, so every
    // byte is initialised; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast(), size_of::<T>()) }
}

/// A plain-data value from the start of `bytes`, if they are long enough.
fn read<T: Copy + Default>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: copies size_of::<T>() bytes into a T made only of integers (any bit pattern is
    // valid); the source has at least that many.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut v).cast::<u8>(), size_of::<T>());
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::{DiagReq, SockId, as_bytes, read};

    #[test]
    fn structs_round_trip_through_bytes() {
        let id = SockId {
            sport_be: 53u16.to_be(),
            dport_be: 8080u16.to_be(),
            src_be: [1, 0, 0, 0],
            dst_be: [2, 0, 0, 0],
            ifindex: 3,
            cookie: [4, 5],
        };
        let back: SockId = read(as_bytes(&id)).expect("long enough");
        assert_eq!(as_bytes(&back), as_bytes(&id));
        assert!(read::<DiagReq>(&[0u8; 10]).is_none());
    }
}
