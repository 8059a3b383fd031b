//! `xlb-bench datapath`: what the NIC (XDP) program costs per packet, measured with
//! `BPF_PROG_TEST_RUN`.
//!
//! The kernel runs all `repeat` iterations of a test run on one packet context without resetting
//! it, so a new flow can only be measured as many separate runs with `repeat = 1`, each on a
//! fresh packet. Every case is measured that way, timed by the kernel's `duration` of each run,
//! and reported as a ratio to a no-op XDP program measured the same way (the method's floor:
//! it includes the per-run overhead of the test-run machinery). The cases run interleaved in
//! batches within each round, so a drift of the VM's speed affects them alike; a case's figure
//! is the median over rounds of its per-round mean. The classic `repeat = 1,000,000` figure is
//! printed too, clearly labelled: it needs a frontend whose backend is itself.
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_common::{Counter, CtEntry, FLOW_WAYS, FlowKey, Verdict, map_names};
use lb_userspace::{
    agent::node_config,
    control::{programmer::Programmer, state::DesiredState},
    datapath::{
        flows::FlowTable,
        loader::{self, Capacities},
        maps::{AyaMaps, LbMaps as _, Op},
    },
};
use xlb_tests::{
    harness::action::{XDP_PASS, XDP_TX},
    packet::{parse, verify_checksums},
};

use crate::{
    scenario,
    stats::{self, Summary},
};

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rounds: usize,
    /// Runs (`repeat = 1`) per case per round.
    pub runs_per_round: u32,
    /// Runs of one case before the next case takes over.
    pub batch: u32,
    /// Unmeasured runs per case before the first round (JIT, caches, the established flow's
    /// conntrack entry).
    pub warmup: u32,
    /// Services of the large setup.
    pub services: usize,
    /// `repeat` of the classic figure.
    pub classic_repeat: u32,
    /// Measure only the floor and this case (profiling).
    pub only: Option<&'static str>,
}

impl Plan {
    /// ≥ 200,000 runs per case, an odd number of rounds.
    pub const FULL: Plan = Plan {
        rounds: 7,
        runs_per_round: 32_768,
        batch: 1024,
        warmup: 2048,
        services: 10_000,
        classic_repeat: 1_000_000,
        only: None,
    };
    /// A smoke test that finishes in seconds.
    pub const QUICK: Plan = Plan {
        rounds: 5,
        runs_per_round: 2000,
        batch: 250,
        warmup: 250,
        services: 10_000,
        classic_repeat: 100_000,
        only: None,
    };

    #[must_use]
    pub fn runs_per_case(&self) -> u64 {
        self.rounds as u64 * u64::from(self.runs_per_round)
    }

    /// New flows one instance sees (warm-up included).
    #[must_use]
    pub fn new_flows(&self) -> u64 {
        self.runs_per_case() + u64::from(self.warmup)
    }
}

/// Targets, as ratios to the floor of the same round.
pub const ESTABLISHED_MAX: f64 = 2.5;
pub const NEW_FLOW_MAX: f64 = 4.0;
/// A new SNATed flow against a new flow to a local backend, in the same rounds.
pub const SNAT_NEW_FLOW_VS_LOCAL_MAX: f64 = 1.5;
/// The p99 of single runs of a new SNATed flow, ns.
pub const SNAT_NEW_FLOW_P99_MAX: u32 = 2000;
/// The 10k-service figures may differ from the 1-service ones by this fraction.
pub const SCALE_MAX: f64 = 0.10;

/// A loaded datapath with its maps programmed by the agent's programmer.
struct Instance {
    ebpf: Ebpf,
    maps: AyaMaps,
    programmer: Programmer,
}

impl Instance {
    fn load(caps: &Capacities) -> anyhow::Result<Self> {
        let mut ebpf = loader::load(caps).context("loading the datapath")?;
        let mut maps = AyaMaps::new(&mut ebpf).context("taking the datapath's maps")?;
        // The node configuration the agent writes at start.
        let config = node_config(
            scenario::NODE,
            scenario::SNAT_PORTS,
            &[scenario::NODE],
            lb_common::Timeouts::default(),
        );
        maps.apply(&Op::SetConfig(config))
            .context("writing the node configuration")?;
        Ok(Self {
            ebpf,
            maps,
            programmer: Programmer::new(caps),
        })
    }

    fn program(&mut self, desired: &DesiredState) -> anyhow::Result<usize> {
        let plan = self.programmer.plan(desired);
        if let Some((service, e)) = plan.failed.first() {
            bail!(
                "{} services could not be programmed; {service}: {e}",
                plan.failed.len()
            );
        }
        for op in &plan.ops {
            self.maps.apply(op).context("writing the maps")?;
        }
        Ok(plan.ops.len())
    }

    fn nic(&mut self) -> anyhow::Result<&Xdp> {
        Ok(loader::xdp_program(&mut self.ebpf)?)
    }

    /// Packets counted per verdict (index: `Verdict as usize`), summed over CPUs.
    fn counts(&self) -> anyhow::Result<[u64; Verdict::COUNT as usize]> {
        let map = self
            .ebpf
            .map(map_names::STATS)
            .context("the stats map is missing")?;
        let stats: PerCpuArray<_, Counter> = PerCpuArray::try_from(map)?;
        let mut out = [0; Verdict::COUNT as usize];
        for v in Verdict::ALL {
            let per_cpu = stats.get(&(v as u32), 0)?;
            out[v as usize] = per_cpu.iter().map(|c| c.packets).sum();
        }
        Ok(out)
    }

    /// Flows tracked: flow-table slots in use, and forward entries of the LRU conntrack map
    /// (flows whose bucket was full).
    fn tracked_flows(&self) -> anyhow::Result<u64> {
        let table = FlowTable::open(&self.ebpf).context("the flow table")?;
        let in_table = table.used(u64::MAX)?;
        let map = self
            .ebpf
            .map(map_names::CONNTRACK)
            .context("the conntrack map is missing")?;
        let ct: HashMap<_, FlowKey, CtEntry> = HashMap::try_from(map)?;
        let overflowed = ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| e.kind == lb_common::CT_FORWARD)
            .count() as u64;
        Ok(in_table + overflowed)
    }
}

/// Which loaded datapath a case runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// The measured service alone.
    One,
    /// The measured service among `Plan::services` services.
    Many,
}

impl Setup {
    const ALL: [Setup; 2] = [Setup::One, Setup::Many];

    fn index(self) -> usize {
        match self {
            Setup::One => 0,
            Setup::Many => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Setup::One => "1-service",
            Setup::Many => "10k-service",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Program {
    /// `xlb_noop`, the floor.
    Floor,
    /// `xlb_nic`, the NIC datapath.
    Nic,
}

/// What a case sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// A packet to this node that no frontend matches, the same every run.
    NonService,
    /// The same 5-tuple to the NodePort every run (its conntrack entry exists).
    Established,
    /// A new 5-tuple to the NodePort every run.
    NewFlows,
    /// The same 5-tuple to the SNAT service's NodePort every run (SNATed to a remote pod).
    SnatEstablished,
    /// A new 5-tuple to the SNAT service's NodePort every run.
    SnatNewFlows,
}

impl Traffic {
    /// What the NIC program returns for it: SNATed packets go back out of the NIC.
    fn action(self) -> u32 {
        match self {
            Traffic::SnatEstablished | Traffic::SnatNewFlows => XDP_TX,
            _ => XDP_PASS,
        }
    }

    fn new_flows(self) -> bool {
        matches!(self, Traffic::NewFlows | Traffic::SnatNewFlows)
    }
}

/// One case of the table.
struct CaseSpec {
    /// Also the JSON key of its median.
    key: &'static str,
    label: &'static str,
    setup: Setup,
    program: Program,
    traffic: Traffic,
    /// What the datapath must count each run under (checked after the rounds).
    verdict: Option<Verdict>,
    /// The target ratio to the floor, if any.
    target: Option<f64>,
    /// The 1-service case this one is compared with (10k cases).
    compare_with: Option<&'static str>,
    /// A target against another case of the same rounds: (its key, the ratio at most).
    relative: Option<(&'static str, f64)>,
    /// A target on the p99 of single runs, ns.
    p99_max: Option<u32>,
}

/// The cases, in measuring order.
const CASES: [CaseSpec; 11] = [
    CaseSpec {
        key: "noop_ns",
        label: "no-op XDP (floor)",
        setup: Setup::One,
        program: Program::Floor,
        traffic: Traffic::Established,
        verdict: None,
        target: None,
        compare_with: None,
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "nonservice_ns",
        label: "non-service, 1 svc",
        setup: Setup::One,
        program: Program::Nic,
        traffic: Traffic::NonService,
        verdict: Some(Verdict::PassNotService),
        target: None,
        compare_with: None,
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "established_ns",
        label: "established, 1 svc",
        setup: Setup::One,
        program: Program::Nic,
        traffic: Traffic::Established,
        verdict: Some(Verdict::NatEstablished),
        target: Some(ESTABLISHED_MAX),
        compare_with: None,
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "new_flow_ns",
        label: "new flow, 1 svc",
        setup: Setup::One,
        program: Program::Nic,
        traffic: Traffic::NewFlows,
        verdict: Some(Verdict::NatNew),
        target: Some(NEW_FLOW_MAX),
        compare_with: None,
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "nonservice_ns_10k",
        label: "non-service, 10k svc",
        setup: Setup::Many,
        program: Program::Nic,
        traffic: Traffic::NonService,
        verdict: Some(Verdict::PassNotService),
        target: None,
        compare_with: Some("nonservice_ns"),
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "established_ns_10k",
        label: "established, 10k svc",
        setup: Setup::Many,
        program: Program::Nic,
        traffic: Traffic::Established,
        verdict: Some(Verdict::NatEstablished),
        target: Some(ESTABLISHED_MAX),
        compare_with: Some("established_ns"),
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "new_flow_ns_10k",
        label: "new flow, 10k svc",
        setup: Setup::Many,
        program: Program::Nic,
        traffic: Traffic::NewFlows,
        verdict: Some(Verdict::NatNew),
        target: Some(NEW_FLOW_MAX),
        compare_with: Some("new_flow_ns"),
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "snat_established_ns",
        label: "SNAT established, 1 svc",
        setup: Setup::One,
        program: Program::Nic,
        traffic: Traffic::SnatEstablished,
        verdict: Some(Verdict::SnatTx),
        target: Some(ESTABLISHED_MAX),
        compare_with: None,
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "snat_new_flow_ns",
        label: "SNAT new flow, 1 svc",
        setup: Setup::One,
        program: Program::Nic,
        traffic: Traffic::SnatNewFlows,
        verdict: Some(Verdict::SnatTx),
        target: None,
        compare_with: None,
        relative: Some(("new_flow_ns", SNAT_NEW_FLOW_VS_LOCAL_MAX)),
        p99_max: Some(SNAT_NEW_FLOW_P99_MAX),
    },
    CaseSpec {
        key: "snat_established_ns_10k",
        label: "SNAT established, 10k",
        setup: Setup::Many,
        program: Program::Nic,
        traffic: Traffic::SnatEstablished,
        verdict: Some(Verdict::SnatTx),
        target: Some(ESTABLISHED_MAX),
        compare_with: Some("snat_established_ns"),
        relative: None,
        p99_max: None,
    },
    CaseSpec {
        key: "snat_new_flow_ns_10k",
        label: "SNAT new flow, 10k",
        setup: Setup::Many,
        program: Program::Nic,
        traffic: Traffic::SnatNewFlows,
        verdict: Some(Verdict::SnatTx),
        target: None,
        compare_with: Some("snat_new_flow_ns"),
        relative: Some(("new_flow_ns_10k", SNAT_NEW_FLOW_VS_LOCAL_MAX)),
        p99_max: Some(SNAT_NEW_FLOW_P99_MAX),
    },
];

/// The cases' keys.
pub fn case_keys() -> impl Iterator<Item = &'static str> {
    CASES.iter().map(|c| c.key)
}

/// A case being measured: its packets and its per-run durations, by round.
struct Case {
    spec: &'static CaseSpec,
    /// The packet of fixed-packet cases (the kernel copies it for each run: a fresh copy).
    frame: Vec<u8>,
    /// New flows sent so far (the next flow's number).
    flows: u32,
    rounds: Vec<Vec<u32>>,
}

impl Case {
    fn new(spec: &'static CaseSpec) -> Self {
        let frame = match spec.traffic {
            Traffic::NonService => scenario::non_service_frame(),
            Traffic::Established | Traffic::NewFlows => scenario::established_frame(),
            Traffic::SnatEstablished | Traffic::SnatNewFlows => scenario::snat_established_frame(),
        };
        Self {
            spec,
            frame,
            flows: 0,
            rounds: Vec::new(),
        }
    }

    fn runs(&self) -> u64 {
        self.rounds.iter().map(|r| r.len() as u64).sum()
    }

    /// Flows this case leaves tracked: one per new flow (and the SNATed established flow,
    /// which its first run made).
    fn tracked_flows(&self) -> u64 {
        u64::from(self.flows) + u64::from(self.spec.traffic == Traffic::SnatEstablished)
    }

    /// `n` runs with `repeat = 1`, each on a fresh packet, timed into the current round (not
    /// at all before the first round: the warm-up).
    fn run_batch(&mut self, prog: &Xdp, ingress: u32, n: u32) -> anyhow::Result<()> {
        let (label, action) = (self.spec.label, self.spec.traffic.action());
        for _ in 0..n {
            let fresh = match self.spec.traffic {
                Traffic::NewFlows => Some(scenario::new_flow_frame(self.flows)),
                Traffic::SnatNewFlows => Some(scenario::snat_new_flow_frame(self.flows)),
                _ => None,
            };
            let ns = if let Some(frame) = fresh {
                self.flows += 1;
                run(prog, &frame, 1, ingress, action, label)?
            } else {
                run(prog, &self.frame, 1, ingress, action, label)?
            };
            if let Some(round) = self.rounds.last_mut() {
                round.push(u32::try_from(ns).unwrap_or(u32::MAX));
            }
        }
        Ok(())
    }
}

/// One run with `repeat` of a frame received on `ingress` (an ifindex of the benchmark's
/// node namespace, whose routes the SNAT cases' FIB lookups use); returns the kernel's
/// duration per iteration in ns.
fn run(
    prog: &Xdp,
    frame: &[u8],
    repeat: u32,
    ingress: u32,
    action: u32,
    what: &str,
) -> anyhow::Result<u64> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let md: [u32; 6] = [0, u32::try_from(frame.len()).unwrap_or(0), 0, ingress, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    let r = prog
        .test_run(opts)
        .with_context(|| format!("BPF_PROG_TEST_RUN ({what})"))?;
    ensure!(
        r.return_value == action,
        "{what}: the program returned {} instead of {action}",
        r.return_value
    );
    Ok(u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX))
}

/// Checks that the established packet is translated to one of the measured service's
/// backends with valid checksums before anything is timed.
fn check_translation(instance: &mut Instance) -> anyhow::Result<()> {
    let frame = scenario::established_frame();
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.data_out = Some(&mut out);
    let r = instance.nic()?.test_run(opts)?;
    out.truncate(r.data_size_out as usize);
    ensure!(
        r.return_value == XDP_PASS,
        "the established packet was not passed"
    );
    let dst = parse(&out).dst;
    ensure!(
        scenario::measured_backends().contains(&dst),
        "the established packet went to {dst}, not to a backend of the measured service"
    );
    verify_checksums(&out).map_err(|e| anyhow::anyhow!("translated packet: {e}"))
}

/// What the benchmark found.
pub struct Results {
    pub plan: Plan,
    pub caps: Capacities,
    pub cases: Vec<CaseResult>,
    pub scale: Vec<ScaleResult>,
    pub classic: Classic,
    pub many: ManySetup,
    pub conntrack_entries: Vec<(&'static str, u64)>,
    pub seconds: f64,
}

pub struct CaseResult {
    pub key: &'static str,
    pub label: &'static str,
    pub runs: u64,
    /// Per-round mean ns/run.
    pub per_round: Vec<f64>,
    pub ns: Summary,
    /// Per-round ratio to the floor of the same round.
    pub ratio: Summary,
    /// Over all runs: quantiles of single-run durations.
    pub p50: u32,
    pub p99: u32,
    pub target: Option<f64>,
    /// A target against another case: (its key, the ratio at most, the median over rounds
    /// of this case / that case).
    pub relative: Option<(&'static str, f64, f64)>,
    /// A target on `p99`, ns.
    pub p99_max: Option<u32>,
    /// Every run inserted a new flow (its per-round figures grow as conntrack fills).
    pub new_flows: bool,
}

impl CaseResult {
    /// Whether the case's targets are met (None: it has none).
    #[must_use]
    pub fn met(&self) -> Option<bool> {
        let checks = [
            self.target.map(|t| self.ratio.median <= t),
            self.relative.map(|(_, t, r)| r <= t),
            self.p99_max.map(|m| self.p99 <= m),
        ];
        checks.into_iter().flatten().reduce(|a, b| a && b)
    }
}

/// A 10k-service case against its 1-service twin.
pub struct ScaleResult {
    pub label: &'static str,
    pub key: &'static str,
    /// Median over rounds of (10k figure / 1-service figure) − 1.
    pub change: f64,
}

impl ScaleResult {
    #[must_use]
    pub fn met(&self) -> bool {
        self.change.abs() <= SCALE_MAX
    }
}

/// The classic figure: one `repeat`-iteration run per round of each program.
pub struct Classic {
    pub repeat: u32,
    /// Per round: the self-backend frontend's established flow, ns per iteration.
    pub established_ns: Vec<f64>,
    /// Per round: the no-op, ns per iteration.
    pub noop_ns: Vec<f64>,
}

impl Classic {
    #[must_use]
    pub fn established_median(&self) -> f64 {
        stats::median(&self.established_ns).unwrap_or(f64::NAN)
    }

    #[must_use]
    pub fn noop_median(&self) -> f64 {
        stats::median(&self.noop_ns).unwrap_or(f64::NAN)
    }
}

/// What the large setup holds.
pub struct ManySetup {
    pub services: usize,
    pub frontends: usize,
    pub backends: usize,
    pub ops: usize,
    pub program_seconds: f64,
}

/// The loaded datapaths: the two measured setups and the classic figure's.
struct Datapaths {
    /// Indexed by [`Setup::index`].
    setups: [Instance; 2],
    classic: Instance,
    many: ManySetup,
}

impl Datapaths {
    fn load(plan: &Plan, caps: &Capacities) -> anyhow::Result<Self> {
        eprintln!("datapath: loading the 1-service datapath");
        let mut one = Instance::load(caps)?;
        one.program(&scenario::one_service())?;
        loader::floor_program(&mut one.ebpf)?
            .load()
            .context("loading the floor program")?;
        check_translation(&mut one)?;

        eprintln!(
            "datapath: loading the {}-service datapath and programming it",
            plan.services
        );
        let mut many = Instance::load(caps)?;
        let desired = scenario::services(plan.services);
        let t = Instant::now();
        let ops = many.program(&desired)?;
        let many_setup = ManySetup {
            services: plan.services,
            frontends: many.programmer.frontend_count(),
            backends: many.programmer.backend_count(),
            ops,
            program_seconds: t.elapsed().as_secs_f64(),
        };
        check_translation(&mut many)?;

        let mut classic = Instance::load(&Capacities::small())?;
        classic.program(&scenario::self_backend())?;
        Ok(Self {
            setups: [one, many],
            classic,
            many: many_setup,
        })
    }

    fn program(&mut self, setup: Setup, p: Program) -> anyhow::Result<&Xdp> {
        let instance = &mut self.setups[setup.index()];
        match p {
            Program::Floor => Ok(loader::floor_program(&mut instance.ebpf)?),
            Program::Nic => instance.nic(),
        }
    }
}

/// Runs the benchmark in a node namespace of its own (the SNAT cases' FIB lookups see its
/// routes to the other node's pods, and nothing of the host's).
pub fn run_bench(plan: Plan) -> anyhow::Result<Results> {
    let node = xlb_tests::node::Node::new("dpbench").context("the node namespace")?;
    node.ns.enter(|| {
        let ingress = xlb_tests::node::ifindex("eth0");
        ensure!(ingress != 0, "no eth0 in the node namespace");
        run_in_node(plan, ingress)
    })?
}

fn run_in_node(plan: Plan, ingress: u32) -> anyhow::Result<Results> {
    let started = Instant::now();
    let caps = Capacities::default();
    // Every new flow (of both new-flow cases of a setup) must fit with room to spare, or
    // overflow to the LRU map would be part of what is measured.
    let flows_needed = 2 * plan.new_flows() + 2;
    let flow_slots = u64::from(loader::flow_buckets(caps.flow_buckets)) * FLOW_WAYS as u64;
    ensure!(
        flows_needed <= flow_slots / 2,
        "{flows_needed} flows would fill more than half of the flow table's {flow_slots} slots"
    );
    let mut dps = Datapaths::load(&plan, &caps)?;
    let mut cases: Vec<Case> = CASES
        .iter()
        .filter(|c| {
            plan.only
                .is_none_or(|only| c.key == only || c.program == Program::Floor)
        })
        .map(Case::new)
        .collect();
    for case in &mut cases {
        case.run_batch(
            dps.program(case.spec.setup, case.spec.program)?,
            ingress,
            plan.warmup,
        )?;
    }
    let classic_frame = scenario::self_backend_frame();
    // The first packet creates the conntrack entry every later iteration hits.
    let pass = XDP_PASS;
    run(
        dps.classic.nic()?,
        &classic_frame,
        1,
        ingress,
        pass,
        "classic warm-up",
    )?;
    let before = [
        dps.setups[0].counts()?,
        dps.setups[1].counts()?,
        dps.classic.counts()?,
    ];

    let mut classic = Classic {
        repeat: plan.classic_repeat,
        established_ns: Vec::new(),
        noop_ns: Vec::new(),
    };
    for round in 0..plan.rounds {
        measure_round(&plan, &mut dps, &mut cases, ingress)?;
        let floor = dps.program(Setup::One, Program::Floor)?;
        let what = "classic no-op";
        classic.noop_ns.push(run(
            floor,
            &classic_frame,
            plan.classic_repeat,
            ingress,
            pass,
            what,
        )? as f64);
        let nic = dps.classic.nic()?;
        let what = "classic established";
        classic.established_ns.push(run(
            nic,
            &classic_frame,
            plan.classic_repeat,
            ingress,
            pass,
            what,
        )? as f64);
        eprintln!("datapath: round {}/{} done", round + 1, plan.rounds);
    }

    check_verdicts(&dps, &cases, &before, &plan)?;
    let conntrack_entries = check_conntrack(&dps, &cases)?;
    Ok(Results {
        plan,
        caps,
        cases: summarize(&cases)?,
        scale: scale(&cases),
        classic,
        many: dps.many,
        conntrack_entries,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One round: `runs_per_round` runs of every case, in batches, the cases taking turns.
fn measure_round(
    plan: &Plan,
    dps: &mut Datapaths,
    cases: &mut [Case],
    ingress: u32,
) -> anyhow::Result<()> {
    for case in cases.iter_mut() {
        case.rounds
            .push(Vec::with_capacity(plan.runs_per_round as usize));
    }
    let count = cases.len();
    for b in 0..plan.runs_per_round.div_ceil(plan.batch) {
        let n = plan.batch.min(plan.runs_per_round - b * plan.batch);
        // Rotate which case goes first, so that none always follows the same other one.
        for i in 0..count {
            let case = &mut cases[(i + b as usize) % count];
            case.run_batch(dps.program(case.spec.setup, case.spec.program)?, ingress, n)?;
        }
    }
    Ok(())
}

/// Every timed run must have taken the path its case names: the verdict counters grew by
/// exactly the runs of each case (the no-op counts nothing), and every iteration of the
/// classic runs hit conntrack.
fn check_verdicts(
    dps: &Datapaths,
    cases: &[Case],
    before: &[[u64; Verdict::COUNT as usize]; 3],
    plan: &Plan,
) -> anyhow::Result<()> {
    for setup in Setup::ALL {
        let after = dps.setups[setup.index()].counts()?;
        for v in Verdict::ALL {
            let want: u64 = cases
                .iter()
                .filter(|c| c.spec.setup == setup && c.spec.verdict == Some(v))
                .map(Case::runs)
                .sum();
            let got = after[v as usize] - before[setup.index()][v as usize];
            ensure!(
                got == want,
                "the {} datapath counted {got} packets as {} instead of {want}: the \
                 benchmark did not measure what it claims",
                setup.name(),
                v.name()
            );
        }
    }
    let after = dps.classic.counts()?;
    let est = Verdict::NatEstablished as usize;
    let want = u64::from(plan.classic_repeat) * plan.rounds as u64;
    ensure!(
        after[est] - before[2][est] == want,
        "the classic runs did not hit conntrack on every iteration"
    );
    Ok(())
}

/// Nothing may have been evicted from conntrack: it holds exactly the established flow's pair
/// (from `check_translation`) and both entries of every new flow.
fn check_conntrack(dps: &Datapaths, cases: &[Case]) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let mut entries = Vec::new();
    for setup in Setup::ALL {
        let want: u64 = 1 + cases
            .iter()
            .filter(|c| c.spec.setup == setup)
            .map(Case::tracked_flows)
            .sum::<u64>();
        let n = dps.setups[setup.index()].tracked_flows()?;
        ensure!(
            n == want,
            "the {} datapath tracks {n} flows, expected {want}: flows were lost",
            setup.name()
        );
        entries.push((setup.name(), n));
    }
    Ok(entries)
}

fn per_round_means(case: &Case) -> Vec<f64> {
    case.rounds
        .iter()
        .map(|r| stats::mean(r).unwrap_or(f64::NAN))
        .collect()
}

fn summarize(cases: &[Case]) -> anyhow::Result<Vec<CaseResult>> {
    let floor = cases
        .iter()
        .find(|c| c.spec.program == Program::Floor)
        .map(per_round_means)
        .context("no floor case")?;
    cases
        .iter()
        .map(|c| {
            let per_round = per_round_means(c);
            let ratios: Vec<f64> = per_round.iter().zip(&floor).map(|(x, f)| x / f).collect();
            let all: Vec<u32> = c.rounds.iter().flatten().copied().collect();
            Ok(CaseResult {
                key: c.spec.key,
                label: c.spec.label,
                runs: c.runs(),
                ns: stats::summarize(&per_round).context("no rounds")?,
                ratio: stats::summarize(&ratios).context("no rounds")?,
                p50: stats::quantile(&all, 0.5).unwrap_or(0),
                p99: stats::quantile(&all, 0.99).unwrap_or(0),
                relative: c.spec.relative.and_then(|(key, t)| {
                    let other = cases.iter().find(|o| o.spec.key == key)?;
                    let ratios: Vec<f64> = per_round
                        .iter()
                        .zip(per_round_means(other))
                        .map(|(x, o)| x / o)
                        .collect();
                    Some((key, t, stats::median(&ratios)?))
                }),
                p99_max: c.spec.p99_max,
                per_round,
                target: c.spec.target,
                new_flows: c.spec.traffic.new_flows(),
            })
        })
        .collect()
}

fn scale(cases: &[Case]) -> Vec<ScaleResult> {
    cases
        .iter()
        .filter_map(|c| {
            let twin = cases
                .iter()
                .find(|t| Some(t.spec.key) == c.spec.compare_with)?;
            let changes: Vec<f64> = per_round_means(c)
                .iter()
                .zip(per_round_means(twin))
                .map(|(many, one)| many / one - 1.0)
                .collect();
            Some(ScaleResult {
                label: c.spec.label,
                key: c.spec.key,
                change: stats::median(&changes)?,
            })
        })
        .collect()
}
