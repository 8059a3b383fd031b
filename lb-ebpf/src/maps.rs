//! The datapath's maps; layouts and names come from lb-common. Sizes here are defaults; the
//! agent sets each capacity at load time.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, Config, Counter, CtEntry, Event, FlowBucket, FlowKey,
    Frontend, FrontendKey, HostRouting, NatBucket, PROG_COUNT, RING_LANES, RingChunk, SnatEntry,
    SockKey, SockRevNat, Verdict, capacity,
};

/// Frontends: (address, port, protocol, scope) → the service's Maglev ring region.
#[map(name = "xlb_frontends_v2")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> =
    HashMap::with_max_entries(capacity::FRONTENDS, 0);

/// Backends by id (id 0 is "none").
#[map(name = "xlb_backends_v2")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(capacity::BACKENDS, 0);

/// Maglev ring slab: backend ids; each frontend owns a region of it. Memory-mappable, so
/// the agent writes whole regions with plain stores instead of one syscall per slot.
#[map(name = "xlb_rings_v2")]
pub static RINGS: Array<RingChunk> =
    Array::with_max_entries(capacity::RING_SLOTS / RING_LANES, BPF_F_MMAPABLE);

const BPF_F_MMAPABLE: u32 = 1 << 10;

/// The flow table: conntrack's fast path, one slot per flow for both directions (see
/// `lb_common::FlowBucket`). Memory-mappable: the agent reads and marks buckets in place.
#[map(name = "xlb_flows_v2")]
pub static FLOWS: Array<FlowBucket> =
    Array::with_max_entries(capacity::FLOW_BUCKETS, BPF_F_MMAPABLE);

/// Connection tracking for the flows whose flow-table bucket was full, and those of a
/// previous version's datapath: forward entries pin a flow to its backend, reverse entries
/// reverse-translate the replies.
#[map(name = "xlb_ct_v2")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(capacity::CONNTRACK, 0);

/// The SNAT table: SNATed and hairpin flows by their reply tuple; an entry is also the
/// reservation of its SNAT port for its backend (see `lb_common::NatBucket`).
/// Memory-mappable: the agent counts and reads entries in place.
#[map(name = "xlb_nat_v2")]
pub static NAT: Array<NatBucket> = Array::with_max_entries(capacity::NAT_BUCKETS, BPF_F_MMAPABLE);

/// Per backend id: the index (in the SNAT ranges) of the port its next SNATed flow tries
/// first; 0 = start from the flow hash.
#[map(name = "xlb_nat_cursors_v2")]
pub static NAT_CURSORS: Array<u32> = Array::with_max_entries(capacity::BACKENDS, 0);

/// Ports new SNATed flows must not take (bit `p % 64` of word `p / 64`): frontends on the
/// node's addresses, sockets the node's processes bound, the older datapath's range while
/// its flows live. Written by the agent.
#[map(name = "xlb_nat_excluded_v2")]
pub static NAT_EXCLUDED: Array<u64> = Array::with_max_entries(1024, 0);

/// The LRU SNAT map of a datapath of layout version 1, taken over at an upgrade (its flows'
/// replies are found there); small and unused on a fresh node.
#[map(name = "xlb_snat_lru_v2")]
pub static SNAT_LEGACY: LruHashMap<FlowKey, SnatEntry> =
    LruHashMap::with_max_entries(capacity::SNAT_LEGACY, 0);

/// Packets and bytes per verdict, per CPU (index: `Verdict as u32`).
#[map(name = "xlb_stats_v2")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Verdict::COUNT, 0);

/// Packets and bytes per service (index: the frontend's service id), per CPU. Sized like the
/// frontends map (a service has at least one frontend).
#[map(name = "xlb_svc_stats_v2")]
pub static SERVICE_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(capacity::FRONTENDS, 0);

/// Node configuration (one entry): SNAT address and port range.
#[map(name = "xlb_config_v2")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Sockets that socket-level load balancing pointed at a backend → the frontend they asked
/// for, so the peer address a process reads back is the one it connected to.
#[map(name = "xlb_sock_revnat_v2")]
pub static SOCK_REVNAT: LruHashMap<SockKey, SockRevNat> =
    LruHashMap::with_max_entries(capacity::SOCK_REVNAT, 0);

/// Session affinity (`sessionAffinity: ClientIP`): a client's backend per service port and
/// scope, kept while the client opens connections within the Service's timeout.
#[map(name = "xlb_affinity_v2")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);

/// Counts of datapath decisions that are not per-packet verdicts, per CPU (index:
/// `Event as u32`).
#[map(name = "xlb_events_v2")]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Event::COUNT, 0);

/// The network namespace (its cookie) whose sockets socket-level load balancing translates:
/// the host's, where the agent runs. 0 = any (not written yet).
#[map(name = "xlb_sock_netns_v2")]
pub static SOCK_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// BPF host routing: the pod interfaces (ifindex → 1) that the NIC's TC program may hand a
/// translated frame to with `bpf_redirect_peer`; the agent keeps it to the interfaces it
/// attached to (veth or netkit devices, whose peer is in the pod).
#[map(name = "xlb_pod_ifaces_v2")]
pub static POD_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(capacity::POD_IFACES, 0);

/// BPF host routing counters, per CPU (index: `HostRouting as u32`).
#[map(name = "xlb_host_routing_v2")]
pub static HOST_ROUTING: PerCpuArray<u64> = PerCpuArray::with_max_entries(HostRouting::COUNT, 0);

/// The programs the NIC program tail-calls (index: `PROG_INDEX_NIC_*`); the loader fills it.
#[map(name = "xlb_nic_progs_v2")]
pub static NIC_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROG_COUNT, 0);

/// The programs the pod program tail-calls (index: `PROG_INDEX_POD_*`).
#[map(name = "xlb_pod_progs_v2")]
pub static POD_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROG_COUNT, 0);
