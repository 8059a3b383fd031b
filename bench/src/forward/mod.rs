//! `xlb-bench forward`: packets per second through a lab node, xlb against kube-proxy's
//! iptables and nftables rulesets and a no-NAT ceiling, in turn on the same topology and load.
//!
//! Each dataplane (and Service count) gets its own lab (client, underlay switch, one node with
//! 3 pods), built before anything is measured and kept for all repetitions; a trial measures: UDP load from the client's generator to the measured
//! NodePort (or, for the ceiling, straight to the pods through the node) with an
//! "established" mix (64 flows) and a "new flows" mix (a new 5-tuple every packet), counted by
//! sinks in the pods; then the round trip of sequential small TCP requests. A lab per
//! dataplane means none inherits another's state (iptables-legacy's nat table, once created,
//! keeps connection tracking on in its namespace until the namespace goes); the kernel's
//! conntrack table is flushed before each trial of iptables and nftables. Trials of all
//! dataplanes alternate within each repetition, so a drift of this VM's speed affects them
//! alike.
pub mod scenario;
pub mod summary;
pub mod traffic;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_lab::{Netns, cluster::Cluster, echo};

use self::traffic::{Mix, Sinks, Target};

/// A dataplane under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    /// No service translation: the client sends to the pods, routed through the node.
    NoNat,
    /// The no-NAT path with an XDP program that passes everything attached to the node's NIC:
    /// what attaching any XDP program costs on this virtual NIC (veth then receives through
    /// NAPI instead of the backlog queue).
    XdpPass,
    /// xlb's agent on the node (XDP on its NIC, TC on pod interfaces).
    Xlb,
    /// xlb with BPF host routing (`--host-routing bpf`): frames for the pods go from the NIC's
    /// TC ingress straight into the pods, past the node's forwarding.
    XlbBpf,
    /// kube-proxy's iptables ruleset (iptables-legacy).
    Iptables,
    /// kube-proxy's nftables ruleset.
    Nftables,
}

impl Dataplane {
    #[must_use]
    pub fn key(self) -> &'static str {
        match self {
            Dataplane::NoNat => "nonat",
            Dataplane::XdpPass => "xdppass",
            Dataplane::Xlb => "xlb",
            Dataplane::XlbBpf => "xlbbpf",
            Dataplane::Iptables => "iptables",
            Dataplane::Nftables => "nftables",
        }
    }

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Dataplane::NoNat => "no-NAT ceiling",
            Dataplane::XdpPass => "no-NAT + XDP no-op",
            Dataplane::Xlb => "xlb",
            Dataplane::XlbBpf => "xlb, BPF routing",
            Dataplane::Iptables => "kube-proxy iptables",
            Dataplane::Nftables => "kube-proxy nftables",
        }
    }
}

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub reps: usize,
    /// Seconds of load per mix and trial.
    pub seconds: f64,
    /// Packets per mix and trial at most.
    pub max_packets: u64,
    /// Generator threads.
    pub threads: usize,
    /// Services of the large setup.
    pub many: usize,
    /// Sequential requests per latency probe.
    pub latency_requests: usize,
    /// Flows of the established mix.
    pub est_flows: u32,
}

impl Plan {
    pub const FULL: Plan = Plan {
        reps: 3,
        seconds: 3.0,
        max_packets: 20_000_000,
        threads: 1,
        many: 10_000,
        latency_requests: 1000,
        est_flows: 64,
    };
    pub const QUICK: Plan = Plan {
        reps: 1,
        seconds: 0.5,
        max_packets: 2_000_000,
        threads: 1,
        many: 10_000,
        latency_requests: 100,
        est_flows: 64,
    };
}

/// The trials of one repetition, in order.
#[must_use]
pub fn trial_order(many: usize) -> [(Dataplane, usize); 10] {
    [
        (Dataplane::NoNat, 1),
        (Dataplane::XdpPass, 1),
        (Dataplane::Xlb, 1),
        (Dataplane::XlbBpf, 1),
        (Dataplane::Iptables, 1),
        (Dataplane::Nftables, 1),
        (Dataplane::Xlb, many),
        (Dataplane::XlbBpf, many),
        (Dataplane::Iptables, many),
        (Dataplane::Nftables, many),
    ]
}

/// The binaries a trial runs.
pub struct Bins {
    pub xlb: PathBuf,
    pub echo: PathBuf,
}

impl Bins {
    /// `XLB_BIN` / `XLB_ECHO_BIN`, else the release builds in the target directory.
    pub fn find(target: &Path) -> anyhow::Result<Self> {
        let pick = |var: &str, name: &str| {
            std::env::var_os(var).map_or_else(|| target.join("release").join(name), PathBuf::from)
        };
        let bins = Self {
            xlb: pick("XLB_BIN", "xlb"),
            echo: pick("XLB_ECHO_BIN", "xlb-echo"),
        };
        for b in [&bins.xlb, &bins.echo] {
            ensure!(
                b.exists(),
                "{} is missing: build it with `cargo build --release -p lb-userspace --bin xlb -p lb-lab --bin xlb-echo` (cargo xtask bench does)",
                b.display()
            );
        }
        Ok(bins)
    }
}

/// One mix's figures in one trial.
#[derive(Clone, Debug)]
pub struct Load {
    pub sent: u64,
    pub refused: u64,
    /// Datagrams each pod's sink counted.
    pub received: Vec<u64>,
    pub seconds: f64,
}

impl Load {
    #[must_use]
    pub fn delivered(&self) -> u64 {
        self.received.iter().sum()
    }

    #[must_use]
    pub fn offered_pps(&self) -> f64 {
        self.sent as f64 / self.seconds
    }

    #[must_use]
    pub fn delivered_pps(&self) -> f64 {
        self.delivered() as f64 / self.seconds
    }
}

/// Round trips of sequential small TCP request/responses, in microseconds.
#[derive(Clone, Copy, Debug, Default)]
#[expect(clippy::struct_field_names, reason = "the unit is part of each name")]
pub struct Latency {
    /// One long-lived connection, request → response.
    pub keepalive_p50_us: f64,
    pub keepalive_p99_us: f64,
    /// A new connection per request: connect, request, response, close.
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
}

pub struct Trial {
    pub dataplane: Dataplane,
    pub services: usize,
    pub rep: usize,
    pub established: Load,
    pub new_flows: Load,
    pub latency: Latency,
    /// From an empty node to the first answer through the dataplane.
    pub setup_seconds: f64,
    /// The node's kernel conntrack entries after the trial (`None` where it is off).
    pub conntrack_entries: Option<u64>,
}

pub struct Results {
    pub plan: Plan,
    pub trials: Vec<Trial>,
    pub tools: Vec<(String, String)>,
    pub seconds: f64,
}

fn tool_version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not installed".into())
}

pub fn run_bench(plan: Plan, bins: &Bins) -> anyhow::Result<Results> {
    let started = Instant::now();
    let tools = vec![
        ("iptables".into(), tool_version("iptables-legacy-restore")),
        ("nftables".into(), tool_version("nft")),
    ];
    for (name, version) in &tools {
        ensure!(
            version != "not installed",
            "{name} is not installed (cargo xtask setup installs it)"
        );
    }
    let setups = build_all(&plan, bins)?;
    let mut trials = Vec::new();
    for rep in 0..plan.reps {
        for setup in &setups {
            eprintln!(
                "forward: rep {}/{}: {} with {} service(s)",
                rep + 1,
                plan.reps,
                setup.dataplane.label(),
                setup.services
            );
            let trial = measure(&plan, setup, rep).with_context(|| {
                format!(
                    "{} with {} services",
                    setup.dataplane.label(),
                    setup.services
                )
            })?;
            eprintln!(
                "forward:   established {:.0} pps delivered ({:.0} offered), new flows {:.0} ({:.0})",
                trial.established.delivered_pps(),
                trial.established.offered_pps(),
                trial.new_flows.delivered_pps(),
                trial.new_flows.offered_pps(),
            );
            trials.push(trial);
        }
    }
    for setup in setups {
        setup.sinks.stop()?;
    }
    Ok(Results {
        plan,
        trials,
        tools,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A lab with one dataplane installed, measured in every repetition. Idle between its
/// trials: its processes sleep in recv/accept.
struct Setup {
    dataplane: Dataplane,
    services: usize,
    cluster: Cluster,
    sinks: Sinks,
    target: Target,
    /// Where the latency probe connects (TCP, through the dataplane).
    probe: SocketAddrV4,
    /// From an empty node to the first answer through the dataplane.
    install_seconds: f64,
}

/// Builds every trial's lab, in trial order. nft takes tens of seconds to load 10,000
/// Services (its time grows faster than linearly), so that one installs on a thread while
/// the other labs are built; nothing is measured before all are ready.
fn build_all(plan: &Plan, bins: &Bins) -> anyhow::Result<Vec<Setup>> {
    let order = trial_order(plan.many);
    let slow = (Dataplane::Nftables, plan.many);
    thread::scope(|s| {
        let background = s.spawn(|| build(bins, slow.0, slow.1));
        let mut setups = Vec::new();
        for &(dp, n) in order.iter().filter(|&&t| t != slow) {
            eprintln!("forward: setting up {} with {n} service(s)", dp.label());
            setups.push(
                build(bins, dp, n).with_context(|| format!("{} with {n} services", dp.label()))?,
            );
        }
        eprintln!("forward: waiting for nft to load {} services", plan.many);
        let nft = background
            .join()
            .map_err(|_| anyhow::anyhow!("the nft setup thread panicked"))?
            .with_context(|| format!("kube-proxy nftables with {} services", plan.many))?;
        let at = order
            .iter()
            .position(|&t| t == slow)
            .unwrap_or(order.len() - 1);
        setups.insert(at.min(setups.len()), nft);
        Ok(setups)
    })
}

fn build(bins: &Bins, dataplane: Dataplane, services: usize) -> anyhow::Result<Setup> {
    let mut c = Cluster::new("fw", 1)?;
    for i in 0..3 {
        c.add_pod(&format!("sink{i}"), 0, &bins.echo, &[scenario::ECHO_PORT])?;
    }
    let pods: Vec<Ipv4Addr> = c.pods.iter().map(|p| p.ip).collect();
    let node_ip = c.nodes[0].ip;
    c.client
        .ip(["route", "add", "10.244.0.0/16", "via", &node_ip.to_string()])?;
    let mut sockets = Vec::new();
    for p in &c.pods {
        let s =
            p.ns.enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, scenario::SINK_PORT)))??;
        sockets.push(s);
    }
    let sinks = Sinks::start(sockets)?;

    let t0 = Instant::now();
    install(&c, bins, dataplane, services, &pods)?;
    let (probe, dsts) = if matches!(dataplane, Dataplane::NoNat | Dataplane::XdpPass) {
        let dsts = pods
            .iter()
            .map(|&p| SocketAddrV4::new(p, scenario::SINK_PORT))
            .collect();
        (SocketAddrV4::new(pods[0], scenario::ECHO_PORT), dsts)
    } else {
        let dsts = vec![SocketAddrV4::new(node_ip, scenario::NODE_PORT_UDP)];
        (SocketAddrV4::new(node_ip, scenario::NODE_PORT_TCP), dsts)
    };
    wait_answer(&c.client, probe, Duration::from_mins(3))?;
    let setup_seconds = t0.elapsed().as_secs_f64();

    let (ifindex, src_mac) = link(&c.client, "eth0")?;
    let (_, dst_mac) = link(&c.nodes[0].ns, "eth0")?;
    Ok(Setup {
        dataplane,
        services,
        cluster: c,
        sinks,
        target: Target {
            ifindex,
            src_mac,
            dst_mac,
            dsts,
        },
        probe,
        install_seconds: setup_seconds,
    })
}

/// New flows of repetition `rep` start here, so no repetition reuses another's 5-tuples.
const FLOWS_PER_REP: u64 = 1_000_000_000;

/// One trial: the established mix, the new-flows mix and the latency probe on a built setup.
/// The kernel dataplanes start from an empty conntrack table each time.
fn measure(plan: &Plan, setup: &Setup, rep: usize) -> anyhow::Result<Trial> {
    let c = &setup.cluster;
    let kernel_ct = matches!(setup.dataplane, Dataplane::Iptables | Dataplane::Nftables);
    if kernel_ct {
        lb_lab::run(c.nodes[0].ns.command("conntrack").arg("-F"))?;
    }
    let est = Mix::Established {
        flows: plan.est_flows,
    };
    // Warm-up: the established flows exist before they are measured, and every pod is reached.
    let warm = load(c, &setup.sinks, plan, &setup.target, est, 0, 0.3)?;
    ensure!(
        warm.received.iter().all(|&n| n > 0),
        "warm-up: not every pod received packets: {:?}",
        warm.received
    );
    let established = load(c, &setup.sinks, plan, &setup.target, est, 0, plan.seconds)?;
    let first = rep as u64 * FLOWS_PER_REP;
    let new_flows = load(
        c,
        &setup.sinks,
        plan,
        &setup.target,
        Mix::NewFlows,
        first,
        plan.seconds,
    )?;
    let total = new_flows.delivered().max(1);
    ensure!(
        new_flows.received.iter().all(|&n| n * 100 / total >= 15),
        "new flows are not spread over the pods: {:?}",
        new_flows.received
    );
    let latency = latency(&c.client, setup.probe, plan.latency_requests)?;
    let conntrack_entries = if kernel_ct {
        conntrack_count(&c.nodes[0].ns)
    } else {
        None
    };
    Ok(Trial {
        dataplane: setup.dataplane,
        services: setup.services,
        rep,
        established,
        new_flows,
        latency,
        setup_seconds: setup.install_seconds,
        conntrack_entries,
    })
}

/// `ip -o link show eth0` of `ns`: (ifindex, MAC).
fn link(ns: &Netns, iface: &str) -> anyhow::Result<(u32, [u8; 6])> {
    let out = ns.ip(["-o", "link", "show", "dev", iface])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let index = text
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .with_context(|| format!("no ifindex in {text:?}"))?;
    let mac_text = text
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .with_context(|| format!("no MAC in {text:?}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = mac_text.split(':').collect();
    ensure!(parts.len() == 6, "bad MAC {mac_text}");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {mac_text}"))?;
    }
    Ok((index, mac))
}

/// Retries a TCP request through `addr` from `ns` until it is answered.
fn wait_answer(ns: &Netns, addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = ns.enter(|| echo::http_get(addr, Duration::from_millis(500)))?;
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("{addr} did not answer within {timeout:?}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Installs `dataplane` on the lab's node for `services` Services.
fn install(
    c: &Cluster,
    bins: &Bins,
    dataplane: Dataplane,
    services: usize,
    pods: &[Ipv4Addr],
) -> anyhow::Result<()> {
    let node = &c.nodes[0];
    let ports = scenario::service_ports(services, pods);
    let net = scenario::net(node.ip);
    match dataplane {
        Dataplane::NoNat => {}
        Dataplane::XdpPass => {
            // The lab assembled this pass-everything program for its switch ports.
            let obj = c.dir.join("xdp-pass.o");
            node.ns.ip([
                "link".as_ref(),
                "set".as_ref(),
                "dev".as_ref(),
                "eth0".as_ref(),
                "xdpdrv".as_ref(),
                "obj".as_ref(),
                obj.as_os_str(),
                "sec".as_ref(),
                "xdp".as_ref(),
            ])?;
        }
        Dataplane::Xlb | Dataplane::XlbBpf => {
            c.write_manifest("bench.yaml", &scenario::manifests(&ports, &node.name))?;
            let routing = if dataplane == Dataplane::XlbBpf {
                "bpf"
            } else {
                "kernel"
            };
            c.start_agent(0, &bins.xlb, &["--host-routing", routing])?;
        }
        Dataplane::Iptables => {
            let path = c.dir.join("iptables.rules");
            fs::write(&path, crate::rules::iptables::restore(&ports, &net))?;
            lb_lab::run(node.ns.command("iptables-legacy-restore").arg(&path))?;
        }
        Dataplane::Nftables => {
            let path = c.dir.join("nftables.nft");
            fs::write(&path, crate::rules::nftables::ruleset(&ports, &net))?;
            lb_lab::run(node.ns.command("nft").arg("-f").arg(&path))?;
        }
    }
    Ok(())
}

fn conntrack_count(ns: &Netns) -> Option<u64> {
    let out = lb_lab::run(ns.command("conntrack").arg("-C")).ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// One bounded run of the generator with the sinks' counts around it.
fn load(
    c: &Cluster,
    sinks: &Sinks,
    plan: &Plan,
    target: &Target,
    mix: Mix,
    first: u64,
    seconds: f64,
) -> anyhow::Result<Load> {
    let mut sockets = Vec::new();
    for _ in 0..plan.threads {
        sockets.push(
            c.client
                .enter(|| traffic::packet_socket(target.ifindex))??,
        );
    }
    let before = sinks.counts();
    let sent = traffic::send(
        sockets,
        target,
        mix,
        first,
        Duration::from_secs_f64(seconds),
        plan.max_packets,
    )?;
    // What is still in flight or queued in the sinks' sockets arrives now.
    thread::sleep(Duration::from_millis(250));
    let received: Vec<u64> = sinks
        .counts()
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let delivered: u64 = received.iter().sum();
    ensure!(
        delivered <= sent.packets,
        "the sinks counted {delivered} datagrams but only {} were sent",
        sent.packets
    );
    Ok(Load {
        sent: sent.packets,
        refused: sent.refused,
        received,
        seconds: sent.seconds,
    })
}

fn percentile_us(samples: &mut [Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    #[expect(clippy::cast_sign_loss, reason = "q is within 0..=1")]
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i].as_secs_f64() * 1e6
}

/// Sequential requests from `ns` to `addr`: on one connection, then one connection each.
fn latency(ns: &Netns, addr: SocketAddrV4, n: usize) -> anyhow::Result<Latency> {
    let t = Duration::from_secs(2);
    let (mut keep, mut fresh) = ns.enter(|| -> anyhow::Result<_> {
        let mut k = echo::KeepAlive::connect(addr, t)?;
        k.get()?;
        let mut keep = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            k.get()?;
            keep.push(s.elapsed());
        }
        let mut fresh = Vec::with_capacity(n);
        for _ in 0..n {
            let s = Instant::now();
            echo::http_get(addr, t)?;
            fresh.push(s.elapsed());
        }
        Ok((keep, fresh))
    })??;
    Ok(Latency {
        keepalive_p50_us: percentile_us(&mut keep, 0.5),
        keepalive_p99_us: percentile_us(&mut keep, 0.99),
        connect_p50_us: percentile_us(&mut fresh, 0.5),
        connect_p99_us: percentile_us(&mut fresh, 0.99),
    })
}
