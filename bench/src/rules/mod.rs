//! The rulesets kube-proxy would install for a set of Service ports, generated from the rule
//! shapes its iptables and nftables proxiers document, so the forwarding benchmark can measure
//! what users would otherwise run. Only what the benchmark's Services use is modelled:
//! ClusterIP and NodePort frontends, externalTrafficPolicy Cluster and Local, ready endpoints;
//! no session affinity, source ranges, LoadBalancer or external IPs.
pub mod iptables;
pub mod nftables;

use std::{fmt::Write as _, net::Ipv4Addr};

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As iptables and nft spell it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// As Kubernetes spells it.
    #[must_use]
    pub fn kube(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// One ready endpoint of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Runs on this node (counts for externalTrafficPolicy: Local).
    pub local: bool,
}

/// One port of one Service, as kube-proxy programs it (each port gets its own chains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name ("" when unnamed).
    pub port_name: String,
    pub proto: Proto,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// externalTrafficPolicy: Local.
    pub external_local: bool,
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// `namespace/name:port` as kube-proxy's comments name a service port.
    #[must_use]
    pub fn display(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// The endpoints that serve external traffic (all, or only this node's with eTP Local).
    #[must_use]
    pub fn external_endpoints(&self) -> Vec<Endpoint> {
        self.endpoints
            .iter()
            .filter(|e| !self.external_local || e.local)
            .copied()
            .collect()
    }
}

/// What the rules need to know about the cluster and this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNet {
    /// Pods' addresses (kube-proxy's `--cluster-cidr`, its "local traffic" detector).
    pub pod_cidr: &'static str,
    /// The Service CIDR.
    pub service_cidr: &'static str,
    /// Addresses that accept NodePort traffic.
    pub node_ips: Vec<Ipv4Addr>,
}

/// kube-proxy's masquerade mark bit.
pub const MASQ_MARK: &str = "0x4000";

/// A 16-character uppercase base-32 tag of `parts`, standing in for the hash kube-proxy puts
/// in chain names so that names stay short, unique and stable. FNV-1a over the text, then a
/// second FNV-1a pass with another basis for the 16 more bits the tag needs.
#[must_use]
pub fn chain_tag(parts: &[&str]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |basis: u64| {
        let mut h = basis;
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                h = (h ^ 0x1f).wrapping_mul(0x0100_0000_01b3);
            }
            for b in p.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142));
    let mut tag = String::with_capacity(16);
    let mut bits = u128::from(a) << 64 | u128::from(b);
    for _ in 0..16 {
        tag.push(char::from(ALPHABET[(bits & 31) as usize]));
        bits >>= 5;
    }
    tag
}

/// kube-proxy's probability for the `i`-th of `n` endpoints in an iptables statistic chain:
/// each rule takes an equal share of what the rules before it left.
#[must_use]
pub fn probability(i: usize, n: usize) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:.11}", 1.0 / (n - i) as f64);
    s
}

#[cfg(test)]
pub(crate) mod fixtures {
    use std::net::Ipv4Addr;

    use super::{ClusterNet, Endpoint, Proto, ServicePort};

    pub fn net() -> ClusterNet {
        ClusterNet {
            pod_cidr: "10.244.0.0/16",
            service_cidr: "10.96.0.0/12",
            node_ips: vec![Ipv4Addr::new(192, 168, 50, 11)],
        }
    }

    /// A NodePort UDP service with externalTrafficPolicy Local and two local endpoints.
    pub fn measured() -> ServicePort {
        ServicePort {
            namespace: "bench".into(),
            name: "measured".into(),
            port_name: "udp".into(),
            proto: Proto::Udp,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            node_port: Some(32510),
            external_local: true,
            endpoints: vec![
                Endpoint {
                    addr: Ipv4Addr::new(10, 244, 1, 5),
                    port: 9000,
                    local: true,
                },
                Endpoint {
                    addr: Ipv4Addr::new(10, 244, 1, 6),
                    port: 9000,
                    local: true,
                },
            ],
        }
    }

    /// A ClusterIP TCP service with one remote endpoint.
    pub fn filler() -> ServicePort {
        ServicePort {
            namespace: "bench".into(),
            name: "filler-1".into(),
            port_name: String::new(),
            proto: Proto::Tcp,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 11),
            port: 80,
            node_port: None,
            external_local: false,
            endpoints: vec![Endpoint {
                addr: Ipv4Addr::new(10, 244, 2, 7),
                port: 8080,
                local: false,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{chain_tag, probability};

    #[test]
    fn tags_are_stable_distinct_and_16_base32_characters() {
        let a = chain_tag(&["bench/measured:udp", "udp"]);
        assert_eq!(a, chain_tag(&["bench/measured:udp", "udp"]));
        assert_ne!(a, chain_tag(&["bench/measured:udp", "tcp"]));
        // Part boundaries matter: ("ab","c") is not ("a","bc").
        assert_ne!(chain_tag(&["ab", "c"]), chain_tag(&["a", "bc"]));
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c))
        );
    }

    #[test]
    fn probabilities_split_evenly() {
        assert_eq!(probability(0, 3), "0.33333333333");
        assert_eq!(probability(1, 3), "0.50000000000");
        assert_eq!(probability(2, 3), "1.00000000000");
    }
}
