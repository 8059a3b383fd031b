//! Mutations of seed frames: the ways a packet lies. Each is reproducible from the generator's
//! state; most keep the IPv4 header checksum right afterwards (as a crafted packet would), so a
//! lying length field is not caught only because the checksum broke.
use super::frame::{fix_ip_checksum, fix_l4_checksum, ip};
use crate::packet::ETH_HLEN;

/// A small, fast, seedable generator (splitmix64): the same seed gives the same run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// The mutations, by the name the report counts them under.
pub const MUTATIONS: &[&str] = &[
    "none",
    "truncate",
    "bit_flip",
    "random_bytes",
    "ihl",
    "total_length",
    "udp_length",
    "tcp_data_offset",
    "fragment",
    "ip_options",
    "ip_checksum_zero",
    "ip_checksum_wrong",
    "l4_checksum_zero",
    "l4_checksum_wrong",
    "vlan_tag",
    "ethertype",
    "ttl",
    "trailing_padding",
    "icmp_error",
];

/// Applies mutation `which` (an index into [`MUTATIONS`]) to `f`.
pub fn apply(rng: &mut Rng, which: usize, f: &mut Vec<u8>) {
    match MUTATIONS[which] {
        "truncate" => {
            let at = rng.below(f.len() + 1);
            f.truncate(at);
        }
        "bit_flip" => {
            for _ in 0..=rng.below(4) {
                if !f.is_empty() {
                    let i = rng.below(f.len());
                    f[i] ^= 1 << rng.below(8);
                }
            }
            if rng.chance(50) {
                fix_ip_checksum(f);
            }
        }
        "random_bytes" => {
            for _ in 0..=rng.below(8) {
                if !f.is_empty() {
                    let i = rng.below(f.len());
                    f[i] = rng.byte();
                }
            }
            if rng.chance(50) {
                fix_ip_checksum(f);
            }
        }
        "ip_options" => insert_ip_options(rng, f),
        "vlan_tag" if f.len() >= 12 => {
            let tci = (rng.below(4096) as u16).to_be_bytes();
            f.splice(12..12, [0x81, 0x00, tci[0], tci[1]]);
        }
        "ethertype" if f.len() >= 14 => {
            let t: [u8; 2] = match rng.below(4) {
                0 => [0x08, 0x06], // ARP
                1 => [0x86, 0xdd], // IPv6
                2 => [0x88, 0xa8], // QinQ
                _ => [rng.byte(), rng.byte()],
            };
            f[12..14].copy_from_slice(&t);
        }
        "trailing_padding" => {
            // Ethernet pads short frames: bytes after the IP packet that its length excludes.
            for _ in 0..=rng.below(40) {
                f.push(rng.byte());
            }
        }
        "icmp_error" => icmp_error(rng, f),
        name => lie_in_headers(rng, name, f),
    }
}

/// Mutations of one header field: lengths, fragmentation, checksums, TTL.
fn lie_in_headers(rng: &mut Rng, name: &str, f: &mut [u8]) {
    let ip_at = |f: &[u8]| ip(f).map(|i| i.l4);
    match name {
        "ihl" => {
            if let Some(b) = f.get_mut(ETH_HLEN) {
                *b = (*b & 0xf0) | rng.below(16) as u8;
            }
            fix_ip_checksum(f);
        }
        "total_length" if f.len() >= ETH_HLEN + 4 => {
            let now = usize::from(u16::from_be_bytes([f[ETH_HLEN + 2], f[ETH_HLEN + 3]]));
            let lie = match rng.below(4) {
                0 => rng.below(65536),
                1 => now.saturating_sub(1 + rng.below(24)),
                2 => now + 1 + rng.below(24),
                _ => rng.below(40),
            };
            f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&(lie as u16).to_be_bytes());
            fix_ip_checksum(f);
        }
        "udp_length" => {
            if let Some(l4) = ip_at(f)
                && f.len() >= l4 + 6
            {
                let lie = match rng.below(3) {
                    0 => rng.below(8),
                    1 => f.len() - l4 + 1 + rng.below(64),
                    _ => rng.below(65536),
                };
                f[l4 + 4..l4 + 6].copy_from_slice(&(lie as u16).to_be_bytes());
                if rng.chance(50) {
                    fix_l4_checksum(f);
                }
            }
        }
        "tcp_data_offset" => {
            if let Some(l4) = ip_at(f)
                && let Some(b) = f.get_mut(l4 + 12)
            {
                *b = (*b & 0x0f) | ((rng.below(16) as u8) << 4);
                if rng.chance(50) {
                    fix_l4_checksum(f);
                }
            }
        }
        "fragment" if f.len() >= ETH_HLEN + 8 => {
            let v: u16 = match rng.below(3) {
                0 => 0x2000,                                  // MF, offset 0: a first fragment
                1 => (rng.below(0x1fff) as u16 + 1) | 0x2000, // a middle one
                _ => rng.below(0x1fff) as u16 + 1,            // the last
            };
            f[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&v.to_be_bytes());
            fix_ip_checksum(f);
        }
        "ip_checksum_zero" if f.len() >= ETH_HLEN + 12 => {
            f[ETH_HLEN + 10] = 0;
            f[ETH_HLEN + 11] = 0;
        }
        "ip_checksum_wrong" if f.len() >= ETH_HLEN + 12 => {
            f[ETH_HLEN + 10] ^= 1 + rng.byte() % 255;
        }
        "l4_checksum_zero" | "l4_checksum_wrong" => {
            let zero = name == "l4_checksum_zero";
            if let Some(i) = ip(f)
                && let Some(off) = super::frame::l4_csum_offset(i.proto)
                && f.len() >= i.l4 + off + 2
            {
                if zero {
                    f[i.l4 + off] = 0;
                    f[i.l4 + off + 1] = 0;
                } else {
                    f[i.l4 + off] ^= 1 + rng.byte() % 255;
                }
            }
        }
        "ttl" if f.len() >= ETH_HLEN + 9 => {
            f[ETH_HLEN + 8] = rng.below(3) as u8;
            fix_ip_checksum(f);
        }
        _ => {}
    }
}

/// IP options of a random length (0..=40 bytes), IHL and total length adjusted; the options are
/// NOPs, an end-of-list, or garbage.
fn insert_ip_options(rng: &mut Rng, f: &mut Vec<u8>) {
    let Some(i) = ip(f) else { return };
    if i.ihl != 20 || f.len() < i.l4 {
        return;
    }
    let words = 1 + rng.below(10);
    let mut opts: Vec<u8> = (0..words * 4)
        .map(|_| match rng.below(3) {
            0 => 1,
            1 => 0,
            _ => rng.byte(),
        })
        .collect();
    if rng.chance(50) {
        opts.fill(1);
    }
    f.splice(i.l4..i.l4, opts);
    f[ETH_HLEN] = 0x40 | (5 + words) as u8;
    let tot = (i.tot_len + words * 4) as u16;
    f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot.to_be_bytes());
    fix_ip_checksum(f);
}

/// Turns the frame into an ICMP error (destination unreachable, time exceeded or fragmentation
/// needed) from a router that quotes the original IP header and its first bytes, truncated or
/// garbled at random.
fn icmp_error(rng: &mut Rng, f: &mut Vec<u8>) {
    let Some(i) = ip(f) else { return };
    if f.len() < i.l4 {
        return;
    }
    let mut quoted = f[ETH_HLEN..].to_vec();
    quoted.truncate(match rng.below(3) {
        0 => i.ihl + 8,
        1 => rng.below(quoted.len() + 1),
        _ => quoted.len(),
    });
    if rng.chance(30) && !quoted.is_empty() {
        let at = rng.below(quoted.len());
        quoted[at] = rng.byte();
    }
    let (kind, code) = match rng.below(3) {
        0 => (3, 3), // port unreachable
        1 => (3, 4), // fragmentation needed
        _ => (11, 0),
    };
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(&quoted);
    let sum = !lb_common::csum::fold(lb_common::csum::sum_be(&icmp, 0));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut out = f[..ETH_HLEN + 20].to_vec();
    out[ETH_HLEN] = 0x45;
    out[ETH_HLEN + 9] = 1;
    // From a router toward the original source.
    let src: [u8; 4] = [192, 168, 50, 1];
    let orig_src: [u8; 4] = [
        f[ETH_HLEN + 12],
        f[ETH_HLEN + 13],
        f[ETH_HLEN + 14],
        f[ETH_HLEN + 15],
    ];
    out[ETH_HLEN + 12..ETH_HLEN + 16].copy_from_slice(&src);
    out[ETH_HLEN + 16..ETH_HLEN + 20].copy_from_slice(&orig_src);
    let tot = (20 + icmp.len()) as u16;
    out[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot.to_be_bytes());
    out.extend_from_slice(&icmp);
    fix_ip_checksum(&mut out);
    *f = out;
}

#[cfg(test)]
mod tests {
    use super::{MUTATIONS, Rng, apply};

    #[test]
    fn the_same_seed_gives_the_same_mutations() {
        let seed: Vec<u8> = (0..80u8).collect();
        let run = |s| {
            let mut rng = Rng::new(s);
            (0..200)
                .map(|_| {
                    let mut f = seed.clone();
                    let m = rng.below(MUTATIONS.len());
                    apply(&mut rng, m, &mut f);
                    f
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
