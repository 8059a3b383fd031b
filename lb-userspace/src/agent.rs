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
use lb_common::Config;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    flows::{self, FlowsError},
    http::{self, Health, HttpError},
    loader::{self, Capacities, HostRouting, LoaderError},
    maps::{AyaMaps, LbMaps as _, MapsError, Op},
    metrics::{DatapathSources, Metrics, MetricsError, SyncReport},
    model::{ModelOptions, NodeInfo, Translator},
    netlink::{self, LinkEvent},
    programmer::Programmer,
    source::{kube as kube_source, manifests, shared::SharedStore},
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
    /// SNAT port range, inclusive.
    pub snat_ports: (u16, u16),
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
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let (mut ebpf, mut maps, mut programmer, older_datapath) = load_datapath(&cfg)?;
    let mut caps = maps.capacities(&cfg.capacities);
    // A pinned flow table keeps its size.
    caps.flow_buckets = flows::FlowTable::open(&ebpf)?.buckets();
    let metrics = Arc::new(Metrics::new(&caps, Some(DatapathSources::open(&ebpf)?))?);
    let health = Arc::new(Health::default());
    http::start(cfg.metrics_addr, cfg.health_addr, &metrics, &health).await?;
    let store = Arc::new(SharedStore::new());
    let mut changes = store.subscribe();
    changes.mark_changed();
    if let Some(path) = cfg.manifests.clone() {
        tokio::spawn(manifests::watch(
            path,
            Arc::clone(&store),
            cfg.manifest_poll,
        ));
    } else {
        let client = kube_source::client(cfg.kubeconfig.as_deref()).await?;
        let (node, store) = (cfg.node_name.clone(), Arc::clone(&store));
        tokio::spawn(async move {
            if let Err(e) = kube_source::run(client, node, store).await {
                tracing::error!(error = %e, "the Kubernetes API source stopped");
            }
        });
    }

    let mut translator = Translator::new(cfg.model.clone());
    let mut published_services = None;
    let mut last_trim = Instant::now();
    let mut attached = Attached {
        conntrack_too: older_datapath,
        ..Attached::default()
    };
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    let mut node: Option<NodeInfo> = None;
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
                    write_config(&mut maps, &cfg, &n, attached.conntrack_too)?;
                    node = Some(n.clone());
                }
                let mut state = SyncState {
                    translator: &mut translator,
                    programmer: &mut programmer,
                    maps: &mut maps,
                    published_services: &mut published_services,
                };
                let Synced { errors, ops, left } = sync(&store, &n, &mut state, &metrics);
                if attached.sock {
                    end_udp_sockets(&cfg.pin_dir, &left);
                }
                // Big syncs leave big temporaries (plans, a re-read store); a sync of one
                // change leaves little, and trimming a heap of 10,000 Services' state costs
                // milliseconds even when there is nothing to give back.
                if ops >= TRIM_AFTER_OPS
                    || !attached.started
                    || last_trim.elapsed() >= TRIM_INTERVAL
                {
                    release_free_memory();
                    last_trim = Instant::now();
                }
                if !attached.started {
                    programmer.release_inherited();
                    // Just before the swap, the flows the old programs made since the load;
                    // just after, the few made during it.
                    carry_over(&mut ebpf, &cfg.pin_dir);
                    attached.start(&mut ebpf, &cfg, &n, link_tx.clone())?;
                    finish_migration(&mut ebpf, &cfg.pin_dir);
                    attached.report(&metrics);
                    attached.end_upgrade_window(&ebpf, &mut maps, &cfg, &n, &metrics)?;
                }
                if errors == 0 && !health.is_ready() {
                    health.set_ready();
                    info!("ready: the first full sync is programmed and the datapath attached");
                }
            }
            Some(event) = link_rx.recv() => {
                attached.on_link(&mut ebpf, &cfg, &event);
                attached.report(&metrics);
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

/// Loads the datapath with its maps pinned, adopting what a previous agent left there.
/// Also returns whether the conntrack map came from a datapath without the flow table (see
/// `CONFIG_F_CONNTRACK_TOO`).
fn load_datapath(cfg: &AgentConfig) -> Result<(Ebpf, AyaMaps, Programmer, bool), AgentError> {
    let other_versions = other_layout_versions(&cfg.pin_dir);
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
    let had = |name: &str| adopted.maps.contains(&name);
    let older_datapath = had(lb_common::map_names::CONNTRACK) && !had(lb_common::map_names::FLOWS);
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
    Ok((ebpf, maps, programmer, older_datapath))
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

/// The datapath's node configuration: SNAT address and port range, the default idle timeouts,
/// and the node's addresses (at most `MAX_NODE_ADDRS`).
#[must_use]
pub fn node_config(snat: Ipv4Addr, snat_ports: (u16, u16), addresses: &[Ipv4Addr]) -> Config {
    let mut c = Config {
        flags: 0,
        snat_addr_be: u32::from_ne_bytes(snat.octets()),
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
        snat_timeout_new_s: lb_common::snat_timeout::NEW,
        snat_timeout_tcp_established_s: lb_common::snat_timeout::TCP_ESTABLISHED,
        snat_timeout_udp_established_s: lb_common::snat_timeout::UDP_ESTABLISHED,
        snat_timeout_closing_s: lb_common::snat_timeout::CLOSING,
        ..Config::default()
    };
    for (slot, addr) in c.node_addrs_be.iter_mut().zip(addresses) {
        *slot = u32::from_ne_bytes(addr.octets());
        c.node_addr_count += 1;
    }
    c
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

/// Writes the node configuration; `conntrack_too`: an older datapath's programs may still run
/// (see `CONFIG_F_CONNTRACK_TOO`).
fn write_config(
    maps: &mut AyaMaps,
    cfg: &AgentConfig,
    node: &NodeInfo,
    conntrack_too: bool,
) -> Result<(), AgentError> {
    let snat = cfg
        .snat_addr
        .or_else(|| node.addresses.first().copied())
        .ok_or(AgentError::NoSnatAddress)?;
    let mut c = node_config(snat, cfg.snat_ports, &node.addresses);
    if conntrack_too {
        c.flags |= lb_common::CONFIG_F_CONNTRACK_TOO;
    }
    maps.apply(&Op::SetConfig(c))?;
    info!(snat = %snat, ports = ?cfg.snat_ports, addresses = ?node.addresses, "node configuration written");
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
    let plan = programmer.plan_changes(translator.state(), &changed);
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
    }
}

/// Ends the connected UDP sockets of the node's processes that socket-level load balancing
/// pointed at backends that left (kube-proxy flushes their UDP conntrack entries): their next
/// call fails and a reconnect is balanced anew.
fn end_udp_sockets(pin_dir: &std::path::Path, left: &std::collections::HashSet<(Ipv4Addr, u16)>) {
    if left.is_empty() {
        return;
    }
    let revnat = aya::maps::MapData::from_pin(crate::pin::map_path(
        pin_dir,
        lb_common::map_names::SOCK_REVNAT,
    ))
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
    match crate::sockdiag::end_udp_sockets_to(left, translated) {
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
    /// A datapath without the flow table may still run on some interface (see
    /// `CONFIG_F_CONNTRACK_TOO`).
    conntrack_too: bool,
    nics: Vec<String>,
    /// Pod interfaces attached to: name → ifindex.
    pod_ifaces: std::collections::BTreeMap<String, u32>,
    sock: bool,
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
    ) -> Result<(), AgentError> {
        if self.failures > 0 {
            warn!(
                failures = self.failures,
                "some attachments failed: new flows keep being recorded in the conntrack map \
                 too, and flow-table marks are not swept"
            );
            return Ok(());
        }
        if self.conntrack_too {
            self.conntrack_too = false;
            write_config(maps, cfg, node, false)?;
            info!(
                "the previous datapath is detached everywhere: new flows go to the flow table only"
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
                Ok(how) => {
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
                Ok(how) => {
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
                    Ok(how) => {
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
                Ok(how) => info!(nic = %nic, how = ?how, "BPF host routing attached (TC ingress)"),
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
