//! Header parsing. All packet memory goes through `ptr_at`/`ptr_at_mut`, which bounds-check
//! against the end of the packet; nothing else dereferences packet pointers.
use lb_common::{IPPROTO_TCP, IPPROTO_UDP, Verdict};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// The first 4 bytes of TCP and UDP.
#[repr(C)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

#[repr(C)]
pub struct TcpHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff_flags: [u8; 2],
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

#[repr(C)]
pub struct UdpHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// Pointer to a `T` at `off` bytes into the packet, or `None` if it does not fit.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*const T> {
    let start = data.checked_add(off)?;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *const T)
}

/// Mutable pointer to a `T` at `off` bytes into the packet, or `None` if it does not fit.
#[inline(always)]
pub fn ptr_at_mut<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    ptr_at::<T>(data, data_end, off).map(<*const T>::cast_mut)
}

/// Offsets of a parsed IPv4 TCP/UDP packet and its 5-tuple (network order).
#[derive(Clone, Copy)]
pub struct Flow {
    pub l4_off: usize,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, ...); 0 for UDP.
    pub tcp_flags: u8,
    /// IPv4 total length, host order.
    pub tot_len: u16,
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Parses Ethernet + IPv4 + the TCP/UDP ports. Anything that is not a complete, unfragmented
/// IPv4 TCP/UDP packet yields the pass verdict that says why. Headers must lie in
/// `data..data_end`; `pkt_len` is the whole packet's length, which for an skb may extend past
/// its linear part (payload in page fragments).
#[inline(always)]
pub fn ipv4_flow(data: usize, data_end: usize, pkt_len: usize) -> Result<Flow, Verdict> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0).ok_or(Verdict::PassMalformed)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    if unsafe { (*eth).proto } != ETH_P_IP {
        return Err(Verdict::PassOtherProto);
    }
    let ip: *const Ipv4Hdr = ptr_at(data, data_end, ETH_HLEN).ok_or(Verdict::PassMalformed)?;
    // SAFETY: as above.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(Verdict::PassMalformed);
    }
    // The kernel drops a header whose checksum is wrong (ip_rcv); translating it would carry
    // the error on and take a flow entry for a packet no one receives. (Checked before the
    // length checks: after them the compiler would drop bounds checks the verifier needs.)
    if !ipv4_header_checksum_ok(data, data_end, ihl) {
        return Err(Verdict::PassMalformed);
    }
    // Read the IHL again, volatile so the compiler keeps the read: the checksum's branches
    // narrowed the verifier's view of the first read into one range per option length, and
    // carrying those ranges on would make it verify the rest of the program once per range.
    // SAFETY: inside the header ptr_at checked above.
    let ihl = usize::from(unsafe { core::ptr::read_volatile(&raw const ip.ver_ihl) } & 0x0f) * 4;
    if ihl < 20 {
        return Err(Verdict::PassMalformed);
    }
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if tot_len < ihl || ETH_HLEN + tot_len > pkt_len {
        return Err(Verdict::PassMalformed);
    }
    // MF set or a non-zero offset: a fragment.
    if u16::from_be_bytes(ip.frag_off) & 0x3fff != 0 {
        return Err(Verdict::PassFragment);
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(Verdict::PassOtherProto);
    }
    let l4_off = ETH_HLEN + ihl;
    let min_l4 = if ip.proto == IPPROTO_TCP { 20 } else { 8 };
    if tot_len < ihl + min_l4 {
        return Err(Verdict::PassMalformed);
    }
    let mut tcp_flags = 0;
    if ip.proto == IPPROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(data, data_end, l4_off).ok_or(Verdict::PassMalformed)?;
        // SAFETY: as above.
        let doff_flags = unsafe { (*tcp).doff_flags };
        // A data offset below the minimum or past the segment: tcp_v4_rcv drops it.
        let doff = usize::from(doff_flags[0] >> 4) * 4;
        if doff < 20 || doff > tot_len - ihl {
            return Err(Verdict::PassMalformed);
        }
        tcp_flags = doff_flags[1];
    } else {
        let udp: *const UdpHdr = ptr_at(data, data_end, l4_off).ok_or(Verdict::PassMalformed)?;
        // SAFETY: as above.
        let len = usize::from(u16::from_be_bytes(unsafe { (*udp).len }));
        // Shorter than its header or longer than the IP payload: udp_rcv drops it.
        if len < 8 || len > tot_len - ihl {
            return Err(Verdict::PassMalformed);
        }
    }
    let ports: *const Ports = ptr_at(data, data_end, l4_off).ok_or(Verdict::PassMalformed)?;
    // SAFETY: as above.
    let ports = unsafe { &*ports };
    Ok(Flow {
        l4_off,
        proto: ip.proto,
        ttl: ip.ttl,
        tcp_flags,
        tot_len: tot_len as u16,
        src_be: u32::from_ne_bytes(ip.src),
        dst_be: u32::from_ne_bytes(ip.dst),
        sport_be: u16::from_ne_bytes(ports.src),
        dport_be: u16::from_ne_bytes(ports.dst),
    })
}

/// Whether the IPv4 header of `ihl` bytes (20..=60) at the start of the network header has a
/// valid checksum: its 16-bit one's complement sum is all ones. Summed in 32-bit words (the
/// one's complement sum does not depend on byte order or word size).
#[inline(always)]
fn ipv4_header_checksum_ok(data: usize, data_end: usize, ihl: usize) -> bool {
    let Some(base) = ptr_at::<[u32; 5]>(data, data_end, ETH_HLEN) else {
        return false;
    };
    // SAFETY: ptr_at checked that the 20 bytes lie inside the packet.
    let words = unsafe { base.read_unaligned() };
    let mut sum: u64 = words.iter().map(|w| u64::from(*w)).sum();
    // Options: one word at a time at constant offsets (written out, not a loop, so that each
    // access keeps a bounds check the verifier can follow).
    macro_rules! option_word {
        ($end:literal) => {
            if ihl >= $end {
                let Some(w) = ptr_at::<u32>(data, data_end, ETH_HLEN + $end - 4) else {
                    return false;
                };
                // SAFETY: ptr_at checked that the word lies inside the packet.
                sum += u64::from(unsafe { w.read_unaligned() });
            }
        };
    }
    if ihl > 20 {
        option_word!(24);
        option_word!(28);
        option_word!(32);
        option_word!(36);
        option_word!(40);
        option_word!(44);
        option_word!(48);
        option_word!(52);
        option_word!(56);
        option_word!(60);
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    let mut folded = (sum & 0xffff) + (sum >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    folded == 0xffff
}
