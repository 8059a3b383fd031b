//! `xlb-bench snat`: sustained new TCP connections per second through one node to one
//! backend on another node, SNATed by that node, for xlb and for kube-proxy's iptables
//! ruleset (`MASQUERADE --random-fully`), each in a lab of its own in the same run.
//!
//! The lab: the client, node 1 (the dataplane under test) and node 2 with the one pod. A
//! Service of type NodePort (32510 → 8080, externalTrafficPolicy Cluster) whose only
//! endpoint is that pod; the client opens one connection per request to node 1's NodePort
//! (`GET / HTTP/1.0`, which the server answers and closes, as Tomcat does: the backend
//! closes first and keeps each tuple in `TIME_WAIT` for 60 s), one after another, as fast
//! as they complete, for the whole run. A connection fails when it is not established
//! within 5 s (SYN retransmissions at 1 s and 3 s included) or its answer does not come
//! from the pod. Every connect is timed.
//!
//! What bounds the rate: a (SNAT address:port, backend address:port) tuple the backend holds
//! in `TIME_WAIT` cannot carry a new connection, so a node sustains about (SNAT ports) / 60 s
//! new connections per second to one backend, whatever its dataplane; xlb keeps such a port
//! 65 s and refuses the connection until one is free (its SYN is retransmitted a second
//! later), where the kernel's NAT may hand out a tuple still in `TIME_WAIT`, which the
//! backend answers with an ACK instead of a SYN-ACK.
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_lab::cluster::{Cluster, EndpointStates};
use serde_json::{Value, json};

use crate::{
    forward::Bins,
    report::{Machine, thousands},
    rules::{ClusterNet, Endpoint, Proto, ServicePort},
};

/// How long each dataplane is loaded.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub seconds: u64,
}

impl Plan {
    pub const FULL: Self = Self { seconds: 120 };
    pub const QUICK: Self = Self { seconds: 10 };
}

const NODE_PORT: u16 = 32510;
const TARGET_PORT: u16 = 8080;
const POD: &str = "snat-backend";
/// A connection that is not established within this counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: snat, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.40
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 32510, protocol: TCP}
";

/// The dataplanes compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataplane {
    Xlb,
    Iptables,
}

impl Dataplane {
    fn key(self) -> &'static str {
        match self {
            Dataplane::Xlb => "xlb",
            Dataplane::Iptables => "iptables",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Dataplane::Xlb => "xlb",
            Dataplane::Iptables => "kube-proxy iptables (MASQUERADE --random-fully)",
        }
    }
}

/// One dataplane's run.
#[derive(Clone, Debug)]
pub struct Run {
    pub dataplane: Dataplane,
    pub seconds: f64,
    pub succeeded: u64,
    pub failed: u64,
    /// Connects, in microseconds: p50, p99, p99.9, max.
    pub connect_us: [f64; 4],
    /// Connections per 10 s of the run.
    pub per_10s: Vec<u64>,
    /// Connects that took a second or more (a SYN retransmitted).
    pub slow_connects: u64,
    /// xlb: the datapath's `drop_snat_exhausted` count after the run.
    pub snat_exhausted: Option<u64>,
}

impl Run {
    #[must_use]
    pub fn cps(&self) -> f64 {
        self.succeeded as f64 / self.seconds
    }
}

/// Both dataplanes, xlb first, each in its own lab (a backend's `TIME_WAIT` tuples of one
/// run must not meet the next).
pub fn run_bench(plan: Plan, bins: &Bins) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    for dp in [Dataplane::Xlb, Dataplane::Iptables] {
        eprintln!("snat: {} for {} s", dp.label(), plan.seconds);
        runs.push(run_one(plan, bins, dp).with_context(|| dp.label())?);
    }
    Ok(runs)
}

fn run_one(plan: Plan, bins: &Bins, dp: Dataplane) -> anyhow::Result<Run> {
    let mut c = Cluster::new("snatb", 2)?;
    c.add_pod(POD, 1, &bins.echo, &[TARGET_PORT])?;
    let pod_ip = c.pods[0].ip;
    let node = c.nodes[0].ip;
    match dp {
        Dataplane::Xlb => {
            c.write_manifest("snat.yaml", SERVICE)?;
            let slice = c.endpoint_slice(
                "snat",
                &[("http", TARGET_PORT, "TCP")],
                &[POD],
                &EndpointStates::default(),
            );
            c.write_manifest("eps.yaml", &slice)?;
            c.start_agent(0, &bins.xlb, &[])?;
        }
        Dataplane::Iptables => {
            let port = ServicePort {
                namespace: "default".into(),
                name: "snat".into(),
                port_name: "http".into(),
                proto: Proto::Tcp,
                cluster_ip: "10.96.0.40".parse()?,
                port: 80,
                node_port: Some(NODE_PORT),
                external_local: false,
                endpoints: vec![Endpoint {
                    addr: pod_ip,
                    port: TARGET_PORT,
                    local: false,
                }],
            };
            let net = ClusterNet {
                pod_cidr: "10.244.0.0/16",
                service_cidr: "10.96.0.0/12",
                node_ips: vec![node],
            };
            let path = c.dir.join("iptables.rules");
            std::fs::write(&path, crate::rules::iptables::restore(&[port], &net))?;
            lb_lab::run(c.nodes[0].ns.command("iptables-legacy-restore").arg(&path))?;
        }
    }
    let addr = SocketAddrV4::new(node, NODE_PORT);
    wait_answer(&c, addr)?;
    let mut run = c
        .client
        .enter(|| load(addr, Duration::from_secs(plan.seconds)))?;
    run.dataplane = dp;
    if dp == Dataplane::Xlb {
        run.snat_exhausted = snat_exhausted(&c.pin_dir(0));
    }
    Ok(run)
}

fn wait_answer(c: &Cluster, addr: SocketAddrV4) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        if c.client.enter(|| one(addr).is_ok())? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{addr} never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One connection: connect (timed), `GET / HTTP/1.0`, the answer to the end (the server
/// closes). Err if it failed or another than the pod answered.
fn one(addr: SocketAddrV4) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
    let connected = started.elapsed();
    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = Vec::with_capacity(256);
    s.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    ensure!(
        text.starts_with("HTTP/1.1 200") && text.contains(&format!("pod={POD} ")),
        "unexpected answer {text:?}"
    );
    Ok(connected)
}

/// Connections one after another for `duration`.
fn load(addr: SocketAddrV4, duration: Duration) -> Run {
    let started = Instant::now();
    let mut connects = Vec::with_capacity(200_000);
    let buckets = usize::try_from(duration.as_secs().div_ceil(10)).unwrap_or(1);
    let mut per_10s = vec![0u64; buckets.max(1)];
    let mut failed = 0;
    while started.elapsed() < duration {
        match one(addr) {
            Ok(t) => {
                connects.push(t);
                let bucket = usize::try_from(started.elapsed().as_secs() / 10).unwrap_or(0);
                if let Some(b) = per_10s.get_mut(bucket) {
                    *b += 1;
                }
            }
            Err(_) => failed += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let slow_connects = connects
        .iter()
        .filter(|t| **t >= Duration::from_secs(1))
        .count() as u64;
    connects.sort_unstable();
    let q = |q: f64| {
        if connects.is_empty() {
            return f64::NAN;
        }
        #[expect(clippy::cast_sign_loss, reason = "q is within 0..=1")]
        let i = ((connects.len() - 1) as f64 * q).round() as usize;
        connects[i].as_secs_f64() * 1e6
    };
    Run {
        dataplane: Dataplane::Xlb,
        seconds,
        succeeded: connects.len() as u64,
        failed,
        connect_us: [q(0.5), q(0.99), q(0.999), q(1.0)],
        per_10s,
        slow_connects,
        snat_exhausted: None,
    }
}

/// The datapath's `drop_snat_exhausted` packets, from the maps pinned under `dir`.
fn snat_exhausted(dir: &Path) -> Option<u64> {
    let maps = lb_userspace::ops::inspect::pinned::PinnedMaps::open(dir).ok()?;
    lb_userspace::ops::inspect::stats(&maps)
        .ok()?
        .into_iter()
        .find(|v| v.verdict == lb_common::Verdict::DropSnatExhausted.name())
        .map(|v| v.packets)
}

fn find(runs: &[Run], dp: Dataplane) -> Option<&Run> {
    runs.iter().find(|r| r.dataplane == dp)
}

/// The targets: no failed connection for xlb, a sustained rate at least the iptables
/// ruleset's, a connect p99 no higher than its.
fn goals(runs: &[Run]) -> Option<[bool; 3]> {
    let (x, i) = (
        find(runs, Dataplane::Xlb)?,
        find(runs, Dataplane::Iptables)?,
    );
    Some([
        x.failed == 0,
        x.cps() >= i.cps(),
        x.connect_us[1] <= i.connect_us[1],
    ])
}

/// The table of a run.
#[must_use]
pub fn table(runs: &[Run], machine: &Machine, quick: bool) -> String {
    let mut t = String::new();
    let _ = write!(
        t,
        "snat: sequential new TCP connections (HTTP/1.0, server closes) through node 1's \
         NodePort to one pod on node 2, SNATed by node 1; {} s per dataplane{}\n{}\n\n",
        runs.first().map_or(0.0, |r| r.seconds.round()),
        if quick { " (quick)" } else { "" },
        machine.line()
    );
    let _ = writeln!(
        t,
        "{:<48} {:>9} {:>8} {:>7} {:>9} {:>9} {:>10} {:>10} {:>6}",
        "dataplane", "conns", "conn/s", "failed", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "≥1 s"
    );
    for r in runs {
        let _ = writeln!(
            t,
            "{:<48} {:>9} {:>8.0} {:>7} {:>9.0} {:>9.0} {:>10.0} {:>10.0} {:>6}",
            r.dataplane.label(),
            thousands(r.succeeded),
            r.cps(),
            r.failed,
            r.connect_us[0],
            r.connect_us[1],
            r.connect_us[2],
            r.connect_us[3],
            r.slow_connects,
        );
    }
    for r in runs {
        let series: Vec<String> = r.per_10s.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            t,
            "connections per 10 s, {}: {}",
            r.dataplane.key(),
            series.join(" ")
        );
    }
    if let Some(n) = find(runs, Dataplane::Xlb).and_then(|r| r.snat_exhausted) {
        let _ = writeln!(
            t,
            "xlb: {} SYNs refused for want of a free SNAT port (drop_snat_exhausted); each \
             was retransmitted by the client",
            thousands(n)
        );
    }
    if let Some([no_fail, rate, p99]) = goals(runs) {
        let met = |b: bool| if b { "met" } else { "MISSED" };
        let (x, i) = (
            find(runs, Dataplane::Xlb).map_or(0.0, Run::cps),
            find(runs, Dataplane::Iptables).map_or(0.0, Run::cps),
        );
        let _ = writeln!(
            t,
            "targets: 0 failed connections for xlb: {}; sustained rate ≥ 1.0× iptables \
             ({:.2}×): {}; connect p99 ≤ iptables: {}",
            met(no_fail),
            x / i.max(1e-9),
            met(rate),
            met(p99)
        );
    }
    t
}

/// The JSON of a run (`snat_cps_xlb`, `snat_cps_iptables`, `snat_failures_xlb`,
/// `snat_p99_us_xlb`, `snat_p99_us_iptables`, and the rest).
#[must_use]
pub fn json(runs: &[Run], machine: &Machine, quick: bool) -> Value {
    let mut v = json!({
        "benchmark": "snat",
        "quick": quick,
        "machine": machine.json(),
    });
    for r in runs {
        let k = r.dataplane.key();
        v[format!("snat_cps_{k}")] = json!(r.cps());
        v[format!("snat_failures_{k}")] = json!(r.failed);
        v[format!("snat_connections_{k}")] = json!(r.succeeded);
        v[format!("snat_p50_us_{k}")] = json!(r.connect_us[0]);
        v[format!("snat_p99_us_{k}")] = json!(r.connect_us[1]);
        v[format!("snat_p999_us_{k}")] = json!(r.connect_us[2]);
        v[format!("snat_max_us_{k}")] = json!(r.connect_us[3]);
        v[format!("snat_slow_connects_{k}")] = json!(r.slow_connects);
        v[format!("snat_per_10s_{k}")] = json!(r.per_10s);
        v[format!("snat_seconds_{k}")] = json!(r.seconds);
    }
    if let Some(n) = find(runs, Dataplane::Xlb).and_then(|r| r.snat_exhausted) {
        v["snat_exhausted_drops_xlb"] = json!(n);
    }
    if let Some([no_fail, rate, p99]) = goals(runs) {
        v["targets"] = json!({
            "no_failures_xlb": no_fail,
            "rate_ge_iptables": rate,
            "p99_le_iptables": p99,
        });
    }
    v
}
