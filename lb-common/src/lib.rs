//! The map ABI shared by xlb's eBPF datapath (`lb-ebpf`) and its agent (`lb-userspace`).
//!
//! Every type here is `#[repr(C)]` with explicit padding and a const size/offset assert, so the
//! two sides cannot disagree about a layout without the build failing. Fields in network byte
//! order carry a `_be` suffix: they hold the packet's bytes as a native integer
//! (`u32::from_ne_bytes(packet[..4])`), never a host-order value. Map names carry the layout
//! version (`_v1`); a layout change means a new suffix.
#![no_std]

pub mod csum;
pub mod hash;

/// Version of the map layouts below; part of every map name.
pub const ABI_VERSION: u32 = 1;

/// Map names as they appear in the object file (and under the pin directory).
pub mod map_names {
    pub const FRONTENDS: &str = "xlb_frontends_v1";
    pub const BACKENDS: &str = "xlb_backends_v1";
    pub const RINGS: &str = "xlb_rings_v1";
    pub const CONNTRACK: &str = "xlb_ct_v1";
    pub const SNAT: &str = "xlb_snat_v1";
    pub const STATS: &str = "xlb_stats_v1";
    pub const SERVICE_STATS: &str = "xlb_svc_stats_v1";
    pub const CONFIG: &str = "xlb_config_v1";
    pub const SOCK_REVNAT: &str = "xlb_sock_revnat_v1";
    pub const AFFINITY: &str = "xlb_affinity_v1";
    pub const EVENTS: &str = "xlb_events_v1";
    pub const SOCK_NETNS: &str = "xlb_sock_netns_v1";
    pub const FLOWS: &str = "xlb_flows_v1";
    pub const POD_IFACES: &str = "xlb_pod_ifaces_v1";
    pub const HOST_ROUTING: &str = "xlb_host_routing_v1";
}

/// Default capacities; the agent may override each at load time.
pub mod capacity {
    pub const FRONTENDS: u32 = 65_536;
    pub const BACKENDS: u32 = 262_144;
    /// Ring slab slots (u32 backend ids): 16 Mi slots = 64 MiB, enough for 10,000 services
    /// with 10 backends each at M ≥ 100·N.
    pub const RING_SLOTS: u32 = 16 * 1024 * 1024;
    /// Flow table buckets (a power of two): 512 Ki × 3 slots = 1.5 Mi flows in 64 MiB.
    pub const FLOW_BUCKETS: u32 = 512 * 1024;
    /// The LRU conntrack map holds the flows whose flow-table bucket was full (see
    /// `FlowBucket`; with random client ports about 0.3 % of 250 Ki live flows, 2 % of
    /// 500 Ki, 10 % of 1 Mi), and those of a previous version's datapath during an upgrade
    /// (which keeps that datapath's map and its size).
    pub const CONNTRACK: u32 = 256 * 1024;
    pub const SNAT: u32 = 256 * 1024;
    /// Sockets translated by socket-level load balancing whose peer address is read back.
    pub const SOCK_REVNAT: u32 = 256 * 1024;
    /// (client, service port) pairs of Services with `sessionAffinity: ClientIP`.
    pub const AFFINITY: u32 = 256 * 1024;
    /// Pod interfaces that BPF host routing may deliver to.
    pub const POD_IFACES: u32 = 4096;
}

/// Ring slots per element of the ring slab map. The kernel stores array elements at an 8-byte
/// stride, so a slab of bare `u32`s would waste half its memory (and make its memory map
/// strided); 16 slots per 64-byte element keep the map dense and the mapping a flat `[u32]`.
pub const RING_LANES: u32 = 16;
/// One element of the ring slab map.
pub type RingChunk = [u32; RING_LANES as usize];

/// Source address of hairpin flows (a pod reaching itself through a Service), link-local so
/// it belongs to no node or pod: the pod answers it through its gateway, back to xlb's TC hook.
pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Which view of a frontend a lookup wants. Traffic policies make the two differ: a `NodePort`
/// with externalTrafficPolicy=Local has only node-local backends in its external entry.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Traffic that entered the node from outside (XDP on a NIC).
    External = 0,
    /// Traffic that a pod on this node sent (TC on its interface).
    Internal = 1,
}

/// Key of the frontends map: the address a client sends to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr_be: u32, // frontend IPv4 address, network order
    pub port_be: u16, // frontend port, network order
    pub proto: u8,    // IPPROTO_TCP or IPPROTO_UDP
    pub scope: u8,    // Scope as u8
}

/// Frontend flag: backends may live on other nodes and need SNAT when reached from a NIC.
/// Without it (externalTrafficPolicy=Local) the client's address is kept.
pub const FRONTEND_F_SNAT_REMOTE: u32 = 1 << 0;

/// Value of the frontends map: where this frontend's Maglev ring lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frontend {
    pub service_id: u32,    // agent-assigned id of the service port (stats, explain)
    pub ring_offset: u32,   // first slot of this frontend's region in the ring slab
    pub ring_size: u32,     // region length M (a prime); 0 = no usable backend
    pub backend_count: u32, // distinct backends in the ring (diagnostics)
    pub flags: u32,         // FRONTEND_F_*
    /// `sessionAffinity: ClientIP`: seconds a client stays with its backend since its last new
    /// connection (`timeoutSeconds`); 0 = no affinity.
    pub affinity_timeout_s: u32,
}

/// Backend flag: the backend is a pod on this node.
pub const BACKEND_F_LOCAL: u32 = 1 << 0;
/// Backend flag: no ring holds the backend any more (its endpoint went away or is not ready).
/// Established TCP flows keep it, as kube-proxy's conntrack keeps them; UDP flows move to a
/// live backend, as kube-proxy flushes their conntrack entries.
pub const BACKEND_F_DRAINING: u32 = 1 << 1;

/// Value of the backends map (key: backend id, u32; id 0 means "none").
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr_be: u32, // backend IPv4 address, network order
    pub port_be: u16, // backend port, network order
    pub _pad0: u16,
    pub generation: u32, // bumped when the id is reused; conntrack entries remember it
    pub flags: u32,      // BACKEND_F_*
}

/// Key of the conntrack map: a packet's 5-tuple exactly as it arrives at the hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    // Padding as scalars, not `[u8; 3]`: the datapath builds a key per packet, and zeroing
    // three unaligned bytes compiles to a call to a `memset` subprogram; these are two stores.
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Conntrack entry kinds.
pub const CT_FORWARD: u8 = 1;
pub const CT_REVERSE: u8 = 2;

/// Value of the conntrack map.
///
/// A forward entry (key: client → frontend) names the chosen backend and, for SNATed flows,
/// the node address and port used as the new source. A reverse entry (key: backend → client)
/// names the frontend that the reply's source must become. Replies of SNATed flows are found
/// in the SNAT map instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtEntry {
    pub backend_id: u32,         // forward: chosen backend
    pub backend_generation: u32, // forward: its generation when chosen
    pub nat_addr_be: u32,        // forward: SNAT source (0 = none); reverse: frontend address
    pub service_id: u32,         // service the flow belongs to
    pub nat_port_be: u16,        // forward: SNAT port; reverse: frontend port
    pub kind: u8,                // CT_FORWARD or CT_REVERSE
    pub _pad: u8,
}

/// Value of the SNAT map, whose key is the reply's 5-tuple as it arrives (backend → SNAT
/// address and port): the client and frontend to restore. Inserting it with `BPF_NOEXIST`
/// is also how a SNAT port is reserved, so one port serves many backends at once. Entries
/// expire (see `Config`'s timeouts) so ports of finished flows are reused: a reply refreshes
/// `last_seen_s`, a FIN or RST marks the flow closing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SnatEntry {
    pub client_addr_be: u32,   // original source of the flow
    pub frontend_addr_be: u32, // address the client sent to
    pub client_port_be: u16,
    pub frontend_port_be: u16,
    pub service_id: u32,  // service the flow belongs to
    pub last_seen_s: u32, // coarse seconds since boot: creation, then the last reply
    pub state: u8,        // SNAT_NEW, SNAT_ESTABLISHED or SNAT_CLOSING
    pub _pad: [u8; 3],
}

/// SNAT entry states.
pub const SNAT_NEW: u8 = 0;
pub const SNAT_ESTABLISHED: u8 = 1;
pub const SNAT_CLOSING: u8 = 2;

/// Default idle timeouts of SNAT entries, in seconds (a port is reused only after them).
pub mod snat_timeout {
    /// No reply yet (kernel conntrack: `SYN_SENT` 120 s, UDP unreplied 30 s).
    pub const NEW: u32 = 60;
    /// TCP with replies, no FIN/RST yet.
    pub const TCP_ESTABLISHED: u32 = 2 * 3600;
    /// UDP with replies (kernel conntrack: 120 s).
    pub const UDP_ESTABLISHED: u32 = 120;
    /// After a FIN or RST (kernel conntrack: `TIME_WAIT` 120 s).
    pub const CLOSING: u32 = 120;
}

/// `Config::flags`: also record every new flow in the LRU conntrack map, as a datapath
/// without the flow table does: set while such a datapath's programs may still run on some
/// interface (an upgrade from it is under way), so they find the flows the new ones make.
pub const CONFIG_F_CONNTRACK_TOO: u32 = 1 << 0;

/// XDP metadata word in front of a frame that the NIC program translated to a backend on this
/// node, when BPF host routing is on: the NIC's TC ingress program then delivers it to the
/// pod's interface itself (`bpf_redirect_peer`) instead of the kernel's forwarding path.
pub const XDP_META_TO_POD: u32 = u32::from_be_bytes(*b"xlbP");

/// Counters of BPF host routing (index of the host-routing map, per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostRouting {
    /// Delivered straight into the pod's network namespace.
    Redirected = 0,
    /// Left to the kernel's forwarding: the route does not lead to a pod interface xlb knows
    /// (a bridge, another node), or the TTL would expire.
    Kernel = 1,
}

impl HostRouting {
    pub const COUNT: u32 = 2;
    pub const ALL: [HostRouting; Self::COUNT as usize] =
        [HostRouting::Redirected, HostRouting::Kernel];

    /// Metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            HostRouting::Redirected => "host_routing_redirected",
            HostRouting::Kernel => "host_routing_kernel",
        }
    }
}

/// Maximum node addresses the datapath knows of.
pub const MAX_NODE_ADDRS: usize = 8;

/// The single entry of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    pub snat_addr_be: u32,    // source address for SNATed flows (0 = SNAT disabled)
    pub snat_port_min: u16,   // SNAT port range, host order, inclusive
    pub snat_port_max: u16,   // inclusive
    pub node_addr_count: u32, // valid entries in node_addrs_be
    pub flags: u32,           // CONFIG_F_*
    pub node_addrs_be: [u32; MAX_NODE_ADDRS],
    pub snat_timeout_new_s: u32, // idle timeouts of SNAT entries by state (snat_timeout::*)
    pub snat_timeout_tcp_established_s: u32,
    pub snat_timeout_udp_established_s: u32,
    pub snat_timeout_closing_s: u32,
}

/// What the datapath did with a packet; index of the stats map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Not service traffic: passed untouched.
    PassNotService = 0,
    /// Malformed or not parseable (truncated, bad IHL, length beyond buffer): passed untouched.
    PassMalformed = 1,
    /// An IPv4 fragment: passed untouched.
    PassFragment = 2,
    /// Not IPv4 TCP/UDP: passed untouched.
    PassOtherProto = 3,
    /// New flow to a frontend: backend chosen, translated.
    NatNew = 4,
    /// Established flow to a frontend: translated with its conntrack entry.
    NatEstablished = 5,
    /// Reply of a translated flow: reverse-translated.
    ReverseNat = 6,
    /// Translated and SNATed toward a remote backend, transmitted from XDP.
    SnatTx = 7,
    /// Frontend hit with no usable backend: dropped.
    DropNoBackend = 8,
    /// No free SNAT port: dropped.
    DropSnatExhausted = 9,
    /// FIB lookup failed for a SNATed flow: dropped.
    DropNoRoute = 10,
    /// A map update failed (full conntrack etc.): dropped.
    DropMapFull = 11,
    /// A kernel helper failed halfway through a rewrite: dropped rather than sent half-done.
    DropRewrite = 12,
    /// TTL would expire in forwarding: passed to the kernel, which answers with ICMP.
    PassTtl = 13,
}

impl Verdict {
    pub const COUNT: u32 = 14;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Verdict::PassNotService,
        Verdict::PassMalformed,
        Verdict::PassFragment,
        Verdict::PassOtherProto,
        Verdict::NatNew,
        Verdict::NatEstablished,
        Verdict::ReverseNat,
        Verdict::SnatTx,
        Verdict::DropNoBackend,
        Verdict::DropSnatExhausted,
        Verdict::DropNoRoute,
        Verdict::DropMapFull,
        Verdict::DropRewrite,
        Verdict::PassTtl,
    ];

    /// Metric label of this verdict.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::PassNotService => "pass_not_service",
            Verdict::PassMalformed => "pass_malformed",
            Verdict::PassFragment => "pass_fragment",
            Verdict::PassOtherProto => "pass_other_proto",
            Verdict::NatNew => "nat_new",
            Verdict::NatEstablished => "nat_established",
            Verdict::ReverseNat => "reverse_nat",
            Verdict::SnatTx => "snat_tx",
            Verdict::DropNoBackend => "drop_no_backend",
            Verdict::DropSnatExhausted => "drop_snat_exhausted",
            Verdict::DropNoRoute => "drop_no_route",
            Verdict::DropMapFull => "drop_map_full",
            Verdict::DropRewrite => "drop_rewrite",
            Verdict::PassTtl => "pass_ttl",
        }
    }
}

/// Key of the socket reverse-translation map: a socket that socket-level load balancing
/// pointed at a backend, and that backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub cookie: u64,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the socket reverse-translation map: the frontend the socket asked for, which
/// `getpeername()` and `recvmsg()` report instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevNat {
    pub frontend_addr_be: u32,
    pub frontend_port_be: u16,
    pub _pad: u16,
}

/// Key of the session-affinity map: a client of a service port (`sessionAffinity: ClientIP`)
/// in one scope (external-scope frontends may have fewer backends, eTP=Local).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub client_addr_be: u32,
    pub service_id: u32,
    pub scope: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Value of the session-affinity map: the flow hash of the client's first connection (its
/// later connections are placed in the Maglev ring as that one was, so they reach the same
/// backend for as long as the ring gives it that slot) and when it last opened a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityEntry {
    pub hash: u32,
    pub last_seen_s: u32,
}

/// Datapath decisions that are not per-packet verdicts; index of the per-CPU events map
/// (value: a count).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A node process's `connect()`/`sendmsg()` to a frontend pointed at a backend.
    SockTranslated = 0,
    /// A node process's `connect()`/`sendmsg()` to a frontend without a usable backend: left
    /// as it is.
    SockNoBackend = 1,
    /// A new connection sent to its client's backend by session affinity.
    AffinityHit = 2,
    /// A new connection of a client without a live affinity: balanced, and remembered.
    AffinityNew = 3,
}

impl Event {
    pub const COUNT: u32 = 4;
    pub const ALL: [Event; Self::COUNT as usize] = [
        Event::SockTranslated,
        Event::SockNoBackend,
        Event::AffinityHit,
        Event::AffinityNew,
    ];

    /// Metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Event::SockTranslated => "sock_translated",
            Event::SockNoBackend => "sock_no_backend",
            Event::AffinityHit => "affinity_hit",
            Event::AffinityNew => "affinity_new",
        }
    }
}

/// Slots per flow-table bucket.
pub const FLOW_WAYS: usize = 3;
/// `FlowBucket::header` bit: a writer holds the bucket (the low 32 bits are its sequence
/// number, odd while it writes).
pub const FLOW_BUCKET_LOCKED: u64 = 1;
/// `FlowBucket::header` bit: a flow of this bucket (forward or reply side) may be in the LRU
/// conntrack map, so a miss in the bucket must be looked up there too.
pub const FLOW_BUCKET_OVERFLOW: u64 = 1 << 32;
/// `FlowSlot::flags`: the flow is SNATed to the node's SNAT address (`peer_addr_be`) and
/// `nat_port_be`.
pub const FLOW_F_SNAT: u8 = 1 << 0;
/// `FlowSlot::flags`: a hairpin flow, SNATed to `HAIRPIN_ADDR` (`peer_addr_be`) and
/// `nat_port_be`.
pub const FLOW_F_HAIRPIN: u8 = 1 << 1;
/// `FlowSlot::state`: a reply was seen (until then the slot may be reused after the timeout
/// of unanswered flows). SNATed flows count as answered: their replies are seen in the SNAT
/// map, which expires their ports itself.
pub const FLOW_S_REPLIED: u8 = 1 << 0;
/// `FlowSlot::state`: a FIN or RST was seen; the slot may be reused after the closing timeout.
pub const FLOW_S_CLOSING: u8 = 1 << 1;

/// One flow in the flow table. A slot serves both directions: the client's packets match
/// (client, client port, frontend, frontend port, protocol); a reply of a flow that was not
/// SNATed matches (backend, backend port) → (client, client port). `client_addr_be == 0`
/// marks a free slot. Everything but `last_seen_s` and `state` is written only by the holder
/// of the bucket's lock; those two are refreshed by packets without it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowSlot {
    pub client_addr_be: u32,
    pub frontend_addr_be: u32,
    /// Flows not SNATed: the backend's address (their replies come from it). SNATed flows:
    /// the address they are SNATed to (their replies are found in the SNAT map).
    pub peer_addr_be: u32,
    pub client_port_be: u16,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    pub nat_port_be: u16, // FLOW_F_SNAT / FLOW_F_HAIRPIN: the flow's new source port
    pub backend_id: u32,
    pub backend_generation: u32,
    pub service_id: u32,
    pub last_seen_s: u32, // coarse seconds since boot; refreshed at most once a second
    pub proto: u8,
    pub flags: u8, // FLOW_F_*
    pub state: u8, // FLOW_S_*
    pub _pad: u8,
}

/// One bucket of the flow table, the datapath's conntrack fast path: an array map (memory-
/// mappable) of 128-byte buckets, indexed by `hash::flow_bucket(client, client port, proto)`
/// masked to the table size. Both directions of a flow land in the same bucket, so a new flow
/// is recorded with plain stores into the bucket its lookup has just read, not with hash-map
/// inserts (each of which costs a helper call, a lock and a cold element).
///
/// `header`: the low 32 bits are a sequence number that writers make odd (with a
/// compare-and-swap: the bucket's lock) while they write and even again after, so readers that
/// see it change or odd read again; bit 32 is `FLOW_BUCKET_OVERFLOW`. A bucket whose slots all
/// hold live flows sends the next flow to the LRU conntrack map and sets the overflow bit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowBucket {
    pub header: u64,
    pub slots: [FlowSlot; FLOW_WAYS],
}

/// Value of the per-CPU stats map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

macro_rules! assert_layout {
    ($t:ty, $size:expr, $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
    };
}
macro_rules! assert_offset {
    ($t:ty, $field:ident, $off:expr) => {
        const _: () = assert!(core::mem::offset_of!($t, $field) == $off);
    };
}

assert_layout!(FrontendKey, 8, 4);
assert_offset!(FrontendKey, port_be, 4);
assert_offset!(FrontendKey, proto, 6);
assert_offset!(FrontendKey, scope, 7);
assert_layout!(Frontend, 24, 4);
assert_offset!(Frontend, ring_offset, 4);
assert_offset!(Frontend, ring_size, 8);
assert_offset!(Frontend, flags, 16);
assert_layout!(Backend, 16, 4);
assert_offset!(Backend, port_be, 4);
assert_offset!(Backend, generation, 8);
assert_offset!(Backend, flags, 12);
assert_layout!(FlowKey, 16, 4);
assert_offset!(FlowKey, sport_be, 8);
assert_offset!(FlowKey, proto, 12);
assert_offset!(FlowKey, _pad0, 13);
assert_offset!(FlowKey, _pad1, 14);
assert_layout!(CtEntry, 20, 4);
assert_offset!(CtEntry, service_id, 12);
assert_offset!(CtEntry, nat_port_be, 16);
assert_offset!(CtEntry, kind, 18);
assert_layout!(SnatEntry, 24, 4);
assert_offset!(SnatEntry, last_seen_s, 16);
assert_offset!(SnatEntry, state, 20);
assert_offset!(SnatEntry, service_id, 12);
assert_offset!(SnatEntry, client_port_be, 8);
assert_layout!(Config, 64, 4);
assert_offset!(Config, snat_timeout_new_s, 48);
assert_offset!(Config, node_addrs_be, 16);
assert_layout!(Counter, 16, 8);
assert_offset!(Frontend, affinity_timeout_s, 20);
assert_layout!(AffinityKey, 12, 4);
assert_offset!(AffinityKey, scope, 8);
assert_layout!(AffinityEntry, 8, 4);
assert_offset!(AffinityEntry, last_seen_s, 4);
assert_layout!(SockKey, 16, 8);
assert_layout!(FlowSlot, 40, 4);
assert_offset!(FlowSlot, client_port_be, 12);
assert_offset!(FlowSlot, nat_port_be, 18);
assert_offset!(FlowSlot, backend_id, 20);
assert_offset!(FlowSlot, last_seen_s, 32);
assert_offset!(FlowSlot, proto, 36);
assert_offset!(FlowSlot, flags, 37);
assert_offset!(FlowSlot, state, 38);
assert_layout!(FlowBucket, 128, 8);
assert_offset!(FlowBucket, slots, 8);
assert_offset!(SockKey, backend_addr_be, 8);
assert_offset!(SockKey, backend_port_be, 12);
assert_offset!(SockKey, proto, 14);
assert_layout!(SockRevNat, 8, 4);
assert_offset!(SockRevNat, frontend_port_be, 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], made only of integers, with all padding explicit, so
    // any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::Frontend {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::SnatEntry {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockRevNat {}
    unsafe impl aya::Pod for super::FlowBucket {}
    unsafe impl aya::Pod for super::FlowSlot {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityEntry {}
}
