//! What the store keeps of each object: exactly the fields `model` reads, converted from the
//! k8s-openapi types on ingest, and nothing else (no managed fields, annotations, selectors,
//! other labels, further endpoint addresses, topology). A typed Service or EndpointSlice costs
//! kilobytes; its compact form a fraction of that, and 10,000 Services' worth of them decides
//! the agent's memory. The conversion gives no meaning to any field: values the model would
//! refuse (a port of 70000, an address that does not parse, an unknown type) are kept as they
//! came, so the model refuses them exactly as before.
use std::{borrow::Cow, fmt, net::Ipv4Addr, str::FromStr as _, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

/// Label of an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label of headless Services' EndpointSlices; kube-proxy never programs such objects.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label handing an object to an alternative service proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// An enumerated string field (protocol, type, policy, ...): the values Kubernetes defines are
/// shared statics, anything else is kept as it came.
pub type Word = Cow<'static, str>;

/// The values of the enumerated fields the store keeps.
const WORDS: [&str; 20] = [
    "TCP",
    "UDP",
    "SCTP",
    "ClusterIP",
    "NodePort",
    "LoadBalancer",
    "ExternalName",
    "Cluster",
    "Local",
    "VIP",
    "Proxy",
    "IPv4",
    "IPv6",
    "FQDN",
    "InternalIP",
    "ExternalIP",
    "Hostname",
    "InternalDNS",
    "ExternalDNS",
    "",
];

fn word(s: String) -> Word {
    WORDS
        .iter()
        .find(|w| **w == s)
        .map_or(Cow::Owned(s), |w| Cow::Borrowed(*w))
}

fn text(s: String) -> Box<str> {
    s.into_boxed_str()
}

/// Converts every item of `items` into a vector of exactly their number. (`collect` of a
/// `Vec`'s own items reuses its buffer, sized for the much bigger k8s-openapi items.)
fn convert<T, U>(items: Vec<T>, f: impl FnMut(T) -> U) -> Vec<U> {
    let mut out = Vec::with_capacity(items.len());
    out.extend(items.into_iter().map(f));
    out
}

/// An address field as it came: an IPv4 address (in 4 bytes) or any other text, which the
/// model parses (IPv6) or refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpText {
    V4(Ipv4Addr),
    Other(Box<str>),
}

impl From<String> for IpText {
    fn from(s: String) -> Self {
        // Ipv4Addr's syntax is strict (no leading zeros, four parts), so its Display gives
        // back exactly the text it parsed.
        Ipv4Addr::from_str(&s).map_or_else(|_| Self::Other(text(s)), Self::V4)
    }
}

impl fmt::Display for IpText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::V4(addr) => addr.fmt(f),
            Self::Other(text) => f.write_str(text),
        }
    }
}

/// The labels the model reads; every other label is dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    /// [`LABEL_SERVICE_NAME`].
    pub service_name: Option<Box<str>>,
    /// [`LABEL_HEADLESS`] is present (whatever its value).
    pub headless: bool,
    /// [`LABEL_SERVICE_PROXY_NAME`].
    pub service_proxy_name: Option<Box<str>>,
}

impl Labels {
    fn of(meta: &mut ObjectMeta) -> Self {
        let Some(labels) = meta.labels.as_mut() else {
            return Self::default();
        };
        Self {
            service_name: labels.remove(LABEL_SERVICE_NAME).map(text),
            headless: labels.contains_key(LABEL_HEADLESS),
            service_proxy_name: labels.remove(LABEL_SERVICE_PROXY_NAME).map(text),
        }
    }
}

/// A Service: its labels, `spec` and `status.loadBalancer.ingress`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredService {
    pub labels: Labels,
    /// None when the object has no `spec`.
    pub spec: Option<StoredServiceSpec>,
    /// `status.loadBalancer.ingress`.
    pub ingress: Vec<StoredIngress>,
}

/// The fields of a Service's `spec` the model reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredServiceSpec {
    pub type_: Option<Word>,
    pub cluster_ip: Option<IpText>,
    /// `clusterIPs`; empty when absent.
    pub cluster_ips: Vec<IpText>,
    pub external_ips: Vec<IpText>,
    pub external_traffic_policy: Option<Word>,
    pub internal_traffic_policy: Option<Word>,
    pub publish_not_ready_addresses: Option<bool>,
    pub session_affinity: Option<Word>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_s: Option<i32>,
    pub ports: Vec<StoredServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredServicePort {
    pub name: Option<Box<str>>,
    pub protocol: Option<Word>,
    pub port: i32,
    pub node_port: Option<i32>,
    pub target_port: Option<IntOrString>,
}

/// One `status.loadBalancer.ingress` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredIngress {
    pub ip: Option<IpText>,
    pub ip_mode: Option<Word>,
}

impl From<Service> for StoredService {
    fn from(mut service: Service) -> Self {
        let labels = Labels::of(&mut service.metadata);
        let ingress = service
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default();
        let ingress = convert(ingress, |i| StoredIngress {
            ip: i.ip.map(IpText::from),
            ip_mode: i.ip_mode.map(word),
        });
        Self {
            labels,
            spec: service.spec.map(StoredServiceSpec::from),
            ingress,
        }
    }
}

impl From<ServiceSpec> for StoredServiceSpec {
    fn from(spec: ServiceSpec) -> Self {
        let ips = |ips: Option<Vec<String>>| convert(ips.unwrap_or_default(), IpText::from);
        Self {
            type_: spec.type_.map(word),
            cluster_ip: spec.cluster_ip.map(IpText::from),
            cluster_ips: ips(spec.cluster_ips),
            external_ips: ips(spec.external_ips),
            external_traffic_policy: spec.external_traffic_policy.map(word),
            internal_traffic_policy: spec.internal_traffic_policy.map(word),
            publish_not_ready_addresses: spec.publish_not_ready_addresses,
            session_affinity: spec.session_affinity.map(word),
            affinity_timeout_s: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            ports: convert(spec.ports.unwrap_or_default(), StoredServicePort::from),
        }
    }
}

impl From<ServicePort> for StoredServicePort {
    fn from(p: ServicePort) -> Self {
        Self {
            name: p.name.map(text),
            protocol: p.protocol.map(word),
            port: p.port,
            node_port: p.node_port,
            target_port: p.target_port.map(|t| match t {
                IntOrString::String(mut name) => {
                    name.shrink_to_fit();
                    IntOrString::String(name)
                }
                number @ IntOrString::Int(_) => number,
            }),
        }
    }
}

/// An EndpointSlice: its labels, address type, ports and endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredEndpointSlice {
    pub labels: Labels,
    pub address_type: Word,
    pub ports: Vec<StoredSlicePort>,
    pub endpoints: Vec<StoredEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSlicePort {
    pub name: Option<Box<str>>,
    pub protocol: Option<Word>,
    pub port: Option<i32>,
}

/// One endpoint: its first address (the only one consumers use), node and conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEndpoint {
    /// None when the endpoint lists no address.
    pub address: Option<IpText>,
    /// Shared by the endpoints of one slice on the same node.
    pub node_name: Option<Arc<str>>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl From<EndpointSlice> for StoredEndpointSlice {
    fn from(mut slice: EndpointSlice) -> Self {
        let labels = Labels::of(&mut slice.metadata);
        // A slice's endpoints sit on a few nodes: one string per node, not per endpoint.
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut node = |name: String| -> Arc<str> {
            if let Some(known) = nodes.iter().find(|n| ***n == *name) {
                return Arc::clone(known);
            }
            let fresh: Arc<str> = name.into();
            nodes.push(Arc::clone(&fresh));
            fresh
        };
        let endpoints = convert(slice.endpoints.unwrap_or_default(), |e: Endpoint| {
            let conditions = e.conditions.unwrap_or_default();
            StoredEndpoint {
                address: e.addresses.into_iter().next().map(IpText::from),
                node_name: e.node_name.map(&mut node),
                ready: conditions.ready,
                serving: conditions.serving,
                terminating: conditions.terminating,
            }
        });
        let ports = convert(slice.ports.unwrap_or_default(), |p: EndpointPort| {
            StoredSlicePort {
                name: p.name.map(text),
                protocol: p.protocol.map(word),
                port: p.port,
            }
        });
        Self {
            labels,
            address_type: word(slice.address_type),
            ports,
            endpoints,
        }
    }
}

/// A Node: its `status.addresses` (type, address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredNode {
    pub addresses: Vec<(Word, Box<str>)>,
}

impl From<Node> for StoredNode {
    fn from(node: Node) -> Self {
        let addresses = node.status.and_then(|s| s.addresses).unwrap_or_default();
        Self {
            addresses: convert(addresses, |a| (word(a.type_), text(a.address))),
        }
    }
}
