//! The agent's side of the SNAT table (`lb_common::NatBucket`): counting the ports in use per
//! backend and per SNAT address (metrics, `xlb explain`), reading its entries (`xlb
//! conntrack`), and sweeping the legacy LRU SNAT map that an upgrade took over from a
//! datapath of layout version 1. Read-only towards the table: the datapath alone writes it.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::Ipv4Addr,
};

use aya::maps::{Map, MapData};
use lb_common::{
    FlowKey, IPPROTO_TCP, NatBucket, NatEntry, SNAT_CLOSING, SNAT_NEW, SnatEntry, Timeouts, timeout,
};

use crate::datapath::mapmem::{BucketArray, BucketError};

/// The SNAT table of a loaded or pinned datapath.
pub struct NatTable {
    table: BucketArray<NatBucket>,
}

/// A backend as SNAT ports are counted for it: address, port, protocol.
pub type BackendPort = (Ipv4Addr, u16, u8);

/// What the SNAT table holds at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    /// Entries whose flow lives (or whose close timeout runs): ports in use.
    pub live: u64,
    /// Entries whose time is over, which new flows take over as they need them.
    pub expired: u64,
    /// Ports in use per backend (SNATed flows only, not hairpin ones).
    pub by_backend: HashMap<BackendPort, u32>,
    /// Ports in use per SNAT address.
    pub by_address: BTreeMap<Ipv4Addr, u64>,
}

/// The datapath's clock: coarse seconds since boot (`bpf_ktime_get_coarse_ns`, which reads
/// `CLOCK_MONOTONIC` at tick granularity).
#[must_use]
pub fn now_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live value.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u32::try_from(ts.tv_sec).unwrap_or(u32::MAX)
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

impl NatTable {
    pub fn new(map: MapData) -> Result<Self, BucketError> {
        Ok(Self {
            table: BucketArray::new(map)?,
        })
    }

    /// A second handle on the SNAT table of a loaded datapath.
    pub fn open(ebpf: &aya::Ebpf) -> Result<Self, BucketError> {
        Ok(Self {
            table: BucketArray::open(ebpf, lb_common::map_names::NAT)?,
        })
    }

    /// Buckets in the table.
    #[must_use]
    pub fn buckets(&self) -> u32 {
        self.table.buckets()
    }

    /// Entries the table can hold.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        u64::from(self.table.buckets()) * lb_common::FLOW_WAYS as u64
    }

    /// Every entry in use (free ones left out), expired or not.
    pub fn entries(&self) -> Result<Vec<NatEntry>, BucketError> {
        let mut out = Vec::new();
        self.table.visit(|_, b| {
            out.extend(b.entries.iter().filter(|e| e.nat_addr_be != 0));
            true
        })?;
        Ok(out)
    }

    /// What the table holds at coarse second `now` under timeouts `t`.
    pub fn fill(&self, now: u32, t: &Timeouts) -> Result<Fill, BucketError> {
        let mut fill = Fill::default();
        self.table.visit(|_, b| {
            for e in b.entries.iter().filter(|e| e.nat_addr_be != 0) {
                if e.expired(now, t) {
                    fill.expired += 1;
                    continue;
                }
                fill.live += 1;
                *fill.by_address.entry(ip(e.nat_addr_be)).or_default() += 1;
                if e.flags & lb_common::NAT_F_HAIRPIN == 0 {
                    let backend = (
                        ip(e.backend_addr_be),
                        u16::from_be(e.backend_port_be),
                        e.proto,
                    );
                    *fill.by_backend.entry(backend).or_default() += 1;
                }
            }
            true
        })?;
        Ok(fill)
    }
}

/// The legacy LRU SNAT map, as the agent reads it.
pub type LegacyMap = aya::maps::HashMap<MapData, FlowKey, SnatEntry>;

/// A second handle on the legacy LRU SNAT map of a loaded datapath.
pub fn open_legacy(ebpf: &aya::Ebpf) -> Result<LegacyMap, BucketError> {
    let err = |e: &dyn std::fmt::Display| BucketError::Map(io::Error::other(e.to_string()));
    let Some(Map::LruHashMap(data)) = ebpf.map(lb_common::map_names::SNAT_LEGACY) else {
        return Err(err(&"the datapath has no legacy SNAT map"));
    };
    let id = data.info().map_err(|e| err(&e))?.id();
    let data = MapData::from_id(id).map_err(|e| err(&e))?;
    LegacyMap::try_from(Map::LruHashMap(data)).map_err(|e| err(&e))
}

/// Whether a legacy entry's flow has been idle past its timeout, in this version's terms for
/// what that datapath recorded (answered or not, closing).
#[must_use]
pub fn legacy_expired(k: &FlowKey, e: &SnatEntry, now: u32, t: &Timeouts) -> bool {
    let limit = match (e.state, k.proto == IPPROTO_TCP) {
        (SNAT_CLOSING, _) => timeout::LEGACY_CLOSING,
        (SNAT_NEW, true) => t.tcp_syn(),
        (SNAT_NEW, false) => t.udp(),
        (_, true) => t.tcp_established(),
        (_, false) => t.udp_stream(),
    };
    now.wrapping_sub(e.last_seen_s) > limit
}

/// Removes the legacy map's entries whose flows are over; returns how many live ones are
/// left (the datapath stops looking there once none is).
pub fn sweep_legacy(map: &mut LegacyMap, now: u32, t: &Timeouts) -> Result<usize, BucketError> {
    let err = |e: aya::maps::MapError| BucketError::Map(io::Error::other(e));
    let mut stale = Vec::new();
    let mut live = 0;
    for item in map.iter() {
        let (k, e) = item.map_err(err)?;
        if legacy_expired(&k, &e, now, t) {
            stale.push(k);
        } else {
            live += 1;
        }
    }
    for k in stale {
        // Gone meanwhile (the LRU evicted it) is fine.
        let _ = map.remove(&k);
    }
    Ok(live)
}
