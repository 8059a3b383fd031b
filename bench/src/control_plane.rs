//! `xlb-bench control-plane`: how fast the agent turns Services and EndpointSlices into
//! programmed maps, and what it costs in memory.
//!
//! - Full sync: from an empty store to all maps written for 10,000 Services × 10 endpoints
//!   (objects into the store → `Translator::update` → `Programmer::plan_changes` → apply, the
//!   agent's path), into in-memory fake maps and into the kernel's maps of a datapath loaded
//!   with default capacities. Also at 1k, 2.5k and 5k Services for the curve.
//! - Change → programmed: with the 10k loaded in real maps, 1,000 EndpointSlice changes (one
//!   endpoint of one Service replaced), each timed from the store update through desired
//!   state, plan and map writes — the agent's sync path without its debounce.
//! - Agent RSS: a real `xlb agent --manifests` on a lab node with the 10k manifest, `VmRSS`
//!   from /proc after its first sync.
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_lab::cluster::Cluster;
use lb_userspace::{
    control::{
        model::{ModelOptions, NodeInfo, Translator},
        programmer::Programmer,
        store::Store,
    },
    datapath::{
        loader::{self, Capacities},
        maps::{AyaMaps, FakeMaps, LbMaps},
    },
};
use serde_json::{Value, json};

use crate::{
    report::{Machine, thousands},
    stats::{self, Summary},
};

/// Targets of issue [C].
pub const FULL_SYNC_MAX_S: f64 = 1.0;
pub const CHANGE_P99_MAX_MS: f64 = 5.0;
pub const RSS_MAX_MIB: f64 = 100.0;

const NODE: &str = "node1";
const ENDPOINTS: usize = 10;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub services: usize,
    pub changes: usize,
    /// Service counts of the sync-time curve (the largest is `services`).
    pub curve: &'static [usize],
    /// Full syncs per size (the median is reported).
    pub reps: usize,
    pub rss: bool,
}

impl Plan {
    pub const FULL: Plan = Plan {
        services: 10_000,
        changes: 1000,
        curve: &[1000, 2500, 5000],
        reps: 3,
        rss: true,
    };
    pub const QUICK: Plan = Plan {
        services: 10_000,
        changes: 100,
        curve: &[1000],
        reps: 1,
        rss: true,
    };
}

/// The manifest of `n` Services with `ENDPOINTS` endpoints each (one on this node), as JSON
/// documents, and this node. Every 4th Service is a NodePort.
#[must_use]
pub fn manifest(n: usize) -> String {
    let mut out = String::with_capacity(n * 1500);
    let objects = objects_json(n);
    let _ = writeln!(out, "---\n{}", objects.node);
    for (service, slice) in objects.services.iter().zip(&objects.slices) {
        let _ = writeln!(out, "---\n{service}");
        let _ = writeln!(out, "---\n{slice}");
    }
    out
}

/// The objects of [`manifest`].
struct Objects<T> {
    node: T,
    services: Vec<T>,
    slices: Vec<T>,
}

fn objects_json(n: usize) -> Objects<Value> {
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.11"}]},
    });
    let mut services = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let cluster_ip =
            std::net::Ipv4Addr::from(u32::from_be_bytes([10, 96, 0, 0]) + 16 + i as u32);
        let mut port = json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"});
        let node_port = i % 4 == 0;
        if node_port {
            port["nodePort"] = json!(30_000 + i / 4);
        }
        let svc = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
            "spec": {
                "type": if node_port { "NodePort" } else { "ClusterIP" },
                "clusterIP": cluster_ip.to_string(),
                "ports": [port],
            },
        });
        services.push(svc);
        slices.push(slice_json(i, 0));
    }
    Objects {
        node,
        services,
        slices,
    }
}

/// Endpoint address `j` of Service `i` in generation `generation` (a change moves one
/// endpoint to a new address).
fn endpoint_addr(i: usize, j: usize, generation: usize) -> std::net::Ipv4Addr {
    let base = u32::from_be_bytes([10, 128, 0, 0]);
    if j == 0 || generation == 0 {
        std::net::Ipv4Addr::from(base + (i * ENDPOINTS + j) as u32)
    } else {
        // Changed endpoints live in 10.192.0.0/10, one per (service, generation).
        let alt = u32::from_be_bytes([10, 192, 0, 0]);
        std::net::Ipv4Addr::from(alt + ((i * 7 + generation) % (1 << 22)) as u32)
    }
}

fn slice_json(i: usize, generation: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|j| {
            // Generation g replaces endpoint 1 (its address), as a pod being replaced would.
            let addr = if j == 1 {
                endpoint_addr(i, j, generation)
            } else {
                endpoint_addr(i, j, 0)
            };
            json!({
                "addresses": [addr.to_string()],
                "nodeName": if j == 0 { NODE } else { "node2" },
                "conditions": {"ready": true},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("svc-{i}-abcde"), "namespace": "bench",
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// Phases of one full sync, in seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncTimes {
    pub store: f64,
    pub model: f64,
    pub plan: f64,
    pub apply: f64,
    pub ops: usize,
}

impl SyncTimes {
    #[must_use]
    pub fn total(&self) -> f64 {
        self.store + self.model + self.plan + self.apply
    }
}

/// The objects of `n` Services, typed as a source delivers them (not timed).
struct TypedObjects {
    node: Node,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
}

fn objects(n: usize) -> anyhow::Result<TypedObjects> {
    let json = objects_json(n);
    Ok(TypedObjects {
        node: serde_json::from_value(json.node)?,
        services: json
            .services
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()?,
        slices: json
            .slices
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()?,
    })
}

/// What a full sync leaves: the store and the translator that read it.
struct Synced {
    store: Store,
    translator: Translator,
}

/// From an empty store to all maps written, the agent's way: `objects` put in a fresh store
/// (each converted to its compact form), the translator's first update, the plan of what it
/// reports changed (everything), the writes.
fn full_sync(
    objects: &TypedObjects,
    programmer: &mut Programmer,
    maps: &mut impl LbMaps,
) -> anyhow::Result<(Synced, SyncTimes)> {
    let t = Instant::now();
    let mut store = Store::new();
    store.apply(objects.node.clone())?;
    for o in &objects.services {
        store.apply(o.clone())?;
    }
    for o in &objects.slices {
        store.apply(o.clone())?;
    }
    let t_store = t.elapsed().as_secs_f64();
    let node = NodeInfo::from_store(&store, NODE).context("the node is missing")?;
    let t = Instant::now();
    let mut translator = Translator::new(ModelOptions::default());
    let changes = store.take_changes();
    let frontends = translator.update(&store, &node, &changes);
    let t_model = t.elapsed().as_secs_f64();
    let invalid = translator.invalid();
    ensure!(invalid.is_empty(), "invalid objects: {:?}", invalid.first());
    let t = Instant::now();
    let plan = programmer.plan_changes(translator.state(), &frontends);
    let t_plan = t.elapsed().as_secs_f64();
    if let Some((s, e)) = plan.failed.first() {
        bail!("{} services failed to program; {s}: {e}", plan.failed.len());
    }
    let t = Instant::now();
    for op in &plan.ops {
        maps.apply(op)?;
    }
    let t_apply = t.elapsed().as_secs_f64();
    Ok((
        Synced { store, translator },
        SyncTimes {
            store: t_store,
            model: t_model,
            plan: t_plan,
            apply: t_apply,
            ops: plan.ops.len(),
        },
    ))
}

pub struct CurvePoint {
    pub services: usize,
    pub fake: SyncTimes,
    pub real: SyncTimes,
}

pub struct Results {
    pub plan: Plan,
    pub curve: Vec<CurvePoint>,
    /// Per change, milliseconds.
    pub changes_ms: Vec<f64>,
    /// Mean ms per change in model, plan and apply.
    pub change_phases_ms: [f64; 3],
    pub change_ops: Summary,
    pub rss: Option<Rss>,
    pub load_seconds: f64,
    pub seconds: f64,
}

pub struct Rss {
    pub vm_rss_kib: u64,
    pub anon_kib: u64,
    pub shmem_kib: u64,
    /// The agent's own first sync as it logged it (model + plan + apply), ms.
    pub agent_sync_ms: Option<f64>,
    /// From start to the first sync logged (reading and parsing the manifest included).
    pub first_sync_seconds: f64,
}

impl Results {
    fn largest(&self) -> Option<&CurvePoint> {
        self.curve.iter().max_by_key(|c| c.services)
    }

    #[must_use]
    pub fn full_sync_real_s(&self) -> f64 {
        self.largest().map_or(f64::NAN, |c| c.real.total())
    }

    #[must_use]
    pub fn full_sync_fake_s(&self) -> f64 {
        self.largest().map_or(f64::NAN, |c| c.fake.total())
    }

    #[must_use]
    pub fn change_ms(&self, q: f64) -> f64 {
        quantile(&self.changes_ms, q)
    }

    #[must_use]
    pub fn rss_mib(&self) -> Option<f64> {
        self.rss.as_ref().map(|r| r.vm_rss_kib as f64 / 1024.0)
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    #[expect(clippy::cast_sign_loss, reason = "q is within 0..=1")]
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

/// The median run (by total) of `reps` full syncs.
fn median_sync(
    objects: &TypedObjects,
    reps: usize,
    mut run: impl FnMut(&TypedObjects) -> anyhow::Result<SyncTimes>,
) -> anyhow::Result<SyncTimes> {
    let mut runs = Vec::new();
    for _ in 0..reps.max(1) {
        runs.push(run(objects)?);
    }
    runs.sort_by(|a, b| a.total().total_cmp(&b.total()));
    Ok(runs[runs.len() / 2])
}

pub fn run_bench(plan: Plan, xlb: Option<&Path>) -> anyhow::Result<Results> {
    let started = Instant::now();
    let caps = Capacities::default();
    let mut sizes: Vec<usize> = plan.curve.to_vec();
    sizes.push(plan.services);
    let mut curve = Vec::new();
    let mut kept = None;
    let mut load_seconds = 0.0;
    for &n in &sizes {
        eprintln!("control-plane: {n} services x {ENDPOINTS} endpoints");
        let objs = objects(n)?;
        let fake = median_sync(&objs, plan.reps, |o| {
            let mut p = Programmer::new(&caps);
            let mut maps = FakeMaps::default();
            Ok(full_sync(o, &mut p, &mut maps)?.1)
        })?;
        let real = median_sync(&objs, plan.reps, |o| {
            let t = Instant::now();
            let mut ebpf = loader::load(&caps).context("loading the datapath")?;
            let mut maps = AyaMaps::new(&mut ebpf)?;
            load_seconds = t.elapsed().as_secs_f64();
            let mut p = Programmer::new(&caps);
            let (synced, times) = full_sync(o, &mut p, &mut maps)?;
            if n == plan.services {
                kept = Some((ebpf, maps, p, synced));
            }
            Ok(times)
        })?;
        curve.push(CurvePoint {
            services: n,
            fake,
            real,
        });
    }
    let (_ebpf, mut maps, mut programmer, mut synced) =
        kept.context("the largest setup was not kept")?;
    eprintln!("control-plane: {} EndpointSlice changes", plan.changes);
    let (changes_ms, ops, change_phases_ms) =
        changes(plan, &mut synced, &mut programmer, &mut maps)?;
    let rss = if plan.rss {
        let xlb = xlb.context("the agent RSS needs the xlb binary")?;
        eprintln!("control-plane: agent RSS with {} services", plan.services);
        Some(agent_rss(xlb, plan.services)?)
    } else {
        None
    };
    Ok(Results {
        plan,
        curve,
        changes_ms,
        change_phases_ms,
        change_ops: stats::summarize(&ops).unwrap_or(Summary {
            median: 0.0,
            min: 0.0,
            max: 0.0,
        }),
        rss,
        load_seconds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `plan.changes` EndpointSlice changes, each timed from the store update to the last map
/// write. Returns milliseconds and ops per change.
fn changes(
    plan: Plan,
    synced: &mut Synced,
    programmer: &mut Programmer,
    maps: &mut AyaMaps,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, [f64; 3])> {
    let Synced { store, translator } = synced;
    let node = NodeInfo::from_store(store, NODE).context("the node is missing")?;
    let mut times = Vec::with_capacity(plan.changes);
    let mut op_counts = Vec::with_capacity(plan.changes);
    let mut phases = [0.0f64; 3];
    for c in 0..plan.changes {
        // Spread over the services; generation c + 1 is new for that service.
        let i = (c * 7919) % plan.services;
        let slice: EndpointSlice = serde_json::from_value(slice_json(i, c + 1))?;
        let t = Instant::now();
        store.apply(slice)?;
        let changes = store.take_changes();
        let frontends = translator.update(store, &node, &changes);
        let t_model = t.elapsed().as_secs_f64();
        let p = programmer.plan_changes(translator.state(), &frontends);
        let t_plan = t.elapsed().as_secs_f64();
        for op in &p.ops {
            maps.apply(op)?;
        }
        let t_all = t.elapsed().as_secs_f64();
        times.push(t_all * 1e3);
        phases[0] += t_model;
        phases[1] += t_plan - t_model;
        phases[2] += t_all - t_plan;
        ensure!(
            !p.ops.is_empty() && p.failed.is_empty(),
            "change {c} wrote nothing"
        );
        op_counts.push(p.ops.len() as f64);
    }
    let n = plan.changes.max(1) as f64;
    Ok((times, op_counts, phases.map(|x| x * 1e3 / n)))
}

/// Starts `xlb agent --manifests` on a lab node with `n` Services and reads its memory after
/// the first sync.
fn agent_rss(xlb: &Path, n: usize) -> anyhow::Result<Rss> {
    let c = Cluster::new("cp", 1)?;
    // The lab wrote its own Node manifest; ours names the same node.
    c.remove_manifest("nodes.yaml")?;
    c.write_manifest("bench.yaml", &manifest(n))?;
    let t = Instant::now();
    let pid = c.start_agent(0, xlb, &[])?;
    let deadline = t + Duration::from_mins(5);
    while c.agent_syncs(0) == 0 {
        if !c.lab.is_running(pid) {
            bail!(
                "the agent exited; its log:\n{}",
                fs::read_to_string(c.log_path("agent-node1.log")).unwrap_or_default()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "the agent did not sync within 300 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let first_sync_seconds = t.elapsed().as_secs_f64();
    // Let the agent settle (attach, free parse buffers) before reading.
    std::thread::sleep(Duration::from_millis(500));
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let log = fs::read_to_string(c.log_path("agent-node1.log")).unwrap_or_default();
    let agent_sync_ms = log
        .lines()
        .find(|l| l.contains("agent: sync "))
        .and_then(|l| l.split("took_ms=").nth(1))
        .and_then(|v| v.trim_matches('"').split(['"', ' ']).next())
        .and_then(|v| v.parse().ok());
    Ok(Rss {
        vm_rss_kib: field("VmRSS:").context("no VmRSS")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        shmem_kib: field("RssShmem:").unwrap_or(0),
        agent_sync_ms,
        first_sync_seconds,
    })
}

fn ms(s: f64) -> f64 {
    s * 1e3
}

/// The human-readable report.
#[must_use]
pub fn table(r: &Results, machine: &Machine, quick: bool) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "xlb control-plane benchmark: Services x {ENDPOINTS} endpoints -> programmed maps{}",
        if quick { " (QUICK)" } else { "" }
    );
    let _ = writeln!(
        o,
        "machine    {} cores ({}), Linux {}, load average {} at start",
        machine.cores, machine.cpu, machine.kernel, machine.load
    );
    let _ = writeln!(
        o,
        "method     full sync = objects into an empty store, Translator::update, Programmer::plan_changes,\n           \
         every op applied; fake = in-memory maps, real = the kernel's maps of a datapath\n           \
         loaded with default capacities (load itself: {:.2} s, not counted); median of {} run(s)",
        r.load_seconds, r.plan.reps
    );
    let _ = writeln!(
        o,
        "\n{:>8} {:>9}  {:>9} {:>9} {:>9} {:>9} {:>10}  {:>10}",
        "services",
        "map ops",
        "store ms",
        "model ms",
        "plan ms",
        "apply ms",
        "real total",
        "fake total"
    );
    for c in &r.curve {
        let _ = writeln!(
            o,
            "{:>8} {:>9}  {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.3} s  {:>8.3} s",
            thousands(c.services as u64),
            thousands(c.real.ops as u64),
            ms(c.real.store),
            ms(c.real.model),
            ms(c.real.plan),
            ms(c.real.apply),
            c.real.total(),
            c.fake.total()
        );
    }
    let _ = writeln!(
        o,
        "\nchange -> programmed with {} services loaded (real maps), {} EndpointSlice changes:\n  \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} map writes per change (median);\n  \
         mean per change: model {:.2} ms, plan {:.2} ms, apply {:.2} ms",
        thousands(r.plan.services as u64),
        r.changes_ms.len(),
        r.change_ms(0.5),
        r.change_ms(0.99),
        r.change_ms(1.0),
        r.change_ops.median,
        r.change_phases_ms[0],
        r.change_phases_ms[1],
        r.change_phases_ms[2]
    );
    if let Some(rss) = &r.rss {
        let _ = writeln!(
            o,
            "\nagent RSS (xlb agent --manifests, {} services, after its first sync): VmRSS {:.1} MiB\n  \
             (anonymous {:.1} MiB; file-backed {:.1} MiB: the binary and the memory-mapped ring\n  \
             slab); first sync {:.1} s \
             after start (manifest read and parsed), the sync itself {} ms as the agent logged it",
            thousands(r.plan.services as u64),
            rss.vm_rss_kib as f64 / 1024.0,
            rss.anon_kib as f64 / 1024.0,
            rss.vm_rss_kib.saturating_sub(rss.anon_kib + rss.shmem_kib) as f64 / 1024.0,
            rss.first_sync_seconds,
            rss.agent_sync_ms
                .map_or_else(|| "?".to_owned(), |v| format!("{v:.0}"))
        );
    }
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let _ = writeln!(
        o,
        "\ntargets: full sync (real) {:.3} s <= {FULL_SYNC_MAX_S} s: {}; change p99 {:.2} ms <= {CHANGE_P99_MAX_MS} ms: {}; RSS {} <= {RSS_MAX_MIB} MiB: {}\n({:.0} s)",
        r.full_sync_real_s(),
        met(r.full_sync_real_s() <= FULL_SYNC_MAX_S),
        r.change_ms(0.99),
        met(r.change_ms(0.99) <= CHANGE_P99_MAX_MS),
        r.rss_mib()
            .map_or_else(|| "not measured".to_owned(), |m| format!("{m:.1} MiB")),
        r.rss_mib().map_or("-", |m| met(m <= RSS_MAX_MIB)),
        r.seconds
    );
    o
}

fn sync_json(s: &SyncTimes) -> Value {
    json!({
        "total_s": s.total(), "store_s": s.store, "model_s": s.model,
        "plan_s": s.plan, "apply_s": s.apply, "map_ops": s.ops,
    })
}

/// The JSON report.
#[must_use]
pub fn json(r: &Results, machine: &Machine, quick: bool) -> Value {
    json!({
        "bench": "control-plane",
        "quick": quick,
        "services": r.plan.services,
        "endpoints_per_service": ENDPOINTS,
        "full_sync_s": r.full_sync_real_s(),
        "full_sync_fake_s": r.full_sync_fake_s(),
        "change_p50_ms": r.change_ms(0.5),
        "change_p99_ms": r.change_ms(0.99),
        "change_max_ms": r.change_ms(1.0),
        "changes": r.changes_ms.len(),
        "change_map_ops_median": r.change_ops.median,
        "change_mean_ms": {"model": r.change_phases_ms[0], "plan": r.change_phases_ms[1], "apply": r.change_phases_ms[2]},
        "rss_mib": r.rss_mib(),
        "rss": r.rss.as_ref().map(|x| json!({
            "vm_rss_kib": x.vm_rss_kib, "rss_anon_kib": x.anon_kib,
            "rss_shmem_kib": x.shmem_kib, "agent_sync_ms": x.agent_sync_ms,
            "first_sync_s": x.first_sync_seconds,
        })),
        "curve": r.curve.iter().map(|c| json!({
            "services": c.services, "real": sync_json(&c.real), "fake": sync_json(&c.fake),
        })).collect::<Vec<_>>(),
        "datapath_load_s": r.load_seconds,
        "targets": [
            {"target": "full_sync_s <= 1", "value": r.full_sync_real_s(), "met": r.full_sync_real_s() <= FULL_SYNC_MAX_S},
            {"target": "change_p99_ms <= 5", "value": r.change_ms(0.99), "met": r.change_ms(0.99) <= CHANGE_P99_MAX_MS},
            {"target": "rss_mib <= 100", "value": r.rss_mib(), "met": r.rss_mib().map(|m| m <= RSS_MAX_MIB)},
        ],
        "machine": machine.json(),
        "seconds": r.seconds,
    })
}

#[cfg(test)]
mod tests {
    use lb_userspace::{
        control::{programmer::Programmer, source::manifests, store::Store},
        datapath::{loader::Capacities, maps::FakeMaps},
    };

    use super::{full_sync, manifest, objects};

    #[test]
    fn generated_services_program_whole() {
        let objs = objects(40).expect("objects");
        let mut p = Programmer::new(&Capacities::small());
        let mut maps = FakeMaps::default();
        let (synced, times) = full_sync(&objs, &mut p, &mut maps).expect("sync");
        // 40 ClusterIPs + 10 NodePorts, each in two scopes; 400 backends.
        assert_eq!(p.frontend_count(), 100);
        assert_eq!(p.backend_count(), 400);
        assert!(times.ops > 400);

        // The agent reads the same objects from the manifest text.
        let mut store = Store::new();
        let mut invalid = Vec::new();
        manifests::load_str(&manifest(40), "generated", &mut store, &mut invalid);
        assert!(invalid.is_empty(), "{invalid:?}");
        assert_eq!(store, synced.store);
    }
}
