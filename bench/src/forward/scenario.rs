//! The Services the forwarding benchmark programs, one description for every dataplane: the
//! measured NodePort Service and up to 9,999 others, as kube-proxy's rules (through
//! [`crate::rules`]) and as manifests for xlb's agent.
//!
//! The measured Service `bench/measured` has a UDP port (80 → 9000, NodePort 32510) that the
//! generator loads and a TCP port (8080 → 8080, NodePort 32511) for the latency probe, both
//! with `externalTrafficPolicy: Local` and the 3 pods on the node that receives the traffic:
//! the path of a NodePort/LoadBalancer Service fronting an ingress tier, where the client's
//! address is kept and no dataplane needs SNAT. The other Services are ClusterIP Services
//! with one endpoint each on another node (every 4th also a NodePort with
//! externalTrafficPolicy Cluster), so they fill every table a packet to the measured one may
//! be matched against; the measured Service sits in the middle of the list, where a random
//! position puts it on average.
use std::{fmt::Write as _, net::Ipv4Addr};

use crate::rules::{ClusterNet, Endpoint, Proto, ServicePort};

pub const NODE_PORT_UDP: u16 = 32510;
pub const NODE_PORT_TCP: u16 = 32511;
/// Where the pods' sinks listen.
pub const SINK_PORT: u16 = 9000;
/// Where the pods' echo servers listen (HTTP).
pub const ECHO_PORT: u16 = 8080;
pub const MEASURED_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NAMESPACE: &str = "bench";
const FILLER_NODE: &str = "node2";

/// The lab's addressing as kube-proxy would be configured for it.
#[must_use]
pub fn net(node_ip: Ipv4Addr) -> ClusterNet {
    ClusterNet {
        pod_cidr: "10.244.0.0/16",
        service_cidr: "10.96.0.0/12",
        node_ips: vec![node_ip],
    }
}

fn measured(pods: &[Ipv4Addr]) -> [ServicePort; 2] {
    let endpoints = |port| {
        pods.iter()
            .map(|&addr| Endpoint {
                addr,
                port,
                local: true,
            })
            .collect::<Vec<_>>()
    };
    let port = |port_name: &str, proto, port, node_port, target| ServicePort {
        namespace: NAMESPACE.into(),
        name: "measured".into(),
        port_name: port_name.into(),
        proto,
        cluster_ip: MEASURED_CLUSTER_IP,
        port,
        node_port: Some(node_port),
        external_local: true,
        endpoints: endpoints(target),
    };
    [
        port("udp", Proto::Udp, 80, NODE_PORT_UDP, SINK_PORT),
        port("http", Proto::Tcp, ECHO_PORT, NODE_PORT_TCP, ECHO_PORT),
    ]
}

fn filler(i: usize) -> ServicePort {
    // Cluster IPs from 10.97.0.0 and endpoints from 10.244.2.0 on: distinct for each i.
    let cluster_ip = Ipv4Addr::from(u32::from_be_bytes([10, 97, 0, 0]) + i as u32);
    let addr = Ipv4Addr::from(u32::from_be_bytes([10, 244, 2, 0]) + i as u32);
    ServicePort {
        namespace: NAMESPACE.into(),
        name: format!("filler-{i}"),
        port_name: String::new(),
        proto: Proto::Tcp,
        cluster_ip,
        port: 80,
        node_port: i.is_multiple_of(4).then(|| 30_000 + (i / 4) as u16),
        external_local: false,
        endpoints: vec![Endpoint {
            addr,
            port: 8080,
            local: false,
        }],
    }
}

/// `count` Services (≥ 1) as service ports in rule order: the measured Service's two ports in
/// the middle of `count - 1` fillers.
#[must_use]
pub fn service_ports(count: usize, pods: &[Ipv4Addr]) -> Vec<ServicePort> {
    let fillers = count.saturating_sub(1);
    let middle = fillers / 2;
    let mut out = Vec::with_capacity(fillers + 2);
    out.extend((1..=middle).map(filler));
    out.extend(measured(pods));
    out.extend((middle + 1..=fillers).map(filler));
    out
}

/// The manifests the API server would hold for `ports`: one Service per (namespace, name)
/// with its ports, and one EndpointSlice with its endpoints (nodeName `node1` for local
/// endpoints, as in the lab).
#[must_use]
pub fn manifests(ports: &[ServicePort], local_node: &str) -> String {
    let mut y = String::with_capacity(ports.len() * 700);
    let mut i = 0;
    while i < ports.len() {
        let first = &ports[i];
        let mut j = i;
        while j < ports.len()
            && ports[j].name == first.name
            && ports[j].namespace == first.namespace
        {
            j += 1;
        }
        service_yaml(&mut y, &ports[i..j]);
        slice_yaml(&mut y, &ports[i..j], local_node);
        i = j;
    }
    y
}

fn service_yaml(y: &mut String, ports: &[ServicePort]) {
    let s = &ports[0];
    let node_port = ports.iter().any(|p| p.node_port.is_some());
    let _ = write!(
        y,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  type: {}\n  clusterIP: {}\n",
        s.name,
        s.namespace,
        if node_port { "NodePort" } else { "ClusterIP" },
        s.cluster_ip
    );
    if s.external_local {
        y.push_str("  externalTrafficPolicy: Local\n");
    }
    y.push_str("  ports:\n");
    for p in ports {
        let target = p.endpoints.first().map_or(p.port, |e| e.port);
        let _ = write!(
            y,
            "    - {{name: \"{}\", port: {}, targetPort: {target}, protocol: {}",
            p.port_name,
            p.port,
            p.proto.kube()
        );
        if let Some(np) = p.node_port {
            let _ = write!(y, ", nodePort: {np}");
        }
        y.push_str("}\n");
    }
}

fn slice_yaml(y: &mut String, ports: &[ServicePort], local_node: &str) {
    let s = &ports[0];
    let _ = write!(
        y,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}-x1\n  namespace: {}\n  labels: {{kubernetes.io/service-name: {}}}\naddressType: IPv4\nports:\n",
        s.name, s.namespace, s.name
    );
    for p in ports {
        let port = p.endpoints.first().map_or(p.port, |e| e.port);
        let _ = writeln!(
            y,
            "  - {{name: \"{}\", port: {port}, protocol: {}}}",
            p.port_name,
            p.proto.kube()
        );
    }
    y.push_str("endpoints:\n");
    for e in &s.endpoints {
        let node = if e.local { local_node } else { FILLER_NODE };
        let _ = writeln!(
            y,
            "  - {{addresses: [\"{}\"], nodeName: {node}, conditions: {{ready: true}}}}",
            e.addr
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{manifests, service_ports};

    fn pods() -> Vec<Ipv4Addr> {
        (5..8).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect()
    }

    #[test]
    fn the_measured_service_sits_in_the_middle() {
        let ports = service_ports(5, &pods());
        let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "filler-1", "filler-2", "measured", "measured", "filler-3", "filler-4"
            ]
        );
        assert_eq!(service_ports(1, &pods()).len(), 2);
        let many = service_ports(10_000, &pods());
        let mut ips: Vec<_> = many.iter().map(|p| (p.cluster_ip, p.port)).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 10_001);
        let mut nps: Vec<_> = many.iter().filter_map(|p| p.node_port).collect();
        nps.sort_unstable();
        nps.dedup();
        assert_eq!(nps.len(), 2_499 + 2);
        assert!(nps.iter().all(|&p| (30_000..=32_767).contains(&p)));
    }

    #[test]
    fn manifests_group_ports_of_a_service() {
        let y = manifests(&service_ports(1, &pods()), "node1");
        assert_eq!(y.matches("kind: Service\n").count(), 1);
        assert_eq!(y.matches("kind: EndpointSlice").count(), 1);
        assert!(y.contains("externalTrafficPolicy: Local"));
        assert!(y.contains(
            "{name: \"udp\", port: 80, targetPort: 9000, protocol: UDP, nodePort: 32510}"
        ));
        assert!(
            y.contains("{addresses: [\"10.244.1.7\"], nodeName: node1, conditions: {ready: true}}")
        );
    }
}
