//! `cargo xtask demo`: the tomcat6 case of the Kubernetes tutorial, in network namespaces.
//! Three nodes, three tomcat6 pods (one per node, each a small echo server on 8080), Service
//! tomcat6 of type NodePort (80 → 8080, nodePort 32510), an xlb agent on every node. An
//! outside client requests http://<node IP>:32510/ through every node and a pod requests the
//! ClusterIP; the demo prints who answered and exits 0 only if every request succeeded and
//! every pod answered at least once.
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_lab::{
    Netns, echo,
    tomcat6::{CLUSTER_IP, Tomcat6, pod_name},
};

use crate::{cargo, run, setup, target_dir};

const REQUESTS_PER_NODE: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(2);

/// Requests made and who answered them.
#[derive(Default)]
struct Tally {
    answered: BTreeMap<String, usize>,
    failures: usize,
}

impl Tally {
    fn ask(&mut self, from: &Netns, addr: SocketAddrV4) {
        let url = format!("http://{addr}/");
        match from.enter(|| echo::http_get(addr, TIMEOUT)) {
            Ok(Ok(a)) => {
                println!("  {url:<28} {:<26} {}", a.pod, a.client);
                *self.answered.entry(a.pod).or_default() += 1;
            }
            Ok(Err(e)) => {
                self.failures += 1;
                println!("  {url:<28} FAILED: {e}");
            }
            Err(e) => {
                self.failures += 1;
                println!("  {url:<28} FAILED: {e}");
            }
        }
    }

    /// The same request made by a process of node `node` itself (`xlb-echo ask`, in the
    /// node's network namespace and cgroup, like a host-network pod).
    fn ask_as_node(&mut self, lab: &Tomcat6, node: usize, echo: &Path, addr: SocketAddrV4) {
        let url = format!("http://{addr}/");
        let out = lab
            .cluster
            .node_process(node, echo)
            .map_err(anyhow::Error::from)
            .and_then(|mut cmd| {
                Ok(cmd
                    .args(["ask", "tcp", &addr.to_string()])
                    .stdin(std::process::Stdio::null())
                    .output()?)
            });
        let answer = out.and_then(|o| {
            if !o.status.success() {
                bail!("{}", String::from_utf8_lossy(&o.stderr).trim());
            }
            Ok(echo::parse_asked(
                String::from_utf8_lossy(&o.stdout).trim(),
            )?)
        });
        match answer {
            Ok((a, _)) => {
                println!("  {url:<28} {:<26} {}", a.pod, a.client);
                *self.answered.entry(a.pod).or_default() += 1;
            }
            Err(e) => {
                self.failures += 1;
                println!("  {url:<28} FAILED: {e}");
            }
        }
    }
}

pub fn run_demo() -> anyhow::Result<()> {
    lb_lab::teardown_on_signal();
    setup::ensure()?;
    println!("demo: building xlb and the lab's echo server (release)");
    run(cargo().args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "lb-userspace",
        "--bin",
        "xlb",
        "-p",
        "lb-lab",
        "--bin",
        "xlb-echo",
    ]))?;
    let started = Instant::now();
    let lab = start_lab()?;
    let tally = make_requests(&lab, &target_dir().join("release/xlb-echo"));
    for i in 0..lab.cluster.pods.len() {
        let name = pod_name(i);
        let n = tally.answered.get(&name).copied().unwrap_or(0);
        println!("demo: {name} answered {n} request(s)");
    }
    hold_for_inspection();
    drop(lab);
    let secs = started.elapsed().as_secs_f64();
    println!("demo: lab removed (namespaces, processes, files); took {secs:.1} s");
    if tally.failures > 0 {
        bail!("{} request(s) failed", tally.failures);
    }
    if tally.answered.len() < 3 {
        bail!("only {} of 3 pods answered", tally.answered.len());
    }
    println!("demo: OK: every request succeeded and every pod answered");
    Ok(())
}

fn start_lab() -> anyhow::Result<Tomcat6> {
    println!(
        "demo: creating the lab: an outside client and 3 nodes on one network segment, each in \
         its own network namespace (the host's own network is not touched)"
    );
    let xlb = target_dir().join("release/xlb");
    let echo_bin = target_dir().join("release/xlb-echo");
    let lab = Tomcat6::start("demo", 3, 3, &xlb, &echo_bin, &[])?;
    for p in &lab.cluster.pods {
        let node = &lab.cluster.nodes[p.node].name;
        println!(
            "demo:   pod {:<24} {:<12} on {node} (echo server on :8080)",
            p.name, p.ip
        );
    }
    for n in &lab.cluster.nodes {
        println!(
            "demo:   node {} at {}: xlb agent (XDP on eth0, TC on lxc*)",
            n.name, n.ip
        );
    }
    println!(
        "demo: applied examples/tomcat6.yaml (Service tomcat6: NodePort 32510 -> 8080, \
         ClusterIP {CLUSTER_IP}) and its EndpointSlice"
    );
    if let Err(e) = lab.wait_ready(Duration::from_secs(20)) {
        for n in &lab.cluster.nodes {
            let log = lab.cluster.log_path(&format!("agent-{}.log", n.name));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!("--- agent log of {} (last lines) ---", n.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(secs) = std::env::var("XLB_LAB_HOLD")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            eprintln!("XLB_LAB_HOLD: keeping the lab for {secs} s for inspection");
            std::thread::sleep(Duration::from_secs(secs));
        }
        return Err(e).context("waiting for the agents");
    }
    Ok(lab)
}

fn make_requests(lab: &Tomcat6, echo: &Path) -> Tally {
    println!("demo: agents programmed; the client (192.168.50.100) now curls every node:\n");
    println!("  {:<28} {:<26} pod saw client", "request", "answered by");
    let mut tally = Tally::default();
    for _round in 0..3 {
        for i in 0..lab.cluster.nodes.len() {
            for _ in 0..REQUESTS_PER_NODE {
                tally.ask(&lab.cluster.client, lab.node_port(i));
            }
        }
        // Source ports are random: a pod may be unlucky; another round settles it.
        if tally.answered.len() == lab.cluster.pods.len() {
            break;
        }
    }
    let from = &lab.cluster.pods[0];
    println!(
        "\ndemo: from inside pod {} ({}), the Service's ClusterIP:\n",
        from.name, from.ip
    );
    for _ in 0..REQUESTS_PER_NODE {
        tally.ask(&from.ns, SocketAddrV4::new(CLUSTER_IP, 80));
    }
    let node = &lab.cluster.nodes[0];
    println!(
        "\ndemo: from node {} itself (a host-network process, {}), the same ClusterIP\n      \
         (socket-level load balancing: its connect() goes straight to a pod):\n",
        node.name, node.ip
    );
    for _ in 0..REQUESTS_PER_NODE {
        tally.ask_as_node(lab, 0, echo, SocketAddrV4::new(CLUSTER_IP, 80));
    }
    println!();
    tally
}

/// `XLB_LAB_HOLD=<seconds>` keeps the lab that long before removing it, to inspect it with
/// `ip netns exec` (a debugging aid).
fn hold_for_inspection() {
    if let Some(secs) = std::env::var("XLB_LAB_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("XLB_LAB_HOLD: keeping the lab for {secs} s for inspection");
        std::thread::sleep(Duration::from_secs(secs));
    }
}
