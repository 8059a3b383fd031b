//! The agent: sources fill the shared store; after a quiet period the store is translated
//! (`model`, incrementally: only the Services whose objects changed) and the difference
//! programmed (`programmer` → maps); the datapath is
//! attached to the node's NICs (XDP) and to pod interfaces (TC), including ones that appear
//! later. Nothing is programmed before every source has listed everything once, and nothing is
//! attached before the first full sync is in the maps. Metrics and health are served over HTTP
//! from the start; the agent is ready once the first full sync is in the maps and attached.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::Ebpf;
use lb_common::{
    CONFIG_F_CONNTRACK_TOO, CONFIG_F_SNAT_LEGACY, CONFIG_F_SNAT_LEGACY_TOO, Config,
    MAX_SNAT_RANGES, PortRange, Timeouts,
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    control::{
        model::{ModelOptions, NodeInfo, Translator},
        programmer::{PlanError, Programmer},
        source::{kube as kube_source, manifests, shared::SharedStore},
        state::ServicePortRef,
    },
    datapath::{
        flows::{self, FlowsError},
        loader::{self, Capacities, HostRouting, LoaderError},
        maps::{AyaMaps, LbMaps as _, MapsError, Op},
        nattable::{self, NatTable},
        netlink::{self, LinkEvent},
        pin,
        snat::{self, ExcludedMap, Exclusions, SnatError},
    },
    ops::{
        http::{self, Health, HttpError},
        metrics::{DatapathSources, Metrics, MetricsError, SyncReport},
    },
};

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Where maps and links are pinned (a restarted agent adopts them).
    pub pin_dir: PathBuf,
    /// Manifest file or directory (without it: the Kubernetes API).
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API source (without it: in-cluster configuration).
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// NICs for XDP; empty: the interfaces holding the node's addresses.
    pub nics: Vec<String>,
    /// Globs of pod-facing interfaces for TC.
    pub pod_ifaces: Vec<String>,
    /// Cgroup (v2) whose processes get socket-level load balancing, if any.
    pub socket_lb_cgroup: Option<PathBuf>,
    /// SNAT source address; `None`: the node's first address.
    pub snat_addr: Option<Ipv4Addr>,
    /// SNAT port ranges (see `snat`).
    pub snat_ports: Vec<PortRange>,
    /// Whether the SNAT ports are added to the node's `ip_local_reserved_ports`.
    pub reserve_snat_ports: bool,
    /// Idle timeouts of tracked flows (0 = the datapath's default).
    pub timeouts: Timeouts,
    /// Quiet period before a sync.
    pub debounce: Duration,
    /// Longest a change waits for a quiet period.
    pub max_delay: Duration,
    pub capacities: Capacities,
    /// How frames translated to a pod of this node reach it.
    pub host_routing: HostRouting,
    pub model: ModelOptions,
    /// How often manifest files are checked for changes.
    pub manifest_poll: Duration,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` are served (may equal `metrics_addr`).
    pub health_addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Flows(#[from] FlowsError),
    #[error("no node address to SNAT with: give --snat-addr or a Node with an InternalIP")]
    NoSnatAddress,
    #[error("none of the NICs to attach to exists ({0})")]
    NoNic(String),
    #[error(transparent)]
    Kube(#[from] kube_source::KubeSourceError),
    #[error("watching links: {0}")]
    Netlink(#[source] std::io::Error),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Snat(#[from] SnatError),
}

/// How often the agent checks that the running datapath's pins are where they should be.
const PIN_CHECK: Duration = Duration::from_secs(2);

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    raise_open_file_limit();
    let (mut ebpf, mut maps, mut programmer, upgrade, map_ids) = load_datapath(&cfg)?;
    let mut snat = SnatSide::start(&cfg, &ebpf, &maps, upgrade)?;
    let mut caps = maps.capacities(&cfg.capacities);
    // Pinned bucket tables keep their sizes.
    caps.flow_buckets = flows::FlowTable::open(&ebpf)?.buckets();
    caps.nat_buckets = NatTable::open(&ebpf)?.buckets();
    let metrics = Arc::new(Metrics::new(&caps, Some(DatapathSources::open(&ebpf)?))?);
    let health = Arc::new(Health::default());
    http::start(cfg.metrics_addr, cfg.health_addr, &metrics, &health).await?;
    let store = Arc::new(SharedStore::new());
    let mut changes = store.subscribe();
    changes.mark_changed();
    start_source(&cfg, &store).await?;

    let mut translator = Translator::new(cfg.model.clone());
    let mut published_services = None;
    let mut last_trim = Instant::now();
    let mut attached = Attached::default();
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    let (legacy_tx, mut legacy_rx) = mpsc::unbounded_channel();
    let mut frontend_ports_of = None;
    let mut node: Option<NodeInfo> = None;
    let mut pin_check = tokio::time::interval(PIN_CHECK);
    pin_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Netlink)?;
    loop {
        tokio::select! {
            result = changes.changed() => {
                if result.is_err() {
                    break;
                }
                debounce(&mut changes, cfg.debounce, cfg.max_delay).await;
                if !store.is_synced() {
                    continue;
                }
                let Some(n) = store.read(|s, _| NodeInfo::from_store(s, &cfg.node_name)) else {
                    warn!(node = %cfg.node_name, "this node's Node object is not known yet");
                    continue;
                };
                if node.as_ref() != Some(&n) {
                    write_config(&mut maps, &cfg, &n, &snat.state)?;
                    node = Some(n.clone());
                }
                let mut state = SyncState {
                    translator: &mut translator,
                    programmer: &mut programmer,
                    maps: &mut maps,
                    published_services: &mut published_services,
                };
                let Synced { errors, ops, left, retry } = sync(&store, &n, &mut state, &metrics);
                if retry {
                    changes.mark_changed();
                }
                // New SNATed flows skip the ports of frontends on the node's addresses.
                if frontend_ports_of != Some(programmer.services_generation()) {
                    snat.set_frontend_ports(node_frontend_ports(&translator, &n));
                    frontend_ports_of = Some(programmer.services_generation());
                }
                if attached.sock {
                    end_udp_sockets(&cfg.pin_dir, &left);
                }
                trim_if_due(ops, !attached.started, &mut last_trim);
                if !attached.started {
                    programmer.release_inherited();
                    // Just before the swap, the flows the old programs made since the load;
                    // just after, the few made during it.
                    carry_over(&mut ebpf, &cfg.pin_dir);
                    attached.start(&mut ebpf, &cfg, &n, link_tx.clone())?;
                    finish_migration(&mut ebpf, &cfg.pin_dir);
                    attached.report(&metrics);
                    attached.end_upgrade_window(&ebpf, &mut maps, &cfg, &n, &metrics, &mut snat)?;
                    snat.start_upkeep(&ebpf, &cfg, Arc::clone(&metrics), legacy_tx.clone());
                }
                if errors == 0 && !health.is_ready() {
                    health.set_ready();
                    info!("ready: the first full sync is programmed and the datapath attached");
                }
            }
            _ = pin_check.tick(), if attached.started => {
                attached.check_pins(&map_ids, &cfg, &metrics, &health);
            }
            Some(event) = link_rx.recv() => {
                attached.on_link(&mut ebpf, &cfg, &event);
                attached.report(&metrics);
            }
            Some(LegacyDone) = legacy_rx.recv() => {
                snat.end_legacy(&mut maps, &cfg, node.as_ref())?;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!(
        pin_dir = %cfg.pin_dir.display(),
        "stopping; the datapath stays attached and keeps forwarding with the last state \
         (`xlb cleanup` removes it)"
    );
    Ok(())
}

/// Starts the source that fills `store`: the manifest files, or the Kubernetes API.
async fn start_source(cfg: &AgentConfig, store: &Arc<SharedStore>) -> Result<(), AgentError> {
    if let Some(path) = cfg.manifests.clone() {
        tokio::spawn(manifests::watch(path, Arc::clone(store), cfg.manifest_poll));
    } else {
        let client = kube_source::client(cfg.kubeconfig.as_deref()).await?;
        let (node, store) = (cfg.node_name.clone(), Arc::clone(store));
        tokio::spawn(async move {
            if let Err(e) = kube_source::run(client, node, store).await {
                tracing::error!(error = %e, "the Kubernetes API source stopped");
            }
        });
    }
    Ok(())
}

/// What an upgrade from another layout version leaves for this datapath to handle.
#[derive(Clone, Copy, Debug, Default)]
struct Upgrade {
    /// The conntrack map came from a datapath without the flow table (see
    /// `CONFIG_F_CONNTRACK_TOO`).
    conntrack_too: bool,
    /// The LRU SNAT map of a datapath of layout version 1 was taken over, with that
    /// datapath's port range (see `CONFIG_F_SNAT_LEGACY_TOO`).
    snat_legacy: Option<PortRange>,
}

/// The port range of a datapath of layout version 1 whose configuration cannot be read: its
/// default.
const LEGACY_DEFAULT_PORTS: PortRange = PortRange::new(61000, 65535);

/// Raises the soft open file limit to the hard one. The agent holds one descriptor per
/// attached interface (see [`loader::HeldLink`]) on top of maps, programs and sockets: a node
/// with a thousand pods passes the usual soft limit of 1024. The hard limit is the
/// operator's (Go programs such as kube-proxy raise theirs at start the same way).
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => warn!(error = %e, "could not raise the open file limit"),
    }
}

/// Loads the datapath with its maps pinned, adopting what a previous agent left there.
fn load_datapath(
    cfg: &AgentConfig,
) -> Result<(Ebpf, AyaMaps, Programmer, Upgrade, loader::MapIds), AgentError> {
    let other_versions = other_layout_versions(&cfg.pin_dir);
    let legacy_ports = loader::previous_snat_range(&cfg.pin_dir, &other_versions);
    let legacy_snat_map = other_versions.iter().any(|n| {
        n.rsplit_once("_v")
            .is_some_and(|(b, _)| b == "xlb_snat" || b == "xlb_snat_lru")
    });
    if !other_versions.is_empty() {
        warn!(
            found = ?other_versions,
            version = lb_common::ABI_VERSION,
            "pinned maps of another layout version: building fresh maps of this version, \
             taking the flow maps over where their entry layout is unchanged (else copying \
             what fits); the old maps are removed once this datapath is attached"
        );
    }
    let taken = loader::take_over_flow_maps(&cfg.pin_dir, &other_versions);
    for (from, to) in &taken {
        info!(
            from = %from,
            to = %to,
            "took the flow map of the previous layout version over as it is (same entry \
             layout): its flows continue without a gap"
        );
    }
    let other_versions = other_layout_versions(&cfg.pin_dir);
    let (mut ebpf, mut adopted) =
        loader::load_pinned(&cfg.capacities, &cfg.pin_dir, cfg.host_routing)?;
    let map_ids = loader::MapIds::of(&cfg.pin_dir)?;
    let had = |name: &str| adopted.maps.contains(&name);
    let older_datapath = had(lb_common::map_names::CONNTRACK) && !had(lb_common::map_names::FLOWS);
    let upgrade = Upgrade {
        conntrack_too: older_datapath,
        snat_legacy: legacy_snat_map.then(|| legacy_ports.unwrap_or(LEGACY_DEFAULT_PORTS)),
    };
    if let Some(range) = upgrade.snat_legacy {
        info!(
            ports = %snat::format_port_list(&[range]),
            "the previous datapath's SNATed flows are in its LRU SNAT map: their replies are \
             looked up there, and until its programs are detached new SNATed flows take ports \
             of its range (reserved in its map too)"
        );
    }
    if older_datapath {
        // The conntrack map comes from a datapath without the flow table, whose programs
        // keep recording flows there until the swap: every lookup must reach it.
        let marked = flows::FlowTable::open(&ebpf).and_then(|t| t.mark_all_overflowed())?;
        info!(
            buckets = marked,
            "the previous datapath kept its flows in the conntrack map only: every flow-table \
             bucket is marked to look there too"
        );
    }
    adopted
        .maps
        .retain(|m| !taken.iter().any(|(_, to)| to == m));
    for m in loader::migrate_flows(&mut ebpf, &cfg.pin_dir, &other_versions) {
        match m {
            loader::Migration::Copied { from, entries } => {
                info!(from = %from, entries, "migrated flows from the previous layout version");
            }
            loader::Migration::Incompatible { from } => warn!(
                from = %from,
                "rebuilt without its flows: the previous layout version's entries differ \
                 (established flows to unchanged rings keep their backend through Maglev)"
            ),
        }
    }
    let mut maps = AyaMaps::new(&mut ebpf)?;
    let caps = maps.capacities(&cfg.capacities);
    let mut programmer = Programmer::new(&caps);
    // Only into a fresh backends map: if this version's is pinned already (an upgrade that
    // stopped half-way), its ids came from the previous version then and adoption keeps them.
    let fresh_backends = !adopted.maps.contains(&lb_common::map_names::BACKENDS);
    if fresh_backends && let Some(old) = loader::previous_backends(&cfg.pin_dir, &other_versions) {
        // The flows carried over name backends by the old ids: keep them.
        // Draining backends go into this version's map now: their TCP flows continue.
        for op in programmer.inherit_backend_ids(&old) {
            maps.apply(&op)?;
        }
        info!(
            backends = old.len(),
            "backend ids of the previous layout version kept for the same addresses"
        );
    }
    if adopted.maps.is_empty() {
        info!(pin_dir = %cfg.pin_dir.display(), "fresh datapath maps pinned");
    } else {
        // A ring that cannot be read is adopted empty: the first sync writes a new one.
        let ring = |offset, size| {
            maps.ring(offset, size).unwrap_or_else(|e| {
                warn!(offset, size, error = %e, "cannot read a pinned ring region");
                Vec::new()
            })
        };
        let adoption = programmer.adopt(&maps.frontends(), &maps.backends(), ring);
        info!(
            maps = adopted.maps.len(),
            frontends = adoption.frontends,
            backends = adoption.backends,
            rings = adoption.rings,
            "adopted the pinned datapath of a previous agent"
        );
    }
    for stale in loader::remove_stale_links(&cfg.pin_dir) {
        info!(link = %stale, "removed the pinned link of an interface that is gone");
    }
    Ok((ebpf, maps, programmer, upgrade, map_ids))
}

/// How often the agent clears the overflow marks of flow-table buckets that have no flow in
/// the LRU conntrack map any more.
const OVERFLOW_SWEEP_INTERVAL: Duration = Duration::from_mins(1);

/// Starts the thread that clears stale overflow marks of the flow table (see
/// [`flows::OverflowSweeper`]); it lives as long as the agent.
fn start_overflow_sweeper(ebpf: &Ebpf, metrics: Arc<Metrics>) {
    let opened = flows::FlowTable::open(ebpf).and_then(|t| Ok((t, flows::open_conntrack(ebpf)?)));
    let (table, ct) = match opened {
        Ok(maps) => maps,
        Err(e) => {
            warn!(error = %e, "flow-table marks will not be swept");
            return;
        }
    };
    let mut sweeper = flows::OverflowSweeper::default();
    std::thread::Builder::new()
        .name("xlb-flow-sweep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(OVERFLOW_SWEEP_INTERVAL);
                match sweeper.sweep(&table, &ct) {
                    Ok(s) => {
                        metrics.set_overflowed_buckets(s.marked - s.cleared);
                        if s.cleared > 0 {
                            info!(
                                marked = s.marked,
                                cleared = s.cleared,
                                "cleared the overflow marks of flow-table buckets with no flow \
                                 left in the conntrack map"
                            );
                        }
                    }
                    Err(e) => warn!(error = %e, "sweeping the flow table's overflow marks"),
                }
            }
        })
        .map_or_else(
            |e| warn!(error = %e, "flow-table marks will not be swept"),
            drop,
        );
}

/// The datapath's node configuration: SNAT address and port ranges, idle timeouts, and the
/// node's addresses (at most `MAX_NODE_ADDRS`).
#[must_use]
pub fn node_config(
    snat: Ipv4Addr,
    snat_ports: &[PortRange],
    addresses: &[Ipv4Addr],
    timeouts: Timeouts,
) -> Config {
    let mut c = Config {
        snat_addr_be: u32::from_ne_bytes(snat.octets()),
        timeouts,
        ..Config::default()
    };
    for (slot, r) in c.snat_ranges.iter_mut().zip(snat_ports) {
        *slot = *r;
        c.snat_range_count += 1;
    }
    c.snat_port_count = snat::port_count(&c.snat_ranges);
    for (slot, addr) in c.node_addrs_be.iter_mut().zip(addresses) {
        *slot = u32::from_ne_bytes(addr.octets());
        c.node_addr_count += 1;
    }
    c
}

/// What the node configuration says besides the agent's flags and the node's addresses.
#[derive(Clone, Debug, Default)]
struct NodeState {
    /// See `CONFIG_F_CONNTRACK_TOO`.
    conntrack_too: bool,
    /// The older datapath's port range while its LRU SNAT map holds live flows
    /// (`CONFIG_F_SNAT_LEGACY`).
    snat_legacy: Option<PortRange>,
    /// Its programs may still run (`CONFIG_F_SNAT_LEGACY_TOO`).
    snat_legacy_too: bool,
    /// What this agent (or one before it) added to `ip_local_reserved_ports`.
    reserved: Vec<PortRange>,
    /// The node's local port range, when the SNAT ports are not reserved: new SNATed flows
    /// skip it, so the kernel and the datapath never hand out the same port.
    unreserved_local: Option<PortRange>,
}

impl NodeState {
    /// Reserves the SNAT ports (unless told not to) and carries over what the adopted
    /// configuration says of an earlier upgrade and reservation.
    fn start(cfg: &AgentConfig, maps: &AyaMaps, upgrade: Upgrade) -> Self {
        let previous = maps.config().unwrap_or_default();
        let mut snat_legacy = upgrade.snat_legacy;
        if snat_legacy.is_none()
            && previous.flags & CONFIG_F_SNAT_LEGACY != 0
            && !previous.legacy_ports.is_empty()
        {
            snat_legacy = Some(previous.legacy_ports);
        }
        let mut reserved: Vec<PortRange> = previous
            .reserved_ports
            .iter()
            .copied()
            .filter(|r| !r.is_empty())
            .collect();
        let mut unreserved_local = None;
        if cfg.reserve_snat_ports {
            match snat::reserve(&cfg.snat_ports) {
                Ok(added) => {
                    if !added.is_empty() {
                        info!(
                            added = %snat::format_port_list(&added),
                            "SNAT ports reserved in net.ipv4.ip_local_reserved_ports: the \
                             node's processes never get them for their own connections"
                        );
                    }
                    reserved.extend(added);
                    reserved = snat::normalize(&reserved);
                }
                Err(e) => {
                    unreserved_local = snat::local_port_range().ok();
                    warn!(
                        error = %e,
                        local_ports = ?unreserved_local,
                        "could not reserve the SNAT ports: new SNATed flows skip the node's \
                         local port range instead"
                    );
                }
            }
        } else {
            unreserved_local = snat::local_port_range().ok();
        }
        if reserved.len() > MAX_SNAT_RANGES {
            warn!(
                reserved = %snat::format_port_list(&reserved),
                "more reserved ranges than the configuration records: `xlb cleanup` will leave \
                 some reserved"
            );
            reserved.truncate(MAX_SNAT_RANGES);
        }
        Self {
            conntrack_too: upgrade.conntrack_too,
            snat_legacy,
            snat_legacy_too: upgrade.snat_legacy.is_some(),
            reserved,
            unreserved_local,
        }
    }

    fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.conntrack_too {
            flags |= CONFIG_F_CONNTRACK_TOO;
        }
        if self.snat_legacy.is_some() {
            flags |= CONFIG_F_SNAT_LEGACY;
            if self.snat_legacy_too {
                flags |= CONFIG_F_SNAT_LEGACY_TOO;
            }
        }
        flags
    }

    /// The whole ranges new SNATed flows skip: the older datapath's while its flows live
    /// (once its programs are gone; before, new flows take ports there, reserved in its map),
    /// the local port range when the SNAT ports are not reserved.
    fn exclusions(&self) -> Exclusions {
        let mut ranges = Vec::new();
        if let Some(r) = self.snat_legacy
            && !self.snat_legacy_too
        {
            ranges.push(r);
        }
        ranges.extend(self.unreserved_local);
        Exclusions {
            ranges,
            ..Exclusions::default()
        }
    }
}

/// Removes from `ip_local_reserved_ports` what the agents of `pin_dir` added (recorded in the
/// pinned configuration); returns it.
pub fn release_reserved_ports(pin_dir: &std::path::Path) -> Result<Vec<PortRange>, SnatError> {
    let path = pin::map_path(pin_dir, lb_common::map_names::CONFIG);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let read = || -> Result<Config, String> {
        let data = aya::maps::MapData::from_pin(&path).map_err(|e| e.to_string())?;
        let array: aya::maps::Array<_, Config> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).map_err(|e| e.to_string())?;
        array.get(&0, 0).map_err(|e| e.to_string())
    };
    let config = read().map_err(SnatError::Map)?;
    let added: Vec<PortRange> = config
        .reserved_ports
        .iter()
        .copied()
        .filter(|r| !r.is_empty())
        .collect();
    snat::unreserve(&added)?;
    Ok(added)
}

/// The agent's SNAT side: the node state of the configuration, and the exclusion bitmap.
struct SnatSide {
    state: NodeState,
    ports: Arc<std::sync::Mutex<SnatPorts>>,
}

impl SnatSide {
    fn start(
        cfg: &AgentConfig,
        ebpf: &Ebpf,
        maps: &AyaMaps,
        upgrade: Upgrade,
    ) -> Result<Self, AgentError> {
        let state = NodeState::start(cfg, maps, upgrade);
        let ports = Arc::new(std::sync::Mutex::new(SnatPorts {
            exclusions: state.exclusions(),
            map: ExcludedMap::open(ebpf)?,
        }));
        Ok(Self { state, ports })
    }

    fn set_frontend_ports(&self, ports: std::collections::BTreeSet<u16>) {
        let mut sp = lock(&self.ports);
        sp.exclusions.frontends = ports;
        sp.write();
    }

    /// The whole ranges of the exclusions, as the node state says now.
    fn write_ranges(&self) {
        let mut sp = lock(&self.ports);
        sp.exclusions.ranges = self.state.exclusions().ranges;
        sp.write();
    }

    /// The older datapath's SNATed flows are over: stop looking them up, then let new flows
    /// take their ports again.
    fn end_legacy(
        &mut self,
        maps: &mut AyaMaps,
        cfg: &AgentConfig,
        node: Option<&NodeInfo>,
    ) -> Result<(), AgentError> {
        self.state.snat_legacy = None;
        if let Some(n) = node {
            write_config(maps, cfg, n, &self.state)?;
        }
        self.write_ranges();
        info!("the previous datapath's SNATed flows are over: its SNAT map is no longer read");
        Ok(())
    }

    fn start_upkeep(
        &self,
        ebpf: &Ebpf,
        cfg: &AgentConfig,
        metrics: Arc<Metrics>,
        legacy_done: mpsc::UnboundedSender<LegacyDone>,
    ) {
        start_snat_upkeep(
            ebpf,
            cfg,
            &self.state,
            Arc::clone(&self.ports),
            metrics,
            legacy_done,
        );
    }
}

/// The exclusion bitmap and what it is made of, shared by the sync loop (frontends) and the
/// upkeep thread (bound ports).
struct SnatPorts {
    exclusions: Exclusions,
    map: ExcludedMap,
}

impl SnatPorts {
    fn write(&mut self) {
        if let Err(e) = self.map.write(&self.exclusions) {
            warn!(error = %e, "could not write the ports new SNATed flows must skip");
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ports of frontends on the node's addresses (NodePorts, and ExternalIPs or LoadBalancer IPs
/// that are the node's): replies of SNATed flows must never arrive on them.
fn node_frontend_ports(
    translator: &Translator,
    node: &NodeInfo,
) -> std::collections::BTreeSet<u16> {
    translator
        .state()
        .frontends
        .keys()
        .filter(|f| node.addresses.contains(&f.addr))
        .map(|f| f.port)
        .collect()
}

/// The upkeep thread reports that the older datapath's SNATed flows are over.
struct LegacyDone;

/// How often the upkeep thread rescans bound ports, sweeps the legacy SNAT map and counts
/// the SNAT table's fill.
const SNAT_UPKEEP_INTERVAL: Duration = Duration::from_secs(10);
/// A backend whose SNAT ports are this full is warned about (and again after it fell below
/// `SNAT_FILL_REARM`).
const SNAT_FILL_WARN: f64 = 0.8;
const SNAT_FILL_REARM: f64 = 0.7;

/// Starts the thread that keeps the SNAT side up to date (it lives as long as the agent):
/// the ports the node's processes bound (excluded from new SNATed flows), the legacy SNAT
/// map's sweep, and the SNAT table's fill (metrics, and a warning when a backend's ports run
/// short).
fn start_snat_upkeep(
    ebpf: &Ebpf,
    cfg: &AgentConfig,
    state: &NodeState,
    ports: Arc<std::sync::Mutex<SnatPorts>>,
    metrics: Arc<Metrics>,
    legacy_done: mpsc::UnboundedSender<LegacyDone>,
) {
    let table = match NatTable::open(ebpf) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "the SNAT table's fill will not be reported");
            return;
        }
    };
    // The legacy map is swept once no program of the older datapath can add to it.
    let mut legacy = (state.snat_legacy.is_some() && !state.snat_legacy_too)
        .then(|| nattable::open_legacy(ebpf).ok())
        .flatten();
    let timeouts = cfg.timeouts;
    let ranges = cfg.snat_ports.clone();
    let mut warned = std::collections::HashSet::new();
    let mut scan_failed = false;
    let spawned = std::thread::Builder::new()
        .name("xlb-snat-upkeep".into())
        .spawn(move || {
            loop {
                match crate::datapath::sockdiag::bound_ports() {
                    Ok(bound) => {
                        let mut sp = lock(&ports);
                        if sp.exclusions.bound != bound {
                            sp.exclusions.bound = bound;
                            sp.write();
                        }
                        scan_failed = false;
                    }
                    Err(e) if !scan_failed => {
                        scan_failed = true;
                        warn!(error = %e, "could not list the node's bound ports");
                    }
                    Err(_) => {}
                }
                let now = nattable::now_s();
                if let Some(map) = legacy.as_mut() {
                    match nattable::sweep_legacy(map, now, &timeouts) {
                        Ok(0) => {
                            legacy = None;
                            if legacy_done.send(LegacyDone).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "sweeping the legacy SNAT map"),
                    }
                }
                let usable =
                    snat::port_count(&ranges) - lock(&ports).exclusions.excluded_in(&ranges);
                match table.fill(now, &timeouts) {
                    Ok(fill) => {
                        warn_full_backends(&fill, usable, &mut warned, &metrics);
                        metrics.set_snat_fill(&fill, usable, table.capacity());
                    }
                    Err(e) => warn!(error = %e, "counting the SNAT table"),
                }
                std::thread::sleep(SNAT_UPKEEP_INTERVAL);
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "the SNAT upkeep thread did not start");
    }
}

/// Logs (once, until it falls below `SNAT_FILL_REARM`) each backend whose SNAT ports are
/// `SNAT_FILL_WARN` full, and counts it.
fn warn_full_backends(
    fill: &nattable::Fill,
    usable: u32,
    warned: &mut std::collections::HashSet<nattable::BackendPort>,
    metrics: &Metrics,
) {
    let usable = f64::from(usable.max(1));
    for (&backend, &used) in &fill.by_backend {
        let ratio = f64::from(used) / usable;
        if ratio >= SNAT_FILL_WARN && warned.insert(backend) {
            metrics.snat_fill_warned();
            warn!(
                backend = %format!("{}:{}", backend.0, backend.1),
                proto = backend.2,
                in_use = used,
                usable,
                "SNAT ports of a backend are {:.0} % in use: new connections to it from outside \
                 through this node will fail once all are (widen --snat-ports, or use \
                 externalTrafficPolicy: Local)",
                ratio * 100.0
            );
        }
    }
    warned.retain(|b| {
        fill.by_backend
            .get(b)
            .is_some_and(|&used| f64::from(used) / usable >= SNAT_FILL_REARM)
    });
}

/// Pinned maps named `xlb_..._v<N>` with N other than this build's layout version, newest
/// version first (if an earlier upgrade left two, the flows and ids come from the newest).
fn other_layout_versions(dir: &std::path::Path) -> Vec<String> {
    let current = format!("_v{}", lb_common::ABI_VERSION);
    let version = |n: &str| {
        n.rsplit_once("_v")
            .and_then(|(_, v)| v.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("xlb_") && !n.ends_with(&current) && n.contains("_v"))
                .collect()
        })
        .unwrap_or_default();
    names.sort_by_key(|n| std::cmp::Reverse(version(n)));
    names
}

/// Carries over (without overwriting) the flows the previous version's programs created since
/// the last pass; returns the old maps' names.
fn carry_over(ebpf: &mut Ebpf, dir: &std::path::Path) -> Vec<String> {
    let old = other_layout_versions(dir);
    for m in loader::migrate_flows(ebpf, dir, &old) {
        if let loader::Migration::Copied { from, entries } = m {
            info!(from = %from, entries, "carried over the flows created during the switch");
        }
    }
    old
}

/// After this datapath took over: a last pass over the previous version's flows, then its
/// pinned maps are removed.
fn finish_migration(ebpf: &mut Ebpf, dir: &std::path::Path) {
    for name in carry_over(ebpf, dir) {
        if std::fs::remove_file(dir.join(&name)).is_ok() {
            info!(map = %name, "removed a pinned map of the previous layout version");
        }
    }
}

/// Waits until no change arrived for `quiet`, or `max` passed since the first one.
async fn debounce(changes: &mut tokio::sync::watch::Receiver<u64>, quiet: Duration, max: Duration) {
    let deadline = Instant::now() + max;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let wait = quiet.min(deadline - now);
        match tokio::time::timeout(wait, changes.changed()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// Writes the node configuration.
fn write_config(
    maps: &mut AyaMaps,
    cfg: &AgentConfig,
    node: &NodeInfo,
    state: &NodeState,
) -> Result<(), AgentError> {
    let snat = cfg
        .snat_addr
        .or_else(|| node.addresses.first().copied())
        .ok_or(AgentError::NoSnatAddress)?;
    let mut c = node_config(snat, &cfg.snat_ports, &node.addresses, cfg.timeouts);
    c.flags |= state.flags();
    c.legacy_ports = state.snat_legacy.unwrap_or_default();
    for (slot, r) in c.reserved_ports.iter_mut().zip(&state.reserved) {
        *slot = *r;
    }
    maps.apply(&Op::SetConfig(c))?;
    info!(
        snat = %snat,
        ports = %snat::format_port_list(&cfg.snat_ports),
        addresses = ?node.addresses,
        "node configuration written"
    );
    Ok(())
}

/// What a sync reads and updates besides the store.
struct SyncState<'a> {
    translator: &'a mut Translator,
    programmer: &'a mut Programmer,
    maps: &'a mut AyaMaps,
    /// The [`Programmer::services_generation`] last given to the metrics.
    published_services: &'a mut Option<u64>,
}

/// What a sync did.
struct Synced {
    /// Map writes that failed.
    errors: usize,
    /// Map writes planned.
    ops: usize,
    /// Backends (address, port) that no ring holds any more since this sync.
    left: std::collections::HashSet<(Ipv4Addr, u16)>,
    /// Service ports did not fit while this sync freed room (removed frontends, rings or
    /// backends, usable from the next plan on): plan again soon, without waiting for a change.
    retry: bool,
}

/// Logs the service ports that stopped fitting the maps at this plan, and those that fit
/// again: once each, not at every sync.
fn report_failed(
    before: &std::collections::BTreeSet<ServicePortRef>,
    now: &[(ServicePortRef, PlanError)],
) {
    for (service, error) in now {
        if !before.contains(service) {
            warn!(
                service = %service,
                %error,
                "service port does not fit the maps: not programmed (what it had stays; \
                 retried at every sync; raise --max-frontends / --max-backends)"
            );
        }
    }
    for service in before {
        if !now.iter().any(|(s, _)| s == service) {
            info!(service = %service, "service port fits the maps again (or is gone)");
        }
    }
}

/// Hands freed memory back after a sync when it is worth it. Big syncs leave big temporaries
/// (plans, a re-read store); a sync of one change leaves little, and trimming a heap of
/// 10,000 Services' state costs milliseconds even when there is nothing to give back.
fn trim_if_due(ops: usize, first: bool, last_trim: &mut Instant) {
    if ops >= TRIM_AFTER_OPS || first || last_trim.elapsed() >= TRIM_INTERVAL {
        release_free_memory();
        *last_trim = Instant::now();
    }
}

/// A sync with at least this many map writes hands freed memory back to the kernel, and so
/// do the first sync and the first one this long after the last time it was done.
const TRIM_AFTER_OPS: usize = 1000;
const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// One sync: the store's changes → desired state (translated again where objects changed) →
/// the difference, applied in order.
fn sync(
    store: &SharedStore,
    node: &NodeInfo,
    state: &mut SyncState<'_>,
    metrics: &Metrics,
) -> Synced {
    let started = Instant::now();
    let SyncState {
        translator,
        programmer,
        maps,
        published_services,
    } = state;
    let ((changed, source_invalid), changed_at) =
        store.read_changes(|s, changes, inv| (translator.update(s, node, changes), inv.to_vec()));
    let failed_before: std::collections::BTreeSet<ServicePortRef> =
        programmer.failed_services().cloned().collect();
    let plan = programmer.plan_changes(translator.state(), &changed);
    report_failed(&failed_before, &plan.failed);
    let mut errors = 0usize;
    for op in &plan.ops {
        if let Err(e) = maps.apply(op) {
            errors += 1;
            warn!(error = %e, ?op, "map write failed");
        }
    }
    let programmed_at = Instant::now();
    let mut invalid = translator.invalid();
    invalid.extend(source_invalid);
    info!(
        frontends = programmer.frontend_count(),
        backends = programmer.backend_count(),
        ring_slots = programmer.ring_slots_used(),
        changed_frontends = changed.len(),
        ops = plan.ops.len(),
        failed_services = plan.failed.len(),
        invalid_objects = invalid.len(),
        errors,
        took_ms = format!("{:.2}", started.elapsed().as_secs_f64() * 1e3),
        "sync"
    );
    let failed_services: std::collections::BTreeSet<(&str, &str)> = plan
        .failed
        .iter()
        .map(|(s, _)| (&*s.namespace, &*s.name))
        .collect();
    // Listing the services costs O(services): only when they changed.
    if **published_services != Some(programmer.services_generation()) {
        metrics.set_services(programmer.services());
        **published_services = Some(programmer.services_generation());
    }
    metrics.observe_sync(&SyncReport {
        took: started.elapsed(),
        changed_at,
        programmed_at,
        errors,
        failed_services: failed_services.len(),
        invalid: &invalid,
        frontends: programmer.frontend_count(),
        backends: programmer.backend_count(),
        ring_slots: programmer.ring_slots_used(),
    });
    let left = plan
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::SetBackend { value, .. } if value.flags & lb_common::BACKEND_F_DRAINING != 0 => {
                Some((
                    Ipv4Addr::from(value.addr_be.to_ne_bytes()),
                    u16::from_be(value.port_be),
                ))
            }
            _ => None,
        })
        .collect();
    Synced {
        errors,
        ops: plan.ops.len(),
        left,
        retry: !plan.failed.is_empty() && !plan.ops.is_empty(),
    }
}

/// Ends the connected UDP sockets of the node's processes that socket-level load balancing
/// pointed at backends that left (kube-proxy flushes their UDP conntrack entries): their next
/// call fails and a reconnect is balanced anew.
fn end_udp_sockets(pin_dir: &std::path::Path, left: &std::collections::HashSet<(Ipv4Addr, u16)>) {
    if left.is_empty() {
        return;
    }
    let revnat =
        aya::maps::MapData::from_pin(pin::map_path(pin_dir, lb_common::map_names::SOCK_REVNAT))
            .ok()
            .and_then(|m| {
                aya::maps::HashMap::<_, lb_common::SockKey, lb_common::SockRevNat>::try_from(
                    aya::maps::Map::LruHashMap(m),
                )
                .ok()
            });
    let Some(revnat) = revnat else {
        return;
    };
    let translated = |cookie: u64, (addr, port): (Ipv4Addr, u16)| {
        let key = lb_common::SockKey {
            cookie,
            backend_addr_be: u32::from_ne_bytes(addr.octets()),
            backend_port_be: port.to_be(),
            proto: lb_common::IPPROTO_UDP,
            _pad: 0,
        };
        revnat.get(&key, 0).is_ok()
    };
    match crate::datapath::sockdiag::end_udp_sockets_to(left, translated) {
        Ok(0) => {}
        Ok(n) => info!(
            sockets = n,
            "ended connected UDP sockets to backends that left"
        ),
        Err(e) => warn!(error = %e, "could not end the UDP sockets to backends that left"),
    }
}

/// Hands memory freed since the last sync back to the kernel. Reading a large manifest or
/// listing builds big temporary trees (serde values, the previous store, a desired state);
/// glibc keeps the freed pages in its arenas, where they count as the agent's RSS until
/// reused.
fn release_free_memory() {
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the agent attached to.
#[derive(Default)]
struct Attached {
    started: bool,
    /// Attachments that failed (an interface may keep a previous datapath's programs).
    failures: usize,
    nics: Vec<String>,
    /// Pod interfaces attached to: name → ifindex.
    pod_ifaces: std::collections::BTreeMap<String, u32>,
    sock: bool,
    /// Every link attached, held open (see [`loader::HeldLink`]): `xdp:<nic>`, `tcnic:<nic>`,
    /// `tc:<pod iface>`, `sock:<n>`.
    held: std::collections::BTreeMap<String, loader::HeldLink>,
}

impl Attached {
    /// Once the datapath is attached: if every attachment succeeded, no previous datapath's
    /// program runs any more, so new flows go to the flow table only and the overflow marks
    /// may be swept; otherwise an interface may still run one, which records flows only in
    /// the conntrack map, so both stay as they are.
    fn end_upgrade_window(
        &mut self,
        ebpf: &Ebpf,
        maps: &mut AyaMaps,
        cfg: &AgentConfig,
        node: &NodeInfo,
        metrics: &Arc<Metrics>,
        snat: &mut SnatSide,
    ) -> Result<(), AgentError> {
        if self.failures > 0 {
            warn!(
                failures = self.failures,
                "some attachments failed: new flows keep being recorded for the previous \
                 datapath too, and flow-table marks are not swept"
            );
            return Ok(());
        }
        if snat.state.conntrack_too || snat.state.snat_legacy_too {
            snat.state.conntrack_too = false;
            snat.state.snat_legacy_too = false;
            // Skip the old range before new flows may take ports anywhere: its flows' ports
            // are in its map only.
            snat.write_ranges();
            write_config(maps, cfg, node, &snat.state)?;
            info!(
                "the previous datapath is detached everywhere: new flows go to this datapath's \
                 tables only"
            );
        }
        start_overflow_sweeper(ebpf, Arc::clone(metrics));
        Ok(())
    }

    /// Attaches XDP to the NICs and TC to matching pod interfaces, then follows new links.
    fn start(
        &mut self,
        ebpf: &mut Ebpf,
        cfg: &AgentConfig,
        node: &NodeInfo,
        links: mpsc::UnboundedSender<LinkEvent>,
    ) -> Result<(), AgentError> {
        let nics: Vec<String> = if cfg.nics.is_empty() {
            netlink::addresses()
                .into_iter()
                .filter(|(_, a)| node.addresses.contains(a))
                .map(|(n, _)| n)
                .collect()
        } else {
            cfg.nics.clone()
        };
        for nic in &nics {
            match loader::attach_nic_pinned(ebpf, nic, &cfg.pin_dir) {
                Ok((how, link)) => {
                    self.held.insert(format!("xdp:{nic}"), link);
                    self.nics.push(nic.clone());
                    set_accept_local(nic);
                    info!(nic = %nic, how = ?how, "XDP attached");
                }
                Err(e) => {
                    self.failures += 1;
                    warn!(nic = %nic, error = %e, "XDP attach failed");
                }
            }
        }
        if self.nics.is_empty() {
            return Err(AgentError::NoNic(nics.join(",")));
        }
        self.start_host_routing(ebpf, cfg);
        match &cfg.socket_lb_cgroup {
            // A failure here must not stop the agent: the NICs run the new programs already.
            Some(cgroup) => match loader::attach_sock_pinned(ebpf, cgroup, &cfg.pin_dir) {
                Ok((how, links)) => {
                    for (i, link) in links.into_iter().enumerate() {
                        self.held.insert(format!("sock:{i}"), link);
                    }
                    self.sock = true;
                    info!(cgroup = %cgroup.display(), how = ?how, "socket-level load balancing attached");
                }
                Err(e) => warn!(
                    cgroup = %cgroup.display(),
                    error = %e,
                    "socket-level load balancing NOT attached: the node's own processes do not \
                     reach Services (the cgroup hook of xlb_attached_interfaces is 0)"
                ),
            },
            None => {
                for link in loader::remove_sock_links(&cfg.pin_dir) {
                    info!(link = %link, "socket-level load balancing detached (not asked for)");
                }
            }
        }
        // Subscribe before listing, so no link falls between the two.
        let watcher = netlink::LinkWatcher::new().map_err(AgentError::Netlink)?;
        std::thread::spawn(move || {
            loop {
                let events = match watcher.recv() {
                    Ok(events) => events,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // ENOBUFS: more link changes than the socket buffer held. Whatever the
                        // error, the agent compares with the links that exist now.
                        warn!(error = %e, "link notifications lost: comparing with the links that exist");
                        if e.raw_os_error() != Some(libc::ENOBUFS) {
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        vec![LinkEvent::Resync]
                    }
                };
                for e in events {
                    if links.send(e).is_err() {
                        return;
                    }
                }
            }
        });
        for (index, name) in netlink::links() {
            self.on_link(ebpf, cfg, &LinkEvent::New { index, name });
        }
        self.started = true;
        Ok(())
    }

    /// Pins removed from under the running agent (the directory deleted, a map's or a link's
    /// file unlinked) are pinned again from the agent's own descriptors: traffic never stops,
    /// and a restarted agent or `xlb stats` finds the live state again. A repair that fails
    /// makes the agent unready until one succeeds.
    fn check_pins(
        &mut self,
        maps: &loader::MapIds,
        cfg: &AgentConfig,
        metrics: &Metrics,
        health: &Health,
    ) {
        if !loader::pins_missing(&cfg.pin_dir, self.held.values()) {
            return;
        }
        if pin::cleanup_mark(&cfg.pin_dir).exists() {
            if !self.held.is_empty() {
                // Letting the links go detaches the datapath, as the operator asked.
                self.held.clear();
                warn!(
                    pin_dir = %cfg.pin_dir.display(),
                    "`xlb cleanup` removed the datapath: not pinning it again; this agent no \
                     longer forwards (not ready) until it is restarted"
                );
            }
            health.set_fault(Some("`xlb cleanup` removed the datapath"));
            return;
        }
        let mut links: Vec<&mut loader::HeldLink> = self.held.values_mut().collect();
        match loader::repair_pins(maps, &cfg.pin_dir, &mut links) {
            Ok(repaired) => {
                metrics.add_pins_repaired(repaired.maps.len(), repaired.links.len());
                warn!(
                    pin_dir = %cfg.pin_dir.display(),
                    maps = repaired.maps.len(),
                    links = repaired.links.len(),
                    "pins of the running datapath were removed: pinned them again (repaired)"
                );
                health.set_fault(None);
            }
            Err(e) => {
                error!(
                    pin_dir = %cfg.pin_dir.display(),
                    error = %e,
                    "pins of the running datapath were removed and cannot be pinned again: \
                     not ready"
                );
                health.set_fault(Some("the pinned datapath could not be repaired"));
            }
        }
        self.held.retain(|_, l| l.is_held());
    }

    fn report(&self, metrics: &Metrics) {
        metrics.set_attached(
            self.nics.len(),
            self.pod_ifaces.len(),
            usize::from(self.sock),
        );
    }

    fn on_link(&mut self, ebpf: &mut Ebpf, cfg: &AgentConfig, event: &LinkEvent) {
        match event {
            LinkEvent::New { name, index } => {
                if !cfg.pod_ifaces.iter().any(|g| netlink::glob_match(g, name)) {
                    return;
                }
                match self.pod_ifaces.get(name) {
                    Some(i) if i == index => return,
                    // Removed and created again while notifications were lost.
                    Some(&old) => self.on_link(
                        ebpf,
                        cfg,
                        &LinkEvent::Removed {
                            index: old,
                            name: name.clone(),
                        },
                    ),
                    None => {}
                }
                match loader::attach_pod_pinned(ebpf, name, &cfg.pin_dir) {
                    Ok((how, link)) => {
                        self.held.insert(format!("tc:{name}"), link);
                        info!(iface = %name, how = ?how, "TC attached");
                        self.pod_ifaces.insert(name.clone(), *index);
                        if cfg.host_routing == HostRouting::Bpf {
                            // `bpf_redirect_peer` needs a device whose peer is in another
                            // namespace (the kernel drops the packet otherwise): a pod's veth
                            // or netkit device.
                            let driver = netlink::driver(name);
                            let peer_elsewhere = netlink::peer_elsewhere(*index);
                            if matches!(driver.as_deref(), Some("veth" | "netkit"))
                                && peer_elsewhere == Some(true)
                            {
                                set_pod_iface(ebpf, *index, true);
                            } else {
                                warn!(
                                    iface = %name,
                                    ?driver,
                                    ?peer_elsewhere,
                                    "not a veth or netkit device with its peer in another \
                                     namespace: BPF host routing leaves its pod to the kernel's \
                                     forwarding"
                                );
                            }
                        }
                    }
                    Err(e) => {
                        self.failures += 1;
                        warn!(iface = %name, error = %e, "TC attach failed");
                    }
                }
            }
            LinkEvent::Removed { name, index } => {
                // The kernel removed the tcx link with the interface; drop its pin.
                if self.pod_ifaces.get(name) == Some(index) {
                    self.pod_ifaces.remove(name);
                    self.held.remove(&format!("tc:{name}"));
                    set_pod_iface(ebpf, *index, false);
                    loader::unpin_pod_link(&cfg.pin_dir, name);
                }
            }
            LinkEvent::Resync => {
                let now = netlink::links();
                let gone: Vec<(String, u32)> = self
                    .pod_ifaces
                    .iter()
                    .filter(|&(n, i)| !now.iter().any(|(ci, cn)| cn == n && ci == i))
                    .map(|(n, i)| (n.clone(), *i))
                    .collect();
                for (name, index) in gone {
                    self.on_link(ebpf, cfg, &LinkEvent::Removed { index, name });
                }
                for (index, name) in now {
                    self.on_link(ebpf, cfg, &LinkEvent::New { index, name });
                }
            }
        }
    }
}

impl Attached {
    /// BPF host routing: the NICs' TC ingress program, and an empty pod-interface map that
    /// `on_link` fills (a previous agent's entries may name interfaces gone since). With it
    /// off, a previous agent's NIC ingress links are removed.
    fn start_host_routing(&mut self, ebpf: &mut Ebpf, cfg: &AgentConfig) {
        if cfg.host_routing == HostRouting::Kernel {
            for link in loader::remove_nic_ingress_links(&cfg.pin_dir) {
                info!(link = %link, "BPF host routing detached (not asked for)");
            }
            return;
        }
        if let Some(mut m) = pod_iface_map(ebpf) {
            let keys: Vec<u32> = m.keys().filter_map(Result::ok).collect();
            for k in keys {
                let _ = m.remove(&k);
            }
        }
        for nic in &self.nics {
            match loader::attach_nic_ingress_pinned(ebpf, nic, &cfg.pin_dir) {
                Ok((how, link)) => {
                    self.held.insert(format!("tcnic:{nic}"), link);
                    info!(nic = %nic, how = ?how, "BPF host routing attached (TC ingress)");
                }
                // Not an attachment failure in `failures`' sense: no older datapath keeps
                // running for it, the kernel just forwards as without the option.
                Err(e) => warn!(
                    nic = %nic,
                    error = %e,
                    "BPF host routing NOT attached: the kernel forwards to pods"
                ),
            }
        }
    }
}

fn pod_iface_map(ebpf: &mut Ebpf) -> Option<aya::maps::HashMap<&mut aya::maps::MapData, u32, u32>> {
    ebpf.map_mut(lb_common::map_names::POD_IFACES)
        .and_then(|m| aya::maps::HashMap::try_from(m).ok())
}

/// Adds or removes a pod interface that BPF host routing may deliver to.
fn set_pod_iface(ebpf: &mut Ebpf, ifindex: u32, present: bool) {
    let Some(mut m) = pod_iface_map(ebpf) else {
        warn!("the pod interface map is missing: BPF host routing leaves pods to the kernel");
        return;
    };
    let r = if present {
        m.insert(ifindex, 1, 0)
    } else {
        m.remove(&ifindex)
    };
    if let Err(e) = r
        && present
    {
        warn!(ifindex, error = %e, "pod interface not added: the kernel forwards to it");
    }
}

/// A NIC must accept packets whose source is one of the node's addresses: the datapath hands
/// SNATed packets to the kernel when their next hop's neighbour is not resolved yet.
fn set_accept_local(nic: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{nic}/accept_local");
    if let Err(e) = std::fs::write(&path, "1") {
        warn!(path, error = %e, "could not enable accept_local");
    }
}
