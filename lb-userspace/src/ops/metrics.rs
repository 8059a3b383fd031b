//! The agent's Prometheus metrics, encoded in the Prometheus text format (0.0.4) and served at
//! `/metrics` by [`crate::ops::http`]. The sync loop reports each sync ([`Metrics::observe_sync`])
//! and what is attached; the datapath's verdict counters are read from the per-CPU stats map
//! at scrape time. Conntrack and SNAT fill levels are not counted at scrape time: the kernel
//! keeps no entry count a syscall can read, and walking a full 1 Mi-entry map takes a million
//! syscalls (one per key), too slow for a scrape and the agent's single thread. So a scrape
//! asks a background thread for a walk (at most one per [`WALK_INTERVAL`]) and reports the
//! count of the last walk that finished. Per-service packets and bytes come from the datapath's
//! per-service counters (indexed by the programmer's service ids), named after the last sync.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        mpsc::{self, SyncSender},
    },
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, Pod,
    maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray},
};
use lb_common::{
    Counter as VerdictCounter, CtEntry, Event, FlowKey, HostRouting, Verdict, map_names,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, prometheus_text},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tracing::warn;

use crate::{control::invalid::Invalid, datapath::loader::Capacities};

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Shortest time between two walks of the conntrack and SNAT maps.
pub const WALK_INTERVAL: Duration = Duration::from_secs(30);

/// `map` label values of `xlb_map_entries` and `xlb_map_capacity`.
pub mod map_label {
    pub const FRONTENDS: &str = "frontends";
    pub const BACKENDS: &str = "backends";
    pub const RING_SLOTS: &str = "ring_slots";
    pub const CONNTRACK: &str = "conntrack";
    pub const SNAT: &str = "snat";
    /// Slots of the flow table (flows; conntrack holds those of full buckets).
    pub const FLOWS: &str = "flows";
    /// The socket-level load balancer's reverse translations (one per translated socket and
    /// backend; a connected socket's goes when it closes).
    pub const SOCKETS: &str = "sockets";
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("map {0} is missing from the datapath")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Flows(#[from] crate::datapath::flows::FlowsError),
    #[error("starting the map walker thread")]
    Thread(#[source] std::io::Error),
}

/// The datapath's verdict counters, summed over CPUs.
pub trait VerdictCounters: Send + Sync + 'static {
    fn read(&self) -> Result<Vec<(Verdict, VerdictCounter)>, MetricsError>;
}

impl VerdictCounters for PerCpuArray<MapData, VerdictCounter> {
    fn read(&self) -> Result<Vec<(Verdict, VerdictCounter)>, MetricsError> {
        Verdict::ALL
            .iter()
            .map(|&v| {
                let per_cpu = self
                    .get(&(v as u32), 0)
                    .map_err(|source| MetricsError::Map {
                        name: map_names::STATS,
                        source,
                    })?;
                let sum = per_cpu
                    .iter()
                    .fold(VerdictCounter::default(), |acc, c| VerdictCounter {
                        packets: acc.packets.wrapping_add(c.packets),
                        bytes: acc.bytes.wrapping_add(c.bytes),
                    });
                Ok((v, sum))
            })
            .collect()
    }
}

/// The datapath's event counts (socket-level load balancing, session affinity), summed over
/// CPUs.
pub trait EventCounters: Send + Sync + 'static {
    /// (label, count) pairs.
    fn read(&self) -> Result<Vec<(&'static str, u64)>, MetricsError>;
}

/// The event map and the BPF host-routing counters: both are events by the metric's label.
struct EventMaps {
    events: PerCpuArray<MapData, u64>,
    routing: PerCpuArray<MapData, u64>,
}

fn per_cpu_sum(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
    index: u32,
) -> Result<u64, MetricsError> {
    let per_cpu = map
        .get(&index, 0)
        .map_err(|source| MetricsError::Map { name, source })?;
    Ok(per_cpu.iter().fold(0u64, |a, n| a.wrapping_add(*n)))
}

impl EventCounters for EventMaps {
    fn read(&self) -> Result<Vec<(&'static str, u64)>, MetricsError> {
        let events = Event::ALL.iter().map(|&e| {
            per_cpu_sum(&self.events, map_names::EVENTS, e as u32).map(|n| (e.name(), n))
        });
        let routing = HostRouting::ALL.iter().map(|&h| {
            per_cpu_sum(&self.routing, map_names::HOST_ROUTING, h as u32).map(|n| (h.name(), n))
        });
        events.chain(routing).collect()
    }
}

/// The datapath's per-service counters, summed over CPUs.
pub trait ServiceCounters: Send + Sync + 'static {
    /// Counters of service `id`.
    fn read(&self, id: u32) -> Result<VerdictCounter, MetricsError>;
}

impl ServiceCounters for PerCpuArray<MapData, VerdictCounter> {
    fn read(&self, id: u32) -> Result<VerdictCounter, MetricsError> {
        let per_cpu = self.get(&id, 0).map_err(|source| MetricsError::Map {
            name: map_names::SERVICE_STATS,
            source,
        })?;
        Ok(per_cpu
            .iter()
            .fold(VerdictCounter::default(), |acc, c| VerdictCounter {
                packets: acc.packets.wrapping_add(c.packets),
                bytes: acc.bytes.wrapping_add(c.bytes),
            }))
    }
}

/// Service names by the ids the datapath counts under, as of the last sync.
pub type ServiceNames = Arc<Mutex<Vec<(String, u32)>>>;

/// A map whose entries can be counted (by walking its keys).
pub trait CountEntries: Send + 'static {
    /// The number of entries, walking at most `limit` keys.
    fn count(&self, limit: u64) -> Result<u64, MapError>;
}

impl<K: Pod + Send, V: Pod + Send> CountEntries for BpfHashMap<MapData, K, V> {
    fn count(&self, limit: u64) -> Result<u64, MapError> {
        let mut n = 0;
        for key in self.keys() {
            key?;
            n += 1;
            if n >= limit {
                break;
            }
        }
        Ok(n)
    }
}

impl CountEntries for crate::datapath::flows::FlowTable {
    fn count(&self, limit: u64) -> Result<u64, MapError> {
        self.used(limit).map_err(|e| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error: std::io::Error::other(e),
            })
        })
    }
}

/// Where the metrics read the running datapath: the stats map, and the flow table and
/// conntrack map to count (the SNAT table is counted by the agent's SNAT upkeep, see
/// [`Metrics::set_snat_fill`]).
pub struct DatapathSources {
    pub verdicts: Box<dyn VerdictCounters>,
    pub events: Box<dyn EventCounters>,
    pub services: Box<dyn ServiceCounters>,
    pub flows: Box<dyn CountEntries>,
    pub conntrack: Box<dyn CountEntries>,
    pub sockets: Box<dyn CountEntries>,
}

impl DatapathSources {
    /// Opens second handles (by map id) on the maps of a loaded datapath, so `ebpf` keeps its
    /// own and nothing else has to know about the metrics.
    pub fn open(ebpf: &Ebpf) -> Result<Self, MetricsError> {
        let err = |name| move |source| MetricsError::Map { name, source };
        let verdicts: PerCpuArray<MapData, VerdictCounter> =
            PerCpuArray::try_from(reopen(ebpf, map_names::STATS)?)
                .map_err(err(map_names::STATS))?;
        let events = EventMaps {
            events: PerCpuArray::try_from(reopen(ebpf, map_names::EVENTS)?)
                .map_err(err(map_names::EVENTS))?,
            routing: PerCpuArray::try_from(reopen(ebpf, map_names::HOST_ROUTING)?)
                .map_err(err(map_names::HOST_ROUTING))?,
        };
        let services: PerCpuArray<MapData, VerdictCounter> =
            PerCpuArray::try_from(reopen(ebpf, map_names::SERVICE_STATS)?)
                .map_err(err(map_names::SERVICE_STATS))?;
        let conntrack: BpfHashMap<MapData, FlowKey, CtEntry> =
            BpfHashMap::try_from(reopen(ebpf, map_names::CONNTRACK)?)
                .map_err(err(map_names::CONNTRACK))?;
        let sockets: BpfHashMap<MapData, lb_common::SockKey, lb_common::SockRevNat> =
            BpfHashMap::try_from(reopen(ebpf, map_names::SOCK_REVNAT)?)
                .map_err(err(map_names::SOCK_REVNAT))?;
        Ok(Self {
            sockets: Box::new(sockets),
            verdicts: Box::new(verdicts),
            events: Box::new(events),
            services: Box::new(services),
            flows: Box::new(crate::datapath::flows::FlowTable::open(ebpf)?),
            conntrack: Box::new(conntrack),
        })
    }
}

/// A new handle on map `name` of `ebpf`, as the same variant.
fn reopen(ebpf: &Ebpf, name: &'static str) -> Result<Map, MetricsError> {
    let err = |source| MetricsError::Map { name, source };
    let map = ebpf.map(name).ok_or(MetricsError::Missing(name))?;
    let (data, wrap): (&MapData, fn(MapData) -> Map) = match map {
        Map::PerCpuArray(d) => (d, Map::PerCpuArray),
        Map::LruHashMap(d) => (d, Map::LruHashMap),
        Map::HashMap(d) => (d, Map::HashMap),
        _ => return Err(MetricsError::Missing(name)),
    };
    let id = data.info().map_err(err)?.id();
    Ok(wrap(MapData::from_id(id).map_err(err)?))
}

/// Encodes the datapath's verdict and per-service counters at scrape time.
struct DatapathCollector {
    verdicts: Box<dyn VerdictCounters>,
    events: Box<dyn EventCounters>,
    services: Box<dyn ServiceCounters>,
    names: ServiceNames,
}

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let counters = match self.verdicts.read() {
            Ok(c) => c,
            Err(e) => {
                // The scrape goes on without these series; the next one tries again.
                warn!(error = %e, "reading the datapath's counters failed");
                return Ok(());
            }
        };
        encode_verdicts(
            &mut encoder,
            "xlb_datapath_packets",
            "Packets the datapath handled, by verdict (drop reasons included), summed over CPUs.",
            counters.iter().map(|(v, c)| (*v, c.packets)),
        )?;
        encode_verdicts(
            &mut encoder,
            "xlb_datapath_bytes",
            "Bytes of the packets the datapath handled, by verdict, summed over CPUs.",
            counters.iter().map(|(v, c)| (*v, c.bytes)),
        )?;
        match self.events.read() {
            Ok(events) => {
                let mut family = encoder.encode_descriptor(
                    "xlb_datapath_events",
                    "Datapath decisions that are not per-packet verdicts (socket-level load \
                     balancing of the node's own processes, session affinity, BPF host \
                     routing), summed over CPUs.",
                    None,
                    MetricType::Counter,
                )?;
                for (e, n) in events {
                    let labels = [("event", e)];
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
            Err(e) => warn!(error = %e, "reading the datapath's event counters failed"),
        }
        let names = self
            .names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let per_service: Vec<(String, VerdictCounter)> = names
            .into_iter()
            .filter_map(|(name, id)| self.services.read(id).ok().map(|c| (name, c)))
            .collect();
        for (metric, help, pick) in [
            (
                "xlb_service_packets",
                "Packets the datapath translated for a service port (both directions)",
                (|c: &VerdictCounter| c.packets) as fn(&VerdictCounter) -> u64,
            ),
            (
                "xlb_service_bytes",
                "Bytes the datapath translated for a service port (both directions)",
                |c: &VerdictCounter| c.bytes,
            ),
        ] {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
            for (name, c) in &per_service {
                let labels = [("service", name.as_str())];
                ConstCounter::new(pick(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// One counter family with a `verdict` label.
fn encode_verdicts(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (Verdict, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (verdict, value) in values {
        let labels = [("verdict", verdict.name())];
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A map that the walker thread counts.
struct Walked {
    label: &'static str,
    capacity: u64,
    map: Box<dyn CountEntries>,
}

/// The background thread that counts the entries of the conntrack and SNAT maps on request.
struct MapWalker {
    request: SyncSender<()>,
}

impl MapWalker {
    fn spawn(
        maps: Vec<Walked>,
        entries: Family<MapLabels, Gauge>,
        rest: Duration,
    ) -> Result<Self, MetricsError> {
        // One pending request at most: scrapes during a walk or a rest ask for one more walk.
        let (request, requests) = mpsc::sync_channel::<()>(1);
        thread::Builder::new()
            .name("xlb-map-walk".into())
            .spawn(move || {
                while requests.recv().is_ok() {
                    for m in &maps {
                        // An LRU map may evict the key a walk stands on, and the kernel then
                        // starts over from the first key: bound the walk, clamp the count.
                        match m.map.count(m.capacity.saturating_mul(2)) {
                            Ok(n) => {
                                let n = i64::try_from(n.min(m.capacity)).unwrap_or(i64::MAX);
                                entries.get_or_create(&[("map", m.label)]).set(n);
                            }
                            Err(e) => warn!(map = m.label, error = %e, "counting entries failed"),
                        }
                    }
                    thread::sleep(rest);
                }
            })
            .map_err(MetricsError::Thread)?;
        Ok(Self { request })
    }

    /// Asks for a walk unless one is already pending.
    fn request(&self) {
        // Full: a walk is pending. Disconnected: the thread is gone and logged why.
        let _ = self.request.try_send(());
    }
}

type MapLabels = [(&'static str, &'static str); 1];
type InvalidLabels = [(&'static str, &'static str); 2];

/// One refused object, as `xlb_invalid_objects_total` tells them apart.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InvalidId {
    kind: &'static str,
    reason: &'static str,
    namespace: String,
    name: String,
}

/// What one sync did.
#[derive(Clone, Debug)]
pub struct SyncReport<'a> {
    /// How long the sync took (model, plan and map writes).
    pub took: Duration,
    /// When a source saw the oldest change this sync programmed (`None`: no change).
    pub changed_at: Option<Instant>,
    /// When the sync's last map write returned.
    pub programmed_at: Instant,
    /// Map writes that failed.
    pub errors: usize,
    /// Services the programmer could not fit into the maps.
    pub failed_services: usize,
    /// Objects refused by the sources and the model.
    pub invalid: &'a [Invalid],
    pub frontends: usize,
    pub backends: usize,
    pub ring_slots: u64,
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    syncs: Counter,
    sync_errors: Counter,
    sync_duration: Histogram,
    programming_duration: Histogram,
    invalid_total: Family<InvalidLabels, Counter>,
    invalid_current: Family<InvalidLabels, Gauge>,
    failed_services: Gauge,
    overflowed_buckets: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    attached: Family<MapLabels, Gauge>,
    pins_repaired: Family<MapLabels, Counter>,
    snat: SnatMetrics,
    /// Refused objects of the previous sync, with how many records each had.
    invalid_seen: Mutex<BTreeMap<InvalidId, usize>>,
    walker: Option<MapWalker>,
    service_names: ServiceNames,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The attachment metrics: attached interfaces per hook, and pins repaired per kind.
fn register_attachments(
    registry: &mut Registry,
) -> (Family<MapLabels, Gauge>, Family<MapLabels, Counter>) {
    let attached = Family::<MapLabels, Gauge>::default();
    registry.register(
        "xlb_attached_interfaces",
        "Interfaces the datapath is attached to: xdp on NICs, tc on pod interfaces",
        attached.clone(),
    );
    for hook in ["xdp", "tc"] {
        attached.get_or_create(&[("hook", hook)]).set(0);
    }
    let pins_repaired = Family::<MapLabels, Counter>::default();
    registry.register(
        "xlb_pins_repaired",
        "Pins of the running datapath found removed and pinned again, by kind (map, link)",
        pins_repaired.clone(),
    );
    for kind in ["map", "link"] {
        drop(pins_repaired.get_or_create(&[("kind", kind)]));
    }
    (attached, pins_repaired)
}

impl Metrics {
    /// The metrics of an agent with maps of `caps`; with `datapath`, also what the running
    /// datapath counts.
    pub fn new(caps: &Capacities, datapath: Option<DatapathSources>) -> Result<Self, MetricsError> {
        // Help texts end without a period: the registry adds one.
        let mut registry = Registry::default();
        let syncs = Counter::default();
        registry.register(
            "xlb_syncs",
            "Syncs: the changed Services translated and the difference written to the maps",
            syncs.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "xlb_sync_errors",
            "Map writes that failed during syncs",
            sync_errors.clone(),
        );
        // 1 ms .. 16 s.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register_with_unit(
            "xlb_sync_proxy_rules_duration",
            "Duration of one sync (model, plan and map writes)",
            Unit::Seconds,
            sync_duration.clone(),
        );
        // 5 ms .. 82 s: includes the debounce and any wait for the sync loop.
        let programming_duration = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        registry.register_with_unit(
            "xlb_network_programming_duration",
            "Time from a change seen by a source (Kubernetes API watch or manifest files) \
             to the datapath's maps holding it",
            Unit::Seconds,
            programming_duration.clone(),
        );
        let invalid_total = Family::<InvalidLabels, Counter>::default();
        registry.register(
            "xlb_invalid_objects",
            "Objects refused by the agent, counted once each time an object becomes invalid",
            invalid_total.clone(),
        );
        let invalid_current = Family::<InvalidLabels, Gauge>::default();
        registry.register(
            "xlb_invalid_objects",
            "Objects refused by the agent now",
            invalid_current.clone(),
        );
        let failed_services = Gauge::default();
        registry.register(
            "xlb_failed_services",
            "Services whose ports did not fit into the maps at the last sync (their previous \
             state stays programmed)",
            failed_services.clone(),
        );
        let overflowed_buckets = Gauge::default();
        registry.register(
            "xlb_flow_table_overflowed_buckets",
            "Flow-table buckets marked as having flows in the LRU conntrack map (their misses \
             also look there), at the agent's last sweep",
            overflowed_buckets.clone(),
        );
        let (map_entries, map_capacity) = register_map_levels(&mut registry, caps);
        let snat = SnatMetrics::register(&mut registry);
        let (attached, pins_repaired) = register_attachments(&mut registry);
        let service_names = ServiceNames::default();
        let walker = match datapath {
            Some(d) => Some(register_datapath(
                &mut registry,
                caps,
                d,
                &map_entries,
                &service_names,
            )?),
            None => None,
        };
        Ok(Self {
            registry,
            syncs,
            sync_errors,
            sync_duration,
            programming_duration,
            invalid_total,
            invalid_current,
            failed_services,
            overflowed_buckets,
            map_entries,
            map_capacity,
            attached,
            pins_repaired,
            snat,
            invalid_seen: Mutex::new(BTreeMap::new()),
            walker,
            service_names,
        })
    }

    /// The services the datapath counts, by id (after each sync).
    pub fn set_services(&self, services: Vec<(String, u32)>) {
        *self
            .service_names
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = services;
    }

    /// Records one sync.
    pub fn observe_sync(&self, r: &SyncReport<'_>) {
        self.syncs.inc();
        self.sync_errors.inc_by(r.errors as u64);
        self.sync_duration.observe(r.took.as_secs_f64());
        // A sync with failed writes did not program the change; the next one may.
        if r.errors == 0
            && let Some(changed) = r.changed_at
        {
            let latency = r.programmed_at.saturating_duration_since(changed);
            self.programming_duration.observe(latency.as_secs_f64());
        }
        self.failed_services.set(gauge(r.failed_services));
        for (label, n) in [
            (map_label::FRONTENDS, gauge(r.frontends)),
            (map_label::BACKENDS, gauge(r.backends)),
            (
                map_label::RING_SLOTS,
                i64::try_from(r.ring_slots).unwrap_or(i64::MAX),
            ),
        ] {
            self.map_entries.get_or_create(&[("map", label)]).set(n);
        }
        self.observe_invalid(r.invalid);
    }

    /// Counts objects that became invalid since the previous sync (an object that stays
    /// invalid is counted once) and sets the current count per kind and reason.
    fn observe_invalid(&self, invalid: &[Invalid]) {
        let mut now: BTreeMap<InvalidId, usize> = BTreeMap::new();
        for i in invalid {
            let id = InvalidId {
                kind: i.kind,
                reason: i.reason,
                namespace: i.namespace.clone(),
                name: i.name.clone(),
            };
            *now.entry(id).or_default() += 1;
        }
        let mut seen = self
            .invalid_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut current: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
        for (id, &n) in &now {
            let before = seen.get(id).copied().unwrap_or(0);
            let labels = [("kind", id.kind), ("reason", id.reason)];
            if n > before {
                self.invalid_total
                    .get_or_create(&labels)
                    .inc_by((n - before) as u64);
            }
            *current.entry((id.kind, id.reason)).or_default() += n;
        }
        // Kinds and reasons that were invalid before and are no more go to 0, not away.
        let gone: BTreeSet<(&'static str, &'static str)> = seen
            .keys()
            .map(|id| (id.kind, id.reason))
            .filter(|k| !current.contains_key(k))
            .collect();
        for (kind, reason) in gone {
            current.insert((kind, reason), 0);
        }
        for ((kind, reason), n) in current {
            self.invalid_current
                .get_or_create(&[("kind", kind), ("reason", reason)])
                .set(gauge(n));
        }
        *seen = now;
    }

    /// Records the SNAT table's fill: `usable` ports per backend (the SNAT ranges less the
    /// excluded ports), `capacity` entries in the table.
    pub fn set_snat_fill(
        &self,
        fill: &crate::datapath::nattable::Fill,
        usable: u32,
        capacity: u64,
    ) {
        let to_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.map_entries
            .get_or_create(&[("map", map_label::SNAT)])
            .set(to_gauge(fill.live));
        self.map_capacity
            .get_or_create(&[("map", map_label::SNAT)])
            .set(to_gauge(capacity));
        self.snat.set(fill, usable);
    }

    /// Counts a warning about a backend whose SNAT ports run short.
    pub fn snat_fill_warned(&self) {
        self.snat.warnings.inc();
    }

    /// Records the flow-table buckets left marked as overflowed by a sweep.
    pub fn set_overflowed_buckets(&self, n: usize) {
        self.overflowed_buckets.set(gauge(n));
    }

    /// Records what the datapath is attached to.
    /// Attached interfaces per hook; `cgroups`: the cgroup with socket-level load balancing
    /// (0 or 1).
    pub fn set_attached(&self, xdp: usize, tc: usize, cgroups: usize) {
        for (hook, n) in [("xdp", xdp), ("tc", tc), ("cgroup", cgroups)] {
            self.attached.get_or_create(&[("hook", hook)]).set(gauge(n));
        }
    }

    /// Counts pins found removed and pinned again.
    pub fn add_pins_repaired(&self, maps: usize, links: usize) {
        for (kind, n) in [("map", maps), ("link", links)] {
            self.pins_repaired
                .get_or_create(&[("kind", kind)])
                .inc_by(n as u64);
        }
    }

    /// Every metric in the Prometheus text format; asks for a walk of the conntrack and SNAT
    /// maps, whose result the next scrape reports.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        if let Some(w) = &self.walker {
            w.request();
        }
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

type ValueLabels = [(&'static str, String); 1];

/// The SNAT ports in use, with bounded cardinality: per SNAT address (one or two per node),
/// the busiest backends only, and how many backends are past each fill level.
struct SnatMetrics {
    by_address: Family<ValueLabels, Gauge>,
    busiest: Family<ValueLabels, Gauge>,
    over: Family<MapLabels, Gauge>,
    usable: Gauge,
    warnings: Counter,
}

/// How many of the busiest backends `xlb_snat_backend_ports_in_use` names.
pub const SNAT_TOP_BACKENDS: usize = 10;
/// The fill levels `xlb_snat_backends_over` counts backends past.
const SNAT_FILL_LEVELS: [(&str, f64); 3] = [("0.5", 0.5), ("0.8", 0.8), ("0.95", 0.95)];

impl SnatMetrics {
    fn register(registry: &mut Registry) -> Self {
        let by_address = Family::<ValueLabels, Gauge>::default();
        registry.register(
            "xlb_snat_ports_in_use",
            "SNAT ports in use (live SNATed flows, or in their close timeout) per SNAT address, \
             over all backends",
            by_address.clone(),
        );
        let busiest = Family::<ValueLabels, Gauge>::default();
        registry.register(
            "xlb_snat_backend_ports_in_use",
            "SNAT ports in use to one backend (address:port/protocol), for the 10 busiest \
             backends; each backend has xlb_snat_backend_port_capacity of them",
            busiest.clone(),
        );
        let usable = Gauge::default();
        registry.register(
            "xlb_snat_backend_port_capacity",
            "SNAT ports each backend can have in use at once from this node (the SNAT ranges \
             less the ports excluded: frontends, bound sockets)",
            usable.clone(),
        );
        let over = Family::<MapLabels, Gauge>::default();
        registry.register(
            "xlb_snat_backends_over",
            "Backends whose SNAT ports in use exceed a fraction (fill) of their capacity",
            over.clone(),
        );
        for (level, _) in SNAT_FILL_LEVELS {
            over.get_or_create(&[("fill", level)]).set(0);
        }
        let warnings = Counter::default();
        registry.register(
            "xlb_snat_fill_warnings",
            "Times a backend's SNAT ports passed 80 % in use (logged each time)",
            warnings.clone(),
        );
        Self {
            by_address,
            busiest,
            over,
            usable,
            warnings,
        }
    }

    fn set(&self, fill: &crate::datapath::nattable::Fill, usable: u32) {
        self.usable.set(i64::from(usable));
        self.by_address.clear();
        for (addr, n) in &fill.by_address {
            self.by_address
                .get_or_create(&[("address", addr.to_string())])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        let mut backends: Vec<_> = fill.by_backend.iter().collect();
        backends.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        self.busiest.clear();
        for ((addr, port, proto), n) in backends.iter().take(SNAT_TOP_BACKENDS) {
            let proto = if *proto == lb_common::IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            };
            self.busiest
                .get_or_create(&[("backend", format!("{addr}:{port}/{proto}"))])
                .set(i64::from(**n));
        }
        let usable = f64::from(usable.max(1));
        for (level, ratio) in SNAT_FILL_LEVELS {
            let n = fill
                .by_backend
                .values()
                .filter(|&&used| f64::from(used) / usable > ratio)
                .count();
            self.over.get_or_create(&[("fill", level)]).set(gauge(n));
        }
    }
}

/// `xlb_map_entries` (filled in by syncs and walks) and `xlb_map_capacity`.
fn register_map_levels(
    registry: &mut Registry,
    caps: &Capacities,
) -> (Family<MapLabels, Gauge>, Family<MapLabels, Gauge>) {
    let map_entries = Family::<MapLabels, Gauge>::default();
    registry.register(
        "xlb_map_entries",
        "Entries in use per datapath map (ring_slots: Maglev ring slots; flows and \
         conntrack and sockets: from the last background walk, at most one per 30 s, started \
         by a scrape; snat: SNATed flows live or in their close timeout, counted every 10 s)",
        map_entries.clone(),
    );
    let map_capacity = Family::<MapLabels, Gauge>::default();
    registry.register(
        "xlb_map_capacity",
        "Capacity of each datapath map (ring_slots: slots of the Maglev ring slab)",
        map_capacity.clone(),
    );
    for (label, capacity) in [
        (map_label::FRONTENDS, caps.frontends),
        (map_label::BACKENDS, caps.backends),
        (map_label::RING_SLOTS, caps.ring_slots),
        (map_label::CONNTRACK, caps.conntrack),
        (map_label::SNAT, nat_slots(caps)),
        (map_label::FLOWS, flow_slots(caps)),
        (map_label::SOCKETS, lb_common::capacity::SOCK_REVNAT),
    ] {
        map_capacity
            .get_or_create(&[("map", label)])
            .set(i64::from(capacity));
    }
    (map_entries, map_capacity)
}

/// The verdict counters (read at scrape time) and the walker of the conntrack and SNAT maps.
fn register_datapath(
    registry: &mut Registry,
    caps: &Capacities,
    d: DatapathSources,
    map_entries: &Family<MapLabels, Gauge>,
    names: &ServiceNames,
) -> Result<MapWalker, MetricsError> {
    registry.register_collector(Box::new(DatapathCollector {
        verdicts: d.verdicts,
        events: d.events,
        services: d.services,
        names: Arc::clone(names),
    }));
    let maps = vec![
        Walked {
            label: map_label::FLOWS,
            capacity: u64::from(flow_slots(caps)),
            map: d.flows,
        },
        Walked {
            label: map_label::CONNTRACK,
            capacity: u64::from(caps.conntrack),
            map: d.conntrack,
        },
        Walked {
            label: map_label::SOCKETS,
            capacity: u64::from(lb_common::capacity::SOCK_REVNAT),
            map: d.sockets,
        },
    ];
    MapWalker::spawn(maps, map_entries.clone(), WALK_INTERVAL)
}

/// Flows the SNAT table holds (3 per bucket).
fn nat_slots(caps: &Capacities) -> u32 {
    crate::datapath::loader::flow_buckets(caps.nat_buckets)
        .saturating_mul(lb_common::FLOW_WAYS as u32)
}

/// Flows the flow table holds (3 per bucket).
fn flow_slots(caps: &Capacities) -> u32 {
    crate::datapath::loader::flow_buckets(caps.flow_buckets)
        .saturating_mul(lb_common::FLOW_WAYS as u32)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use aya::maps::MapError;
    use lb_common::{Counter as VerdictCounter, Event, Verdict};

    use super::{
        CountEntries, DatapathSources, EventCounters, Metrics, MetricsError, ServiceCounters,
        SyncReport, VerdictCounters,
    };
    use crate::{
        control::invalid::{Invalid, reason},
        datapath::loader::Capacities,
    };

    fn invalid(kind: &'static str, name: &str, reason: &'static str) -> Invalid {
        Invalid {
            kind,
            namespace: "default".into(),
            name: name.into(),
            reason,
            detail: String::new(),
        }
    }

    fn report(invalid: &[Invalid]) -> SyncReport<'_> {
        let now = Instant::now();
        SyncReport {
            took: Duration::from_millis(3),
            changed_at: Some(now.checked_sub(Duration::from_millis(40)).expect("clock")),
            programmed_at: now,
            errors: 0,
            failed_services: 0,
            invalid,
            frontends: 6,
            backends: 3,
            ring_slots: 1_806,
        }
    }

    /// The line of `text` that starts with `series ` (name and labels as written).
    fn value(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn syncs_durations_and_fill_levels() {
        let m = Metrics::new(&Capacities::small(), None).expect("metrics");
        m.observe_sync(&report(&[]));
        let mut failed = report(&[]);
        failed.errors = 2;
        failed.failed_services = 1;
        failed.changed_at = None;
        m.observe_sync(&failed);
        m.set_attached(1, 3, 0);
        let text = m.encode().expect("encode");
        for (series, expected) in [
            ("xlb_syncs_total", "2"),
            ("xlb_sync_errors_total", "2"),
            ("xlb_sync_proxy_rules_duration_seconds_count", "2"),
            (
                "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"}",
                "2",
            ),
            (
                "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"}",
                "0",
            ),
            // Only the first sync programmed a change; it had waited 40 ms.
            ("xlb_network_programming_duration_seconds_count", "1"),
            (
                "xlb_network_programming_duration_seconds_bucket{le=\"0.04\"}",
                "1",
            ),
            (
                "xlb_network_programming_duration_seconds_bucket{le=\"0.02\"}",
                "0",
            ),
            ("xlb_failed_services", "1"),
            ("xlb_map_entries{map=\"frontends\"}", "6"),
            ("xlb_map_entries{map=\"backends\"}", "3"),
            ("xlb_map_entries{map=\"ring_slots\"}", "1806"),
            ("xlb_map_capacity{map=\"frontends\"}", "1024"),
            ("xlb_map_capacity{map=\"ring_slots\"}", "65536"),
            ("xlb_map_capacity{map=\"conntrack\"}", "16384"),
            ("xlb_attached_interfaces{hook=\"xdp\"}", "1"),
            ("xlb_attached_interfaces{hook=\"tc\"}", "3"),
        ] {
            assert_eq!(
                value(&text, series).as_deref(),
                Some(expected),
                "{series} in\n{text}"
            );
        }
        assert!(text.contains("# TYPE xlb_syncs_total counter\n"), "{text}");
        assert!(!text.contains("..\n"), "help ends with one period: {text}");
        assert!(
            text.contains("# TYPE xlb_network_programming_duration_seconds histogram\n"),
            "{text}"
        );
        // Without a datapath there are no datapath series, and no conntrack count yet.
        assert!(!text.contains("xlb_datapath_"), "{text}");
        assert!(
            !text.contains("xlb_map_entries{map=\"conntrack\"}"),
            "{text}"
        );
    }

    #[test]
    fn an_invalid_object_counts_once_per_appearance() {
        let m = Metrics::new(&Capacities::small(), None).expect("metrics");
        let bad = invalid("Service", "web", reason::BAD_PORT);
        let conflict = invalid("Service", "zzz", reason::FRONTEND_CONFLICT);
        // A Service with two conflicting frontends is two records.
        m.observe_sync(&report(&[bad.clone(), conflict.clone(), conflict.clone()]));
        m.observe_sync(&report(&[bad.clone(), conflict.clone(), conflict.clone()]));
        m.observe_sync(&report(&[bad.clone(), conflict.clone(), conflict.clone()]));
        let text = m.encode().expect("encode");
        let total = |t: &str, r: &str| {
            value(
                t,
                &format!("xlb_invalid_objects_total{{kind=\"Service\",reason=\"{r}\"}}"),
            )
        };
        let now = |t: &str, r: &str| {
            value(
                t,
                &format!("xlb_invalid_objects{{kind=\"Service\",reason=\"{r}\"}}"),
            )
        };
        assert_eq!(total(&text, "bad_port").as_deref(), Some("1"), "{text}");
        assert_eq!(total(&text, "frontend_conflict").as_deref(), Some("2"));
        assert_eq!(now(&text, "bad_port").as_deref(), Some("1"));
        assert_eq!(now(&text, "frontend_conflict").as_deref(), Some("2"));
        // Fixed, then broken again: a second appearance.
        m.observe_sync(&report(&[conflict.clone(), conflict.clone()]));
        let text = m.encode().expect("encode");
        assert_eq!(now(&text, "bad_port").as_deref(), Some("0"), "{text}");
        assert_eq!(total(&text, "bad_port").as_deref(), Some("1"));
        m.observe_sync(&report(std::slice::from_ref(&bad)));
        let text = m.encode().expect("encode");
        assert_eq!(total(&text, "bad_port").as_deref(), Some("2"), "{text}");
        assert_eq!(now(&text, "bad_port").as_deref(), Some("1"));
        assert_eq!(now(&text, "frontend_conflict").as_deref(), Some("0"));
        assert_eq!(total(&text, "frontend_conflict").as_deref(), Some("2"));
    }

    struct FakeEvents;

    impl EventCounters for FakeEvents {
        fn read(&self) -> Result<Vec<(&'static str, u64)>, MetricsError> {
            Ok(Event::ALL
                .iter()
                .map(|&e| (e.name(), 10 + u64::from(e as u32)))
                .collect())
        }
    }

    struct FakeVerdicts;

    impl VerdictCounters for FakeVerdicts {
        fn read(&self) -> Result<Vec<(Verdict, VerdictCounter)>, MetricsError> {
            Ok(Verdict::ALL
                .iter()
                .map(|&v| {
                    let n = u64::from(v as u32);
                    (
                        v,
                        VerdictCounter {
                            packets: n,
                            bytes: n * 100,
                        },
                    )
                })
                .collect())
        }
    }

    struct FakeServices;

    impl ServiceCounters for FakeServices {
        fn read(&self, id: u32) -> Result<VerdictCounter, MetricsError> {
            Ok(VerdictCounter {
                packets: u64::from(id) * 10,
                bytes: u64::from(id) * 1000,
            })
        }
    }

    struct FakeTable {
        entries: u64,
        walks: Arc<AtomicU64>,
    }

    impl CountEntries for FakeTable {
        fn count(&self, limit: u64) -> Result<u64, MapError> {
            self.walks.fetch_add(1, Ordering::SeqCst);
            Ok(self.entries.min(limit))
        }
    }

    #[test]
    fn datapath_counters_at_scrape_time_and_walked_fill_levels() {
        let walks = Arc::new(AtomicU64::new(0));
        let sources = DatapathSources {
            verdicts: Box::new(FakeVerdicts),
            events: Box::new(FakeEvents),
            services: Box::new(FakeServices),
            flows: Box::new(FakeTable {
                entries: 777,
                walks: Arc::clone(&walks),
            }),
            // A walk that restarted and over-counted: clamped to the capacity.
            conntrack: Box::new(FakeTable {
                entries: 1_000_000,
                walks: Arc::clone(&walks),
            }),
            sockets: Box::new(FakeTable {
                entries: 12,
                walks: Arc::clone(&walks),
            }),
        };
        let m = Metrics::new(&Capacities::small(), Some(sources)).expect("metrics");
        m.set_services(vec![("default/tomcat6".into(), 3)]);
        let text = m.encode().expect("encode");
        assert_eq!(
            value(
                &text,
                "xlb_service_packets_total{service=\"default/tomcat6\"}"
            )
            .as_deref(),
            Some("30"),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "xlb_service_bytes_total{service=\"default/tomcat6\"}"
            )
            .as_deref(),
            Some("3000")
        );
        assert_eq!(
            value(&text, "xlb_datapath_packets_total{verdict=\"nat_new\"}").as_deref(),
            Some("4"),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "xlb_datapath_bytes_total{verdict=\"drop_no_backend\"}"
            )
            .as_deref(),
            Some("800")
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("xlb_datapath_packets_total{"))
                .count(),
            Verdict::ALL.len()
        );
        assert_eq!(
            value(
                &text,
                "xlb_datapath_events_total{event=\"sock_translated\"}"
            )
            .as_deref(),
            Some("10"),
            "{text}"
        );
        assert_eq!(
            value(&text, "xlb_datapath_events_total{event=\"affinity_new\"}").as_deref(),
            Some("13")
        );
        // The first scrape started a walk; a later scrape reports it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while walks.load(Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "no walk");
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = m.encode().expect("encode");
        assert_eq!(
            value(&text, "xlb_map_entries{map=\"conntrack\"}").as_deref(),
            Some("16384"),
            "{text}"
        );
        assert_eq!(
            value(&text, "xlb_map_entries{map=\"sockets\"}").as_deref(),
            Some("12"),
            "{text}"
        );
        assert_eq!(
            value(&text, "xlb_map_entries{map=\"flows\"}").as_deref(),
            Some("777")
        );
        assert_eq!(
            value(&text, "xlb_map_capacity{map=\"flows\"}").as_deref(),
            Some("12288")
        );
    }

    /// SNAT fill: per address, the busiest backends only (10), and how many backends are
    /// past each fill level; a later fill replaces the series of backends no longer among
    /// the busiest.
    #[test]
    fn snat_fill_reports_addresses_busiest_backends_and_levels() {
        use std::net::Ipv4Addr;
        let m = Metrics::new(&Capacities::small(), None).expect("metrics");
        let mut fill = crate::datapath::nattable::Fill {
            live: 0,
            ..Default::default()
        };
        for i in 0..20u16 {
            let backend = (
                Ipv4Addr::new(10, 244, 1, 1),
                8000 + i,
                lb_common::IPPROTO_TCP,
            );
            fill.by_backend.insert(backend, u32::from(i) * 50);
            fill.live += u64::from(i) * 50;
        }
        fill.by_address
            .insert(Ipv4Addr::new(192, 168, 1, 10), fill.live);
        m.set_snat_fill(&fill, 1000, 12_288);
        let text = m.encode().expect("encode");
        let series = |name: &str| text.lines().filter(|l| l.starts_with(name)).count();
        assert_eq!(series("xlb_snat_backend_ports_in_use{"), 10, "{text}");
        assert_eq!(
            value(
                &text,
                "xlb_snat_backend_ports_in_use{backend=\"10.244.1.1:8019/tcp\"}"
            )
            .as_deref(),
            Some("950")
        );
        assert!(!text.contains("10.244.1.1:8009/tcp"), "{text}");
        assert_eq!(
            value(&text, "xlb_snat_ports_in_use{address=\"192.168.1.10\"}").as_deref(),
            Some("9500")
        );
        // 50 × i > 500 for i ≥ 11, > 800 for i ≥ 17, > 950 for none.
        for (level, n) in [("0.5", "9"), ("0.8", "3"), ("0.95", "0")] {
            assert_eq!(
                value(
                    &text,
                    &format!("xlb_snat_backends_over{{fill=\"{level}\"}}")
                )
                .as_deref(),
                Some(n),
                "{level}"
            );
        }
        assert_eq!(
            value(&text, "xlb_map_entries{map=\"snat\"}").as_deref(),
            Some("9500")
        );
        assert_eq!(
            value(&text, "xlb_snat_backend_port_capacity").as_deref(),
            Some("1000")
        );
        fill.by_backend.clear();
        m.set_snat_fill(&fill, 1000, 12_288);
        let text = m.encode().expect("encode");
        assert!(!text.contains("xlb_snat_backend_ports_in_use{"), "{text}");
    }
}
