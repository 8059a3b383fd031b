//! SNAT ports on this node: the ranges new SNATed flows take ports from (`--snat-ports`),
//! their reservation in the node's `net.ipv4.ip_local_reserved_ports` (so the kernel never
//! gives one of them to a socket of the node's own processes that asks for any port, and a
//! reply to such a socket is never taken for a translated flow's), and the ports the
//! datapath must skip when it picks one (`xlb_nat_excluded`): frontends on the node's
//! addresses (a reply to them would be taken for a client's packet), ports that the node's
//! processes bound explicitly (a listener, which the reservation does not stop), the local
//! port range when the reservation could not be made, and an older datapath's range while
//! its flows live.
use std::{collections::BTreeSet, fs, io};

use aya::maps::{Array, Map, MapData};
use lb_common::{MAX_SNAT_RANGES, PortRange};

/// The default SNAT port ranges: everything from 1024 up outside the NodePort range
/// (30000–32767) and the kernel's default local port range (32768–60999), 33,512 ports.
pub const DEFAULT_RANGES: &str = "1024-29999,61000-65535";

/// Where the node's reserved ports are (per network namespace).
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// Where the node's local (ephemeral) port range is.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Words of the exclusion bitmap (65,536 bits).
pub const EXCLUDED_WORDS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SnatError {
    #[error("{0}")]
    Ranges(String),
    #[error("{path}: {source}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the SNAT exclusion map: {0}")]
    Map(String),
}

/// Parses SNAT port ranges: `A-B[,C-D...]` (or single ports), at most `MAX_SNAT_RANGES`,
/// 1..=65535, not overlapping. Returns them in order.
pub fn parse_ranges(s: &str) -> Result<Vec<PortRange>, SnatError> {
    let bad = |m: String| SnatError::Ranges(m);
    let mut out = parse_port_list(s).map_err(bad)?;
    if out.is_empty() {
        return Err(bad(format!("no SNAT port range in {s:?}")));
    }
    if out.len() > MAX_SNAT_RANGES {
        return Err(bad(format!(
            "{} SNAT port ranges in {s:?}; at most {MAX_SNAT_RANGES}",
            out.len()
        )));
    }
    out.sort();
    if out.windows(2).any(|w| w[1].min <= w[0].max) {
        return Err(bad(format!("overlapping SNAT port ranges in {s:?}")));
    }
    Ok(out)
}

/// Ports in `ranges`, summed.
#[must_use]
pub fn port_count(ranges: &[PortRange]) -> u32 {
    ranges.iter().map(|r| r.len()).sum()
}

/// Parses a port list as the kernel writes `ip_local_reserved_ports`: `1,2-5,...` (empty
/// for none).
pub fn parse_port_list(s: &str) -> Result<Vec<PortRange>, String> {
    let mut out = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let port = |v: &str| {
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("bad port {v:?} in {s:?}"))
        };
        let (min, max) = (port(a)?, port(b)?);
        if max < min {
            return Err(format!("bad range {part:?} in {s:?}"));
        }
        out.push(PortRange::new(min, max));
    }
    Ok(out)
}

/// Formats ranges as the kernel reads `ip_local_reserved_ports`.
#[must_use]
pub fn format_port_list(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(|r| {
            if r.min == r.max {
                r.min.to_string()
            } else {
                format!("{}-{}", r.min, r.max)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The ports of `ranges` as a set of sorted, merged ranges.
#[must_use]
pub fn normalize(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut v: Vec<PortRange> = ranges.iter().copied().filter(|r| !r.is_empty()).collect();
    v.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if u32::from(r.min) <= u32::from(last.max) + 1 => {
                last.max = last.max.max(r.max);
            }
            _ => out.push(r),
        }
    }
    out
}

/// The ports of `a` that are not in `b`.
#[must_use]
pub fn subtract(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let b = normalize(b);
    let mut out = Vec::new();
    for r in normalize(a) {
        let (mut lo, hi) = (u32::from(r.min), u32::from(r.max));
        for x in &b {
            let (xlo, xhi) = (u32::from(x.min), u32::from(x.max));
            if xhi < lo || xlo > hi {
                continue;
            }
            if xlo > lo {
                out.push(range(lo, xlo - 1));
            }
            lo = xhi + 1;
        }
        if lo <= hi {
            out.push(range(lo, hi));
        }
    }
    out
}

fn range(lo: u32, hi: u32) -> PortRange {
    PortRange::new(
        u16::try_from(lo).unwrap_or(u16::MAX),
        u16::try_from(hi).unwrap_or(u16::MAX),
    )
}

fn sysctl_err(path: &'static str) -> impl Fn(io::Error) -> SnatError {
    move |source| SnatError::Sysctl { path, source }
}

fn read_reserved() -> Result<Vec<PortRange>, SnatError> {
    let s = fs::read_to_string(RESERVED_PORTS).map_err(sysctl_err(RESERVED_PORTS))?;
    parse_port_list(&s).map_err(|m| SnatError::Sysctl {
        path: RESERVED_PORTS,
        source: io::Error::new(io::ErrorKind::InvalidData, m),
    })
}

fn write_reserved(ranges: &[PortRange]) -> Result<(), SnatError> {
    // An empty write clears the list; the kernel wants at least a newline.
    let text = format!("{}\n", format_port_list(&normalize(ranges)));
    fs::write(RESERVED_PORTS, text).map_err(sysctl_err(RESERVED_PORTS))
}

/// Adds `ranges` to the node's reserved ports (what is reserved already stays) and returns
/// the ports it added, which [`unreserve`] removes again.
pub fn reserve(ranges: &[PortRange]) -> Result<Vec<PortRange>, SnatError> {
    let current = read_reserved()?;
    let added = subtract(ranges, &current);
    if added.is_empty() {
        return Ok(added);
    }
    let mut all = current;
    all.extend_from_slice(&added);
    write_reserved(&all)?;
    let now = read_reserved()?;
    if !subtract(ranges, &now).is_empty() {
        return Err(SnatError::Sysctl {
            path: RESERVED_PORTS,
            source: io::Error::other("the kernel did not keep the reservation"),
        });
    }
    Ok(added)
}

/// Removes `added` (what [`reserve`] added) from the node's reserved ports.
pub fn unreserve(added: &[PortRange]) -> Result<(), SnatError> {
    if added.is_empty() {
        return Ok(());
    }
    let current = read_reserved()?;
    write_reserved(&subtract(&current, added))
}

/// The node's local port range (`ip_local_port_range`).
pub fn local_port_range() -> Result<PortRange, SnatError> {
    let s = fs::read_to_string(LOCAL_PORT_RANGE).map_err(sysctl_err(LOCAL_PORT_RANGE))?;
    let mut it = s.split_whitespace().filter_map(|v| v.parse::<u16>().ok());
    match (it.next(), it.next()) {
        (Some(min), Some(max)) if min <= max && min > 0 => Ok(PortRange::new(min, max)),
        _ => Err(SnatError::Sysctl {
            path: LOCAL_PORT_RANGE,
            source: io::Error::new(io::ErrorKind::InvalidData, format!("{s:?}")),
        }),
    }
}

/// What new SNATed flows must not take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// Ports of frontends on the node's addresses (NodePorts, ExternalIPs or LoadBalancer
    /// IPs that are the node's).
    pub frontends: BTreeSet<u16>,
    /// Ports bound by sockets of the node's processes (listeners, explicit binds).
    pub bound: BTreeSet<u16>,
    /// Whole ranges: an older datapath's while its flows live; the local port range when the
    /// reservation failed.
    pub ranges: Vec<PortRange>,
}

impl Exclusions {
    /// The bitmap the datapath reads: bit `p % 64` of word `p / 64`.
    #[must_use]
    pub fn bitmap(&self) -> Vec<u64> {
        let mut words = vec![0u64; EXCLUDED_WORDS];
        let mut set = |p: u16| words[usize::from(p >> 6)] |= 1u64 << (p & 63);
        for &p in self.frontends.iter().chain(&self.bound) {
            set(p);
        }
        for r in &self.ranges {
            if !r.is_empty() {
                for p in r.min..=r.max {
                    set(p);
                }
            }
        }
        words
    }

    /// How many of `ranges`' ports are excluded.
    #[must_use]
    pub fn excluded_in(&self, ranges: &[PortRange]) -> u32 {
        let words = self.bitmap();
        ranges
            .iter()
            .filter(|r| !r.is_empty())
            .flat_map(|r| r.min..=r.max)
            .filter(|p| words[usize::from(p >> 6)] & (1u64 << (p & 63)) != 0)
            .map(|_| 1)
            .sum()
    }
}

/// The datapath's exclusion bitmap, written word by word where it changed.
pub struct ExcludedMap {
    map: Array<MapData, u64>,
    words: Vec<u64>,
}

impl ExcludedMap {
    /// A second handle on the map of a loaded datapath (it starts all zero, or as a previous
    /// agent left it: the first [`Self::write`] writes every word).
    pub fn open(ebpf: &aya::Ebpf) -> Result<Self, SnatError> {
        let err = |e: &dyn std::fmt::Display| SnatError::Map(e.to_string());
        let Some(Map::Array(data)) = ebpf.map(lb_common::map_names::NAT_EXCLUDED) else {
            return Err(err(&"the datapath has no SNAT exclusion map"));
        };
        let id = data.info().map_err(|e| err(&e))?.id();
        let data = MapData::from_id(id).map_err(|e| err(&e))?;
        let map = Array::try_from(Map::Array(data)).map_err(|e| err(&e))?;
        Ok(Self {
            map,
            words: Vec::new(),
        })
    }

    /// Writes `ex` into the map; returns how many words changed.
    pub fn write(&mut self, ex: &Exclusions) -> Result<usize, SnatError> {
        let new = ex.bitmap();
        let mut changed = 0;
        for (i, w) in new.iter().enumerate() {
            if self.words.get(i) == Some(w) {
                continue;
            }
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            self.map
                .set(index, *w, 0)
                .map_err(|e| SnatError::Map(e.to_string()))?;
            changed += 1;
        }
        self.words = new;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> PortRange {
        PortRange::new(min, max)
    }

    #[test]
    fn ranges_parse_sorted_and_refuse_overlaps_and_zero() {
        assert_eq!(
            parse_ranges("61000-65535,1024-29999").expect("valid"),
            vec![r(1024, 29999), r(61000, 65535)]
        );
        assert_eq!(parse_ranges("5000").expect("one port"), vec![r(5000, 5000)]);
        assert!(parse_ranges("1000-2000,1500-2500").is_err());
        assert!(parse_ranges("0-100").is_err());
        assert!(parse_ranges("100-50").is_err());
        assert!(parse_ranges("").is_err());
        assert!(parse_ranges("1-2,3-4,5-6,7-8,9-10").is_err());
        assert_eq!(
            port_count(&parse_ranges(DEFAULT_RANGES).expect("default")),
            33_512
        );
    }

    #[test]
    fn reserved_port_lists_round_trip_and_subtract() {
        let list = parse_port_list("80,1024-29999,61000-65535\n").expect("kernel format");
        assert_eq!(list, vec![r(80, 80), r(1024, 29999), r(61000, 65535)]);
        assert_eq!(format_port_list(&list), "80,1024-29999,61000-65535");
        assert_eq!(parse_port_list("\n").expect("empty"), vec![]);
        // What the agent adds is what was not reserved yet; removing it leaves the rest.
        let before = vec![r(2000, 2999), r(8080, 8080)];
        let added = subtract(&[r(1024, 29999)], &before);
        assert_eq!(added, vec![r(1024, 1999), r(3000, 8079), r(8081, 29999)]);
        let mut all = before.clone();
        all.extend(&added);
        assert_eq!(normalize(&all), vec![r(1024, 29999)]);
        assert_eq!(subtract(&normalize(&all), &added), before);
    }

    #[test]
    fn bitmap_sets_exactly_the_excluded_ports() {
        let ex = Exclusions {
            frontends: [32510, 8080].into(),
            bound: [22, 10250].into(),
            ranges: vec![r(61000, 61063)],
        };
        let words = ex.bitmap();
        let is_set = |p: u16| words[usize::from(p >> 6)] & (1 << (p & 63)) != 0;
        for p in [32510, 8080, 22, 10250, 61000, 61063] {
            assert!(is_set(p), "{p}");
        }
        for p in [32511, 8079, 60999, 61064, 0] {
            assert!(!is_set(p), "{p}");
        }
        assert_eq!(ex.excluded_in(&[r(1024, 29999)]), 2);
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 4 + 64);
    }
}
