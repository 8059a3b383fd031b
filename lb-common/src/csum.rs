//! Internet checksum arithmetic (RFC 1071, RFC 1624) on 16-bit one's-complement sums.
//!
//! The XDP path rewrites addresses and ports with these incremental updates; the tests check
//! them against a full recomputation. TC uses the kernel's `bpf_l{3,4}_csum_replace` instead,
//! because packets from local sockets may be `CHECKSUM_PARTIAL` (see DESIGN.md).

/// Folds a 32-bit accumulator into 16 bits of one's-complement sum.
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word changes from `old` to `new`.
/// All values are as stored in the packet (the same byte order for all three).
#[inline(always)]
#[must_use]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// The new checksum after a 32-bit field (an IPv4 address) changes from `old` to `new`.
#[inline(always)]
#[must_use]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum =
        (!check) as u32 + (!(old >> 16) & 0xffff) + (!old & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(sum)
}

/// One's-complement sum of `data` as 16-bit big-endian words (odd tail padded with zero),
/// not yet complemented. Host-side helper for tests and tools.
#[must_use]
pub fn sum_be(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::{fold, replace16, replace32, sum_be};

    fn full(data: &[u8]) -> u16 {
        !fold(sum_be(data, 0))
    }

    /// Checks the incremental updates against full recomputation over many pseudo-random
    /// buffers, with the fields stored exactly as a packet stores them.
    #[test]
    fn incremental_matches_full_recomputation() {
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..20_000 {
            let mut buf = [0u8; 20];
            for b in &mut buf {
                *b = next() as u8;
            }
            buf[10] = 0;
            buf[11] = 0;
            let c = full(&buf);
            buf[10..12].copy_from_slice(&c.to_be_bytes());
            assert_eq!(full(&buf), 0);

            // 32-bit field at offset 12 (like an address), stored big-endian.
            let old = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
            let new = next();
            buf[12..16].copy_from_slice(&new.to_be_bytes());
            let check = replace32(u16::from_be_bytes([buf[10], buf[11]]), old, new);
            buf[10..12].copy_from_slice(&check.to_be_bytes());
            assert_eq!(full(&buf), 0, "after 32-bit replace");

            // 16-bit field at offset 4 (like a port).
            let old = u16::from_be_bytes([buf[4], buf[5]]);
            let new = next() as u16;
            buf[4..6].copy_from_slice(&new.to_be_bytes());
            let check = replace16(u16::from_be_bytes([buf[10], buf[11]]), old, new);
            buf[10..12].copy_from_slice(&check.to_be_bytes());
            assert_eq!(full(&buf), 0, "after 16-bit replace");
        }
    }

    /// The same arithmetic on native-endian loads of network-order bytes (what the datapath
    /// does: it never byte-swaps) gives the same stored bytes.
    #[test]
    fn byte_order_agnostic() {
        let mut buf = [
            0x45u8, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = full(&buf);
        buf[10..12].copy_from_slice(&c.to_be_bytes());
        let check_ne = u16::from_ne_bytes([buf[10], buf[11]]);
        let old_ne = u32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        let new_bytes = [192u8, 168, 7, 9];
        let new_ne = u32::from_ne_bytes(new_bytes);
        buf[16..20].copy_from_slice(&new_bytes);
        let fixed = replace32(check_ne, old_ne, new_ne);
        buf[10..12].copy_from_slice(&fixed.to_ne_bytes());
        assert_eq!(full(&buf), 0);
    }
}
