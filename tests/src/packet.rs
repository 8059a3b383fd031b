//! Building test frames (Ethernet + IPv4 + TCP/UDP) with valid checksums, and checking the
//! checksums of frames the datapath returns by full recomputation.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    csum::{fold, sum_be},
};

pub const ETH_HLEN: usize = 14;

/// A frame to build. Defaults: TCP SYN, TTL 64, no IP options, 16 bytes of payload.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ttl: u8,
    pub ip_id: u16,
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// UDP only: send checksum 0 ("no checksum").
    pub udp_no_checksum: bool,
    /// TCP flags (default SYN).
    pub tcp_flags: u8,
    /// Write only the pseudo-header seed in the L4 checksum, as a local socket's
    /// `CHECKSUM_PARTIAL` packet carries it.
    pub partial_checksum: bool,
}

impl Frame {
    #[must_use]
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            src,
            dst,
            proto: IPPROTO_TCP,
            ttl: 64,
            ip_id: 0x1234,
            ip_options: Vec::new(),
            payload: b"GET / HTTP/1.1\r\n".to_vec(),
            udp_no_checksum: false,
            partial_checksum: false,
            tcp_flags: 0x02,
        }
    }

    #[must_use]
    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self {
            proto: IPPROTO_UDP,
            ..Self::tcp(src, dst)
        }
    }

    /// The frame's bytes, with correct IPv4 and L4 checksums (or the seed, see above).
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        assert!(self.ip_options.len().is_multiple_of(4) && self.ip_options.len() <= 40);
        let ihl = 20 + self.ip_options.len();
        let l4 = self.l4();
        let tot_len = u16::try_from(ihl + l4.len()).expect("frame too long");
        let mut f = Vec::with_capacity(ETH_HLEN + usize::from(tot_len));
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let ip_start = f.len();
        f.push(0x40 | (ihl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&tot_len.to_be_bytes());
        f.extend_from_slice(&self.ip_id.to_be_bytes());
        f.extend_from_slice(&[0x40, 0x00]); // DF
        f.push(self.ttl);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.ip().octets());
        f.extend_from_slice(&self.dst.ip().octets());
        f.extend_from_slice(&self.ip_options);
        let ip_csum = !fold(sum_be(&f[ip_start..ip_start + ihl], 0));
        f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_csum.to_be_bytes());
        let l4_start = f.len();
        f.extend_from_slice(&l4);
        let off = l4_csum_offset(self.proto);
        let c = if self.proto == IPPROTO_UDP && self.udp_no_checksum {
            0
        } else if self.partial_checksum {
            // The seed is the folded pseudo-header sum, not complemented.
            fold(pseudo_sum(
                *self.src.ip(),
                *self.dst.ip(),
                self.proto,
                l4.len(),
            ))
        } else {
            let c = !fold(sum_be(
                &l4,
                pseudo_sum(*self.src.ip(), *self.dst.ip(), self.proto, l4.len()),
            ));
            if self.proto == IPPROTO_UDP && c == 0 {
                0xffff
            } else {
                c
            }
        };
        f[l4_start + off..l4_start + off + 2].copy_from_slice(&c.to_be_bytes());
        f
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src.port().to_be_bytes());
        l4.extend_from_slice(&self.dst.port().to_be_bytes());
        if self.proto == IPPROTO_TCP {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.extend_from_slice(&[0x50, self.tcp_flags]); // data offset 5
            l4.extend_from_slice(&64240u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        } else {
            let len = u16::try_from(8 + self.payload.len()).expect("payload too long");
            l4.extend_from_slice(&len.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(&self.payload);
        l4
    }
}

fn l4_csum_offset(proto: u8) -> usize {
    if proto == IPPROTO_TCP { 16 } else { 6 }
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&u16::try_from(l4_len).expect("l4 too long").to_be_bytes());
    sum_be(&p, 0)
}

/// What a parsed frame says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ttl: u8,
    pub l4_checksum: u16,
}

/// Parses an Ethernet/IPv4/TCP-or-UDP frame built like [`Frame::build`].
#[must_use]
pub fn parse(f: &[u8]) -> Parsed {
    let ip = &f[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let l4 = &ip[ihl..];
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let off = l4_csum_offset(ip[9]);
    Parsed {
        src: SocketAddrV4::new(addr(&ip[12..16]), port(&l4[0..2])),
        dst: SocketAddrV4::new(addr(&ip[16..20]), port(&l4[2..4])),
        proto: ip[9],
        ttl: ip[8],
        l4_checksum: u16::from_be_bytes([l4[off], l4[off + 1]]),
    }
}

/// Checks the IPv4 header checksum and the full TCP/UDP checksum (UDP 0 = none is accepted)
/// by recomputing them from scratch.
pub fn verify_checksums(f: &[u8]) -> Result<(), String> {
    let ip = &f[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if fold(sum_be(&ip[..ihl], 0)) != 0xffff {
        return Err("bad IPv4 header checksum".into());
    }
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = &ip[ihl..tot_len];
    let p = parse(f);
    if p.proto == IPPROTO_UDP && p.l4_checksum == 0 {
        return Ok(());
    }
    if fold(sum_be(
        l4,
        pseudo_sum(*p.src.ip(), *p.dst.ip(), p.proto, l4.len()),
    )) != 0xffff
    {
        return Err(format!("bad L4 checksum {:#06x}", p.l4_checksum));
    }
    Ok(())
}

/// The pseudo-header seed a `CHECKSUM_PARTIAL` frame must carry for its current addresses.
#[must_use]
pub fn expected_seed(f: &[u8]) -> u16 {
    let ip = &f[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let p = parse(f);
    fold(pseudo_sum(*p.src.ip(), *p.dst.ip(), p.proto, tot_len - ihl))
}

#[cfg(test)]
mod tests {
    use super::{Frame, verify_checksums};

    #[test]
    fn built_frames_have_valid_checksums() {
        let a = "10.0.0.1:40000".parse().expect("addr");
        let b = "10.0.0.2:80".parse().expect("addr");
        verify_checksums(&Frame::tcp(a, b).build()).expect("tcp");
        verify_checksums(&Frame::udp(a, b).build()).expect("udp");
        let opts = Frame {
            ip_options: vec![1, 1, 1, 0],
            ..Frame::tcp(a, b)
        };
        verify_checksums(&opts.build()).expect("options");
        let mut bad = Frame::tcp(a, b).build();
        bad[40] ^= 0xff;
        assert!(verify_checksums(&bad).is_err());
    }
}
