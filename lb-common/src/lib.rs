//! The map ABI shared by xlb's eBPF datapath (`lb-ebpf`) and its agent (`lb-userspace`).
//!
//! Every type here is `#[repr(C)]` with explicit padding and a const size/offset assert, so the
//! two sides cannot disagree about a layout without the build failing. Fields in network byte
//! order carry a `_be` suffix: they hold the packet's bytes as a native integer
//! (`u32::from_ne_bytes(packet[..4])`), never a host-order value. Map names carry the layout
//! version (`_v2`); a layout change means a new suffix.
#![no_std]

pub mod csum;
pub mod hash;

/// Version of the map layouts below; part of every map name.
pub const ABI_VERSION: u32 = 2;

/// Map names as they appear in the object file (and under the pin directory).
pub mod map_names {
    pub const FRONTENDS: &str = "xlb_frontends_v2";
    pub const BACKENDS: &str = "xlb_backends_v2";
    pub const RINGS: &str = "xlb_rings_v2";
    pub const CONNTRACK: &str = "xlb_ct_v2";
    /// The SNAT table (`NatBucket`s): SNATed and hairpin flows by their reply tuple.
    pub const NAT: &str = "xlb_nat_v2";
    /// SNAT port cursors, per backend id.
    pub const NAT_CURSORS: &str = "xlb_nat_cursors_v2";
    /// Ports new SNATed flows must not take (a bitmap of 65,536 bits).
    pub const NAT_EXCLUDED: &str = "xlb_nat_excluded_v2";
    /// The LRU SNAT map of a datapath of layout version 1 (`SnatEntry`s), taken over at an
    /// upgrade so its flows' replies are still found; small and empty on a fresh node.
    pub const SNAT_LEGACY: &str = "xlb_snat_lru_v2";
    pub const STATS: &str = "xlb_stats_v2";
    pub const SERVICE_STATS: &str = "xlb_svc_stats_v2";
    pub const CONFIG: &str = "xlb_config_v2";
    pub const SOCK_REVNAT: &str = "xlb_sock_revnat_v2";
    pub const AFFINITY: &str = "xlb_affinity_v2";
    pub const EVENTS: &str = "xlb_events_v2";
    pub const SOCK_NETNS: &str = "xlb_sock_netns_v2";
    pub const FLOWS: &str = "xlb_flows_v2";
    pub const POD_IFACES: &str = "xlb_pod_ifaces_v2";
    pub const HOST_ROUTING: &str = "xlb_host_routing_v2";
    /// The programs the NIC program tail-calls (`PROG_INDEX_*`; a table holds programs of
    /// one type).
    pub const NIC_PROGRAMS: &str = "xlb_nic_progs_v2";
    /// The programs the pod program tail-calls.
    pub const POD_PROGRAMS: &str = "xlb_pod_progs_v2";
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
    /// SNAT table buckets (a power of two): 256 Ki × 3 = 768 Ki SNATed flows in 32 MiB. A
    /// SNATed flow holds its entry while it lives and for its close timeout after (65 s when
    /// the backend closed first, 10 s otherwise), so the table holds e.g. 200,000 live
    /// SNATed connections plus 8,000 closes per second sustained.
    pub const NAT_BUCKETS: u32 = 256 * 1024;
    /// The legacy LRU SNAT map of a fresh node (an upgrade keeps the old map and its size).
    pub const SNAT_LEGACY: u32 = 1024;
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

/// Value of the LRU SNAT map of layout version 1 (`map_names::SNAT_LEGACY`), whose key is
/// the reply's 5-tuple as it arrives (backend → SNAT address and port): the client and
/// frontend to restore. This version records SNATed flows in the SNAT table (`NatBucket`);
/// it reads these entries only for the flows an older datapath made, and writes them only
/// while that datapath's programs may still run (`CONFIG_F_SNAT_LEGACY_TOO`).
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

/// Legacy SNAT entry states.
pub const SNAT_NEW: u8 = 0;
pub const SNAT_ESTABLISHED: u8 = 1;
pub const SNAT_CLOSING: u8 = 2;

/// Default idle timeouts of tracked flows (flow-table slots and SNAT entries), in seconds;
/// `Config::timeouts` overrides each (0 = the default). Why each is safe is said at each.
pub mod timeout {
    /// TCP, no answer yet (kernel conntrack's `SYN_SENT` is 120 s; an unanswered SYN is
    /// retransmitted for at most ~2 min, and each retransmission refreshes the flow).
    pub const TCP_SYN: u32 = 60;
    /// TCP with replies and no FIN or RST: kube-proxy's `--conntrack-tcp-timeout-established`
    /// default (24 h), above the default TCP keepalive interval (2 h) with a wide margin, so
    /// an idle connection survives as it does under kube-proxy.
    pub const TCP_ESTABLISHED: u32 = 24 * 3600;
    /// TCP after a FIN in one direction only: the other side may go on sending
    /// (kube-proxy's `--conntrack-tcp-timeout-close-wait`, 1 h).
    pub const TCP_HALF_CLOSED: u32 = 3600;
    /// A SNATed TCP flow whose backend sent the first FIN: the backend keeps the tuple in
    /// `TIME_WAIT` for 60 s (Linux's `TCP_TIMEWAIT_LEN`) after the client's FIN, and may answer
    /// a SYN on the same tuple with an ACK instead of a SYN-ACK, so the SNAT port waits that
    /// long plus a margin for the coarse clock before another flow to this backend takes it.
    pub const TCP_TIME_WAIT: u32 = 65;
    /// TCP after a RST, or after FINs in both directions where the backend closed second
    /// (it then holds no `TIME_WAIT`: the client does, on its own tuple): kernel conntrack's
    /// `CLOSE` (10 s), long enough for a lost last ACK to be retransmitted.
    pub const TCP_CLOSED: u32 = 10;
    /// UDP unanswered, or answered within its first 2 s (a request/response exchange such
    /// as DNS): kernel conntrack's `nf_conntrack_udp_timeout` (30 s).
    pub const UDP: u32 = 30;
    /// UDP answered and still active 2 s after its first packet (a stream): kernel
    /// conntrack's `nf_conntrack_udp_timeout_stream` (120 s).
    pub const UDP_STREAM: u32 = 120;
    /// A UDP flow is a stream once it sees traffic this long after its first packet.
    pub const UDP_STREAM_AFTER: u32 = 2;
    /// A flow-table slot or legacy SNAT entry that an older datapath marked closing (it did
    /// not say how): that datapath's timeout.
    pub const LEGACY_CLOSING: u32 = 120;
}

/// `Config::timeouts`: idle timeouts in seconds, 0 = the default of [`timeout`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    pub tcp_syn_s: u32,
    pub tcp_established_s: u32,
    pub tcp_half_closed_s: u32,
    pub tcp_time_wait_s: u32,
    pub tcp_closed_s: u32,
    pub udp_s: u32,
    pub udp_stream_s: u32,
    pub _pad: u32,
}

impl Timeouts {
    #[inline(always)]
    const fn or(configured: u32, default: u32) -> u32 {
        if configured == 0 { default } else { configured }
    }
    #[inline(always)]
    #[must_use]
    pub const fn tcp_syn(&self) -> u32 {
        Self::or(self.tcp_syn_s, timeout::TCP_SYN)
    }
    #[inline(always)]
    #[must_use]
    pub const fn tcp_established(&self) -> u32 {
        Self::or(self.tcp_established_s, timeout::TCP_ESTABLISHED)
    }
    #[inline(always)]
    #[must_use]
    pub const fn tcp_half_closed(&self) -> u32 {
        Self::or(self.tcp_half_closed_s, timeout::TCP_HALF_CLOSED)
    }
    #[inline(always)]
    #[must_use]
    pub const fn tcp_time_wait(&self) -> u32 {
        Self::or(self.tcp_time_wait_s, timeout::TCP_TIME_WAIT)
    }
    #[inline(always)]
    #[must_use]
    pub const fn tcp_closed(&self) -> u32 {
        Self::or(self.tcp_closed_s, timeout::TCP_CLOSED)
    }
    #[inline(always)]
    #[must_use]
    pub const fn udp(&self) -> u32 {
        Self::or(self.udp_s, timeout::UDP)
    }
    #[inline(always)]
    #[must_use]
    pub const fn udp_stream(&self) -> u32 {
        Self::or(self.udp_stream_s, timeout::UDP_STREAM)
    }
}

/// An inclusive range of ports (host order); `min == 0` marks an unused entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    #[must_use]
    pub const fn new(min: u16, max: u16) -> Self {
        Self { min, max }
    }

    /// Ports in the range (0 for an unused or inverted one).
    #[must_use]
    pub const fn len(self) -> u32 {
        if self.min == 0 || self.max < self.min {
            0
        } else {
            self.max as u32 - self.min as u32 + 1
        }
    }

    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.len() == 0
    }

    #[must_use]
    pub const fn contains(self, port: u16) -> bool {
        self.min != 0 && port >= self.min && port <= self.max
    }
}

/// At most this many SNAT port ranges.
pub const MAX_SNAT_RANGES: usize = 4;

/// The SNAT port with index `i` (`0..Config::snat_port_count`) of `ranges`, in order.
#[inline(always)]
#[must_use]
pub fn snat_port_at(ranges: &[PortRange; MAX_SNAT_RANGES], mut i: u32) -> Option<u16> {
    let mut k = 0;
    while k < MAX_SNAT_RANGES {
        let r = ranges[k];
        let n = r.len();
        if i < n {
            return Some((r.min as u32 + i) as u16);
        }
        i -= n;
        k += 1;
    }
    None
}

/// SNAT table entry flags (`NatEntry::flags`).
/// A hairpin flow (a pod reaching itself through a Service), SNATed to `HAIRPIN_ADDR`.
pub const NAT_F_HAIRPIN: u8 = 1 << 0;
/// `NatEntry::client_state`, written by the client's packets: a FIN, a RST seen.
pub const NAT_C_FIN: u8 = 1 << 0;
pub const NAT_C_RST: u8 = 1 << 1;
/// `NatEntry::backend_state`, written by the backend's packets (replies): answered, a FIN,
/// a RST, and whether its FIN came after the client's (a passive close: no `TIME_WAIT` at the
/// backend).
pub const NAT_B_REPLIED: u8 = 1 << 0;
pub const NAT_B_FIN: u8 = 1 << 1;
pub const NAT_B_RST: u8 = 1 << 2;
pub const NAT_B_PASSIVE: u8 = 1 << 3;
/// `NatEntry::backend_state`: the backend answered the SYN (the connection was established
/// once). A client's SYN on a flow that is over starts a new flow only then; before, it is
/// the retry of a connect the backend refused (a SYN on a tuple it held in `TIME_WAIT`
/// answered with an ACK, which the client reset), and keeps its port: the reset ended that
/// `TIME_WAIT`.
pub const NAT_B_SYN: u8 = 1 << 4;

/// One SNATed (or hairpin) flow in the SNAT table, found by its reply tuple: the backend's
/// address and port, the SNAT address and port the flow was given, the protocol. It restores
/// the client and frontend on replies, and its presence reserves the SNAT port for that
/// backend. `nat_addr_be == 0` marks a free entry. An entry whose flow has been idle past
/// its state's timeout (see [`timeout`]) may be taken by a new flow; a live one never is,
/// so no flow loses its port while it lives.
///
/// Both directions write only their own bytes without the bucket's lock (`client_state`,
/// `backend_state`, `last_seen_s`), so neither undoes the other's; everything else is
/// written by the holder of the bucket's lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NatEntry {
    pub backend_addr_be: u32,
    pub nat_addr_be: u32, // the SNAT address (or HAIRPIN_ADDR); 0 = free
    pub client_addr_be: u32,
    pub frontend_addr_be: u32,
    pub backend_port_be: u16,
    pub nat_port_be: u16,
    pub client_port_be: u16,
    pub frontend_port_be: u16,
    pub service_id: u32,
    pub created_s: u32,   // coarse seconds since boot
    pub last_seen_s: u32, // refreshed by both directions, at most once a second
    pub proto: u8,
    pub client_state: u8,  // NAT_C_*
    pub backend_state: u8, // NAT_B_*
    pub flags: u8,         // NAT_F_*
}

impl NatEntry {
    /// How long this flow may be idle in its state before its port may be reused (see
    /// [`timeout`] for why each is safe). The datapath and the agent's fill counts share it.
    #[inline(always)]
    #[must_use]
    pub const fn timeout(&self, t: &Timeouts) -> u32 {
        let (c, b) = (self.client_state, self.backend_state);
        if self.proto != IPPROTO_TCP {
            let stream = b & NAT_B_REPLIED != 0
                && self.last_seen_s.wrapping_sub(self.created_s) >= timeout::UDP_STREAM_AFTER;
            return if stream { t.udp_stream() } else { t.udp() };
        }
        if c & NAT_C_RST != 0 || b & NAT_B_RST != 0 {
            t.tcp_closed()
        } else if c & NAT_C_FIN != 0 && b & NAT_B_FIN != 0 {
            if b & NAT_B_PASSIVE != 0 {
                t.tcp_closed()
            } else {
                t.tcp_time_wait()
            }
        } else if c & NAT_C_FIN != 0 || b & NAT_B_FIN != 0 {
            t.tcp_half_closed()
        } else if b & NAT_B_REPLIED != 0 {
            t.tcp_established()
        } else {
            t.tcp_syn()
        }
    }

    /// Whether the entry's TCP flow is over (a RST, or FINs both ways) though its close time
    /// may run still: when every port of a backend is held, a new flow may take such a port
    /// early rather than be refused (see `lb-ebpf/src/snat.rs`).
    #[inline(always)]
    #[must_use]
    pub const fn finished(&self) -> bool {
        let (c, b) = (self.client_state, self.backend_state);
        self.proto == IPPROTO_TCP
            && (c & NAT_C_RST != 0
                || b & NAT_B_RST != 0
                || (c & NAT_C_FIN != 0 && b & NAT_B_FIN != 0))
    }

    /// Whether the entry is free, or its flow has been idle past its state's timeout (at
    /// coarse second `now`), so a new flow may take it.
    #[inline(always)]
    #[must_use]
    pub const fn expired(&self, now: u32, t: &Timeouts) -> bool {
        self.nat_addr_be == 0 || now.wrapping_sub(self.last_seen_s) > self.timeout(t)
    }
}

/// One bucket of the SNAT table: an array map (memory-mappable) of 128-byte buckets. The
/// bucket of a reply tuple is `hash::nat_bucket(backend, backend port, protocol, SNAT
/// address) + SNAT port`, masked to the table size, so one backend's consecutive ports sit
/// in consecutive buckets and a new flow, which takes its backend's next port, touches
/// memory its predecessor just touched. `header` is a sequence number and lock as in
/// [`FlowBucket`] (no overflow bit: a full bucket makes a new flow try its next port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NatBucket {
    pub header: u64,
    pub entries: [NatEntry; FLOW_WAYS],
}

/// `Config::flags`: also record every new flow in the LRU conntrack map, as a datapath
/// without the flow table does: set while such a datapath's programs may still run on some
/// interface (an upgrade from it is under way), so they find the flows the new ones make.
pub const CONFIG_F_CONNTRACK_TOO: u32 = 1 << 0;
/// `Config::flags`: the legacy LRU SNAT map holds flows of an older datapath: replies that
/// the SNAT table does not know are looked up there too.
pub const CONFIG_F_SNAT_LEGACY: u32 = 1 << 1;
/// `Config::flags`: the older datapath's programs may still run: new SNATed flows take
/// ports of its range (`Config::legacy_ports`), reserved in the legacy map as well, so
/// those programs translate their replies and never hand the same port to another flow.
pub const CONFIG_F_SNAT_LEGACY_TOO: u32 = 1 << 2;

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

/// Index of the NIC's new-flow program in the program table: the NIC program hands a packet
/// that starts a flow to a frontend to it (a tail call), so the verifier checks each part of
/// the NIC's path once rather than every way into the new-flow part. The new-flow program
/// looks the frontend up again: it may be a newer agent's program (the table is pinned and
/// takes the newest at once), and nothing but the packet passes between the two.
pub const PROG_INDEX_NIC_NEW: u32 = 0;
/// Index of the pod interfaces' new-flow program in their program table (as for the NIC).
pub const PROG_INDEX_POD_NEW: u32 = 0;
/// Entries of each program table.
pub const PROG_COUNT: u32 = 1;

/// Maximum node addresses the datapath knows of.
pub const MAX_NODE_ADDRS: usize = 8;

/// The single entry of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    pub snat_addr_be: u32,    // source address for SNATed flows (0 = SNAT disabled)
    pub node_addr_count: u32, // valid entries in node_addrs_be
    pub flags: u32,           // CONFIG_F_*
    pub snat_range_count: u32, // valid entries in snat_ranges
    pub node_addrs_be: [u32; MAX_NODE_ADDRS],
    /// The SNAT port ranges new flows take ports from (in order; see `snat_port_at`).
    pub snat_ranges: [PortRange; MAX_SNAT_RANGES],
    pub snat_port_count: u32, // ports in snat_ranges, summed
    /// The port range of the older datapath whose flows the legacy LRU SNAT map holds
    /// (`CONFIG_F_SNAT_LEGACY`): replies arrive on it too.
    pub legacy_ports: PortRange,
    pub timeouts: Timeouts,
    /// The agent's record of the ranges it added to the node's `ip_local_reserved_ports`
    /// (so `xlb cleanup` removes exactly those); the datapath does not read it.
    pub reserved_ports: [PortRange; MAX_SNAT_RANGES],
}

impl Config {
    /// Whether `port` is one SNATed replies may arrive on: in a SNAT range, or in the
    /// legacy range while the legacy map is looked up.
    #[inline(always)]
    #[must_use]
    pub fn is_snat_port(&self, port: u16) -> bool {
        let mut k = 0;
        while k < MAX_SNAT_RANGES {
            if self.snat_ranges[k].contains(port) {
                return true;
            }
            k += 1;
        }
        self.flags & CONFIG_F_SNAT_LEGACY != 0 && self.legacy_ports.contains(port)
    }
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
    /// A new flow's program (tail-called) was missing or refused the handover: dropped.
    /// Never expected; a load that could not fill the program table fails instead.
    DropNoProgram = 14,
}

impl Verdict {
    pub const COUNT: u32 = 15;
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
        Verdict::DropNoProgram,
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
            Verdict::DropNoProgram => "drop_no_program",
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
    /// A new SNATed flow took a port whose previous flow to the same backend was over.
    SnatPortReused = 4,
    /// A client's SYN met its own port's finished flow: a new flow was started.
    FlowRestarted = 5,
    /// Every SNAT port tried was held: a new flow took the port of a finished flow whose
    /// close time still ran (a tuple the backend may hold in `TIME_WAIT`).
    SnatPortTakenEarly = 6,
    /// A new flow found every slot of its flow-table bucket held by a live flow: it was
    /// recorded in the LRU conntrack map, which evicts its least recently used entry when full.
    FlowOverflow = 7,
}

impl Event {
    pub const COUNT: u32 = 8;
    pub const ALL: [Event; Self::COUNT as usize] = [
        Event::SockTranslated,
        Event::SockNoBackend,
        Event::AffinityHit,
        Event::AffinityNew,
        Event::SnatPortReused,
        Event::FlowRestarted,
        Event::SnatPortTakenEarly,
        Event::FlowOverflow,
    ];

    /// Metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Event::SockTranslated => "sock_translated",
            Event::SockNoBackend => "sock_no_backend",
            Event::AffinityHit => "affinity_hit",
            Event::AffinityNew => "affinity_new",
            Event::SnatPortReused => "snat_port_reused",
            Event::FlowRestarted => "flow_restarted",
            Event::SnatPortTakenEarly => "snat_port_taken_early",
            Event::FlowOverflow => "flow_overflow",
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
/// `FlowSlot::state`: a FIN or RST was seen (what a datapath of layout version 1 records;
/// this one sets it with the bits below, which say what was seen). A client's SYN on a slot
/// marked closing starts a new flow: the client reused its port for a new connection, which
/// is balanced anew (and, SNATed, gets a new SNAT port), as conntrack does for a SYN that
/// meets an entry in `TIME_WAIT`.
pub const FLOW_S_CLOSING: u8 = 1 << 1;
/// `FlowSlot::state`: a FIN from the client was seen.
pub const FLOW_S_FIN_CLIENT: u8 = 1 << 2;
/// `FlowSlot::state`: a FIN from the backend was seen (for SNATed flows: copied from their
/// SNAT entry, which the backend's packets update).
pub const FLOW_S_FIN_BACKEND: u8 = 1 << 3;
/// `FlowSlot::state`: a RST was seen (either direction).
pub const FLOW_S_RST: u8 = 1 << 4;

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

impl FlowSlot {
    /// How long this flow may be idle in its state before its slot may be given to another
    /// flow: the SNAT table's rules as far as a slot knows its flow (a SNATed flow's port is
    /// kept by its SNAT entry, not by its slot).
    #[inline(always)]
    #[must_use]
    pub const fn timeout(&self, t: &Timeouts) -> u32 {
        let st = self.state;
        let both_fins = FLOW_S_FIN_CLIENT | FLOW_S_FIN_BACKEND;
        if self.proto != IPPROTO_TCP {
            if st & FLOW_S_REPLIED != 0 {
                t.udp_stream()
            } else {
                t.udp()
            }
        } else if st & FLOW_S_RST != 0 || st & both_fins == both_fins {
            t.tcp_closed()
        } else if st & both_fins != 0 {
            t.tcp_half_closed()
        } else if st & FLOW_S_CLOSING != 0 {
            timeout::LEGACY_CLOSING
        } else if st & FLOW_S_REPLIED == 0 {
            t.tcp_syn()
        } else {
            t.tcp_established()
        }
    }
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
assert_layout!(Config, 120, 4);
assert_offset!(Config, node_addrs_be, 16);
assert_offset!(Config, snat_ranges, 48);
assert_offset!(Config, snat_port_count, 64);
assert_offset!(Config, legacy_ports, 68);
assert_offset!(Config, timeouts, 72);
assert_offset!(Config, reserved_ports, 104);
assert_layout!(Timeouts, 32, 4);
assert_layout!(PortRange, 4, 2);
assert_layout!(NatEntry, 40, 4);
assert_offset!(NatEntry, nat_addr_be, 4);
assert_offset!(NatEntry, backend_port_be, 16);
assert_offset!(NatEntry, nat_port_be, 18);
assert_offset!(NatEntry, service_id, 24);
assert_offset!(NatEntry, created_s, 28);
assert_offset!(NatEntry, last_seen_s, 32);
assert_offset!(NatEntry, proto, 36);
assert_offset!(NatEntry, client_state, 37);
assert_offset!(NatEntry, backend_state, 38);
assert_offset!(NatEntry, flags, 39);
assert_layout!(NatBucket, 128, 8);
assert_offset!(NatBucket, entries, 8);
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
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::NatBucket {}
    unsafe impl aya::Pod for super::PortRange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(client_state: u8, backend_state: u8) -> NatEntry {
        NatEntry {
            nat_addr_be: 1,
            proto: IPPROTO_TCP,
            client_state,
            backend_state,
            ..NatEntry::default()
        }
    }

    #[test]
    fn each_close_holds_its_snat_port_for_its_time() {
        let t = Timeouts::default();
        let r = NAT_B_REPLIED;
        for (what, e, secs, finished) in [
            ("unanswered SYN", tcp(0, 0), 60, false),
            ("established", tcp(0, r), 24 * 3600, false),
            ("client FIN only", tcp(NAT_C_FIN, r), 3600, false),
            ("backend FIN only", tcp(0, r | NAT_B_FIN), 3600, false),
            ("backend first", tcp(NAT_C_FIN, r | NAT_B_FIN), 65, true),
            (
                "client first",
                tcp(NAT_C_FIN, r | NAT_B_FIN | NAT_B_PASSIVE),
                10,
                true,
            ),
            ("client RST", tcp(NAT_C_RST, r), 10, true),
            ("backend RST", tcp(0, r | NAT_B_RST), 10, true),
        ] {
            assert_eq!(e.timeout(&t), secs, "{what}");
            assert_eq!(e.finished(), finished, "{what}");
            assert!(!e.expired(secs, &t), "{what}: expired at its time");
            assert!(e.expired(secs + 1, &t), "{what}: not expired after it");
        }
        let udp = |b, created, last| NatEntry {
            nat_addr_be: 1,
            proto: IPPROTO_UDP,
            backend_state: b,
            created_s: created,
            last_seen_s: last,
            ..NatEntry::default()
        };
        assert_eq!(udp(0, 100, 150).timeout(&t), 30, "unanswered");
        assert_eq!(udp(r, 100, 101).timeout(&t), 30, "an exchange");
        assert_eq!(udp(r, 100, 102).timeout(&t), 120, "a stream");
        assert!(!udp(r, 100, 102).finished());
        assert!(NatEntry::default().expired(0, &t), "a free entry");
        let custom = Timeouts {
            tcp_time_wait_s: 240,
            ..Timeouts::default()
        };
        assert_eq!(tcp(NAT_C_FIN, r | NAT_B_FIN).timeout(&custom), 240);
    }

    #[test]
    fn snat_ports_are_numbered_through_the_ranges() {
        let mut ranges = [PortRange::default(); MAX_SNAT_RANGES];
        ranges[0] = PortRange::new(1024, 29999);
        ranges[1] = PortRange::new(61000, 65535);
        assert_eq!(snat_port_at(&ranges, 0), Some(1024));
        assert_eq!(snat_port_at(&ranges, 28_975), Some(29999));
        assert_eq!(snat_port_at(&ranges, 28_976), Some(61000));
        assert_eq!(snat_port_at(&ranges, 33_511), Some(65535));
        assert_eq!(snat_port_at(&ranges, 33_512), None);
        let c = Config {
            snat_ranges: ranges,
            legacy_ports: PortRange::new(50000, 50009),
            ..Config::default()
        };
        assert!(c.is_snat_port(1024) && c.is_snat_port(65535) && !c.is_snat_port(32510));
        assert!(!c.is_snat_port(50000), "the legacy range without its flag");
        let legacy = Config {
            flags: CONFIG_F_SNAT_LEGACY,
            ..c
        };
        assert!(legacy.is_snat_port(50000));
    }
}
