//! What the fuzzer needs to know about a frame, read without trusting it: every field is read
//! with bounds checks, and [`kernel_would_drop`] says whether the node's kernel would refuse
//! the frame (the rules of `ip_rcv`, `udp_rcv` and `tcp_v4_rcv`), so a translation of it is a
//! fault.
use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    csum::{fold, sum_be},
};

use crate::packet::ETH_HLEN;

/// The IPv4 header's fields the oracle uses, if the frame has one at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip {
    pub ihl: usize,
    pub tot_len: usize,
    pub proto: u8,
    pub l4: usize,
}

/// Where a frame's IPv4 header says its parts are (offsets into the frame), if it is an
/// Ethernet frame carrying IPv4 with an IHL of at least 5 whose header fits.
#[must_use]
pub fn ip(f: &[u8]) -> Option<Ip> {
    if f.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ver_ihl = *f.get(ETH_HLEN)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 || f.len() < ETH_HLEN + ihl {
        return None;
    }
    let tot_len = usize::from(u16::from_be_bytes([f[ETH_HLEN + 2], f[ETH_HLEN + 3]]));
    Some(Ip {
        ihl,
        tot_len,
        proto: f[ETH_HLEN + 9],
        l4: ETH_HLEN + ihl,
    })
}

/// Offset of the L4 checksum within the L4 header.
#[must_use]
pub fn l4_csum_offset(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        _ => None,
    }
}

/// Whether the IPv4 header checksum holds.
#[must_use]
pub fn ip_checksum_ok(f: &[u8], ip: &Ip) -> bool {
    f.get(ETH_HLEN..ETH_HLEN + ip.ihl)
        .is_some_and(|h| fold(sum_be(h, 0)) == 0xffff)
}

/// The L4 segment as the IP header bounds it (`tot_len`), if it is all in the frame.
fn segment<'a>(f: &'a [u8], ip: &Ip) -> Option<&'a [u8]> {
    f.get(ip.l4..ETH_HLEN + ip.tot_len)
}

/// Whether the TCP/UDP checksum over the segment holds: Some(true/false), None where there is
/// none to check (not TCP/UDP, segment not in the frame, UDP's "no checksum" 0).
#[must_use]
pub fn l4_checksum_ok(f: &[u8], ip: &Ip) -> Option<bool> {
    let off = l4_csum_offset(ip.proto)?;
    let seg = segment(f, ip)?;
    let stored = seg.get(off..off + 2)?;
    if ip.proto == IPPROTO_UDP && stored == [0, 0] {
        return None;
    }
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(f.get(ETH_HLEN + 12..ETH_HLEN + 20)?);
    pseudo.extend_from_slice(&[0, ip.proto]);
    pseudo.extend_from_slice(&u16::try_from(seg.len()).ok()?.to_be_bytes());
    Some(fold(sum_be(seg, sum_be(&pseudo, 0))) == 0xffff)
}

/// The UDP checksum field, if the frame is UDP and has one in reach.
#[must_use]
pub fn udp_checksum_field(f: &[u8], ip: &Ip) -> Option<[u8; 2]> {
    (ip.proto == IPPROTO_UDP)
        .then(|| f.get(ip.l4 + 6..ip.l4 + 8))
        .flatten()
        .map(|b| [b[0], b[1]])
}

/// Why the node's kernel would not deliver or forward this frame as TCP/UDP (so xlb must not
/// translate it), or None if it would.
#[must_use]
pub fn kernel_would_drop(f: &[u8]) -> Option<&'static str> {
    let Some(ip) = ip(f) else {
        return Some("not an IPv4 frame with a whole header");
    };
    if !ip_checksum_ok(f, &ip) {
        return Some("wrong IPv4 header checksum");
    }
    if ip.tot_len < ip.ihl || ETH_HLEN + ip.tot_len > f.len() {
        return Some("IPv4 total length outside the frame");
    }
    let frag = u16::from_be_bytes([f[ETH_HLEN + 6], f[ETH_HLEN + 7]]);
    if frag & 0x3fff != 0 {
        return Some("an IPv4 fragment");
    }
    let payload = ip.tot_len - ip.ihl;
    match ip.proto {
        IPPROTO_UDP => {
            if payload < 8 {
                return Some("UDP header beyond the IP payload");
            }
            let len = usize::from(u16::from_be_bytes([f[ip.l4 + 4], f[ip.l4 + 5]]));
            if len < 8 {
                return Some("UDP length below 8");
            }
            if len > payload {
                return Some("UDP length beyond the IP payload");
            }
        }
        IPPROTO_TCP => {
            if payload < 20 {
                return Some("TCP header beyond the IP payload");
            }
            let doff = usize::from(f[ip.l4 + 12] >> 4) * 4;
            if doff < 20 {
                return Some("TCP data offset below 5");
            }
            if doff > payload {
                return Some("TCP data offset beyond the segment");
            }
        }
        _ => return Some("neither TCP nor UDP"),
    }
    None
}

/// An endpoint (address, port) at `addr_off` and `port_off` of the frame.
#[must_use]
pub fn endpoint(f: &[u8], addr_off: usize, port_off: usize) -> Option<([u8; 4], u16)> {
    let a = f.get(addr_off..addr_off + 4)?;
    let p = f.get(port_off..port_off + 2)?;
    Some(([a[0], a[1], a[2], a[3]], u16::from_be_bytes([p[0], p[1]])))
}

/// Recomputes the IPv4 header checksum in place (if there is a header).
pub fn fix_ip_checksum(f: &mut [u8]) {
    let Some(ip) = ip(f) else { return };
    f[ETH_HLEN + 10] = 0;
    f[ETH_HLEN + 11] = 0;
    let sum = !fold(sum_be(&f[ETH_HLEN..ETH_HLEN + ip.ihl], 0));
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Recomputes the TCP/UDP checksum in place over the segment the IP header bounds (if it is
/// in the frame and has a checksum field in reach).
pub fn fix_l4_checksum(f: &mut [u8]) {
    let Some(ip) = ip(f) else { return };
    let Some(off) = l4_csum_offset(ip.proto) else {
        return;
    };
    let end = ETH_HLEN + ip.tot_len;
    if end > f.len() || ip.l4 + off + 2 > end {
        return;
    }
    f[ip.l4 + off] = 0;
    f[ip.l4 + off + 1] = 0;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&f[ETH_HLEN + 12..ETH_HLEN + 20]);
    pseudo.extend_from_slice(&[0, ip.proto]);
    let Ok(len) = u16::try_from(end - ip.l4) else {
        return;
    };
    pseudo.extend_from_slice(&len.to_be_bytes());
    let mut sum = !fold(sum_be(&f[ip.l4..end], sum_be(&pseudo, 0)));
    if ip.proto == IPPROTO_UDP && sum == 0 {
        sum = 0xffff;
    }
    f[ip.l4 + off..ip.l4 + off + 2].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::{fix_ip_checksum, ip, kernel_would_drop, l4_checksum_ok};
    use crate::packet::{ETH_HLEN, Frame};

    fn frame(udp: bool) -> Vec<u8> {
        let (src, dst): (SocketAddrV4, SocketAddrV4) = (
            "203.0.113.7:40000".parse().expect("addr"),
            "192.168.50.11:32510".parse().expect("addr"),
        );
        if udp {
            Frame::udp(src, dst).build()
        } else {
            Frame::tcp(src, dst).build()
        }
    }

    #[test]
    fn built_frames_are_what_the_kernel_takes() {
        for udp in [false, true] {
            let f = frame(udp);
            assert_eq!(kernel_would_drop(&f), None);
            let parsed = ip(&f).expect("ipv4");
            assert_eq!(l4_checksum_ok(&f, &parsed), Some(true));
        }
    }

    #[test]
    fn the_kernels_refusals_are_named() {
        let mut f = frame(false);
        f[ETH_HLEN + 10] ^= 1;
        assert_eq!(kernel_would_drop(&f), Some("wrong IPv4 header checksum"));
        let mut f = frame(false);
        f[ETH_HLEN + 20 + 12] = 0xf0; // data offset 15: 60 bytes, beyond a 36-byte segment
        assert_eq!(
            kernel_would_drop(&f),
            Some("TCP data offset beyond the segment")
        );
        let mut f = frame(true);
        f[ETH_HLEN + 20 + 5] = 4; // UDP length 4
        fix_ip_checksum(&mut f);
        assert_eq!(kernel_would_drop(&f), Some("UDP length below 8"));
        let mut f = frame(true);
        f[ETH_HLEN + 20 + 4] = 1; // UDP length 256+
        assert_eq!(
            kernel_would_drop(&f),
            Some("UDP length beyond the IP payload")
        );
        let mut f = frame(true);
        f[ETH_HLEN + 6] |= 0x20; // MF
        fix_ip_checksum(&mut f);
        assert_eq!(kernel_would_drop(&f), Some("an IPv4 fragment"));
        assert!(kernel_would_drop(&f[..20]).is_some());
    }
}
