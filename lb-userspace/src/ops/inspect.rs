//! What the datapath holds, read back for people and scripts: the views behind `xlb service
//! list`, `backend list`, `conntrack list`, `stats` and `explain`. Views are built from a
//! [`MapSource`]: the pinned maps of a datapath ([`pinned::PinnedMaps`], read-only, with or
//! without an agent running) or, in tests, maps in memory. [`render`] turns views into tables
//! and JSON without touching any map. `explain` mirrors the datapath's selection
//! (`lb-ebpf/src/select.rs`): conntrack first, then the frontend, then the Maglev slot picked
//! by [`flow_hash`] exactly as the datapath computes it.
pub mod pinned;
pub mod render;

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use aya::maps::MapError;
use lb_common::{
    AffinityEntry, AffinityKey, BACKEND_F_LOCAL, Backend, CT_FORWARD, CT_REVERSE, Config, Counter,
    CtEntry, FRONTEND_F_SNAT_REMOTE, FlowKey, Frontend, FrontendKey, HAIRPIN_ADDR, IPPROTO_TCP,
    IPPROTO_UDP, Scope, Verdict, hash::flow_hash,
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Open(#[from] pinned::OpenError),
    #[error("reading map {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing JSON")]
    Json(#[source] serde_json::Error),
    #[error(transparent)]
    Flows(#[from] crate::datapath::flows::FlowsError),
}

/// Read access to a datapath's maps: what every view is built from.
pub trait MapSource {
    /// All frontend entries.
    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError>;
    fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, InspectError>;
    /// Backend `id` as stored (a cleared id reads as all zeroes); `None` beyond the map.
    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError>;
    /// Backend entries by id; cleared ones (no address) may be left out.
    fn backends(&self) -> Result<Vec<(u32, Backend)>, InspectError>;
    /// Ring slots `offset..offset + len` (slots beyond the slab read as 0, as in the datapath).
    fn ring(&self, offset: u32, len: u32) -> Result<Vec<u32>, InspectError>;
    fn conntrack_entry(&self, key: &FlowKey) -> Result<Option<CtEntry>, InspectError>;
    /// Visits conntrack entries until `visit` returns false.
    fn conntrack(
        &self,
        visit: &mut dyn FnMut(&FlowKey, &CtEntry) -> bool,
    ) -> Result<(), InspectError>;
    /// Counters per verdict, summed over CPUs.
    fn stats(&self) -> Result<Vec<(Verdict, Counter)>, InspectError>;
    fn config(&self) -> Result<Option<Config>, InspectError>;
    /// The session-affinity entry of a client of a service port, if any.
    fn affinity(&self, _key: &AffinityKey) -> Result<Option<AffinityEntry>, InspectError> {
        Ok(None)
    }
    /// The SNAT port cursor of backend `id` (an index into the SNAT ranges; 0: not set).
    fn snat_cursor(&self, _id: u32) -> Result<Option<u32>, InspectError> {
        Ok(None)
    }
    /// The SNAT ports in use to a backend (address, port, protocol), if the table is known.
    fn snat_in_use(&self, _backend: (Ipv4Addr, u16, u8)) -> Result<Option<u32>, InspectError> {
        Ok(None)
    }
    /// The ports new SNATed flows skip (the datapath's bitmap), if known.
    fn snat_excluded(&self) -> Result<Option<Vec<u64>>, InspectError> {
        Ok(None)
    }
}

/// The hash that places a new flow of client `src_be` in `fe`'s ring: its own (`own`), or
/// under a live `sessionAffinity: ClientIP` the one of the client's first connection; and what
/// to say about it.
fn affinity_hash<S: MapSource + ?Sized>(
    source: &S,
    fe: &Frontend,
    src_be: u32,
    scope: Scope,
    own: u32,
) -> Result<(u32, String), InspectError> {
    if fe.affinity_timeout_s == 0 {
        return Ok((own, String::new()));
    }
    let key = AffinityKey {
        client_addr_be: src_be,
        service_id: fe.service_id,
        scope: scope as u8,
        _pad0: 0,
        _pad1: 0,
    };
    let age = |e: &AffinityEntry| datapath_now_s().wrapping_sub(e.last_seen_s);
    Ok(match source.affinity(&key)? {
        Some(e) if age(&e) < fe.affinity_timeout_s => (
            e.hash,
            format!(
                "sessionAffinity ClientIP: this client opened a connection {} s ago, so its \
                 first connection's hash places it; ",
                age(&e)
            ),
        ),
        _ => (
            own,
            format!(
                "sessionAffinity ClientIP ({} s): no live affinity for this client, so this \
                 connection's hash places it and is remembered; ",
                fe.affinity_timeout_s
            ),
        ),
    })
}

/// Seconds of the clock the datapath stamps affinity entries with (`bpf_ktime_get_coarse_ns`,
/// i.e. `CLOCK_MONOTONIC_COARSE`).
fn datapath_now_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live value.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    // The datapath keeps the low 32 bits of the seconds, as this does.
    u32::try_from(ts.tv_sec & 0xffff_ffff).unwrap_or(0)
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

fn endpoint(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(addr_be), u16::from_be(port_be))
}

fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// "TCP", "UDP" or the protocol number.
#[must_use]
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        n => n.to_string(),
    }
}

/// "external", "internal" or "scope N".
#[must_use]
pub fn scope_name(scope: u8) -> String {
    match scope {
        s if s == Scope::External as u8 => "external".into(),
        s if s == Scope::Internal as u8 => "internal".into(),
        n => format!("scope {n}"),
    }
}

/// A backend as the backends map holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub local: bool,
    pub generation: u32,
}

impl BackendView {
    /// The view of entry `id`, or `None` for a cleared entry (no address).
    #[must_use]
    pub fn new(id: u32, b: &Backend) -> Option<Self> {
        (id != 0 && b.addr_be != 0).then(|| Self {
            id,
            addr: ip(b.addr_be),
            port: u16::from_be(b.port_be),
            local: b.flags & BACKEND_F_LOCAL != 0,
            generation: b.generation,
        })
    }

    #[must_use]
    pub fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, self.port)
    }
}

/// A distinct backend id of a frontend's ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RingMember {
    pub id: u32,
    /// Ring slots holding this id: its share of new flows is slots / ring size.
    pub slots: u32,
    /// `None`: the id's entry is cleared (the ring still names a removed backend).
    pub backend: Option<BackendView>,
}

/// A frontend entry and the distinct backends of its ring region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: String,
    pub scope: String,
    pub service_id: u32,
    /// Remote backends reached from a NIC get SNAT (`FRONTEND_F_SNAT_REMOTE`).
    pub snat_remote: bool,
    /// "SNAT", "eTP=Local" (an external view without SNAT), "ClientIP-affinity".
    pub flags: Vec<&'static str>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 = none.
    pub affinity_timeout_s: u32,
    pub ring_offset: u32,
    pub ring_size: u32,
    /// Distinct backends the agent put in the ring.
    pub backend_count: u32,
    pub backends: Vec<RingMember>,
}

impl ServiceView {
    #[must_use]
    pub fn frontend(&self) -> String {
        format!("{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// Flags of a frontend in words.
fn frontend_flags(key: FrontendKey, fe: &Frontend) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if fe.flags & FRONTEND_F_SNAT_REMOTE != 0 {
        flags.push("SNAT");
    } else if key.scope == Scope::External as u8 {
        flags.push("eTP=Local");
    }
    if fe.affinity_timeout_s != 0 {
        flags.push("ClientIP-affinity");
    }
    flags
}

/// Reads backends once each, however many rings name them.
struct BackendCache<'a, S: MapSource + ?Sized> {
    source: &'a S,
    seen: BTreeMap<u32, Option<BackendView>>,
}

impl<'a, S: MapSource + ?Sized> BackendCache<'a, S> {
    fn new(source: &'a S) -> Self {
        Self {
            source,
            seen: BTreeMap::new(),
        }
    }

    fn get(&mut self, id: u32) -> Result<Option<BackendView>, InspectError> {
        if let Some(v) = self.seen.get(&id) {
            return Ok(v.clone());
        }
        let v = match self.source.backend(id)? {
            Some(b) => BackendView::new(id, &b),
            None => None,
        };
        self.seen.insert(id, v.clone());
        Ok(v)
    }

    /// Backend `id` if it lives, and (for a conntrack entry) is the same incarnation.
    fn live(&mut self, id: u32, generation: u32) -> Result<Option<BackendView>, InspectError> {
        Ok(self.get(id)?.filter(|b| b.generation == generation))
    }

    /// Adds to `view` the SNAT fill of `backend` (address, port, protocol): its ports in use,
    /// and how many it can have (the SNAT ranges less the excluded ports), where the maps
    /// tell them.
    fn fill(
        &mut self,
        view: &mut SnatView,
        backend: (Ipv4Addr, u16, u8),
    ) -> Result<(), InspectError> {
        view.backend_ports_in_use = self.source.snat_in_use(backend)?;
        let (Some(c), Some(words)) = (self.source.config()?, self.source.snat_excluded()?) else {
            return Ok(());
        };
        let excluded = c
            .snat_ranges
            .iter()
            .filter(|r| !r.is_empty())
            .flat_map(|r| r.min..=r.max)
            .filter(|p| {
                words
                    .get(usize::from(p >> 6))
                    .is_some_and(|w| w & (1 << (p & 63)) != 0)
            })
            .count();
        view.backend_port_capacity = Some(
            c.snat_port_count
                .saturating_sub(u32::try_from(excluded).unwrap_or(u32::MAX)),
        );
        Ok(())
    }
}

fn service_view<S: MapSource + ?Sized>(
    key: FrontendKey,
    fe: &Frontend,
    rings: &mut BTreeMap<(u32, u32), Vec<(u32, u32)>>,
    backends: &mut BackendCache<'_, S>,
) -> Result<ServiceView, InspectError> {
    let region = (fe.ring_offset, fe.ring_size);
    let counts = if let Some(c) = rings.get(&region) {
        c.clone()
    } else {
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for id in backends.source.ring(fe.ring_offset, fe.ring_size)? {
            *counts.entry(id).or_default() += 1;
        }
        let c: Vec<(u32, u32)> = counts.into_iter().collect();
        rings.insert(region, c.clone());
        c
    };
    let mut members = Vec::with_capacity(counts.len());
    for (id, slots) in counts {
        members.push(RingMember {
            id,
            slots,
            backend: backends.get(id)?,
        });
    }
    Ok(ServiceView {
        addr: ip(key.addr_be),
        port: u16::from_be(key.port_be),
        proto: proto_name(key.proto),
        scope: scope_name(key.scope),
        service_id: fe.service_id,
        snat_remote: fe.flags & FRONTEND_F_SNAT_REMOTE != 0,
        flags: frontend_flags(key, fe),
        affinity_timeout_s: fe.affinity_timeout_s,
        ring_offset: fe.ring_offset,
        ring_size: fe.ring_size,
        backend_count: fe.backend_count,
        backends: members,
    })
}

/// Every frontend with its ring's backends, by service id, then address.
pub fn services<S: MapSource + ?Sized>(source: &S) -> Result<Vec<ServiceView>, InspectError> {
    let mut frontends = source.frontends()?;
    frontends.sort_by_key(|(k, fe)| {
        (
            fe.service_id,
            u32::from_be(k.addr_be),
            u16::from_be(k.port_be),
            k.proto,
            k.scope,
        )
    });
    let mut rings = BTreeMap::new();
    let mut backends = BackendCache::new(source);
    frontends
        .iter()
        .map(|(k, fe)| service_view(*k, fe, &mut rings, &mut backends))
        .collect()
}

/// Every backend entry with an address, by id.
pub fn backends<S: MapSource + ?Sized>(source: &S) -> Result<Vec<BackendView>, InspectError> {
    let mut v: Vec<BackendView> = source
        .backends()?
        .iter()
        .filter_map(|(id, b)| BackendView::new(*id, b))
        .collect();
    v.sort_by_key(|b| b.id);
    Ok(v)
}

/// Packets and bytes of one verdict, over all CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatView {
    pub verdict: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Every verdict's counters, in verdict order.
pub fn stats<S: MapSource + ?Sized>(source: &S) -> Result<Vec<StatView>, InspectError> {
    let mut v: Vec<(Verdict, Counter)> = source.stats()?;
    v.sort_by_key(|(verdict, _)| *verdict as u32);
    Ok(v.into_iter()
        .map(|(verdict, c)| StatView {
            verdict: verdict.name(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect())
}

/// An address, optionally with a port: what conntrack filters and `--from` take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrFilter {
    pub addr: Ipv4Addr,
    pub port: Option<u16>,
}

impl AddrFilter {
    fn matches(self, e: SocketAddrV4) -> bool {
        *e.ip() == self.addr && self.port.is_none_or(|p| p == e.port())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} is not an IPv4 address or address:port")]
    Addr(String),
    #[error("{0:?} is not an IPv4 address:port")]
    Endpoint(String),
    #[error("unknown protocol {0:?} (tcp or udp)")]
    Proto(String),
}

impl FromStr for AddrFilter {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<Ipv4Addr>() {
            return Ok(Self { addr, port: None });
        }
        let e: SocketAddrV4 = s.parse().map_err(|_| ParseError::Addr(s.into()))?;
        Ok(Self {
            addr: *e.ip(),
            port: Some(e.port()),
        })
    }
}

/// Which conntrack entries to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtFilter {
    /// The entry's key source (a forward entry's client, a reverse entry's backend).
    pub src: Option<AddrFilter>,
    pub dst: Option<AddrFilter>,
    /// The backend the entry names (forward and reverse alike).
    pub backend: Option<AddrFilter>,
    /// At most this many entries (0: all).
    pub limit: usize,
}

/// One conntrack entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CtView {
    /// "forward" (client → frontend), "reverse" (backend → client) or "unknown".
    pub kind: &'static str,
    pub proto: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub backend_id: u32,
    pub backend_generation: u32,
    /// The backend, if it still lives as the same incarnation; `None`: the entry is stale
    /// (the datapath balances a forward flow anew on its next packet).
    pub backend: Option<SocketAddrV4>,
    /// Forward, SNATed flows: the source the packets get.
    pub snat: Option<SocketAddrV4>,
    /// Reverse entries: the frontend that replies appear to come from.
    pub reply_source: Option<SocketAddrV4>,
    pub service_id: u32,
}

fn ct_view<S: MapSource + ?Sized>(
    key: &FlowKey,
    ct: &CtEntry,
    backends: &mut BackendCache<'_, S>,
) -> Result<CtView, InspectError> {
    let backend = backends
        .live(ct.backend_id, ct.backend_generation)?
        .map(|b| b.endpoint());
    let nat = (ct.nat_addr_be != 0).then(|| endpoint(ct.nat_addr_be, ct.nat_port_be));
    let (kind, snat, reply_source) = match ct.kind {
        CT_FORWARD => ("forward", nat, None),
        CT_REVERSE => ("reverse", None, nat),
        _ => ("unknown", None, None),
    };
    Ok(CtView {
        kind,
        proto: proto_name(key.proto),
        src: endpoint(key.src_be, key.sport_be),
        dst: endpoint(key.dst_be, key.dport_be),
        backend_id: ct.backend_id,
        backend_generation: ct.backend_generation,
        backend,
        snat,
        reply_source,
        service_id: ct.service_id,
    })
}

/// Conntrack entries that pass `filter`, sorted by tuple; and whether `filter.limit` stopped
/// the scan (more entries may match).
pub fn conntrack<S: MapSource + ?Sized>(
    source: &S,
    filter: &CtFilter,
) -> Result<(Vec<CtView>, bool), InspectError> {
    let mut backends = BackendCache::new(source);
    let mut out = Vec::new();
    let mut err = None;
    let mut truncated = false;
    source.conntrack(&mut |key, ct| {
        let v = match ct_view(key, ct, &mut backends) {
            Ok(v) => v,
            Err(e) => {
                err = Some(e);
                return false;
            }
        };
        let keep = filter.src.is_none_or(|f| f.matches(v.src))
            && filter.dst.is_none_or(|f| f.matches(v.dst))
            && filter
                .backend
                .is_none_or(|f| v.backend.is_some_and(|b| f.matches(b)));
        if keep {
            if filter.limit != 0 && out.len() == filter.limit {
                truncated = true;
                return false;
            }
            out.push(v);
        }
        true
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    out.sort_by_key(|v| (v.src, v.dst, v.proto.clone(), v.kind));
    Ok((out, truncated))
}

/// What `explain` is asked about: a frontend address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Target {
    pub addr: Ipv4Addr,
    pub port: u16,
    #[serde(serialize_with = "serialize_proto")]
    pub proto: u8,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with signature"
)]
fn serialize_proto<S: serde::Serializer>(proto: &u8, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&proto_name(*proto))
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, proto_name(self.proto))
    }
}

impl FromStr for Target {
    type Err = ParseError;
    /// `<ip>:<port>/<proto>` (tcp or udp, any case); `/<proto>` may be left out for TCP.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ep, proto) = s.split_once('/').unwrap_or((s, "tcp"));
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => IPPROTO_TCP,
            "udp" => IPPROTO_UDP,
            _ => return Err(ParseError::Proto(proto.into())),
        };
        let ep: SocketAddrV4 = ep.parse().map_err(|_| ParseError::Endpoint(ep.into()))?;
        Ok(Self {
            addr: *ep.ip(),
            port: ep.port(),
            proto,
        })
    }
}

/// What `explain` is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainQuery {
    pub target: Target,
    /// A client, to say which backend it gets.
    pub from: Option<SocketAddrV4>,
    /// One scope, or both.
    pub scope: Option<Scope>,
}

/// How the datapath treats the client's next packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Conntrack pins the flow to a live backend.
    Established,
    /// A new flow: Maglev picks the backend.
    NewFlow,
    /// The tuple is the reply direction of a translated flow.
    Reply,
    /// Dropped; `verdict` names the counter.
    Dropped,
    /// Not service traffic: passed untouched.
    NotService,
}

/// Where Maglev puts a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MaglevPick {
    /// `flow_hash` of the 5-tuple.
    pub hash: u32,
    /// `hash % ring_size`: the slot within the frontend's region.
    pub slot: u32,
    /// `ring_offset + slot`: the slot in the slab.
    pub ring_slot: u32,
    /// The backend id that slot holds.
    pub backend_id: u32,
}

/// The source a flow's packets get when they are SNATed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnatView {
    pub addr: Ipv4Addr,
    /// The port, when conntrack already holds it.
    pub port: Option<u16>,
    /// For a new flow: the port tried first, the one after its backend's cursor (a taken
    /// one moves on).
    pub first_port: Option<u16>,
    /// For a new flow: the SNAT port ranges.
    pub port_ranges: Vec<(u16, u16)>,
    /// SNAT ports in use to this backend from this node (live SNATed flows, or in their
    /// close timeout), and how many it can have: its fill.
    pub backend_ports_in_use: Option<u32>,
    pub backend_port_capacity: Option<u32>,
}

impl SnatView {
    fn plain(addr: Ipv4Addr, port: Option<u16>) -> Self {
        Self {
            addr,
            port,
            first_port: None,
            port_ranges: Vec::new(),
            backend_ports_in_use: None,
            backend_port_capacity: None,
        }
    }
}

/// Which backend one client gets, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pick {
    pub outcome: Outcome,
    /// The verdict counter the packet lands in, where the maps determine it.
    pub verdict: Option<&'static str>,
    pub backend: Option<BackendView>,
    /// The conntrack entry of the tuple, if there is one.
    pub conntrack: Option<CtView>,
    pub maglev: Option<MaglevPick>,
    pub snat: Option<SnatView>,
    /// Why, in words.
    pub reason: String,
}

/// One scope's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScopeExplanation {
    pub scope: String,
    /// The frontend entry and its ring's backends; `None`: no such frontend in this scope.
    pub frontend: Option<ServiceView>,
    /// What the maps say about this frontend, in words.
    pub notes: Vec<String>,
    pub pick: Option<Pick>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub target: Target,
    pub from: Option<SocketAddrV4>,
    pub scopes: Vec<ScopeExplanation>,
}

/// Which frontend matches `query.target`, its eligible backends, and (with `query.from`) the
/// backend that client gets, in each scope asked.
pub fn explain<S: MapSource + ?Sized>(
    source: &S,
    query: &ExplainQuery,
) -> Result<Explanation, InspectError> {
    let scopes = match query.scope {
        Some(s) => vec![s],
        None => vec![Scope::External, Scope::Internal],
    };
    let config = source.config()?;
    let mut backends = BackendCache::new(source);
    let mut rings = BTreeMap::new();
    let mut out = Vec::new();
    for scope in scopes {
        let t = query.target;
        let key = FrontendKey {
            addr_be: be(t.addr),
            port_be: t.port.to_be(),
            proto: t.proto,
            scope: scope as u8,
        };
        let fe = source.frontend(&key)?;
        let view = match &fe {
            Some(fe) => Some(service_view(key, fe, &mut rings, &mut backends)?),
            None => None,
        };
        let notes = scope_notes(scope, view.as_ref(), config.as_ref());
        let pick = match query.from {
            Some(client) => Some(pick(
                source,
                &mut backends,
                t,
                client,
                scope,
                fe.as_ref(),
                config.as_ref(),
            )?),
            None => None,
        };
        out.push(ScopeExplanation {
            scope: scope_name(scope as u8),
            frontend: view,
            notes,
            pick,
        });
    }
    Ok(Explanation {
        target: query.target,
        from: query.from,
        scopes: out,
    })
}

/// Where the packets of a scope come from, for the explanation's headline.
#[must_use]
pub fn scope_origin(scope: &str) -> &'static str {
    match scope {
        "external" => "packets arriving on a node NIC (XDP)",
        "internal" => "packets sent by pods of this node (TC)",
        _ => "unknown scope",
    }
}

/// A configuration's SNAT ranges.
fn snat_ranges(c: &Config) -> Vec<(u16, u16)> {
    c.snat_ranges
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| (r.min, r.max))
        .collect()
}

fn ranges_words(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn snat_words(config: Option<&Config>) -> String {
    match config {
        Some(c) if c.snat_addr_be != 0 => format!(
            "SNATed to {} (ports {})",
            ip(c.snat_addr_be),
            ranges_words(&snat_ranges(c))
        ),
        _ => "SNATed, but no SNAT address is configured, so such flows are dropped \
              (drop_snat_exhausted)"
            .into(),
    }
}

fn scope_notes(scope: Scope, view: Option<&ServiceView>, config: Option<&Config>) -> Vec<String> {
    let mut notes = Vec::new();
    let Some(v) = view else {
        notes.push(format!(
            "no frontend in the {} scope: untracked packets pass untouched \
             (pass_not_service)",
            scope_name(scope as u8)
        ));
        return notes;
    };
    if v.ring_size == 0 {
        notes.push(
            "the ring is empty (no usable backend): new flows are dropped (drop_no_backend); \
             established flows keep their backend while it lives"
                .into(),
        );
    } else if v.backends.iter().any(|m| m.backend.is_none()) {
        notes.push(
            "the ring names a cleared backend id: new flows that hash to its slots are \
             dropped (drop_no_backend)"
                .into(),
        );
    }
    match scope {
        Scope::External if v.snat_remote => {
            let remote = v
                .backends
                .iter()
                .any(|m| m.backend.as_ref().is_some_and(|b| !b.local));
            if remote {
                notes.push(format!(
                    "externalTrafficPolicy=Cluster: flows to remote backends are {}; \
                     local backends see the client's address",
                    snat_words(config)
                ));
            } else {
                notes.push(
                    "all backends in the ring are local: the client's address is kept".into(),
                );
            }
        }
        Scope::External => notes.push(
            "externalTrafficPolicy=Local: only this node's backends are in the ring and the \
             client's address is kept (no SNAT)"
                .into(),
        ),
        Scope::Internal => notes.push(format!(
            "backends see the pod's address; a pod that reaches itself through this frontend \
             is SNATed to {} (hairpin)",
            Ipv4Addr::from(HAIRPIN_ADDR)
        )),
    }
    notes
}

/// What conntrack says about a tuple, as `select::tracked` reads it.
enum Tracked {
    /// An established flow or a reply: the answer.
    Decided(Box<Pick>),
    /// A forward entry whose backend is gone or reused: balanced anew, and why.
    Stale(String),
    Untracked,
}

fn tracked<S: MapSource + ?Sized>(
    backends: &mut BackendCache<'_, S>,
    ct: Option<CtEntry>,
    view: Option<&CtView>,
    proto: u8,
) -> Result<Tracked, InspectError> {
    let (Some(c), Some(v)) = (ct, view) else {
        return Ok(Tracked::Untracked);
    };
    let decided = |outcome, verdict: Verdict, backend, snat, reason| {
        Tracked::Decided(Box::new(Pick {
            outcome,
            verdict: Some(verdict.name()),
            backend,
            conntrack: Some(v.clone()),
            maglev: None,
            snat,
            reason,
        }))
    };
    match c.kind {
        CT_REVERSE => {
            let to = v.reply_source.map_or_else(String::new, |e| e.to_string());
            Ok(decided(
                Outcome::Reply,
                Verdict::ReverseNat,
                None,
                None,
                format!(
                    "this tuple is the reply direction of a translated flow (a reverse \
                     conntrack entry): its source is rewritten to {to}"
                ),
            ))
        }
        CT_FORWARD => {
            let Some(b) = backends.live(c.backend_id, c.backend_generation)? else {
                return Ok(Tracked::Stale(format!(
                    "conntrack names backend {} generation {}, which is gone or reused: the \
                     flow is balanced anew. ",
                    c.backend_id, c.backend_generation
                )));
            };
            let snat = match v.snat {
                Some(e) => {
                    let mut view = SnatView::plain(*e.ip(), Some(e.port()));
                    backends.fill(&mut view, (b.addr, b.port, proto))?;
                    Some(view)
                }
                None => None,
            };
            let source = v.snat.map_or_else(
                || "the client's address is kept".to_string(),
                |e| format!("its source is rewritten to {e}"),
            );
            let reason = format!(
                "established flow: conntrack pins it to backend {} ({}, generation {}), chosen \
                 when the flow began; {source}",
                b.id,
                b.endpoint(),
                b.generation
            );
            Ok(decided(
                Outcome::Established,
                Verdict::NatEstablished,
                Some(b),
                snat,
                reason,
            ))
        }
        _ => Ok(Tracked::Untracked),
    }
}

/// The datapath's decision for the next packet from `client` to `t` in `scope`, step by step
/// as `lb-ebpf/src/select.rs` takes it.
fn pick<S: MapSource + ?Sized>(
    source: &S,
    backends: &mut BackendCache<'_, S>,
    t: Target,
    client: SocketAddrV4,
    scope: Scope,
    fe: Option<&Frontend>,
    config: Option<&Config>,
) -> Result<Pick, InspectError> {
    let (src_be, dst_be) = (be(*client.ip()), be(t.addr));
    let (sport_be, dport_be) = (client.port().to_be(), t.port.to_be());
    let key = FlowKey {
        src_be,
        dst_be,
        sport_be,
        dport_be,
        proto: t.proto,
        _pad0: 0,
        _pad1: 0,
    };
    // 1. Conntrack, before the frontend: established flows and replies.
    let ct = source.conntrack_entry(&key)?;
    let ct_view = match &ct {
        Some(c) => Some(ct_view(&key, c, backends)?),
        None => None,
    };
    let stale = match tracked(backends, ct, ct_view.as_ref(), t.proto)? {
        Tracked::Decided(p) => return Ok(*p),
        Tracked::Stale(why) => why,
        Tracked::Untracked => String::new(),
    };
    let undecided = |outcome, verdict: Verdict, maglev, reason: String| Pick {
        outcome,
        verdict: Some(verdict.name()),
        backend: None,
        conntrack: ct_view.clone(),
        maglev,
        snat: None,
        reason: format!("{stale}{reason}"),
    };
    // 2. The frontend of this scope.
    let Some(fe) = fe else {
        return Ok(undecided(
            Outcome::NotService,
            Verdict::PassNotService,
            None,
            "no frontend matches in this scope: passed untouched".into(),
        ));
    };
    if fe.ring_size == 0 {
        return Ok(undecided(
            Outcome::Dropped,
            Verdict::DropNoBackend,
            None,
            "the frontend's ring is empty: new flows are dropped".into(),
        ));
    }
    // 3. Maglev: the slot the flow hash points at, or the client's first connection's under
    //    a live session affinity.
    let (hash, affinity_note) = affinity_hash(
        source,
        fe,
        src_be,
        scope,
        flow_hash(src_be, dst_be, sport_be, dport_be, t.proto),
    )?;
    let slot = hash % fe.ring_size;
    let ring_slot = fe.ring_offset.wrapping_add(slot);
    let id = source.ring(ring_slot, 1)?.first().copied().unwrap_or(0);
    let maglev = MaglevPick {
        hash,
        slot,
        ring_slot,
        backend_id: id,
    };
    let Some(b) = backends.get(id)? else {
        return Ok(undecided(
            Outcome::Dropped,
            Verdict::DropNoBackend,
            Some(maglev),
            format!(
                "Maglev slot {slot} of {} holds backend id {id}, which is cleared: dropped",
                fe.ring_size
            ),
        ));
    };
    // 4. SNAT: remote backends from a NIC (eTP=Cluster), or a pod reaching itself.
    let snat = new_flow_snat(backends, scope, fe, &b, (client, t.proto, hash), config)?;
    // A remote backend with SNAT unconfigured: `reserve_snat` fails.
    let unconfigured = snat.as_ref().is_some_and(|s| s.addr.is_unspecified());
    let (outcome, verdict) = if unconfigured {
        (Outcome::Dropped, Verdict::DropSnatExhausted)
    } else {
        (Outcome::NewFlow, Verdict::NatNew)
    };
    Ok(Pick {
        outcome,
        verdict: Some(verdict.name()),
        reason: format!(
            "{stale}{affinity_note}new flow: flow hash {hash:#010x} picks Maglev slot {slot} of \
             {}, which holds backend {} ({}, {}); {}",
            fe.ring_size,
            b.id,
            b.endpoint(),
            if b.local { "local" } else { "remote" },
            new_flow_source(snat.as_ref()),
        ),
        backend: Some(b),
        conntrack: ct_view,
        maglev: Some(maglev),
        snat,
    })
}

/// What happens to a new flow's source address, in words.
fn new_flow_source(snat: Option<&SnatView>) -> String {
    let Some(s) = snat else {
        return "the client's address is kept".into();
    };
    let fill = match (s.backend_ports_in_use, s.backend_port_capacity) {
        (Some(used), Some(cap)) => format!(
            "; this backend has {used} of its {cap} SNAT ports in use ({:.1} %)",
            f64::from(used) * 100.0 / f64::from(cap.max(1))
        ),
        _ => String::new(),
    };
    match (s.port, s.first_port) {
        _ if s.addr.is_unspecified() => {
            "it is remote and no SNAT address is configured, so the flow is dropped".into()
        }
        (Some(p), _) => format!("a hairpin flow: its source becomes {}:{p}", s.addr),
        (None, Some(first)) => format!(
            "it is remote: its source becomes {}, port from {} (its backend's next: \
             {first}){fill}",
            s.addr,
            ranges_words(&s.port_ranges)
        ),
        _ => format!("its source becomes {}{fill}", s.addr),
    }
}

/// The SNAT a new flow gets, as `select::new_flow` decides it: a remote backend from a NIC
/// with SNAT on (`snat::reserve`: the first port from the backend's cursor that is not
/// excluded; an unspecified address when SNAT is not configured, which drops the flow), or
/// a pod reaching itself (`reserve_hairpin`).
fn new_flow_snat<S: MapSource + ?Sized>(
    backends: &mut BackendCache<'_, S>,
    scope: Scope,
    fe: &Frontend,
    b: &BackendView,
    (client, proto, hash): (SocketAddrV4, u8, u32),
    config: Option<&Config>,
) -> Result<Option<SnatView>, InspectError> {
    match scope {
        Scope::External if !b.local && fe.flags & FRONTEND_F_SNAT_REMOTE != 0 => {}
        Scope::Internal if b.addr == *client.ip() => {
            return Ok(Some(SnatView::plain(
                Ipv4Addr::from(HAIRPIN_ADDR),
                Some(client.port()),
            )));
        }
        _ => return Ok(None),
    }
    let Some(c) = config.filter(|c| c.snat_addr_be != 0 && c.snat_port_count != 0) else {
        return Ok(Some(SnatView::plain(Ipv4Addr::UNSPECIFIED, None)));
    };
    let mut view = SnatView::plain(ip(c.snat_addr_be), None);
    view.port_ranges = snat_ranges(c);
    let cursor = backends.source.snat_cursor(b.id)?.unwrap_or(0);
    let start = if cursor == 0 { hash } else { cursor };
    let excluded = backends.source.snat_excluded()?.unwrap_or_default();
    let is_excluded = |p: u16| {
        excluded
            .get(usize::from(p >> 6))
            .is_some_and(|w| w & (1 << (p & 63)) != 0)
    };
    view.first_port = (0..16)
        .filter_map(|i| {
            lb_common::snat_port_at(&c.snat_ranges, start.wrapping_add(i) % c.snat_port_count)
        })
        .find(|p| !is_excluded(*p));
    backends.fill(&mut view, (b.addr, b.port, proto))?;
    Ok(Some(view))
}

#[cfg(test)]
mod tests;
