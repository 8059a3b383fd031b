//! Rewriting addresses and ports with their checksums.
//!
//! XDP sees frames from a NIC, which carry full checksums: RFC 1624 incremental updates are
//! exact there. TC on pod interfaces sees packets from local sockets that are often
//! `CHECKSUM_PARTIAL` (the L4 field holds only the pseudo-header seed); only the kernel's
//! `bpf_l4_csum_replace(.., BPF_F_PSEUDO_HDR)` knows which case it is in, so TC uses it.
//! Both paths validate everything before the first write, so a packet is either fully
//! rewritten or untouched; a TC helper failing halfway is reported so the caller drops it.
use aya_ebpf::programs::TcContext;
use lb_common::{
    IPPROTO_UDP,
    csum::{replace16, replace32},
};

use crate::parse::{ETH_HLEN, Flow, Ipv4Hdr, ptr_at_mut};

/// One endpoint of a rewrite: address and port, network order.
pub type Endpoint = (u32, u16);

/// Offset of the L4 checksum inside the TCP or UDP header.
#[inline(always)]
fn l4_check_off(proto: u8) -> usize {
    if proto == IPPROTO_UDP { 6 } else { 16 }
}

/// Rewrites source and/or destination of an XDP frame. With `ttl_dec` the TTL is decremented
/// too (the frame is forwarded without the kernel). Returns false, leaving the frame
/// untouched, if the headers are not all inside it (callers parsed it already, so this is a
/// verifier-facing check more than a runtime one).
#[inline(always)]
pub fn xdp_rewrite(
    data: usize,
    data_end: usize,
    f: &Flow,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
    ttl_dec: bool,
) -> bool {
    let Some(ip) = ptr_at_mut::<Ipv4Hdr>(data, data_end, ETH_HLEN) else {
        return false;
    };
    let Some(check) = ptr_at_mut::<[u8; 2]>(data, data_end, f.l4_off + l4_check_off(f.proto))
    else {
        return false;
    };
    let Some(ports) = ptr_at_mut::<[u8; 4]>(data, data_end, f.l4_off) else {
        return false;
    };
    // SAFETY: all three pointers were bounds-checked above and point into the frame.
    unsafe {
        let mut ip_check = u16::from_ne_bytes((*ip).check);
        let mut l4 = u16::from_ne_bytes(*check);
        let udp_no_checksum = f.proto == IPPROTO_UDP && l4 == 0;
        if let Some((addr, port)) = dst {
            ip_check = replace32(ip_check, f.dst_be, addr);
            l4 = replace16(replace32(l4, f.dst_be, addr), f.dport_be, port);
            (*ip).dst = addr.to_ne_bytes();
            let p = port.to_ne_bytes();
            (*ports)[2] = p[0];
            (*ports)[3] = p[1];
        }
        if let Some((addr, port)) = src {
            ip_check = replace32(ip_check, f.src_be, addr);
            l4 = replace16(replace32(l4, f.src_be, addr), f.sport_be, port);
            (*ip).src = addr.to_ne_bytes();
            let p = port.to_ne_bytes();
            (*ports)[0] = p[0];
            (*ports)[1] = p[1];
        }
        if ttl_dec {
            // TTL shares a 16-bit word with the protocol.
            let old = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
            (*ip).ttl -= 1;
            let new = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
            ip_check = replace16(ip_check, old, new);
        }
        if udp_no_checksum {
            l4 = 0;
        } else if f.proto == IPPROTO_UDP && l4 == 0 {
            l4 = 0xffff;
        }
        (*ip).check = ip_check.to_ne_bytes();
        *check = l4.to_ne_bytes();
    }
    true
}

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const IP_CHECK_OFF: usize = ETH_HLEN + 10;

/// Rewrites source and/or destination of a TC packet with the kernel's checksum helpers.
/// `Err` means a helper failed and the packet may be half-rewritten: drop it.
#[inline(always)]
pub fn tc_rewrite(
    ctx: &TcContext,
    f: &Flow,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
) -> Result<(), ()> {
    let check_off = f.l4_off + l4_check_off(f.proto);
    // UDP checksum 0 means "none": MANGLED_0 keeps it 0 and maps a computed 0 to 0xffff.
    let l4_flags = if f.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    if let Some((addr, port)) = dst {
        tc_field(ctx, check_off, l4_flags, IP_DST_OFF, f.dst_be, addr)?;
        tc_port(ctx, check_off, l4_flags, f.l4_off + 2, f.dport_be, port)?;
    }
    if let Some((addr, port)) = src {
        tc_field(ctx, check_off, l4_flags, IP_SRC_OFF, f.src_be, addr)?;
        tc_port(ctx, check_off, l4_flags, f.l4_off, f.sport_be, port)?;
    }
    Ok(())
}

#[inline(always)]
fn tc_field(
    ctx: &TcContext,
    check_off: usize,
    l4_flags: u64,
    off: usize,
    old: u32,
    new: u32,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        check_off,
        u64::from(old),
        u64::from(new),
        BPF_F_PSEUDO_HDR | l4_flags | 4,
    )
    .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CHECK_OFF, u64::from(old), u64::from(new), 4)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

#[inline(always)]
fn tc_port(
    ctx: &TcContext,
    check_off: usize,
    l4_flags: u64,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(check_off, u64::from(old), u64::from(new), l4_flags | 2)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}
