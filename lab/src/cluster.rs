//! A small Kubernetes-like cluster in network namespaces: an external client and 2–3 nodes on
//! one underlay segment (a bridge in its own namespace), pods as namespaces behind veth pairs
//! on their node (host side `lxcN`, Calico-style /32 routes), per-node pod CIDRs routed between
//! nodes. The links that play physical wires (client and node NICs) have TX checksum offload
//! off, so their packets carry full checksums as on a real NIC.
//!
//! Addresses: underlay 192.168.50.0/24 (client .100, node N .1N), pods of node N in
//! 10.244.N.0/24. The client routes `ClusterIPs` (10.96.0.0/12) and LoadBalancer/external IPs
//! (198.51.100.0/24) to node 1, as an upstream router would.
//!
//! The cluster also writes what the API server would hold, as manifest files for the agents'
//! `--manifests` source: Nodes, and EndpointSlices as the EndpointSlice controller writes them.
use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{Lab, LabError, Netns, Result, veth};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
/// MAC of every pod's gateway (the node side of its veth), as Calico does.
const GATEWAY_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// One node.
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// 1-based.
    pub index: u8,
}

/// One pod, with its echo server.
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Index into [`Cluster::nodes`].
    pub node: usize,
    /// Host-side interface in the node's namespace.
    pub iface: String,
    echo_pid: Option<u32>,
}

pub struct Cluster {
    pub lab: Lab,
    pub client: Netns,
    pub underlay: Netns,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Manifest directory the agents read.
    pub manifests: PathBuf,
    /// Agent logs and other files of this run.
    pub dir: PathBuf,
    next_pod: u32,
}

/// An XDP program that passes everything, in BPF assembly. A veth only delivers frames that
/// the other end sends with `XDP_TX` or a redirect when its own end runs an XDP program (its
/// NAPI context exists only then); a physical NIC has no such condition. The lab's switch
/// ports run this one, so nodes' `XDP_TX` behaves as on real hardware.
const XDP_PASS_ASM: &str = "\t.section xdp,\"ax\",@progbits\n\t.globl xdp_pass\n\t.type xdp_pass,@function\nxdp_pass:\n\tr0 = 2\n\texit\n\t.size xdp_pass, 16\n\t.section license,\"aw\",@progbits\n\t.globl _license\n_license:\n\t.asciz \"GPL\"\n";
const LLVM_MC: &str = "/usr/lib/llvm-22/bin/llvm-mc";

/// Assembles [`XDP_PASS_ASM`] into `dir/xdp-pass.o`.
fn xdp_pass_object(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("xdp-pass.s");
    let obj = dir.join("xdp-pass.o");
    fs::write(&src, XDP_PASS_ASM).map_err(|source| LabError::Io {
        what: "xdp-pass.s",
        source,
    })?;
    crate::run(
        Command::new(LLVM_MC)
            .args(["-triple", "bpfel", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&src),
    )?;
    Ok(obj)
}

fn switch_port(ns: &Netns, iface: &str, xdp_pass: &Path) -> Result<()> {
    let obj = xdp_pass.to_string_lossy();
    ns.ip([
        "link", "set", "dev", iface, "xdpdrv", "obj", &obj, "sec", "xdp",
    ])?;
    Ok(())
}

impl Cluster {
    /// Builds the client, the underlay and `nodes` nodes (no pods yet).
    pub fn new(tag: &str, nodes: usize) -> Result<Self> {
        let lab = Lab::new(tag)?;
        let dir = std::env::temp_dir().join(lab.tag());
        let manifests = dir.join("manifests");
        fs::create_dir_all(&manifests).map_err(|source| LabError::Io {
            what: "lab dir",
            source,
        })?;
        let xdp_pass = xdp_pass_object(&dir)?;
        let underlay = lab.netns("ul")?;
        underlay.ip(["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(["link", "set", "br0", "up"])?;

        let client = lab.netns("client")?;
        veth(&client, "eth0", &underlay, "cl", true)?;
        underlay.ip(["link", "set", "cl", "master", "br0"])?;
        switch_port(&underlay, "cl", &xdp_pass)?;
        client.ip(["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;
        for cidr in ["10.96.0.0/12", "198.51.100.0/24"] {
            client.ip(["route", "add", cidr, "via", "192.168.50.11"])?;
        }

        let mut cluster = Self {
            lab,
            client,
            underlay,
            nodes: Vec::new(),
            pods: Vec::new(),
            manifests,
            dir,
            next_pod: 0,
        };
        for i in 1..=nodes {
            cluster.add_node(i as u8, &xdp_pass)?;
        }
        for i in 0..nodes {
            let me = &cluster.nodes[i];
            for other in cluster.nodes.iter().filter(|n| n.index != me.index) {
                me.ns.ip([
                    "route",
                    "add",
                    &format!("10.244.{}.0/24", other.index),
                    "via",
                    &other.ip.to_string(),
                ])?;
            }
        }
        cluster.write_nodes()?;
        Ok(cluster)
    }

    fn add_node(&mut self, index: u8, xdp_pass: &Path) -> Result<()> {
        let name = format!("node{index}");
        let ns = self.lab.netns(&name)?;
        let port = format!("n{index}");
        veth(&ns, "eth0", &self.underlay, &port, true)?;
        self.underlay.ip(["link", "set", &port, "master", "br0"])?;
        switch_port(&self.underlay, &port, xdp_pass)?;
        let ip = Ipv4Addr::new(192, 168, 50, 10 + index);
        ns.ip(["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.eth0.rp_filter", "0")?;
        self.nodes.push(Node {
            name,
            ns,
            ip,
            index,
        });
        Ok(())
    }

    /// Creates pod `name` on node `node` (index into `nodes`) and starts `echo` in it on
    /// `ports` (TCP and UDP each).
    pub fn add_pod(&mut self, name: &str, node: usize, echo: &Path, ports: &[u16]) -> Result<&Pod> {
        self.next_pod += 1;
        let n = &self.nodes[node];
        let ip = Ipv4Addr::new(10, 244, n.index, 4 + self.next_pod as u8);
        let ns = self.lab.netns(&format!("pod-{name}"))?;
        let iface = format!("lxc{}", self.next_pod);
        veth(&n.ns, &iface, &ns, "eth0", false)?;
        n.ns.ip(["link", "set", &iface, "address", GATEWAY_MAC])?;
        let pod_mac = format!("02:00:0a:f4:{:02x}:{:02x}", n.index, ip.octets()[3]);
        ns.ip(["link", "set", "eth0", "address", &pod_mac])?;
        ns.ip(["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip([
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ns.ip([
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        ns.ip([
            "neigh",
            "replace",
            "169.254.1.1",
            "lladdr",
            GATEWAY_MAC,
            "nud",
            "permanent",
            "dev",
            "eth0",
        ])?;
        n.ns.ip(["route", "add", &format!("{ip}/32"), "dev", &iface])?;
        n.ns.ip([
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &pod_mac,
            "nud",
            "permanent",
            "dev",
            &iface,
        ])?;
        let log = self.log_file(&format!("echo-{name}.log"))?;
        let mut cmd = ns.command(echo);
        cmd.arg(name)
            .args(ports.iter().map(u16::to_string))
            .stdout(Stdio::null())
            .stderr(log);
        let echo_pid = Some(self.lab.spawn(&mut cmd)?);
        self.pods.push(Pod {
            name: name.to_owned(),
            ns,
            ip,
            node,
            iface,
            echo_pid,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Deletes pod `name`: its echo server, its namespace (and so its veth pair).
    pub fn remove_pod(&mut self, name: &str) {
        if let Some(i) = self.pods.iter().position(|p| p.name == name) {
            let pod = self.pods.remove(i);
            if let Some(pid) = pod.echo_pid {
                self.lab.kill(pid);
            }
            self.lab.delete_netns(&pod.ns);
        }
    }

    #[must_use]
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// A file of this run's directory to log to (appended to).
    pub fn log_file(&self, name: &str) -> Result<fs::File> {
        // Append: a restarted process continues its log.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .map_err(|source| LabError::Io {
                what: "log file",
                source,
            })
    }

    /// Path of a log file of this run.
    #[must_use]
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts the agent `xlb` on node `node` with the manifest source; its log goes to
    /// `agent-<node>.log`. Returns its pid.
    pub fn start_agent(&self, node: usize, xlb: &Path, extra: &[&str]) -> Result<u32> {
        let n = &self.nodes[node];
        let log = self.log_file(&format!("agent-{}.log", n.name))?;
        let mut cmd = n.ns.command_host_mounts(xlb);
        cmd.arg("agent")
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--pin-dir")
            .arg(self.pin_dir(node))
            .arg("--socket-lb-cgroup")
            .arg(self.node_cgroup(node)?)
            .args(["--node-name", &n.name, "--nic", "eth0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        self.lab.spawn(&mut cmd)
    }

    /// The cgroup of node `node`'s own processes (its "host"): the agent attaches socket-level
    /// load balancing to it.
    pub fn node_cgroup(&self, node: usize) -> Result<PathBuf> {
        self.lab.cgroup(&self.nodes[node].name)
    }

    /// `program` run as a process of node `node` itself: in its network namespace and its
    /// cgroup, like a host-network pod or the kubelet.
    pub fn node_process(
        &self,
        node: usize,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let mut cmd = self.nodes[node].ns.command(program);
        crate::in_cgroup(&mut cmd, &self.node_cgroup(node)?)?;
        Ok(cmd)
    }

    /// Syncs the agent of node `node` has logged so far.
    #[must_use]
    pub fn agent_syncs(&self, node: usize) -> usize {
        let log = self.log_path(&format!("agent-{}.log", self.nodes[node].name));
        fs::read_to_string(log).map_or(0, |t| {
            t.lines().filter(|l| l.contains("agent: sync ")).count()
        })
    }

    /// Times the agent of node `node` has said it is ready (first full sync programmed and
    /// every interface attached) since its log began; a restarted agent says it again.
    #[must_use]
    pub fn agent_ready_count(&self, node: usize) -> usize {
        let log = self.log_path(&format!("agent-{}.log", self.nodes[node].name));
        fs::read_to_string(log).map_or(0, |t| {
            t.lines()
                .filter(|l| l.contains("ready: the first full sync"))
                .count()
        })
    }

    /// Syncs of every node's agent.
    #[must_use]
    pub fn all_agent_syncs(&self) -> Vec<usize> {
        (0..self.nodes.len()).map(|i| self.agent_syncs(i)).collect()
    }

    /// Waits until every agent logged a sync after `before` (from [`Cluster::all_agent_syncs`]).
    pub fn wait_synced_since(&self, before: &[usize], timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while self
            .all_agent_syncs()
            .iter()
            .zip(before)
            .any(|(now, then)| now <= then)
        {
            if std::time::Instant::now() > deadline {
                return Err(LabError::Io {
                    what: "an agent did not sync in time",
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Where the agent of node `node` pins its datapath (bpffs; removed with the lab).
    #[must_use]
    pub fn pin_dir(&self, node: usize) -> PathBuf {
        Path::new(crate::BPFFS).join(format!("{}-{}", self.lab.tag(), self.nodes[node].name))
    }

    /// Writes a manifest file atomically (the agents may be reading the directory).
    pub fn write_manifest(&self, file: &str, content: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, content).map_err(|source| LabError::Io {
            what: "manifest",
            source,
        })?;
        fs::rename(&tmp, self.manifests.join(file)).map_err(|source| LabError::Io {
            what: "manifest",
            source,
        })
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        fs::remove_file(self.manifests.join(file)).map_err(|source| LabError::Io {
            what: "manifest",
            source,
        })
    }

    fn write_nodes(&self) -> Result<()> {
        let mut y = String::new();
        for n in &self.nodes {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels:\n    kubernetes.io/hostname: {}\nstatus:\n  addresses:\n    - type: InternalIP\n      address: {}\n    - type: Hostname\n      address: {}\n",
                n.name, n.name, n.ip, n.name
            );
        }
        self.write_manifest("nodes.yaml", &y)
    }

    /// The EndpointSlice the EndpointSlice controller would write for `service` over `pods`
    /// (all ready unless listed in `not_ready` or `terminating`).
    #[must_use]
    pub fn endpoint_slice(
        &self,
        service: &str,
        ports: &[(&str, u16, &str)],
        pods: &[&str],
        states: &EndpointStates,
    ) -> String {
        let mut y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-lab\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\naddressType: IPv4\nports:\n"
        );
        for (name, port, proto) in ports {
            let _ = write!(
                y,
                "  - name: \"{name}\"\n    port: {port}\n    protocol: {proto}\n"
            );
        }
        y.push_str("endpoints:\n");
        for p in pods.iter().filter_map(|n| self.pod(n)) {
            let terminating = states.terminating.contains(&p.name.as_str());
            let ready = !terminating && !states.not_ready.contains(&p.name.as_str());
            let serving = ready || (terminating && !states.not_serving.contains(&p.name.as_str()));
            let _ = write!(
                y,
                "  - addresses: [\"{}\"]\n    nodeName: {}\n    conditions:\n      ready: {ready}\n      serving: {serving}\n      terminating: {terminating}\n    targetRef:\n      kind: Pod\n      name: {}\n      namespace: default\n",
                p.ip, self.nodes[p.node].name, p.name
            );
        }
        y
    }
}

/// Endpoint conditions for [`Cluster::endpoint_slice`] (pod names).
#[derive(Default)]
pub struct EndpointStates<'a> {
    pub not_ready: Vec<&'a str>,
    pub terminating: Vec<&'a str>,
    pub not_serving: Vec<&'a str>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Agents first, so nothing holds the pinned datapath; then the pins (which detaches
        // it); the lab (a field) removes the namespaces after this.
        self.lab.kill_all();
        crate::remove_pins(self.lab.tag());
        let _ = fs::remove_dir_all(&self.dir);
    }
}
