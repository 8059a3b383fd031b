//! The packet fuzzer behind `cargo xtask fuzz`: mutations of a corpus (the packet tests' inputs
//! and generated frames for every frontend kind, both scopes, both protocols, replies and
//! non-service traffic) run through every program of the datapath with `BPF_PROG_TEST_RUN`,
//! with services loaded, first with no live flows and then with the seeds' flows established.
//! An oracle judges each run; a violation carries the frames in hex so it can become a packet
//! test.
//!
//! The oracle, per packet:
//! - exactly one verdict counter moved, by one (the NIC TC ingress program counts none);
//! - the action is one the program may return, and agrees with the verdict (pass verdicts
//!   pass, drop verdicts drop);
//! - a pass leaves the frame byte for byte and the flow and SNAT tables as they were;
//! - a translation is of a frame the node's kernel would take (see
//!   [`frame::kernel_would_drop`]), changes only what NAT may change (MACs, TTL, addresses,
//!   ports, checksums) to endpoints the maps hold (backends forward, frontends in replies,
//!   the SNAT address and range, clients seen), keeps the IPv4 header checksum valid, the L4
//!   checksum valid where the input's was, and a UDP checksum of 0 at 0.
pub mod frame;
pub mod mutate;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use lb_common::{HAIRPIN_ADDR, Verdict};
use lb_userspace::{
    control::state::{
        BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec, Proto,
        Scope, ServicePortRef,
    },
    datapath::loader::HostRouting,
};

use self::{
    frame::{endpoint, ip, ip_checksum_ok, kernel_would_drop, l4_checksum_ok, udp_checksum_field},
    mutate::{MUTATIONS, Rng},
};
use crate::{
    harness::{
        Datapath, Outcome,
        action::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_NEXT, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    },
    packet::{ETH_HLEN, Frame},
};

/// This node (as in [`crate::node`]) and the cluster the fuzzer programs.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE_PODS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 2, 5), Ipv4Addr::new(10, 244, 3, 5)];
const SNAT_PORTS: (u16, u16) = (61000, 61999);
const POD_PORT: u16 = 8080;

/// The programs the fuzzer runs, by report name.
pub const PROGRAMS: [&str; 3] = ["nic_xdp", "pod_tc", "nic_tc_ingress"];

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub packets: u64,
    pub seeds: usize,
    pub programs: BTreeMap<&'static str, ProgramReport>,
    pub violations: Vec<Violation>,
    /// Every violation counted, also beyond the reproducers kept.
    pub violations_total: u64,
    /// Violations per program and rule.
    pub by_rule: BTreeMap<(&'static str, String), u64>,
}

#[derive(Debug, Default)]
pub struct ProgramReport {
    pub packets: u64,
    /// Frames `BPF_PROG_TEST_RUN` refuses to run (shorter than an Ethernet header; for the TC
    /// programs, IPv4/IPv6 frames too short for their header): counted, not judged.
    pub refused: u64,
    pub verdicts: BTreeMap<&'static str, u64>,
    pub mutations: BTreeMap<&'static str, u64>,
    pub violations: u64,
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub program: &'static str,
    pub mutation: &'static str,
    pub rule: String,
    pub verdict: String,
    pub action: u32,
    pub input: Vec<u8>,
    pub output: Vec<u8>,
}

/// Reproducers kept per (program, rule).
const KEEP_PER_RULE: usize = 3;

fn service(name: &str, proto: Proto) -> ServicePortRef {
    ServicePortRef {
        namespace: "fuzz".into(),
        name: name.into(),
        port_name: proto.to_string().into(),
    }
}

/// The frontends: the tomcat6 case (NodePort 32510 and ClusterIP over one local and two remote
/// pods, SNAT for remote ones), a LoadBalancer IP and an ExternalIP of that Service, an
/// eTP=Local LoadBalancer, and a Service without endpoints; TCP and UDP, both scopes.
#[must_use]
pub fn cluster() -> DesiredState {
    let mut d = DesiredState::default();
    let pods: Vec<Ipv4Addr> = std::iter::once(LOCAL_POD).chain(REMOTE_PODS).collect();
    for proto in [Proto::Tcp, Proto::Udp] {
        let all: Vec<BackendSpec> = pods
            .iter()
            .map(|ip| BackendSpec {
                addr: BackendAddr {
                    addr: *ip,
                    port: POD_PORT,
                    proto,
                },
                local: *ip == LOCAL_POD,
            })
            .collect();
        let local: Vec<BackendSpec> = all.iter().copied().filter(|b| b.local).collect();
        for scope in [Scope::External, Scope::Internal] {
            let entries = [
                (
                    NODE,
                    32510,
                    FrontendKind::NodePort,
                    "tomcat6",
                    all.clone(),
                    true,
                ),
                (
                    Ipv4Addr::new(10, 96, 0, 10),
                    80,
                    FrontendKind::ClusterIp,
                    "tomcat6",
                    all.clone(),
                    true,
                ),
                (
                    Ipv4Addr::new(192, 0, 2, 50),
                    80,
                    FrontendKind::LoadBalancer,
                    "tomcat6",
                    all.clone(),
                    true,
                ),
                (
                    Ipv4Addr::new(198, 51, 100, 20),
                    80,
                    FrontendKind::ExternalIp,
                    "tomcat6",
                    all.clone(),
                    true,
                ),
                (
                    Ipv4Addr::new(192, 0, 2, 51),
                    443,
                    FrontendKind::LoadBalancer,
                    "local",
                    local.clone(),
                    false,
                ),
                (
                    Ipv4Addr::new(10, 96, 0, 11),
                    53,
                    FrontendKind::ClusterIp,
                    "empty",
                    Vec::new(),
                    true,
                ),
            ];
            for (addr, port, kind, name, backends, snat) in entries {
                d.frontends.insert(
                    FrontendAddr {
                        addr,
                        port,
                        proto,
                        scope,
                    },
                    FrontendSpec {
                        service: service(name, proto),
                        kind,
                        backends,
                        snat_remote: snat,
                        affinity_timeout_s: 0,
                    },
                );
            }
        }
    }
    d
}

/// The endpoints a translation may write.
struct Known {
    frontends: BTreeSet<([u8; 4], u16)>,
    backends: BTreeSet<([u8; 4], u16)>,
    /// Sources of frames that were translated forward: where replies may go back to.
    clients: BTreeSet<([u8; 4], u16)>,
}

impl Known {
    fn new(d: &DesiredState) -> Self {
        let mut k = Self {
            frontends: BTreeSet::new(),
            backends: BTreeSet::new(),
            clients: BTreeSet::new(),
        };
        for (f, spec) in &d.frontends {
            k.frontends.insert((f.addr.octets(), f.port));
            for b in &spec.backends {
                k.backends.insert((b.addr.addr.octets(), b.addr.port));
            }
        }
        k
    }

    fn snat(e: ([u8; 4], u16)) -> bool {
        (e.0 == NODE.octets() && (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&e.1))
            || e.0 == HAIRPIN_ADDR
    }

    fn any(&self, e: ([u8; 4], u16)) -> bool {
        self.frontends.contains(&e)
            || self.backends.contains(&e)
            || self.clients.contains(&e)
            || Self::snat(e)
    }
}

/// Generated seeds: for every frontend, TCP SYN/ACK/FIN/RST and UDP frames from clients
/// outside (NIC) and from the local pod (pod interface), with and without IP options; the
/// backends' replies to those clients; and non-service frames.
#[must_use]
pub fn generated_seeds(d: &DesiredState) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let outside = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 40000);
    let pod_client = SocketAddrV4::new(LOCAL_POD, 43000);
    for (f, spec) in &d.frontends {
        let dst = SocketAddrV4::new(f.addr, f.port);
        let client = if f.scope == Scope::External {
            outside
        } else {
            pod_client
        };
        let base = match f.proto {
            Proto::Tcp => Frame::tcp(client, dst),
            Proto::Udp => Frame::udp(client, dst),
        };
        let mut variants = vec![base.clone()];
        if f.proto == Proto::Tcp {
            for flags in [0x10, 0x11, 0x04, 0x18] {
                variants.push(Frame {
                    tcp_flags: flags,
                    ..base.clone()
                });
            }
        } else {
            variants.push(Frame {
                udp_no_checksum: true,
                ..base.clone()
            });
        }
        variants.push(Frame {
            ip_options: vec![1, 1, 1, 0],
            ..base.clone()
        });
        for v in &variants {
            out.push(v.build());
        }
        for b in &spec.backends {
            let reply = Frame {
                src: SocketAddrV4::new(b.addr.addr, b.addr.port),
                dst: client,
                tcp_flags: 0x12,
                ..base.clone()
            };
            out.push(reply.build());
        }
    }
    let other = SocketAddrV4::new(NODE, 22);
    out.push(Frame::tcp(outside, other).build());
    out.push(Frame::udp(outside, SocketAddrV4::new(NODE, 53)).build());
    out.push(
        Frame::tcp(
            pod_client,
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, 9), 80),
        )
        .build(),
    );
    out
}

/// The frames under `dir` (one per file), if it exists.
#[must_use]
pub fn corpus_from(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// One program's datapath and how to run a frame through it.
struct Target {
    name: &'static str,
    dp: Datapath,
    ifindex: u32,
    tc: bool,
    counts_verdicts: bool,
}

impl Target {
    fn new(name: &'static str, desired: &DesiredState, eth0: u32, lxc0: u32) -> Self {
        let routing = if name == "nic_tc_ingress" {
            HostRouting::Bpf
        } else {
            HostRouting::Kernel
        };
        let mut dp = Datapath::load_routing(routing);
        dp.program(desired);
        dp.set_snat(NODE, SNAT_PORTS);
        Self {
            name,
            dp,
            ifindex: if name == "pod_tc" { lxc0 } else { eth0 },
            tc: name != "nic_xdp",
            counts_verdicts: name != "nic_tc_ingress",
        }
    }

    fn run(&mut self, frame: &[u8]) -> Option<Outcome> {
        self.dp.try_run(self.name, frame, self.ifindex).ok()
    }

    /// (flow-table entries, SNAT-table entries): the state a passed frame must not change.
    fn state(&self) -> (usize, usize) {
        (self.dp.flow_table_entries().len(), self.dp.snat().len())
    }
}

/// Runs `packets` mutated frames through each program (inside the node namespace of
/// [`crate::node`], whose `eth0` and `lxc0` indexes are given).
#[must_use]
pub fn run(packets: u64, seed: u64, corpus: &[Vec<u8>], eth0: u32, lxc0: u32) -> Report {
    let desired = cluster();
    let mut seeds = generated_seeds(&desired);
    seeds.extend(corpus.iter().cloned());
    let mut report = Report {
        seeds: seeds.len(),
        ..Report::default()
    };
    let mut kept: BTreeMap<(&'static str, String), usize> = BTreeMap::new();
    for (p, name) in PROGRAMS.iter().enumerate() {
        let mut rng = Rng::new(seed ^ ((p as u64 + 1) << 56));
        let mut target = Target::new(name, &desired, eth0, lxc0);
        let mut known = Known::new(&desired);
        let mut pr = ProgramReport::default();
        let mut counts = target.dp.counts();
        let mut state = target.state();
        for i in 0..packets {
            // The first half runs with no live flows (the tables are emptied every 64
            // frames); the second with the seeds' flows established.
            if i < packets / 2 && i % 64 == 0 {
                target.dp.clear_flow_table();
                state = target.state();
            }
            if i == packets / 2 {
                for s in &seeds {
                    // A seed translated here starts a flow whose replies go back to its source.
                    if let Some(out) = target.run(s)
                        && out.frame != *s
                        && let Some(i) = ip(s)
                        && let Some(src) = endpoint(s, ETH_HLEN + 12, i.l4)
                    {
                        known.clients.insert(src);
                    }
                }
                counts = target.dp.counts();
                state = target.state();
            }
            let mut input = seeds[rng.below(seeds.len())].clone();
            let m = if rng.chance(10) {
                0
            } else {
                1 + rng.below(MUTATIONS.len() - 1)
            };
            mutate::apply(&mut rng, m, &mut input);
            if rng.chance(15) {
                // A second lie on top of the first.
                let m2 = 1 + rng.below(MUTATIONS.len() - 1);
                mutate::apply(&mut rng, m2, &mut input);
            }
            let mutation = MUTATIONS[m];
            *pr.mutations.entry(mutation).or_default() += 1;
            pr.packets += 1;
            report.packets += 1;
            let Some(out) = target.run(&input) else {
                pr.refused += 1;
                continue;
            };
            let now = target.dp.counts();
            let new_state = target.state();
            let judged = judge(
                &target, &input, &out, &counts, &now, state, new_state, &mut known,
            );
            *pr.verdicts.entry(judged.verdict).or_default() += 1;
            for rule in judged.violations {
                pr.violations += 1;
                report.violations_total += 1;
                *report
                    .by_rule
                    .entry((target.name, rule.clone()))
                    .or_default() += 1;
                let slot = kept.entry((target.name, rule.clone())).or_default();
                if *slot < KEEP_PER_RULE {
                    *slot += 1;
                    report.violations.push(Violation {
                        program: target.name,
                        mutation,
                        rule,
                        verdict: judged.verdict.to_string(),
                        action: out.action,
                        input: input.clone(),
                        output: out.frame.clone(),
                    });
                }
            }
            counts = now;
            state = new_state;
        }
        report.programs.insert(name, pr);
    }
    report
}

struct Judged {
    verdict: &'static str,
    violations: Vec<String>,
}

fn verdict_of(before: &[u64], after: &[u64]) -> Result<Verdict, String> {
    let moved: Vec<(Verdict, u64)> = Verdict::ALL
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a != b)
        .map(|(v, (b, a))| (*v, a.wrapping_sub(*b)))
        .collect();
    match moved.as_slice() {
        [(v, 1)] => Ok(*v),
        _ => Err(format!(
            "counters: {}",
            moved
                .iter()
                .map(|(v, d)| format!("{} +{d}", v.name()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn is_pass(v: Verdict) -> bool {
    matches!(
        v,
        Verdict::PassNotService
            | Verdict::PassMalformed
            | Verdict::PassFragment
            | Verdict::PassOtherProto
            | Verdict::PassTtl
    )
}

fn is_translation(v: Verdict) -> bool {
    matches!(
        v,
        Verdict::NatNew | Verdict::NatEstablished | Verdict::ReverseNat | Verdict::SnatTx
    )
}

#[allow(clippy::too_many_arguments)]
fn judge(
    t: &Target,
    input: &[u8],
    out: &Outcome,
    before: &[u64],
    after: &[u64],
    state: (usize, usize),
    new_state: (usize, usize),
    known: &mut Known,
) -> Judged {
    let mut v = Vec::new();
    let untouched = out.frame == input;
    let passes = if t.tc {
        out.action == TC_NEXT
    } else {
        out.action == XDP_PASS
    };
    let drops = if t.tc {
        out.action == TC_ACT_SHOT
    } else {
        out.action == XDP_DROP
    };
    let valid_action = if t.tc {
        [TC_NEXT, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&out.action)
    } else {
        [XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT].contains(&out.action)
    };
    if !valid_action {
        v.push(format!(
            "action {} is not one this program returns",
            out.action
        ));
    }
    if !t.counts_verdicts {
        // The NIC TC ingress program only hands marked frames on; nothing else may change.
        if !(untouched && passes) {
            check_translation(input, out, &mut v, None, known);
        }
        return Judged {
            verdict: if untouched { "untouched" } else { "changed" },
            violations: v,
        };
    }
    let verdict = match verdict_of(before, after) {
        Ok(verdict) => verdict,
        Err(e) => {
            v.push(e);
            return Judged {
                verdict: "uncounted",
                violations: v,
            };
        }
    };
    if is_pass(verdict) {
        if !untouched {
            v.push(format!("{} but the frame changed", verdict.name()));
        }
        if !passes {
            v.push(format!("{} with action {}", verdict.name(), out.action));
        }
        if state != new_state {
            v.push(format!(
                "{} but the flow/SNAT tables changed ({state:?} -> {new_state:?})",
                verdict.name()
            ));
        }
    } else if is_translation(verdict) {
        if drops {
            v.push(format!("{} with a drop action", verdict.name()));
        }
        check_translation(input, out, &mut v, Some(verdict), known);
    } else if !drops {
        v.push(format!("{} with action {}", verdict.name(), out.action));
    }
    Judged {
        verdict: verdict.name(),
        violations: v,
    }
}

/// The rules for a frame that came out changed.
fn check_translation(
    input: &[u8],
    out: &Outcome,
    v: &mut Vec<String>,
    verdict: Option<Verdict>,
    known: &mut Known,
) {
    if let Some(reason) = kernel_would_drop(input) {
        v.push(format!("translated a frame the kernel refuses: {reason}"));
        return;
    }
    let Some(ipi) = ip(input) else { return };
    let o = &out.frame;
    if o.len() != input.len() {
        v.push(format!("length changed {} -> {}", input.len(), o.len()));
        return;
    }
    let csum = frame::l4_csum_offset(ipi.proto).unwrap_or(0);
    let allowed = |i: usize| {
        i < 12
            || i == ETH_HLEN + 8
            || (ETH_HLEN + 10..ETH_HLEN + 20).contains(&i)
            || (ipi.l4..ipi.l4 + 4).contains(&i)
            || (ipi.l4 + csum..ipi.l4 + csum + 2).contains(&i)
    };
    if let Some(i) = (0..o.len()).find(|&i| o[i] != input[i] && !allowed(i)) {
        v.push(format!("byte {i} changed, which NAT does not touch"));
    }
    let Some(ipo) = ip(o) else {
        v.push("output is not IPv4".into());
        return;
    };
    if !ip_checksum_ok(o, &ipo) {
        v.push("output IPv4 header checksum wrong".into());
    }
    if l4_checksum_ok(input, &ipi) == Some(true) && l4_checksum_ok(o, &ipo) != Some(true) {
        v.push("output L4 checksum wrong (the input's was right)".into());
    }
    if udp_checksum_field(input, &ipi) == Some([0, 0])
        && udp_checksum_field(o, &ipo) != Some([0, 0])
    {
        v.push("a UDP checksum of 0 did not stay 0".into());
    }
    let src_at = (ETH_HLEN + 12, ipi.l4);
    let dst_at = (ETH_HLEN + 16, ipi.l4 + 2);
    let (Some(si), Some(so), Some(di), Some(d_o)) = (
        endpoint(input, src_at.0, src_at.1),
        endpoint(o, src_at.0, src_at.1),
        endpoint(input, dst_at.0, dst_at.1),
        endpoint(o, dst_at.0, dst_at.1),
    ) else {
        return;
    };
    match verdict {
        Some(Verdict::NatNew | Verdict::NatEstablished | Verdict::SnatTx) => {
            known.clients.insert(si);
            if !known.backends.contains(&d_o) {
                v.push(format!("forward translation to {d_o:?}, not a backend"));
            }
            if so != si && !Known::snat(so) {
                v.push(format!("source rewritten to {so:?}, not the SNAT address"));
            }
        }
        Some(Verdict::ReverseNat) => {
            if !known.frontends.contains(&so) && so != si {
                v.push(format!("reply source rewritten to {so:?}, not a frontend"));
            }
            if d_o != di && !known.any(d_o) {
                v.push(format!(
                    "reply sent to {d_o:?}, no client of a translated flow"
                ));
            }
        }
        _ => {
            for (was, now) in [(si, so), (di, d_o)] {
                if was != now && !known.any(now) {
                    v.push(format!(
                        "endpoint rewritten to {now:?}, which the maps do not hold"
                    ));
                }
            }
        }
    }
}

/// The report as text: counts per program and verdict, then each violation with its frames.
#[must_use]
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "packet fuzz: {} packets ({} seeds) through {} programs, {} violations",
        r.packets,
        r.seeds,
        r.programs.len(),
        r.violations_total
    );
    for (name, p) in &r.programs {
        let _ = writeln!(
            s,
            "  {name}: {} packets ({} refused by BPF_PROG_TEST_RUN, not judged), {} violations",
            p.packets, p.refused, p.violations
        );
        let verdicts: Vec<String> = p.verdicts.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(s, "    verdicts: {}", verdicts.join(", "));
    }
    for ((program, rule), n) in &r.by_rule {
        let _ = writeln!(s, "  {n:>7} [{program}] {rule}");
    }
    for v in &r.violations {
        let _ = writeln!(
            s,
            "violation [{}] {} (mutation {}, verdict {}, action {})\n  in:  {}\n  out: {}",
            v.program,
            v.rule,
            v.mutation,
            v.verdict,
            v.action,
            hex(&v.input),
            hex(&v.output)
        );
    }
    s
}

/// The report as one JSON object (`packets`, `violations`, `programs`, ...).
#[must_use]
pub fn to_json(r: &Report) -> serde_json::Value {
    let programs: serde_json::Map<String, serde_json::Value> = r
        .programs
        .iter()
        .map(|(name, p)| {
            (
                (*name).to_string(),
                serde_json::json!({
                    "packets": p.packets,
                    "refused": p.refused,
                    "violations": p.violations,
                    "verdicts": p.verdicts,
                    "mutations": p.mutations,
                }),
            )
        })
        .collect();
    serde_json::json!({
        "packets": r.packets,
        "seeds": r.seeds,
        "violations": r.violations_total,
        "programs": programs,
        "rules": r.by_rule.iter().map(|((p, rule), n)| serde_json::json!({
            "program": p, "rule": rule, "count": n,
        })).collect::<Vec<_>>(),
        "reproducers": r.violations.iter().map(|v| serde_json::json!({
            "program": v.program,
            "rule": v.rule,
            "mutation": v.mutation,
            "verdict": v.verdict,
            "action": v.action,
            "input": hex(&v.input),
            "output": hex(&v.output),
        })).collect::<Vec<_>>(),
    })
}

#[must_use]
pub fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}
