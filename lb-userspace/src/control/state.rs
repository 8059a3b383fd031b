//! Desired state: what the datapath should hold, as plain values. `model` computes it from
//! Kubernetes objects; `programmer` diffs two of them and writes the difference to the maps.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, sync::Arc};

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::IPPROTO_TCP,
            Proto::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

pub use lb_common::Scope;

/// Where clients send: one address/port/protocol in one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

/// Which Kubernetes service port a frontend belongs to. Every frontend of a port shares its
/// strings (cloning one copies three pointers).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The service port's name ("" when unnamed).
    pub port_name: Arc<str>,
}

impl fmt::Display for ServicePortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        Ok(())
    }
}

/// What kind of frontend this is (for listing and metrics; the datapath does not care).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

/// One backend: a pod address and target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

/// A backend as a frontend uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub addr: BackendAddr,
    /// The pod runs on this node.
    pub local: bool,
}

/// Everything the datapath needs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub service: ServicePortRef,
    pub kind: FrontendKind,
    /// Backends to balance over, sorted and without duplicates; empty = drop (no endpoints).
    pub backends: Vec<BackendSpec>,
    /// Remote backends reached from a NIC get SNAT (externalTrafficPolicy=Cluster). False for
    /// externalTrafficPolicy=Local, which keeps the client's address.
    pub snat_remote: bool,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend (`timeoutSeconds`);
    /// 0 = no affinity.
    pub affinity_timeout_s: u32,
}

/// The whole desired datapath state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendAddr, FrontendSpec>,
}
