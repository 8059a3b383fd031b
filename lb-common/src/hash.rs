//! The flow hash that picks a Maglev slot. The datapath and the agent's `explain` both call it,
//! so they agree on which backend a client gets.

const SEED: u32 = 0x9e37_79b9;

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finalize(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow's 5-tuple (fields as they sit in the packet, network order).
#[inline(always)]
#[must_use]
pub const fn flow_hash(src_be: u32, dst_be: u32, sport_be: u16, dport_be: u16, proto: u8) -> u32 {
    let mut h = mix(SEED, src_be);
    h = mix(h, dst_be);
    h = mix(h, ((sport_be as u32) << 16) | dport_be as u32);
    h = mix(h, proto as u32);
    finalize(h ^ 0x0d)
}

/// The flow-table bucket hash of a flow's client side (address, port, protocol; network
/// order): a client's packets hash their source, a reply its destination, so both find the
/// same bucket. Masked to the table size by the caller.
#[inline(always)]
#[must_use]
pub const fn flow_bucket(client_be: u32, client_port_be: u16, proto: u8) -> u32 {
    finalize(mix(
        mix(SEED, client_be),
        ((client_port_be as u32) << 8) | proto as u32,
    ))
}

/// The SNAT-table base of a backend (address, port, protocol) seen from one SNAT address
/// (network order): the bucket of its flow with SNAT port `p` is this plus `p`, masked to
/// the table size by the caller, so a backend's consecutive ports use consecutive buckets.
#[inline(always)]
#[must_use]
pub const fn nat_bucket(backend_be: u32, backend_port_be: u16, proto: u8, nat_addr_be: u32) -> u32 {
    finalize(mix(
        mix(mix(SEED ^ 0x5a, backend_be), nat_addr_be),
        ((backend_port_be as u32) << 8) | proto as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::{flow_bucket, flow_hash};

    #[test]
    fn flow_buckets_spread_consecutive_ports_and_addresses() {
        let mut buckets = [0u32; 64];
        for i in 0..64_000u32 {
            let (addr, port) = (0x0a00_0000 + i / 1000, (i % 1000) as u16 + 32_768);
            let h = flow_bucket(addr.to_be(), port.to_be(), 17);
            buckets[(h & 63) as usize] += 1;
        }
        for b in buckets {
            assert!((850..1150).contains(&b), "bucket holds {b} of 64000 flows");
        }
    }

    #[test]
    fn spreads_consecutive_ports_evenly() {
        let mut buckets = [0u32; 7];
        for port in 0..70_000u32 {
            let h = flow_hash(
                0x0a00_0001,
                0x0a00_0002,
                (port as u16).to_be(),
                80u16.to_be(),
                6,
            );
            buckets[(h % 7) as usize] += 1;
        }
        for b in buckets {
            assert!(
                (9_000..11_000).contains(&b),
                "bucket holds {b} of 70000 flows"
            );
        }
    }

    #[test]
    fn depends_on_every_field() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
    }
}
