//! The reference case as a lab: Deployment tomcat6 (3 replicas, one per node) behind Service
//! tomcat6 (NodePort 32510, port 80 → 8080, ClusterIP 10.96.0.10), an xlb agent on every node.
//! The demo and the end-to-end tests start from here.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    LabError, Result,
    cluster::{Cluster, EndpointStates},
    echo,
};

pub const NODE_PORT: u16 = 32510;
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const TARGET_PORT: u16 = 8080;
/// The Service manifest shipped in examples/.
pub const SERVICE_YAML: &str = include_str!("../../examples/tomcat6.yaml");

/// Pod names as a ReplicaSet would make them.
#[must_use]
pub fn pod_name(i: usize) -> String {
    const SUFFIX: [&str; 8] = [
        "x7k2p", "m4q9d", "c8w3z", "h2j6v", "t5n8r", "b9f4s", "k3d7w", "p6g2m",
    ];
    format!("tomcat6-5f7b9c-{}", SUFFIX[i % SUFFIX.len()])
}

/// A running tomcat6 lab.
pub struct Tomcat6 {
    pub cluster: Cluster,
    pub agents: Vec<u32>,
}

impl Tomcat6 {
    /// Builds `nodes` nodes with `replicas` pods spread round-robin over them, writes the
    /// manifests and starts one agent per node (with `agent_args` added).
    pub fn start(
        tag: &str,
        nodes: usize,
        replicas: usize,
        xlb: &Path,
        echo_bin: &Path,
        agent_args: &[&str],
    ) -> Result<Self> {
        let mut cluster = Cluster::new(tag, nodes)?;
        for i in 0..replicas {
            cluster.add_pod(&pod_name(i), i % nodes, echo_bin, &[TARGET_PORT])?;
        }
        cluster.write_manifest("tomcat6.yaml", SERVICE_YAML)?;
        let mut t = Self {
            cluster,
            agents: Vec::new(),
        };
        t.write_endpoints(&EndpointStates::default())?;
        for n in 0..nodes {
            let pid = t.cluster.start_agent(n, xlb, agent_args)?;
            t.agents.push(pid);
        }
        Ok(t)
    }

    /// Writes the EndpointSlice for the current pods (as the controller would).
    pub fn write_endpoints(&self, states: &EndpointStates) -> Result<()> {
        let pods: Vec<&str> = self.cluster.pods.iter().map(|p| p.name.as_str()).collect();
        let slice =
            self.cluster
                .endpoint_slice("tomcat6", &[("", TARGET_PORT, "TCP")], &pods, states);
        self.cluster
            .write_manifest("tomcat6-endpoints.yaml", &slice)
    }

    /// `nodeIP:32510` of node `i`.
    #[must_use]
    pub fn node_port(&self, i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster.nodes[i].ip, NODE_PORT)
    }

    /// Waits until the client gets an answer through every node's NodePort.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        // Ready means attached to the NIC and to every pod interface that existed at start;
        // a NodePort answer alone could come before a pod's TC program is in place.
        for i in 0..self.cluster.nodes.len() {
            while self.cluster.agent_ready_count(i) == 0 {
                if Instant::now() > deadline {
                    return Err(LabError::Io {
                        what: "an agent never said it was ready (see the agent logs)",
                        source: std::io::ErrorKind::TimedOut.into(),
                    });
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        for i in 0..self.cluster.nodes.len() {
            let addr = self.node_port(i);
            loop {
                let ok = self
                    .cluster
                    .client
                    .enter(|| echo::http_get(addr, Duration::from_millis(300)).is_ok())?;
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(LabError::Io {
                        what: "the NodePort never answered (see the agent logs)",
                        source: std::io::ErrorKind::TimedOut.into(),
                    });
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}
