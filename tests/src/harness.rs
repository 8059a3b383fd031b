//! Running the datapath's programs on test frames through `BPF_PROG_TEST_RUN`, with its maps
//! programmed through the same programmer the agent uses.
use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, TestRunResult},
};
use lb_common::{
    Config, Counter, CtEntry, FlowBucket, FlowKey, NatBucket, NatEntry, PortRange, SnatEntry,
    Timeouts, Verdict, map_names,
};
use lb_userspace::{
    control::{programmer::Programmer, state::DesiredState},
    datapath::{
        flows::{FlowTable, OverflowSweeper, Sweep, open_conntrack},
        loader::{self, Capacities, HostRouting},
        mapmem::BucketArray,
        maps::{AyaMaps, LbMaps as _, Op},
        nattable::NatTable,
    },
};

/// A loaded (not attached) datapath and its writable maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: AyaMaps,
    pub programmer: Programmer,
}

/// What a program did with a frame.
#[derive(Debug)]
pub struct Outcome {
    pub action: u32,
    pub frame: Vec<u8>,
}

impl Datapath {
    #[must_use]
    pub fn load() -> Self {
        Self::load_routing(HostRouting::Kernel)
    }

    /// The datapath loaded with the given host routing.
    #[must_use]
    pub fn load_routing(routing: HostRouting) -> Self {
        let caps = Capacities::small();
        let mut ebpf = loader::load_routing(&caps, routing).expect("loading the datapath");
        let maps = AyaMaps::new(&mut ebpf).expect("datapath maps");
        Self {
            ebpf,
            maps,
            programmer: Programmer::new(&caps),
        }
    }

    /// Programs `desired` the way the agent does; panics if a service fails.
    pub fn program(&mut self, desired: &DesiredState) {
        let plan = self.programmer.plan(desired);
        assert!(plan.failed.is_empty(), "services failed: {:?}", plan.failed);
        for op in &plan.ops {
            if std::env::var("XLB_DEBUG_OPS").is_ok() {
                eprintln!("{op:?}");
            }
            self.maps.apply(op).expect("applying an op");
        }
    }

    /// Sets the SNAT address and port range (host order, inclusive).
    pub fn set_snat(&mut self, addr: Ipv4Addr, ports: (u16, u16)) {
        self.set_snat_ranges(
            addr,
            &[PortRange::new(ports.0, ports.1)],
            Timeouts::default(),
        );
    }

    /// Sets the SNAT address, port ranges and timeouts, as the agent writes them.
    pub fn set_snat_ranges(&mut self, addr: Ipv4Addr, ranges: &[PortRange], timeouts: Timeouts) {
        self.set_config(lb_userspace::agent::node_config(
            addr,
            ranges,
            &[],
            timeouts,
        ));
    }

    /// Writes the node configuration (SNAT address, range, timeouts).
    pub fn set_config(&mut self, cfg: Config) {
        self.maps.apply(&Op::SetConfig(cfg)).expect("config");
    }

    /// Runs the NIC (XDP) program once on `frame` (ingress: loopback).
    #[must_use]
    pub fn xdp(&mut self, frame: &[u8]) -> Outcome {
        self.xdp_on(frame, 0)
    }

    /// Runs the NIC program once on `frame` as received on `ifindex` (0: loopback).
    #[must_use]
    pub fn xdp_on(&mut self, frame: &[u8], ifindex: u32) -> Outcome {
        let prog = loader::xdp_program(&mut self.ebpf).expect("xdp program");
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        run(
            |opts| prog.test_run(opts),
            frame,
            (ifindex != 0).then_some(&ctx),
        )
    }

    /// Runs the pod (TC) program once on `frame` (device: loopback).
    #[must_use]
    pub fn tc(&mut self, frame: &[u8]) -> Outcome {
        self.tc_on(frame, 0)
    }

    /// Runs the pod program once on `frame` as received on `ifindex` (0: loopback).
    #[must_use]
    pub fn tc_on(&mut self, frame: &[u8], ifindex: u32) -> Outcome {
        let prog = loader::tc_program(&mut self.ebpf).expect("tc program");
        // struct __sk_buff is 192 bytes; test-run reads len, ifindex and a few others.
        // ifindex is its 11th u32 (len, pkt_type, mark, queue_mapping, protocol, vlan_present,
        // vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex).
        let mut skb = [0u8; 192];
        skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        run(
            |opts| prog.test_run(opts),
            frame,
            (ifindex != 0).then_some(&skb[..]),
        )
    }

    /// Runs `program` (`nic_xdp`, `pod_tc` or `nic_tc_ingress`) once on `frame` as received on
    /// `ifindex`; an error where `BPF_PROG_TEST_RUN` refuses the frame (the kernel builds no
    /// skb from an IPv4 or IPv6 frame too short for its header, nor a context from a frame
    /// shorter than Ethernet's).
    pub fn try_run(
        &mut self,
        program: &str,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<Outcome, ProgramError> {
        let mut skb = [0u8; 192];
        skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let md: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let xdp_ctx: Vec<u8> = md.iter().flat_map(|v| v.to_ne_bytes()).collect();
        match program {
            "nic_xdp" => {
                let prog = loader::xdp_program(&mut self.ebpf).expect("xdp program");
                try_run(|opts| prog.test_run(opts), frame, Some(&xdp_ctx))
            }
            "pod_tc" => {
                let prog = loader::tc_program(&mut self.ebpf).expect("tc program");
                try_run(|opts| prog.test_run(opts), frame, Some(&skb))
            }
            _ => {
                let prog =
                    loader::nic_ingress_program(&mut self.ebpf).expect("nic ingress program");
                try_run(|opts| prog.test_run(opts), frame, Some(&skb))
            }
        }
    }

    /// Packets counted per verdict (in [`Verdict::ALL`] order), summed over CPUs.
    #[must_use]
    pub fn counts(&self) -> [u64; Verdict::COUNT as usize] {
        let mut out = [0; Verdict::COUNT as usize];
        for (slot, v) in out.iter_mut().zip(Verdict::ALL) {
            *slot = self.count(v);
        }
        out
    }

    /// Runs the pod program on each list of frames in its own thread, all at once (one
    /// thread per CPU makes the runs concurrent), each list in order. Returns the outcomes in
    /// the same shape.
    #[must_use]
    pub fn tc_concurrently(&mut self, lists: &[Vec<Vec<u8>>]) -> Vec<Vec<Outcome>> {
        let prog: &SchedClassifier = loader::tc_program(&mut self.ebpf).expect("tc program");
        std::thread::scope(|scope| {
            let handles: Vec<_> = lists
                .iter()
                .map(|frames| {
                    scope.spawn(move || {
                        frames
                            .iter()
                            .map(|f| run(|opts| prog.test_run(opts), f, None))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("test-run thread"))
                .collect()
        })
    }

    /// Packets counted for `verdict`, summed over CPUs.
    #[must_use]
    pub fn count(&self, verdict: Verdict) -> u64 {
        let stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).expect("stats map"))
                .expect("stats map type");
        stats
            .get(&(verdict as u32), 0)
            .expect("stats read")
            .iter()
            .map(|c| c.packets)
            .sum()
    }

    /// Times the datapath counted `event`, summed over CPUs.
    #[must_use]
    pub fn event(&self, event: lb_common::Event) -> u64 {
        let events: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::EVENTS).expect("events map"))
                .expect("events map type");
        events
            .get(&(event as u32), 0)
            .expect("events read")
            .iter()
            .sum()
    }

    /// All conntrack entries: those the flow table's flows stand for, then the LRU map's.
    #[must_use]
    pub fn conntrack(&self) -> Vec<(FlowKey, CtEntry)> {
        let mut out = self.flow_table_entries();
        out.extend(self.overflow_conntrack());
        out
    }

    /// The conntrack entries the flow table's flows stand for.
    #[must_use]
    pub fn flow_table_entries(&self) -> Vec<(FlowKey, CtEntry)> {
        FlowTable::open(&self.ebpf)
            .expect("flow table")
            .all_entries()
            .expect("flow table read")
    }

    /// Buckets of the flow table.
    #[must_use]
    pub fn flow_buckets(&self) -> u32 {
        loader::flow_buckets(Capacities::small().flow_buckets)
    }

    /// Empties the flow table.
    pub fn clear_flow_table(&mut self) {
        let mut table: Array<_, FlowBucket> =
            Array::try_from(self.ebpf.map_mut(map_names::FLOWS).expect("flow table"))
                .expect("flow table type");
        for i in 0..table.len() {
            table
                .set(i, FlowBucket::default(), 0)
                .expect("flow table write");
        }
    }

    /// Marks every flow-table bucket as overflowed (as the agent does when it takes over the
    /// conntrack map of a datapath without the table).
    pub fn mark_flow_table_overflowed(&self) {
        FlowTable::open(&self.ebpf)
            .expect("flow table")
            .mark_all_overflowed()
            .expect("marking the flow table");
    }

    /// One sweep of `sweeper` over the overflow marks, as the agent's sweeper thread does.
    #[must_use]
    pub fn sweep_overflow(&self, sweeper: &mut OverflowSweeper) -> Sweep {
        sweeper
            .sweep(
                &FlowTable::open(&self.ebpf).expect("flow table"),
                &open_conntrack(&self.ebpf).expect("conntrack map"),
            )
            .expect("sweeping the flow table")
    }

    /// Removes every entry of the LRU conntrack map.
    pub fn clear_conntrack(&mut self) {
        let mut ct: HashMap<_, FlowKey, CtEntry> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).expect("ct map"))
                .expect("ct map type");
        let keys: Vec<FlowKey> = ct.keys().filter_map(Result::ok).collect();
        for k in keys {
            ct.remove(&k).expect("ct remove");
        }
    }

    /// Writes entries into the LRU conntrack map.
    pub fn insert_conntrack(&mut self, entries: &[(FlowKey, CtEntry)]) {
        let mut ct: HashMap<_, FlowKey, CtEntry> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).expect("ct map"))
                .expect("ct map type");
        for (k, v) in entries {
            ct.insert(k, v, 0).expect("ct insert");
        }
    }

    /// The LRU conntrack map's entries (flows whose flow-table bucket was full).
    #[must_use]
    pub fn overflow_conntrack(&self) -> Vec<(FlowKey, CtEntry)> {
        let ct: HashMap<_, FlowKey, CtEntry> =
            HashMap::try_from(self.ebpf.map(map_names::CONNTRACK).expect("ct map"))
                .expect("ct map type");
        ct.iter().filter_map(Result::ok).collect()
    }

    /// All entries of the SNAT table in use (expired ones included until they are reused).
    #[must_use]
    pub fn snat(&self) -> Vec<NatEntry> {
        NatTable::open(&self.ebpf)
            .expect("SNAT table")
            .entries()
            .expect("SNAT table read")
    }

    /// The entries of the legacy LRU SNAT map (a layout-version-1 datapath's).
    #[must_use]
    pub fn snat_legacy(&self) -> Vec<(FlowKey, SnatEntry)> {
        let m: HashMap<_, FlowKey, SnatEntry> = HashMap::try_from(
            self.ebpf
                .map(map_names::SNAT_LEGACY)
                .expect("legacy snat map"),
        )
        .expect("legacy snat map type");
        m.iter().filter_map(Result::ok).collect()
    }

    /// Writes entries into the legacy LRU SNAT map, as a layout-version-1 datapath did.
    pub fn insert_snat_legacy(&mut self, entries: &[(FlowKey, SnatEntry)]) {
        let mut m: HashMap<_, FlowKey, SnatEntry> = HashMap::try_from(
            self.ebpf
                .map_mut(map_names::SNAT_LEGACY)
                .expect("legacy snat map"),
        )
        .expect("legacy snat map type");
        for (k, v) in entries {
            m.insert(k, v, 0).expect("legacy snat insert");
        }
    }

    /// Sets backend `id`'s SNAT port cursor (the index, in the ranges, of the port its next
    /// new flow tries first; 0 means "from the flow hash").
    pub fn set_snat_cursor(&mut self, id: u32, index: u32) {
        let mut cursors: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(map_names::NAT_CURSORS).expect("cursors"))
                .expect("cursors type");
        cursors.set(id, index, 0).expect("cursor write");
    }

    /// Moves the datapath's clock `secs` seconds on, as far as tracked flows can tell: every
    /// time the flow table and the SNAT table hold (last seen, created) moves that far back,
    /// so a test sees hours of idleness pass at once.
    pub fn advance_clock(&self, secs: u32) {
        let flows: BucketArray<FlowBucket> =
            BucketArray::open(&self.ebpf, map_names::FLOWS).expect("flow table");
        flows
            .for_each_mut(|_, b| {
                // SAFETY: a mapped bucket of a table no program runs on meanwhile (tests run
                // the programs from this thread).
                for slot in unsafe { &mut (*b).slots } {
                    if slot.client_addr_be != 0 {
                        slot.last_seen_s = slot.last_seen_s.wrapping_sub(secs);
                    }
                }
            })
            .expect("aging the flow table");
        let nat: BucketArray<NatBucket> =
            BucketArray::open(&self.ebpf, map_names::NAT).expect("SNAT table");
        nat.for_each_mut(|_, b| {
            // SAFETY: as above.
            for e in unsafe { &mut (*b).entries } {
                if e.nat_addr_be != 0 {
                    e.last_seen_s = e.last_seen_s.wrapping_sub(secs);
                    e.created_s = e.created_s.wrapping_sub(secs);
                }
            }
        })
        .expect("aging the SNAT table");
    }
}

fn run(
    f: impl FnOnce(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
    frame: &[u8],
    ctx: Option<&[u8]>,
) -> Outcome {
    record_for_fuzzing(frame);
    try_run(f, frame, ctx).expect("BPF_PROG_TEST_RUN")
}

fn try_run(
    f: impl FnOnce(TestRunOptions<'_>) -> Result<TestRunResult, ProgramError>,
    frame: &[u8],
    ctx: Option<&[u8]>,
) -> Result<Outcome, ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = ctx;
    let result = f(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok(Outcome {
        action: result.return_value,
        frame: out,
    })
}

/// With `XLB_PACKET_CORPUS=<dir>` set, every frame a packet test runs (not the fuzzer's own
/// frames, which go through [`Datapath::try_run`]) is kept there (one file per
/// distinct frame, named by its hash): the packet fuzzer's corpus (`cargo xtask fuzz`).
fn record_for_fuzzing(frame: &[u8]) {
    let Some(dir) = std::env::var_os("XLB_PACKET_CORPUS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    // FNV-1a: stable across runs, so the same frame is one file.
    let hash = frame.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join(format!("{hash:016x}.bin")), frame));
    if let Err(e) = written {
        eprintln!(
            "XLB_PACKET_CORPUS: cannot keep a frame in {}: {e}",
            dir.display()
        );
    }
}

/// XDP and TC return codes (`linux/bpf.h`, `linux/pkt_cls.h`).
pub mod action {
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const XDP_REDIRECT: u32 = 4;
    /// tcx's `TCX_NEXT` (`TC_ACT_UNSPEC`, -1): passed on to the next program, then the kernel.
    pub const TC_NEXT: u32 = u32::MAX;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
}
